//! The SNAT table as the agent, `inspect` and the tests see it: `snat_records`, `snat_fwd`,
//! `snat_rev` and `snat_locks` (bpf/table.h) mapped into memory (they are `BPF_F_MMAPABLE`
//! arrays), with the programs' hashing and rules mirrored so records can be listed, found,
//! removed and, by tests and benchmarks, inserted.
//!
//! Concurrency follows table.h: programs insert (stripe locks, tag bytes written under them),
//! this side never takes a lock except in [`SnatTable::insert`] (tests and benchmarks only: a lock
//! held by a preempted process would make a program give up its insert). Removal is
//! [`SnatTable::unindex`] (each way's tag byte cleared by a compare-and-swap of its bucket's
//! control word, the record marked dead) then, one sweep later, [`SnatTable::reclaim`] (dead
//! records freed), so a program that found a record just before it was unindexed is done with it
//! before it is reused. Records are read with volatile copies: a record being written may read
//! torn, which is why callers go by its state and re-check. Lookups, listing, removal and
//! reclaiming are [`crate::nat_protocol`]'s code run over the mapped words (this type is its
//! [`TableMemory`]), the code loom checks (tests/loom_nat_table.rs).

use std::ffi::c_void;
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use libbpf_rs::{MapCore, MapHandle};
use zerocopy::{FromBytes, IntoBytes};

use crate::error::{Error, Result};
use crate::maps::{
    NAT_LOCK_STRIPES, NAT_PROBE_BUCKETS, NAT_WAYS, NatBucket, NatRecord, REC_BUSY, REC_DEAD,
    REC_FREE, REC_USED, SnatEntry, TAG_BUSY, TAG_FREE, TAG_VALID, Tuple,
};
use crate::nat_protocol::{self, RecordSummary, TableMemory};

/// The odd constants of `tuple_hash()` (table.h), one per 32-bit word of a tuple.
const HASH_MULTIPLIERS: [u64; 10] = [
    0x9E37_79B9_7F4A_7C15,
    0xC2B2_AE3D_27D4_EB4F,
    0x1656_67B1_9E37_79F9,
    0xD6E8_FEB8_6659_FD93,
    0xFF51_AFD7_ED55_8CCD,
    0xC4CE_B9FE_1A85_EC53,
    0x94D0_49BB_1331_11EB,
    0xBF58_476D_1CE4_E5B9,
    0x2545_F491_4F6C_DD1D,
    0x9FB2_1C65_1E98_DF25,
];

/// `tuple_hash()`: the seeded 64-bit hash of a tuple's ten native-endian words.
pub fn tuple_hash(t: &Tuple, seed: u32) -> u64 {
    let bytes = t.as_bytes();
    let mut h = (u64::from(seed) << 32) | u64::from(seed);
    for (i, word) in bytes.chunks_exact(4).enumerate() {
        let w = u32::from_ne_bytes([word[0], word[1], word[2], word[3]]);
        h = h.wrapping_add(u64::from(w).wrapping_mul(HASH_MULTIPLIERS[i]));
    }
    h
}

/// Which index of the table: by forward tuple (`snat_fwd`) or by reply tuple (`snat_rev`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Index {
    /// `snat_fwd`: records by the tuple as the packet leaves.
    Fwd,
    /// `snat_rev`: records by the tuple as the reply arrives.
    Rev,
}

impl Index {
    fn name(self) -> &'static str {
        match self {
            Index::Fwd => "forward",
            Index::Rev => "reverse",
        }
    }
}

/// Where a tuple lives in an index (`struct nat_pos`): home bucket and way tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatPos {
    /// The home bucket.
    pub home: u32,
    /// The tag byte of a way indexing the tuple.
    pub tag: u8,
}

fn tag_of(h: u64) -> u8 {
    (h as u8 & 0x7f) | TAG_VALID
}

/// A map mapped into memory (unmapped on drop).
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    entries: u32,
    /// Bytes from one element to the next: the value size rounded up to 8, as the kernel lays
    /// out an array (`snat_locks`' 4-byte words are 8 bytes apart).
    stride: usize,
}

// SAFETY: the mapping is plain shared memory; every access through it is a volatile copy or an
// atomic, so sharing it between threads is as safe as sharing it with the kernel.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(crate) fn new(handle: &MapHandle, value_size: usize) -> Result<Mapping> {
        let name = handle.name().to_string_lossy().into_owned();
        if handle.value_size() as usize != value_size || handle.key_size() != 4 {
            return Err(Error::MapLayout {
                map: name,
                key_size: handle.key_size(),
                value_size: handle.value_size(),
                expected_key: 4,
                expected_value: value_size,
            });
        }
        let entries = handle.max_entries();
        // An array's elements are value_size rounded up to 8 bytes apart; a mapping covers
        // whole pages.
        let stride = value_size.next_multiple_of(8);
        let page = 4096usize;
        let len = (entries as usize * stride).div_ceil(page) * page;
        // SAFETY: mapping a BPF array map's fd shared and read-write, at offset 0 and no longer
        // than its data, is what BPF_F_MMAPABLE allows; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                handle.as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Mmap {
                map: name,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| Error::Mmap {
            map: name,
            source: std::io::Error::other("mmap returned NULL"),
        })?;
        Ok(Mapping {
            ptr,
            len,
            entries,
            stride,
        })
    }

    /// Element `index` as a `T` (the caller keeps index below `entries`; `T` is the map's
    /// value type, checked in [`Mapping::new`]).
    pub(crate) fn element<T>(&self, index: u32) -> *mut T {
        debug_assert!(index < self.entries);
        debug_assert!(size_of::<T>() <= self.stride);
        // SAFETY: index < entries keeps the offset inside the mapping.
        unsafe {
            self.ptr
                .as_ptr()
                .add(index as usize * self.stride)
                .cast::<T>()
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast::<c_void>(), self.len);
        }
    }
}

/// A 32-bit word of a mapping as an atomic.
///
/// # Safety
/// `word` points into a live mapping, 4-byte aligned.
unsafe fn atomic<'a>(word: *mut u32) -> &'a AtomicU32 {
    // SAFETY: the caller's contract; AtomicU32 has u32's layout.
    unsafe { AtomicU32::from_ptr(word) }
}

/// The maps of the SNAT table, before they are mapped.
pub struct SnatHandles {
    /// `snat_records`.
    pub records: MapHandle,
    /// `snat_fwd`.
    pub fwd: MapHandle,
    /// `snat_rev`.
    pub rev: MapHandle,
    /// `snat_locks`.
    pub locks: MapHandle,
}

/// The SNAT table (its mapped maps plus the hash seed the programs use).
#[derive(Debug)]
pub struct SnatTable {
    records: Mapping,
    fwd: Mapping,
    rev: Mapping,
    locks: Mapping,
    seed: u32,
}

impl SnatTable {
    /// Maps the table's maps. `seed` is `config.nat_seed`; the index maps must have the same
    /// bucket count.
    pub fn open(handles: &SnatHandles, seed: u32) -> Result<SnatTable> {
        Ok(SnatTable {
            records: Mapping::new(&handles.records, size_of::<NatRecord>())?,
            fwd: Mapping::new(&handles.fwd, size_of::<NatBucket>())?,
            rev: Mapping::new(&handles.rev, size_of::<NatBucket>())?,
            locks: Mapping::new(&handles.locks, size_of::<u32>())?,
            seed,
        })
    }

    /// The hash seed.
    pub fn seed(&self) -> u32 {
        self.seed
    }

    /// Records the table can hold.
    pub fn capacity(&self) -> u32 {
        self.records.entries
    }

    /// Buckets of each index.
    pub fn buckets(&self) -> u32 {
        self.fwd.entries
    }

    /// `nat_pos_fwd()`.
    pub fn pos_fwd(&self, k: &Tuple) -> NatPos {
        let h = tuple_hash(k, self.seed);
        NatPos {
            home: (((h >> 32) * u64::from(self.buckets())) >> 32) as u32,
            tag: tag_of(h),
        }
    }

    /// `nat_pos_rev()`: the hash without the destination port, the home bucket moved on by it.
    pub fn pos_rev(&self, k: &Tuple) -> NatPos {
        let mut base = *k;
        base.dport = zerocopy::byteorder::network_endian::U16::new(0);
        let h = tuple_hash(&base, self.seed);
        let port = u64::from(k.dport.get());
        let buckets = u64::from(self.buckets()).max(1);
        NatPos {
            home: (((((h >> 32) * buckets) >> 32) + port) % buckets) as u32,
            tag: tag_of(h.wrapping_add(port.wrapping_mul(HASH_MULTIPLIERS[0]))),
        }
    }

    fn index(&self, index: Index) -> &Mapping {
        match index {
            Index::Fwd => &self.fwd,
            Index::Rev => &self.rev,
        }
    }

    fn bucket(&self, index: Index, bucket: u32) -> *mut NatBucket {
        self.index(index).element::<NatBucket>(bucket)
    }

    /// A bucket's control word (its first 8 bytes: the ways' tag bytes, the overflow flag).
    fn ctrl(&self, index: Index, bucket: u32) -> &AtomicU64 {
        let b = self.bucket(index, bucket);
        // SAFETY: b is an element of a live mapping, 8-byte aligned (32-byte elements from a
        // page-aligned start); its first 8 bytes are the control word.
        unsafe { AtomicU64::from_ptr(b.cast::<u64>()) }
    }

    fn way_rec(&self, index: Index, bucket: u32, way: usize) -> &AtomicU32 {
        let b = self.bucket(index, bucket);
        // SAFETY: b is an element of a live mapping; rec is 4-byte aligned inside it.
        unsafe { atomic(std::ptr::addr_of_mut!((*b).rec[way])) }
    }

    /// The lock word of a bucket's stripe in `snat_locks` (0: free, 1: held). Tests hold one
    /// (store 1) to stand for a program preempted in the middle of an insert; nothing else here
    /// touches it outside [`SnatTable::insert`].
    pub fn stripe_lock(&self, index: Index, bucket: u32) -> &AtomicU32 {
        self.stripe(index, bucket)
    }

    /// Stripe lock words of each index (`NAT_LOCK_STRIPES`).
    pub fn stripes(&self) -> u32 {
        NAT_LOCK_STRIPES
    }

    /// The lock of a bucket's stripe.
    fn stripe(&self, index: Index, bucket: u32) -> &AtomicU32 {
        let base = match index {
            Index::Fwd => 0,
            Index::Rev => NAT_LOCK_STRIPES,
        };
        let word = self.locks.element::<u32>(base + bucket % NAT_LOCK_STRIPES);
        // SAFETY: an element of the live locks mapping (2 * NAT_LOCK_STRIPES of them).
        unsafe { atomic(word) }
    }

    fn record_state(&self, rec: u32) -> &AtomicU32 {
        let r = self.records.element::<NatRecord>(rec);
        // SAFETY: r is an element of a live mapping.
        unsafe { atomic(std::ptr::addr_of_mut!((*r).state)) }
    }

    /// A copy of record `rec` (any state), `None` past the table: a relaxed atomic load of each
    /// of its 8-byte words (possibly torn while a program writes it). A volatile read of the
    /// struct compiled to a copy about 500 instructions long; the sweeper copies every live
    /// record each pass.
    pub fn record(&self, rec: u32) -> Option<NatRecord> {
        if rec >= self.capacity() {
            return None;
        }
        const _: () = assert!(size_of::<NatRecord>().is_multiple_of(8));
        let base = self.records.element::<u64>(rec);
        let mut words = [0u64; size_of::<NatRecord>() / 8];
        for (i, word) in words.iter_mut().enumerate() {
            // SAFETY: rec < capacity and i < the record's words keep the address inside the
            // mapping's element; elements are 8-byte aligned (the stride is the record's size,
            // a multiple of 8, from a page-aligned mapping); AtomicU64 has u64's layout.
            *word = unsafe { AtomicU64::from_ptr(base.add(i)) }.load(Ordering::Relaxed);
        }
        NatRecord::read_from_bytes(words.as_bytes()).ok()
    }

    /// Every live record ([`REC_USED`]) with its number.
    pub fn records(&self) -> Vec<(u32, NatRecord)> {
        nat_protocol::live_records(self)
    }

    /// How many records are in each state: (used, busy, dead, free).
    pub fn occupancy(&self) -> (usize, usize, usize, usize) {
        let mut counts = (0, 0, 0, 0);
        for rec in 0..self.capacity() {
            match self.record_state(rec).load(Ordering::Relaxed) {
                REC_USED => counts.0 += 1,
                REC_BUSY => counts.1 += 1,
                REC_DEAD => counts.2 += 1,
                _ => counts.3 += 1,
            }
        }
        counts
    }

    /// The record tuple `k` is indexed under in `index`: (number, copy).
    pub fn find(&self, index: Index, k: &Tuple) -> Option<(u32, NatRecord)> {
        nat_protocol::find(self, index, k)
    }

    /// The forward entry of the connection leaving as `k` (egress's lookup).
    pub fn lookup_fwd(&self, k: &Tuple) -> Option<SnatEntry> {
        self.find(Index::Fwd, k).map(|(_, r)| r.fwd)
    }

    /// The reverse entry of the reply arriving as `k` (ingress's lookup).
    pub fn lookup_rev(&self, k: &Tuple) -> Option<SnatEntry> {
        self.find(Index::Rev, k).map(|(_, r)| r.rev)
    }

    /// Ways of an index holding a record.
    pub fn index_len(&self, index: Index) -> usize {
        (0..self.buckets())
            .map(|bucket| {
                (0..NAT_WAYS)
                    .filter(|&way| nat_protocol::tag(self, index, bucket, way) & TAG_VALID != 0)
                    .count()
            })
            .sum()
    }

    /// A copy of a bucket of an index, `None` past it.
    pub fn bucket_copy(&self, index: Index, bucket: u32) -> Option<NatBucket> {
        if bucket >= self.buckets() {
            return None;
        }
        // SAFETY: bucket < buckets; a volatile copy of plain data.
        Some(unsafe { std::ptr::read_volatile(self.bucket(index, bucket)) })
    }

    /// Live records.
    pub fn len(&self) -> usize {
        self.occupancy().0
    }

    /// Whether no record is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes record `rec` from both indexes and marks it dead ([`SnatTable::reclaim`] frees
    /// it later). `false` when it was not live (already removed, or never written).
    pub fn unindex(&self, rec: u32) -> bool {
        self.unindex_if(rec, |_| true)
    }

    /// [`SnatTable::unindex`] if `still` holds for a copy of the record read now: a caller that
    /// decided on an older copy (the sweeper, on the copy its pass started from) re-checks what
    /// the programs may have changed since (a SYN reopening a closed connection, a packet
    /// refreshing it). The remaining window is this re-check to the indexes' update.
    pub fn unindex_if(&self, rec: u32, still: impl FnOnce(&NatRecord) -> bool) -> bool {
        nat_protocol::unindex_if(self, rec, still)
    }

    /// Frees every dead record; returns how many.
    pub fn reclaim(&self) -> usize {
        nat_protocol::reclaim(self)
    }

    /// A sweep pass's one walk of the records' state words ([`nat_protocol::reclaim_and_pick`]):
    /// frees dead records, counts the live ones and copies those `pick` says the pass has work
    /// with, deciding on six words of each instead of its copy. Returns the number freed, the
    /// number live and the copies.
    pub fn reclaim_and_pick(
        &self,
        pick: impl FnMut(&RecordSummary) -> bool,
    ) -> (usize, usize, Vec<(u32, NatRecord)>) {
        nat_protocol::reclaim_and_pick(self, pick)
    }

    /// Sets the resolution of record `rec` (the agent's join with `conns`): `flags` ORed into
    /// both entries' flags, `svc_id` written. The flags byte shares a 32-bit word with the port and
    /// state (which programs OR bits into), so the OR is atomic.
    pub fn resolve(&self, rec: u32, svc_id: u32, flags: u8) {
        if rec >= self.capacity() {
            return;
        }
        let r = self.records.element::<NatRecord>(rec);
        for entry in [
            // SAFETY: fields of an element of a live mapping.
            unsafe { std::ptr::addr_of_mut!((*r).fwd) },
            // SAFETY: as above.
            unsafe { std::ptr::addr_of_mut!((*r).rev) },
        ] {
            // SAFETY: entry points into the mapping; `port` is at offset 16 of a 40-byte entry
            // that is 8-byte aligned, so the word holding port, state and flags is aligned.
            unsafe {
                std::ptr::write_volatile(std::ptr::addr_of_mut!((*entry).svc_id), svc_id);
                let word = atomic(std::ptr::addr_of_mut!((*entry).port).cast::<u32>());
                word.fetch_or(u32::from_ne_bytes([0, 0, 0, flags]), Ordering::AcqRel);
            }
        }
    }

    /// Inserts a connection: both tuples claimed, a record allocated and written, both ways
    /// published — what a program's allocation does, for tests and benchmarks (it takes bucket
    /// locks; see the module documentation). Returns the record's number.
    pub fn insert(
        &self,
        fwd_key: &Tuple,
        rev_key: &Tuple,
        fwd: &SnatEntry,
        rev: &SnatEntry,
    ) -> Result<u32> {
        let rev_claim = self.claim(Index::Rev, rev_key)?;
        let fwd_claim = match self.claim(Index::Fwd, fwd_key) {
            Ok(c) => c,
            Err(e) => {
                self.unclaim(Index::Rev, &rev_claim);
                return Err(e);
            }
        };
        let Some(rec) = self.alloc_record() else {
            self.unclaim(Index::Fwd, &fwd_claim);
            self.unclaim(Index::Rev, &rev_claim);
            return Err(Error::TableFull("records"));
        };
        let record = NatRecord {
            state: REC_BUSY,
            pad: 0,
            fwd_key: *fwd_key,
            rev_key: *rev_key,
            fwd: *fwd,
            rev: *rev,
        };
        // SAFETY: rec < capacity (alloc_record); this side owns the record while REC_BUSY.
        unsafe { std::ptr::write_volatile(self.records.element::<NatRecord>(rec), record) };
        self.record_state(rec).store(REC_USED, Ordering::Release);
        self.publish(Index::Rev, &rev_claim, rec);
        self.publish(Index::Fwd, &fwd_claim, rec);
        Ok(rec)
    }

    /// Takes a stripe lock: up to [`INSERT_LOCK_SPINS`] tries.
    fn lock(&self, lock: &AtomicU32) -> bool {
        for _ in 0..INSERT_LOCK_SPINS {
            if lock
                .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return true;
            }
            std::hint::spin_loop();
        }
        false
    }

    fn claim(&self, index: Index, k: &Tuple) -> Result<Claim> {
        let pos = TableMemory::pos(self, index, k);
        let home_lock = self.stripe(index, pos.home);
        if !self.lock(home_lock) {
            return Err(Error::TableBusy(index.name()));
        }
        if self.find(index, k).is_some() {
            home_lock.store(0, Ordering::Release);
            return Err(Error::TableExists(index.name()));
        }
        let mut bucket = pos.home;
        let mut passed_busy = false;
        for _ in 0..NAT_PROBE_BUCKETS {
            let lock = self.stripe(index, bucket);
            let own = !std::ptr::eq(lock, home_lock);
            if !own || self.lock(lock) {
                let way = (0..NAT_WAYS).find(|&way| {
                    nat_protocol::set_ctrl_byte(self, index, bucket, way, Some(TAG_FREE), TAG_BUSY)
                });
                if way.is_none() {
                    self.set_overflow(index, bucket);
                }
                if own {
                    lock.store(0, Ordering::Release);
                }
                if let Some(way) = way {
                    return Ok(Claim {
                        home: pos.home,
                        bucket,
                        way,
                        tag: pos.tag,
                    });
                }
            } else {
                // Its lock stayed taken: passed over, marked overflowed first so that lookups
                // going on from it reach a way claimed further on (table.h).
                self.set_overflow(index, bucket);
                passed_busy = true;
            }
            bucket = nat_protocol::next_bucket(self, bucket);
        }
        home_lock.store(0, Ordering::Release);
        if passed_busy {
            Err(Error::TableBusy(index.name()))
        } else {
            Err(Error::TableFull(index.name()))
        }
    }

    /// Sets a bucket's overflow flag (byte `NAT_WAYS` of its control word), unless set.
    fn set_overflow(&self, index: Index, bucket: u32) {
        if !nat_protocol::overflowed(self, index, bucket) {
            nat_protocol::set_ctrl_byte(self, index, bucket, NAT_WAYS, None, 1);
        }
    }

    fn publish(&self, index: Index, c: &Claim, rec: u32) {
        self.way_rec(index, c.bucket, c.way)
            .store(rec, Ordering::Release);
        nat_protocol::set_ctrl_byte(self, index, c.bucket, c.way, None, c.tag);
        self.stripe(index, c.home).store(0, Ordering::Release);
    }

    fn unclaim(&self, index: Index, c: &Claim) {
        nat_protocol::set_ctrl_byte(self, index, c.bucket, c.way, None, TAG_FREE);
        self.stripe(index, c.home).store(0, Ordering::Release);
    }

    fn alloc_record(&self) -> Option<u32> {
        (0..self.capacity()).find(|&rec| {
            self.record_state(rec)
                .compare_exchange(REC_FREE, REC_BUSY, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    }

    /// Empties the table (tests and benchmarks; programs inserting meanwhile may lose entries).
    pub fn clear(&self) {
        for bucket in 0..self.buckets() {
            for index in [Index::Fwd, Index::Rev] {
                // SAFETY: a volatile store of a whole element of a live mapping.
                unsafe {
                    std::ptr::write_volatile(self.bucket(index, bucket), NatBucket::default())
                };
            }
        }
        for rec in 0..self.capacity() {
            self.record_state(rec).store(REC_FREE, Ordering::Release);
        }
        for stripe in 0..self.locks.entries {
            // SAFETY: an element of the live locks mapping.
            unsafe { atomic(self.locks.element::<u32>(stripe)) }.store(0, Ordering::Release);
        }
    }
}

impl TableMemory for SnatTable {
    fn buckets(&self) -> u32 {
        self.fwd.entries
    }

    fn capacity(&self) -> u32 {
        self.records.entries
    }

    fn pos(&self, index: Index, k: &Tuple) -> NatPos {
        match index {
            Index::Fwd => self.pos_fwd(k),
            Index::Rev => self.pos_rev(k),
        }
    }

    fn ctrl_load(&self, index: Index, bucket: u32, order: Ordering) -> u64 {
        self.ctrl(index, bucket).load(order)
    }

    fn ctrl_compare_exchange(
        &self,
        index: Index,
        bucket: u32,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> std::result::Result<u64, u64> {
        self.ctrl(index, bucket)
            .compare_exchange(current, new, success, failure)
    }

    fn way_rec_load(&self, index: Index, bucket: u32, way: usize, order: Ordering) -> u32 {
        self.way_rec(index, bucket, way).load(order)
    }

    fn state_load(&self, rec: u32, order: Ordering) -> u32 {
        self.record_state(rec).load(order)
    }

    fn state_compare_exchange(
        &self,
        rec: u32,
        current: u32,
        new: u32,
        success: Ordering,
        failure: Ordering,
    ) -> std::result::Result<u32, u32> {
        self.record_state(rec)
            .compare_exchange(current, new, success, failure)
    }

    fn record_copy(&self, rec: u32) -> Option<NatRecord> {
        self.record(rec)
    }

    fn record_summary(&self, rec: u32) -> Option<RecordSummary> {
        if rec >= self.capacity() {
            return None;
        }
        let base = self.records.element::<u64>(rec);
        // SAFETY: rec < capacity and every SUMMARY_WORDS index is a word of the record, which
        // keeps the address inside the mapping's element (8-byte aligned: see `record`).
        let word = |i: usize| unsafe { AtomicU64::from_ptr(base.add(i)) }.load(Ordering::Relaxed);
        let byte = |(w, b): (usize, usize)| word(w).to_ne_bytes()[b];
        let [
            state,
            proto,
            fwd_bits,
            fwd_flags,
            rev_bits,
            fwd_seen,
            rev_seen,
        ] = SUMMARY_WORDS;
        // The forward entry's state bits and flags share a word: one load.
        let fwd = word(fwd_bits.0).to_ne_bytes();
        Some(RecordSummary {
            state: u32::from_ne_bytes(word(state.0).to_ne_bytes()[..4].try_into().ok()?),
            proto: byte(proto),
            state_bits: fwd[fwd_bits.1] | byte(rev_bits),
            fwd_flags: fwd[fwd_flags.1],
            last_seen_ns: word(fwd_seen.0).max(word(rev_seen.0)),
        })
    }
}

/// Where [`RecordSummary`]'s fields are in a record: (64-bit word, byte in it) of the state,
/// the forward tuple's protocol, the forward entry's state bits and flags, the reverse entry's
/// state bits, and both entries' last packet (whole words).
const SUMMARY_WORDS: [(usize, usize); 7] = {
    use std::mem::offset_of;
    const fn at(offset: usize) -> (usize, usize) {
        (offset / 8, offset % 8)
    }
    let fwd = offset_of!(NatRecord, fwd);
    let rev = offset_of!(NatRecord, rev);
    let words = [
        at(offset_of!(NatRecord, state)),
        at(offset_of!(NatRecord, fwd_key) + offset_of!(Tuple, proto)),
        at(fwd + offset_of!(SnatEntry, state)),
        at(fwd + offset_of!(SnatEntry, flags)),
        at(rev + offset_of!(SnatEntry, state)),
        at(fwd + offset_of!(SnatEntry, last_seen_ns)),
        at(rev + offset_of!(SnatEntry, last_seen_ns)),
    ];
    // The state is the first 4 bytes of its word, the last packets whole words, the forward
    // entry's state bits and flags in one word.
    assert!(words[0].1 == 0 && words[5].1 == 0 && words[6].1 == 0);
    assert!(words[2].0 == words[3].0);
    words
};

/// Tries [`SnatTable::insert`] makes at a stripe lock before it gives up (`NAT_LOCK_SPINS` in
/// table.h; more here: this side can be preempted between tries, a program cannot).
const INSERT_LOCK_SPINS: u32 = 100_000;

/// A claimed way (the home bucket's stripe lock held).
struct Claim {
    home: u32,
    bucket: u32,
    way: usize,
    tag: u8,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::L4Proto;

    #[test]
    fn tuple_hash_is_the_seeded_sum_of_word_products() {
        let t = Tuple::new(
            "10.244.2.20".parse().unwrap(),
            8080,
            "192.0.2.1".parse().unwrap(),
            0,
            L4Proto::Tcp,
        );
        // Computed independently (Python, the formula of table.h) for seed 0x1234567.
        assert_eq!(tuple_hash(&t, 0x0123_4567), 0xf7d4_5e51_73db_e546);
    }
}
