//! Datapath map reconciler: what the TC programs need to know about services (the service
//! ports with their SNAT flags and ids, the service and NodePort addresses, the
//! `loadBalancerSourceRanges`, the cluster CIDRs), computed from the model and written into the
//! pinned BPF maps as a minimal diff. All entries of these maps are this agent's.
//!
//! Order matters for packets in flight: entries are added before IPVS learns of a service (so
//! its first packet is already classified) and removed after IPVS forgets it; a service address
//! is added to `svc_addrs` after its ports are in `svc_ports` and removed before them, so a
//! service port is never dropped as "another port on a service address".
//!
//! Service ids (which key `src_ranges`) are stable: an existing `svc_ports` entry keeps its id,
//! a new one takes the smallest free id.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use probes::maps::{
    ADDR_F_NODE, ADDR_F_SERVICE, AddrKey, AddrValue, CidrKey, RangeKey, SVC_F_MASQ,
    SVC_F_MASQ_OFFCLUSTER, SVC_F_SRC_RANGES, SvcKey, SvcValue, map_names,
};
use probes::{DatapathMaps, UpdateFlags};

use crate::model::{DesiredState, Protocol, ServicePort, VirtualService};

/// What the maps should hold.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DesiredMaps {
    /// Service port → (`SVC_F_*` flags, source ranges).
    pub svc_ports: BTreeMap<ServicePort, (u32, Vec<IpNet>)>,
    /// Address → `ADDR_F_*` flags.
    pub svc_addrs: BTreeMap<IpAddr, u32>,
    pub cluster_cidrs: BTreeSet<IpNet>,
    /// Whether `svc_addrs` and `cluster_cidrs` are given (else they are left as they are).
    pub addresses_included: bool,
}

/// The map contents for `desired`. SCTP is passed to IPVS untranslated (its multi-homing
/// carries addresses inside the payload), so SCTP ports never get SNAT flags: the caller
/// reports those that would have needed them.
pub fn desired(state: &DesiredState, cluster_cidrs: &[IpNet]) -> DesiredMaps {
    desired_of(
        state.virtual_services.iter().map(|v| &**v),
        state,
        cluster_cidrs,
    )
}

/// The service ports of `virtual_services` only, addresses and cluster CIDRs left as they are
/// (an incremental sync whose address sets did not change).
pub fn desired_ports_only<'a>(
    virtual_services: impl IntoIterator<Item = &'a VirtualService>,
) -> DesiredMaps {
    desired_ports(virtual_services, None)
}

/// [`desired`] with the service ports of `virtual_services` only (an incremental sync).
pub fn desired_of<'a>(
    virtual_services: impl IntoIterator<Item = &'a VirtualService>,
    state: &DesiredState,
    cluster_cidrs: &[IpNet],
) -> DesiredMaps {
    desired_ports(virtual_services, Some((state, cluster_cidrs)))
}

/// The service ports of `virtual_services`, and the addresses and cluster CIDRs when `rest` is
/// given.
fn desired_ports<'a>(
    virtual_services: impl IntoIterator<Item = &'a VirtualService>,
    rest: Option<(&DesiredState, &[IpNet])>,
) -> DesiredMaps {
    let mut out = DesiredMaps::default();
    for vs in virtual_services {
        let mut flags = 0;
        if vs.protocol != Protocol::Sctp {
            if vs.snat {
                flags |= SVC_F_MASQ;
            }
            if vs.masq_off_cluster {
                flags |= SVC_F_MASQ_OFFCLUSTER;
            }
        }
        if !vs.source_ranges.is_empty() {
            flags |= SVC_F_SRC_RANGES;
        }
        out.svc_ports
            .insert(ServicePort::of(vs), (flags, vs.source_ranges.clone()));
    }
    if let Some((state, cluster_cidrs)) = rest {
        for a in state.service_addresses.iter() {
            *out.svc_addrs.entry(*a).or_default() |= ADDR_F_SERVICE;
        }
        for a in state.node_port_addresses.iter() {
            *out.svc_addrs.entry(*a).or_default() |= ADDR_F_NODE;
        }
        out.cluster_cidrs = cluster_cidrs.iter().map(|n| n.trunc()).collect();
        out.addresses_included = true;
    }
    out
}

/// SCTP virtual services that would need SNAT, which the datapath does not do (reported).
pub fn sctp_not_source_nated<'a>(
    virtual_services: impl IntoIterator<Item = &'a VirtualService>,
) -> Vec<String> {
    virtual_services
        .into_iter()
        .filter(|v| v.protocol == Protocol::Sctp && (v.snat || v.masq_off_cluster))
        .map(|v| format!("{} {}", v.service, v.socket_addr()))
        .collect()
}

/// The maps' contents as the agent last wrote or read them.
#[derive(Debug, Default, Clone)]
pub struct ObservedMaps {
    pub svc_ports: HashMap<SvcKey, SvcValue>,
    /// The largest service id in use (new ports take the next ones).
    pub max_id: u32,
    pub svc_addrs: HashMap<AddrKey, AddrValue>,
    pub src_ranges: HashSet<RangeKey>,
    pub cluster_cidrs: HashSet<CidrKey>,
}

/// Reads every entry of the service maps.
pub fn observe(maps: &DatapathMaps) -> probes::Result<ObservedMaps> {
    let svc_ports: HashMap<SvcKey, SvcValue> = maps.svc_ports.entries()?.into_iter().collect();
    Ok(ObservedMaps {
        max_id: svc_ports.values().map(|v| v.svc_id).max().unwrap_or(0),
        svc_ports,
        svc_addrs: maps.svc_addrs.entries()?.into_iter().collect(),
        src_ranges: maps
            .src_ranges
            .entries()?
            .into_iter()
            .map(|(k, _)| k)
            .collect(),
        cluster_cidrs: maps
            .cluster_cidrs
            .entries()?
            .into_iter()
            .map(|(k, _)| k)
            .collect(),
    })
}

/// One map change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapOp {
    PutPort(SvcKey, SvcValue),
    DelPort(SvcKey),
    PutAddr(AddrKey, AddrValue),
    DelAddr(AddrKey),
    PutRange(RangeKey),
    DelRange(RangeKey),
    PutCidr(CidrKey),
    DelCidr(CidrKey),
}

impl MapOp {
    /// The map it writes.
    pub fn map(&self) -> &'static str {
        match self {
            MapOp::PutPort(..) | MapOp::DelPort(_) => map_names::SVC_PORTS,
            MapOp::PutAddr(..) | MapOp::DelAddr(_) => map_names::SVC_ADDRS,
            MapOp::PutRange(_) | MapOp::DelRange(_) => map_names::SRC_RANGES,
            MapOp::PutCidr(_) | MapOp::DelCidr(_) => map_names::CLUSTER_CIDRS,
        }
    }
}

/// The changes, split in the two phases around the IPVS reconciler.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MapPlan {
    /// Before IPVS: new and changed entries (ports and ranges, then addresses).
    pub additions: Vec<MapOp>,
    /// After IPVS: entries to remove (addresses, then ports and ranges).
    pub removals: Vec<MapOp>,
    /// Service ports that could not be given an entry (invalid prefix).
    pub errors: Vec<String>,
}

/// Computes the minimal changes from `observed` to `desired`. With a `scope`, only those
/// service ports (and their source ranges) are compared, and `desired.svc_ports` need only hold
/// the scoped ports that should exist; addresses and cluster CIDRs are always compared.
pub fn plan(
    desired: &DesiredMaps,
    observed: &ObservedMaps,
    scope: Option<&HashSet<SvcKey>>,
) -> MapPlan {
    let mut plan = MapPlan::default();
    let mut next_id = observed.max_id;
    let mut want_ports: HashMap<SvcKey, SvcValue> = HashMap::new();
    let mut want_ranges: HashSet<RangeKey> = HashSet::new();
    for (&port, (flags, ranges)) in &desired.svc_ports {
        let key = SvcKey::from(port);
        if scope.is_some_and(|s| !s.contains(&key)) {
            continue;
        }
        let svc_id = match observed.svc_ports.get(&key) {
            Some(v) => v.svc_id,
            None => {
                next_id += 1;
                next_id
            }
        };
        let value = SvcValue {
            flags: *flags,
            svc_id,
        };
        if observed.svc_ports.get(&key) != Some(&value) {
            plan.additions.push(MapOp::PutPort(key, value));
        }
        want_ports.insert(key, value);
        for r in ranges {
            match RangeKey::new(svc_id, r.addr(), r.prefix_len()) {
                Ok(k) => {
                    if !observed.src_ranges.contains(&k) {
                        plan.additions.push(MapOp::PutRange(k));
                    }
                    want_ranges.insert(k);
                }
                Err(e) => plan.errors.push(format!("{port}: source range {r}: {e}")),
            }
        }
    }
    if !desired.addresses_included {
        plan_port_removals(&mut plan, observed, scope, &want_ports, &want_ranges);
        return plan;
    }
    let mut want_cidrs = HashSet::new();
    for n in &desired.cluster_cidrs {
        match CidrKey::new(n.addr(), n.prefix_len()) {
            Ok(k) => {
                if !observed.cluster_cidrs.contains(&k) {
                    plan.additions.push(MapOp::PutCidr(k));
                }
                want_cidrs.insert(k);
            }
            Err(e) => plan.errors.push(format!("cluster CIDR {n}: {e}")),
        }
    }
    let mut want_addrs = HashSet::new();
    for (&addr, &flags) in &desired.svc_addrs {
        let key = AddrKey::new(addr);
        let value = AddrValue { flags, pad: 0 };
        if observed.svc_addrs.get(&key) != Some(&value) {
            plan.additions.push(MapOp::PutAddr(key, value));
        }
        want_addrs.insert(key);
    }
    for k in observed
        .svc_addrs
        .keys()
        .filter(|k| !want_addrs.contains(*k))
    {
        plan.removals.push(MapOp::DelAddr(*k));
    }
    plan_port_removals(&mut plan, observed, scope, &want_ports, &want_ranges);
    for k in observed
        .cluster_cidrs
        .iter()
        .filter(|k| !want_cidrs.contains(*k))
    {
        plan.removals.push(MapOp::DelCidr(*k));
    }
    plan
}

/// The service ports (and their source ranges) to remove: every observed one not wanted, or
/// only the scope's.
fn plan_port_removals(
    plan: &mut MapPlan,
    observed: &ObservedMaps,
    scope: Option<&HashSet<SvcKey>>,
    want_ports: &HashMap<SvcKey, SvcValue>,
    want_ranges: &HashSet<RangeKey>,
) {
    let ports: Box<dyn Iterator<Item = &SvcKey>> = match scope {
        None => Box::new(observed.svc_ports.keys()),
        Some(s) => Box::new(s.iter().filter(|k| observed.svc_ports.contains_key(*k))),
    };
    let mut ids = HashSet::new();
    for k in ports {
        if let Some(v) = observed.svc_ports.get(k) {
            ids.insert(v.svc_id);
        }
        if !want_ports.contains_key(k) {
            plan.removals.push(MapOp::DelPort(*k));
        }
    }
    if !ids.is_empty() {
        for k in observed
            .src_ranges
            .iter()
            .filter(|k| ids.contains(&k.svc_id) && !want_ranges.contains(*k))
        {
            plan.removals.push(MapOp::DelRange(*k));
        }
    }
}

/// Applies `ops` in order, updating `observed`; returns how many were applied and the failures
/// (a full map or a kernel error affects that entry only).
pub fn apply(
    maps: &DatapathMaps,
    ops: &[MapOp],
    observed: &mut ObservedMaps,
) -> (usize, Vec<String>) {
    let mut done = 0;
    let mut failures = Vec::new();
    // Entries a full map refused, by map: one failure each, not one per entry (at 50,000
    // Services that would be tens of thousands of lines per sync).
    let mut full: BTreeMap<&'static str, usize> = BTreeMap::new();
    for op in ops {
        let r = match op {
            MapOp::PutPort(k, v) => maps.put_service_port(k, v).map(|()| {
                observed.max_id = observed.max_id.max(v.svc_id);
                observed.svc_ports.insert(*k, *v);
            }),
            MapOp::DelPort(k) => maps.svc_ports.delete(k).map(|_| {
                observed.svc_ports.remove(k);
            }),
            MapOp::PutAddr(k, v) => maps.svc_addrs.update(k, v, UpdateFlags::Any).map(|()| {
                observed.svc_addrs.insert(*k, *v);
            }),
            MapOp::DelAddr(k) => maps.svc_addrs.delete(k).map(|_| {
                observed.svc_addrs.remove(k);
            }),
            MapOp::PutRange(k) => maps.src_ranges.update(k, &1, UpdateFlags::Any).map(|()| {
                observed.src_ranges.insert(*k);
            }),
            MapOp::DelRange(k) => maps.src_ranges.delete(k).map(|_| {
                observed.src_ranges.remove(k);
            }),
            MapOp::PutCidr(k) => maps
                .cluster_cidrs
                .update(k, &1, UpdateFlags::Any)
                .map(|()| {
                    observed.cluster_cidrs.insert(*k);
                }),
            MapOp::DelCidr(k) => maps.cluster_cidrs.delete(k).map(|_| {
                observed.cluster_cidrs.remove(k);
            }),
        };
        match r {
            Ok(()) => done += 1,
            Err(e) if e.is_map_full() => *full.entry(op.map()).or_default() += 1,
            Err(e) => failures.push(format!("{op:?}: {e}")),
        }
    }
    failures.extend(full.into_iter().map(|(map, n)| map_full(map, n)));
    (done, failures)
}

/// What a full map means, once for all the entries it refused: which map, how many entries,
/// and how to make room (its size is set when it is created).
fn map_full(map: &str, refused: usize) -> String {
    format!(
        "map {map} is full: {refused} entries not written (the traffic of the services they \
         describe is not handled as service traffic); set its size with --bpf-map-size \
         {map}=ENTRIES or kubeIpvsBpf.datapath.mapSizes (applied when the map is created: a \
         pinned map keeps its size until `kube-ipvs-bpf cleanup`)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ServiceRef, VirtualService, VirtualServiceKind};

    fn vs(
        addr: &str,
        port: u16,
        protocol: Protocol,
        snat: bool,
        ranges: &[&str],
    ) -> VirtualService {
        VirtualService {
            service: ServiceRef::new("ns", "svc"),
            port_name: "p".into(),
            kind: if snat {
                VirtualServiceKind::NodePort
            } else {
                VirtualServiceKind::ClusterIp
            },
            protocol,
            address: addr.parse().unwrap(),
            port,
            scheduler: "rr".into(),
            persistence_timeout: None,
            local_only: false,
            snat,
            masq_off_cluster: !snat,
            source_ranges: ranges.iter().map(|r| r.parse().unwrap()).collect(),
            destinations: vec![],
        }
    }

    fn state(vss: Vec<VirtualService>) -> DesiredState {
        let vss = vss.into_iter().map(std::sync::Arc::new).collect();
        let mut s = DesiredState {
            virtual_services: vss,
            ..Default::default()
        };
        s.service_addresses = std::sync::Arc::new(
            s.virtual_services
                .iter()
                .filter(|v| !v.snat)
                .map(|v| v.address)
                .collect(),
        );
        s.node_port_addresses = std::sync::Arc::new(
            s.virtual_services
                .iter()
                .filter(|v| v.snat)
                .map(|v| v.address)
                .collect(),
        );
        s
    }

    /// Applies a plan to an in-memory "map" (what apply would leave).
    fn after(observed: &ObservedMaps, plan: &MapPlan) -> ObservedMaps {
        let mut o = observed.clone();
        for op in plan.additions.iter().chain(&plan.removals) {
            match op {
                MapOp::PutPort(k, v) => {
                    o.max_id = o.max_id.max(v.svc_id);
                    o.svc_ports.insert(*k, *v);
                }
                MapOp::DelPort(k) => {
                    o.svc_ports.remove(k);
                }
                MapOp::PutAddr(k, v) => {
                    o.svc_addrs.insert(*k, *v);
                }
                MapOp::DelAddr(k) => {
                    o.svc_addrs.remove(k);
                }
                MapOp::PutRange(k) => {
                    o.src_ranges.insert(*k);
                }
                MapOp::DelRange(k) => {
                    o.src_ranges.remove(k);
                }
                MapOp::PutCidr(k) => {
                    o.cluster_cidrs.insert(*k);
                }
                MapOp::DelCidr(k) => {
                    o.cluster_cidrs.remove(k);
                }
            }
        }
        o
    }

    #[test]
    fn flags_follow_the_model_and_sctp_is_never_source_nated() {
        let s = state(vec![
            vs("10.0.0.1", 30080, Protocol::Tcp, true, &[]),
            vs("10.96.0.1", 80, Protocol::Tcp, false, &[]),
            vs("10.0.0.1", 30081, Protocol::Sctp, true, &[]),
            vs("192.0.2.10", 443, Protocol::Tcp, true, &["203.0.113.0/24"]),
        ]);
        let d = desired(&s, &["10.244.0.0/16".parse().unwrap()]);
        let f = |a: &str, p, pr| d.svc_ports[&ServicePort::new(a.parse().unwrap(), pr, p)].0;
        assert_eq!(f("10.0.0.1", 30080, Protocol::Tcp), SVC_F_MASQ);
        assert_eq!(f("10.96.0.1", 80, Protocol::Tcp), SVC_F_MASQ_OFFCLUSTER);
        assert_eq!(f("10.0.0.1", 30081, Protocol::Sctp), 0);
        assert_eq!(
            f("192.0.2.10", 443, Protocol::Tcp),
            SVC_F_MASQ | SVC_F_SRC_RANGES
        );
        assert_eq!(
            sctp_not_source_nated(s.virtual_services.iter().map(|v| &**v)),
            vec!["ns/svc 10.0.0.1:30081".to_string()]
        );
        assert_eq!(
            d.svc_addrs[&"10.96.0.1".parse::<IpAddr>().unwrap()],
            ADDR_F_SERVICE
        );
        assert_eq!(
            d.svc_addrs[&"10.0.0.1".parse::<IpAddr>().unwrap()],
            ADDR_F_NODE
        );
    }

    #[test]
    fn empty_maps_get_everything_and_a_second_plan_is_empty() {
        let s = state(vec![
            vs("10.96.0.1", 80, Protocol::Tcp, false, &[]),
            vs(
                "192.0.2.10",
                443,
                Protocol::Tcp,
                true,
                &["203.0.113.0/24", "2001:db8::/32"],
            ),
        ]);
        let d = desired(&s, &["10.244.0.0/16".parse().unwrap()]);
        let p = plan(&d, &ObservedMaps::default(), None);
        assert!(p.removals.is_empty());
        // 2 ports, 2 ranges, 1 cidr, 2 addresses.
        assert_eq!(p.additions.len(), 7, "{p:?}");
        // Ports and ranges come before addresses.
        let first_addr = p
            .additions
            .iter()
            .position(|o| matches!(o, MapOp::PutAddr(..)))
            .unwrap();
        assert!(
            p.additions[..first_addr]
                .iter()
                .all(|o| !matches!(o, MapOp::PutAddr(..)))
        );
        assert!(
            p.additions[first_addr..]
                .iter()
                .all(|o| matches!(o, MapOp::PutAddr(..)))
        );
        let o = after(&ObservedMaps::default(), &p);
        assert_eq!(plan(&d, &o, None), MapPlan::default());
    }

    #[test]
    fn ids_are_stable_and_removed_entries_go_addresses_first() {
        let a = vs("10.96.0.1", 80, Protocol::Tcp, false, &[]);
        let b = vs("10.96.0.2", 80, Protocol::Tcp, false, &[]);
        let d1 = desired(&state(vec![a.clone(), b.clone()]), &[]);
        let o1 = after(
            &ObservedMaps::default(),
            &plan(&d1, &ObservedMaps::default(), None),
        );
        let id_b = o1.svc_ports[&SvcKey::new(b.address, 80, probes::maps::L4Proto::Tcp)].svc_id;
        // A new service sorting before b does not change b's id.
        let c = vs("10.96.0.0", 80, Protocol::Tcp, false, &[]);
        let d2 = desired(&state(vec![c, b.clone()]), &[]);
        let p2 = plan(&d2, &o1, None);
        let o2 = after(&o1, &p2);
        assert_eq!(
            o2.svc_ports[&SvcKey::new(b.address, 80, probes::maps::L4Proto::Tcp)].svc_id,
            id_b
        );
        assert_eq!(
            p2.removals.first(),
            Some(&MapOp::DelAddr(AddrKey::new(a.address)))
        );
        assert!(matches!(p2.removals.get(1), Some(MapOp::DelPort(_))));
    }
}
