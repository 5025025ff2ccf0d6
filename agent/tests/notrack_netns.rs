//! Host-kernel tests of the agent's nf_tables table (`agent::datapath::notrack`): each runs in a
//! network namespace of its own (unshared by its thread) with a peer namespace behind a veth
//! pair (`ip netns`, removed on drop), and checks the kernel's own view: `nft list table`, and
//! `conntrack -L` for packets from the peer that arrive with and without the service mark (set
//! by a netdev ingress chain, where TC ingress sets it in the agent). A test whose tools or
//! privileges are missing says so and passes.

mod common;

use std::process::Command;

use agent::cleanup::nfnetlink::Nfnl;
use agent::datapath::notrack;
use common::{in_netns, sh};

const MARK: u32 = 0x0020_0000;

fn skip() -> bool {
    common::skip_without(&[
        ("nft", "--version"),
        ("conntrack", "--version"),
        ("ip", "-V"),
        ("bash", "--version"),
    ])
}

/// Runs `f` in a namespace of its own with a peer ([`Peer`], named after `tag`), the marking
/// and firewall of [`mark_and_track`], and the agent's table written; says so and passes when
/// the test cannot run.
fn with_table(tag: &str, f: impl FnOnce(&Peer, &mut Nfnl) + Send) {
    if skip() {
        return;
    }
    let ran = in_netns(|| {
        let peer = Peer::new(tag);
        mark_and_track("kibnt0");
        let mut nl = Nfnl::open().expect("nfnetlink");
        notrack::apply(&mut nl, MARK).expect("write the table");
        f(&peer, &mut nl);
    });
    if ran.is_none() {
        eprintln!("skipped: cannot create a network namespace");
    }
}

/// A peer namespace (`ip netns add`) holding the far end of a veth pair from the calling
/// thread's namespace: `kibnt0` 10.77.0.1/24 here, 10.77.0.2/24 there. Removed on drop.
struct Peer {
    name: String,
}

impl Peer {
    fn new(tag: &str) -> Peer {
        let name = format!("kib-notrack-{tag}-{}", std::process::id());
        sh(&format!("ip netns add {name}"));
        let peer = Peer { name };
        sh(&format!(
            "ip link add kibnt0 type veth peer name kibnt1 && ip link set kibnt1 netns {n} && \
             ip addr add 10.77.0.1/24 dev kibnt0 && ip link set kibnt0 up && \
             ip -n {n} addr add 10.77.0.2/24 dev kibnt1 && ip -n {n} link set kibnt1 up && \
             ip -n {n} link set lo up",
            n = peer.name
        ));
        peer
    }

    /// Sends `count` UDP datagrams from the peer to 10.77.0.1:`port` (one source port each).
    fn send_udp(&self, port: u16, count: usize) {
        for _ in 0..count {
            sh(&format!(
                "ip netns exec {} bash -c 'echo x > /dev/udp/10.77.0.1/{port}'",
                self.name
            ));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Conntrack entries of UDP flows to `port` in the calling thread's namespace.
fn tracked_to(port: u16) -> usize {
    sh("conntrack -L -p udp 2>/dev/null")
        .lines()
        .filter(|l| l.contains(&format!("dport={port} ")))
        .count()
}

/// The firewall and marking the test node has: a netdev ingress chain marking UDP to 9999
/// (TC ingress's job in the agent), and an `inet filter` input chain using conntrack (so the
/// namespace tracks at all).
fn mark_and_track(dev: &str) {
    sh(&format!(
        "nft -f - <<'EOF'\n\
         table netdev kibmark {{\n chain marking {{ type filter hook ingress device {dev} priority 0; udp dport 9999 meta mark set {MARK:#010x}; }}\n}}\n\
         table inet filter {{\n chain input {{ type filter hook input priority 0; policy accept; ct state established,related accept; }}\n}}\n\
         EOF"
    ));
}

fn expected_listing() -> String {
    format!(
        "table inet kube-ipvs-bpf {{\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tmeta mark & {MARK:#010x} == {MARK:#010x} notrack comment \"{}\"\n\
         \t}}\n\
         }}\n",
        notrack::COMMENT
    )
}

#[test]
fn the_table_holds_the_notrack_rule_and_writing_it_again_changes_nothing() {
    with_table("listing", |_, nl| {
        let listed = sh("nft list table inet kube-ipvs-bpf");
        assert_eq!(listed, expected_listing());
        // Written again (a restart): the same single rule, not a second one.
        notrack::apply(nl, MARK).expect("write the table again");
        assert_eq!(sh("nft list table inet kube-ipvs-bpf"), expected_listing());
        assert_eq!(notrack::repair(MARK).expect("check"), Vec::<String>::new());
        // Another mark (configuration changed, agent restarted): replaced, not appended.
        notrack::apply(nl, 0x0100_0000).expect("another mark");
        let other = sh("nft list table inet kube-ipvs-bpf");
        assert_eq!(other.matches("notrack").count(), 1, "{other}");
        assert!(
            other.contains("meta mark & 0x01000000 == 0x01000000"),
            "{other}"
        );
    });
}

#[test]
fn a_packet_with_the_service_mark_is_untracked_and_one_without_is_tracked() {
    with_table("traffic", |peer, nl| {
        peer.send_udp(9999, 3);
        peer.send_udp(9998, 3);
        assert_eq!(tracked_to(9999), 0, "marked packets were tracked");
        assert_eq!(tracked_to(9998), 3, "unmarked packets must be tracked");

        // Without our table the same marked packets are tracked: the rule is what untracks.
        assert!(nl.nft_delete_table(&notrack::table()).expect("delete"));
        peer.send_udp(9999, 2);
        assert_eq!(tracked_to(9999), 2);
    });
}

#[test]
fn a_flushed_or_edited_table_is_found_and_rewritten_whole() {
    with_table("repair", |peer, _| {
        // The rule deleted by hand (by handle): the check names it and puts it back.
        let handles = sh("nft -a list chain inet kube-ipvs-bpf prerouting");
        let handle = handles
            .lines()
            .find(|l| l.contains("notrack"))
            .and_then(|l| l.rsplit("# handle ").next())
            .expect("the rule's handle")
            .trim()
            .to_owned();
        sh(&format!(
            "nft delete rule inet kube-ipvs-bpf prerouting handle {handle}"
        ));
        assert_eq!(
            notrack::repair(MARK).expect("repair"),
            vec![format!(
                "rule \"{}\" missing from inet kube-ipvs-bpf prerouting",
                notrack::COMMENT
            )]
        );
        assert_eq!(sh("nft list table inet kube-ipvs-bpf"), expected_listing());

        // The chain replaced by one at another hook: found, and the table rewritten.
        sh("nft delete chain inet kube-ipvs-bpf prerouting && \
            nft add chain inet kube-ipvs-bpf prerouting '{ type filter hook input priority 0; }'");
        let found = notrack::repair(MARK).expect("repair");
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("hooked at"), "{found:?}");
        assert_eq!(sh("nft list table inet kube-ipvs-bpf"), expected_listing());

        // The whole ruleset flushed (a firewall reload).
        sh("nft flush ruleset");
        mark_and_track("kibnt0");
        assert_eq!(notrack::repair(MARK).expect("repair").len(), 2);
        assert_eq!(sh("nft list table inet kube-ipvs-bpf"), expected_listing());
        assert_eq!(notrack::repair(MARK).expect("check"), Vec::<String>::new());
        peer.send_udp(9999, 2);
        assert_eq!(
            tracked_to(9999),
            0,
            "marked packets tracked after the repair"
        );
    });
}
