/* SPDX-License-Identifier: GPL-2.0 */
/*
 * nat.h: the source-NAT mechanics shared by the TC programs: tuples from parsed packets, rewriting
 * a packet's source (egress) or destination (ingress), entry state bits and last-seen refresh,
 * SNAT port allocation (reverse tuple reserved first with BPF_NOEXIST), fragment bookkeeping and
 * the translation of ICMP errors that quote a translated flow; the per-CPU flow cache in front of
 * snat_fwd/snat_rev, and the hand-off of a rewrite to the nat_write program (direct writes).
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

/*
 * The datapath object's own maps (not shared with the probe, never pinned): the flow cache, the
 * rewrite hand-off and the direct-write programs. Their structs are mirrored in
 * probes/src/maps.rs like the shared ones.
 */
/*
 * A per-CPU flow cache slot (flow_cache): the translation of one connection direction, copied
 * from its snat_fwd/snat_rev entry so that established packets translate without a hash-map
 * call. Valid while key matches, dir matches and jiffies - filled_jiffies < FLOW_CACHE_TTL_JIFFIES;
 * `state` holds the state bits the hash entry already has (a packet bringing new bits, and every
 * refresh of last_seen_ns, goes to the hash entry).
 */
struct flow_slot {
	struct tuple key;
	__u8 addr[ADDR_LEN];
	__be16 port;
	__u8 state;
	__u8 dir;
	__u32 pad;
	__u64 filled_jiffies;
};

/*
 * What the nat_write program rewrites (nat_jobs, one per CPU): filled by tc_ingress/tc_egress
 * right before their tail call, read by nat_write on the same CPU.
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

_Static_assert(sizeof(struct flow_slot) == 72, "flow_slot");
_Static_assert(sizeof(struct nat_job) == 28, "nat_job");

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
	__type(value, struct nat_job);
} nat_jobs SEC(".maps");

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
	}
	return 0;
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
	__be16 old_port;
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
	if (!job->has_l4)
		return 0;
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
	old_port = *port;
	if (csum_l4_direct(csum, summed, pseudo, csum_acc16(0, old_port, job->port), udp) &&
	    summed == KIB_CHECKSUM_COMPLETE && job->family == 4)
		/* As bpf_l4_csum_replace(BPF_F_PSEUDO_HDR) does: the IPv4 header absorbed the
		 * address change, the L4 checksum's pseudo-header change is data to skb->csum. */
		bpf_csum_update(skb, csum_fold(csum_acc32(0, new4, old4)));
	*port = job->port;
	return 0;
}

/*
 * Applies a translation: hands it to nat_write (direct writes, tail call: it does not return
 * when it succeeds) when the headers are linear and the kernel has nat_write, else rewrites with
 * the helpers (nat_rewrite). Everything else the packet needs (entry state, counters, marks) is
 * done before this call. Returns nat_rewrite's result.
 */
static __always_inline int nat_commit(struct __sk_buff *skb, const struct pkt *p, int dir,
				      const __u8 new_addr[ADDR_LEN], __be16 new_port)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	int has_l4 = p->frag != FRAG_LATER && p->has_ports;
	__u32 end;
	__u32 zero = 0;
	struct nat_job *job;

	if (has_l4 && p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
		goto helpers; /* SCTP: no inet checksum (ports only) */
	if (has_l4)
		end = (p->l4_off & PKT_OFF_MASK) + (p->proto == IPPROTO_TCP ? TCP_CSUM_OFF + 2 : 8);
	else
		end = (p->l3_off & PKT_OFF_MASK) + (p->family == 4 ? 20 : 40);
	if (data + end > data_end)
		goto helpers;
	job = bpf_map_lookup_elem(&nat_jobs, &zero);
	if (!job)
		goto helpers;
	addr_copy(job->addr, new_addr);
	job->port = new_port;
	job->dir = dir;
	job->family = p->family;
	job->proto = p->proto;
	job->has_l4 = has_l4;
	job->l3_off = p->l3_off;
	job->l4_off = p->l4_off;
	if (dir == NAT_SRC)
		bpf_tail_call(skb, &nat_writers_egress, 0);
	else
		bpf_tail_call(skb, &nat_writers_ingress, 0);
helpers:
	return nat_rewrite(skb, p, dir, new_addr, new_port);
}

/* The flow_cache slot of a tuple (a multiplicative hash of its words). */
static __always_inline struct flow_slot *flow_cache_slot(const struct tuple *t)
{
	const __u32 *w = (const __u32 *)t;
	__u32 h = w[0] ^ w[1] ^ w[2] ^ w[3] ^ w[4] ^ w[5] ^ w[6] ^ w[7] ^ w[8] ^ w[9];
	__u32 index = ((h * 0x9E3779B1u) >> 16) & (FLOW_CACHE_SLOTS - 1);

	return bpf_map_lookup_elem(&flow_cache, &index);
}

/*
 * Whether slot translates t in direction dir now: same tuple, younger than
 * FLOW_CACHE_TTL_JIFFIES, and the packet brings no state bits the entry lacks.
 */
static __always_inline int flow_slot_hit(const struct flow_slot *s, const struct tuple *t,
					 __u8 dir, __u8 bits, __u64 now_jiffies)
{
	const __u32 *a = (const __u32 *)&s->key;
	const __u32 *b = (const __u32 *)t;
	__u32 diff = (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) |
		     (a[4] ^ b[4]) | (a[5] ^ b[5]) | (a[6] ^ b[6]) | (a[7] ^ b[7]) |
		     (a[8] ^ b[8]) | (a[9] ^ b[9]);

	return diff == 0 && s->dir == dir && now_jiffies - s->filled_jiffies < FLOW_CACHE_TTL_JIFFIES &&
	       (bits & ~s->state) == 0;
}

/* Copies an entry's translation into its flow_cache slot. */
static __always_inline void flow_slot_fill(struct flow_slot *s, const struct tuple *t, __u8 dir,
					   const struct snat_entry *e, __u8 bits, __u64 now_jiffies)
{
	__u32 *a = (__u32 *)&s->key;
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
	a[9] = b[9];
	addr_copy(s->addr, e->addr);
	s->port = e->port;
	s->state = e->state | bits;
	s->dir = dir;
	s->filled_jiffies = now_jiffies;
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
};

/*
 * Allocates the SNAT mapping of the connection `fwd_key` (as it leaves, client -> backend) to
 * node_addr. The port is the client's own when it lies outside the local port range (always for
 * SCTP: its CRC32c covers the ports and cannot be updated incrementally), else random in the SNAT
 * range. A port is taken by inserting the reply tuple into snat_rev with BPF_NOEXIST, then the
 * forward entry with BPF_NOEXIST. *out receives the forward entry in use.
 */
static __always_inline int snat_allocate(const struct tuple *fwd_key, const struct config *cfg,
					 const __u8 node_addr[ADDR_LEN], __u32 svc_id, __u8 flags,
					 __u8 state, __u64 now, struct snat_entry *out)
{
	struct tuple rev_key = {};
	struct snat_entry rev_value = {};
	struct snat_entry *existing;
	__u16 client_port = bpf_ntohs(fwd_key->sport);
	__u32 range;
	__u32 random;
	int reserved = 0;
	int ret;
	int i;

	addr_copy(rev_key.saddr, fwd_key->daddr);
	addr_copy(rev_key.daddr, node_addr);
	rev_key.sport = fwd_key->dport;
	rev_key.proto = fwd_key->proto;

	addr_copy(rev_value.addr, fwd_key->saddr);
	rev_value.port = fwd_key->sport;
	rev_value.svc_id = svc_id;
	rev_value.created_ns = now;
	rev_value.last_seen_ns = now;

	if (fwd_key->proto == IPPROTO_SCTP || client_port < cfg->local_port_min ||
	    client_port > cfg->local_port_max) {
		rev_key.dport = fwd_key->sport;
		rev_value.flags = flags | SNAT_F_PORT_KEPT;
		ret = bpf_map_update_elem(&snat_rev, &rev_key, &rev_value, BPF_NOEXIST);
		if (ret == 0)
			reserved = 1;
		else if (ret != -EEXIST)
			return ALLOC_MAP_FULL;
		else if (fwd_key->proto == IPPROTO_SCTP)
			return ALLOC_EXHAUSTED;
	}
	if (!reserved) {
		if (cfg->snat_port_min == 0 || cfg->snat_port_min > cfg->snat_port_max)
			return ALLOC_EXHAUSTED;
		range = (__u32)cfg->snat_port_max - cfg->snat_port_min + 1;
		rev_value.flags = flags;
		/*
		 * One helper call seeds a xorshift32 sequence for the probes. Besides saving calls,
		 * no call sits at the loop's end: the 6.1 verifier rejects a loop whose back edge
		 * is a call's fall-through ("back-edge from insn").
		 */
		random = bpf_get_prandom_u32() | 1;
		for (i = 0; i < SNAT_PORT_PROBES; i++) {
			__u16 port;

			random ^= random << 13;
			random ^= random >> 17;
			random ^= random << 5;
			port = cfg->snat_port_min + random % range;

			rev_key.dport = bpf_htons(port);
			ret = bpf_map_update_elem(&snat_rev, &rev_key, &rev_value, BPF_NOEXIST);
			if (ret == 0) {
				reserved = 1;
				break;
			}
			if (ret != -EEXIST)
				return ALLOC_MAP_FULL;
		}
		if (!reserved)
			return ALLOC_EXHAUSTED;
	}

	addr_copy(out->addr, node_addr);
	out->port = rev_key.dport;
	out->state = state;
	out->flags = rev_value.flags;
	out->svc_id = svc_id;
	out->created_ns = now;
	out->last_seen_ns = now;
	ret = bpf_map_update_elem(&snat_fwd, fwd_key, out, BPF_NOEXIST);
	if (ret == 0)
		return ALLOC_NEW;
	/* Release the reservation: either another CPU won the forward entry, or the map is full. */
	bpf_map_delete_elem(&snat_rev, &rev_key);
	if (ret != -EEXIST)
		return ALLOC_MAP_FULL;
	existing = bpf_map_lookup_elem(&snat_fwd, fwd_key);
	if (!existing)
		return ALLOC_MAP_FULL;
	__builtin_memcpy(out, existing, sizeof(*out));
	return ALLOC_EXISTING;
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
 * (when quoted), the ICMP checksum and the outer destination are rewritten.
 */
static __always_inline int icmp_error_xlate_ingress(struct __sk_buff *skb, const struct pkt *p)
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

	if (p->family == 4) {
		struct iphdr ip;

		if (bpf_skb_load_bytes(skb, inner_l3, &ip, sizeof(ip)))
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

		if (bpf_skb_load_bytes(skb, inner_l3, &ip6, sizeof(ip6)))
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
	if (bpf_skb_load_bytes(skb, inner_l4, quoted_ports, sizeof(quoted_ports)))
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
	e = bpf_map_lookup_elem(&snat_rev, &key);
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
	if (inner_csum_rel &&
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
