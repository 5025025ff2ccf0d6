//! Host-kernel tests of the datapath programs with BPF_PROG_TEST_RUN: crafted packets in,
//! rewritten packets (every checksum re-verified independently), marks, map contents and counters
//! out. One test per path, for IPv4 and IPv6. Needs root and bpffs (mounted when missing).

mod common;

use std::net::IpAddr;

use common::*;
use libbpf_rs::query::{ProgInfoIter, ProgInfoQueryOptions};
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use probes::maps::{
    ADDR_F_SERVICE, AddrKey, AddrValue, CFG_F_CLUSTER_CIDRS, CFG_F_DRAIN, CFG_F_MASQ_ALL,
    CFG_F_PORT_FILTER, CFG_F_SWITCH, CidrKey, Config, ConnValue, Counter, DEFAULT_LOCAL_PORT_MAX,
    DEFAULT_LOCAL_PORT_MIN, DEFAULT_MARK_MASQ, DEFAULT_MARK_SVC, DEFAULT_SNAT_PORT_MAX,
    DEFAULT_SNAT_PORT_MIN, DevValue, L4Proto, RangeKey, SNAT_F_HAIRPIN, SNAT_F_HOST, SNAT_F_MASQ,
    SNAT_F_OFFCLUSTER, SNAT_F_PORT_KEPT, SNAT_F_PROBE_HIT, SNAT_F_RESOLVED, STATE_FIN, STATE_REPLY,
    STATE_SYN, SVC_F_MASQ, SVC_F_MASQ_OFFCLUSTER, SVC_F_SRC_RANGES, SnatEntry, Stats, SvcKey,
    SvcValue, SwitchFlow, Tuple, addr_to_bytes, reply_mark_flags,
};
use probes::maps::{FLOW_CACHE_SLOTS, FlowSlot, map_names};
use probes::{DatapathProgram, PortFilter, PortKind, RewritePolicy};
use zerocopy::FromBytes;
use zerocopy::byteorder::network_endian::U16;

const SVC: u32 = DEFAULT_MARK_SVC;
const MASQ: u32 = DEFAULT_MARK_MASQ;
const CLIENT_PORT: u16 = 40_000;
const BACKEND_PORT: u16 = 8080;
const VIP_PORT: u16 = 80;

/// Runs `$body(Family, test_name)` as `$name::v4` and `$name::v6` (the kernel's rewrite: the
/// direct-write `nat_write_*` programs where it has bpf_cast_to_kern_ctx), and as
/// `$name::v4_helpers` / `$name::v6_helpers` with the helper rewrite older kernels use.
macro_rules! both_families {
    ($name:ident) => {
        mod $name {
            use super::*;
            #[test]
            fn v4() {
                super::$name(Family::V4, concat!(stringify!($name), "_v4"));
            }
            #[test]
            fn v6() {
                super::$name(Family::V6, concat!(stringify!($name), "_v6"));
            }
            #[test]
            fn v4_helpers() {
                with_rewrite(RewritePolicy::Helpers, || {
                    super::$name(Family::V4, concat!(stringify!($name), "_v4h"))
                });
            }
            #[test]
            fn v6_helpers() {
                with_rewrite(RewritePolicy::Helpers, || {
                    super::$name(Family::V6, concat!(stringify!($name), "_v6h"))
                });
            }
        }
    };
}

fn in_snat_range(port: u16) -> bool {
    (DEFAULT_SNAT_PORT_MIN..=DEFAULT_SNAT_PORT_MAX).contains(&port)
}

fn in_local_range(port: u16) -> bool {
    (DEFAULT_LOCAL_PORT_MIN..=DEFAULT_LOCAL_PORT_MAX).contains(&port)
}

/// The forward entry of the connection leaving as `src:sport -> dst:dport` (TCP), read from the
/// table's memory with the table's own hashing (probes::nat_table), not through the programs.
fn fwd(fx: &Fixture, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Option<SnatEntry> {
    fx.dp
        .maps()
        .snat
        .lookup_fwd(&Tuple::new(src, sport, dst, dport, L4Proto::Tcp))
}

/// The reverse entry of the reply arriving as `src:sport -> dst:dport` (TCP).
fn rev(fx: &Fixture, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Option<SnatEntry> {
    fx.dp
        .maps()
        .snat
        .lookup_rev(&Tuple::new(src, sport, dst, dport, L4Proto::Tcp))
}

/// Only these counters moved, by these amounts. Every allocation also counted whether the IPVS
/// probe had recorded its connection: `probe_hit` and `probe_miss` sum to `snat_alloc`, and each
/// is checked by value where it is listed.
fn assert_counters(stats: &Stats, expected: &[(Counter, u64)]) {
    for (counter, value) in stats.iter() {
        let want = expected
            .iter()
            .find(|(c, _)| *c == counter)
            .map(|(_, v)| *v);
        if matches!(counter, Counter::ProbeHit | Counter::ProbeMiss) && want.is_none() {
            continue;
        }
        assert_eq!(value, want.unwrap_or(0), "counter {}", counter.name());
    }
    assert_eq!(
        stats.get(Counter::ProbeHit) + stats.get(Counter::ProbeMiss),
        stats.get(Counter::SnatAlloc),
        "each allocation counts a probe hit or miss"
    );
}

fn add_service(fx: &Fixture, addr: IpAddr, port: u16, proto: L4Proto, flags: u32, svc_id: u32) {
    fx.dp
        .maps()
        .put_service_port(&SvcKey::new(addr, port, proto), &SvcValue { flags, svc_id })
        .expect("svc_ports");
    add_service_address(fx, addr);
}

/// Marks `addr` a service address (`svc_addrs`, ADDR_F_SERVICE).
fn add_service_address(fx: &Fixture, addr: IpAddr) {
    fx.dp
        .maps()
        .svc_addrs
        .insert(
            &AddrKey::new(addr),
            &AddrValue {
                flags: ADDR_F_SERVICE,
                pad: 0,
            },
        )
        .expect("svc_addrs");
}

/// Records the IPVS connection `conn` (client -> backend) of the service vip:VIP_PORT in
/// `conns`, with these IPVS flags, as the probe would.
/// The test connection as IPVS forwards it: client -> backend, TCP (the `conns` key).
fn client_to_backend(f: Family) -> Tuple {
    Tuple::new(
        client(f),
        CLIENT_PORT,
        backend(f),
        BACKEND_PORT,
        L4Proto::Tcp,
    )
}

fn add_conn(fx: &Fixture, f: Family, conn: &Tuple) {
    fx.probe_conn(
        conn,
        &ConnValue {
            vaddr: addr_to_bytes(vip(f)),
            vport: U16::new(VIP_PORT),
            created_ns: 1,
            ..ConnValue::default()
        },
    );
}

fn set_cluster_cidr(fx: &Fixture, f: Family, extra_flags: u32) {
    let (net, len) = cluster_cidr(f);
    fx.dp
        .maps()
        .cluster_cidrs
        .insert(&CidrKey::new(net, len).expect("cidr"), &1)
        .expect("cluster_cidrs");
    fx.set_config(Config {
        flags: CFG_F_CLUSTER_CIDRS | extra_flags,
        ..Config::default()
    });
}

/// Sends the client's first packet through egress with the masquerade mark; returns the
/// translated frame and its SNAT port.
fn snat_first(fx: &Fixture, f: Family, src: IpAddr, sport: u16) -> (Vec<u8>, u16) {
    let out = fx.egress(
        &tcp(src, sport, backend(f), BACKEND_PORT, TCP_SYN),
        SVC | MASQ,
    );
    assert_eq!(out.return_value, TC_ACT_UNSPEC);
    let p = check_frame(&out.packet);
    assert_eq!(p.src, node(f));
    assert_eq!(p.dst, backend(f));
    assert_eq!(p.dport(), BACKEND_PORT);
    let port = p.sport();
    (out.packet, port)
}

// ---------------------------------------------------------------------------------------------

fn first_packet_snat(f: Family, name: &str) {
    let fx = Fixture::new(name);
    let out = fx.egress(
        &tcp(client(f), CLIENT_PORT, backend(f), BACKEND_PORT, TCP_SYN),
        SVC | MASQ | 0x1,
    );
    assert_eq!(out.return_value, TC_ACT_UNSPEC);
    assert_eq!(out.mark, SVC | MASQ | 0x1, "egress never changes the mark");
    let p = check_frame(&out.packet);
    assert_eq!((p.src, p.dst), (node(f), backend(f)));
    let port = p.sport();
    assert!(in_snat_range(port) && !in_local_range(port), "port {port}");
    assert_eq!(p.dport(), BACKEND_PORT);

    let entry = fwd(&fx, client(f), CLIENT_PORT, backend(f), BACKEND_PORT).expect("snat_fwd");
    assert_eq!(entry.address(), node(f));
    assert_eq!(entry.port.get(), port);
    assert_eq!(entry.state, STATE_SYN);
    assert_eq!(entry.flags, SNAT_F_MASQ | SNAT_F_RESOLVED);
    assert!(entry.created_ns > 0 && entry.last_seen_ns == entry.created_ns);
    let reverse = rev(&fx, backend(f), BACKEND_PORT, node(f), port).expect("snat_rev");
    assert_eq!(reverse.address(), client(f));
    assert_eq!(reverse.port.get(), CLIENT_PORT);
    assert_eq!(reverse.state, 0);
    assert_counters(&fx.stats(), &[(Counter::SnatAlloc, 1)]);
}
both_families!(first_packet_snat);

fn client_port_inside_local_range_is_remapped(f: Family, name: &str) {
    let fx = Fixture::new(name);
    for (src, port) in [
        (client(f), DEFAULT_LOCAL_PORT_MIN),
        (client_b(f), DEFAULT_LOCAL_PORT_MAX),
    ] {
        let (_, translated) = snat_first(&fx, f, src, port);
        assert!(in_snat_range(translated), "{port} -> {translated}");
        let entry = fwd(&fx, src, port, backend(f), BACKEND_PORT).expect("snat_fwd");
        assert_eq!(entry.flags & SNAT_F_PORT_KEPT, 0);
    }
    assert_counters(&fx.stats(), &[(Counter::SnatAlloc, 2)]);
}
both_families!(client_port_inside_local_range_is_remapped);

fn client_port_outside_local_range_is_kept(f: Family, name: &str) {
    let fx = Fixture::new(name);
    for port in [5000, DEFAULT_LOCAL_PORT_MIN - 1, DEFAULT_LOCAL_PORT_MAX + 1] {
        let (_, translated) = snat_first(&fx, f, client(f), port);
        assert_eq!(translated, port);
        let entry = fwd(&fx, client(f), port, backend(f), BACKEND_PORT).expect("snat_fwd");
        assert_eq!(
            entry.flags,
            SNAT_F_MASQ | SNAT_F_PORT_KEPT | SNAT_F_RESOLVED
        );
    }
    assert_counters(
        &fx.stats(),
        &[(Counter::SnatAlloc, 3), (Counter::SnatPortReuse, 3)],
    );
}
both_families!(client_port_outside_local_range_is_kept);

fn second_client_same_port_gets_another_port(f: Family, name: &str) {
    let fx = Fixture::new(name);
    let (_, first) = snat_first(&fx, f, client(f), 5000);
    let (_, second) = snat_first(&fx, f, client_b(f), 5000);
    assert_eq!(first, 5000, "the first client keeps its port");
    assert_ne!(second, first);
    assert!(in_snat_range(second));
    let a = rev(&fx, backend(f), BACKEND_PORT, node(f), first).expect("first reverse entry");
    let b = rev(&fx, backend(f), BACKEND_PORT, node(f), second).expect("second reverse entry");
    assert_eq!((a.address(), a.port.get()), (client(f), 5000));
    assert_eq!((b.address(), b.port.get()), (client_b(f), 5000));
    assert_counters(
        &fx.stats(),
        &[(Counter::SnatAlloc, 2), (Counter::SnatPortReuse, 1)],
    );
}
both_families!(second_client_same_port_gets_another_port);

fn established_fast_path(f: Family, name: &str) {
    let fx = Fixture::new(name);
    let (_, port) = snat_first(&fx, f, client(f), CLIENT_PORT);
    // The mark is only on the first packet's path in these tests: the fast path does not need it.
    for (flags, mark) in [(TCP_ACK, 0), (TCP_ACK | TCP_FIN, SVC)] {
        let out = fx.egress(
            &tcp(client(f), CLIENT_PORT, backend(f), BACKEND_PORT, flags),
            mark,
        );
        assert_eq!(out.return_value, TC_ACT_UNSPEC);
        assert_eq!(out.mark, mark);
        let p = check_frame(&out.packet);
        assert_eq!((p.src, p.sport()), (node(f), port));
        assert_eq!((p.dst, p.dport()), (backend(f), BACKEND_PORT));
    }
    let entry = fwd(&fx, client(f), CLIENT_PORT, backend(f), BACKEND_PORT).expect("snat_fwd");
    assert_eq!(entry.state, STATE_SYN | STATE_FIN);
    assert_counters(
        &fx.stats(),
        &[(Counter::SnatAlloc, 1), (Counter::FwdHit, 2)],
    );
}
both_families!(established_fast_path);

/// Every CPU's `flow_cache` slot that holds tuple `t` (any direction), read from the kernel: the
/// datapath object's own map, found among tc_egress's maps.
fn flow_slots(fx: &Fixture, t: &Tuple) -> Vec<FlowSlot> {
    let id = fx
        .dp
        .program_id(DatapathProgram::TcEgress)
        .expect("tc_egress id");
    let info = ProgInfoIter::with_query_opts(ProgInfoQueryOptions::default().include_map_ids(true))
        .find(|info| info.id == id)
        .expect("tc_egress info");
    let map = info
        .map_ids
        .iter()
        .map(|&m| MapHandle::from_map_id(m).expect("map of tc_egress"))
        .find(|m| m.name() == map_names::FLOW_CACHE)
        .expect("flow_cache");
    let mut slots = Vec::new();
    for index in 0..FLOW_CACHE_SLOTS {
        let values = map
            .lookup_percpu(&index.to_ne_bytes(), MapFlags::ANY)
            .expect("flow_cache lookup")
            .unwrap_or_default();
        for value in values {
            let (slot, _) = FlowSlot::read_from_prefix(&value).expect("flow_slot");
            if slot.family != 0
                && (slot.saddr, slot.daddr, slot.sport, slot.dport, slot.proto)
                    == (t.saddr, t.daddr, t.sport, t.dport, t.proto)
            {
                slots.push(slot);
            }
        }
    }
    slots
}

/// A FIN of an established translated connection takes the fast path in each direction (its
/// slot is not filled again: `filled_jiffies` stays) and still records its state bit in the table
/// record the slot was copied from, as the general path would. An RST whose record was swept
/// (unindexed, REC_DEAD) goes back to the table: with no entry, it passes untranslated. The same
/// with the helper rewrite (no nat_write programs: the fast path rewrites with the helpers).
fn closing_packets_record_their_state_from_the_fast_path(f: Family, name: &str) {
    let fx = Fixture::new(name);
    let cpu = allowed_cpus()[0];
    on_cpu(cpu, || {
        let (_, port) = snat_first(&fx, f, client(f), CLIENT_PORT);
        let fwd_key = client_to_backend(f);
        let rev_key = Tuple::new(backend(f), BACKEND_PORT, node(f), port, L4Proto::Tcp);
        // The reply's SYN-ACK goes through snat_rev and fills the ingress slot.
        let syn_ack = tcp(backend(f), BACKEND_PORT, node(f), port, TCP_SYN | TCP_ACK);
        let back = check_frame(&fx.ingress(&syn_ack, 0).packet);
        assert_eq!((back.dst, back.dport()), (client(f), CLIENT_PORT));
        let (rec, _) = fx
            .dp
            .maps()
            .snat
            .find(probes::Index::Fwd, &fwd_key)
            .expect("forward entry");
        let before = [flow_slots(&fx, &fwd_key), flow_slots(&fx, &rev_key)];
        for slots in &before {
            assert_eq!(slots.len(), 1, "one slot per direction on this CPU");
            assert_eq!(slots[0].record, rec, "the slot names its record");
        }
        // A few jiffies, so that a slot filled again would show it.
        std::thread::sleep(std::time::Duration::from_millis(50));

        let fin = tcp(
            client(f),
            CLIENT_PORT,
            backend(f),
            BACKEND_PORT,
            TCP_ACK | TCP_FIN,
        );
        let p = check_frame(&fx.egress(&fin, 0).packet);
        assert_eq!((p.src, p.sport()), (node(f), port));
        let reply_fin = tcp(backend(f), BACKEND_PORT, node(f), port, TCP_ACK | TCP_FIN);
        let p = check_frame(&fx.ingress(&reply_fin, 0).packet);
        assert_eq!((p.dst, p.dport()), (client(f), CLIENT_PORT));

        let (_, record) = fx
            .dp
            .maps()
            .snat
            .find(probes::Index::Fwd, &fwd_key)
            .expect("forward entry");
        assert_eq!(record.fwd.state, STATE_SYN | STATE_FIN);
        assert_eq!(record.rev.state, STATE_SYN | STATE_REPLY | STATE_FIN);
        let after = [flow_slots(&fx, &fwd_key), flow_slots(&fx, &rev_key)];
        for (old, new) in before.iter().zip(&after) {
            assert_eq!(new.len(), 1);
            assert_eq!(
                new[0].state & STATE_FIN,
                STATE_FIN,
                "the slot knows the FIN"
            );
            assert_eq!(
                new[0].filled_jiffies, old[0].filled_jiffies,
                "the FIN took the fast path"
            );
        }
        assert_counters(
            &fx.stats(),
            &[
                (Counter::SnatAlloc, 1),
                (Counter::FwdHit, 1),
                (Counter::RevHit, 2),
            ],
        );

        // Swept (REC_DEAD): the fast path leaves an RST, a state bit the slots lack, to the
        // table, which no longer has the connection. (The FINs the slots now know would still be
        // translated from them until their TTL, as any packet the slots hold all bits of.)
        assert!(fx.dp.maps().snat.unindex(rec), "record removed");
        let rst = tcp(
            client(f),
            CLIENT_PORT,
            backend(f),
            BACKEND_PORT,
            TCP_ACK | TCP_RST,
        );
        assert_eq!(fx.egress(&rst, 0).packet, rst);
        let reply_rst = tcp(backend(f), BACKEND_PORT, node(f), port, TCP_ACK | TCP_RST);
        assert_eq!(fx.ingress(&reply_rst, 0).packet, reply_rst);
    });
}
both_families!(closing_packets_record_their_state_from_the_fast_path);

/// The per-CPU flow cache: once a packet of each direction has gone through the hash entry, the
/// next ones are translated from the cache (shown by deleting the entries: still translated),
/// until the slot is FLOW_CACHE_TTL_JIFFIES old (at most 2.56 s, at HZ=100); then they go back
/// to the (now empty) maps and pass untranslated. The sweeper never deletes an entry idle for
/// less than 5 s, so a slot never outlives its entry.
fn flow_cache_serves_established_packets_until_its_ttl(f: Family, name: &str) {
    let fx = Fixture::new(name);
    let (_, port) = snat_first(&fx, f, client(f), CLIENT_PORT);
    let out_pkt = tcp(client(f), CLIENT_PORT, backend(f), BACKEND_PORT, TCP_ACK);
    let in_pkt = tcp(backend(f), BACKEND_PORT, node(f), port, TCP_ACK);
    // First of each direction: through snat_fwd / snat_rev, which fills the slots.
    assert_eq!(check_frame(&fx.egress(&out_pkt, 0).packet).sport(), port);
    assert_eq!(
        check_frame(&fx.ingress(&in_pkt, 0).packet).dport(),
        CLIENT_PORT
    );
    let maps = fx.dp.maps();
    let fwd_key = client_to_backend(f);
    let rev_key = Tuple::new(backend(f), BACKEND_PORT, node(f), port, L4Proto::Tcp);
    let (rec, record) = maps
        .snat
        .find(probes::Index::Fwd, &fwd_key)
        .expect("forward entry");
    assert_eq!(record.rev_key, rev_key);
    assert!(maps.snat.unindex(rec), "record removed");

    let out = fx.egress(&out_pkt, 0);
    let p = check_frame(&out.packet);
    assert_eq!((p.src, p.sport()), (node(f), port), "egress from the cache");
    let back = fx.ingress(&in_pkt, 0);
    let p = check_frame(&back.packet);
    assert_eq!(
        (p.dst, p.dport()),
        (client(f), CLIENT_PORT),
        "ingress from the cache"
    );
    assert_eq!(back.mark, SVC);

    // A packet with a state bit the entry lacks (FIN) always goes to the entry: gone, untouched.
    let fin = tcp(
        client(f),
        CLIENT_PORT,
        backend(f),
        BACKEND_PORT,
        TCP_ACK | TCP_FIN,
    );
    assert_eq!(fx.egress(&fin, 0).packet, fin);

    std::thread::sleep(std::time::Duration::from_millis(2700));
    assert_eq!(
        fx.egress(&out_pkt, 0).packet,
        out_pkt,
        "egress slot expired"
    );
    assert_eq!(
        fx.ingress(&in_pkt, 0).packet,
        in_pkt,
        "ingress slot expired"
    );
    assert_counters(
        &fx.stats(),
        &[
            (Counter::SnatAlloc, 1),
            (Counter::FwdHit, 2),
            (Counter::RevHit, 2),
        ],
    );
}
both_families!(flow_cache_serves_established_packets_until_its_ttl);

/// The flow cache also keeps the general path's ingress verdicts on untranslated flows
/// (flow_cache.h, FLOW_VERDICT_INGRESS): the mark bits a flow's packets get (nothing, for traffic
/// that is not a service's and goes to a local port). Shown by changing the maps under an
/// established flow: its next packets keep the verdict (and count their counter), a SYN goes by
/// the maps and replaces it, and after FLOW_CACHE_TTL_JIFFIES every packet does. Egress keeps
/// "no SNAT" verdicts for packets with the same service marks (FLOW_VERDICT_EGRESS).
fn flow_cache_keeps_verdicts_of_untranslated_flows_until_their_ttl(f: Family, name: &str) {
    let fx = Fixture::new(name);
    // Ingress, traffic that is none of the agent's, to a local port: passes unmarked, and keeps
    // doing so when the maps change (its flow became a service connection's replies) ...
    let reply = tcp(backend(f), BACKEND_PORT, client(f), CLIENT_PORT, TCP_ACK);
    assert!(in_local_range(CLIENT_PORT));
    assert_eq!(fx.ingress(&reply, 0x1).mark, 0x1);
    add_conn(&fx, f, &client_to_backend(f));
    assert_eq!(fx.ingress(&reply, 0x1).mark, 0x1, "verdict kept");
    // ... until a SYN goes by the maps and replaces the verdict.
    let syn_ack = tcp(
        backend(f),
        BACKEND_PORT,
        client(f),
        CLIENT_PORT,
        TCP_SYN | TCP_ACK,
    );
    assert_eq!(
        fx.ingress(&syn_ack, 0x1).mark,
        0x1 | SVC,
        "a SYN goes by the maps"
    );
    assert_eq!(fx.ingress(&reply, 0).mark, SVC, "new verdict");
    // So does such traffic to any other port (a translation made later ends it: flow_gen) ...
    let syn = tcp(client(f), CLIENT_PORT, vip(f), VIP_PORT, TCP_SYN);
    let ack = tcp(client(f), CLIENT_PORT, vip(f), VIP_PORT, TCP_ACK);
    let fin = tcp(client(f), CLIENT_PORT, vip(f), VIP_PORT, TCP_ACK | TCP_FIN);
    assert!(!in_local_range(VIP_PORT));
    assert_eq!(fx.ingress(&ack, 0x1).mark, 0x1);
    add_service(&fx, vip(f), VIP_PORT, L4Proto::Tcp, SVC_F_MASQ, 1);
    assert_eq!(fx.ingress(&ack, 0x1).mark, 0x1, "verdict kept");
    // ... until a SYN goes by the maps.
    assert_eq!(fx.ingress(&syn, 0x1).mark, 0x1 | SVC | MASQ, "by the maps");
    // The Service gone: its established flow keeps its marks (and counts them), FIN included.
    fx.dp
        .maps()
        .svc_ports
        .delete(&SvcKey::new(vip(f), VIP_PORT, L4Proto::Tcp))
        .expect("svc_ports");
    fx.dp
        .maps()
        .svc_addrs
        .delete(&AddrKey::new(vip(f)))
        .expect("svc_addrs");
    assert_eq!(fx.ingress(&ack, 0x1).mark, 0x1 | SVC | MASQ, "verdict kept");
    assert_eq!(fx.ingress(&fin, 0).mark, SVC | MASQ, "FIN too");

    // Egress keeps its "no SNAT" verdict for packets with the same service marks: untranslated
    // service traffic to an in-cluster backend passes, and keeps passing when its source becomes
    // a service address (host-originated SNAT, by the maps) ...
    let fwd_syn = tcp(client(f), CLIENT_PORT, backend(f), BACKEND_PORT, TCP_SYN);
    let fwd_ack = tcp(client(f), CLIENT_PORT, backend(f), BACKEND_PORT, TCP_ACK);
    assert_eq!(fx.egress(&fwd_syn, SVC).packet, fwd_syn);
    assert_eq!(fx.egress(&fwd_ack, SVC).packet, fwd_ack);
    add_service_address(&fx, client(f));
    assert_eq!(
        fx.egress(&fwd_ack, SVC).packet,
        fwd_ack,
        "egress verdict kept"
    );
    // ... but a packet with other marks goes by the maps (and its translation is the flow's).
    let out = fx.egress(&fwd_ack, 0);
    assert_eq!(
        check_frame(&out.packet).src,
        node(f),
        "other marks: by the maps"
    );
    let entry = fwd(&fx, client(f), CLIENT_PORT, backend(f), BACKEND_PORT).expect("snat_fwd");
    assert_eq!(
        entry.flags,
        SNAT_F_HOST | SNAT_F_RESOLVED | SNAT_F_PROBE_HIT
    );
    let out = fx.egress(&fwd_ack, SVC);
    assert_eq!(
        check_frame(&out.packet).src,
        node(f),
        "the flow is translated now"
    );

    // Past the TTL (at most 2.56 s, at HZ=100) every packet goes by the maps.
    std::thread::sleep(std::time::Duration::from_millis(2700));
    assert_eq!(fx.ingress(&ack, 0x1).mark, 0x1, "ingress verdict expired");
    assert_counters(
        &fx.stats(),
        &[
            (Counter::ReplyMarked, 2),
            (Counter::SvcMarked, 3),
            (Counter::SnatAlloc, 1),
            (Counter::FwdHit, 1),
        ],
    );
}
both_families!(flow_cache_keeps_verdicts_of_untranslated_flows_until_their_ttl);

/// A forwarded flow crosses TC ingress on one device and TC egress on another with the same
/// tuple: each program keeps its verdict in a slot of its own (flow_cache.h, FLOW_INDEX_EGRESS).
/// With one slot for both, each evicted the other's and every packet of a pod-to-pod connection
/// through the node took the general path twice. Shown by the map (the tuple's two slots: an
/// egress verdict, 2, and an ingress verdict, 3) and by behaviour: after egress has judged the
/// flow, ingress still serves its own verdict when the maps change under it.
fn a_forwarded_flow_keeps_its_ingress_and_egress_verdicts_apart(f: Family, name: &str) {
    let fx = Fixture::new(name);
    let cpu = allowed_cpus()[0];
    on_cpu(cpu, || {
        // Traffic between two pods through the node, no Service: ingress marks nothing, egress
        // translates nothing, each from the general path.
        let ack = tcp(backend(f), BACKEND_PORT, client(f), CLIENT_PORT, TCP_ACK);
        assert_eq!(fx.ingress(&ack, 0).mark, 0);
        assert_eq!(fx.egress(&ack, 0).packet, ack);
        let tuple = Tuple::new(
            backend(f),
            BACKEND_PORT,
            client(f),
            CLIENT_PORT,
            L4Proto::Tcp,
        );
        let mut dirs: Vec<u8> = flow_slots(&fx, &tuple).iter().map(|s| s.dir).collect();
        dirs.sort_unstable();
        assert_eq!(dirs, [2, 3], "an egress and an ingress verdict");
        // The maps now make the flow a service connection's replies: the next packets keep both
        // verdicts until the TTL (a general run would mark this one SVC|REPLY).
        add_conn(&fx, f, &client_to_backend(f));
        for _ in 0..3 {
            assert_eq!(fx.ingress(&ack, 0).mark, 0, "ingress verdict kept");
            assert_eq!(fx.egress(&ack, 0).packet, ack, "egress verdict kept");
        }
        assert_eq!(flow_slots(&fx, &tuple).len(), 2);
    });
    assert_counters(&fx.stats(), &[]);
}
both_families!(a_forwarded_flow_keeps_its_ingress_and_egress_verdicts_apart);

/// An egress "no SNAT" verdict is per CPU, but the translation a packet of the same flow gets on
/// another CPU (other marks) ends it at once (flow_gen, flow_cache.h): a connection in snat_fwd
/// always leaves translated. (The bounded fuzzer found this race when verdicts had no counter.)
fn egress_verdict_ends_when_another_cpu_translates_the_flow(f: Family, name: &str) {
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        eprintln!("skipped: needs two CPUs, this process may use {cpus:?}");
        return;
    }
    let fx = Fixture::new(name);
    let syn = tcp(client(f), CLIENT_PORT, backend(f), BACKEND_PORT, TCP_SYN);
    let ack = tcp(client(f), CLIENT_PORT, backend(f), BACKEND_PORT, TCP_ACK);
    let on = |cpu: usize, packet: &[u8], mark: u32| on_cpu(cpu, || fx.egress(packet, mark).packet);
    // CPU A: the flow needs no SNAT with the service mark; its verdict is kept even when the maps
    // change (the source becomes a service address) ...
    assert_eq!(on(cpus[0], &syn, SVC), syn);
    assert_eq!(on(cpus[0], &ack, SVC), ack);
    add_service_address(&fx, client(f));
    assert_eq!(on(cpus[0], &ack, SVC), ack, "CPU A keeps its verdict");
    // ... until CPU B translates a packet of the flow without the mark.
    let out = on(cpus[1], &ack, 0);
    assert_eq!(check_frame(&out).src, node(f), "CPU B: by the maps");
    let entry = fwd(&fx, client(f), CLIENT_PORT, backend(f), BACKEND_PORT).expect("snat_fwd");
    let out = on(cpus[0], &ack, SVC);
    let seen = check_frame(&out);
    assert_eq!(
        (seen.src, seen.sport()),
        (entry.address(), entry.port.get()),
        "CPU A translates the flow as snat_fwd says"
    );
}
both_families!(egress_verdict_ends_when_another_cpu_translates_the_flow);

/// An ingress "not ours" verdict is per CPU too, and the translation another CPU makes whose
/// replies are that flow ends it at once (flow_gen, bumped at both tuples' indexes): the replies
/// of a connection in snat_rev always come back translated, UDP (whose first reply is no SYN)
/// included, on any port.
fn ingress_verdict_ends_when_another_cpu_translates_its_flow(f: Family, name: &str) {
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        eprintln!("skipped: needs two CPUs, this process may use {cpus:?}");
        return;
    }
    let fx = Fixture::new(name);
    // A client port outside the local range is kept by the translation, so the reply's tuple is
    // known before it is made.
    const KEPT_PORT: u16 = 20000;
    assert!(!in_local_range(KEPT_PORT));
    let request = udp(client(f), KEPT_PORT, backend(f), BACKEND_PORT, b"request");
    let reply = udp(backend(f), BACKEND_PORT, node(f), KEPT_PORT, b"reply");
    // CPU A: the reply tuple is none of the agent's (twice: the second is the verdict's).
    for _ in 0..2 {
        let out = on_cpu(cpus[0], || fx.ingress(&reply, 0));
        assert_eq!((out.packet.as_slice(), out.mark), (reply.as_slice(), 0));
    }
    // CPU B: the request is masqueraded, to the node's address and the client's own port.
    let out = on_cpu(cpus[1], || fx.egress(&request, MASQ));
    let seen = check_frame(&out.packet);
    assert_eq!(
        (seen.src, seen.sport()),
        (node(f), KEPT_PORT),
        "CPU B translates"
    );
    // CPU A: the reply now comes back to the client.
    let out = on_cpu(cpus[0], || fx.ingress(&reply, 0));
    let seen = check_frame(&out.packet);
    assert_eq!(
        (seen.dst, seen.dport(), out.mark),
        (client(f), KEPT_PORT, SVC),
        "CPU A reverse-translates the reply"
    );
}
both_families!(ingress_verdict_ends_when_another_cpu_translates_its_flow);

/// A verdict is forgotten when the general path drops a packet of its flow: a Service given
/// loadBalancerSourceRanges that exclude an established flow's client drops the flow's next SYN,
/// and from then on its other packets too (they no longer take the slot's marks).
fn dropped_packet_forgets_its_flows_verdict(f: Family, name: &str) {
    let fx = Fixture::new(name);
    add_service(&fx, vip(f), VIP_PORT, L4Proto::Tcp, 0, 1);
    let syn = tcp(client(f), CLIENT_PORT, vip(f), VIP_PORT, TCP_SYN);
    let ack = tcp(client(f), CLIENT_PORT, vip(f), VIP_PORT, TCP_ACK);
    assert_eq!(fx.ingress(&syn, 0).mark, SVC);
    assert_eq!(fx.ingress(&ack, 0).mark, SVC);
    add_service(&fx, vip(f), VIP_PORT, L4Proto::Tcp, SVC_F_SRC_RANGES, 1);
    assert_eq!(fx.ingress(&syn, 0).return_value, TC_ACT_SHOT);
    assert_eq!(fx.ingress(&ack, 0).return_value, TC_ACT_SHOT);
    assert_counters(
        &fx.stats(),
        &[(Counter::SvcMarked, 2), (Counter::FilteredSrcRange, 2)],
    );
}
both_families!(dropped_packet_forgets_its_flows_verdict);

fn reply_reverse_translated(f: Family, name: &str) {
    let fx = Fixture::new(name);
    let (_, port) = snat_first(&fx, f, client(f), CLIENT_PORT);
    let reply = tcp(backend(f), BACKEND_PORT, node(f), port, TCP_SYN | TCP_ACK);
    let out = fx.ingress(&reply, 0x1);
    assert_eq!(out.return_value, TC_ACT_UNSPEC);
    assert_eq!(out.mark, 0x1 | SVC);
    let p = check_frame(&out.packet);
    assert_eq!((p.src, p.sport()), (backend(f), BACKEND_PORT));
    assert_eq!((p.dst, p.dport()), (client(f), CLIENT_PORT));
    // The reply is now exactly what the client would have received without SNAT.
    assert_eq!(
        out.packet,
        tcp(
            backend(f),
            BACKEND_PORT,
            client(f),
            CLIENT_PORT,
            TCP_SYN | TCP_ACK
        )
    );
    let reverse = rev(&fx, backend(f), BACKEND_PORT, node(f), port).expect("snat_rev");
    assert_eq!(reverse.state, STATE_SYN | STATE_REPLY);
    assert_counters(
        &fx.stats(),
        &[(Counter::SnatAlloc, 1), (Counter::RevHit, 1)],
    );
}
both_families!(reply_reverse_translated);

fn reply_of_untranslated_service_connection_marked(f: Family, name: &str) {
    let fx = Fixture::new(name);
    let conn = client_to_backend(f);
    add_conn(&fx, f, &conn);
    let reply = tcp(backend(f), BACKEND_PORT, client(f), CLIENT_PORT, TCP_ACK);
    let out = fx.ingress(&reply, 0);
    assert_eq!(out.return_value, TC_ACT_UNSPEC);
    assert_eq!(out.mark, SVC);
    assert_eq!(out.packet, reply, "no SNAT: the packet is untouched");
    assert!(fx.dp.maps().snat.is_empty(), "no SNAT entry");
    // A reply the probe did not see stays unmarked.
    let other = tcp(backend(f), BACKEND_PORT, client_b(f), CLIENT_PORT, TCP_ACK);
    let out = fx.ingress(&other, 0);
    assert_eq!((out.return_value, out.mark), (TC_ACT_UNSPEC, 0));
    assert_eq!(out.packet, other);
    assert_counters(&fx.stats(), &[(Counter::ReplyMarked, 1)]);
}
both_families!(reply_of_untranslated_service_connection_marked);

/// With a reply mark configured (`config.flags` bits 24-29), ingress sets it with the service
/// mark on every reply it recognizes (reverse SNAT by the table and by the flow cache, a `conns`
/// hit and that flow's cached verdict), and egress passes a packet carrying it untouched, even
/// one it would otherwise translate; the same packet without it is translated.
fn replies_carry_the_reply_mark_and_egress_passes_them(f: Family, name: &str) {
    const REPLY: u32 = 0x0010_0000;
    let fx = Fixture::new(name);
    fx.set_config(Config {
        flags: reply_mark_flags(REPLY),
        ..Config::default()
    });
    // Reverse SNAT: the first reply from the table, the next from the flow cache.
    let (_, port) = snat_first(&fx, f, client(f), CLIENT_PORT);
    for flags in [TCP_SYN | TCP_ACK, TCP_ACK] {
        let reply = tcp(backend(f), BACKEND_PORT, node(f), port, flags);
        let out = fx.ingress(&reply, 0x1);
        assert_eq!(out.return_value, TC_ACT_UNSPEC);
        assert_eq!(
            out.mark,
            0x1 | SVC | REPLY,
            "reverse-translated reply, flags {flags:#x}"
        );
        let p = check_frame(&out.packet);
        assert_eq!((p.dst, p.dport()), (client(f), CLIENT_PORT));
    }
    // A reply of an untranslated service connection: the conns hit, then its flow's verdict.
    let conn = Tuple::new(
        client_b(f),
        CLIENT_PORT,
        backend(f),
        BACKEND_PORT,
        L4Proto::Tcp,
    );
    add_conn(&fx, f, &conn);
    for _ in 0..2 {
        let reply = tcp(backend(f), BACKEND_PORT, client_b(f), CLIENT_PORT, TCP_ACK);
        let out = fx.ingress(&reply, 0);
        assert_eq!((out.return_value, out.mark), (TC_ACT_UNSPEC, SVC | REPLY));
        assert_eq!(out.packet, reply);
    }
    // Egress: a hairpin first packet (saddr == daddr) is translated without the reply mark and
    // passed untouched with it (no record made).
    let hairpin = tcp(client_c(f), CLIENT_PORT, client_c(f), BACKEND_PORT, TCP_SYN);
    let out = fx.egress(&hairpin, SVC | REPLY);
    assert_eq!((out.return_value, out.mark), (TC_ACT_UNSPEC, SVC | REPLY));
    assert_eq!(
        out.packet, hairpin,
        "a reply-marked packet is passed untouched"
    );
    assert!(fwd(&fx, client_c(f), CLIENT_PORT, client_c(f), BACKEND_PORT).is_none());
    let out = fx.egress(&hairpin, SVC);
    assert_eq!(check_frame(&out.packet).src, node(f));
    assert!(fwd(&fx, client_c(f), CLIENT_PORT, client_c(f), BACKEND_PORT).is_some());
    assert_counters(
        &fx.stats(),
        &[
            (Counter::SnatAlloc, 2),
            (Counter::RevHit, 2),
            (Counter::ReplyMarked, 2),
        ],
    );
}
both_families!(replies_carry_the_reply_mark_and_egress_passes_them);

/// The first packet resolves its connection's service: the IPVS probe's `conns` entry for its
/// forward tuple gives the service address:port, `svc_ports` its id, which both entries of the
/// record carry with `SNAT_F_RESOLVED | SNAT_F_PROBE_HIT` (`probe_hit` counts it). A connection
/// the probe did not record gets `SNAT_F_RESOLVED` alone and id 0 (`probe_miss`).
fn first_packet_resolves_its_service_from_the_probes_conns_entry(f: Family, name: &str) {
    let fx = Fixture::new(name);
    add_service(&fx, vip(f), VIP_PORT, L4Proto::Tcp, 0, 42);
    let conn = client_to_backend(f);
    add_conn(&fx, f, &conn);
    // The first packet of `src`'s connection; the (svc_id, flags) of both entries of its record.
    let resolution_of = |src: IpAddr| {
        let (_, port) = snat_first(&fx, f, src, CLIENT_PORT);
        let entry = fwd(&fx, src, CLIENT_PORT, backend(f), BACKEND_PORT).expect("snat_fwd");
        let reverse = rev(&fx, backend(f), BACKEND_PORT, node(f), port).expect("snat_rev");
        [(entry.svc_id, entry.flags), (reverse.svc_id, reverse.flags)]
    };
    let resolved = SNAT_F_MASQ | SNAT_F_RESOLVED | SNAT_F_PROBE_HIT;
    assert_eq!(resolution_of(client(f)), [(42, resolved); 2]);
    assert_counters(
        &fx.stats(),
        &[(Counter::SnatAlloc, 1), (Counter::ProbeHit, 1)],
    );
    // Another client, which the probe did not record.
    assert_eq!(
        resolution_of(client_b(f)),
        [(0, SNAT_F_MASQ | SNAT_F_RESOLVED); 2]
    );
    assert_counters(
        &fx.stats(),
        &[
            (Counter::SnatAlloc, 2),
            (Counter::ProbeHit, 1),
            (Counter::ProbeMiss, 1),
        ],
    );
}
both_families!(first_packet_resolves_its_service_from_the_probes_conns_entry);

fn icmp_error_translated(f: Family, name: &str) {
    let fx = Fixture::new(name);
    let original = tcp(client(f), CLIENT_PORT, backend(f), BACKEND_PORT, TCP_SYN);
    let out = fx.egress(&original, SVC | MASQ);
    let translated_ip = &out.packet[ETH_LEN..];
    let port = parse_ip(translated_ip).sport();
    assert_ne!(port, CLIENT_PORT);

    let error = icmp_too_big(router(f), node(f), translated_ip);
    check_frame(&error);
    let out = fx.ingress(&error, 0);
    assert_eq!(out.return_value, TC_ACT_UNSPEC);
    assert_eq!(out.mark, SVC);
    // Outer IP and ICMP checksums, quoted IPv4 header and quoted TCP checksums all verify.
    let p = check_frame(&out.packet);
    assert_eq!((p.src, p.dst), (router(f), client(f)));
    let quoted = &p.l4[8..];
    assert_eq!(
        quoted,
        &original[ETH_LEN..],
        "the quoted packet is the client's own again"
    );
    assert_eq!(out.packet.len(), error.len());
    // An error about a flow we never translated is untouched.
    let stranger = tcp(client_b(f), 1234, backend(f), BACKEND_PORT, TCP_SYN);
    let error = icmp_too_big(router(f), node(f), &stranger[ETH_LEN..]);
    let out = fx.ingress(&error, 0);
    assert_eq!((out.return_value, out.mark), (TC_ACT_UNSPEC, 0));
    assert_eq!(out.packet, error);
    assert_counters(
        &fx.stats(),
        &[(Counter::SnatAlloc, 1), (Counter::IcmpXlate, 1)],
    );
}
both_families!(icmp_error_translated);

/// Splits a UDP datagram into two fragments at `split` (a multiple of 8).
fn udp_fragments(
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    payload: &[u8],
    id: u32,
) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let l4 = l4_segment(src, dst, &Transport::Udp { sport, dport }, payload);
    let split = 24;
    let first = ethernet(&ip_packet(
        src,
        dst,
        PROTO_UDP,
        &l4[..split],
        id,
        Some((0, true)),
    ));
    let later = ethernet(&ip_packet(
        src,
        dst,
        PROTO_UDP,
        &l4[split..],
        id,
        Some((split, false)),
    ));
    (first, later, l4)
}

fn later_fragment_translated(f: Family, name: &str) {
    let fx = Fixture::new(name);
    let payload: Vec<u8> = (0..40u8).collect();
    let (first, later, _) = udp_fragments(client(f), CLIENT_PORT, backend(f), 53, &payload, 0x4242);

    let out_first = fx.egress(&first, SVC | MASQ);
    let out_later = fx.egress(&later, SVC | MASQ);
    assert_eq!(out_first.return_value, TC_ACT_UNSPEC);
    assert_eq!(out_later.return_value, TC_ACT_UNSPEC);
    let a = check_frame(&out_first.packet);
    let b = check_frame(&out_later.packet);
    assert!(a.is_fragment && a.more_fragments && b.is_fragment && b.frag_offset == 24);
    assert_eq!((a.src, b.src), (node(f), node(f)));
    let port = a.sport();
    assert!(in_snat_range(port));
    // Reassembled, the translated datagram's UDP checksum verifies.
    let datagram = [a.l4.clone(), b.l4.clone()].concat();
    check_l4_checksum(f, node(f), backend(f), PROTO_UDP, &datagram);
    assert_eq!(&datagram[8..], &payload[..]);

    // The reply, fragmented too, comes back to the client.
    let (first, later, _) = udp_fragments(backend(f), 53, node(f), port, &payload, 0x5151);
    let out_first = fx.ingress(&first, 0);
    let out_later = fx.ingress(&later, 0);
    assert_eq!((out_first.mark, out_later.mark), (SVC, SVC));
    let a = check_frame(&out_first.packet);
    let b = check_frame(&out_later.packet);
    assert_eq!((a.dst, b.dst), (client(f), client(f)));
    assert_eq!(a.dport(), CLIENT_PORT);
    let datagram = [a.l4, b.l4].concat();
    check_l4_checksum(f, backend(f), client(f), PROTO_UDP, &datagram);

    // A later fragment whose first fragment is unknown: dropped when it needs SNAT, else passed.
    let (_, orphan, _) = udp_fragments(client(f), CLIENT_PORT, backend(f), 53, &payload, 0x7777);
    assert_eq!(fx.egress(&orphan, SVC | MASQ).return_value, TC_ACT_SHOT);
    let out = fx.egress(&orphan, 0);
    assert_eq!(out.return_value, TC_ACT_UNSPEC);
    assert_eq!(out.packet, orphan);
    assert_counters(
        &fx.stats(),
        &[
            (Counter::SnatAlloc, 1),
            (Counter::RevHit, 1),
            (Counter::FragXlate, 2),
            (Counter::FragMiss, 1),
        ],
    );
}
both_families!(later_fragment_translated);

fn no_snat_traffic_untouched(f: Family, name: &str) {
    let fx = Fixture::new(name);
    add_service(&fx, vip(f), VIP_PORT, L4Proto::Tcp, SVC_F_MASQ, 1);
    let packets = [
        tcp(client(f), CLIENT_PORT, backend(f), BACKEND_PORT, TCP_SYN),
        udp(client(f), CLIENT_PORT, backend(f), 53, b"query"),
        frame(
            client(f),
            backend(f),
            Transport::Icmp {
                kind: if f == Family::V4 { 8 } else { 128 },
                code: 0,
                rest: [0, 1, 0, 1],
            },
            b"ping",
        ),
    ];
    for packet in &packets {
        for program in [DatapathProgram::TcEgress, DatapathProgram::TcIngress] {
            let out = fx.run(program, packet, 0x1);
            assert_eq!(out.return_value, TC_ACT_UNSPEC);
            assert_eq!(out.mark, 0x1, "other mark bits are kept, none added");
            assert_eq!(&out.packet, packet, "{program:?} changed bytes");
        }
    }
    assert_counters(&fx.stats(), &[]);
}
both_families!(no_snat_traffic_untouched);

fn unconfigured_datapath_passes_everything(f: Family, name: &str) {
    let fx = Fixture::new(name);
    fx.set_config(Config {
        mark_svc: 0,
        ..Config::default()
    });
    let packet = tcp(client(f), CLIENT_PORT, backend(f), BACKEND_PORT, TCP_SYN);
    let out = fx.egress(&packet, SVC | MASQ);
    assert_eq!(out.return_value, TC_ACT_UNSPEC);
    assert_eq!(out.packet, packet);
    assert_counters(&fx.stats(), &[]);
}
both_families!(unconfigured_datapath_passes_everything);

fn non_service_port_on_service_address_dropped(f: Family, name: &str) {
    let fx = Fixture::new(name);
    add_service(&fx, vip(f), VIP_PORT, L4Proto::Tcp, 0, 1);
    let to_other_tcp = tcp(client(f), CLIENT_PORT, vip(f), 22, TCP_SYN);
    let to_other_udp = udp(client(f), CLIENT_PORT, vip(f), VIP_PORT, b"x");
    for packet in [&to_other_tcp, &to_other_udp] {
        assert_eq!(fx.ingress(packet, 0).return_value, TC_ACT_SHOT);
    }
    let echo = frame(
        client(f),
        vip(f),
        Transport::Icmp {
            kind: if f == Family::V4 { 8 } else { 128 },
            code: 0,
            rest: [0, 1, 0, 1],
        },
        b"ping",
    );
    let out = fx.ingress(&echo, 0);
    assert_eq!((out.return_value, out.mark), (TC_ACT_UNSPEC, 0));
    let out = fx.ingress(&tcp(client(f), CLIENT_PORT, vip(f), VIP_PORT, TCP_SYN), 0);
    assert_eq!((out.return_value, out.mark), (TC_ACT_UNSPEC, SVC));
    assert_counters(
        &fx.stats(),
        &[(Counter::FilteredPort, 2), (Counter::SvcMarked, 1)],
    );
}
both_families!(non_service_port_on_service_address_dropped);

fn load_balancer_source_ranges(f: Family, name: &str) {
    let fx = Fixture::new(name);
    add_service(&fx, vip(f), 443, L4Proto::Tcp, SVC_F_SRC_RANGES, 7);
    let (allowed_net, len) = match f {
        Family::V4 => ("198.51.100.0".parse().expect("ip"), 24),
        Family::V6 => ("2001:db8:100::".parse().expect("ip"), 64),
    };
    fx.dp
        .maps()
        .src_ranges
        .insert(&RangeKey::new(7, allowed_net, len).expect("range"), &1)
        .expect("src_ranges");
    // The same prefix for another service does not open this one.
    fx.dp
        .maps()
        .src_ranges
        .insert(&RangeKey::new(8, client(f), 8).expect("range"), &1)
        .expect("src_ranges");
    let allowed = fx.ingress(&tcp(offcluster(f), CLIENT_PORT, vip(f), 443, TCP_SYN), 0);
    assert_eq!((allowed.return_value, allowed.mark), (TC_ACT_UNSPEC, SVC));
    let denied = fx.ingress(&tcp(client(f), CLIENT_PORT, vip(f), 443, TCP_SYN), 0);
    assert_eq!(denied.return_value, TC_ACT_SHOT);
    assert_counters(
        &fx.stats(),
        &[(Counter::SvcMarked, 1), (Counter::FilteredSrcRange, 1)],
    );
}
both_families!(load_balancer_source_ranges);

fn l3_device_programs(f: Family, name: &str) {
    let fx = Fixture::new(name);
    let packet = tcp(client(f), CLIENT_PORT, backend(f), BACKEND_PORT, TCP_SYN);
    let ip_only = &packet[ETH_LEN..];
    let out = fx.run(DatapathProgram::TcEgressL3, ip_only, SVC | MASQ);
    assert_eq!(out.return_value, TC_ACT_UNSPEC);
    let p = check_ip(&out.packet);
    assert_eq!(p.src, node(f));
    let port = p.sport();
    assert!(in_snat_range(port));

    let reply = tcp(backend(f), BACKEND_PORT, node(f), port, TCP_SYN | TCP_ACK);
    let out = fx.run(DatapathProgram::TcIngressL3, &reply[ETH_LEN..], 0);
    assert_eq!((out.return_value, out.mark), (TC_ACT_UNSPEC, SVC));
    let p = check_ip(&out.packet);
    assert_eq!((p.dst, p.dport()), (client(f), CLIENT_PORT));
    assert_counters(
        &fx.stats(),
        &[(Counter::SnatAlloc, 1), (Counter::RevHit, 1)],
    );
}
both_families!(l3_device_programs);

fn port_exhaustion_counted(f: Family, name: &str) {
    let fx = Fixture::new(name);
    fx.set_config(Config {
        snat_port_min: 20_000,
        snat_port_max: 20_001,
        ..Config::default()
    });
    let (_, a) = snat_first(&fx, f, client(f), CLIENT_PORT);
    let (_, b) = snat_first(&fx, f, client_b(f), CLIENT_PORT);
    let mut ports = [a, b];
    ports.sort_unstable();
    assert_eq!(ports, [20_000, 20_001]);
    let out = fx.egress(
        &tcp(client_c(f), CLIENT_PORT, backend(f), BACKEND_PORT, TCP_SYN),
        SVC | MASQ,
    );
    assert_eq!(out.return_value, TC_ACT_SHOT);
    assert!(fwd(&fx, client_c(f), CLIENT_PORT, backend(f), BACKEND_PORT).is_none());
    // Another backend port is another reply tuple: ports are free again there.
    let out = fx.egress(
        &tcp(client_c(f), CLIENT_PORT, backend(f), 9090, TCP_SYN),
        SVC | MASQ,
    );
    assert_eq!(out.return_value, TC_ACT_UNSPEC);
    assert_counters(
        &fx.stats(),
        &[(Counter::SnatAlloc, 3), (Counter::PortExhausted, 1)],
    );
}
both_families!(port_exhaustion_counted);

fn map_full_counted(f: Family, name: &str) {
    let mut sizes = test_map_sizes();
    sizes.snat = 1;
    let fx = Fixture::with_sizes(name, sizes);
    snat_first(&fx, f, client(f), CLIENT_PORT);
    let out = fx.egress(
        &tcp(client_b(f), CLIENT_PORT, backend(f), BACKEND_PORT, TCP_SYN),
        SVC | MASQ,
    );
    assert_eq!(out.return_value, TC_ACT_SHOT);
    assert_eq!(fx.dp.maps().snat.len(), 1, "one record");
    assert_eq!(
        fx.dp.maps().snat.index_len(probes::Index::Rev),
        1,
        "the second reservation given back"
    );
    assert_eq!(fx.dp.maps().snat.index_len(probes::Index::Fwd), 1);
    assert_counters(
        &fx.stats(),
        &[(Counter::SnatAlloc, 1), (Counter::MapFull, 1)],
    );
}
both_families!(map_full_counted);

/// The last packet dropped for a reason, as `drop_last` holds it (newest over CPUs).
fn last_drop(fx: &Fixture, counter: Counter) -> Option<Tuple> {
    fx.dp
        .maps()
        .last_drops()
        .expect("drop_last")
        .into_iter()
        .find(|(c, _)| *c == counter)
        .map(|(_, e)| e.key)
}

fn drops_record_the_connection_of_the_last_packet_dropped_for_each_reason(f: Family, name: &str) {
    let fx = Fixture::new(name);
    assert_eq!(last_drop(&fx, Counter::FilteredPort), None);
    add_service(&fx, vip(f), VIP_PORT, L4Proto::Tcp, 0, 1);
    for sport in [CLIENT_PORT, CLIENT_PORT + 1] {
        let packet = tcp(client(f), sport, vip(f), 22, TCP_SYN);
        assert_eq!(fx.ingress(&packet, 0).return_value, TC_ACT_SHOT);
    }
    assert_eq!(
        last_drop(&fx, Counter::FilteredPort),
        Some(Tuple::new(
            client(f),
            CLIENT_PORT + 1,
            vip(f),
            22,
            L4Proto::Tcp
        )),
        "the later of the two dropped packets"
    );

    fx.set_config(Config {
        snat_port_min: 20_000,
        snat_port_max: 20_000,
        ..Config::default()
    });
    snat_first(&fx, f, client(f), CLIENT_PORT);
    let out = fx.egress(
        &tcp(client_b(f), CLIENT_PORT, backend(f), BACKEND_PORT, TCP_SYN),
        SVC | MASQ,
    );
    assert_eq!(out.return_value, TC_ACT_SHOT);
    assert_eq!(
        last_drop(&fx, Counter::PortExhausted),
        Some(Tuple::new(
            client_b(f),
            CLIENT_PORT,
            backend(f),
            BACKEND_PORT,
            L4Proto::Tcp
        ))
    );
    // A reason with no drop has no connection.
    assert_eq!(last_drop(&fx, Counter::MapFull), None);
}
both_families!(drops_record_the_connection_of_the_last_packet_dropped_for_each_reason);

fn hairpin(f: Family, name: &str) {
    let fx = Fixture::new(name);
    // A pod reached itself through a service: after IPVS, source == destination.
    let out = fx.egress(
        &tcp(client(f), CLIENT_PORT, client(f), BACKEND_PORT, TCP_SYN),
        0,
    );
    assert_eq!(out.return_value, TC_ACT_UNSPEC);
    let p = check_frame(&out.packet);
    assert_eq!((p.src, p.dst), (node(f), client(f)));
    let entry = fwd(&fx, client(f), CLIENT_PORT, client(f), BACKEND_PORT).expect("snat_fwd");
    assert_eq!(entry.flags, SNAT_F_HAIRPIN | SNAT_F_RESOLVED);
    let reply = tcp(client(f), BACKEND_PORT, node(f), p.sport(), TCP_ACK);
    let out = fx.ingress(&reply, 0);
    let p = check_frame(&out.packet);
    assert_eq!(
        (p.src, p.dst, p.dport()),
        (client(f), client(f), CLIENT_PORT)
    );
    assert_counters(
        &fx.stats(),
        &[(Counter::SnatAlloc, 1), (Counter::RevHit, 1)],
    );
}
both_families!(hairpin);

fn host_originated_and_offcluster_backend(f: Family, name: &str) {
    let fx = Fixture::new(name);
    add_service(&fx, vip(f), VIP_PORT, L4Proto::Tcp, 0, 1);
    set_cluster_cidr(&fx, f, 0);
    // The host connected to a ClusterIP from the ClusterIP itself (its source for a local route).
    let out = fx.egress(&tcp(vip(f), 45_000, backend(f), BACKEND_PORT, TCP_SYN), 0);
    let p = check_frame(&out.packet);
    assert_eq!(p.src, node(f));
    let entry = fwd(&fx, vip(f), 45_000, backend(f), BACKEND_PORT).expect("snat_fwd");
    assert_eq!(entry.flags, SNAT_F_HOST | SNAT_F_RESOLVED);
    // A service backend outside the cluster CIDRs (marked as service traffic at ingress).
    let out = fx.egress(
        &tcp(client(f), CLIENT_PORT, offcluster(f), 443, TCP_SYN),
        SVC,
    );
    let p = check_frame(&out.packet);
    assert_eq!(p.src, node(f));
    let entry = fwd(&fx, client(f), CLIENT_PORT, offcluster(f), 443).expect("snat_fwd");
    assert_eq!(entry.flags, SNAT_F_OFFCLUSTER | SNAT_F_RESOLVED);
    // IPVS's replies leave from the service port: never translated, even towards an off-cluster
    // client and with the service mark the reply got at ingress.
    for mark in [0, SVC] {
        let reply = tcp(vip(f), VIP_PORT, offcluster(f), CLIENT_PORT, TCP_ACK);
        let out = fx.egress(&reply, mark);
        assert_eq!(out.packet, reply);
    }
    // Untranslated service traffic to an in-cluster backend stays untouched.
    let inside = tcp(client(f), CLIENT_PORT, backend(f), BACKEND_PORT, TCP_SYN);
    assert_eq!(fx.egress(&inside, SVC).packet, inside);
    assert_counters(&fx.stats(), &[(Counter::SnatAlloc, 2)]);
}
both_families!(host_originated_and_offcluster_backend);

fn no_snat_address_passes_untranslated(f: Family, name: &str) {
    let fx = Fixture::new(name);
    let other_family_only = match f {
        Family::V4 => DevValue::new(None, Some("2001:db8::1".parse().expect("ip"))),
        Family::V6 => DevValue::new(Some("192.0.2.1".parse().expect("ip")), None),
    };
    fx.dp
        .maps()
        .set_device(LOOPBACK_IFINDEX, &other_family_only)
        .expect("devices");
    let packet = tcp(client(f), CLIENT_PORT, backend(f), BACKEND_PORT, TCP_SYN);
    let out = fx.egress(&packet, SVC | MASQ);
    assert_eq!((out.return_value, &out.packet), (TC_ACT_UNSPEC, &packet));
    fx.dp
        .maps()
        .remove_device(LOOPBACK_IFINDEX)
        .expect("devices");
    let out = fx.egress(&packet, SVC | MASQ);
    assert_eq!((out.return_value, &out.packet), (TC_ACT_UNSPEC, &packet));
    assert_counters(&fx.stats(), &[(Counter::NoSnatAddr, 2)]);
}
both_families!(no_snat_address_passes_untranslated);

fn sctp_keeps_ports(f: Family, name: &str) {
    let fx = Fixture::new(name);
    let transport = Transport::Sctp {
        sport: CLIENT_PORT,
        dport: 9000,
    };
    let packet = frame(client(f), backend(f), transport, b"chunk");
    let out = fx.egress(&packet, SVC | MASQ);
    assert_eq!(out.return_value, TC_ACT_UNSPEC);
    let p = check_frame(&out.packet);
    assert_eq!(p.src, node(f));
    // Ports and the CRC32c are untouched: the CRC covers ports, not addresses.
    assert_eq!(p.l4, parse_frame(&packet).l4);
    // A second client with the same port cannot get another one.
    let other = frame(client_b(f), backend(f), transport_sctp(), b"chunk");
    assert_eq!(fx.egress(&other, SVC | MASQ).return_value, TC_ACT_SHOT);
    let reply = frame(
        backend(f),
        node(f),
        Transport::Sctp {
            sport: 9000,
            dport: CLIENT_PORT,
        },
        b"ack",
    );
    let out = fx.ingress(&reply, 0);
    let p = check_frame(&out.packet);
    assert_eq!((p.dst, p.dport()), (client(f), CLIENT_PORT));
    assert_counters(
        &fx.stats(),
        &[
            (Counter::SnatAlloc, 1),
            (Counter::SnatPortReuse, 1),
            (Counter::PortExhausted, 1),
            (Counter::RevHit, 1),
        ],
    );
}
both_families!(sctp_keeps_ports);

fn transport_sctp() -> Transport {
    Transport::Sctp {
        sport: CLIENT_PORT,
        dport: 9000,
    }
}

fn ingress_service_classification(f: Family, name: &str) {
    let fx = Fixture::new(name);
    add_service(&fx, vip(f), 80, L4Proto::Tcp, 0, 1);
    add_service(&fx, vip(f), 81, L4Proto::Tcp, SVC_F_MASQ, 2);
    add_service(&fx, vip(f), 82, L4Proto::Tcp, SVC_F_MASQ_OFFCLUSTER, 3);
    add_service(&fx, vip(f), 53, L4Proto::Udp, 0, 4);
    let mark_of = |src: IpAddr, dport: u16| {
        let out = fx.ingress(&tcp(src, CLIENT_PORT, vip(f), dport, TCP_SYN), 0x1);
        assert_eq!(out.return_value, TC_ACT_UNSPEC);
        out.mark
    };
    // No cluster CIDRs configured: off-cluster masquerading cannot apply.
    assert_eq!(mark_of(offcluster(f), 82), 0x1 | SVC);
    set_cluster_cidr(&fx, f, 0);
    assert_eq!(mark_of(client(f), 80), 0x1 | SVC);
    assert_eq!(mark_of(offcluster(f), 80), 0x1 | SVC);
    assert_eq!(mark_of(client(f), 81), 0x1 | SVC | MASQ);
    assert_eq!(mark_of(client(f), 82), 0x1 | SVC);
    assert_eq!(mark_of(offcluster(f), 82), 0x1 | SVC | MASQ);
    let out = fx.ingress(&udp(client(f), CLIENT_PORT, vip(f), 53, b"q"), 0);
    assert_eq!(out.mark, SVC);
    set_cluster_cidr(&fx, f, CFG_F_MASQ_ALL);
    assert_eq!(mark_of(client(f), 80), 0x1 | SVC | MASQ);
    assert_counters(&fx.stats(), &[(Counter::SvcMarked, 8)]);
}
both_families!(ingress_service_classification);

fn xt_svc_matches_service_traffic(f: Family, name: &str) {
    let fx = Fixture::new(name);
    add_service(&fx, vip(f), VIP_PORT, L4Proto::Tcp, 0, 1);
    fx.probe_conn(
        &Tuple::new(client(f), CLIENT_PORT, node(f), BACKEND_PORT, L4Proto::Tcp),
        &ConnValue::default(),
    );
    let verdict = |packet: &[u8]| fx.run(DatapathProgram::XtSvc, packet, 0).return_value;
    // Host-originated connection to a service port.
    assert_eq!(verdict(&tcp(vip(f), 45_000, vip(f), VIP_PORT, TCP_SYN)), 1);
    // Reply of a known service connection (host-network backend answering the client).
    assert_eq!(
        verdict(&tcp(node(f), BACKEND_PORT, client(f), CLIENT_PORT, TCP_ACK)),
        1
    );
    // Anything else.
    assert_eq!(verdict(&tcp(vip(f), 45_000, vip(f), 22, TCP_SYN)), 0);
    assert_eq!(
        verdict(&tcp(
            node(f),
            BACKEND_PORT,
            client_b(f),
            CLIENT_PORT,
            TCP_ACK
        )),
        0
    );
    assert_eq!(verdict(&udp(vip(f), 45_000, vip(f), VIP_PORT, b"x")), 0);
}
both_families!(xt_svc_matches_service_traffic);

/// Puts `tuple` in `switch_flows` (a connection kube-proxy's conntrack held at the switch).
fn old_connection(fx: &Fixture, tuple: &Tuple) {
    let flows = fx.dp.maps().switch_flows.as_ref().expect("switch_flows");
    flows
        .insert(
            tuple,
            &SwitchFlow {
                ct_id: 7,
                pad: 0,
                seen_ns: 1,
            },
        )
        .expect("switch_flows");
}

fn in_switch_flows(fx: &Fixture, tuple: &Tuple) -> bool {
    let flows = fx.dp.maps().switch_flows.as_ref().expect("switch_flows");
    flows.get(tuple).expect("switch_flows").is_some()
}

/// The switch window from kube-proxy (docs/switching.md): with `CFG_F_SWITCH`, a packet whose
/// tuple is in `switch_flows` is neither marked at ingress nor translated at egress (it stays
/// conntrack's, which holds its NAT); a SYN on such a tuple is a new connection, handled as usual,
/// and takes the tuple out of the map; without the flag the map is not looked at.
fn switch_window_leaves_old_connections_to_conntrack(f: Family, name: &str) {
    let fx = Fixture::new(name);
    add_service(&fx, vip(f), VIP_PORT, L4Proto::Tcp, SVC_F_MASQ, 1);
    // The old connection as TC ingress meets its request (its conntrack original tuple) and as
    // TC egress meets it after IPVS (the reply tuple reversed).
    let at_ingress = Tuple::new(client(f), CLIENT_PORT, vip(f), VIP_PORT, L4Proto::Tcp);
    let at_egress = client_to_backend(f);
    old_connection(&fx, &at_ingress);
    old_connection(&fx, &at_egress);
    let request = tcp(client(f), CLIENT_PORT, vip(f), VIP_PORT, TCP_ACK);
    let forwarded = tcp(client(f), CLIENT_PORT, backend(f), BACKEND_PORT, TCP_ACK);

    // Outside the window the map is not consulted. (Another old connection: the window opens
    // before the agent marks anything, so no flow_cache verdict predates it.)
    let outside = Tuple::new(client(f), CLIENT_PORT + 2, vip(f), VIP_PORT, L4Proto::Tcp);
    old_connection(&fx, &outside);
    let outside_request = tcp(client(f), CLIENT_PORT + 2, vip(f), VIP_PORT, TCP_ACK);
    assert_eq!(fx.ingress(&outside_request, 0x1).mark, 0x1 | SVC | MASQ);

    fx.dp.maps().set_switch_window(true).expect("switch window");
    // The agent's configuration writes keep the window as it is.
    fx.set_config(Config::default());
    let flags = fx
        .dp
        .maps()
        .config()
        .expect("config")
        .expect("written")
        .flags;
    assert_ne!(flags & CFG_F_SWITCH, 0, "window kept open");
    let out = fx.ingress(&request, 0x1);
    assert_eq!(
        (out.return_value, out.mark),
        (TC_ACT_UNSPEC, 0x1),
        "not marked"
    );
    assert_eq!(out.packet, request, "untouched");
    // Even carrying the masquerade mark (as nothing marks it in the window), egress leaves it.
    let out = fx.egress(&forwarded, SVC | MASQ);
    assert_eq!(out.return_value, TC_ACT_UNSPEC);
    assert_eq!(out.packet, forwarded, "not translated");
    assert!(fwd(&fx, client(f), CLIENT_PORT, backend(f), BACKEND_PORT).is_none());

    // Another client's connection is the agent's as usual.
    let other = tcp(client(f), CLIENT_PORT + 1, vip(f), VIP_PORT, TCP_SYN);
    assert_eq!(fx.ingress(&other, 0).mark, SVC | MASQ);

    // A SYN reusing the old tuples is a new connection: marked, translated, tuples dropped.
    let syn = tcp(client(f), CLIENT_PORT, vip(f), VIP_PORT, TCP_SYN);
    assert_eq!(fx.ingress(&syn, 0).mark, SVC | MASQ);
    assert!(!in_switch_flows(&fx, &at_ingress));
    let (_, port) = snat_first(&fx, f, client(f), CLIENT_PORT);
    assert!(in_snat_range(port));
    assert!(!in_switch_flows(&fx, &at_egress));
    assert_counters(
        &fx.stats(),
        &[(Counter::SvcMarked, 3), (Counter::SnatAlloc, 1)],
    );
}
both_families!(switch_window_leaves_old_connections_to_conntrack);

/// Host-originated traffic in the switch window: `xt_svc` (the raw table's `-m bpf` match that
/// makes service traffic untracked) does not match a connection open before the switch, so it
/// stays tracked; its SYN on the same tuple matches and leaves the map.
fn xt_svc_leaves_old_connections_tracked_in_the_switch_window(f: Family, name: &str) {
    let fx = Fixture::new(name);
    add_service(&fx, vip(f), VIP_PORT, L4Proto::Tcp, 0, 1);
    let old = Tuple::new(node(f), 45_000, vip(f), VIP_PORT, L4Proto::Tcp);
    old_connection(&fx, &old);
    let verdict = |packet: &[u8]| fx.run(DatapathProgram::XtSvc, packet, 0).return_value;
    let ack = tcp(node(f), 45_000, vip(f), VIP_PORT, TCP_ACK);
    assert_eq!(verdict(&ack), 1, "outside the window");
    fx.dp.maps().set_switch_window(true).expect("switch window");
    assert_eq!(verdict(&ack), 0, "an old connection stays tracked");
    assert_eq!(
        verdict(&tcp(node(f), 45_001, vip(f), VIP_PORT, TCP_SYN)),
        1,
        "a new one does not"
    );
    assert_eq!(verdict(&tcp(node(f), 45_000, vip(f), VIP_PORT, TCP_SYN)), 1);
    assert!(!in_switch_flows(&fx, &old));
    assert_eq!(verdict(&ack), 1);
}
both_families!(xt_svc_leaves_old_connections_tracked_in_the_switch_window);

/// The rollback drain (docs/switching.md): with `CFG_F_DRAIN`, only a packet whose client ->
/// service tuple is in `switch_flows` (a connection the agent handled before the drain) is marked
/// at ingress; every other connection is left unmarked (to conntrack and kube-proxy's rules), a
/// SYN on an old tuple included (it takes the tuple out of the map). Egress translates a
/// connection that has its SNAT record and makes no new one, whatever the marks say.
fn drain_keeps_the_agents_connections_and_leaves_new_ones_to_conntrack(f: Family, name: &str) {
    let fx = Fixture::new(name);
    add_service(&fx, vip(f), VIP_PORT, L4Proto::Tcp, SVC_F_MASQ, 1);
    // A connection translated before the drain (its record made by its SYN), and one only marked.
    let (_, port) = snat_first(&fx, f, client(f), CLIENT_PORT);
    let translated = Tuple::new(client(f), CLIENT_PORT, vip(f), VIP_PORT, L4Proto::Tcp);
    let marked = Tuple::new(client(f), CLIENT_PORT + 1, vip(f), VIP_PORT, L4Proto::Tcp);
    old_connection(&fx, &translated);
    old_connection(&fx, &marked);
    fx.dp
        .maps()
        .set_switch_flags(CFG_F_DRAIN, 0)
        .expect("drain flag");
    // The agent's configuration writes keep the drain.
    fx.set_config(Config::default());
    let flags = fx.dp.maps().switch_flags().expect("config");
    assert_eq!(flags, CFG_F_DRAIN, "drain kept");

    let ack = |sport| tcp(client(f), sport, vip(f), VIP_PORT, TCP_ACK);
    assert_eq!(fx.ingress(&ack(CLIENT_PORT), 0x1).mark, 0x1 | SVC | MASQ);
    assert_eq!(fx.ingress(&ack(CLIENT_PORT + 1), 0).mark, SVC | MASQ);
    // A new connection, and a packet of one that is not the agent's: unmarked, untouched.
    let syn = tcp(client(f), CLIENT_PORT + 2, vip(f), VIP_PORT, TCP_SYN);
    let out = fx.ingress(&syn, 0x1);
    assert_eq!((out.return_value, out.mark), (TC_ACT_UNSPEC, 0x1));
    assert_eq!(out.packet, syn, "untouched");
    assert_eq!(fx.ingress(&ack(CLIENT_PORT + 2), 0).mark, 0);
    // A SYN reusing an old connection's tuple is a new connection: conntrack's.
    let reuse = tcp(client(f), CLIENT_PORT + 1, vip(f), VIP_PORT, TCP_SYN);
    assert_eq!(fx.ingress(&reuse, 0).mark, 0);
    assert!(!in_switch_flows(&fx, &marked));
    assert!(in_switch_flows(&fx, &translated));

    // Egress: the translated connection keeps its source port ...
    let out = fx.egress(
        &tcp(client(f), CLIENT_PORT, backend(f), BACKEND_PORT, TCP_ACK),
        SVC | MASQ,
    );
    let p = check_frame(&out.packet);
    assert_eq!((p.src, p.sport()), (node(f), port));
    // ... and no connection gets a new record, even one carrying the masquerade mark.
    let forwarded = tcp(
        client(f),
        CLIENT_PORT + 3,
        backend(f),
        BACKEND_PORT,
        TCP_SYN,
    );
    let out = fx.egress(&forwarded, SVC | MASQ);
    assert_eq!(out.return_value, TC_ACT_UNSPEC);
    assert_eq!(out.packet, forwarded, "not translated");
    assert!(fwd(&fx, client(f), CLIENT_PORT + 3, backend(f), BACKEND_PORT).is_none());
    assert_counters(
        &fx.stats(),
        &[
            (Counter::SvcMarked, 2),
            (Counter::SnatAlloc, 1),
            (Counter::FwdHit, 1),
        ],
    );
}
both_families!(drain_keeps_the_agents_connections_and_leaves_new_ones_to_conntrack);

/// Host-originated traffic during the drain: `xt_svc` matches (untracks) only a connection in
/// `switch_flows`; a new one stays tracked, for kube-proxy's rules.
fn xt_svc_matches_only_the_agents_connections_during_the_drain(f: Family, name: &str) {
    let fx = Fixture::new(name);
    add_service(&fx, vip(f), VIP_PORT, L4Proto::Tcp, 0, 1);
    let old = Tuple::new(node(f), 45_000, vip(f), VIP_PORT, L4Proto::Tcp);
    old_connection(&fx, &old);
    fx.dp
        .maps()
        .set_switch_flags(CFG_F_DRAIN, 0)
        .expect("drain flag");
    let verdict = |packet: &[u8]| fx.run(DatapathProgram::XtSvc, packet, 0).return_value;
    assert_eq!(verdict(&tcp(node(f), 45_000, vip(f), VIP_PORT, TCP_ACK)), 1);
    assert_eq!(verdict(&tcp(node(f), 45_001, vip(f), VIP_PORT, TCP_SYN)), 0);
    assert_eq!(verdict(&tcp(node(f), 45_001, vip(f), VIP_PORT, TCP_ACK)), 0);
}
both_families!(xt_svc_matches_only_the_agents_connections_during_the_drain);

/// IPv4 options move the L4 header: the address and port are written separately.
#[test]
fn ipv4_options_packet_translated() {
    let fx = Fixture::new("ipv4_options_packet_translated");
    let f = Family::V4;
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (client(f), backend(f)) else {
        unreachable!()
    };
    let transport = Transport::Udp {
        sport: CLIENT_PORT,
        dport: 53,
    };
    let l4 = l4_segment(client(f), backend(f), &transport, b"query");
    let packet = ethernet(&ipv4_with_options(src, dst, PROTO_UDP, &l4));
    let out = fx.egress(&packet, SVC | MASQ);
    assert_eq!(out.return_value, TC_ACT_UNSPEC);
    let p = check_frame(&out.packet);
    assert_eq!(p.header_len, 24);
    assert_eq!(p.src, node(f));
    let port = p.sport();
    assert!(in_snat_range(port));
    assert_eq!(
        &out.packet[ETH_LEN + 20..ETH_LEN + 24],
        &[1, 1, 1, 0],
        "options kept"
    );
    let (IpAddr::V4(node4), _) = (node(f), ()) else {
        unreachable!()
    };
    let reply_l4 = l4_segment(
        backend(f),
        node(f),
        &Transport::Udp {
            sport: 53,
            dport: port,
        },
        b"answer",
    );
    let reply = ethernet(&ipv4_with_options(dst, node4, PROTO_UDP, &reply_l4));
    let out = fx.ingress(&reply, 0);
    let p = check_frame(&out.packet);
    assert_eq!((p.dst, p.dport()), (client(f), CLIENT_PORT));
    assert_counters(
        &fx.stats(),
        &[(Counter::SnatAlloc, 1), (Counter::RevHit, 1)],
    );
}

/// Writes `config.flags` with `CFG_F_PORT_FILTER` set or cleared as given, bypassing
/// `set_config` (which keeps the map's): an agent's state before it turns the filter on.
fn set_port_filter_flag(fx: &Fixture, on: bool) {
    let maps = fx.dp.maps();
    let mut config = maps.config().expect("config").expect("config entry");
    if on {
        config.flags |= CFG_F_PORT_FILTER;
    } else {
        config.flags &= !CFG_F_PORT_FILTER;
    }
    maps.config.insert(&0, &config).expect("config");
}

fn port_filter(fx: &Fixture) -> &PortFilter {
    fx.dp.maps().port_filter.as_ref().expect("port_filter")
}

/// The port filter (bpf/port_filter.h) holds what the programs and the agent put in it: the
/// allocation puts a translated connection's backend port, `put_service_port` a service port.
/// A connection to a port nobody uses passes both programs untouched, counted nowhere and put
/// nowhere, while the translated connection's replies are still found.
fn the_port_filter_holds_what_the_programs_and_the_agent_put_in_it(f: Family, name: &str) {
    let fx = Fixture::new(name);
    assert!(fx.dp.maps().port_filter_enabled().expect("config"));
    let filter = port_filter(&fx);
    assert!(!filter.contains(PortKind::Backend, BACKEND_PORT));
    let (_, port) = snat_first(&fx, f, client(f), CLIENT_PORT);
    assert!(
        filter.contains(PortKind::Backend, BACKEND_PORT),
        "allocation"
    );
    assert!(
        filter.contains(PortKind::Snat, port),
        "allocation's node port"
    );
    add_service(&fx, vip(f), VIP_PORT, L4Proto::Tcp, 0, 1);
    assert!(
        filter.contains(PortKind::Service, VIP_PORT),
        "put_service_port"
    );

    let before = fx.stats();
    for flags in [TCP_SYN, TCP_ACK] {
        let out_of_pod = tcp(client(f), 45_000, backend(f), 8081, flags);
        let reply = tcp(backend(f), 8081, client(f), 45_000, flags | TCP_ACK);
        for (out, packet) in [
            (fx.ingress(&out_of_pod, 0), &out_of_pod),
            (fx.egress(&out_of_pod, 0), &out_of_pod),
            (fx.ingress(&reply, 0), &reply),
            (fx.egress(&reply, 0), &reply),
        ] {
            assert_eq!(out.return_value, TC_ACT_UNSPEC);
            assert_eq!(&out.packet, packet, "untouched");
            assert_eq!(out.mark, 0, "unmarked");
        }
    }
    assert_eq!(
        fx.stats().delta(&before),
        Stats::default(),
        "counted nowhere"
    );
    for port in [8081, 45_000] {
        for kind in [PortKind::Backend, PortKind::Service, PortKind::Snat] {
            assert!(!filter.contains(kind, port), "{kind:?} {port}");
        }
    }
    let back = fx.ingress(&tcp(backend(f), BACKEND_PORT, node(f), port, TCP_ACK), 0);
    let p = check_frame(&back.packet);
    assert_eq!(
        (p.dst, p.dport()),
        (client(f), CLIENT_PORT),
        "reply translated"
    );
}
both_families!(the_port_filter_holds_what_the_programs_and_the_agent_put_in_it);

/// Turning the filter on fills it from the maps first: a translation, an IPVS connection and a
/// service port that an older agent's programs and agent made without their bits are found
/// after `enable_port_filter`. Without the fill they would not be: a reply whose backend port
/// the filter lacks is not looked up (shown with another connection, as the programs' own
/// verdict then stays cached for its flow).
fn turning_the_port_filter_on_fills_it_from_the_maps(f: Family, name: &str) {
    let fx = Fixture::new(name);
    set_port_filter_flag(&fx, false);
    let maps = fx.dp.maps();
    let entry = |addr: IpAddr, port: u16| SnatEntry {
        addr: addr_to_bytes(addr),
        port: U16::new(port),
        ..SnatEntry::default()
    };
    // What an older agent left: two translations, an IPVS connection, a Service; no bits.
    for (client_port, node_port) in [(CLIENT_PORT, 1234), (CLIENT_PORT + 1, 1235)] {
        maps.snat
            .insert(
                &Tuple::new(
                    client(f),
                    client_port,
                    backend(f),
                    BACKEND_PORT,
                    L4Proto::Tcp,
                ),
                &Tuple::new(backend(f), BACKEND_PORT, node(f), node_port, L4Proto::Tcp),
                &entry(node(f), node_port),
                &entry(client(f), client_port),
            )
            .expect("insert");
    }
    maps.conns
        .insert(
            &Tuple::new(client_b(f), 41_000, backend(f), 9090, L4Proto::Tcp),
            &ConnValue::default(),
        )
        .expect("conns");
    maps.svc_ports
        .insert(
            &SvcKey::new(vip(f), VIP_PORT, L4Proto::Tcp),
            &SvcValue {
                flags: 0,
                svc_id: 1,
            },
        )
        .expect("svc_ports");
    add_service_address(&fx, vip(f));
    let filter = port_filter(&fx);
    for port in [BACKEND_PORT, 9090] {
        assert!(!filter.contains(PortKind::Backend, port));
    }

    // Trusted unfilled, the filter hides the first translation's replies.
    set_port_filter_flag(&fx, true);
    let reply = tcp(backend(f), BACKEND_PORT, node(f), 1234, TCP_ACK);
    assert_eq!(fx.ingress(&reply, 0).packet, reply, "not looked up");
    set_port_filter_flag(&fx, false);

    assert!(maps.enable_port_filter().expect("enable"));
    assert!(maps.port_filter_enabled().expect("config"));
    assert!(
        filter.contains(PortKind::Backend, BACKEND_PORT),
        "the table's"
    );
    assert!(
        filter.contains(PortKind::Snat, 1235),
        "the table's node port"
    );
    assert!(filter.contains(PortKind::Backend, 9090), "conns'");
    assert!(filter.contains(PortKind::Service, VIP_PORT), "svc_ports'");
    let back = fx.ingress(&tcp(backend(f), BACKEND_PORT, node(f), 1235, TCP_ACK), 0);
    let p = check_frame(&back.packet);
    assert_eq!(
        (p.dst, p.dport()),
        (client(f), CLIENT_PORT + 1),
        "translated"
    );
    let out = fx.egress(
        &tcp(
            client(f),
            CLIENT_PORT + 1,
            backend(f),
            BACKEND_PORT,
            TCP_ACK,
        ),
        0,
    );
    assert_eq!(check_frame(&out.packet).src, node(f), "forward translated");
    let marked = fx.ingress(&tcp(backend(f), 9090, client_b(f), 41_000, TCP_ACK), 0);
    assert_eq!(marked.mark & SVC, SVC, "conns' reply marked");
    let svc = fx.ingress(&tcp(client(f), 45_000, vip(f), VIP_PORT, TCP_SYN), 0);
    assert_eq!(svc.mark & SVC, SVC, "service classified");
}
both_families!(turning_the_port_filter_on_fills_it_from_the_maps);

/// A port filter the loader creates (none was pinned: an older agent's pins) is not trusted
/// until it is filled, whatever the pinned configuration says.
#[test]
fn a_new_port_filter_is_not_trusted_until_filled() {
    let fx = Fixture::new("port_filter_new");
    assert!(fx.dp.maps().port_filter_enabled().expect("config"));
    std::fs::remove_file(fx.pins.root.join(map_names::PORT_FILTER)).expect("unpin");
    let again = probes::Datapath::load(fixture_options(fx.pins.root.clone(), test_map_sizes()))
        .expect("load again");
    assert!(!again.maps().port_filter_enabled().expect("config"));
    assert!(again.maps().enable_port_filter().expect("enable"));
    assert!(again.maps().port_filter_enabled().expect("config"));
}

/// Traffic ingress finds none of the agent's gets the reply mark alone (docs/datapath.md, Marks),
/// from the general path and from the flow's cached verdict, and egress passes it at once,
/// untouched and counted nowhere; service traffic does not get it. A hairpin carrying it (another
/// NAT than IPVS sent the packet back to its own source) is still source-NATed by egress.
fn traffic_none_of_the_agents_gets_the_reply_mark_alone(f: Family, name: &str) {
    let fx = Fixture::new(name);
    let reply = probes::maps::DEFAULT_MARK_REPLY;
    fx.set_config(Config {
        flags: reply_mark_flags(reply),
        ..Config::default()
    });
    add_service(&fx, vip(f), VIP_PORT, L4Proto::Tcp, 0, 1);
    let before = fx.stats();
    for flags in [TCP_SYN, TCP_ACK, TCP_ACK] {
        let packet = tcp(client(f), 45_000, backend(f), 8081, flags);
        let ingress = fx.ingress(&packet, 0);
        assert_eq!(ingress.packet, packet);
        assert_eq!(ingress.mark, reply, "the reply mark alone ({flags:#x})");
        let egress = fx.egress(&packet, ingress.mark);
        assert_eq!(egress.return_value, TC_ACT_UNSPEC);
        assert_eq!(egress.packet, packet, "passed untouched");
    }
    assert_eq!(
        fx.stats().delta(&before),
        Stats::default(),
        "counted nowhere"
    );

    let to_service = fx.ingress(&tcp(client(f), 45_001, vip(f), VIP_PORT, TCP_SYN), 0);
    assert_eq!(
        to_service.mark, SVC,
        "service traffic: the service mark only"
    );

    let hairpin = tcp(client(f), 45_002, client(f), BACKEND_PORT, TCP_SYN);
    let out = fx.egress(&hairpin, reply);
    assert_eq!(out.return_value, TC_ACT_UNSPEC);
    assert_eq!(
        check_frame(&out.packet).src,
        node(f),
        "the hairpin source-NATed"
    );
}
both_families!(traffic_none_of_the_agents_gets_the_reply_mark_alone);
