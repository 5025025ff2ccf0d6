/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * parsing.h: turning an skb into a `struct pkt` (family, 16-byte addresses, L4 protocol, ports,
 * TCP flags, ICMP type, fragment kind and id, header offsets). Entry with or without an Ethernet
 * header (l3_off = 14 or 0); IPv4 with options; IPv6 with a bounded walk of extension headers;
 * TCP, UDP, SCTP, ICMP, ICMPv6.
 *
 * Two readers: parse_from_l3() reads everything with bpf_skb_load_bytes (the socket filter has
 * no direct packet access; it also covers non-linear skbs and IPv6 extension headers), and
 * parse_packet(), the TC entry, reads linear headers directly (a helper call costs as much as a
 * map lookup) and falls back to the former. The tuples of a parsed packet (its own, and the one
 * of the other direction) are the keys the maps are looked up with.
 */
#ifndef KIB_PARSING_H
#define KIB_PARSING_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "maps.h"

#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58
#endif
#define IPV6_NEXTHDR_HOP 0
#define IPV6_NEXTHDR_ROUTING 43
#define IPV6_NEXTHDR_FRAGMENT 44
#define IPV6_NEXTHDR_AUTH 51
#define IPV6_NEXTHDR_DEST 60
/* Extension headers walked before giving up (parse_error). */
#define IPV6_MAX_EXT_HEADERS 6

#define IPV4_MF 0x2000
#define IPV4_OFFSET_MASK 0x1fff

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04

#define ETH_HEADER_LEN 14

enum frag_kind {
	FRAG_NONE = 0,  /* not a fragment */
	FRAG_FIRST = 1, /* offset 0, more fragments follow: carries the L4 header */
	FRAG_LATER = 2, /* offset > 0: no L4 header */
};

enum parse_result {
	PARSE_OK = 0,
	PARSE_NOT_IP = 1, /* not IPv4/IPv6: passed untouched, not counted */
	PARSE_ERROR = -1, /* truncated or malformed IP: counted as parse_error */
};

struct pkt {
	__u8 saddr[ADDR_LEN]; /* IPv4-mapped for IPv4 */
	__u8 daddr[ADDR_LEN];
	__u32 l3_off;  /* offset of the IP header */
	__u32 l4_off;  /* offset of the L4 header (after IPv4 options / IPv6 extension headers) */
	__be32 frag_id; /* IPv4: the 16-bit id in the low-order bytes; IPv6: the fragment header id */
	__be16 sport;   /* TCP/UDP/SCTP only */
	__be16 dport;
	__u8 family; /* 4 or 6 */
	__u8 proto;  /* final L4 protocol */
	__u8 frag;   /* enum frag_kind */
	__u8 tcp_flags;
	__u8 icmp_type; /* ICMP/ICMPv6 only */
	__u8 has_ports; /* sport/dport are valid */
	__u8 pad[2];
};

static __always_inline int proto_has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP || proto == IPPROTO_SCTP;
}

static __always_inline void addr_set_v4(__u8 addr[ADDR_LEN], __be32 ip)
{
	__u32 *words = (__u32 *)addr;

	words[0] = 0;
	words[1] = 0;
	words[2] = bpf_htonl(0x0000ffff);
	words[3] = ip;
}

static __always_inline __be32 addr_get_v4(const __u8 addr[ADDR_LEN])
{
	return ((const __u32 *)addr)[3];
}

/* Address helpers work on 32-bit words: every struct holding an address is 4-byte aligned. */
static __always_inline int addr_equal(const __u8 a[ADDR_LEN], const __u8 b[ADDR_LEN])
{
	const __u32 *x = (const __u32 *)a;
	const __u32 *y = (const __u32 *)b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3])) == 0;
}

static __always_inline int addr_is_zero(const __u8 a[ADDR_LEN])
{
	const __u32 *x = (const __u32 *)a;

	return (x[0] | x[1] | x[2] | x[3]) == 0;
}

static __always_inline void addr_copy(__u8 dst[ADDR_LEN], const __u8 src[ADDR_LEN])
{
	__u32 *d = (__u32 *)dst;
	const __u32 *s = (const __u32 *)src;

	d[0] = s[0];
	d[1] = s[1];
	d[2] = s[2];
	d[3] = s[3];
}

/* Reads the ports (and TCP flags / ICMP type) at p->l4_off. */
static __always_inline int parse_l4(struct __sk_buff *skb, struct pkt *p)
{
	if (p->proto == IPPROTO_TCP) {
		__u8 tcp[14];

		if (bpf_skb_load_bytes(skb, p->l4_off, tcp, sizeof(tcp)))
			return PARSE_ERROR;
		__builtin_memcpy(&p->sport, &tcp[0], 2);
		__builtin_memcpy(&p->dport, &tcp[2], 2);
		p->tcp_flags = tcp[13];
		p->has_ports = 1;
	} else if (p->proto == IPPROTO_UDP || p->proto == IPPROTO_SCTP) {
		__be16 ports[2];

		if (bpf_skb_load_bytes(skb, p->l4_off, ports, sizeof(ports)))
			return PARSE_ERROR;
		p->sport = ports[0];
		p->dport = ports[1];
		p->has_ports = 1;
	} else if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
		if (bpf_skb_load_bytes(skb, p->l4_off, &p->icmp_type, 1))
			return PARSE_ERROR;
	}
	return PARSE_OK;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, __u32 l3_off, struct pkt *p)
{
	struct iphdr ip;
	__u16 frag_off;

	if (bpf_skb_load_bytes(skb, l3_off, &ip, sizeof(ip)))
		return PARSE_ERROR;
	if (ip.version != 4 || ip.ihl < 5)
		return PARSE_ERROR;
	p->family = 4;
	p->proto = ip.protocol;
	p->l3_off = l3_off;
	p->l4_off = l3_off + ip.ihl * 4;
	addr_set_v4(p->saddr, ip.saddr);
	addr_set_v4(p->daddr, ip.daddr);
	frag_off = bpf_ntohs(ip.frag_off);
	if (frag_off & IPV4_OFFSET_MASK)
		p->frag = FRAG_LATER;
	else if (frag_off & IPV4_MF)
		p->frag = FRAG_FIRST;
	p->frag_id = bpf_htonl((__u32)bpf_ntohs(ip.id));
	if (p->frag == FRAG_LATER)
		return PARSE_OK;
	return parse_l4(skb, p);
}

struct ipv6_ext_hdr {
	__u8 nexthdr;
	__u8 hdrlen;
	__be16 frag_off; /* fragment header only */
	__be32 id;       /* fragment header only */
};

static __always_inline int parse_ipv6(struct __sk_buff *skb, __u32 l3_off, struct pkt *p)
{
	struct ipv6hdr ip6;
	__u32 off;
	__u8 nexthdr;
	int i;

	if (bpf_skb_load_bytes(skb, l3_off, &ip6, sizeof(ip6)))
		return PARSE_ERROR;
	if (ip6.version != 6)
		return PARSE_ERROR;
	p->family = 6;
	p->l3_off = l3_off;
	addr_copy(p->saddr, (const __u8 *)&ip6.saddr);
	addr_copy(p->daddr, (const __u8 *)&ip6.daddr);
	nexthdr = ip6.nexthdr;
	off = l3_off + sizeof(ip6);

#pragma unroll
	for (i = 0; i < IPV6_MAX_EXT_HEADERS; i++) {
		struct ipv6_ext_hdr ext;

		if (nexthdr != IPV6_NEXTHDR_HOP && nexthdr != IPV6_NEXTHDR_ROUTING &&
		    nexthdr != IPV6_NEXTHDR_FRAGMENT && nexthdr != IPV6_NEXTHDR_AUTH &&
		    nexthdr != IPV6_NEXTHDR_DEST)
			break;
		if (bpf_skb_load_bytes(skb, off, &ext, sizeof(ext)))
			return PARSE_ERROR;
		if (nexthdr == IPV6_NEXTHDR_FRAGMENT) {
			__u16 frag_off = bpf_ntohs(ext.frag_off);

			if (frag_off & 0xfff8)
				p->frag = FRAG_LATER;
			else if (frag_off & 0x1)
				p->frag = FRAG_FIRST;
			p->frag_id = ext.id;
			off += 8;
		} else if (nexthdr == IPV6_NEXTHDR_AUTH) {
			off += ((__u32)ext.hdrlen + 2) * 4;
		} else {
			off += ((__u32)ext.hdrlen + 1) * 8;
		}
		nexthdr = ext.nexthdr;
	}
	if (nexthdr == IPV6_NEXTHDR_HOP || nexthdr == IPV6_NEXTHDR_ROUTING ||
	    nexthdr == IPV6_NEXTHDR_FRAGMENT || nexthdr == IPV6_NEXTHDR_AUTH ||
	    nexthdr == IPV6_NEXTHDR_DEST)
		return PARSE_ERROR;
	p->proto = nexthdr;
	p->l4_off = off;
	if (p->frag == FRAG_LATER)
		return PARSE_OK;
	return parse_l4(skb, p);
}

/* Parses from the IP header at l3_off; the family comes from the version nibble. */
static __always_inline int parse_from_l3(struct __sk_buff *skb, __u32 l3_off, struct pkt *p)
{
	__u8 first;

	if (bpf_skb_load_bytes(skb, l3_off, &first, 1))
		return PARSE_NOT_IP;
	if ((first >> 4) == 4)
		return parse_ipv4(skb, l3_off, p);
	if ((first >> 4) == 6)
		return parse_ipv6(skb, l3_off, p);
	return PARSE_NOT_IP;
}

/* Offsets read from a struct pkt are masked so the verifier sees them bounded. */
#define PKT_OFF_MASK 0x3ff

/* parse_l4 with direct packet access; short or non-linear headers take the load_bytes path. */
static __always_inline int parse_l4_direct(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 *l4 = data + (p->l4_off & PKT_OFF_MASK);

	if ((void *)(l4 + 14) > data_end)
		return parse_l4(skb, p);
	if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP || p->proto == IPPROTO_SCTP) {
		p->sport = *(__be16 *)&l4[0];
		p->dport = *(__be16 *)&l4[2];
		p->has_ports = 1;
		if (p->proto == IPPROTO_TCP)
			p->tcp_flags = l4[13];
	} else if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
		p->icmp_type = l4[0];
	}
	return PARSE_OK;
}

/*
 * TC entry: l2_len is ETH_HEADER_LEN (Ethernet devices; the family comes from skb->protocol) or 0
 * (devices without a link-layer header; the family comes from the version nibble). Headers in
 * the linear area are read directly; anything else (non-linear headers, IPv6 extension headers)
 * goes through the bpf_skb_load_bytes parser above. Only reads: the programs never write packet
 * data directly, which would make the verifier unclone every cloned skb (all locally generated
 * TCP) in the program's prologue, translated or not.
 */
/* ip_version(): the first byte of the IP header is not in the linear area. */
#define IP_VERSION_UNREAD 0xff

/*
 * The IP version of the packet whose IP header is at l2_len: from skb->protocol after an
 * Ethernet header (l2_len ETH_HEADER_LEN), from the version nibble without one (l2_len 0); 0
 * when it is not IP, IP_VERSION_UNREAD when the nibble is not in the linear area.
 */
static __always_inline __u8 ip_version(struct __sk_buff *skb, __u32 l2_len, void *data,
				       void *data_end)
{
	if (l2_len) {
		__u32 protocol = skb->protocol;

		if (protocol == bpf_htons(ETH_P_IP))
			return 4;
		if (protocol == bpf_htons(ETH_P_IPV6))
			return 6;
		return 0;
	}
	if (data + 1 > data_end)
		return IP_VERSION_UNREAD;
	return *(__u8 *)data >> 4;
}

/*
 * Whether the IP packet at l2_len may have the same source and destination address (a hairpin),
 * read from the linear area only: 1 when they are equal or not there to compare, 0 when they
 * differ or the packet is not IP. A function of its own: inlined, the compiler kept a pointer into
 * the context from here for the rewrite's reads of skb->data_end, which the verifier refuses.
 */
static __attribute__((noinline)) int pkt_may_be_hairpin(struct __sk_buff *skb, __u32 l2_len)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 version = ip_version(skb, l2_len, data, data_end);
	const __u32 *w = data + l2_len;

	if (version == 4) {
		if ((void *)(w + 5) > data_end)
			return 1;
		return w[3] == w[4];
	}
	if (version == 6) {
		if ((void *)(w + 10) > data_end)
			return 1;
		return ((w[2] ^ w[6]) | (w[3] ^ w[7]) | (w[4] ^ w[8]) | (w[5] ^ w[9])) == 0;
	}
	return version == IP_VERSION_UNREAD;
}

static __always_inline int parse_packet(struct __sk_buff *skb, __u32 l2_len, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 version = ip_version(skb, l2_len, data, data_end);

	if (version == IP_VERSION_UNREAD)
		return parse_from_l3(skb, 0, p);

	if (version == 4) {
		struct iphdr *ip = data + l2_len;
		__u16 frag_off;

		if ((void *)(ip + 1) > data_end)
			return parse_ipv4(skb, l2_len, p);
		if (ip->version != 4 || ip->ihl < 5)
			return PARSE_ERROR;
		p->family = 4;
		p->proto = ip->protocol;
		p->l3_off = l2_len;
		p->l4_off = l2_len + ip->ihl * 4;
		addr_set_v4(p->saddr, ip->saddr);
		addr_set_v4(p->daddr, ip->daddr);
		frag_off = bpf_ntohs(ip->frag_off);
		if (frag_off & IPV4_OFFSET_MASK)
			p->frag = FRAG_LATER;
		else if (frag_off & IPV4_MF)
			p->frag = FRAG_FIRST;
		p->frag_id = bpf_htonl((__u32)bpf_ntohs(ip->id));
		if (p->frag == FRAG_LATER)
			return PARSE_OK;
		return parse_l4_direct(skb, p);
	}
	if (version == 6) {
		struct ipv6hdr *ip6 = data + l2_len;
		__u8 nexthdr;

		if ((void *)(ip6 + 1) > data_end)
			return parse_ipv6(skb, l2_len, p);
		if (ip6->version != 6)
			return PARSE_ERROR;
		nexthdr = ip6->nexthdr;
		if (nexthdr == IPV6_NEXTHDR_HOP || nexthdr == IPV6_NEXTHDR_ROUTING ||
		    nexthdr == IPV6_NEXTHDR_FRAGMENT || nexthdr == IPV6_NEXTHDR_AUTH ||
		    nexthdr == IPV6_NEXTHDR_DEST)
			return parse_ipv6(skb, l2_len, p);
		p->family = 6;
		p->proto = nexthdr;
		p->l3_off = l2_len;
		p->l4_off = l2_len + sizeof(*ip6);
		addr_copy(p->saddr, (const __u8 *)&ip6->saddr);
		addr_copy(p->daddr, (const __u8 *)&ip6->daddr);
		return parse_l4_direct(skb, p);
	}
	return PARSE_NOT_IP;
}

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

#endif /* KIB_PARSING_H */
