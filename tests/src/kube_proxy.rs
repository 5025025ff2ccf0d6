//! kube-proxy v1.36's ipvs and nftables datapaths, reproduced for any set of Services, for the
//! side-by-side benchmark. This module owns the exact text kube-proxy programs on a node and its
//! application in a lab namespace:
//! - ipvs mode: the sysctls it sets, its ipsets (`ipset restore` input), its `KUBE-*` iptables
//!   chains (`iptables-restore` input, in the canonical form `iptables-save` prints), its IPVS
//!   virtual services (`ipvsadm -R` input) and the ClusterIPs on `kube-ipvs0`;
//! - nftables mode: the sysctls and the `ip kube-proxy` / `ip6 kube-proxy` tables (`nft -f`
//!   input, in the form `nft list ruleset` prints).
//!
//! The generators are pure functions; the unit tests feed them the Services a real kube-proxy
//! v1.36.2 ran with and compare their output with what it wrote
//! (`tests/fixtures/kube-proxy-v1.36`). IPv4 Services only (the benchmark's); the IPv6 halves are
//! written as kube-proxy writes them for a node without IPv6 Services.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};

use crate::netns::Netns;

/// kube-proxy's masquerade mark (`--masquerade-bit 14`).
pub const MASQ_MARK: u32 = 0x4000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// As in ipsets and nft (`tcp`).
    pub fn lower(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    fn ipvsadm_flag(self) -> &'static str {
        match self {
            Protocol::Tcp => "-t",
            Protocol::Udp => "-u",
        }
    }
}

/// One ready endpoint of a service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// On this node (its `nodeName` is the node's).
    pub local: bool,
}

/// One port of a Service (kube-proxy programs per service port).
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    /// The port's name (may be empty).
    pub port_name: String,
    pub protocol: Protocol,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `sessionAffinity: ClientIP` with this timeout (seconds).
    pub affinity_secs: Option<u32>,
    pub endpoints: Vec<Endpoint>,
}

impl ServicePort {
    /// A ClusterIP service port with `endpoints` (remote, same target port for all).
    pub fn cluster_ip(
        namespace: &str,
        name: &str,
        port_name: &str,
        protocol: Protocol,
        cluster_ip: Ipv4Addr,
        port: u16,
        endpoints: &[(Ipv4Addr, u16)],
    ) -> ServicePort {
        ServicePort {
            namespace: namespace.into(),
            name: name.into(),
            port_name: port_name.into(),
            protocol,
            cluster_ip,
            port,
            node_port: None,
            external_local: false,
            affinity_secs: None,
            endpoints: endpoints
                .iter()
                .map(|&(ip, port)| Endpoint {
                    ip,
                    port,
                    local: false,
                })
                .collect(),
        }
    }

    /// `namespace/name:port` (kube-proxy's ServicePortName).
    fn display_name(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }

    /// The base of its nftables chain names: `HASH-namespace/name/proto/port`.
    fn chain_base(&self) -> String {
        hash_and_truncate(&format!(
            "{}/{}/{}/{}",
            self.namespace,
            self.name,
            self.protocol.lower(),
            self.port_name
        ))
    }

    fn endpoint_chain_base(&self, ep: &Endpoint) -> String {
        hash_and_truncate(&format!(
            "{}/{}/{}/{}__{}/{}",
            self.namespace,
            self.name,
            self.protocol.lower(),
            self.port_name,
            ep.ip,
            ep.port
        ))
    }

    fn sorted_endpoints(&self) -> Vec<&Endpoint> {
        let mut v: Vec<&Endpoint> = self.endpoints.iter().collect();
        v.sort_by_key(|e| (e.ip, e.port));
        v
    }

    fn local_endpoints(&self) -> Vec<&Endpoint> {
        self.sorted_endpoints()
            .into_iter()
            .filter(|e| e.local)
            .collect()
    }

    /// The endpoints external (NodePort) traffic may use.
    fn external_endpoints(&self) -> Vec<&Endpoint> {
        if self.external_local {
            self.local_endpoints()
        } else {
            self.sorted_endpoints()
        }
    }
}

/// What kube-proxy knows of the node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// `--cluster-cidr` (the local-traffic detector).
    pub cluster_cidr: String,
    /// The Service CIDR (nftables mode drops traffic to its unallocated addresses).
    pub service_cidr: String,
    /// The addresses NodePorts are opened on (`nodePortAddresses`; ipvs mode opens a virtual
    /// service per address).
    pub nodeport_addresses: Vec<Ipv4Addr>,
}

/// kube-proxy's `hashAndTruncate`: the first 8 characters of the base32 SHA-256 of `name`, a
/// dash, then `name` (truncated to 240 characters with "..." when longer).
pub fn hash_and_truncate(name: &str) -> String {
    use sha2::{Digest, Sha256};
    const MAX: usize = 256 - "external-".len() - 1;
    let digest = Sha256::digest(name.as_bytes());
    let mut s = format!("{}-{name}", &base32(&digest)[..8]);
    if s.len() > MAX {
        s.truncate(MAX - 3);
        s.push_str("...");
    }
    s
}

/// RFC 4648 base32 (standard alphabet, no padding needed for the 8-character prefix).
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buf, mut bits) = (0u32, 0u32);
    for &b in data {
        buf = (buf << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            out.push(ALPHABET[((buf >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

// --- sysctls --------------------------------------------------------------------------------

/// The per-namespace sysctls kube-proxy's ipvs mode sets (sysctl-after.txt): IPVS's conntrack
/// (needed for its iptables MASQUERADE), expiry of connections to removed destinations and of
/// quiescent templates, and the conntrack TCP timeouts of its `conntrack` configuration.
pub fn ipvs_mode_sysctls() -> Vec<(&'static str, String)> {
    let mut v = vec![
        ("net.ipv4.vs.conntrack", "1".to_string()),
        ("net.ipv4.vs.expire_nodest_conn", "1".to_string()),
        ("net.ipv4.vs.expire_quiescent_template", "1".to_string()),
    ];
    v.extend(conntrack_timeout_sysctls());
    v
}

/// The per-namespace sysctls kube-proxy's nftables mode sets: the conntrack TCP timeouts.
pub fn nftables_mode_sysctls() -> Vec<(&'static str, String)> {
    conntrack_timeout_sysctls()
}

fn conntrack_timeout_sysctls() -> Vec<(&'static str, String)> {
    vec![
        (
            "net.netfilter.nf_conntrack_tcp_timeout_established",
            "86400".to_string(),
        ),
        (
            "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
            "3600".to_string(),
        ),
    ]
}

/// kube-proxy's conntrack table size: `maxPerCore` 32768 × CPUs, at least `min` 131072.
pub fn conntrack_max(cpus: usize) -> u64 {
    (32_768 * cpus as u64).max(131_072)
}

/// The kernel-wide conntrack limits (only writable from the initial network namespace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConntrackGlobals {
    pub max: u64,
    pub hashsize: u64,
}

const CT_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
const CT_HASHSIZE: &str = "/sys/module/nf_conntrack/parameters/hashsize";

fn read_u64(path: &str) -> Result<u64> {
    std::fs::read_to_string(path)
        .with_context(|| format!("read {path}"))?
        .trim()
        .parse()
        .with_context(|| format!("parse {path}"))
}

fn write_value(path: &str, value: u64) -> Result<()> {
    std::fs::write(path, value.to_string()).with_context(|| format!("write {value} to {path}"))
}

impl ConntrackGlobals {
    /// The current values (call from the initial network namespace).
    pub fn read() -> Result<ConntrackGlobals> {
        Ok(ConntrackGlobals {
            max: read_u64(CT_MAX)?,
            hashsize: read_u64(CT_HASHSIZE)?,
        })
    }

    /// Writes these values back.
    pub fn write(&self) -> Result<()> {
        if read_u64(CT_HASHSIZE)? != self.hashsize {
            write_value(CT_HASHSIZE, self.hashsize)?;
        }
        write_value(CT_MAX, self.max)
    }

    /// Sets `nf_conntrack_max` alone (the table-full case).
    pub fn set_max(max: u64) -> Result<()> {
        write_value(CT_MAX, max)
    }

    /// What kube-proxy does at start-up (its `SetMax`): `nf_conntrack_max` to
    /// [`conntrack_max`] when it differs, and the hash size to max/4 when it is smaller.
    pub fn apply_kube_proxy(cpus: usize) -> Result<()> {
        let max = conntrack_max(cpus);
        if read_u64(CT_MAX)? != max {
            write_value(CT_MAX, max)?;
        }
        if read_u64(CT_HASHSIZE)? < max / 4 {
            write_value(CT_HASHSIZE, max / 4)?;
        }
        Ok(())
    }
}

fn apply_sysctls(ns: &Netns, sysctls: &[(&str, String)]) -> Result<()> {
    let args: Vec<String> = sysctls.iter().map(|(k, v)| format!("{k}={v}")).collect();
    ns.try_sh(&format!("sysctl -qw {}", args.join(" ")))
        .map(|_| ())
}

// --- ipvs mode: ipsets ----------------------------------------------------------------------

/// One of kube-proxy's ipsets: name, `ipset create` type and options, comment (used by its
/// iptables rules), members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpSet {
    pub name: &'static str,
    pub kind: &'static str,
    pub comment: &'static str,
    pub members: BTreeSet<String>,
}

impl IpSet {
    fn create_options(&self) -> &'static str {
        if self.kind == "bitmap:port" {
            "range 0-65535"
        } else {
            "family inet hashsize 1024 maxelem 65536"
        }
    }
}

/// kube-proxy's ipsets (`ipsetInfo`), in its order.
const IPSETS: &[(&str, &str, &str)] = &[
    (
        "KUBE-LOOP-BACK",
        "hash:ip,port,ip",
        "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose",
    ),
    (
        "KUBE-CLUSTER-IP",
        "hash:ip,port",
        "Kubernetes service cluster ip + port for masquerade purpose",
    ),
    (
        "KUBE-EXTERNAL-IP",
        "hash:ip,port",
        "Kubernetes service external ip + port for masquerade and filter purpose",
    ),
    (
        "KUBE-EXTERNAL-IP-LOCAL",
        "hash:ip,port",
        "Kubernetes service external ip + port with externalTrafficPolicy=local",
    ),
    (
        "KUBE-LOAD-BALANCER",
        "hash:ip,port",
        "Kubernetes service lb portal",
    ),
    (
        "KUBE-LOAD-BALANCER-FW",
        "hash:ip,port",
        "Kubernetes service load balancer ip + port for load balancer with sourceRange",
    ),
    (
        "KUBE-LOAD-BALANCER-LOCAL",
        "hash:ip,port",
        "Kubernetes service load balancer ip + port with externalTrafficPolicy=local",
    ),
    (
        "KUBE-LOAD-BALANCER-SOURCE-IP",
        "hash:ip,port,ip",
        "Kubernetes service load balancer ip + port + source IP for packet filter purpose",
    ),
    (
        "KUBE-LOAD-BALANCER-SOURCE-CIDR",
        "hash:ip,port,net",
        "Kubernetes service load balancer ip + port + source cidr for packet filter purpose",
    ),
    (
        "KUBE-NODE-PORT-TCP",
        "bitmap:port",
        "Kubernetes nodeport TCP port for masquerade purpose",
    ),
    (
        "KUBE-NODE-PORT-LOCAL-TCP",
        "bitmap:port",
        "Kubernetes nodeport TCP port with externalTrafficPolicy=local",
    ),
    (
        "KUBE-NODE-PORT-UDP",
        "bitmap:port",
        "Kubernetes nodeport UDP port for masquerade purpose",
    ),
    (
        "KUBE-NODE-PORT-LOCAL-UDP",
        "bitmap:port",
        "Kubernetes nodeport UDP port with externalTrafficPolicy=local",
    ),
    (
        "KUBE-NODE-PORT-SCTP-HASH",
        "hash:ip,port",
        "Kubernetes nodeport SCTP port for masquerade purpose",
    ),
    (
        "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
        "hash:ip,port",
        "Kubernetes nodeport SCTP port with externalTrafficPolicy=local",
    ),
    (
        "KUBE-HEALTH-CHECK-NODE-PORT",
        "bitmap:port",
        "Kubernetes health check node port",
    ),
    (
        "KUBE-IPVS-IPS",
        "hash:ip",
        "Addresses on the ipvs interface",
    ),
];

/// The ipsets kube-proxy's ipvs mode fills for `services`, keyed by name.
pub fn ipvs_ipsets(services: &[ServicePort]) -> BTreeMap<&'static str, IpSet> {
    let mut sets: BTreeMap<&'static str, IpSet> = IPSETS
        .iter()
        .map(|&(name, kind, comment)| {
            (
                name,
                IpSet {
                    name,
                    kind,
                    comment,
                    members: BTreeSet::new(),
                },
            )
        })
        .collect();
    let mut add = |set: &str, member: String| {
        if let Some(s) = sets.get_mut(set) {
            s.members.insert(member);
        }
    };
    for s in services {
        let proto = s.protocol.lower();
        add(
            "KUBE-CLUSTER-IP",
            format!("{},{proto}:{}", s.cluster_ip, s.port),
        );
        add("KUBE-IPVS-IPS", s.cluster_ip.to_string());
        for ep in s.endpoints.iter().filter(|e| e.local) {
            add(
                "KUBE-LOOP-BACK",
                format!("{},{proto}:{},{}", ep.ip, ep.port, ep.ip),
            );
        }
        if let Some(np) = s.node_port {
            let (all, local) = match s.protocol {
                Protocol::Tcp => ("KUBE-NODE-PORT-TCP", "KUBE-NODE-PORT-LOCAL-TCP"),
                Protocol::Udp => ("KUBE-NODE-PORT-UDP", "KUBE-NODE-PORT-LOCAL-UDP"),
            };
            add(all, np.to_string());
            if s.external_local {
                add(local, np.to_string());
            }
        }
    }
    sets
}

/// `ipset restore` input creating and filling the sets.
pub fn ipset_restore(sets: &BTreeMap<&'static str, IpSet>) -> String {
    let mut out = String::new();
    for &(name, ..) in IPSETS {
        let Some(set) = sets.get(name) else { continue };
        let _ = writeln!(
            out,
            "create {} {} {}",
            set.name,
            set.kind,
            set.create_options()
        );
        for m in &set.members {
            let _ = writeln!(out, "add {} {m}", set.name);
        }
    }
    out
}

// --- ipvs mode: iptables --------------------------------------------------------------------

/// kube-proxy's ipvs-mode IPv4 iptables rules for `services`, in the canonical form
/// `iptables-save` prints (filter and nat tables; the input of a full `iptables-restore`).
/// The jumps from the built-in chains are the ones kube-proxy inserts first in them.
pub fn ipvs_iptables(services: &[ServicePort], node: &NodeConfig) -> String {
    let sets = ipvs_ipsets(services);
    let nonempty = |name: &str| sets.get(name).is_some_and(|s| !s.members.is_empty());
    let comment = |name: &str| sets.get(name).map_or("", |s| s.comment);
    let mark = format!("0x{MASQ_MARK:x}/0x{MASQ_MARK:x}");

    let mut filter: Vec<String> = vec![
        r#"-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER"#.into(),
        r#"-A INPUT -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL"#.into(),
        r#"-A INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT"#.into(),
        r#"-A FORWARD -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL"#.into(),
        r#"-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD"#.into(),
        r#"-A OUTPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-OUT-FILTER"#.into(),
        format!(r#"-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark {mark} -j ACCEPT"#),
        r#"-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"#.into(),
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN".into(),
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN".into(),
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP dst,dst -j RETURN".into(),
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst -j RETURN".into(),
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN".into(),
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT --reject-with icmp-port-unreachable".into(),
        format!(
            r#"-A KUBE-NODE-PORT -m comment --comment "{}" -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT"#,
            comment("KUBE-HEALTH-CHECK-NODE-PORT")
        ),
    ];
    // ipset-driven filter rules (load balancer source ranges): only for non-empty sets.
    for set in [
        "KUBE-LOAD-BALANCER-SOURCE-CIDR",
        "KUBE-LOAD-BALANCER-SOURCE-IP",
    ] {
        if nonempty(set) {
            filter.push(format!(
                r#"-A KUBE-PROXY-FIREWALL -m comment --comment "{}" -m set --match-set {set} dst,dst,src -j KUBE-SOURCE-RANGES-FIREWALL"#,
                comment(set)
            ));
        }
    }
    filter.push("-A KUBE-SOURCE-RANGES-FIREWALL -j DROP".into());

    let mut nat: Vec<String> = vec![
        r#"-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#
            .into(),
        r#"-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#.into(),
        r#"-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING"#
            .into(),
        "-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ".into(),
        format!("-A KUBE-MARK-MASQ -j MARK --set-xmark {mark}"),
    ];
    // KUBE-NODE-PORT: the ipset rules, in kube-proxy's order (ipsetWithIptablesChain).
    for (set, proto, target) in [
        ("KUBE-NODE-PORT-LOCAL-TCP", "tcp", "RETURN"),
        ("KUBE-NODE-PORT-TCP", "tcp", "KUBE-MARK-MASQ"),
        ("KUBE-NODE-PORT-LOCAL-UDP", "udp", "RETURN"),
        ("KUBE-NODE-PORT-UDP", "udp", "KUBE-MARK-MASQ"),
    ] {
        if nonempty(set) {
            nat.push(format!(
                r#"-A KUBE-NODE-PORT -p {proto} -m comment --comment "{}" -m set --match-set {set} dst -j {target}"#,
                comment(set)
            ));
        }
    }
    if nonempty("KUBE-LOOP-BACK") {
        nat.push(format!(
            r#"-A KUBE-POSTROUTING -m comment --comment "{}" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE"#,
            comment("KUBE-LOOP-BACK")
        ));
    }
    nat.push(format!(
        "-A KUBE-POSTROUTING -m mark ! --mark {mark} -j RETURN"
    ));
    nat.push(format!(
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x{MASQ_MARK:x}/0x0"
    ));
    nat.push(r#"-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully"#.into());
    nat.push("-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN".into());
    if nonempty("KUBE-LOAD-BALANCER") {
        nat.push(format!(
            r#"-A KUBE-SERVICES -m comment --comment "{}" -m set --match-set KUBE-LOAD-BALANCER dst,dst -j KUBE-LOAD-BALANCER"#,
            comment("KUBE-LOAD-BALANCER")
        ));
    }
    if nonempty("KUBE-CLUSTER-IP") {
        nat.push(format!(
            r#"-A KUBE-SERVICES ! -s {} -m comment --comment "{}" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ"#,
            node.cluster_cidr,
            comment("KUBE-CLUSTER-IP")
        ));
    }
    nat.push("-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT".into());
    if nonempty("KUBE-CLUSTER-IP") {
        nat.push("-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT".into());
    }
    if nonempty("KUBE-LOAD-BALANCER") {
        nat.push("-A KUBE-SERVICES -m set --match-set KUBE-LOAD-BALANCER dst,dst -j ACCEPT".into());
    }

    let mut out = String::new();
    out.push_str(&save_table(
        "filter",
        &["INPUT", "FORWARD", "OUTPUT"],
        IPVS_FILTER_CHAINS,
        &filter,
    ));
    out.push_str(&save_table(
        "nat",
        &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
        &[
            "KUBE-LOAD-BALANCER",
            "KUBE-MARK-MASQ",
            "KUBE-NODE-PORT",
            "KUBE-POSTROUTING",
            "KUBE-SERVICES",
        ],
        &nat,
    ));
    out
}

/// The chains kube-proxy's ipvs mode declares in the filter table (IPv4 and IPv6 alike).
const IPVS_FILTER_CHAINS: &[&str] = &[
    "KUBE-FORWARD",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
    "KUBE-NODE-PORT",
    "KUBE-PROXY-FIREWALL",
    "KUBE-SOURCE-RANGES-FIREWALL",
];

/// kube-proxy's ipvs-mode IPv6 rules on a node without IPv6 Services (as captured).
pub fn ipvs_ip6tables() -> String {
    let mut out = save_table(
        "filter",
        &["INPUT", "FORWARD", "OUTPUT"],
        IPVS_FILTER_CHAINS,
        &[
            r#"-A INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT"#
                .into(),
            r#"-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD"#
                .into(),
        ],
    );
    out.push_str(&save_table(
        "nat",
        &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
        &[
            "KUBE-LOAD-BALANCER",
            "KUBE-MARK-MASQ",
            "KUBE-NODE-PORT",
            "KUBE-POSTROUTING",
            "KUBE-SERVICES",
        ],
        &[
            r#"-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#
                .into(),
            r#"-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#
                .into(),
            r#"-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING"#
                .into(),
        ],
    ));
    out
}

/// One table in `iptables-save` form: built-in chains (policy ACCEPT), user chains, rules.
fn save_table(table: &str, builtin: &[&str], chains: &[&str], rules: &[String]) -> String {
    let mut out = format!("*{table}\n");
    for c in builtin {
        let _ = writeln!(out, ":{c} ACCEPT [0:0]");
    }
    for c in chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    // iptables-save lists the built-in chains' rules first, then each user chain's.
    let chain_of = |r: &String| r.split_whitespace().nth(1).unwrap_or("").to_string();
    for c in builtin.iter().chain(chains) {
        for r in rules.iter().filter(|r| chain_of(r) == *c) {
            out.push_str(r);
            out.push('\n');
        }
    }
    out.push_str("COMMIT\n");
    out
}

// --- ipvs mode: IPVS and kube-ipvs0 ---------------------------------------------------------

/// One IPVS virtual service as kube-proxy's ipvs mode creates it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct VirtualService {
    pub protocol: Protocol,
    pub address: Ipv4Addr,
    pub port: u16,
    pub scheduler: &'static str,
    /// Persistence timeout (session affinity).
    pub persistent: Option<u32>,
    /// Real servers (all masquerading, weight 1).
    pub destinations: Vec<(Ipv4Addr, u16)>,
}

/// The IPVS virtual services for `services`: the ClusterIP of each service port, and its
/// NodePort on every NodePort address (destinations: the local endpoints only with
/// `externalTrafficPolicy: Local`).
pub fn ipvs_virtual_services(services: &[ServicePort], node: &NodeConfig) -> Vec<VirtualService> {
    let mut out = Vec::new();
    for s in services {
        let dests = |eps: Vec<&Endpoint>| -> Vec<(Ipv4Addr, u16)> {
            eps.iter().map(|e| (e.ip, e.port)).collect()
        };
        out.push(VirtualService {
            protocol: s.protocol,
            address: s.cluster_ip,
            port: s.port,
            scheduler: "rr",
            persistent: s.affinity_secs,
            destinations: dests(s.sorted_endpoints()),
        });
        if let Some(np) = s.node_port {
            for &a in &node.nodeport_addresses {
                out.push(VirtualService {
                    protocol: s.protocol,
                    address: a,
                    port: np,
                    scheduler: "rr",
                    persistent: s.affinity_secs,
                    destinations: dests(s.external_endpoints()),
                });
            }
        }
    }
    out.sort();
    out
}

/// `ipvsadm -R` input for `vss`.
pub fn ipvsadm_restore(vss: &[VirtualService]) -> String {
    let mut out = String::new();
    for vs in vss {
        let key = format!("{} {}:{}", vs.protocol.ipvsadm_flag(), vs.address, vs.port);
        let persist = vs
            .persistent
            .map_or(String::new(), |t| format!(" -p {t} -M 255.255.255.255"));
        let _ = writeln!(out, "-A {key} -s {}{persist}", vs.scheduler);
        for (ip, port) in &vs.destinations {
            let _ = writeln!(out, "-a {key} -r {ip}:{port} -m -w 1");
        }
    }
    out
}

/// The addresses kube-proxy binds on `kube-ipvs0`: every ClusterIP.
pub fn kube_ipvs0_addresses(services: &[ServicePort]) -> BTreeSet<Ipv4Addr> {
    services.iter().map(|s| s.cluster_ip).collect()
}

// --- nftables mode --------------------------------------------------------------------------

/// What kube-proxy's nftables mode writes for a set of service ports, before rendering: the
/// elements of its sets and maps, its affinity sets and its per-service chains.
#[derive(Default)]
struct NftParts {
    hairpin: BTreeSet<String>,
    cluster_ips: BTreeSet<Ipv4Addr>,
    no_endpoint_services: Vec<String>,
    no_endpoint_nodeports: Vec<String>,
    service_ips: Vec<String>,
    service_nodeports: Vec<String>,
    /// (name, timeout seconds)
    affinity_sets: Vec<(String, u32)>,
    chains: Vec<(String, Vec<String>)>,
}

fn nft_parts(services: &[ServicePort], node: &NodeConfig) -> NftParts {
    let mut p = NftParts::default();
    let masq = format!("meta mark set meta mark | 0x{MASQ_MARK:08x}");
    let mut sorted: Vec<&ServicePort> = services.iter().collect();
    sorted.sort_by_key(|s| (s.cluster_ip, s.protocol, s.port));
    for s in sorted {
        let proto = s.protocol.lower();
        let base = s.chain_base();
        let cluster_chain = format!("service-{base}");
        p.cluster_ips.insert(s.cluster_ip);
        for ep in s.local_endpoints() {
            p.hairpin
                .insert(format!("{} . {} . {proto} . {}", ep.ip, ep.ip, ep.port));
        }
        let eps = s.sorted_endpoints();
        if eps.is_empty() {
            p.no_endpoint_services.push(format!(
                "{} . {proto} . {} comment \"{}\" : goto reject-chain",
                s.cluster_ip,
                s.port,
                s.display_name()
            ));
            if let Some(np) = s.node_port {
                p.no_endpoint_nodeports.push(format!(
                    "{proto} . {np} comment \"{}\" : goto reject-chain",
                    s.display_name()
                ));
            }
            continue;
        }
        p.service_ips.push(format!(
            "{} . {proto} . {} : goto {cluster_chain}",
            s.cluster_ip, s.port
        ));
        let rules = balance(s, &eps, &mut p.affinity_sets);
        p.chains.push((cluster_chain.clone(), rules));
        if let Some(np) = s.node_port {
            let external_chain = format!("external-{base}");
            p.service_nodeports
                .push(format!("{proto} . {np} : goto {external_chain}"));
            if s.external_local {
                let local_chain = format!("local-{base}");
                let locals = s.local_endpoints();
                p.chains
                    .push((local_chain.clone(), vec![dnat_numgen(s, &locals)]));
                p.chains.push((
                    external_chain,
                    vec![
                        format!(
                            "ip saddr {} goto {cluster_chain} comment \"short-circuit pod traffic\"",
                            node.cluster_cidr
                        ),
                        format!("fib saddr type local {masq} comment \"masquerade local traffic\""),
                        format!(
                            "fib saddr type local goto {cluster_chain} comment \"short-circuit local traffic\""
                        ),
                        format!("goto {local_chain}"),
                    ],
                ));
            } else {
                p.chains.push((
                    external_chain,
                    vec![
                        format!("{masq} comment \"masquerade\""),
                        format!("goto {cluster_chain}"),
                    ],
                ));
            }
        }
        if s.affinity_secs.is_some() {
            for ep in &eps {
                let ep_base = s.endpoint_chain_base(ep);
                p.chains.push((
                    format!("endpoint-{ep_base}"),
                    vec![
                        format!("update @affinity-{ep_base} {{ ip saddr }}"),
                        format!("meta l4proto {proto} dnat to {}:{}", ep.ip, ep.port),
                    ],
                ));
            }
        }
    }
    p
}

fn affinity_set_body(secs: u32) -> String {
    format!(
        "type ipv4_addr\n\t\tsize 65535\n\t\tflags dynamic,timeout\n\t\ttimeout {}",
        nft_duration(secs)
    )
}

/// kube-proxy's nftables-mode ruleset for `services` (`ip kube-proxy` and `ip6 kube-proxy`), in
/// the form `nft list ruleset` prints; `nft -f` loads it.
pub fn nftables_ruleset(services: &[ServicePort], node: &NodeConfig) -> String {
    let p = nft_parts(services, node);
    let mut t = String::new();
    t.push_str("table ip kube-proxy {\n\tcomment \"rules for kube-proxy\"\n");
    let set =
        |t: &mut String, kind: &str, name: &str, ty: &str, comment: &str, elements: Vec<String>| {
            let _ = write!(
                t,
                "\t{kind} {name} {{\n\t\ttype {ty}\n\t\tcomment \"{comment}\"\n"
            );
            if !elements.is_empty() {
                let _ = writeln!(t, "\t\telements = {{ {} }}", elements.join(", "));
            }
            t.push_str("\t}\n\n");
        };
    set(
        &mut t,
        "set",
        "hairpin-connections",
        "ipv4_addr . ipv4_addr . inet_proto . inet_service",
        "service hairpin connections",
        p.hairpin.into_iter().collect(),
    );
    set(
        &mut t,
        "set",
        "cluster-ips",
        "ipv4_addr",
        "Active ClusterIPs",
        p.cluster_ips.iter().map(|a| a.to_string()).collect(),
    );
    set(
        &mut t,
        "set",
        "nodeport-ips",
        "ipv4_addr",
        "IPs that accept NodePort traffic",
        node.nodeport_addresses
            .iter()
            .map(|a| a.to_string())
            .collect(),
    );
    set(
        &mut t,
        "map",
        "no-endpoint-services",
        "ipv4_addr . inet_proto . inet_service : verdict",
        "vmap to drop or reject packets to services with no endpoints",
        p.no_endpoint_services,
    );
    set(
        &mut t,
        "map",
        "no-endpoint-nodeports",
        "inet_proto . inet_service : verdict",
        "vmap to drop or reject packets to service nodeports with no endpoints",
        p.no_endpoint_nodeports,
    );
    set(
        &mut t,
        "map",
        "firewall-ips",
        "ipv4_addr . inet_proto . inet_service : verdict",
        "destinations that are subject to LoadBalancerSourceRanges",
        Vec::new(),
    );
    set(
        &mut t,
        "map",
        "service-ips",
        "ipv4_addr . inet_proto . inet_service : verdict",
        "ClusterIP, ExternalIP and LoadBalancer IP traffic",
        p.service_ips,
    );
    set(
        &mut t,
        "map",
        "service-nodeports",
        "inet_proto . inet_service : verdict",
        "NodePort traffic",
        p.service_nodeports,
    );
    for (name, secs) in &p.affinity_sets {
        let _ = write!(
            t,
            "\tset {name} {{\n\t\t{}\n\t}}\n\n",
            affinity_set_body(*secs)
        );
    }
    let mut all_chains = base_chains(Some(node));
    all_chains.extend(p.chains);
    write_chains(&mut t, &all_chains);
    t.push_str("}\n");
    t.push_str(&nftables_ip6_table());
    t
}

/// What a partial sync of kube-proxy's nftables mode sends when `added` service ports appear
/// (one `nft -f` transaction): their chains and rules, and their elements in the sets and
/// maps. The table must exist ([`nftables_ruleset`]).
pub fn nftables_add_services(added: &[ServicePort], node: &NodeConfig) -> String {
    let p = nft_parts(added, node);
    let mut t = String::new();
    let tbl = "ip kube-proxy";
    for (name, secs) in &p.affinity_sets {
        let _ = writeln!(
            t,
            "add set {tbl} {name} {{ {} ; }}",
            affinity_set_body(*secs).replace("\n\t\t", " ; ")
        );
    }
    for (name, _) in &p.chains {
        let _ = writeln!(t, "add chain {tbl} {name}");
    }
    for (name, rules) in &p.chains {
        for r in rules {
            let _ = writeln!(t, "add rule {tbl} {name} {r}");
        }
    }
    let elements = |t: &mut String, set: &str, items: Vec<String>| {
        if !items.is_empty() {
            let _ = writeln!(t, "add element {tbl} {set} {{ {} }}", items.join(", "));
        }
    };
    elements(
        &mut t,
        "cluster-ips",
        p.cluster_ips.iter().map(|a| a.to_string()).collect(),
    );
    elements(
        &mut t,
        "hairpin-connections",
        p.hairpin.into_iter().collect(),
    );
    elements(&mut t, "no-endpoint-services", p.no_endpoint_services);
    elements(&mut t, "no-endpoint-nodeports", p.no_endpoint_nodeports);
    elements(&mut t, "service-ips", p.service_ips);
    elements(&mut t, "service-nodeports", p.service_nodeports);
    t
}

/// nft's rendering of a timeout in seconds (`3h`, `1h30m`, `10s`).
fn nft_duration(secs: u32) -> String {
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        let _ = write!(out, "{h}h");
    }
    if m > 0 {
        let _ = write!(out, "{m}m");
    }
    if s > 0 || out.is_empty() {
        let _ = write!(out, "{s}s");
    }
    out
}

/// The rules of a service's cluster-policy chain: DNAT to a random endpoint, or with session
/// affinity, the affinity lookups and a random jump to an endpoint chain.
fn balance(
    s: &ServicePort,
    eps: &[&Endpoint],
    affinity_sets: &mut Vec<(String, u32)>,
) -> Vec<String> {
    let Some(secs) = s.affinity_secs else {
        return vec![dnat_numgen(s, eps)];
    };
    let endpoint_chains: Vec<String> = eps
        .iter()
        .map(|ep| format!("endpoint-{}", s.endpoint_chain_base(ep)))
        .collect();
    let mut rules = Vec::new();
    for (ep, chain) in eps.iter().zip(endpoint_chains.iter()) {
        let set = format!("affinity-{}", s.endpoint_chain_base(ep));
        rules.push(format!("ip saddr @{set} goto {chain}"));
        affinity_sets.push((set, secs));
    }
    let vmap: Vec<String> = endpoint_chains
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{i} : goto {c}"))
        .collect();
    rules.push(format!(
        "numgen random mod {} vmap {{ {} }}",
        eps.len(),
        vmap.join(", ")
    ));
    rules
}

fn dnat_numgen(s: &ServicePort, eps: &[&Endpoint]) -> String {
    let map: Vec<String> = eps
        .iter()
        .enumerate()
        .map(|(i, e)| format!("{i} : {} . {}", e.ip, e.port))
        .collect();
    format!(
        "meta l4proto {} dnat ip to numgen random mod {} map {{ {} }}",
        s.protocol.lower(),
        eps.len(),
        map.join(", ")
    )
}

/// The chains every kube-proxy table has (IPv4 with `node`, IPv6 without).
fn base_chains(node: Option<&NodeConfig>) -> Vec<(String, Vec<String>)> {
    let v4 = node.is_some();
    let ip = if v4 { "ip" } else { "ip6" };
    let c = |name: &str, rules: &[&str]| -> (String, Vec<String>) {
        (
            name.to_string(),
            rules.iter().map(|r| r.to_string()).collect(),
        )
    };
    let mut v = vec![
        c(
            "filter-prerouting-pre-dnat",
            &[
                "type filter hook prerouting priority dstnat - 10; policy accept;",
                "ct state new jump firewall-check",
            ],
        ),
        c(
            "filter-output-pre-dnat",
            &[
                "type filter hook output priority -110; policy accept;",
                "ct state new jump firewall-check",
            ],
        ),
        c(
            "filter-input",
            &[
                "type filter hook input priority filter; policy accept;",
                "ct state new jump nodeport-endpoints-check",
                "ct state new jump service-endpoints-check",
            ],
        ),
        c(
            "filter-forward",
            &[
                "type filter hook forward priority filter; policy accept;",
                "ct state new jump service-endpoints-check",
                "ct state new jump cluster-ips-check",
            ],
        ),
        c(
            "filter-output",
            &[
                "type filter hook output priority filter; policy accept;",
                "ct state new jump service-endpoints-check",
                "ct state new jump cluster-ips-check",
            ],
        ),
        c(
            "nat-prerouting",
            &[
                "type nat hook prerouting priority dstnat; policy accept;",
                "jump services",
            ],
        ),
        c(
            "nat-output",
            &[
                "type nat hook output priority -100; policy accept;",
                "jump services",
            ],
        ),
        c(
            "nat-postrouting",
            &[
                "type nat hook postrouting priority srcnat; policy accept;",
                "jump masquerading",
            ],
        ),
    ];
    let mark = format!("0x{MASQ_MARK:08x}");
    match node {
        Some(n) => {
            v.push((
                "nodeport-endpoints-check".into(),
                vec![
                    "ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"
                        .into(),
                ],
            ));
            v.push(c(
                "service-endpoints-check",
                &["ip daddr . meta l4proto . th dport vmap @no-endpoint-services"],
            ));
            v.push(c(
                "firewall-check",
                &["ip daddr . meta l4proto . th dport vmap @firewall-ips"],
            ));
            v.push((
                "services".into(),
                vec![
                    format!("ip daddr @cluster-ips ip saddr != {} meta mark set meta mark | {mark} comment \"masquerade clusterIP traffic from outside cluster\"", n.cluster_cidr),
                    "ip daddr . meta l4proto . th dport vmap @service-ips".into(),
                    "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports".into(),
                ],
            ));
        }
        None => {
            v.push(c(
                "nodeport-endpoints-check",
                &["ip6 daddr != ::1 meta l4proto . th dport vmap @no-endpoint-nodeports"],
            ));
            v.push(c(
                "service-endpoints-check",
                &["ip6 daddr . meta l4proto . th dport vmap @no-endpoint-services"],
            ));
            v.push(c(
                "firewall-check",
                &["ip6 daddr . meta l4proto . th dport vmap @firewall-ips"],
            ));
            v.push(c(
                "services",
                &[
                    "ip6 daddr . meta l4proto . th dport vmap @service-ips",
                    "fib daddr type local ip6 daddr != ::1 meta l4proto . th dport vmap @service-nodeports",
                ],
            ));
        }
    }
    v.push((
        "masquerading".into(),
        vec![
            format!("meta mark & {mark} != 0x00000000 meta mark set meta mark ^ {mark} masquerade fully-random"),
            format!("ct status dnat {ip} saddr . {ip} daddr . meta l4proto . th dport @hairpin-connections masquerade fully-random"),
        ],
    ));
    let mut check = vec![format!(
        "{ip} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""
    )];
    if let Some(n) = node {
        check.push(format!(
            "ip daddr {} drop comment \"Drop traffic to unallocated ClusterIPs\"",
            n.service_cidr
        ));
    }
    v.push(("cluster-ips-check".into(), check));
    v.push(c(
        "reject-chain",
        &[
            "comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\"",
            "reject",
        ],
    ));
    v
}

fn write_chains(t: &mut String, chains: &[(String, Vec<String>)]) {
    let last = chains.len().saturating_sub(1);
    for (i, (name, rules)) in chains.iter().enumerate() {
        let _ = writeln!(t, "\tchain {name} {{");
        for r in rules {
            let _ = writeln!(t, "\t\t{r}");
        }
        t.push_str("\t}\n");
        if i != last {
            t.push('\n');
        }
    }
}

/// kube-proxy's `ip6 kube-proxy` table on a node without IPv6 Services.
fn nftables_ip6_table() -> String {
    let mut t = String::from("table ip6 kube-proxy {\n\tcomment \"rules for kube-proxy\"\n");
    for (kind, name, ty, comment) in [
        (
            "set",
            "hairpin-connections",
            "ipv6_addr . ipv6_addr . inet_proto . inet_service",
            "service hairpin connections",
        ),
        ("set", "cluster-ips", "ipv6_addr", "Active ClusterIPs"),
        (
            "map",
            "no-endpoint-services",
            "ipv6_addr . inet_proto . inet_service : verdict",
            "vmap to drop or reject packets to services with no endpoints",
        ),
        (
            "map",
            "no-endpoint-nodeports",
            "inet_proto . inet_service : verdict",
            "vmap to drop or reject packets to service nodeports with no endpoints",
        ),
        (
            "map",
            "firewall-ips",
            "ipv6_addr . inet_proto . inet_service : verdict",
            "destinations that are subject to LoadBalancerSourceRanges",
        ),
        (
            "map",
            "service-ips",
            "ipv6_addr . inet_proto . inet_service : verdict",
            "ClusterIP, ExternalIP and LoadBalancer IP traffic",
        ),
        (
            "map",
            "service-nodeports",
            "inet_proto . inet_service : verdict",
            "NodePort traffic",
        ),
    ] {
        let _ = write!(
            t,
            "\t{kind} {name} {{\n\t\ttype {ty}\n\t\tcomment \"{comment}\"\n\t}}\n\n"
        );
    }
    write_chains(&mut t, &base_chains(None));
    t.push_str("}\n");
    t
}

// --- applying them in a namespace -----------------------------------------------------------

/// Feeds `input` to `cmd` (e.g. `iptables-restore`) inside `ns`, through a file.
fn restore(ns: &Netns, cmd: &str, input: &str) -> Result<()> {
    let path = format!(
        "/tmp/kube-proxy-{}-{}.in",
        ns.name(),
        cmd.split_whitespace().next().unwrap_or("input")
    );
    std::fs::write(&path, input).with_context(|| format!("write {path}"))?;
    let r = ns.try_sh(&format!("{cmd} < {path}"));
    let _ = std::fs::remove_file(&path);
    r.map(|_| ())
        .with_context(|| format!("{cmd} in {}", ns.name()))
}

/// Programs kube-proxy's ipvs mode for `services` in `ns`, as kube-proxy does on a node: its
/// sysctls, ipsets, iptables rules (IPv4 and IPv6; the filter and nat tables are replaced, so
/// add the node's own firewall rules afterwards), IPVS virtual services and `kube-ipvs0`
/// addresses. The kernel-wide conntrack limits are [`ConntrackGlobals::apply_kube_proxy`]'s.
pub fn apply_ipvs_mode(ns: &Netns, services: &[ServicePort], node: &NodeConfig) -> Result<()> {
    apply_sysctls(ns, &ipvs_mode_sysctls())?;
    restore(ns, "ipset restore", &ipset_restore(&ipvs_ipsets(services)))?;
    restore(ns, "iptables-restore", &ipvs_iptables(services, node))?;
    restore(ns, "ip6tables-restore", &ipvs_ip6tables())?;
    restore(
        ns,
        "ipvsadm -R",
        &ipvsadm_restore(&ipvs_virtual_services(services, node)),
    )?;
    add_kube_ipvs0(ns, &kube_ipvs0_addresses(services))
}

/// kube-proxy's ipvs mode starting on a node whose IPVS services and `kube-ipvs0` addresses are
/// already the ones it wants (a rollback from the agent, which programs them identically): its
/// sysctls, its ipsets, and its chains with `iptables-restore --noflush` (the node's other rules,
/// the agent's among them, stay; its jumps are appended); IPVS and `kube-ipvs0` are adopted as
/// they are. [`add_ipvs_mode_services`] with no new Service is its next sync.
pub fn start_ipvs_mode_on_programmed_ipvs(
    ns: &Netns,
    services: &[ServicePort],
    node: &NodeConfig,
) -> Result<()> {
    apply_sysctls(ns, &ipvs_mode_sysctls())?;
    restore(
        ns,
        "ipset restore -exist",
        &ipset_restore(&ipvs_ipsets(services)),
    )?;
    restore(
        ns,
        "iptables-restore --noflush",
        &ipvs_iptables(services, node),
    )?;
    restore(ns, "ip6tables-restore --noflush", &ipvs_ip6tables())
}

/// Adds more Services to a node already in ipvs mode (what kube-proxy's next sync does):
/// `all` is every Service now present, `added` the new ones.
pub fn add_ipvs_mode_services(
    ns: &Netns,
    all: &[ServicePort],
    added: &[ServicePort],
    node: &NodeConfig,
) -> Result<()> {
    // ipsets: add the new members (`-exist`: the sets exist already).
    let sets = ipvs_ipsets(added);
    let mut input = String::new();
    for set in sets.values() {
        for m in &set.members {
            let _ = writeln!(input, "add {} {m}", set.name);
        }
    }
    restore(ns, "ipset restore -exist", &input)?;
    // iptables: kube-proxy rewrites its chains on every sync (`--noflush` keeps the node's
    // own rules; its chains are flushed by being declared).
    let rules = ipvs_iptables(all, node);
    let noflush: String = rules
        .lines()
        .filter(|l| {
            !(l.starts_with("-A INPUT")
                || l.starts_with("-A FORWARD")
                || l.starts_with("-A OUTPUT")
                || l.starts_with("-A PREROUTING")
                || l.starts_with("-A POSTROUTING")
                || (l.starts_with(':') && l.contains(" ACCEPT ")))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    restore(ns, "iptables-restore --noflush", &noflush)?;
    restore(
        ns,
        "ipvsadm -R",
        &ipvsadm_restore(&ipvs_virtual_services(added, node)),
    )?;
    add_kube_ipvs0(ns, &kube_ipvs0_addresses(added))
}

fn add_kube_ipvs0(ns: &Netns, addrs: &BTreeSet<Ipv4Addr>) -> Result<()> {
    if ns.try_sh("ip link show kube-ipvs0").is_err() {
        ns.try_sh("ip link add kube-ipvs0 type dummy")?;
    }
    let batch: String = addrs
        .iter()
        .map(|a| format!("address add {a}/32 dev kube-ipvs0\n"))
        .collect();
    restore(ns, "ip -batch -", &batch)
}

/// Removes what [`apply_ipvs_mode`] made: IPVS services, kube-proxy's chains (filter and nat
/// flushed), ipsets, kube-ipvs0. The sysctls are per namespace and go with it.
pub fn teardown_ipvs_mode(ns: &Netns) -> Result<()> {
    ns.try_sh("ipvsadm -C")?;
    for ipt in ["iptables", "ip6tables"] {
        ns.try_sh(&format!(
            "{ipt} -t nat -F && {ipt} -t nat -X && {ipt} -t filter -F && {ipt} -t filter -X"
        ))?;
    }
    ns.try_sh("ipset destroy")?;
    let _ = ns.try_sh("ip link del kube-ipvs0");
    Ok(())
}

/// Programs kube-proxy's nftables mode for `services` in `ns`: its sysctls and its two tables
/// (replacing them when they exist, as its full syncs do).
pub fn apply_nftables_mode(ns: &Netns, services: &[ServicePort], node: &NodeConfig) -> Result<()> {
    apply_sysctls(ns, &nftables_mode_sysctls())?;
    let _ = teardown_nftables_mode(ns);
    restore(ns, "nft -f -", &nftables_ruleset(services, node))
}

/// Adds service ports to a node in nftables mode as kube-proxy's partial syncs do: one `nft`
/// transaction per `batch` service ports.
pub fn add_nftables_mode_services(
    ns: &Netns,
    added: &[ServicePort],
    node: &NodeConfig,
    batch: usize,
) -> Result<()> {
    for chunk in added.chunks(batch.max(1)) {
        restore(ns, "nft -f -", &nftables_add_services(chunk, node))?;
    }
    Ok(())
}

/// Deletes kube-proxy's nft tables.
pub fn teardown_nftables_mode(ns: &Netns) -> Result<()> {
    ns.try_sh("nft delete table ip kube-proxy; nft delete table ip6 kube-proxy; true")
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    const IPTABLES: &str = include_str!("../fixtures/kube-proxy-v1.36/iptables-nft-save.txt");
    const IPSET: &str = include_str!("../fixtures/kube-proxy-v1.36/ipset.txt");
    const IPVSADM: &str = include_str!("../fixtures/kube-proxy-v1.36/ipvsadm.txt");
    const KUBE_IPVS0: &str = include_str!("../fixtures/kube-proxy-v1.36/kube-ipvs0.txt");
    const NFT: &str = include_str!("../fixtures/kube-proxy-v1.36/nft-ruleset.txt");

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// The Services and EndpointSlices the reference kube-proxy ran with (k8s-objects.txt):
    /// backends 10.244.1.2 (on this node) and 10.244.2.2.
    fn reference_services() -> Vec<ServicePort> {
        let eps = vec![
            Endpoint {
                ip: ip("10.244.1.2"),
                port: 8080,
                local: true,
            },
            Endpoint {
                ip: ip("10.244.2.2"),
                port: 8080,
                local: false,
            },
        ];
        let svc = |name: &str, cip: &str| ServicePort {
            namespace: "kp".into(),
            name: name.into(),
            port_name: "http".into(),
            protocol: Protocol::Tcp,
            cluster_ip: ip(cip),
            port: 80,
            node_port: None,
            external_local: false,
            affinity_secs: None,
            endpoints: eps.clone(),
        };
        vec![
            ServicePort {
                namespace: "default".into(),
                name: "kubernetes".into(),
                port_name: "https".into(),
                port: 443,
                endpoints: vec![],
                ..svc("kubernetes", "10.96.0.1")
            },
            svc("svc-cip", "10.96.10.10"),
            ServicePort {
                node_port: Some(30080),
                ..svc("svc-np", "10.96.10.11")
            },
            ServicePort {
                node_port: Some(30081),
                external_local: true,
                ..svc("svc-local", "10.96.10.12")
            },
            ServicePort {
                affinity_secs: Some(10800),
                ..svc("svc-aff", "10.96.10.13")
            },
        ]
    }

    fn reference_node(nodeports: &[&str]) -> NodeConfig {
        NodeConfig {
            cluster_cidr: "10.244.0.0/16".into(),
            service_cidr: "10.96.0.0/16".into(),
            nodeport_addresses: nodeports.iter().map(|a| ip(a)).collect(),
        }
    }

    /// `iptables-save -c` output without counters, comments and blank lines.
    fn normalize_save(text: &str) -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let l = if l.starts_with('[') {
                    l.split_once("] ").map_or(l, |(_, r)| r)
                } else {
                    l
                };
                l.trim_end().to_string()
            })
            .collect()
    }

    #[test]
    fn chain_name_hashes_match_kube_proxy() {
        assert_eq!(
            hash_and_truncate("kp/svc-cip/tcp/http"),
            "UPLUPGIQ-kp/svc-cip/tcp/http"
        );
        assert_eq!(
            hash_and_truncate("kp/svc-aff/tcp/http__10.244.1.2/8080"),
            "HOIW4NI5-kp/svc-aff/tcp/http__10.244.1.2/8080"
        );
        assert_eq!(base32(b"f"), "MY");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
    }

    #[test]
    fn ipvs_mode_iptables_are_the_reference() {
        let (v4, v6) = IPTABLES
            .split_once("# ip6tables-nft-save -c")
            .expect("two halves");
        let node = reference_node(&["10.0.2.15", "10.10.1.1", "10.10.3.1", "10.244.1.1"]);
        let ours = ipvs_iptables(&reference_services(), &node);
        assert_eq!(normalize_save(&ours), normalize_save(v4));
        assert_eq!(normalize_save(&ipvs_ip6tables()), normalize_save(v6));
    }

    #[test]
    fn ipvs_mode_ipsets_are_the_reference() {
        // Parse `ipset list`: name, type, header, members.
        let mut want: BTreeMap<String, (String, String, BTreeSet<String>)> = BTreeMap::new();
        for block in IPSET.split("\n\n") {
            let mut name = String::new();
            let (mut ty, mut header) = (String::new(), String::new());
            let mut members = BTreeSet::new();
            let mut in_members = false;
            for l in block.lines() {
                if let Some(v) = l.strip_prefix("Name: ") {
                    name = v.into();
                } else if let Some(v) = l.strip_prefix("Type: ") {
                    ty = v.into();
                } else if let Some(v) = l.strip_prefix("Header: ") {
                    header = v.into();
                } else if l == "Members:" {
                    in_members = true;
                } else if in_members && !l.is_empty() {
                    members.insert(l.to_string());
                }
            }
            if !name.is_empty() {
                want.insert(name, (ty, header, members));
            }
        }
        let ours = ipvs_ipsets(&reference_services());
        assert_eq!(
            ours.keys().map(|k| k.to_string()).collect::<BTreeSet<_>>(),
            want.keys().cloned().collect::<BTreeSet<_>>()
        );
        for (name, set) in &ours {
            let (ty, header, members) = &want[*name];
            assert_eq!(set.kind, ty, "{name}");
            assert!(header.starts_with(set.create_options()), "{name}: {header}");
            assert_eq!(&set.members, members, "{name}");
        }
        let restore = ipset_restore(&ours);
        assert!(restore.contains("create KUBE-NODE-PORT-TCP bitmap:port range 0-65535\n"));
        assert!(restore.contains("add KUBE-LOOP-BACK 10.244.1.2,tcp:8080,10.244.1.2\n"));
    }

    #[test]
    fn ipvs_mode_virtual_services_and_addresses_are_the_reference() {
        // Parse the first listing of `ipvsadm -Ln`.
        let listing = IPVSADM.split("\n\n").next().unwrap();
        let mut want: Vec<VirtualService> = Vec::new();
        for l in listing.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.first() == Some(&"TCP") {
                let (a, p) = f[1].rsplit_once(':').unwrap();
                want.push(VirtualService {
                    protocol: Protocol::Tcp,
                    address: ip(a),
                    port: p.parse().unwrap(),
                    scheduler: "rr",
                    persistent: (f.get(3) == Some(&"persistent")).then(|| f[4].parse().unwrap()),
                    destinations: vec![],
                });
            } else if f.first() == Some(&"->") && f[1] != "RemoteAddress:Port" {
                let (a, p) = f[1].rsplit_once(':').unwrap();
                assert_eq!(f[2], "Masq");
                assert_eq!(f[3], "1");
                want.last_mut()
                    .unwrap()
                    .destinations
                    .push((ip(a), p.parse().unwrap()));
            }
        }
        want.sort();
        let node = reference_node(&["10.0.2.15", "10.10.1.1", "10.10.3.1", "10.244.1.1"]);
        assert_eq!(ipvs_virtual_services(&reference_services(), &node), want);
        let restore = ipvsadm_restore(&want);
        assert!(restore.contains("-A -t 10.96.10.13:80 -s rr -p 10800 -M 255.255.255.255\n"));
        assert!(restore.contains("-a -t 10.96.10.10:80 -r 10.244.2.2:8080 -m -w 1\n"));

        let bound: BTreeSet<Ipv4Addr> = KUBE_IPVS0
            .lines()
            .filter_map(|l| l.trim().strip_prefix("inet "))
            .map(|l| ip(l.split('/').next().unwrap()))
            .collect();
        assert_eq!(kube_ipvs0_addresses(&reference_services()), bound);
    }

    /// `nft list ruleset` text → block header → normalized lines (element lists joined and
    /// sorted).
    fn normalize_nft(text: &str) -> BTreeMap<String, Vec<String>> {
        let mut lines: Vec<String> = Vec::new();
        let mut pending: Option<String> = None;
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let t = l.trim();
            if let Some(p) = pending.as_mut() {
                p.push(' ');
                p.push_str(t);
                if t.ends_with('}') {
                    lines.push(pending.take().unwrap());
                }
                continue;
            }
            if t.starts_with("elements = {") && !t.ends_with('}') {
                pending = Some(t.to_string());
                continue;
            }
            if !t.is_empty() {
                lines.push(t.to_string());
            }
        }
        let mut blocks = BTreeMap::new();
        let (mut table, mut header) = (String::new(), String::new());
        let mut body = Vec::new();
        for l in lines {
            if l.starts_with("table ") {
                table = l.trim_end_matches(" {").to_string();
                header = table.clone();
            } else if (l.starts_with("set ") || l.starts_with("map ") || l.starts_with("chain "))
                && l.ends_with('{')
            {
                blocks.insert(header.clone(), std::mem::take(&mut body));
                header = format!("{table} {}", l.trim_end_matches(" {"));
            } else if l == "}" {
                if !body.is_empty() || !header.is_empty() {
                    blocks.insert(header.clone(), std::mem::take(&mut body));
                }
                header = table.clone();
            } else if let Some(e) = l.strip_prefix("elements = { ") {
                let mut v: Vec<String> = e
                    .trim_end_matches(" }")
                    .split(',')
                    .map(|x| x.split_whitespace().collect::<Vec<_>>().join(" "))
                    .collect();
                v.sort();
                body.push(format!("elements = {v:?}"));
            } else {
                body.push(l);
            }
        }
        blocks.retain(|k, v| !(k.is_empty() && v.is_empty()));
        blocks
    }

    #[test]
    fn nftables_mode_ruleset_is_the_reference() {
        let node = reference_node(&["10.10.1.1"]);
        let ours = normalize_nft(&nftables_ruleset(&reference_services(), &node));
        let want = normalize_nft(NFT);
        assert_eq!(want.len(), 58, "{:#?}", want.keys().collect::<Vec<_>>());
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (k, v) in &want {
            assert_eq!(&ours[k], v, "{k}");
        }
    }

    #[test]
    fn udp_node_ports_get_their_own_sets_and_rules() {
        let svc = ServicePort {
            node_port: Some(30053),
            ..ServicePort::cluster_ip(
                "bench",
                "web",
                "dns",
                Protocol::Udp,
                ip("10.96.0.10"),
                53,
                &[(ip("10.244.2.2"), 5353)],
            )
        };
        let node = reference_node(&["10.0.1.1"]);
        let sets = ipvs_ipsets(std::slice::from_ref(&svc));
        assert!(sets["KUBE-NODE-PORT-UDP"].members.contains("30053"));
        assert!(
            sets["KUBE-CLUSTER-IP"]
                .members
                .contains("10.96.0.10,udp:53")
        );
        let rules = ipvs_iptables(std::slice::from_ref(&svc), &node);
        assert!(rules.contains(
            "-A KUBE-NODE-PORT -p udp -m comment --comment \"Kubernetes nodeport UDP port for masquerade purpose\" -m set --match-set KUBE-NODE-PORT-UDP dst -j KUBE-MARK-MASQ\n"
        ));
        assert!(!rules.contains("KUBE-LOOP-BACK dst,dst,src"));
        let vss = ipvs_virtual_services(std::slice::from_ref(&svc), &node);
        assert_eq!(vss.len(), 2);
        assert!(ipvsadm_restore(&vss).contains("-A -u 10.0.1.1:30053 -s rr\n"));
        let nft = nftables_ruleset(std::slice::from_ref(&svc), &node);
        assert!(nft.contains(
            "meta l4proto udp dnat ip to numgen random mod 1 map { 0 : 10.244.2.2 . 5353 }"
        ));
        assert!(nft.contains("udp . 30053 : goto external-"));
    }

    #[test]
    fn a_partial_sync_adds_the_same_chains_and_elements() {
        let node = reference_node(&["10.10.1.1"]);
        let all = reference_services();
        let full = nftables_ruleset(&all, &node);
        let add = nftables_add_services(&all[1..], &node);
        // Every per-service chain of the full ruleset is created, with the same rules.
        for (name, rules) in &nft_parts(&all[1..], &node).chains {
            assert!(full.contains(&format!("\tchain {name} {{")), "{name}");
            assert!(
                add.contains(&format!("add chain ip kube-proxy {name}\n")),
                "{name}"
            );
            for r in rules {
                assert!(full.contains(r.as_str()), "{r}");
                assert!(
                    add.contains(&format!("add rule ip kube-proxy {name} {r}\n")),
                    "{r}"
                );
            }
        }
        assert!(add.contains(
            "add element ip kube-proxy service-ips { 10.96.10.10 . tcp . 80 : goto service-UPLUPGIQ-kp/svc-cip/tcp/http,"
        ));
        assert!(add.contains("add set ip kube-proxy affinity-HOIW4NI5-kp/svc-aff/tcp/http__10.244.1.2/8080 { type ipv4_addr ; size 65535 ; flags dynamic,timeout ; timeout 3h ; }"));
        assert!(!add.contains("kubernetes"), "only the added services");
    }

    #[test]
    fn conntrack_max_follows_kube_proxy_defaults() {
        assert_eq!(conntrack_max(1), 131_072);
        assert_eq!(conntrack_max(8), 262_144);
        assert_eq!(nft_duration(10800), "3h");
        assert_eq!(nft_duration(5400), "1h30m");
    }
}
