//! Host-kernel tests of the SNAT table (bpf/table.h) between the programs and the agent's view of
//! it (probes::nat_table): the same hashing on both sides, a full bucket spilling into the next
//! ones, removal and the grace period before a record is reused, and the device slots in front
//! of `devices`. Packets go through the programs with BPF_PROG_TEST_RUN; table contents are read
//! from the maps' memory. Needs root and bpffs.

mod common;

use std::net::IpAddr;

use common::*;
use probes::maps::{
    DEFAULT_MARK_MASQ, DEFAULT_MARK_SVC, DevSlot, DevValue, L4Proto, NAT_WAYS, REC_DEAD, REC_FREE,
    REC_USED, SnatEntry, Tuple, addr_to_bytes,
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
    let rec = table
        .insert(
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
