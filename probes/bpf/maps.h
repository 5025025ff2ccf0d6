/* SPDX-License-Identifier: GPL-2.0 */
/*
 * maps.h: the maps shared by every program of kube-ipvs-bpf, their key and value layouts, and the
 * flag, state and counter constants. This is the C side of the contract in docs/datapath.md;
 * probes/src/maps.rs mirrors every struct here and a test checks both against the BTF.
 *
 * Every map is pinned by name (LIBBPF_PIN_BY_NAME) under the loader's pin root, and both objects
 * (datapath.bpf.c, ipvs_probe.bpf.c) include this header, so the same names are the same maps.
 * The max_entries below are the defaults; the loader sets the real sizes before load.
 */
#ifndef KIB_MAPS_H
#define KIB_MAPS_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define ADDR_LEN 16

/*
 * Keys and values. Every padding byte is an explicit member, so `= {}` zeroes a whole key.
 * Structs holding an address are at least 4-byte aligned (the sizes do not change) so the address
 * helpers can move them as 32-bit words: the verifier rejects misaligned stack accesses.
 */
struct svc_key {
	__u8 addr[ADDR_LEN];
	__be16 port;
	__u8 proto;
	__u8 pad;
} __attribute__((aligned(4)));

struct svc_value {
	__u32 flags;
	__u32 svc_id;
};

struct addr_key {
	__u8 addr[ADDR_LEN];
} __attribute__((aligned(4)));

struct addr_value {
	__u32 flags;
	__u32 pad;
};

/* LPM key: prefixlen counts the 32 bits of svc_id first, then the address bits. */
struct range_key {
	__u32 prefixlen;
	__u32 svc_id;
	__u8 addr[ADDR_LEN];
};

struct cidr_key {
	__u32 prefixlen;
	__u8 addr[ADDR_LEN];
};

struct dev_value {
	__u8 addr4[ADDR_LEN];
	__u8 addr6[ADDR_LEN];
	__u32 flags;
	__u32 pad;
};

struct tuple {
	__u8 saddr[ADDR_LEN];
	__u8 daddr[ADDR_LEN];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
} __attribute__((aligned(4)));

struct snat_entry {
	__u8 addr[ADDR_LEN];
	__be16 port;
	__u8 state;
	__u8 flags;
	__u32 svc_id;
	__u64 created_ns;
	__u64 last_seen_ns;
};

struct conn_value {
	__u8 vaddr[ADDR_LEN];
	__be16 vport;
	__u16 pad;
	__u32 ipvs_flags;
	__u64 created_ns;
};

struct frag_key {
	__u8 saddr[ADDR_LEN];
	__u8 daddr[ADDR_LEN];
	__be32 id;
	__u8 proto;
	__u8 pad[3];
};

struct frag_value {
	__be16 sport;
	__be16 dport;
};

/* Port ranges are host byte order, inclusive. */
struct config {
	__u32 mark_svc;
	__u32 mark_masq;
	__u16 snat_port_min;
	__u16 snat_port_max;
	__u16 local_port_min;
	__u16 local_port_max;
	__u32 flags;
	__u32 pad;
};

_Static_assert(sizeof(struct svc_key) == 20, "svc_key");
_Static_assert(sizeof(struct svc_value) == 8, "svc_value");
_Static_assert(sizeof(struct addr_key) == 16, "addr_key");
_Static_assert(sizeof(struct addr_value) == 8, "addr_value");
_Static_assert(sizeof(struct range_key) == 24, "range_key");
_Static_assert(sizeof(struct cidr_key) == 20, "cidr_key");
_Static_assert(sizeof(struct dev_value) == 40, "dev_value");
_Static_assert(sizeof(struct tuple) == 40, "tuple");
_Static_assert(sizeof(struct snat_entry) == 40, "snat_entry");
_Static_assert(sizeof(struct conn_value) == 32, "conn_value");
_Static_assert(sizeof(struct frag_key) == 40, "frag_key");
_Static_assert(sizeof(struct frag_value) == 4, "frag_value");
_Static_assert(sizeof(struct config) == 24, "config");

/* svc_value.flags */
#define SVC_F_MASQ 0x1            /* masquerade every connection */
#define SVC_F_MASQ_OFFCLUSTER 0x2 /* masquerade clients outside cluster_cidrs */
#define SVC_F_SRC_RANGES 0x4      /* loadBalancerSourceRanges apply (src_ranges) */

/* addr_value.flags */
#define ADDR_F_SERVICE 0x1 /* ClusterIP/LB/external IP: other TCP/UDP/SCTP ports are dropped */
#define ADDR_F_NODE 0x2    /* node address carrying NodePorts */

/* config.flags */
#define CFG_F_MASQ_ALL 0x1      /* masquerade every service connection */
#define CFG_F_CLUSTER_CIDRS 0x2 /* cluster_cidrs holds at least one prefix */

/* snat_entry.state: what was seen on the connection (TCP flags, reply) */
#define STATE_SYN 0x01
#define STATE_FIN 0x02
#define STATE_RST 0x04
#define STATE_REPLY 0x08

/* snat_entry.flags: why the connection was translated and how */
#define SNAT_F_PORT_KEPT 0x01  /* the client's own port was kept */
#define SNAT_F_PROBE_HIT 0x02  /* svc_id came from the IPVS probe's conns entry */
#define SNAT_F_MASQ 0x04       /* masquerade mark set at ingress */
#define SNAT_F_HAIRPIN 0x08    /* source == destination */
#define SNAT_F_OFFCLUSTER 0x10 /* service backend outside the cluster CIDRs */
#define SNAT_F_HOST 0x20       /* host-originated connection from a service address */

/* IPVS connection flags (include/uapi/linux/ip_vs.h) */
#define IP_VS_CONN_F_TEMPLATE 0x1000

/* stats indices */
enum stat_index {
	STAT_SNAT_ALLOC = 0,
	STAT_SNAT_PORT_REUSE,
	STAT_PORT_EXHAUSTED,
	STAT_MAP_FULL,
	STAT_REV_HIT,
	STAT_FWD_HIT,
	STAT_ICMP_XLATE,
	STAT_FRAG_XLATE,
	STAT_FRAG_MISS,
	STAT_PROBE_CONN,
	STAT_PROBE_TEMPLATE_SKIPPED,
	STAT_PROBE_HIT,
	STAT_PROBE_MISS,
	STAT_FILTERED_PORT,
	STAT_FILTERED_SRC_RANGE,
	STAT_SVC_MARKED,
	STAT_REPLY_MARKED,
	STAT_NO_SNAT_ADDR,
	STAT_PARSE_ERROR,
	STAT_MAX,
};

/* Default sizes (docs/datapath.md); the loader overrides them before load. */
#define DEFAULT_SVC_PORTS_SIZE 65536
#define DEFAULT_SVC_ADDRS_SIZE 16384
#define DEFAULT_SRC_RANGES_SIZE 16384
#define DEFAULT_CLUSTER_CIDRS_SIZE 256
#define DEFAULT_DEVICES_SIZE 1024
#define DEFAULT_SNAT_SIZE 262144
#define DEFAULT_CONNS_SIZE 262144
#define DEFAULT_FRAGS_SIZE 8192

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DEFAULT_SVC_PORTS_SIZE);
	__type(key, struct svc_key);
	__type(value, struct svc_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} svc_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DEFAULT_SVC_ADDRS_SIZE);
	__type(key, struct addr_key);
	__type(value, struct addr_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} svc_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, DEFAULT_SRC_RANGES_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct range_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} src_ranges SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, DEFAULT_CLUSTER_CIDRS_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct cidr_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} cluster_cidrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DEFAULT_DEVICES_SIZE);
	__type(key, __u32);
	__type(value, struct dev_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} devices SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DEFAULT_SNAT_SIZE);
	__type(key, struct tuple);
	__type(value, struct snat_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} snat_fwd SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DEFAULT_SNAT_SIZE);
	__type(key, struct tuple);
	__type(value, struct snat_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} snat_rev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, DEFAULT_CONNS_SIZE);
	__type(key, struct tuple);
	__type(value, struct conn_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, DEFAULT_FRAGS_SIZE);
	__type(key, struct frag_key);
	__type(value, struct frag_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} frags SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} stats SEC(".maps");

static __always_inline void stat_inc(__u32 index)
{
	__u64 *counter = bpf_map_lookup_elem(&stats, &index);

	if (counter)
		*counter += 1;
}

static __always_inline struct config *config_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&config, &zero);
}

#endif /* KIB_MAPS_H */
