// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * ipvs_probe.bpf.c: the hook on IPVS connection creation. When ip_vs_conn_new() returns a new
 * connection, it is recorded in `conns` keyed by (client -> backend, protocol) with the service
 * address:port and the IPVS flags. Persistence templates (IP_VS_CONN_F_TEMPLATE, client port 0)
 * are skipped. While the agent drains for a rollback (docs/switching.md) it records nothing, and
 * while it prepares one it also puts each connection in switch_flows.
 *
 * Three programs with one body, tried in this order: fexit on ip_vs_conn_new (kernels whose
 * trampoline takes its 7 arguments), fexit on ip_vs_schedule (its caller for every connection a
 * virtual service schedules: kernels whose trampoline takes 5) and kretprobe on ip_vs_conn_new
 * (every kernel). None is autoloaded: the loader enables the one it tries.
 *
 * The hook on IPVS freeing a connection (ip_vs_conn_rcu_free(), the RCU callback that returns
 * it to its slab once it is unhashed and unreferenced) removes the connection's `conns` entry,
 * if the entry still carries the connection's identity (conn_id()): a new connection on the same
 * tuple, made before the old one was freed, rewrote it. An untranslated connection's entry so
 * goes with IPVS's connection instead of waiting for the agent's full read after IPVS's
 * established timeout (docs/datapath.md, "conns"). fentry, else kprobe; the loader enables one.
 * struct ip_vs_conn is read with CO-RE against the ip_vs module's BTF; only the fields read are
 * declared. Integer fields are read with their relocated size (BPF_CORE_READ_BITFIELD*), so a
 * kernel that narrows one (af and daf became u8 in later reworks) still reads right; the fexit
 * programs read them directly, the kretprobe with bpf_probe_read_kernel (CONN_FIELD).
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <asm/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>

#define KIB_PROBE_OBJECT
#include "maps.h"
#include "port_filter.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define AF_INET 2
#define AF_INET6 10

union nf_inet_addr {
	__u32 all[4];
	__be32 ip;
	__be32 ip6[4];
} __attribute__((preserve_access_index));

struct callback_head {
	void *next;
	void *func;
} __attribute__((preserve_access_index));

struct ip_vs_conn {
	__be16 cport;
	__be16 dport;
	__be16 vport;
	__u16 af;
	union nf_inet_addr caddr;
	union nf_inet_addr vaddr;
	union nf_inet_addr daddr;
	__u32 flags;
	__u16 protocol;
	__u16 daf;
	/* `struct rcu_head rcu_head` in the source: rcu_head is a macro for callback_head. */
	struct callback_head callback_head;
} __attribute__((preserve_access_index));

/* Opaque argument types of ip_vs_conn_new (only passed through). */
struct ip_vs_conn_param;
struct ip_vs_dest;

/*
 * The fields of struct ip_vs_conn, read at their relocated offset and size: with direct loads in
 * the fexit programs (their argument is a BTF pointer, so a load is one instruction the verifier
 * guards), with bpf_probe_read_kernel in the kretprobe (a register holds a plain address there).
 * `direct` is a constant in each program: the other branch is compiled out.
 */
#define CONN_FIELD(direct, cp, field)                                                              \
	((direct) ? (__u32)BPF_CORE_READ_BITFIELD(cp, field)                                      \
		  : (__u32)BPF_CORE_READ_BITFIELD_PROBED(cp, field))

static __always_inline void read_addr(__u8 out[ADDR_LEN], const union nf_inet_addr *addr,
				      __u16 family, const int direct)
{
	__u32 *words = (__u32 *)out;

	if (family == AF_INET6) {
		if (direct) {
			words[0] = addr->all[0];
			words[1] = addr->all[1];
			words[2] = addr->all[2];
			words[3] = addr->all[3];
		} else {
			bpf_core_read(out, ADDR_LEN, &addr->ip6);
		}
		return;
	}
	words[0] = 0;
	words[1] = 0;
	words[2] = bpf_htonl(0x0000ffff);
	words[3] = direct ? addr->ip : BPF_CORE_READ(addr, ip);
}

/*
 * The identity of an IPVS connection in its `conns` entry: its address, which no other live
 * connection has (the slab object is reused only after ip_vs_conn_rcu_free(), where the free
 * program runs first), shifted right by 3 (slab objects are at least 8-byte aligned) and cut to
 * 47 bits (distinct across 1 PiB of addresses), with CONN_ID_SET_HI above them.
 */
static __always_inline void conn_id_set(struct conn_value *v, __u64 cp)
{
	__u64 id = (cp >> 3) & ((1ULL << 47) - 1);

	v->conn_id_lo = (__u32)id;
	v->conn_id_hi = (__u16)(id >> 32) | CONN_ID_SET_HI;
}

/*
 * The `conns` key of an IPVS connection: client -> backend and protocol, as record_conn() writes
 * it; the client port (0 for a persistence template, which has no entry) in `key->sport`.
 */
static __always_inline void conn_key(struct tuple *key, struct ip_vs_conn *cp, const int direct)
{
	__u16 af = CONN_FIELD(direct, cp, af);
	__u16 daf = CONN_FIELD(direct, cp, daf);

	read_addr(key->saddr, &cp->caddr, af, direct);
	read_addr(key->daddr, &cp->daddr, daf, direct);
	key->sport = CONN_FIELD(direct, cp, cport);
	key->dport = CONN_FIELD(direct, cp, dport);
	key->proto = CONN_FIELD(direct, cp, protocol);
}

/*
 * While the agent prepares a rollback (CFG_F_DRAIN_RECORD, docs/switching.md), a connection IPVS
 * makes is one the programs still mark: its client -> service tuple goes in switch_flows, so it
 * stays the agent's once the drain starts.
 */
static __always_inline void record_drain_flow(const struct tuple *conn, const struct conn_value *v)
{
	struct tuple key = *conn;
	struct switch_flow flow = { .seen_ns = v->created_ns };

	__builtin_memcpy(key.daddr, v->vaddr, ADDR_LEN);
	key.dport = v->vport;
	bpf_map_update_elem(&switch_flows, &key, &flow, BPF_ANY);
}

/*
 * `cp`'s address is `addr`, a plain integer: a BTF pointer (the fexit programs' argument) allows
 * no arithmetic but adding and subtracting, so those take it from bpf_get_func_ret().
 */
static __always_inline int record_conn(struct ip_vs_conn *cp, const int direct, __u64 addr)
{
	struct tuple key = {};
	struct conn_value value = {};
	struct config *cfg = config_get();
	__u32 flags;
	__be16 cport;

	if (!cp)
		return 0;
	/*
	 * Draining (rollback to kube-proxy): new connections are conntrack's (vs.conntrack=1), and
	 * their replies must stay tracked too.
	 */
	if (cfg && (cfg->flags & CFG_F_DRAIN))
		return 0;
	flags = CONN_FIELD(direct, cp, flags);
	cport = CONN_FIELD(direct, cp, cport);
	if ((flags & IP_VS_CONN_F_TEMPLATE) || cport == 0) {
		stat_inc(STAT_PROBE_TEMPLATE_SKIPPED);
		return 0;
	}
	conn_key(&key, cp, direct);
	read_addr(value.vaddr, &cp->vaddr, CONN_FIELD(direct, cp, af), direct);
	value.vport = CONN_FIELD(direct, cp, vport);
	conn_id_set(&value, addr);
	value.created_ns = bpf_ktime_get_ns();
	/* Before the entry can be found (port_filter.h): its replies come from this port. */
	port_filter_add(PORT_BACKEND, key.dport);
	bpf_map_update_elem(&conns, &key, &value, BPF_ANY);
	if (cfg && (cfg->flags & CFG_F_DRAIN_RECORD))
		record_drain_flow(&key, &value);
	stat_inc(STAT_PROBE_CONN);
	return 0;
}

SEC("?fexit/ip_vs_conn_new")
int BPF_PROG(ipvs_conn_new_fexit, const struct ip_vs_conn_param *p, int dest_af,
	     const union nf_inet_addr *daddr, __be16 dport, unsigned int flags,
	     struct ip_vs_dest *dest, __u32 fwmark, struct ip_vs_conn *ret)
{
	__u64 addr = 0;

	bpf_get_func_ret(ctx, &addr);
	return record_conn(ret, 1, addr);
}

/* Opaque argument types of ip_vs_schedule (only passed through). */
struct ip_vs_service;
struct sk_buff;
struct ip_vs_proto_data;
struct ip_vs_iphdr;

/*
 * Kernels whose trampoline takes fewer than ip_vs_conn_new's 7 arguments (6.1's x86-64 takes 6):
 * the return of ip_vs_schedule() (5 arguments), the scheduler's entry for every new connection of a
 * virtual service (each protocol's conn_schedule calls it; persistence templates are made inside
 * it, and it returns the connection). ip_vs_conn_new's other callers are not seen here: the sync
 * daemon's backup connections, cache bypass (no destination, vs.cache_bypass), connections a
 * real server starts (UDP, only with a persistence engine: SIP) and ip_vs_ftp's data connections,
 * none of which kube-ipvs-bpf sets up.
 */
SEC("?fexit/ip_vs_schedule")
int BPF_PROG(ipvs_schedule_fexit, struct ip_vs_service *svc, struct sk_buff *skb,
	     struct ip_vs_proto_data *pd, int *ignored, struct ip_vs_iphdr *iph,
	     struct ip_vs_conn *ret)
{
	__u64 addr = 0;

	bpf_get_func_ret(ctx, &addr);
	return record_conn(ret, 1, addr);
}

SEC("?kretprobe/ip_vs_conn_new")
int BPF_KRETPROBE(ipvs_conn_new_kretprobe, struct ip_vs_conn *ret)
{
	return record_conn(ret, 0, (__u64)(unsigned long)ret);
}

/*
 * IPVS frees a connection: its `conns` entry goes, unless it carries another identity (a newer
 * connection on the same tuple, or none: an older probe's entry, left to the agent's sweeper).
 * ip_vs_conn_rcu_free() runs once per connection, after IPVS unhashed it and an RCU grace
 * period, so no packet finds the connection any more. The argument is the connection's rcu_head;
 * its fields are read with bpf_probe_read_kernel (CONN_FIELD), the pointer being computed.
 * Between the lookup and the delete, a connection IPVS makes on the same tuple on another CPU
 * would lose its entry: that needs the client to reuse the tuple within those few hundred
 * nanoseconds of the old connection's free, after IPVS had unhashed it (a reuse before that
 * makes the new connection earlier, and its identity keeps the entry).
 */
static __always_inline int forget_conn(__u64 head)
{
	/* A plain address (container_of), read with bpf_probe_read_kernel only. */
	__u64 addr = head - bpf_core_field_offset(struct ip_vs_conn, callback_head);
	struct ip_vs_conn *cp = (void *)(unsigned long)addr;
	struct conn_value mine = {};
	struct conn_value *v;
	struct tuple key = {};

	conn_key(&key, cp, 0);
	if (key.sport == 0)
		return 0;
	v = bpf_map_lookup_elem(&conns, &key);
	if (!v)
		return 0;
	conn_id_set(&mine, addr);
	if (v->conn_id_lo != mine.conn_id_lo || v->conn_id_hi != mine.conn_id_hi) {
		stat_inc(STAT_PROBE_FREE_KEPT);
		return 0;
	}
	bpf_map_delete_elem(&conns, &key);
	stat_inc(STAT_PROBE_FREE_REMOVED);
	return 0;
}

SEC("?fentry/ip_vs_conn_rcu_free")
int BPF_PROG(ipvs_conn_free_fentry, struct callback_head *head)
{
	__u64 addr = 0;

	/* The argument as a plain integer (see record_conn). */
	bpf_get_func_arg(ctx, 0, &addr);
	return forget_conn(addr);
}

SEC("?kprobe/ip_vs_conn_rcu_free")
int BPF_KPROBE(ipvs_conn_free_kprobe, struct callback_head *head)
{
	return forget_conn((__u64)(unsigned long)head);
}
