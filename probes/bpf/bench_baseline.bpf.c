// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * bench_baseline.bpf.c: an empty TC program. The benchmark (examples/bench_datapath.rs) measures
 * it the same way as the datapath programs to report the measurement floor (test-run and
 * bpf_stats overhead) next to the paths' figures. Never loaded by the agent.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("tc")
int bench_baseline(struct __sk_buff *skb)
{
	return TC_ACT_UNSPEC;
}
