/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * port_filter.h: the port filter (map port_filter, docs/datapath.md "Port filter"), which lets the
 * general paths skip the lookups that cannot hit: the SNAT table and conns by a backend port (a
 * reply's source port, a forward packet's destination port), snat_rev also by the node's port of
 * a translation (a reply's destination port), svc_ports by a service port.
 *
 * A bit is set before the entry it stands for can be found (the probe's conns entry, the SNAT
 * record's publication, the agent's svc_ports entry) and never cleared, so a clear bit means the
 * lookup would miss. The programs trust the filter only under CFG_F_PORT_FILTER, which the agent
 * sets once it has filled the filter from the maps, after every program that keeps it was
 * attached (an older agent's programs do not).
 */
#ifndef KIB_PORT_FILTER_H
#define KIB_PORT_FILTER_H

#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "maps.h"

enum port_filter_kind {
	PORT_BACKEND = 0,
	PORT_SERVICE = 1,
	PORT_SNAT = 2,
};

/* The word of the kind's bitmap that holds the port (host order), NULL without the map. */
static __always_inline __u64 *port_filter_word(int kind, __u16 port)
{
	__u32 zero = 0;
	struct port_filter *pf = bpf_map_lookup_elem(&port_filter, &zero);
	__u32 word = port >> 6;

	if (!pf)
		return NULL;
	/*
	 * Older verifiers (6.1, 6.12) lose a byte swap's bounds: the index is masked, behind a
	 * barrier, or the compiler drops the mask it knows to be redundant.
	 */
	barrier_var(word);
	word &= PORT_FILTER_WORDS - 1;
	if (kind == PORT_SERVICE)
		return &pf->service[word];
	if (kind == PORT_SNAT)
		return &pf->snat[word];
	return &pf->backend[word];
}

/* 0 when a lookup keyed by this port as `kind` cannot hit; 1 when it may (or no filter is trusted). */
static __always_inline int port_may_be(const struct config *cfg, int kind, __be16 port)
{
	__u16 host_port = bpf_ntohs(port);
	__u64 *word;

	if (!(cfg->flags & CFG_F_PORT_FILTER))
		return 1;
	word = port_filter_word(kind, host_port);
	if (!word)
		return 1;
	return (*(volatile __u64 *)word >> (host_port & 63)) & 1;
}

/*
 * Sets the port's bit (an atomic OR, only when it is clear: the words stay shared read-only in
 * every CPU's cache once the node's ports are in). Ordered before the entry it stands for by that
 * entry's own publication (a release store, or the map update's).
 */
static __always_inline void port_filter_add(int kind, __be16 port)
{
	__u16 host_port = bpf_ntohs(port);
	__u64 *word = port_filter_word(kind, host_port);
	__u64 bit = 1ull << (host_port & 63);

	if (word && !(*(volatile __u64 *)word & bit))
		__sync_fetch_and_or(word, bit);
}

#endif /* KIB_PORT_FILTER_H */
