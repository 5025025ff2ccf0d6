use super::*;

fn ours(body: &str) -> String {
    format!("apiVersion: kube-ipvs-bpf.io/v1alpha1\nkind: KubeIpvsBpfConfiguration\n{body}")
}

fn kp(body: &str) -> String {
    format!("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n{body}")
}

fn resolved(yaml: &str) -> AgentConfig {
    let file = parse(yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    resolve(Some(&file), &Overrides::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// The error message of a file that must not load.
fn error(yaml: &str) -> String {
    match parse(yaml) {
        Ok(f) => panic!("loaded: {f:?}\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn assert_names(yaml: &str, setting: &str) {
    let e = error(yaml);
    assert!(e.contains(setting), "error {e:?} does not name {setting:?}");
}

/// What `kubeadm` writes into the kube-proxy ConfigMap's `config.conf` (v1.36, ipvs mode):
/// every field, zero values.
const KUBEADM_DEFAULT: &str = include_str!("../../tests/fixtures/kubeadm-kube-proxy-config.conf");

#[test]
fn kubeadm_kube_proxy_configmap_loads() {
    let cfg = resolved(KUBEADM_DEFAULT);
    assert_eq!(
        cfg.model.cluster_cidrs,
        vec!["10.244.0.0/16".parse::<IpNet>().unwrap()]
    );
    assert_eq!(
        cfg.kubeconfig,
        Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    let expected = AgentConfig {
        model: ModelConfig {
            cluster_cidrs: cfg.model.cluster_cidrs.clone(),
            ..ModelConfig::default()
        },
        kubeconfig: cfg.kubeconfig.clone(),
        ..AgentConfig::default()
    };
    assert_eq!(cfg, expected);
}

#[test]
fn defaults_without_a_file() {
    let cfg = resolve(None, &Overrides::default()).unwrap();
    assert_eq!(cfg, AgentConfig::default());
    assert_eq!(cfg.listeners.healthz.to_string(), "0.0.0.0:10256");
    assert_eq!(cfg.listeners.metrics.to_string(), "127.0.0.1:10249");
    assert_eq!(cfg.timing.sync_period, Duration::from_secs(30));
    assert_eq!(cfg.timing.min_sync_period, Duration::from_secs(1));
    assert_eq!(cfg.health_timeout(), Duration::from_secs(60));
    assert_eq!(cfg.node_port_range, 30000..=32767);
    assert_eq!(cfg.model.default_scheduler, "rr");
}

#[test]
fn empty_own_kind_loads() {
    assert_eq!(resolved(&ours("")), AgentConfig::default());
}

// --- apiVersion / kind -------------------------------------------------------------------

#[test]
fn api_version_and_kind_are_required_and_paired() {
    assert_names("kind: KubeIpvsBpfConfiguration\n", "apiVersion");
    assert_names("apiVersion: kube-ipvs-bpf.io/v1alpha1\n", "kind");
    assert_names(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeIpvsBpfConfiguration\n",
        "kind",
    );
    assert_names(
        "apiVersion: kube-ipvs-bpf.io/v1alpha1\nkind: KubeProxyConfiguration\n",
        "kind",
    );
    assert_names("apiVersion: v1\nkind: ConfigMap\n", "apiVersion");
}

#[test]
fn unknown_fields_are_named() {
    assert_names(&ours("bogus: 1\n"), "bogus");
    assert_names(&ours("ipvs:\n  sheduler: rr\n"), "sheduler");
    assert_names(&ours("kubeIpvsBpf:\n  drainTimout: 1m\n"), "drainTimout");
    assert_names(
        &ours("kubeIpvsBpf:\n  datapath:\n    markSvc: 1\n"),
        "markSvc",
    );
    assert_names(&ours("conntrack:\n  maxPerCpu: 1\n"), "maxPerCpu");
}

#[test]
fn wrong_types_are_named() {
    assert_names(&ours("masqueradeAll: maybe\n"), "masqueradeAll");
    assert_names(&ours("oomScoreAdj: low\n"), "oomScoreAdj");
}

#[test]
fn not_yaml_is_a_parse_error() {
    assert!(matches!(
        parse(": : :\n  - ["),
        Err(ConfigError::Parse { .. })
    ));
}

// --- honoured fields -----------------------------------------------------------------------

#[test]
fn hostname_override_is_trimmed_and_lowercased() {
    assert_eq!(
        resolved(&kp("hostnameOverride: ' Node-1 '\n"))
            .node_name
            .as_deref(),
        Some("node-1")
    );
}

#[test]
fn bind_address() {
    let cfg = resolved(&kp("bindAddress: 10.0.0.5\n"));
    assert_eq!(cfg.node_ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap()]);
    assert!(resolved(&kp("bindAddress: 0.0.0.0\n")).node_ips.is_empty());
    let v6 = resolved(&kp("bindAddress: '::'\n"));
    assert!(v6.node_ips.is_empty());
    assert_eq!(v6.listeners.healthz.to_string(), "[::]:10256");
    assert_eq!(v6.listeners.metrics.to_string(), "[::1]:10249");
    assert_names(&kp("bindAddress: node-1\n"), "bindAddress");
}

#[test]
fn healthz_and_metrics_bind_addresses() {
    let cfg = resolved(&kp(
        "healthzBindAddress: 127.0.0.1:20256\nmetricsBindAddress: 0.0.0.0\n",
    ));
    assert_eq!(cfg.listeners.healthz.to_string(), "127.0.0.1:20256");
    assert_eq!(cfg.listeners.metrics.to_string(), "0.0.0.0:10249");
    let v6 = resolved(&kp("metricsBindAddress: '[::]:9999'\n"));
    assert_eq!(v6.listeners.metrics.to_string(), "[::]:9999");
    assert_names(
        &kp("healthzBindAddress: localhost:1\n"),
        "healthzBindAddress",
    );
    assert_names(&kp("metricsBindAddress: x\n"), "metricsBindAddress");
}

#[test]
fn bind_address_hard_fail() {
    assert!(
        resolved(&kp("bindAddressHardFail: true\n"))
            .listeners
            .hard_fail
    );
}

#[test]
fn client_connection_kubeconfig() {
    let cfg = resolved(&kp(
        "clientConnection:\n  kubeconfig: /k.conf\n  qps: 5\n  burst: 10\n",
    ));
    assert_eq!(cfg.kubeconfig, Some(PathBuf::from("/k.conf")));
}

#[test]
fn oom_score_adj() {
    assert_eq!(
        resolved(&kp("oomScoreAdj: -999\n")).oom_score_adj,
        Some(-999)
    );
    assert_names(&kp("oomScoreAdj: -1001\n"), "oomScoreAdj");
}

#[test]
fn cluster_cidr_is_comma_separated_one_per_family() {
    let cfg = resolved(&kp("clusterCIDR: 10.244.0.0/16, fd00:10:244::/56\n"));
    assert_eq!(cfg.model.cluster_cidrs.len(), 2);
    assert_names(&kp("clusterCIDR: 10.0.0.0/8,10.1.0.0/16\n"), "clusterCIDR");
    assert_names(&kp("clusterCIDR: 10.0.0.0\n"), "clusterCIDR");
}

#[test]
fn node_port_addresses_forms() {
    assert_eq!(
        resolved(&kp("nodePortAddresses: [primary]\n"))
            .model
            .node_port_addresses,
        NodePortAddresses::Primary
    );
    assert_eq!(
        resolved(&kp("nodePortAddresses: [all]\n"))
            .model
            .node_port_addresses,
        NodePortAddresses::AllLocal
    );
    assert_eq!(
        resolved(&kp("nodePortAddresses: [10.0.0.0/8, 'fd00::/64']\n"))
            .model
            .node_port_addresses,
        NodePortAddresses::Cidrs(vec![
            "10.0.0.0/8".parse().unwrap(),
            "fd00::/64".parse().unwrap()
        ])
    );
    assert_eq!(
        resolved(&kp("nodePortAddresses: []\n"))
            .model
            .node_port_addresses,
        NodePortAddresses::AllLocal
    );
    assert_names(&kp("nodePortAddresses: [localhost]\n"), "nodePortAddresses");
    assert_names(
        &kp("nodePortAddresses: [primary, 10.0.0.0/8]\n"),
        "nodePortAddresses",
    );
    assert_names(&kp("nodePortAddresses: [10.0.0.1]\n"), "nodePortAddresses");
}

#[test]
fn scheduler() {
    assert_eq!(
        resolved(&kp("ipvs:\n  scheduler: mh\n"))
            .model
            .default_scheduler,
        "mh"
    );
    assert_names(&kp("ipvs:\n  scheduler: fastest\n"), "ipvs.scheduler");
}

#[test]
fn masquerade_all_top_level_or_iptables_section() {
    assert!(
        resolved(&ours("masqueradeAll: true\n"))
            .model
            .masquerade_all
    );
    assert!(
        resolved(&kp("iptables:\n  masqueradeAll: true\n"))
            .model
            .masquerade_all
    );
    assert!(
        !resolved(&kp(
            "masqueradeAll: false\niptables:\n  masqueradeAll: true\n"
        ))
        .model
        .masquerade_all
    );
    // nftables' copy is ignored (kube-proxy reads it in nftables mode only).
    assert!(
        !resolved(&kp("nftables:\n  masqueradeAll: true\n"))
            .model
            .masquerade_all
    );
}

#[test]
fn sync_periods_follow_the_mode_section() {
    let ipvs = resolved(&kp(
        "mode: ipvs\nipvs:\n  syncPeriod: 1m\n  minSyncPeriod: 2s\niptables:\n  syncPeriod: 5m\n",
    ));
    assert_eq!(ipvs.timing.sync_period, Duration::from_secs(60));
    assert_eq!(ipvs.timing.min_sync_period, Duration::from_secs(2));
    let default_mode = resolved(&kp(
        "iptables:\n  syncPeriod: 45s\n  minSyncPeriod: 500ms\nipvs:\n  syncPeriod: 5m\n",
    ));
    assert_eq!(default_mode.timing.sync_period, Duration::from_secs(45));
    assert_eq!(
        default_mode.timing.min_sync_period,
        Duration::from_millis(500)
    );
    let top = resolved(&ours("syncPeriod: 2m\nminSyncPeriod: 0s\n"));
    assert_eq!(top.timing.sync_period, Duration::from_secs(120));
    assert_eq!(top.timing.min_sync_period, DEFAULT_MIN_SYNC_PERIOD);
}

#[test]
fn sync_period_conflicts_and_limits() {
    assert_names(
        &kp("mode: ipvs\nsyncPeriod: 1m\nipvs:\n  syncPeriod: 2m\n"),
        "syncPeriod",
    );
    // The same value twice is fine.
    resolved(&kp(
        "mode: ipvs\nsyncPeriod: 1m\nipvs:\n  syncPeriod: 60s\n",
    ));
    assert_names(
        &ours("syncPeriod: 10s\nminSyncPeriod: 20s\n"),
        "minSyncPeriod",
    );
    assert_names(&ours("syncPeriod: ten\n"), "syncPeriod");
    assert_names(&ours("syncPeriod: -5s\n"), "syncPeriod");
    assert_names(
        &kp("mode: ipvs\nipvs:\n  minSyncPeriod: 5\n"),
        "ipvs.minSyncPeriod",
    );
}

#[test]
fn ipvs_timeouts() {
    let cfg = resolved(&kp(
        "ipvs:\n  tcpTimeout: 15m\n  tcpFinTimeout: 2m\n  udpTimeout: 0s\n",
    ));
    assert_eq!(
        cfg.ipvs.timeouts,
        IpvsTimeouts {
            tcp: Some(Duration::from_secs(900)),
            tcp_fin: Some(Duration::from_secs(120)),
            udp: None,
        }
    );
    assert_names(&kp("ipvs:\n  udpTimeout: 1500ms\n"), "ipvs.udpTimeout");
    assert_names(&kp("ipvs:\n  tcpTimeout: 1x\n"), "ipvs.tcpTimeout");
}

#[test]
fn strict_arp_and_exclude_cidrs() {
    let cfg = resolved(&kp(
        "ipvs:\n  strictARP: true\n  excludeCIDRs: [10.200.0.0/16]\n",
    ));
    assert!(cfg.ipvs.strict_arp);
    assert_eq!(
        cfg.ipvs.exclude_cidrs,
        vec!["10.200.0.0/16".parse::<IpNet>().unwrap()]
    );
    assert_names(
        &kp("ipvs:\n  excludeCIDRs: [nope]\n"),
        "ipvs.excludeCIDRs[0]",
    );
}

#[test]
fn own_section() {
    let cfg = resolved(&ours(
        "kubeIpvsBpf:\n  drainTimeout: 90s\n  stateDir: /var/run/kib\n  nodePortRange: 31000-32767\n  serviceProxyName: kube-ipvs-bpf\n",
    ));
    assert_eq!(cfg.timing.drain_timeout, Duration::from_secs(90));
    assert_eq!(cfg.state_dir, PathBuf::from("/var/run/kib"));
    assert_eq!(cfg.node_port_range, 31000..=32767);
    assert_eq!(cfg.model.proxy_name.as_deref(), Some("kube-ipvs-bpf"));
    assert!(!cfg.model.only_labelled_services);
    let only = resolved(&ours(
        "kubeIpvsBpf:\n  serviceProxyName: kube-ipvs-bpf\n  onlyLabelledServices: true\n",
    ));
    assert!(only.model.only_labelled_services);
    assert_names(
        &ours("kubeIpvsBpf:\n  onlyLabelledServices: true\n"),
        "kubeIpvsBpf.onlyLabelledServices",
    );
    assert_names(
        &ours("kubeIpvsBpf:\n  nodePortRange: 32767-30000\n"),
        "kubeIpvsBpf.nodePortRange",
    );
    assert_names(
        &ours("kubeIpvsBpf:\n  nodePortRange: 30000\n"),
        "kubeIpvsBpf.nodePortRange",
    );
    assert_names(
        &ours("kubeIpvsBpf:\n  drainTimeout: soon\n"),
        "kubeIpvsBpf.drainTimeout",
    );
}

#[test]
fn datapath_section() {
    let cfg = resolved(&ours(
        "kubeIpvsBpf:\n  datapath:\n    markService: 0x100000\n    markMasquerade: 0x800000\n    snatPortRange: 2000-20000\n",
    ));
    assert_eq!(cfg.datapath.mark_service, 0x10_0000);
    assert_eq!(cfg.datapath.mark_masquerade, 0x80_0000);
    assert_eq!(cfg.datapath.snat_port_range, Some(2000..=20000));
    assert_eq!(AgentConfig::default().datapath.snat_port_range, None);
    assert_eq!(AgentConfig::default().datapath.mark_service, 0x20_0000);
    // The reply mark: 0x100000 by default, the next free bit when markService took it (as
    // above), as configured otherwise (0: none).
    assert_eq!(AgentConfig::default().datapath.reply_mark(), 0x10_0000);
    assert_eq!(cfg.datapath.reply_mark(), 0x100_0000);
    for (text, want) in [("0x2000000", 0x200_0000), ("0", 0)] {
        let cfg = resolved(&ours(&format!(
            "kubeIpvsBpf:\n  datapath:\n    markReply: {text}\n"
        )));
        assert_eq!(cfg.datapath.reply_mark(), want);
    }
    for bad in ["0x300000", "0x200000", "0x4000"] {
        assert_names(
            &ours(&format!(
                "kubeIpvsBpf:\n  datapath:\n    markReply: {bad}\n"
            )),
            "markReply",
        );
    }
    assert_names(
        &ours("kubeIpvsBpf:\n  datapath:\n    markService: 0\n"),
        "markService",
    );
    assert_names(
        &ours("kubeIpvsBpf:\n  datapath:\n    markService: 0x600000\n"),
        "markMasquerade",
    );
    assert_names(
        &ours("kubeIpvsBpf:\n  datapath:\n    markMasquerade: 0x4000\n"),
        "markMasquerade",
    );
    assert_names(
        &ours("kubeIpvsBpf:\n  datapath:\n    snatPortRange: 20000-31000\n"),
        "snatPortRange",
    );
}

#[test]
fn sweep_period_from_file_or_flag_zero_and_absurd_values_refused() {
    assert_eq!(
        AgentConfig::default().datapath.sweep_period,
        Duration::from_secs(10)
    );
    let cfg = resolved(&ours("kubeIpvsBpf:\n  datapath:\n    sweepPeriod: 2s\n"));
    assert_eq!(cfg.datapath.sweep_period, Duration::from_secs(2));
    for bad in ["0s", "0", "1ms", "2h", "-1s", "soon"] {
        assert_names(
            &ours(&format!(
                "kubeIpvsBpf:\n  datapath:\n    sweepPeriod: {bad:?}\n"
            )),
            "kubeIpvsBpf.datapath.sweepPeriod",
        );
    }
    // `--sweep-period 0s` (it made the sweeper's timer panic after the datapath was attached).
    for bad in [Duration::ZERO, Duration::from_secs(3600)] {
        let e = resolve(
            None,
            &Overrides {
                sweep_period: Some(bad),
                ..Overrides::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--sweep-period"), "{e}");
    }
    let flag = resolve(
        None,
        &Overrides {
            sweep_period: Some(Duration::from_millis(500)),
            ..Overrides::default()
        },
    )
    .unwrap();
    assert_eq!(flag.datapath.sweep_period, Duration::from_millis(500));
}

#[test]
fn the_probe_on_ipvs_frees_is_on_by_default_and_off_by_file_or_flag() {
    assert!(AgentConfig::default().datapath.ipvs_free_probe);
    let off = resolved(&ours(
        "kubeIpvsBpf:\n  datapath:\n    ipvsFreeProbe: false\n",
    ));
    assert!(!off.datapath.ipvs_free_probe);
    let file = parse(&ours(
        "kubeIpvsBpf:\n  datapath:\n    ipvsFreeProbe: false\n",
    ))
    .unwrap();
    let flag = resolve(
        Some(&file),
        &Overrides {
            ipvs_free_probe: Some(true),
            ..Overrides::default()
        },
    )
    .unwrap();
    assert!(flag.datapath.ipvs_free_probe, "the flag over the file");
}

#[test]
fn snat_reroute_is_auto_by_default_set_by_file_or_flag_and_unknown_values_refused() {
    use crate::config::SnatReroute;
    assert_eq!(
        AgentConfig::default().datapath.snat_reroute,
        SnatReroute::Auto
    );
    let cfg = resolved(&ours(
        "kubeIpvsBpf:\n  datapath:\n    snatReroute: \"off\"\n",
    ));
    assert_eq!(cfg.datapath.snat_reroute, SnatReroute::Off);
    assert_names(
        &ours("kubeIpvsBpf:\n  datapath:\n    snatReroute: sometimes\n"),
        "kubeIpvsBpf.datapath.snatReroute",
    );
    let flag = resolve(
        Some(
            &parse(&ours(
                "kubeIpvsBpf:\n  datapath:\n    snatReroute: \"off\"\n",
            ))
            .unwrap(),
        ),
        &Overrides {
            snat_reroute: Some(SnatReroute::On),
            ..Overrides::default()
        },
    )
    .unwrap();
    assert_eq!(flag.datapath.snat_reroute, SnatReroute::On, "the flag wins");
}

// --- accepted and ignored ------------------------------------------------------------------

#[test]
fn ignored_fields_load() {
    resolved(&kp(
        "showHiddenMetricsForVersion: '1.35'\nconfigSyncPeriod: 15m\nportRange: 30000-30100\nwindowsRunAsService: true\nwinkernel:\n  enableDSR: true\nnftables:\n  syncPeriod: 1m\n  masqueradeBit: 3\ndetectLocal:\n  bridgeInterface: cbr0\nlogging:\n  format: json\n  verbosity: 4\n",
    ));
    resolved(&kp(
        "mode: ''\ndetectLocalMode: ClusterCIDR\niptables:\n  masqueradeBit: 14\n  localhostNodePorts: false\n",
    ));
}

// --- refused kube-proxy settings ------------------------------------------------------------

#[test]
fn refused_settings_are_named() {
    for (body, setting) in [
        ("mode: iptables\n", "mode"),
        ("mode: nftables\n", "mode"),
        ("mode: kernelspace\n", "mode"),
        ("featureGates:\n  AllAlpha: true\n", "featureGates.AllAlpha"),
        ("enableProfiling: true\n", "enableProfiling"),
        ("iptables:\n  masqueradeBit: 12\n", "iptables.masqueradeBit"),
        (
            "iptables:\n  localhostNodePorts: true\n",
            "iptables.localhostNodePorts",
        ),
        (
            "iptables:\n  snatNodeInternalIP: true\n",
            "iptables.snatNodeInternalIP",
        ),
        ("detectLocalMode: NodeCIDR\n", "detectLocalMode"),
        ("detectLocalMode: BridgeInterface\n", "detectLocalMode"),
        ("conntrack:\n  maxPerCore: 32768\n", "conntrack.maxPerCore"),
        ("conntrack:\n  min: 131072\n", "conntrack.min"),
        (
            "conntrack:\n  tcpEstablishedTimeout: 24h0m0s\n",
            "conntrack.tcpEstablishedTimeout",
        ),
        (
            "conntrack:\n  tcpCloseWaitTimeout: 1h\n",
            "conntrack.tcpCloseWaitTimeout",
        ),
        (
            "conntrack:\n  tcpBeLiberal: true\n",
            "conntrack.tcpBeLiberal",
        ),
        ("conntrack:\n  udpTimeout: 30s\n", "conntrack.udpTimeout"),
        (
            "conntrack:\n  udpStreamTimeout: 2m\n",
            "conntrack.udpStreamTimeout",
        ),
        ("configSyncPeriod: often\n", "configSyncPeriod"),
    ] {
        let e = error(&kp(body));
        assert!(
            e.contains(setting),
            "{body:?}: error {e:?} does not name {setting}"
        );
    }
    assert!(matches!(
        parse(&kp("mode: iptables\n")),
        Err(ConfigError::Unsupported { .. })
    ));
}

// --- precedence ----------------------------------------------------------------------------

#[test]
fn flags_override_file_override_defaults() {
    let file = parse(&kp(
        "hostnameOverride: from-file\nclusterCIDR: 10.244.0.0/16\nmode: ipvs\nipvs:\n  scheduler: wrr\n  syncPeriod: 1m\niptables:\n  masqueradeAll: true\nmetricsBindAddress: 0.0.0.0:10249\n",
    ))
    .unwrap();
    let flags = Overrides {
        node_name: Some("from-flag".into()),
        scheduler: Some("lc".into()),
        masquerade_all: Some(false),
        min_sync_period: Some(Duration::from_secs(5)),
        healthz_bind_address: Some("127.0.0.1:1".parse().unwrap()),
        node_port_addresses: vec!["primary".into()],
        ..Overrides::default()
    };
    let cfg = resolve(Some(&file), &flags).unwrap();
    assert_eq!(cfg.node_name.as_deref(), Some("from-flag"));
    assert_eq!(cfg.model.default_scheduler, "lc");
    assert!(!cfg.model.masquerade_all);
    assert_eq!(cfg.timing.min_sync_period, Duration::from_secs(5));
    assert_eq!(cfg.listeners.healthz.to_string(), "127.0.0.1:1");
    assert_eq!(cfg.model.node_port_addresses, NodePortAddresses::Primary);
    // From the file.
    assert_eq!(cfg.timing.sync_period, Duration::from_secs(60));
    assert_eq!(cfg.model.cluster_cidrs.len(), 1);
    assert_eq!(cfg.listeners.metrics.to_string(), "0.0.0.0:10249");
    // Defaults.
    assert_eq!(cfg.timing.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
}

#[test]
fn flags_are_validated_too() {
    let bad = Overrides {
        scheduler: Some("bogus".into()),
        ..Overrides::default()
    };
    assert!(resolve(None, &bad).is_err());
    let bad = Overrides {
        node_port_addresses: vec!["localhost".into()],
        ..Overrides::default()
    };
    assert!(
        resolve(None, &bad)
            .unwrap_err()
            .to_string()
            .contains("--nodeport-addresses")
    );
}

#[test]
fn the_models_settings_resolve_into_its_own_config() {
    let cfg = resolved(&ours(
        "clusterCIDR: 10.244.0.0/16\nmasqueradeAll: true\nkubeIpvsBpf:\n  serviceProxyName: x\n",
    ));
    let m = &cfg.model;
    assert_eq!(
        m.cluster_cidrs,
        vec!["10.244.0.0/16".parse::<IpNet>().unwrap()]
    );
    assert!(m.masquerade_all);
    assert_eq!(m.proxy_name.as_deref(), Some("x"));
    assert_eq!(m.default_scheduler, "rr");
}

/// The settings that were flags only (`--node-check-period`, `--iptables-backend`,
/// `--datapath`, `--bpf-pin-root`, `--bpf-map-size`) are read from the file, and a flag wins
/// over the file, field by field (map sizes name by name).
#[test]
fn former_flag_only_settings_are_read_from_the_file_and_flags_win() {
    let yaml = ours(
        "kubeIpvsBpf:\n  nodeCheckPeriod: 7s\n  iptablesBackend: legacy\n  datapath:\n    \
         kind: none\n    pinRoot: /sys/fs/bpf/elsewhere/v2\n    mapSizes:\n      snat: 1024\n      \
         conns: 2048\n      frags: 0\n",
    );
    let cfg = resolved(&yaml);
    let dp = &cfg.datapath;
    assert_eq!(cfg.timing.node_check_period, Duration::from_secs(7));
    assert_eq!(dp.iptables_backend, IptablesBackend::Legacy);
    assert_eq!(dp.kind, DatapathKind::None);
    assert_eq!(dp.pin_root, PathBuf::from("/sys/fs/bpf/elsewhere/v2"));
    let defaults = probes::MapSizes::default();
    assert_eq!(
        dp.map_sizes,
        probes::MapSizes {
            snat: 1024,
            conns: 2048,
            ..defaults
        },
        "frags: 0 asks for the default"
    );

    let file = parse(&yaml).unwrap();
    let flags = Overrides {
        node_check_period: Some(Duration::from_secs(3)),
        iptables_backend: Some(IptablesBackend::Nft),
        datapath: Some(DatapathKind::Bpf),
        bpf_pin_root: Some(PathBuf::from("/sys/fs/bpf/flag/v2")),
        bpf_map_sizes: vec![("snat".into(), 4096), ("devices".into(), 64)],
        ..Overrides::default()
    };
    let cfg = resolve(Some(&file), &flags).unwrap();
    let dp = &cfg.datapath;
    assert_eq!(cfg.timing.node_check_period, Duration::from_secs(3));
    assert_eq!(dp.iptables_backend, IptablesBackend::Nft);
    assert_eq!(dp.kind, DatapathKind::Bpf);
    assert_eq!(dp.pin_root, PathBuf::from("/sys/fs/bpf/flag/v2"));
    assert_eq!(
        dp.map_sizes,
        probes::MapSizes {
            snat: 4096,
            conns: 2048,
            devices: 64,
            ..defaults
        }
    );

    // Without either, the defaults (the flags' former defaults).
    let cfg = resolve(None, &Overrides::default()).unwrap();
    assert_eq!(cfg.timing.node_check_period, Duration::from_secs(5));
    assert_eq!(cfg.datapath.iptables_backend, IptablesBackend::Default);
    assert_eq!(cfg.datapath.kind, DatapathKind::Bpf);
    assert_eq!(
        cfg.datapath.pin_root,
        PathBuf::from(probes::loader::DEFAULT_PIN_ROOT)
    );
    assert_eq!(cfg.datapath.map_sizes, defaults);
}

#[test]
fn former_flag_only_settings_are_checked_and_named() {
    assert_names(
        &ours("kubeIpvsBpf:\n  iptablesBackend: iptables\n"),
        "kubeIpvsBpf.iptablesBackend",
    );
    assert_names(
        &ours("kubeIpvsBpf:\n  datapath:\n    kind: xdp\n"),
        "kubeIpvsBpf.datapath.kind",
    );
    assert_names(
        &ours("kubeIpvsBpf:\n  datapath:\n    mapSizes:\n      nope: 10\n"),
        "kubeIpvsBpf.datapath.mapSizes.nope",
    );
    assert_names(
        &ours("kubeIpvsBpf:\n  nodeCheckPeriod: 5\n"),
        "kubeIpvsBpf.nodeCheckPeriod",
    );
    let bad = Overrides {
        bpf_map_sizes: vec![("nope".into(), 1)],
        ..Overrides::default()
    };
    let e = resolve(None, &bad).unwrap_err().to_string();
    assert!(e.contains("--bpf-map-size") && e.contains("nope"), "{e}");
    let zero = Overrides {
        node_check_period: Some(Duration::ZERO),
        ..Overrides::default()
    };
    let e = resolve(None, &zero).unwrap_err().to_string();
    assert!(e.contains("--node-check-period"), "{e}");
}

#[test]
fn load_reads_a_file_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.yaml");
    std::fs::write(&p, ours("syncPeriod: 10s\n")).unwrap();
    assert_eq!(load(&p).unwrap().sync_period.as_deref(), Some("10s"));
    std::fs::write(&p, ours("nope: 1\n")).unwrap();
    let e = load(&p).unwrap_err().to_string();
    assert!(e.contains("config.yaml") && e.contains("nope"), "{e}");
    let missing = dir.path().join("missing.yaml");
    assert!(matches!(load(&missing), Err(ConfigError::Read { .. })));
}

// --- Go durations --------------------------------------------------------------------------

#[test]
fn go_durations() {
    for (s, d) in [
        ("0", Duration::ZERO),
        ("0s", Duration::ZERO),
        ("30s", Duration::from_secs(30)),
        ("1m0s", Duration::from_secs(60)),
        ("2h22m", Duration::from_secs(2 * 3600 + 22 * 60)),
        ("1.5h", Duration::from_secs(5400)),
        ("300ms", Duration::from_millis(300)),
        ("10us", Duration::from_micros(10)),
        ("10µs", Duration::from_micros(10)),
        ("5ns", Duration::from_nanos(5)),
        ("24h0m0s", Duration::from_secs(86400)),
        ("+1s", Duration::from_secs(1)),
    ] {
        assert_eq!(parse_go_duration(s), Ok(d), "{s}");
    }
    for s in ["", "5", "-1s", "1d", "s", "1..5s", "1h x"] {
        assert!(parse_go_duration(s).is_err(), "{s:?} parsed");
    }
}
