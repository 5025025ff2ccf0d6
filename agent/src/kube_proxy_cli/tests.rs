use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::*;
use crate::model::NodePortAddresses;

/// kubeadm's kube-proxy ConfigMap `config.conf` (v1.36, `mode: ipvs`).
const KUBEADM_CONFIG: &str = include_str!("../../tests/fixtures/kubeadm-kube-proxy-config.conf");

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Parses and resolves a command line given as kube-proxy's (program name first).
fn try_resolve(args: &[&str]) -> anyhow::Result<Resolved> {
    let parsed = parse(kube_proxy_args(&os(args))).map_err(|e| anyhow::anyhow!("{e}"))?;
    resolve(&parsed)
}

fn resolved(args: &[&str]) -> Resolved {
    try_resolve(args).unwrap_or_else(|e| panic!("{args:?}: {e:#}"))
}

fn error(args: &[&str]) -> String {
    match try_resolve(args) {
        Ok(r) => panic!("{args:?} resolved: {:?}", r.config),
        Err(e) => crate::logging::error_line(&e),
    }
}

fn config_file(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("config.conf");
    std::fs::write(&p, text).expect("write config");
    p
}

#[test]
fn kube_proxy_invocations_are_told_from_this_binarys_own() {
    let yes = [
        &["kube-ipvs-bpf", "--config=/var/lib/kube-proxy/config.conf"][..],
        &[
            "/usr/local/bin/kube-proxy",
            "--config=/c",
            "--hostname-override=n",
        ],
        &["/usr/local/bin/kube-proxy"],
        &["kube-ipvs-bpf", "kube-proxy", "--help"],
        &["kube-ipvs-bpf", "--log-format", "json", "--proxy-mode=ipvs"],
        &["kube-ipvs-bpf", "-v=2"],
    ];
    for a in yes {
        assert!(is_kube_proxy_invocation(&os(a)), "{a:?}");
    }
    let no = [
        &["kube-ipvs-bpf"][..],
        &["kube-ipvs-bpf", "run", "--source", "file:/x"],
        &["kube-ipvs-bpf", "--log-format", "json", "run"],
        &["kube-ipvs-bpf", "--log-format=json", "inspect", "services"],
        &["kube-ipvs-bpf", "cleanup", "--kube-proxy"],
        &["kube-ipvs-bpf", "init"],
        &["kube-ipvs-bpf", "plan"],
        &["kube-ipvs-bpf", "--help"],
        &["kube-ipvs-bpf", "--version"],
    ];
    for a in no {
        assert!(!is_kube_proxy_invocation(&os(a)), "{a:?}");
    }
}

/// kubeadm's DaemonSet: `kube-proxy --config=/var/lib/kube-proxy/config.conf
/// --hostname-override=$(NODE_NAME)` with its ConfigMap in ipvs mode.
#[test]
fn kubeadms_daemonset_command_line_and_configmap_resolve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = config_file(dir.path(), KUBEADM_CONFIG);
    let r = resolved(&[
        "/usr/local/bin/kube-proxy",
        &format!("--config={}", conf.display()),
        "--hostname-override=Node-1",
    ]);
    assert_eq!(r.action, Action::Run);
    assert_eq!(r.config.node_name.as_deref(), Some("node-1"));
    assert_eq!(
        r.config.kubeconfig.as_deref(),
        Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    assert_eq!(
        r.config.model.cluster_cidrs,
        vec!["10.244.0.0/16".parse::<IpNet>().unwrap()]
    );
    assert_eq!(r.config.model.default_scheduler, "rr");
    assert_eq!(r.config.timing.sync_period, config::DEFAULT_SYNC_PERIOD);
    assert!(
        r.ignored_for_config.is_empty(),
        "{:?}",
        r.ignored_for_config
    );
    assert!(r.master.is_none());
}

#[test]
fn each_flag_sets_its_setting_without_config() {
    let r = resolved(&[
        "kube-proxy",
        "--kubeconfig=/k.conf",
        "--master=https://10.0.0.1:6443",
        "--hostname-override= Worker-2 ",
        "--proxy-mode=ipvs",
        "--ipvs-scheduler=wlc",
        "--ipvs-sync-period=45s",
        "--ipvs-min-sync-period=2s",
        "--ipvs-exclude-cidrs=10.1.0.0/16,fd00:1::/64",
        "--ipvs-strict-arp",
        "--ipvs-tcp-timeout=15m",
        "--ipvs-tcpfin-timeout=30s",
        "--ipvs-udp-timeout=5s",
        "--cluster-cidr=10.244.0.0/16,fd00:244::/56",
        "--nodeport-addresses=10.0.0.0/8",
        "--masquerade-all",
        "--healthz-bind-address=0.0.0.0:20256",
        "--metrics-bind-address=0.0.0.0:20249",
        "--bind-address=10.0.0.5",
        "--bind-address-hard-fail=true",
        "--oom-score-adj=-999",
        "--detect-local-mode=ClusterCIDR",
    ]);
    let c = &r.config;
    assert_eq!(c.kubeconfig.as_deref(), Some(Path::new("/k.conf")));
    assert_eq!(r.master.as_deref(), Some("https://10.0.0.1:6443"));
    assert_eq!(c.node_name.as_deref(), Some("worker-2"));
    assert_eq!(c.model.default_scheduler, "wlc");
    assert_eq!(c.timing.sync_period, Duration::from_secs(45));
    assert_eq!(c.timing.min_sync_period, Duration::from_secs(2));
    assert_eq!(
        c.ipvs.exclude_cidrs,
        vec![
            "10.1.0.0/16".parse::<IpNet>().unwrap(),
            "fd00:1::/64".parse().unwrap()
        ]
    );
    assert!(c.ipvs.strict_arp);
    assert_eq!(c.ipvs.timeouts.tcp, Some(Duration::from_secs(900)));
    assert_eq!(c.ipvs.timeouts.tcp_fin, Some(Duration::from_secs(30)));
    assert_eq!(c.ipvs.timeouts.udp, Some(Duration::from_secs(5)));
    assert_eq!(c.model.cluster_cidrs.len(), 2);
    assert_eq!(
        c.model.node_port_addresses,
        NodePortAddresses::Cidrs(vec!["10.0.0.0/8".parse().unwrap()])
    );
    assert!(c.model.masquerade_all);
    assert_eq!(
        c.listeners.healthz,
        "0.0.0.0:20256".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        c.listeners.metrics,
        "0.0.0.0:20249".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        c.node_ips,
        vec!["10.0.0.5".parse::<std::net::IpAddr>().unwrap()]
    );
    assert!(c.listeners.hard_fail);
    assert_eq!(c.oom_score_adj, Some(-999));
    assert!(r.notes.is_empty(), "{:?}", r.notes);
}

#[test]
fn go_flag_syntax_is_read_as_kube_proxy_reads_it() {
    // `--flag value`, `--flag=value`, `_` for `-`, Go booleans, `-v N`.
    let r = resolved(&[
        "kube-proxy",
        "--ipvs_scheduler",
        "lc",
        "--masquerade-all=false",
        "--ipvs-strict-arp=T",
        "-v",
        "4",
        "--logging-format=json",
    ]);
    assert_eq!(r.config.model.default_scheduler, "lc");
    assert!(!r.config.model.masquerade_all);
    assert!(r.config.ipvs.strict_arp);
    assert_eq!(r.log_level, "debug");
    assert!(matches!(r.log_format, LogFormat::Json));
    assert_eq!(resolved(&["kube-proxy", "--v=7"]).log_level, "trace");
    assert_eq!(resolved(&["kube-proxy", "-v=2"]).log_level, "info");
    // A boolean takes no separate value: `--masquerade-all false` leaves a stray argument.
    assert!(try_resolve(&["kube-proxy", "--masquerade-all", "false"]).is_err());
}

#[test]
fn per_mode_sync_periods_apply_as_in_kube_proxy() {
    // --iptables-* count unless the mode is ipvs; --ipvs-* only with it.
    let r = resolved(&[
        "kube-proxy",
        "--iptables-sync-period=40s",
        "--ipvs-sync-period=50s",
    ]);
    assert_eq!(r.config.timing.sync_period, Duration::from_secs(40));
    assert!(
        r.notes.iter().any(|n| n.contains("--ipvs-sync-period")),
        "{:?}",
        r.notes
    );
    let r = resolved(&[
        "kube-proxy",
        "--proxy-mode=ipvs",
        "--iptables-sync-period=40s",
        "--ipvs-sync-period=50s",
    ]);
    assert_eq!(r.config.timing.sync_period, Duration::from_secs(50));
    assert!(
        r.notes.iter().any(|n| n.contains("--iptables-sync-period")),
        "{:?}",
        r.notes
    );
    // This agent's own mode-independent names.
    let r = resolved(&["kube-proxy", "--sync-period=20s", "--min-sync-period=500ms"]);
    assert_eq!(r.config.timing.sync_period, Duration::from_secs(20));
    assert_eq!(r.config.timing.min_sync_period, Duration::from_millis(500));
}

#[test]
fn deprecated_port_flags_set_the_servers_ports() {
    let r = resolved(&["kube-proxy", "--healthz-port=11256", "--metrics-port=11249"]);
    assert_eq!(
        r.config.listeners.healthz,
        "0.0.0.0:11256".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        r.config.listeners.metrics,
        "127.0.0.1:11249".parse::<SocketAddr>().unwrap()
    );
    // On the address's IP; a port in the address wins.
    let r = resolved(&[
        "kube-proxy",
        "--healthz-bind-address=10.0.0.5",
        "--healthz-port=11256",
        "--metrics-bind-address=0.0.0.0:9999",
        "--metrics-port=11249",
    ]);
    assert_eq!(
        r.config.listeners.healthz,
        "10.0.0.5:11256".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        r.config.listeners.metrics,
        "0.0.0.0:9999".parse::<SocketAddr>().unwrap()
    );
    let e = error(&["kube-proxy", "--healthz-port=0"]);
    assert!(e.contains("--healthz-port=0"), "{e}");
    let e = error(&["kube-proxy", "--metrics-port=0"]);
    assert!(e.contains("--metrics-port=0"), "{e}");
}

#[test]
fn with_config_the_file_wins_and_ignored_flags_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = config_file(dir.path(), KUBEADM_CONFIG);
    let r = resolved(&[
        "kube-proxy",
        &format!("--config={}", conf.display()),
        "--ipvs-scheduler=wlc",
        "--cluster-cidr=10.9.0.0/16",
        "--kubeconfig=/other.conf",
        "--healthz-port=11256",
        "--conntrack-max-per-core=0",
        "--hostname-override=node-9",
        "--master=http://127.0.0.1:6443",
        "-v=4",
    ]);
    // The file's values, not the flags'.
    assert_eq!(r.config.model.default_scheduler, "rr");
    assert_eq!(
        r.config.model.cluster_cidrs,
        vec!["10.244.0.0/16".parse::<IpNet>().unwrap()]
    );
    assert_eq!(
        r.config.kubeconfig.as_deref(),
        Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    assert_eq!(
        r.config.listeners.healthz,
        config::DEFAULT_HEALTHZ_BIND_ADDRESS
    );
    assert_eq!(
        r.ignored_for_config,
        [
            "--cluster-cidr",
            "--conntrack-max-per-core",
            "--healthz-port",
            "--ipvs-scheduler",
            "--kubeconfig"
        ]
    );
    // Honoured with --config, as in kube-proxy.
    assert_eq!(r.config.node_name.as_deref(), Some("node-9"));
    assert_eq!(r.master.as_deref(), Some("http://127.0.0.1:6443"));
    assert_eq!(r.log_level, "debug");
    // Without --hostname-override, the file's hostnameOverride.
    let conf = config_file(
        dir.path(),
        &KUBEADM_CONFIG.replace("hostnameOverride: \"\"", "hostnameOverride: from-file"),
    );
    let r = resolved(&["kube-proxy", &format!("--config={}", conf.display())]);
    assert_eq!(r.config.node_name.as_deref(), Some("from-file"));
}

/// The settings that are this binary's own flags (`run --datapath`, ...) have no kube-proxy
/// flag: under kube-proxy's command line they come from `--config` alone, else the defaults.
#[test]
fn with_config_the_agents_own_settings_come_from_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = config_file(
        dir.path(),
        &format!(
            "{KUBEADM_CONFIG}\nkubeIpvsBpf:\n  nodeCheckPeriod: 9s\n  iptablesBackend: nft\n  \
             datapath:\n    kind: none\n    pinRoot: /sys/fs/bpf/kp/v2\n    mapSizes: {{snat: 512}}\n"
        ),
    );
    let r = resolved(&["kube-proxy", &format!("--config={}", conf.display())]);
    let dp = &r.config.datapath;
    assert_eq!(r.config.timing.node_check_period, Duration::from_secs(9));
    assert_eq!(dp.iptables_backend, config::IptablesBackend::Nft);
    assert_eq!(dp.kind, config::DatapathKind::None);
    assert_eq!(dp.pin_root, Path::new("/sys/fs/bpf/kp/v2"));
    assert_eq!(dp.map_sizes.snat, 512);
    let r = resolved(&["kube-proxy", "--proxy-mode=ipvs"]);
    assert_eq!(r.config.datapath, config::DatapathSettings::default());
    assert_eq!(
        r.config.timing.node_check_period,
        config::DEFAULT_NODE_CHECK_PERIOD
    );
}

#[test]
fn what_cannot_be_honoured_is_refused_by_flag_name() {
    for (flag, want) in [
        ("--proxy-mode=iptables", "--proxy-mode"),
        ("--proxy-mode=nftables", "--proxy-mode"),
        ("--ipvs-scheduler=fastest", "--ipvs-scheduler"),
        ("--feature-gates=NFTablesProxyMode=true", "--feature-gates"),
        ("--profiling", "--profiling"),
        ("--detect-local-mode=NodeCIDR", "--detect-local-mode"),
        ("--iptables-masquerade-bit=15", "--iptables-masquerade-bit"),
        (
            "--iptables-localhost-nodeports",
            "--iptables-localhost-nodeports",
        ),
        ("--nodeport-addresses=localhost", "--nodeport-addresses"),
        ("--cluster-cidr=10.0.0.0/8,10.1.0.0/16", "--cluster-cidr"),
        ("--oom-score-adj=-2000", "--oom-score-adj"),
        ("--write-config-to=/tmp/x", "--write-config-to"),
        ("--logging-format=klog", "--logging-format"),
        ("--hostname-override=  ", "--hostname-override"),
        ("--ipvs-exclude-cidrs=10.0.0.0/33", "--ipvs-exclude-cidrs"),
        ("--metrics-bind-address=", "--metrics-bind-address"),
        ("--healthz-bind-address=", "--healthz-bind-address"),
    ] {
        let e = error(&["kube-proxy", flag]);
        assert!(e.starts_with(want), "{flag}: {e}");
    }
    let e = error(&["kube-proxy", "--proxy-mode=iptables"]);
    assert!(e.contains("\"iptables\""), "{e}");
    // A bad duration is clap's error, naming the flag.
    let e = error(&["kube-proxy", "--ipvs-sync-period=soon"]);
    assert!(e.contains("--ipvs-sync-period"), "{e}");
    // A refused setting in the --config file names the file's field.
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = config_file(
        dir.path(),
        &KUBEADM_CONFIG.replace("mode: ipvs", "mode: iptables"),
    );
    let e = error(&["kube-proxy", &format!("--config={}", conf.display())]);
    assert!(e.starts_with("mode:"), "{e}");
    let e = error(&["kube-proxy", "--config=/nonexistent/config.conf"]);
    assert_eq!(e.matches("os error 2").count(), 1, "{e}");
}

#[test]
fn conntrack_and_client_tuning_flags_are_accepted_and_ignored() {
    let r = resolved(&[
        "kube-proxy",
        "--conntrack-max-per-core=32768",
        "--conntrack-min=131072",
        "--conntrack-tcp-timeout-established=24h",
        "--conntrack-tcp-timeout-close-wait=1h",
        "--conntrack-tcp-be-liberal",
        "--conntrack-udp-timeout=30s",
        "--conntrack-udp-timeout-stream=2m",
        "--kube-api-qps=5",
        "--kube-api-burst=10",
        "--kube-api-content-type=application/vnd.kubernetes.protobuf",
        "--config-sync-period=15m",
        "--vmodule=proxier=4",
    ]);
    assert_eq!(r.ignored_conntrack.len(), 7, "{:?}", r.ignored_conntrack);
    assert_eq!(
        r.ignored,
        [
            "--config-sync-period",
            "--kube-api-burst",
            "--kube-api-content-type",
            "--kube-api-qps",
            "--vmodule"
        ]
    );
    assert_eq!(r.config, resolved(&["kube-proxy", "--v=0"]).config);
}

#[test]
fn cleanup_and_init_only_are_actions() {
    assert_eq!(
        resolved(&["kube-proxy", "--cleanup"]).action,
        Action::Cleanup
    );
    assert_eq!(
        resolved(&["kube-proxy", "--cleanup=true", "--init-only"]).action,
        Action::Cleanup
    );
    assert_eq!(
        resolved(&["kube-proxy", "--init-only"]).action,
        Action::InitOnly
    );
    assert_eq!(
        resolved(&["kube-proxy", "--cleanup=false"]).action,
        Action::Run
    );
    // --cleanup with --config reads the file (its NodePort range and excludeCIDRs).
    let dir = tempfile::tempdir().expect("tempdir");
    let conf = config_file(
        dir.path(),
        &KUBEADM_CONFIG.replace("  excludeCIDRs: null", "  excludeCIDRs: [10.5.0.0/16]"),
    );
    let r = resolved(&[
        "kube-proxy",
        &format!("--config={}", conf.display()),
        "--cleanup",
    ]);
    assert_eq!(r.action, Action::Cleanup);
    assert_eq!(
        r.config.ipvs.exclude_cidrs,
        vec!["10.5.0.0/16".parse::<IpNet>().unwrap()]
    );
}

#[test]
fn every_kube_proxy_flag_has_help() {
    let cmd = KubeProxyArgs::command();
    for a in cmd.get_arguments() {
        if a.is_hide_set() || a.get_id() == "help" || a.get_id() == "version" {
            continue;
        }
        assert!(
            a.get_help()
                .is_some_and(|h| !h.to_string().trim().is_empty()),
            "--{} has no help",
            a.get_id()
        );
    }
}
