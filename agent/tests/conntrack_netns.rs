//! Host-kernel test of `agent::conntrack`: in a network namespace of its own (unshared by its
//! thread), with a ct-using nftables rule so that conntrack tracks, a TCP connection and a UDP
//! exchange on loopback; the entries read over ctnetlink are those `conntrack -L` (the
//! kernel's own view through conntrack-tools) lists. A test whose tools or privileges are
//! missing says so and passes.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::Command;

use agent::cleanup::nfnetlink::Nfnl;
use agent::conntrack::TCP_CONNTRACK_ESTABLISHED;
use common::in_netns;

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
    }
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn skip() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return true;
    }
    for tool in ["nft", "conntrack", "ip"] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("skipped: {tool} not installed");
            return true;
        }
    }
    false
}

/// `(proto, src, sport, dst, dport)` of each entry's original direction in `conntrack -L`.
fn tool_view(text: &str) -> BTreeSet<(u8, String, u16, String, u16)> {
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let proto: u8 = words.get(1)?.parse().ok()?;
            let field = |key: &str| {
                words
                    .iter()
                    .find_map(|w| w.strip_prefix(key))
                    .map(str::to_owned)
            };
            Some((
                proto,
                field("src=")?,
                field("sport=")?.parse().ok()?,
                field("dst=")?,
                field("dport=")?.parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn the_entries_read_over_ctnetlink_are_the_ones_conntrack_lists() {
    if skip() {
        return;
    }
    let ran = in_netns(|| {
        run("ip", &["link", "set", "lo", "up"], None);
        // Conntrack hooks register only when a rule needs them.
        run(
            "nft",
            &["-f", "-"],
            Some(
                "table inet kib_ct_test {\n chain input { type filter hook input priority 0; ct state established,related accept; }\n chain output { type filter hook output priority 0; ct state established,related accept; }\n}\n",
            ),
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let mut client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        client.write_all(b"ping").expect("write");
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).expect("read");
        server.write_all(b"pong").expect("write");
        client.read_exact(&mut buf).expect("read");
        let udp_server = UdpSocket::bind("127.0.0.1:0").expect("udp bind");
        let udp_client = UdpSocket::bind("127.0.0.1:0").expect("udp bind");
        udp_client
            .send_to(b"q", udp_server.local_addr().expect("addr"))
            .expect("send");
        let (_, from) = udp_server.recv_from(&mut buf).expect("recv");
        udp_server.send_to(b"a", from).expect("reply");

        let entries = Nfnl::open()
            .expect("netfilter socket")
            .conntrack_entries()
            .expect("dump");
        let tool = run("conntrack", &["-L"], None);
        (
            entries,
            tool,
            port,
            client.local_addr().expect("addr").port(),
        )
    });
    let Some((entries, tool, port, client_port)) = ran else {
        eprintln!("skipped: cannot make a network namespace");
        return;
    };
    let ours: BTreeSet<(u8, String, u16, String, u16)> = entries
        .iter()
        .map(|e| {
            (
                e.orig.proto,
                e.orig.src.to_string(),
                e.orig.sport,
                e.orig.dst.to_string(),
                e.orig.dport,
            )
        })
        .collect();
    assert_eq!(ours, tool_view(&tool), "conntrack -L:\n{tool}");
    let tcp = entries
        .iter()
        .find(|e| e.orig.proto == 6 && e.orig.dport == port)
        .expect("the TCP connection's entry");
    assert_eq!(tcp.orig.sport, client_port);
    assert_eq!(tcp.reply, tcp.orig.reversed(), "no NAT on loopback");
    assert_eq!(tcp.tcp_state, Some(TCP_CONNTRACK_ESTABLISHED));
    assert_ne!(tcp.id, 0);
    assert!(entries.iter().any(|e| e.orig.proto == 17));
}
