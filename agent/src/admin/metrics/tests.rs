use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

use super::*;
use crate::model::{self, EndpointSliceInfo, LocalAddress, ModelConfig, NodeInfo};

/// The kube-proxy metric names a dashboard reads, as kube-proxy v1.36 exported them
/// (reference `metrics-at-sync.txt` plus the histograms it exports once observed).
const KUBE_PROXY_SAMPLES: &[&str] = &[
    "kubeproxy_sync_proxy_rules_duration_seconds_bucket{",
    "kubeproxy_sync_proxy_rules_duration_seconds_sum{ip_family=\"IPv4\"}",
    "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
    "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
    "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"}",
    "kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"}",
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending ",
    "kubeproxy_sync_proxy_rules_endpoint_changes_total ",
    "kubeproxy_sync_proxy_rules_service_changes_pending ",
    "kubeproxy_sync_proxy_rules_service_changes_total ",
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv4\"}",
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"}",
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"}",
    "kubeproxy_proxy_healthz_total{code=\"200\"}",
];

fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn kube_proxy_names_labels_and_types() {
    let m = Metrics::new(&[IpFamily::IPv4]);
    m.queued(UNIX_EPOCH + Duration::from_secs(1_795_306_679));
    m.changes(Changes {
        services: 10,
        endpoint_slices: 4,
    });
    m.observe_sync_at(
        Duration::from_millis(20),
        true,
        UNIX_EPOCH + Duration::from_secs(1_795_306_689),
    );
    m.observe_sync(Duration::from_millis(3), false);
    m.network_programming(Duration::from_millis(1500));
    m.healthz(200);
    let text = m.encode();
    for s in KUBE_PROXY_SAMPLES {
        assert!(text.contains(s), "missing {s} in\n{text}");
    }
    for (name, ty) in [
        ("kubeproxy_sync_proxy_rules_duration_seconds", "histogram"),
        (
            "kubeproxy_network_programming_duration_seconds",
            "histogram",
        ),
        ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "gauge"),
        (
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "gauge",
        ),
        ("kubeproxy_sync_proxy_rules_endpoint_changes", "counter"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {ty}\n")),
            "{name} is not a {ty}:\n{text}"
        );
    }
    assert_eq!(
        sample(&text, "kubeproxy_sync_proxy_rules_service_changes_total "),
        Some(10.0)
    );
    assert_eq!(
        sample(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_total "),
        Some(4.0)
    );
    assert_eq!(
        sample(&text, "kubeproxy_sync_proxy_rules_service_changes_pending "),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{"
        ),
        Some(1_795_306_679.0)
    );
    assert_eq!(
        sample(&text, "kubeproxy_sync_proxy_rules_duration_seconds_count{"),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{"
        ),
        Some(1.0)
    );
    // kube-proxy's buckets.
    assert!(
        text.contains(
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.032\",ip_family=\"IPv4\"} 2"
        ) || text.contains(
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.032\"} 2"
        ),
        "{text}"
    );
    assert!(text.contains("le=\"16.384\""), "{text}");
    assert!(text.contains("le=\"300.0\""), "{text}");
    assert!(text.contains("le=\"0.25\""), "{text}");
}

#[test]
fn pending_changes_accumulate_until_a_successful_sync() {
    let m = Metrics::new(&[]);
    m.changes(Changes {
        services: 1,
        endpoint_slices: 2,
    });
    m.changes(Changes {
        services: 1,
        endpoint_slices: 0,
    });
    m.sync_failed(Duration::from_millis(1), false);
    let t = m.encode();
    assert_eq!(
        sample(&t, "kubeproxy_sync_proxy_rules_service_changes_pending "),
        Some(2.0)
    );
    assert_eq!(sample(&t, "kube_ipvs_bpf_sync_failures_total "), Some(1.0));
    m.observe_sync(Duration::from_millis(1), false);
    let t = m.encode();
    assert_eq!(
        sample(&t, "kubeproxy_sync_proxy_rules_service_changes_pending "),
        Some(0.0)
    );
    assert_eq!(
        sample(&t, "kubeproxy_sync_proxy_rules_endpoint_changes_pending "),
        Some(0.0)
    );
    assert_eq!(
        sample(&t, "kubeproxy_sync_proxy_rules_service_changes_total "),
        Some(2.0)
    );
}

#[test]
fn dual_stack_writes_each_family() {
    let m = Metrics::new(&[IpFamily::IPv6, IpFamily::IPv4, IpFamily::IPv6]);
    m.observe_sync(Duration::from_millis(5), false);
    let t = m.encode();
    assert!(
        t.contains("kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1"),
        "{t}"
    );
    assert!(
        t.contains("kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"} 1"),
        "{t}"
    );
}

#[test]
fn ipvs_operations_by_kind_and_result() {
    let m = Metrics::new(&[]);
    let mut c = OpCounts::default();
    c.issued.insert("add_service", 3);
    c.failed.insert("add_service", 1);
    c.issued.insert("delete_destination", 2);
    m.ipvs_ops(&c);
    m.ipvs_ops(&c);
    let t = m.encode();
    for (line, v) in [
        (
            "kube_ipvs_bpf_ipvs_operations_total{operation=\"add_service\",result=\"success\"}",
            4.0,
        ),
        (
            "kube_ipvs_bpf_ipvs_operations_total{operation=\"add_service\",result=\"failure\"}",
            2.0,
        ),
        (
            "kube_ipvs_bpf_ipvs_operations_total{operation=\"delete_destination\",result=\"success\"}",
            4.0,
        ),
    ] {
        assert_eq!(sample(&t, line), Some(v), "{line}\n{t}");
    }
    assert!(!t.contains("delete_destination\",result=\"failure\""));
}

#[test]
fn node_repairs_exist_at_zero_and_count_each_repair_by_part() {
    use crate::node_state::{Part, Repair};
    let m = Metrics::new(&[]);
    let t = m.encode();
    for what in ["iptables", "nftables", "sysctl", "tc", "kube_ipvs0"] {
        let name = format!("kube_ipvs_bpf_node_repairs_total{{what=\"{what}\"}}");
        assert_eq!(sample(&t, &name), Some(0.0), "{name}");
    }
    let r = |part| Repair {
        part,
        found: String::new(),
    };
    m.node_repairs(&[r(Part::Iptables), r(Part::Iptables), r(Part::Sysctl)]);
    let t = m.encode();
    assert_eq!(
        sample(&t, "kube_ipvs_bpf_node_repairs_total{what=\"iptables\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample(&t, "kube_ipvs_bpf_node_repairs_total{what=\"sysctl\"}"),
        Some(1.0)
    );
}

#[test]
fn snat_reroute_appears_once_written_with_its_mode() {
    let m = Metrics::new(&[]);
    assert!(!m.encode().contains("kube_ipvs_bpf_ipvs_snat_reroute{"));
    m.snat_reroute("auto", false);
    let t = m.encode();
    assert!(
        t.contains("# TYPE kube_ipvs_bpf_ipvs_snat_reroute gauge"),
        "{t}"
    );
    assert_eq!(
        sample(&t, "kube_ipvs_bpf_ipvs_snat_reroute{mode=\"auto\"}"),
        Some(0.0)
    );
    m.snat_reroute("auto", true);
    assert_eq!(
        sample(
            &m.encode(),
            "kube_ipvs_bpf_ipvs_snat_reroute{mode=\"auto\"}"
        ),
        Some(1.0)
    );
    m.snat_reroute("on", true);
    let t = m.encode();
    assert_eq!(
        sample(&t, "kube_ipvs_bpf_ipvs_snat_reroute{mode=\"auto\"}"),
        None
    );
    assert_eq!(
        sample(&t, "kube_ipvs_bpf_ipvs_snat_reroute{mode=\"on\"}"),
        Some(1.0)
    );
}

#[test]
fn datapath_counters_advance_by_difference_and_survive_resets() {
    let m = Metrics::new(&[]);
    m.datapath_counters(&[("snat_alloc", 10), ("port_exhausted", 0)]);
    m.datapath_counters(&[("snat_alloc", 25), ("port_exhausted", 1)]);
    let t = m.encode();
    assert_eq!(
        sample(
            &t,
            "kube_ipvs_bpf_datapath_events_total{event=\"snat_alloc\"}"
        ),
        Some(25.0)
    );
    assert_eq!(
        sample(
            &t,
            "kube_ipvs_bpf_datapath_events_total{event=\"port_exhausted\"}"
        ),
        Some(1.0)
    );
    // Maps recreated: the counter restarts from 3, the exported value keeps growing.
    m.datapath_counters(&[("snat_alloc", 3)]);
    let t = m.encode();
    assert_eq!(
        sample(
            &t,
            "kube_ipvs_bpf_datapath_events_total{event=\"snat_alloc\"}"
        ),
        Some(28.0)
    );
}

#[test]
fn rejected_by_kind() {
    let m = Metrics::new(&[]);
    m.rejected(&[
        Rejection {
            object: "Service ns/a".into(),
            reason: "x".into(),
        },
        Rejection {
            object: "Service ns/b".into(),
            reason: "x".into(),
        },
        Rejection {
            object: "EndpointSlice ns/c".into(),
            reason: "y".into(),
        },
    ]);
    let t = m.encode();
    assert_eq!(
        sample(&t, "kube_ipvs_bpf_rejected_objects{kind=\"Service\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample(&t, "kube_ipvs_bpf_rejected_objects{kind=\"EndpointSlice\"}"),
        Some(1.0)
    );
    m.rejected(&[]);
    let t = m.encode();
    assert_eq!(
        sample(&t, "kube_ipvs_bpf_rejected_objects{kind=\"Service\"}"),
        Some(0.0)
    );
}

fn service(
    name: &str,
    itp: &str,
    etp: &str,
    cluster_ip: &str,
    node_port: u16,
) -> k8s_openapi::api::core::v1::Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "ns", "name": name, "resourceVersion": "1"},
        "spec": {"type": "NodePort", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "internalTrafficPolicy": itp, "externalTrafficPolicy": etp,
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080,
                            "nodePort": node_port}]}
    }))
    .unwrap()
}

fn slice(name: &str, service: &str, node: &str, trigger: Option<&str>, rv: &str) -> EndpointSlice {
    let mut annotations = serde_json::Map::new();
    if let Some(t) = trigger {
        annotations.insert(LAST_CHANGE_TRIGGER_TIME_ANNOTATION.into(), json!(t));
    }
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "ns", "name": name, "resourceVersion": rv,
                     "labels": {"kubernetes.io/service-name": service},
                     "annotations": annotations},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.2.2"], "nodeName": node,
                       "conditions": {"ready": true, "serving": true, "terminating": false}}]
    }))
    .unwrap()
}

/// [`slice`] as a source keeps it.
fn info(
    name: &str,
    service: &str,
    node: &str,
    trigger: Option<&str>,
    rv: &str,
) -> EndpointSliceInfo {
    slice(name, service, node, trigger, rv).into()
}

#[test]
fn no_local_endpoints_counts_local_policies_without_local_endpoints() {
    let services = vec![
        service("itp-local", "Local", "Cluster", "10.96.0.10", 30010),
        service("etp-local", "Cluster", "Local", "10.96.0.11", 30011),
        service("both-local-served", "Local", "Local", "10.96.0.12", 30012),
        service("cluster", "Cluster", "Cluster", "10.96.0.13", 30013),
    ];
    let slices = vec![
        slice("a", "itp-local", "other-node", None, "1"),
        slice("b", "etp-local", "other-node", None, "1"),
        slice("c", "both-local-served", "n1", None, "1"),
        slice("d", "cluster", "other-node", None, "1"),
    ];
    let node = NodeInfo {
        name: "n1".into(),
        addresses: vec![LocalAddress {
            address: "10.10.1.1".parse().unwrap(),
            interface: "eth0".into(),
        }],
        internal_ips: vec!["10.10.1.1".parse().unwrap()],
        ..NodeInfo::default()
    };
    let desired = model::build(&services, &slices, &node, &ModelConfig::default());
    let n = no_local_endpoints(&desired);
    let expected: BTreeMap<_, _> = [
        ((IpFamily::IPv4, TrafficPolicy::Internal), 1),
        ((IpFamily::IPv4, TrafficPolicy::External), 1),
    ]
    .into_iter()
    .collect();
    assert_eq!(n.counts, expected);
    let m = Metrics::new(&[IpFamily::IPv4]);
    m.no_local_endpoints(&n);
    let t = m.encode();
    assert_eq!(
        sample(
            &t,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn change_tracker_counts_adds_updates_and_deletes() {
    let started = UNIX_EPOCH + Duration::from_secs(1_795_306_000);
    let mut tr = ChangeTracker::new(started);
    let mut snap = Snapshot {
        services: vec![
            Arc::new(service("a", "Cluster", "Cluster", "10.96.0.10", 30010).into()),
            Arc::new(service("b", "Cluster", "Cluster", "10.96.0.11", 30011).into()),
        ]
        .into(),
        endpoint_slices: vec![
            Arc::new(info("a-1", "a", "n1", Some("2026-11-22T00:18:00Z"), "1")),
            // Before the agent started: not a programming latency.
            Arc::new(info("b-1", "b", "n1", Some("2026-11-21T00:00:00Z"), "1")),
        ]
        .into(),
        ..Snapshot::default()
    };
    assert_eq!(
        tr.observe(&Arc::new(snap.clone())),
        Changes {
            services: 2,
            endpoint_slices: 2
        }
    );
    let t = tr.take_trigger_times();
    assert_eq!(t, vec![UNIX_EPOCH + Duration::from_secs(1_795_306_680)]);
    assert!(tr.take_trigger_times().is_empty());

    // Nothing changed: the same objects.
    assert_eq!(tr.observe(&Arc::new(snap.clone())), Changes::default());
    assert!(tr.take_trigger_times().is_empty());

    // One slice updated (a new object with a new trigger time), one Service deleted.
    snap.endpoint_slices.insert(Arc::new(info(
        "a-1",
        "a",
        "n1",
        Some("2026-11-22T00:20:00.5Z"),
        "2",
    )));
    snap.services.remove("ns", "b");
    assert_eq!(
        tr.observe(&Arc::new(snap.clone())),
        Changes {
            services: 1,
            endpoint_slices: 1
        }
    );
    let t = tr.take_trigger_times();
    assert_eq!(
        t,
        vec![UNIX_EPOCH + Duration::from_millis(1_795_306_800_500)]
    );

    let m = Metrics::new(&[]);
    m.programmed(&t, t[0] + Duration::from_secs(2));
    let text = m.encode();
    assert_eq!(
        sample(&text, "kubeproxy_network_programming_duration_seconds_sum{"),
        Some(2.0)
    );
}

#[test]
fn change_tracker_compares_objects_by_identity_even_out_of_order() {
    let mut tr = ChangeTracker::new(SystemTime::UNIX_EPOCH);
    let a: Arc<model::ServiceInfo> =
        Arc::new(service("a", "Cluster", "Cluster", "10.96.0.10", 30010).into());
    let b: Arc<model::ServiceInfo> =
        Arc::new(service("b", "Cluster", "Cluster", "10.96.0.11", 30011).into());
    let snap = |services: Vec<Arc<model::ServiceInfo>>| {
        Arc::new(Snapshot {
            services: services.into(),
            ..Snapshot::default()
        })
    };
    assert_eq!(tr.observe(&snap(vec![a.clone(), b.clone()])).services, 2);
    // Reordered, same objects: nothing changed.
    assert_eq!(tr.observe(&snap(vec![b.clone(), a.clone()])).services, 0);
    // An object re-created by the source counts as a change (sources share unchanged ones).
    let a2 = Arc::new((*a).clone());
    assert_eq!(tr.observe(&snap(vec![a2, b.clone()])).services, 1);
    // Inserted in the middle: one addition.
    let c: Arc<model::ServiceInfo> =
        Arc::new(service("c", "Cluster", "Cluster", "10.96.0.12", 30012).into());
    let a3 = Arc::new((*a).clone());
    tr.observe(&snap(vec![a3.clone(), b.clone()]));
    assert_eq!(tr.observe(&snap(vec![a3, c, b])).services, 1);
}

#[tokio::test]
async fn serves_metrics_over_http() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let m = Metrics::new(&[]);
    m.observe_sync(Duration::from_millis(5), true);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let task = serve(SocketAddr::from(([127, 0, 0, 1], port)), m)
        .await
        .unwrap();
    for (path, want) in [
        (
            "/metrics",
            "kubeproxy_sync_proxy_rules_duration_seconds_count",
        ),
        ("/healthz", "ok"),
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.unwrap();
        assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
        assert!(raw.contains(want), "{raw}");
        if path == "/metrics" {
            assert!(
                raw.to_ascii_lowercase()
                    .contains("content-type: application/openmetrics-text"),
                "{raw}"
            );
        }
    }
    task.abort();
}

#[test]
fn drops_are_counted_by_reason_from_the_datapath_counters() {
    let m = Metrics::new(&[]);
    m.datapath_counters(&[
        ("snat_alloc", 10),
        ("port_exhausted", 2),
        ("map_full", 0),
        ("filtered_port", 5),
        ("parse_error", 7),
    ]);
    m.datapath_counters(&[
        ("snat_alloc", 12),
        ("port_exhausted", 3),
        ("map_full", 4),
        ("lock_busy", 1),
        ("filtered_port", 5),
        ("parse_error", 9),
    ]);
    let t = m.encode();
    for (line, v) in [
        (
            "kube_ipvs_bpf_datapath_drops_total{reason=\"port_exhausted\"}",
            3.0,
        ),
        (
            "kube_ipvs_bpf_datapath_drops_total{reason=\"map_full\"}",
            4.0,
        ),
        (
            "kube_ipvs_bpf_datapath_drops_total{reason=\"lock_busy\"}",
            1.0,
        ),
        (
            "kube_ipvs_bpf_datapath_drops_total{reason=\"filtered_port\"}",
            5.0,
        ),
    ] {
        assert_eq!(sample(&t, line), Some(v), "{line}\n{t}");
    }
    assert!(!t.contains("reason=\"snat_alloc\""), "{t}");
    assert!(!t.contains("reason=\"parse_error\""), "{t}");
}

#[test]
fn sweeps_report_duration_failures_occupancy_and_expiries() {
    let m = Metrics::new(&[]);
    m.swept(
        Duration::from_millis(30),
        &[("snat", 100, 262_144), ("conns", 40, 262_144)],
        &[("snat", 3), ("conns", 1)],
    );
    m.swept(
        Duration::from_millis(20),
        &[("snat", 90, 262_144), ("conns", 41, 262_144)],
        &[("snat", 10), ("conns", 0)],
    );
    m.sweep_failed(Duration::from_millis(5));
    let t = m.encode();
    for (line, v) in [
        ("kube_ipvs_bpf_datapath_map_entries{map=\"snat\"}", 90.0),
        ("kube_ipvs_bpf_datapath_map_entries{map=\"conns\"}", 41.0),
        (
            "kube_ipvs_bpf_datapath_map_capacity{map=\"snat\"}",
            262_144.0,
        ),
        (
            "kube_ipvs_bpf_datapath_map_capacity{map=\"conns\"}",
            262_144.0,
        ),
        (
            "kube_ipvs_bpf_sweep_expired_entries_total{map=\"snat\"}",
            13.0,
        ),
        (
            "kube_ipvs_bpf_sweep_expired_entries_total{map=\"conns\"}",
            1.0,
        ),
        ("kube_ipvs_bpf_sweep_failures_total", 1.0),
        ("kube_ipvs_bpf_sweep_duration_seconds_count", 3.0),
    ] {
        assert_eq!(sample(&t, line), Some(v), "{line}\n{t}");
    }
}
