/* SPDX-License-Identifier: GPL-2.0 */
/*
 * table.h: the SNAT table, done inline in the programs: lookups and inserts make no helper call,
 * and an insert is a few compare-and-swaps on words the programs touch anyway instead of a hash
 * map's bucket spinlock and freelist. The agent reads and sweeps the same memory through an mmap
 * of the maps (probes/src/nat_table.rs mirrors every rule here).
 *
 * Three BPF_F_MMAPABLE arrays (docs/datapath.md, "SNAT table"):
 *   - snat_records: one struct nat_record per translated connection: both tuples (as it leaves,
 *     client -> backend; as its replies arrive, backend -> node address:SNAT port) and both
 *     entries (the translation and state of each direction);
 *   - snat_fwd and snat_rev: hash indexes of the records by forward and by reverse tuple, in
 *     buckets of NAT_WAYS ways (struct nat_bucket: lock, overflow flag, a state word and a record
 *     number per way; 40 bytes). Each index has one way per two records (half full at most).
 * A record is written where the CPU allocated its previous one (a per-CPU cursor walking the
 * array), so a new connection writes warm cache lines; the indexes are small enough to stay in
 * the caches. Inserting into a large table therefore costs no cache miss on a random line.
 *
 * Index rules:
 *   - a tuple's hash (tuple_hash(), seeded with config.nat_seed) gives its home bucket and a tag;
 *     a way is free (WAY_FREE), claimed by an insert (WAY_BUSY), or holds a record (its state is
 *     the tag, which has WAY_VALID set, and `rec` the record number);
 *   - a claim takes the home bucket's lock (a 32-bit compare-and-swap, bounded spin), checks the
 *     tuple is absent, and claims a free way (compare-and-swap FREE -> BUSY) in the home bucket
 *     or, when it is full, in up to NAT_PROBE_BUCKETS - 1 following buckets, marking each full
 *     bucket it passes as overflowed. The lock is held until the way is published (rec, then the
 *     tag) or given back, so a tuple is never indexed twice;
 *   - lookups take no lock: they scan the home bucket and go on to the next one only while the
 *     bucket they leave is marked overflowed; a tag match is confirmed on the record's tuple;
 *   - removal (the agent's sweeper) is a compare-and-swap of the way's state from the tag to
 *     WAY_FREE. Only programs take bucket locks; the agent never does, so a lock is only held by a
 *     program, which cannot be preempted.
 * Record rules: REC_FREE -> REC_BUSY (a program's compare-and-swap when it allocates) -> REC_USED
 * (after it is written, before it is indexed) -> REC_DEAD (the sweeper, after unindexing it) ->
 * REC_FREE (the sweeper, one sweep later: a program that found the record just before it was
 * unindexed is long done with it).
 * Memory ordering is x86-64's (TSO): a way's state is read before its record number and the
 * record; writers store the record, then the way's record number, then its tag, as plain stores.
 */
#ifndef KIB_TABLE_H
#define KIB_TABLE_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>

#include "maps.h"

/* Bounded spin on a bucket lock before a claim gives up with -EBUSY. */
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

/* Where a tuple lives in an index: its home bucket and the tag of its way. */
struct nat_pos {
	__u32 home;
	__u32 tag;
};

/* The state word of a way indexing a tuple whose hash is h. */
static __always_inline __u32 nat_tag(__u64 h)
{
	return ((__u32)h & ~3u) | WAY_VALID;
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

static __always_inline __u32 way_state(const struct nat_bucket *b, __u32 way)
{
	return *(volatile const __u32 *)&b->state[way & (NAT_WAYS - 1)];
}

/* The tuple a record is indexed by in an index: NAT_INDEX_FWD or NAT_INDEX_REV. */
static __always_inline const struct tuple *record_key(const struct nat_record *r, int dir)
{
	return dir == NAT_INDEX_FWD ? &r->fwd_key : &r->rev_key;
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

		if (!b)
			return -ENOENT;
		for (way = 0; way < NAT_WAYS; way++) {
			struct nat_record *r;
			__u32 rec;

			if (way_state(b, way) != pos.tag)
				continue;
			rec = *(volatile __u32 *)&b->rec[way];
			r = bpf_map_lookup_elem(&snat_records, &rec);
			if (r && tuple_equal(record_key(r, dir), k))
				return rec;
		}
		if (!*(volatile __u32 *)&b->overflow)
			return -ENOENT;
		bucket = nat_next(bucket, cfg->nat_buckets);
	}
	return -ENOENT;
}

/* Takes a bucket lock (bounded spin); 1 when taken. */
static __always_inline int nat_lock(struct nat_bucket *b)
{
	__u32 spin;

	for (spin = 0; spin < NAT_LOCK_SPINS; spin++) {
		if (__sync_val_compare_and_swap(&b->lock, 0, 1) == 0)
			return 1;
	}
	return 0;
}

static __always_inline void nat_unlock(struct nat_bucket *b)
{
	*(volatile __u32 *)&b->lock = 0;
}

/* A way a claim holds (with its home bucket's lock), for nat_publish or nat_unclaim. */
struct nat_claim {
	__u32 home;   /* bucket whose lock is held */
	__u32 bucket; /* bucket of the claimed way */
	__u32 way;
	__u32 tag;
};

/*
 * Claims a way for tuple k (at pos) in an index: on 0, *c holds it and the home lock is held until
 * nat_publish() or nat_unclaim(). Else -EEXIST (k is indexed), -ENOSPC (the home bucket and the
 * NAT_PROBE_BUCKETS - 1 after it are full) or -EBUSY (a lock stayed taken); no lock held.
 * A way is claimed (FREE -> BUSY) under its bucket's lock: the home lock, or for a way in a
 * following bucket that bucket's lock too, held just for the claim.
 */
static __always_inline int nat_claim(void *index, const struct config *cfg, int dir,
				     const struct tuple *k, struct nat_pos pos,
				     struct nat_claim *c)
{
	__u32 home_bucket = pos.home;
	__u32 bucket = home_bucket;
	struct nat_bucket *home = bpf_map_lookup_elem(index, &home_bucket);
	__u32 probe, way;

	if (!home)
		return -ENOSPC;
	if (!nat_lock(home))
		return -EBUSY;
	if (nat_find(index, cfg, dir, k, pos) >= 0) {
		nat_unlock(home);
		return -EEXIST;
	}
	for (probe = 0; probe < NAT_PROBE_BUCKETS; probe++) {
		struct nat_bucket *b = bpf_map_lookup_elem(index, &bucket);
		int locked;

		if (!b)
			break;
		locked = probe == 0 || nat_lock(b);
		for (way = 0; locked && way < NAT_WAYS; way++) {
			if (way_state(b, way) != WAY_FREE)
				continue;
			*(volatile __u32 *)&b->state[way] = WAY_BUSY;
			if (probe)
				nat_unlock(b);
			c->home = home_bucket;
			c->bucket = bucket;
			c->way = way;
			c->tag = pos.tag;
			return 0;
		}
		if (probe && locked)
			nat_unlock(b);
		if (!*(volatile __u32 *)&b->overflow)
			__sync_fetch_and_or(&b->overflow, 1);
		bucket = nat_next(bucket, cfg->nat_buckets);
	}
	nat_unlock(home);
	return -ENOSPC;
}

/* Points the claimed way at record `rec` (written and REC_USED already) and unlocks. */
static __always_inline void nat_publish(void *index, const struct nat_claim *c, __u32 rec)
{
	__u32 bucket = c->bucket;
	__u32 home_bucket = c->home;
	__u32 way = c->way & (NAT_WAYS - 1);
	struct nat_bucket *b = bpf_map_lookup_elem(index, &bucket);
	struct nat_bucket *home = bpf_map_lookup_elem(index, &home_bucket);

	if (b) {
		*(volatile __u32 *)&b->rec[way] = rec;
		*(volatile __u32 *)&b->state[way] = c->tag;
	}
	if (home)
		nat_unlock(home);
}

/* Gives a claimed way back and unlocks. */
static __always_inline void nat_unclaim(void *index, const struct nat_claim *c)
{
	__u32 bucket = c->bucket;
	__u32 home_bucket = c->home;
	struct nat_bucket *b = bpf_map_lookup_elem(index, &bucket);
	struct nat_bucket *home = bpf_map_lookup_elem(index, &home_bucket);

	if (b)
		*(volatile __u32 *)&b->state[c->way & (NAT_WAYS - 1)] = WAY_FREE;
	if (home)
		nat_unlock(home);
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
		*(volatile __u32 *)&r->state = REC_FREE;
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
