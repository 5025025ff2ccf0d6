//! The sync loop: source snapshots → model → reconcilers → kernel.
//!
//! Event driven: a new snapshot triggers a sync, but syncs are at least `min_sync_period`
//! apart, so a burst of changes is coalesced into one. Between syncs the reconcilers diff
//! against a cache of the kernel's state kept up to date by the appliers; every `sync_period`
//! a full resync dumps the kernel again and repairs any drift (an IPVS service deleted by hand
//! comes back). Start-up adopts what the kernel already holds: it is dumped, never flushed, so
//! a restart with nothing changed issues no operation and disturbs no connection.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ipvs::IpvsHandle;
use tokio::sync::watch;

use crate::config::{IpvsSettings, SyncTiming};
use crate::datapath::{Datapath, DatapathConfig, DeviceReport};
use crate::model::{self, DUMMY_INTERFACE, DesiredState, ModelConfig, NodeInfo};
use crate::node::{AddressEntry, Link, NodeEvent, Rtnl};
use crate::node_state;
use crate::reconcile::datapath::{MapPlan, sctp_not_source_nated};
use crate::reconcile::{addresses, ipvs as ipvs_rec};
use crate::source::Snapshot;
use crate::state;

/// The state file is rewritten at most this often (and on full syncs).
const STATE_WRITE_PERIOD: Duration = Duration::from_secs(2);

/// Settings of the loop and the reconcilers.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub model: ModelConfig,
    pub node_name: String,
    /// The Node's InternalIPs (`--node-ip`); empty: the host's addresses.
    pub node_ips: Vec<IpAddr>,
    /// The loop's periods and the drain timeout; its node check period is how often the node
    /// state outside IPVS is checked and repaired (`crate::node_state`), nf_tables and
    /// kube-ipvs0 changes bring a check forward.
    pub timing: SyncTiming,
    /// How often draining destinations are checked for idleness.
    pub drain_check_period: Duration,
    pub node_port_range: std::ops::RangeInclusive<u16>,
    /// Where the state file for `inspect` is written.
    pub state_dir: PathBuf,
    /// IPVS requests per `sendmsg` (at most [`ipvs::MAX_BATCH`]).
    pub ipvs_batch: usize,
    /// The eBPF datapath; `None` runs IPVS alone (no SNAT, no conntrack bypass).
    pub datapath: Option<DatapathConfig>,
    /// How often expired SNAT entries are swept.
    pub sweep_period: Duration,
    /// IPVS connection timeouts to set (unset: leave the kernel's), and the services never
    /// touched (`ipvs.excludeCIDRs`).
    pub ipvs: IpvsSettings,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            model: ModelConfig::default(),
            node_name: String::new(),
            node_ips: Vec::new(),
            timing: SyncTiming::default(),
            drain_check_period: Duration::from_secs(2),
            node_port_range: 30000..=32767,
            state_dir: PathBuf::from(state::DEFAULT_STATE_DIR),
            ipvs_batch: 128,
            datapath: Some(DatapathConfig::default()),
            sweep_period: Duration::from_secs(10),
            ipvs: IpvsSettings::default(),
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
    pub map_changes: usize,
    pub devices_attached: usize,
    pub rejected: usize,
    pub failures: usize,
    pub duration_ms: f64,
    /// Where the time went, per phase (ms).
    pub phases: BTreeMap<&'static str, f64>,
}

/// The agent's view of the node: kernel handles and the cached kernel state.
pub struct Syncer {
    cfg: SyncConfig,
    ipvs: IpvsHandle,
    /// The IPVS changes' socket (the handle's is for dumps and single requests).
    ipvs_batch: ipvs_rec::SharedBatch,
    rtnl: Rtnl,
    dummy_index: u32,
    cache: ipvs_rec::ObservedIpvs,
    bound: BTreeSet<IpAddr>,
    drains: ipvs_rec::Drains,
    datapath: Option<Datapath>,
    /// The model's memo: a change recomputes only the Services it touches.
    model: model::ModelCache,
    /// The node's links and addresses, re-read when they change (rtnetlink events) and on
    /// full syncs.
    node: Option<(Vec<Link>, Vec<AddressEntry>)>,
    /// Rejections already logged, so each is logged once.
    logged_rejections: BTreeSet<(String, String)>,
    /// SCTP services reported as not source-NATed, so each is reported once.
    logged_sctp: BTreeSet<String>,
    /// The state file is behind the kernel (written at most every few seconds).
    state_dirty: bool,
    state_written: Option<Instant>,
    /// Which IPVS services are ours, refreshed when the addresses it depends on change.
    ownership: Option<ipvs_rec::Ownership>,
    /// Virtual services the state file of an earlier agent of this boot records as programmed:
    /// adopted by the first full sync (see [`ipvs_rec::Ownership::recorded`]), then forgotten.
    recorded: BTreeSet<ipvs::ServiceKey>,
    /// Desired virtual services held by someone else's IPVS service, reported once each.
    logged_foreign: BTreeSet<ipvs::ServiceKey>,
    state_writer: Option<std::thread::JoinHandle<()>>,
}

/// The node as the model sees it: name, every local address, InternalIPs (`--node-ip`, else
/// the Node object's, else the host's addresses) and labels (from the Node object).
pub fn node_info(
    name: &str,
    node_ips: &[IpAddr],
    node: Option<&k8s_openapi::api::core::v1::Node>,
    links: &[Link],
    entries: &[AddressEntry],
) -> NodeInfo {
    let addresses = crate::node::local_addresses(links, entries);
    let from_node: Vec<IpAddr> = node
        .and_then(|n| n.status.as_ref()?.addresses.as_ref())
        .map(|a| {
            a.iter()
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let internal_ips = if !node_ips.is_empty() {
        node_ips.to_vec()
    } else if !from_node.is_empty() {
        from_node
    } else {
        let usable: BTreeSet<IpAddr> = entries
            .iter()
            .filter(|e| e.usable_as_source())
            .map(|e| e.address)
            .collect();
        addresses
            .iter()
            .filter(|a| a.interface != DUMMY_INTERFACE && usable.contains(&a.address))
            .map(|a| a.address)
            .collect()
    };
    NodeInfo {
        name: name.to_string(),
        addresses,
        internal_ips,
        labels: node
            .and_then(|n| n.metadata.labels.clone())
            .unwrap_or_default(),
        ..NodeInfo::default()
    }
}

/// The virtual services the state file in `dir` records as programmed, when an agent that did
/// not mark its IPVS services wrote it (none when it is missing or unreadable, which is logged,
/// or written by an agent that marks: the mark then says what is ours, and the file lists
/// desired services, some of which a foreign service may hold).
fn recorded_keys(dir: &std::path::Path) -> BTreeSet<ipvs::ServiceKey> {
    let rec = match state::read(dir) {
        Ok(rec) => rec,
        Err(e) => {
            tracing::warn!("reading the state file: {e:#}");
            return BTreeSet::new();
        }
    };
    if rec.ipvs_mark {
        return BTreeSet::new();
    }
    rec.virtual_services
        .iter()
        .filter_map(|v| {
            Some(
                model::ServicePort::new(v.address, model::Protocol::from_k8s(&v.protocol)?, v.port)
                    .ipvs_key(),
            )
        })
        .collect()
}

/// Reads the node's links and addresses.
pub async fn read_node(rtnl: &Rtnl) -> anyhow::Result<(Vec<Link>, Vec<AddressEntry>)> {
    let links = rtnl
        .links()
        .await
        .context("listing the node's interfaces")?;
    let entries = rtnl
        .address_entries()
        .await
        .context("reading the node's addresses")?;
    Ok((links, entries))
}

/// Times the phases of one sync, in ms ([`SyncReport::phases`]).
struct PhaseTimer {
    phases: BTreeMap<&'static str, f64>,
    mark: Instant,
}

impl PhaseTimer {
    fn new() -> Self {
        PhaseTimer {
            phases: BTreeMap::new(),
            mark: Instant::now(),
        }
    }

    /// The phase `name` ended now.
    fn done(&mut self, name: &'static str) {
        let now = Instant::now();
        self.phases
            .insert(name, (now - self.mark).as_secs_f64() * 1e3);
        self.mark = now;
    }
}

/// The desired IPVS table: every virtual service, or those in `scope`.
fn ipvs_want(
    desired: &DesiredState,
    scope: Option<&BTreeSet<ipvs::ServiceKey>>,
) -> ipvs_rec::DesiredIpvs {
    match scope {
        None => ipvs_rec::desired(desired.virtual_services.iter().map(|v| &**v)),
        Some(scope) => ipvs_rec::desired(
            scope
                .iter()
                .filter_map(|k| match k {
                    ipvs::ServiceKey::Tuple {
                        protocol,
                        address,
                        port,
                    } => desired.find(&model::ServicePort::new(
                        *address,
                        (*protocol).try_into().ok()?,
                        *port,
                    )),
                    ipvs::ServiceKey::Fwmark { .. } => None,
                })
                .map(|v| &**v),
        ),
    }
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
        let ipvs_batch = ipvs
            .batch(cfg.ipvs_batch)
            .context("opening the IPVS batch socket")?;
        let mut s = Syncer {
            cfg,
            ipvs_batch: Arc::new(std::sync::Mutex::new(ipvs_batch)),
            ipvs,
            rtnl,
            dummy_index,
            cache: Default::default(),
            bound: Default::default(),
            drains: Default::default(),
            datapath: None,
            model: Default::default(),
            node: None,
            logged_rejections: Default::default(),
            logged_sctp: Default::default(),
            state_dirty: false,
            state_written: None,
            ownership: None,
            recorded: BTreeSet::new(),
            logged_foreign: BTreeSet::new(),
            state_writer: None,
        };
        s.recorded = recorded_keys(&s.cfg.state_dir);
        if let Some(dp) = s.cfg.datapath.clone() {
            s.datapath = Some(Datapath::start(dp)?);
        }
        // Before the first sync marks or translates anything: the connections kube-proxy's
        // conntrack holds to its virtual services (the node's IPVS services now) stay its own.
        if let Some(dp) = &mut s.datapath {
            let ports = match s.ipvs.services().await {
                Ok(services) => services
                    .iter()
                    .filter_map(|v| match v.key {
                        ipvs::ServiceKey::Tuple {
                            protocol,
                            address,
                            port,
                        } => u8::try_from(protocol.number())
                            .ok()
                            .map(|proto| (address, proto, port)),
                        ipvs::ServiceKey::Fwmark { .. } => None,
                    })
                    .collect(),
                Err(e) => {
                    tracing::warn!("listing IPVS services for the switch window: {e}");
                    Default::default()
                }
            };
            if let Err(e) = dp.seed_switch(&ports) {
                tracing::warn!(
                    "switch window from kube-proxy not opened (connections kube-proxy opened may \
                     be reset): {e:#}"
                );
            }
        }
        let t = s.cfg.ipvs.timeouts.kernel();
        if t.tcp + t.tcp_fin + t.udp > 0 {
            s.ipvs
                .set_timeouts(&t)
                .await
                .context("setting the IPVS timeouts")?;
        }
        // The sweeper expires what IPVS expires: the kernel's timeouts, whoever set them.
        if let Some(dp) = &mut s.datapath {
            match s.ipvs.timeouts().await {
                Ok(kernel) => dp.follow_ipvs_timeouts(&kernel),
                Err(e) => {
                    tracing::warn!("reading the IPVS timeouts (the sweeper keeps its own): {e}")
                }
            }
        }
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
        if let Some(dp) = &mut self.datapath {
            dp.observe().context("reading the datapath maps")?;
        }
        Ok(())
    }

    /// Logs each rejected object (a warning), and each EndpointSlice whose Service is unknown
    /// (at debug: normal in a real cluster, where a slice can be seen before its Service or
    /// outlive it briefly), once.
    fn log_rejections(&mut self, desired: &DesiredState) {
        let rejected = desired
            .rejected
            .iter()
            .map(|r| (r.object.clone(), format!("rejected: {}", r.reason)));
        let orphans = desired.ignored_slices.iter().map(|s| {
            let (object, reason) = s.split_once(": ").unwrap_or((s, ""));
            (object.to_string(), reason.to_string())
        });
        let now: BTreeSet<(String, String)> = rejected.chain(orphans).collect();
        for (object, reason) in now.difference(&self.logged_rejections) {
            if reason.starts_with("rejected: ") {
                tracing::warn!(object = %object, "{reason}");
            } else {
                tracing::debug!(object = %object, "{reason}");
            }
        }
        self.logged_rejections = now;
    }

    /// The node's links and addresses have changed: re-read them at the next sync.
    pub fn node_changed(&mut self) {
        self.node = None;
    }

    /// One sync of `snapshot` into the kernel; `full` dumps the kernel first. Its phases, in
    /// order (each timed in [`SyncReport::phases`]): observe (full syncs), node, model,
    /// maps_plan, maps_add (addresses and map entries added first, so a new virtual service
    /// answers as soon as it exists), ipvs_plan, ipvs_apply, remove (map entries and addresses
    /// removed last: an address on kube-ipvs0 is what makes its IPVS services ours), state.
    pub async fn sync(
        &mut self,
        snapshot: &Snapshot,
        full: bool,
    ) -> anyhow::Result<(SyncReport, DesiredState)> {
        let start = Instant::now();
        let mut timer = PhaseTimer::new();
        if full {
            self.observe().await?;
            timer.done("observe");
            self.node = None;
        }
        let refreshed = self.node.is_none();
        let (node, devices) = self.read_node_info(snapshot).await?;
        timer.done("node");
        let (desired, changed) = self.build_model(snapshot, &node, full);
        timer.done("model");
        let mut report = SyncReport {
            full,
            generation: snapshot.generation,
            virtual_services: desired.virtual_services.len(),
            rejected: desired.rejected.len(),
            devices_attached: devices.attached.len(),
            failures: devices.failures.len(),
            ..SyncReport::default()
        };
        self.report_sctp(&desired, &changed);
        let map_plan = self.plan_maps(&desired, &changed);
        timer.done("maps_plan");

        let addr_plan = self.plan_addresses(&desired, &changed);
        self.add_addresses(addr_plan.add, &mut report);
        self.apply_maps(&map_plan, true, &mut report);
        self.refresh_draining().await;
        timer.done("maps_add");

        let scope = self.ipvs_scope(&changed);
        let want = ipvs_want(&desired, scope.as_ref());
        if refreshed
            || report.addresses_added + addr_plan.remove.len() > 0
            || self.ownership.is_none()
        {
            self.refresh_ownership(&node);
        }
        let ops = self.plan_ipvs(&want, scope.as_ref());
        timer.done("ipvs_plan");
        self.apply_ipvs(ops, &want, &mut report).await;
        timer.done("ipvs_apply");

        self.apply_maps(&map_plan, false, &mut report);
        self.remove_addresses(addr_plan.remove, &mut report);
        report.draining = self.drains.len();
        timer.done("remove");

        self.follow_state_file(full, &changed, &node, &desired);
        timer.done("state");
        report.phases = timer.phases;
        report.duration_ms = start.elapsed().as_secs_f64() * 1e3;
        Ok((report, desired))
    }

    /// Phase "node": the node's information, its links and addresses re-read when they
    /// changed, and the datapath's devices following them.
    async fn read_node_info(
        &mut self,
        snapshot: &Snapshot,
    ) -> anyhow::Result<(NodeInfo, DeviceReport)> {
        let refreshed = self.node.is_none();
        if refreshed {
            self.node = Some(read_node(&self.rtnl).await?);
        }
        let (links, entries) = self
            .node
            .as_ref()
            .map(|(l, e)| (l.as_slice(), e.as_slice()))
            .unwrap_or_default();
        let node = node_info(
            &self.cfg.node_name,
            &self.cfg.node_ips,
            snapshot.node.as_ref(),
            links,
            entries,
        );
        let mut devices = DeviceReport::default();
        if refreshed && let Some(dp) = &mut self.datapath {
            let primary4 = node.internal_ips.iter().find_map(|a| match a {
                IpAddr::V4(v) => Some(*v),
                IpAddr::V6(_) => None,
            });
            let primary6 = node.internal_ips.iter().find_map(|a| match a {
                IpAddr::V6(v) => Some(*v),
                IpAddr::V4(_) => None,
            });
            devices = dp.sync_devices(links, entries, (primary4, primary6));
            for f in &devices.failures {
                tracing::error!("{f}");
            }
        }
        Ok((node, devices))
    }

    /// Phase "model": the desired state, and which virtual services may have changed (all of
    /// them on a full sync). Rejected objects are logged once.
    fn build_model(
        &mut self,
        snapshot: &Snapshot,
        node: &NodeInfo,
        full: bool,
    ) -> (DesiredState, model::Changed) {
        let (desired, changed) = self.model.build_objects(
            &snapshot.services,
            &snapshot.endpoint_slices,
            node,
            &self.cfg.model,
        );
        let changed = if full { model::Changed::All } else { changed };
        self.log_rejections(&desired);
        (desired, changed)
    }

    /// SCTP virtual services that would need SNAT are reported once each (all of them after a
    /// full rebuild, else only among the changed ones).
    fn report_sctp(&mut self, desired: &DesiredState, changed: &model::Changed) {
        let sctp: BTreeSet<String> = match changed {
            model::Changed::All => {
                sctp_not_source_nated(desired.virtual_services.iter().map(|v| &**v))
            }
            model::Changed::Keys(keys) => sctp_not_source_nated(
                keys.iter()
                    .filter(|k| k.protocol == model::Protocol::Sctp)
                    .filter_map(|k| desired.find(k))
                    .map(|v| &**v),
            ),
        }
        .into_iter()
        .collect();
        for s in sctp.difference(&self.logged_sctp) {
            tracing::warn!(service = %s, "SCTP is passed to IPVS untranslated: this virtual service is not source-NATed");
        }
        match changed {
            model::Changed::All => self.logged_sctp = sctp,
            model::Changed::Keys(_) => self.logged_sctp.extend(sctp),
        }
    }

    /// Phase "maps_plan": the datapath map changes (none without a datapath).
    fn plan_maps(&mut self, desired: &DesiredState, changed: &model::Changed) -> MapPlan {
        let map_plan = self
            .datapath
            .as_mut()
            .map(|dp| dp.plan_maps(desired, changed))
            .unwrap_or_default();
        for e in &map_plan.errors {
            tracing::error!("{e}");
        }
        map_plan
    }

    /// The addresses of kube-ipvs0 to add and remove. An incremental sync only looks at the
    /// addresses of the changed virtual services.
    fn plan_addresses(
        &self,
        desired: &DesiredState,
        changed: &model::Changed,
    ) -> addresses::AddressPlan {
        match changed {
            model::Changed::All => addresses::plan(&desired.bound_addresses, &self.bound),
            model::Changed::Keys(keys) => {
                let touched: BTreeSet<IpAddr> = keys.iter().map(|k| k.address).collect();
                let wanted = |a: &IpAddr| desired.bound_addresses.contains(a);
                addresses::AddressPlan {
                    add: touched
                        .iter()
                        .filter(|a| wanted(a) && !self.bound.contains(*a))
                        .copied()
                        .collect(),
                    remove: touched
                        .iter()
                        .filter(|a| !wanted(a) && self.bound.contains(*a))
                        .copied()
                        .collect(),
                }
            }
        }
    }

    fn add_addresses(&mut self, add: Vec<IpAddr>, report: &mut SyncReport) {
        let adds = addresses::AddressPlan {
            add,
            remove: Vec::new(),
        };
        report.addresses_added = adds.add.len();
        for e in addresses::apply(&self.rtnl, self.dummy_index, &adds, &mut self.bound) {
            report.failures += 1;
            tracing::error!("{e}");
        }
    }

    /// Re-reads the draining destinations' connection counts (they decide when a drain ends).
    async fn refresh_draining(&mut self) {
        if !self.drains.is_empty()
            && let Err(e) =
                ipvs_rec::refresh_draining(&self.ipvs, &mut self.cache, &self.drains).await
        {
            tracing::warn!("reading draining destinations: {e}");
        }
    }

    /// The virtual services to diff: all (`None`), or the changed ones plus those still
    /// draining.
    fn ipvs_scope(&self, changed: &model::Changed) -> Option<BTreeSet<ipvs::ServiceKey>> {
        match changed {
            model::Changed::All => None,
            model::Changed::Keys(keys) => Some(
                keys.iter()
                    .map(|k| k.ipvs_key())
                    .chain(self.drains.services())
                    .collect(),
            ),
        }
    }

    /// Which IPVS services are ours: recomputed when the addresses it depends on changed.
    fn refresh_ownership(&mut self, node: &NodeInfo) {
        self.ownership = Some(ipvs_rec::Ownership {
            bound: self.bound.clone(),
            node_addresses: node.addresses.iter().map(|a| a.address).collect(),
            node_port_range: self.cfg.node_port_range.clone(),
            exclude: self.cfg.ipvs.exclude_cidrs.clone(),
            recorded: self.recorded.clone(),
        });
    }

    /// Phase "ipvs_plan": the IPVS operations, after logging (once each) the desired virtual
    /// services someone else's IPVS service holds.
    fn plan_ipvs(
        &mut self,
        want: &ipvs_rec::DesiredIpvs,
        scope: Option<&BTreeSet<ipvs::ServiceKey>>,
    ) -> Vec<ipvs_rec::IpvsOp> {
        let Some(ownership) = &self.ownership else {
            return Vec::new();
        };
        let foreign = ipvs_rec::foreign_keys(want, &self.cache, ownership);
        for k in foreign.iter().filter(|k| !self.logged_foreign.contains(k)) {
            let origin = want.get(k).map_or("", |d| d.origin.as_str());
            tracing::warn!(
                service = origin,
                "{k} is held by an IPVS virtual service this agent did not create: not programmed"
            );
        }
        match scope {
            None => self.logged_foreign = foreign.into_iter().collect(),
            Some(_) => self.logged_foreign.extend(foreign),
        }
        let ctx = ipvs_rec::PlanContext {
            observed: &self.cache,
            ownership,
            drain_timeout: self.cfg.timing.drain_timeout,
            now: Instant::now(),
            scope,
        };
        let ops = ipvs_rec::plan(want, &ctx, &mut self.drains);
        if scope.is_none() && !self.recorded.is_empty() {
            // Adopted by this full plan (marked or deleted): from now on the mark decides.
            self.recorded.clear();
            self.ownership = None;
        }
        ops
    }

    /// Phase "ipvs_apply".
    async fn apply_ipvs(
        &mut self,
        ops: Vec<ipvs_rec::IpvsOp>,
        want: &ipvs_rec::DesiredIpvs,
        report: &mut SyncReport,
    ) {
        let (counts, failures) = ipvs_rec::apply(&self.ipvs_batch, ops, &mut self.cache).await;
        for f in &failures {
            let origin = want.get(&f.op.service()).map_or("", |d| d.origin.as_str());
            tracing::error!(service = origin, op = f.op.kind(), "{}", f.error);
        }
        report.failures += failures.len();
        report.ipvs_ops = counts;
    }

    /// Removes addresses from kube-ipvs0. An address still carrying one of our IPVS services
    /// (its deletion failed) stays, so the service stays ours and the next sync retries.
    fn remove_addresses(&mut self, remove: Vec<IpAddr>, report: &mut SyncReport) {
        if remove.is_empty() {
            return;
        }
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
            remove: remove.into_iter().filter(|a| !in_use.contains(a)).collect(),
        };
        report.addresses_removed = removes.remove.len();
        for e in addresses::apply(&self.rtnl, self.dummy_index, &removes, &mut self.bound) {
            report.failures += 1;
            tracing::error!("{e}");
        }
        if report.addresses_removed > 0 {
            self.ownership = None;
        }
    }

    /// Phase "state": the state file (for `inspect`) follows at most every few seconds: it is
    /// a full dump, kept off the path of every change.
    fn follow_state_file(
        &mut self,
        full: bool,
        changed: &model::Changed,
        node: &NodeInfo,
        desired: &DesiredState,
    ) {
        self.state_dirty |= !changed.is_empty();
        if self.state_dirty
            && (full
                || self
                    .state_written
                    .is_none_or(|t| t.elapsed() >= STATE_WRITE_PERIOD))
        {
            self.write_state(node, desired);
        }
    }

    /// Writes the state file on a thread of its own at the lowest priority (nice 19):
    /// serializing every virtual service takes a while at 10,000 Services (hundreds of ms under
    /// TCG), and on a busy CPU a change's sync must not wait for it. One write at a time.
    fn write_state(&mut self, node: &NodeInfo, desired: &DesiredState) {
        if self.state_writer.as_ref().is_some_and(|h| !h.is_finished()) {
            return; // still writing the previous one: stays dirty, written next time
        }
        let (dir, node, desired) = (self.cfg.state_dir.clone(), node.clone(), desired.clone());
        let writer = std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || {
                lowest_thread_priority();
                if let Err(e) = state::write(&dir, &node, &desired) {
                    tracing::warn!("writing the state file: {e:#}");
                }
            });
        match writer {
            Ok(h) => self.state_writer = Some(h),
            Err(e) => {
                tracing::warn!("writing the state file: no thread: {e}");
                return;
            }
        }
        self.state_dirty = false;
        self.state_written = Some(Instant::now());
    }

    /// Whether the state file is behind (the loop then comes back to write it).
    pub fn state_pending(&self) -> bool {
        self.state_dirty
    }

    /// The datapath's counters, for metrics (empty without a datapath).
    pub fn datapath_counters(&self) -> Vec<(&'static str, u64)> {
        let Some(dp) = &self.datapath else {
            return Vec::new();
        };
        match dp.stats() {
            Ok(stats) => stats.iter().map(|(c, v)| (c.name(), v)).collect(),
            Err(e) => {
                tracing::warn!("reading the datapath counters: {e}");
                Vec::new()
            }
        }
    }

    fn apply_maps(&mut self, plan: &MapPlan, additions: bool, report: &mut SyncReport) {
        let Some(dp) = &mut self.datapath else { return };
        let ops = if additions {
            &plan.additions
        } else {
            &plan.removals
        };
        let (done, failures) = dp.apply_maps(ops);
        report.map_changes += done;
        report.failures += failures.len();
        for f in failures {
            tracing::error!("datapath map: {f}");
        }
    }

    /// Starts the datapath's sweeper thread (none without a datapath, or when it cannot start:
    /// logged), which runs until the returned value is dropped.
    pub fn start_sweeper(
        &self,
        metrics: &crate::admin::metrics::Metrics,
    ) -> Option<crate::datapath::sweep::Sweeper> {
        let dp = self.datapath.as_ref()?;
        dp.start_sweeper(self.cfg.sweep_period, metrics.clone())
            .inspect_err(|e| tracing::error!("expired datapath entries are not swept: {e:#}"))
            .ok()
    }

    /// Checks the node state kept outside IPVS and repairs what differs (`crate::node_state`):
    /// the datapath's sysctls, rules and TC programs, and kube-ipvs0 with its addresses.
    /// `addresses`: also compare kube-ipvs0's addresses with the bound ones (a dump of all of
    /// them; see [`node_state::repair_kube_ipvs0`]).
    pub async fn repair_node_state(&mut self, addresses: bool) -> node_state::RepairReport {
        let started = Instant::now();
        let mut report = self
            .datapath
            .as_mut()
            .map(Datapath::repair_node)
            .unwrap_or_default();
        let datapath = started.elapsed();
        let bound = addresses.then_some(&self.bound);
        match node_state::repair_kube_ipvs0(&self.rtnl, &mut self.dummy_index, bound).await {
            Ok(r) => report.extend(r),
            Err(e) => report.failed(format!("checking {DUMMY_INTERFACE}: {e}")),
        }
        // What a check costs (it runs on the loop's thread: syncs and the source wait).
        tracing::debug!(
            duration_ms = started.elapsed().as_secs_f64() * 1e3,
            datapath_ms = datapath.as_secs_f64() * 1e3,
            "node state checked"
        );
        if report.full_sync {
            self.ownership = None;
            self.node = None;
        }
        report
    }

    /// `net.ipv4.vs.snat_reroute` as the datapath last wrote it (mode, on), for the metrics.
    pub fn snat_reroute(&self) -> Option<(crate::datapath::reroute::SnatReroute, bool)> {
        self.datapath.as_ref()?.snat_reroute()
    }

    /// Whether destinations are draining (the loop then checks them periodically).
    pub fn draining(&self) -> bool {
        !self.drains.is_empty()
    }
}

/// Gives the calling thread the lowest scheduling priority (nice 19: about 1.5% of a CPU
/// against a nice-0 thread that wants it all), for work nothing waits for.
fn lowest_thread_priority() {
    // SAFETY: gettid and setpriority take no pointers; `which` = PRIO_PROCESS with a thread
    // id sets that thread's nice value (Linux).
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    if r != 0 {
        tracing::debug!(
            "state file writer keeps its priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// What watches the loop from outside: health, metrics, the per-Service health check servers,
/// the change tracker (network programming latency) and, with a Kubernetes source, Events on
/// Services that cannot be programmed.
pub struct Observers {
    pub health: crate::admin::health::HealthState,
    pub metrics: crate::admin::metrics::Metrics,
    pub health_checks: crate::admin::health::HealthCheckServers,
    pub changes: crate::admin::metrics::ChangeTracker,
    pub events: Option<Arc<crate::source::kubernetes::ServiceEvents>>,
}

impl Observers {
    fn snapshot_changed(&mut self, snapshot: &Arc<Snapshot>) {
        let now = std::time::SystemTime::now();
        self.health.queued(now);
        self.metrics.queued(now);
        self.metrics.changes(self.changes.observe(snapshot));
        self.health.node(snapshot.node.as_ref());
    }

    async fn synced(
        &mut self,
        syncer: &Syncer,
        snapshot: &Snapshot,
        report: &SyncReport,
        desired: &DesiredState,
        rejected_before: &mut BTreeSet<model::ServiceRef>,
    ) {
        let now = std::time::SystemTime::now();
        self.health.synced(now);
        self.metrics.observe_sync(
            Duration::from_secs_f64(report.duration_ms / 1e3),
            report.full,
        );
        self.metrics.ipvs_ops(&report.ipvs_ops);
        self.metrics.rejected(&desired.rejected);
        self.metrics
            .no_local_endpoints(&crate::admin::metrics::no_local_endpoints(desired));
        self.metrics
            .programmed(&self.changes.take_trigger_times(), now);
        self.metrics.datapath_counters(&syncer.datapath_counters());
        for e in self
            .health_checks
            .sync(&desired.health_check_node_ports)
            .await
        {
            tracing::warn!("health check server: {e}");
        }
        // A Kubernetes Event on each Service that newly cannot be programmed (wholly or in
        // part), saying why.
        let (rejected, warnings) = crate::source::kubernetes::rejection_warnings(
            snapshot,
            &desired.rejected,
            rejected_before,
        );
        if let Some(events) = &self.events {
            if !warnings.is_empty() {
                let events = events.clone();
                tokio::spawn(async move {
                    events.post_rejections(&warnings).await;
                });
            }
            for gone in rejected_before.difference(&rejected) {
                events.resolved(gone);
            }
        }
        *rejected_before = rejected;
    }
}

/// How soon after an nf_tables or kube-ipvs0 change the node state is checked (a burst of
/// changes, such as a firewall reload, is over by then).
const NODE_CHECK_DELAY: Duration = Duration::from_millis(300);
/// Checks brought forward by changes are at least this far apart (a node whose nf_tables
/// rules change all the time, e.g. another agent's, costs at most one check a second).
const NODE_CHECK_SPACING: Duration = Duration::from_secs(1);

/// When a node check asked for by a change runs: [`NODE_CHECK_DELAY`] from now, and no sooner
/// than [`NODE_CHECK_SPACING`] after the last check (`last`).
fn check_after(last: Instant) -> Instant {
    (Instant::now() + NODE_CHECK_DELAY).max(last + NODE_CHECK_SPACING)
}

/// Exports `net.ipv4.vs.snat_reroute` as last written (nothing without the datapath).
fn snat_reroute_metric(syncer: &Syncer, observers: &Observers) {
    if let Some((mode, on)) = syncer.snat_reroute() {
        observers.metrics.snat_reroute(mode.as_str(), on);
    }
}

/// Checks and repairs the node state and counts the repairs; a re-created kube-ipvs0 brings the
/// next full sync forward. `addresses`: kube-ipvs0's addresses too (after a change to it).
async fn check_node_state(
    syncer: &mut Syncer,
    observers: &Observers,
    next_full: &mut Instant,
    addresses: bool,
) {
    let r = syncer.repair_node_state(addresses).await;
    observers.metrics.node_repairs(&r.repairs);
    snat_reroute_metric(syncer, observers);
    if r.full_sync {
        *next_full = Instant::now();
    }
}

/// Runs until `shutdown` resolves: syncs on every new snapshot (coalesced by
/// `min_sync_period`), checks draining destinations, and resyncs fully every `sync_period`.
/// The kernel state is left in place on exit.
pub async fn run(
    mut syncer: Syncer,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    mut observers: Observers,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let mut rejected_before = BTreeSet::new();
    observers.snapshot_changed(&snapshots.borrow());
    let cfg = syncer.cfg.clone();
    // Devices and addresses that appear later get the datapath and count as node addresses.
    let mut link_events = match crate::node::link_events() {
        Ok(rx) => Some(rx),
        Err(e) => {
            tracing::warn!("not following interface changes: {e}");
            None
        }
    };
    // The sweeper runs on a thread of its own (a pass over full maps takes a while): stopped
    // when this returns.
    let _sweeper = syncer.start_sweeper(&observers.metrics);
    snat_reroute_metric(&syncer, &observers);
    // The node state (rules, sysctls, TC, kube-ipvs0): periodically, and soon after a change.
    let node_check_period = cfg.timing.node_check_period.max(Duration::from_millis(100));
    let mut node_check = tokio::time::interval_at(
        (Instant::now() + node_check_period).into(),
        node_check_period,
    );
    node_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check_soon: Option<Instant> = None;
    // kube-ipvs0 changed since the last check: the next one compares its addresses. Periodic
    // checks do not (a dump of every address) while its changes are followed; full syncs
    // compare them anyway.
    let mut check_addresses = false;
    let mut last_node_check = Instant::now();
    // Only the datapath keeps iptables rules.
    let mut nft_events = match syncer
        .datapath
        .as_ref()
        .map(|_| node_state::nftables_events())
    {
        Some(Ok(rx)) => Some(rx),
        Some(Err(e)) => {
            tracing::warn!("not following nf_tables changes (the periodic check remains): {e}");
            None
        }
        None => None,
    };
    // The takeover's last step (docs/switching.md): kube-proxy's chains and ipsets go once this
    // agent serves the node. Never in a canary beside kube-proxy (labelled Services only), nor
    // without the datapath (nothing of this agent's would stand in for kube-proxy's rules).
    // After the first successful sync; a failed step (an ipset someone else's rule uses) is
    // retried at full resyncs only.
    let mut kube_proxy_state_left = syncer.datapath.is_some() && !cfg.model.only_labelled_services;
    let mut kube_proxy_state_tried = false;
    let mut pending = true;
    let mut source_open = true;
    let mut last_sync: Option<Instant> = None;
    let mut first = true;
    let mut next_full = Instant::now() + cfg.timing.sync_period;
    loop {
        let now = Instant::now();
        let mut wake = next_full;
        if pending {
            wake = wake.min(last_sync.map_or(now, |t| (t + cfg.timing.min_sync_period).max(now)));
        } else if syncer.draining() {
            wake = wake.min(now + cfg.drain_check_period);
        } else if syncer.state_pending() {
            wake = wake.min(now + STATE_WRITE_PERIOD);
        }
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down; kernel state left in place");
                observers.health_checks.shutdown().await;
                return Ok(());
            }
            changed = snapshots.changed(), if source_open => {
                match changed {
                    Ok(()) => {
                        pending = true;
                        observers.snapshot_changed(&snapshots.borrow());
                    }
                    Err(_) => source_open = false,
                }
                continue;
            }
            event = async { link_events.as_mut()?.recv().await }, if link_events.is_some() => {
                match event {
                    // Our own service addresses on kube-ipvs0 change nothing the node view needs;
                    // kube-ipvs0 is checked (deleted, or an address removed by someone).
                    Some(NodeEvent::Link(index)) if index == syncer.dummy_index => {
                        check_addresses = true;
                        check_soon.get_or_insert(check_after(last_node_check));
                    }
                    Some(NodeEvent::Link(_)) => {
                        syncer.node_changed();
                        pending = true;
                    }
                    // The routing policy that decides IPVS's reroute of replies.
                    Some(NodeEvent::Rule) => {
                        check_soon.get_or_insert(check_after(last_node_check));
                    }
                    None => link_events = None,
                }
                continue;
            }
            notice = async { nft_events.as_mut()?.recv().await }, if nft_events.is_some() => {
                match notice {
                    Some(()) => {
                        check_soon.get_or_insert(check_after(last_node_check));
                    }
                    None => nft_events = None,
                }
                continue;
            }
            _ = tokio::time::sleep_until(check_soon.unwrap_or(now).into()), if check_soon.is_some() => {
                check_soon = None;
                node_check.reset();
                let addresses = std::mem::take(&mut check_addresses);
                check_node_state(&mut syncer, &observers, &mut next_full, addresses).await;
                last_node_check = Instant::now();
                continue;
            }
            _ = node_check.tick() => {
                check_soon = None;
                let addresses = std::mem::take(&mut check_addresses) || link_events.is_none();
                check_node_state(&mut syncer, &observers, &mut next_full, addresses).await;
                last_node_check = Instant::now();
                continue;
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        let full = Instant::now() >= next_full;
        if full {
            next_full = Instant::now() + cfg.timing.sync_period;
        }
        let snapshot = snapshots.borrow_and_update().clone();
        pending = false;
        last_sync = Some(Instant::now());
        let started = Instant::now();
        match syncer.sync(&snapshot, full).await {
            Ok((r, desired)) => {
                observers
                    .synced(&syncer, &snapshot, &r, &desired, &mut rejected_before)
                    .await;
                let ops = r.ipvs_ops.total();
                let changed = ops > 0
                    || r.addresses_added + r.addresses_removed + r.map_changes + r.devices_attached
                        > 0;
                // Every sync that did something is logged, and the first one (a restart that
                // finds nothing to do says so).
                // The transient allocations of the first sync (the first list, the kernel's
                // dump) and of full syncs are returned to the kernel rather than kept
                // resident by the allocator.
                let heap = if full || first {
                    crate::heap::trim()
                } else {
                    None
                };
                if changed || r.failures > 0 || full || std::mem::take(&mut first) {
                    tracing::info!(
                        full = r.full,
                        generation = r.generation,
                        virtual_services = r.virtual_services,
                        ipvs_ops = %serde_json::to_string(&r.ipvs_ops).unwrap_or_default(),
                        addresses_added = r.addresses_added,
                        addresses_removed = r.addresses_removed,
                        draining = r.draining,
                        map_changes = r.map_changes,
                        devices_attached = r.devices_attached,
                        rejected = r.rejected,
                        failures = r.failures,
                        duration_ms = r.duration_ms,
                        phases = %serde_json::to_string(&r.phases).unwrap_or_default(),
                        heap_in_use_kib = heap.map(|h| h.in_use >> 10),
                        heap_free_kib = heap.map(|h| h.free >> 10),
                        "sync done"
                    );
                }
                if kube_proxy_state_left && (full || !kube_proxy_state_tried) {
                    kube_proxy_state_tried = true;
                    kube_proxy_state_left = !crate::takeover::remove_kube_proxy_state(
                        cfg.node_port_range.clone(),
                        cfg.ipvs.exclude_cidrs.clone(),
                    )
                    .await;
                }
            }
            Err(e) => {
                tracing::error!("sync failed: {e:#}");
                observers.metrics.sync_failed(started.elapsed(), full);
                pending = true;
            }
        }
    }
}
