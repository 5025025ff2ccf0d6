//! The Kubernetes source against the fake API server (`lab::fake_apiserver`): what it
//! publishes on start, on watch events, bookmarks, a `410 Gone` relist, an API server that is
//! gone for a while, and the Node object; plus `list_once` and the Service Events.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agent::model::ServiceRef;
use agent::source::Snapshot;
use agent::source::kubernetes::{
    self, KubernetesSourceConfig, LABEL_SELECTOR, ServiceEvents, WatchOptions,
};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lab::fake_apiserver::FakeApiServer;
use serde_json::json;
use tokio::sync::watch;

const NODE: &str = "node-a";
const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const NODES: &str = "/api/v1/nodes";

/// Runs a test body with a time limit.
async fn bounded<F: Future<Output = ()>>(secs: u64, body: F) {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
    tokio::time::timeout(Duration::from_secs(secs), body)
        .await
        .expect("test timed out");
}

fn service(ns: &str, name: &str, ip: &str, port: u16, labels: serde_json::Value) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "http", "protocol": "TCP", "port": port, "targetPort": 8080}]},
    }))
    .expect("service")
}

fn slice(
    ns: &str,
    svc: &str,
    name: &str,
    ips: &[&str],
    labels: serde_json::Value,
) -> EndpointSlice {
    let mut labels = labels;
    labels["kubernetes.io/service-name"] = json!(svc);
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": ips.iter().map(|ip| json!({
            "addresses": [ip], "conditions": {"ready": true}, "nodeName": NODE,
        })).collect::<Vec<_>>(),
    }))
    .expect("slice")
}

fn node(name: &str, ip: &str, zone: &str, heartbeat: &str) -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "topology.kubernetes.io/zone": zone,
        }},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": heartbeat}],
        },
    }))
    .expect("node")
}

fn options() -> WatchOptions {
    WatchOptions {
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        watch_timeout: Some(60),
        debounce: Duration::from_millis(5),
        min_publish_interval: Duration::from_millis(20),
    }
}

/// A client of `server`, built from a kubeconfig file as `--kubeconfig` does.
async fn client(server: &FakeApiServer) -> (tempfile::TempDir, kube::Client) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path).expect("kubeconfig");
    let cfg = KubernetesSourceConfig {
        kubeconfig: Some(path),
        node_name: NODE.into(),
        ..Default::default()
    };
    let client = kubernetes::client(&cfg).await.expect("client");
    (dir, client)
}

async fn start(server: &FakeApiServer) -> (tempfile::TempDir, watch::Receiver<Arc<Snapshot>>) {
    let (dir, client) = client(server).await;
    let rx = kubernetes::watch_with(client, NODE.into(), options())
        .await
        .expect("watch");
    (dir, rx)
}

fn names<K: agent::model::Keyed>(objs: &agent::model::Objects<K>) -> Vec<String> {
    objs.iter()
        .map(|o| {
            let (ns, name) = o.object_key();
            format!("{ns}/{name}")
        })
        .collect()
}

fn port_of(s: &Snapshot, name: &str) -> Option<i32> {
    s.services
        .iter()
        .find(|x| &*x.name == name)
        .and_then(|x| x.ports.first().map(|p| p.port))
}

fn slice_ips(s: &Snapshot, name: &str) -> Vec<String> {
    s.endpoint_slices
        .iter()
        .filter(|x| &*x.name == name)
        .flat_map(|x| x.endpoints.iter().filter_map(|e| e.address.as_ref()))
        .map(|a| match a {
            agent::model::SliceAddress::Ip(ip) => ip.to_string(),
            agent::model::SliceAddress::Invalid(a) => a.to_string(),
        })
        .collect()
}

/// Waits for a snapshot satisfying `done`, checking `invariant` on every snapshot seen and
/// that generations increase. Returns it and how many snapshots were seen.
async fn wait_for(
    rx: &mut watch::Receiver<Arc<Snapshot>>,
    what: &str,
    invariant: impl Fn(&Snapshot),
    done: impl Fn(&Snapshot) -> bool,
) -> (Arc<Snapshot>, usize) {
    let mut last = rx.borrow().generation;
    let mut seen = 0;
    loop {
        tokio::time::timeout(Duration::from_secs(15), rx.changed())
            .await
            .unwrap_or_else(|_| panic!("no snapshot where {what}"))
            .expect("source closed");
        let s = rx.borrow_and_update().clone();
        seen += 1;
        assert!(
            s.generation > last,
            "generation went from {last} to {}",
            s.generation
        );
        last = s.generation;
        invariant(&s);
        if done(&s) {
            return (s, seen);
        }
    }
}

/// Asserts that nothing is published for `ms` milliseconds.
async fn quiet(rx: &mut watch::Receiver<Arc<Snapshot>>, ms: u64, why: &str) {
    if tokio::time::timeout(Duration::from_millis(ms), rx.changed())
        .await
        .is_ok()
    {
        let s = rx.borrow_and_update().clone();
        panic!(
            "unexpected snapshot ({why}): generation {}: {:?}",
            s.generation,
            names(&s.services)
        );
    }
}

/// Waits until `n` more watch requests (of any resource) have reached the server.
async fn wait_watches(server: &FakeApiServer, n: usize) {
    for _ in 0..200 {
        if server.requests().iter().filter(|r| r.is_watch()).count() >= n {
            // Let the server start streaming them.
            tokio::time::sleep(Duration::from_millis(50)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the source did not start {n} watches: {:#?}",
        server.requests()
    );
}

/// The usual starting objects.
async fn populated() -> FakeApiServer {
    let server = FakeApiServer::new().await.expect("server");
    server
        .apply(&service("a", "web", "10.96.0.10", 80, json!({})))
        .expect("apply");
    server
        .apply(&slice(
            "a",
            "web",
            "web-1",
            &["10.1.0.1", "10.1.0.2"],
            json!({}),
        ))
        .expect("apply");
    server
        .apply(&node(NODE, "192.168.1.10", "z1", "2024-01-01T00:00:00Z"))
        .expect("apply");
    server
        .apply(&node(
            "node-b",
            "192.168.1.11",
            "z2",
            "2024-01-01T00:00:00Z",
        ))
        .expect("apply");
    server
}

#[tokio::test]
async fn initial_list_has_all_three_kinds() {
    bounded(30, async {
        let server = populated().await;
        let headless = json!({"service.kubernetes.io/headless": ""});
        server
            .apply(&service("a", "hl", "10.96.0.11", 80, headless.clone()))
            .expect("apply");
        server
            .apply(&slice("a", "hl", "hl-1", &["10.1.0.9"], headless))
            .expect("apply");
        let ours = json!({"service.kubernetes.io/service-proxy-name": "kube-ipvs-bpf"});
        server
            .apply(&service("b", "ours", "10.96.0.12", 81, ours))
            .expect("apply");

        let (_dir, rx) = start(&server).await;
        let s = rx.borrow().clone();
        assert_eq!(s.generation, 1);
        assert_eq!(
            names(&s.services),
            ["a/web", "b/ours"],
            "headless-labelled Services are filtered"
        );
        assert_eq!(names(&s.endpoint_slices), ["a/web-1"]);
        assert_eq!(slice_ips(&s, "web-1"), ["10.1.0.1", "10.1.0.2"]);
        let node = s.node.as_ref().expect("node");
        assert_eq!(node.metadata.name.as_deref(), Some(NODE));
        let addrs = node
            .status
            .as_ref()
            .and_then(|st| st.addresses.clone())
            .unwrap_or_default();
        assert!(
            addrs
                .iter()
                .any(|a| a.type_ == "InternalIP" && a.address == "192.168.1.10")
        );
        let labels = node.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels
                .get("topology.kubernetes.io/zone")
                .map(String::as_str),
            Some("z1")
        );
        // The object is what the server holds (server-set fields included), as the source
        // keeps it.
        let stored = server.objects::<Service>().expect("objects");
        let web = stored
            .iter()
            .find(|x| x.metadata.name.as_deref() == Some("web"))
            .expect("web");
        assert_eq!(
            Some(agent::model::ServiceInfo::from(web)),
            s.services
                .iter()
                .find(|x| &*x.name == "web")
                .map(|v| (**v).clone())
        );

        let reqs = server.requests();
        for path in [SERVICES, SLICES] {
            let list = reqs.iter().find(|r| r.is_list_of(path)).expect("list");
            assert_eq!(list.param("labelSelector"), Some(LABEL_SELECTOR), "{path}");
        }
        let list = reqs
            .iter()
            .find(|r| r.is_list_of(NODES))
            .expect("node list");
        assert_eq!(list.param("fieldSelector"), Some("metadata.name=node-a"));
    })
    .await;
}

#[tokio::test]
async fn nothing_published_before_all_lists_complete() {
    bounded(30, async {
        let server = populated().await;
        server.fail_requests(SLICES, 500);
        let (_dir, client) = client(&server).await;
        let pending = tokio::spawn(kubernetes::watch_with(client, NODE.into(), options()));
        // Services and the Node list fine; EndpointSlices keep failing.
        for _ in 0..100 {
            let reqs = server.requests();
            if reqs.iter().any(|r| r.is_list_of(SERVICES))
                && reqs.iter().any(|r| r.is_list_of(NODES))
                && reqs.iter().filter(|r| r.is_list_of(SLICES)).count() >= 3
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            server
                .requests()
                .iter()
                .filter(|r| r.is_list_of(SLICES))
                .count()
                >= 3,
            "retried"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !pending.is_finished(),
            "watch returned before the EndpointSlices were listed"
        );

        server.clear_faults();
        let rx = tokio::time::timeout(Duration::from_secs(10), pending)
            .await
            .expect("watch did not return")
            .expect("join")
            .expect("watch");
        let s = rx.borrow().clone();
        assert_eq!(s.generation, 1);
        assert_eq!(names(&s.services), ["a/web"]);
        assert_eq!(names(&s.endpoint_slices), ["a/web-1"]);
        assert!(s.node.is_some());
    })
    .await;
}

#[tokio::test]
async fn watch_events_add_modify_delete() {
    bounded(60, async {
        let server = populated().await;
        let (_dir, mut rx) = start(&server).await;
        let web_there = |s: &Snapshot| assert!(port_of(s, "web").is_some(), "web missing");

        server
            .apply(&service("a", "api", "10.96.0.20", 443, json!({})))
            .expect("apply");
        let (s, _) = wait_for(&mut rx, "api added", web_there, |s| {
            port_of(s, "api") == Some(443)
        })
        .await;
        assert_eq!(names(&s.services), ["a/api", "a/web"]);

        server
            .apply(&service("a", "web", "10.96.0.10", 8080, json!({})))
            .expect("apply");
        wait_for(&mut rx, "web modified", web_there, |s| {
            port_of(s, "web") == Some(8080)
        })
        .await;

        server
            .apply(&slice("a", "api", "api-1", &["10.1.1.1"], json!({})))
            .expect("apply");
        wait_for(&mut rx, "slice added", web_there, |s| {
            slice_ips(s, "api-1") == ["10.1.1.1"]
        })
        .await;

        server
            .apply(&slice("a", "web", "web-1", &["10.1.0.3"], json!({})))
            .expect("apply");
        wait_for(&mut rx, "slice modified", web_there, |s| {
            slice_ips(s, "web-1") == ["10.1.0.3"]
        })
        .await;

        assert!(server.delete::<Service>(Some("a"), "api"));
        let (s, _) = wait_for(&mut rx, "api deleted", web_there, |s| {
            port_of(s, "api").is_none()
        })
        .await;
        assert_eq!(names(&s.services), ["a/web"]);

        assert!(server.delete::<EndpointSlice>(Some("a"), "api-1"));
        let (s, _) = wait_for(&mut rx, "slice deleted", web_there, |s| {
            slice_ips(s, "api-1").is_empty()
        })
        .await;
        assert_eq!(names(&s.endpoint_slices), ["a/web-1"]);

        // A Service gaining the headless label leaves the selector: the server sends DELETED.
        let headless = json!({"service.kubernetes.io/headless": ""});
        server
            .apply(&service("a", "web", "10.96.0.10", 8080, headless))
            .expect("apply");
        wait_for(&mut rx, "web filtered", |_| {}, |s| s.services.is_empty()).await;
        server
            .apply(&service("a", "web", "10.96.0.10", 8080, json!({})))
            .expect("apply");
        wait_for(&mut rx, "web back", |_| {}, |s| port_of(s, "web").is_some()).await;

        // A burst is coalesced.
        for i in 0..50 {
            let name = format!("burst-{i}");
            server
                .apply(&service("b", &name, "10.96.1.1", 80, json!({})))
                .expect("apply");
        }
        let (_, seen) = wait_for(&mut rx, "burst applied", web_there, |s| {
            s.services.len() == 51
        })
        .await;
        assert!(seen < 10, "{seen} snapshots for a burst of 50 changes");
    })
    .await;
}

#[tokio::test]
async fn bookmarks_advance_resource_version_without_publishing() {
    bounded(60, async {
        let server = populated().await;
        let (_dir, mut rx) = start(&server).await;
        wait_watches(&server, 3).await;

        // Changes the source does not watch move the revision on.
        for i in 0..3 {
            let cm: ConfigMap = serde_json::from_value(json!({
                "metadata": {"namespace": "a", "name": format!("cm-{i}")},
            }))
            .expect("configmap");
            server.apply(&cm).expect("apply");
        }
        let rv = server.resource_version();
        server.send_bookmarks();
        quiet(&mut rx, 500, "bookmarks").await;

        // Resuming after a compaction at `rv` works only from the bookmark's revision: no
        // relist, and nothing published.
        server.compact();
        server.clear_requests();
        server.disconnect();
        wait_watches(&server, 3).await;
        let reqs = server.requests();
        for path in [SERVICES, SLICES, NODES] {
            let w = reqs.iter().find(|r| r.is_watch_of(path)).expect("watch");
            assert_eq!(
                w.param("resourceVersion"),
                Some(rv.to_string().as_str()),
                "{path}"
            );
            assert_eq!(w.param("allowWatchBookmarks"), Some("true"), "{path}");
        }
        assert!(
            !reqs.iter().any(|r| r.method == "GET" && !r.is_watch()),
            "relisted: {reqs:#?}"
        );
        quiet(&mut rx, 300, "reconnect").await;

        // The resumed watches still deliver changes.
        server
            .apply(&service("a", "new", "10.96.0.30", 80, json!({})))
            .expect("apply");
        wait_for(
            &mut rx,
            "new added",
            |_| {},
            |s| port_of(s, "new").is_some(),
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn relist_after_410_is_complete_and_atomic() {
    bounded(60, async {
        let server = populated().await;
        for name in ["one", "two", "three"] {
            server
                .apply(&service("b", name, "10.96.2.1", 80, json!({})))
                .expect("apply");
        }
        server
            .apply(&slice("b", "two", "two-1", &["10.2.0.2"], json!({})))
            .expect("apply");
        let (_dir, mut rx) = start(&server).await;
        assert_eq!(
            names(&rx.borrow().services),
            ["a/web", "b/one", "b/three", "b/two"]
        );
        wait_watches(&server, 3).await;

        // While the server is gone: changes, then a compaction of their history.
        server.stop().await;
        assert!(server.delete::<Service>(Some("b"), "two"));
        assert!(server.delete::<EndpointSlice>(Some("b"), "two-1"));
        server
            .apply(&service("b", "four", "10.96.2.4", 80, json!({})))
            .expect("apply");
        server
            .apply(&slice("a", "web", "web-1", &["10.1.0.7"], json!({})))
            .expect("apply");
        server.compact();
        tokio::time::sleep(Duration::from_millis(500)).await;
        quiet(&mut rx, 100, "server stopped").await;
        server.clear_requests();
        server.start().await.expect("start");

        let invariant = |s: &Snapshot| {
            let n = names(&s.services);
            for kept in ["a/web", "b/one", "b/three"] {
                assert!(n.contains(&kept.to_string()), "{kept} missing from {n:?}");
            }
            assert!(!s.endpoint_slices.is_empty(), "no slices");
            assert!(s.node.is_some(), "node missing");
        };
        let (s, _) = wait_for(&mut rx, "relisted", invariant, |s| {
            names(&s.services) == ["a/web", "b/four", "b/one", "b/three"]
                && names(&s.endpoint_slices) == ["a/web-1"]
                && slice_ips(s, "web-1") == ["10.1.0.7"]
        })
        .await;
        assert!(s.node.is_some());
        let reqs = server.requests();
        for path in [SERVICES, SLICES, NODES] {
            assert!(
                reqs.iter().any(|r| r.is_list_of(path)),
                "{path} not relisted: {reqs:#?}"
            );
        }
        quiet(&mut rx, 300, "after the relist").await;
    })
    .await;
}

#[tokio::test]
async fn server_gone_keeps_last_snapshot_then_catches_up() {
    bounded(60, async {
        let server = populated().await;
        server
            .apply(&service("b", "one", "10.96.2.1", 80, json!({})))
            .expect("apply");
        let (_dir, mut rx) = start(&server).await;
        wait_watches(&server, 3).await;
        let before = rx.borrow().generation;

        server.stop().await;
        server
            .apply(&service("b", "five", "10.96.2.5", 80, json!({})))
            .expect("apply");
        assert!(server.delete::<Service>(Some("b"), "one"));
        quiet(&mut rx, 3000, "server gone").await;
        assert_eq!(rx.borrow().generation, before);
        assert_eq!(names(&rx.borrow().services), ["a/web", "b/one"]);

        server.clear_requests();
        server.start().await.expect("start");
        let never_empty = |s: &Snapshot| {
            assert!(!s.services.is_empty() && !s.endpoint_slices.is_empty() && s.node.is_some());
        };
        wait_for(&mut rx, "caught up", never_empty, |s| {
            names(&s.services) == ["a/web", "b/five"]
        })
        .await;
        // Resumed from the last revision: no relist was needed.
        let reqs = server.requests();
        assert!(
            !reqs.iter().any(|r| r.is_list_of(SERVICES)),
            "relisted: {reqs:#?}"
        );
    })
    .await;
}

#[tokio::test]
async fn node_object_changes() {
    bounded(60, async {
        let server = populated().await;
        let (_dir, mut rx) = start(&server).await;
        let zone = |s: &Snapshot| {
            s.node.as_ref().and_then(|n| {
                n.metadata
                    .labels
                    .as_ref()?
                    .get("topology.kubernetes.io/zone")
                    .cloned()
            })
        };
        assert_eq!(zone(&rx.borrow()), Some("z1".into()));

        server
            .apply(&node(NODE, "192.168.1.10", "z9", "2024-01-01T00:00:00Z"))
            .expect("apply");
        wait_for(
            &mut rx,
            "zone z9",
            |_| {},
            |s| zone(s).as_deref() == Some("z9"),
        )
        .await;

        // A heartbeat, or another node changing, publishes nothing.
        server
            .apply(&node(NODE, "192.168.1.10", "z9", "2024-01-01T00:05:00Z"))
            .expect("apply");
        server
            .apply(&node(
                "node-b",
                "192.168.1.11",
                "z7",
                "2024-01-01T00:05:00Z",
            ))
            .expect("apply");
        quiet(&mut rx, 500, "heartbeat").await;

        assert!(server.delete::<Node>(None, NODE));
        wait_for(&mut rx, "node gone", |_| {}, |s| s.node.is_none()).await;
        server
            .apply(&node(NODE, "192.168.1.20", "z1", "2024-01-01T00:00:00Z"))
            .expect("apply");
        let (s, _) = wait_for(&mut rx, "node back", |_| {}, |s| s.node.is_some()).await;
        let ips: Vec<String> = s
            .node
            .as_ref()
            .and_then(|n| n.status.as_ref()?.addresses.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.type_ == "InternalIP")
            .map(|a| a.address)
            .collect();
        assert_eq!(ips, ["192.168.1.20"]);
    })
    .await;
}

#[tokio::test]
async fn list_once_and_watch_page_through_large_lists() {
    bounded(60, async {
        let server = populated().await;
        for i in 0..520 {
            server
                .apply(&service(
                    "many",
                    &format!("s{i:03}"),
                    "10.96.3.1",
                    80,
                    json!({}),
                ))
                .expect("apply");
        }
        server
            .apply(&service(
                "a",
                "hl",
                "10.96.0.11",
                80,
                json!({"service.kubernetes.io/headless": ""}),
            ))
            .expect("apply");
        let (_dir, client) = client(&server).await;
        let s = kubernetes::list_once(client.clone(), NODE)
            .await
            .expect("list_once");
        assert_eq!(s.services.len(), 521);
        assert_eq!(names(&s.endpoint_slices), ["a/web-1"]);
        assert_eq!(
            s.node.as_ref().and_then(|n| n.metadata.name.as_deref()),
            Some(NODE)
        );
        let none = kubernetes::list_once(client.clone(), "no-such-node")
            .await
            .expect("list_once");
        assert!(none.node.is_none());

        let rx = kubernetes::watch_with(client, NODE.into(), options())
            .await
            .expect("watch");
        let w = rx.borrow().clone();
        assert_eq!(names(&w.services), names(&s.services));
        let paged = server
            .requests()
            .iter()
            .filter(|r| r.is_list_of(SERVICES) && r.param("continue").is_some())
            .count();
        assert_eq!(
            paged, 3,
            "one continued page for each list_once and the watcher"
        );
    })
    .await;
}

#[tokio::test]
async fn service_events_are_deduplicated() {
    bounded(30, async {
        let server = populated().await;
        let (_dir, client) = client(&server).await;
        let events = ServiceEvents::new(client.clone(), NODE);
        let web = ServiceRef::new("a", "web");
        let (_, rx) = start(&server).await;
        let uid = kubernetes::service_uid(&rx.borrow(), &web).map(str::to_string);
        assert!(uid.is_some());

        assert!(
            events
                .warn(
                    &web,
                    uid.as_deref(),
                    "UnsupportedScheduler",
                    "scheduler \"xx\" unknown"
                )
                .await
        );
        assert!(
            !events
                .warn(
                    &web,
                    uid.as_deref(),
                    "UnsupportedScheduler",
                    "scheduler \"xx\" unknown"
                )
                .await
        );
        let posted = server.events();
        assert_eq!(posted.len(), 1);
        let e = &posted[0];
        assert_eq!(e["apiVersion"], "events.k8s.io/v1");
        assert_eq!(e["metadata"]["namespace"], "a");
        assert_eq!(e["type"], "Warning");
        assert_eq!(e["reason"], "UnsupportedScheduler");
        assert_eq!(e["note"], "scheduler \"xx\" unknown");
        assert_eq!(e["reportingController"], "kube-ipvs-bpf");
        assert_eq!(e["reportingInstance"], NODE);
        assert_eq!(e["regarding"]["kind"], "Service");
        assert_eq!(e["regarding"]["name"], "web");
        assert_eq!(e["regarding"]["uid"], json!(uid));

        // A new message is a new Event; after `resolved`, the same message is posted again.
        assert!(
            events
                .warn(
                    &web,
                    uid.as_deref(),
                    "UnsupportedScheduler",
                    "scheduler \"yy\" unknown"
                )
                .await
        );
        assert_eq!(server.events().len(), 2);
        events.resolved(&web);
        assert!(
            events
                .warn(
                    &web,
                    uid.as_deref(),
                    "UnsupportedScheduler",
                    "scheduler \"yy\" unknown"
                )
                .await
        );
        assert_eq!(server.events().len(), 3);

        // Repeats after `repeat_after` become a series on the same Event.
        let repeating = ServiceEvents::with_repeat(client, NODE, Duration::ZERO);
        let api = ServiceRef::new("a", "api");
        assert!(repeating.warn(&api, None, "NoEndpoints", "x").await);
        assert!(repeating.warn(&api, None, "NoEndpoints", "x").await);
        let posted = server.events();
        let api_events: Vec<_> = posted
            .iter()
            .filter(|e| e["regarding"]["name"] == "api")
            .collect();
        assert_eq!(api_events.len(), 1);
        assert_eq!(api_events[0]["series"]["count"], 2);
        assert!(server.requests().iter().any(|r| r.method == "PATCH"));
    })
    .await;
}

/// A Service from the API server with the metadata-service address as an external IP and a
/// loopback LB ingress IP: the model refuses both, and each becomes a Warning Event on the
/// Service (with its uid), posted once; the rest of the Service is still programmed.
#[tokio::test]
async fn special_addresses_are_warned_about_on_the_service() {
    bounded(30, async {
        let server = populated().await;
        let meta: Service = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "a", "name": "meta"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.77", "clusterIPs": ["10.96.0.77"],
                     "externalIPs": ["169.254.169.254"],
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80, "nodePort": 30077}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "127.0.0.1"}]}},
        }))
        .expect("service");
        server.apply(&meta).expect("apply");
        let (_dir, client) = client(&server).await;
        let (_, rx) = start(&server).await;
        let snapshot = rx.borrow().clone();
        let desired = agent::model::build_objects(
            &snapshot.services,
            &snapshot.endpoint_slices,
            &agent::model::NodeInfo::default(),
            &agent::model::ModelConfig::default(),
        );
        assert!(
            desired
                .virtual_services
                .iter()
                .any(|v| v.address.to_string() == "10.96.0.77"),
            "the ClusterIP is still programmed"
        );
        let meta_ref = ServiceRef::new("a", "meta");
        let uid = kubernetes::service_uid(&snapshot, &meta_ref).map(str::to_string);
        assert!(uid.is_some());

        let before = Default::default();
        let (rejected, warnings) =
            kubernetes::rejection_warnings(&snapshot, &desired.rejected, &before);
        assert_eq!(rejected, [meta_ref.clone()].into_iter().collect());
        let events = ServiceEvents::new(client, NODE);
        assert_eq!(events.post_rejections(&warnings).await, 2);
        let posted = server.events();
        let mut notes: Vec<&str> = posted.iter().filter_map(|e| e["note"].as_str()).collect();
        notes.sort();
        assert_eq!(
            notes,
            [
                "external IP 169.254.169.254 is a link-local address; not programmed",
                "load balancer ingress IP 127.0.0.1 is a loopback address; not programmed",
            ]
        );
        for e in &posted {
            assert_eq!(e["type"], "Warning");
            assert_eq!(e["reason"], kubernetes::REJECTION_REASON);
            assert_eq!(e["regarding"]["kind"], "Service");
            assert_eq!(e["regarding"]["namespace"], "a");
            assert_eq!(e["regarding"]["name"], "meta");
            assert_eq!(e["regarding"]["uid"], json!(uid));
        }
        // The next sync: already reported, nothing new to post.
        let (_, again) = kubernetes::rejection_warnings(&snapshot, &desired.rejected, &rejected);
        assert_eq!(again, vec![]);
    })
    .await;
}

/// kubeadm binds kube-proxy's ServiceAccount to `system:node-proxier` and nothing else:
/// everything the source and the Events ask for is within it (the fake server refuses the
/// rest with 403).
#[tokio::test]
async fn everything_works_under_the_system_node_proxier_role() {
    bounded(30, async {
        let server = populated().await;
        server.authorize(Some(lab::fake_apiserver::authz::Authorizer::node_proxier()));
        let (_dir, kc) = client(&server).await;
        let once = kubernetes::list_once(kc.clone(), NODE)
            .await
            .expect("list_once");
        assert_eq!(names(&once.services), ["a/web"]);
        let (_dir2, mut rx) = start(&server).await;
        assert_eq!(names(&rx.borrow().endpoint_slices), ["a/web-1"]);
        assert!(rx.borrow().node.is_some());
        server
            .apply(&slice("a", "web", "web-1", &["10.1.0.3"], json!({})))
            .expect("apply");
        wait_for(
            &mut rx,
            "the watched change",
            |_| {},
            |s| slice_ips(s, "web-1") == ["10.1.0.3"],
        )
        .await;
        let events = ServiceEvents::with_repeat(kc, NODE, Duration::ZERO);
        let web = ServiceRef::new("a", "web");
        assert!(events.warn(&web, None, "NoEndpoints", "x").await);
        assert!(events.warn(&web, None, "NoEndpoints", "x").await);
        assert_eq!(server.events().len(), 1);
        assert_eq!(server.denied(), Vec::<String>::new());
        // The authorizer does refuse what the role does not give.
        server.authorize(Some(lab::fake_apiserver::authz::Authorizer {
            name: "nothing".into(),
            rules: Vec::new(),
        }));
        let (_dir3, refused) = client(&server).await;
        assert!(kubernetes::list_once(refused, NODE).await.is_err());
        assert!(!server.denied().is_empty());
    })
    .await;
}

/// kube-proxy's `--master`: the URL alone (no kubeconfig), or over a kubeconfig's server.
#[tokio::test]
async fn master_alone_or_over_a_kubeconfig_reaches_the_server() {
    bounded(30, async {
        let server = populated().await;
        let alone = KubernetesSourceConfig {
            master: Some(server.url()),
            node_name: NODE.into(),
            ..Default::default()
        };
        let c = kubernetes::client(&alone)
            .await
            .expect("client from --master");
        let s = kubernetes::list_once(c, NODE).await.expect("list_once");
        assert_eq!(names(&s.services), ["a/web"]);

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            lab::fake_apiserver::kubeconfig_for("http://127.0.0.1:1"),
        )
        .expect("kubeconfig");
        let over = KubernetesSourceConfig {
            kubeconfig: Some(path),
            master: Some(server.url()),
            node_name: NODE.into(),
        };
        let c = kubernetes::client(&over).await.expect("client");
        let s = kubernetes::list_once(c, NODE)
            .await
            .expect("list_once via --master");
        assert_eq!(names(&s.services), ["a/web"]);

        let bad = KubernetesSourceConfig {
            master: Some("not a url".into()),
            ..Default::default()
        };
        match kubernetes::client(&bad).await {
            Ok(_) => panic!("a bad --master was accepted"),
            Err(e) => assert!(format!("{e:#}").contains("--master"), "{e:#}"),
        }
    })
    .await;
}
