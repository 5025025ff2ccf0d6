/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * nat.h: the source-NAT mechanics shared by the TC programs: tuples from parsed packets, rewriting
 * a packet's source (egress) or destination (ingress), entry state bits and last-seen refresh,
 * SNAT port allocation (reverse tuple reserved first, table.h), fragment bookkeeping and the
 * translation of ICMP errors that quote a translated flow; the per-CPU flow cache in front of
 * snat_fwd/snat_rev with the fast path it serves, the per-CPU clock and random state, and the
 * hand-off of a rewrite to the nat_write programs (direct writes).
 */
#ifndef KIB_NAT_H
#define KIB_NAT_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "maps.h"
#include "parsing.h"
#include "csum.h"
#include "table.h"

/*
 * The datapath object's own maps (not shared with the probe, never pinned): the flow cache, the
 * per-CPU scratch (rewrite hand-off, clock, random state) and the direct-write programs. Their
 * structs are mirrored in probes/src/maps.rs like the shared ones.
 */
/*
 * A per-CPU flow cache slot (flow_cache): the translation of one connection direction, copied
 * from its snat_fwd/snat_rev entry so that established packets translate without a table lookup.
 * Valid while the tuple (saddr, daddr, ports, proto), dir and family match and
 * (u32)jiffies - filled_jiffies < FLOW_CACHE_TTL_JIFFIES; family 0 is an empty slot. `state` holds
 * the state bits the table entry already has (a packet bringing new bits, and every refresh of
 * last_seen_ns, goes to the table entry). One 64-byte slot; the word at offset 36 is
 * proto | dir << 8 | family << 16 | state << 24, which the fast path compares in one go.
 */
struct flow_slot {
	__u8 saddr[ADDR_LEN];
	__u8 daddr[ADDR_LEN];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir;
	__u8 family; /* 4 or 6; 0: empty */
	__u8 state;
	__u8 addr[ADDR_LEN]; /* translated address */
	__be16 port;         /* translated port */
	__u16 pad;
	__u32 filled_jiffies; /* low 32 bits of jiffies */
} __attribute__((aligned(4)));

/*
 * What the nat_write program rewrites when the TC program did not take the fast path (the
 * general hand-off): filled right before the tail call, read by nat_write on the same CPU.
 */
struct nat_job {
	__u8 addr[ADDR_LEN]; /* new address */
	__be16 port;         /* new port (ignored without L4 header) */
	__u8 dir;            /* NAT_SRC / NAT_DST */
	__u8 family;         /* 4 or 6 */
	__u8 proto;
	__u8 has_l4; /* TCP/UDP header with ports and checksum present and linear */
	__u16 l3_off;
	__u16 l4_off;
	__u16 pad;
} __attribute__((aligned(4)));

/*
 * Per-CPU scratch (cpu_scratch, one element): the general hand-off, the clock cache (the coarse
 * clock read once per jiffy: CLOCK_MONOTONIC_COARSE only moves on a tick), the xorshift32 state
 * of port allocation (seeded from bpf_get_prandom_u32 on first use) and the CPU's record
 * allocation cursor (table.h).
 */
struct cpu_scratch {
	struct nat_job job;
	__u32 rng;
	__u32 rec_cursor;   /* next snat_records entry to try; 0: none yet (start at random) */
	__u32 port_counter; /* RFC 6056 algorithm 3's counter (snat_allocate) */
	__u64 clock_jiffies;
	__u64 clock_ns;
	/*
	 * snat_allocate()'s working set, kept off the stack: the verifier bounds the stack of a
	 * call chain (tc_egress -> snat_reserve_port -> snat_rev_claim) to 512 bytes.
	 */
	struct tuple rev_key;
	struct snat_entry rev_value;
	struct nat_claim rev_claim;
	struct nat_claim fwd_claim;
};

_Static_assert(sizeof(struct flow_slot) == 64, "flow_slot");
_Static_assert(sizeof(struct nat_job) == 28, "nat_job");
_Static_assert(sizeof(struct cpu_scratch) == 168, "cpu_scratch");
_Static_assert(__builtin_offsetof(struct flow_slot, proto) == 36, "flow_slot tag word");

/* flow_cache slots per CPU (a power of two) and how long a slot stays valid. */
#define FLOW_CACHE_SLOTS 1024
#define FLOW_CACHE_TTL_JIFFIES 256

/*
 * Per-object, never pinned: a restarted agent's programs start with an empty cache, and an old
 * program left attached keeps its own.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FLOW_CACHE_SLOTS);
	__type(key, __u32);
	__type(value, struct flow_slot);
} flow_cache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cpu_scratch);
} cpu_scratch SEC(".maps");

/*
 * Slot 0: nat_write_egress / nat_write_ingress, set by the loader when the kernel has
 * bpf_cast_to_kern_ctx (6.2+); one array per direction because a program array only takes
 * programs of its first user's attach type (TCX ingress vs egress). Not pinned: when the agent
 * exits the kernel empties them, and programs left attached fall back to the helper rewrite
 * until the next agent replaces them.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} nat_writers_egress SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} nat_writers_ingress SEC(".maps");

static __always_inline struct cpu_scratch *scratch_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&cpu_scratch, &zero);
}

/* CLOCK_MONOTONIC_COARSE in ns, read at most once per jiffy on this CPU. */
static __always_inline __u64 clock_coarse_ns(struct cpu_scratch *cs, __u64 jiffies)
{
	if (!cs)
		return bpf_ktime_get_coarse_ns();
	if (cs->clock_jiffies != jiffies || !cs->clock_ns) {
		cs->clock_ns = bpf_ktime_get_coarse_ns();
		cs->clock_jiffies = jiffies;
	}
	return cs->clock_ns;
}

/* Random ports tried before giving up (port_exhausted). */
#define SNAT_PORT_PROBES 32
#define NSEC_PER_SEC 1000000000ULL

enum nat_dir {
	NAT_SRC = 0, /* egress: rewrite the source */
	NAT_DST = 1, /* ingress: rewrite the destination */
};

static __always_inline void tuple_from_pkt(const struct pkt *p, struct tuple *t)
{
	addr_copy(t->saddr, p->saddr);
	addr_copy(t->daddr, p->daddr);
	t->sport = p->sport;
	t->dport = p->dport;
	t->proto = p->proto;
}

/* The tuple of the other direction: the reply of p, or the request p replies to. */
static __always_inline void tuple_reversed_from_pkt(const struct pkt *p, struct tuple *t)
{
	addr_copy(t->saddr, p->daddr);
	addr_copy(t->daddr, p->saddr);
	t->sport = p->dport;
	t->dport = p->sport;
	t->proto = p->proto;
}

/*
 * Rewrites the source or destination address and port of the packet to new_addr:new_port with
 * every checksum. Non-first fragments (no L4 header) get the address only. IPv4 with a 20-byte
 * header: one store and two L4 checksum updates; packet data is only written by helpers.
 */
static __always_inline int nat_rewrite(struct __sk_buff *skb, const struct pkt *p, int dir,
				       const __u8 new_addr[ADDR_LEN], __be16 new_port)
{
	const __u8 *old_addr = dir == NAT_SRC ? p->saddr : p->daddr;
	__be16 old_port = dir == NAT_SRC ? p->sport : p->dport;
	int has_l4 = p->frag != FRAG_LATER && p->has_ports;
	int ports_stored = 0;
	__u32 csum_at = 0;
	__u64 flags = 0;

	if (has_l4) {
		csum_at = l4_csum_off(p->proto);
		if (csum_at)
			csum_at += p->l4_off;
		flags = l4_csum_flags(p->proto);
	}
	if (p->family == 4) {
		__be32 old4 = addr_get_v4(old_addr);
		__be32 new4 = addr_get_v4(new_addr);
		__be32 saddr = dir == NAT_SRC ? new4 : addr_get_v4(p->saddr);
		__be32 daddr = dir == NAT_DST ? new4 : addr_get_v4(p->daddr);

		ports_stored = has_l4 && p->l4_off == p->l3_off + sizeof(struct iphdr);
		if (csum_store_ipv4_header(skb, p->l3_off, saddr, daddr, old4, new4, ports_stored,
					   dir == NAT_SRC ? new_port : p->sport,
					   dir == NAT_DST ? new_port : p->dport))
			return -1;
		if (csum_at && old4 != new4 && csum_l4_ipv4_addr(skb, csum_at, old4, new4, flags))
			return -1;
	} else if (!addr_equal(old_addr, new_addr)) {
		__u32 addr_off = p->l3_off + (dir == NAT_SRC ? IPV6_SADDR_OFF : IPV6_DADDR_OFF);

		if (csum_rewrite_ipv6_addr(skb, addr_off, old_addr, new_addr, csum_at, flags))
			return -1;
	}
	if (has_l4 && old_port != new_port) {
		if (!ports_stored &&
		    bpf_skb_store_bytes(skb, p->l4_off + (dir == NAT_SRC ? 0 : 2), &new_port,
					sizeof(new_port), 0))
			return -1;
		if (csum_at && csum_l4_port(skb, csum_at, old_port, new_port, flags))
			return -1;
		/*
		 * UDP without checksum (0, left alone by BPF_F_MARK_MANGLED_0): nothing balances
		 * the port change, so CHECKSUM_COMPLETE's skb->csum takes it (bpf_csum_update does
		 * nothing in other states). One load, only for UDP with a port change.
		 */
		if (p->proto == IPPROTO_UDP) {
			__u16 check;

			if (bpf_skb_load_bytes(skb, csum_at, &check, sizeof(check)))
				return -1;
			if (check == 0)
				bpf_csum_update(skb, csum_fold(csum_acc16(0, old_port, new_port)));
		}
	}
	return 0;
}

/*
 * The L4 part of a direct-write rewrite: the port at *port and the checksum at *csum, given the
 * pseudo-header diff of the address change; CHECKSUM_COMPLETE on IPv4 also settles skb->csum
 * (as bpf_l4_csum_replace(BPF_F_PSEUDO_HDR) does: the IPv4 header absorbed the address change,
 * the L4 checksum's pseudo-header change is data to skb->csum).
 */
static __always_inline void nat_write_l4(struct __sk_buff *skb, __u16 *csum, __be16 *port,
					 __be16 new_port, __u64 pseudo, __u32 summed, int udp,
					 int v4, __be32 old4, __be32 new4)
{
	__be16 old_port = *port;

	__u64 covered = csum_acc16(0, old_port, new_port);

	if (csum_l4_direct(csum, summed, pseudo, covered, udp)) {
		if (v4 && summed == KIB_CHECKSUM_COMPLETE)
			bpf_csum_update(skb, csum_fold(csum_acc32(0, new4, old4)));
	} else if (summed == KIB_CHECKSUM_COMPLETE) {
		/*
		 * UDP without checksum: nothing balances the port change (nor an IPv6 address
		 * change; IPv4's header checksum balanced its own), skb->csum takes them.
		 */
		bpf_csum_update(skb, csum_fold(v4 ? covered : covered + pseudo));
	}
	*port = new_port;
}

/*
 * The direct-write rewrite done by nat_write: the same packet changes as nat_rewrite(), with the
 * checksum arithmetic inline (csum_l4_direct) for the skb's checksum state `summed`.
 * Returns -1 when the headers are not where the job says (the caller drops).
 */
static __always_inline int nat_write_direct(struct __sk_buff *skb, const struct nat_job *job,
					    __u32 summed)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 l3 = job->l3_off & PKT_OFF_MASK;
	__u32 l4 = job->l4_off & PKT_OFF_MASK;
	int src = job->dir == NAT_SRC;
	__be32 old4 = 0, new4 = 0;
	__u64 pseudo;
	__u16 *csum;
	__be16 *port;
	int udp;

	if (job->family == 4) {
		struct iphdr *ip = data + l3;
		__be32 *field;

		if ((void *)(ip + 1) > data_end)
			return -1;
		field = src ? &ip->saddr : &ip->daddr;
		old4 = *field;
		new4 = addr_get_v4(job->addr);
		pseudo = csum_acc32(0, old4, new4);
		ip->check = csum_apply(ip->check, pseudo);
		*field = new4;
	} else {
		struct ipv6hdr *ip6 = data + l3;
		__u32 *field;
		const __u32 *new6 = (const __u32 *)job->addr;

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		field = src ? (__u32 *)&ip6->saddr : (__u32 *)&ip6->daddr;
		pseudo = csum_acc32(0, field[0], new6[0]);
		pseudo = csum_acc32(pseudo, field[1], new6[1]);
		pseudo = csum_acc32(pseudo, field[2], new6[2]);
		pseudo = csum_acc32(pseudo, field[3], new6[3]);
		field[0] = new6[0];
		field[1] = new6[1];
		field[2] = new6[2];
		field[3] = new6[3];
	}
	if (!job->has_l4) {
		/*
		 * A later fragment: no L4 checksum balances an IPv6 address change, so
		 * CHECKSUM_COMPLETE's skb->csum takes it (IPv4: its header checksum did).
		 */
		if (job->family != 4 && summed == KIB_CHECKSUM_COMPLETE)
			bpf_csum_update(skb, csum_fold(pseudo));
		return 0;
	}
	udp = job->proto == IPPROTO_UDP;
	if (udp) {
		struct udphdr_min {
			__be16 source;
			__be16 dest;
			__be16 len;
			__u16 check;
		} *uh = data + l4;

		if ((void *)(uh + 1) > data_end)
			return -1;
		csum = &uh->check;
		port = src ? &uh->source : &uh->dest;
	} else {
		__u8 *th = data + l4;

		if ((void *)(th + TCP_CSUM_OFF + 2) > data_end)
			return -1;
		csum = (__u16 *)(th + TCP_CSUM_OFF);
		port = (__be16 *)(th + (src ? 0 : 2));
	}
	nat_write_l4(skb, csum, port, job->port, pseudo, summed, udp, job->family == 4, old4, new4);
	return 0;
}

/*
 * skb->cb[4] of a hand-off to nat_write: FAST_JOB_* << 16 | the new port (as it lies in memory),
 * the new address in cb[0..3] (IPv4: cb[3]); 0 for the general hand-off (cpu_scratch.job).
 * FAST_JOB_L3 marks a packet without an Ethernet header. cb is the qdisc/TC control block the
 * programs own until they return.
 */
#define FAST_JOB_V4 0x4b40
#define FAST_JOB_V6 0x4b60
#define FAST_JOB_L3 0x0001

/*
 * The writer's side of a fast-path hand-off (cb4: skb->cb[4]; the headers were checked by
 * fast_path_hit: IPv4 with a 20-byte header or IPv6 without extension headers, TCP or UDP).
 * Returns -1 when they are not where they were (the caller drops).
 */
static __always_inline int nat_write_fast(struct __sk_buff *skb, __u32 cb4, int dir, __u32 summed)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 kind = cb4 >> 16;
	__u8 *l3 = data + ((kind & FAST_JOB_L3) ? 0 : ETH_HEADER_LEN);
	__be16 new_port = (__be16)cb4;
	int v4 = (kind & ~FAST_JOB_L3) == FAST_JOB_V4;
	__be32 old4 = 0, new4 = 0;
	__u8 *l4;
	__u64 pseudo;
	int udp;

	if (v4) {
		struct iphdr *ip = (struct iphdr *)l3;
		__be32 *field;

		l4 = l3 + 20;
		if ((void *)(l4 + 8) > data_end)
			return -1;
		field = dir == NAT_SRC ? &ip->saddr : &ip->daddr;
		old4 = *field;
		new4 = skb->cb[3];
		pseudo = csum_acc32(0, old4, new4);
		ip->check = csum_apply(ip->check, pseudo);
		*field = new4;
		udp = ip->protocol == IPPROTO_UDP;
	} else {
		struct ipv6hdr *ip6 = (struct ipv6hdr *)l3;
		__u32 *field;
		__u32 n0 = skb->cb[0], n1 = skb->cb[1], n2 = skb->cb[2], n3 = skb->cb[3];

		l4 = l3 + 40;
		if ((void *)(l4 + 8) > data_end)
			return -1;
		field = dir == NAT_SRC ? (__u32 *)&ip6->saddr : (__u32 *)&ip6->daddr;
		pseudo = csum_acc32(0, field[0], n0);
		pseudo = csum_acc32(pseudo, field[1], n1);
		pseudo = csum_acc32(pseudo, field[2], n2);
		pseudo = csum_acc32(pseudo, field[3], n3);
		field[0] = n0;
		field[1] = n1;
		field[2] = n2;
		field[3] = n3;
		udp = ip6->nexthdr == IPPROTO_UDP;
	}
	if (udp) {
		nat_write_l4(skb, (__u16 *)(l4 + UDP_CSUM_OFF), (__be16 *)(l4 + (dir == NAT_SRC ? 0 : 2)),
			     new_port, pseudo, summed, 1, v4, old4, new4);
		return 0;
	}
	if ((void *)(l4 + TCP_CSUM_OFF + 2) > data_end)
		return -1;
	nat_write_l4(skb, (__u16 *)(l4 + TCP_CSUM_OFF), (__be16 *)(l4 + (dir == NAT_SRC ? 0 : 2)),
		     new_port, pseudo, summed, 0, v4, old4, new4);
	return 0;
}

/*
 * Applies a translation: hands it to nat_write (direct writes, tail call: it does not return
 * when it succeeds) when the headers are linear and the kernel has nat_write, else rewrites with
 * the helpers (nat_rewrite). Everything else the packet needs (entry state, counters, marks) is
 * done before this call. Returns nat_rewrite's result.
 */
static __always_inline int nat_commit(struct __sk_buff *skb, const struct pkt *p, int dir,
				      const __u8 new_addr[ADDR_LEN], __be16 new_port,
				      struct cpu_scratch *cs)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	int has_l4 = p->frag != FRAG_LATER && p->has_ports;
	struct nat_job *job;
	__u32 end;

	if (!cs)
		goto helpers;
	if (has_l4 && p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
		goto helpers; /* SCTP: no inet checksum (ports only) */
	if (has_l4 && p->l4_off > PKT_OFF_MASK)
		goto helpers; /* IPv6 with ~1 KiB of extension headers: past the writer's offset mask */
	if (has_l4)
		end = (p->l4_off & PKT_OFF_MASK) + (p->proto == IPPROTO_TCP ? TCP_CSUM_OFF + 2 : 8);
	else
		end = (p->l3_off & PKT_OFF_MASK) + (p->family == 4 ? 20 : 40);
	if (data + end > data_end)
		goto helpers;
	job = &cs->job;
	addr_copy(job->addr, new_addr);
	job->port = new_port;
	job->dir = dir;
	job->family = p->family;
	job->proto = p->proto;
	job->has_l4 = has_l4;
	job->l3_off = p->l3_off;
	job->l4_off = p->l4_off;
	skb->cb[4] = 0;
	if (dir == NAT_SRC)
		bpf_tail_call(skb, &nat_writers_egress, 0);
	else
		bpf_tail_call(skb, &nat_writers_ingress, 0);
helpers:
	return nat_rewrite(skb, p, dir, new_addr, new_port);
}

/*
 * The flow_cache slot index of a tuple from its folded addresses (the XOR of each address's
 * words), ports word and protocol: what the general path computes from a struct tuple and the
 * fast path from the packet's headers.
 */
static __always_inline __u32 flow_hash(__u32 sfold, __u32 dfold, __u32 ports, __u8 proto)
{
	__u32 h = sfold ^ ((dfold << 16) | (dfold >> 16)) ^ ports ^ proto;

	return ((h * 0x9E3779B1u) >> 16) & (FLOW_CACHE_SLOTS - 1);
}

static __always_inline __u32 addr_fold(const __u8 a[ADDR_LEN])
{
	const __u32 *w = (const __u32 *)a;

	return w[0] ^ w[1] ^ w[2] ^ w[3];
}

/* Word 2 of an IPv4-mapped address (::ffff:a.b.c.d); words 0 and 1 are zero. */
#define V4_MAPPED_WORD2 bpf_htonl(0x0000ffff)

static __always_inline __u8 addr_family(const __u8 a[ADDR_LEN])
{
	const __u32 *w = (const __u32 *)a;

	return (w[0] | w[1]) == 0 && w[2] == V4_MAPPED_WORD2 ? 4 : 6;
}

static __always_inline struct flow_slot *flow_cache_slot(const struct tuple *t)
{
	__u32 index = flow_hash(addr_fold(t->saddr), addr_fold(t->daddr),
				*(const __u32 *)&t->sport, t->proto);

	return bpf_map_lookup_elem(&flow_cache, &index);
}

/*
 * The word at offset 36 of a slot without its state byte. Little-endian layout of
 * proto, dir, family, state.
 */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define SLOT_TAG(proto, dir, family) ((__u32)(proto) | ((__u32)(dir) << 8) | ((__u32)(family) << 16))
#define SLOT_TAG_MASK 0x00ffffffu
#else
#define SLOT_TAG(proto, dir, family) (((__u32)(proto) << 24) | ((__u32)(dir) << 16) | ((__u32)(family) << 8))
#define SLOT_TAG_MASK 0xffffff00u
#endif

/*
 * Whether slot translates t in direction dir now: same tuple, younger than
 * FLOW_CACHE_TTL_JIFFIES, the packet brings no state bits the entry lacks, and no SYN: a SYN may
 * open a new connection on the tuples of a closed one, which the table entry then records
 * (record_reopen(); a slot only knows its own direction's state), as it records the reply's
 * SYN-ACK. SYNs are one or two packets a connection, and the fast path never takes them.
 */
static __always_inline int flow_slot_hit(const struct flow_slot *s, const struct tuple *t,
					 __u8 dir, __u8 bits, __u64 now_jiffies)
{
	const __u32 *a = (const __u32 *)s;
	const __u32 *b = (const __u32 *)t;
	__u32 diff = (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) |
		     (a[4] ^ b[4]) | (a[5] ^ b[5]) | (a[6] ^ b[6]) | (a[7] ^ b[7]) |
		     (a[8] ^ b[8]);

	return diff == 0 && s->proto == t->proto && s->dir == dir && s->family != 0 &&
	       (__u32)now_jiffies - s->filled_jiffies < FLOW_CACHE_TTL_JIFFIES &&
	       (bits & ~s->state) == 0 && !(bits & STATE_SYN);
}

/* Copies a translation into the flow_cache slot of t. */
static __always_inline void flow_slot_fill(struct flow_slot *s, const struct tuple *t, __u8 dir,
					   const __u8 addr[ADDR_LEN], __be16 port, __u8 state,
					   __u64 now_jiffies)
{
	__u32 *a = (__u32 *)s;
	const __u32 *b = (const __u32 *)t;

	a[0] = b[0];
	a[1] = b[1];
	a[2] = b[2];
	a[3] = b[3];
	a[4] = b[4];
	a[5] = b[5];
	a[6] = b[6];
	a[7] = b[7];
	a[8] = b[8];
	s->proto = t->proto;
	s->dir = dir;
	s->family = addr_family(t->saddr);
	s->state = state;
	addr_copy(s->addr, addr);
	s->port = port;
	s->filled_jiffies = now_jiffies;
}

/*
 * The fast path, tried first by both TC programs: a linear, unfragmented IPv4 (20-byte header) or
 * IPv6 (no extension header) TCP/UDP packet that carries no TCP SYN/FIN/RST, whose flow_cache
 * slot translates it in direction dir. On a hit the translation is put in skb->cb for nat_write
 * (FAST_JOB_*) and 1 is returned; nothing else is needed from the packet (no state bit to record,
 * no last-seen refresh: the slot is younger than its TTL).
 */
static __always_inline int fast_path_hit(struct __sk_buff *skb, __u32 l2_len, __u8 dir)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	const __u32 *w;
	struct flow_slot *s;
	__u32 kind, index, ports;
	__u8 *l3 = data + l2_len;
	__u8 version = ip_version(skb, l2_len, data, data_end);
	__u8 *l4;
	__u8 proto;

	if (version == 4) {
		l4 = l3 + 20;
		if ((void *)(l4 + 8) > data_end)
			return 0;
		if (l3[0] != 0x45 || (*(__u16 *)(l3 + 6) & bpf_htons(IPV4_MF | IPV4_OFFSET_MASK)))
			return 0;
		proto = l3[9];
	} else if (version == 6) {
		l4 = l3 + 40;
		if ((void *)(l4 + 8) > data_end || (l3[0] & 0xf0) != 0x60)
			return 0;
		proto = l3[6];
	} else {
		return 0;
	}
	if (proto == IPPROTO_TCP) {
		if ((void *)(l4 + 20) > data_end ||
		    (l4[13] & (TCP_FLAG_SYN | TCP_FLAG_FIN | TCP_FLAG_RST)))
			return 0;
	} else if (proto != IPPROTO_UDP) {
		return 0;
	}
	ports = *(__u32 *)l4;
	if (version == 4) {
		__u32 saddr = *(__u32 *)(l3 + 12);
		__u32 daddr = *(__u32 *)(l3 + 16);

		index = flow_hash(saddr ^ V4_MAPPED_WORD2, daddr ^ V4_MAPPED_WORD2, ports, proto);
		s = bpf_map_lookup_elem(&flow_cache, &index);
		if (!s)
			return 0;
		w = (const __u32 *)s;
		if (w[3] != saddr || w[7] != daddr || w[8] != ports ||
		    (w[9] & SLOT_TAG_MASK) != SLOT_TAG(proto, dir, 4))
			return 0;
		kind = FAST_JOB_V4;
	} else {
		const __u32 *sa = (const __u32 *)(l3 + 8);
		const __u32 *da = (const __u32 *)(l3 + 24);

		index = flow_hash(sa[0] ^ sa[1] ^ sa[2] ^ sa[3], da[0] ^ da[1] ^ da[2] ^ da[3], ports,
				  proto);
		s = bpf_map_lookup_elem(&flow_cache, &index);
		if (!s)
			return 0;
		w = (const __u32 *)s;
		if (((w[0] ^ sa[0]) | (w[1] ^ sa[1]) | (w[2] ^ sa[2]) | (w[3] ^ sa[3]) |
		     (w[4] ^ da[0]) | (w[5] ^ da[1]) | (w[6] ^ da[2]) | (w[7] ^ da[3]) |
		     (w[8] ^ ports)) != 0 ||
		    (w[9] & SLOT_TAG_MASK) != SLOT_TAG(proto, dir, 6))
			return 0;
		skb->cb[0] = w[10];
		skb->cb[1] = w[11];
		skb->cb[2] = w[12];
		kind = FAST_JOB_V6;
	}
	if ((__u32)bpf_jiffies64() - s->filled_jiffies >= FLOW_CACHE_TTL_JIFFIES)
		return 0;
	skb->cb[3] = w[13];
	skb->cb[4] = ((kind | (l2_len ? 0 : FAST_JOB_L3)) << 16) | *(const __u16 *)&s->port;
	return 1;
}

/* State bits a packet contributes (TCP SYN/FIN/RST). */
static __always_inline __u8 pkt_state_bits(const struct pkt *p)
{
	__u8 bits = 0;

	if (p->proto == IPPROTO_TCP && p->has_ports) {
		if (p->tcp_flags & TCP_FLAG_SYN)
			bits |= STATE_SYN;
		if (p->tcp_flags & TCP_FLAG_FIN)
			bits |= STATE_FIN;
		if (p->tcp_flags & TCP_FLAG_RST)
			bits |= STATE_RST;
	}
	return bits;
}

/*
 * ORs state bits into an entry (atomically: both directions and every CPU may touch it) and
 * refreshes last_seen_ns at most once a second. `state` is byte 2 of the 32-bit word at the
 * entry's `port` (offset 16), so the OR goes to that word.
 */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define STATE_WORD_SHIFT 16
#else
#define STATE_WORD_SHIFT 8
#endif
_Static_assert(__builtin_offsetof(struct snat_entry, port) == 16, "state word");
_Static_assert(__builtin_offsetof(struct snat_entry, state) == 18, "state byte");

static __always_inline void entry_touch(struct snat_entry *e, __u8 bits, __u64 now)
{
	if (bits && (e->state & bits) != bits)
		__sync_fetch_and_or((__u32 *)&e->port, (__u32)bits << STATE_WORD_SHIFT);
	if (now - e->last_seen_ns > NSEC_PER_SEC)
		e->last_seen_ns = now;
}

/*
 * Egress, a packet with SYN found record r: when the connection it holds is closed (FIN or RST
 * seen in either direction) the client has reused its port for a new connection on the same
 * tuples, whose state starts afresh: FIN and RST cleared from the egress entry (its SYN stays),
 * every bit from the ingress entry (the new connection has no reply yet). Without this the new
 * connection inherits the old one's FIN/RST timeout and is swept from under its owner. Each
 * clear is an atomic AND of the entry's state word (programs OR bits into it, the agent its
 * flags). Costs nothing on the fast path: SYNs never take it, and only a SYN on a closed
 * record does the two ANDs.
 */
static __always_inline void record_reopen(struct nat_record *r)
{
	if (!r || !((r->fwd.state | r->rev.state) & STATE_CLOSED))
		return;
	__sync_fetch_and_and((__u32 *)&r->fwd.port, ~((__u32)STATE_CLOSED << STATE_WORD_SHIFT));
	__sync_fetch_and_and((__u32 *)&r->rev.port, ~((__u32)STATE_ALL << STATE_WORD_SHIFT));
}

/* Records the original ports of a first fragment, keyed as its later fragments will arrive. */
static __always_inline void frag_record(const struct pkt *p)
{
	struct frag_key key = {};
	struct frag_value value = {};

	if (p->frag != FRAG_FIRST || !p->has_ports)
		return;
	addr_copy(key.saddr, p->saddr);
	addr_copy(key.daddr, p->daddr);
	key.id = p->frag_id;
	key.proto = p->proto;
	value.sport = p->sport;
	value.dport = p->dport;
	bpf_map_update_elem(&frags, &key, &value, BPF_ANY);
}

/* The ports of a non-first fragment, from its first fragment; 0 when unknown. */
static __always_inline int frag_lookup_ports(struct pkt *p)
{
	struct frag_key key = {};
	struct frag_value *value;

	addr_copy(key.saddr, p->saddr);
	addr_copy(key.daddr, p->daddr);
	key.id = p->frag_id;
	key.proto = p->proto;
	value = bpf_map_lookup_elem(&frags, &key);
	if (!value)
		return 0;
	p->sport = value->sport;
	p->dport = value->dport;
	return 1;
}

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

static __always_inline struct snat_entry *snat_rev_lookup(const struct config *cfg,
							  const struct tuple *k)
{
	struct nat_pos pos = nat_pos_rev(cfg, k);

	return record_entry(record_at(snat_rev_find(cfg, k, pos.home, pos.tag)), NAT_INDEX_REV);
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
 * back). *out receives the forward entry in use. svc_id is left 0: the agent fills it from conns
 * (SNAT_F_RESOLVED).
 */
static __always_inline int snat_allocate(const struct tuple *fwd_key, struct nat_pos fwd_pos,
					 const struct config *cfg, struct cpu_scratch *cs,
					 const __u8 node_addr[ADDR_LEN], __u8 flags, __u8 state,
					 __u64 now, struct snat_entry *out)
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

	__builtin_memset(rev_key, 0, sizeof(*rev_key));
	__builtin_memset(rev_value, 0, sizeof(*rev_value));
	addr_copy(rev_key->saddr, fwd_key->daddr);
	addr_copy(rev_key->daddr, node_addr);
	rev_key->sport = fwd_key->dport;
	rev_key->proto = fwd_key->proto;
	rev_base = nat_rev_base(cfg, rev_key);

	addr_copy(rev_value->addr, fwd_key->saddr);
	rev_value->port = fwd_key->sport;
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

	addr_copy(out->addr, node_addr);
	out->port = rev_key->dport;
	out->state = state;
	out->flags = rev_value->flags;
	out->svc_id = 0;
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
		r = record_at(snat_fwd_find(cfg, fwd_key, fwd_pos.home, fwd_pos.tag));
		if (!r)
			return ALLOC_MAP_FULL;
		__builtin_memcpy(out, &r->fwd, sizeof(*out));
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
	nat_barrier(); /* the record, then REC_USED, then the ways (table.h) */
	*(volatile __u32 *)&r->state = REC_USED;
	nat_publish(&snat_rev, NAT_INDEX_REV, &cs->rev_claim, rec_index);
	nat_publish(&snat_fwd, NAT_INDEX_FWD, &cs->fwd_claim, rec_index);
	return ALLOC_NEW;
}

/* ICMP and ICMPv6 errors that quote the packet they are about. */
static __always_inline int pkt_is_icmp_error(const struct pkt *p)
{
	if (p->family == 4 && p->proto == IPPROTO_ICMP)
		return p->icmp_type == 3 /* destination unreachable, incl. fragmentation needed */ ||
		       p->icmp_type == 11 /* time exceeded */ ||
		       p->icmp_type == 12 /* parameter problem */;
	if (p->family == 6 && p->proto == IPPROTO_ICMPV6)
		return p->icmp_type == 1 /* destination unreachable */ ||
		       p->icmp_type == 2 /* packet too big */ ||
		       p->icmp_type == 3 /* time exceeded */ ||
		       p->icmp_type == 4 /* parameter problem */;
	return 0;
}

enum icmp_xlate_result {
	ICMP_NOT_OURS = 0, /* does not quote a translated flow: untouched */
	ICMP_XLATED = 1,
	ICMP_FAILED = -1, /* a rewrite helper failed: drop */
};

struct quoted_addrs {
	__u8 saddr[ADDR_LEN];
	__u8 daddr[ADDR_LEN];
};

/*
 * Ingress: an ICMP error quoting a packet we translated (node:snat_port -> backend) goes back to
 * the client: the quoted source address and port, the quoted IPv4 header checksum and L4 checksum
 * (when quoted), the ICMP checksum and the outer destination are rewritten. Quoted fields count
 * only inside the outer IP packet's length.
 */
static __always_inline int icmp_error_xlate_ingress(struct __sk_buff *skb, const struct pkt *p,
						    const struct config *cfg)
{
	__u32 inner_l3 = p->l4_off + 8;
	__u32 icmp_csum_at = p->l4_off + ICMP_CSUM_OFF;
	struct quoted_addrs quoted = {};
	struct tuple key = {};
	struct snat_entry client = {};
	struct snat_entry *e;
	__be16 quoted_ports[2];
	__u32 inner_l4;
	__u32 inner_csum_rel;
	__u8 inner_proto;
	__u64 addr_acc;
	__u64 icmp_acc;
	__u16 old_csum;
	__u16 new_csum;
	__be16 ip_len;
	__u32 ip_end;

	/*
	 * The quote ends with the outer IP packet (its length field), not with the frame: bytes
	 * past it (an L2 trailer) are neither quoted nor covered by the ICMP checksum.
	 */
	if (bpf_skb_load_bytes(skb, p->l3_off + (p->family == 4 ? 2 : 4), &ip_len, sizeof(ip_len)))
		return ICMP_NOT_OURS;
	ip_end = p->l3_off + bpf_ntohs(ip_len) + (p->family == 4 ? 0 : sizeof(struct ipv6hdr));

	if (p->family == 4) {
		struct iphdr ip;

		if (inner_l3 + sizeof(ip) > ip_end ||
		    bpf_skb_load_bytes(skb, inner_l3, &ip, sizeof(ip)))
			return ICMP_NOT_OURS;
		if (ip.version != 4 || ip.ihl < 5 ||
		    (bpf_ntohs(ip.frag_off) & IPV4_OFFSET_MASK))
			return ICMP_NOT_OURS;
		inner_proto = ip.protocol;
		inner_l4 = inner_l3 + ip.ihl * 4;
		addr_set_v4(quoted.saddr, ip.saddr);
		addr_set_v4(quoted.daddr, ip.daddr);
	} else {
		struct ipv6hdr ip6;

		if (inner_l3 + sizeof(ip6) > ip_end ||
		    bpf_skb_load_bytes(skb, inner_l3, &ip6, sizeof(ip6)))
			return ICMP_NOT_OURS;
		if (ip6.version != 6)
			return ICMP_NOT_OURS;
		inner_proto = ip6.nexthdr;
		inner_l4 = inner_l3 + sizeof(ip6);
		addr_copy(quoted.saddr, (const __u8 *)&ip6.saddr);
		addr_copy(quoted.daddr, (const __u8 *)&ip6.daddr);
	}
	if (!proto_has_ports(inner_proto))
		return ICMP_NOT_OURS;
	if (inner_l4 + sizeof(quoted_ports) > ip_end ||
	    bpf_skb_load_bytes(skb, inner_l4, quoted_ports, sizeof(quoted_ports)))
		return ICMP_NOT_OURS;
	/* The error must be addressed to the translated source it quotes. */
	if (!addr_equal(p->daddr, quoted.saddr))
		return ICMP_NOT_OURS;

	/* The quoted packet left as node:port -> backend; its reply tuple is the snat_rev key. */
	addr_copy(key.saddr, quoted.daddr);
	addr_copy(key.daddr, quoted.saddr);
	key.sport = quoted_ports[1];
	key.dport = quoted_ports[0];
	key.proto = inner_proto;
	e = snat_rev_lookup(cfg, &key);
	if (!e)
		return ICMP_NOT_OURS;
	addr_copy(client.addr, e->addr);
	client.port = e->port;

	/* Quoted source address (and the quoted IPv4 header checksum). */
	if (p->family == 4) {
		__be32 old4 = addr_get_v4(quoted.saddr);
		__be32 new4 = addr_get_v4(client.addr);

		addr_acc = csum_acc32(0, old4, new4);
		if (bpf_skb_load_bytes(skb, inner_l3 + IPV4_CSUM_OFF, &old_csum, sizeof(old_csum)))
			return ICMP_FAILED;
		new_csum = csum_apply(old_csum, addr_acc);
		if (bpf_skb_store_bytes(skb, inner_l3 + IPV4_CSUM_OFF, &new_csum, sizeof(new_csum), 0) ||
		    bpf_skb_store_bytes(skb, inner_l3 + IPV4_SADDR_OFF, &new4, sizeof(new4), 0))
			return ICMP_FAILED;
		icmp_acc = csum_acc16(addr_acc, old_csum, new_csum);
	} else {
		addr_acc = csum_acc_addr(0, quoted.saddr, client.addr);
		if (bpf_skb_store_bytes(skb, inner_l3 + IPV6_SADDR_OFF, client.addr, ADDR_LEN, 0))
			return ICMP_FAILED;
		icmp_acc = addr_acc;
	}

	/* Quoted L4 checksum, when the quote is long enough to hold it (ICMPv4 may quote 8 bytes). */
	inner_csum_rel = l4_csum_off(inner_proto);
	if (inner_csum_rel && inner_l4 + inner_csum_rel + sizeof(old_csum) <= ip_end &&
	    !bpf_skb_load_bytes(skb, inner_l4 + inner_csum_rel, &old_csum, sizeof(old_csum)) &&
	    !(inner_proto == IPPROTO_UDP && old_csum == 0)) {
		new_csum = csum_apply(old_csum, csum_acc16(addr_acc, quoted_ports[0], client.port));
		if (inner_proto == IPPROTO_UDP && new_csum == 0)
			new_csum = 0xffff;
		if (bpf_skb_store_bytes(skb, inner_l4 + inner_csum_rel, &new_csum, sizeof(new_csum), 0))
			return ICMP_FAILED;
		icmp_acc = csum_acc16(icmp_acc, old_csum, new_csum);
	}

	/* Quoted source port. */
	if (quoted_ports[0] != client.port) {
		if (bpf_skb_store_bytes(skb, inner_l4, &client.port, sizeof(client.port), 0))
			return ICMP_FAILED;
		icmp_acc = csum_acc16(icmp_acc, quoted_ports[0], client.port);
	}

	/* ICMP checksum: the quoted bytes changed by icmp_acc. */
	if (bpf_l4_csum_replace(skb, icmp_csum_at, 0, csum_fold(icmp_acc), 0))
		return ICMP_FAILED;

	/* Outer destination (ICMPv6: also in the ICMPv6 checksum's pseudo header). */
	if (p->family == 4) {
		__be32 old4 = addr_get_v4(p->daddr);
		__be32 new4 = addr_get_v4(client.addr);

		if (csum_store_ipv4_header(skb, p->l3_off, addr_get_v4(p->saddr), new4, old4, new4, 0,
					   0, 0))
			return ICMP_FAILED;
	} else {
		if (csum_rewrite_ipv6_addr(skb, p->l3_off + IPV6_DADDR_OFF, p->daddr, client.addr,
					   icmp_csum_at, 0))
			return ICMP_FAILED;
	}
	return ICMP_XLATED;
}

#endif /* KIB_NAT_H */
