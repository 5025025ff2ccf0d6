/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * conn_state.h: the state of a translated connection as packets see it: the state bits a packet
 * brings (TCP SYN/FIN/RST), ORed into its entry with the last-seen refresh read from the per-CPU
 * coarse clock, and the reopening of a closed record by a new SYN on the same tuples.
 */
#ifndef KIB_CONN_STATE_H
#define KIB_CONN_STATE_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "maps.h"
#include "parsing.h"

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

#define NSEC_PER_SEC 1000000000ULL

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

#endif /* KIB_CONN_STATE_H */
