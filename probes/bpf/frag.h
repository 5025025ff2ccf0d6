/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * frag.h: fragment bookkeeping: a first fragment's ports recorded in `frags`, keyed as its later
 * fragments (which carry no L4 header) arrive, and looked up for them.
 */
#ifndef KIB_FRAG_H
#define KIB_FRAG_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "maps.h"
#include "parsing.h"

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

#endif /* KIB_FRAG_H */
