//! Host-kernel stress of the SNAT table (bpf/table.h, probes::nat_table): one thread per CPU
//! (pinned with sched_setaffinity) runs the TC programs with BPF_PROG_TEST_RUN on first packets,
//! established (fast-path) packets, closes, replies and ICMP errors, while a sweeper thread does
//! what the agent's sweeper does to the table (its walk: reclaims, summaries, copies, resolves,
//! unindexes) and a holder thread takes bucket locks for a while through the mapped
//! `snat_locks`, as a program preempted inside an insert would (a test run, unlike the TC hook, can be preempted). The table is shrunk to 64
//! buckets an index and 192 records, so that claims meet full buckets, busy locks and a full
//! table. Then, with every thread stopped, the table is checked from its mapped memory: every
//! live record reachable from both indexes and indexed once in each, no tuple indexed twice, no
//! lock, claim or allocation left behind, every record consistent, and the counters equal to
//! what the threads saw happen to their packets.
//!
//! Stripes: `NAT_LOCK_STRIPES` (8192) is a compile-time constant and a bucket's stripe is
//! `bucket % 8192`, so in a 64-bucket index every bucket has a stripe of its own: contention
//! here is between claims of the same or neighbouring buckets (a claim locks up to 4), which a
//! small table makes frequent; no unrelated buckets share a lock, as they would in a table of
//! more than 8192 buckets. The holder thread adds the one case CPUs alone would not produce on a
//! non-preemptible host kernel: a lock that stays taken.
//!
//! Each thread's connections are its own (its client address), so it knows what its packets
//! must become: a translated packet of one of its connections carries the SNAT port the
//! connection's last first packet got. A few connections are shared by all threads (their
//! first packets race). Needs root and bpffs. Bounded: a fixed number of packets per thread.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use probes::maps::{
    Config, Counter, NAT_PROBE_BUCKETS, NAT_WAYS, REC_USED, SNAT_F_RESOLVED, STATE_FIN, STATE_RST,
    TAG_BUSY, TAG_FREE, TAG_VALID, Tuple, addr_from_bytes,
};
use probes::{Index, SnatTable};

const SVC: u32 = probes::maps::DEFAULT_MARK_SVC;
const MASQ: u32 = probes::maps::DEFAULT_MARK_MASQ;
const TCP_RST: u8 = 0x04;

/// Packets each thread sends.
const PACKETS_PER_THREAD: usize = 20_000;
/// Connections of each thread, and shared by all.
const OWN_CONNS: usize = 96;
const SHARED_CONNS: usize = 12;
/// Records of the table: 2 * 192 / 6 = 64 buckets an index.
const RECORDS: u32 = 192;
/// The SNAT port range: small, so that ports are taken and reply tuples crowd their buckets.
const SNAT_PORT_MIN: u16 = 20_000;
const SNAT_PORT_MAX: u16 = 20_127;
const BACKEND_PORTS: [u16; 2] = [8080, 8081];

/// A connection: client -> backend, TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Conn {
    client: IpAddr,
    client_port: u16,
    backend: IpAddr,
    backend_port: u16,
}

impl Conn {
    fn family(&self) -> Family {
        family_of(self.client)
    }

    fn out(&self, flags: u8) -> Vec<u8> {
        tcp(
            self.client,
            self.client_port,
            self.backend,
            self.backend_port,
            flags,
        )
    }

    fn reply(&self, snat_port: u16, flags: u8) -> Vec<u8> {
        tcp(
            self.backend,
            self.backend_port,
            node(self.family()),
            snat_port,
            flags,
        )
    }

    /// An ICMP error from a router about a packet that left translated (node:port -> backend).
    fn icmp_error(&self, snat_port: u16) -> Vec<u8> {
        let f = self.family();
        let transport = Transport::Tcp {
            sport: snat_port,
            dport: self.backend_port,
            flags: TCP_ACK,
        };
        let l4 = l4_segment(node(f), self.backend, &transport, &[]);
        let quoted = ip_packet(node(f), self.backend, PROTO_TCP, &l4, 0x4242, None);
        icmp_too_big(router(f), node(f), &quoted)
    }
}

fn addr(f: Family, group: u8, host: u8) -> IpAddr {
    match f {
        Family::V4 => IpAddr::from([10, 244, group, host]),
        Family::V6 => format!("fd00:244:{group}::{host}").parse().expect("ipv6"),
    }
}

/// Connection `i` of the client `(group, host)`: a quarter IPv6, one in six with a client port
/// outside the local port range (kept as the SNAT port when free: the same port of every client
/// to a backend is one reply tuple, so the threads' kept ports collide), three backends with two
/// ports each.
fn conn(group: u8, host: u8, i: usize) -> Conn {
    let f = if i % 4 == 3 { Family::V6 } else { Family::V4 };
    let client_port = if i % 6 == 5 {
        10_000 + i as u16
    } else {
        40_000 + i as u16
    };
    Conn {
        client: addr(f, group, host),
        client_port,
        backend: addr(f, 2, 20 + (i % 3) as u8),
        backend_port: BACKEND_PORTS[i % 2],
    }
}

/// xorshift64: each thread's deterministic choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// What one sending thread saw happen to its packets.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    egress: u64,
    egress_translated: u64,
    egress_dropped: u64,
    egress_passed: u64,
    /// First packets of shared connections translated (some may have used a record another CPU
    /// created meanwhile: counted by no counter).
    shared_translated: u64,
    replies: u64,
    replies_translated: u64,
    icmp: u64,
    icmp_translated: u64,
}

impl Seen {
    fn add(&mut self, o: &Seen) {
        self.egress += o.egress;
        self.egress_translated += o.egress_translated;
        self.egress_dropped += o.egress_dropped;
        self.egress_passed += o.egress_passed;
        self.shared_translated += o.shared_translated;
        self.replies += o.replies;
        self.replies_translated += o.replies_translated;
        self.icmp += o.icmp;
        self.icmp_translated += o.icmp_translated;
    }
}

/// One sending thread: `PACKETS_PER_THREAD` packets over its own connections and the shared
/// ones, each packet's outcome checked against what the thread knows.
fn send(fx: &Fixture, own: &[Conn], shared: &[Conn], all: &HashSet<Conn>, seed: u64) -> Seen {
    let mut rng = Rng(seed);
    let mut seen = Seen::default();
    // The SNAT port each own connection's last translated first packet got.
    let mut port_of: Vec<Option<u16>> = vec![None; own.len()];
    let any_port = |rng: &mut Rng| {
        SNAT_PORT_MIN + rng.below(usize::from(SNAT_PORT_MAX - SNAT_PORT_MIN) + 1) as u16
    };
    for _ in 0..PACKETS_PER_THREAD {
        let roll = rng.below(100);
        let i = rng.below(own.len());
        let c = own[i];
        let f = c.family();
        match roll {
            // A first packet (SYN, masquerade mark) of an own connection.
            0..=29 => {
                seen.egress += 1;
                let out = fx.egress(&c.out(TCP_SYN), SVC | MASQ);
                if out.return_value == TC_ACT_SHOT {
                    seen.egress_dropped += 1;
                    continue;
                }
                let p = check_frame(&out.packet);
                assert_eq!(p.src, node(f), "a first packet is translated or dropped");
                seen.egress_translated += 1;
                port_of[i] = Some(p.sport());
            }
            // An established packet, or a close, of an own connection (no mark: it cannot
            // allocate).
            30..=59 => {
                let flags = match rng.below(20) {
                    0 => TCP_RST,
                    1 => TCP_ACK | TCP_FIN,
                    _ => TCP_ACK,
                };
                seen.egress += 1;
                let out = fx.egress(&c.out(flags), 0);
                assert_ne!(out.return_value, TC_ACT_SHOT, "never dropped");
                let p = check_frame(&out.packet);
                if p.src == c.client {
                    seen.egress_passed += 1;
                    continue;
                }
                seen.egress_translated += 1;
                assert_eq!(p.src, node(f));
                assert_eq!(
                    Some(p.sport()),
                    port_of[i],
                    "{c:?}: translated with the port of its last first packet"
                );
            }
            // A reply to an own connection's port (or any port of the range).
            60..=79 => {
                let port = port_of[i].unwrap_or_else(|| any_port(&mut rng));
                seen.replies += 1;
                let out = fx.ingress(&c.reply(port, TCP_ACK), 0);
                assert_ne!(out.return_value, TC_ACT_SHOT, "never dropped");
                let p = check_frame(&out.packet);
                if p.dst == node(f) {
                    continue;
                }
                seen.replies_translated += 1;
                // The port may have moved to another connection since (the sweeper removed
                // this one's record): the reply goes to whichever holds it, a known one.
                let to = Conn {
                    client: p.dst,
                    client_port: p.dport(),
                    backend: c.backend,
                    backend_port: c.backend_port,
                };
                assert!(
                    all.contains(&to),
                    "reply translated to {to:?}, no such connection"
                );
            }
            // An ICMP error about a packet an own connection sent translated.
            80..=89 => {
                let port = port_of[i].unwrap_or_else(|| any_port(&mut rng));
                seen.icmp += 1;
                let out = fx.ingress(&c.icmp_error(port), 0);
                assert_ne!(out.return_value, TC_ACT_SHOT, "never dropped");
                let p = check_frame(&out.packet);
                if p.dst == node(f) {
                    continue;
                }
                seen.icmp_translated += 1;
                let inner = check_quoted(&p.l4[8..]);
                let to = Conn {
                    client: p.dst,
                    client_port: inner.sport(),
                    backend: c.backend,
                    backend_port: c.backend_port,
                };
                assert_eq!(
                    inner.src, p.dst,
                    "quoted source translated with the destination"
                );
                assert!(
                    all.contains(&to),
                    "ICMP error translated to {to:?}, no such connection"
                );
            }
            // A first packet of a shared connection: the threads race for its record.
            _ => {
                let s = shared[rng.below(shared.len())];
                seen.egress += 1;
                let out = fx.egress(&s.out(TCP_SYN), SVC | MASQ);
                if out.return_value == TC_ACT_SHOT {
                    seen.egress_dropped += 1;
                    continue;
                }
                assert_eq!(check_frame(&out.packet).src, node(s.family()));
                seen.egress_translated += 1;
                seen.shared_translated += 1;
            }
        }
    }
    seen
}

/// What the sweeper thread did.
#[derive(Debug, Default)]
struct Swept {
    passes: u64,
    resolved: u64,
    unindexed: u64,
    reclaimed: u64,
}

/// One pass of what the agent's sweeper does to the table (agent/src/datapath/sweep.rs), in its
/// one walk (`reclaim_and_pick`): free the records the previous pass removed, and of the live
/// ones copy those with work, decided on their summaries: resolve new ones, remove expired
/// ones. A closed connection (FIN or RST) counts as expired at once, and one live record in 16
/// at random.
fn sweep_pass(table: &SnatTable, rng: &mut Rng, swept: &mut Swept) {
    let (freed, _, picked) = table.reclaim_and_pick(|s| {
        s.fwd_flags & SNAT_F_RESOLVED == 0
            || s.state_bits & (STATE_FIN | STATE_RST) != 0
            || rng.below(16) == 0
    });
    swept.reclaimed += freed as u64;
    for (rec, r) in picked {
        let unresolved = r.fwd.flags & SNAT_F_RESOLVED == 0;
        if unresolved {
            table.resolve(rec, 0, SNAT_F_RESOLVED);
            swept.resolved += 1;
        }
        // Picked closed, or at random (or unresolved: one in 16 of those).
        let closed = r.state_bits() & (STATE_FIN | STATE_RST) != 0;
        if (closed || !unresolved || rng.below(16) == 0) && table.unindex(rec) {
            swept.unindexed += 1;
        }
    }
    swept.passes += 1;
}

/// Checks the table from its mapped memory (nothing running): returns (live records, buckets
/// marked overflowed in snat_fwd, in snat_rev).
fn check_table(table: &SnatTable) -> (usize, usize, usize) {
    let buckets = table.buckets();
    for index in [Index::Fwd, Index::Rev] {
        for stripe in 0..table.stripes() {
            assert_eq!(
                table.stripe_lock(index, stripe).load(Ordering::Acquire),
                0,
                "{index:?} stripe {stripe} left locked"
            );
        }
    }
    let live: HashMap<u32, probes::maps::NatRecord> = table.records().into_iter().collect();
    let (_, busy, _, _) = table.occupancy();
    assert_eq!(busy, 0, "records left allocated but unwritten");
    let mut overflowed = [0usize; 2];
    for (n, index) in [Index::Fwd, Index::Rev].into_iter().enumerate() {
        let mut ways_of: HashMap<u32, usize> = HashMap::new();
        let mut keys: HashSet<Tuple> = HashSet::new();
        for bucket in 0..buckets {
            let b = table.bucket_copy(index, bucket).expect("bucket");
            if b.overflow != 0 {
                overflowed[n] += 1;
            }
            for way in 0..NAT_WAYS {
                let tag = b.tag[way];
                assert_ne!(
                    tag, TAG_BUSY,
                    "{index:?} bucket {bucket} way {way}: claim left"
                );
                if tag == TAG_FREE {
                    continue;
                }
                assert_ne!(tag & TAG_VALID, 0);
                let rec = b.rec[way];
                let r = live.get(&rec).unwrap_or_else(|| {
                    panic!(
                        "{index:?} bucket {bucket} way {way}: record {rec} is not live ({:?})",
                        table.record(rec).map(|r| r.state)
                    )
                });
                let key = match index {
                    Index::Fwd => r.fwd_key,
                    Index::Rev => r.rev_key,
                };
                assert!(keys.insert(key), "{index:?}: {key:?} indexed twice");
                *ways_of.entry(rec).or_default() += 1;
                let pos = match index {
                    Index::Fwd => table.pos_fwd(&key),
                    Index::Rev => table.pos_rev(&key),
                };
                assert_eq!(pos.tag, tag, "{index:?} bucket {bucket} way {way}: tag");
                let distance = (bucket + buckets - pos.home) % buckets;
                assert!(
                    distance < NAT_PROBE_BUCKETS,
                    "{index:?}: record {rec} {distance} buckets from its home"
                );
                for d in 0..distance {
                    let passed = table
                        .bucket_copy(index, (pos.home + d) % buckets)
                        .expect("bucket");
                    assert_eq!(
                        passed.overflow,
                        1,
                        "{index:?}: record {rec} in bucket {bucket} past bucket {} not marked \
                         overflowed (unreachable)",
                        (pos.home + d) % buckets
                    );
                }
                assert_eq!(
                    table.find(index, &key).map(|(found, _)| found),
                    Some(rec),
                    "{index:?}: record {rec} found by its tuple"
                );
            }
        }
        for &rec in live.keys() {
            assert_eq!(
                ways_of.get(&rec).copied().unwrap_or(0),
                1,
                "live record {rec} indexed once in {index:?}"
            );
        }
    }
    for (rec, r) in &live {
        assert_eq!(r.state, REC_USED);
        assert_eq!(r.fwd.port, r.rev_key.dport, "record {rec}: SNAT port");
        assert_eq!(r.fwd.addr, r.rev_key.daddr, "record {rec}: SNAT address");
        assert_eq!(r.rev.addr, r.fwd_key.saddr, "record {rec}: client address");
        assert_eq!(r.rev.port, r.fwd_key.sport, "record {rec}: client port");
        assert_eq!(r.rev_key.saddr, r.fwd_key.daddr, "record {rec}: backend");
        assert_eq!(
            r.rev_key.sport, r.fwd_key.dport,
            "record {rec}: backend port"
        );
        assert_eq!(r.rev_key.proto, r.fwd_key.proto);
        let f = family_of(addr_from_bytes(r.fwd_key.saddr));
        assert_eq!(
            addr_from_bytes(r.fwd.addr),
            node(f),
            "record {rec}: node address"
        );
    }
    (live.len(), overflowed[0], overflowed[1])
}

#[test]
fn concurrent_inserts_lookups_and_sweeps_keep_the_table_consistent() {
    let mut sizes = test_map_sizes();
    sizes.snat = RECORDS;
    let fx = Fixture::with_sizes("table_stress", sizes);
    fx.set_config(Config {
        snat_port_min: SNAT_PORT_MIN,
        snat_port_max: SNAT_PORT_MAX,
        ..Config::default()
    });
    let table = &fx.dp.maps().snat;
    assert_eq!(table.buckets(), 64);
    assert_eq!(table.capacity(), RECORDS);

    let cpus = allowed_cpus();
    let threads = cpus.len().clamp(1, 8);
    let own: Vec<Vec<Conn>> = (0..threads)
        .map(|t| (0..OWN_CONNS).map(|i| conn(7, 1 + t as u8, i)).collect())
        .collect();
    let shared: Vec<Conn> = (0..SHARED_CONNS).map(|i| conn(8, 1, i)).collect();
    let all: HashSet<Conn> = own.iter().flatten().chain(&shared).copied().collect();

    let stop = AtomicBool::new(false);
    let holds = AtomicU64::new(0);
    let passed_over = AtomicU64::new(0);
    let started = Instant::now();
    let (seen, swept) = std::thread::scope(|scope| {
        let senders: Vec<_> = (0..threads)
            .map(|t| {
                let (fx, own, shared, all) = (&fx, &own[t], &shared, &all);
                let cpu = cpus[t % cpus.len()];
                scope.spawn(move || {
                    pin_to(cpu);
                    send(fx, own, shared, all, 0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1))
                })
            })
            .collect();
        let sweeper = scope.spawn(|| {
            let mut rng = Rng(0x5eed);
            let mut swept = Swept::default();
            while !stop.load(Ordering::Acquire) {
                sweep_pass(table, &mut rng, &mut swept);
                std::thread::sleep(Duration::from_millis(5));
            }
            swept
        });
        let holder = scope.spawn(|| {
            // Takes a random bucket's lock now and then and keeps it a while, as a program
            // preempted inside an insert would (only when free: a program holding it is left
            // alone).
            let mut rng = Rng(0x10c4);
            while !stop.load(Ordering::Acquire) {
                let index = if rng.below(2) == 0 {
                    Index::Fwd
                } else {
                    Index::Rev
                };
                // Half the time the bucket after a full one: claims overflowing into it meet
                // its lock taken.
                let mut bucket = rng.below(64) as u32;
                if rng.below(2) == 0 {
                    let full: Vec<u32> = (0..64)
                        .filter(|&b| {
                            table
                                .bucket_copy(index, b)
                                .is_some_and(|b| b.tag.iter().all(|&t| t != TAG_FREE))
                        })
                        .collect();
                    if !full.is_empty() {
                        bucket = (full[rng.below(full.len())] + 1) % 64;
                    }
                }
                let lock = table.stripe_lock(index, bucket);
                let overflowed = || {
                    table
                        .bucket_copy(index, bucket)
                        .is_some_and(|b| b.overflow != 0)
                };
                if lock
                    .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    holds.fetch_add(1, Ordering::Relaxed);
                    let before = overflowed();
                    std::thread::sleep(Duration::from_millis(1));
                    // While the lock is held no claim can take a way in the bucket or mark it
                    // overflowed for being full: a flag that appeared is a claim that passed
                    // over it.
                    if !before && overflowed() {
                        passed_over.fetch_add(1, Ordering::Relaxed);
                    }
                    lock.store(0, Ordering::Release);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        // Stops the sweeper and the holder however the senders end (a failed check panics).
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let stopping = StopOnDrop(&stop);
        let mut seen = Seen::default();
        for sender in senders {
            seen.add(&sender.join().expect("sender"));
        }
        drop(stopping);
        holder.join().expect("holder");
        (seen, sweeper.join().expect("sweeper"))
    });
    let elapsed = started.elapsed();

    let (live, overflowed_fwd, overflowed_rev) = check_table(table);
    let (_, _, dead, _) = table.occupancy();
    let stats = fx.stats();
    let count = |c: Counter| stats.get(c);
    eprintln!(
        "table_stress: {threads} threads x {PACKETS_PER_THREAD} packets in {elapsed:?}; \
         {seen:?}; sweeper {swept:?}; lock holds {} (busy buckets passed over by a claim: {}); \
         counters: snat_alloc {} fwd_hit {} \
         rev_hit {} icmp_xlate {} map_full {} port_exhausted {} lock_busy (EBUSY drops) {}; \
         table: {live} live, {dead} dead, overflowed buckets fwd {overflowed_fwd} rev \
         {overflowed_rev} of 64",
        holds.load(Ordering::Relaxed),
        passed_over.load(Ordering::Relaxed),
        count(Counter::SnatAlloc),
        count(Counter::FwdHit),
        count(Counter::RevHit),
        count(Counter::IcmpXlate),
        count(Counter::MapFull),
        count(Counter::PortExhausted),
        count(Counter::LockBusy),
    );

    // Counters against what the threads saw.
    assert_eq!(
        seen.egress,
        seen.egress_translated + seen.egress_dropped + seen.egress_passed
    );
    assert_eq!(
        seen.egress_dropped,
        count(Counter::MapFull) + count(Counter::PortExhausted) + count(Counter::LockBusy),
        "every drop counted once, by its cause"
    );
    let counted = count(Counter::FwdHit) + count(Counter::SnatAlloc);
    assert!(
        counted <= seen.egress_translated
            && seen.egress_translated - counted <= seen.shared_translated,
        "translated egress packets: {} counted, {} seen ({} of shared connections)",
        counted,
        seen.egress_translated,
        seen.shared_translated
    );
    assert_eq!(count(Counter::RevHit), seen.replies_translated);
    assert_eq!(count(Counter::IcmpXlate), seen.icmp_translated);
    assert_eq!(
        count(Counter::SnatAlloc),
        live as u64 + swept.unindexed,
        "every allocation is a record, live or removed by the sweeper"
    );
    assert_eq!(swept.unindexed, swept.reclaimed + dead as u64);
    for c in [
        Counter::ParseError,
        Counter::NoSnatAddr,
        Counter::FragMiss,
        Counter::FragXlate,
    ] {
        assert_eq!(count(c), 0, "{}", c.name());
    }
}
