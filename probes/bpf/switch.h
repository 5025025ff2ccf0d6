/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * switch.h: the switch window from kube-proxy (docs/switching.md). A connection kube-proxy's
 * conntrack entry held when the agent took the node over stays kube-proxy's until it ends: its
 * packets are neither marked as service traffic nor translated, so they stay tracked and keep the
 * NAT their conntrack entry holds.
 */
#ifndef KIB_SWITCH_H
#define KIB_SWITCH_H

#include "maps.h"
#include "parsing.h"
#include "conn_state.h"

/*
 * Whether packet `p` belongs to a connection open before the switch, looked up by its own tuple
 * as the hook sees it (built into `key`; the agent stores all four tuples of each entry).
 * Outside the window: one bit test. A TCP SYN is never exempt: a SYN on an old connection's
 * tuples opens a new connection, which is the agent's; it removes that tuple (the agent's next
 * dump prunes the others).
 */
static __always_inline int switch_exempt(const struct config *cfg, const struct pkt *p,
					 struct tuple *key)
{
	if (!(cfg->flags & CFG_F_SWITCH))
		return 0;
	tuple_from_pkt(p, key);
	if (!bpf_map_lookup_elem(&switch_flows, key))
		return 0;
	if (pkt_state_bits(p) & STATE_SYN) {
		bpf_map_delete_elem(&switch_flows, key);
		return 0;
	}
	return 1;
}

#endif /* KIB_SWITCH_H */
