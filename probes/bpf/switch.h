/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * switch.h: switching a node between kube-proxy and the agent without resetting a connection
 * (docs/switching.md), both ways. At a takeover, a connection kube-proxy's conntrack entry held
 * stays kube-proxy's until it ends: its packets are neither marked as service traffic nor
 * translated, so they stay tracked and keep the NAT their conntrack entry holds. At a rollback
 * (drain), the reverse: only the connections the agent handled before go on being marked and
 * translated; new ones are left to conntrack and kube-proxy's rules.
 */
#ifndef KIB_SWITCH_H
#define KIB_SWITCH_H

#include "maps.h"
#include "parsing.h"
#include "conn_state.h"

/*
 * Whether the agent handles the connection of packet `p` (a packet to a service port, or one that
 * would need SNAT), looked up by its own tuple as the hook sees it (built into `key`):
 *   - outside a switch (one bit test): yes;
 *   - CFG_F_SWITCH, the window after a takeover from kube-proxy: unless the tuple is in
 *     switch_flows (a connection kube-proxy's conntrack entry held: it stays tracked; the agent
 *     stores all four tuples of each entry);
 *   - CFG_F_DRAIN, the rollback to kube-proxy: only if the tuple is in switch_flows (a connection
 *     the agent handled before the drain, by its client -> service tuple; every other one goes to
 *     conntrack and kube-proxy's rules).
 * Either way a connection open before the switch keeps the handling it had. A TCP SYN never
 * belongs to one: a SYN on an old connection's tuple opens a new connection, so it removes that
 * tuple (the agent prunes the others).
 */
static __always_inline int switch_ours(const struct config *cfg, const struct pkt *p,
				       struct tuple *key)
{
	int listed;

	if (!(cfg->flags & (CFG_F_SWITCH | CFG_F_DRAIN)))
		return 1;
	tuple_from_pkt(p, key);
	listed = bpf_map_lookup_elem(&switch_flows, key) != NULL;
	if (listed && (pkt_state_bits(p) & STATE_SYN)) {
		bpf_map_delete_elem(&switch_flows, key);
		listed = 0;
	}
	return (cfg->flags & CFG_F_DRAIN) ? listed : !listed;
}

#endif /* KIB_SWITCH_H */
