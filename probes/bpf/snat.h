/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * snat.h: SNAT mappings seen from the programs: the entry of a connection in one direction
 * (snat_fwd by forward tuple, snat_rev by reply tuple), and the allocation of a new mapping: a
 * port reserved by claiming its reply tuple first (RFC 6056 algorithm 3, then random probes), the
 * forward tuple claimed, the record written and both ways published (table.h).
 */
#ifndef KIB_SNAT_H
#define KIB_SNAT_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "maps.h"
#include "parsing.h"
#include "table.h"
#include "port_filter.h"

/* Random ports tried before giving up (port_exhausted). */
#define SNAT_PORT_PROBES 32

enum alloc_result {
	ALLOC_NEW = 0,      /* a new mapping was created */
	ALLOC_EXISTING = 1, /* another CPU created the forward entry first: it is used */
	ALLOC_EXHAUSTED = 2,
	ALLOC_MAP_FULL = 3,
	ALLOC_LOCK_BUSY = 4, /* a bucket lock the allocation needed stayed taken (table.h) */
};

/* The next port candidate of the per-CPU xorshift32 sequence. */
static __always_inline __u32 xorshift32(__u32 x)
{
	x ^= x << 13;
	x ^= x >> 17;
	x ^= x << 5;
	return x;
}

/* The entry of a connection in one direction: egress by forward tuple, ingress by reply tuple. */
static __always_inline struct snat_entry *snat_fwd_find_at(const struct config *cfg,
							   const struct tuple *k, struct nat_pos pos)
{
	return record_entry(record_at(snat_fwd_find(cfg, k, pos.home, pos.tag)), NAT_INDEX_FWD);
}

static __always_inline struct snat_entry *snat_fwd_lookup(const struct config *cfg,
							  const struct tuple *k)
{
	return snat_fwd_find_at(cfg, k, nat_pos_fwd(cfg, k));
}

/* The number of the record of a connection's reply tuple k, or a negative errno. */
static __always_inline long snat_rev_record(const struct config *cfg, const struct tuple *k)
{
	struct nat_pos pos = nat_pos_rev(cfg, k);

	return snat_rev_find(cfg, k, pos.home, pos.tag);
}

static __always_inline struct snat_entry *snat_rev_lookup(const struct config *cfg,
							  const struct tuple *k)
{
	return record_entry(record_at(snat_rev_record(cfg, k)), NAT_INDEX_REV);
}

/* SNAT ports tried one after the other before the rest of the probes go to random ports. */
#define SNAT_PORT_SEQUENTIAL 8

/*
 * Reserves a port in the SNAT range for the reply tuple rev_key (its dport is set to the port):
 * ports are tried as RFC 6056's algorithm 3 does, from an offset that is a secret hash of the
 * destination (rev_key without its port: base, nat_rev_base()) plus the per-CPU counter, the next
 * ones in order (their reply tuples sit in consecutive snat_rev buckets), then random ones (the
 * per-CPU xorshift32 sequence, seeded on first use). Returns 0 with *c holding the claim, or
 * -ENOSPC (every probe found its buckets full), -EBUSY (no port tried was taken, and some found
 * a bucket lock taken), -EADDRINUSE (some port tried was taken). A global function: the verifier
 * checks the probe loop once.
 */
__attribute__((noinline)) int snat_reserve_port(const struct config *cfg, struct tuple *rev_key,
						__u64 base, struct cpu_scratch *cs,
						struct nat_claim *c)
{
	__u32 range, offset, random;
	int all_full = 1;
	int taken = 0;
	int ret;
	int i;

	if (!cfg || !rev_key || !cs || !c)
		return -EINVAL;
	if (cfg->snat_port_min == 0 || cfg->snat_port_min > cfg->snat_port_max)
		return -EADDRINUSE;
	range = (__u32)cfg->snat_port_max - cfg->snat_port_min + 1;
	random = cs->rng;
	if (!random)
		random = bpf_get_prandom_u32() | 1;
	offset = ((__u32)base + cs->port_counter) % range;
	cs->port_counter += 1;
	ret = -EADDRINUSE;
	for (i = 0; i < SNAT_PORT_PROBES; i++) {
		rev_key->dport = bpf_htons((__u16)(cfg->snat_port_min + offset));
		ret = snat_rev_claim(cfg, rev_key, base, c);
		if (ret == 0)
			break;
		/*
		 * A taken port means try another; so does a full or busy bucket chain (another
		 * port hashes elsewhere). Only when every probe found its chain full is the table
		 * full.
		 */
		if (ret != -ENOSPC)
			all_full = 0;
		if (ret == -EEXIST)
			taken = 1;
		if (i + 1 < SNAT_PORT_SEQUENTIAL) {
			offset = offset + 1 >= range ? 0 : offset + 1;
		} else {
			random = xorshift32(random);
			offset = random % range;
		}
	}
	cs->rng = random;
	if (ret == 0)
		return 0;
	if (all_full)
		return -ENOSPC;
	return taken ? -EADDRINUSE : -EBUSY;
}

/*
 * Allocates the SNAT mapping of the connection `fwd_key` (as it leaves, client -> backend; at
 * fwd_pos in snat_fwd) to node_addr. The port is the client's own when it lies outside the local
 * port range (always for SCTP: its CRC32c covers the ports and cannot be updated incrementally),
 * else one snat_reserve_port() finds. A port is taken by claiming its reply tuple in snat_rev
 * (table.h: a claim holds the tuple's bucket until published); then the forward tuple is claimed
 * in snat_fwd, a record allocated and written, and both ways published (or every claim given
 * back). *out receives the forward entry in use and *rec_out the number of its record. Both
 * entries get svc_id and flags (the caller's resolution of the connection's service: its reason
 * with SNAT_F_RESOLVED, and SNAT_F_PROBE_HIT when the IPVS probe recorded it).
 */
static __always_inline int snat_allocate(const struct tuple *fwd_key, struct nat_pos fwd_pos,
					 const struct config *cfg, struct cpu_scratch *cs,
					 const __u8 node_addr[ADDR_LEN], __u32 svc_id, __u8 flags,
					 __u8 state, __u64 now, struct snat_entry *out,
					 __u32 *rec_out)
{
	struct tuple *rev_key = &cs->rev_key;
	struct snat_entry *rev_value = &cs->rev_value;
	struct nat_record *r;
	__u16 client_port = bpf_ntohs(fwd_key->sport);
	__u64 rev_base;
	__u32 rec_index;
	long rec;
	int reserved = 0;
	int ret;

	/* Before the record is published (its REC_USED release store orders it): port_filter.h. */
	port_filter_add(PORT_BACKEND, fwd_key->dport);
	__builtin_memset(rev_key, 0, sizeof(*rev_key));
	__builtin_memset(rev_value, 0, sizeof(*rev_value));
	addr_copy(rev_key->saddr, fwd_key->daddr);
	addr_copy(rev_key->daddr, node_addr);
	rev_key->sport = fwd_key->dport;
	rev_key->proto = fwd_key->proto;
	rev_base = nat_rev_base(cfg, rev_key);

	addr_copy(rev_value->addr, fwd_key->saddr);
	rev_value->port = fwd_key->sport;
	rev_value->svc_id = svc_id;
	rev_value->created_ns = now;
	rev_value->last_seen_ns = now;

	if (fwd_key->proto == IPPROTO_SCTP || client_port < cfg->local_port_min ||
	    client_port > cfg->local_port_max) {
		rev_key->dport = fwd_key->sport;
		rev_value->flags = flags | SNAT_F_PORT_KEPT;
		ret = snat_rev_claim(cfg, rev_key, rev_base, &cs->rev_claim);
		if (ret == 0)
			reserved = 1;
		else if (fwd_key->proto == IPPROTO_SCTP)
			return ret == -EEXIST  ? ALLOC_EXHAUSTED
			       : ret == -EBUSY ? ALLOC_LOCK_BUSY
					       : ALLOC_MAP_FULL;
	}
	if (!reserved) {
		rev_value->flags = flags;
		ret = snat_reserve_port(cfg, rev_key, rev_base, cs, &cs->rev_claim);
		if (ret == -ENOSPC)
			return ALLOC_MAP_FULL;
		if (ret == -EBUSY)
			return ALLOC_LOCK_BUSY;
		if (ret)
			return ALLOC_EXHAUSTED;
	}
	/* The reply tuple's port, before the record is published (port_filter.h). */
	port_filter_add(PORT_SNAT, rev_key->dport);

	addr_copy(out->addr, node_addr);
	out->port = rev_key->dport;
	out->state = state;
	out->flags = rev_value->flags;
	out->svc_id = svc_id;
	out->created_ns = now;
	out->last_seen_ns = now;
	ret = snat_fwd_claim(cfg, fwd_key, fwd_pos.home, fwd_pos.tag, &cs->fwd_claim);
	if (ret) {
		/* Give the reservation back: another CPU has the forward entry, or no room. */
		nat_unclaim(&snat_rev, NAT_INDEX_REV, &cs->rev_claim);
		if (ret == -EBUSY)
			return ALLOC_LOCK_BUSY;
		if (ret != -EEXIST)
			return ALLOC_MAP_FULL;
		rec = snat_fwd_find(cfg, fwd_key, fwd_pos.home, fwd_pos.tag);
		r = record_at(rec);
		if (!r)
			return ALLOC_MAP_FULL;
		__builtin_memcpy(out, &r->fwd, sizeof(*out));
		*rec_out = rec;
		return ALLOC_EXISTING;
	}
	rec = snat_record_alloc(cfg, &cs->rec_cursor);
	rec_index = rec;
	r = record_at(rec);
	if (!r) {
		nat_unclaim(&snat_fwd, NAT_INDEX_FWD, &cs->fwd_claim);
		nat_unclaim(&snat_rev, NAT_INDEX_REV, &cs->rev_claim);
		return ALLOC_MAP_FULL;
	}
	__builtin_memcpy(&r->fwd_key, fwd_key, sizeof(r->fwd_key));
	__builtin_memcpy(&r->rev_key, rev_key, sizeof(r->rev_key));
	__builtin_memcpy(&r->fwd, out, sizeof(r->fwd));
	__builtin_memcpy(&r->rev, rev_value, sizeof(r->rev));
	/* the record, then REC_USED (the sweeper scans by state), then the ways (table.h) */
	nat_store_release(&r->state, REC_USED);
	nat_publish(&snat_rev, NAT_INDEX_REV, &cs->rev_claim, rec_index);
	nat_publish(&snat_fwd, NAT_INDEX_FWD, &cs->fwd_claim, rec_index);
	*rec_out = rec_index;
	return ALLOC_NEW;
}

#endif /* KIB_SNAT_H */
