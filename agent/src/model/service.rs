//! Service ports → virtual services.
//!
//! This module owns the node-address selection for NodePorts ([`NodeContext`]), the expansion
//! of each checked service port into one virtual service per address (ClusterIPs, NodePort on
//! each selected node address, VIP-mode LB ingress IPs, external IPs), the choice of
//! destinations by traffic policy, the masquerade flags, and the resolution of two Services
//! claiming the same address:port/protocol.
//!
//! Traffic policies follow kube-proxy's iptables/nftables modes where its IPVS mode differs:
//! a `Local` policy with no usable local endpoint gives an empty destination list (traffic is
//! refused), whereas IPVS mode falls back to the cluster endpoints (kubernetes#97081) and so
//! forwards external traffic whose replies cannot come back.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::endpoints::{Endpoint, ServiceEndpoints, categorize};
use super::validate::{ParsedPort, ParsedService};
use super::{
    DUMMY_INTERFACE, Destination, ModelConfig, NodeInfo, NodePortAddresses, Rejection,
    VirtualService, VirtualServiceKind,
};

/// Facts about this node, computed once per [`super::build`].
pub(crate) struct NodeContext<'a> {
    node_name: &'a str,
    zone: Option<&'a str>,
    /// Addresses not on the dummy interface, without loopback and IPv6 link-local (kube-proxy's
    /// `GetAllLocalAddressesExcept(kube-ipvs0)`): an external/LB IP among them is not bound.
    node_addresses: HashSet<IpAddr>,
    /// Where NodePorts are opened, sorted.
    node_port_ips: Vec<IpAddr>,
    has_v4_cluster_cidr: bool,
    has_v6_cluster_cidr: bool,
}

fn is_ipv6_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
}

impl<'a> NodeContext<'a> {
    pub fn new(node: &'a NodeInfo, cfg: &ModelConfig) -> Self {
        let node_addresses: HashSet<IpAddr> = node
            .addresses
            .iter()
            .filter(|a| a.interface != DUMMY_INTERFACE)
            .map(|a| a.address.to_canonical())
            .filter(|ip| !ip.is_loopback() && !is_ipv6_link_local(*ip))
            .collect();
        let mut node_port_ips: Vec<IpAddr> = match &cfg.node_port_addresses {
            NodePortAddresses::AllLocal => node_addresses.iter().copied().collect(),
            NodePortAddresses::Primary => node
                .internal_ips
                .iter()
                .map(|ip| ip.to_canonical())
                .filter(|ip| node_addresses.contains(ip))
                .collect(),
            NodePortAddresses::Cidrs(cidrs) => {
                // kube-proxy's NewNodePortAddresses: per family; a family without CIDRs
                // matches everything. Loopback is excluded as IPVS mode excludes it.
                let v4: Vec<_> = cidrs.iter().filter(|c| c.addr().is_ipv4()).collect();
                let v6: Vec<_> = cidrs.iter().filter(|c| c.addr().is_ipv6()).collect();
                node.addresses
                    .iter()
                    .filter(|a| a.interface != DUMMY_INTERFACE)
                    .map(|a| a.address.to_canonical())
                    .filter(|ip| !ip.is_loopback())
                    .filter(|ip| {
                        let list = if ip.is_ipv4() { &v4 } else { &v6 };
                        // No CIDR of this family, or its zero CIDR: every node address.
                        if list.is_empty() || list.iter().any(|c| c.prefix_len() == 0) {
                            node_addresses.contains(ip)
                        } else {
                            list.iter().any(|c| c.contains(ip))
                        }
                    })
                    .collect()
            }
        };
        node_port_ips.sort();
        node_port_ips.dedup();
        Self {
            node_name: &node.name,
            zone: node.effective_zone(),
            node_addresses,
            node_port_ips,
            has_v4_cluster_cidr: cfg.cluster_cidrs.iter().any(|c| c.addr().is_ipv4()),
            has_v6_cluster_cidr: cfg.cluster_cidrs.iter().any(|c| c.addr().is_ipv6()),
        }
    }

    /// Whether `ip` is configured on a node interface other than the dummy one.
    pub fn is_node_address(&self, ip: IpAddr) -> bool {
        self.node_addresses.contains(&ip)
    }

    fn has_cluster_cidr_for(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() {
            self.has_v4_cluster_cidr
        } else {
            self.has_v6_cluster_cidr
        }
    }
}

/// A virtual service and the age of the Service that wants it.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub created: Option<Time>,
    /// Shared: the model's memo and every build's output hold the same virtual service.
    pub vs: Arc<VirtualService>,
}

fn destinations(eps: &[&Endpoint]) -> Vec<Destination> {
    // Endpoints come sorted by (address, port) and unique.
    eps.iter()
        .map(|e| Destination {
            address: e.address,
            port: e.port,
            weight: 1,
        })
        .collect()
}

/// Appends the virtual services of one Service to `out`.
pub(crate) fn virtual_services(
    svc: &ParsedService,
    eps: Option<&ServiceEndpoints>,
    ctx: &NodeContext<'_>,
    cfg: &ModelConfig,
    out: &mut Vec<Candidate>,
) {
    for port in &svc.ports {
        let all = eps
            .map(|e| e.port(&port.name, port.protocol))
            .unwrap_or_default();
        for &cluster_ip in &svc.cluster_ips {
            port_family(svc, port, cluster_ip, &all, ctx, cfg, out);
        }
    }
}

/// The virtual services of one service port in the family of `cluster_ip`.
fn port_family(
    svc: &ParsedService,
    port: &ParsedPort,
    cluster_ip: IpAddr,
    all: &[&Endpoint],
    ctx: &NodeContext<'_>,
    cfg: &ModelConfig,
    out: &mut Vec<Candidate>,
) {
    let v4 = cluster_ip.is_ipv4();
    let family: Vec<&Endpoint> = all
        .iter()
        .copied()
        .filter(|e| e.address.is_ipv4() == v4)
        .collect();
    let sets = categorize(&family, ctx.node_name, ctx.zone);
    let internal = destinations(if svc.internal_local {
        &sets.local
    } else {
        &sets.cluster
    });
    let external = destinations(if svc.external_local {
        &sets.local
    } else {
        &sets.cluster
    });
    let same_family = |ip: &&IpAddr| ip.is_ipv4() == v4;

    let make = |kind: VirtualServiceKind, address: IpAddr, vport: u16| {
        let external_kind = kind.is_external();
        let snat = cfg.masquerade_all || (external_kind && !svc.external_local);
        VirtualService {
            service: svc.service.clone(),
            port_name: port.name.clone(),
            kind,
            protocol: port.protocol,
            address,
            port: vport,
            scheduler: svc.scheduler.clone(),
            persistence_timeout: svc.persistence_timeout,
            snat,
            masq_off_cluster: !external_kind && !snat && ctx.has_cluster_cidr_for(address),
            source_ranges: if kind == VirtualServiceKind::LoadBalancer {
                svc.source_ranges
                    .iter()
                    .filter(|r| r.addr().is_ipv4() == v4)
                    .copied()
                    .collect()
            } else {
                Vec::new()
            },
            local_only: if external_kind {
                svc.external_local
            } else {
                svc.internal_local
            },
            destinations: if external_kind {
                external.clone()
            } else {
                internal.clone()
            },
        }
    };
    let mut push = |vs: VirtualService| {
        out.push(Candidate {
            created: svc.created.clone(),
            vs: Arc::new(vs),
        })
    };

    push(make(VirtualServiceKind::ClusterIp, cluster_ip, port.port));
    for &ip in svc.external_ips.iter().filter(same_family) {
        push(make(VirtualServiceKind::ExternalIp, ip, port.port));
    }
    for &ip in svc.lb_ips.iter().filter(same_family) {
        push(make(VirtualServiceKind::LoadBalancer, ip, port.port));
    }
    if let Some(node_port) = port.node_port {
        for &ip in ctx.node_port_ips.iter().filter(same_family) {
            push(make(VirtualServiceKind::NodePort, ip, node_port));
        }
    }
}

/// Which of one Service's virtual services keeps a shared key (the same address given twice,
/// e.g. as an external IP and an LB ingress IP): the LB one, so its source ranges apply.
fn kind_rank(kind: VirtualServiceKind) -> u8 {
    match kind {
        VirtualServiceKind::ClusterIp => 0,
        VirtualServiceKind::LoadBalancer => 1,
        VirtualServiceKind::ExternalIp => 2,
        VirtualServiceKind::NodePort => 3,
    }
}

/// The order in which Services' candidates for one (address, protocol, port) win: the oldest
/// Service (by `creationTimestamp`; objects without one count as newest; then by
/// namespace/name) keeps it and the others are reported: this stops a new Service from taking
/// over another's address with `externalIPs` (CVE-2020-8554). Within one Service, by kind.
pub(crate) fn candidate_order(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    (match (&a.created, &b.created) {
        (Some(x), Some(y)) => x.cmp(y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    })
    .then_with(|| a.vs.service.cmp(&b.vs.service))
    .then_with(|| kind_rank(a.vs.kind).cmp(&kind_rank(b.vs.kind)))
}

/// The report for a Service that lost an address:port to another.
pub(crate) fn conflict_rejection(loser: &VirtualService, winner: &VirtualService) -> Rejection {
    Rejection {
        object: format!("Service {}", loser.service),
        reason: format!(
            "{} {} ({}) is already served for Service {}; not programmed",
            loser.protocol,
            loser.socket_addr(),
            loser.kind,
            winner.service
        ),
    }
}
