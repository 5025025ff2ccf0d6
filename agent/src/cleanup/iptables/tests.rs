use std::collections::BTreeMap;

use super::*;

const REFERENCE: &str =
    include_str!("../../../../tests/fixtures/kube-proxy-v1.36/iptables-nft-save.txt");
const MIXED_V4: &str = include_str!("../../../tests/fixtures/mixed-v4.save");
const MIXED_V4_AFTER_KUBE_PROXY: &str =
    include_str!("../../../tests/fixtures/mixed-v4.after-kube-proxy.save");
const MIXED_V4_AFTER_AGENT: &str =
    include_str!("../../../tests/fixtures/mixed-v4.after-agent.save");
const MIXED_V6: &str = include_str!("../../../tests/fixtures/mixed-v6.save");
const MIXED_V6_AFTER_KUBE_PROXY: &str =
    include_str!("../../../tests/fixtures/mixed-v6.after-kube-proxy.save");

/// A model of iptables state, enough to apply a `--noflush` restore input the way the kernel
/// tools do (and to refuse what they refuse: deleting a missing rule, deleting a chain that is
/// not empty or still referenced).
#[derive(Debug, Clone, PartialEq)]
struct Table {
    /// Chain declaration lines, in order (`:NAME POLICY [c:c]`).
    chains: Vec<(String, String)>,
    /// Rule lines, in order: (chain, spec, original line).
    rules: Vec<(String, String, String)>,
}

/// Parses a dump into tables (a table appearing twice, as in a v4+v6 concatenation, gets a
/// numbered key).
fn parse(save: &str) -> Vec<(String, Table)> {
    let mut out: Vec<(String, Table)> = Vec::new();
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            out.push((
                name.to_owned(),
                Table {
                    chains: Vec::new(),
                    rules: Vec::new(),
                },
            ));
        } else if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap().to_owned();
            out.last_mut()
                .unwrap()
                .1
                .chains
                .push((name, line.to_owned()));
        } else if let Some(rule) = strip_counters(line).strip_prefix("-A ") {
            let (chain, spec) = rule.split_once(' ').unwrap();
            out.last_mut().unwrap().1.rules.push((
                chain.to_owned(),
                spec.to_owned(),
                line.to_owned(),
            ));
        }
    }
    out
}

fn apply(tables: &mut [(String, Table)], restore: &str) -> Result<(), String> {
    let mut current: Option<usize> = None;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for line in restore.lines() {
        if let Some(name) = line.strip_prefix('*') {
            // The n-th occurrence of a table in the restore input is the n-th in the dump.
            let n = seen.entry(name.to_owned()).or_default();
            let idx = tables
                .iter()
                .enumerate()
                .filter(|(_, (t, _))| t == name)
                .nth(*n)
                .map(|(i, _)| i)
                .ok_or(format!("no table {name}"))?;
            *n += 1;
            current = Some(idx);
            continue;
        }
        if line == "COMMIT" {
            current = None;
            continue;
        }
        let t = &mut tables[current.ok_or("outside a table")?].1;
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap();
            if t.chains.iter().any(|(c, _)| c == name) {
                t.rules.retain(|(c, _, _)| c != name);
            } else {
                return Err(format!("restore declares unknown chain {name}"));
            }
        } else if let Some(rest) = line.strip_prefix("-D ") {
            let (chain, spec) = rest.split_once(' ').unwrap();
            let pos = t
                .rules
                .iter()
                .position(|(c, s, _)| c == chain && s == spec)
                .ok_or(format!("-D of a missing rule: {line}"))?;
            t.rules.remove(pos);
        } else if let Some(chain) = line.strip_prefix("-X ") {
            if t.rules.iter().any(|(c, _, _)| c == chain) {
                return Err(format!("-X of non-empty chain {chain}"));
            }
            if t.rules
                .iter()
                .any(|(_, s, _)| target(s).as_deref() == Some(chain))
            {
                return Err(format!("-X of referenced chain {chain}"));
            }
            t.chains.retain(|(c, _)| c != chain);
        } else {
            return Err(format!("unexpected restore line {line:?}"));
        }
    }
    Ok(())
}

/// The meaningful lines of a dump (comments dropped), as `iptables-save` would print the state.
fn render(tables: &[(String, Table)]) -> Vec<String> {
    let mut out = Vec::new();
    for (name, t) in tables {
        out.push(format!("*{name}"));
        out.extend(t.chains.iter().map(|(_, l)| l.clone()));
        out.extend(t.rules.iter().map(|(_, _, l)| l.clone()));
        out.push("COMMIT".into());
    }
    out
}

fn meaningful(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

#[track_caller]
fn check(before: &str, owner: Owner, after: &str) {
    let restore = removal_restore_input(before, owner);
    let mut tables = parse(before);
    apply(&mut tables, &restore).unwrap_or_else(|e| panic!("{e}\n{restore}"));
    assert_eq!(
        render(&tables),
        meaningful(after),
        "restore input:\n{restore}"
    );
}

#[test]
fn reference_dump_loses_every_kube_proxy_chain_and_nothing_else() {
    let restore = removal_restore_input(REFERENCE, Owner::KubeProxy);
    let mut tables = parse(REFERENCE);
    apply(&mut tables, &restore).unwrap();
    for (_, t) in &tables {
        assert!(
            t.chains.iter().all(|(c, _)| !c.starts_with("KUBE-")),
            "{:?}",
            t.chains
        );
        assert!(t.rules.is_empty(), "{:?}", t.rules);
    }
    // Built-in chains stay, with their policies and counters.
    assert!(render(&tables).contains(&":INPUT ACCEPT [0:0]".to_owned()));
}

#[test]
fn reference_restore_input_is_exact() {
    let v4 = REFERENCE.split("# ip6tables-nft-save").next().unwrap();
    let got = removal_restore_input(v4, Owner::KubeProxy);
    let want = "\
*filter
:KUBE-FORWARD - [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-IPVS-OUT-FILTER - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SOURCE-RANGES-FIREWALL - [0:0]
-D INPUT -m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-FILTER
-D INPUT -m comment --comment \"kube-proxy firewall rules\" -j KUBE-PROXY-FIREWALL
-D INPUT -m comment --comment \"kubernetes health check rules\" -j KUBE-NODE-PORT
-D FORWARD -m comment --comment \"kube-proxy firewall rules\" -j KUBE-PROXY-FIREWALL
-D FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-D OUTPUT -m comment --comment \"kubernetes ipvs access filter\" -j KUBE-IPVS-OUT-FILTER
-X KUBE-FORWARD
-X KUBE-IPVS-FILTER
-X KUBE-IPVS-OUT-FILTER
-X KUBE-NODE-PORT
-X KUBE-PROXY-FIREWALL
-X KUBE-SOURCE-RANGES-FIREWALL
COMMIT
*nat
:KUBE-LOAD-BALANCER - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-SERVICES - [0:0]
-D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-D OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-D POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-X KUBE-LOAD-BALANCER
-X KUBE-MARK-MASQ
-X KUBE-NODE-PORT
-X KUBE-POSTROUTING
-X KUBE-SERVICES
COMMIT
";
    assert_eq!(got, want);
}

#[test]
fn mixed_ipv4_kube_proxy_cleanup_keeps_foreign_rules_byte_for_byte() {
    check(MIXED_V4, Owner::KubeProxy, MIXED_V4_AFTER_KUBE_PROXY);
}

#[test]
fn mixed_ipv6_kube_proxy_cleanup_keeps_foreign_rules_byte_for_byte() {
    check(MIXED_V6, Owner::KubeProxy, MIXED_V6_AFTER_KUBE_PROXY);
}

#[test]
fn agent_cleanup_removes_only_its_own_chains() {
    check(MIXED_V4, Owner::Agent, MIXED_V4_AFTER_AGENT);
    let p = plan(MIXED_V4, Owner::Agent);
    let chains: Vec<&str> = p
        .tables
        .iter()
        .flat_map(|t| t.chains.iter().map(String::as_str))
        .collect();
    assert_eq!(chains, ["KUBE-IPVS-BPF-FILTER", "KUBE-IPVS-BPF-NOTRACK"]);
}

#[test]
fn cleanup_is_idempotent() {
    for (before, owner) in [(MIXED_V4, Owner::KubeProxy), (MIXED_V4, Owner::Agent)] {
        let mut tables = parse(before);
        apply(&mut tables, &removal_restore_input(before, owner)).unwrap();
        let after = render(&tables).join("\n");
        assert_eq!(removal_restore_input(&after, owner), "");
        assert!(plan(&after, owner).is_empty());
    }
}

#[test]
fn nothing_to_do_on_a_node_without_kube_proxy() {
    assert_eq!(removal_restore_input("", Owner::KubeProxy), "");
    assert_eq!(
        removal_restore_input(MIXED_V4_AFTER_KUBE_PROXY, Owner::KubeProxy),
        ""
    );
}

#[test]
fn ownership_rules() {
    for (table, chain, kube_proxy, agent) in [
        ("nat", "KUBE-SERVICES", true, false),
        ("filter", "KUBE-SERVICES", true, false),
        ("nat", "KUBE-SVC-NPX46M4PTMTKRN6Y", true, false),
        ("nat", "KUBE-SEP-ID6YWIT3F6WNZ47P", true, false),
        ("nat", "KUBE-FW-ABC", true, false),
        ("nat", "KUBE-XLB-ABC", true, false),
        ("mangle", "KUBE-PROXY-CANARY", true, false),
        ("nat", "KUBE-FIREWALL", true, false),
        ("filter", "KUBE-FIREWALL", false, false),
        ("filter", "KUBE-KUBELET-CANARY", false, false),
        ("mangle", "KUBE-IPTABLES-HINT", false, false),
        ("filter", "KUBE-ROUTER-INPUT", false, false),
        ("filter", "KUBE-POD-FW-ABCDEF", false, false),
        ("filter", "KUBE-NWPLCY-ABCDEF", false, false),
        ("filter", "KUBE-IPVS-FILTER", true, false),
        ("filter", "KUBE-IPVS-BPF-FILTER", false, true),
        ("raw", "KUBE-IPVS-BPF-NOTRACK", false, true),
        ("filter", "DOCKER", false, false),
        ("filter", "INPUT", false, false),
    ] {
        assert_eq!(
            Owner::KubeProxy.owns(table, chain),
            kube_proxy,
            "{table} {chain}"
        );
        assert_eq!(Owner::Agent.owns(table, chain), agent, "{table} {chain}");
    }
}

#[test]
fn tokenizer_and_targets() {
    assert_eq!(
        tokenize(r#"-m comment --comment "a \"b\" -j X" -j KUBE-SERVICES"#),
        [
            "-m",
            "comment",
            "--comment",
            r#"a "b" -j X"#,
            "-j",
            "KUBE-SERVICES"
        ]
    );
    assert_eq!(tokenize(r#"--comment """#), ["--comment", ""]);
    assert_eq!(
        target(r#"-m comment --comment "x -j KUBE-SERVICES" -j RETURN"#).as_deref(),
        Some("RETURN")
    );
    assert_eq!(target("-g KUBE-SVC-X").as_deref(), Some("KUBE-SVC-X"));
    assert_eq!(target("--jump KUBE-SVC-X").as_deref(), Some("KUBE-SVC-X"));
    assert_eq!(target("-p tcp -m tcp --dport 80"), None);
    assert_eq!(strip_counters("[1:2] -A X -j Y"), "-A X -j Y");
    assert_eq!(strip_counters("-A X -j Y"), "-A X -j Y");
}

#[test]
fn goto_and_rules_inside_owned_chains() {
    let save = "\
*nat
:PREROUTING ACCEPT [0:0]
:FOREIGN - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-A - [0:0]
-A PREROUTING -g KUBE-SERVICES
-A FOREIGN -p tcp -j KUBE-SVC-A
-A FOREIGN -j RETURN
-A KUBE-SERVICES -j KUBE-SVC-A
COMMIT
";
    let p = plan(save, Owner::KubeProxy);
    assert_eq!(p.tables[0].chains, ["KUBE-SERVICES", "KUBE-SVC-A"]);
    assert_eq!(
        p.tables[0].jumps,
        [
            ("PREROUTING".to_owned(), "-g KUBE-SERVICES".to_owned()),
            ("FOREIGN".to_owned(), "-p tcp -j KUBE-SVC-A".to_owned())
        ]
    );
}

/// This agent's rules that sit in the built-in chains (its accept of service traffic first in
/// INPUT and FORWARD, the switch window's accept, the raw OUTPUT jump) are its own by their
/// comment: its cleanup removes them with its chains; kube-proxy's cleanup leaves them.
#[test]
fn agent_cleanup_removes_its_rules_in_builtin_chains() {
    const BEFORE: &str = r#"*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-IPVS-BPF-OUTPUT - [0:0]
-A OUTPUT -m mark ! --mark 0x200000/0x200000 -m comment --comment "kube-ipvs-bpf: host traffic, not untracked yet" -j KUBE-IPVS-BPF-OUTPUT
-A OUTPUT -p udp --dport 53 -j CT --notrack
-A KUBE-IPVS-BPF-OUTPUT -m bpf --object-pinned /sys/fs/bpf/kube-ipvs-bpf/v2/prog_xt_svc -m comment --comment "kube-ipvs-bpf: host service traffic is not tracked" -j CT --notrack
COMMIT
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment "kube-ipvs-bpf: connections open before the switch from kube-proxy" -j ACCEPT
-A INPUT -m mark --mark 0x200000/0x200000 -m comment --comment "kube-ipvs-bpf: service traffic (untracked)" -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -m comment --comment "ssh" -p tcp --dport 22 -j ACCEPT
-A FORWARD -m mark --mark 0x200000/0x200000 -m comment --comment "kube-ipvs-bpf: service traffic (untracked)" -j ACCEPT
COMMIT
"#;
    const AFTER: &str = r#"*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p udp --dport 53 -j CT --notrack
COMMIT
*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -m comment --comment "ssh" -p tcp --dport 22 -j ACCEPT
COMMIT
"#;
    check(BEFORE, Owner::Agent, AFTER);
    assert_eq!(removal_restore_input(BEFORE, Owner::KubeProxy), "");
}
