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

static __always_inline int record_conn(struct ip_vs_conn *cp, const int direct)
{
	struct tuple key = {};
	struct conn_value value = {};
	struct config *cfg = config_get();
	__u32 flags;
	__u16 af;
	__u16 daf;
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
	af = CONN_FIELD(direct, cp, af);
	daf = CONN_FIELD(direct, cp, daf);
	read_addr(key.saddr, &cp->caddr, af, direct);
	read_addr(key.daddr, &cp->daddr, daf, direct);
	key.sport = cport;
	key.dport = CONN_FIELD(direct, cp, dport);
	key.proto = CONN_FIELD(direct, cp, protocol);
	read_addr(value.vaddr, &cp->vaddr, af, direct);
	value.vport = CONN_FIELD(direct, cp, vport);
	value.ipvs_flags = flags;
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
	return record_conn(ret, 1);
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
	return record_conn(ret, 1);
}

SEC("?kretprobe/ip_vs_conn_new")
int BPF_KRETPROBE(ipvs_conn_new_kretprobe, struct ip_vs_conn *ret)
{
	return record_conn(ret, 0);
}
