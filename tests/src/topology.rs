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
    crate::sh(&format!(
        "ip link add {a_if} netns {} type veth peer name {b_if} netns {}",
        a.name(),
        b.name()
    ));
    for (ns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            let nodad = if addr.contains(':') { " nodad" } else { "" };
            ns.sh(&format!("ip addr add {addr} dev {ifname}{nodad}"));
        }
        ns.sh(&format!("ip link set {ifname} up"));
    }
}

impl Topology {
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
