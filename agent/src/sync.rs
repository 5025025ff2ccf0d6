//! The sync loop: source snapshots → model → reconcilers → kernel.
//!
//! Event driven: a new snapshot triggers a sync, but syncs are at least `min_sync_period`
//! apart, so a burst of changes is coalesced into one. Between syncs the reconcilers diff
//! against a cache of the kernel's state kept up to date by the appliers; every `sync_period`
//! a full resync dumps the kernel again and repairs any drift (an IPVS service deleted by hand
//! comes back). Start-up adopts what the kernel already holds: it is dumped, never flushed, so
//! a restart with nothing changed issues no operation and disturbs no connection.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ipvs::IpvsHandle;
use tokio::sync::watch;

use crate::model::{self, DUMMY_INTERFACE, DesiredState, ModelConfig, NodeInfo};
use crate::node::Rtnl;
use crate::reconcile::{addresses, ipvs as ipvs_rec};
use crate::source::Snapshot;
use crate::state;

/// Settings of the loop and the reconcilers.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub model: ModelConfig,
    pub node_name: String,
    /// The Node's InternalIPs (`--node-ip`); empty: the host's addresses.
    pub node_ips: Vec<IpAddr>,
    pub min_sync_period: Duration,
    pub sync_period: Duration,
    /// How long a removed TCP/SCTP destination may drain before it is deleted anyway.
    pub drain_timeout: Duration,
    /// How often draining destinations are checked for idleness.
    pub drain_check_period: Duration,
    pub node_port_range: std::ops::RangeInclusive<u16>,
    /// Where the state file for `inspect` is written.
    pub state_dir: PathBuf,
    /// IPVS requests in flight at once.
    pub ipvs_concurrency: usize,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            model: ModelConfig::default(),
            node_name: String::new(),
            node_ips: Vec::new(),
            min_sync_period: Duration::from_secs(1),
            sync_period: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(300),
            drain_check_period: Duration::from_secs(2),
            node_port_range: 30000..=32767,
            state_dir: PathBuf::from(state::DEFAULT_STATE_DIR),
            ipvs_concurrency: 64,
        }
    }
}

/// What one sync did.
#[derive(Debug, Default, serde::Serialize)]
pub struct SyncReport {
    pub full: bool,
    pub generation: u64,
    pub virtual_services: usize,
    pub ipvs_ops: ipvs_rec::OpCounts,
    pub addresses_added: usize,
    pub addresses_removed: usize,
    pub draining: usize,
    pub rejected: usize,
    pub failures: usize,
    pub duration_ms: f64,
}

/// The agent's view of the node: kernel handles and the cached kernel state.
pub struct Syncer {
    cfg: SyncConfig,
    ipvs: IpvsHandle,
    rtnl: Rtnl,
    dummy_index: u32,
    cache: ipvs_rec::ObservedIpvs,
    bound: BTreeSet<IpAddr>,
    drains: ipvs_rec::Drains,
    /// Rejections already logged, so each is logged once.
    logged_rejections: BTreeSet<(String, String)>,
}

/// The node as the model sees it: name, every local address, InternalIPs.
pub async fn node_info(rtnl: &Rtnl, name: &str, node_ips: &[IpAddr]) -> anyhow::Result<NodeInfo> {
    let addresses = rtnl
        .addresses()
        .await
        .context("reading the node's addresses")?;
    let internal_ips = if node_ips.is_empty() {
        addresses
            .iter()
            .filter(|a| a.interface != DUMMY_INTERFACE && !a.address.is_loopback())
            .map(|a| a.address)
            .collect()
    } else {
        node_ips.to_vec()
    };
    Ok(NodeInfo {
        name: name.to_string(),
        addresses,
        internal_ips,
        ..NodeInfo::default()
    })
}

impl Syncer {
    /// Connects to the kernel, creates `kube-ipvs0` if needed and adopts the current state.
    pub async fn start(cfg: SyncConfig) -> anyhow::Result<Syncer> {
        let ipvs = IpvsHandle::connect().await.context("connecting to IPVS")?;
        let rtnl = Rtnl::connect().context("connecting to rtnetlink")?;
        let dummy_index = rtnl
            .ensure_dummy(DUMMY_INTERFACE)
            .await
            .with_context(|| format!("creating {DUMMY_INTERFACE}"))?;
        let mut s = Syncer {
            cfg,
            ipvs,
            rtnl,
            dummy_index,
            cache: Default::default(),
            bound: Default::default(),
            drains: Default::default(),
            logged_rejections: Default::default(),
        };
        s.observe().await?;
        Ok(s)
    }

    async fn observe(&mut self) -> anyhow::Result<()> {
        self.cache = ipvs_rec::observe(&self.ipvs)
            .await
            .context("dumping IPVS")?;
        self.bound = self
            .rtnl
            .addresses_on(self.dummy_index)
            .await
            .with_context(|| format!("reading {DUMMY_INTERFACE}'s addresses"))?;
        Ok(())
    }

    /// Logs each rejected object, and each EndpointSlice whose Service is unknown, once.
    fn log_rejections(&mut self, desired: &DesiredState, snapshot: &Snapshot) {
        let mut now: BTreeSet<(String, String)> = desired
            .rejected
            .iter()
            .map(|r| (r.object.clone(), format!("rejected: {}", r.reason)))
            .collect();
        let known: BTreeSet<model::ServiceRef> = snapshot
            .services
            .iter()
            .map(|s| {
                model::ServiceRef::new(
                    s.metadata.namespace.as_deref().unwrap_or("default"),
                    s.metadata.name.as_deref().unwrap_or(""),
                )
            })
            .collect();
        for slice in &snapshot.endpoint_slices {
            if let Some(svc) = model::endpoint_slice_service(slice)
                && !known.contains(&svc)
            {
                let name = slice.metadata.name.as_deref().unwrap_or("");
                now.insert((
                    format!("EndpointSlice {}/{name}", svc.namespace),
                    format!("ignored: its Service {svc} is unknown"),
                ));
            }
        }
        for (object, reason) in now.difference(&self.logged_rejections) {
            tracing::warn!(object = %object, "{reason}");
        }
        self.logged_rejections = now;
    }

    /// One sync of `snapshot` into the kernel; `full` dumps the kernel first.
    pub async fn sync(&mut self, snapshot: &Snapshot, full: bool) -> anyhow::Result<SyncReport> {
        let start = Instant::now();
        if full {
            self.observe().await?;
        }
        let node = node_info(&self.rtnl, &self.cfg.node_name, &self.cfg.node_ips).await?;
        let desired = model::build(
            &snapshot.services,
            &snapshot.endpoint_slices,
            &node,
            &self.cfg.model,
        );
        self.log_rejections(&desired, snapshot);
        let mut report = SyncReport {
            full,
            generation: snapshot.generation,
            virtual_services: desired.virtual_services.len(),
            rejected: desired.rejected.len(),
            ..SyncReport::default()
        };

        // Addresses are added first, so a new virtual service answers as soon as it exists, and
        // removed last: an address on kube-ipvs0 is what makes its IPVS services ours.
        let addr_plan = addresses::plan(&desired.bound_addresses, &self.bound);
        let adds = addresses::AddressPlan {
            add: addr_plan.add,
            remove: Vec::new(),
        };
        report.addresses_added = adds.add.len();
        for e in addresses::apply(&self.rtnl, self.dummy_index, &adds, &mut self.bound).await {
            report.failures += 1;
            tracing::error!("{e}");
        }

        if !self.drains.is_empty()
            && let Err(e) =
                ipvs_rec::refresh_draining(&self.ipvs, &mut self.cache, &self.drains).await
        {
            tracing::warn!("reading draining destinations: {e}");
        }
        let want = ipvs_rec::desired(&desired.virtual_services);
        let ownership = ipvs_rec::Ownership {
            bound: self.bound.clone(),
            node_addresses: node.addresses.iter().map(|a| a.address).collect(),
            node_port_range: self.cfg.node_port_range.clone(),
        };
        let ops = ipvs_rec::plan(
            &want,
            &self.cache,
            &ownership,
            &mut self.drains,
            self.cfg.drain_timeout,
            Instant::now(),
        );
        let (counts, failures) =
            ipvs_rec::apply(&self.ipvs, ops, &mut self.cache, self.cfg.ipvs_concurrency).await;
        for f in &failures {
            let origin = want.get(&f.op.service()).map_or("", |d| d.origin.as_str());
            tracing::error!(service = origin, op = f.op.kind(), "{}", f.error);
        }

        // An address still carrying one of our IPVS services (its deletion failed) stays, so
        // the service stays ours and the next sync retries.
        let in_use: BTreeSet<IpAddr> = self
            .cache
            .keys()
            .filter_map(|k| match k {
                ipvs::ServiceKey::Tuple { address, .. } => Some(*address),
                ipvs::ServiceKey::Fwmark { .. } => None,
            })
            .collect();
        let removes = addresses::AddressPlan {
            add: Vec::new(),
            remove: addr_plan
                .remove
                .into_iter()
                .filter(|a| !in_use.contains(a))
                .collect(),
        };
        report.addresses_removed = removes.remove.len();
        for e in addresses::apply(&self.rtnl, self.dummy_index, &removes, &mut self.bound).await {
            report.failures += 1;
            tracing::error!("{e}");
        }
        report.failures += failures.len();
        report.ipvs_ops = counts;
        report.draining = self.drains.len();

        if let Err(e) = state::write(&self.cfg.state_dir, &node, &desired) {
            tracing::warn!("writing the state file: {e:#}");
        }
        report.duration_ms = start.elapsed().as_secs_f64() * 1e3;
        Ok(report)
    }

    /// Whether destinations are draining (the loop then checks them periodically).
    pub fn draining(&self) -> bool {
        !self.drains.is_empty()
    }
}

/// Runs until `shutdown` resolves: syncs on every new snapshot (coalesced by
/// `min_sync_period`), checks draining destinations, and resyncs fully every `sync_period`.
/// The kernel state is left in place on exit.
pub async fn run(
    mut syncer: Syncer,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let cfg = syncer.cfg.clone();
    let mut pending = true;
    let mut source_open = true;
    let mut last_sync: Option<Instant> = None;
    let mut first = true;
    let mut next_full = Instant::now() + cfg.sync_period;
    loop {
        let now = Instant::now();
        let mut wake = next_full;
        if pending {
            wake = wake.min(last_sync.map_or(now, |t| (t + cfg.min_sync_period).max(now)));
        } else if syncer.draining() {
            wake = wake.min(now + cfg.drain_check_period);
        }
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down; kernel state left in place");
                return Ok(());
            }
            changed = snapshots.changed(), if source_open => {
                match changed {
                    Ok(()) => pending = true,
                    Err(_) => source_open = false,
                }
                continue;
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        let full = Instant::now() >= next_full;
        if full {
            next_full = Instant::now() + cfg.sync_period;
        }
        let snapshot = snapshots.borrow_and_update().clone();
        pending = false;
        last_sync = Some(Instant::now());
        match syncer.sync(&snapshot, full).await {
            Ok(r) => {
                let ops = r.ipvs_ops.total();
                let changed = ops > 0 || r.addresses_added + r.addresses_removed > 0;
                // Every sync that did something is logged, and the first one (a restart that
                // finds nothing to do says so).
                if changed || r.failures > 0 || full || std::mem::take(&mut first) {
                    tracing::info!(
                        full = r.full,
                        generation = r.generation,
                        virtual_services = r.virtual_services,
                        ipvs_ops = %serde_json::to_string(&r.ipvs_ops).unwrap_or_default(),
                        addresses_added = r.addresses_added,
                        addresses_removed = r.addresses_removed,
                        draining = r.draining,
                        rejected = r.rejected,
                        failures = r.failures,
                        duration_ms = r.duration_ms,
                        "sync done"
                    );
                }
            }
            Err(e) => {
                tracing::error!("sync failed: {e:#}");
                pending = true;
            }
        }
    }
}
