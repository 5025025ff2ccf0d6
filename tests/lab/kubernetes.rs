//! The agent following a (fake) Kubernetes API server, both inside the lab VM: it programs IPVS
//! from the watch, keeps traffic flowing while the API server is gone, and catches up when it
//! returns.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lab::agent::{Agent, Manifests, service_yaml, slice_yaml};
use lab::traffic::{Server, tcp_request};
use lab::{Netns, Topology, ipvsadm, require_lab};

const API: &str = "127.0.0.1:6443";

/// The `fake-apiserver` binary, in a namespace.
struct ApiServer {
    child: Child,
}

impl ApiServer {
    fn start(ns: &Netns, manifests: &Manifests, kubeconfig: &str) -> ApiServer {
        let bin = std::env::var("KUBE_IPVS_BPF_BIN")
            .map(|b| b.replace("kube-ipvs-bpf", "fake-apiserver"))
            .unwrap_or_else(|_| "fake-apiserver".into());
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg(bin)
            .args(["--listen", API, "--kubeconfig", kubeconfig, "--manifests"])
            .arg(&manifests.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start fake-apiserver");
        let s = ApiServer { child };
        let deadline = Instant::now() + Duration::from_secs(60);
        while control(ns, "GET", "/control/resource-version", "").is_err() {
            assert!(Instant::now() < deadline, "fake-apiserver did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One plain HTTP/1.1 request to the fake server's control API, from inside `ns`.
fn control(ns: &Netns, method: &str, path: &str, body: &str) -> std::io::Result<String> {
    let (method, path, body) = (method.to_string(), path.to_string(), body.to_string());
    ns.run(move || {
        let mut c = TcpStream::connect_timeout(&API.parse::<SocketAddr>().expect("addr"), Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            c,
            "{method} {path} HTTP/1.1\r\nHost: {API}\r\nContent-Type: application/yaml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        if !out.starts_with("HTTP/1.1 2") {
            return Err(std::io::Error::other(out));
        }
        Ok(out)
    })
}

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
