//! The agent following a (fake) Kubernetes API server, both inside the lab VM: it programs IPVS
//! from the watch, keeps traffic flowing while the API server is gone, and catches up when it
//! returns.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lab::agent::{Agent, Manifests, service_yaml, slice_yaml};
use lab::apiserver::{ApiServer, control};
use lab::traffic::{Server, tcp_request};
use lab::{Netns, Topology, ipvsadm, require_lab};

fn destinations(ns: &Netns, key: &str) -> usize {
    ipvsadm::view(|c| ns.sh(c))
        .iter()
        .find(|s| s.key() == key)
        .map_or(0, |s| s.destinations.len())
}

fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_agent_follows_the_api_server_and_keeps_traffic_flowing_while_it_is_gone() {
    require_lab();
    let t = Topology::new("k8s");
    let _srv = Server::tcp(&t.backend, "10.0.2.2:8080".parse().unwrap());
    t.backend.sh("ip addr add 10.0.2.3/24 dev eth0");
    let _srv2 = Server::tcp(&t.backend, "10.0.2.3:8080".parse().unwrap());
    let m = Manifests::new("k8s");
    m.write(
        "objects.yaml",
        &(service_yaml("web", "10.96.0.10", 80, None) + &slice_yaml("web", &["10.0.2.2"], 8080)),
    );
    let kubeconfig = format!("/tmp/kubeconfig-{}", t.node.name());
    let api = ApiServer::start(&t.node, &m, &kubeconfig);
    let agent = Agent::start_source(
        &t.node,
        "kubernetes",
        &["--kubeconfig", &kubeconfig, "--datapath", "none"],
    );
    agent.wait_sync(0, 1);
    assert_eq!(destinations(&t.node, "TCP 10.96.0.10:80"), 1);
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    tcp_request(&t.client, vip).expect("traffic through the service");

    // A watch event: a second endpoint.
    control(
        &t.node,
        "POST",
        "/control/apply",
        &slice_yaml("web", &["10.0.2.2", "10.0.2.3"], 8080),
    )
    .expect("apply");
    eventually(
        "the new endpoint programmed",
        Duration::from_secs(60),
        || destinations(&t.node, "TCP 10.96.0.10:80") == 2,
    );

    // The API server goes away for a while: nothing is flushed, traffic keeps flowing.
    control(&t.node, "POST", "/control/down?seconds=8", "").expect("down");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        control(&t.node, "GET", "/control/resource-version", "").is_err(),
        "the API server is still up"
    );
    for _ in 0..5 {
        tcp_request(&t.client, vip).expect("traffic while the API server is down");
    }
    assert_eq!(
        destinations(&t.node, "TCP 10.96.0.10:80"),
        2,
        "state changed while the API server was down"
    );

    // Back: a change made now is picked up (the watch resumes or relists).
    eventually("the API server back", Duration::from_secs(90), || {
        control(&t.node, "GET", "/control/resource-version", "").is_ok()
    });
    control(
        &t.node,
        "POST",
        "/control/apply",
        &slice_yaml("web", &["10.0.2.3"], 8080),
    )
    .expect("apply after restart");
    eventually(
        "the removed endpoint drained",
        Duration::from_secs(90),
        || {
            ipvsadm::view(|c| t.node.sh(c))
                .iter()
                .find(|s| s.key() == "TCP 10.96.0.10:80")
                .and_then(|s| {
                    s.dest("10.0.2.2".parse().unwrap(), 8080)
                        .map(|d| d.weight == 0)
                })
                .unwrap_or(true)
        },
    );
    tcp_request(&t.client, vip).expect("traffic after the API server came back");
    drop(api);
}
