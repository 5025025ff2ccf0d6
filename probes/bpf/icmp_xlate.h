/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * icmp_xlate.h: the translation of ICMP and ICMPv6 errors that quote a translated flow: at
 * ingress, an error about a packet that left as node:SNAT port goes back to the client with the
 * quoted source, the quoted checksums, the ICMP checksum and the outer destination rewritten.
 */
#ifndef KIB_ICMP_XLATE_H
#define KIB_ICMP_XLATE_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "maps.h"
#include "parsing.h"
#include "csum.h"
#include "snat.h"

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

#endif /* KIB_ICMP_XLATE_H */
