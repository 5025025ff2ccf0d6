//! The agent's side of the SNAT table's concurrency protocol (bpf/table.h; docs/datapath.md,
//! "Memory ordering"): lookups, the listing of live records, removal (`unindex`) and reclaiming,
//! with the orderings each access needs against the programs' fully ordered atomics. It is
//! written against [`TableMemory`], the words of the table and how they are read and swapped,
//! so that the same code runs over the maps' memory ([`crate::nat_table::SnatTable`]) and over
//! loom's model of it (`tests/loom_nat_table.rs`, built with `--cfg loom`), which checks it
//! against every interleaving and reordering of a program inserting or refreshing concurrently.

use std::sync::atomic::Ordering;

use crate::maps::{NAT_PROBE_BUCKETS, NAT_WAYS, NatRecord, REC_DEAD, REC_FREE, REC_USED, Tuple};
use crate::nat_table::{Index, NatPos};

/// The words of the SNAT table the protocol reads and writes, as atomics with explicit
/// orderings (over the mmap: `AtomicU64`/`AtomicU32` of its words), and the records as copies
/// (plain data: a record being written may read torn, which is why callers go by its state).
pub trait TableMemory {
    /// Buckets of each index.
    fn buckets(&self) -> u32;
    /// Records the table holds.
    fn capacity(&self) -> u32;
    /// Where tuple `k` lives in `index` (the programs' hashing).
    fn pos(&self, index: Index, k: &Tuple) -> NatPos;
    /// A bucket's control word (the ways' tag bytes, the overflow flag).
    fn ctrl_load(&self, index: Index, bucket: u32, order: Ordering) -> u64;
    /// A compare-and-swap of a bucket's control word.
    fn ctrl_compare_exchange(
        &self,
        index: Index,
        bucket: u32,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> std::result::Result<u64, u64>;
    /// A way's record number.
    fn way_rec_load(&self, index: Index, bucket: u32, way: usize, order: Ordering) -> u32;
    /// A record's state word (`REC_*`).
    fn state_load(&self, rec: u32, order: Ordering) -> u32;
    /// A compare-and-swap of a record's state word.
    fn state_compare_exchange(
        &self,
        rec: u32,
        current: u32,
        new: u32,
        success: Ordering,
        failure: Ordering,
    ) -> std::result::Result<u32, u32>;
    /// A copy of record `rec` (any state; plain loads), `None` past the table.
    fn record_copy(&self, rec: u32) -> Option<NatRecord>;
    /// What a sweep pass decides on of record `rec` (any state; plain loads of its words),
    /// `None` past the table. By default, from a whole copy.
    fn record_summary(&self, rec: u32) -> Option<RecordSummary> {
        self.record_copy(rec).map(|r| RecordSummary::of(&r))
    }
}

/// The fields of a record a sweep pass decides on, which it reads without copying the record:
/// whether the record is live, and whether its connection has expired or its service is still
/// to resolve (the pass then copies it whole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordSummary {
    /// `REC_*`.
    pub state: u32,
    /// The forward tuple's IP protocol.
    pub proto: u8,
    /// Both directions' `STATE_*` bits.
    pub state_bits: u8,
    /// The forward entry's `SNAT_F_*`.
    pub fwd_flags: u8,
    /// The later of both directions' last packet (CLOCK_MONOTONIC ns).
    pub last_seen_ns: u64,
}

impl RecordSummary {
    /// The summary of a record.
    pub fn of(r: &NatRecord) -> RecordSummary {
        RecordSummary {
            state: r.state,
            proto: r.fwd_key.proto,
            state_bits: r.state_bits(),
            fwd_flags: r.fwd.flags,
            last_seen_ns: r.last_seen_ns(),
        }
    }
}

/// The bucket after `bucket` (wrapping).
pub fn next_bucket<M: TableMemory + ?Sized>(m: &M, bucket: u32) -> u32 {
    if bucket + 1 >= m.buckets() {
        0
    } else {
        bucket + 1
    }
}

/// A way's tag byte. `Acquire`: a tag read before a record number orders that read after it
/// (case 1 of docs/datapath.md: the programs' dependency, this side's acquire).
pub fn tag<M: TableMemory + ?Sized>(m: &M, index: Index, bucket: u32, way: usize) -> u8 {
    (m.ctrl_load(index, bucket, Ordering::Acquire) >> (8 * way)) as u8
}

/// Whether a bucket's overflow flag (byte `NAT_WAYS` of its control word) is set.
pub fn overflowed<M: TableMemory + ?Sized>(m: &M, index: Index, bucket: u32) -> bool {
    (m.ctrl_load(index, bucket, Ordering::Acquire) >> (8 * NAT_WAYS)) as u8 != 0
}

/// Sets byte `byte` of a bucket's control word to `new` if it is `expected` (any when `None`),
/// with a compare-and-swap of the whole word: programs store other bytes of it meanwhile (a claim's
/// `TAG_BUSY`, a publication's tag), and a plain store would undo theirs.
pub fn set_ctrl_byte<M: TableMemory + ?Sized>(
    m: &M,
    index: Index,
    bucket: u32,
    byte: usize,
    expected: Option<u8>,
    new: u8,
) -> bool {
    let shift = 8 * byte;
    let mut current = m.ctrl_load(index, bucket, Ordering::Acquire);
    loop {
        if expected.is_some_and(|e| (current >> shift) as u8 != e) {
            return false;
        }
        let next = (current & !(0xff << shift)) | (u64::from(new) << shift);
        match m.ctrl_compare_exchange(
            index,
            bucket,
            current,
            next,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => return true,
            Err(actual) => current = actual,
        }
    }
}

/// The record tuple `k` is indexed under in `index`: (number, copy). Control word, then record
/// number, then record, each read after the one before (`Acquire`), so a way whose tag is seen
/// has its record number and record seen too (case 1).
pub fn find<M: TableMemory + ?Sized>(m: &M, index: Index, k: &Tuple) -> Option<(u32, NatRecord)> {
    let pos = m.pos(index, k);
    let mut bucket = pos.home;
    for _ in 0..NAT_PROBE_BUCKETS {
        for way in 0..NAT_WAYS {
            if tag(m, index, bucket, way) != pos.tag {
                continue;
            }
            let rec = m.way_rec_load(index, bucket, way, Ordering::Acquire);
            if let Some(r) = m.record_copy(rec) {
                let key = match index {
                    Index::Fwd => r.fwd_key,
                    Index::Rev => r.rev_key,
                };
                if key == *k {
                    return Some((rec, r));
                }
            }
        }
        if !overflowed(m, index, bucket) {
            return None;
        }
        bucket = next_bucket(m, bucket);
    }
    None
}

/// Every live record ([`REC_USED`]) with its number: its state read (`Acquire`) before its copy,
/// so the copy is the record as written before the program published it (case 3), and the copy's
/// own state checked again.
pub fn live_records<M: TableMemory + ?Sized>(m: &M) -> Vec<(u32, NatRecord)> {
    let mut live = Vec::new();
    for rec in 0..m.capacity() {
        if m.state_load(rec, Ordering::Acquire) == REC_USED
            && let Some(r) = live_copy(m, rec)
        {
            live.push((rec, r));
        }
    }
    live
}

/// A sweep pass's walk of the state words: each record read [`REC_DEAD`] is freed, each
/// [`REC_USED`] one summarized ([`TableMemory::record_summary`], after its state's `Acquire`
/// load, as [`live_records`] copies) and copied whole only when `pick` says the pass has work
/// with it (the copy's own state checked again). Returns the number freed, the number live and
/// the picked copies.
pub fn reclaim_and_pick<M: TableMemory + ?Sized>(
    m: &M,
    mut pick: impl FnMut(&RecordSummary) -> bool,
) -> (usize, usize, Vec<(u32, NatRecord)>) {
    let (mut freed, mut live) = (0, 0);
    let mut picked = Vec::new();
    for rec in 0..m.capacity() {
        match m.state_load(rec, Ordering::Acquire) {
            REC_USED => {
                let Some(summary) = m.record_summary(rec).filter(|s| s.state == REC_USED) else {
                    continue;
                };
                live += 1;
                if pick(&summary)
                    && let Some(r) = live_copy(m, rec)
                {
                    picked.push((rec, r));
                }
            }
            REC_DEAD if free_dead(m, rec) => freed += 1,
            _ => {}
        }
    }
    (freed, live, picked)
}

/// A copy of record `rec`, whose state was read [`REC_USED`] (`Acquire`), if the copy's own
/// state says so too.
fn live_copy<M: TableMemory + ?Sized>(m: &M, rec: u32) -> Option<NatRecord> {
    m.record_copy(rec).filter(|r| r.state == REC_USED)
}

/// Removes record `rec` from both indexes (each way's tag byte cleared by a compare-and-swap)
/// and marks it [`REC_DEAD`], if `still` holds for a copy of it read now (the sweeper's re-check
/// of a decision made on an older copy). `false` when it was not live or `still` said no.
pub fn unindex_if<M: TableMemory + ?Sized>(
    m: &M,
    rec: u32,
    still: impl FnOnce(&NatRecord) -> bool,
) -> bool {
    let Some(r) = m.record_copy(rec) else {
        return false;
    };
    if r.state != REC_USED || !still(&r) {
        return false;
    }
    unindex_way(m, Index::Fwd, &r.fwd_key, rec);
    unindex_way(m, Index::Rev, &r.rev_key, rec);
    m.state_compare_exchange(rec, REC_USED, REC_DEAD, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
}

/// Clears the way of `index` that indexes record `rec` under tuple `k`, if any.
fn unindex_way<M: TableMemory + ?Sized>(m: &M, index: Index, k: &Tuple, rec: u32) {
    let pos = m.pos(index, k);
    let mut bucket = pos.home;
    for _ in 0..NAT_PROBE_BUCKETS {
        for way in 0..NAT_WAYS {
            if m.way_rec_load(index, bucket, way, Ordering::Acquire) == rec
                && set_ctrl_byte(m, index, bucket, way, Some(pos.tag), crate::maps::TAG_FREE)
            {
                return;
            }
        }
        bucket = next_bucket(m, bucket);
    }
}

/// Frees every dead record ([`REC_DEAD`] → [`REC_FREE`]); returns how many. A release (of the
/// compare-and-swap) after the ways' clearing: a program whose allocation reads `REC_FREE` sees
/// the ways cleared (case 5). Only a record read dead is swapped: a compare-and-swap takes its
/// cache line exclusive, failed or not, from every CPU whose program reads the record.
pub fn reclaim<M: TableMemory + ?Sized>(m: &M) -> usize {
    (0..m.capacity())
        .filter(|&rec| m.state_load(rec, Ordering::Relaxed) == REC_DEAD && free_dead(m, rec))
        .count()
}

/// Frees record `rec`, read dead: [`REC_DEAD`] → [`REC_FREE`] by a compare-and-swap whose
/// release orders the ways' clearing before it ([`reclaim`]). `false` if it was no longer dead.
fn free_dead<M: TableMemory + ?Sized>(m: &M, rec: u32) -> bool {
    m.state_compare_exchange(rec, REC_DEAD, REC_FREE, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
}
