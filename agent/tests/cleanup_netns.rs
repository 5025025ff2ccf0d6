//! Host-kernel tests of `cleanup`: each runs in a fresh network namespace of its own (unshared
//! by its thread, so the host is never touched) with the real iptables (legacy and nft),
//! nf_tables and ip_set of the running kernel. IPVS is not needed (the host kernel may not have
//! it): the IPVS steps are covered by the lab. A test whose tools or privileges are missing
//! says so and passes.

mod common;

use common::in_netns;
use std::path::Path;
use std::process::Command;

use agent::cleanup::iptables::Variant;
use agent::cleanup::{CleanupOptions, CleanupReport, cleanup_kube_proxy, cleanup_self};

const MIXED_V4: &str = include_str!("fixtures/mixed-v4.save");
const MIXED_V4_AFTER_KUBE_PROXY: &str = include_str!("fixtures/mixed-v4.after-kube-proxy.save");
const MIXED_V4_AFTER_AGENT: &str = include_str!("fixtures/mixed-v4.after-agent.save");
const MIXED_V6: &str = include_str!("fixtures/mixed-v6.save");
const MIXED_V6_AFTER_KUBE_PROXY: &str = include_str!("fixtures/mixed-v6.after-kube-proxy.save");

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn skip_unless(tools: &[&str]) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return true;
    }
    for t in tools {
        if !have(t) {
            eprintln!("skipped: {t} not installed");
            return true;
        }
    }
    false
}

fn sh(cmd: &str, stdin: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("sh")
        .args(["-c", cmd])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The ipsets kube-proxy's rules in the fixtures reference.
fn create_kube_proxy_ipsets() {
    for s in [
        "KUBE-LOAD-BALANCER",
        "KUBE-CLUSTER-IP",
        "KUBE-EXTERNAL-IP",
        "KUBE-EXTERNAL-IP-LOCAL",
    ] {
        sh(&format!("ipset create {s} hash:ip,port"), None);
    }
    for s in [
        "KUBE-HEALTH-CHECK-NODE-PORT",
        "KUBE-NODE-PORT-LOCAL-TCP",
        "KUBE-NODE-PORT-TCP",
    ] {
        sh(&format!("ipset create {s} bitmap:port range 0-65535"), None);
    }
    sh("ipset create KUBE-IPVS-IPS hash:ip", None);
    sh("ipset create KUBE-LOOP-BACK hash:ip,port,ip", None);
    sh(
        "ipset create KUBE-6-CLUSTER-IP hash:ip,port family inet6",
        None,
    );
}

/// A dump's rule and chain lines, without comments and counters.
fn normalized(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let l = match l.strip_prefix('[').and_then(|r| r.split_once("] ")) {
                Some((_, rule)) => rule,
                None => l,
            };
            // Chain lines: drop the counters after the policy.
            match l.strip_prefix(':') {
                Some(decl) => format!(
                    ":{}",
                    decl.split_whitespace()
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                None => l.to_owned(),
            }
        })
        .collect()
}

/// What `variant`'s save prints for `rules` restored into an empty namespace: the canonical
/// form to compare with.
fn canonical(variant: Variant, rules: &str, with_sets: bool) -> Vec<String> {
    in_netns(|| {
        if with_sets {
            create_kube_proxy_ipsets();
        }
        sh(&format!("{variant}-restore"), Some(rules));
        normalized(&sh(&format!("{variant}-save"), None))
    })
    .unwrap()
}

fn opts(variants: &[Variant], dir: &Path) -> CleanupOptions {
    CleanupOptions {
        iptables_variants: variants.to_vec(),
        pin_root: dir.join("bpffs"),
        state_dir: dir.join("state"),
        ..CleanupOptions::default()
    }
}

fn removed(report: &CleanupReport, kind: &str) -> Vec<String> {
    report
        .removed
        .iter()
        .filter(|r| r.kind == kind)
        .map(|r| r.name.clone())
        .collect()
}

fn kube_proxy_iptables_cleanup(variant: Variant, before: &str, after: &str) {
    if skip_unless(&[&format!("{variant}-save"), "ipset"]) {
        return;
    }
    let v4 = !variant.ipv6;
    let want = canonical(variant, after, v4);
    let unchanged_want = canonical(variant, before, v4);
    let dir = tempfile::tempdir().unwrap();
    let o = opts(&[variant], dir.path());
    let ran = in_netns(|| {
        if v4 {
            create_kube_proxy_ipsets();
        }
        sh(&format!("{variant}-restore"), Some(before));
        let rt = runtime();
        // A dry run changes nothing.
        let dry = rt
            .block_on(cleanup_kube_proxy(&CleanupOptions {
                dry_run: true,
                ..o.clone()
            }))
            .unwrap();
        assert!(dry.is_ok(), "{dry}");
        assert!(!removed(&dry, "iptables chain").is_empty(), "{dry}");
        let unchanged = normalized(&sh(&format!("{variant}-save"), None));
        assert_eq!(unchanged, unchanged_want);

        let report = rt.block_on(cleanup_kube_proxy(&o)).unwrap();
        assert!(report.is_ok(), "{report}");
        assert_eq!(
            removed(&report, "iptables chain"),
            removed(&dry, "iptables chain")
        );
        let got = normalized(&sh(&format!("{variant}-save"), None));
        assert_eq!(got, want, "{report}");
        if v4 {
            // Every kube-proxy set went once the rules referencing them were gone.
            assert!(removed(&report, "ipset").contains(&"KUBE-CLUSTER-IP".to_owned()));
            assert_eq!(sh("ipset list -n", None).trim(), "");
        }
        // Idempotent.
        let again = rt.block_on(cleanup_kube_proxy(&o)).unwrap();
        assert!(again.is_ok(), "{again}");
        assert!(again.removed.is_empty(), "{again}");
    });
    if ran.is_none() {
        eprintln!("skipped: cannot create a network namespace");
    }
}

#[test]
fn kube_proxy_cleanup_iptables_nft_ipv4() {
    kube_proxy_iptables_cleanup(
        Variant {
            ipv6: false,
            nft: true,
        },
        MIXED_V4,
        MIXED_V4_AFTER_KUBE_PROXY,
    );
}

#[test]
fn kube_proxy_cleanup_iptables_legacy_ipv4() {
    kube_proxy_iptables_cleanup(
        Variant {
            ipv6: false,
            nft: false,
        },
        MIXED_V4,
        MIXED_V4_AFTER_KUBE_PROXY,
    );
}

#[test]
fn kube_proxy_cleanup_ip6tables_nft() {
    kube_proxy_iptables_cleanup(
        Variant {
            ipv6: true,
            nft: true,
        },
        MIXED_V6,
        MIXED_V6_AFTER_KUBE_PROXY,
    );
}

#[test]
fn kube_proxy_cleanup_ip6tables_legacy() {
    kube_proxy_iptables_cleanup(
        Variant {
            ipv6: true,
            nft: false,
        },
        MIXED_V6,
        MIXED_V6_AFTER_KUBE_PROXY,
    );
}

#[test]
fn kube_proxy_cleanup_nft_tables_and_ipsets_only_kube_proxys() {
    if skip_unless(&["nft", "ipset", "iptables-nft"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let o = opts(&[], dir.path());
    let ran = in_netns(|| {
        sh(
            "nft -f -",
            Some(
                "table ip kube-proxy {\n set cluster-ips { type ipv4_addr; }\n chain services { type nat hook prerouting priority dstnat; }\n}\n\
                 table ip6 kube-proxy {\n chain services { type nat hook prerouting priority dstnat; }\n}\n\
                 table inet kube-proxy {\n}\n\
                 table ip kube-proxy-canary {\n}\n\
                 table inet filter {\n chain input { type filter hook input priority 0; }\n}\n",
            ),
        );
        // This agent's own table, as it writes it.
        let mut nl = agent::cleanup::nfnetlink::Nfnl::open().unwrap();
        agent::datapath::notrack::apply(&mut nl, 0x0020_0000).unwrap();
        create_kube_proxy_ipsets();
        sh("ipset create KUBE-SRC-ROUTERPOLICY hash:ip", None);
        sh("ipset create DOCKER-X hash:ip", None);
        // Someone else's rule still uses a kube-proxy set: that set must stay.
        sh(
            "iptables-nft -A INPUT -m set --match-set KUBE-LOOP-BACK dst,dst,src -j ACCEPT",
            None,
        );
        let rt = runtime();
        let tables_before = sh("nft list tables", None);
        let sets_before = sh("ipset list -n", None);
        let dry = rt
            .block_on(cleanup_kube_proxy(&CleanupOptions {
                dry_run: true,
                ..o.clone()
            }))
            .unwrap();
        assert_eq!(
            removed(&dry, "nft table"),
            ["ip kube-proxy", "ip6 kube-proxy"]
        );
        assert_eq!(sh("nft list tables", None), tables_before);
        assert_eq!(sh("ipset list -n", None), sets_before);

        let report = rt.block_on(cleanup_kube_proxy(&o)).unwrap();
        assert_eq!(
            removed(&report, "nft table"),
            ["ip kube-proxy", "ip6 kube-proxy"]
        );
        let tables = sh("nft list tables", None);
        let mut tables: Vec<&str> = tables.lines().collect();
        tables.sort();
        // iptables-nft's own table stays too.
        assert!(tables.contains(&"table inet kube-proxy"), "{tables:?}");
        assert!(tables.contains(&"table ip kube-proxy-canary"), "{tables:?}");
        assert!(tables.contains(&"table inet filter"), "{tables:?}");
        assert!(tables.contains(&"table inet kube-ipvs-bpf"), "{tables:?}");
        assert!(!tables.contains(&"table ip kube-proxy"), "{tables:?}");
        assert!(!tables.contains(&"table ip6 kube-proxy"), "{tables:?}");

        let mut sets: Vec<String> = sh("ipset list -n", None)
            .lines()
            .map(str::to_owned)
            .collect();
        sets.sort();
        assert_eq!(
            sets,
            ["DOCKER-X", "KUBE-LOOP-BACK", "KUBE-SRC-ROUTERPOLICY"]
        );
        assert!(removed(&report, "ipset").contains(&"KUBE-6-CLUSTER-IP".to_owned()));
        assert_eq!(report.errors.len(), 1, "{report}");
        assert!(
            report.errors[0].contains("KUBE-LOOP-BACK") && report.errors[0].contains("in use"),
            "{report}"
        );
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("IPVS is not loaded")),
            "{report}"
        );

        // Idempotent: only the set still in use is reported again.
        let again = rt.block_on(cleanup_kube_proxy(&o)).unwrap();
        assert!(again.removed.is_empty(), "{again}");
        assert_eq!(again.errors.len(), 1, "{again}");
    });
    if ran.is_none() {
        eprintln!("skipped: cannot create a network namespace");
    }
}

#[test]
fn keep_ipvs_leaves_kube_ipvs0() {
    if skip_unless(&["ip"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ran = in_netns(|| {
        sh("ip link add kube-ipvs0 type dummy", None);
        let rt = runtime();
        let report = rt
            .block_on(cleanup_kube_proxy(&CleanupOptions {
                keep_ipvs: true,
                ..opts(&[], dir.path())
            }))
            .unwrap();
        assert!(removed(&report, "interface").is_empty(), "{report}");
        assert!(sh("ip -o link show", None).contains("kube-ipvs0"));
        let report = rt
            .block_on(cleanup_kube_proxy(&opts(&[], dir.path())))
            .unwrap();
        assert_eq!(removed(&report, "interface"), ["kube-ipvs0"], "{report}");
        assert!(!sh("ip -o link show", None).contains("kube-ipvs0"));
    });
    if ran.is_none() {
        eprintln!("skipped: cannot create a network namespace");
    }
}

#[test]
fn self_cleanup_removes_only_the_agents_state() {
    if skip_unless(&["iptables-nft-save", "ip", "ipset", "nft"]) {
        return;
    }
    let variant = Variant {
        ipv6: false,
        nft: true,
    };
    let want = canonical(variant, MIXED_V4_AFTER_AGENT, true);
    let dir = tempfile::tempdir().unwrap();
    let o = opts(&[variant], dir.path());
    // Pins and state as the agent leaves them (a plain directory stands in for bpffs).
    std::fs::create_dir_all(o.pin_root.join("v1/links")).unwrap();
    std::fs::write(o.pin_root.join("v1/map_conns"), b"").unwrap();
    std::fs::create_dir_all(&o.state_dir).unwrap();
    std::fs::write(agent::state::path(&o.state_dir), b"{}").unwrap();
    let ran = in_netns(|| {
        create_kube_proxy_ipsets();
        sh("iptables-nft-restore", Some(MIXED_V4));
        sh("ip link add kube-ipvs0 type dummy", None);
        sh("ip link add eth9 type dummy", None);
        let mut nl = agent::cleanup::nfnetlink::Nfnl::open().unwrap();
        agent::datapath::notrack::apply(&mut nl, 0x0020_0000).unwrap();
        sh("nft add table inet filter", None);
        let rt = runtime();
        let dry = rt
            .block_on(cleanup_self(&CleanupOptions {
                dry_run: true,
                ..o.clone()
            }))
            .unwrap();
        assert!(dry.is_ok(), "{dry}");
        assert!(o.pin_root.exists() && agent::state::path(&o.state_dir).exists());

        let report = rt.block_on(cleanup_self(&o)).unwrap();
        assert!(report.is_ok(), "{report}");
        assert_eq!(
            removed(&report, "iptables chain"),
            [
                "iptables-nft -t filter KUBE-IPVS-BPF-FILTER",
                "iptables-nft -t raw KUBE-IPVS-BPF-NOTRACK"
            ]
        );
        assert_eq!(removed(&report, "interface"), ["kube-ipvs0"]);
        assert_eq!(removed(&report, "nft table"), ["inet kube-ipvs-bpf"]);
        assert_eq!(removed(&dry, "nft table"), ["inet kube-ipvs-bpf"]);
        let tables = sh("nft list tables", None);
        assert!(
            !tables.contains("kube-ipvs-bpf") && tables.contains("table inet filter"),
            "{tables}"
        );
        assert_eq!(removed(&report, "bpf pins").len(), 1);
        assert_eq!(removed(&report, "state file").len(), 1);
        assert_eq!(removed(&dry, "state file"), removed(&report, "state file"));
        assert_eq!(normalized(&sh("iptables-nft-save", None)), want);
        let links = sh("ip -o link show", None);
        assert!(
            !links.contains("kube-ipvs0") && links.contains("eth9"),
            "{links}"
        );
        assert!(!o.pin_root.exists());
        assert!(!o.state_dir.exists());
        // kube-proxy's sets are not this agent's.
        assert!(sh("ipset list -n", None).contains("KUBE-CLUSTER-IP"));

        let again = rt.block_on(cleanup_self(&o)).unwrap();
        assert!(again.is_ok() && again.removed.is_empty(), "{again}");
    });
    if ran.is_none() {
        eprintln!("skipped: cannot create a network namespace");
    }
}
