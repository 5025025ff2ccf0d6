//! Host-kernel tests of the SNAT table (bpf/table.h) between the programs and the agent's view of
//! it (probes::nat_table): the same hashing on both sides, a full bucket spilling into the next
//! ones (also past a bucket whose lock stays taken), a busy lock's drop and its counter, a
//! connection reopened on the same tuples after a close, removal and the grace period before a
//! record is reused, and the device slots in front of `devices`. Packets go through the programs with BPF_PROG_TEST_RUN; table contents are read
//! from the maps' memory. Needs root and bpffs.

mod common;

use std::net::IpAddr;
use std::sync::atomic::Ordering;

use common::*;
use probes::maps::{
    Counter, DEFAULT_MARK_MASQ, DEFAULT_MARK_SVC, DevSlot, DevValue, L4Proto, NAT_WAYS, REC_DEAD,
    REC_FREE, REC_USED, SnatEntry, Tuple, addr_to_bytes,
};
use probes::{DatapathProgram, Index};
use zerocopy::byteorder::network_endian::U16;

const SVC: u32 = DEFAULT_MARK_SVC;
const MASQ: u32 = DEFAULT_MARK_MASQ;
const BACKEND_PORT: u16 = 8080;

fn entry(addr: IpAddr, port: u16) -> SnatEntry {
    SnatEntry {
        addr: addr_to_bytes(addr),
        port: U16::new(port),
        ..SnatEntry::default()
    }
}

/// A connection inserted by the agent's side of the table is translated by the programs in both
/// directions: the forward and reply tuples hash to the same buckets and tags on both sides.
fn programs_translate_what_the_agent_inserts(f: Family) {
    let fx = Fixture::new(&format!("table_agent_insert_{f:?}"));
    let table = &fx.dp.maps().snat;
    let fwd_key = Tuple::new(client(f), 40_000, backend(f), BACKEND_PORT, L4Proto::Tcp);
    let rev_key = Tuple::new(backend(f), BACKEND_PORT, node(f), 1234, L4Proto::Tcp);
    let rec = fx
        .dp
        .maps()
        .insert_translation(
            &fwd_key,
            &rev_key,
            &entry(node(f), 1234),
            &entry(client(f), 40_000),
        )
        .expect("insert");
    assert_eq!(table.find(Index::Fwd, &fwd_key).map(|(r, _)| r), Some(rec));
    assert_eq!(table.find(Index::Rev, &rev_key).map(|(r, _)| r), Some(rec));

    let out = fx.egress(
        &tcp(client(f), 40_000, backend(f), BACKEND_PORT, TCP_ACK),
        0,
    );
    let p = check_frame(&out.packet);
    assert_eq!((p.src, p.sport()), (node(f), 1234));
    let back = fx.ingress(&tcp(backend(f), BACKEND_PORT, node(f), 1234, TCP_ACK), 0);
    let p = check_frame(&back.packet);
    assert_eq!((p.dst, p.dport()), (client(f), 40_000));
    assert_eq!(back.mark, SVC);
}

/// Runs `$name(Family)` as `$name::v4` and `$name::v6`.
macro_rules! per_family {
    ($name:ident) => {
        mod $name {
            #[test]
            fn v4() {
                super::$name(super::Family::V4);
            }
            #[test]
            fn v6() {
                super::$name(super::Family::V6);
            }
        }
    };
}

per_family!(programs_translate_what_the_agent_inserts);

/// Client ports whose forward tuples (client:port -> backend) all have the home bucket of the
/// first one, computed with the table's hashing and the fixture's seed.
fn ports_sharing_a_home(fx: &Fixture, f: Family, count: usize) -> (u32, Vec<u16>) {
    let table = &fx.dp.maps().snat;
    let home = |port: u16| {
        table
            .pos_fwd(&Tuple::new(
                client(f),
                port,
                backend(f),
                BACKEND_PORT,
                L4Proto::Tcp,
            ))
            .home
    };
    // Ports outside the local range: kept, so every reply tuple differs.
    let wanted = home(5000);
    let ports: Vec<u16> = (5000..30_000)
        .filter(|&p| home(p) == wanted)
        .take(count)
        .collect();
    assert_eq!(ports.len(), count, "enough ports share bucket {wanted}");
    (wanted, ports)
}

/// More connections than a bucket has ways, all homed in one bucket: the extra ones go to the
/// next bucket, which the home bucket's overflow flag sends lookups on to; every connection is
/// then found and translated (by the programs, with a FIN so the table is read rather than the
/// flow cache).
fn full_bucket_spills_into_the_next(f: Family) {
    let fx = Fixture::new(&format!("table_overflow_{f:?}"));
    let (home, ports) = ports_sharing_a_home(&fx, f, NAT_WAYS + 2);
    for &port in &ports {
        let out = fx.egress(
            &tcp(client(f), port, backend(f), BACKEND_PORT, TCP_SYN),
            SVC | MASQ,
        );
        let p = check_frame(&out.packet);
        assert_eq!((p.src, p.sport()), (node(f), port), "client port kept");
    }
    let table = &fx.dp.maps().snat;
    let bucket = table.bucket_copy(Index::Fwd, home).expect("home bucket");
    assert_eq!(bucket.overflow, 1, "the home bucket is marked overflowed");
    assert!(
        bucket.tag.iter().all(|&t| t & probes::maps::TAG_VALID != 0),
        "its ways are all taken"
    );
    assert_eq!(table.index_len(Index::Fwd), ports.len());
    for &port in &ports {
        let key = Tuple::new(client(f), port, backend(f), BACKEND_PORT, L4Proto::Tcp);
        assert!(table.lookup_fwd(&key).is_some(), "agent finds port {port}");
        let out = fx.egress(
            &tcp(client(f), port, backend(f), BACKEND_PORT, TCP_ACK | TCP_FIN),
            0,
        );
        let p = check_frame(&out.packet);
        assert_eq!(
            (p.src, p.sport()),
            (node(f), port),
            "program finds port {port}"
        );
    }
}

per_family!(full_bucket_spills_into_the_next);

/// A removed record is no longer found by the programs; it stays dead (not reusable) until the
/// next pass frees it.
#[test]
fn removed_record_is_not_translated_and_freed_one_pass_later() {
    let f = Family::V4;
    let fx = Fixture::new("table_remove");
    let out = fx.egress(
        &tcp(client(f), 5000, backend(f), BACKEND_PORT, TCP_SYN),
        SVC | MASQ,
    );
    assert_eq!(check_frame(&out.packet).src, node(f));
    let table = &fx.dp.maps().snat;
    let key = Tuple::new(client(f), 5000, backend(f), BACKEND_PORT, L4Proto::Tcp);
    let (rec, record) = table.find(Index::Fwd, &key).expect("record");
    assert_eq!(record.state, REC_USED);
    assert!(table.unindex(rec));
    assert!(!table.unindex(rec), "only once");
    assert_eq!(table.record(rec).expect("record").state, REC_DEAD);
    assert_eq!(table.index_len(Index::Fwd), 0);
    assert_eq!(table.index_len(Index::Rev), 0);
    // A FIN is not taken from the flow cache: the table says nothing, and without a mark the
    // packet needs no SNAT.
    let fin = tcp(client(f), 5000, backend(f), BACKEND_PORT, TCP_ACK | TCP_FIN);
    assert_eq!(fx.egress(&fin, 0).packet, fin, "untranslated");
    assert_eq!(table.reclaim(), 1);
    assert_eq!(table.record(rec).expect("record").state, REC_FREE);
    assert_eq!(table.reclaim(), 0);
}

/// A device whose slot another present device holds is read from `devices`; when the holder
/// goes, the slot passes to it.
#[test]
fn device_slot_taken_falls_back_to_devices() {
    let f = Family::V4;
    let fx = Fixture::new("table_device_slots");
    let maps = fx.dp.maps();
    let other = LOOPBACK_IFINDEX + probes::maps::DEVICE_SLOTS;
    let elsewhere: IpAddr = "198.51.100.1".parse().expect("ip");
    let node4 = match node(f) {
        IpAddr::V4(a) => a,
        IpAddr::V6(_) => unreachable!(),
    };
    maps.remove_device(LOOPBACK_IFINDEX).expect("remove");
    let holder = match elsewhere {
        IpAddr::V4(a) => DevValue::new(Some(a), None),
        IpAddr::V6(_) => unreachable!(),
    };
    maps.set_device(other, &holder).expect("holder");
    maps.set_device(LOOPBACK_IFINDEX, &DevValue::new(Some(node4), None))
        .expect("loopback");
    let slot = maps
        .device_slots
        .get(&LOOPBACK_IFINDEX)
        .expect("slot")
        .expect("slot");
    assert_eq!(slot.ifindex, other, "the first device keeps the slot");

    let out = fx.egress(
        &tcp(client(f), 5000, backend(f), BACKEND_PORT, TCP_SYN),
        SVC | MASQ,
    );
    assert_eq!(
        check_frame(&out.packet).src,
        node(f),
        "address from devices"
    );

    maps.remove_device(other).expect("remove holder");
    let slot = maps
        .device_slots
        .get(&LOOPBACK_IFINDEX)
        .expect("slot")
        .expect("slot");
    assert_eq!(
        slot,
        DevSlot {
            ifindex: LOOPBACK_IFINDEX,
            pad: 0,
            value: DevValue::new(Some(node4), None),
        }
    );
    let out = fx.egress(
        &tcp(client_b(f), 5001, backend(f), BACKEND_PORT, TCP_SYN),
        SVC | MASQ,
    );
    assert_eq!(
        check_frame(&out.packet).src,
        node(f),
        "address from the slot"
    );
}

/// The programs' allocation state survives in the table only: a record written by a first
/// packet carries both tuples and both entries, consistent with each other.
#[test]
fn first_packet_writes_a_consistent_record() {
    let f = Family::V6;
    let fx = Fixture::new("table_record");
    let out = fx.run(
        DatapathProgram::TcEgress,
        &tcp(client(f), 40_000, backend(f), BACKEND_PORT, TCP_SYN),
        SVC | MASQ,
    );
    let port = check_frame(&out.packet).sport();
    let table = &fx.dp.maps().snat;
    let records = table.records();
    assert_eq!(records.len(), 1);
    let (_, r) = records[0];
    assert_eq!(
        r.fwd_key,
        Tuple::new(client(f), 40_000, backend(f), BACKEND_PORT, L4Proto::Tcp)
    );
    assert_eq!(
        r.rev_key,
        Tuple::new(backend(f), BACKEND_PORT, node(f), port, L4Proto::Tcp)
    );
    assert_eq!((r.fwd.address(), r.fwd.port.get()), (node(f), port));
    assert_eq!((r.rev.address(), r.rev.port.get()), (client(f), 40_000));
    assert_eq!(r.fwd.created_ns, r.rev.created_ns);
}

/// A sweep pass decides on six words of each live record (`RecordSummary`, read in place): they
/// read as the record's copy does, whatever its state (a reset, a FIN, an IPv6 tuple); the walk
/// frees dead records, counts the live ones and copies only those it picks.
#[test]
fn a_pass_summarizes_each_live_record_as_its_copy_and_copies_only_what_it_picks() {
    use probes::maps::{SNAT_F_RESOLVED, STATE_FIN, STATE_RST};
    use probes::nat_protocol::{RecordSummary, TableMemory};
    let fx = Fixture::new("table_summary");
    let conns = [
        (Family::V4, 41_000),
        (Family::V6, 41_001),
        (Family::V4, 41_002),
        (Family::V6, 41_003),
    ];
    for (f, port) in conns {
        fx.egress(
            &tcp(client(f), port, backend(f), BACKEND_PORT, TCP_SYN),
            SVC | MASQ,
        );
    }
    let [(f_rst, rst), (f_fin, fin), (f_dead, dead), _] = conns;
    fx.egress(
        &tcp(client(f_rst), rst, backend(f_rst), BACKEND_PORT, TCP_RST),
        SVC | MASQ,
    );
    fx.egress(
        &tcp(
            client(f_fin),
            fin,
            backend(f_fin),
            BACKEND_PORT,
            TCP_ACK | TCP_FIN,
        ),
        SVC | MASQ,
    );
    let table = &fx.dp.maps().snat;
    let records = table.records();
    assert_eq!(records.len(), 4);
    for (rec, r) in &records {
        let summary = table.record_summary(*rec).expect("summary");
        assert_eq!(summary, RecordSummary::of(r), "record {rec}: {r:?}");
        assert_ne!(summary.fwd_flags & SNAT_F_RESOLVED, 0);
    }
    let state_of = |f: Family, port: u16| {
        let (rec, _) = table.find(Index::Fwd, &fwd_tuple(f, port)).expect("record");
        table.record_summary(rec).expect("summary").state_bits
    };
    assert_ne!(state_of(f_rst, rst) & STATE_RST, 0);
    assert_ne!(state_of(f_fin, fin) & STATE_FIN, 0);
    let (dead_rec, _) = table
        .find(Index::Fwd, &fwd_tuple(f_dead, dead))
        .expect("record");
    assert!(table.unindex(dead_rec));
    let (freed, live, picked) = table.reclaim_and_pick(|s| s.state_bits & STATE_RST != 0);
    assert_eq!((freed, live), (1, 3));
    assert_eq!(picked.len(), 1);
    assert_eq!(picked[0].1.fwd_key, fwd_tuple(f_rst, rst));
    assert_eq!(table.record(dead_rec).expect("record").state, REC_FREE);
}

/// The forward tuple of a connection from the client at `port` to the backend.
fn fwd_tuple(f: Family, port: u16) -> Tuple {
    Tuple::new(client(f), port, backend(f), BACKEND_PORT, L4Proto::Tcp)
}

/// Records whose forward tuple is `key`.
fn records_of(table: &probes::SnatTable, key: &Tuple) -> Vec<u32> {
    table
        .records()
        .into_iter()
        .filter(|(_, r)| r.fwd_key == *key)
        .map(|(rec, _)| rec)
        .collect()
}

/// A connection whose home bucket is full while the next bucket's stripe lock stays taken (a
/// program preempted inside an insert, held here through the mapped `snat_locks`): the insert
/// passes over the busy bucket but marks it overflowed, so the way it claims further on is
/// reachable: the connection's next packet finds the same record and SNAT port, and nothing is
/// dropped.
fn claim_past_a_busy_bucket_stays_reachable(f: Family) {
    let fx = Fixture::new(&format!("table_busy_next_{f:?}"));
    let (home, ports) = ports_sharing_a_home(&fx, f, NAT_WAYS + 1);
    let table = &fx.dp.maps().snat;
    for &port in &ports[..NAT_WAYS] {
        let out = fx.egress(
            &tcp(client(f), port, backend(f), BACKEND_PORT, TCP_SYN),
            SVC | MASQ,
        );
        assert_eq!(out.return_value, TC_ACT_UNSPEC);
    }
    let next = (home + 1) % table.buckets();
    let lock = table.stripe_lock(Index::Fwd, next);
    assert_eq!(
        lock.swap(1, Ordering::AcqRel),
        0,
        "the next bucket's lock was free"
    );
    let port = ports[NAT_WAYS];
    let out = fx.egress(
        &tcp(client(f), port, backend(f), BACKEND_PORT, TCP_SYN),
        SVC | MASQ,
    );
    lock.store(0, Ordering::Release);
    assert_eq!(out.return_value, TC_ACT_UNSPEC, "the SYN is translated");
    let p = check_frame(&out.packet);
    assert_eq!((p.src, p.sport()), (node(f), port));

    // A FIN goes to the table (not the flow cache); without a mark it cannot allocate.
    let out = fx.egress(
        &tcp(client(f), port, backend(f), BACKEND_PORT, TCP_ACK | TCP_FIN),
        0,
    );
    let p = check_frame(&out.packet);
    assert_eq!(
        (p.src, p.sport()),
        (node(f), port),
        "the program finds the connection"
    );
    let key = fwd_tuple(f, port);
    let (rec, _) = table
        .find(Index::Fwd, &key)
        .expect("the agent finds the connection");
    let skipped = table.bucket_copy(Index::Fwd, next).expect("bucket");
    assert_eq!(skipped.overflow, 1, "the busy bucket is marked overflowed");
    // A second SYN with the masquerade mark would allocate again if it missed the record.
    let out = fx.egress(
        &tcp(client(f), port, backend(f), BACKEND_PORT, TCP_SYN),
        SVC | MASQ,
    );
    assert_eq!(check_frame(&out.packet).sport(), port);
    assert_eq!(records_of(table, &key), vec![rec], "one record");
    let stats = fx.stats();
    assert_eq!(stats.get(Counter::SnatAlloc), (NAT_WAYS + 1) as u64);
    assert_eq!(stats.get(Counter::MapFull), 0);
    assert_eq!(stats.get(Counter::LockBusy), 0);
}

per_family!(claim_past_a_busy_bucket_stays_reachable);

/// A home bucket whose stripe lock stays taken: the new connection's SYN is dropped and counted
/// as `lock_busy`, not `map_full`; its reply-tuple reservation is given back and nothing stays
/// locked; once the lock is free the retransmitted SYN is translated.
fn busy_home_lock_is_counted_as_lock_busy(f: Family) {
    let fx = Fixture::new(&format!("table_busy_home_{f:?}"));
    let table = &fx.dp.maps().snat;
    let key = fwd_tuple(f, 40_000);
    let home = table.pos_fwd(&key).home;
    let lock = table.stripe_lock(Index::Fwd, home);
    lock.store(1, Ordering::Release);
    let syn = tcp(client(f), 40_000, backend(f), BACKEND_PORT, TCP_SYN);
    let out = fx.egress(&syn, SVC | MASQ);
    lock.store(0, Ordering::Release);
    assert_eq!(out.return_value, TC_ACT_SHOT, "dropped");
    let stats = fx.stats();
    assert_eq!(stats.get(Counter::LockBusy), 1, "counted as lock_busy");
    assert_eq!(stats.get(Counter::MapFull), 0, "not as map_full");
    assert_eq!(stats.get(Counter::SnatAlloc), 0);
    assert_eq!(table.index_len(Index::Rev), 0, "the reservation given back");
    assert_eq!(table.index_len(Index::Fwd), 0);
    for index in [Index::Fwd, Index::Rev] {
        for stripe in 0..table.stripes() {
            assert_eq!(
                table.stripe_lock(index, stripe).load(Ordering::Acquire),
                0,
                "{index:?} stripe {stripe} left locked"
            );
        }
    }
    let out = fx.egress(&syn, SVC | MASQ);
    assert_eq!(out.return_value, TC_ACT_UNSPEC);
    assert_eq!(check_frame(&out.packet).src, node(f));
    assert_eq!(records_of(table, &key).len(), 1);
}

per_family!(busy_home_lock_is_counted_as_lock_busy);

/// The agent's insert (tests, benchmarks) follows the same rule as the programs: with the home
/// bucket full and the next one's lock taken, the connection lands where lookups reach it.
#[test]
fn agent_insert_past_a_busy_bucket_stays_reachable() {
    let f = Family::V4;
    let fx = Fixture::new("table_agent_busy_next");
    let (home, ports) = ports_sharing_a_home(&fx, f, NAT_WAYS + 1);
    let table = &fx.dp.maps().snat;
    let insert = |port: u16| {
        fx.dp.maps().insert_translation(
            &fwd_tuple(f, port),
            &Tuple::new(backend(f), BACKEND_PORT, node(f), port, L4Proto::Tcp),
            &entry(node(f), port),
            &entry(client(f), port),
        )
    };
    for &port in &ports[..NAT_WAYS] {
        insert(port).expect("insert");
    }
    let next = (home + 1) % table.buckets();
    let lock = table.stripe_lock(Index::Fwd, next);
    lock.store(1, Ordering::Release);
    let port = ports[NAT_WAYS];
    let inserted = insert(port);
    lock.store(0, Ordering::Release);
    let rec = inserted.expect("insert past the busy bucket");
    assert_eq!(
        table.find(Index::Fwd, &fwd_tuple(f, port)).map(|(r, _)| r),
        Some(rec),
        "the agent finds it"
    );
    assert_eq!(
        table
            .bucket_copy(Index::Fwd, next)
            .expect("bucket")
            .overflow,
        1,
        "the busy bucket is marked overflowed"
    );
    let out = fx.egress(
        &tcp(client(f), port, backend(f), BACKEND_PORT, TCP_ACK | TCP_FIN),
        0,
    );
    assert_eq!(
        check_frame(&out.packet).src,
        node(f),
        "the program finds it"
    );
}

const TCP_RST: u8 = 0x04;

/// How a connection ends before its client reuses the port.
#[derive(Debug, Clone, Copy)]
enum Close {
    /// The backend resets it.
    ResetByBackend,
    /// The client resets it.
    ResetByClient,
    /// FIN both ways.
    Fin,
}

/// A client reusing its port for a new connection to the same backend right after the old one
/// closed: the SYN finds the old record (same record, same SNAT port) and starts its state
/// afresh, the egress entry holding SYN only and the ingress entry nothing, so the sweeper gives
/// the new connection the SYN timeout (then, with the reply, the established one), not the old
/// one's RST/FIN timeout. Read from the record's bytes in the mapped table. The SYN-ACK after it
/// is recorded too (not taken from a flow cache slot of the old connection).
fn syn_after_close_starts_a_fresh_state(f: Family, close: Close) {
    use probes::maps::{STATE_FIN, STATE_REPLY, STATE_RST, STATE_SYN};
    let fx = Fixture::new(&format!("table_reopen_{close:?}_{f:?}"));
    let table = &fx.dp.maps().snat;
    let client_port = 40_000;
    let out_pkt = |flags: u8| tcp(client(f), client_port, backend(f), BACKEND_PORT, flags);
    let out = fx.egress(&out_pkt(TCP_SYN), SVC | MASQ);
    let port = check_frame(&out.packet).sport();
    let in_pkt = |flags: u8| tcp(backend(f), BACKEND_PORT, node(f), port, flags);
    let key = fwd_tuple(f, client_port);
    fx.ingress(&in_pkt(TCP_SYN | TCP_ACK), 0);
    fx.egress(&out_pkt(TCP_ACK), 0);
    fx.ingress(&in_pkt(TCP_ACK), 0);
    match close {
        Close::ResetByBackend => {
            fx.ingress(&in_pkt(TCP_RST), 0);
        }
        Close::ResetByClient => {
            fx.egress(&out_pkt(TCP_RST), 0);
        }
        Close::Fin => {
            fx.egress(&out_pkt(TCP_ACK | TCP_FIN), 0);
            fx.ingress(&in_pkt(TCP_ACK | TCP_FIN), 0);
            fx.egress(&out_pkt(TCP_ACK), 0);
        }
    }
    let (rec, closed) = table.find(Index::Fwd, &key).expect("record");
    assert_ne!(
        closed.state_bits() & (STATE_FIN | STATE_RST),
        0,
        "the close is recorded"
    );

    let out = fx.egress(&out_pkt(TCP_SYN), SVC | MASQ);
    assert_eq!(check_frame(&out.packet).sport(), port, "same SNAT port");
    let (again, r) = table.find(Index::Fwd, &key).expect("record");
    assert_eq!(again, rec, "same record");
    assert_eq!(r.fwd.state, STATE_SYN, "egress state: SYN only");
    assert_eq!(r.rev.state, 0, "ingress state: nothing yet");
    assert_eq!(
        (r.fwd.port.get(), r.fwd.flags, r.rev.port.get()),
        (
            closed.fwd.port.get(),
            closed.fwd.flags,
            closed.rev.port.get()
        ),
        "the rest of the state words kept"
    );

    let back = fx.ingress(&in_pkt(TCP_SYN | TCP_ACK), 0);
    assert_eq!(check_frame(&back.packet).dport(), client_port);
    let (_, r) = table.find(Index::Fwd, &key).expect("record");
    assert_eq!(
        r.rev.state,
        STATE_SYN | STATE_REPLY,
        "the new reply recorded"
    );
    assert_eq!(r.state_bits() & (STATE_FIN | STATE_RST), 0);
    assert_eq!(records_of(table, &key), vec![rec], "one record");
}

mod syn_after_close_starts_a_fresh_state {
    use super::{Close, Family, syn_after_close_starts_a_fresh_state as run};

    #[test]
    fn reset_by_backend_v4() {
        run(Family::V4, Close::ResetByBackend);
    }
    #[test]
    fn reset_by_backend_v6() {
        run(Family::V6, Close::ResetByBackend);
    }
    #[test]
    fn reset_by_client_v4() {
        run(Family::V4, Close::ResetByClient);
    }
    #[test]
    fn fin_v4() {
        run(Family::V4, Close::Fin);
    }
    #[test]
    fn fin_v6() {
        run(Family::V6, Close::Fin);
    }
}
