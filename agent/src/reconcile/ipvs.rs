//! IPVS reconciler: the desired virtual services (from the model) against what the kernel
//! holds, as the smallest list of netlink operations, and the applier that issues them.
//!
//! **Ownership** (what this agent may change or delete, [`Ownership`]) must survive restarts.
//! Every virtual service the agent creates or edits carries [`AGENT_MARK`], a bit of the IPVS
//! service flags that the kernel stores and reports back in its dumps but never reads (it is
//! kept with the service in the kernel, so it survives any restart or crash of the agent and
//! goes with the service; see [`AGENT_MARK`] for why it changes nothing else). A kernel virtual
//! service is ours when it carries the mark, or by the address rule kube-proxy's IPVS mode also
//! follows: its address is bound on `kube-ipvs0`, or it is on a node address with a port in the
//! NodePort range (services made before the mark existed, or by kube-proxy, which this agent
//! adopts in place). An external or LB ingress IP that is a node address (`nodeIP:port` outside
//! the NodePort range) is thus ours only through the mark: it is deleted with its Service, also
//! after a restart, while a service someone else made on a node address is neither deleted nor
//! taken over (a desired service whose key holds such a foreign service is not programmed and
//! is reported by [`foreign_keys`]). Services that an agent of this boot recorded in its state
//! file as programmed are also adopted once, at start ([`Ownership::recorded`]): that covers
//! unmarked `nodeIP:port` services left by a version without the mark. Firewall-mark services
//! and everything else belong to others and are never touched (nor flushed); addresses in
//! `ipvs.excludeCIDRs` are never deleted.
//!
//! **Graceful termination**: a TCP or SCTP destination that is no longer desired first gets
//! weight 0 (IPVS sends it no new connections) and is deleted once its active and inactive
//! connection counts reach 0, or when it has drained for longer than the configured timeout.
//! UDP destinations are deleted at once. A destination that comes back while draining gets its
//! weight back. Drain start times live in memory; after a restart a draining destination (weight
//! 0, not desired) starts a fresh timeout.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use ipvs::{
    Destination, ForwardMethod, IpvsBatch, IpvsError, IpvsHandle, Service, ServiceFlags, ServiceKey,
};

use crate::model::{ServicePort, VirtualService};

/// A destination's identity within its service.
pub type DestKey = (IpAddr, u16);

/// One virtual service as the kernel should hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    pub service: Service,
    /// Destination → weight.
    pub destinations: BTreeMap<DestKey, u32>,
    /// `namespace/name:port` of the Kubernetes Service, for logs.
    pub origin: String,
}

/// The IPVS table this node should have.
pub type DesiredIpvs = BTreeMap<ServiceKey, DesiredService>;

/// An IPVS table: each service with its destinations, kept as `D`.
pub type IpvsTable<D> = BTreeMap<ServiceKey, (Service, BTreeMap<DestKey, D>)>;

/// What the kernel holds (a dump, or the applier's cache of it), as the plans read it.
pub type ObservedIpvs = IpvsTable<ObservedDest>;

/// What the reconciler keeps of a kernel destination: the fields [`plan`] reads. A whole
/// [`Destination`] is four times the size, and the cache holds one per endpoint (100,000 at
/// 10,000 Services).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObservedDest {
    pub weight: u32,
    pub forward: ForwardMethod,
    /// As of the last dump (a drain refreshes them, [`refresh_draining`]).
    pub active_conns: u32,
    pub inactive_conns: u32,
}

impl From<&Destination> for ObservedDest {
    fn from(d: &Destination) -> Self {
        ObservedDest {
            weight: d.weight,
            forward: d.forward,
            active_conns: d.active_conns,
            inactive_conns: d.inactive_conns,
        }
    }
}

/// The flag bit marking an IPVS virtual service as created by this agent (see the module
/// documentation). The kernel (`ip_vs_ctl.c`, 6.1 and 6.12 alike) copies the flags userspace
/// sends under its mask into `svc->flags` as they are (`svc->flags = u->flags |
/// IP_VS_SVC_F_HASHED` on add and edit) and reports them back with mask `~0`; it only ever
/// tests the defined bits (`IP_VS_SVC_F_PERSISTENT` … `IP_VS_SVC_F_SCHED3`, 0x1–0x20), so an
/// undefined bit changes no behaviour. The top bit is the one furthest from the defined ones;
/// `ipvsadm` ignores bits it does not know.
pub const AGENT_MARK: ServiceFlags = ServiceFlags(0x8000_0000);

/// The kernel form of the model's virtual services: masquerading destinations, persistence for
/// session affinity, the `mh` scheduler with its source-port flag (as kube-proxy sets it), and
/// [`AGENT_MARK`].
pub fn desired<'a>(virtual_services: impl IntoIterator<Item = &'a VirtualService>) -> DesiredIpvs {
    virtual_services
        .into_iter()
        .map(|vs| {
            let key = ServicePort::of(vs).ipvs_key();
            let mut service = Service::new(key, vs.scheduler.clone());
            service.flags |= AGENT_MARK;
            if let Some(timeout) = vs.persistence_timeout {
                service.flags |= ServiceFlags::PERSISTENT;
                service.timeout = timeout;
            }
            if vs.scheduler == "mh" {
                service.flags |= ServiceFlags::MH_PORT;
            }
            let destinations = vs
                .destinations
                .iter()
                .map(|d| ((d.address, d.port), d.weight))
                .collect();
            let origin = format!("{}:{}", vs.service, vs.port_name);
            (
                key,
                DesiredService {
                    service,
                    destinations,
                    origin,
                },
            )
        })
        .collect()
}

/// Which kernel virtual services are this agent's (see the module documentation).
#[derive(Debug, Clone)]
pub struct Ownership {
    /// Addresses bound on `kube-ipvs0`.
    pub bound: BTreeSet<IpAddr>,
    /// The node's own addresses.
    pub node_addresses: BTreeSet<IpAddr>,
    /// The NodePort range (kube-apiserver's `--service-node-port-range`).
    pub node_port_range: RangeInclusive<u16>,
    /// Addresses never deleted, whatever the rest says (kube-proxy's `ipvs.excludeCIDRs`).
    pub exclude: Vec<ipnet::IpNet>,
    /// Virtual services recorded as programmed in the state file an agent of this boot left
    /// (read once at start, empty afterwards): adopted even without [`AGENT_MARK`].
    pub recorded: BTreeSet<ServiceKey>,
}

impl Ownership {
    /// Whether this agent may delete the kernel's virtual service `service`: it is not
    /// [foreign](Self::is_foreign) and its address is not excluded.
    pub fn owns(&self, service: &Service) -> bool {
        let excluded = match &service.key {
            ServiceKey::Tuple { address, .. } => self.exclude.iter().any(|n| n.contains(address)),
            ServiceKey::Fwmark { .. } => false,
        };
        !excluded && !self.is_foreign(service)
    }

    /// Whether the kernel's virtual service `service` belongs to someone else: it carries no
    /// [`AGENT_MARK`], is not under the address rule and was not recorded. A foreign service
    /// is never changed, deleted or taken over.
    pub fn is_foreign(&self, service: &Service) -> bool {
        if service.flags.contains(AGENT_MARK) {
            return false;
        }
        match &service.key {
            ServiceKey::Tuple { address, port, .. } => {
                !(self.bound.contains(address)
                    || (self.node_addresses.contains(address)
                        && self.node_port_range.contains(port))
                    || self.recorded.contains(&service.key))
            }
            ServiceKey::Fwmark { .. } => true,
        }
    }
}

/// The desired virtual services whose key the kernel holds for someone else
/// ([`Ownership::is_foreign`]): [`plan`] leaves them alone, so they are not programmed.
pub fn foreign_keys(
    desired: &DesiredIpvs,
    observed: &ObservedIpvs,
    ownership: &Ownership,
) -> Vec<ServiceKey> {
    desired
        .keys()
        .filter(|k| {
            observed
                .get(k)
                .is_some_and(|(have, _)| ownership.is_foreign(have))
        })
        .copied()
        .collect()
}

/// One netlink operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpvsOp {
    AddService(Service),
    EditService(Service),
    DeleteService(ServiceKey),
    AddDestination(ServiceKey, Destination),
    EditDestination(ServiceKey, Destination),
    DeleteDestination(ServiceKey, IpAddr, u16),
}

impl IpvsOp {
    /// The metric/log name of this kind of operation.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::AddService(_) => "add_service",
            Self::EditService(_) => "edit_service",
            Self::DeleteService(_) => "delete_service",
            Self::AddDestination(..) => "add_destination",
            Self::EditDestination(..) => "edit_destination",
            Self::DeleteDestination(..) => "delete_destination",
        }
    }

    /// The virtual service the operation is about.
    pub fn service(&self) -> ServiceKey {
        match self {
            Self::AddService(s) | Self::EditService(s) => s.key,
            Self::DeleteService(k)
            | Self::AddDestination(k, _)
            | Self::EditDestination(k, _)
            | Self::DeleteDestination(k, ..) => *k,
        }
    }

    /// The change as the `ipvs` library's batches take it.
    fn change(&self) -> ipvs::Change<'_> {
        match self {
            Self::AddService(s) => ipvs::Change::AddService(s),
            Self::EditService(s) => ipvs::Change::EditService(s),
            Self::DeleteService(k) => ipvs::Change::DeleteService(k),
            Self::AddDestination(k, d) => ipvs::Change::AddDestination(k, d),
            Self::EditDestination(k, d) => ipvs::Change::EditDestination(k, d),
            Self::DeleteDestination(k, a, p) => ipvs::Change::DeleteDestination(k, *a, *p),
        }
    }

    /// Operations run in three phases: services created or edited, then destinations, then
    /// services deleted.
    fn phase(&self) -> u8 {
        match self {
            Self::AddService(_) | Self::EditService(_) => 0,
            Self::AddDestination(..) | Self::EditDestination(..) | Self::DeleteDestination(..) => 1,
            Self::DeleteService(_) => 2,
        }
    }
}

/// Graceful-termination bookkeeping: when each draining destination started draining.
#[derive(Debug, Default)]
pub struct Drains {
    started: HashMap<(ServiceKey, DestKey), Instant>,
}

impl Drains {
    /// Destinations currently draining.
    pub fn len(&self) -> usize {
        self.started.len()
    }

    pub fn is_empty(&self) -> bool {
        self.started.is_empty()
    }

    /// The virtual services with a draining destination.
    pub fn services(&self) -> BTreeSet<ServiceKey> {
        self.started.keys().map(|(k, _)| *k).collect()
    }
}

/// Whether a service's kernel settings differ from the desired ones.
fn service_differs(want: &Service, have: &Service) -> bool {
    let persistent = want.flags.contains(ServiceFlags::PERSISTENT);
    want.scheduler != have.scheduler
        || want.flags.without_hashed() != have.flags.without_hashed()
        || (persistent && want.timeout != have.timeout)
        || want.netmask != have.netmask
        || want.pe_name != have.pe_name
}

fn masq(address: IpAddr, port: u16, weight: u32) -> Destination {
    Destination {
        weight,
        ..Destination::new(address, port)
    }
}

/// What [`plan`] diffs the desired table against, and what it may touch.
#[derive(Debug, Clone, Copy)]
pub struct PlanContext<'a> {
    /// What the kernel holds.
    pub observed: &'a ObservedIpvs,
    /// Which of it is this agent's.
    pub ownership: &'a Ownership,
    /// How long a removed TCP/SCTP destination drains (weight 0) before it is deleted.
    pub drain_timeout: Duration,
    /// Now, for the drains.
    pub now: Instant,
    /// With a scope, only those virtual services are considered (an incremental sync: the
    /// desired table then holds at least the scoped services that should exist); drains of
    /// other services are kept as they are.
    pub scope: Option<&'a BTreeSet<ServiceKey>>,
}

/// Computes the operations that turn `ctx.observed` into `desired`, touching only what
/// `ctx.ownership` says is ours, and updates `drains`. Pure apart from `drains`.
pub fn plan(desired: &DesiredIpvs, ctx: &PlanContext<'_>, drains: &mut Drains) -> Vec<IpvsOp> {
    let PlanContext {
        observed,
        ownership,
        drain_timeout,
        now,
        scope,
    } = *ctx;
    let mut ops = Vec::new();
    let mut still_draining = HashMap::new();
    let in_scope = |k: &ServiceKey| scope.is_none_or(|s| s.contains(k));
    for (key, want) in desired.iter().filter(|(k, _)| in_scope(k)) {
        let Some((have, have_dests)) = observed.get(key) else {
            ops.push(IpvsOp::AddService(want.service.clone()));
            for (&(a, p), &w) in &want.destinations {
                ops.push(IpvsOp::AddDestination(*key, masq(a, p, w)));
            }
            continue;
        };
        if ownership.is_foreign(have) {
            continue; // someone else's: never taken over (see `foreign_keys`)
        }
        if service_differs(&want.service, have) {
            ops.push(IpvsOp::EditService(want.service.clone()));
        }
        for (&(a, p), &w) in &want.destinations {
            match have_dests.get(&(a, p)) {
                None => ops.push(IpvsOp::AddDestination(*key, masq(a, p, w))),
                Some(d) if d.weight != w || d.forward != ForwardMethod::Masquerade => {
                    ops.push(IpvsOp::EditDestination(*key, masq(a, p, w)))
                }
                Some(_) => {}
            }
        }
        let udp = matches!(
            key,
            ServiceKey::Tuple {
                protocol: ipvs::Protocol::Udp,
                ..
            }
        );
        for (&(a, p), d) in have_dests {
            if want.destinations.contains_key(&(a, p)) {
                continue;
            }
            let id = (*key, (a, p));
            if udp {
                ops.push(IpvsOp::DeleteDestination(*key, a, p));
            } else if d.weight != 0 {
                ops.push(IpvsOp::EditDestination(*key, masq(a, p, 0)));
                still_draining.insert(id, now);
            } else {
                let since = drains.started.get(&id).copied().unwrap_or(now);
                let idle = d.active_conns == 0 && d.inactive_conns == 0;
                if idle || now.duration_since(since) >= drain_timeout {
                    ops.push(IpvsOp::DeleteDestination(*key, a, p));
                } else {
                    still_draining.insert(id, since);
                }
            }
        }
    }
    let gone = |key: &ServiceKey| {
        !desired.contains_key(key) && observed.get(key).is_some_and(|(s, _)| ownership.owns(s))
    };
    match scope {
        None => {
            ops.extend(
                observed
                    .keys()
                    .filter(|k| gone(k))
                    .map(|k| IpvsOp::DeleteService(*k)),
            );
            drains.started = still_draining;
        }
        Some(scope) => {
            ops.extend(
                scope
                    .iter()
                    .filter(|k| observed.contains_key(*k) && gone(k))
                    .map(|k| IpvsOp::DeleteService(*k)),
            );
            drains.started.retain(|(k, _), _| !scope.contains(k));
            drains.started.extend(still_draining);
        }
    }
    ops
}

/// Per-kind counts of operations issued and failed during one sync.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OpCounts {
    pub issued: BTreeMap<&'static str, u64>,
    pub failed: BTreeMap<&'static str, u64>,
}

impl OpCounts {
    pub fn total(&self) -> u64 {
        self.issued.values().sum()
    }
}

/// A failed operation, with the Kubernetes object it came from when known.
#[derive(Debug)]
pub struct OpFailure {
    pub op: IpvsOp,
    pub error: IpvsError,
}

/// The IPVS batch socket, shared with the thread that applies a large phase.
pub type SharedBatch = std::sync::Arc<std::sync::Mutex<IpvsBatch>>;

/// A phase of at most this many changes is applied on the loop's thread (a couple of batches:
/// the kernel's work of a single change's sync); a larger one on a blocking thread, so that the
/// loop's thread keeps answering health checks through a first sync's 110,000 changes.
const CHANGES_IN_LINE: usize = 256;

/// Applies `phase` through `batch`; returns the failures, by index in `phase`. Blocks.
fn apply_phase(batch: &SharedBatch, phase: &[IpvsOp]) -> Vec<(usize, IpvsError)> {
    let mut batch = match batch.lock() {
        Ok(b) => b,
        Err(poisoned) => poisoned.into_inner(),
    };
    batch.apply(phase.iter().map(IpvsOp::change))
}

/// Issues `ops` phase by phase, each phase in batches of requests per `sendmsg` on `batch`'s
/// socket (a large phase on a blocking thread, see [`CHANGES_IN_LINE`]), and updates `cache`
/// (the observed table) with what succeeded, so the next plan diffs against the kernel without
/// dumping it again. A failed operation never stops the others.
pub async fn apply(
    batch: &SharedBatch,
    ops: Vec<IpvsOp>,
    cache: &mut ObservedIpvs,
) -> (OpCounts, Vec<OpFailure>) {
    let mut counts = OpCounts::default();
    let mut failures = Vec::new();
    let mut phases: [Vec<IpvsOp>; 3] = Default::default();
    for op in ops {
        phases[op.phase() as usize].push(op);
    }
    for phase in phases.into_iter().filter(|p| !p.is_empty()) {
        let (phase, failed) = if phase.len() <= CHANGES_IN_LINE {
            let failed = apply_phase(batch, &phase);
            (phase, failed)
        } else {
            let batch = batch.clone();
            let applied = tokio::task::spawn_blocking(move || {
                let failed = apply_phase(&batch, &phase);
                (phase, failed)
            })
            .await;
            match applied {
                Ok(applied) => applied,
                Err(e) => {
                    // The thread panicked: what the kernel applied is unknown until the next
                    // full sync dumps it. Nothing is recorded as done.
                    tracing::error!("applying IPVS changes: {e}");
                    continue;
                }
            }
        };
        let mut failed = failed.into_iter().peekable();
        for (i, op) in phase.into_iter().enumerate() {
            *counts.issued.entry(op.kind()).or_default() += 1;
            match failed.next_if(|(at, _)| *at == i) {
                None => record(cache, &op),
                Some((_, error)) => {
                    *counts.failed.entry(op.kind()).or_default() += 1;
                    failures.push(OpFailure { op, error });
                }
            }
        }
    }
    (counts, failures)
}

/// Applies a successful operation to the cached kernel table.
fn record(cache: &mut ObservedIpvs, op: &IpvsOp) {
    match op {
        IpvsOp::AddService(s) | IpvsOp::EditService(s) => {
            let entry = cache
                .entry(s.key)
                .or_insert_with(|| (s.clone(), BTreeMap::new()));
            entry.0 = s.clone();
        }
        IpvsOp::DeleteService(k) => {
            cache.remove(k);
        }
        IpvsOp::AddDestination(k, d) | IpvsOp::EditDestination(k, d) => {
            if let Some((_, dests)) = cache.get_mut(k) {
                let e = dests
                    .entry((d.address, d.port))
                    .or_insert_with(|| ObservedDest::from(d));
                e.weight = d.weight;
                e.forward = d.forward;
            }
        }
        IpvsOp::DeleteDestination(k, a, p) => {
            if let Some((_, dests)) = cache.get_mut(k) {
                dests.remove(&(*a, *p));
            }
        }
    }
}

/// Dumps the kernel's IPVS table (services and their destinations) as the plans read it.
pub async fn observe(handle: &IpvsHandle) -> Result<ObservedIpvs, IpvsError> {
    dump(handle, false, |d| ObservedDest::from(&d)).await
}

/// The kernel's IPVS table whole, statistics included (for `inspect`).
pub async fn observe_with_stats(handle: &IpvsHandle) -> Result<IpvsTable<Destination>, IpvsError> {
    dump(handle, true, |d| d).await
}

/// Dumps every service and its destinations, keeping each destination as `keep` makes it
/// and the services' statistics only with `stats`.
async fn dump<D>(
    handle: &IpvsHandle,
    stats: bool,
    keep: impl Fn(Destination) -> D,
) -> Result<IpvsTable<D>, IpvsError> {
    let mut out = IpvsTable::new();
    for mut s in handle.services().await? {
        if !stats {
            s.stats = None;
        }
        let dests = match handle.destinations(&s.key).await {
            Ok(d) => d,
            // Deleted between the two dumps (by someone else): skip it.
            Err(IpvsError::ServiceNotFound(_)) => continue,
            Err(e) => return Err(e),
        };
        let dests = dests
            .into_iter()
            .map(|d| ((d.address, d.port), keep(d)))
            .collect();
        out.insert(s.key, (s, dests));
    }
    Ok(out)
}

/// Refreshes the connection counts of draining destinations in `cache` (one destination dump
/// per service with a draining destination), so [`plan`] can delete the idle ones.
pub async fn refresh_draining(
    handle: &IpvsHandle,
    cache: &mut ObservedIpvs,
    drains: &Drains,
) -> Result<(), IpvsError> {
    for key in drains.services() {
        match handle.destinations(&key).await {
            Ok(dests) => {
                if let Some((_, cached)) = cache.get_mut(&key) {
                    *cached = dests
                        .iter()
                        .map(|d| ((d.address, d.port), ObservedDest::from(d)))
                        .collect();
                }
            }
            Err(IpvsError::ServiceNotFound(_)) => {
                cache.remove(&key);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Destination as ModelDest, Protocol, ServiceRef, VirtualServiceKind};
    use std::net::Ipv4Addr;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 244, 0, last))
    }
    fn vip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 96, 0, last))
    }

    fn vs(vip_last: u8, protocol: Protocol, backends: &[u8]) -> VirtualService {
        VirtualService {
            service: ServiceRef::new("default", format!("svc{vip_last}")),
            port_name: "http".into(),
            kind: VirtualServiceKind::ClusterIp,
            protocol,
            address: vip(vip_last),
            port: 80,
            scheduler: "rr".into(),
            persistence_timeout: None,
            local_only: false,
            snat: false,
            masq_off_cluster: false,
            source_ranges: vec![],
            destinations: backends
                .iter()
                .map(|&b| ModelDest {
                    address: ip(b),
                    port: 8080,
                    weight: 1,
                })
                .collect(),
        }
    }

    /// The kernel table that `desired` would produce (what a perfect apply leaves).
    fn kernel_of(d: &DesiredIpvs) -> ObservedIpvs {
        d.iter()
            .map(|(k, s)| {
                let mut svc = s.service.clone();
                svc.flags |= ServiceFlags::HASHED;
                let dests = s
                    .destinations
                    .iter()
                    .map(|(&(a, p), &w)| ((a, p), ObservedDest::from(&masq(a, p, w))))
                    .collect();
                (*k, (svc, dests))
            })
            .collect()
    }

    fn owner() -> Ownership {
        Ownership {
            bound: [vip(1), vip(2), vip(3)].into_iter().collect(),
            node_addresses: [IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1))]
                .into_iter()
                .collect(),
            node_port_range: 30000..=32767,
            exclude: vec!["10.96.0.3/32".parse().unwrap()],
            recorded: BTreeSet::new(),
        }
    }

    /// A kernel virtual service without [`AGENT_MARK`] (someone else's, or older).
    fn unmarked(key: ServiceKey) -> Service {
        Service::new(key, "rr")
    }

    fn run(d: &DesiredIpvs, o: &ObservedIpvs, drains: &mut Drains) -> Vec<IpvsOp> {
        run_at(d, o, drains, Instant::now())
    }

    fn run_at(d: &DesiredIpvs, o: &ObservedIpvs, drains: &mut Drains, now: Instant) -> Vec<IpvsOp> {
        let ctx = PlanContext {
            observed: o,
            ownership: &owner(),
            drain_timeout: Duration::from_secs(60),
            now,
            scope: None,
        };
        plan(d, &ctx, drains)
    }

    #[test]
    fn empty_kernel_gets_every_service_and_destination() {
        let d = desired(&[vs(1, Protocol::Tcp, &[1, 2])]);
        let ops = run(&d, &ObservedIpvs::new(), &mut Drains::default());
        assert_eq!(ops.len(), 3);
        assert!(matches!(ops[0], IpvsOp::AddService(_)));
    }

    #[test]
    fn nothing_changed_means_no_operation() {
        let d = desired(&[vs(1, Protocol::Tcp, &[1, 2]), vs(2, Protocol::Udp, &[3])]);
        assert!(run(&d, &kernel_of(&d), &mut Drains::default()).is_empty());
    }

    #[test]
    fn one_endpoint_added_is_one_destination_add() {
        let before = desired(&[vs(1, Protocol::Tcp, &[1])]);
        let after = desired(&[vs(1, Protocol::Tcp, &[1, 2])]);
        let ops = run(&after, &kernel_of(&before), &mut Drains::default());
        assert_eq!(
            ops,
            vec![IpvsOp::AddDestination(
                ServiceKey::tcp(vip(1), 80),
                masq(ip(2), 8080, 1)
            )]
        );
    }

    #[test]
    fn removed_tcp_destination_drains_then_goes_when_idle() {
        let before = desired(&[vs(1, Protocol::Tcp, &[1, 2])]);
        let after = desired(&[vs(1, Protocol::Tcp, &[1])]);
        let key = ServiceKey::tcp(vip(1), 80);
        let mut drains = Drains::default();
        let mut kernel = kernel_of(&before);
        let ops = run(&after, &kernel, &mut drains);
        assert_eq!(
            ops,
            vec![IpvsOp::EditDestination(key, masq(ip(2), 8080, 0))]
        );
        assert_eq!(drains.len(), 1);
        // Weight 0 with an open connection: nothing to do yet.
        let d = kernel
            .get_mut(&key)
            .unwrap()
            .1
            .get_mut(&(ip(2), 8080))
            .unwrap();
        d.weight = 0;
        d.active_conns = 1;
        assert!(run(&after, &kernel, &mut drains).is_empty());
        // Connection gone: deleted.
        kernel
            .get_mut(&key)
            .unwrap()
            .1
            .get_mut(&(ip(2), 8080))
            .unwrap()
            .active_conns = 0;
        assert_eq!(
            run(&after, &kernel, &mut drains),
            vec![IpvsOp::DeleteDestination(key, ip(2), 8080)]
        );
        assert!(drains.is_empty());
    }

    #[test]
    fn draining_destination_is_deleted_after_the_timeout() {
        let after = desired(&[vs(1, Protocol::Tcp, &[1])]);
        let mut kernel = kernel_of(&desired(&[vs(1, Protocol::Tcp, &[1, 2])]));
        let key = ServiceKey::tcp(vip(1), 80);
        let d = kernel
            .get_mut(&key)
            .unwrap()
            .1
            .get_mut(&(ip(2), 8080))
            .unwrap();
        d.weight = 0;
        d.inactive_conns = 3;
        let mut drains = Drains::default();
        let t0 = Instant::now();
        let ops = run_at(&after, &kernel, &mut drains, t0);
        assert!(ops.is_empty());
        let later = t0 + Duration::from_secs(61);
        let ops = run_at(&after, &kernel, &mut drains, later);
        assert_eq!(ops, vec![IpvsOp::DeleteDestination(key, ip(2), 8080)]);
    }

    #[test]
    fn removed_udp_destination_goes_at_once() {
        let before = desired(&[vs(1, Protocol::Udp, &[1, 2])]);
        let after = desired(&[vs(1, Protocol::Udp, &[1])]);
        let ops = run(&after, &kernel_of(&before), &mut Drains::default());
        assert_eq!(
            ops,
            vec![IpvsOp::DeleteDestination(
                ServiceKey::udp(vip(1), 80),
                ip(2),
                8080
            )]
        );
    }

    #[test]
    fn destination_back_while_draining_gets_its_weight_back() {
        let d = desired(&[vs(1, Protocol::Tcp, &[1, 2])]);
        let mut kernel = kernel_of(&d);
        let key = ServiceKey::tcp(vip(1), 80);
        kernel
            .get_mut(&key)
            .unwrap()
            .1
            .get_mut(&(ip(2), 8080))
            .unwrap()
            .weight = 0;
        let ops = run(&d, &kernel, &mut Drains::default());
        assert_eq!(
            ops,
            vec![IpvsOp::EditDestination(key, masq(ip(2), 8080, 1))]
        );
    }

    #[test]
    fn deleted_service_is_removed_but_foreign_services_are_not() {
        let before = desired(&[vs(1, Protocol::Tcp, &[1]), vs(2, Protocol::Tcp, &[1])]);
        let mut kernel = kernel_of(&before);
        // Foreign: an address not on kube-ipvs0, a node address off the NodePort range, a fwmark.
        for key in [
            ServiceKey::tcp(vip(9), 80),
            ServiceKey::tcp(IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1)), 22),
            ServiceKey::fwmark(ipvs::Family::Inet, 7),
        ] {
            kernel.insert(key, (Service::new(key, "rr"), BTreeMap::new()));
        }
        let after = desired(&[vs(1, Protocol::Tcp, &[1])]);
        let ops = run(&after, &kernel, &mut Drains::default());
        assert_eq!(
            ops,
            vec![IpvsOp::DeleteService(ServiceKey::tcp(vip(2), 80))]
        );
    }

    #[test]
    fn excluded_addresses_are_never_owned() {
        assert!(owner().owns(&unmarked(ServiceKey::tcp(vip(2), 80))));
        assert!(!owner().owns(&unmarked(ServiceKey::tcp(vip(3), 80))));
        let mut marked = unmarked(ServiceKey::tcp(vip(3), 80));
        marked.flags |= AGENT_MARK;
        assert!(!owner().owns(&marked));
    }

    #[test]
    fn node_port_services_on_node_addresses_are_owned() {
        let np = ServiceKey::tcp(IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1)), 30080);
        assert!(owner().owns(&unmarked(np)));
    }

    fn node_ip() -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1))
    }

    /// An external IP that is a node address, as the model gives it.
    fn on_node_address(port: u16, backends: &[u8]) -> VirtualService {
        VirtualService {
            kind: VirtualServiceKind::ExternalIp,
            address: node_ip(),
            port,
            ..vs(9, Protocol::Tcp, backends)
        }
    }

    #[test]
    fn every_desired_service_carries_the_agent_mark() {
        let d = desired(&[vs(1, Protocol::Tcp, &[1]), on_node_address(80, &[1])]);
        assert!(d.values().all(|s| s.service.flags.contains(AGENT_MARK)));
    }

    /// A Service whose external IP is the node's address (`nodeIP:80`, outside the NodePort
    /// range and not on `kube-ipvs0`) is deleted: its mark says it is ours, whether this agent
    /// made it in this run or an earlier one (the plan sees only the kernel's table). Unmarked
    /// services on the node address stay.
    #[test]
    fn a_node_address_service_of_ours_is_deleted_with_its_service_and_foreign_ones_stay() {
        let before = desired(&[vs(1, Protocol::Tcp, &[1]), on_node_address(80, &[1])]);
        let mut kernel = kernel_of(&before);
        for port in [22, 81] {
            let key = ServiceKey::tcp(node_ip(), port);
            kernel.insert(key, (unmarked(key), BTreeMap::new()));
        }
        let after = desired(&[vs(1, Protocol::Tcp, &[1])]);
        let ops = run(&after, &kernel, &mut Drains::default());
        assert_eq!(
            ops,
            vec![IpvsOp::DeleteService(ServiceKey::tcp(node_ip(), 80))]
        );
        // The same in an incremental sync scoped to that key.
        let scope: BTreeSet<ServiceKey> = [ServiceKey::tcp(node_ip(), 80)].into_iter().collect();
        let ops = plan(
            &after,
            &PlanContext {
                observed: &kernel,
                ownership: &owner(),
                drain_timeout: Duration::from_secs(60),
                now: Instant::now(),
                scope: Some(&scope),
            },
            &mut Drains::default(),
        );
        assert_eq!(
            ops,
            vec![IpvsOp::DeleteService(ServiceKey::tcp(node_ip(), 80))]
        );
    }

    /// A Service asking for `nodeIP:80` while someone else's IPVS service holds it: the foreign
    /// service is neither edited (scheduler, destinations) nor deleted afterwards.
    #[test]
    fn a_foreign_service_on_a_node_address_is_not_taken_over() {
        let key = ServiceKey::tcp(node_ip(), 80);
        let mut kernel = ObservedIpvs::new();
        let mut foreign = unmarked(key);
        foreign.scheduler = "wlc".into();
        let dest = masq(IpAddr::V4(Ipv4Addr::new(192, 168, 7, 7)), 80, 1);
        kernel.insert(
            key,
            (
                foreign,
                [((dest.address, dest.port), ObservedDest::from(&dest))]
                    .into_iter()
                    .collect(),
            ),
        );
        let want = desired(&[on_node_address(80, &[1])]);
        assert_eq!(run(&want, &kernel, &mut Drains::default()), vec![]);
        assert_eq!(foreign_keys(&want, &kernel, &owner()), vec![key]);
        assert_eq!(run(&desired(&[]), &kernel, &mut Drains::default()), vec![]);
    }

    /// Services made before the mark existed (by an older agent or kube-proxy) under the
    /// address rule get it on the next sync.
    #[test]
    fn unmarked_services_of_ours_get_the_mark() {
        let d = desired(&[vs(1, Protocol::Tcp, &[1])]);
        let mut kernel = kernel_of(&d);
        let key = ServiceKey::tcp(vip(1), 80);
        let svc = &mut kernel.get_mut(&key).unwrap().0;
        svc.flags = ServiceFlags(svc.flags.0 & !AGENT_MARK.0);
        let ops = run(&d, &kernel, &mut Drains::default());
        assert_eq!(ops, vec![IpvsOp::EditService(d[&key].service.clone())]);
    }

    /// Unmarked `nodeIP:port` services an agent of this boot recorded as programmed (a version
    /// without the mark) are adopted: edited (marked) when desired, deleted when not.
    #[test]
    fn recorded_services_are_adopted() {
        let (k80, k81) = (
            ServiceKey::tcp(node_ip(), 80),
            ServiceKey::tcp(node_ip(), 81),
        );
        let mut kernel = ObservedIpvs::new();
        for key in [k80, k81] {
            kernel.insert(key, (unmarked(key), BTreeMap::new()));
        }
        let mut o = owner();
        o.recorded = [k80, k81].into_iter().collect();
        let want = desired(&[on_node_address(80, &[])]);
        let ops = plan(
            &want,
            &PlanContext {
                observed: &kernel,
                ownership: &o,
                drain_timeout: Duration::from_secs(60),
                now: Instant::now(),
                scope: None,
            },
            &mut Drains::default(),
        );
        assert_eq!(
            ops,
            vec![
                IpvsOp::EditService(want[&k80].service.clone()),
                IpvsOp::DeleteService(k81)
            ]
        );
    }

    #[test]
    fn scheduler_and_persistence_changes_are_edits() {
        let before = desired(&[vs(1, Protocol::Tcp, &[1])]);
        let mut v = vs(1, Protocol::Tcp, &[1]);
        v.scheduler = "mh".into();
        v.persistence_timeout = Some(10800);
        let after = desired(&[v]);
        let ops = run(&after, &kernel_of(&before), &mut Drains::default());
        assert_eq!(ops.len(), 1);
        let IpvsOp::EditService(s) = &ops[0] else {
            panic!("{ops:?}")
        };
        assert_eq!(s.scheduler, "mh");
        assert!(
            s.flags
                .contains(ServiceFlags::PERSISTENT | ServiceFlags::MH_PORT)
        );
        assert_eq!(s.timeout, 10800);
    }

    #[test]
    fn a_service_deleted_by_hand_is_restored() {
        let d = desired(&[vs(1, Protocol::Tcp, &[1, 2])]);
        let mut kernel = kernel_of(&d);
        kernel.clear();
        let ops = run(&d, &kernel, &mut Drains::default());
        assert_eq!(
            ops.iter()
                .filter(|o| matches!(o, IpvsOp::AddService(_)))
                .count(),
            1
        );
        assert_eq!(
            ops.iter()
                .filter(|o| matches!(o, IpvsOp::AddDestination(..)))
                .count(),
            2
        );
    }

    #[test]
    fn a_scoped_plan_touches_only_its_services_and_keeps_other_drains() {
        let before = desired(&[vs(1, Protocol::Tcp, &[1, 2]), vs(2, Protocol::Tcp, &[1, 2])]);
        let after = desired(&[vs(1, Protocol::Tcp, &[1]), vs(2, Protocol::Tcp, &[1])]);
        let (k1, k2) = (ServiceKey::tcp(vip(1), 80), ServiceKey::tcp(vip(2), 80));
        let kernel = kernel_of(&before);
        let mut drains = Drains::default();
        let only1: BTreeSet<ServiceKey> = [k1].into_iter().collect();
        let t = Instant::now();
        let ops = plan(
            &after,
            &PlanContext {
                observed: &kernel,
                ownership: &owner(),
                drain_timeout: Duration::from_secs(60),
                now: t,
                scope: Some(&only1),
            },
            &mut drains,
        );
        assert_eq!(ops, vec![IpvsOp::EditDestination(k1, masq(ip(2), 8080, 0))]);
        let only2: BTreeSet<ServiceKey> = [k2].into_iter().collect();
        let ops = plan(
            &after,
            &PlanContext {
                observed: &kernel,
                ownership: &owner(),
                drain_timeout: Duration::from_secs(60),
                now: t,
                scope: Some(&only2),
            },
            &mut drains,
        );
        assert_eq!(ops, vec![IpvsOp::EditDestination(k2, masq(ip(2), 8080, 0))]);
        assert_eq!(drains.services(), [k1, k2].into_iter().collect());
        // A service deleted in scope goes; out of scope it stays.
        let none = desired(&[]);
        assert_eq!(
            plan(
                &none,
                &PlanContext {
                    observed: &kernel,
                    ownership: &owner(),
                    drain_timeout: Duration::from_secs(60),
                    now: t,
                    scope: Some(&only2),
                },
                &mut Drains::default(),
            ),
            vec![IpvsOp::DeleteService(k2)]
        );
    }

    #[test]
    fn cache_follows_applied_operations() {
        let d = desired(&[vs(1, Protocol::Tcp, &[1, 2])]);
        let mut cache = ObservedIpvs::new();
        for op in run(&d, &cache.clone(), &mut Drains::default()) {
            record(&mut cache, &op);
        }
        assert!(run(&d, &cache, &mut Drains::default()).is_empty());
    }
}
