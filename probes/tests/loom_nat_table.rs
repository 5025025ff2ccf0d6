//! Loom models of the SNAT table's races (bpf/table.h; docs/datapath.md, "Memory ordering",
//! cases 1-5): a program inserting, looking up, giving back or refreshing a record while another
//! CPU or the agent's sweeper works on the same words. Built only with `--cfg loom`:
//!   RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=… cargo test -p probes --test loom_nat_table
//! (scripts/test: LOOM_MAX_PREEMPTIONS=3, a target dir of its own; 1.5 s unoptimised, 0.4 s
//! with --release and no bound).
//!
//! The agent's side is the agent's own code (`probes::nat_protocol`, which `SnatTable` runs over
//! the maps' memory) over [`Model`], a table of loom atomics. The programs' side is table.h
//! written again in Rust with the orderings the BPF code has on arm64: a value-returning BPF
//! atomic (xchg, cmpxchg: fully ordered, an `smp_mb()` before and after) is a `SeqCst`
//! read-modify-write between two `SeqCst` fences (loom treats the read-modify-write itself as
//! `AcqRel`; the fences are the `smp_mb()`s, and the one after it is what orders a later plain
//! store, such as a tag after its record number, for every reader); a plain store or load is
//! `Relaxed`; a plain byte store into a control word is a `Relaxed` update of that byte alone. A lookup's address dependencies
//! (tag -> record number -> record, `nat_dep()`) are `Acquire` loads: neither C11 nor loom has
//! dependency ordering (`consume` is `acquire`), and acquire is what the LKMM gives such reads.
//! Loom explores every interleaving and every value a load may return under those orderings
//! (it is not sound for load buffering, which no case here relies on); TCG in the lab does not
//! reorder memory at all.
//!
//! The grace period of case 5 (a record is freed a sweep after it was unindexed, seconds after
//! any program that found it ran) is time, not ordering: no model here covers it.
#![cfg(loom)]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering::{self, Acquire, Relaxed, SeqCst};

use loom::sync::Arc;
use loom::sync::atomic::{AtomicU32, AtomicU64, fence};
use loom::thread;
use probes::Index;
use probes::maps::{
    L4Proto, NAT_WAYS, NatRecord, REC_BUSY, REC_DEAD, REC_FREE, REC_USED, SnatEntry, TAG_BUSY,
    TAG_FREE, TAG_VALID, Tuple,
};
use probes::nat_protocol::{self, TableMemory};
use probes::nat_table::NatPos;
use zerocopy::byteorder::network_endian::U16;

/// Records of the model (connection numbers are 1 and 2; 0 is a record never written).
const RECORDS: u32 = 2;
/// The `last_seen` a record is written with, and the one a refresh stores.
const WRITTEN_AT: u64 = 10;
const REFRESHED_AT: u64 = 100;

/// One bucket: its control word (tag bytes, overflow flag) and its ways' record numbers.
struct Bucket {
    ctrl: AtomicU64,
    rec: [AtomicU32; NAT_WAYS],
}

impl Bucket {
    fn new() -> Bucket {
        Bucket {
            ctrl: AtomicU64::new(0),
            rec: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

/// One record: its state word and, as plain (relaxed) words, what a lookup uses: the
/// connection (both keys derive from it), its translation (port) and its last packet.
struct Record {
    state: AtomicU32,
    conn: AtomicU32,
    port: AtomicU32,
    last_seen: AtomicU64,
}

/// The table: one bucket per index (every tuple's home), records, the two home stripes' locks.
struct Model {
    fwd: Bucket,
    rev: Bucket,
    records: Vec<Record>,
    locks: [AtomicU32; 2],
}

fn fwd_key(conn: u32) -> Tuple {
    let ip = |d| IpAddr::V4(Ipv4Addr::new(10, 0, 0, d));
    Tuple::new(ip(1), conn as u16, ip(2), 80, L4Proto::Tcp)
}

fn rev_key(conn: u32) -> Tuple {
    let ip = |d| IpAddr::V4(Ipv4Addr::new(10, 0, 0, d));
    Tuple::new(ip(2), 80, ip(3), conn as u16, L4Proto::Tcp)
}

fn key(index: Index, conn: u32) -> Tuple {
    match index {
        Index::Fwd => fwd_key(conn),
        Index::Rev => rev_key(conn),
    }
}

/// The translation a connection's record holds (what a stale read would get wrong).
fn port_of(conn: u32) -> u32 {
    1000 + conn
}

impl Model {
    fn new() -> Model {
        Model {
            fwd: Bucket::new(),
            rev: Bucket::new(),
            records: (0..RECORDS)
                .map(|_| Record {
                    state: AtomicU32::new(REC_FREE),
                    conn: AtomicU32::new(0),
                    port: AtomicU32::new(0),
                    last_seen: AtomicU64::new(0),
                })
                .collect(),
            locks: [AtomicU32::new(0), AtomicU32::new(0)],
        }
    }

    fn bucket(&self, index: Index) -> &Bucket {
        match index {
            Index::Fwd => &self.fwd,
            Index::Rev => &self.rev,
        }
    }

    fn lock(&self, index: Index) -> &AtomicU32 {
        &self.locks[usize::from(index == Index::Rev)]
    }

    /// The ways of an index whose tag byte is the tag of connection `conn`.
    fn ways_of(&self, index: Index, conn: u32) -> usize {
        let tag = self.pos(index, &key(index, conn)).tag;
        let w = self.bucket(index).ctrl.load(Relaxed);
        (0..NAT_WAYS)
            .filter(|&way| (w >> (8 * way)) as u8 == tag)
            .count()
    }
}

impl TableMemory for Model {
    fn buckets(&self) -> u32 {
        1
    }

    fn capacity(&self) -> u32 {
        RECORDS
    }

    fn pos(&self, index: Index, k: &Tuple) -> NatPos {
        let port = match index {
            Index::Fwd => k.sport.get(),
            Index::Rev => k.dport.get(),
        };
        NatPos {
            home: 0,
            tag: (port as u8 & 0x7f) | TAG_VALID,
        }
    }

    fn ctrl_load(&self, index: Index, _bucket: u32, order: Ordering) -> u64 {
        self.bucket(index).ctrl.load(order)
    }

    fn ctrl_compare_exchange(
        &self,
        index: Index,
        _bucket: u32,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64> {
        self.bucket(index)
            .ctrl
            .compare_exchange(current, new, success, failure)
    }

    fn way_rec_load(&self, index: Index, _bucket: u32, way: usize, order: Ordering) -> u32 {
        self.bucket(index).rec[way].load(order)
    }

    fn state_load(&self, rec: u32, order: Ordering) -> u32 {
        self.records[rec as usize].state.load(order)
    }

    fn state_compare_exchange(
        &self,
        rec: u32,
        current: u32,
        new: u32,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u32, u32> {
        self.records[rec as usize]
            .state
            .compare_exchange(current, new, success, failure)
    }

    /// A plain copy: every word loaded `Relaxed`, as the agent's volatile copy of the mmap.
    fn record_copy(&self, rec: u32) -> Option<NatRecord> {
        let r = self.records.get(rec as usize)?;
        let state = r.state.load(Relaxed);
        let conn = r.conn.load(Relaxed);
        let port = r.port.load(Relaxed);
        let last_seen_ns = r.last_seen.load(Relaxed);
        let entry = SnatEntry {
            port: U16::new(port as u16),
            last_seen_ns,
            ..SnatEntry::default()
        };
        Some(NatRecord {
            state,
            pad: 0,
            fwd_key: fwd_key(conn),
            rev_key: rev_key(conn),
            fwd: entry,
            rev: entry,
        })
    }
}

// ---- the programs' side: table.h with its orderings -------------------------------------------

/// A value-returning BPF atomic: an `smp_mb()`, the operation, an `smp_mb()`.
fn fully_ordered<T>(op: impl FnOnce() -> T) -> T {
    fence(SeqCst);
    let v = op();
    fence(SeqCst);
    v
}

/// `nat_store_release()` on arm64: an xchg, fully ordered.
fn store_release(word: &AtomicU32, v: u32) {
    fully_ordered(|| word.swap(v, SeqCst));
}

/// A plain byte store into a control word (`*(volatile __u8 *)&b->tag[way] = new`): that byte
/// alone changes, with no ordering. The storing program owns the byte (it claimed the way, or
/// found it free under the stripe lock), so it knows the byte's old value: one `Relaxed`
/// `fetch_xor` stores it. (A `Relaxed` load and compare-and-swap would do too, but loom, as of
/// 0.7, then misses the reorderings of the plain stores before it: a relaxed message-passing
/// litmus built so passes.)
fn store_byte(ctrl: &AtomicU64, byte: usize, old: u8, new: u8) {
    ctrl.fetch_xor(u64::from(old ^ new) << (8 * byte), Relaxed);
}

/// `nat_lock()`: a fully ordered cmpxchg, a few tries (a holder is a program, never preempted:
/// it gets on, so loom is told to run it).
fn bpf_lock(lock: &AtomicU32) -> bool {
    for _ in 0..3 {
        if fully_ordered(|| lock.compare_exchange(0, 1, SeqCst, SeqCst)).is_ok() {
            return true;
        }
        thread::yield_now();
    }
    false
}

/// `nat_find()`: the control word, then (address dependency) the record number, then
/// (address dependency) the record; the record's key confirms the match.
fn bpf_find(m: &Model, index: Index, conn: u32) -> Option<(u32, NatRecord)> {
    let k = key(index, conn);
    let tag = m.pos(index, &k).tag;
    let b = m.bucket(index);
    let w = b.ctrl.load(Acquire);
    for way in 0..NAT_WAYS {
        if (w >> (8 * way)) as u8 != tag {
            continue;
        }
        let n = b.rec[way].load(Acquire);
        if let Some(r) = m.record_copy(n)
            && r.fwd_key == fwd_key(conn)
        {
            return Some((n, r));
        }
    }
    None
}

/// `flow_slot_record_close()`'s read of a slot's record by number: its state, then (address
/// dependency on it) the record, when `REC_USED`.
fn bpf_slot_record(m: &Model, rec: u32) -> Option<NatRecord> {
    if m.records[rec as usize].state.load(Acquire) != REC_USED {
        return None;
    }
    m.record_copy(rec)
}

/// `nat_claim()` in the home bucket: the lock, the tuple absent, a free way set `TAG_BUSY`.
/// `Some(way)` with the lock held.
fn bpf_claim(m: &Model, index: Index, conn: u32) -> Option<usize> {
    let lock = m.lock(index);
    if !bpf_lock(lock) {
        return None;
    }
    if bpf_find(m, index, conn).is_some() {
        store_release(lock, 0);
        return None;
    }
    let b = m.bucket(index);
    let w = b.ctrl.load(Relaxed);
    match (0..NAT_WAYS).find(|&way| (w >> (8 * way)) as u8 == TAG_FREE) {
        Some(way) => {
            store_byte(&b.ctrl, way, TAG_FREE, TAG_BUSY);
            Some(way)
        }
        None => {
            store_release(lock, 0);
            None
        }
    }
}

/// `nat_publish()`: the record number (a release), then the tag, then the unlock (a release).
fn bpf_publish(m: &Model, index: Index, way: usize, conn: u32, rec: u32) {
    let b = m.bucket(index);
    store_release(&b.rec[way], rec);
    store_byte(&b.ctrl, way, TAG_BUSY, m.pos(index, &key(index, conn)).tag);
    store_release(m.lock(index), 0);
}

/// `nat_unclaim()`.
fn bpf_unclaim(m: &Model, index: Index, way: usize) {
    store_byte(&m.bucket(index).ctrl, way, TAG_BUSY, TAG_FREE);
    store_release(m.lock(index), 0);
}

/// `nat_record_alloc()` of record `rec`: a plain read of its state, then a fully ordered
/// cmpxchg `REC_FREE` -> `REC_BUSY`.
fn bpf_alloc(m: &Model, rec: u32) -> bool {
    let state = &m.records[rec as usize].state;
    state.load(Relaxed) == REC_FREE
        && fully_ordered(|| state.compare_exchange(REC_FREE, REC_BUSY, SeqCst, SeqCst)).is_ok()
}

/// A record's plain stores (the program writing it while `REC_BUSY`).
fn bpf_write(m: &Model, rec: u32, conn: u32) {
    let r = &m.records[rec as usize];
    r.conn.store(conn, Relaxed);
    r.port.store(port_of(conn), Relaxed);
    r.last_seen.store(WRITTEN_AT, Relaxed);
}

/// `snat_allocate()`'s table steps for connection `conn` in record `rec`: both tuples claimed
/// (reverse, forward), the record allocated and written, `REC_USED` (a release), both ways
/// published. Claims and the record are given back on failure. Whether it inserted.
fn bpf_insert(m: &Model, conn: u32, rec: u32) -> bool {
    let Some(rev_way) = bpf_claim(m, Index::Rev, conn) else {
        return false;
    };
    let Some(fwd_way) = bpf_claim(m, Index::Fwd, conn) else {
        bpf_unclaim(m, Index::Rev, rev_way);
        return false;
    };
    if !bpf_alloc(m, rec) {
        bpf_unclaim(m, Index::Fwd, fwd_way);
        bpf_unclaim(m, Index::Rev, rev_way);
        return false;
    }
    bpf_write_and_publish(m, conn, rec, rev_way, fwd_way);
    true
}

/// The steps of [`bpf_insert`] after its claims and its allocation: the record written,
/// `REC_USED`, both ways published.
fn bpf_write_and_publish(m: &Model, conn: u32, rec: u32, rev_way: usize, fwd_way: usize) {
    bpf_write(m, rec, conn);
    store_release(&m.records[rec as usize].state, REC_USED);
    bpf_publish(m, Index::Rev, rev_way, conn, rec);
    bpf_publish(m, Index::Fwd, fwd_way, conn, rec);
}

/// A model where a program has claimed both ways of connection 1 and allocated record 0 (its
/// home stripes' locks held), before any thread starts.
///
/// The publication cases start here rather than at the claims: loom 0.7's exploration misses a
/// race between one thread's load of a word and another's read-modify-write of it when that
/// other thread loaded the word first (a claim reads the control word, then sets its way's
/// byte): with the claims in the thread, relaxing `nat_store_release()` went unnoticed, a loom
/// model of that shape explored a single interleaving. The claims' own race is case 2's.
fn claimed_connection_1() -> (Arc<Model>, usize, usize) {
    let m = Model::new();
    let rev_way = bpf_claim(&m, Index::Rev, 1).unwrap();
    let fwd_way = bpf_claim(&m, Index::Fwd, 1).unwrap();
    assert!(bpf_alloc(&m, 0));
    (Arc::new(m), rev_way, fwd_way)
}

/// Whether a copy is connection `conn`'s record as its program wrote it.
fn written(r: &NatRecord, conn: u32) -> bool {
    r.fwd_key == fwd_key(conn)
        && u32::from(r.fwd.port.get()) == port_of(conn)
        && r.fwd.last_seen_ns >= WRITTEN_AT
}

/// A model with connection 1 inserted in record 0 before any thread starts.
fn with_connection_1() -> Arc<Model> {
    let m = Model::new();
    assert!(bpf_insert(&m, 1, 0));
    Arc::new(m)
}

/// Runs `f` on a thread of its own with the model.
fn spawn<T: Send + 'static>(
    m: &Arc<Model>,
    f: impl FnOnce(&Model) -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let m = m.clone();
    thread::spawn(move || f(&m))
}

// ---- the cases ----------------------------------------------------------------------------------

/// Case 1, publication vs lookup, the agent's lookup (`SnatTable::find`): a lookup that finds
/// the connection sees its record as written, never the record's old contents.
#[test]
fn case1_publication_vs_agent_lookup() {
    loom::model(|| {
        let (m, rev_way, fwd_way) = claimed_connection_1();
        let p0 = spawn(&m, move |m| {
            bpf_write_and_publish(m, 1, 0, rev_way, fwd_way)
        });
        for index in [Index::Fwd, Index::Rev] {
            if let Some((rec, r)) = nat_protocol::find(&*m, index, &key(index, 1)) {
                assert_eq!(rec, 0);
                assert!(written(&r, 1), "found before written: {r:?}");
                assert_eq!(r.state, REC_USED);
            }
        }
        p0.join().unwrap();
    });
}

/// Case 1, a program's lookup (address dependencies): as above.
#[test]
fn case1_publication_vs_program_lookup() {
    loom::model(|| {
        let (m, rev_way, fwd_way) = claimed_connection_1();
        let p0 = spawn(&m, move |m| {
            bpf_write_and_publish(m, 1, 0, rev_way, fwd_way)
        });
        if let Some((_, r)) = bpf_find(&m, Index::Rev, 1) {
            assert!(written(&r, 1), "found before written: {r:?}");
        }
        p0.join().unwrap();
    });
}

/// Case 2, two inserts of one tuple on two CPUs: one inserts, the other finds it (under the
/// stripe lock the first released) and gives up; each index holds the tuple once.
#[test]
fn case2_two_inserts_of_one_tuple() {
    loom::model(|| {
        let m = Arc::new(Model::new());
        let p1 = spawn(&m, move |m| bpf_insert(m, 1, 1));
        let first = bpf_insert(&m, 1, 0);
        let second = p1.join().unwrap();
        assert!(first || second, "a lock holder always inserts");
        assert!(!(first && second), "the tuple was inserted twice");
        assert_eq!(m.ways_of(Index::Fwd, 1), 1);
        assert_eq!(m.ways_of(Index::Rev, 1), 1);
    });
}

/// Case 3, the sweeper's walk (`SnatTable::reclaim_and_pick`, which frees dead records as it
/// summarizes live ones and copies those it picks) reads a record by its state while a program
/// writes it: a record counted live is summarized and copied as written.
#[test]
fn case3_sweeper_reads_a_record_being_written() {
    loom::model(|| {
        let m = Model::new();
        assert!(bpf_alloc(&m, 0));
        let m = Arc::new(m);
        let p0 = spawn(&m, move |m| {
            bpf_write(m, 0, 1);
            store_release(&m.records[0].state, REC_USED);
        });
        let (freed, live, picked) = nat_protocol::reclaim_and_pick(&*m, |s| {
            assert!(
                s.last_seen_ns >= WRITTEN_AT,
                "summarized before written: {s:?}"
            );
            true
        });
        assert_eq!(freed, 0);
        assert_eq!(live, picked.len());
        for (rec, r) in picked {
            assert_eq!(rec, 0);
            assert!(written(&r, 1), "copied before written: {r:?}");
        }
        p0.join().unwrap();
    });
}

/// Case 4, a record given back (an insert that failed after its allocation) and allocated again
/// at once by another CPU: none of the first writer's stores lands after the second's.
#[test]
fn case4_record_given_back_then_allocated_again() {
    loom::model(|| {
        let m = Arc::new(Model::new());
        assert!(bpf_alloc(&m, 0));
        let p0 = spawn(&m, move |m| {
            bpf_write(m, 0, 1);
            store_release(&m.records[0].state, REC_FREE);
        });
        let again = bpf_alloc(&m, 0);
        if again {
            bpf_write(&m, 0, 2);
        }
        p0.join().unwrap();
        if again {
            let r = m.record_copy(0).unwrap();
            assert!(
                written(&r, 2),
                "the first writer's store landed late: {r:?}"
            );
        }
    });
}

/// Case 7, a flow-cache slot's record (`flow_slot_record_close()`): a program reads, by its
/// number, the record a slot was copied from while another program allocates that record for a
/// new connection (the slot's own was swept and freed meanwhile; its words are still the old
/// connection's). A reader that sees `REC_USED` sees the new connection's record whole, never a
/// mix of the two: its tuple then fails the slot's compare. (A reader that sees the old
/// connection's `REC_USED` is case 5's grace period: no sweep passes within one program run.)
#[test]
fn case7_slot_record_vs_reallocation() {
    loom::model(|| {
        // Record 0 held connection 1 and was freed; a program has just allocated it again (the
        // allocation before the threads, as in case 3: see claimed_connection_1()).
        let m = Model::new();
        bpf_write(&m, 0, 1);
        assert!(bpf_alloc(&m, 0));
        let m = Arc::new(m);
        let p0 = spawn(&m, move |m| {
            bpf_write(m, 0, 2);
            store_release(&m.records[0].state, REC_USED);
        });
        if let Some(r) = bpf_slot_record(&m, 0) {
            assert!(written(&r, 2), "a mix of two connections: {r:?}");
        }
        p0.join().unwrap();
    });
}

/// Case 5, removal then reuse: the agent unindexes a record and frees it (`unindex_if`,
/// `reclaim`) while a program allocates records; a program whose allocation takes the freed
/// record sees the old connection's ways gone (it cannot find the old tuple and reach the record
/// it is now writing).
#[test]
fn case5_removal_then_reallocation() {
    loom::model(|| {
        let m = with_connection_1();
        let sweeper = spawn(&m, move |m| {
            assert!(nat_protocol::unindex_if(m, 0, |_| true));
            assert_eq!(nat_protocol::reclaim(m), 1);
        });
        if bpf_alloc(&m, 0) {
            assert!(
                bpf_find(&m, Index::Fwd, 1).is_none(),
                "a freed record is still indexed"
            );
            assert!(bpf_find(&m, Index::Rev, 1).is_none());
        }
        sweeper.join().unwrap();
    });
}

/// The sweeper removing one connection while a program inserts another in the same buckets
/// (its claim's `TAG_BUSY` and its tag are stores into the control words the sweeper swaps):
/// the removal takes away the removed connection's ways only, the new connection is indexed in
/// both, and the reclaim frees the dead record only, never the one the program claimed.
#[test]
fn sweep_vs_insert_in_the_same_bucket() {
    loom::model(|| {
        let m = with_connection_1();
        let sweeper = spawn(&m, move |m| {
            assert!(nat_protocol::unindex_if(m, 0, |_| true));
            nat_protocol::reclaim(m);
        });
        assert!(bpf_insert(&m, 2, 1));
        sweeper.join().unwrap();
        for index in [Index::Fwd, Index::Rev] {
            assert_eq!(
                m.ways_of(index, 1),
                0,
                "the removed connection is still indexed"
            );
            assert_eq!(
                m.ways_of(index, 2),
                1,
                "the removal undid the insert's ways"
            );
            let (rec, r) = nat_protocol::find(&*m, index, &key(index, 2)).unwrap();
            assert_eq!(rec, 1);
            assert!(written(&r, 2));
        }
        assert_eq!(m.state_load(1, Relaxed), REC_USED);
        assert_ne!(m.state_load(0, Relaxed), REC_USED);
    });
}

/// The sweeper expiring a connection (decided on an old copy, re-checked by `unindex_if`)
/// while a program's packet refreshes it: either the re-check sees the refresh and the record
/// stays (live, indexed both ways), or it is removed whole (dead, indexed nowhere), never
/// half; and a record the sweeper kept is one the program refreshed.
#[test]
fn sweep_vs_refresh() {
    loom::model(|| {
        let m = with_connection_1();
        let p0 = spawn(&m, move |m| {
            if let Some((rec, _)) = bpf_find(m, Index::Fwd, 1) {
                m.records[rec as usize]
                    .last_seen
                    .store(REFRESHED_AT, Relaxed);
            }
        });
        let removed = nat_protocol::unindex_if(&*m, 0, |now| now.last_seen_ns() < REFRESHED_AT);
        p0.join().unwrap();
        let state = m.state_load(0, Relaxed);
        let ways = (m.ways_of(Index::Fwd, 1), m.ways_of(Index::Rev, 1));
        if removed {
            assert_eq!((state, ways), (REC_DEAD, (0, 0)));
        } else {
            assert_eq!((state, ways), (REC_USED, (1, 1)));
            assert_eq!(m.records[0].last_seen.load(Relaxed), REFRESHED_AT);
        }
    });
}
