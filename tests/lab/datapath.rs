//! The conntrack-free SNAT datapath on a real kernel: the agent (IPVS + TC programs + IPVS
//! probe) on a node namespace between an off-cluster client, a local pod and a remote pod one
//! hop away (see `lab::topology::SnatTopology`). Checked with what the peers see (the source
//! address the server reports), the kernel's conntrack table (`nf_conntrack_count`,
//! `conntrack -L`, `conntrack -E`) and the agent's inspect output.

use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lab::agent::{Agent, Manifests};
use lab::topology::SnatTopology;
use lab::traffic::{
    HeldConnection, Server, seen_source, tcp_request, tcp_request_from, tcp_request_reset,
    udp_request, udp_request_from,
};
use lab::{Netns, require_lab};

/// Services of the datapath tests (dual-stack where it matters).
fn manifests(name: &str) -> Manifests {
    let m = Manifests::new(name);
    let svc = |name: &str, ty: &str, cips: &[&str], ports: &str| {
        let fam = if cips.len() == 2 {
            "\n  ipFamilyPolicy: PreferDualStack\n  ipFamilies: [IPv4, IPv6]"
        } else {
            ""
        };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: lab}}\nspec:\n  type: {ty}\n  clusterIP: {}\n  clusterIPs: [{}]{fam}\n  ports:\n{ports}---\n",
            cips[0],
            cips.join(", ")
        )
    };
    let slice = |svc: &str, fam: &str, ips: &[&str], port_name: &str, proto: &str, port: u16| {
        let eps: String = ips
            .iter()
            .map(|ip| format!("  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n    nodeName: other\n"))
            .collect();
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-{}\n  namespace: lab\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: {fam}\nports:\n  - {{name: {port_name}, protocol: {proto}, port: {port}}}\nendpoints:\n{eps}---\n",
            fam.to_lowercase()
        )
    };
    let mut y = String::new();
    y += &svc(
        "web",
        "NodePort",
        &["10.96.0.10", "fd00:96::10"],
        "    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 30080}\n",
    );
    y += &slice("web", "IPv4", &["10.244.2.2"], "http", "TCP", 8080);
    y += &slice("web", "IPv6", &["fd00:244:2::2"], "http", "TCP", 8080);
    y += &svc(
        "dns",
        "NodePort",
        &["10.96.0.53"],
        "    - {name: dns, protocol: UDP, port: 53, targetPort: 5353, nodePort: 30053}\n",
    );
    y += &slice("dns", "IPv4", &["10.244.2.2"], "dns", "UDP", 5353);
    y += &svc(
        "bulk",
        "NodePort",
        &["10.96.0.54"],
        "    - {name: bulk, protocol: UDP, port: 54, targetPort: 5354, nodePort: 30054}\n",
    );
    y += &slice("bulk", "IPv4", &["10.244.2.2"], "bulk", "UDP", 5354);
    y += &svc(
        "echo",
        "NodePort",
        &["10.96.0.30"],
        "    - {name: echo, protocol: TCP, port: 80, targetPort: 9000, nodePort: 30090}\n",
    );
    y += &slice("echo", "IPv4", &["10.244.2.2"], "echo", "TCP", 9000);
    // The local pod behind its own Service (hairpin).
    y += &svc(
        "self",
        "ClusterIP",
        &["10.96.0.20"],
        "    - {name: http, protocol: TCP, port: 80, targetPort: 8080}\n",
    );
    y += &slice("self", "IPv4", &["10.244.1.2"], "http", "TCP", 8080);
    // A pod on a bridge created after the agent started.
    y += &svc(
        "late",
        "ClusterIP",
        &["10.96.0.22"],
        "    - {name: http, protocol: TCP, port: 80, targetPort: 8080}\n",
    );
    y += &slice("late", "IPv4", &["10.244.3.2"], "http", "TCP", 8080);
    m.write("services.yaml", &y);
    m
}

/// The topology with servers on both pods and the agent running.
struct Lab {
    t: SnatTopology,
    agent: Agent,
    _m: Manifests,
    _servers: Vec<Server>,
}

fn lab(name: &str, firewall_drop: Option<bool>) -> Lab {
    lab_with_config(name, firewall_drop, None)
}

/// [`lab`], the agent started with a kube-proxy configuration file holding `config`.
fn lab_with_config(name: &str, firewall_drop: Option<bool>, config: Option<&str>) -> Lab {
    require_lab();
    let t = SnatTopology::new(name);
    if let Some(drop) = firewall_drop {
        t.node_firewall(drop);
    } else {
        t.node_firewall(false);
    }
    let servers = vec![
        Server::tcp(&t.remote, "10.244.2.2:8080".parse().unwrap()),
        Server::tcp(&t.remote, "[fd00:244:2::2]:8080".parse().unwrap()),
        Server::udp(&t.remote, "10.244.2.2:5353".parse().unwrap(), 0),
        Server::udp(&t.remote, "10.244.2.2:5354".parse().unwrap(), 3000),
        Server::tcp_echo(&t.remote, "10.244.2.2:9000".parse().unwrap()),
        Server::tcp(&t.pod, "10.244.1.2:8080".parse().unwrap()),
    ];
    let m = manifests(name);
    // A sweep a second: the sweeper resolves new SNAT records against the probe's `conns`
    // (the `probe_hit` counter) soon after they appear.
    let mut args = vec![
        "--cluster-cidr".to_string(),
        SnatTopology::CLUSTER_CIDRS.to_string(),
        "--sweep-period".to_string(),
        "1s".to_string(),
    ];
    if let Some(config) = config {
        m.write_other("config.yaml", config);
        args.push("--config".to_string());
        args.push(format!("{}/config.yaml", m.other_dir.display()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = Agent::start(&t.node, &m.dir, &args);
    agent.wait_sync(0, 1);
    Lab {
        t,
        agent,
        _m: m,
        _servers: servers,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// `conntrack -E` in a namespace, collected until [`Events::stop`].
struct Events {
    child: Child,
}

impl Events {
    fn start(ns: &Netns) -> Events {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .args(["conntrack", "-E", "-o", "timestamp"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("conntrack -E");
        std::thread::sleep(Duration::from_millis(300));
        Events { child }
    }

    fn stop(mut self) -> String {
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.child.kill();
        let mut out = String::new();
        if let Some(mut s) = self.child.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        let _ = self.child.wait();
        out
    }
}

#[test]
fn nodeport_from_an_external_client_is_source_natted_without_conntrack() {
    let l = lab("dp-np", None);
    let before = l.t.conntrack_count();
    let events = Events::start(&l.t.node);
    for _ in 0..20 {
        let a = tcp_request(&l.t.client, addr("10.0.1.1:30080")).expect("NodePort request");
        assert_eq!(
            seen_source(&a).map(|s| s.ip()),
            Some("10.0.2.1".parse().unwrap()),
            "the remote pod must see the node's address: {a}"
        );
    }
    let events = events.stop();
    assert_eq!(l.t.conntrack_count(), before, "nf_conntrack_count grew");
    assert_eq!(l.t.node.sh("conntrack -C").trim(), before.to_string());
    let listed = l.t.node.sh("conntrack -L 2>/dev/null");
    assert!(
        !listed.contains("dport=30080") && !listed.contains("sport=8080"),
        "service flows in conntrack:\n{listed}"
    );
    assert!(
        !events.contains("30080") && !events.contains("8080"),
        "conntrack events for service flows:\n{events}"
    );
    let snat = l.agent.inspect_snat(&l.t.node);
    let rows = snat["snat"].as_array().expect("snat rows");
    assert!(
        rows.iter()
            .filter(|r| r["client"]
                .as_str()
                .is_some_and(|c| c.starts_with("10.0.1.2:")))
            .count()
            >= 20,
        "{snat}"
    );
    // The occupancy counts the records listed, out of the table's size.
    let occupancy = &snat["occupancy"];
    assert!(
        occupancy["used"].as_u64() >= Some(rows.len() as u64)
            && occupancy["records"].as_u64() > occupancy["used"].as_u64(),
        "{snat}"
    );
    assert!(
        rows.iter().all(|r| r["node"]
            .as_str()
            .is_some_and(|n| n.starts_with("10.0.2.1:"))),
        "{snat}"
    );
    // The IPVS probe saw each connection: the entries name their Service.
    assert!(
        rows.iter().all(|r| r["service"] == "lab/web:http"),
        "{snat}"
    );
    // TC egress counted each connection the IPVS probe recorded (`probe_hit`) when it allocated
    // its SNAT record, none unrecorded (`probe_miss`).
    let c = l.agent.counters(&l.t.node);
    assert!(c.get("snat_alloc").copied().unwrap_or(0) >= 20, "{c:?}");
    assert!(c.get("rev_hit").copied().unwrap_or(0) >= 20, "{c:?}");
    assert!(c.get("probe_hit").copied().unwrap_or(0) >= 20, "{c:?}");
    assert_eq!(c.get("probe_miss").copied().unwrap_or(0), 0, "{c:?}");
}

/// The control: kube-proxy's way (vs.conntrack=1 + iptables MASQUERADE) costs one conntrack
/// entry per connection, which the measurements above would see.
#[test]
fn kube_proxy_masquerade_creates_one_conntrack_entry_per_connection() {
    require_lab();
    let t = SnatTopology::new("dp-kp");
    t.node_firewall(false);
    let _srv = Server::tcp(&t.remote, addr("10.244.2.2:8080"));
    t.node.sh("sysctl -qw net.ipv4.vs.conntrack=1");
    t.node.sh(
        "ipvsadm -A -t 10.0.1.1:30080 -s rr && ipvsadm -a -t 10.0.1.1:30080 -r 10.244.2.2:8080 -m",
    );
    t.node
        .sh("iptables -t nat -A PREROUTING -p tcp --dport 30080 -j MARK --set-xmark 0x4000/0x4000");
    t.node
        .sh("iptables -t nat -A POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE");
    let before = t.conntrack_count();
    for _ in 0..20 {
        let a = tcp_request(&t.client, addr("10.0.1.1:30080")).expect("request via MASQUERADE");
        assert!(a.starts_with("10.0.2.1:"), "{a}");
    }
    assert_eq!(t.conntrack_count(), before + 20);
}

#[test]
fn clusterip_from_a_pod_to_a_remote_backend_keeps_the_pod_address_untracked() {
    let l = lab("dp-cip", None);
    let before = l.t.conntrack_count();
    for _ in 0..10 {
        let a = tcp_request(&l.t.pod, addr("10.96.0.10:80")).expect("ClusterIP from the pod");
        assert!(a.starts_with("10.244.1.2:"), "no SNAT expected: {a}");
    }
    assert_eq!(
        l.t.conntrack_count(),
        before,
        "replies must be untracked too"
    );
    let c = l.agent.counters(&l.t.node);
    assert!(c.get("reply_marked").copied().unwrap_or(0) >= 10, "{c:?}");
}

/// The IPVS probe is a BPF trampoline, not the dearer kretprobe, on the lab's kernels: fexit on
/// `ip_vs_conn_new` where the trampoline takes its 7 arguments (6.12), fexit on `ip_vs_schedule`
/// (5 arguments; it returns every connection a virtual service schedules) where it does not (6.1
/// on x86-64). Read from the kernel:
/// the program behind the agent's pinned probe link, by bpftool. What it records marks the
/// replies of untranslated connections (`reply_marked`, none tracked).
#[test]
fn the_ipvs_probe_is_an_fexit_on_ip_vs_conn_new_or_else_on_ip_vs_schedule() {
    let l = lab("dp-probe", None);
    let prog = linked_program(&l, "ipvs_probe");
    let release = l.t.node.sh("uname -r");
    let arch = l.t.node.sh("uname -m");
    let expected = if release.starts_with("6.1.") && arch.trim() == "x86_64" {
        "ipvs_schedule_fexit"
    } else {
        "ipvs_conn_new_fexit"
    };
    // The agent logs the flavours it passed over, and why.
    let attached = log_lines(&l, "IPVS connection probe");
    assert_eq!(
        prog["name"].as_str(),
        Some(expected),
        "{} {}: {prog}\n{attached}",
        release.trim(),
        arch.trim()
    );
    assert_eq!(prog["type"].as_str(), Some("tracing"), "{prog}");

    let before = l.t.conntrack_count();
    for _ in 0..5 {
        let a = tcp_request(&l.t.pod, addr("10.96.0.10:80")).expect("ClusterIP from the pod");
        assert!(a.starts_with("10.244.1.2:"), "no SNAT expected: {a}");
    }
    let c = l.agent.counters(&l.t.node);
    assert!(c.get("probe_conn").copied().unwrap_or(0) >= 5, "{c:?}");
    assert!(c.get("reply_marked").copied().unwrap_or(0) >= 5, "{c:?}");
    assert_eq!(l.t.conntrack_count(), before, "replies must be untracked");
}

/// The value of key 0 of a pinned array map, as bpftool reads it from the kernel.
fn pinned_value(l: &Lab, map: &str) -> Vec<u8> {
    pinned_lookup(l, map, &[0; 4]).expect("key 0")
}

/// The value of `key` in a pinned map, as bpftool reads it from the kernel; `None` if absent.
fn pinned_lookup(l: &Lab, map: &str, key: &[u8]) -> Option<Vec<u8>> {
    let pin = format!("{}/{map}", lab::agent::pin_root(&l.t.node));
    let key: Vec<String> = key.iter().map(|b| b.to_string()).collect();
    let (status, out, err) = l.t.node.sh_status(&format!(
        "bpftool -j map lookup pinned {pin} key {}",
        key.join(" ")
    ));
    if status != 0 {
        // bpftool -j prints `null` for a key the map does not hold (and exits 254).
        assert!(
            out.trim() == "null" || format!("{out}{err}").to_lowercase().contains("not found"),
            "bpftool map lookup: {out} {err}"
        );
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&out).expect("bpftool map JSON");
    Some(
        v["value"]
            .as_array()
            .expect("the value's bytes")
            .iter()
            .map(|b| {
                let b = b.as_str().expect("a hex byte");
                u8::from_str_radix(b.trim_start_matches("0x"), 16).expect("a hex byte")
            })
            .collect(),
    )
}

/// The `conns` key (`struct tuple`) of a TCP connection from `client` to `backend` (IPv4).
fn conns_key(client: SocketAddr, backend: SocketAddr) -> Vec<u8> {
    let v4_mapped = |a: SocketAddr| match a.ip() {
        std::net::IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(ip) => ip.octets(),
    };
    let mut key = Vec::with_capacity(40);
    key.extend_from_slice(&v4_mapped(client));
    key.extend_from_slice(&v4_mapped(backend));
    key.extend_from_slice(&client.port().to_be_bytes());
    key.extend_from_slice(&backend.port().to_be_bytes());
    key.extend_from_slice(&[6, 0, 0, 0]);
    key
}

/// The identity of the IPVS connection a `conns` value (`struct conn_value`) records:
/// `conn_id_hi`:`conn_id_lo` when CONN_ID_SET_HI is set.
fn conn_id(value: &[u8]) -> Option<u64> {
    let hi = u16::from_ne_bytes([value[18], value[19]]);
    let lo = u32::from_ne_bytes([value[20], value[21], value[22], value[23]]);
    (hi & 0x8000 != 0).then(|| (u64::from(hi & 0x7fff) << 32) | u64::from(lo))
}

/// The agent's log lines that contain `needle`.
fn log_lines(l: &Lab, needle: &str) -> String {
    l.agent
        .log_text()
        .lines()
        .filter(|line| line.contains(needle))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The program behind one of the agent's pinned links, by bpftool.
fn linked_program(l: &Lab, link: &str) -> serde_json::Value {
    let pin = format!("{}/links/{link}", lab::agent::pin_root(&l.t.node));
    let link = l.t.node.sh(&format!("bpftool -j link show pinned {pin}"));
    let link: serde_json::Value = serde_json::from_str(&link).expect("bpftool link JSON");
    let id = link["prog_id"].as_u64().expect("the link's prog_id");
    let prog = l.t.node.sh(&format!("bpftool -j prog show id {id}"));
    serde_json::from_str(&prog).expect("bpftool prog JSON")
}

/// Polls `done` every half second for up to `secs` seconds.
fn wait_for(secs: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The probe on IPVS freeing a connection (an fentry on `ip_vs_conn_rcu_free`) removes the
/// `conns` entries of the connections IPVS frees, untranslated (a pod to a ClusterIP) and
/// translated (NodePort) alike: reset connections (IPVS's CLOSE state lasts 10 s) lose their
/// entries within seconds of IPVS dropping them, not at a full read of the sweeper's after
/// IPVS's 15-minute established timeout (which alone would remove an untranslated one). Read
/// from the kernel: the entries by bpftool, the probe's counter `probe_free_removed`.
#[test]
fn conns_entries_go_when_ipvs_frees_their_connections() {
    let l = lab("dp-free", None);
    // The agent logs the flavours it passed over, and why.
    let attached = log_lines(&l, "IPVS freeing a connection");
    let pin = format!("{}/links/ipvs_free_probe", lab::agent::pin_root(&l.t.node));
    assert!(
        l.t.node.sh_status(&format!("test -e {pin}")).0 == 0,
        "{attached}"
    );
    let prog = linked_program(&l, "ipvs_free_probe");
    assert_eq!(
        prog["name"].as_str(),
        Some("ipvs_conn_free_fentry"),
        "{prog}\n{attached}"
    );
    assert_eq!(prog["type"].as_str(), Some("tracing"), "{prog}");
    let backend = addr("10.244.2.2:8080");
    let mut keys = Vec::new();
    for _ in 0..4 {
        for (from, to) in [(&l.t.pod, "10.96.0.10:80"), (&l.t.client, "10.0.1.1:30080")] {
            let (local, answer) = tcp_request_reset(from, addr(to)).expect("request");
            assert!(answer.contains("->"), "{answer}");
            keys.push(conns_key(local, backend));
        }
    }
    for key in &keys {
        let value = pinned_lookup(&l, "conns", key).expect("the probe's entry");
        assert!(conn_id(&value).is_some(), "no identity: {value:?}");
    }
    let gone = wait_for(45, || {
        keys.iter()
            .all(|key| pinned_lookup(&l, "conns", key).is_none())
    });
    assert!(
        gone,
        "conns entries left after IPVS freed their connections; IPVS holds:\n{}",
        l.t.node.sh("ipvsadm -Lnc")
    );
    let c = l.agent.counters(&l.t.node);
    assert!(
        c.get("probe_free_removed").copied().unwrap_or(0) >= keys.len() as u64,
        "{c:?}"
    );
}

/// A connection on the tuple of one IPVS still holds (a client port reused after a reset: IPVS
/// schedules it as a new connection and expires the old one at once) keeps its `conns` entry
/// when IPVS frees the old connection: the entry carries the new connection's identity, the
/// probe keeps it (`probe_free_kept`), and the new connection's replies stay marked (its echo
/// comes back, nothing in conntrack). Its own free then removes it.
#[test]
fn a_connection_reusing_a_tuple_keeps_its_conns_entry_when_ipvs_frees_the_old_one() {
    let l = lab("dp-reuse", None);
    let echo = std::net::SocketAddrV4::new([10, 96, 0, 30].into(), 80);
    let port = 41234;
    let key = conns_key(
        SocketAddr::from(([10, 244, 1, 2], port)),
        addr("10.244.2.2:9000"),
    );
    let tracked = l.t.conntrack_count();
    let mut first = HeldConnection::open_from(&l.t.pod, port, echo).expect("first connection");
    assert_eq!(first.echo("one").expect("echo"), "one");
    let old = pinned_lookup(&l, "conns", &key)
        .and_then(|v| conn_id(&v))
        .expect("the first connection's entry");
    let kept = |l: &Lab| {
        l.agent
            .counters(&l.t.node)
            .get("probe_free_kept")
            .copied()
            .unwrap_or(0)
    };
    let kept_before = kept(&l);
    first.reset().expect("reset");
    let mut second = HeldConnection::open_from(&l.t.pod, port, echo).expect("second connection");
    assert_eq!(second.echo("two").expect("echo"), "two");
    assert!(
        wait_for(30, || kept(&l) > kept_before),
        "IPVS did not free the first connection: {}\n{:?}",
        l.t.node.sh("ipvsadm -Lnc"),
        l.agent.counters(&l.t.node)
    );
    let new = pinned_lookup(&l, "conns", &key)
        .and_then(|v| conn_id(&v))
        .expect("the second connection's entry, kept");
    assert_ne!(new, old, "a new IPVS connection, a new identity");
    assert_eq!(second.echo("three").expect("echo"), "three");
    assert_eq!(
        l.t.conntrack_count(),
        tracked,
        "replies must stay untracked"
    );
    second.reset().expect("reset");
    assert!(
        wait_for(45, || pinned_lookup(&l, "conns", &key).is_none()),
        "the second connection's entry outlived it:\n{}",
        l.t.node.sh("ipvsadm -Lnc")
    );
}

/// The port filter (docs/datapath.md "Port filter") on a node the agent runs: the agent turns it
/// on once its probe and programs are attached (`CFG_F_PORT_FILTER` in the pinned `config`), the
/// probe and the SNAT allocation put the backend port of the connections they see in it, the
/// agent the service ports; a port nothing uses stays out, and a connection to it (no Service)
/// passes untouched. Read from the kernel with bpftool.
#[test]
fn the_port_filter_holds_the_backend_and_service_ports_in_use() {
    let l = lab("dp-portfilter", None);
    let _direct = Server::tcp(&l.t.remote, "10.244.2.2:8081".parse().unwrap());
    let a = tcp_request(&l.t.pod, addr("10.96.0.10:80")).expect("ClusterIP from the pod");
    assert!(a.starts_with("10.244.1.2:"), "no SNAT expected: {a}");
    let a = tcp_request(&l.t.node, addr("10.96.0.10:80")).expect("ClusterIP from the host");
    assert!(a.starts_with("10.0.2.1:"), "{a}");
    let node_port = usize::from(seen_source(&a).expect("the source the server saw").port());
    let before = l.agent.counters(&l.t.node);
    let a = tcp_request(&l.t.pod, addr("10.244.2.2:8081")).expect("the remote pod, directly");
    assert!(a.starts_with("10.244.1.2:"), "untouched: {a}");
    let after = l.agent.counters(&l.t.node);
    for counter in [
        "svc_marked",
        "reply_marked",
        "snat_alloc",
        "rev_hit",
        "fwd_hit",
    ] {
        assert_eq!(
            before.get(counter),
            after.get(counter),
            "{counter}: a connection to no Service is none of the agent's"
        );
    }

    let config = pinned_value(&l, "config");
    let flags = u32::from_le_bytes(config[16..20].try_into().expect("config.flags"));
    assert_ne!(flags & 0x40, 0, "CFG_F_PORT_FILTER: flags {flags:#x}");
    let filter = pinned_value(&l, "port_filter");
    assert_eq!(filter.len(), 24576, "three bitmaps of 65536 bits");
    let has = |bitmap: usize, port: usize| {
        let word = bitmap * 8192 + port / 64 * 8;
        let word = u64::from_le_bytes(filter[word..word + 8].try_into().expect("a word"));
        word >> (port % 64) & 1 == 1
    };
    // The backend port of the connections IPVS scheduled: the pod's, untranslated, and the
    // host's, source-NATed.
    assert!(has(0, 8080), "backend 8080");
    assert!(
        has(2, node_port),
        "the host's translation's node port {node_port}"
    );
    for port in [80, 53, 30080, 30090] {
        assert!(has(1, port), "service port {port}");
    }
    assert!(
        !has(0, 8081) && !has(1, 8081) && !has(2, 8081),
        "8081 is nobody's port"
    );
    assert!(
        l.agent.log_text().contains("port filter on"),
        "the agent logs it"
    );
}

#[test]
fn host_to_clusterip_is_source_natted_to_the_node() {
    let l = lab("dp-host", None);
    let before = l.t.conntrack_count();
    for _ in 0..5 {
        let a = tcp_request(&l.t.node, addr("10.96.0.10:80")).expect("ClusterIP from the host");
        assert!(a.starts_with("10.0.2.1:"), "{a}");
    }
    assert_eq!(l.t.conntrack_count(), before);
}

#[test]
fn hairpin_through_a_service_reaches_the_pod_itself() {
    let l = lab("dp-hair", None);
    for _ in 0..5 {
        let a = tcp_request(&l.t.pod, addr("10.96.0.20:80")).expect("hairpin");
        assert!(
            a.starts_with("10.244.1.1:"),
            "the pod must see the node's bridge address: {a}"
        );
    }
}

#[test]
fn udp_nodeport_is_source_natted_without_conntrack() {
    let l = lab("dp-udp", None);
    let before = l.t.conntrack_count();
    for _ in 0..10 {
        let a = udp_request(&l.t.client, addr("10.0.1.1:30053")).expect("UDP NodePort");
        assert!(a.starts_with("10.0.2.1:"), "{a}");
    }
    assert_eq!(l.t.conntrack_count(), before);
}

#[test]
fn ipv6_nodeport_and_clusterip() {
    let l = lab("dp-v6", None);
    let before = l.t.conntrack_count();
    for _ in 0..5 {
        let a = tcp_request(&l.t.client, addr("[fd00:1::1]:30080")).expect("IPv6 NodePort");
        assert!(a.starts_with("[fd00:2::1]:"), "{a}");
        let a = tcp_request(&l.t.pod, addr("[fd00:96::10]:80")).expect("IPv6 ClusterIP");
        assert!(
            a.starts_with("[fd00:244:1::2]:"),
            "{a}\n{}\n{}",
            l.agent.inspect_snat(&l.t.node),
            l.t.node.sh(&format!(
                "bpftool map dump pinned {}/cluster_cidrs; bpftool map dump pinned {}/svc_ports",
                lab::agent::pin_root(&l.t.node),
                lab::agent::pin_root(&l.t.node)
            ))
        );
    }
    assert_eq!(l.t.conntrack_count(), before);
}

#[test]
fn icmp_fragmentation_needed_reaches_the_client() {
    let l = lab("dp-icmp", None);
    // A narrower link beyond the node: the router sends "fragmentation needed" to the source
    // it sees (the node's SNAT address); the node must translate it back to the client.
    l.t.router.sh("ip link set eth1 mtu 1200");
    l.t.remote.sh("ip link set eth0 mtu 1200");
    let mtu = l.t.client.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.connect("10.0.1.1:30053").expect("connect");
        let pmtudisc_do: libc::c_int = libc::IP_PMTUDISC_DO;
        // SAFETY: a valid socket and a c_int option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                &pmtudisc_do as *const _ as *const libc::c_void,
                4,
            )
        };
        assert_eq!(rc, 0);
        let _ = s.send(&[0u8; 1400]);
        std::thread::sleep(Duration::from_millis(500));
        let mut mtu: libc::c_int = 0;
        let mut len: libc::socklen_t = 4;
        // SAFETY: as above, reading a c_int.
        unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU,
                &mut mtu as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        mtu
    });
    assert_eq!(mtu, 1200, "the client did not learn the path MTU");
    let c = l.agent.counters(&l.t.node);
    assert!(c.get("icmp_xlate").copied().unwrap_or(0) >= 1, "{c:?}");
}

#[test]
fn a_large_fragmented_udp_reply_arrives_whole() {
    let l = lab("dp-frag", None);
    let got = l.t.client.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send_to(b"big", "10.0.1.1:30054").expect("send");
        let mut buf = vec![0u8; 65536];
        let (n, _) = s.recv_from(&mut buf).expect("fragmented reply");
        buf.truncate(n);
        buf
    });
    assert_eq!(got.len(), 3000);
    assert!(
        String::from_utf8_lossy(&got).starts_with("10.0.2.1:"),
        "reply: {}",
        String::from_utf8_lossy(&got[..40])
    );
    let c = l.agent.counters(&l.t.node);
    assert!(c.get("frag_xlate").copied().unwrap_or(0) >= 1, "{c:?}");
}

#[test]
fn a_drop_policy_firewall_with_established_accept_lets_service_traffic_through() {
    let l = lab("dp-fw", Some(true));
    let a = tcp_request(&l.t.client, addr("10.0.1.1:30080"))
        .expect("NodePort through a drop-policy firewall");
    assert!(a.starts_with("10.0.2.1:"), "{a}");
    let a = tcp_request(&l.t.pod, addr("10.96.0.10:80"))
        .expect("ClusterIP through a drop-policy firewall");
    assert!(a.starts_with("10.244.1.2:"), "{a}");
    let a = udp_request(&l.t.client, addr("10.0.1.1:30053"))
        .expect("UDP through a drop-policy firewall");
    assert!(a.starts_with("10.0.2.1:"), "{a}");
}

/// veth keeps checksum offload on (CHECKSUM_PARTIAL, GSO): a 1 MiB transfer through SNAT.
#[test]
fn veth_checksum_offload_left_on_bulk_transfer_is_intact() {
    let l = lab("dp-csum", None);
    let mut conn = HeldConnection::open(&l.t.client, addr("10.0.1.1:30090")).expect("connect");
    let chunk: String = (0..64 * 1024)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    for i in 0..16 {
        assert_eq!(
            conn.echo(&chunk).expect("echo"),
            chunk,
            "chunk {i} corrupted"
        );
    }
}

#[test]
fn an_agent_restart_keeps_an_open_source_natted_connection() {
    let l = lab("dp-restart", None);
    let mut conn = HeldConnection::open(&l.t.client, addr("10.0.1.1:30090")).expect("connect");
    assert_eq!(conn.echo("before\n").unwrap(), "before\n");
    let Lab {
        t,
        agent,
        _m,
        _servers,
    } = l;
    agent.stop();
    assert_eq!(conn.echo("agent stopped\n").unwrap(), "agent stopped\n");
    let agent = Agent::start(
        &t.node,
        &_m.dir,
        &["--cluster-cidr", SnatTopology::CLUSTER_CIDRS],
    );
    let ev = agent.wait_sync(0, 1);
    assert_eq!(lab::agent::ops_issued(&ev).values().sum::<u64>(), 0, "{ev}");
    assert_eq!(conn.echo("after restart\n").unwrap(), "after restart\n");
    let local = conn.local_addr().unwrap();
    let snat = agent.inspect_snat(&t.node);
    assert!(
        snat["snat"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["client"] == local.to_string()),
        "{snat}"
    );
}

/// Entries expire from their own state: with short IPVS timeouts (a kube-proxy style config
/// file), a finished TCP connection and an idle UDP flow leave `inspect snat` within a few
/// sweeps.
#[test]
fn snat_entries_expire_after_their_connections_end() {
    require_lab();
    let t = SnatTopology::new("dp-exp");
    t.node_firewall(false);
    let _a = Server::tcp(&t.remote, addr("10.244.2.2:8080"));
    let _b = Server::udp(&t.remote, addr("10.244.2.2:5353"), 0);
    let m = manifests("dp-exp");
    m.write_other(
        "config.yaml",
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nipvs:\n  tcpFinTimeout: 2s\n  udpTimeout: 2s\n",
    );
    let config = format!("{}/config.yaml", m.other_dir.display());
    let agent = Agent::start(
        &t.node,
        &m.dir,
        &[
            "--cluster-cidr",
            SnatTopology::CLUSTER_CIDRS,
            "--config",
            &config,
            "--sweep-period",
            "1s",
        ],
    );
    agent.wait_sync(0, 1);
    tcp_request(&t.client, addr("10.0.1.1:30080")).expect("TCP");
    udp_request(&t.client, addr("10.0.1.1:30053")).expect("UDP");
    let rows = |a: &Agent| {
        a.inspect_snat(&t.node)["snat"]
            .as_array()
            .map_or(0, |r| r.len())
    };
    assert_eq!(rows(&agent), 2, "{}", agent.inspect_snat(&t.node));
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while rows(&agent) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "entries did not expire: {}",
            agent.inspect_snat(&t.node)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A device that appears after the agent started gets the datapath (rtnetlink events): a pod
/// behind a new bridge reaches itself through its Service and sees that bridge's address.
#[test]
fn a_device_that_appears_later_gets_the_datapath() {
    let l = lab("dp-late", None);
    let pod2 = Netns::new("dp-late-p2");
    l.t.node.sh(
        "ip link add cni1 type bridge && ip addr add 10.244.3.1/24 dev cni1 && ip link set cni1 up",
    );
    lab::sh(&format!(
        "ip link add veth-p2 netns {} type veth peer name eth0 netns {}",
        l.t.node.name(),
        pod2.name()
    ));
    l.t.node
        .sh("ip link set veth-p2 master cni1 && ip link set veth-p2 up");
    pod2.sh("ip addr add 10.244.3.2/24 dev eth0 && ip link set eth0 up && ip route add default via 10.244.3.1");
    let _srv = Server::tcp(&pod2, addr("10.244.3.2:8080"));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match tcp_request(&pod2, addr("10.96.0.22:80")) {
            Ok(a) if a.starts_with("10.244.3.1:") => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "hairpin through the new bridge: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The benchmark's two kube-proxy datapaths (`lab::kube_proxy`, checked byte for byte against a
/// real kube-proxy's node state by its unit tests) work on a real kernel: NodePort from the
/// off-cluster client is masqueraded to the node (the router has no route back to the client),
/// ClusterIP from a pod keeps the pod address, and every connection costs exactly one conntrack
/// entry in both modes.
#[test]
fn kube_proxy_ipvs_and_nftables_modes_as_generated_serve_with_one_conntrack_entry_per_connection() {
    use lab::kube_proxy::{self, NodeConfig, Protocol, ServicePort};
    require_lab();
    let t = SnatTopology::new("dp-kpm");
    let _srv = Server::tcp(&t.remote, addr("10.244.2.2:8080"));
    let services = vec![ServicePort {
        node_port: Some(30080),
        ..ServicePort::cluster_ip(
            "lab",
            "web",
            "http",
            Protocol::Tcp,
            "10.96.0.10".parse().expect("address"),
            80,
            &[("10.244.2.2".parse().expect("address"), 8080)],
        )
    }];
    let node = NodeConfig {
        cluster_cidr: "10.244.0.0/16".into(),
        service_cidr: "10.96.0.0/16".into(),
        nodeport_addresses: vec!["10.0.1.1".parse().expect("address")],
    };
    for mode in ["ipvs", "nftables"] {
        match mode {
            "ipvs" => kube_proxy::apply_ipvs_mode(&t.node, &services, &node),
            _ => kube_proxy::apply_nftables_mode(&t.node, &services, &node),
        }
        .unwrap_or_else(|e| panic!("programming kube-proxy's {mode} mode: {e:#}"));
        t.node_firewall(false);
        let before = t.conntrack_count();
        for _ in 0..5 {
            let a = tcp_request(&t.client, addr("10.0.1.1:30080"))
                .unwrap_or_else(|e| panic!("{mode} mode NodePort: {e}"));
            assert!(
                a.starts_with("10.0.2.1:"),
                "{mode} mode NodePort seen as {a}"
            );
            let a = tcp_request(&t.pod, addr("10.96.0.10:80"))
                .unwrap_or_else(|e| panic!("{mode} mode ClusterIP: {e}"));
            assert!(
                a.starts_with("10.244.1.2:"),
                "{mode} mode ClusterIP seen as {a}"
            );
        }
        assert_eq!(t.conntrack_count(), before + 10, "{mode} mode");
        match mode {
            "ipvs" => kube_proxy::teardown_ipvs_mode(&t.node),
            _ => kube_proxy::teardown_nftables_mode(&t.node),
        }
        .unwrap_or_else(|e| panic!("removing kube-proxy's {mode} mode: {e:#}"));
        t.node
            .sh("iptables -F && iptables -X && ip6tables -F && ip6tables -X");
        t.node.sh("conntrack -F 2>/dev/null; true");
    }
}

/// The CPUs this guest runs on (2 under `LAB_SMP=2`, the lab's multi-CPU runs).
fn online_cpus() -> Vec<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").expect("cpu/online");
    let mut cpus = Vec::new();
    for part in text.trim().split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

/// Pins the calling thread to one CPU.
fn pin_to(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).expect("cpu set");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("sched_setaffinity");
}

/// Connections made at once from clients pinned to every CPU of the guest (with `LAB_SMP=2` the
/// programs and the SNAT table's claims run on both CPUs at the same moment): every request is
/// answered from the node's address, each connection gets exactly one SNAT record with its own
/// node port (no connection translated twice, no reply tuple shared), nothing is dropped for a
/// full or busy table and conntrack stays empty.
#[test]
fn connections_from_clients_pinned_to_every_cpu_each_get_one_snat_record() {
    const TCP_PER_CPU: usize = 120;
    const UDP_PER_CPU: usize = 40;
    const POD_PER_CPU: usize = 40;
    // The requests take minutes under TCG: with IPVS's default timeouts (120 s after a FIN) the
    // sweeper would rightly free the first connections' records before the count. An hour
    // keeps every record for the count; expiry has its own test.
    let l = lab_with_config(
        "dp-smp",
        None,
        Some(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\nipvs:\n  tcpFinTimeout: 1h\n  udpTimeout: 1h\n",
        ),
    );
    let cpus = online_cpus();
    eprintln!("clients pinned to CPUs {cpus:?}");
    let before = l.t.conntrack_count();
    // A thread inherits its creator's CPU affinity, so the threads `Netns::run` starts for each
    // request stay on the worker's CPU.
    let answers: Vec<_> = std::thread::scope(|scope| {
        let workers: Vec<_> = cpus
            .iter()
            .map(|&cpu| {
                let t = &l.t;
                scope.spawn(move || {
                    pin_to(cpu);
                    let mut answers = Vec::new();
                    for i in 0..TCP_PER_CPU {
                        let to = addr("10.0.1.1:30080");
                        answers.push(("tcp", tcp_request_from(&t.client, to)));
                        if i < UDP_PER_CPU {
                            let to = addr("10.0.1.1:30053");
                            answers.push(("udp", udp_request_from(&t.client, to)));
                        }
                        if i < POD_PER_CPU {
                            let to = addr("10.96.0.10:80");
                            answers.push(("pod", tcp_request_from(&t.pod, to)));
                        }
                    }
                    answers
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("client thread"))
            .collect()
    });
    // A translated connection is its client port (one client address): the kernel picks a UDP
    // client's port at random, and two requests from one port within IPVS's UDP timeout are one
    // IPVS connection, so one SNAT record. Each maps to the node address:port its backend saw.
    let mut node_port_of = std::collections::BTreeMap::new();
    let mut requests = 0;
    for (kind, answer) in answers {
        let (local, answer) = answer.unwrap_or_else(|e| panic!("{kind} request failed: {e}"));
        let seen = seen_source(&answer);
        if kind == "pod" {
            assert_eq!(
                seen.map(|s| s.ip().to_string()).as_deref(),
                Some("10.244.1.2"),
                "{answer}"
            );
            continue;
        }
        requests += 1;
        let seen = seen.filter(|s| s.ip().to_string() == "10.0.2.1");
        let seen = seen.unwrap_or_else(|| panic!("{kind} not from the node's address: {answer}"));
        let earlier = node_port_of.insert((kind, local.port()), seen);
        assert!(
            earlier.is_none_or(|e| e == seen),
            "{kind} client port {} reached its backend from {earlier:?} and {seen}",
            local.port()
        );
    }
    let translated = node_port_of.len() as u64;
    eprintln!("{requests} requests, {translated} distinct client connections");
    assert_eq!(l.t.conntrack_count(), before, "nf_conntrack_count grew");
    let snat = l.agent.inspect_snat(&l.t.node);
    let rows = snat["snat"].as_array().expect("snat rows");
    let mut clients = std::collections::BTreeSet::new();
    let mut replies = std::collections::BTreeSet::new();
    for r in rows {
        let (proto, client, node, backend) = (
            r["protocol"].to_string(),
            r["client"].to_string(),
            r["node"].to_string(),
            r["backend"].to_string(),
        );
        assert!(
            clients.insert((proto.clone(), client.clone(), backend.clone())),
            "a connection has two SNAT records: {proto} {client} -> {backend}\n{snat}"
        );
        assert!(
            replies.insert((proto.clone(), node.clone(), backend.clone())),
            "two connections share a reply tuple: {proto} {node} <- {backend}\n{snat}"
        );
    }
    let c = l.agent.counters(&l.t.node);
    let in_table: std::collections::BTreeSet<String> = rows
        .iter()
        .filter_map(|r| r["node"].as_str().map(str::to_string))
        .collect();
    let missing: Vec<_> = node_port_of
        .iter()
        .filter(|(_, node)| !in_table.contains(&node.to_string()))
        .collect();
    let sweeps: Vec<String> = l
        .agent
        .log_text()
        .lines()
        .filter(|line| line.contains("swept"))
        .map(str::to_string)
        .collect();
    assert!(
        missing.is_empty(),
        "connections without a record: {missing:?}\nsweeps that expired records: {sweeps:?}\n\
         counters: {c:?}\n{snat}"
    );
    for r in rows {
        let kind = r["protocol"].as_str().unwrap_or_default().to_lowercase();
        let client: Option<SocketAddr> = r["client"].as_str().and_then(|c| c.parse().ok());
        let port = client.map_or(0, |c| c.port());
        let expected = node_port_of
            .get(&(kind.as_str(), port))
            .map(|n| n.to_string());
        assert_eq!(
            expected.as_deref(),
            r["node"].as_str(),
            "a record whose node tuple is not the one its client's backend saw: {r}"
        );
    }
    assert_eq!(
        rows.len() as u64,
        translated,
        "one SNAT record per translated connection\nsweeps that expired records: {sweeps:?}\n\
         counters: {c:?}\n{snat}"
    );
    eprintln!("counters after {translated} translated connections: {c:?}");
    assert_eq!(c.get("snat_alloc").copied(), Some(translated), "{c:?}");
    for dropped in ["map_full", "port_exhausted"] {
        assert_eq!(c.get(dropped).copied().unwrap_or(0), 0, "{dropped}: {c:?}");
    }
}
