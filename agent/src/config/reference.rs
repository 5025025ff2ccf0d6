//! The configuration reference: one entry per field of the file's schema ([`super::FileConfig`]),
//! with its default, its kube-proxy equivalent and what this agent does with it, rendered as
//! docs/configuration.md by [`markdown`]. A unit test checks that every field of the schema has
//! an entry and no entry names a field the schema lacks (the names come from serde itself), and
//! that docs/configuration.md is what [`markdown`] renders (`KIB_UPDATE_DOCS=1` rewrites it).

/// One field of the configuration file.
pub struct Field {
    /// Its path in the YAML document (`ipvs.scheduler`).
    pub path: &'static str,
    /// Its default here ("–": none, the setting is off or comes from the node).
    pub default: &'static str,
    /// What it is in kube-proxy's `KubeProxyConfiguration` (v1alpha1, v1.36).
    pub kube_proxy: &'static str,
    /// What this agent does with it.
    pub here: &'static str,
}

const fn f(
    path: &'static str,
    default: &'static str,
    kube_proxy: &'static str,
    here: &'static str,
) -> Field {
    Field {
        path,
        default,
        kube_proxy,
        here,
    }
}

const SAME: &str = "the same field";

/// Every field, in the order of the schema.
pub const FIELDS: &[Field] = &[
    f(
        "apiVersion",
        "required",
        SAME,
        "`kubeproxy.config.k8s.io/v1alpha1` (with `kind: KubeProxyConfiguration`) or `kube-ipvs-bpf.io/v1alpha1` (with `kind: KubeIpvsBpfConfiguration`)",
    ),
    f(
        "kind",
        "required",
        SAME,
        "`KubeProxyConfiguration` or `KubeIpvsBpfConfiguration`, matching `apiVersion`",
    ),
    f(
        "featureGates",
        "–",
        SAME,
        "refused when any gate is set: none of kube-proxy's gates exists here",
    ),
    f(
        "clientConnection.kubeconfig",
        "in-cluster",
        SAME,
        "honoured: the kubeconfig of the Kubernetes source (`--kubeconfig` wins)",
    ),
    f(
        "clientConnection.acceptContentTypes",
        "–",
        SAME,
        "accepted, ignored (client tuning)",
    ),
    f(
        "clientConnection.contentType",
        "–",
        SAME,
        "accepted, ignored (client tuning)",
    ),
    f(
        "clientConnection.qps",
        "–",
        SAME,
        "accepted, ignored (client tuning)",
    ),
    f(
        "clientConnection.burst",
        "–",
        SAME,
        "accepted, ignored (client tuning)",
    ),
    f(
        "logging",
        "–",
        SAME,
        "accepted as anything, ignored: use `--log-format` and `RUST_LOG`",
    ),
    f(
        "hostnameOverride",
        "the host name",
        SAME,
        "honoured: the node name (trimmed, lower-cased as kube-proxy does)",
    ),
    f(
        "bindAddress",
        "–",
        SAME,
        "a specific IP is the node IP; `0.0.0.0`/`::` mean unset; an IPv6 value moves the default health and metrics addresses to IPv6",
    ),
    f(
        "healthzBindAddress",
        "`0.0.0.0:10256`",
        SAME,
        "honoured: `IP:port`, or `IP` with port 10256",
    ),
    f(
        "metricsBindAddress",
        "`127.0.0.1:10249`",
        SAME,
        "honoured: `IP:port`, or `IP` with port 10249",
    ),
    f(
        "bindAddressHardFail",
        "false",
        SAME,
        "honoured: a health or metrics address that cannot be bound stops start-up",
    ),
    f(
        "enableProfiling",
        "false",
        SAME,
        "refused when true: no profiling endpoint",
    ),
    f(
        "showHiddenMetricsForVersion",
        "–",
        SAME,
        "accepted, ignored: there are no hidden metrics",
    ),
    f(
        "mode",
        "`ipvs`",
        SAME,
        "`\"\"` and `ipvs` accepted; `iptables`, `nftables`, `kernelspace` refused",
    ),
    f(
        "iptables.masqueradeBit",
        "14",
        SAME,
        "`null` or 14 accepted; the datapath's marks are `kubeIpvsBpf.datapath.markService` and `markMasquerade`",
    ),
    f(
        "iptables.masqueradeAll",
        "false",
        SAME,
        "honoured (kube-proxy's ipvs mode reads it too): source-NAT every service connection",
    ),
    f(
        "iptables.localhostNodePorts",
        "false",
        SAME,
        "true is refused: no NodePorts on loopback, as in kube-proxy's ipvs mode",
    ),
    f(
        "iptables.snatNodeInternalIP",
        "false",
        SAME,
        "true is refused: the datapath picks the SNAT address per device",
    ),
    f(
        "iptables.syncPeriod",
        "30s",
        SAME,
        "honoured when `mode` is `\"\"` (kube-proxy's default mode reads it)",
    ),
    f(
        "iptables.minSyncPeriod",
        "1s",
        SAME,
        "honoured when `mode` is `\"\"`",
    ),
    f(
        "ipvs.syncPeriod",
        "30s",
        SAME,
        "honoured with `mode: ipvs`: the full resync interval",
    ),
    f(
        "ipvs.minSyncPeriod",
        "1s",
        SAME,
        "honoured with `mode: ipvs`: the shortest interval between two syncs",
    ),
    f(
        "ipvs.scheduler",
        "`rr`",
        SAME,
        "honoured: a known IPVS scheduler",
    ),
    f(
        "ipvs.excludeCIDRs",
        "–",
        SAME,
        "honoured: IPVS services there are never deleted",
    ),
    f(
        "ipvs.strictARP",
        "false",
        SAME,
        "honoured: `arp_ignore=1`, `arp_announce=2`",
    ),
    f(
        "ipvs.tcpTimeout",
        "the kernel's",
        SAME,
        "honoured (0 leaves the kernel's)",
    ),
    f(
        "ipvs.tcpFinTimeout",
        "the kernel's",
        SAME,
        "honoured (0 leaves the kernel's)",
    ),
    f(
        "ipvs.udpTimeout",
        "the kernel's",
        SAME,
        "honoured (0 leaves the kernel's)",
    ),
    f(
        "nftables.masqueradeBit",
        "–",
        SAME,
        "accepted, ignored (nftables mode only, refused here)",
    ),
    f("nftables.masqueradeAll", "–", SAME, "accepted, ignored"),
    f("nftables.syncPeriod", "–", SAME, "accepted, ignored"),
    f("nftables.minSyncPeriod", "–", SAME, "accepted, ignored"),
    f(
        "winkernel",
        "–",
        SAME,
        "accepted as anything, ignored (Windows only)",
    ),
    f(
        "detectLocalMode",
        "`ClusterCIDR`",
        SAME,
        "`\"\"` and `ClusterCIDR` accepted; `NodeCIDR`, `BridgeInterface`, `InterfaceNamePrefix` refused",
    ),
    f(
        "detectLocal.bridgeInterface",
        "–",
        SAME,
        "accepted, ignored (only read by the modes refused above)",
    ),
    f(
        "detectLocal.interfaceNamePrefix",
        "–",
        SAME,
        "accepted, ignored",
    ),
    f(
        "clusterCIDR",
        "–",
        SAME,
        "honoured: comma-separated, at most one CIDR per family; decides which clients are off-cluster",
    ),
    f(
        "nodePortAddresses",
        "all local addresses",
        SAME,
        "honoured: `primary` (alone), `all`, or CIDRs; `localhost` refused",
    ),
    f(
        "oomScoreAdj",
        "–",
        SAME,
        "honoured: the agent's own OOM score (-1000..=1000)",
    ),
    f(
        "conntrack.maxPerCore",
        "–",
        SAME,
        "refused when set: service traffic bypasses nf_conntrack here; set the sysctls on the node",
    ),
    f("conntrack.min", "–", SAME, "refused when set"),
    f(
        "conntrack.tcpEstablishedTimeout",
        "–",
        SAME,
        "refused when set",
    ),
    f(
        "conntrack.tcpCloseWaitTimeout",
        "–",
        SAME,
        "refused when set",
    ),
    f("conntrack.tcpBeLiberal", "–", SAME, "refused when set"),
    f("conntrack.udpTimeout", "–", SAME, "refused when set"),
    f("conntrack.udpStreamTimeout", "–", SAME, "refused when set"),
    f(
        "configSyncPeriod",
        "–",
        SAME,
        "accepted, ignored (informer resync)",
    ),
    f(
        "portRange",
        "–",
        SAME,
        "accepted, ignored (unused by kube-proxy itself)",
    ),
    f(
        "windowsRunAsService",
        "–",
        SAME,
        "accepted, ignored (Windows only)",
    ),
    f(
        "syncPeriod",
        "30s",
        "`<mode>.syncPeriod`",
        "the full resync interval, whatever the mode (a different non-zero per-mode value is an error)",
    ),
    f(
        "minSyncPeriod",
        "1s",
        "`<mode>.minSyncPeriod`",
        "the shortest interval between two syncs, whatever the mode",
    ),
    f(
        "masqueradeAll",
        "false",
        "`iptables.masqueradeAll`",
        "source-NAT every service connection",
    ),
    f(
        "kubeIpvsBpf.drainTimeout",
        "5m",
        "–",
        "the longest graceful drain of a removed TCP/SCTP destination",
    ),
    f(
        "kubeIpvsBpf.stateDir",
        "`/run/kube-ipvs-bpf`",
        "–",
        "where the agent records what it programmed (for `inspect` and restarts)",
    ),
    f(
        "kubeIpvsBpf.nodePortRange",
        "`30000-32767`",
        "kube-apiserver's `--service-node-port-range`",
        "the NodePort range, kept out of the SNAT ports",
    ),
    f(
        "kubeIpvsBpf.serviceProxyName",
        "–",
        "kube-proxy's `--service-proxy-name` label",
        "the `service.kubernetes.io/service-proxy-name` this agent answers to",
    ),
    f(
        "kubeIpvsBpf.onlyLabelledServices",
        "false",
        "–",
        "true: only Services carrying that label (to run beside kube-proxy)",
    ),
    f(
        "kubeIpvsBpf.nodeCheckPeriod",
        "5s",
        "–",
        "how often the node state outside IPVS (nf_tables table, iptables rules, sysctls, TC programs, kube-ipvs0) is checked and repaired; nf_tables and kube-ipvs0 changes are noticed sooner (`--node-check-period`)",
    ),
    f(
        "kubeIpvsBpf.iptablesBackend",
        "`default`",
        "–",
        "`default`, `nft` or `legacy`: the iptables the agent writes its rules with (`--iptables-backend`). `default` finds the one the node's firewall uses, as kube-proxy's iptables wrapper does: kubelet's `KUBE-IPTABLES-HINT` chain in iptables-nft's mangle table, else in iptables-legacy's, else the variant holding more rules (`iptables-restore` as installed when neither variant's save runs); the choice is logged at start. The notrack rule is native nf_tables either way (docs/datapath.md)",
    ),
    f(
        "kubeIpvsBpf.datapath.kind",
        "`bpf`",
        "– (`mode: ipvs`)",
        "`bpf`: IPVS plus the eBPF SNAT datapath; `none`: IPVS alone, no SNAT (`--datapath`)",
    ),
    f(
        "kubeIpvsBpf.datapath.pinRoot",
        "`/sys/fs/bpf/kube-ipvs-bpf/v2`",
        "–",
        "where the datapath's maps and programs are pinned, the map layout's version last (`--bpf-pin-root`)",
    ),
    f(
        "kubeIpvsBpf.datapath.mapSizes",
        "see docs/datapath.md",
        "–",
        "a map's entries by name (`svc_ports`, `svc_addrs`, `src_ranges`, `cluster_cidrs`, `devices`, `snat`, `conns`, `frags`), applied when the maps are created: a pinned map keeps its size (`--bpf-map-size NAME=ENTRIES`, name by name over the file)",
    ),
    f(
        "kubeIpvsBpf.datapath.markService",
        "`0x200000`",
        "– (kube-proxy's `0x4000` is not used)",
        "the mark bit of service traffic: untracked, accepted by the filter chains",
    ),
    f(
        "kubeIpvsBpf.datapath.markMasquerade",
        "`0x400000`",
        "`iptables.masqueradeBit` (its role)",
        "the mark bit of a connection to source-NAT",
    ),
    f(
        "kubeIpvsBpf.datapath.markReply",
        "`0x100000` (when markService or markMasquerade use it: the first of `0x800000`, `0x1000000`, `0x2000000`, `0x80000` they leave free)",
        "–",
        "the mark bit TC ingress sets on the packets TC egress has nothing to do for, so that it passes them without a lookup: with the service mark on the replies of service connections it recognizes, alone on traffic that is none of the agent's; a single bit, or 0 for none",
    ),
    f(
        "kubeIpvsBpf.datapath.snatPortRange",
        "the widest range outside `ip_local_port_range` and the NodePorts",
        "– (MASQUERADE `--random-fully` picks any port)",
        "`first-last`: the ports the datapath source-NATs to; an explicit range must avoid both (checked at start-up)",
    ),
    f(
        "kubeIpvsBpf.datapath.sweepPeriod",
        "10s",
        "–",
        "how often expired SNAT entries are swept (100ms..1m; `--sweep-period`)",
    ),
    f(
        "kubeIpvsBpf.datapath.snatReroute",
        "auto",
        "–",
        "`net.ipv4.vs.snat_reroute`: `auto` turns IPVS's second route lookup of each reply off while no FIB rule other than the kernel's own, IPv6 source route or xfrm policy can make a route depend on the source, and on otherwise; `on` or `off` (`--snat-reroute`; docs/datapath.md)",
    ),
    f(
        "kubeIpvsBpf.datapath.ipvsFreeProbe",
        "true",
        "–",
        "attach the probe on IPVS freeing a connection, which removes the connection's `conns` entry as IPVS frees it; `false`: the sweeper removes the entries, reading `conns` in full every minute (`--ipvs-free-probe`; docs/datapath.md, IPVS probe)",
    ),
];

/// docs/configuration.md.
pub fn markdown() -> String {
    let mut out = String::from(
        "# Configuration reference\n\n\
         Generated from the configuration schema by `agent/src/config/reference.rs` (a unit test \
         checks it is current: `KIB_UPDATE_DOCS=1 cargo test -p agent reference` rewrites it).\n\n\
         The file is YAML: kube-proxy's `KubeProxyConfiguration` as your ConfigMap holds it, or \
         this agent's `KubeIpvsBpfConfiguration`; both share one schema. Flags win over the file, \
         the file over the defaults, field by field. Unknown fields stop start-up, and so does \
         every setting whose meaning this agent cannot honour (the error names it). A zero value \
         (absent, `null`, `\"\"`, `0`, `0s`, `false`, `{}`, `[]`) asks for nothing and is always \
         accepted, as kubeadm writes every field.\n\n\
         | field | default | kube-proxy | here |\n|---|---|---|---|\n",
    );
    for field in FIELDS {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            field.path, field.default, field.kube_proxy, field.here
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::config::FileConfig;

    /// The field names serde expects at `section` (a dotted path, "" for the top level): the
    /// "expected one of" list of the error an unknown field there gets.
    fn schema_fields(section: &str) -> Vec<String> {
        let mut yaml = "__probe__: 1".to_string();
        for part in section.split('.').filter(|p| !p.is_empty()).rev() {
            yaml = format!("{part}: {{{yaml}}}");
        }
        let err = serde_yaml::from_str::<FileConfig>(&yaml)
            .expect_err("an unknown field is refused")
            .to_string();
        // serde: "expected `a`", "expected `a` or `b`", "expected one of `a`, `b`, ...".
        let list = err
            .split_once("expected")
            .map(|(_, l)| l)
            .unwrap_or_else(|| panic!("no field list in: {err}"));
        list.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    /// Every path of the schema: sections are walked through (a section is a field whose
    /// entries in FIELDS are all below it).
    fn schema_paths() -> BTreeSet<String> {
        const SECTIONS: &[&str] = &[
            "clientConnection",
            "iptables",
            "ipvs",
            "nftables",
            "detectLocal",
            "conntrack",
            "kubeIpvsBpf",
            "kubeIpvsBpf.datapath",
        ];
        let mut out = BTreeSet::new();
        for section in std::iter::once("").chain(SECTIONS.iter().copied()) {
            for name in schema_fields(section) {
                let path = if section.is_empty() {
                    name
                } else {
                    format!("{section}.{name}")
                };
                if !SECTIONS.contains(&path.as_str()) {
                    out.insert(path);
                }
            }
        }
        out
    }

    #[test]
    fn reference_covers_every_field_of_the_schema_and_nothing_else() {
        let schema = schema_paths();
        let documented: BTreeSet<String> = FIELDS.iter().map(|f| f.path.to_string()).collect();
        assert_eq!(
            FIELDS.len(),
            documented.len(),
            "a field is documented twice"
        );
        let missing: Vec<_> = schema.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&schema).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "undocumented: {missing:?}; not in the schema: {extra:?}"
        );
    }

    /// The pin root's default is written out above: it follows the loader's.
    #[test]
    fn reference_pin_root_default_is_the_loaders() {
        let field = FIELDS
            .iter()
            .find(|f| f.path == "kubeIpvsBpf.datapath.pinRoot")
            .map(|f| f.default);
        assert_eq!(
            field,
            Some(format!("`{}`", probes::loader::DEFAULT_PIN_ROOT).as_str())
        );
    }

    #[test]
    fn reference_docs_are_current() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
        let want = markdown();
        if std::env::var_os("KIB_UPDATE_DOCS").is_some() {
            std::fs::write(&path, &want).expect("write docs/configuration.md");
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "docs/configuration.md is not current: KIB_UPDATE_DOCS=1 cargo test -p agent reference"
        );
    }
}
