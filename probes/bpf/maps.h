/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
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

/* A device_slots entry: devices[ifindex] for the device whose ifindex it holds (0: none). */
struct dev_slot {
	__u32 ifindex;
	__u32 pad;
	struct dev_value value;
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

/*
 * Port ranges are host byte order, inclusive. nat_seed, nat_buckets and nat_records describe the
 * SNAT table (table.h) and are the loader's: the agent's configuration writes keep them.
 */
struct config {
	__u32 mark_svc;
	__u32 mark_masq;
	__u16 snat_port_min;
	__u16 snat_port_max;
	__u16 local_port_min;
	__u16 local_port_max;
	__u32 flags;
	__u32 nat_seed;    /* hash seed of the snat_fwd and snat_rev indexes */
	__u32 nat_buckets; /* buckets of snat_fwd and of snat_rev (their max_entries) */
	__u32 nat_records; /* records of snat_records (its max_entries) */
};

/*
 * The SNAT table (table.h): snat_records holds one struct nat_record per translated connection;
 * snat_fwd and snat_rev index them by forward and by reverse tuple, in buckets of NAT_WAYS ways
 * (struct nat_bucket, 32 bytes, half a cache line: a tag byte per way, the overflow flag, then the
 * ways' record numbers). A way's tag is TAG_FREE, TAG_BUSY (claimed by an insert) or
 * TAG_VALID | 7 bits of the tuple's hash. Inserts take the lock of the bucket's stripe in
 * snat_locks (NAT_LOCK_STRIPES per index); `overflow` is set once an insert went past the bucket
 * because it was full.
 */
#define NAT_WAYS 6
#define NAT_PROBE_BUCKETS 4
#define NAT_LOCK_STRIPES 8192
#define TAG_FREE 0x00
#define TAG_BUSY 0x01
#define TAG_VALID 0x80

#define REC_FREE 0
#define REC_BUSY 1 /* allocated, being written */
#define REC_USED 2
#define REC_DEAD 3 /* unindexed by the sweeper, freed at its next pass */

/* Which tuple of a record an index holds. */
#define NAT_INDEX_FWD 0
#define NAT_INDEX_REV 1

struct nat_bucket {
	__u8 tag[NAT_WAYS];
	__u8 overflow;
	__u8 pad;
	__u32 rec[NAT_WAYS];
} __attribute__((aligned(8)));

/*
 * fwd_key: the connection as it leaves (client -> backend); rev_key: its replies as they arrive
 * (backend -> node address:SNAT port). fwd: the translated source and the egress state; rev: the
 * original client and the ingress state.
 */
struct nat_record {
	__u32 state;
	__u32 pad;
	struct tuple fwd_key;
	struct tuple rev_key;
	struct snat_entry fwd;
	struct snat_entry rev;
};

/* drop_last's value: when the last packet dropped for a reason was, and its connection. */
struct drop_event {
	__u64 time_ns; /* CLOCK_MONOTONIC */
	struct tuple key;
};

_Static_assert(sizeof(struct drop_event) == 48, "drop_event");
_Static_assert(sizeof(struct svc_key) == 20, "svc_key");
_Static_assert(sizeof(struct svc_value) == 8, "svc_value");
_Static_assert(sizeof(struct addr_key) == 16, "addr_key");
_Static_assert(sizeof(struct addr_value) == 8, "addr_value");
_Static_assert(sizeof(struct range_key) == 24, "range_key");
_Static_assert(sizeof(struct cidr_key) == 20, "cidr_key");
_Static_assert(sizeof(struct dev_value) == 40, "dev_value");
_Static_assert(sizeof(struct dev_slot) == 48, "dev_slot");
_Static_assert(sizeof(struct tuple) == 40, "tuple");
_Static_assert(sizeof(struct snat_entry) == 40, "snat_entry");
_Static_assert(sizeof(struct conn_value) == 32, "conn_value");
_Static_assert(sizeof(struct frag_key) == 40, "frag_key");
_Static_assert(sizeof(struct frag_value) == 4, "frag_value");
_Static_assert(sizeof(struct config) == 32, "config");
_Static_assert(sizeof(struct nat_bucket) == 32, "nat_bucket");
_Static_assert(sizeof(struct nat_record) == 168, "nat_record");

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
#define CFG_F_DIRECT_WRITES 0x4 /* nat_write_* are installed: translations take the fast path */

/* snat_entry.state: what was seen on the connection (TCP flags, reply) */
#define STATE_SYN 0x01
#define STATE_FIN 0x02
#define STATE_RST 0x04
#define STATE_REPLY 0x08
#define STATE_CLOSED (STATE_FIN | STATE_RST) /* the connection was closed */
#define STATE_ALL (STATE_SYN | STATE_FIN | STATE_RST | STATE_REPLY)

/* snat_entry.flags: why the connection was translated and how */
#define SNAT_F_PORT_KEPT 0x01  /* the client's own port was kept */
#define SNAT_F_PROBE_HIT 0x02  /* the IPVS probe recorded it: svc_id is its service (agent) */
#define SNAT_F_MASQ 0x04       /* masquerade mark set at ingress */
#define SNAT_F_HAIRPIN 0x08    /* source == destination */
#define SNAT_F_OFFCLUSTER 0x10 /* service backend outside the cluster CIDRs */
#define SNAT_F_HOST 0x20       /* host-originated connection from a service address */
#define SNAT_F_RESOLVED 0x40   /* the agent looked the connection up in conns (svc_id, PROBE_HIT) */

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
	STAT_LOCK_BUSY,
	STAT_MAX,
};

/* Default sizes (docs/datapath.md); the loader overrides them before load. */
#define DEFAULT_SVC_PORTS_SIZE 65536
#define DEFAULT_SVC_ADDRS_SIZE 16384
#define DEFAULT_SRC_RANGES_SIZE 16384
#define DEFAULT_CLUSTER_CIDRS_SIZE 256
#define DEFAULT_DEVICES_SIZE 1024
#define DEFAULT_SNAT_SIZE 262144 /* records; each index has two ways per record */
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

/*
 * device_slots: devices, direct-mapped by ifindex % DEVICE_SLOTS, so the lookup on a new
 * connection is inline; the agent writes both (a device whose slot another device holds is only
 * in devices, which the programs read on a slot miss).
 */
#define DEVICE_SLOTS 4096

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DEVICE_SLOTS);
	__type(key, __u32);
	__type(value, struct dev_slot);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} device_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} config SEC(".maps");

#ifndef KIB_PROBE_OBJECT
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DEFAULT_SNAT_SIZE);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct nat_record);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} snat_records SEC(".maps");

/* The two indexes of the SNAT table (table.h): two ways per record, NAT_WAYS a bucket. */
#define DEFAULT_NAT_BUCKETS ((2 * DEFAULT_SNAT_SIZE + NAT_WAYS - 1) / NAT_WAYS)
#define NAT_INDEX_MAP(name)                                          \
	struct {                                                      \
		__uint(type, BPF_MAP_TYPE_ARRAY);                     \
		__uint(max_entries, DEFAULT_NAT_BUCKETS);             \
		__uint(map_flags, BPF_F_MMAPABLE);                    \
		__type(key, __u32);                                   \
		__type(value, struct nat_bucket);                     \
		__uint(pinning, LIBBPF_PIN_BY_NAME);                  \
	} name SEC(".maps")

NAT_INDEX_MAP(snat_fwd);
NAT_INDEX_MAP(snat_rev);

/* The bucket locks of both indexes: stripe (bucket % NAT_LOCK_STRIPES), snat_rev's after. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2 * NAT_LOCK_STRIPES);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} snat_locks SEC(".maps");
#endif

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

/* drop_last: per CPU and per drop reason (a stats index), the last packet dropped for it, so
 * that the agent's drop log names a connection. Written only on the drop path. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, struct drop_event);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} drop_last SEC(".maps");

/* Counts a dropped packet under `reason` and records its connection in drop_last. */
static __always_inline void stat_drop(__u32 reason, const struct tuple *key)
{
	struct drop_event *ev = bpf_map_lookup_elem(&drop_last, &reason);

	stat_inc(reason);
	if (!ev)
		return;
	ev->time_ns = bpf_ktime_get_ns();
	__builtin_memcpy(&ev->key, key, sizeof(ev->key));
}

static __always_inline struct config *config_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&config, &zero);
}

#endif /* KIB_MAPS_H */
