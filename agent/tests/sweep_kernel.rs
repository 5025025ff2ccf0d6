//! Host-kernel test of the sweeper (`agent::datapath::sweep`) on a real loaded datapath: SNAT
//! records created by the programs (BPF_PROG_TEST_RUN), resolved by them, are expired with the
//! IPVS-like timeouts and freed one pass after they are removed; one an older program left
//! unresolved is resolved against `conns` (service id, flags, the `probe_hit`/`probe_miss`
//! counters); `conns` entries older than IPVS's timeout stay while a record translates their
//! connection and go with it (at the next full read of `conns` when a pass without it expired
//! the record), untranslated ones go unless IPVS still holds their connection (a long-lived
//! one); a connection reopened while a pass runs is not removed on the pass's older copy; a
//! dropped packet is logged with its connection from `drop_last`. Needs root and bpffs (mounted
//! when missing); says so and passes without them.

mod common;

use common::{can_load_datapath, load_with_one_service, small_map_sizes, test_pins};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use agent::datapath::sweep::{
    CONNS_FULL_READ_PASSES, CONNS_FULL_READ_PASSES_AFTER_FREE, ConnsRead, ConnsRemoval,
    ExpiredRecords, Timeouts, monotonic_ns, sweep, sweep_pass, sweep_records, sweep_with_ipvs,
};
use probes::maps::{
    ConnValue, Counter, L4Proto, SNAT_F_MASQ, SNAT_F_PORT_KEPT, SNAT_F_PROBE_HIT, SNAT_F_RESOLVED,
    SnatEntry, Tuple, addr_to_bytes,
};
use probes::{DatapathProgram, Index, MapSizes, SkbContext};
use zerocopy::byteorder::network_endian::U16;

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 20);
const SEEN: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const UNSEEN: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);

/// An Ethernet/IPv4/TCP SYN (checksums are not looked at on the allocation path).
fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    tcp(src, sport, dst, dport, 0x02)
}

/// An Ethernet/IPv4/TCP segment with these flags (0x02 SYN, 0x04 RST, 0x10 ACK).
fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    frame.extend([0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0]);
    frame.extend(src.octets());
    frame.extend(dst.octets());
    frame.extend(sport.to_be_bytes());
    frame.extend(dport.to_be_bytes());
    frame.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
    frame
}

/// The `conns` entry the IPVS probe writes for a connection through VIP:80, made at `created_ns`.
fn probe_saw(maps: &probes::DatapathMaps, key: &Tuple, created_ns: u64) {
    maps.conns
        .insert(
            key,
            &ConnValue {
                vaddr: addr_to_bytes(IpAddr::V4(VIP)),
                vport: U16::new(80),
                created_ns,
                ..ConnValue::default()
            },
        )
        .expect("conns");
}

/// The connection `src:sport` -> BACKEND:8080 over TCP, as it leaves (the `conns` key).
fn to_backend(src: Ipv4Addr, sport: u16) -> Tuple {
    Tuple::new(
        IpAddr::V4(src),
        sport,
        IpAddr::V4(BACKEND),
        8080,
        L4Proto::Tcp,
    )
}

/// A packet IPVS forwarded to a backend, marked for masquerade, leaving device 1.
fn masqueraded() -> SkbContext {
    SkbContext {
        mark: probes::maps::DEFAULT_MARK_SVC | probes::maps::DEFAULT_MARK_MASQ,
        ifindex: 1,
        ingress_ifindex: 0,
    }
}

/// The first packet of `src:sport` -> BACKEND:8080 through TC egress, translated to NODE (its
/// SNAT record made).
fn first_packet(dp: &probes::Datapath, src: Ipv4Addr, sport: u16) {
    let out = dp
        .test_run(
            DatapathProgram::TcEgress,
            &syn(src, sport, BACKEND, 8080),
            &masqueraded(),
        )
        .expect("first packet");
    assert_eq!(&out.packet[26..30], &NODE.octets(), "translated");
}

/// IPVS's established TCP timeout at 20 s, and a time (CLOCK_MONOTONIC ns) longer ago than it:
/// one this machine's monotonic clock has seen (a CI machine may run this minutes after
/// booting).
fn short_tcp_timeout() -> (Timeouts, u64) {
    let t = Timeouts {
        tcp: Duration::from_secs(20),
        ..Timeouts::default()
    };
    let long_ago = monotonic_ns().saturating_sub(Duration::from_secs(40).as_nanos() as u64);
    (t, long_ago)
}

/// A first full read of `conns` (nothing expired before it) with IPVS's table as `ipvs_held`
/// reads it.
fn full_read_with_ipvs(
    maps: &probes::DatapathMaps,
    now: u64,
    t: &Timeouts,
    ipvs_held: impl FnOnce() -> Option<std::collections::HashSet<Tuple>>,
) -> agent::datapath::sweep::SweepReport {
    let records = maps.snat.records();
    sweep_with_ipvs(
        maps,
        records,
        now,
        t,
        &mut ExpiredRecords::default(),
        ipvs_held,
    )
    .expect("sweep")
}

/// A record an older program made without resolving its service (TC egress now does it when it
/// allocates): a pass resolves it from `conns` and `svc_ports`, and counts it.
#[test]
fn a_record_an_older_program_left_unresolved_is_resolved_by_a_pass() {
    if !can_load_datapath() {
        return;
    }
    let pins = test_pins("sweep-resolve");
    let dp = load_with_one_service(&pins, small_map_sizes(), NODE, VIP);
    let maps = dp.maps();
    let now = monotonic_ns();
    let seen = to_backend(SEEN, 5000);
    probe_saw(maps, &seen, now);
    let rev_key = Tuple::new(
        IpAddr::V4(BACKEND),
        8080,
        IpAddr::V4(NODE),
        5000,
        L4Proto::Tcp,
    );
    let entry = |addr: Ipv4Addr| SnatEntry {
        addr: addr_to_bytes(IpAddr::V4(addr)),
        port: U16::new(5000),
        flags: SNAT_F_MASQ | SNAT_F_PORT_KEPT,
        created_ns: now,
        last_seen_ns: now,
        ..SnatEntry::default()
    };
    maps.snat
        .insert(&seen, &rev_key, &entry(NODE), &entry(SEEN))
        .expect("record");
    let report = sweep(maps, monotonic_ns(), &Timeouts::default()).expect("sweep");
    assert_eq!((report.probe_hits, report.probe_misses), (1, 0));
    let (_, record) = maps.snat.find(Index::Fwd, &seen).expect("seen");
    assert_eq!((record.fwd.svc_id, record.rev.svc_id), (7, 7));
    let resolved = SNAT_F_MASQ | SNAT_F_PORT_KEPT | SNAT_F_RESOLVED | SNAT_F_PROBE_HIT;
    assert_eq!((record.fwd.flags, record.rev.flags), (resolved, resolved));
    assert_eq!(maps.stats().expect("stats").get(Counter::ProbeHit), 1);
    // Resolved once.
    let report = sweep(maps, monotonic_ns(), &Timeouts::default()).expect("sweep");
    assert_eq!((report.probe_hits, report.probe_misses), (0, 0));
}

/// TC egress resolved both records when it made them (the probe saw one connection); passes
/// expire them, free them a pass later, and remove the `conns` entry that goes with a record.
#[test]
fn sweeps_expire_records_then_free_them_and_their_conns_entries_go_with_them() {
    if !can_load_datapath() {
        return;
    }
    let pins = test_pins("sweep");
    let dp = load_with_one_service(&pins, small_map_sizes(), NODE, VIP);
    let maps = dp.maps();
    let (t, long_ago) = short_tcp_timeout();
    // The IPVS probe saw SEEN's connection (SEEN:5000 -> BACKEND:8080 through VIP:80), longer
    // ago than IPVS's TCP timeout, and an untranslated one as long ago.
    let (seen, unseen) = (to_backend(SEEN, 5000), to_backend(UNSEEN, 5001));
    let untranslated = to_backend(UNSEEN, 6000);
    for key in [seen, untranslated] {
        probe_saw(maps, &key, long_ago);
    }
    for (src, sport) in [(SEEN, 5000), (UNSEEN, 5001)] {
        first_packet(&dp, src, sport);
    }
    let now = monotonic_ns();

    // First pass: nothing left to resolve, no record expired; the untranslated connection's
    // entry is past IPVS's timeout, SEEN's stays with its record.
    let report = sweep(maps, now, &t).expect("sweep");
    assert_eq!(
        (report.probe_hits, report.probe_misses, report.snat_live),
        (0, 0, 2)
    );
    assert_eq!((report.conns_expired, report.conns_live), (1, Some(1)));
    assert!(maps.conns.get(&seen).expect("conns").is_some());
    assert!(maps.conns.get(&untranslated).expect("conns").is_none());
    let (_, record) = maps.snat.find(Index::Fwd, &seen).expect("seen");
    assert_eq!(record.fwd.svc_id, 7);
    assert_eq!(
        record.fwd.flags,
        SNAT_F_MASQ | SNAT_F_PORT_KEPT | SNAT_F_RESOLVED | SNAT_F_PROBE_HIT
    );
    assert_eq!(record.rev.svc_id, 7);
    let (_, record) = maps.snat.find(Index::Fwd, &unseen).expect("unseen");
    assert_eq!(
        (record.fwd.svc_id, record.fwd.flags),
        (0, SNAT_F_MASQ | SNAT_F_PORT_KEPT | SNAT_F_RESOLVED)
    );
    let stats = maps.stats().expect("stats");
    assert_eq!(
        (stats.get(Counter::ProbeHit), stats.get(Counter::ProbeMiss)),
        (1, 1)
    );

    // Past the SYN-only timeout: both removed from the indexes, dead until the next pass.
    let later = now + (t.tcp_syn + Duration::from_secs(1)).as_nanos() as u64;
    let report = sweep(maps, later, &t).expect("sweep");
    assert_eq!((report.snat_expired, report.snat_live), (2, 0));
    assert_eq!(report.conns_expired, 1, "SEEN's entry goes with its record");
    assert!(maps.conns.get(&seen).expect("conns").is_none());
    assert_eq!(maps.snat.index_len(Index::Fwd), 0);
    assert_eq!(maps.snat.index_len(Index::Rev), 0);
    assert_eq!(maps.snat.occupancy().2, 2, "two dead records");
    let report = sweep(maps, later, &t).expect("sweep");
    assert_eq!(report.snat_reclaimed, 2);
    let (used, busy, dead, _) = maps.snat.occupancy();
    assert_eq!((used, busy, dead), (0, 0, 0));
}

/// A pass that does not read `conns` in full (five in six, `ConnsRead::OfExpiredRecords`) makes
/// no system call for the records it expires: their forward tuples wait for the next full read
/// (`ExpiredRecords`), which removes their entries, in one batch with an untranslated
/// connection's past its timeout, and keeps an entry the probe rewrote after the record's last
/// packet (a new IPVS connection on the same tuple).
#[test]
fn a_pass_without_the_full_conns_read_leaves_the_entries_of_what_it_expires_to_the_next() {
    if !can_load_datapath() {
        return;
    }
    let pins = test_pins("sweep-partial");
    let dp = load_with_one_service(&pins, small_map_sizes(), NODE, VIP);
    let maps = dp.maps();
    let (t, long_ago) = short_tcp_timeout();
    let (closed, reused, untranslated) = (
        to_backend(SEEN, 5000),
        to_backend(SEEN, 5001),
        to_backend(UNSEEN, 6000),
    );
    for key in [closed, reused, untranslated] {
        probe_saw(maps, &key, long_ago);
    }
    first_packet(&dp, SEEN, 5000);
    first_packet(&dp, SEEN, 5001);
    let now = monotonic_ns();
    let later = now + (t.tcp_syn + Duration::from_secs(1)).as_nanos() as u64;
    assert_eq!(
        ConnsRemoval::BySweeper.read_of_pass(1),
        ConnsRead::OfExpiredRecords
    );
    let mut expired = ExpiredRecords::default();
    let report =
        sweep_pass(maps, later, &t, ConnsRead::OfExpiredRecords, &mut expired).expect("sweep");
    assert_eq!((report.snat_expired, report.snat_live), (2, 0));
    assert_eq!((report.conns_expired, report.conns_live), (0, None));
    assert_eq!(expired.len(), 2);
    assert!(expired.contains(&closed) && expired.contains(&reused));
    for key in [closed, reused, untranslated] {
        assert!(maps.conns.get(&key).expect("conns").is_some(), "{key:?}");
    }
    // IPVS makes a new connection on `reused`'s tuple after its record's last packet, before
    // the next full read (younger than any timeout then).
    probe_saw(
        maps,
        &reused,
        later - Duration::from_secs(5).as_nanos() as u64,
    );
    assert_eq!(
        ConnsRemoval::BySweeper.read_of_pass(CONNS_FULL_READ_PASSES),
        ConnsRead::Full
    );
    let report = sweep_with_ipvs(maps, maps.snat.records(), later, &t, &mut expired, || None)
        .expect("sweep");
    assert_eq!((report.conns_expired, report.conns_live), (2, Some(1)));
    assert!(maps.conns.get(&closed).expect("conns").is_none());
    assert!(maps.conns.get(&untranslated).expect("conns").is_none());
    assert!(
        maps.conns.get(&reused).expect("conns").is_some(),
        "the new connection's entry stays"
    );
    assert!(expired.is_empty(), "the full read took them");
}

/// With the probe on IPVS freeing a connection attached (`ConnsRemoval::AtIpvsFree`), that probe
/// removes a connection's `conns` entry: a pass keeps none of the records it expires for a
/// full read, and leaves their entries; the full reads come every 15 minutes, and still remove
/// an untranslated connection's entry past IPVS's timeout that IPVS no longer holds (an entry
/// no probe removed: an older probe's, or one whose connection was freed while none was
/// attached).
#[test]
fn with_the_probe_on_ipvs_frees_a_pass_keeps_no_expired_records_and_full_reads_are_rare() {
    if !can_load_datapath() {
        return;
    }
    let pins = test_pins("sweep-at-free");
    let dp = load_with_one_service(&pins, small_map_sizes(), NODE, VIP);
    let maps = dp.maps();
    let (t, long_ago) = short_tcp_timeout();
    // A record of a SYN alone expires after the shortest idle timeout (5 s here), a `conns`
    // entry after IPVS's established one (20 s).
    let t = Timeouts {
        tcp_syn: Duration::from_secs(1),
        ..t
    };
    let now = monotonic_ns();
    let (closed, untranslated) = (to_backend(SEEN, 5100), to_backend(UNSEEN, 6100));
    probe_saw(maps, &closed, now);
    probe_saw(maps, &untranslated, long_ago);
    first_packet(&dp, SEEN, 5100);
    let later = now + Duration::from_secs(6).as_nanos() as u64;
    let removal = ConnsRemoval::AtIpvsFree;
    assert_eq!(
        removal.full_read_passes(),
        CONNS_FULL_READ_PASSES_AFTER_FREE
    );
    assert_eq!(removal.read_of_pass(0), ConnsRead::Full);
    for pass in 1..CONNS_FULL_READ_PASSES_AFTER_FREE {
        assert_eq!(
            removal.read_of_pass(pass),
            ConnsRead::OfExpiredRecords,
            "{pass}"
        );
    }
    assert_eq!(
        removal.read_of_pass(CONNS_FULL_READ_PASSES_AFTER_FREE),
        ConnsRead::Full
    );
    let mut expired = ExpiredRecords::for_removal(removal);
    let report =
        sweep_pass(maps, later, &t, ConnsRead::OfExpiredRecords, &mut expired).expect("sweep");
    assert_eq!((report.snat_expired, report.snat_live), (1, 0));
    assert!(expired.is_empty(), "nothing kept for a full read");
    let report = sweep_with_ipvs(maps, maps.snat.records(), later, &t, &mut expired, || {
        Some(Default::default())
    })
    .expect("sweep");
    // The untranslated entry is past IPVS's timeout and not in its table: removed. The closed
    // connection's entry is younger than that timeout and its record gone: left to the probe.
    assert_eq!((report.conns_expired, report.conns_live), (1, Some(1)));
    assert!(maps.conns.get(&untranslated).expect("conns").is_none());
    assert!(maps.conns.get(&closed).expect("conns").is_some());
}

/// An untranslated connection (pod to ClusterIP) past IPVS's established timeout from its
/// creation keeps its `conns` entry while IPVS still holds it (a long-lived connection: its
/// replies must stay marked), and loses it once IPVS does not; IPVS's table is read once per
/// pass, and only when such an entry is up for expiry.
#[test]
fn an_untranslated_connection_ipvs_still_holds_keeps_its_conns_entry() {
    if !can_load_datapath() {
        return;
    }
    let pins = test_pins("sweep-held");
    let dp = load_with_one_service(&pins, small_map_sizes(), NODE, VIP);
    let maps = dp.maps();
    let t = Timeouts::default();
    // No SNAT record here: the sweep's clock can run 1,000 s ahead of this machine's monotonic
    // clock (which may have run for less than that).
    let long_ago = monotonic_ns();
    let now = long_ago + Duration::from_secs(1000).as_nanos() as u64;
    let conn = |sport| to_backend(SEEN, sport);
    let (long_lived, ended, young) = (conn(7000), conn(7001), conn(7002));
    for (key, created_ns) in [(long_lived, long_ago), (ended, long_ago), (young, now)] {
        probe_saw(maps, &key, created_ns);
    }
    let mut reads = 0;
    let report = full_read_with_ipvs(maps, now, &t, || {
        reads += 1;
        Some([long_lived, young].into_iter().collect())
    });
    assert_eq!(reads, 1, "IPVS's table read once");
    assert_eq!(
        (
            report.conns_expired,
            report.conns_held_by_ipvs,
            report.conns_live
        ),
        (1, 1, Some(2))
    );
    assert!(maps.conns.get(&long_lived).expect("conns").is_some());
    assert!(maps.conns.get(&ended).expect("conns").is_none());
    // IPVS no longer holds it: the entry goes.
    let report = full_read_with_ipvs(maps, now, &t, || Some(std::collections::HashSet::new()));
    assert_eq!((report.conns_expired, report.conns_live), (1, Some(1)));
    assert!(maps.conns.get(&long_lived).expect("conns").is_none());
    // Nothing up for expiry: IPVS's table is not read.
    let report = full_read_with_ipvs(maps, now, &t, || {
        panic!("IPVS's table read with no entry up for expiry")
    });
    assert_eq!(report.conns_live, Some(1));
}

/// A client that reuses its port for a new connection while a sweep pass runs: the pass started
/// from a copy of the records in which the old connection was reset (RST: 10 s), the new SYN
/// reopened the record since (record_reopen: a SYN-only connection, 60 s). Eleven seconds on,
/// the pass must keep the record it would have removed on its copy, or the new connection's
/// next packet gets another node port and the backend answers it with a reset.
#[test]
fn a_connection_reopened_during_a_sweep_pass_keeps_its_record() {
    if !can_load_datapath() {
        return;
    }
    let pins = test_pins("sweep-reopen");
    let dp = load_with_one_service(&pins, small_map_sizes(), NODE, VIP);
    let maps = dp.maps();
    let context = masqueraded();
    let client = to_backend(SEEN, 5000);
    let send = |flags: u8| {
        dp.test_run(
            DatapathProgram::TcEgress,
            &tcp(SEEN, 5000, BACKEND, 8080, flags),
            &context,
        )
        .expect("test run")
    };
    send(0x02);
    send(0x14);
    let (rec, reset) = maps.snat.find(Index::Fwd, &client).expect("record");
    assert_ne!(
        reset.state_bits() & probes::maps::STATE_RST,
        0,
        "RST recorded"
    );
    // The pass's copy, then the client's new SYN on the same tuples.
    let copy = maps.snat.records();
    send(0x02);
    let (again, reopened) = maps.snat.find(Index::Fwd, &client).expect("record");
    assert_eq!(again, rec, "the SYN reopened the same record");
    assert_eq!(
        reopened.state_bits() & probes::maps::STATE_RST,
        0,
        "reopened"
    );

    let t = Timeouts::default();
    let later = monotonic_ns() + (t.tcp_rst + Duration::from_secs(1)).as_nanos() as u64;
    let report = sweep_records(maps, copy, later, &t).expect("sweep");
    assert_eq!((report.snat_expired, report.snat_live), (0, 1));
    assert_eq!(
        maps.snat.find(Index::Fwd, &client).map(|(r, _)| r),
        Some(rec),
        "the new connection keeps its record"
    );
    // Without the reopening, the same pass removes it.
    send(0x14);
    let report = sweep(maps, later, &t).expect("sweep");
    assert_eq!(report.snat_expired, 1);
    assert!(maps.snat.find(Index::Fwd, &client).is_none());
}

/// A packet the programs drop is logged by the sweeper's drop log with its connection, read
/// from the kernel's `drop_last` (here: another port on a service address, at ingress).
#[test]
fn a_dropped_packet_is_logged_with_its_connection() {
    use agent::datapath::sweep::DropLog;
    use std::time::Instant;
    if !can_load_datapath() {
        return;
    }
    let pins = test_pins("droplog");
    let dp = load_with_one_service(&pins, MapSizes::default(), NODE, VIP);
    let maps = dp.maps();
    maps.svc_addrs
        .insert(
            &probes::maps::AddrKey::new(IpAddr::V4(VIP)),
            &probes::maps::AddrValue {
                flags: probes::maps::ADDR_F_SERVICE,
                pad: 0,
            },
        )
        .expect("svc_addrs");
    let snapshot = || {
        let counters: Vec<(&'static str, u64)> = maps
            .stats()
            .expect("stats")
            .iter()
            .map(|(c, v)| (c.name(), v))
            .collect();
        let last: Vec<_> = maps
            .last_drops()
            .expect("drop_last")
            .into_iter()
            .map(|(c, e)| (c.name(), e))
            .collect();
        (counters, last)
    };
    let mut log = DropLog::default();
    let (counters, last) = snapshot();
    assert!(log.observe(&counters, &last, Instant::now()).is_empty());
    let context = SkbContext {
        mark: 0,
        ifindex: 1,
        ingress_ifindex: 1,
    };
    let out = dp
        .test_run(
            DatapathProgram::TcIngress,
            &syn(SEEN, 4242, VIP, 22),
            &context,
        )
        .expect("ingress");
    assert_eq!(out.return_value, 2, "TC_ACT_SHOT");
    let (counters, last) = snapshot();
    let logged = log.observe(&counters, &last, Instant::now());
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0].reason, "filtered_port");
    assert_eq!(logged[0].dropped, 1);
    assert_eq!(
        logged[0].last.map(|t| t.to_string()).as_deref(),
        Some("tcp 10.244.1.10:4242 -> 10.96.0.10:22")
    );
}
