/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * csum.h: checksum maintenance for rewritten packets.
 *
 * L4 checksums of the packet's own headers go through bpf_l4_csum_replace, which knows the skb's
 * checksum state (CHECKSUM_PARTIAL from veth/GSO, CHECKSUM_COMPLETE from NICs):
 *   - IPv4 address: the header checksum is computed here (RFC 1624) and written in the same
 *     bpf_skb_store_bytes as the addresses (and ports); the L4 checksum with BPF_F_PSEUDO_HDR
 *     (TCP, UDP; ICMPv4 has no pseudo header);
 *   - IPv6 address: the L4 checksum with BPF_F_PSEUDO_HDR and the address diff; the address
 *     itself is stored with BPF_F_RECOMPUTE_CSUM. On a CHECKSUM_COMPLETE skb the
 *     pseudo-header update subtracts the diff from skb->csum as if an IPv4 header checksum had
 *     absorbed it; IPv6 has none, and the recompute flag adds it back (BPF_F_IPV6 does the same
 *     since Linux 6.16 but is rejected by older kernels);
 *   - ports: bpf_l4_csum_replace without the pseudo flag;
 *   - UDP: BPF_F_MARK_MANGLED_0, so an IPv4 UDP checksum of 0 ("none") stays 0 and a computed 0
 *     becomes 0xffff.
 * The nat_write program (direct packet writes, kernels with bpf_cast_to_kern_ctx) does the same
 * arithmetic inline, with the rules of the helpers above made explicit per skb->ip_summed (read
 * through bpf_cast_to_kern_ctx with CO-RE): see csum_l4_direct() below.
 * Fields quoted inside an ICMP error are payload, not headers of this skb: they are updated with
 * the plain one's-complement arithmetic below, and the ICMP checksum gets the sum of their diffs.
 */
#ifndef KIB_CSUM_H
#define KIB_CSUM_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "parsing.h"

#define IPV4_CSUM_OFF 10
#define IPV4_SADDR_OFF 12
#define IPV4_DADDR_OFF 16
#define IPV6_SADDR_OFF 8
#define IPV6_DADDR_OFF 24
#define TCP_CSUM_OFF 16
#define UDP_CSUM_OFF 6
#define ICMP_CSUM_OFF 2

/* Offset of the checksum inside the L4 header, 0 when the protocol has no inet checksum. */
static __always_inline __u32 l4_csum_off(__u8 proto)
{
	if (proto == IPPROTO_TCP)
		return TCP_CSUM_OFF;
	if (proto == IPPROTO_UDP)
		return UDP_CSUM_OFF;
	return 0;
}

static __always_inline __u64 l4_csum_flags(__u8 proto)
{
	return proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
}

/*
 * One's-complement arithmetic on 16-bit words as they lie in memory (byte-order neutral).
 * Folding any 64-bit sum: after the 32-bit step it is below 2^33, then below 2^18, 2^16 + 4,
 * and 2^16.
 */
static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* Adds the change old -> new of a 16-bit field to a diff accumulator. */
static __always_inline __u64 csum_acc16(__u64 acc, __u16 old, __u16 new)
{
	return acc + (__u16)~old + new;
}

/* Adds the change old -> new of a 32-bit field to a diff accumulator. */
static __always_inline __u64 csum_acc32(__u64 acc, __u32 old, __u32 new)
{
	return acc + (__u32)~old + new;
}

/* Adds the change of a 16-byte address (4-byte aligned) to a diff accumulator. */
static __always_inline __u64 csum_acc_addr(__u64 acc, const __u8 old[ADDR_LEN],
					   const __u8 new[ADDR_LEN])
{
	const __u32 *o = (const __u32 *)old;
	const __u32 *n = (const __u32 *)new;

	acc = csum_acc32(acc, o[0], n[0]);
	acc = csum_acc32(acc, o[1], n[1]);
	acc = csum_acc32(acc, o[2], n[2]);
	return csum_acc32(acc, o[3], n[3]);
}

/* The checksum field after the covered data changed by `acc`. */
static __always_inline __u16 csum_apply(__u16 field, __u64 acc)
{
	return (__u16)~csum_fold(acc + (__u16)~field);
}

/*
 * IPv4 header: writes the final addresses with the header checksum updated here (RFC 1624; an
 * IPv4 header checksum is never offloaded and stays balanced, so this is right for every skb
 * checksum state), in one bpf_skb_store_bytes of [check | saddr | daddr], extended with
 * [sport | dport] when `with_ports` (the L4 header directly follows a 20-byte header).
 * `old_addr` -> `new_addr` is the address that changed.
 */
static __always_inline int csum_store_ipv4_header(struct __sk_buff *skb, __u32 l3_off,
						  __be32 saddr, __be32 daddr, __be32 old_addr,
						  __be32 new_addr, int with_ports, __be16 sport,
						  __be16 dport)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + (l3_off & PKT_OFF_MASK);
	__u16 words[7];
	__u16 check;

	if ((void *)(ip + 1) <= data_end)
		check = ip->check;
	else if (bpf_skb_load_bytes(skb, l3_off + IPV4_CSUM_OFF, &check, sizeof(check)))
		return -1;
	words[0] = csum_apply(check, csum_acc32(0, old_addr, new_addr));
	__builtin_memcpy(&words[1], &saddr, sizeof(saddr));
	__builtin_memcpy(&words[3], &daddr, sizeof(daddr));
	if (with_ports) {
		words[5] = sport;
		words[6] = dport;
		return bpf_skb_store_bytes(skb, l3_off + IPV4_CSUM_OFF, words, 14, 0) ? -1 : 0;
	}
	return bpf_skb_store_bytes(skb, l3_off + IPV4_CSUM_OFF, words, 10, 0) ? -1 : 0;
}

/* L4 checksum for an IPv4 address change (pseudo header). */
static __always_inline int csum_l4_ipv4_addr(struct __sk_buff *skb, __u32 l4_csum_at, __be32 old,
					     __be32 new, __u64 l4_flags)
{
	return bpf_l4_csum_replace(skb, l4_csum_at, old, new,
				   BPF_F_PSEUDO_HDR | sizeof(new) | l4_flags) ? -1 : 0;
}

/*
 * IPv6 address at addr_off: the L4 pseudo-header checksum (if l4_csum_at; the address diff is
 * summed here rather than by bpf_csum_diff, one helper call less), then the bytes with
 * BPF_F_RECOMPUTE_CSUM (see the top of this file).
 */
static __always_inline int csum_rewrite_ipv6_addr(struct __sk_buff *skb, __u32 addr_off,
						  const __u8 old[ADDR_LEN],
						  const __u8 new[ADDR_LEN], __u32 l4_csum_at,
						  __u64 l4_flags)
{
	if (l4_csum_at) {
		__u32 diff = csum_fold(csum_acc_addr(0, old, new));

		if (bpf_l4_csum_replace(skb, l4_csum_at, 0, diff, BPF_F_PSEUDO_HDR | l4_flags))
			return -1;
	}
	if (bpf_skb_store_bytes(skb, addr_off, new, ADDR_LEN, BPF_F_RECOMPUTE_CSUM))
		return -1;
	return 0;
}

/* L4 checksum for a port change. */
static __always_inline int csum_l4_port(struct __sk_buff *skb, __u32 l4_csum_at, __be16 old,
					__be16 new, __u64 l4_flags)
{
	return bpf_l4_csum_replace(skb, l4_csum_at, old, new, sizeof(new) | l4_flags) ? -1 : 0;
}

/* skb->ip_summed values (include/linux/skbuff.h). */
#define KIB_CHECKSUM_NONE 0
#define KIB_CHECKSUM_UNNECESSARY 1
#define KIB_CHECKSUM_COMPLETE 2
#define KIB_CHECKSUM_PARTIAL 3

/*
 * The inline equivalent of bpf_l4_csum_replace() for one L4 checksum field `*field`, given the
 * diff of the pseudo-header fields (`pseudo`, addresses) and of the covered header fields
 * (`covered`, ports), for the skb checksum state `summed`:
 *   - CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum the device completes; only
 *     the pseudo-header diff goes into it (non-complemented);
 *   - otherwise the checksum itself is updated by both diffs (RFC 1624);
 *   - UDP (`udp`): a zero checksum ("none") is left alone, a computed zero becomes 0xffff
 *     (BPF_F_MARK_MANGLED_0).
 * Returns 0 when the field was left alone (UDP without checksum), 1 otherwise. The caller
 * settles CHECKSUM_COMPLETE's skb->csum (csum_complete_diff()).
 */
static __always_inline int csum_l4_direct(__u16 *field, __u32 summed, __u64 pseudo, __u64 covered,
					  int udp)
{
	__u16 old = *field;
	__u16 new;

	if (udp && old == 0)
		return 0;
	if (summed == KIB_CHECKSUM_PARTIAL)
		new = csum_fold(pseudo + old);
	else
		new = csum_apply(old, pseudo + covered);
	if (udp && new == 0)
		new = 0xffff;
	*field = new;
	return 1;
}
#endif /* KIB_CSUM_H */
