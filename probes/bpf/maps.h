/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * maps.h: every map of kube-ipvs-bpf and their accessors (stat_inc, config_get, scratch_get). The
 * key and value layouts are in structs.h, the sizes and flags in consts.h.
 *
 * The shared maps are pinned by name (LIBBPF_PIN_BY_NAME) under the loader's pin root, and both
 * objects (datapath.bpf.c, ipvs_probe.bpf.c) include this header, so the same names are the same
 * maps. The max_entries below are the defaults; the loader sets the real sizes before load. The
 * probe object (KIB_PROBE_OBJECT) declares neither the SNAT table nor the datapath object's own
 * maps.
 */
#ifndef KIB_MAPS_H
#define KIB_MAPS_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "consts.h"
#include "structs.h"

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

/*
 * switch_flows: the connections open at a switch between kube-proxy and the agent, which keep the
 * handling they had (docs/switching.md, switch.h). At a takeover (config.flags CFG_F_SWITCH): the
 * connections kube-proxy's conntrack entries held, by each of their four tuples; the agent fills
 * and prunes it from conntrack dumps. At a rollback (CFG_F_DRAIN): the connections the agent
 * handled, by their client -> service tuple; the agent fills it from `conns` and the probe adds
 * the connections IPVS makes meanwhile (CFG_F_DRAIN_RECORD), and the agent prunes it from IPVS's
 * connection table. The programs look it up only under one of those flags, and a TCP SYN removes
 * the tuple it reuses. Shared with the probe object.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SWITCH_FLOWS_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tuple);
	__type(value, struct switch_flow);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} switch_flows SEC(".maps");

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

/*
 * port_filter: the ports that can be a translated or IPVS-scheduled connection's backend port, the
 * service ports and the translations' node ports (port_filter.h). Mapped by the agent, which sets
 * bits with atomic ORs.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, struct port_filter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} port_filter SEC(".maps");

#ifndef KIB_PROBE_OBJECT
/*
 * The datapath object's own maps (not shared with the probe, never pinned): the flow cache, the
 * per-CPU scratch (rewrite hand-off, clock, random state) and the direct-write programs.
 */
/*
 * Per-object, never pinned: a restarted agent's programs start with an empty cache, and an old
 * program left attached keeps its own.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FLOW_CACHE_SLOTS);
	__type(key, __u32);
	__type(value, struct flow_slot);
} flow_cache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cpu_scratch);
} cpu_scratch SEC(".maps");

/*
 * Shared by all CPUs: per flow_cache index, a counter bumped (fully ordered, after the record is
 * published) each time egress creates a SNAT record for a tuple of that index. An egress verdict
 * ("no SNAT") records the counter it read before its table lookup missed, and holds only while
 * the counter is unchanged: a translation made by another CPU, or by the fragment path, ends
 * every CPU's verdicts on that index (flow_cache.h).
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FLOW_CACHE_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} flow_gen SEC(".maps");

/*
 * Slot 0: nat_write_egress / nat_write_ingress, set by the loader when the kernel has
 * bpf_cast_to_kern_ctx (6.2+); one array per direction because a program array only takes
 * programs of its first user's attach type (TCX ingress vs egress). Not pinned: when the agent
 * exits the kernel empties them, and programs left attached fall back to the helper rewrite
 * until the next agent replaces them.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} nat_writers_egress SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} nat_writers_ingress SEC(".maps");
#endif

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

#ifndef KIB_PROBE_OBJECT
static __always_inline struct cpu_scratch *scratch_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&cpu_scratch, &zero);
}
#endif

#endif /* KIB_MAPS_H */
