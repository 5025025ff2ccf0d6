//! The agent against a real kernel: `kube-ipvs-bpf run --source file:` in a node namespace,
//! checked with ipvsadm and `ip -j addr show kube-ipvs0`; the netlink operations it issued are
//! read from its own log ("sync done" events).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use lab::agent::{Agent, Manifests, ops_issued, service_yaml, slice_yaml};
use lab::ipvsadm;
use lab::topology::SnatTopology;
use lab::traffic::{
    HeldConnection, Server, seen_source, tcp_request, tcp_request_from, udp_request,
    udp_request_from,
};
use lab::{Netns, Topology, require_lab};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn ip4(s: &str) -> std::net::Ipv4Addr {
    s.parse().expect("ip")
}

fn kernel(ns: &Netns) -> Vec<ipvsadm::Service> {
    ipvsadm::view(|cmd| ns.sh(cmd))
}

fn find<'a>(k: &'a [ipvsadm::Service], key: &str) -> Option<&'a ipvsadm::Service> {
    k.iter().find(|s| s.key() == key)
}

/// Addresses on kube-ipvs0, from `ip -j addr show`.
fn bound(ns: &Netns) -> Vec<String> {
    let out = ns.sh("ip -j addr show kube-ipvs0");
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j output");
    let mut addrs: Vec<String> = v[0]["addr_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| format!("{}/{}", x["local"].as_str().unwrap_or(""), x["prefixlen"]))
                .collect()
        })
        .unwrap_or_default();
    addrs.sort();
    addrs
}

/// Polls `f` until it is true (or panics after `timeout` with `what`).
fn eventually(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ops_total(event: &serde_json::Value) -> u64 {
    ops_issued(event).values().sum()
}

#[test]
fn an_empty_kernel_gets_the_file_applied() {
    require_lab();
    let t = Topology::new("ag-apply");
    let m = Manifests::new("apply");
    m.write(
        "svc.yaml",
        &(service_yaml("web", "10.96.0.10", 80, Some(30080))
            + &service_yaml("api", "10.96.0.11", 443, None)),
    );
    m.write(
        "eps.yaml",
        &(slice_yaml("web", &["10.0.2.2", "10.0.2.3"], 8080)
            + &slice_yaml("api", &["10.0.2.2"], 8443)),
    );
    let agent = Agent::start(&t.node, &m.dir, &[]);
    let ev = agent.wait_sync(0, 1);
    let k = kernel(&t.node);
    let web = find(&k, "TCP 10.96.0.10:80").expect("web ClusterIP");
    assert_eq!(web.destinations.len(), 2);
    assert!(web.dest(ip("10.0.2.2"), 8080).is_some() && web.dest(ip("10.0.2.3"), 8080).is_some());
    assert!(
        web.destinations
            .iter()
            .all(|d| d.forward == "Masq" && d.weight == 1)
    );
    let api = find(&k, "TCP 10.96.0.11:443").expect("api ClusterIP");
    assert_eq!(api.destinations.len(), 1);
    // NodePorts on every node address (not on kube-ipvs0's or loopback).
    for node_ip in ["10.0.1.1", "10.0.2.1"] {
        assert!(
            find(&k, &format!("TCP {node_ip}:30080")).is_some(),
            "NodePort on {node_ip}: {k:?}"
        );
    }
    assert_eq!(k.len(), 4, "{k:?}");
    assert_eq!(bound(&t.node), vec!["10.96.0.10/32", "10.96.0.11/32"]);
    // 4 services, 2 + 2 + 2 + 1 destinations.
    assert_eq!(ops_issued(&ev).get("add_service"), Some(&4));
    assert_eq!(ops_issued(&ev).get("add_destination"), Some(&7));
}

/// 300 Services: their addresses take three of the agent's batches of 128 address requests,
/// bound before their IPVS services are programmed; the kernel ends with every address and every
/// virtual service, and the Services answer.
#[test]
fn a_first_sync_of_300_services_binds_every_address_in_batches_and_programs_them() {
    require_lab();
    let t = Topology::new("ag-many");
    let _srv = Server::tcp(&t.backend, "10.0.2.2:8080".parse().unwrap());
    let m = Manifests::new("many");
    let cluster_ip = |i: usize| format!("10.97.{}.{}", i / 200, i % 200 + 1);
    let (mut services, mut slices) = (String::new(), String::new());
    for i in 0..300 {
        services += &service_yaml(&format!("s{i}"), &cluster_ip(i), 80, None);
        slices += &slice_yaml(&format!("s{i}"), &["10.0.2.2"], 8080);
    }
    m.write("svc.yaml", &services);
    m.write("eps.yaml", &slices);
    let agent = Agent::start(&t.node, &m.dir, &[]);
    let ev = agent.wait_sync(0, 1);
    assert_eq!(ev["addresses_added"], 300, "{ev}");
    assert_eq!(ev["failures"], 0, "{ev}");

    let mut want: Vec<String> = (0..300).map(|i| format!("{}/32", cluster_ip(i))).collect();
    want.sort();
    assert_eq!(bound(&t.node), want);
    let k = kernel(&t.node);
    assert_eq!(k.len(), 300);
    for i in 0..300 {
        let key = format!("TCP {}:80", cluster_ip(i));
        let v = find(&k, &key).unwrap_or_else(|| panic!("{key} missing"));
        assert!(v.dest(ip("10.0.2.2"), 8080).is_some(), "{key}: {v:?}");
    }
    for i in [0, 150, 299] {
        let to: SocketAddr = format!("{}:80", cluster_ip(i)).parse().unwrap();
        tcp_request(&t.client, to).unwrap_or_else(|e| panic!("request to {to}: {e}"));
    }
}

#[test]
fn one_endpoint_added_is_one_destination_add_and_removed_drains_then_goes() {
    require_lab();
    let t = Topology::new("ag-ep");
    let m = Manifests::new("ep");
    m.write("svc.yaml", &service_yaml("api", "10.96.0.20", 80, None));
    m.write("eps.yaml", &slice_yaml("api", &["10.0.2.2"], 8080));
    let agent = Agent::start(&t.node, &m.dir, &[]);
    agent.wait_sync(0, 1);

    let mark = agent.mark();
    m.write(
        "eps.yaml",
        &slice_yaml("api", &["10.0.2.2", "10.0.2.3"], 8080),
    );
    let ev = agent.wait_sync(mark, 2);
    assert_eq!(
        ops_issued(&ev),
        [("add_destination".to_string(), 1)].into_iter().collect()
    );
    assert!(
        find(&kernel(&t.node), "TCP 10.96.0.20:80")
            .unwrap()
            .dest(ip("10.0.2.3"), 8080)
            .is_some()
    );

    let mark = agent.mark();
    m.write("eps.yaml", &slice_yaml("api", &["10.0.2.2"], 8080));
    let ev = agent.wait_sync(mark, 3);
    assert_eq!(
        ops_issued(&ev),
        [("edit_destination".to_string(), 1)].into_iter().collect()
    );
    // Drain first: weight 0, still present.
    let d = find(&kernel(&t.node), "TCP 10.96.0.20:80")
        .unwrap()
        .dest(ip("10.0.2.3"), 8080)
        .cloned();
    assert!(
        d.is_some_and(|d| d.weight == 0),
        "draining destination must have weight 0"
    );
    // No connection on it: the drain check deletes it.
    let ev = agent.wait_for(mark, Duration::from_secs(60), |v| {
        v["message"] == "sync done" && ops_issued(v).contains_key("delete_destination")
    });
    assert_eq!(
        ops_issued(&ev),
        [("delete_destination".to_string(), 1)]
            .into_iter()
            .collect()
    );
    let svc = find(&kernel(&t.node), "TCP 10.96.0.20:80")
        .cloned()
        .unwrap();
    assert_eq!(svc.destinations.len(), 1);
}

#[test]
fn a_deleted_service_takes_its_addresses_and_ipvs_service_with_it() {
    require_lab();
    let t = Topology::new("ag-del");
    let m = Manifests::new("del");
    m.write(
        "a.yaml",
        &(service_yaml("a", "10.96.0.30", 80, None) + &slice_yaml("a", &["10.0.2.2"], 8080)),
    );
    m.write(
        "b.yaml",
        &(service_yaml("b", "10.96.0.31", 80, None) + &slice_yaml("b", &["10.0.2.2"], 8080)),
    );
    let agent = Agent::start(&t.node, &m.dir, &[]);
    agent.wait_sync(0, 1);
    assert_eq!(bound(&t.node), vec!["10.96.0.30/32", "10.96.0.31/32"]);
    let mark = agent.mark();
    m.remove("b.yaml");
    let ev = agent.wait_sync(mark, 2);
    assert_eq!(
        ops_issued(&ev),
        [("delete_service".to_string(), 1)].into_iter().collect()
    );
    assert_eq!(ev["addresses_removed"], 1);
    assert_eq!(bound(&t.node), vec!["10.96.0.30/32"]);
    let k = kernel(&t.node);
    assert!(find(&k, "TCP 10.96.0.31:80").is_none() && find(&k, "TCP 10.96.0.30:80").is_some());
}

/// While another process holds kube-proxy's healthz port (kube-proxy still running), the agent
/// changes nothing on the node: no IPVS service, no kube-ipvs0. Once the port is free it takes
/// the node over and programs it.
#[test]
fn the_agent_changes_nothing_while_kube_proxy_holds_its_ports() {
    require_lab();
    let t = Topology::new("ag-wait");
    let m = Manifests::new("wait");
    m.write("svc.yaml", &service_yaml("web", "10.96.0.30", 80, None));
    m.write("eps.yaml", &slice_yaml("web", &["10.0.2.2"], 8080));
    let kube_proxy = t
        .node
        .run(|| std::net::TcpListener::bind("0.0.0.0:10256").expect("hold 10256"));
    let agent = Agent::start(&t.node, &m.dir, &[]);
    agent.wait_for(0, Duration::from_secs(300), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("waiting for kube-proxy"))
    });
    // A sync would come right after the wait: give the agent the time of several.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        kernel(&t.node).is_empty(),
        "IPVS programmed while kube-proxy ran"
    );
    let (status, _, _) = t.node.sh_status("ip link show kube-ipvs0");
    assert_ne!(status, 0, "kube-ipvs0 created while kube-proxy ran");
    assert!(
        !agent.log_text().contains("sync done"),
        "synced while kube-proxy ran:\n{}",
        agent.log_text()
    );
    drop(kube_proxy);
    agent.wait_sync(0, 1);
    assert!(find(&kernel(&t.node), "TCP 10.96.0.30:80").is_some());
}

#[test]
fn a_restart_with_nothing_changed_issues_nothing_and_keeps_an_open_connection() {
    require_lab();
    let t = Topology::new("ag-restart");
    let _srv = Server::tcp_echo(&t.backend, "10.0.2.2:8080".parse().unwrap());
    let m = Manifests::new("restart");
    m.write(
        "svc.yaml",
        &(service_yaml("echo", "10.96.0.40", 80, Some(30040))
            + &slice_yaml("echo", &["10.0.2.2"], 8080)),
    );
    let agent = Agent::start(&t.node, &m.dir, &[]);
    agent.wait_sync(0, 1);
    let mut conn = HeldConnection::open(&t.client, "10.96.0.40:80".parse().unwrap())
        .expect("connect via service");
    assert_eq!(conn.echo("before\n").expect("echo"), "before\n");
    let before = t.node.sh("ipvsadm -Sn");
    agent.stop();
    assert_eq!(
        conn.echo("while stopped\n")
            .expect("echo with the agent stopped"),
        "while stopped\n"
    );

    let agent = Agent::start(&t.node, &m.dir, &[]);
    let ev = agent.wait_sync(0, 1);
    assert_eq!(ops_total(&ev), 0, "restart issued operations: {ev}");
    assert_eq!(ev["addresses_added"], 0);
    assert_eq!(ev["addresses_removed"], 0);
    assert_eq!(t.node.sh("ipvsadm -Sn"), before);
    assert_eq!(conn.echo("after\n").expect("echo after restart"), "after\n");
}

#[test]
fn an_ipvs_service_deleted_by_hand_is_restored_by_the_resync() {
    require_lab();
    let t = Topology::new("ag-drift");
    let m = Manifests::new("drift");
    m.write(
        "svc.yaml",
        &(service_yaml("d", "10.96.0.50", 80, None)
            + &slice_yaml("d", &["10.0.2.2", "10.0.2.3"], 8080)),
    );
    let agent = Agent::start(&t.node, &m.dir, &["--sync-period", "2s"]);
    agent.wait_sync(0, 1);
    // Marked before the deletion: under a loaded host a resync can restore the service before
    // the test reads the kernel again. A full sync that was already under way when the service
    // was deleted may have read the kernel before and issues nothing: the first one after the
    // mark that issues operations is the resync under test. (`sh` fails unless ipvsadm deleted
    // the service.)
    let mark = agent.mark();
    t.node.sh("ipvsadm -D -t 10.96.0.50:80");
    let ev = agent.wait_for(mark, Duration::from_secs(90), |v| {
        v["message"] == "sync done" && v["full"] == true && !ops_issued(v).is_empty()
    });
    assert_eq!(ops_issued(&ev).get("add_service"), Some(&1), "{ev}");
    assert_eq!(
        find(&kernel(&t.node), "TCP 10.96.0.50:80")
            .expect("restored")
            .destinations
            .len(),
        2
    );
}

#[test]
fn foreign_ipvs_services_are_left_untouched() {
    require_lab();
    let t = Topology::new("ag-foreign");
    // Someone else's: a fwmark service, an address not on kube-ipvs0, a node address outside
    // the NodePort range; each with a destination.
    t.node
        .sh("ipvsadm -A -f 77 -s rr && ipvsadm -a -f 77 -r 10.0.2.9 -m");
    t.node
        .sh("ipvsadm -A -t 10.200.0.1:80 -s wlc && ipvsadm -a -t 10.200.0.1:80 -r 10.0.2.9:80 -m");
    t.node
        .sh("ipvsadm -A -t 10.0.1.1:2222 -s rr && ipvsadm -a -t 10.0.1.1:2222 -r 10.0.2.9:22 -m");
    let foreign = |ns: &Netns| -> String {
        ns.sh("ipvsadm -Sn")
            .lines()
            .filter(|l| l.contains("77") || l.contains("10.200.0.1") || l.contains(":2222"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let before = foreign(&t.node);
    let m = Manifests::new("foreign");
    m.write(
        "svc.yaml",
        &(service_yaml("f", "10.96.0.60", 80, Some(30060)) + &slice_yaml("f", &["10.0.2.2"], 8080)),
    );
    let agent = Agent::start(&t.node, &m.dir, &["--sync-period", "1s"]);
    agent.wait_sync(0, 1);
    // Also across a deletion and a full resync.
    let mark = agent.mark();
    m.remove("svc.yaml");
    agent.wait_sync(mark, 2);
    let mark = agent.mark();
    agent.wait_for(mark, Duration::from_secs(60), |v| {
        v["message"] == "sync done" && v["full"] == true
    });
    assert_eq!(foreign(&t.node), before);
    assert_eq!(kernel(&t.node).len(), 3, "only the foreign services remain");
}

/// A Service whose external IP is the node's own address (`10.0.1.1`, so `nodeIP:port` outside
/// the NodePort range and not on kube-ipvs0): its IPVS service goes with the Service, in the same
/// run, after a restart between create and delete, and when the Service is deleted while the
/// agent is down. Someone else's services on the node address stay as they are, including one
/// on a port a Service asks for (not taken over).
#[test]
fn a_node_address_external_ip_goes_with_its_service_also_across_restarts() {
    require_lab();
    let t = Topology::new("ag-nodeip");
    t.node
        .sh("ipvsadm -A -t 10.0.1.1:2222 -s rr && ipvsadm -a -t 10.0.1.1:2222 -r 10.0.2.9:22 -m");
    t.node
        .sh("ipvsadm -A -t 10.0.1.1:8081 -s wlc && ipvsadm -a -t 10.0.1.1:8081 -r 10.0.2.9:81 -m");
    let foreign = |ns: &Netns| -> String {
        ns.sh("ipvsadm -Sn")
            .lines()
            .filter(|l| l.contains("10.0.1.1:2222") || l.contains("10.0.1.1:8081"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let foreign_before = foreign(&t.node);
    let external = |name: &str, cluster_ip: &str, port: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: lab\nspec:\n  clusterIP: {cluster_ip}\n  externalIPs: [10.0.1.1]\n  ports:\n    - name: p\n      protocol: TCP\n      port: {port}\n      targetPort: 8080\n---\n"
        ) + &slice_yaml(name, &["10.0.2.2"], 8080)
    };
    let ours = "TCP 10.0.1.1:8080";
    let m = Manifests::new("nodeip");
    m.write("ext.yaml", &external("ext", "10.96.0.70", 8080));
    // Asks for the foreign 10.0.1.1:8081.
    m.write("taker.yaml", &external("taker", "10.96.0.71", 8081));
    let agent = Agent::start(&t.node, &m.dir, &[]);
    agent.wait_sync(0, 1);
    let k = kernel(&t.node);
    let svc = find(&k, ours).unwrap_or_else(|| panic!("{ours} programmed: {k:?}"));
    assert!(svc.dest(ip("10.0.2.2"), 8080).is_some(), "{svc:?}");
    assert!(
        find(&k, "TCP 10.96.0.71:8081").is_some(),
        "taker's ClusterIP"
    );
    assert_eq!(foreign(&t.node), foreign_before, "not taken over");

    // 1. Deleted while the agent runs.
    let mark = agent.mark();
    m.remove("ext.yaml");
    agent.wait_sync(mark, 2);
    assert!(find(&kernel(&t.node), ours).is_none(), "{ours} left behind");

    // 2. Created, the agent restarted, then deleted.
    let mark = agent.mark();
    m.write("ext.yaml", &external("ext", "10.96.0.70", 8080));
    agent.wait_sync(mark, 3);
    assert!(find(&kernel(&t.node), ours).is_some());
    agent.stop();
    let agent = Agent::start(&t.node, &m.dir, &[]);
    agent.wait_sync(0, 1);
    assert!(find(&kernel(&t.node), ours).is_some());
    let mark = agent.mark();
    m.remove("ext.yaml");
    agent.wait_sync(mark, 2);
    assert!(
        find(&kernel(&t.node), ours).is_none(),
        "{ours} left behind after a restart"
    );

    // 3. Created, then deleted while the agent is down.
    let mark = agent.mark();
    m.write("ext.yaml", &external("ext", "10.96.0.70", 8080));
    agent.wait_sync(mark, 3);
    assert!(find(&kernel(&t.node), ours).is_some());
    agent.stop();
    m.remove("ext.yaml");
    let agent = Agent::start(&t.node, &m.dir, &[]);
    agent.wait_sync(0, 1);
    assert!(
        find(&kernel(&t.node), ours).is_none(),
        "{ours} left behind when deleted while the agent was down"
    );

    // The taker goes too; the foreign services are as they were.
    let mark = agent.mark();
    m.remove("taker.yaml");
    agent.wait_sync(mark, 2);
    assert_eq!(foreign(&t.node), foreign_before);
    let left: Vec<String> = kernel(&t.node).iter().map(|s| s.key()).collect();
    assert_eq!(left.len(), 2, "only the foreign services remain: {left:?}");
}

#[test]
fn graceful_termination_keeps_an_open_connection_until_the_drain_ends() {
    require_lab();
    let t = Topology::new("ag-drain");
    let _a = Server::tcp_echo(&t.backend, "10.0.2.2:8080".parse().unwrap());
    t.backend.sh("ip addr add 10.0.2.3/24 dev eth0");
    let _b = Server::tcp_echo(&t.backend, "10.0.2.3:8080".parse().unwrap());
    let m = Manifests::new("drain");
    m.write("svc.yaml", &service_yaml("g", "10.96.0.70", 80, None));
    m.write("eps.yaml", &slice_yaml("g", &["10.0.2.2"], 8080));
    // The drain timeout must outlast the checks below on a slow, busy machine (TCG).
    let agent = Agent::start(&t.node, &m.dir, &["--drain-timeout", "30s"]);
    agent.wait_sync(0, 1);
    let vip: SocketAddr = "10.96.0.70:80".parse().unwrap();
    let mut conn = HeldConnection::open(&t.client, vip).expect("connect");
    assert_eq!(conn.echo("hello\n").unwrap(), "hello\n");

    // The endpoint goes away (replaced by another): its destination drains.
    let mark = agent.mark();
    m.write("eps.yaml", &slice_yaml("g", &["10.0.2.3"], 8080));
    agent.wait_sync(mark, 2);
    let svc = find(&kernel(&t.node), "TCP 10.96.0.70:80")
        .cloned()
        .unwrap();
    let old = svc
        .dest(ip("10.0.2.2"), 8080)
        .expect("draining destination kept");
    assert_eq!((old.weight, old.active), (0, 1));
    // The open connection keeps working; new connections go to the new endpoint.
    assert_eq!(conn.echo("still here\n").unwrap(), "still here\n");
    let mut fresh = HeldConnection::open(&t.client, vip).expect("new connection");
    assert_eq!(fresh.echo("new\n").unwrap(), "new\n");
    drop(fresh);
    let conns = ipvsadm::parse_conns(&t.node.sh("ipvsadm -Lnc"));
    assert!(
        conns
            .iter()
            .any(|c| c.destination == (ip("10.0.2.3"), 8080)),
        "{conns:?}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        find(&kernel(&t.node), "TCP 10.96.0.70:80")
            .unwrap()
            .dest(ip("10.0.2.2"), 8080)
            .is_some(),
        "deleted while a connection was open"
    );
    assert_eq!(conn.echo("after 3s\n").unwrap(), "after 3s\n");
    // Connection closed (it lingers in IPVS as inactive): deleted by the drain timeout.
    drop(conn);
    eventually(
        Duration::from_secs(120),
        "draining destination deleted",
        || {
            find(&kernel(&t.node), "TCP 10.96.0.70:80")
                .unwrap()
                .dest(ip("10.0.2.2"), 8080)
                .is_none()
        },
    );
}

#[test]
fn bad_objects_are_logged_by_name_and_the_rest_is_applied() {
    require_lab();
    let t = Topology::new("ag-bad");
    let m = Manifests::new("bad");
    let svc = |name: &str, ip: &str, port: &str, proto: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: lab}}\nspec:\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  ports:\n    - {{name: p, protocol: {proto}, port: {port}}}\n---\n"
        )
    };
    let mut bad = String::new();
    bad += &svc("bad-ip", "10.96.0.999", "80", "TCP");
    bad += &svc("port-zero", "10.96.0.81", "0", "TCP");
    bad += &svc("port-big", "10.96.0.82", "70000", "TCP");
    bad += &svc("bad-proto", "10.96.0.83", "80", "ICMP");
    bad += "apiVersion: v1\nkind: Service\nmetadata: {name: dup-ports, namespace: lab}\nspec:\n  clusterIP: 10.96.0.84\n  clusterIPs: [10.96.0.84]\n  ports:\n    - {name: a, protocol: TCP, port: 80}\n    - {name: b, protocol: TCP, port: 80}\n---\n";
    bad += &slice_yaml("no-such-service", &["10.0.2.2"], 8080);
    m.write("bad.yaml", &bad);
    m.write(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken\n  spec: [\n",
    );
    // A good Service with 5,000 endpoints.
    let ips: Vec<String> = (0..5000)
        .map(|i| format!("10.{}.{}.{}", 100 + i / 62500, (i / 250) % 250, i % 250 + 1))
        .collect();
    let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
    m.write(
        "good.yaml",
        &(service_yaml("big", "10.96.0.80", 80, None) + &slice_yaml("big", &refs, 8080)),
    );
    let agent = Agent::start(&t.node, &m.dir, &[]);
    // Parsing and programming 5,000 endpoints takes a while in a debug build under TCG.
    let ev = agent.wait_for(0, Duration::from_secs(240), |v| v["message"] == "sync done");
    let log = agent.log_text();
    for name in [
        "lab/bad-ip",
        "lab/port-zero",
        "lab/port-big",
        "lab/bad-proto",
        "lab/dup-ports",
        "broken.yaml",
    ] {
        assert!(log.contains(name), "{name} not named in the log:\n{log}");
    }
    // An EndpointSlice whose Service is unknown is normal in a cluster (a slice can arrive
    // before its Service): logged at debug, not as a warning.
    assert!(
        !agent
            .events()
            .iter()
            .any(|v| v["level"] == "WARN" && v.to_string().contains("no-such-service")),
        "the orphan slice was a warning:\n{log}"
    );
    assert!(ev["rejected"].as_u64() >= Some(5), "{ev}");
    let k = kernel(&t.node);
    assert_eq!(k.len(), 1, "only the good Service is programmed");
    assert_eq!(
        find(&k, "TCP 10.96.0.80:80").unwrap().destinations.len(),
        5000
    );
}

/// The node state outside IPVS is repaired while the agent runs: a firewall reload (the whole
/// nf_tables ruleset flushed, then the node's own firewall loaded again, as Debian's nftables
/// service does) and `vs.conntrack=1` written by someone else both come back, each repair is
/// logged, and a NodePort connection afterwards still creates no conntrack entry.
#[test]
fn a_flushed_ruleset_and_vs_conntrack_set_to_1_are_repaired_and_nodeport_stays_conntrack_free() {
    require_lab();
    let t = SnatTopology::new("ag-repair");
    t.node_firewall(false);
    let (_srv, m) = remote_web_service(&t, "repair");
    let agent = agent_checking_the_node_every(&t, &m, "2s");
    let rules_in_place = |ns: &Netns| {
        let save = ns.sh("iptables-save -t raw; iptables-save -t filter");
        let table = ns.sh("nft list table inet kube-ipvs-bpf 2>/dev/null || true");
        [
            "-A OUTPUT -m mark ! --mark 0x200000/0x200000 -m comment --comment \"kube-ipvs-bpf: host traffic, not untracked yet\" -j KUBE-IPVS-BPF-OUTPUT",
            "-A INPUT -m mark --mark 0x200000/0x200000 -m comment --comment \"kube-ipvs-bpf: service traffic (untracked)\" -j ACCEPT",
            "-A FORWARD -m mark --mark 0x200000/0x200000 -m comment --comment \"kube-ipvs-bpf: service traffic (untracked)\" -j ACCEPT",
            "-A KUBE-IPVS-BPF-OUTPUT -m bpf",
        ]
        .iter()
        .all(|r| save.contains(r))
            && table.contains("meta mark & 0x00200000 == 0x00200000 notrack")
    };
    let vs_conntrack = |ns: &Netns| sysctl(ns, "net.ipv4.vs.conntrack");
    assert!(rules_in_place(&t.node));
    assert_eq!(vs_conntrack(&t.node), "0");

    let mark = agent.mark();
    t.node.sh("nft flush ruleset");
    t.node_firewall(false);
    t.node.sh("sysctl -qw net.ipv4.vs.conntrack=1");
    eventually(Duration::from_secs(60), "our iptables rules back", || {
        rules_in_place(&t.node)
    });
    eventually(Duration::from_secs(60), "vs.conntrack back to 0", || {
        vs_conntrack(&t.node) == "0"
    });
    for what in ["nftables", "iptables", "sysctl"] {
        agent.wait_for(mark, Duration::from_secs(30), |v| {
            v["message"] == "node state repaired" && v["what"] == what
        });
    }

    service_connections_leave_no_conntrack_entry(&t, "after the repair");
}

/// `net.ipv4.vs.snat_reroute` follows the node's routing policy, and a source-routed second
/// uplink keeps working. The node gets a second uplink, eth2 (10.0.3.1), to a client whose
/// address (10.0.4.2) the node reaches only through table 100, which a FIB rule selects for
/// the node's address on eth2; the main table's default goes to the first client, which
/// forwards nothing. With the kernel's own rules the agent turns the reroute off (0); adding
/// the rule turns it on (1) through the rule change notice alone (the periodic check is a
/// minute away), naming the rule in its log; `/metrics` follows
/// (`kube_ipvs_bpf_ipvs_snat_reroute{mode="auto"}`); a NodePort connection through eth2 then gets its
/// replies through eth2. Written to 0 by hand, the reroute is missing and the same connection
/// fails (the test would prove nothing otherwise); the next check repairs it and the connection
/// works again. Deleting the rule turns it off.
#[test]
fn snat_reroute_is_off_with_the_kernels_own_rules_and_on_while_a_source_rule_routes_a_second_uplink()
 {
    require_lab();
    let t = SnatTopology::new("ag-rr");
    let (_srv, m) = remote_web_service(&t, "reroute");
    let uplink2 = Netns::new("ag-rr-c2");
    lab::topology::veth(
        &t.node,
        "eth2",
        &["10.0.3.1/24"],
        &uplink2,
        "eth0",
        &["10.0.3.2/24"],
    );
    // The client's connections leave from 10.0.4.2, also to the node's on-link address.
    uplink2.sh("ip link set lo up && ip addr add 10.0.4.2/32 dev lo && \
         ip route replace 10.0.3.0/24 dev eth0 src 10.0.4.2 && \
         ip route add default via 10.0.3.1 src 10.0.4.2");
    t.node
        .sh("ip route add default via 10.0.1.2 && ip route add default via 10.0.3.2 table 100");
    let agent = agent_checking_the_node_every(&t, &m, "60s");
    let reroute = |ns: &Netns| sysctl(ns, "net.ipv4.vs.snat_reroute");
    let exported = |ns: &Netns| {
        metrics(ns)
            .lines()
            .find_map(|l| l.strip_prefix("kube_ipvs_bpf_ipvs_snat_reroute{mode=\"auto\"} "))
            .map(str::to_owned)
    };
    assert_eq!(reroute(&t.node), "0", "the kernel's own rules: no reroute");
    assert_eq!(exported(&t.node).as_deref(), Some("0"), "the metric");
    tcp_request(&t.client, "10.0.1.1:30080".parse().unwrap())
        .expect("NodePort through the first uplink with the reroute off");

    let mark = agent.mark();
    t.node
        .sh("ip rule add from 10.0.3.1 lookup 100 priority 100");
    eventually(
        Duration::from_secs(20),
        "snat_reroute on after the rule",
        || reroute(&t.node) == "1",
    );
    agent.wait_for(mark, Duration::from_secs(10), |v| {
        v["message"] == "IPVS reroute of replies decided"
            && v["value"] == "1"
            && v["why"]
                .as_str()
                .is_some_and(|w| w.contains("IPv4 rule 100: from 10.0.3.1/32 lookup 100"))
    });
    let second = "10.0.3.1:30080".parse().unwrap();
    let (from, a) =
        tcp_request_from(&uplink2, second).expect("NodePort through the source-routed uplink");
    assert_eq!(from.ip(), ip("10.0.4.2"), "the client's address");
    assert_eq!(
        seen_source(&a).map(|s| s.ip()),
        Some(ip("10.0.2.1")),
        "the remote pod sees the node's address: {a}"
    );
    // Set once the node check that decided it is over.
    eventually(Duration::from_secs(10), "the metric at 1", || {
        exported(&t.node).as_deref() == Some("1")
    });

    let mark = agent.mark();
    t.node.sh("sysctl -qw net.ipv4.vs.snat_reroute=0");
    let without = tcp_request(&uplink2, second);
    assert!(
        without.is_err(),
        "without the reroute the replies leave by the main table's default: the connection \
         must fail, or this topology does not need the reroute ({without:?}; snat_reroute now \
         {}; route {}; ipvs {}; events since: {:?})",
        reroute(&t.node),
        t.node.sh("ip route get 10.0.4.2 from 10.244.2.2 iif eth1; ip route get 10.0.4.2 from 10.0.3.1; ip rule; sysctl net.ipv4.ip_forward net.ipv4.conf.all.rp_filter"),
        t.node.sh("ipvsadm -Lnc; ipvsadm -Ln --stats"),
        agent.events().into_iter().skip(mark).collect::<Vec<_>>(),
    );
    agent.wait_for(mark, Duration::from_secs(90), |v| {
        v["message"] == "node state repaired"
            && v["what"] == "sysctl"
            && v["found"]
                .as_str()
                .is_some_and(|f| f.starts_with("net.ipv4.vs.snat_reroute = 0"))
    });
    assert_eq!(reroute(&t.node), "1");
    tcp_request(&uplink2, second).expect("NodePort through the second uplink after the repair");

    t.node
        .sh("ip rule del from 10.0.3.1 lookup 100 priority 100");
    eventually(
        Duration::from_secs(20),
        "snat_reroute off after the rule went",
        || reroute(&t.node) == "0",
    );
    tcp_request(&t.client, "10.0.1.1:30080".parse().unwrap())
        .expect("NodePort through the first uplink with the reroute off again");

    // `cleanup` gives the node back the kernel's default, which kube-proxy leaves.
    agent.stop();
    let report = t.node.sh(&format!(
        "{} cleanup --pin-root {} --state-dir /tmp/agent-state-{}",
        lab::agent::agent_bin(),
        lab::agent::pin_root(&t.node),
        t.node.name()
    ));
    assert_eq!(reroute(&t.node), "1", "after cleanup:\n{report}");
}

/// The agent on `t`'s node serving manifests `m`, checking the node state every `period`, after
/// its first sync.
fn agent_checking_the_node_every(t: &SnatTopology, m: &Manifests, period: &str) -> Agent {
    let agent = Agent::start(
        &t.node,
        &m.dir,
        &[
            "--cluster-cidr",
            SnatTopology::CLUSTER_CIDRS,
            "--node-check-period",
            period,
        ],
    );
    agent.wait_sync(0, 1);
    agent
}

/// The agent's `/metrics` in `ns` (its default address, 127.0.0.1:10249).
fn metrics(ns: &Netns) -> String {
    ns.run(|| {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect("127.0.0.1:10249").expect("connect to /metrics");
        c.set_read_timeout(Some(Duration::from_secs(10))).ok();
        c.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .expect("GET /metrics");
        let mut out = String::new();
        c.read_to_string(&mut out).expect("read /metrics");
        out
    })
}

/// A sysctl's value in `ns`.
fn sysctl(ns: &Netns, name: &str) -> String {
    ns.sh(&format!("sysctl -n {name}")).trim().to_string()
}

/// Service `web` (10.96.0.10:80, NodePort 30080) with its one endpoint on the remote node,
/// 10.244.2.2:8080 (served), in manifests named `name`.
fn remote_web_service(t: &SnatTopology, name: &str) -> (Server, Manifests) {
    let srv = Server::tcp(&t.remote, "10.244.2.2:8080".parse().unwrap());
    let m = Manifests::new(name);
    m.write(
        "svc.yaml",
        &(service_yaml("web", "10.96.0.10", 80, Some(30080))
            + &slice_yaml("web", &["10.244.2.2"], 8080)
                .replace("nodeName: lab", "nodeName: other")),
    );
    (srv, m)
}

/// Five NodePort connections from the client (the remote pod sees the node's address) and five
/// ClusterIP connections from the pod to [`remote_web_service`] all work (`when` names the
/// situation in failures), and the node's conntrack table gains no entry for any of them.
fn service_connections_leave_no_conntrack_entry(t: &SnatTopology, when: &str) {
    let before = t.conntrack_count();
    for _ in 0..5 {
        let a = tcp_request(&t.client, "10.0.1.1:30080".parse().unwrap())
            .unwrap_or_else(|e| panic!("NodePort {when}: {e}"));
        assert_eq!(
            seen_source(&a).map(|s| s.ip()),
            Some(ip("10.0.2.1")),
            "the remote pod must see the node's address: {a}"
        );
        tcp_request(&t.pod, "10.96.0.10:80".parse().unwrap())
            .unwrap_or_else(|e| panic!("ClusterIP from a pod {when}: {e}"));
    }
    assert_eq!(
        t.conntrack_count(),
        before,
        "service connections were tracked ({when})"
    );
    let listed = t.node.sh("conntrack -L 2>/dev/null");
    assert!(
        !listed.contains("dport=30080") && !listed.contains("dst=10.96.0.10"),
        "service flows in conntrack ({when}):\n{listed}"
    );
}

/// kube-ipvs0 deleted by hand comes back with the service addresses, and one address removed
/// by hand is added back; both repairs are logged.
#[test]
fn kube_ipvs0_deleted_or_stripped_of_an_address_is_restored() {
    require_lab();
    let t = Topology::new("ag-dummy");
    let m = Manifests::new("dummy");
    m.write(
        "svc.yaml",
        &(service_yaml("a", "10.96.0.90", 80, None)
            + &slice_yaml("a", &["10.0.2.2"], 8080)
            + &service_yaml("b", "10.96.0.91", 80, None)
            + &slice_yaml("b", &["10.0.2.2"], 8080)),
    );
    let agent = Agent::start(&t.node, &m.dir, &["--node-check-period", "2s"]);
    agent.wait_sync(0, 1);
    let want = vec!["10.96.0.90/32", "10.96.0.91/32"];
    assert_eq!(bound(&t.node), want);

    let mark = agent.mark();
    t.node.sh("ip addr del 10.96.0.91/32 dev kube-ipvs0");
    eventually(Duration::from_secs(60), "the address back", || {
        bound(&t.node) == want
    });
    agent.wait_for(mark, Duration::from_secs(30), |v| {
        v["message"] == "node state repaired" && v["what"] == "kube_ipvs0"
    });

    let mark = agent.mark();
    t.node.sh("ip link del kube-ipvs0");
    eventually(
        Duration::from_secs(60),
        "kube-ipvs0 back with its addresses",
        || t.node.sh_status("ip link show kube-ipvs0").0 == 0 && bound(&t.node) == want,
    );
    agent.wait_for(mark, Duration::from_secs(30), |v| {
        v["message"] == "node state repaired"
            && v["what"] == "kube_ipvs0"
            && v["found"].as_str().is_some_and(|f| f.contains("missing"))
    });
    assert!(find(&kernel(&t.node), "TCP 10.96.0.91:80").is_some());
}

/// The switch from kube-proxy's ipvs mode without a reset (docs/switching.md): a connection
/// kube-proxy's state carried (IPVS with `vs.conntrack=1` and a MASQUERADE rule, so its NAT lives
/// in its conntrack entry) goes on exchanging data after the agent takes the node over; a
/// connection opened after the takeover is the agent's (untracked); when the old one ends, the
/// window closes (`node fully switched from kube-proxy`).
#[test]
fn a_connection_kube_proxy_masqueraded_survives_the_switch() {
    require_lab();
    let t = Topology::new("ag-switch");
    let _srv = Server::tcp_echo(&t.backend, "10.0.2.2:8080".parse().unwrap());
    // kube-proxy's ipvs mode, reduced to what carries this connection.
    t.node.sh(
        "ip link add kube-ipvs0 type dummy && ip addr add 10.96.0.41/32 dev kube-ipvs0 && \
         sysctl -qw net.ipv4.vs.conntrack=1 && \
         ipvsadm -A -t 10.96.0.41:80 -s rr && ipvsadm -a -t 10.96.0.41:80 -r 10.0.2.2:8080 -m && \
         iptables -t nat -A POSTROUTING -d 10.0.2.2/32 -p tcp --dport 8080 -j MASQUERADE",
    );
    let mut old = HeldConnection::open(&t.client, "10.96.0.41:80".parse().unwrap())
        .expect("connect through kube-proxy's state");
    assert_eq!(old.echo("before\n").expect("echo"), "before\n");
    let masqueraded = t
        .node
        .sh("conntrack -L -p tcp --orig-dst 10.96.0.41 2>/dev/null");
    assert!(
        masqueraded.contains("src=10.0.2.2") && masqueraded.contains("dst=10.0.2.1"),
        "kube-proxy's NAT in conntrack: {masqueraded}"
    );

    let m = Manifests::new("switch");
    m.write(
        "svc.yaml",
        &(service_yaml("echo", "10.96.0.41", 80, None) + &slice_yaml("echo", &["10.0.2.2"], 8080)),
    );
    let agent = Agent::start(&t.node, &m.dir, &["--sweep-period", "1s"]);
    agent.wait_sync(0, 1);
    for i in 0..3 {
        let msg = format!("after the switch {i}\n");
        assert_eq!(
            old.echo(&msg).expect("the old connection after the switch"),
            msg
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        agent
            .log_text()
            .contains("switch window from kube-proxy open"),
        "{}",
        agent.log_text()
    );

    // A new connection is the agent's: no conntrack entry for it.
    let before = t.conntrack_count();
    let mut new = HeldConnection::open(&t.client, "10.96.0.41:80".parse().unwrap())
        .expect("a new connection");
    assert_eq!(new.echo("new\n").expect("echo"), "new\n");
    assert_eq!(
        t.conntrack_count(),
        before,
        "the new connection is untracked"
    );
    drop(new);

    // The old connection ends: the window closes.
    assert_eq!(old.echo("last\n").expect("echo"), "last\n");
    drop(old);
    agent.wait_for(0, Duration::from_secs(60), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("node fully switched from kube-proxy"))
    });
}

/// `OutRsts` of `ns`'s TCP MIB (`/proc/net/snmp`): the RSTs its stack has sent.
fn tcp_out_rsts(ns: &Netns) -> u64 {
    let snmp = ns.sh("cat /proc/net/snmp");
    let tcp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let (names, values) = (tcp[0].split_whitespace(), tcp[1].split_whitespace());
    names
        .zip(values)
        .find(|(n, _)| *n == "OutRsts")
        .and_then(|(_, v)| v.parse().ok())
        .expect("OutRsts in /proc/net/snmp")
}

/// IPVS's per-service counters (`ipvsadm -Ln --stats --exact`): "TCP 10.96.0.60:80" →
/// (connections, packets in). The kernel zeroes them when a service is created, so counters
/// that never went down say the service was never deleted and added again.
fn ipvs_service_stats(ns: &Netns) -> std::collections::BTreeMap<String, (u64, u64)> {
    ns.sh("ipvsadm -Ln --stats --exact")
        .lines()
        .filter(|l| l.starts_with("TCP") || l.starts_with("UDP"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                format!("{} {}", f[0], f[1]),
                (f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?),
            ))
        })
        .collect()
}

/// Packets the node's `ct state invalid` drops (the firewall's own rules) have dropped.
fn invalid_drops(ns: &Netns) -> u64 {
    ["INPUT", "FORWARD", "OUTPUT"]
        .iter()
        .map(|chain| {
            ns.sh(&format!("iptables -L {chain} -v -n -x"))
                .lines()
                .filter(|l| l.contains("ctstate INVALID") && l.contains("DROP"))
                .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// The node of issue 19's switch tests (docs/switching.md, "Tests"): the SNAT topology, a TCP
/// echo and a UDP server on a remote pod (10.244.2.2:8080), and two Services with NodePorts on
/// it, `web` (TCP 10.96.0.60:80, 30060) and `dns` (UDP 10.96.0.61:53, 30061), as kube-proxy's
/// generator describes them (`services`, `node`) and as the agent's manifests (`manifests`).
struct SwitchLab {
    t: SnatTopology,
    services: Vec<lab::kube_proxy::ServicePort>,
    node: lab::kube_proxy::NodeConfig,
    manifests: Manifests,
    _servers: [Server; 2],
}

impl SwitchLab {
    fn new(name: &str) -> SwitchLab {
        use lab::kube_proxy::{NodeConfig, Protocol, ServicePort};
        let t = SnatTopology::new(name);
        let servers = [
            Server::tcp_echo(&t.remote, "10.244.2.2:8080".parse().unwrap()),
            Server::udp(&t.remote, "10.244.2.2:8080".parse().unwrap(), 0),
        ];
        let remote = [(ip4("10.244.2.2"), 8080)];
        let service = |name, proto, ip, port, node_port| ServicePort {
            node_port: Some(node_port),
            ..ServicePort::cluster_ip("lab", name, "p", proto, ip4(ip), port, &remote)
        };
        let services = vec![
            service("web", Protocol::Tcp, "10.96.0.60", 80, 30060),
            service("dns", Protocol::Udp, "10.96.0.61", 53, 30061),
        ];
        let node = NodeConfig {
            cluster_cidr: "10.244.0.0/16".into(),
            service_cidr: "10.96.0.0/16".into(),
            nodeport_addresses: vec![ip4("10.0.1.1")],
        };
        let manifests = Manifests::new(name);
        let other = |y: String| y.replace("nodeName: lab", "nodeName: other");
        let udp = |y: String| y.replace("protocol: TCP", "protocol: UDP");
        manifests.write(
            "svc.yaml",
            &(service_yaml("web", "10.96.0.60", 80, Some(30060))
                + &other(slice_yaml("web", &["10.244.2.2"], 8080))
                + &udp(service_yaml("dns", "10.96.0.61", 53, Some(30061)))
                + &udp(other(slice_yaml("dns", &["10.244.2.2"], 8080)))),
        );
        SwitchLab {
            t,
            services,
            node,
            manifests,
            _servers: servers,
        }
    }

    /// The node's firewall: drops what conntrack calls invalid, first in INPUT, FORWARD and
    /// OUTPUT. Tracked UDP flows time out 5 s after their last packet.
    fn firewall_dropping_invalid(&self) {
        for chain in ["INPUT", "FORWARD", "OUTPUT"] {
            self.t.node.sh(&format!(
                "iptables -I {chain} 1 -m conntrack --ctstate INVALID -j DROP"
            ));
        }
        self.t
            .node
            .sh("sysctl -qw net.netfilter.nf_conntrack_udp_timeout=5 \
             net.netfilter.nf_conntrack_udp_timeout_stream=5");
    }

    /// The RSTs each namespace's stack has sent (client, node, pod, remote).
    fn rsts(&self) -> Vec<u64> {
        let t = &self.t;
        [&t.client, &t.node, &t.pod, &t.remote]
            .iter()
            .map(|ns| tcp_out_rsts(ns))
            .collect()
    }

    /// No namespace sent a RST since `rsts_before` ([`SwitchLab::rsts`]), the firewall dropped
    /// nothing as invalid, and no IPVS service's counters went down since `stats_before`
    /// ([`ipvs_service_stats`]: the kernel zeroes them when it creates a service, so none was
    /// deleted and added again). `context` goes in a failure's message.
    fn nothing_reset_nor_recreated(
        &self,
        rsts_before: &[u64],
        stats_before: &std::collections::BTreeMap<String, (u64, u64)>,
        context: &str,
    ) {
        assert_eq!(
            self.rsts(),
            rsts_before,
            "RSTs sent (client, node, pod, remote)"
        );
        assert_eq!(invalid_drops(&self.t.node), 0, "packets dropped as invalid");
        let stats_after = ipvs_service_stats(&self.t.node);
        for (service, before) in stats_before {
            let after = stats_after.get(service).copied().unwrap_or_default();
            assert!(
                after.0 >= before.0 && after.1 >= before.1,
                "{service}: IPVS counters went from {before:?} to {after:?} (re-created); {context}"
            );
        }
    }

    /// The agent's command line for these Services (file source, fast sweeps and node checks).
    fn start_agent(&self) -> Agent {
        Agent::start(
            &self.t.node,
            &self.manifests.dir,
            &[
                "--cluster-cidr",
                "10.244.0.0/16",
                "--nodeport-addresses",
                "10.0.1.1/32",
                "--sweep-period",
                "1s",
                "--node-check-period",
                "1s",
            ],
        )
    }

    /// The four long-lived TCP connections, open and echoing "before": NodePort from the
    /// client, pod to ClusterIP, host to ClusterIP, and a pod to ClusterIP stream.
    fn open_tcp_flows(&self, through: &str) -> [(&'static str, HeldConnection); 4] {
        let t = &self.t;
        [
            ("NodePort from the client", &t.client, "10.0.1.1:30060"),
            ("pod to ClusterIP", &t.pod, "10.96.0.60:80"),
            ("host to ClusterIP", &t.node, "10.96.0.60:80"),
            ("pod to ClusterIP, long stream", &t.pod, "10.96.0.60:80"),
        ]
        .map(|(what, ns, to)| {
            let mut c = HeldConnection::open(ns, to.parse().unwrap())
                .unwrap_or_else(|e| panic!("{what} through {through}: {e}"));
            assert_eq!(c.echo("before\n").expect(what), "before\n", "{what}");
            (what, c)
        })
    }

    /// The client's UDP flow to the UDP NodePort (5 s read timeout).
    fn udp_flow(&self) -> std::net::UdpSocket {
        self.t.client.run(|| {
            let s = std::net::UdpSocket::bind("10.0.1.2:0").expect("bind");
            s.connect("10.0.1.1:30061").expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            s
        })
    }
}

/// One datagram of a [`SwitchLab::udp_flow`] and its answer: the flow's source as the backend saw
/// it ("10.0.2.1:P").
fn udp_ping(s: &std::net::UdpSocket, i: usize) -> String {
    let msg = format!("ping {i}");
    s.send(msg.as_bytes()).expect("UDP send");
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf).expect("UDP answer");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.split(" -> ").next().unwrap_or_default().to_owned()
}

/// Sends a [`SwitchLab::udp_flow`] datagram every 300 ms until `stop`, noting each source the
/// backend saw; gives back the flow, the sources and the next ping number.
fn udp_pinger(
    flow: std::net::UdpSocket,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(
    std::net::UdpSocket,
    std::collections::BTreeSet<String>,
    usize,
)> {
    std::thread::spawn(move || {
        let mut seen = std::collections::BTreeSet::new();
        let mut i = 1;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            seen.insert(udp_ping(&flow, i));
            i += 1;
            std::thread::sleep(Duration::from_millis(300));
        }
        (flow, seen, i)
    })
}

/// Every old flow carries bytes both ways. The UDP pinger stops first: the backend must have seen
/// one source throughout, `udp_source`. Then six rounds of echoes on the first three TCP flows
/// and datagrams on the UDP flow (same source), half a second apart; then the stream (the
/// fourth) echoes 8 MiB each way in 64 KiB writes, many TCP windows. `when` names the moment in
/// failures. Gives back the UDP flow.
fn old_flows_carry_bytes(
    old: &mut [(&'static str, HeldConnection); 4],
    pinger: std::thread::JoinHandle<(
        std::net::UdpSocket,
        std::collections::BTreeSet<String>,
        usize,
    )>,
    stop_pings: &std::sync::atomic::AtomicBool,
    udp_source: &str,
    when: &str,
) -> std::net::UdpSocket {
    stop_pings.store(true, std::sync::atomic::Ordering::Relaxed);
    let (udp_flow, udp_seen, first_ping) = pinger.join().expect("the UDP flow");
    assert_eq!(
        udp_seen,
        std::collections::BTreeSet::from([udp_source.to_owned()]),
        "the UDP flow's source as the backend saw it over {first_ping} datagrams"
    );
    for i in 0..6 {
        for (what, c) in old.iter_mut().take(3) {
            let msg = format!("{when} {i}\n");
            assert_eq!(
                c.echo(&msg)
                    .unwrap_or_else(|e| panic!("{what} {when}: {e}")),
                msg
            );
        }
        assert_eq!(
            udp_ping(&udp_flow, first_ping + i),
            udp_source,
            "the UDP flow's source as the backend sees it {when}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let chunk: String = "0123456789abcdef".repeat(4096);
    let (what, stream) = &mut old[3];
    for _ in 0..128 {
        assert_eq!(
            stream
                .echo(&chunk)
                .unwrap_or_else(|e| panic!("{what} {when}: {e}")),
            chunk
        );
    }
    udp_flow
}

/// Issue 19's matrix (docs/switching.md, "Tests"): kube-proxy's ipvs mode as generated
/// (`lab::kube_proxy`), kept alive by re-applying its rules every half second while holding its
/// healthz port, behind a node firewall that drops `ct state invalid`, serves five connections:
/// a NodePort TCP connection from an off-node client and a UDP NodePort flow (both masqueraded
/// by kube-proxy), a pod → ClusterIP TCP connection, a host → ClusterIP TCP connection, and a
/// pod → ClusterIP TCP stream. The agent takes over when kube-proxy stops. Checked: every old
/// flow carries bytes both ways after the switch (the stream 8 MiB each way, many TCP windows),
/// the UDP flow keeps its masqueraded source port, no namespace sent a RST and the firewall
/// dropped nothing invalid; connections opened after the switch have no conntrack entry; no
/// `KUBE-*` chain or kube-proxy ipset is left; IPVS's counters of kube-proxy's services never
/// went down (never re-created); `inspect switch` lists the old flows while the window is open
/// and the window's filter accept is in place; when the old flows end, the window closes,
/// `switch_flows` is empty and the accept is gone.
#[test]
fn kube_proxys_open_connections_survive_the_switch_behind_a_firewall_dropping_invalid() {
    use lab::kube_proxy;
    use std::sync::atomic::{AtomicBool, Ordering};
    require_lab();
    let lab = SwitchLab::new("ag-swm");
    let (t, services, node) = (&lab.t, &lab.services, &lab.node);
    kube_proxy::apply_ipvs_mode(&t.node, services, node).expect("kube-proxy's ipvs mode");
    // After kube-proxy's rules, which replace the filter table.
    lab.firewall_dropping_invalid();
    let rsts_before = lab.rsts();
    let udp_flow = lab.udp_flow();

    let stop_kube_proxy = AtomicBool::new(false);
    let stop_pings = std::sync::Arc::new(AtomicBool::new(false));
    let (agent, mut old, udp_source, pinger) = std::thread::scope(|scope| {
        // kube-proxy runs: it holds its healthz port and rewrites its rules every half second.
        let healthz = t
            .node
            .run(|| std::net::TcpListener::bind("0.0.0.0:10256").expect("hold 10256"));
        let kube_proxy = scope.spawn(|| {
            let mut syncs = 0u32;
            while !stop_kube_proxy.load(Ordering::Relaxed) {
                kube_proxy::add_ipvs_mode_services(&t.node, services, &[], node)
                    .expect("kube-proxy's sync");
                syncs += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
            syncs
        });
        let old = lab.open_tcp_flows("kube-proxy");
        let udp_source = udp_ping(&udp_flow, 0);
        assert!(
            udp_source.starts_with("10.0.2.1:"),
            "kube-proxy masquerades the UDP NodePort flow: {udp_source}"
        );
        // Every kube-proxy service has counted a connection (its counters can only grow).
        udp_request(&t.pod, "10.96.0.61:53".parse().unwrap()).expect("UDP ClusterIP");
        let conntrack = t.node.sh("conntrack -L 2>/dev/null");
        assert!(
            conntrack.contains("dport=30060") && conntrack.contains("dport=30061"),
            "kube-proxy's connections are tracked:\n{conntrack}"
        );
        // The UDP flow sends every 300 ms across the switch (its entry outlives the agent's
        // start), noting the source the backend sees each time.
        let pinger = udp_pinger(udp_flow, stop_pings.clone());

        let agent = lab.start_agent();
        agent.wait_for(0, Duration::from_secs(300), |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("waiting for kube-proxy"))
        });
        stop_kube_proxy.store(true, Ordering::Relaxed);
        let syncs = kube_proxy.join().expect("kube-proxy's loop");
        assert!(syncs > 0);
        drop(healthz);
        (agent, old, udp_source, pinger)
    });
    let stats_before = ipvs_service_stats(&t.node);
    assert_eq!(stats_before.len(), 4, "{stats_before:?}");
    assert!(
        stats_before.values().all(|&(conns, _)| conns > 0),
        "{stats_before:?}"
    );

    let first = agent.wait_sync(0, 1);
    agent.wait_for(0, Duration::from_secs(60), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("removed kube-proxy's chains and ipsets"))
    });
    // The window is open: its filter accept is in place, `inspect switch` lists the old flows.
    let window_accept = |ns: &Netns| {
        ns.sh("iptables-save -t filter")
            .lines()
            .any(|l| l.contains("connections open before the switch from kube-proxy"))
    };
    assert!(
        window_accept(&t.node),
        "{}",
        t.node.sh("iptables-save -t filter")
    );
    let window = agent.inspect_switch(&t.node);
    assert_eq!(window["open"], true, "{window}");
    let listed = window["connections"].as_u64().unwrap_or(0);
    assert!(listed >= 5, "the old flows listed: {window}");
    assert!(
        window["old_connections"]
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["protocol"] == "udp")),
        "the UDP flow listed: {window}"
    );
    assert_eq!(window["tuples"].as_u64(), Some(listed * 4), "{window}");
    let text = t.node.sh(&format!(
        "{} inspect switch --bpf-pin-root {}",
        lab::agent::agent_bin(),
        lab::agent::pin_root(&t.node)
    ));
    assert!(
        text.starts_with("switch window from kube-proxy: open"),
        "{text}"
    );

    // kube-proxy's chains and ipsets are gone; the agent's own chains stay.
    for save in ["iptables-save", "ip6tables-save"] {
        let rules = t.node.sh(save);
        let left: Vec<&str> = rules
            .lines()
            .filter(|l| l.contains("KUBE-") && !l.contains("KUBE-IPVS-BPF-"))
            .collect();
        assert!(left.is_empty(), "{save}: kube-proxy's rules left: {left:?}");
    }
    let ipsets = t.node.sh("ipset list -n");
    assert!(ipsets.trim().is_empty(), "ipsets left: {ipsets}");

    // Every old flow carries bytes both ways, for several sweeps and node checks.
    let udp_flow = old_flows_carry_bytes(
        &mut old,
        pinger,
        &stop_pings,
        &udp_source,
        "after the switch",
    );

    // Connections opened now are the agent's: no conntrack entry.
    let mut new_ports = Vec::new();
    for (ns, to) in [(&t.client, "10.0.1.1:30060"), (&t.pod, "10.96.0.60:80")] {
        let mut c = HeldConnection::open(ns, to.parse().unwrap()).expect("a new connection");
        assert_eq!(c.echo("new\n").expect("echo"), "new\n");
        new_ports.push(c.local_addr().expect("address").port());
    }
    let (udp_new, _) =
        udp_request_from(&t.client, "10.0.1.1:30061".parse().unwrap()).expect("a new UDP flow");
    new_ports.push(udp_new.port());
    let conntrack = t.node.sh("conntrack -L 2>/dev/null");
    for port in &new_ports {
        assert!(
            !conntrack.contains(&format!("sport={port} ")),
            "a new connection (client port {port}) is tracked:\n{conntrack}"
        );
    }

    // The old flows end: the window closes, its accept goes, switch_flows is empty.
    for (what, mut c) in old {
        assert_eq!(c.echo("last\n").expect(what), "last\n", "{what}");
    }
    drop(udp_flow);
    agent.wait_for(0, Duration::from_secs(90), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("node fully switched from kube-proxy"))
    });
    eventually(
        Duration::from_secs(30),
        "the window's accept dropped",
        || !window_accept(&t.node),
    );
    let window = agent.inspect_switch(&t.node);
    assert_eq!(window["open"], false, "{window}");
    assert_eq!(window["tuples"], 0, "{window}");

    // Nothing was reset or dropped as invalid, and kube-proxy's services were adopted in place.
    lab.nothing_reset_nor_recreated(&rsts_before, &stats_before, &format!("first sync: {first}"));
}

/// Issue 19's rollback (docs/switching.md, "Rollback"): the agent serves five connections behind
/// a node firewall that drops `ct state invalid` (a NodePort TCP connection from the off-node
/// client and a UDP NodePort flow, both source-NATed by its programs, a pod → ClusterIP and a
/// host → ClusterIP TCP connection, and a pod → ClusterIP stream). The agent stops,
/// `kube-ipvs-bpf drain` begins, and kube-proxy's ipvs mode starts on the IPVS state the agent
/// left (its rules re-applied every half second while it holds its healthz port). Checked:
/// every old flow carries bytes both ways during the drain (the stream 8 MiB each way), the UDP
/// flow keeps its source port; connections opened during the drain work and are conntrack's; no
/// namespace sent a RST and the firewall dropped nothing invalid. When the old flows end, the
/// drain removes the agent's datapath (no program attached, no pin, no `KUBE-IPVS-BPF-*` chain)
/// and exits 0, leaving IPVS's services (their counters never went down: never re-created) and
/// `kube-ipvs0` to kube-proxy; a connection opened during the drain outlives that removal.
#[test]
fn the_agents_open_connections_survive_the_rollback_to_kube_proxy_behind_a_firewall_dropping_invalid()
 {
    use lab::kube_proxy;
    use std::sync::atomic::{AtomicBool, Ordering};
    require_lab();
    let lab = SwitchLab::new("ag-rbk");
    let (t, services, node) = (&lab.t, &lab.services, &lab.node);
    lab.firewall_dropping_invalid();
    // IPVS forgets an idle UDP connection after 5 s: the drain ends soon after the UDP flow.
    t.node.sh("ipvsadm --set 900 120 5");
    let rsts_before = lab.rsts();
    let agent = lab.start_agent();
    agent.wait_sync(0, 1);

    let mut old = lab.open_tcp_flows("the agent");
    let udp_flow = lab.udp_flow();
    let udp_source = udp_ping(&udp_flow, 0);
    assert!(
        udp_source.starts_with("10.0.2.1:"),
        "the agent translates the UDP NodePort flow: {udp_source}"
    );
    // Every Service has counted a connection (its counters can only grow).
    udp_request(&t.pod, "10.96.0.61:53".parse().unwrap()).expect("UDP ClusterIP");
    let conntrack = t.node.sh("conntrack -L 2>/dev/null");
    assert!(
        !conntrack.contains("dport=30060") && !conntrack.contains("dport=30061"),
        "the agent's connections are untracked:\n{conntrack}"
    );
    let stop_pings = std::sync::Arc::new(AtomicBool::new(false));
    let pinger = udp_pinger(udp_flow, stop_pings.clone());

    // The rollback: the agent stops (its datapath stays, frozen), the drain begins, then
    // kube-proxy starts.
    agent.stop();
    let pin_root = lab::agent::pin_root(&t.node);
    let state_dir = format!("/tmp/agent-state-{}", t.node.name());
    let mut drain = Agent::start_command(
        &t.node,
        &lab::agent::agent_bin(),
        &[
            "--log-format",
            "json",
            "drain",
            "--bpf-pin-root",
            &pin_root,
            "--state-dir",
            &state_dir,
            "--period",
            "1s",
            "--timeout",
            "5m",
        ],
        &pin_root,
    );
    let begun = drain.wait_for(0, Duration::from_secs(60), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("draining for the rollback"))
    });
    assert!(
        begun["connections"].as_u64().unwrap_or(0) >= 5,
        "the agent's connections when the drain began: {begun}"
    );
    assert_eq!(t.node.sh("sysctl -n net.ipv4.vs.conntrack").trim(), "1");
    let inspect = t.node.sh(&format!(
        "{} inspect switch --output json --bpf-pin-root {pin_root}",
        lab::agent::agent_bin()
    ));
    let window: serde_json::Value = serde_json::from_str(&inspect).expect("inspect switch");
    assert_eq!(window["draining"], true, "{window}");
    assert!(
        window["connections"].as_u64().unwrap_or(0) >= 5,
        "the agent's connections listed: {window}"
    );
    let stats_before = ipvs_service_stats(&t.node);
    assert_eq!(stats_before.len(), 4, "{stats_before:?}");
    kube_proxy::start_ipvs_mode_on_programmed_ipvs(&t.node, services, node)
        .expect("kube-proxy starts");

    let stop_kube_proxy = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let _healthz = t
            .node
            .run(|| std::net::TcpListener::bind("0.0.0.0:10256").expect("hold 10256"));
        let kube_proxy = scope.spawn(|| {
            while !stop_kube_proxy.load(Ordering::Relaxed) {
                kube_proxy::add_ipvs_mode_services(&t.node, services, &[], node)
                    .expect("kube-proxy's sync");
                std::thread::sleep(Duration::from_millis(500));
            }
        });

        // The agent's connections go on, untouched by kube-proxy's rules.
        let udp_flow = old_flows_carry_bytes(
            &mut old,
            pinger,
            &stop_pings,
            &udp_source,
            "during the drain",
        );

        // Connections opened now are conntrack's (kube-proxy's rules), and work.
        let mut new_ports = Vec::new();
        let mut held = Vec::new();
        for (ns, to) in [(&t.client, "10.0.1.1:30060"), (&t.pod, "10.96.0.60:80")] {
            let mut c = HeldConnection::open(ns, to.parse().unwrap())
                .unwrap_or_else(|e| panic!("a new connection to {to} during the drain: {e}"));
            assert_eq!(c.echo("new\n").expect("echo"), "new\n");
            new_ports.push(c.local_addr().expect("address").port());
            held.push(c);
        }
        let (udp_new, _) = udp_request_from(&t.client, "10.0.1.1:30061".parse().unwrap())
            .expect("a new UDP flow during the drain");
        new_ports.push(udp_new.port());
        let conntrack = t.node.sh("conntrack -L 2>/dev/null");
        for port in &new_ports {
            assert!(
                conntrack.contains(&format!("sport={port} ")),
                "a new connection (client port {port}) is not tracked:\n{conntrack}"
            );
        }

        // The agent's connections end: the drain removes its datapath and exits.
        for (what, mut c) in old {
            assert_eq!(c.echo("last\n").expect(what), "last\n", "{what}");
        }
        drop(udp_flow);
        eventually(Duration::from_secs(120), "the drain's end", || {
            drain.exited().is_some()
        });
        let status = drain.exited().expect("exited");
        assert!(status.success(), "drain: {status}\n{}", drain.log_text());
        assert!(
            !std::path::Path::new(&pin_root).exists(),
            "the pins are gone: {}",
            t.node.sh(&format!("ls -R {pin_root} 2>&1"))
        );
        let attached = t.node.sh("bpftool net show");
        assert!(
            !attached.contains("tc_ingress") && !attached.contains("tc_egress"),
            "no program of the agent attached:\n{attached}"
        );
        let rules = t.node.sh("iptables-save; ip6tables-save");
        assert!(!rules.contains("KUBE-IPVS-BPF"), "{rules}");
        assert!(
            rules.contains("KUBE-POSTROUTING"),
            "kube-proxy's rules stay"
        );
        let addrs = t.node.sh("ip -4 addr show dev kube-ipvs0");
        assert!(
            addrs.contains("10.96.0.60") && addrs.contains("10.96.0.61"),
            "kube-ipvs0 stays: {addrs}"
        );

        // kube-proxy alone serves: the connection opened during the drain, and a new one.
        for (i, c) in held.iter_mut().enumerate() {
            let msg = format!("after the drain {i}\n");
            assert_eq!(
                c.echo(&msg).expect("a connection opened during the drain"),
                msg
            );
        }
        let mut c = HeldConnection::open(&t.client, "10.0.1.1:30060".parse().unwrap())
            .expect("a new NodePort connection after the drain");
        assert_eq!(c.echo("kube-proxy\n").expect("echo"), "kube-proxy\n");

        stop_kube_proxy.store(true, Ordering::Relaxed);
        kube_proxy.join().expect("kube-proxy's loop");
    });

    // Nothing was reset or dropped as invalid, and IPVS's services were never re-created.
    lab.nothing_reset_nor_recreated(&rsts_before, &stats_before, "after the drain");
}

/// A pod's connection to a ClusterIP (not source-NATed) that lives longer than IPVS's TCP timeout
/// counted from its start (10 s here), behind an nftables-only node firewall whose forward chain
/// drops by default, accepting established connections and the service mark (the rule
/// docs/datapath.md tells its operator to add): its replies, forwarded to the pod, stay marked as
/// service traffic because the sweeper keeps the connection's `conns` entry while IPVS holds the
/// connection, so none is dropped and none is tracked. (With the entry expired by age alone, the
/// replies went unmarked after 10 s: conntrack picked them up mid-connection as new, and the
/// firewall dropped them.)
#[test]
fn a_pods_connection_outliving_ipvs_timeout_keeps_its_replies_behind_a_forward_drop_firewall() {
    require_lab();
    let lab = SwitchLab::new("ag-long");
    let t = &lab.t;
    t.node.sh("ipvsadm --set 10 5 5");
    t.node.sh(
        "nft add table inet filter && \
         nft add chain inet filter forward '{ type filter hook forward priority 0; policy drop; }' && \
         nft add rule inet filter forward ct state established,related accept && \
         nft add rule inet filter forward meta mark and 0x00200000 == 0x00200000 accept",
    );
    let agent = lab.start_agent();
    agent.wait_sync(0, 1);
    let mut c =
        HeldConnection::open(&t.pod, "10.96.0.60:80".parse().unwrap()).expect("pod to ClusterIP");
    let port = c.local_addr().expect("address").port();
    for i in 0..25 {
        let msg = format!("{i} s\n");
        assert_eq!(
            c.echo(&msg)
                .unwrap_or_else(|e| panic!("{i} s into the connection: {e}")),
            msg
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let conntrack = t.node.sh("conntrack -L 2>/dev/null");
    assert!(
        !conntrack.contains(&format!("dport={port} ")),
        "the connection's replies stayed untracked:\n{conntrack}"
    );
}

/// kubeadm's kube-proxy DaemonSet with only its image swapped: the same command line
/// (`/usr/local/bin/kube-proxy --config=/var/lib/kube-proxy/config.conf
/// --hostname-override=$(NODE_NAME)`, the kubelet having expanded NODE_NAME), the same
/// ConfigMap files (kubeadm's `config.conf` in ipvs mode, its `kubeconfig.conf` with the
/// ServiceAccount token file), and the API server allowing only kubeadm's
/// `system:node-proxier` role. IPVS gets programmed, traffic flows, nothing is refused; then
/// the same command line with `--init-only` and with `--cleanup` does kube-proxy's jobs.
#[test]
fn kubeadms_kube_proxy_command_line_and_configmap_run_it_under_system_node_proxier() {
    use lab::apiserver::{ApiServer, control};
    require_lab();
    let t = Topology::new("ag-kubeadm");
    let _srv = Server::tcp(&t.backend, "10.0.2.2:8080".parse().unwrap());
    let m = Manifests::new("kubeadm");
    m.write(
        "objects.yaml",
        &(service_yaml("web", "10.96.0.10", 80, Some(30080))
            + &slice_yaml("web", &["10.0.2.2"], 8080)),
    );
    let _api = ApiServer::start(&t.node, &m, "/tmp/kubeconfig-ag-kubeadm");
    control(
        &t.node,
        "POST",
        "/control/authorize",
        lab::fake_apiserver::authz::SYSTEM_NODE_PROXIER,
    )
    .expect("RBAC on");

    // The ConfigMap volume and the ServiceAccount token, where the pod has them.
    std::fs::create_dir_all("/var/lib/kube-proxy").unwrap();
    std::fs::write(
        "/var/lib/kube-proxy/config.conf",
        include_str!("../../agent/tests/fixtures/kubeadm-kube-proxy-config.conf"),
    )
    .unwrap();
    // kubeadm's kubeconfig.conf, its server the fake API server (plain HTTP: no CA).
    std::fs::write(
        "/var/lib/kube-proxy/kubeconfig.conf",
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    server: http://{}\n  \
             name: default\ncontexts:\n- context:\n    cluster: default\n    namespace: default\n    \
             user: default\n  name: default\ncurrent-context: default\nusers:\n- name: default\n  \
             user:\n    tokenFile: /var/run/secrets/kubernetes.io/serviceaccount/token\n",
            lab::apiserver::API
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/var/run/secrets/kubernetes.io/serviceaccount").unwrap();
    std::fs::write(
        "/var/run/secrets/kubernetes.io/serviceaccount/token",
        "kube-proxy-token",
    )
    .unwrap();
    // The image's binary under kube-proxy's name.
    std::fs::create_dir_all("/usr/local/bin").unwrap();
    let _ = std::fs::remove_file("/usr/local/bin/kube-proxy");
    let bin = lab::agent::agent_path();
    std::os::unix::fs::symlink(&bin, "/usr/local/bin/kube-proxy").unwrap();

    let mut agent = Agent::start_command(
        &t.node,
        "/usr/local/bin/kube-proxy",
        &[
            "--config=/var/lib/kube-proxy/config.conf",
            "--hostname-override=lab",
        ],
        probes_default_pin_root(),
    );
    eventually(Duration::from_secs(300), "IPVS programmed", || {
        assert!(
            agent.exited().is_none(),
            "the agent exited:\n{}",
            agent.log_text()
        );
        find(&kernel(&t.node), "TCP 10.96.0.10:80").is_some_and(|s| s.destinations.len() == 1)
            && find(&kernel(&t.node), "TCP 10.0.1.1:30080").is_some()
    });
    let k = kernel(&t.node);
    let web = find(&k, "TCP 10.96.0.10:80").expect("ClusterIP");
    assert!(web.dest(ip("10.0.2.2"), 8080).is_some(), "{k:?}");
    assert_eq!(web.scheduler, "rr");
    assert_eq!(bound(&t.node), vec!["10.96.0.10/32"]);
    tcp_request(&t.client, "10.96.0.10:80".parse().unwrap()).expect("through the ClusterIP");
    tcp_request(&t.client, "10.0.1.1:30080".parse().unwrap()).expect("through the NodePort");
    // kube-proxy's health port answers.
    eventually(Duration::from_secs(60), "/healthz answers 200", || {
        lab::traffic::http_get(&t.node, "127.0.0.1:10256", "/healthz")
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    });

    let log = agent.log_text();
    assert!(log.contains("node=lab"), "{log}");
    assert!(!log.contains("flags ignored"), "{log}");
    // A run does --init-only's preparation first (here bpffs was mounted already).
    assert!(log.contains("bpffs is already mounted"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI colour in a log that is not a terminal: {log}"
    );
    let denied = control(&t.node, "GET", "/control/denied", "").expect("denied");
    assert!(
        denied.ends_with("[]"),
        "requests outside system:node-proxier: {denied}"
    );
    drop(agent);

    // kube-proxy's --init-only (bpffs is mounted already: nothing to do) and --cleanup: this
    // agent's state and kube-proxy's leave the node.
    let (rc, _, err) = t.node.sh_status(
        "/usr/local/bin/kube-proxy --config=/var/lib/kube-proxy/config.conf --init-only",
    );
    assert_eq!(rc, 0, "--init-only: {err}");
    assert!(err.contains("already mounted"), "{err}");
    let (rc, out, err) = t.node.sh_status(
        "/usr/local/bin/kube-proxy --config=/var/lib/kube-proxy/config.conf \
         --hostname-override=lab --cleanup",
    );
    assert_eq!(rc, 0, "--cleanup: {out}\n{err}");
    assert!(
        kernel(&t.node).is_empty(),
        "IPVS after --cleanup: {:?}",
        kernel(&t.node)
    );
    assert!(
        t.node.try_sh("ip link show kube-ipvs0").is_err(),
        "kube-ipvs0 after --cleanup"
    );
    assert!(!std::path::Path::new(probes_default_pin_root()).exists());
    let _ = std::fs::remove_dir_all("/run/kube-ipvs-bpf");
}

/// The pin root kube-proxy's command line uses (the agent's default).
fn probes_default_pin_root() -> &'static str {
    "/sys/fs/bpf/kube-ipvs-bpf/v2"
}

/// The three kinds of node firewall the agent's rules meet (issue 15): iptables through
/// nf_tables (`iptables-nft`), legacy iptables, and a firewall written in nftables alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NodeFirewall {
    /// `iptables-nft` chains with policy drop, kubelet's hint chain in iptables-nft's mangle.
    IptablesNft,
    /// `iptables-legacy` chains with policy drop, kubelet's hint chain in legacy mangle.
    IptablesLegacy,
    /// `table inet filter` with input and forward chains of policy drop, plus the accept of the
    /// service mark docs/datapath.md tells its operator to add; no iptables rule at all.
    NftablesOnly,
}

impl NodeFirewall {
    /// Writes the firewall on the node (before the agent starts, as kubelet and the firewall
    /// would be).
    fn write(self, node: &Netns) {
        let iptables = |ipt: &str| {
            format!(
                "{ipt} -t mangle -N KUBE-IPTABLES-HINT && {ipt} -P INPUT DROP && {ipt} -P FORWARD DROP && \
                 {ipt} -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT && \
                 {ipt} -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT && \
                 {ipt} -A INPUT -i lo -j ACCEPT"
            )
        };
        match self {
            NodeFirewall::IptablesNft => {
                node.sh(&iptables("iptables-nft"));
                node.sh(&iptables("ip6tables-nft"));
            }
            NodeFirewall::IptablesLegacy => {
                node.sh(&iptables("iptables-legacy"));
                node.sh(&iptables("ip6tables-legacy"));
            }
            NodeFirewall::NftablesOnly => {
                node.sh("nft -f - <<'EOF'\n\
                 table inet filter {\n\
                 chain input { type filter hook input priority filter; policy drop;\n\
                   ct state established,related accept; iif lo accept;\n\
                   meta mark & 0x00200000 == 0x00200000 accept; }\n\
                 chain forward { type filter hook forward priority filter; policy drop;\n\
                   ct state established,related accept;\n\
                   meta mark & 0x00200000 == 0x00200000 accept; }\n\
                 }\n\
                 EOF");
            }
        }
    }

    /// The iptables the agent must write to (and the other one, which must hold nothing of
    /// ours).
    fn backends(self) -> (&'static str, &'static str) {
        match self {
            NodeFirewall::IptablesLegacy => ("legacy", "nft"),
            _ => ("nft", "legacy"),
        }
    }
}

/// Behind a node firewall of `kind` that drops by default: the agent with
/// `iptablesBackend: default` picks the iptables the firewall uses and logs it, writes its
/// filter accept first in that backend's INPUT and FORWARD (and nothing in the other), its
/// notrack as the native nf_tables table with no iptables PREROUTING chain; NodePort
/// connections from a client and ClusterIP connections from a pod work and add no conntrack
/// entry.
fn services_work_untracked_behind(kind: NodeFirewall, name: &str) {
    require_lab();
    let t = SnatTopology::new(name);
    kind.write(&t.node);
    let (_srv, m) = remote_web_service(&t, name);
    let agent = Agent::start(
        &t.node,
        &m.dir,
        &["--cluster-cidr", SnatTopology::CLUSTER_CIDRS],
    );
    agent.wait_sync(0, 1);
    let (ours, other) = kind.backends();
    let detected = agent.wait_for(0, Duration::from_secs(30), |v| {
        v["message"] == "iptables backend detected"
    });
    assert_eq!(
        detected["backend"]
            .as_str()
            .map(str::to_lowercase)
            .as_deref(),
        Some(ours),
        "{detected}"
    );
    agent.wait_for(0, Duration::from_secs(30), |v| {
        v["message"] == "node rules written" && v["notrack"] == "nf_tables table inet kube-ipvs-bpf"
    });

    let table = t.node.sh("nft list table inet kube-ipvs-bpf");
    assert!(
        table.contains("type filter hook prerouting priority raw; policy accept;")
            && table.contains("meta mark & 0x00200000 == 0x00200000 notrack"),
        "{table}"
    );
    for family in ["iptables", "ip6tables"] {
        let save = t.node.sh(&format!(
            "{family}-{ours}-save -t filter; {family}-{ours}-save -t raw"
        ));
        for chain in ["INPUT", "FORWARD"] {
            let first = save
                .lines()
                .find(|l| l.starts_with(&format!("-A {chain} ")));
            assert!(
                first.is_some_and(|l| l.ends_with(
                    "-m comment --comment \"kube-ipvs-bpf: service traffic (untracked)\" -j ACCEPT"
                )),
                "{family}-{ours}: our accept must come first in {chain}:\n{save}"
            );
        }
        assert!(
            save.lines()
                .any(|l| l.starts_with("-A OUTPUT -m mark ! --mark ")
                    && l.ends_with("-j KUBE-IPVS-BPF-OUTPUT")),
            "{save}"
        );
        assert!(!save.contains("KUBE-IPVS-BPF-PREROUTING"), "{save}");
        let elsewhere = t
            .node
            .sh(&format!("{family}-{other}-save 2>/dev/null || true"));
        assert!(
            !elsewhere.contains("KUBE-IPVS-BPF") && !elsewhere.contains("kube-ipvs-bpf:"),
            "rules of ours in {family}-{other}:\n{elsewhere}"
        );
    }

    service_connections_leave_no_conntrack_entry(&t, &format!("behind the {kind:?} firewall"));
}

#[test]
fn behind_an_iptables_nft_firewall_the_accept_is_in_iptables_nft_and_services_are_untracked() {
    services_work_untracked_behind(NodeFirewall::IptablesNft, "ag-fw-nft");
}

#[test]
fn behind_an_iptables_legacy_firewall_the_accept_is_in_iptables_legacy_and_services_are_untracked()
{
    services_work_untracked_behind(NodeFirewall::IptablesLegacy, "ag-fw-leg");
}

#[test]
fn behind_an_nftables_only_drop_policy_with_the_documented_accept_services_are_untracked() {
    services_work_untracked_behind(NodeFirewall::NftablesOnly, "ag-fw-nfo");
}
