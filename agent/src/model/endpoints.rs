//! Endpoints: EndpointSlices → the endpoints of each service port, and kube-proxy's
//! categorisation of them.
//!
//! This module owns
//! - the slice cache ([`SliceIndex`]): slices are grouped by their `kubernetes.io/service-name`
//!   label, endpoints are keyed by (service port name, protocol) and de-duplicated by
//!   `ip:port` across slices (kube-proxy's `endpointslicecache.go`: the first address of an
//!   endpoint is used; a later copy replaces an earlier one unless it is terminating);
//! - [`categorize`], kube-proxy's `CategorizeEndpoints` (`pkg/proxy/topology.go`, v1.36): the
//!   cluster set (ready endpoints, filtered by topology hints; if none is ready, the serving
//!   and terminating ones) and the local set (ready local endpoints; if none, serving and
//!   terminating local ones).
//!
//! Bad addresses and ports inside a slice are skipped and reported once per slice; the rest of
//! the slice is used.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use super::endpoint_slice::{EndpointSliceInfo, SliceAddress};
use super::{Protocol, Rejection, ServiceRef};

/// Endpoint conditions and placement, as kube-proxy's `BaseEndpointInfo` holds them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub address: IpAddr,
    pub port: u16,
    /// `nodeName` is this node.
    pub local: bool,
    /// `conditions.ready`, nil = true.
    pub ready: bool,
    /// `conditions.serving`, nil = true (the API defaults it to `ready`; kube-proxy reads nil as
    /// true).
    pub serving: bool,
    /// `conditions.terminating`, nil = false.
    pub terminating: bool,
    /// `hints.forZones[].name`, sorted; empty = no hint.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name`, sorted; empty = no hint.
    pub node_hints: Vec<String>,
}

impl Endpoint {
    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// (service port name, protocol): how EndpointSlice ports are matched to Service ports.
pub(crate) type PortKey = (String, Protocol);

/// The endpoints of one Service, per port.
#[derive(Debug, Default)]
pub(crate) struct ServiceEndpoints {
    by_port: HashMap<PortKey, BTreeMap<(IpAddr, u16), Endpoint>>,
}

impl ServiceEndpoints {
    /// The endpoints of a service port, sorted by (address, port).
    pub fn port(&self, name: &str, protocol: Protocol) -> Vec<&Endpoint> {
        self.by_port
            .get(&(name.to_owned(), protocol))
            .map(|m| m.values().collect())
            .unwrap_or_default()
    }

    /// Distinct ready local endpoint IPs over all ports (kube-proxy's `LocalReadyEndpoints`,
    /// which feeds the health-check node port).
    pub fn local_ready_ips(&self) -> usize {
        self.by_port
            .values()
            .flat_map(|m| m.values())
            .filter(|e| e.local && e.ready)
            .map(|e| e.address)
            .collect::<BTreeSet<_>>()
            .len()
    }
}

/// Adds `ep` to one port's endpoints. kube-proxy: an endpoint seen twice (moving between
/// slices, or a reused pod IP) is replaced unless the newcomer is terminating, so a running pod
/// wins.
fn insert(map: &mut BTreeMap<(IpAddr, u16), Endpoint>, ep: Endpoint) {
    let id = (ep.address, ep.port);
    if ep.terminating && map.contains_key(&id) {
        return;
    }
    map.insert(id, ep);
}

/// All endpoints, per Service.
#[derive(Debug, Default)]
pub(crate) struct SliceIndex {
    by_service: HashMap<ServiceRef, ServiceEndpoints>,
}

impl SliceIndex {
    pub fn get(&self, service: &ServiceRef) -> Option<&ServiceEndpoints> {
        self.by_service.get(service)
    }

    /// Indexes the slices of the services for which `known` is true; slices of other services
    /// are ignored (the caller logs that at info level if it wants). Slices are applied in
    /// (namespace, name) order so that de-duplication is deterministic.
    pub fn build<'a>(
        slices: impl IntoIterator<Item = &'a EndpointSliceInfo>,
        known: impl Fn(&ServiceRef) -> bool,
        node_name: &str,
        proxy_name: Option<&str>,
        rejected: &mut Vec<Rejection>,
    ) -> Self {
        let mut ordered: Vec<(ServiceRef, &str, &EndpointSliceInfo)> = Vec::new();
        for slice in slices {
            let Some(sref) = super::endpoint_slice_service(slice) else {
                continue; // not managed for a Service: kube-proxy ignores it too
            };
            // kube-proxy's informers skip slices labelled for another proxy or as headless.
            if slice
                .proxy_name
                .as_deref()
                .is_some_and(|p| proxy_name != Some(p))
                || slice.headless
            {
                continue;
            }
            if !known(&sref) {
                continue;
            }
            ordered.push((sref, &slice.name, slice));
        }
        ordered.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));

        let mut index = Self::default();
        let mut prev: Option<(&ServiceRef, &str)> = None;
        for (sref, name, slice) in &ordered {
            let object = format!("EndpointSlice {}/{}", sref.namespace, name);
            if prev == Some((sref, name)) {
                rejected.push(Rejection {
                    object,
                    reason: "another EndpointSlice with the same namespace/name came first"
                        .to_owned(),
                });
                continue;
            }
            prev = Some((sref, name));
            let eps = index.by_service.entry(sref.clone()).or_default();
            let notes = add_slice(eps, slice, node_name);
            if !notes.is_empty() {
                rejected.push(Rejection {
                    object,
                    reason: notes.join("; "),
                });
            }
        }
        index
    }
}

/// Adds one slice's endpoints; returns notes about what was skipped as invalid.
fn add_slice(
    eps: &mut ServiceEndpoints,
    slice: &EndpointSliceInfo,
    node_name: &str,
) -> Vec<String> {
    let mut notes = Vec::new();
    let want_v4 = match &*slice.address_type {
        "IPv4" => true,
        "IPv6" => false,
        "FQDN" => return notes, // not proxied by kube-proxy
        other => {
            notes.push(format!("unsupported addressType {other:?}; slice ignored"));
            return notes;
        }
    };

    let mut ports: Vec<(PortKey, u16)> = Vec::new();
    for p in &slice.ports {
        let name = p.name.as_deref().unwrap_or_default().to_owned();
        let protocol = match p.protocol.as_deref() {
            None | Some("") => Protocol::Tcp,
            Some(s) => match Protocol::from_k8s(s) {
                Some(pr) => pr,
                None => {
                    notes.push(format!(
                        "port {name:?}: unknown protocol {s:?}; port ignored"
                    ));
                    continue;
                }
            },
        };
        match p.port {
            None => {} // "all ports": not supported by kube-proxy either
            Some(n) => match u16::try_from(n).ok().filter(|n| *n != 0) {
                Some(n) => ports.push(((name, protocol), n)),
                None => notes.push(format!("port {name:?}: invalid port {n}; port ignored")),
            },
        }
    }

    let mut bad_addresses: Vec<String> = Vec::new();
    let mut parsed: Vec<Endpoint> = Vec::new();
    for ep in &slice.endpoints {
        let address = match &ep.address {
            None => continue, // no address: nothing to proxy to
            Some(SliceAddress::Ip(ip)) if ip.is_ipv4() == want_v4 => *ip,
            Some(SliceAddress::Ip(ip)) => {
                bad_addresses.push(ip.to_string());
                continue;
            }
            Some(SliceAddress::Invalid(a)) => {
                bad_addresses.push(a.to_string());
                continue;
            }
        };
        let names = |v: &[Box<str>]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        parsed.push(Endpoint {
            address,
            port: 0,
            local: !node_name.is_empty() && ep.node_name.as_deref() == Some(node_name),
            ready: ep.ready.unwrap_or(true),
            serving: ep.serving.unwrap_or(true),
            terminating: ep.terminating.unwrap_or(false),
            zone_hints: ep
                .hints
                .as_ref()
                .map(|h| names(&h.zones))
                .unwrap_or_default(),
            node_hints: ep
                .hints
                .as_ref()
                .map(|h| names(&h.nodes))
                .unwrap_or_default(),
        });
    }
    if !bad_addresses.is_empty() {
        const SHOWN: usize = 5;
        let mut list = bad_addresses
            .iter()
            .take(SHOWN)
            .map(|a| format!("{a:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        if bad_addresses.len() > SHOWN {
            list.push_str(", …");
        }
        notes.push(format!(
            "skipped {} endpoint(s) whose address is not a valid {} address: {list}",
            bad_addresses.len(),
            slice.address_type
        ));
    }

    for (key, port) in ports {
        let map = eps.by_port.entry(key).or_default();
        for ep in &parsed {
            insert(map, Endpoint { port, ..ep.clone() });
        }
    }
    notes
}

/// kube-proxy's topology modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    /// No filtering.
    None,
    PreferSameZone,
    PreferSameNode,
}

/// kube-proxy's `topologyModeFromHints`. Only ready endpoints count. Node hints win when every
/// ready endpoint has one and one names this node (PreferSameTrafficDistribution is GA and
/// locked on since 1.35); otherwise zone hints, when every ready endpoint has one and one names
/// this node's zone. The Service's `trafficDistribution` itself is not read: the EndpointSlice
/// controller turns it into hints.
fn topology_mode(eps: &[&Endpoint], node_name: &str, zone: Option<&str>) -> TopologyMode {
    let ready = || eps.iter().filter(|e| e.ready);
    if ready().next().is_none() {
        return TopologyMode::None;
    }
    let has = |hints: &[String], v: &str| hints.binary_search_by(|h| h.as_str().cmp(v)).is_ok();
    if ready().all(|e| !e.node_hints.is_empty()) && ready().any(|e| has(&e.node_hints, node_name)) {
        return TopologyMode::PreferSameNode;
    }
    if let Some(zone) = zone
        && ready().all(|e| !e.zone_hints.is_empty())
        && ready().any(|e| has(&e.zone_hints, zone))
    {
        return TopologyMode::PreferSameZone;
    }
    TopologyMode::None
}

/// The usable endpoints of one service port in one IP family.
#[derive(Debug, Default)]
pub(crate) struct Categorized<'a> {
    /// For `Cluster` traffic policies.
    pub cluster: Vec<&'a Endpoint>,
    /// For `Local` traffic policies.
    pub local: Vec<&'a Endpoint>,
}

/// kube-proxy's `CategorizeEndpoints` for one service port and family. Input and output are
/// sorted by (address, port).
pub(crate) fn categorize<'a>(
    eps: &[&'a Endpoint],
    node_name: &str,
    zone: Option<&str>,
) -> Categorized<'a> {
    let mode = topology_mode(eps, node_name, zone);
    let in_topology = |e: &Endpoint| match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => e.node_hints.iter().any(|n| n == node_name),
        TopologyMode::PreferSameZone => zone.is_some_and(|z| e.zone_hints.iter().any(|h| h == z)),
    };
    let mut cluster: Vec<&Endpoint> = eps
        .iter()
        .copied()
        .filter(|e| e.ready && in_topology(e))
        .collect();
    if cluster.is_empty() {
        // No ready endpoint anywhere (topology is only used when one exists for us): fall back
        // to serving terminating ones, ignoring topology.
        cluster = eps
            .iter()
            .copied()
            .filter(|e| e.serving_terminating())
            .collect();
    }

    let mut local: Vec<&Endpoint> = eps.iter().copied().filter(|e| e.local && e.ready).collect();
    if local.is_empty() {
        local = eps
            .iter()
            .copied()
            .filter(|e| e.local && e.serving_terminating())
            .collect();
    }
    Categorized { cluster, local }
}
