// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * datapath.bpf.c: the packet programs of kube-ipvs-bpf (docs/datapath.md).
 *   tc_ingress / tc_ingress_l3: reverse SNAT, ICMP error translation, reply and service
 *     classification (marks), loadBalancerSourceRanges and other-port filtering;
 *   tc_egress / tc_egress_l3: established SNAT fast path, SNAT decision and port allocation;
 *   nat_write_egress / nat_write_ingress: the direct-write rewrite the TC programs hand
 *     translations to by tail call (nat_writers_*);
 * Both TC programs try the fast path first (flow_cache.h: an established IPv4/IPv6 TCP/UDP flow whose
 * per-CPU flow-cache slot translates it, handed to nat_write in skb->cb, or rewritten with the
 * helpers where no nat_write is installed), then the general path.
 *   xt_svc: socket-filter match for the iptables raw OUTPUT rule (`-m bpf --object-pinned`).
 * The _l3 variants serve devices without an Ethernet header; each pair shares one always_inline
 * body with the link-layer length as a constant parameter. TC programs return TC_ACT_UNSPEC (the
 * next program or the default action runs) unless they drop with TC_ACT_SHOT.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#include "maps.h"
#include "parsing.h"
#include "csum.h"
#include "table.h"
#include "rewrite.h"
#include "flow_cache.h"
#include "conn_state.h"
#include "frag.h"
#include "snat.h"
#include "icmp_xlate.h"
#include "switch.h"
#include "port_filter.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* The reply mark bit (CFG_REPLY_MARK_*), 0 when the agent set none. */
static __always_inline __u32 reply_mark(const struct config *cfg)
{
	__u32 n = (cfg->flags & CFG_REPLY_MARK_MASK) >> CFG_REPLY_MARK_SHIFT;

	return n ? 1u << ((n - 1) & 31) : 0;
}

/* The svc_ports entry of addr:port, NULL when there is none (or the port filter rules it out). */
static __always_inline struct svc_value *svc_port_lookup(const struct config *cfg,
							 const __u8 addr[ADDR_LEN], __be16 port,
							 __u8 proto)
{
	struct svc_key key = {};

	if (!port_may_be(cfg, PORT_SERVICE, port))
		return NULL;
	addr_copy(key.addr, addr);
	key.port = port;
	key.proto = proto;
	return bpf_map_lookup_elem(&svc_ports, &key);
}

static __always_inline int addr_is_service(const __u8 addr[ADDR_LEN])
{
	struct addr_key key = {};
	struct addr_value *value;

	addr_copy(key.addr, addr);
	value = bpf_map_lookup_elem(&svc_addrs, &key);
	return value && (value->flags & ADDR_F_SERVICE);
}

static __always_inline int addr_in_cluster(const __u8 addr[ADDR_LEN])
{
	struct cidr_key key = { .prefixlen = ADDR_LEN * 8 };

	addr_copy(key.addr, addr);
	return bpf_map_lookup_elem(&cluster_cidrs, &key) != NULL;
}

static __always_inline int src_range_allows(__u32 svc_id, const __u8 addr[ADDR_LEN])
{
	struct range_key key = { .prefixlen = 32 + ADDR_LEN * 8, .svc_id = svc_id };

	addr_copy(key.addr, addr);
	return bpf_map_lookup_elem(&src_ranges, &key) != NULL;
}

/* The SNAT sources of a device: its device_slots entry, else devices. */
static __always_inline struct dev_value *device_lookup(__u32 ifindex)
{
	__u32 slot = ifindex & (DEVICE_SLOTS - 1);
	struct dev_slot *s = bpf_map_lookup_elem(&device_slots, &slot);

	if (s && s->ifindex == ifindex)
		return &s->value;
	return bpf_map_lookup_elem(&devices, &ifindex);
}

static __always_inline int conns_has(const struct tuple *client_to_backend)
{
	return bpf_map_lookup_elem(&conns, client_to_backend) != NULL;
}

/*
 * The service of a connection about to be translated: the IPVS probe's conns entry for its
 * forward tuple (written when IPVS created the connection, so before this packet left IPVS) gives
 * the service address:port, svc_ports its id. Returns the id in the low 32 bits (0 when the probe
 * did not record the connection) and, above them, the flags the record gets: SNAT_F_RESOLVED,
 * with SNAT_F_PROBE_HIT when the probe recorded it. A global function: the verifier checks it
 * once, not once per path of its caller (6.1's ran out of its million instructions on
 * tc_egress with it inline).
 */
__attribute__((noinline)) __u64 service_resolve(const struct config *cfg,
						const struct tuple *fwd_key)
{
	const __u64 resolved = (__u64)SNAT_F_RESOLVED << 32;
	struct conn_value *conn;
	struct svc_value *svc;
	struct tuple key;

	if (!cfg || !fwd_key)
		return resolved;
	/* A copy on this stack: 6.1 takes no argument memory as a helper's map key. */
	__builtin_memcpy(&key, fwd_key, sizeof(key));
	conn = bpf_map_lookup_elem(&conns, &key);
	if (!conn)
		return resolved;
	svc = svc_port_lookup(cfg, conn->vaddr, conn->vport, key.proto);
	return resolved | ((__u64)SNAT_F_PROBE_HIT << 32) | (svc ? svc->svc_id : 0);
}

/* egress_general() counts a new record's probe_hit or probe_miss from its SNAT_F_PROBE_HIT bit. */
_Static_assert(STAT_PROBE_MISS == STAT_PROBE_HIT + 1 && SNAT_F_PROBE_HIT == 0x02, "probe stats");

/* Ingress, IPv4/IPv6 non-first fragment: reverse translation from the first fragment's ports. */
static __always_inline int ingress_later_fragment(struct __sk_buff *skb, struct pkt *p,
						  const struct config *cfg)
{
	struct tuple key = {};
	struct snat_entry *e;

	if (!frag_lookup_ports(p))
		return TC_ACT_UNSPEC;
	tuple_from_pkt(p, &key);
	e = snat_rev_lookup(cfg, &key);
	if (!e)
		return TC_ACT_UNSPEC;
	skb->mark |= cfg->mark_svc;
	stat_inc(STAT_FRAG_XLATE);
	if (nat_commit(skb, p, NAT_DST, e->addr, e->port, scratch_get())) {
		stat_inc(STAT_PARSE_ERROR);
		return TC_ACT_SHOT;
	}
	return TC_ACT_UNSPEC;
}

/*
 * The prologue of both general paths: 1 when p holds an IP packet to go on with; 0 when the packet
 * is not ours to translate: not IP, or not parsable (counted as parse_error). Either way it passes.
 */
static __always_inline int general_parse(struct __sk_buff *skb, __u32 l2_len, struct pkt *p)
{
	int ret = parse_packet(skb, l2_len, p);

	if (ret == PARSE_NOT_IP)
		return 0;
	if (ret != PARSE_OK) {
		stat_inc(STAT_PARSE_ERROR);
		return 0;
	}
	return 1;
}

/* Ingress after the fast path: every packet the fast path did not translate. */
static __always_inline int ingress_general(struct __sk_buff *skb, __u32 l2_len,
					   const struct config *cfg)
{
	struct pkt p = {};
	struct tuple key = {};
	struct snat_entry *e;
	struct svc_value *svc;
	struct flow_slot *slot;
	struct cpu_scratch *cs;
	__u32 index, gen = 0;
	__u64 now_jiffies;
	long rec;
	__u8 bits;
	int ret;

	if (!general_parse(skb, l2_len, &p))
		return TC_ACT_UNSPEC;
	if (p.frag == FRAG_LATER)
		return ingress_later_fragment(skb, &p, cfg);

	/* 1. Reverse SNAT: ICMP errors quoting a translated flow, then replies. */
	if (pkt_is_icmp_error(&p)) {
		ret = icmp_error_xlate_ingress(skb, &p, cfg);
		if (ret == ICMP_XLATED) {
			skb->mark |= cfg->mark_svc;
			stat_inc(STAT_ICMP_XLATE);
		} else if (ret == ICMP_FAILED) {
			stat_inc(STAT_PARSE_ERROR);
			return TC_ACT_SHOT;
		}
		return TC_ACT_UNSPEC;
	}
	if (!p.has_ports)
		return TC_ACT_UNSPEC;
	tuple_from_pkt(&p, &key);
	bits = pkt_state_bits(&p) | STATE_REPLY;
	now_jiffies = bpf_jiffies64();
	cs = scratch_get();
	index = flow_index(&key, NAT_DST);
	slot = p.frag == FRAG_NONE ? flow_cache_slot(index) : NULL;
	if (slot && flow_slot_hit(slot, &key, NAT_DST, bits, now_jiffies)) {
		skb->mark |= cfg->mark_svc | reply_mark(cfg);
		stat_inc(STAT_REV_HIT);
		return nat_commit(skb, &p, NAT_DST, slot->addr, slot->port, cs) ? TC_ACT_SHOT
										 : TC_ACT_UNSPEC;
	}
	/* Before the lookup whose miss a verdict records (flow_cache.h, flow_gen). */
	if (slot)
		gen = flow_gen_read(index);
	/*
	 * Steps 1 and 2 look up the reply's tuple, whose source port is its connection's backend
	 * port: a port no such connection has (port_filter.h) skips both lookups. A translation's
	 * reply also comes to the node's port of it.
	 */
	if (!port_may_be(cfg, PORT_BACKEND, p.sport))
		goto not_a_reply;
	rec = port_may_be(cfg, PORT_SNAT, p.dport) ? snat_rev_record(cfg, &key) : -ENOENT;
	e = record_entry(record_at(rec), NAT_INDEX_REV);
	if (e) {
		entry_touch(e, bits, clock_coarse_ns(cs, now_jiffies));
		frag_record(&p);
		if (slot)
			flow_slot_fill(slot, &key, NAT_DST, e->addr, e->port, e->state | bits, rec,
				       now_jiffies);
		skb->mark |= cfg->mark_svc | reply_mark(cfg);
		stat_inc(STAT_REV_HIT);
		if (nat_commit(skb, &p, NAT_DST, e->addr, e->port, cs)) {
			stat_inc(STAT_PARSE_ERROR);
			return TC_ACT_SHOT;
		}
		return TC_ACT_UNSPEC;
	}

	/* 2. Reply of an untranslated service connection (the probe saw client -> backend). */
	tuple_reversed_from_pkt(&p, &key);
	if (conns_has(&key)) {
		__u32 bits = cfg->mark_svc | reply_mark(cfg);

		skb->mark |= bits;
		stat_inc(STAT_REPLY_MARKED);
		if (slot) {
			tuple_from_pkt(&p, &key);
			flow_verdict_fill(slot, &key, FLOW_VERDICT_INGRESS, bits, 0,
					  STAT_REPLY_MARKED, gen, now_jiffies);
		}
		return TC_ACT_UNSPEC;
	}
	tuple_from_pkt(&p, &key);
not_a_reply:

	/* 3. Service port. */
	svc = svc_port_lookup(cfg, p.daddr, p.dport, p.proto);
	if (svc) {
		__u32 bits = cfg->mark_svc;

		if ((svc->flags & SVC_F_SRC_RANGES) && !src_range_allows(svc->svc_id, p.saddr)) {
			stat_drop(STAT_FILTERED_SRC_RANGE, &key);
			goto dropped;
		}
		/* A connection open before a switch keeps the handling it had (switch.h). */
		if (!switch_ours(cfg, &p, &key))
			goto unmarked;
		if ((svc->flags & SVC_F_MASQ) || (cfg->flags & CFG_F_MASQ_ALL) ||
		    ((svc->flags & SVC_F_MASQ_OFFCLUSTER) && (cfg->flags & CFG_F_CLUSTER_CIDRS) &&
		     !addr_in_cluster(p.saddr)))
			bits |= cfg->mark_masq;
		skb->mark |= bits;
		stat_inc(STAT_SVC_MARKED);
		if (slot)
			flow_verdict_fill(slot, &key, FLOW_VERDICT_INGRESS, bits, 0, STAT_SVC_MARKED,
					  gen, now_jiffies);
		return TC_ACT_UNSPEC;
	}

	/* 4. Other ports on a service address. */
	if (addr_is_service(p.daddr)) {
		stat_drop(STAT_FILTERED_PORT, &key);
		goto dropped;
	}
unmarked:
	/*
	 * Not service traffic (or not the agent's, switch.h): its next packets pass at once, until a
	 * translation whose replies are this flow is made (by another CPU, or before its first
	 * reply: a UDP reply is no SYN): that bumps flow_gen on this index and ends the verdict.
	 * It gets the reply mark without the service mark: egress has nothing to do for it either
	 * (docs/datapath.md, Marks), unless another NAT than IPVS sent it back to its own source.
	 */
	skb->mark |= reply_mark(cfg);
	if (slot)
		flow_verdict_fill(slot, &key, FLOW_VERDICT_INGRESS, reply_mark(cfg), 0, STAT_MAX,
				  gen, now_jiffies);
	return TC_ACT_UNSPEC;
dropped:
	/* A verdict the slot may still hold for this tuple is over. */
	if (slot)
		flow_verdict_forget(slot, &key);
	return TC_ACT_SHOT;
}

/*
 * A fast-path translation no nat_write program took (kernels before 6.2, or the agent gone): the
 * helpers rewrite it, counted as nat_write counts it.
 */
static __always_inline int fast_nat_helpers(struct __sk_buff *skb, __u32 l2_len, int dir)
{
	stat_inc(dir == NAT_SRC ? STAT_FWD_HIT : STAT_REV_HIT);
	if (fast_rewrite_helpers(skb, l2_len, dir)) {
		stat_inc(STAT_PARSE_ERROR);
		return TC_ACT_SHOT;
	}
	return TC_ACT_UNSPEC;
}

static __always_inline int handle_ingress(struct __sk_buff *skb, __u32 l2_len)
{
	struct config *cfg = config_get();
	int fast;

	/* mark_svc == 0: not configured yet, everything passes untouched. */
	if (!cfg || !cfg->mark_svc)
		return TC_ACT_UNSPEC;
	fast = fast_path(skb, l2_len, NAT_DST);
	if (fast == FAST_DONE)
		return TC_ACT_UNSPEC;
	if (fast == FAST_NAT) {
		skb->mark |= cfg->mark_svc | reply_mark(cfg);
		if (cfg->flags & CFG_F_DIRECT_WRITES)
			bpf_tail_call(skb, &nat_writers_ingress, 0);
		return fast_nat_helpers(skb, l2_len, NAT_DST);
	}
	return ingress_general(skb, l2_len, cfg);
}

/* Egress, non-first fragment: forward translation from the first fragment's ports. */
static __always_inline int egress_later_fragment(struct __sk_buff *skb, struct pkt *p,
						 const struct config *cfg)
{
	struct tuple key = {};
	struct snat_entry *e = NULL;

	if (frag_lookup_ports(p)) {
		tuple_from_pkt(p, &key);
		e = snat_fwd_lookup(cfg, &key);
	}
	if (!e) {
		/* Only a fragment known to need SNAT is dropped; others are not ours. */
		if (skb->mark & cfg->mark_masq) {
			stat_drop(STAT_FRAG_MISS, &key);
			return TC_ACT_SHOT;
		}
		return TC_ACT_UNSPEC;
	}
	stat_inc(STAT_FRAG_XLATE);
	if (nat_commit(skb, p, NAT_SRC, e->addr, e->port, scratch_get())) {
		stat_inc(STAT_PARSE_ERROR);
		return TC_ACT_SHOT;
	}
	return TC_ACT_UNSPEC;
}

/* Why the first packet of this connection needs SNAT (SNAT_F_* reason), 0 when it does not. */
static __always_inline __u8 snat_reason(const struct pkt *p, __u32 mark, const struct config *cfg)
{
	if (mark & cfg->mark_masq)
		return SNAT_F_MASQ;
	if (addr_equal(p->saddr, p->daddr))
		return SNAT_F_HAIRPIN;
	/*
	 * A service port as the source means an IPVS reply (reverse-DNATed) leaving towards a client:
	 * never translated, whatever the client's address.
	 */
	if ((mark & cfg->mark_svc) && (cfg->flags & CFG_F_CLUSTER_CIDRS) &&
	    !addr_in_cluster(p->daddr) && !svc_port_lookup(cfg, p->saddr, p->sport, p->proto))
		return SNAT_F_OFFCLUSTER;
	if (addr_is_service(p->saddr) && !svc_port_lookup(cfg, p->saddr, p->sport, p->proto))
		return SNAT_F_HOST;
	return 0;
}

/* Egress after the fast path: every packet the fast path did not translate. */
static __always_inline int egress_general(struct __sk_buff *skb, __u32 l2_len,
					  const struct config *cfg)
{
	struct pkt p = {};
	struct tuple key = {};
	struct snat_entry entry = {};
	struct snat_entry *e;
	struct nat_record *r;
	struct dev_value *dev;
	struct flow_slot *slot;
	struct cpu_scratch *cs;
	struct nat_pos fwd_pos = {};
	int fwd_pos_known;
	const __u8 *node_addr;
	__u32 ifindex = skb->ifindex;
	__u32 index, gen = 0;
	__u32 rec = 0;
	__u64 resolution;
	__u32 svc_id;
	long found;
	__u64 now_jiffies;
	__u8 bits;
	__u64 now;
	__u8 flags;
	int ret;

	if (!general_parse(skb, l2_len, &p))
		return TC_ACT_UNSPEC;
	if (p.frag == FRAG_LATER)
		return egress_later_fragment(skb, &p, cfg);
	if (!p.has_ports)
		return TC_ACT_UNSPEC;

	/* 1. Established: the flow cache (packets the fast path does not take), then snat_fwd. */
	tuple_from_pkt(&p, &key);
	bits = pkt_state_bits(&p);
	now_jiffies = bpf_jiffies64();
	cs = scratch_get();
	index = flow_index(&key, NAT_SRC);
	slot = p.frag == FRAG_NONE ? flow_cache_slot(index) : NULL;
	if (slot && flow_slot_hit(slot, &key, NAT_SRC, bits, now_jiffies)) {
		stat_inc(STAT_FWD_HIT);
		return nat_commit(skb, &p, NAT_SRC, slot->addr, slot->port, cs) ? TC_ACT_SHOT
										 : TC_ACT_UNSPEC;
	}
	/* Before the lookup whose miss a verdict records (flow_cache.h, FLOW_VERDICT_EGRESS). */
	if (slot)
		gen = flow_gen_read(index);
	/*
	 * A forward packet's destination port is its connection's backend port: a port no such
	 * connection has (port_filter.h) skips the lookup, and its hash until an allocation needs it.
	 */
	fwd_pos_known = port_may_be(cfg, PORT_BACKEND, p.dport);
	found = -ENOENT;
	if (fwd_pos_known) {
		fwd_pos = nat_pos_fwd(cfg, &key);
		found = snat_fwd_find(cfg, &key, fwd_pos.home, fwd_pos.tag);
	}
	r = record_at(found);
	e = record_entry(r, NAT_INDEX_FWD);
	if (e) {
		if (bits & STATE_SYN)
			record_reopen(r);
		entry_touch(e, bits, clock_coarse_ns(cs, now_jiffies));
		frag_record(&p);
		if (slot)
			flow_slot_fill(slot, &key, NAT_SRC, e->addr, e->port, e->state | bits, found,
				       now_jiffies);
		stat_inc(STAT_FWD_HIT);
		if (nat_commit(skb, &p, NAT_SRC, e->addr, e->port, cs)) {
			stat_inc(STAT_PARSE_ERROR);
			return TC_ACT_SHOT;
		}
		return TC_ACT_UNSPEC;
	}

	/* 2. Does this connection need SNAT? */
	flags = snat_reason(&p, skb->mark, cfg);
	if (!flags) {
		__u32 mask = cfg->mark_svc | cfg->mark_masq;

		if (slot)
			flow_verdict_fill(slot, &key, FLOW_VERDICT_EGRESS, skb->mark & mask, mask, 0,
					  gen, now_jiffies);
		return TC_ACT_UNSPEC;
	}
	/*
	 * Not one open before the switch from kube-proxy; and no new translation while draining
	 * (a connection the agent translated before the drain has its record: step 1).
	 */
	if ((cfg->flags & CFG_F_DRAIN) || !switch_ours(cfg, &p, &key))
		return TC_ACT_UNSPEC;

	/* 3. Allocation. */
	dev = device_lookup(ifindex);
	if (!dev) {
		stat_inc(STAT_NO_SNAT_ADDR);
		return TC_ACT_UNSPEC;
	}
	node_addr = p.family == 4 ? dev->addr4 : dev->addr6;
	if (addr_is_zero(node_addr)) {
		stat_inc(STAT_NO_SNAT_ADDR);
		return TC_ACT_UNSPEC;
	}
	if (!cs)
		return TC_ACT_UNSPEC;
	now = clock_coarse_ns(cs, now_jiffies);
	if (!fwd_pos_known)
		fwd_pos = nat_pos_fwd(cfg, &key);
	resolution = service_resolve(cfg, &key);
	svc_id = (__u32)resolution;
	flags |= (__u8)(resolution >> 32);
	ret = snat_allocate(&key, fwd_pos, cfg, cs, node_addr, svc_id, flags, bits, now, &entry,
			    &rec);
	if (ret == ALLOC_EXHAUSTED) {
		stat_drop(STAT_PORT_EXHAUSTED, &key);
		return TC_ACT_SHOT;
	}
	if (ret == ALLOC_MAP_FULL) {
		stat_drop(STAT_MAP_FULL, &key);
		return TC_ACT_SHOT;
	}
	if (ret == ALLOC_LOCK_BUSY) {
		stat_drop(STAT_LOCK_BUSY, &key);
		return TC_ACT_SHOT;
	}
	if (ret == ALLOC_NEW) {
		/*
		 * Published: ends every CPU's verdicts on the indexes of its two tuples: egress "no
		 * SNAT" on its forward tuple's egress index, ingress "not ours" on its replies' ingress
		 * index.
		 */
		flow_gen_bump(index);
		flow_gen_bump(flow_index(&cs->rev_key, NAT_DST));
		stat_inc(STAT_SNAT_ALLOC);
		/* probe_hit or probe_miss, without a branch (no second path for the verifier) */
		stat_inc(STAT_PROBE_MISS - ((flags & SNAT_F_PROBE_HIT) >> 1));
		if (entry.flags & SNAT_F_PORT_KEPT)
			stat_inc(STAT_SNAT_PORT_REUSE);
	}
	/* The next packets of the connection take the fast path. */
	if (slot)
		flow_slot_fill(slot, &key, NAT_SRC, entry.addr, entry.port, entry.state, rec,
			       now_jiffies);
	/* 4. First fragment of a translated flow. */
	frag_record(&p);
	if (nat_commit(skb, &p, NAT_SRC, entry.addr, entry.port, cs)) {
		stat_inc(STAT_PARSE_ERROR);
		return TC_ACT_SHOT;
	}
	return TC_ACT_UNSPEC;
}

static __always_inline int handle_egress(struct __sk_buff *skb, __u32 l2_len)
{
	struct config *cfg = config_get();
	int fast;

	if (!cfg || !cfg->mark_svc)
		return TC_ACT_UNSPEC;
	/*
	 * The reply mark: a reply ingress recognized (with the service mark: reverse SNAT, a conns
	 * hit), or traffic ingress found none of the agent's (without it). Nothing to do here, but
	 * for the hairpin of another NAT than IPVS (a DNAT back to the packet's own source): only
	 * egress sees that, and it needs SNAT.
	 */
	if ((skb->mark & reply_mark(cfg)) &&
	    ((skb->mark & cfg->mark_svc) || !pkt_may_be_hairpin(skb, l2_len)))
		return TC_ACT_UNSPEC;
	fast = fast_path(skb, l2_len, NAT_SRC);
	if (fast == FAST_DONE)
		return TC_ACT_UNSPEC;
	if (fast == FAST_NAT) {
		if (cfg->flags & CFG_F_DIRECT_WRITES)
			bpf_tail_call(skb, &nat_writers_egress, 0);
		return fast_nat_helpers(skb, l2_len, NAT_SRC);
	}
	return egress_general(skb, l2_len, cfg);
}

SEC("tc")
int tc_ingress(struct __sk_buff *skb)
{
	return handle_ingress(skb, ETH_HEADER_LEN);
}

SEC("tc")
int tc_ingress_l3(struct __sk_buff *skb)
{
	return handle_ingress(skb, 0);
}

SEC("tc")
int tc_egress(struct __sk_buff *skb)
{
	return handle_egress(skb, ETH_HEADER_LEN);
}

SEC("tc")
int tc_egress_l3(struct __sk_buff *skb)
{
	return handle_egress(skb, 0);
}

/* The checksum state of the skb (kernel struct sk_buff, CO-RE). */
struct sk_buff___kib {
	__u8 ip_summed : 2;
} __attribute__((preserve_access_index));

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym __weak;

/*
 * The tail-call targets of nat_commit() (one per direction): rewrites the packet as the per-CPU nat_job says, with
 * direct packet writes (so it, and only it, gets the verifier's unclone prologue: a cloned skb
 * is made writable only when it is translated, as bpf_skb_store_bytes would). Loaded only where
 * bpf_cast_to_kern_ctx exists (Linux 6.2+): it reads skb->ip_summed for the checksum rules.
 */
static __always_inline int nat_write(struct __sk_buff *skb, int dir)
{
	struct sk_buff___kib *kskb = bpf_cast_to_kern_ctx(skb);
	__u32 summed = BPF_CORE_READ_BITFIELD(kskb, ip_summed);
	__u32 cb4 = skb->cb[4];
	struct cpu_scratch *cs;

	if (cb4) {
		/* Fast path: counted here, where it is known to be rewritten. */
		stat_inc(dir == NAT_SRC ? STAT_FWD_HIT : STAT_REV_HIT);
		if (nat_write_fast(skb, cb4, dir, summed)) {
			stat_inc(STAT_PARSE_ERROR);
			return TC_ACT_SHOT;
		}
		return TC_ACT_UNSPEC;
	}
	cs = scratch_get();
	if (!cs)
		return TC_ACT_SHOT;
	if (nat_write_direct(skb, &cs->job, summed)) {
		stat_inc(STAT_PARSE_ERROR);
		return TC_ACT_SHOT;
	}
	return TC_ACT_UNSPEC;
}

SEC("tc")
int nat_write_egress(struct __sk_buff *skb)
{
	return nat_write(skb, NAT_SRC);
}

SEC("tc")
int nat_write_ingress(struct __sk_buff *skb)
{
	return nat_write(skb, NAT_DST);
}

/*
 * iptables `-m bpf --object-pinned` in raw OUTPUT: the skb starts at the IP header. Matches (1) a
 * packet to a service port, or (2) a reply of a service connection the probe saw. Never modifies.
 */
SEC("socket")
int xt_svc(struct __sk_buff *skb)
{
	struct config *cfg = config_get();
	struct pkt p = {};
	struct tuple key = {};

	if (!cfg || parse_from_l3(skb, 0, &p) != PARSE_OK || !p.has_ports)
		return 0;
	if (svc_port_lookup(cfg, p.daddr, p.dport, p.proto)) {
		/* A connection open before a switch keeps the handling it had (switch.h). */
		return switch_ours(cfg, &p, &key);
	}
	if (!port_may_be(cfg, PORT_BACKEND, p.sport))
		return 0;
	tuple_reversed_from_pkt(&p, &key);
	if (conns_has(&key))
		return 1;
	return 0;
}
