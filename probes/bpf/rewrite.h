/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * rewrite.h: rewriting a packet's source (egress) or destination (ingress) address and port with
 * every checksum, once the translation is known. nat_commit() hands the rewrite to the nat_write
 * programs (direct writes, tail call through nat_writers_*: the per-CPU nat_job, or skb->cb for a
 * fast-path hit, FAST_JOB_*) when the kernel has them and the headers are linear, else rewrites
 * with the helpers (nat_rewrite; fast_rewrite_helpers() for a fast-path hit). nat_write_direct()
 * and nat_write_fast() are the writers' side.
 */
#ifndef KIB_REWRITE_H
#define KIB_REWRITE_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "maps.h"
#include "parsing.h"
#include "csum.h"

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
 * The fast path's translation (skb->cb, FAST_JOB_*, as nat_write_fast() takes it) with the
 * helpers, where no nat_write program is there to take it (kernels before 6.2, which cannot read
 * ip_summed; or the agent gone): the headers fast_path() checked, as the struct pkt nat_rewrite()
 * needs. Returns nat_rewrite()'s result, -1 when the headers are not where they were.
 */
static __always_inline int fast_rewrite_helpers(struct __sk_buff *skb, __u32 l2_len, int dir)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 cb4 = skb->cb[4];
	__u8 *l3 = data + l2_len;
	__u8 new_addr[ADDR_LEN];
	struct pkt p = {};
	__u32 *na = (__u32 *)new_addr;
	const __u32 *ports;

	p.l3_off = l2_len;
	p.frag = FRAG_NONE;
	p.has_ports = 1;
	if ((cb4 >> 16 & ~FAST_JOB_L3) == FAST_JOB_V4) {
		if ((void *)(l3 + 24) > data_end)
			return -1;
		p.family = 4;
		p.proto = l3[9];
		p.l4_off = l2_len + 20;
		addr_set_v4(p.saddr, *(__be32 *)(l3 + 12));
		addr_set_v4(p.daddr, *(__be32 *)(l3 + 16));
		addr_set_v4(new_addr, skb->cb[3]);
		ports = (const __u32 *)(l3 + 20);
	} else {
		if ((void *)(l3 + 44) > data_end)
			return -1;
		p.family = 6;
		p.proto = l3[6];
		p.l4_off = l2_len + 40;
		addr_copy(p.saddr, l3 + 8);
		addr_copy(p.daddr, l3 + 24);
		na[0] = skb->cb[0];
		na[1] = skb->cb[1];
		na[2] = skb->cb[2];
		na[3] = skb->cb[3];
		ports = (const __u32 *)(l3 + 40);
	}
	p.sport = ((const __be16 *)ports)[0];
	p.dport = ((const __be16 *)ports)[1];
	return nat_rewrite(skb, &p, dir, new_addr, (__be16)cb4);
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

#endif /* KIB_REWRITE_H */
