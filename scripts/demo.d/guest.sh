#!/bin/sh
# The demo, inside the lab VM (the VM's root namespace is the node): IPVS programmed from a file
# of Services, traffic, and off-node NodePort connections source-NATed with the node's conntrack
# table staying flat. Staged by scripts/demo:
# /lab/bin/kube-ipvs-bpf, /lab/examples (manifests/examples).
# It checks what it shows (scripts/test runs it): a failed check stops it with "demo check
# failed: ..." and a non-zero status.
set -e
export PATH=/lab/bin:$PATH LD_LIBRARY_PATH=/lab/lib
say() { printf '\n\033[1m### %s\033[0m\n' "$*"; }
check() { # check DESCRIPTION COMMAND...: runs COMMAND, stops the demo when it fails
	what=$1
	shift
	"$@" || {
		echo "demo check failed: $what" >&2
		if [ -f /tmp/agent.log ]; then tail -n 30 /tmp/agent.log >&2; fi
		exit 1
	}
}
# Runs N connections from the client namespace to ADDRESS:PORT, echoing the answers; checks
# each one was answered by a pod.
connect() { # connect N ADDRESS PORT
	for _ in $(seq "$1"); do
		answer=$(nsenter --net=/run/netns/client socat -T2 - "TCP:$2:$3" </dev/null || true)
		echo "$answer"
		check "a pod answers the client's connection to $2:$3" test "${answer#hello from pod-}" != "$answer"
	done
}

say "node: $(uname -r); building a client namespace and three pods behind cni0"
sysctl -qw net.ipv4.ip_forward=1
ip link add cni0 type bridge && ip addr add 10.244.1.1/24 dev cni0 && ip link set cni0 up
for p in a:2 b:3 c:4; do
	name=pod-${p%%:*} ip=10.244.1.${p##*:}
	ip netns add "$name"
	ip link add "veth-$name" type veth peer name eth0 netns "$name"
	ip link set "veth-$name" master cni0 up
	nsenter --net=/run/netns/$name sh -c "ip link set lo up; ip addr add $ip/24 dev eth0; ip link set eth0 up; ip route add default via 10.244.1.1"
	nsenter --net=/run/netns/$name socat TCP-LISTEN:8080,fork,reuseaddr SYSTEM:"echo hello from $name" &
	nsenter --net=/run/netns/$name socat UDP-RECVFROM:5353,fork SYSTEM:"echo dns answer from $name" &
done
ip netns add client
ip link add veth-client type veth peer name eth0 netns client
ip addr add 10.0.1.1/24 dev veth-client && ip link set veth-client up
nsenter --net=/run/netns/client sh -c 'ip link set lo up; ip addr add 10.0.1.2/24 dev eth0; ip link set eth0 up; ip route add default via 10.0.1.1'

# A node firewall as real nodes have one: a rule that uses conntrack makes the kernel track
# every connection in this namespace (without one, nothing is tracked whatever the proxy does).
nft -f - <<'NFT'
table inet node-firewall {
	chain input { type filter hook input priority 0; policy accept; ct state established,related accept; }
	chain forward { type filter hook forward priority 0; policy accept; ct state established,related accept; }
}
NFT

mkdir -p /tmp/services && cp /lab/examples/*.yaml /tmp/services/
say "kube-ipvs-bpf run --source file:/tmp/services   (the sample file of Services)"
sed -n '1,200p' /tmp/services/services.yaml | grep -E '^\s+(name|clusterIP|type|port|nodePort|protocol|sessionAffinity):' | head -20
kube-ipvs-bpf run --source file:/tmp/services --node-name lab --min-sync-period 200ms 2>/tmp/agent.log &
agent=$!
# The first sync loads and attaches the datapath: seconds on a real CPU, up to a minute or two
# under emulation on a busy host.
for _ in $(seq 600); do grep -q 'sync done' /tmp/agent.log && break; sleep 0.5; done
grep -q 'sync done' /tmp/agent.log || { echo "the agent has not synced after 5 minutes:"; cat /tmp/agent.log; exit 1; }

say "kube-ipvs-bpf inspect services"
kube-ipvs-bpf inspect services

say "the kernel's own view: ipvsadm -Ln, ip addr show kube-ipvs0"
ipvsadm -Ln
ip -brief addr show kube-ipvs0

say "client -> ClusterIP 10.96.0.10:80, six connections (rr over two pods)"
connect 6 10.96.0.10 80
say "client -> NodePort 10.0.1.1:30080, and UDP 10.96.0.53:53"
connect 1 10.0.1.1 30080
answer=$(echo query | nsenter --net=/run/netns/client socat -T2 - UDP:10.96.0.53:53 || true)
echo "$answer"
check "a pod answers the UDP query" test "${answer#dns answer from pod-}" != "$answer"
say "the point: ten more NodePort connections from the off-node client, source-NATed by eBPF"
before=$(conntrack -C)
connect 10 10.0.1.1 30080 >/dev/null
after=$(conntrack -C)
echo "conntrack -C before: $before, after: $after   (kube-proxy's MASQUERADE: one entry per connection, below)"
check "the node's conntrack table stays flat ($before before, $after after)" test "$after" = "$before"
say "kube-ipvs-bpf inspect snat   (each connection: client, the node address:port the pod saw, backend)"
kube-ipvs-bpf inspect snat >/tmp/snat.txt
head -n 8 /tmp/snat.txt
nodeport_records=$(grep -c '^TCP   10\.0\.1\.2:.* 10\.244\.1\.1:.*demo/web:http' /tmp/snat.txt || true)
check "inspect snat lists the 11 NodePort connections (it lists $nodeport_records)" test "$nodeport_records" -ge 11
say "session affinity: client -> 10.96.0.11:80 three times (same pod each time)"
connect 3 10.96.0.11 80 >/tmp/sticky.txt
cat /tmp/sticky.txt
check "the three connections went to one pod" test "$(sort -u /tmp/sticky.txt | wc -l)" = 1

sleep 2.2 # IPVS folds its per-CPU counters on its 2 s estimator tick
say "counters moved: kube-ipvs-bpf inspect services"
kube-ipvs-bpf inspect services

say "scaling web to three pods: the EndpointSlice file changes"
cp /lab/examples/scaled/endpointslices.yaml /tmp/services/endpointslices.yaml
for _ in $(seq 600); do ipvsadm -Ln -t 10.96.0.10:80 | grep -q 10.244.1.4 && break; sleep 0.2; done
grep 'sync done' /tmp/agent.log | tail -n 1
kube-ipvs-bpf inspect services
say "client -> ClusterIP 10.96.0.10:80, six connections (now over three pods)"
connect 6 10.96.0.10 80 >/tmp/scaled.txt
cat /tmp/scaled.txt
check "the new pod answers" grep -q 'pod-c' /tmp/scaled.txt
sleep 2.2
say "ipvsadm -Ln --stats (the kernel's counters)"
ipvsadm -Ln --stats

kill "$agent"
wait "$agent" 2>/dev/null || true
say "agent stopped; the kernel keeps serving (nothing is flushed on exit)"
connect 1 10.96.0.10 80
say "agent log"
cat /tmp/agent.log
check "the agent's log carries no raw libbpf lines" sh -c '! grep -q "libbpf:" /tmp/agent.log'
check "the agent logged no error" sh -c '! grep -q " ERROR " /tmp/agent.log'

say "for contrast, kube-proxy's ipvs mode: the agent's state removed (kube-ipvs-bpf cleanup), the NodePort as kube-proxy programs it (IPVS with vs.conntrack=1, MASQUERADE)"
kube-ipvs-bpf cleanup >/dev/null
ipvsadm -C
sysctl -qw net.ipv4.vs.conntrack=1
ipvsadm -A -t 10.0.1.1:30080 -s rr
for pod in 10.244.1.2 10.244.1.3 10.244.1.4; do ipvsadm -a -t 10.0.1.1:30080 -r "$pod:8080" -m; done
iptables -t nat -A POSTROUTING -s 10.0.1.0/24 -d 10.244.1.0/24 -j MASQUERADE
before=$(conntrack -C)
connect 10 10.0.1.1 30080 >/dev/null
after=$(conntrack -C)
echo "conntrack -C before: $before, after: $after   (one entry per connection, kept for the TIME_WAIT timeout)"
check "kube-proxy-style MASQUERADE tracks each connection" test "$after" -ge $((before + 10))
say "demo done: every check passed"
