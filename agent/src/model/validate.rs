//! Service validation: a Service (as kept, [`ServiceInfo`]) → a checked [`ParsedService`], or
//! the reason it is ignored (not ours to proxy) or rejected (invalid).
//!
//! This module owns the reading of every Service field the model uses, the API-server defaults
//! a manifest read from a file may lack (protocol TCP, session affinity timeout 10800 s), and
//! the sloppy IP parsing kube-proxy inherits from Go (IPv4 octets with leading zeros are
//! decimal; IPv4-mapped IPv6 addresses are IPv4).
//!
//! It also refuses special addresses as Service addresses, wherever they come from
//! ([`special_address`]): unspecified (`0.0.0.0`, `::`), loopback (`127.0.0.0/8`, `::1`),
//! link-local unicast (`169.254.0.0/16`, `fe80::/10`) and multicast (`224.0.0.0/4`,
//! `ff00::/8`). Programmed and bound on `kube-ipvs0`, such an address would capture traffic the
//! node and its pods need (an LB status of `169.254.169.254` would take every pod's
//! metadata-service traffic). This is stricter than the API server, which refuses only
//! link-local multicast in `spec.externalIPs` and checks LB status addresses for syntax only.
//! A special cluster IP rejects the Service; a special external or LB ingress IP is dropped
//! and reported, and the rest of the Service is programmed.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::service_info::ServiceInfo;
use super::{
    DEFAULT_AFFINITY_TIMEOUT, KNOWN_SCHEDULERS, ModelConfig, Protocol, SCHEDULER_ANNOTATION,
    ServiceRef,
};

/// Why a Service is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("metadata.name is empty")]
    MissingName,
    #[error("another Service with the same namespace/name came first")]
    Duplicate,
    #[error("unknown spec.type {0:?}")]
    UnknownType(String),
    #[error("invalid cluster IP {0:?}")]
    InvalidClusterIp(String),
    #[error("cluster IP {0} is {kind} address", kind = special_address(*.0).unwrap_or("a special"))]
    SpecialClusterIp(IpAddr),
    #[error("spec.clusterIPs has two addresses of the same family: {0:?}")]
    DuplicateClusterIpFamily(Vec<String>),
    #[error("invalid external IP {0:?}")]
    InvalidExternalIp(String),
    #[error("invalid load balancer ingress IP {0:?}")]
    InvalidIngressIp(String),
    #[error("invalid loadBalancerSourceRanges entry {0:?}")]
    InvalidSourceRange(String),
    #[error("port {name:?}: port {port} is not in 1-65535")]
    InvalidPort { name: String, port: i32 },
    #[error("port {name:?}: nodePort {node_port} is not in 1-65535")]
    InvalidNodePort { name: String, node_port: i32 },
    #[error("port {name:?}: unknown protocol {protocol:?} (TCP, UDP or SCTP)")]
    UnknownProtocol { name: String, protocol: String },
    #[error("port {port}/{protocol} is listed twice")]
    DuplicatePort { port: u16, protocol: Protocol },
    #[error("port name {0:?} is used twice")]
    DuplicatePortName(String),
    #[error("healthCheckNodePort {0} is not in 1-65535")]
    InvalidHealthCheckNodePort(i32),
    #[error("unknown externalTrafficPolicy {0:?}")]
    UnknownExternalTrafficPolicy(String),
    #[error("unknown internalTrafficPolicy {0:?}")]
    UnknownInternalTrafficPolicy(String),
    #[error("unknown sessionAffinity {0:?}")]
    UnknownSessionAffinity(String),
    #[error("sessionAffinityConfig.clientIP.timeoutSeconds {0} is not in 1-86400")]
    InvalidAffinityTimeout(i32),
    #[error(
        "annotation {SCHEDULER_ANNOTATION}: unknown IPVS scheduler {0:?} (known: {list})",
        list = KNOWN_SCHEDULERS.join(" ")
    )]
    UnknownScheduler(String),
}

/// Whether `name` is an IPVS scheduler we accept.
pub fn is_known_scheduler(name: &str) -> bool {
    KNOWN_SCHEDULERS.contains(&name)
}

/// A service port, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ParsedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// A Service the model proxies, with every field checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ParsedService {
    pub service: ServiceRef,
    /// Used to decide which Service keeps a contested address:port (the oldest).
    pub created: Option<Time>,
    /// At most one per family, in `spec.clusterIPs` order.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ParsedPort>,
    /// De-duplicated, in spec order.
    pub external_ips: Vec<IpAddr>,
    /// VIP-mode ingress IPs (`ipMode` unset or `VIP`), de-duplicated.
    pub lb_ips: Vec<IpAddr>,
    /// Why external or LB ingress IPs were dropped ([`special_address`]), one line each: the
    /// Service is programmed without them and these are reported as rejections.
    pub refused: Vec<String>,
    /// Sorted and de-duplicated.
    pub source_ranges: Vec<IpNet>,
    /// kube-proxy's `ExternalPolicyLocal`: externally accessible and `externalTrafficPolicy:
    /// Local`.
    pub external_local: bool,
    pub internal_local: bool,
    pub persistence_timeout: Option<u32>,
    pub scheduler: String,
    /// Only for `type: LoadBalancer` with an external policy `Local` (kube-proxy's
    /// `NeedsHealthCheck`).
    pub health_check_node_port: Option<u16>,
}

/// The Service's namespace/name as used in reports (namespace "default" when unset).
pub(crate) fn service_ref(svc: &ServiceInfo) -> ServiceRef {
    ServiceRef::new(&*svc.namespace, &*svc.name)
}

/// Parses an IP the way kube-proxy (Go's `ParseIPSloppy`) does: IPv4-mapped IPv6 is IPv4, and
/// IPv4 octets may have leading zeros (read as decimal, not octal).
pub(crate) fn parse_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *o = part.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(IpAddr::V4(Ipv4Addr::from(octets)))
}

/// What kind of special address `ip` is (`"an unspecified"`, `"a loopback"`, `"a link-local"`,
/// `"a multicast"`), or `None` for an address a Service may use (see the module documentation).
pub fn special_address(ip: IpAddr) -> Option<&'static str> {
    let ip = ip.to_canonical();
    if ip.is_unspecified() {
        return Some("an unspecified");
    }
    if ip.is_loopback() {
        return Some("a loopback");
    }
    if ip.is_multicast() {
        return Some("a multicast");
    }
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    link_local.then_some("a link-local")
}

/// Splits `ips` into the usable ones and a report line for each special one.
fn refuse_special(ips: Vec<IpAddr>, field: &str, refused: &mut Vec<String>) -> Vec<IpAddr> {
    ips.into_iter()
        .filter(|ip| match special_address(*ip) {
            Some(kind) => {
                refused.push(format!("{field} {ip} is {kind} address; not programmed"));
                false
            }
            None => true,
        })
        .collect()
}

/// Checks a Service. `Ok(None)`: not ours to proxy (headless, ExternalName, no ClusterIP, or
/// owned by another proxy); these are not errors.
pub(crate) fn parse_service(
    svc: &ServiceInfo,
    cfg: &ModelConfig,
) -> Result<Option<ParsedService>, ServiceError> {
    let service = service_ref(svc);
    if service.name.is_empty() {
        return Err(ServiceError::MissingName);
    }
    match svc.proxy_name.as_deref() {
        Some(owner) if cfg.proxy_name.as_deref() != Some(owner) => return Ok(None),
        // Beside another proxy (kube-proxy handles the unlabelled ones): only ours.
        None if cfg.only_labelled_services => return Ok(None),
        _ => {}
    }
    let spec = svc;
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    match svc_type {
        "ClusterIP" | "NodePort" | "LoadBalancer" => {}
        "ExternalName" => return Ok(None),
        other => return Err(ServiceError::UnknownType(other.to_owned())),
    }

    let Some(cluster_ips) = cluster_ips(spec)? else {
        return Ok(None);
    };

    let mut refused = Vec::new();
    let external_ips = dedup(
        spec.external_ips
            .iter()
            .map(|s| parse_ip(s).ok_or_else(|| ServiceError::InvalidExternalIp(s.to_string())))
            .collect::<Result<Vec<_>, _>>()?,
    );
    let external_ips = refuse_special(external_ips, "external IP", &mut refused);

    let mut lb_ips = Vec::new();
    // Hostname-only ingress (nothing to program) is not kept.
    for ing in &svc.load_balancer_ingress {
        let ip = &*ing.ip;
        // kube-proxy's IsVIPMode: unset or "VIP". "Proxy" means the LB delivers to the node.
        if ing.ip_mode.as_deref().is_some_and(|m| m != "VIP") {
            continue;
        }
        lb_ips.push(parse_ip(ip).ok_or_else(|| ServiceError::InvalidIngressIp(ip.to_owned()))?);
    }
    let lb_ips = refuse_special(dedup(lb_ips), "load balancer ingress IP", &mut refused);

    let source_ranges = spec
        .load_balancer_source_ranges
        .iter()
        .map(|s| {
            // The API mistakenly allows whitespace padding; kube-proxy trims it.
            s.trim()
                .parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| ServiceError::InvalidSourceRange(s.to_string()))
        })
        .collect::<Result<BTreeSet<_>, _>>()?
        .into_iter()
        .collect();

    let ports = ports(spec)?;

    let externally_accessible = matches!(svc_type, "NodePort" | "LoadBalancer")
        || (svc_type == "ClusterIP" && !external_ips.is_empty());
    let etp_local = match spec.external_traffic_policy.as_deref() {
        None | Some("") | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => return Err(ServiceError::UnknownExternalTrafficPolicy(other.to_owned())),
    };
    let external_local = externally_accessible && etp_local;
    let internal_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("") | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => return Err(ServiceError::UnknownInternalTrafficPolicy(other.to_owned())),
    };

    let persistence_timeout = match spec.session_affinity.as_deref() {
        None | Some("") | Some("None") => None,
        Some("ClientIP") => match spec.affinity_timeout {
            None => Some(DEFAULT_AFFINITY_TIMEOUT),
            Some(t) if (1..=86_400).contains(&t) => Some(t.unsigned_abs()),
            Some(t) => return Err(ServiceError::InvalidAffinityTimeout(t)),
        },
        Some(other) => return Err(ServiceError::UnknownSessionAffinity(other.to_owned())),
    };

    let scheduler = match svc.scheduler.as_deref() {
        Some(s) if is_known_scheduler(s) => s.to_owned(),
        Some(s) => return Err(ServiceError::UnknownScheduler(s.to_owned())),
        None => cfg.default_scheduler.clone(),
    };

    // kube-proxy's NeedsHealthCheck; a missing port is only logged there, so it is not an error.
    let health_check_node_port = if svc_type == "LoadBalancer" && external_local {
        match spec.health_check_node_port {
            None | Some(0) => None,
            Some(p) => Some(
                u16::try_from(p)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or(ServiceError::InvalidHealthCheckNodePort(p))?,
            ),
        }
    } else {
        None
    };

    Ok(Some(ParsedService {
        service,
        created: svc.created.clone(),
        cluster_ips,
        ports,
        external_ips,
        lb_ips,
        refused,
        source_ranges,
        external_local,
        internal_local,
        persistence_timeout,
        scheduler,
        health_check_node_port,
    }))
}

/// `spec.clusterIPs` (falling back to `spec.clusterIP`). `Ok(None)`: headless or unset.
fn cluster_ips(spec: &ServiceInfo) -> Result<Option<Vec<IpAddr>>, ServiceError> {
    let raw: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(list) if !list.is_empty() => list.iter().map(|s| &**s).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    // kube-proxy's ShouldSkipService: clusterIP "" or "None" is not proxied.
    match raw.first() {
        None | Some(&"") | Some(&"None") => return Ok(None),
        Some(_) => {}
    }
    let ips = raw
        .iter()
        .map(|s| parse_ip(s).ok_or_else(|| ServiceError::InvalidClusterIp((*s).to_owned())))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(ip) = ips.iter().find(|ip| special_address(**ip).is_some()) {
        return Err(ServiceError::SpecialClusterIp(*ip));
    }
    let v4 = ips.iter().filter(|ip| ip.is_ipv4()).count();
    if v4 > 1 || ips.len() - v4 > 1 {
        return Err(ServiceError::DuplicateClusterIpFamily(
            raw.iter().map(|s| (*s).to_owned()).collect(),
        ));
    }
    Ok(Some(ips))
}

fn ports(spec: &ServiceInfo) -> Result<Vec<ParsedPort>, ServiceError> {
    let mut out = Vec::new();
    let mut names = HashSet::new();
    let mut numbers = HashSet::new();
    for p in &spec.ports {
        let name = p.name.as_deref().unwrap_or_default().to_owned();
        let protocol = match p.protocol.as_deref() {
            None | Some("") => Protocol::Tcp,
            Some(s) => Protocol::from_k8s(s).ok_or_else(|| ServiceError::UnknownProtocol {
                name: name.clone(),
                protocol: s.to_owned(),
            })?,
        };
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| ServiceError::InvalidPort {
                name: name.clone(),
                port: p.port,
            })?;
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(np) => Some(
                u16::try_from(np).map_err(|_| ServiceError::InvalidNodePort {
                    name: name.clone(),
                    node_port: np,
                })?,
            ),
        };
        if !numbers.insert((port, protocol)) {
            return Err(ServiceError::DuplicatePort { port, protocol });
        }
        // kube-proxy keys service ports by name (and protocol); the API requires unique names.
        if !names.insert(name.clone()) {
            return Err(ServiceError::DuplicatePortName(name));
        }
        out.push(ParsedPort {
            name,
            protocol,
            port,
            node_port,
        });
    }
    Ok(out)
}

fn dedup(ips: Vec<IpAddr>) -> Vec<IpAddr> {
    let mut seen = HashSet::with_capacity(ips.len());
    ips.into_iter().filter(|ip| seen.insert(*ip)).collect()
}
