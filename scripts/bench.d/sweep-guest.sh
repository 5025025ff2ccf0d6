#!/bin/sh
# The guest side of `scripts/bench sweep`: what one full read of `conns` costs the sweeper per
# entry. Runs the agent on the example Services with the probe on IPVS's free off
# (`--ipvs-free-probe=false`: the sweeper then reads `conns` in full every minute; with the probe,
# every 15 minutes), sums its sweeper thread's CPU (schedstat) over
# WINDOW seconds (six full reads at the default 10 s period: a full read every sixth pass) with
# `conns` empty, adds ENTRIES young entries (created in the far future, so no pass expires them)
# with one `bpftool batch`, sums it again, and prints the figures as one JSON line. Under
# -icount, nanoseconds are guest instructions.
set -e
export PATH=/lab/bin:$PATH LD_LIBRARY_PATH=/lab/lib
WINDOW=${WINDOW:-360} ENTRIES=${ENTRIES:-20000}
ip link add dummy0 type dummy && ip addr add 10.0.1.1/24 dev dummy0 && ip link set dummy0 up
mkdir -p /tmp/services && cp /lab/bin/services.yaml /tmp/services/
kube-ipvs-bpf run --source file:/tmp/services --node-name lab --ipvs-free-probe=false 2>/tmp/agent.log &
sleep 40
pid=$(pidof kube-ipvs-bpf)
pin=$(ls -d /sys/fs/bpf/kube-ipvs-bpf/*/conns | head -n1)
sweeper_ns() {
	for t in /proc/"$pid"/task/*; do
		if [ "$(cat "$t/comm")" = sweeper ]; then cut -d' ' -f1 "$t/schedstat"; fi
	done
}
window_ns() {
	a=$(sweeper_ns)
	sleep "$WINDOW"
	echo $(($(sweeper_ns) - a))
}
empty=$(window_ns)
i=0
: >/tmp/batch
while [ $i -lt "$ENTRIES" ]; do
	# Tuple: 10.0.x.y:40000 -> 10.244.2.2:8080 TCP (16-byte addresses); value: 10.96.0.10:80,
	# created_ns 0x7fffffffffffffff.
	printf 'map update pinned %s key hex 00 00 00 00 00 00 00 00 00 00 ff ff 0a 00 %02x %02x 00 00 00 00 00 00 00 00 00 00 ff ff 0a f4 02 02 9c 40 1f 90 06 00 00 00 value hex 00 00 00 00 00 00 00 00 00 00 ff ff 0a 60 00 0a 00 50 00 00 00 00 00 00 ff ff ff ff ff ff ff 7f\n' \
		"$pin" $((i / 256)) $((i % 256)) >>/tmp/batch
	i=$((i + 1))
done
bpftool batch file /tmp/batch >/dev/null
held=$(bpftool map dump pinned "$pin" | grep -c '^key\|"key"')
full=$(window_ns)
reads=$((WINDOW / 60))
errors=$(grep -c ERROR /tmp/agent.log || true)
echo "{\"entries\": $held, \"window_s\": $WINDOW, \"full_reads\": $reads, \"sweeper_ns_empty\": $empty, \"sweeper_ns_with_entries\": $full, \"ns_per_entry_per_full_read\": $(((full - empty) / (reads * held))), \"agent_errors\": $errors}"
