//! Small network-namespace topologies for lab tests: a client, a node (where IPVS and the
//! datapath run) and a backend, joined by veth pairs, IPv4 and IPv6.

use crate::netns::Netns;

/// client (10.0.1.2, fd00:1::2) ⇄ node (10.0.1.1 | 10.0.2.1, fd00:1::1 | fd00:2::1) ⇄ backend
/// (10.0.2.2, fd00:2::2). The node forwards; the client and the backend route everything
/// through it, so IPVS sees both directions without any SNAT.
pub struct Topology {
    pub client: Netns,
    pub node: Netns,
    pub backend: Netns,
}

/// Links a veth pair between two namespaces: `a_if` in `a` with `a_addrs`, `b_if` in `b`.
pub fn veth(a: &Netns, a_if: &str, a_addrs: &[&str], b: &Netns, b_if: &str, b_addrs: &[&str]) {
    try_veth(a, a_if, a_addrs, b, b_if, b_addrs).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Like [`veth`], but a failure is an error.
pub fn try_veth(
    a: &Netns,
    a_if: &str,
    a_addrs: &[&str],
    b: &Netns,
    b_if: &str,
    b_addrs: &[&str],
) -> anyhow::Result<()> {
    crate::try_sh(&format!(
        "ip link add {a_if} netns {} type veth peer name {b_if} netns {}",
        a.name(),
        b.name()
    ))?;
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            let nodad = if addr.contains(':') { " nodad" } else { "" };
            ns.try_sh(&format!("ip addr add {addr} dev {ifname}{nodad}"))?;
        }
        ns.try_sh(&format!("ip link set {ifname} up"))?;
    }
    Ok(())
}

impl Topology {
    /// Confirmed conntrack entries in the node's namespace.
    pub fn conntrack_count(&self) -> u64 {
        conntrack_count(&self.node)
    }

    /// Builds the three namespaces; `name` prefixes their names.
    pub fn new(name: &str) -> Topology {
        let client = Netns::new(&format!("{name}-client"));
        let node = Netns::new(&format!("{name}-node"));
        let backend = Netns::new(&format!("{name}-backend"));
        veth(
            &client,
            "eth0",
            &["10.0.1.2/24", "fd00:1::2/64"],
            &node,
            "eth0",
            &["10.0.1.1/24", "fd00:1::1/64"],
        );
        veth(
            &node,
            "eth1",
            &["10.0.2.1/24", "fd00:2::1/64"],
            &backend,
            "eth0",
            &["10.0.2.2/24", "fd00:2::2/64"],
        );
        client.sh("ip route add default via 10.0.1.1 && ip -6 route add default via fd00:1::1");
        backend.sh("ip route add default via 10.0.2.1 && ip -6 route add default via fd00:2::1");
        node.sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1");
        Topology {
            client,
            node,
            backend,
        }
    }

    /// Binds `addr` (e.g. "10.96.0.10/32") on a dummy `kube-ipvs0` in the node namespace, as a
    /// service address is bound.
    pub fn bind_service_address(&self, addr: &str) {
        if !self.node.sh_status("ip link show kube-ipvs0").0.eq(&0) {
            self.node.sh("ip link add kube-ipvs0 type dummy");
        }
        let nodad = if addr.contains(':') { " nodad" } else { "" };
        self.node
            .sh(&format!("ip addr add {addr} dev kube-ipvs0{nodad}"));
    }
}

/// The datapath topology: an off-cluster client, the node under test (IPVS, the agent), a local
/// pod behind the node's `cni0` bridge, and a remote pod on another node ("router") one hop
/// further. The other node routes the local pod CIDR back through the node but has no route to
/// the client's network, so a NodePort reply reaches the client only if the node source-NATed
/// the request (as a real cluster's remote backends reply to the node, not to the client).
///
/// ```text
/// client 10.0.1.2 ── eth0 10.0.1.1 [node] eth1 10.0.2.1 ── 10.0.2.254 [router] 10.244.2.1 ── remote 10.244.2.2
///                                  cni0 10.244.1.1 ── pod 10.244.1.2
/// ```
/// IPv6: client fd00:1::2, node fd00:1::1 / fd00:2::1 / fd00:244:1::1, router fd00:2::254 /
/// fd00:244:2::1, remote fd00:244:2::2, pod fd00:244:1::2. Cluster CIDRs: 10.244.0.0/16,
/// fd00:244::/32.
pub struct SnatTopology {
    pub client: Netns,
    pub node: Netns,
    pub pod: Netns,
    pub router: Netns,
    pub remote: Netns,
}

impl SnatTopology {
    pub const CLUSTER_CIDRS: &'static str = "10.244.0.0/16,fd00:244::/32";

    pub fn new(name: &str) -> SnatTopology {
        SnatTopology::try_new(name).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`SnatTopology::new`], but a failure is an error (and the namespaces made so far
    /// are deleted).
    pub fn try_new(name: &str) -> anyhow::Result<SnatTopology> {
        let client = Netns::try_new(&format!("{name}-cl"))?;
        let node = Netns::try_new(&format!("{name}-nd"))?;
        let pod = Netns::try_new(&format!("{name}-pd"))?;
        let router = Netns::try_new(&format!("{name}-rt"))?;
        let remote = Netns::try_new(&format!("{name}-rm"))?;
        try_veth(
            &client,
            "eth0",
            &["10.0.1.2/24", "fd00:1::2/64"],
            &node,
            "eth0",
            &["10.0.1.1/24", "fd00:1::1/64"],
        )?;
        try_veth(
            &node,
            "eth1",
            &["10.0.2.1/24", "fd00:2::1/64"],
            &router,
            "eth0",
            &["10.0.2.254/24", "fd00:2::254/64"],
        )?;
        try_veth(
            &router,
            "eth1",
            &["10.244.2.1/24", "fd00:244:2::1/64"],
            &remote,
            "eth0",
            &["10.244.2.2/24", "fd00:244:2::2/64"],
        )?;
        node.try_sh("ip link add cni0 type bridge && ip link set cni0 up")?;
        node.try_sh(
            "ip addr add 10.244.1.1/24 dev cni0 && ip addr add fd00:244:1::1/64 dev cni0 nodad",
        )?;
        crate::try_sh(&format!(
            "ip link add veth-pod netns {} type veth peer name eth0 netns {}",
            node.name(),
            pod.name()
        ))?;
        node.try_sh("ip link set veth-pod master cni0 && ip link set veth-pod up")?;
        pod.try_sh("ip addr add 10.244.1.2/24 dev eth0 && ip addr add fd00:244:1::2/64 dev eth0 nodad && ip link set eth0 up")?;
        client
            .try_sh("ip route add default via 10.0.1.1 && ip -6 route add default via fd00:1::1")?;
        pod.try_sh(
            "ip route add default via 10.244.1.1 && ip -6 route add default via fd00:244:1::1",
        )?;
        remote.try_sh(
            "ip route add default via 10.244.2.1 && ip -6 route add default via fd00:244:2::1",
        )?;
        node.try_sh("ip route add 10.244.2.0/24 via 10.0.2.254 && ip -6 route add fd00:244:2::/64 via fd00:2::254")?;
        router.try_sh("ip route add 10.244.1.0/24 via 10.0.2.1 && ip -6 route add fd00:244:1::/64 via fd00:2::1")?;
        for ns in [&node, &router] {
            ns.try_sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")?;
        }
        Ok(SnatTopology {
            client,
            node,
            pod,
            router,
            remote,
        })
    }

    /// A conntrack-using firewall on the node, as real nodes have (`ct state
    /// established,related accept`); with `drop`, INPUT and FORWARD drop everything else.
    pub fn node_firewall(&self, drop: bool) {
        self.try_node_firewall(drop)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`SnatTopology::node_firewall`], but a failure is an error.
    pub fn try_node_firewall(&self, drop: bool) -> anyhow::Result<()> {
        let policy = if drop { "DROP" } else { "ACCEPT" };
        for ipt in ["iptables", "ip6tables"] {
            self.node.try_sh(&format!(
                "{ipt} -P INPUT {policy} && {ipt} -P FORWARD {policy} && {ipt} -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT && {ipt} -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT && {ipt} -A INPUT -i lo -j ACCEPT"
            ))?;
        }
        Ok(())
    }

    /// Confirmed conntrack entries in the node's namespace.
    pub fn conntrack_count(&self) -> u64 {
        conntrack_count(&self.node)
    }
}

/// Confirmed conntrack entries in `ns` (`nf_conntrack_count`; 0 before conntrack is loaded).
pub fn conntrack_count(ns: &Netns) -> u64 {
    ns.sh("cat /proc/sys/net/netfilter/nf_conntrack_count")
        .trim()
        .parse()
        .unwrap_or(0)
}
