//! Host-kernel test of the switch window from kube-proxy (`agent::datapath::switch`,
//! docs/switching.md) on a real loaded datapath and real conntrack entries: in a network
//! namespace of its own with a ct-using nftables rule (so that conntrack tracks), a TCP
//! connection to a "service port" and one to another port are open; the window seeded from that
//! dump holds the service connection's tuples only and is open in the datapath's `config`; a
//! refresh while the connection lives keeps it; once it is closed (conntrack's TIME_WAIT), the
//! next refresh empties the map and closes the window. And `drain` (the rollback) is refused while
//! the window is open, changing nothing. Needs root, bpffs and nft; says so and passes without
//! them.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::process::Command;

use agent::cleanup::nfnetlink::Nfnl;
use agent::conntrack::CtEntry;
use agent::datapath::drain;
use agent::datapath::switch::{open_tuples, refresh, seed};
use agent::takeover::old_flow_tuples;
use common::{can_load_datapath, in_netns, load_with_one_service, small_map_sizes, test_pins};
use probes::maps::{CFG_F_SWITCH, L4Proto, Tuple};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

fn dump() -> Vec<CtEntry> {
    Nfnl::open()
        .expect("netfilter socket")
        .conntrack_entries()
        .expect("conntrack dump")
}

/// A TCP connection on loopback that has exchanged data both ways.
fn connect(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let port = listener.local_addr().expect("addr").port();
    let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let (mut server, _) = listener.accept().expect("accept");
    let mut buf = [0u8; 4];
    client.write_all(b"ping").expect("write");
    server.read_exact(&mut buf).expect("read");
    server.write_all(b"pong").expect("write");
    client.read_exact(&mut buf).expect("read");
    (client, server)
}

/// The tuples `switch_flows` holds.
fn flow_tuples(map: &probes::TypedMap<Tuple, probes::maps::SwitchFlow>) -> HashSet<Tuple> {
    map.entries()
        .expect("switch_flows")
        .into_iter()
        .map(|(t, _)| t)
        .collect()
}

#[test]
fn the_window_keeps_open_service_connections_and_closes_when_they_end() {
    if !can_load_datapath() || Command::new("nft").arg("--version").output().is_err() {
        eprintln!("skipped: needs root, bpffs and nft");
        return;
    }
    // In the namespace: the conntrack dumps with both connections open, then with the service
    // connection closed (both ends: FIN each way, TIME_WAIT in conntrack).
    let ran = in_netns(|| {
        let up = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status();
        assert!(up.is_ok_and(|s| s.success()), "ip link set lo up");
        let mut nft = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("nft");
        nft.stdin
            .take()
            .expect("stdin")
            .write_all(b"table inet kib_switch_test {\n chain input { type filter hook input priority 0; ct state established,related accept; }\n}\n")
            .expect("write");
        assert!(nft.wait().is_ok_and(|s| s.success()), "nft rule");
        let service = TcpListener::bind("127.0.0.1:0").expect("listen");
        let other = TcpListener::bind("127.0.0.1:0").expect("listen");
        let (service_client, service_server) = connect(&service);
        let _other = connect(&other);
        let open = dump();
        let client_port = service_client.local_addr().expect("addr").port();
        drop(service_client);
        drop(service_server);
        std::thread::sleep(std::time::Duration::from_millis(200));
        let closed = dump();
        (
            open,
            closed,
            service.local_addr().expect("addr").port(),
            client_port,
        )
    });
    let Some((open, closed, service_port, client_port)) = ran else {
        eprintln!("skipped: cannot make a network namespace");
        return;
    };
    let pins = test_pins("switch");
    let dp = load_with_one_service(&pins, small_map_sizes(), NODE, VIP);
    let maps = dp.maps();
    let flows_map = maps.switch_flows.as_ref().expect("switch_flows");
    let in_map = || flow_tuples(flows_map);
    let window_open = || maps.config().expect("config").expect("written").flags & CFG_F_SWITCH != 0;
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let is_service = |address: IpAddr, proto: u8, port: u16| {
        address == localhost && proto == 6 && port == service_port
    };
    assert!(!window_open());

    // Seeded: the service connection only (on loopback its reply tuple is its original one
    // reversed: two distinct tuples of the four).
    let flows = old_flow_tuples(&open, is_service);
    let request = Tuple::new(
        localhost,
        client_port,
        localhost,
        service_port,
        L4Proto::Tcp,
    );
    let reply = Tuple::new(
        localhost,
        service_port,
        localhost,
        client_port,
        L4Proto::Tcp,
    );
    assert_eq!(
        flows.keys().copied().collect::<HashSet<_>>(),
        HashSet::from([request, reply]),
        "{open:#?}"
    );
    assert_eq!(seed(maps, &flows, 1).expect("seed"), 2);
    assert_eq!(in_map(), HashSet::from([request, reply]));
    assert!(window_open(), "window open");
    // The agent's own configuration writes keep it open.
    maps.set_config(&probes::maps::Config::default())
        .expect("config");
    assert!(window_open(), "window kept by a configuration write");

    // Still open: kept, seen again.
    let progress = refresh(maps, &open_tuples(&open), 2).expect("refresh");
    assert_eq!(
        (progress.tracked, progress.removed, progress.closed),
        (2, 0, false)
    );
    assert!(
        flows_map
            .entries()
            .expect("switch_flows")
            .iter()
            .all(|(_, f)| f.seen_ns == 2)
    );

    // Ended: removed, window closed.
    let progress = refresh(maps, &open_tuples(&closed), 3).expect("refresh");
    assert_eq!(
        (progress.tracked, progress.removed, progress.closed),
        (0, 2, true),
        "{closed:#?}"
    );
    assert!(in_map().is_empty());
    assert!(!window_open(), "window closed");
}

/// `drain` while the switch window from kube-proxy is open: refused, and nothing changed (the
/// window's flag and tuples, no drain flag, the conntrack sysctl untouched); once the window
/// closes, the same call starts the drain.
#[test]
fn a_drain_is_refused_while_the_switch_window_is_open_and_changes_nothing() {
    if !can_load_datapath() {
        eprintln!("skipped: needs root and bpffs");
        return;
    }
    let pins = test_pins("drain-refused");
    let dp = load_with_one_service(&pins, small_map_sizes(), NODE, VIP);
    let maps = dp.maps();
    let flows_map = maps.switch_flows.as_ref().expect("switch_flows");
    // The conntrack sysctl under a directory of its own (as /proc/sys lays it out).
    let proc_sys = tempfile::tempdir().expect("tempdir");
    let conntrack = proc_sys.path().join("net/ipv4/vs/conntrack");
    std::fs::create_dir_all(conntrack.parent().expect("parent")).expect("mkdir");
    std::fs::write(&conntrack, "0").expect("write");

    // An open window holding one of kube-proxy's connections.
    let old = Tuple::new(
        IpAddr::V4(Ipv4Addr::new(10, 244, 1, 5)),
        40000,
        IpAddr::V4(VIP),
        80,
        L4Proto::Tcp,
    );
    let flows = std::collections::HashMap::from([(old, 7u32)]);
    assert_eq!(seed(maps, &flows, 1).expect("seed"), 1);
    let before = maps.switch_flags().expect("flags");
    assert_eq!(before, CFG_F_SWITCH);

    let refused = drain::begin(maps, proc_sys.path());
    let err = format!(
        "{:#}",
        refused.expect_err("a drain while the window is open")
    );
    assert!(err.contains("switch window"), "{err}");
    assert_eq!(maps.switch_flags().expect("flags"), before, "flags changed");
    assert!(!drain::draining(maps).expect("flags"));
    assert_eq!(
        flow_tuples(flows_map),
        HashSet::from([old]),
        "the window's tuples changed"
    );
    assert_eq!(std::fs::read_to_string(&conntrack).expect("read"), "0");

    // The window closes (its connection ended): the drain starts.
    let progress = refresh(maps, &std::collections::HashMap::new(), 2).expect("refresh");
    assert!(progress.closed);
    drain::begin(maps, proc_sys.path()).expect("a drain once the window closed");
    assert!(drain::draining(maps).expect("flags"));
    assert_eq!(maps.switch_flags().expect("flags") & CFG_F_SWITCH, 0);
    assert_eq!(std::fs::read_to_string(&conntrack).expect("read"), "1");
}
