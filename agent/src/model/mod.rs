//! The service model: what this node should program, computed from Kubernetes objects.
//!
//! This module owns the public types of the model and its entry points: [`build`] (lists of
//! objects), [`build_objects`] (a source's maps, [`Objects`]) and [`ModelCache`] (the same,
//! recomputing only what changed since its previous build). It is pure code: no I/O, no clocks, no randomness, and its output order is deterministic, so the
//! same objects always give the same [`DesiredState`] (the reconcilers diff it against the
//! kernel).
//!
//! The rules are kube-proxy's (v1.36). Where its modes disagree, the model follows the
//! iptables/nftables modes, upstream's reference; the differences from IPVS mode are listed on
//! the items they affect. The work is split as follows:
//! - `service_info`: a Service reduced to what the model reads ([`ServiceInfo`]), the form the
//!   sources keep;
//! - `validate`: a Service → a checked, typed service (or a reason to reject or ignore
//!   it);
//! - `endpoint_slice`: an EndpointSlice reduced to what the model reads ([`EndpointSliceInfo`]),
//!   the form the sources keep;
//! - `endpoints`: EndpointSlices → de-duplicated endpoints per service port, and kube-proxy's
//!   endpoint categorisation (ready / serving-terminating fallback, node-local, topology hints);
//! - `service`: a checked service and its endpoints → virtual services, and the resolution of
//!   addresses claimed twice;
//! - `objects`: the input maps ([`Objects`]) and how two versions of one differ;
//! - `cache`: [`ModelCache`], the memo that makes a change cost in proportion to the change.

mod cache;
mod endpoint_slice;
mod endpoints;
mod objects;
mod service;
mod service_info;
mod service_port;
mod validate;

#[cfg(test)]
mod tests;

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::Serialize;

pub use cache::{Changed, ModelCache};
pub use endpoint_slice::{
    EndpointSliceInfo, LAST_CHANGE_TRIGGER_TIME_ANNOTATION, SliceAddress, SliceEndpoint,
    SliceHints, SlicePort,
};
pub use objects::{Keyed, ObjectChange, ObjectKey, Objects, object_key};
pub use service_info::{LoadBalancerIngressInfo, ServiceInfo, ServicePortInfo};
pub use service_port::ServicePort;
pub use validate::{ServiceError, is_known_scheduler, special_address};

/// Annotation on a Service choosing its IPVS scheduler (one of [`KNOWN_SCHEDULERS`]); without
/// it the service gets [`ModelConfig::default_scheduler`]. An unknown value rejects the Service.
pub const SCHEDULER_ANNOTATION: &str = "kube-ipvs-bpf.io/scheduler";

/// Label naming the proxy that owns a Service (KEP-2447). kube-proxy ignores every Service that
/// carries it; we ignore those whose value differs from [`ModelConfig::proxy_name`].
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// Label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Node label holding the node's zone, used for topology hints.
pub const TOPOLOGY_ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The dummy interface holding service addresses (as in kube-proxy's IPVS mode).
pub const DUMMY_INTERFACE: &str = "kube-ipvs0";

/// Default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 h), as the API server defaults it.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// IPVS schedulers accepted in [`SCHEDULER_ANNOTATION`] and as the default scheduler.
pub const KNOWN_SCHEDULERS: &[&str] = &[
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos",
];

/// A Service's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl ServiceRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// L4 protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the Kubernetes spelling (`TCP`, `UDP`, `SCTP`; case-sensitive, as the API is).
    pub fn from_k8s(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which of a Service's addresses a virtual service serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum VirtualServiceKind {
    /// `spec.clusterIPs` (internal traffic policy applies).
    #[serde(rename = "ClusterIP")]
    ClusterIp,
    /// `spec.ports[].nodePort` on a selected node address (external traffic policy applies).
    NodePort,
    /// `status.loadBalancer.ingress[].ip` in VIP mode (external traffic policy and
    /// `loadBalancerSourceRanges` apply).
    LoadBalancer,
    /// `spec.externalIPs` (external traffic policy applies).
    #[serde(rename = "ExternalIP")]
    ExternalIp,
}

impl VirtualServiceKind {
    /// The name as Kubernetes spells it (`ClusterIP`, `NodePort`, `LoadBalancer`,
    /// `ExternalIP`), for output and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
            Self::ExternalIp => "ExternalIP",
        }
    }

    /// Whether traffic to this address is "external" in Kubernetes' sense.
    pub fn is_external(self) -> bool {
        !matches!(self, Self::ClusterIp)
    }
}

/// One real server of a virtual service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Destination {
    pub address: IpAddr,
    pub port: u16,
    /// Always 1, as kube-proxy's IPVS mode programs it (0 is the reconciler's graceful drain).
    pub weight: u32,
}

/// One IPVS virtual service and its destinations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VirtualService {
    pub service: ServiceRef,
    /// `spec.ports[].name` ("" for an unnamed port).
    pub port_name: String,
    pub kind: VirtualServiceKind,
    pub protocol: Protocol,
    pub address: IpAddr,
    pub port: u16,
    pub scheduler: String,
    /// `sessionAffinity: ClientIP` → IPVS persistence with this timeout in seconds.
    pub persistence_timeout: Option<u32>,
    /// Every connection is masqueraded: an external address with `externalTrafficPolicy:
    /// Cluster`, or any address with [`ModelConfig::masquerade_all`].
    pub snat: bool,
    /// ClusterIP: masquerade clients outside the cluster CIDRs. Set when a cluster CIDR of this
    /// address's family is configured and `snat` is not already set (kube-proxy's
    /// `! -s <clusterCIDR> -j KUBE-MARK-MASQ` on KUBE-CLUSTER-IP).
    pub masq_off_cluster: bool,
    /// `loadBalancerSourceRanges` of this address's family. Non-empty only on LoadBalancer
    /// addresses: kube-proxy applies them to LB ingress IPs only (KUBE-LOAD-BALANCER-FW).
    pub source_ranges: Vec<IpNet>,
    /// The destinations are this node's endpoints only: `internalTrafficPolicy: Local` on a
    /// ClusterIP, `externalTrafficPolicy: Local` on an external address.
    pub local_only: bool,
    /// Sorted by (address, port); may be empty (IPVS then refuses new connections).
    pub destinations: Vec<Destination>,
}

impl fmt::Display for VirtualServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl VirtualService {
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

impl fmt::Display for VirtualService {
    /// `TCP 10.96.0.10:53 rr persistent 10800 snat (ClusterIP kube-system/kube-dns:dns-tcp)
    /// -> 10.244.1.5:53 10.244.2.7:53`: ipvsadm-like, for logs and tests.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}",
            self.protocol,
            self.socket_addr(),
            self.scheduler
        )?;
        if let Some(t) = self.persistence_timeout {
            write!(f, " persistent {t}")?;
        }
        if self.snat {
            f.write_str(" snat")?;
        }
        if self.masq_off_cluster {
            f.write_str(" masq-off-cluster")?;
        }
        if !self.source_ranges.is_empty() {
            f.write_str(" source-ranges")?;
            for (i, r) in self.source_ranges.iter().enumerate() {
                write!(f, "{}{r}", if i == 0 { " " } else { "," })?;
            }
        }
        write!(f, " ({} {}:{}) ->", self.kind, self.service, self.port_name)?;
        if self.destinations.is_empty() {
            f.write_str(" none")?;
        }
        for d in &self.destinations {
            write!(f, " {}", SocketAddr::new(d.address, d.port))?;
            if d.weight != 1 {
                write!(f, "@{}", d.weight)?;
            }
        }
        Ok(())
    }
}

/// A Service whose `externalTrafficPolicy: Local` load balancer needs a health-check node port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthCheckNodePort {
    pub service: ServiceRef,
    pub port: u16,
    /// Distinct ready endpoint IPs on this node (kube-proxy's `LocalReadyEndpoints`): the health
    /// check answers 200 when this is non-zero.
    pub local_endpoints: usize,
}

/// An object (or part of one) that was skipped because it is invalid.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Rejection {
    /// `Service ns/name` or `EndpointSlice ns/name`.
    pub object: String,
    pub reason: String,
}

/// Everything this node should program.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    /// By (address, protocol, port). Shared with the model's memo ([`ModelCache`]): cloning it
    /// is O(1), and the next build changes it in place of the keys that changed.
    pub virtual_services: VirtualServices,
    /// Addresses to assign to [`DUMMY_INTERFACE`]: every ClusterIP, and every external IP and
    /// LB ingress IP that is not already a node address (as kube-proxy's IPVS mode binds them).
    pub bound_addresses: Arc<BTreeSet<IpAddr>>,
    /// Service addresses on which traffic to any other port is dropped (kubernetes#72236). This
    /// is kube-proxy's KUBE-IPVS-IPS set, i.e. the same set as `bound_addresses`: an external
    /// IP that is also a node address must keep serving the node's own ports.
    pub service_addresses: Arc<BTreeSet<IpAddr>>,
    /// Node addresses carrying at least one NodePort.
    pub node_port_addresses: Arc<BTreeSet<IpAddr>>,
    /// Sorted by service.
    pub health_check_node_ports: Vec<HealthCheckNodePort>,
    /// Sorted by (object, reason).
    pub rejected: Vec<Rejection>,
    /// EndpointSlices whose Service does not exist (ignored, as kube-proxy does; reported for
    /// logs), sorted.
    pub ignored_slices: Vec<String>,
}

impl DesiredState {
    /// The virtual service with this key (address, protocol, port), if any.
    pub fn find(&self, key: &ServicePort) -> Option<&Arc<VirtualService>> {
        self.virtual_services.get(key)
    }
}

/// The virtual services of a [`DesiredState`], one per key (address, protocol, port), as a
/// persistent map: a clone shares everything, a change copies the path to it. Serialized as a
/// list in key order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VirtualServices {
    all: imbl::OrdMap<ServicePort, Arc<VirtualService>>,
    /// The keys of those with [`VirtualService::local_only`] (metrics read them every sync).
    local_only: imbl::OrdSet<ServicePort>,
}

impl VirtualServices {
    /// In key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &Arc<VirtualService>> {
        self.all.values()
    }

    /// Those whose destinations are this node's endpoints only, in key order: O(them).
    pub fn local_only(&self) -> impl Iterator<Item = &Arc<VirtualService>> {
        self.local_only.iter().filter_map(|k| self.all.get(k))
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    pub fn get(&self, key: &ServicePort) -> Option<&Arc<VirtualService>> {
        self.all.get(key)
    }

    /// Makes `vs` the virtual service of its key (none: removes the key's).
    fn set(&mut self, key: ServicePort, vs: Option<Arc<VirtualService>>) {
        if vs.as_ref().is_some_and(|v| v.local_only) {
            self.local_only.insert(key);
        } else {
            self.local_only.remove(&key);
        }
        match vs {
            Some(vs) => self.all.insert(key, vs),
            None => self.all.remove(&key),
        };
    }
}

/// A later virtual service of a key replaces an earlier one.
impl FromIterator<Arc<VirtualService>> for VirtualServices {
    fn from_iter<I: IntoIterator<Item = Arc<VirtualService>>>(iter: I) -> Self {
        let mut out = VirtualServices::default();
        for v in iter {
            out.set(ServicePort::of(&v), Some(v));
        }
        out
    }
}

impl<'a> IntoIterator for &'a VirtualServices {
    type Item = &'a Arc<VirtualService>;
    type IntoIter = imbl::ordmap::Values<
        'a,
        ServicePort,
        Arc<VirtualService>,
        imbl::shared_ptr::DefaultSharedPtr,
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.all.values()
    }
}

impl Serialize for VirtualServices {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// An address configured on this node and the interface it is on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LocalAddress {
    pub address: IpAddr,
    pub interface: String,
}

/// What the model needs to know about this node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    /// The Node's name; endpoints whose `nodeName` equals it are local. Empty: nothing is local.
    pub name: String,
    /// Every address on every interface, including loopback and [`DUMMY_INTERFACE`].
    pub addresses: Vec<LocalAddress>,
    /// The Node object's `InternalIP` addresses (for [`NodePortAddresses::Primary`]).
    pub internal_ips: Vec<IpAddr>,
    /// The node's zone; when `None`, the [`TOPOLOGY_ZONE_LABEL`] label is used.
    pub zone: Option<String>,
    pub labels: BTreeMap<String, String>,
}

impl NodeInfo {
    /// The zone used for topology hints.
    pub fn effective_zone(&self) -> Option<&str> {
        self.zone
            .as_deref()
            .or_else(|| self.labels.get(TOPOLOGY_ZONE_LABEL).map(String::as_str))
            .filter(|z| !z.is_empty())
    }
}

/// Which node addresses carry NodePorts (kube-proxy's `--nodeport-addresses`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub enum NodePortAddresses {
    /// Every local address except loopback, IPv6 link-local and those on [`DUMMY_INTERFACE`]
    /// (kube-proxy IPVS mode's default).
    #[default]
    AllLocal,
    /// The Node's InternalIPs that are configured on this node (`--nodeport-addresses
    /// primary`, nftables mode's default).
    Primary,
    /// Local addresses inside these CIDRs (loopback and [`DUMMY_INTERFACE`] excluded). As in
    /// kube-proxy, a family with no CIDR in the list, or with its zero CIDR (`0.0.0.0/0`,
    /// `::/0`), behaves as [`Self::AllLocal`].
    Cidrs(Vec<IpNet>),
}

/// Configuration of the model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ModelConfig {
    /// Pod CIDRs (kube-proxy's `--cluster-cidr`); ClusterIP clients outside them are
    /// masqueraded. Empty: no off-cluster masquerading.
    pub cluster_cidrs: Vec<IpNet>,
    pub node_port_addresses: NodePortAddresses,
    /// Scheduler of services without [`SCHEDULER_ANNOTATION`]; default `rr`.
    pub default_scheduler: String,
    /// Masquerade every service connection.
    pub masquerade_all: bool,
    /// This proxy's `service.kubernetes.io/service-proxy-name`: Services labelled with another
    /// name are ignored; unlabelled Services are always handled.
    pub proxy_name: Option<String>,
    /// Handle only Services labelled with [`Self::proxy_name`] (running beside kube-proxy's
    /// iptables or nftables mode, which handles the unlabelled ones).
    pub only_labelled_services: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            cluster_cidrs: Vec::new(),
            node_port_addresses: NodePortAddresses::AllLocal,
            default_scheduler: "rr".to_owned(),
            masquerade_all: false,
            proxy_name: None,
            only_labelled_services: false,
        }
    }
}

/// An invalid [`ModelConfig`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown IPVS scheduler {0:?} (known: {list})", list = KNOWN_SCHEDULERS.join(" "))]
    UnknownScheduler(String),
}

impl ModelConfig {
    /// Checks the configuration; [`build`] uses it as given.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !is_known_scheduler(&self.default_scheduler) {
            return Err(ConfigError::UnknownScheduler(
                self.default_scheduler.clone(),
            ));
        }
        Ok(())
    }
}

/// The Service an EndpointSlice belongs to: its namespace (default "default") and its
/// [`SERVICE_NAME_LABEL`]; `None` without that label. [`build`] ignores slices whose Service it
/// does not proxy; a caller that wants to log them can compare this with its Services.
pub fn endpoint_slice_service(slice: &EndpointSliceInfo) -> Option<ServiceRef> {
    slice
        .service()
        .map(|(namespace, name)| ServiceRef::new(namespace, name))
}

/// Computes the desired state of this node from all Services and EndpointSlices.
///
/// Invalid objects are listed in [`DesiredState::rejected`] and skipped; they never affect the
/// others. Runs in O(n log n) of the number of objects, ports and endpoints. This is a fresh
/// [`ModelCache`]'s first build; the agent keeps a cache so that a change recomputes only the
/// Services it touches.
pub fn build<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
    services: &[S],
    slices: &[E],
    node: &NodeInfo,
    cfg: &ModelConfig,
) -> DesiredState {
    ModelCache::default().build(services, slices, node, cfg).0
}

/// [`build`] on a source's maps (a [`crate::source::Snapshot`]'s).
pub fn build_objects(
    services: &Objects<ServiceInfo>,
    slices: &Objects<EndpointSliceInfo>,
    node: &NodeInfo,
    cfg: &ModelConfig,
) -> DesiredState {
    ModelCache::default()
        .build_objects(services, slices, node, cfg)
        .0
}
