//! Tests of the service model: one named case per kube-proxy rule (table-driven), the golden
//! node state captured from a real kube-proxy v1.36.2 in IPVS mode, and scale checks.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};

use super::*;

// ---------------------------------------------------------------------------------------------
// Builders

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test CIDR")
}

fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|s| ip(s)).collect()
}

/// A Service in `ns` with the given metadata additions, spec and status.
fn svc_full(ns: &str, name: &str, meta: Value, spec: Value, status: Value) -> Value {
    let mut m = json!({"namespace": ns, "name": name});
    if let (Some(m), Some(extra)) = (m.as_object_mut(), meta.as_object()) {
        m.extend(extra.clone());
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": m, "spec": spec, "status": status})
}

fn svc(ns: &str, name: &str, spec: Value) -> Value {
    svc_full(ns, name, json!({}), spec, json!({}))
}

/// The usual single-port service: `http` 80/TCP → 8080.
fn web(cluster_ip: &str) -> Value {
    svc(
        "ns",
        "web",
        json!({"clusterIPs": [cluster_ip], "ports": [{"name": "http", "port": 80}]}),
    )
}

fn slice(ns: &str, name: &str, service: &str, family: &str, ports: Value, eps: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": family, "ports": ports, "endpoints": eps,
    })
}

/// `ns/<name>` slice of `service` with one port `http` 8080/TCP.
fn http_slice(name: &str, service: &str, eps: Value) -> Value {
    slice(
        "ns",
        name,
        service,
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        eps,
    )
}

fn ep(addr: &str, node: &str) -> Value {
    json!({"addresses": [addr], "nodeName": node})
}

/// An endpoint with explicit conditions (`null` = unset).
fn ep_cond(addr: &str, node: &str, ready: Value, serving: Value, terminating: Value) -> Value {
    json!({"addresses": [addr], "nodeName": node,
           "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
}

fn ep_hints(addr: &str, node: &str, zones: &[&str], nodes: &[&str]) -> Value {
    let z: Vec<Value> = zones.iter().map(|z| json!({"name": z})).collect();
    let n: Vec<Value> = nodes.iter().map(|n| json!({"name": n})).collect();
    let mut hints = serde_json::Map::new();
    if !z.is_empty() {
        hints.insert("forZones".into(), Value::Array(z));
    }
    if !n.is_empty() {
        hints.insert("forNodes".into(), Value::Array(n));
    }
    json!({"addresses": [addr], "nodeName": node, "hints": hints})
}

/// Endpoints A (this node) and B (another node): the common case.
fn two_eps() -> Value {
    json!([ep("10.244.1.2", "node-a"), ep("10.244.2.2", "node-b")])
}

fn addr(address: &str, interface: &str) -> LocalAddress {
    LocalAddress {
        address: ip(address),
        interface: interface.to_owned(),
    }
}

/// node-a: loopback, two IPv4 and one global IPv6 address, an IPv6 link-local one, and a
/// service address on the dummy interface.
fn test_node() -> NodeInfo {
    NodeInfo {
        name: "node-a".into(),
        addresses: vec![
            addr("127.0.0.1", "lo"),
            addr("::1", "lo"),
            addr("192.168.1.10", "eth0"),
            addr("fe80::1", "eth0"),
            addr("2001:db8::10", "eth0"),
            addr("10.0.0.5", "eth1"),
            addr("10.96.0.99", DUMMY_INTERFACE),
        ],
        internal_ips: vec![ip("192.168.1.10"), ip("2001:db8::10"), ip("10.9.9.9")],
        zone: None,
        labels: BTreeMap::new(),
    }
}

fn to_services(v: &[Value]) -> Vec<Service> {
    v.iter()
        .map(|s| serde_json::from_value(s.clone()).expect("test Service"))
        .collect()
}

fn to_slices(v: &[Value]) -> Vec<EndpointSlice> {
    v.iter()
        .map(|s| serde_json::from_value(s.clone()).expect("test EndpointSlice"))
        .collect()
}

fn lines(state: &DesiredState) -> Vec<String> {
    state
        .virtual_services
        .iter()
        .map(ToString::to_string)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The rule table

struct Case {
    name: &'static str,
    services: Vec<Value>,
    slices: Vec<Value>,
    node: NodeInfo,
    cfg: ModelConfig,
    /// Every virtual service, in output order, as `VirtualService`'s `Display` writes it.
    want: Vec<&'static str>,
    /// Every rejection: (object, a substring of the reason).
    rejected: Vec<(&'static str, &'static str)>,
    /// More checks on the state.
    extra: Option<fn(&DesiredState)>,
}

fn case(name: &'static str) -> Case {
    Case {
        name,
        services: vec![],
        slices: vec![],
        node: test_node(),
        cfg: ModelConfig::default(),
        want: vec![],
        rejected: vec![],
        extra: None,
    }
}

/// A second, valid service present in the rejection cases: it must come out untouched.
fn bystander() -> Value {
    svc(
        "ns",
        "ok",
        json!({"clusterIP": "10.96.9.9", "ports": [{"name": "http", "port": 80}]}),
    )
}
const BYSTANDER: &str = "TCP 10.96.9.9:80 rr (ClusterIP ns/ok:http) -> none";

fn cases() -> Vec<Case> {
    vec![
        // --- Addresses ----------------------------------------------------------------------
        Case {
            services: vec![web("10.96.0.10")],
            slices: vec![http_slice("web-1", "web", two_eps())],
            want: vec![
                "TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080 10.244.2.2:8080",
            ],
            extra: Some(|s| {
                assert_eq!(*s.bound_addresses, ips(&["10.96.0.10"]));
                assert_eq!(*s.service_addresses, ips(&["10.96.0.10"]));
                assert!(s.node_port_addresses.is_empty());
            }),
            ..case("cluster_ip_from_cluster_ips")
        },
        Case {
            services: vec![svc(
                "ns",
                "web",
                json!({"clusterIPs": ["10.96.0.10", "fd00::10"], "ports": [{"name": "http", "port": 80}]}),
            )],
            slices: vec![
                http_slice("web-v4", "web", two_eps()),
                slice(
                    "ns",
                    "web-v6",
                    "web",
                    "IPv6",
                    json!([{"name": "http", "port": 8080}]),
                    json!([ep("fd00:244::2", "node-a")]),
                ),
            ],
            want: vec![
                "TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080 10.244.2.2:8080",
                "TCP [fd00::10]:80 rr (ClusterIP ns/web:http) -> [fd00:244::2]:8080",
            ],
            extra: Some(|s| assert_eq!(*s.bound_addresses, ips(&["10.96.0.10", "fd00::10"]))),
            ..case("cluster_ips_dual_stack")
        },
        Case {
            services: vec![svc(
                "ns",
                "web",
                json!({"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}),
            )],
            slices: vec![http_slice("web-1", "web", two_eps())],
            want: vec![
                "TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080 10.244.2.2:8080",
            ],
            ..case("cluster_ip_fallback_without_cluster_ips")
        },
        Case {
            services: vec![svc(
                "ns",
                "web",
                json!({"clusterIP": "010.096.000.010", "ports": [{"name": "http", "port": 80}]}),
            )],
            want: vec!["TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> none"],
            ..case("legacy_ip_with_leading_zeros_is_decimal")
        },
        Case {
            services: vec![svc(
                "ns",
                "web",
                json!({"type": "NodePort", "clusterIP": "10.96.0.11",
                       "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
            )],
            slices: vec![http_slice("web-1", "web", two_eps())],
            want: vec![
                "TCP 10.0.0.5:30080 rr snat (NodePort ns/web:http) -> 10.244.1.2:8080 10.244.2.2:8080",
                "TCP 10.96.0.11:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080 10.244.2.2:8080",
                "TCP 192.168.1.10:30080 rr snat (NodePort ns/web:http) -> 10.244.1.2:8080 10.244.2.2:8080",
            ],
            extra: Some(|s| {
                // Not loopback, not kube-ipvs0's 10.96.0.99, not the IPv6 family.
                assert_eq!(*s.node_port_addresses, ips(&["10.0.0.5", "192.168.1.10"]));
                assert_eq!(*s.bound_addresses, ips(&["10.96.0.11"]));
            }),
            ..case("node_port_on_all_local_addresses")
        },
        Case {
            services: vec![svc(
                "ns",
                "web",
                json!({"type": "NodePort", "clusterIPs": ["10.96.0.11", "fd00::11"],
                       "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
            )],
            want: vec![
                "TCP 10.0.0.5:30080 rr snat (NodePort ns/web:http) -> none",
                "TCP 10.96.0.11:80 rr (ClusterIP ns/web:http) -> none",
                "TCP 192.168.1.10:30080 rr snat (NodePort ns/web:http) -> none",
                // Not fe80::1 (link-local) nor ::1.
                "TCP [2001:db8::10]:30080 rr snat (NodePort ns/web:http) -> none",
                "TCP [fd00::11]:80 rr (ClusterIP ns/web:http) -> none",
            ],
            ..case("node_port_family_follows_service_families")
        },
        Case {
            services: vec![svc(
                "ns",
                "web",
                json!({"type": "NodePort", "clusterIP": "10.96.0.11",
                       "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
            )],
            cfg: ModelConfig {
                node_port_addresses: NodePortAddresses::Primary,
                ..ModelConfig::default()
            },
            // 10.9.9.9 is an InternalIP but not configured here.
            want: vec![
                "TCP 10.96.0.11:80 rr (ClusterIP ns/web:http) -> none",
                "TCP 192.168.1.10:30080 rr snat (NodePort ns/web:http) -> none",
            ],
            ..case("node_port_addresses_primary")
        },
        Case {
            services: vec![svc(
                "ns",
                "web",
                json!({"type": "NodePort", "clusterIPs": ["10.96.0.11", "fd00::11"],
                       "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
            )],
            cfg: ModelConfig {
                node_port_addresses: NodePortAddresses::Cidrs(vec![net("10.0.0.0/8")]),
                ..ModelConfig::default()
            },
            // IPv4: only 10.0.0.5 (kube-ipvs0's 10.96.0.99 excluded); IPv6 has no CIDR, so it
            // is unrestricted, as in kube-proxy.
            want: vec![
                "TCP 10.0.0.5:30080 rr snat (NodePort ns/web:http) -> none",
                "TCP 10.96.0.11:80 rr (ClusterIP ns/web:http) -> none",
                "TCP [2001:db8::10]:30080 rr snat (NodePort ns/web:http) -> none",
                "TCP [fd00::11]:80 rr (ClusterIP ns/web:http) -> none",
            ],
            ..case("node_port_addresses_cidrs")
        },
        Case {
            services: vec![svc_full(
                "ns",
                "web",
                json!({}),
                json!({"type": "LoadBalancer", "clusterIP": "10.96.0.12",
                       "allocateLoadBalancerNodePorts": false,
                       "ports": [{"name": "http", "port": 80}]}),
                json!({"loadBalancer": {"ingress": [
                    {"ip": "203.0.113.1"},
                    {"ip": "203.0.113.2", "ipMode": "VIP"},
                    {"hostname": "lb.example.com"},
                    {"ip": "2001:db8:f::1"},
                ]}}),
            )],
            slices: vec![http_slice("web-1", "web", two_eps())],
            want: vec![
                "TCP 10.96.0.12:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080 10.244.2.2:8080",
                "TCP 203.0.113.1:80 rr snat (LoadBalancer ns/web:http) -> 10.244.1.2:8080 10.244.2.2:8080",
                "TCP 203.0.113.2:80 rr snat (LoadBalancer ns/web:http) -> 10.244.1.2:8080 10.244.2.2:8080",
            ],
            extra: Some(|s| {
                assert_eq!(
                    *s.bound_addresses,
                    ips(&["10.96.0.12", "203.0.113.1", "203.0.113.2"])
                )
            }),
            ..case("load_balancer_ingress_ips")
        },
        Case {
            services: vec![svc_full(
                "ns",
                "web",
                json!({}),
                json!({"type": "LoadBalancer", "clusterIP": "10.96.0.12",
                       "ports": [{"name": "http", "port": 80}]}),
                json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.3", "ipMode": "Proxy"}]}}),
            )],
            want: vec!["TCP 10.96.0.12:80 rr (ClusterIP ns/web:http) -> none"],
            extra: Some(|s| assert_eq!(*s.bound_addresses, ips(&["10.96.0.12"]))),
            ..case("load_balancer_ip_mode_proxy_skipped")
        },
        Case {
            services: vec![svc(
                "ns",
                "web",
                json!({"clusterIP": "10.96.0.13",
                       "externalIPs": ["198.51.100.7", "192.168.1.10", "2001:db8::99"],
                       "ports": [{"name": "http", "port": 80}]}),
            )],
            slices: vec![http_slice(
                "web-1",
                "web",
                json!([ep("10.244.1.2", "node-a")]),
            )],
            want: vec![
                "TCP 10.96.0.13:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080",
                "TCP 192.168.1.10:80 rr snat (ExternalIP ns/web:http) -> 10.244.1.2:8080",
                "TCP 198.51.100.7:80 rr snat (ExternalIP ns/web:http) -> 10.244.1.2:8080",
            ],
            extra: Some(|s| {
                // A node address is not bound again; the IPv6 one has no IPv6 ClusterIP.
                assert_eq!(*s.bound_addresses, ips(&["10.96.0.13", "198.51.100.7"]));
                assert_eq!(s.service_addresses, s.bound_addresses);
            }),
            ..case("external_ips")
        },
        Case {
            services: vec![svc(
                "ns",
                "dns",
                json!({"clusterIP": "10.96.0.14", "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                    {"name": "sig", "port": 9999, "protocol": "SCTP"},
                ]}),
            )],
            slices: vec![slice(
                "ns",
                "dns-1",
                "dns",
                "IPv4",
                json!([{"name": "dns", "port": 5353, "protocol": "UDP"},
                       {"name": "dns-tcp", "port": 5353, "protocol": "TCP"},
                       {"name": "sig", "port": 9999, "protocol": "SCTP"}]),
                json!([ep("10.244.1.2", "node-a")]),
            )],
            want: vec![
                "TCP 10.96.0.14:53 rr (ClusterIP ns/dns:dns-tcp) -> 10.244.1.2:5353",
                "UDP 10.96.0.14:53 rr (ClusterIP ns/dns:dns) -> 10.244.1.2:5353",
                "SCTP 10.96.0.14:9999 rr (ClusterIP ns/dns:sig) -> 10.244.1.2:9999",
            ],
            ..case("one_virtual_service_per_port_and_protocol")
        },
        // --- Endpoints ----------------------------------------------------------------------
        Case {
            services: vec![svc(
                "ns",
                "web",
                json!({"clusterIP": "10.96.0.10", "ports": [
                    {"name": "http", "port": 80}, {"name": "metrics", "port": 9090}]}),
            )],
            slices: vec![
                http_slice("web-1", "web", json!([ep("10.244.1.2", "node-a")])),
                // Same name, other protocol: not this port.
                slice(
                    "ns",
                    "web-2",
                    "web",
                    "IPv4",
                    json!([{"name": "metrics", "port": 9100, "protocol": "UDP"}]),
                    json!([ep("10.244.1.3", "node-a")]),
                ),
                slice(
                    "ns",
                    "web-3",
                    "web",
                    "IPv4",
                    json!([{"name": "metrics", "port": 9101}]),
                    json!([ep("10.244.1.4", "node-a")]),
                ),
            ],
            want: vec![
                "TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080",
                "TCP 10.96.0.10:9090 rr (ClusterIP ns/web:metrics) -> 10.244.1.4:9101",
            ],
            ..case("endpoints_matched_by_port_name_and_protocol")
        },
        Case {
            services: vec![svc(
                "ns",
                "web",
                json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}),
            )],
            // Unnamed port, protocol left to its TCP default on both sides.
            slices: vec![slice(
                "ns",
                "web-1",
                "web",
                "IPv4",
                json!([{"port": 8080}]),
                json!([ep("10.244.1.2", "node-a")]),
            )],
            want: vec!["TCP 10.96.0.10:80 rr (ClusterIP ns/web:) -> 10.244.1.2:8080"],
            ..case("unnamed_port_and_default_protocol")
        },
        Case {
            services: vec![web("10.96.0.10")],
            slices: vec![
                http_slice(
                    "web-1",
                    "web",
                    json!([
                        ep("10.244.1.2", "node-a"),
                        ep_cond(
                            "10.244.1.3",
                            "node-a",
                            json!(false),
                            json!(true),
                            json!(true)
                        ),
                    ]),
                ),
                // A's terminating copy does not replace the ready one; B's ready copy replaces
                // the terminating one.
                http_slice(
                    "web-2",
                    "web",
                    json!([
                        ep_cond(
                            "10.244.1.2",
                            "node-a",
                            json!(false),
                            json!(true),
                            json!(true)
                        ),
                        ep("10.244.1.3", "node-a"),
                    ]),
                ),
            ],
            want: vec![
                "TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080 10.244.1.3:8080",
            ],
            ..case("endpoints_deduplicated_across_slices")
        },
        Case {
            services: vec![web("10.96.0.10")],
            slices: vec![
                http_slice("web-1", "web", json!([ep("10.244.1.2", "node-a")])),
                slice(
                    "ns",
                    "web-2",
                    "web",
                    "IPv6",
                    json!([{"name": "http", "port": 8080}]),
                    json!([ep("fd00:244::2", "node-a")]),
                ),
                slice(
                    "ns",
                    "web-3",
                    "web",
                    "FQDN",
                    json!([{"name": "http", "port": 8080}]),
                    json!([ep("web.example.com", "node-a")]),
                ),
            ],
            want: vec!["TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080"],
            ..case("endpoint_family_must_match_virtual_service")
        },
        Case {
            services: vec![web("10.96.0.10")],
            slices: vec![http_slice(
                "web-1",
                "web",
                json!([
                    ep("10.244.1.2", "node-a"),
                    ep_cond(
                        "10.244.1.3",
                        "node-a",
                        json!(false),
                        json!(false),
                        json!(false)
                    ),
                    // Serving and terminating, but ready endpoints exist: not used.
                    ep_cond(
                        "10.244.1.4",
                        "node-a",
                        json!(false),
                        json!(true),
                        json!(true)
                    ),
                ]),
            )],
            want: vec!["TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080"],
            ..case("ready_endpoints_only")
        },
        Case {
            services: vec![web("10.96.0.10")],
            slices: vec![http_slice(
                "web-1",
                "web",
                json!([
                    ep_cond(
                        "10.244.1.2",
                        "node-a",
                        json!(false),
                        json!(true),
                        json!(true)
                    ),
                    ep_cond(
                        "10.244.1.3",
                        "node-a",
                        json!(false),
                        json!(false),
                        json!(true)
                    ),
                    ep_cond(
                        "10.244.1.4",
                        "node-a",
                        json!(false),
                        json!(true),
                        json!(false)
                    ),
                ]),
            )],
            want: vec!["TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080"],
            ..case("serving_terminating_fallback")
        },
        Case {
            services: vec![svc(
                "ns",
                "web",
                json!({"type": "NodePort", "clusterIP": "10.96.0.11", "externalTrafficPolicy": "Local",
                       "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
            )],
            slices: vec![http_slice(
                "web-1",
                "web",
                json!([
                    ep_cond(
                        "10.244.1.2",
                        "node-a",
                        json!(false),
                        json!(true),
                        json!(true)
                    ),
                    ep("10.244.2.2", "node-b"),
                ]),
            )],
            // The cluster set has a ready endpoint; the local set falls back on its own.
            want: vec![
                "TCP 10.0.0.5:30080 rr (NodePort ns/web:http) -> 10.244.1.2:8080",
                "TCP 10.96.0.11:80 rr (ClusterIP ns/web:http) -> 10.244.2.2:8080",
                "TCP 192.168.1.10:30080 rr (NodePort ns/web:http) -> 10.244.1.2:8080",
            ],
            ..case("serving_terminating_fallback_local_set_separately")
        },
        Case {
            services: vec![
                web("10.96.0.10"),
                svc(
                    "ns",
                    "web2",
                    json!({"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}]}),
                ),
            ],
            slices: vec![
                // No conditions at all: ready.
                http_slice("web-1", "web", json!([ep("10.244.1.2", "node-a")])),
                // serving unset reads as true (kube-proxy), so the fallback takes it.
                http_slice(
                    "web2-1",
                    "web2",
                    json!([ep_cond(
                        "10.244.1.3",
                        "node-a",
                        json!(false),
                        Value::Null,
                        json!(true)
                    )]),
                ),
            ],
            want: vec![
                "TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080",
                "TCP 10.96.0.20:80 rr (ClusterIP ns/web2:http) -> 10.244.1.3:8080",
            ],
            ..case("unset_conditions_default_to_true")
        },
        Case {
            services: vec![web("10.96.0.10")],
            slices: vec![http_slice(
                "web-1",
                "web",
                json!([
                    {"addresses": [], "nodeName": "node-a"},
                    ep("10.244.1.2", "node-a"),
                ]),
            )],
            want: vec!["TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080"],
            ..case("endpoints_without_addresses_ignored")
        },
        Case {
            services: vec![web("10.96.0.10")],
            slices: vec![
                http_slice("ghost-1", "ghost", two_eps()),
                // No service-name label.
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                       "metadata": {"namespace": "ns", "name": "orphan"},
                       "addressType": "IPv4", "endpoints": [ep("10.244.9.9", "node-a")]}),
            ],
            want: vec!["TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> none"],
            ..case("slice_of_unknown_service_ignored")
        },
        // --- Traffic policies and topology --------------------------------------------------
        Case {
            services: vec![svc_full(
                "ns",
                "web",
                json!({}),
                json!({"type": "LoadBalancer", "clusterIP": "10.96.0.12",
                       "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                       "externalIPs": ["198.51.100.7"],
                       "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
                json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}]}}),
            )],
            slices: vec![http_slice("web-1", "web", two_eps())],
            want: vec![
                "TCP 10.0.0.5:30080 rr (NodePort ns/web:http) -> 10.244.1.2:8080",
                "TCP 10.96.0.12:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080 10.244.2.2:8080",
                "TCP 192.168.1.10:30080 rr (NodePort ns/web:http) -> 10.244.1.2:8080",
                "TCP 198.51.100.7:80 rr (ExternalIP ns/web:http) -> 10.244.1.2:8080",
                "TCP 203.0.113.1:80 rr (LoadBalancer ns/web:http) -> 10.244.1.2:8080",
            ],
            ..case("external_traffic_policy_local")
        },
        Case {
            services: vec![svc(
                "ns",
                "web",
                json!({"type": "NodePort", "clusterIP": "10.96.0.11", "externalTrafficPolicy": "Local",
                       "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
            )],
            slices: vec![http_slice(
                "web-1",
                "web",
                json!([ep("10.244.2.2", "node-b")]),
            )],
            // iptables/nftables semantics: refused, not forwarded to a remote endpoint.
            want: vec![
                "TCP 10.0.0.5:30080 rr (NodePort ns/web:http) -> none",
                "TCP 10.96.0.11:80 rr (ClusterIP ns/web:http) -> 10.244.2.2:8080",
                "TCP 192.168.1.10:30080 rr (NodePort ns/web:http) -> none",
            ],
            ..case("external_traffic_policy_local_without_local_endpoints")
        },
        Case {
            services: vec![svc(
                "ns",
                "web",
                json!({"type": "NodePort", "clusterIP": "10.96.0.11", "internalTrafficPolicy": "Local",
                       "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
            )],
            slices: vec![http_slice("web-1", "web", two_eps())],
            want: vec![
                "TCP 10.0.0.5:30080 rr snat (NodePort ns/web:http) -> 10.244.1.2:8080 10.244.2.2:8080",
                "TCP 10.96.0.11:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080",
                "TCP 192.168.1.10:30080 rr snat (NodePort ns/web:http) -> 10.244.1.2:8080 10.244.2.2:8080",
            ],
            ..case("internal_traffic_policy_local")
        },
        Case {
            services: vec![web("10.96.0.10")],
            slices: vec![http_slice(
                "web-1",
                "web",
                json!([
                    ep_hints("10.244.1.2", "node-a", &["zone-a"], &[]),
                    ep_hints("10.244.2.2", "node-b", &["zone-b"], &[]),
                    ep_hints("10.244.3.2", "node-c", &["zone-a"], &[]),
                    // Not ready: its missing hint does not matter.
                    ep_cond(
                        "10.244.4.2",
                        "node-d",
                        json!(false),
                        json!(false),
                        json!(false)
                    ),
                ]),
            )],
            node: NodeInfo {
                zone: Some("zone-a".into()),
                ..test_node()
            },
            want: vec![
                "TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080 10.244.3.2:8080",
            ],
            ..case("topology_prefer_same_zone")
        },
        Case {
            services: vec![web("10.96.0.10")],
            slices: vec![http_slice(
                "web-1",
                "web",
                json!([
                    ep_hints("10.244.1.2", "node-a", &["zone-a"], &["node-a"]),
                    ep_hints("10.244.2.2", "node-b", &["zone-a"], &["node-b"]),
                ]),
            )],
            node: NodeInfo {
                labels: BTreeMap::from([(TOPOLOGY_ZONE_LABEL.to_owned(), "zone-a".to_owned())]),
                ..test_node()
            },
            want: vec!["TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080"],
            ..case("topology_prefer_same_node")
        },
        Case {
            services: vec![web("10.96.0.10")],
            slices: vec![http_slice(
                "web-1",
                "web",
                json!([
                    ep_hints("10.244.1.2", "node-a", &["zone-b"], &["node-b"]),
                    ep_hints("10.244.2.2", "node-b", &["zone-a"], &["node-c"]),
                ]),
            )],
            node: NodeInfo {
                zone: Some("zone-a".into()),
                ..test_node()
            },
            // Node hints exist but none for node-a: zone hints decide.
            want: vec!["TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> 10.244.2.2:8080"],
            ..case("topology_node_hints_fall_back_to_zone_hints")
        },
        Case {
            services: vec![web("10.96.0.10")],
            slices: vec![http_slice(
                "web-1",
                "web",
                json!([
                    ep_hints("10.244.1.2", "node-a", &["zone-a"], &[]),
                    ep("10.244.2.2", "node-b"),
                ]),
            )],
            node: NodeInfo {
                zone: Some("zone-a".into()),
                ..test_node()
            },
            want: vec![
                "TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080 10.244.2.2:8080",
            ],
            ..case("topology_ignored_when_an_endpoint_lacks_hints")
        },
        Case {
            services: vec![web("10.96.0.10")],
            slices: vec![http_slice(
                "web-1",
                "web",
                json!([
                    ep_hints("10.244.1.2", "node-a", &["zone-b"], &[]),
                    ep_hints("10.244.2.2", "node-b", &["zone-c"], &[]),
                ]),
            )],
            node: NodeInfo {
                zone: Some("zone-a".into()),
                ..test_node()
            },
            want: vec![
                "TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080 10.244.2.2:8080",
            ],
            ..case("topology_ignored_when_no_hint_matches_this_node")
        },
        // --- Session affinity, scheduler, masquerading --------------------------------------
        Case {
            services: vec![
                svc(
                    "ns",
                    "a",
                    json!({"clusterIP": "10.96.0.30", "sessionAffinity": "ClientIP",
                    "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
                    "ports": [{"name": "http", "port": 80}]}),
                ),
                svc(
                    "ns",
                    "b",
                    json!({"clusterIP": "10.96.0.31", "sessionAffinity": "ClientIP",
                    "ports": [{"name": "http", "port": 80}]}),
                ),
            ],
            want: vec![
                "TCP 10.96.0.30:80 rr persistent 600 (ClusterIP ns/a:http) -> none",
                "TCP 10.96.0.31:80 rr persistent 10800 (ClusterIP ns/b:http) -> none",
            ],
            ..case("session_affinity_client_ip")
        },
        Case {
            services: vec![
                svc_full(
                    "ns",
                    "a",
                    json!({"annotations": {SCHEDULER_ANNOTATION: "mh"}}),
                    json!({"clusterIP": "10.96.0.30", "ports": [{"name": "http", "port": 80}]}),
                    json!({}),
                ),
                svc(
                    "ns",
                    "b",
                    json!({"clusterIP": "10.96.0.31", "ports": [{"name": "http", "port": 80}]}),
                ),
            ],
            cfg: ModelConfig {
                default_scheduler: "wlc".into(),
                ..ModelConfig::default()
            },
            want: vec![
                "TCP 10.96.0.30:80 mh (ClusterIP ns/a:http) -> none",
                "TCP 10.96.0.31:80 wlc (ClusterIP ns/b:http) -> none",
            ],
            ..case("scheduler_from_annotation_else_default")
        },
        Case {
            services: vec![
                svc_full(
                    "ns",
                    "web",
                    json!({"annotations": {SCHEDULER_ANNOTATION: "roundrobin"}}),
                    json!({"clusterIP": "10.96.0.30", "ports": [{"name": "http", "port": 80}]}),
                    json!({}),
                ),
                bystander(),
            ],
            want: vec![BYSTANDER],
            rejected: vec![("Service ns/web", "unknown IPVS scheduler \"roundrobin\"")],
            ..case("unknown_scheduler_rejected")
        },
        Case {
            services: vec![svc(
                "ns",
                "web",
                json!({"type": "NodePort", "clusterIP": "10.96.0.11", "externalTrafficPolicy": "Local",
                       "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
            )],
            cfg: ModelConfig {
                masquerade_all: true,
                ..ModelConfig::default()
            },
            want: vec![
                "TCP 10.0.0.5:30080 rr snat (NodePort ns/web:http) -> none",
                "TCP 10.96.0.11:80 rr snat (ClusterIP ns/web:http) -> none",
                "TCP 192.168.1.10:30080 rr snat (NodePort ns/web:http) -> none",
            ],
            ..case("masquerade_all")
        },
        Case {
            services: vec![svc(
                "ns",
                "web",
                json!({"type": "NodePort", "clusterIPs": ["10.96.0.11", "fd00::11"],
                       "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
            )],
            cfg: ModelConfig {
                cluster_cidrs: vec![net("10.244.0.0/16")],
                node_port_addresses: NodePortAddresses::Primary,
                ..ModelConfig::default()
            },
            // Only the family with a cluster CIDR can tell cluster clients from others.
            want: vec![
                "TCP 10.96.0.11:80 rr masq-off-cluster (ClusterIP ns/web:http) -> none",
                "TCP 192.168.1.10:30080 rr snat (NodePort ns/web:http) -> none",
                "TCP [2001:db8::10]:30080 rr snat (NodePort ns/web:http) -> none",
                "TCP [fd00::11]:80 rr (ClusterIP ns/web:http) -> none",
            ],
            ..case("masquerade_off_cluster_clients_of_cluster_ips")
        },
        Case {
            services: vec![svc_full(
                "ns",
                "web",
                json!({}),
                json!({"type": "LoadBalancer", "clusterIP": "10.96.0.12",
                       "externalIPs": ["198.51.100.7"],
                       "loadBalancerSourceRanges": [" 198.51.100.0/24 ", "2001:db8:1::/48", "10.1.2.3/8"],
                       "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
                json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.1"}]}}),
            )],
            cfg: ModelConfig {
                node_port_addresses: NodePortAddresses::Primary,
                ..ModelConfig::default()
            },
            want: vec![
                "TCP 10.96.0.12:80 rr (ClusterIP ns/web:http) -> none",
                "TCP 192.168.1.10:30080 rr snat (NodePort ns/web:http) -> none",
                "TCP 198.51.100.7:80 rr snat (ExternalIP ns/web:http) -> none",
                "TCP 203.0.113.1:80 rr snat source-ranges 10.0.0.0/8,198.51.100.0/24 (LoadBalancer ns/web:http) -> none",
            ],
            ..case("source_ranges_only_on_load_balancer_ips")
        },
        Case {
            services: vec![
                svc(
                    "ns",
                    "lb",
                    json!({"type": "LoadBalancer", "clusterIP": "10.96.0.40",
                    "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                    "ports": [{"name": "http", "port": 80}, {"name": "https", "port": 443}]}),
                ),
                // Not a LoadBalancer: no health check even with the field set.
                svc(
                    "ns",
                    "np",
                    json!({"type": "NodePort", "clusterIP": "10.96.0.41",
                    "externalTrafficPolicy": "Local", "healthCheckNodePort": 32001,
                    "ports": [{"name": "http", "port": 80}]}),
                ),
                svc(
                    "ns",
                    "cluster",
                    json!({"type": "LoadBalancer", "clusterIP": "10.96.0.42",
                    "healthCheckNodePort": 32002, "ports": [{"name": "http", "port": 80}]}),
                ),
            ],
            slices: vec![slice(
                "ns",
                "lb-1",
                "lb",
                "IPv4",
                json!([{"name": "http", "port": 8080}, {"name": "https", "port": 8443}]),
                json!([
                    ep("10.244.1.2", "node-a"),
                    ep_cond(
                        "10.244.1.3",
                        "node-a",
                        json!(false),
                        json!(true),
                        json!(true)
                    ),
                    ep("10.244.2.2", "node-b"),
                ]),
            )],
            want: vec![
                "TCP 10.96.0.40:80 rr (ClusterIP ns/lb:http) -> 10.244.1.2:8080 10.244.2.2:8080",
                "TCP 10.96.0.40:443 rr (ClusterIP ns/lb:https) -> 10.244.1.2:8443 10.244.2.2:8443",
                "TCP 10.96.0.41:80 rr (ClusterIP ns/np:http) -> none",
                "TCP 10.96.0.42:80 rr (ClusterIP ns/cluster:http) -> none",
            ],
            extra: Some(|s| {
                // One local ready IP, counted once across both ports.
                assert_eq!(
                    s.health_check_node_ports,
                    vec![HealthCheckNodePort {
                        service: ServiceRef::new("ns", "lb"),
                        port: 32000,
                        local_endpoints: 1,
                    }]
                );
            }),
            ..case("health_check_node_port_for_local_load_balancers")
        },
        // --- Ignored objects ----------------------------------------------------------------
        Case {
            services: vec![
                svc(
                    "ns",
                    "headless",
                    json!({"clusterIP": "None", "ports": [{"name": "http", "port": 80}]}),
                ),
                svc(
                    "ns",
                    "unset",
                    json!({"ports": [{"name": "http", "port": 80}]}),
                ),
                svc(
                    "ns",
                    "ext",
                    json!({"type": "ExternalName", "externalName": "example.com",
                    "clusterIP": "10.96.0.50", "ports": [{"name": "http", "port": 80}]}),
                ),
                bystander(),
            ],
            slices: vec![http_slice("headless-1", "headless", two_eps())],
            want: vec![BYSTANDER],
            ..case("headless_and_external_name_ignored")
        },
        Case {
            services: vec![
                svc_full(
                    "ns",
                    "theirs",
                    json!({"labels": {SERVICE_PROXY_NAME_LABEL: "other"}}),
                    json!({"clusterIP": "10.96.0.60", "ports": [{"name": "http", "port": 80}]}),
                    json!({}),
                ),
                svc_full(
                    "ns",
                    "ours",
                    json!({"labels": {SERVICE_PROXY_NAME_LABEL: "ipvs-bpf"}}),
                    json!({"clusterIP": "10.96.0.61", "ports": [{"name": "http", "port": 80}]}),
                    json!({}),
                ),
                bystander(),
            ],
            slices: vec![
                http_slice("ours-1", "ours", json!([ep("10.244.1.2", "node-a")])),
                // A slice labelled for another proxy is skipped, as kube-proxy's informer does.
                {
                    let mut s = http_slice("ours-2", "ours", json!([ep("10.244.2.2", "node-b")]));
                    s["metadata"]["labels"][SERVICE_PROXY_NAME_LABEL] = json!("other");
                    s
                },
            ],
            cfg: ModelConfig {
                proxy_name: Some("ipvs-bpf".into()),
                ..ModelConfig::default()
            },
            want: vec![
                "TCP 10.96.0.61:80 rr (ClusterIP ns/ours:http) -> 10.244.1.2:8080",
                BYSTANDER,
            ],
            ..case("service_proxy_name_label")
        },
        Case {
            services: vec![
                svc_full(
                    "ns",
                    "ours",
                    json!({"labels": {SERVICE_PROXY_NAME_LABEL: "ipvs-bpf"}}),
                    json!({"clusterIP": "10.96.0.61", "ports": [{"name": "http", "port": 80}]}),
                    json!({}),
                ),
                // Unlabelled: kube-proxy's, when running beside it.
                bystander(),
            ],
            slices: vec![http_slice(
                "ours-1",
                "ours",
                json!([ep("10.244.1.2", "node-a")]),
            )],
            cfg: ModelConfig {
                proxy_name: Some("ipvs-bpf".into()),
                only_labelled_services: true,
                ..ModelConfig::default()
            },
            want: vec!["TCP 10.96.0.61:80 rr (ClusterIP ns/ours:http) -> 10.244.1.2:8080"],
            ..case("only_labelled_services_beside_kube_proxy")
        },
        // --- Rejections ---------------------------------------------------------------------
        Case {
            services: vec![
                svc(
                    "ns",
                    "a",
                    json!({"clusterIP": "10.96.0.300", "ports": [{"port": 80}]}),
                ),
                svc(
                    "ns",
                    "b",
                    json!({"clusterIP": "10.96.0.70", "externalIPs": ["nope"], "ports": [{"port": 80}]}),
                ),
                svc_full(
                    "ns",
                    "c",
                    json!({}),
                    json!({"clusterIP": "10.96.0.71", "ports": [{"port": 80}]}),
                    json!({"loadBalancer": {"ingress": [{"ip": "1.2.3"}]}}),
                ),
                svc(
                    "ns",
                    "d",
                    json!({"clusterIP": "10.96.0.72", "loadBalancerSourceRanges": ["10.0.0.0/33"],
                    "ports": [{"port": 80}]}),
                ),
                bystander(),
            ],
            want: vec![BYSTANDER],
            rejected: vec![
                ("Service ns/a", "invalid cluster IP \"10.96.0.300\""),
                ("Service ns/b", "invalid external IP \"nope\""),
                ("Service ns/c", "invalid load balancer ingress IP \"1.2.3\""),
                (
                    "Service ns/d",
                    "invalid loadBalancerSourceRanges entry \"10.0.0.0/33\"",
                ),
            ],
            ..case("invalid_ips_rejected")
        },
        Case {
            services: vec![
                svc(
                    "ns",
                    "zero",
                    json!({"clusterIP": "10.96.0.80", "ports": [{"name": "p", "port": 0}]}),
                ),
                svc(
                    "ns",
                    "big",
                    json!({"clusterIP": "10.96.0.81", "ports": [{"name": "p", "port": 70000}]}),
                ),
                bystander(),
            ],
            want: vec![BYSTANDER],
            rejected: vec![
                ("Service ns/big", "port \"p\": port 70000 is not in 1-65535"),
                ("Service ns/zero", "port \"p\": port 0 is not in 1-65535"),
            ],
            ..case("invalid_port_rejected")
        },
        Case {
            services: vec![
                svc(
                    "ns",
                    "big",
                    json!({"type": "NodePort", "clusterIP": "10.96.0.82",
                    "ports": [{"name": "p", "port": 80, "nodePort": 70000}]}),
                ),
                svc(
                    "ns",
                    "neg",
                    json!({"type": "NodePort", "clusterIP": "10.96.0.83",
                    "ports": [{"name": "p", "port": 80, "nodePort": -1}]}),
                ),
                bystander(),
            ],
            want: vec![BYSTANDER],
            rejected: vec![
                ("Service ns/big", "nodePort 70000 is not in 1-65535"),
                ("Service ns/neg", "nodePort -1 is not in 1-65535"),
            ],
            ..case("node_port_out_of_range_rejected")
        },
        Case {
            services: vec![
                svc(
                    "ns",
                    "icmp",
                    json!({"clusterIP": "10.96.0.84",
                    "ports": [{"name": "p", "port": 80, "protocol": "ICMP"}]}),
                ),
                bystander(),
            ],
            want: vec![BYSTANDER],
            rejected: vec![("Service ns/icmp", "unknown protocol \"ICMP\"")],
            ..case("unknown_protocol_rejected")
        },
        Case {
            services: vec![
                svc(
                    "ns",
                    "dup",
                    json!({"clusterIP": "10.96.0.85",
                    "ports": [{"name": "a", "port": 80}, {"name": "b", "port": 80, "protocol": "TCP"}]}),
                ),
                svc(
                    "ns",
                    "dupname",
                    json!({"clusterIP": "10.96.0.86",
                    "ports": [{"name": "a", "port": 80}, {"name": "a", "port": 81}]}),
                ),
                // Same number, other protocol: fine.
                svc(
                    "ns",
                    "dns",
                    json!({"clusterIP": "10.96.0.87",
                    "ports": [{"name": "u", "port": 53, "protocol": "UDP"}, {"name": "t", "port": 53}]}),
                ),
                bystander(),
            ],
            want: vec![
                "TCP 10.96.0.87:53 rr (ClusterIP ns/dns:t) -> none",
                "UDP 10.96.0.87:53 rr (ClusterIP ns/dns:u) -> none",
                BYSTANDER,
            ],
            rejected: vec![
                ("Service ns/dup", "port 80/TCP is listed twice"),
                ("Service ns/dupname", "port name \"a\" is used twice"),
            ],
            ..case("duplicate_port_rejected")
        },
        Case {
            services: vec![web("10.96.0.10")],
            slices: vec![
                http_slice(
                    "web-1",
                    "web",
                    json!([
                        ep("10.244.1.2", "node-a"),
                        ep("not-an-ip", "node-a"),
                        ep("fd00::1", "node-a"),
                        ep("10.244.1.999", "node-a"),
                    ]),
                ),
                http_slice("web-2", "web", json!([ep("10.244.2.2", "node-b")])),
            ],
            want: vec![
                "TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> 10.244.1.2:8080 10.244.2.2:8080",
            ],
            rejected: vec![(
                "EndpointSlice ns/web-1",
                "skipped 3 endpoint(s) whose address is not a valid IPv4 address: \"not-an-ip\", \"fd00::1\", \"10.244.1.999\"",
            )],
            ..case("slice_with_garbage_addresses_keeps_the_rest")
        },
        Case {
            services: vec![
                svc_full(
                    "ns",
                    "aaa-new",
                    json!({"creationTimestamp": "2024-01-01T00:00:00Z"}),
                    json!({"clusterIP": "10.96.0.90", "externalIPs": ["10.96.0.91"], "ports": [{"name": "p", "port": 80}]}),
                    json!({}),
                ),
                svc_full(
                    "ns",
                    "zzz-old",
                    json!({"creationTimestamp": "2020-01-01T00:00:00Z"}),
                    json!({"clusterIP": "10.96.0.91", "ports": [{"name": "p", "port": 80}]}),
                    json!({}),
                ),
                web("10.96.0.10"),
                web("10.96.0.11"),
            ],
            want: vec![
                "TCP 10.96.0.10:80 rr (ClusterIP ns/web:http) -> none",
                "TCP 10.96.0.90:80 rr (ClusterIP ns/aaa-new:p) -> none",
                "TCP 10.96.0.91:80 rr (ClusterIP ns/zzz-old:p) -> none",
            ],
            rejected: vec![
                (
                    "Service ns/aaa-new",
                    "TCP 10.96.0.91:80 (ExternalIP) is already served for Service ns/zzz-old",
                ),
                (
                    "Service ns/web",
                    "another Service with the same namespace/name came first",
                ),
            ],
            ..case("conflicting_services_oldest_wins")
        },
    ]
}

/// Runs one case of the table; `Err` lists what differs.
fn check(c: &Case) -> Result<(), String> {
    let mut failures = Vec::new();
    let state = build(
        &to_services(&c.services),
        &to_slices(&c.slices),
        &c.node,
        &c.cfg,
    );
    let got = lines(&state);
    if got != c.want {
        failures.push(format!(
            "virtual services\n  want: {:#?}\n  got:  {:#?}",
            c.want, got
        ));
    }
    let rejected_ok = state.rejected.len() == c.rejected.len()
        && state
            .rejected
            .iter()
            .zip(&c.rejected)
            .all(|(r, (obj, reason))| r.object == *obj && r.reason.contains(reason));
    if !rejected_ok {
        failures.push(format!(
            "rejected\n  want: {:#?}\n  got:  {:#?}",
            c.rejected, state.rejected
        ));
    }
    if let Some(extra) = c.extra
        && std::panic::catch_unwind(|| extra(&state)).is_err()
    {
        failures.push("extra checks failed (see the panic above)".to_owned());
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

fn run_case(name: &str) {
    let c = cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case named {name}"));
    if let Err(e) = check(&c) {
        panic!("case {name}:\n{e}");
    }
}

/// One `#[test]` per case of the table, so each rule passes or fails under its own name.
macro_rules! rule_tests {
    ($($name:ident),* $(,)?) => {
        mod rules {
            $(
                #[test]
                fn $name() {
                    super::run_case(stringify!($name));
                }
            )*
        }
        const LISTED_CASES: &[&str] = &[$(stringify!($name)),*];
    };
}

rule_tests! {
    cluster_ip_from_cluster_ips,
    cluster_ips_dual_stack,
    cluster_ip_fallback_without_cluster_ips,
    legacy_ip_with_leading_zeros_is_decimal,
    node_port_on_all_local_addresses,
    node_port_family_follows_service_families,
    node_port_addresses_primary,
    node_port_addresses_cidrs,
    load_balancer_ingress_ips,
    load_balancer_ip_mode_proxy_skipped,
    external_ips,
    one_virtual_service_per_port_and_protocol,
    endpoints_matched_by_port_name_and_protocol,
    unnamed_port_and_default_protocol,
    endpoints_deduplicated_across_slices,
    endpoint_family_must_match_virtual_service,
    ready_endpoints_only,
    serving_terminating_fallback,
    serving_terminating_fallback_local_set_separately,
    unset_conditions_default_to_true,
    endpoints_without_addresses_ignored,
    slice_of_unknown_service_ignored,
    external_traffic_policy_local,
    external_traffic_policy_local_without_local_endpoints,
    internal_traffic_policy_local,
    topology_prefer_same_zone,
    topology_prefer_same_node,
    topology_node_hints_fall_back_to_zone_hints,
    topology_ignored_when_an_endpoint_lacks_hints,
    topology_ignored_when_no_hint_matches_this_node,
    session_affinity_client_ip,
    scheduler_from_annotation_else_default,
    unknown_scheduler_rejected,
    masquerade_all,
    masquerade_off_cluster_clients_of_cluster_ips,
    source_ranges_only_on_load_balancer_ips,
    health_check_node_port_for_local_load_balancers,
    headless_and_external_name_ignored,
    service_proxy_name_label,
    only_labelled_services_beside_kube_proxy,
    invalid_ips_rejected,
    invalid_port_rejected,
    node_port_out_of_range_rejected,
    unknown_protocol_rejected,
    duplicate_port_rejected,
    slice_with_garbage_addresses_keeps_the_rest,
    conflicting_services_oldest_wins,
}

#[test]
fn every_case_has_its_test() {
    let table: Vec<&str> = cases().iter().map(|c| c.name).collect();
    let unique: BTreeSet<&str> = table.iter().copied().collect();
    assert_eq!(unique.len(), table.len(), "duplicate case names");
    assert_eq!(
        unique,
        LISTED_CASES.iter().copied().collect::<BTreeSet<_>>()
    );
}

// ---------------------------------------------------------------------------------------------
// Golden case: what kube-proxy v1.36.2 programmed in IPVS mode for these objects
// (/work/shared/reference/kube-proxy-v1.36-node-state: ipvsadm.txt, kube-ipvs0.txt and
// k8s-objects.txt; --cluster-cidr=10.244.0.0/16, node lab-node with InternalIP 10.10.1.1).

/// `ipvsadm -Ln` as captured.
const GOLDEN_IPVSADM: &str = "\
TCP  10.0.2.15:30080 rr
  -> 10.244.1.2:8080              Masq    1      0          0
  -> 10.244.2.2:8080              Masq    1      0          0
TCP  10.0.2.15:30081 rr
  -> 10.244.1.2:8080              Masq    1      0          0
TCP  10.10.1.1:30080 rr
  -> 10.244.1.2:8080              Masq    1      0          0
  -> 10.244.2.2:8080              Masq    1      0          0
TCP  10.10.1.1:30081 rr
  -> 10.244.1.2:8080              Masq    1      0          0
TCP  10.10.3.1:30080 rr
  -> 10.244.1.2:8080              Masq    1      0          0
  -> 10.244.2.2:8080              Masq    1      0          0
TCP  10.10.3.1:30081 rr
  -> 10.244.1.2:8080              Masq    1      0          0
TCP  10.96.0.1:443 rr
TCP  10.96.10.10:80 rr
  -> 10.244.1.2:8080              Masq    1      0          0
  -> 10.244.2.2:8080              Masq    1      0          0
TCP  10.96.10.11:80 rr
  -> 10.244.1.2:8080              Masq    1      0          0
  -> 10.244.2.2:8080              Masq    1      0          0
TCP  10.96.10.12:80 rr
  -> 10.244.1.2:8080              Masq    1      0          0
  -> 10.244.2.2:8080              Masq    1      0          0
TCP  10.96.10.13:80 rr persistent 10800
  -> 10.244.1.2:8080              Masq    1      0          0
  -> 10.244.2.2:8080              Masq    1      0          0
TCP  10.244.1.1:30080 rr
  -> 10.244.1.2:8080              Masq    1      0          0
  -> 10.244.2.2:8080              Masq    1      0          0
TCP  10.244.1.1:30081 rr
  -> 10.244.1.2:8080              Masq    1      0          0
";

/// `ip addr show kube-ipvs0` as captured.
const GOLDEN_KUBE_IPVS0: &[&str] = &[
    "10.96.0.1",
    "10.96.10.13",
    "10.96.10.10",
    "10.96.10.12",
    "10.96.10.11",
];

/// The objects of k8s-objects.txt (a `kubectl get` table there), written out in full. The
/// slices are the manual ones the capture used: 10.244.1.2 on lab-node, 10.244.2.2 on
/// lab-node2; svc-local is the `externalTrafficPolicy: Local` NodePort (its NodePort has only
/// the local endpoint in ipvsadm.txt).
const GOLDEN_OBJECTS: &str = "
apiVersion: v1
kind: Service
metadata: {namespace: default, name: kubernetes}
spec: {type: ClusterIP, clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1],
       ports: [{name: https, port: 443, protocol: TCP, targetPort: 6443}]}
---
apiVersion: v1
kind: Service
metadata: {namespace: kp, name: svc-aff}
spec: {type: ClusterIP, clusterIP: 10.96.10.13, clusterIPs: [10.96.10.13],
       sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 10800}},
       ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {namespace: kp, name: svc-cip}
spec: {type: ClusterIP, clusterIP: 10.96.10.10, clusterIPs: [10.96.10.10],
       ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {namespace: kp, name: svc-local}
spec: {type: NodePort, clusterIP: 10.96.10.12, clusterIPs: [10.96.10.12],
       externalTrafficPolicy: Local,
       ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30081}]}
---
apiVersion: v1
kind: Service
metadata: {namespace: kp, name: svc-np}
spec: {type: NodePort, clusterIP: 10.96.10.11, clusterIPs: [10.96.10.11],
       externalTrafficPolicy: Cluster,
       ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}]}
";

fn golden_slice(service: &str) -> Value {
    slice(
        "kp",
        &format!("{service}-manual"),
        service,
        "IPv4",
        json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
        json!([
            {"addresses": ["10.244.1.2"], "nodeName": "lab-node",
             "conditions": {"ready": true, "serving": true, "terminating": false}},
            {"addresses": ["10.244.2.2"], "nodeName": "lab-node2",
             "conditions": {"ready": true, "serving": true, "terminating": false}},
        ]),
    )
}

/// (protocol, address:port, scheduler and flags, destinations) of each ipvsadm entry.
type IpvsEntry = (String, String, String, Vec<String>);

fn parse_ipvsadm(text: &str) -> Vec<IpvsEntry> {
    let mut out: Vec<IpvsEntry> = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["->", dest, "Masq", "1", ..] => {
                if let Some(last) = out.last_mut() {
                    last.3.push((*dest).to_owned());
                }
            }
            [proto, vip, rest @ ..] => out.push((
                (*proto).to_owned(),
                (*vip).to_owned(),
                rest.join(" "),
                Vec::new(),
            )),
            _ => {}
        }
    }
    out
}

#[test]
fn golden_kube_proxy_v1_36_ipvs_node_state() {
    let docs: Vec<Value> = GOLDEN_OBJECTS
        .split("\n---\n")
        .map(|d| serde_yaml::from_str(d).expect("golden YAML"))
        .collect();
    let services = to_services(&docs);
    let slices = to_slices(
        &["svc-aff", "svc-cip", "svc-local", "svc-np"]
            .iter()
            .map(|s| golden_slice(s))
            .collect::<Vec<_>>(),
    );
    // The lab node's interfaces (names are not in the capture; only kube-ipvs0 matters).
    let mut addresses = vec![
        addr("127.0.0.1", "lo"),
        addr("10.0.2.15", "eth0"),
        addr("10.10.1.1", "eth1"),
        addr("10.10.3.1", "eth2"),
        addr("10.244.1.1", "cni0"),
    ];
    addresses.extend(GOLDEN_KUBE_IPVS0.iter().map(|a| addr(a, DUMMY_INTERFACE)));
    let node = NodeInfo {
        name: "lab-node".into(),
        addresses,
        internal_ips: vec![ip("10.10.1.1")],
        zone: None,
        labels: BTreeMap::new(),
    };
    let cfg = ModelConfig {
        cluster_cidrs: vec![net("10.244.0.0/16")],
        ..ModelConfig::default()
    };

    let state = build(&services, &slices, &node, &cfg);
    assert_eq!(state.rejected, vec![]);

    // Virtual services, schedulers, persistence and destinations: identical to ipvsadm -Ln
    // (which sorts the same way for these IPv4/TCP entries).
    let ours: Vec<IpvsEntry> = state
        .virtual_services
        .iter()
        .map(|vs| {
            let mut sched = vs.scheduler.clone();
            if let Some(t) = vs.persistence_timeout {
                sched.push_str(&format!(" persistent {t}"));
            }
            (
                vs.protocol.to_string(),
                vs.socket_addr().to_string(),
                sched,
                vs.destinations
                    .iter()
                    .map(|d| {
                        assert_eq!(d.weight, 1);
                        std::net::SocketAddr::new(d.address, d.port).to_string()
                    })
                    .collect(),
            )
        })
        .collect();
    assert_eq!(ours, parse_ipvsadm(GOLDEN_IPVSADM));

    // Addresses on kube-ipvs0.
    assert_eq!(*state.bound_addresses, ips(GOLDEN_KUBE_IPVS0));
    // KUBE-IPVS-IPS (ipset.txt) holds the same five addresses.
    assert_eq!(*state.service_addresses, ips(GOLDEN_KUBE_IPVS0));
    assert_eq!(
        *state.node_port_addresses,
        ips(&["10.0.2.15", "10.10.1.1", "10.10.3.1", "10.244.1.1"])
    );
    // No LoadBalancer service: KUBE-HEALTH-CHECK-NODE-PORT is empty there too.
    assert_eq!(state.health_check_node_ports, vec![]);

    // Masquerading, which kube-proxy does in iptables (iptables-nft-save.txt, ipset.txt):
    // KUBE-NODE-PORT-TCP {30080, 30081} minus KUBE-NODE-PORT-LOCAL-TCP {30081} is marked, and
    // KUBE-CLUSTER-IP is marked for sources outside 10.244.0.0/16.
    for vs in &state.virtual_services {
        match vs.kind {
            VirtualServiceKind::NodePort => {
                assert_eq!(vs.snat, vs.port == 30080, "{vs}");
                assert!(!vs.masq_off_cluster, "{vs}");
            }
            VirtualServiceKind::ClusterIp => {
                assert!(!vs.snat && vs.masq_off_cluster, "{vs}");
            }
            _ => panic!("unexpected {vs}"),
        }
    }

    // With nftables mode's default (`--nodeport-addresses primary`), NodePorts are only on the
    // node IP (nft-ruleset.txt: nodeport-ips = { 10.10.1.1 }).
    let primary = ModelConfig {
        node_port_addresses: NodePortAddresses::Primary,
        ..cfg
    };
    let state = build(&services, &slices, &node, &primary);
    assert_eq!(*state.node_port_addresses, ips(&["10.10.1.1"]));
}

// ---------------------------------------------------------------------------------------------
// Scale and determinism

#[test]
fn five_thousand_endpoints_in_one_service() {
    let eps: Vec<Value> = (0..5000u32)
        .map(|i| {
            let a = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
            ep(&a, if i % 10 == 0 { "node-a" } else { "node-b" })
        })
        .collect();
    // Split over 50 slices of 100, as the EndpointSlice controller would, with every slice
    // also repeating the first endpoint of the next one (endpoints moving between slices).
    let slices: Vec<Value> = (0..50)
        .map(|s| {
            let mut chunk: Vec<Value> = eps[s * 100..(s + 1) * 100].to_vec();
            if s < 49 {
                chunk.push(eps[(s + 1) * 100].clone());
            }
            http_slice(&format!("web-{s:02}"), "web", Value::Array(chunk))
        })
        .collect();
    let services = vec![svc(
        "ns",
        "web",
        json!({"type": "NodePort", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
               "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}),
    )];
    let state = build(
        &to_services(&services),
        &to_slices(&slices),
        &test_node(),
        &ModelConfig::default(),
    );
    assert_eq!(state.rejected, vec![]);
    assert_eq!(state.virtual_services.len(), 3);
    for vs in &state.virtual_services {
        let want = if vs.kind == VirtualServiceKind::NodePort {
            500
        } else {
            5000
        };
        assert_eq!(vs.destinations.len(), want, "{:?}", vs.kind);
        assert!(
            vs.destinations.windows(2).all(|w| w[0] < w[1]),
            "sorted and unique"
        );
    }
}

fn big_state(n_services: usize) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut services = Vec::with_capacity(n_services);
    let mut slices = Vec::with_capacity(n_services);
    for i in 0..n_services {
        let name = format!("svc-{i:05}");
        let cip = format!("10.96.{}.{}", i / 256, i % 256);
        services.push(svc(
            "big",
            &name,
            json!({"type": "NodePort", "clusterIP": cip,
                   "ports": [{"name": "http", "port": 80, "nodePort": 30000 + (i % 2700)}]}),
        ));
        let eps: Vec<Value> = (0..10)
            .map(|e| ep(&format!("10.{}.{}.{}", 128 + e, i / 256, i % 256), "node-b"))
            .collect();
        slices.push(slice(
            "big",
            &format!("{name}-1"),
            &name,
            "IPv4",
            json!([{"name": "http", "port": 8080}]),
            Value::Array(eps),
        ));
    }
    (to_services(&services), to_slices(&slices))
}

#[test]
fn ten_thousand_services_of_ten_endpoints() {
    // Node ports collide on purpose (10,000 services, 2,700 ports): the conflict path runs at
    // scale too. Nothing is asserted about time; the model is O(n log n).
    let (services, slices) = big_state(10_000);
    let cfg = ModelConfig {
        node_port_addresses: NodePortAddresses::Primary,
        ..ModelConfig::default()
    };
    let state = build(&services, &slices, &test_node(), &cfg);
    let cluster = state
        .virtual_services
        .iter()
        .filter(|v| v.kind == VirtualServiceKind::ClusterIp)
        .count();
    let node_ports = state.virtual_services.len() - cluster;
    assert_eq!(cluster, 10_000);
    assert_eq!(node_ports, 2_700);
    assert_eq!(state.rejected.len(), 10_000 - 2_700);
    assert!(
        state
            .virtual_services
            .iter()
            .all(|v| v.destinations.len() == 10)
    );
    assert_eq!(state.bound_addresses.len(), 10_000);
}

#[test]
fn output_does_not_depend_on_input_order() {
    let (mut services, mut slices) = big_state(300);
    let node = test_node();
    let cfg = ModelConfig::default();
    let a = build(&services, &slices, &node, &cfg);
    services.reverse();
    slices.reverse();
    let b = build(&services, &slices, &node, &cfg);
    assert_eq!(a, b);
}

#[test]
fn endpoint_slice_service_reads_label_and_namespace() {
    let slices = to_slices(&[
        http_slice("web-1", "web", json!([])),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "x", "labels": {SERVICE_NAME_LABEL: "web"}},
               "addressType": "IPv4", "endpoints": []}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"namespace": "ns", "name": "y"},
               "addressType": "IPv4", "endpoints": []}),
    ]);
    let got: Vec<Option<ServiceRef>> = slices
        .iter()
        .map(|s| endpoint_slice_service(&EndpointSliceInfo::from(s)))
        .collect();
    assert_eq!(
        got,
        vec![
            Some(ServiceRef::new("ns", "web")),
            Some(ServiceRef::new("default", "web")),
            None
        ]
    );
}

#[test]
fn config_validation() {
    assert_eq!(ModelConfig::default().validate(), Ok(()));
    let bad = ModelConfig {
        default_scheduler: "fastest".into(),
        ..ModelConfig::default()
    };
    assert_eq!(
        bad.validate(),
        Err(ConfigError::UnknownScheduler("fastest".into()))
    );
    for s in KNOWN_SCHEDULERS {
        assert!(is_known_scheduler(s));
    }
}

// ---------------------------------------------------------------------------------------------
// Special addresses (unspecified, loopback, link-local unicast, multicast) as Service addresses

/// Each special address, its kind as the rejection names it, and a cluster IP of its family.
const SPECIAL_ADDRESSES: &[(&str, &str, &str)] = &[
    ("0.0.0.0", "an unspecified", "10.96.0.10"),
    ("127.0.0.1", "a loopback", "10.96.0.10"),
    ("127.10.20.30", "a loopback", "10.96.0.10"),
    ("169.254.169.254", "a link-local", "10.96.0.10"),
    ("224.0.0.1", "a multicast", "10.96.0.10"),
    ("239.255.255.250", "a multicast", "10.96.0.10"),
    ("::", "an unspecified", "fd00::10"),
    ("::1", "a loopback", "fd00::10"),
    ("fe80::1", "a link-local", "fd00::10"),
    ("febf::ffff", "a link-local", "fd00::10"),
    ("ff02::1", "a multicast", "fd00::10"),
    ("ff0e::101", "a multicast", "fd00::10"),
];

#[test]
fn special_address_kinds() {
    for &(a, kind, _) in SPECIAL_ADDRESSES {
        assert_eq!(special_address(ip(a)), Some(kind), "{a}");
    }
    // IPv4-mapped IPv6 is IPv4 (Go's ParseIP does the same).
    assert_eq!(special_address(ip("::ffff:127.0.0.1")), Some("a loopback"));
    for a in [
        "10.96.0.10",
        "192.168.1.10",
        "198.51.100.7",
        "169.255.0.1",
        "255.255.255.254",
        "2001:db8::1",
        "fd00::10",
        "fec0::1",
    ] {
        assert_eq!(special_address(ip(a)), None, "{a}");
    }
}

/// Builds `services` plus the bystander on [`test_node`].
fn build_with_bystander(services: Vec<Value>) -> DesiredState {
    let mut services = services;
    services.push(bystander());
    build(
        &to_services(&services),
        &[] as &[EndpointSlice],
        &test_node(),
        &ModelConfig::default(),
    )
}

#[test]
fn special_cluster_ips_reject_the_service() {
    for &(a, kind, _) in SPECIAL_ADDRESSES {
        for spec in [
            json!({"clusterIPs": [a], "ports": [{"port": 80}]}),
            json!({"clusterIP": a, "ports": [{"port": 80}]}),
        ] {
            let state = build_with_bystander(vec![svc("ns", "bad", spec)]);
            assert_eq!(lines(&state), vec![BYSTANDER], "{a}");
            assert_eq!(
                state.rejected,
                vec![Rejection {
                    object: "Service ns/bad".into(),
                    reason: format!("cluster IP {a} is {kind} address"),
                }],
                "{a}"
            );
            assert!(!state.bound_addresses.contains(&ip(a)), "{a}");
        }
    }
}

#[test]
fn special_external_ips_are_refused_and_the_rest_programmed() {
    for &(a, kind, cluster_ip) in SPECIAL_ADDRESSES {
        let state = build_with_bystander(vec![svc(
            "ns",
            "bad",
            json!({"clusterIP": cluster_ip, "externalIPs": [a], "ports": [{"name": "http", "port": 80}]}),
        )]);
        let cluster = format!(
            "TCP {} rr (ClusterIP ns/bad:http) -> none",
            SocketAddr::new(ip(cluster_ip), 80)
        );
        let want: BTreeSet<String> = [cluster, BYSTANDER.to_owned()].into_iter().collect();
        let got: BTreeSet<String> = lines(&state).into_iter().collect();
        assert_eq!(got, want, "{a}");
        assert_eq!(
            state.rejected,
            vec![Rejection {
                object: "Service ns/bad".into(),
                reason: format!("external IP {a} is {kind} address; not programmed"),
            }],
            "{a}"
        );
        assert!(!state.bound_addresses.contains(&ip(a)), "{a}");
        assert!(!state.service_addresses.contains(&ip(a)), "{a}");
    }
}

#[test]
fn special_load_balancer_ingress_ips_are_refused_and_the_rest_programmed() {
    for &(a, kind, cluster_ip) in SPECIAL_ADDRESSES {
        let state = build_with_bystander(vec![svc_full(
            "ns",
            "bad",
            json!({}),
            json!({"type": "LoadBalancer", "clusterIP": cluster_ip,
                   "ports": [{"name": "http", "port": 80}]}),
            // A good ingress IP beside the special one is still programmed.
            json!({"loadBalancer": {"ingress": [{"ip": a}, {"ip": if cluster_ip.contains(':') { "2001:db8::77" } else { "203.0.113.7" }}]}}),
        )]);
        assert!(
            state.virtual_services.iter().all(|v| v.address != ip(a)),
            "{a}: {:#?}",
            lines(&state)
        );
        let kinds: BTreeSet<VirtualServiceKind> = state
            .virtual_services
            .iter()
            .filter(|v| v.service.name == "bad")
            .map(|v| v.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                VirtualServiceKind::ClusterIp,
                VirtualServiceKind::LoadBalancer
            ]
            .into_iter()
            .collect(),
            "{a}: the ClusterIP and the good ingress IP"
        );
        assert_eq!(
            state.rejected,
            vec![Rejection {
                object: "Service ns/bad".into(),
                reason: format!("load balancer ingress IP {a} is {kind} address; not programmed"),
            }],
            "{a}"
        );
        assert!(!state.bound_addresses.contains(&ip(a)), "{a}");
    }
}
