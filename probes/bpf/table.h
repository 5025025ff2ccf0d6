/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * table.h: the SNAT table, done inline in the programs: lookups and inserts make no helper call,
 * and an insert is a few compare-and-swaps on words the programs touch anyway instead of a hash
 * map's bucket spinlock and freelist. The agent reads and sweeps the same memory through an mmap
 * of the maps (probes/src/nat_table.rs mirrors every rule here).
 *
 * Four BPF_F_MMAPABLE arrays (docs/datapath.md, "SNAT table"):
 *   - snat_records: one struct nat_record per translated connection: both tuples (as it leaves,
 *     client -> backend; as its replies arrive, backend -> node address:SNAT port) and both
 *     entries (the translation and state of each direction);
 *   - snat_fwd and snat_rev: hash indexes of the records by forward and by reverse tuple, in
 *     buckets of NAT_WAYS ways (struct nat_bucket, 32 bytes: its control word, a tag byte per way
 *     and the overflow flag, then the ways' record numbers). Two ways per record: each index is
 *     at most half full;
 *   - snat_locks: the bucket locks, one per stripe of NAT_LOCK_STRIPES buckets per index (64 KiB,
 *     in the caches).
 * A lookup reads one 8-byte control word and matches its tag bytes at once; record numbers and
 * records are read only on a match. An insert reads and writes only the half cache line of its
 * bucket (the control word and the record number are in it) and the record, which is written
 * where the CPU allocated its previous one (a per-CPU cursor walking the array), so a new
 * connection writes one cold half line at most.
 *
 * Index rules:
 *   - a tuple's hash (tuple_hash(), seeded with config.nat_seed) gives its home bucket and a
 *     7-bit tag; a way's tag byte is TAG_FREE, TAG_BUSY (claimed by an insert) or
 *     TAG_VALID | tag, its record number then in the bucket;
 *   - a claim takes the lock of the home bucket's stripe (a 32-bit compare-and-swap, bounded
 *     spin), checks the tuple is absent, and claims a free way (its byte set to TAG_BUSY) in the
 *     home bucket or, when it is full, in up to NAT_PROBE_BUCKETS - 1 following buckets (under
 *     their stripes' locks too, held for the claim only), setting the overflow flag of each
 *     bucket it passes: a full one, or one whose stripe lock stays taken (passed over unread).
 *     A way is thus never placed where a lookup, which stops at the first bucket without the
 *     flag, cannot reach it. The home stripe's lock is held until the way is published (record
 *     number, then tag) or given back, so a tuple is never indexed twice; when the home
 *     stripe's lock stays taken the claim fails (-EBUSY: the packet is dropped, `lock_busy`);
 *   - lookups take no lock: one 8-byte read of the control word, whose bytes are matched
 *     against the tag at once; the record confirms a match; the next bucket is read only while
 *     the one left is marked overflowed;
 *   - removal (the agent's sweeper) is a compare-and-swap of the control word clearing the way's
 *     byte. Only programs take locks; the agent never does, so a lock is only held by a program,
 *     which cannot be preempted: TC programs run in softirq context with preemption off. That
 *     needs a kernel without PREEMPT_RT, where softirqs run in preemptible threads (a preempted
 *     holder would make claims on its stripes fail with -EBUSY until it runs again). So does
 *     BPF_PROG_TEST_RUN, which only disables migration: tests count -EBUSY, they cannot rule it
 *     out.
 * Record rules: REC_FREE -> REC_BUSY (a program's compare-and-swap when it allocates) -> REC_USED
 * (after it is written, before it is indexed) -> REC_DEAD (the sweeper, after unindexing it) ->
 * REC_FREE (the sweeper, one sweep later: a program that found the record just before it was
 * unindexed is long done with it).
 * Memory ordering follows the Linux kernel memory model (docs/datapath.md, "Memory ordering",
 * argues each race): writers store the record, then REC_USED and the way's record number as
 * releases (nat_store_release()), then its tag; unlocks are releases; a lookup reads the control
 * word, then the record number through an address dependency on it (nat_dep()), then the record
 * through one on the number. On x86-64 (TSO) releases are plain stores and the dependency is
 * free: the code there is what it was before arm64, with no locked instruction after the
 * record's stores (a store to a cold line waits in the store buffer, a locked instruction would
 * wait for it); on arm64 a release is a fully ordered xchg.
 */
#ifndef KIB_TABLE_H
#define KIB_TABLE_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "maps.h"

/*
 * A compiler barrier: clang moves no memory access across it (volatile accesses are only kept in
 * order among themselves, and records are written with plain stores).
 */
#define nat_barrier() asm volatile("" ::: "memory")

/*
 * Ordering, against the Linux kernel memory model (docs/datapath.md, "Memory ordering"). BPF on
 * 6.1-6.14 has no barrier and no load-acquire/store-release; its value-returning atomics (xchg,
 * cmpxchg, fetch-ops) are fully ordered, its non-fetch add/and/or/xor are not.
 *
 * nat_store_release(p, v): every earlier load and store of this program is visible before *p = v
 * is (smp_store_release()). On x86-64 a plain store is a release (TSO; the kernel's
 * smp_store_release() is a compiler barrier and a store there too); elsewhere (arm64) an xchg,
 * fully ordered. The objects are built per architecture (probes/build.rs).
 *
 * nat_dep(x): 0, carrying a dependency on x: added to an address, it makes a later load depend on
 * the load that produced x, which orders them on every CPU Linux runs on (an address dependency,
 * as rcu_dereference() relies on). clang cannot see through the asm to drop it; the verifier
 * knows the result is 0; the JITs keep it as an instruction reading x. x86-64 keeps loads in order
 * anyway: there it is a plain 0. Building with -DKIB_NAT_FULLY_ORDERED gives x86-64 the arm64
 * code too (to measure what it costs there: docs/datapath.md).
 */
#if defined(__TARGET_ARCH_x86) && !defined(KIB_NAT_FULLY_ORDERED)
#define nat_store_release(p, v)                                                                    \
	do {                                                                                       \
		nat_barrier();                                                                     \
		*(volatile __u32 *)(p) = (v);                                                      \
	} while (0)
#define nat_dep(x) ((__u64)0)
#else
#define nat_store_release(p, v) ((void)__sync_lock_test_and_set((__u32 *)(p), (__u32)(v)))
static __always_inline __u64 nat_dep(__u64 x)
{
	asm volatile("%[x] &= 0" : [x] "+r"(x));
	return x;
}
#endif

/* Bounded spin on a stripe lock before a claim gives up with -EBUSY. */
#define NAT_LOCK_SPINS 64
/* Records an allocation examines from the cursor, and how many times it restarts elsewhere. */
#define NAT_ALLOC_SCAN 16
#define NAT_ALLOC_JUMPS 4

/* The 64-bit hash of a tuple: a seeded sum of its ten words times odd constants. */
static __always_inline __u64 tuple_hash(const struct tuple *t, __u32 seed)
{
	const __u32 *w = (const __u32 *)t;
	__u64 h = ((__u64)seed << 32) | seed;

	h += (__u64)w[0] * 0x9E3779B97F4A7C15ULL;
	h += (__u64)w[1] * 0xC2B2AE3D27D4EB4FULL;
	h += (__u64)w[2] * 0x165667B19E3779F9ULL;
	h += (__u64)w[3] * 0xD6E8FEB86659FD93ULL;
	h += (__u64)w[4] * 0xFF51AFD7ED558CCDULL;
	h += (__u64)w[5] * 0xC4CEB9FE1A85EC53ULL;
	h += (__u64)w[6] * 0x94D049BB133111EBULL;
	h += (__u64)w[7] * 0xBF58476D1CE4E5B9ULL;
	h += (__u64)w[8] * 0x2545F4914F6CDD1DULL;
	h += (__u64)w[9] * 0x9FB21C651E98DF25ULL;
	return h;
}

/* Where a tuple lives in an index: its home bucket and the tag byte of its way. */
struct nat_pos {
	__u32 home;
	__u32 tag;
};

/* The tag byte of a way indexing a tuple whose hash is h. */
static __always_inline __u32 nat_tag(__u64 h)
{
	return ((__u32)h & 0x7f) | TAG_VALID;
}

/* snat_fwd: the home bucket is the hash's high half scaled to the bucket count. */
static __always_inline struct nat_pos nat_pos_fwd(const struct config *cfg, const struct tuple *k)
{
	__u64 h = tuple_hash(k, cfg->nat_seed);
	struct nat_pos pos = {
		.home = (__u32)(((h >> 32) * cfg->nat_buckets) >> 32),
		.tag = nat_tag(h),
	};

	return pos;
}

/*
 * snat_rev: the hash leaves out the destination port (the SNAT port) and the home bucket is the
 * hashed bucket plus the port, so the reply tuples of one backend and node address occupy
 * consecutive buckets in port order: an allocation that takes the next free port after the
 * previous one (snat_allocate) finds its bucket in the cache. The tag mixes the port back in.
 * nat_rev_base() is the hash of the tuple without its port, nat_pos_rev_at() the position of
 * that tuple with a port (host order).
 */
static __always_inline __u64 nat_rev_base(const struct config *cfg, const struct tuple *k)
{
	struct tuple base = *k;

	base.dport = 0;
	return tuple_hash(&base, cfg->nat_seed);
}

static __always_inline struct nat_pos nat_pos_rev_at(const struct config *cfg, __u64 base,
						     __u32 port)
{
	__u32 buckets = cfg->nat_buckets;
	struct nat_pos pos = {
		.home = buckets ? (__u32)((((base >> 32) * buckets) >> 32) + port) % buckets : 0,
		.tag = nat_tag(base + (__u64)port * 0x9E3779B97F4A7C15ULL),
	};

	return pos;
}

static __always_inline struct nat_pos nat_pos_rev(const struct config *cfg, const struct tuple *k)
{
	return nat_pos_rev_at(cfg, nat_rev_base(cfg, k), bpf_ntohs(k->dport));
}

static __always_inline struct nat_pos nat_pos_of(const struct config *cfg, int dir,
						 const struct tuple *k)
{
	return dir == NAT_INDEX_FWD ? nat_pos_fwd(cfg, k) : nat_pos_rev(cfg, k);
}

static __always_inline __u32 nat_next(__u32 index, __u32 buckets)
{
	return index + 1 >= buckets ? 0 : index + 1;
}

static __always_inline int tuple_equal(const struct tuple *a, const struct tuple *b)
{
	const __u32 *x = (const __u32 *)a;
	const __u32 *y = (const __u32 *)b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) | (x[4] ^ y[4]) |
		(x[5] ^ y[5]) | (x[6] ^ y[6]) | (x[7] ^ y[7]) | (x[8] ^ y[8]) | (x[9] ^ y[9])) == 0;
}

/* The tuple a record is indexed by in an index: NAT_INDEX_FWD or NAT_INDEX_REV. */
static __always_inline const struct tuple *record_key(const struct nat_record *r, int dir)
{
	return dir == NAT_INDEX_FWD ? &r->fwd_key : &r->rev_key;
}

#define BYTES_LOW 0x0101010101010101ULL
#define BYTES_HIGH 0x8080808080808080ULL
#define BYTES_7F 0x7f7f7f7f7f7f7f7fULL
/* The bytes of a control word that are ways (then the overflow flag and a pad byte). */
#define CTRL_WAYS_HIGH 0x0000808080808080ULL

/*
 * The ways of control word w whose byte is `byte`: bit 7 of each such byte set (every other
 * bit clear). Exact, with no carry between bytes.
 */
static __always_inline __u64 ctrl_match(__u64 w, __u32 byte)
{
	__u64 x = w ^ (BYTES_LOW * (byte & 0xff));

	return ~(((x & BYTES_7F) + BYTES_7F) | x) & CTRL_WAYS_HIGH;
}

static __always_inline __u64 ctrl_word(const struct nat_bucket *b)
{
	return *(volatile const __u64 *)b;
}

/*
 * The number of the record of tuple k (at pos) in index `index` (dir says which tuple of a record
 * it holds), or -ENOENT.
 */
static __always_inline long nat_find(void *index, const struct config *cfg, int dir,
				     const struct tuple *k, struct nat_pos pos)
{
	__u32 bucket = pos.home;
	__u32 probe, way;

	for (probe = 0; probe < NAT_PROBE_BUCKETS; probe++) {
		struct nat_bucket *b = bpf_map_lookup_elem(index, &bucket);
		__u64 w, match;

		if (!b)
			return -ENOENT;
		w = ctrl_word(b);
		match = ctrl_match(w, pos.tag);
		for (way = 0; match && way < NAT_WAYS; way++) {
			struct nat_record *r;
			__u32 n;

			if (!(match & (0x80ULL << (way * 8))))
				continue;
			/* the control word, then the record number (nat_dep) */
			n = *(volatile __u32 *)((__u8 *)&b->rec[way] + nat_dep(w));
			r = bpf_map_lookup_elem(&snat_records, &n);
			if (r && tuple_equal(record_key(r, dir), k))
				return n;
		}
		if (!b->overflow)
			return -ENOENT;
		bucket = nat_next(bucket, cfg->nat_buckets);
	}
	return -ENOENT;
}

/* The record indexed by tuple k, or -ENOENT. */
static __always_inline long nat_lookup(void *index, const struct config *cfg, int dir,
				       const struct tuple *k)
{
	return nat_find(index, cfg, dir, k, nat_pos_of(cfg, dir, k));
}

/* The lock word of a bucket's stripe in snat_locks, NULL past it. */
static __always_inline __u32 *nat_stripe(int dir, __u32 bucket)
{
	__u32 stripe = (dir == NAT_INDEX_FWD ? 0 : NAT_LOCK_STRIPES) +
		       (bucket & (NAT_LOCK_STRIPES - 1));

	return bpf_map_lookup_elem(&snat_locks, &stripe);
}

/* Takes a lock (bounded spin); 1 when taken. */
static __always_inline int nat_lock(__u32 *lock)
{
	__u32 spin;

	for (spin = 0; spin < NAT_LOCK_SPINS; spin++) {
		if (__sync_val_compare_and_swap(lock, 0, 1) == 0)
			return 1;
	}
	return 0;
}

/* A release: the holder's stores (claims, tags) are seen by the next holder, whose lock is a
 * fully ordered compare-and-swap. */
static __always_inline void nat_unlock(__u32 *lock)
{
	nat_store_release(lock, 0);
}

/*
 * Claims a way for tuple k (at pos) in an index: on 0, *c holds it and the home stripe's lock is
 * held until nat_publish() or nat_unclaim(). Else -EEXIST (k is indexed), -ENOSPC (the home
 * bucket and the NAT_PROBE_BUCKETS - 1 after it are full) or -EBUSY (the home stripe's lock
 * stayed taken, or no room was found and a bucket was passed over because its lock did); no
 * lock held.
 */
static __always_inline int nat_claim(void *index, const struct config *cfg, int dir,
				     const struct tuple *k, struct nat_pos pos,
				     struct nat_claim *c)
{
	__u32 *home_lock = nat_stripe(dir, pos.home);
	__u32 bucket = pos.home;
	__u32 probe, way;
	int passed_busy = 0;

	if (!home_lock)
		return -ENOSPC;
	if (!nat_lock(home_lock))
		return -EBUSY;
	if (nat_find(index, cfg, dir, k, pos) >= 0) {
		nat_unlock(home_lock);
		return -EEXIST;
	}
	for (probe = 0; probe < NAT_PROBE_BUCKETS; probe++) {
		struct nat_bucket *b = bpf_map_lookup_elem(index, &bucket);
		__u32 *lock = probe ? nat_stripe(dir, bucket) : home_lock;
		int own = lock != home_lock;
		__u64 free;

		if (!b || !lock)
			break;
		if (own && !nat_lock(lock)) {
			/*
			 * Another claim holds this bucket's stripe: pass over the bucket, marked
			 * overflowed first (without its lock: the flag is a byte of its own, only ever
			 * set, and a flag on a bucket with room only costs lookups a bucket more), so
			 * that a lookup going on from it reaches the way claimed further on.
			 */
			if (!*(volatile __u8 *)&b->overflow)
				*(volatile __u8 *)&b->overflow = 1;
			passed_busy = 1;
			goto next;
		}
		free = ctrl_match(ctrl_word(b), TAG_FREE);
		for (way = 0; free && way < NAT_WAYS; way++) {
			if (!(free & (0x80ULL << (way * 8))))
				continue;
			*(volatile __u8 *)&b->tag[way] = TAG_BUSY;
			if (own)
				nat_unlock(lock);
			c->home = pos.home;
			c->bucket = bucket;
			c->way = way;
			c->tag = pos.tag;
			return 0;
		}
		if (!b->overflow)
			*(volatile __u8 *)&b->overflow = 1;
		if (own)
			nat_unlock(lock);
next:
		bucket = nat_next(bucket, cfg->nat_buckets);
	}
	nat_unlock(home_lock);
	return passed_busy ? -EBUSY : -ENOSPC;
}

/*
 * The way a claim holds, checked below NAT_WAYS. The empty asm makes the checked value a new one
 * to clang, which otherwise may index with a spilled copy of c->way it knows equal in that branch:
 * 6.1's verifier does not carry the check over to that copy ("unbounded memory access").
 */
static __always_inline __u32 claim_way(const struct nat_claim *c)
{
	__u32 way = c->way;

	if (way >= NAT_WAYS)
		way = 0;
	asm volatile("" : "+r"(way));
	return way;
}

/* Points the claimed way at record `rec` (written and REC_USED already) and unlocks. */
static __always_inline void nat_publish(void *index, int dir, const struct nat_claim *c,
					__u32 rec)
{
	__u32 bucket = c->bucket;
	__u32 way = claim_way(c);
	struct nat_bucket *b = bpf_map_lookup_elem(index, &bucket);
	__u32 *home_lock = nat_stripe(dir, c->home);

	if (b) {
		/* The record and REC_USED (the caller's), then the record number, then the tag: a
		 * lookup that sees the tag sees the rest (its reads are ordered by dependencies). */
		nat_store_release(&b->rec[way], rec);
		nat_barrier();
		*(volatile __u8 *)&b->tag[way] = c->tag;
	}
	if (home_lock)
		nat_unlock(home_lock);
}

/* Gives a claimed way back and unlocks. */
static __always_inline void nat_unclaim(void *index, int dir, const struct nat_claim *c)
{
	__u32 bucket = c->bucket;
	__u32 way = claim_way(c);
	struct nat_bucket *b = bpf_map_lookup_elem(index, &bucket);
	__u32 *home_lock = nat_stripe(dir, c->home);

	if (b)
		*(volatile __u8 *)&b->tag[way] = TAG_FREE;
	if (home_lock)
		nat_unlock(home_lock);
}

/*
 * Allocates a record (REC_FREE -> REC_BUSY): the first free one from *cursor on, within
 * NAT_ALLOC_SCAN records, restarting up to NAT_ALLOC_JUMPS times at a random place when the
 * stretch is taken (a cursor of 0, a CPU's first allocation, starts at random too). *cursor moves
 * past it. Returns the record number, or -ENOSPC.
 */
static __always_inline long nat_record_alloc(const struct config *cfg, __u32 *cursor)
{
	__u32 records = cfg->nat_records;
	__u32 at = *cursor ? *cursor : records;
	__u32 jump, i;

	for (jump = 0; jump < NAT_ALLOC_JUMPS; jump++) {
		if (at >= records)
			at = records ? bpf_get_prandom_u32() % records : 0;
		for (i = 0; i < NAT_ALLOC_SCAN; i++) {
			struct nat_record *r = bpf_map_lookup_elem(&snat_records, &at);
			__u32 rec = at;

			if (!r)
				break;
			at++;
			if (*(volatile __u32 *)&r->state == REC_FREE &&
			    __sync_val_compare_and_swap(&r->state, REC_FREE, REC_BUSY) == REC_FREE) {
				*cursor = at;
				return rec;
			}
		}
		at = records; /* restart at a random place */
	}
	*cursor = at;
	return -ENOSPC;
}

/* Gives back a record allocated but never indexed. */
static __always_inline void nat_record_free(__u32 rec)
{
	struct nat_record *r = bpf_map_lookup_elem(&snat_records, &rec);

	if (r)
		nat_store_release(&r->state, REC_FREE);
}

/*
 * The table's operations as the programs call them: global functions, so the verifier checks
 * each once (its loops included) rather than at every call site, which would multiply the states
 * it explores past its limits. A global function returns a scalar: a record number (>= 0) or a
 * negative errno; record_at() turns a number into the record. Pointer arguments may not be NULL
 * (checked: the verifier requires it).
 */
__attribute__((noinline)) long snat_fwd_find(const struct config *cfg, const struct tuple *k,
					     __u32 home, __u32 tag)
{
	struct nat_pos pos = { .home = home, .tag = tag };

	if (!cfg || !k)
		return -EINVAL;
	return nat_find(&snat_fwd, cfg, NAT_INDEX_FWD, k, pos);
}

__attribute__((noinline)) long snat_rev_find(const struct config *cfg, const struct tuple *k,
					     __u32 home, __u32 tag)
{
	struct nat_pos pos = { .home = home, .tag = tag };

	if (!cfg || !k)
		return -EINVAL;
	return nat_find(&snat_rev, cfg, NAT_INDEX_REV, k, pos);
}

__attribute__((noinline)) int snat_fwd_claim(const struct config *cfg, const struct tuple *k,
					     __u32 home, __u32 tag, struct nat_claim *c)
{
	struct nat_pos pos = { .home = home, .tag = tag };

	if (!cfg || !k || !c)
		return -EINVAL;
	return nat_claim(&snat_fwd, cfg, NAT_INDEX_FWD, k, pos, c);
}

/* base: nat_rev_base() of k (the reply tuple, whose port is the candidate SNAT port). */
__attribute__((noinline)) int snat_rev_claim(const struct config *cfg, const struct tuple *k,
					     __u64 base, struct nat_claim *c)
{
	if (!cfg || !k || !c)
		return -EINVAL;
	return nat_claim(&snat_rev, cfg, NAT_INDEX_REV, k,
			 nat_pos_rev_at(cfg, base, bpf_ntohs(k->dport)), c);
}

__attribute__((noinline)) long snat_record_alloc(const struct config *cfg, __u32 *cursor)
{
	if (!cfg || !cursor)
		return -EINVAL;
	return nat_record_alloc(cfg, cursor);
}

/* The record numbered rec (a find's or an allocation's result), NULL for a negative one. */
static __always_inline struct nat_record *record_at(long rec)
{
	__u32 index = rec;

	return rec >= 0 ? bpf_map_lookup_elem(&snat_records, &index) : NULL;
}

/*
 * A record's entry for one direction (NAT_INDEX_FWD: the egress entry), NULL without a record.
 * The empty asm keeps the NULL check ahead of the offset: clang would otherwise compute r + offset
 * and select on r, which the verifier rejects (arithmetic on a pointer that may be NULL).
 */
static __always_inline struct snat_entry *record_entry(struct nat_record *r, int dir)
{
	if (!r)
		return NULL;
	asm volatile("" : "+r"(r));
	return dir == NAT_INDEX_FWD ? &r->fwd : &r->rev;
}

#endif /* KIB_TABLE_H */
