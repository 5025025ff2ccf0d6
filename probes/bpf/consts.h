/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * consts.h: the constants of kube-ipvs-bpf that more than one header, or the agent, knows: the
 * address length, the SNAT table's geometry and tag and record states, the flag and state bits of
 * the map values, the stats counter indices, the maps' default sizes, the direction of a
 * translation and the skb->cb encoding of a fast-path hand-off. probes/src/maps.rs mirrors the
 * ones the agent uses. A concern's private constants stay in its own header.
 */
#ifndef KIB_CONSTS_H
#define KIB_CONSTS_H

#define ADDR_LEN 16

/*
 * The SNAT table (table.h, structs.h's struct nat_bucket): NAT_WAYS ways a bucket; a way's tag is
 * TAG_FREE, TAG_BUSY (claimed by an insert) or TAG_VALID | 7 bits of the tuple's hash. Inserts
 * take the lock of the bucket's stripe in snat_locks (NAT_LOCK_STRIPES per index) and look for a
 * free way in up to NAT_PROBE_BUCKETS buckets.
 */
enum nat_geometry {
	NAT_WAYS = 6,
	NAT_PROBE_BUCKETS = 4,
	NAT_LOCK_STRIPES = 8192,
};

enum nat_tag {
	TAG_FREE = 0x00,
	TAG_BUSY = 0x01,
	TAG_VALID = 0x80,
};

enum rec_state {
	REC_FREE = 0,
	REC_BUSY = 1, /* allocated, being written */
	REC_USED = 2,
	REC_DEAD = 3, /* unindexed by the sweeper, freed at its next pass */
};

/* Which tuple of a record an index holds. */
enum nat_index {
	NAT_INDEX_FWD = 0,
	NAT_INDEX_REV = 1,
};

/* svc_value.flags */
enum svc_flags {
	SVC_F_MASQ = 0x1, /* masquerade every connection */
	SVC_F_MASQ_OFFCLUSTER = 0x2, /* masquerade clients outside cluster_cidrs */
	SVC_F_SRC_RANGES = 0x4, /* loadBalancerSourceRanges apply (src_ranges) */
};

/* addr_value.flags */
enum addr_flags {
	ADDR_F_SERVICE = 0x1, /* ClusterIP/LB/external IP: other TCP/UDP/SCTP ports are dropped */
	ADDR_F_NODE = 0x2, /* node address carrying NodePorts */
};

/* config.flags */
enum cfg_flags {
	CFG_F_MASQ_ALL = 0x1, /* masquerade every service connection */
	CFG_F_CLUSTER_CIDRS = 0x2, /* cluster_cidrs holds at least one prefix */
	CFG_F_DIRECT_WRITES = 0x4, /* nat_write_* are installed: translations take the fast path */
	CFG_F_SWITCH = 0x8, /* switch window: connections in switch_flows are left to conntrack */
	CFG_F_DRAIN = 0x10, /* rollback drain: only connections in switch_flows are the agent's */
	CFG_F_DRAIN_RECORD = 0x20, /* the probe also puts each new connection in switch_flows */
	/*
	 * port_filter holds every port it must (the agent filled it from the maps after the
	 * programs that keep it were attached): the programs skip the lookups it rules out.
	 */
	CFG_F_PORT_FILTER = 0x40,
	/*
	 * Bits 24-29: the reply mark's bit number plus one (0: no reply mark). Ingress sets that bit
	 * (with mark_svc) on the replies it recognizes (reverse SNAT, a conns hit); egress passes a
	 * packet carrying it at once: a reply of a service connection never needs SNAT.
	 */
	CFG_REPLY_MARK_SHIFT = 24,
	CFG_REPLY_MARK_MASK = 0x3f000000,
};

/* snat_entry.state: what was seen on the connection (TCP flags, reply) */
enum entry_state {
	STATE_SYN = 0x01,
	STATE_FIN = 0x02,
	STATE_RST = 0x04,
	STATE_REPLY = 0x08,
	STATE_CLOSED = STATE_FIN | STATE_RST, /* the connection was closed */
	STATE_ALL = STATE_SYN | STATE_FIN | STATE_RST | STATE_REPLY,
};

/* snat_entry.flags: why the connection was translated and how */
enum snat_flags {
	SNAT_F_PORT_KEPT = 0x01, /* the client's own port was kept */
	SNAT_F_PROBE_HIT = 0x02, /* the IPVS probe recorded it: svc_id is its service */
	SNAT_F_MASQ = 0x04, /* masquerade mark set at ingress */
	SNAT_F_HAIRPIN = 0x08, /* source == destination */
	SNAT_F_OFFCLUSTER = 0x10, /* service backend outside the cluster CIDRs */
	SNAT_F_HOST = 0x20, /* host-originated connection from a service address */
	SNAT_F_RESOLVED = 0x40, /* looked up in conns at allocation (svc_id, PROBE_HIT) */
};

/* IPVS connection flags (include/uapi/linux/ip_vs.h) */
enum ipvs_conn_flags {
	IP_VS_CONN_F_TEMPLATE = 0x1000,
};

/* conn_value.conn_id_hi: the entry carries its IPVS connection's identity (structs.h). */
enum conn_id_bits {
	CONN_ID_SET_HI = 0x8000,
};

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
	STAT_PROBE_FREE_REMOVED,
	STAT_PROBE_FREE_KEPT,
	STAT_MAX,
};

/* Default sizes (docs/datapath.md); the loader overrides them before load. */
enum default_sizes {
	DEFAULT_SVC_PORTS_SIZE = 65536,
	DEFAULT_SVC_ADDRS_SIZE = 65536,
	DEFAULT_SRC_RANGES_SIZE = 16384,
	DEFAULT_CLUSTER_CIDRS_SIZE = 256,
	DEFAULT_DEVICES_SIZE = 1024,
	DEFAULT_SNAT_SIZE = 262144, /* records; each index has two ways per record */
	DEFAULT_CONNS_SIZE = 262144,
	DEFAULT_FRAGS_SIZE = 8192,
};
/*
 * switch_flows entries: four tuples for each conntrack entry open at the switch from kube-proxy,
 * for nf_conntrack_max's usual 262144 entries. Not preallocated: memory follows the entries.
 */
enum switch_flows_size {
	SWITCH_FLOWS_SIZE = 4 * 262144,
};
/* device_slots entries (maps.h). */
enum device_slots_size {
	DEVICE_SLOTS = 4096,
};

/* The two indexes of the SNAT table (table.h): two ways per record, NAT_WAYS a bucket. */
enum default_nat_buckets {
	DEFAULT_NAT_BUCKETS = ((2 * DEFAULT_SNAT_SIZE + NAT_WAYS - 1) / NAT_WAYS),
};

/* flow_cache slots per CPU (a power of two) and how long a slot stays valid. */
enum flow_cache_geometry {
	FLOW_CACHE_SLOTS = 1024,
	FLOW_CACHE_TTL_JIFFIES = 256,
};

/* port_filter: 64-bit words per bitmap (one bit per port). */
enum port_filter_geometry {
	PORT_FILTER_WORDS = 65536 / 64,
};

/*
 * What a flow_cache slot holds for its tuple: a translation (NAT_SRC, NAT_DST), or a verdict that
 * needs no rewrite (FLOW_VERDICT_*: flow_cache.h).
 */
enum nat_dir {
	NAT_SRC = 0, /* egress: rewrite the source */
	NAT_DST = 1, /* ingress: rewrite the destination */
	FLOW_VERDICT_EGRESS = 2,  /* egress: nothing to do, for packets with the same service marks */
	FLOW_VERDICT_INGRESS = 3, /* ingress: set these mark bits and count this counter */
};

/*
 * skb->cb[4] of a hand-off to nat_write: FAST_JOB_* << 16 | the new port (as it lies in memory),
 * the new address in cb[0..3] (IPv4: cb[3]); 0 for the general hand-off (cpu_scratch.job).
 * FAST_JOB_L3 marks a packet without an Ethernet header. cb is the qdisc/TC control block the
 * programs own until they return.
 */
#define FAST_JOB_V4 0x4b40
#define FAST_JOB_V6 0x4b60
#define FAST_JOB_L3 0x0001

/*
 * Anchors the enums above in the objects' BTF (an enum reaches BTF only when something emitted
 * uses its type): probes/tests/btf_layout.rs checks the constants probes/src/maps.rs mirrors
 * against these enums, by name. A variable in a section of its own, which is no map: libbpf skips
 * sections it does not know, and no program refers to it.
 */
struct kib_consts {
	enum nat_geometry nat_geometry;
	enum nat_tag nat_tag;
	enum rec_state rec_state;
	enum nat_index nat_index;
	enum svc_flags svc_flags;
	enum addr_flags addr_flags;
	enum cfg_flags cfg_flags;
	enum entry_state entry_state;
	enum snat_flags snat_flags;
	enum ipvs_conn_flags ipvs_conn_flags;
	enum conn_id_bits conn_id_bits;
	enum stat_index stat_index;
	enum default_sizes default_sizes;
	enum device_slots_size device_slots_size;
	enum switch_flows_size switch_flows_size;
	enum default_nat_buckets default_nat_buckets;
	enum flow_cache_geometry flow_cache_geometry;
	enum port_filter_geometry port_filter_geometry;
	enum nat_dir nat_dir;
};

struct kib_consts kib_consts __attribute__((section(".kib.consts"), unused));

#endif /* KIB_CONSTS_H */
