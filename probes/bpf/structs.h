/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * structs.h: the key and value layouts of every map of kube-ipvs-bpf (maps.h), shared maps and the
 * datapath object's own alike. This is the C side of the contract in docs/datapath.md:
 * probes/src/maps.rs mirrors every struct here and a test (probes/tests/btf_layout.rs) checks both
 * against the BTF.
 */
#ifndef KIB_STRUCTS_H
#define KIB_STRUCTS_H

#include <linux/types.h>

#include "consts.h"


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

/*
 * conn_value: an IPVS connection the probe recorded. `conn_id_hi`:`conn_id_lo` is the connection's
 * identity (ipvs_probe.bpf.c, conn_id()): its kernel address shifted right by 3, 47 bits, with
 * CONN_ID_SET_HI (bit 47) set; none (bit clear) in an entry an older probe wrote, whose six bytes
 * here were padding and the IPVS flags. The probe on IPVS freeing a connection removes the entry
 * only while it carries that connection's identity.
 */
struct conn_value {
	__u8 vaddr[ADDR_LEN];
	__be16 vport;
	__u16 conn_id_hi;
	__u32 conn_id_lo;
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

/* A way a claim holds (with its home stripe's lock), for nat_publish or nat_unclaim. */
struct nat_claim {
	__u32 home;   /* bucket whose stripe's lock is held */
	__u32 bucket; /* bucket of the claimed way */
	__u32 way;
	__u32 tag;
};

/*
 * A per-CPU flow cache slot (flow_cache): the translation of one connection direction, copied
 * from its snat_fwd/snat_rev entry so that established packets translate without a table lookup,
 * or an ingress verdict of the general path on an untranslated flow (dir FLOW_VERDICT_INGRESS:
 * the mark bits in word 10 and the counter in word 12 of the slot; flow_cache.h).
 * Valid while the tuple (saddr, daddr, ports, proto), dir and family match and
 * (u32)jiffies - filled_jiffies < FLOW_CACHE_TTL_JIFFIES; family 0 is an empty slot. `state` holds
 * the state bits the table entry already has (a packet bringing new bits, and every refresh of
 * last_seen_ns, goes to the table entry). A translation slot also holds the number of the record
 * it was copied from, where the fast path records a FIN or RST (flow_cache.h). The word at offset 36 is
 * proto | dir << 8 | family << 16 | state << 24, which the fast path compares in one go.
 */
struct flow_slot {
	__u8 saddr[ADDR_LEN];
	__u8 daddr[ADDR_LEN];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir;
	__u8 family; /* 4 or 6; 0: empty */
	__u8 state;
	__u8 addr[ADDR_LEN]; /* translated address */
	__be16 port;         /* translated port */
	__u16 pad;
	__u32 filled_jiffies; /* low 32 bits of jiffies */
	__u32 record;         /* a translation's snat_records record (flow_cache.h, closing packets) */
	__u32 pad2;
} __attribute__((aligned(4)));

/*
 * What the nat_write program rewrites when the TC program did not take the fast path (the
 * general hand-off): filled right before the tail call, read by nat_write on the same CPU.
 */
struct nat_job {
	__u8 addr[ADDR_LEN]; /* new address */
	__be16 port;         /* new port (ignored without L4 header) */
	__u8 dir;            /* NAT_SRC / NAT_DST */
	__u8 family;         /* 4 or 6 */
	__u8 proto;
	__u8 has_l4; /* TCP/UDP header with ports and checksum present and linear */
	__u16 l3_off;
	__u16 l4_off;
	__u16 pad;
} __attribute__((aligned(4)));

/*
 * Per-CPU scratch (cpu_scratch, one element): the general hand-off, the clock cache (the coarse
 * clock read once per jiffy: CLOCK_MONOTONIC_COARSE only moves on a tick), the xorshift32 state
 * of port allocation (seeded from bpf_get_prandom_u32 on first use) and the CPU's record
 * allocation cursor (table.h).
 */
struct cpu_scratch {
	struct nat_job job;
	__u32 rng;
	__u32 rec_cursor;   /* next snat_records entry to try; 0: none yet (start at random) */
	__u32 port_counter; /* RFC 6056 algorithm 3's counter (snat_allocate) */
	__u64 clock_jiffies;
	__u64 clock_ns;
	/*
	 * snat_allocate()'s working set, kept off the stack: the verifier bounds the stack of a
	 * call chain (tc_egress -> snat_reserve_port -> snat_rev_claim) to 512 bytes.
	 */
	struct tuple rev_key;
	struct snat_entry rev_value;
	struct nat_claim rev_claim;
	struct nat_claim fwd_claim;
};

/* drop_last's value: when the last packet dropped for a reason was, and its connection. */
struct drop_event {
	__u64 time_ns; /* CLOCK_MONOTONIC */
	struct tuple key;
};

/*
 * switch_flows' value: a connection kube-proxy's conntrack entry still holds at the switch (its
 * key is one of the entry's four tuples, docs/switching.md). Written by the agent only.
 */
struct switch_flow {
	__u32 ct_id; /* takeover: the conntrack entry's id; rollback: 0 */
	__u32 pad;
	__u64 seen_ns; /* CLOCK_MONOTONIC: the agent's last dump that listed the connection */
};

/*
 * port_filter's one value: a bit per port (host byte order; word port / 64, bit port % 64).
 * backend: the destination port of every connection IPVS scheduled (the probe sets it before its
 * conns entry) and of every translated connection as it leaves (the allocation sets it before the
 * record is published): a reply's source port, a forward packet's destination port. service: the
 * port of every svc_ports key (the agent sets it before the entry). snat: the node's port of every
 * translation (its reply tuple's destination port; the allocation sets it before the record is
 * published). Bits are never cleared while programs run.
 */
struct port_filter {
	__u64 backend[PORT_FILTER_WORDS];
	__u64 service[PORT_FILTER_WORDS];
	__u64 snat[PORT_FILTER_WORDS];
};

_Static_assert(sizeof(struct drop_event) == 48, "drop_event");
_Static_assert(sizeof(struct port_filter) == 24576, "port_filter");
_Static_assert(sizeof(struct switch_flow) == 16, "switch_flow");
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
_Static_assert(sizeof(struct flow_slot) == 72, "flow_slot");
_Static_assert(sizeof(struct nat_job) == 28, "nat_job");
_Static_assert(sizeof(struct cpu_scratch) == 168, "cpu_scratch");
_Static_assert(__builtin_offsetof(struct flow_slot, proto) == 36, "flow_slot tag word");

#endif /* KIB_STRUCTS_H */
