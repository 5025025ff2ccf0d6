//! The agent's iptables rules, written with `iptables-restore --noflush` (and
//! `ip6tables-restore`), as kube-proxy writes its own: the one place the agent runs a program
//! rather than a library. Every chain is named `KUBE-IPVS-BPF-*`; the only changes outside them
//! are the jumps inserted first in the built-in chains.
//!
//! - raw PREROUTING: packets carrying the service mark (set by TC ingress) are not tracked;
//! - raw OUTPUT: host-originated service traffic never crosses TC ingress, so the `xt_svc`
//!   program (`-m bpf --object-pinned`) recognizes it from the same maps, and it is not tracked;
//! - filter INPUT and FORWARD: untracked packets never match `ct state established`, so where a
//!   firewall drops by default the service-marked packets are accepted here, before it (as
//!   kube-proxy keeps KUBE-FORWARD). An nftables-only firewall in another table cannot be
//!   overridden this way: its drop still applies (docs/datapath.md). While the switch window
//!   from kube-proxy is open (docs/switching.md), the filter chain also accepts `ct state
//!   established,related`, as kube-proxy's KUBE-FORWARD did, so the connections kube-proxy
//!   opened (tracked) pass a firewall that drops by default once its chains are gone; the rule
//!   goes when the window closes ([`SWITCH_ACCEPT`]).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

pub const CHAIN_PREROUTING: &str = "KUBE-IPVS-BPF-PREROUTING";
pub const CHAIN_OUTPUT: &str = "KUBE-IPVS-BPF-OUTPUT";
pub const CHAIN_FILTER: &str = "KUBE-IPVS-BPF-FILTER";

/// The comment of the filter rule kept only while the switch window from kube-proxy is open.
pub const SWITCH_ACCEPT: &str = "kube-ipvs-bpf: connections open before the switch from kube-proxy";

/// Errors running iptables-save/-restore.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("running {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed: {stderr}")]
    Failed { program: String, stderr: String },
}

/// Which iptables binaries to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-restore` as installed (Debian's alternatives pick nft by default).
    Default,
    Nft,
    Legacy,
}

impl Backend {
    fn program(self, ipv6: bool, what: &str) -> String {
        let base = if ipv6 { "ip6tables" } else { "iptables" };
        match self {
            Backend::Default => format!("{base}-{what}"),
            Backend::Nft => format!("{base}-nft-{what}"),
            Backend::Legacy => format!("{base}-legacy-{what}"),
        }
    }
}

/// The restore input that (re)writes the agent's chains, plus a jump for each built-in chain
/// whose current rules (`save`, the output of `iptables-save` for that table set) lack it.
/// `switch_window`: the switch window from kube-proxy is open (the filter chain also accepts
/// `ct state established,related`).
pub fn restore_input(save: &str, mark_svc: u32, xt_svc_pin: &Path, switch_window: bool) -> String {
    let has_jump = |chain: &str, target: &str| {
        save.lines()
            .any(|l| l.starts_with(&format!("-A {chain} ")) && l.contains(&format!("-j {target}")))
    };
    let mut out = String::new();
    out.push_str("*raw\n");
    out.push_str(&format!(
        ":{CHAIN_PREROUTING} - [0:0]\n:{CHAIN_OUTPUT} - [0:0]\n"
    ));
    out.push_str(&format!(
        "-A {CHAIN_PREROUTING} -m mark --mark {mark_svc:#x}/{mark_svc:#x} -m comment --comment \"kube-ipvs-bpf: service traffic is not tracked\" -j CT --notrack\n"
    ));
    // IPVS sends what it forwards through LOCAL_OUT: those packets carry the mark TC ingress
    // set and were untracked in PREROUTING, so they skip the (costlier) program match.
    out.push_str(&format!(
        "-A {CHAIN_OUTPUT} -m mark --mark {mark_svc:#x}/{mark_svc:#x} -m comment --comment \"kube-ipvs-bpf: forwarded by IPVS, already untracked\" -j RETURN\n"
    ));
    out.push_str(&format!(
        "-A {CHAIN_OUTPUT} -m bpf --object-pinned {} -m comment --comment \"kube-ipvs-bpf: host service traffic is not tracked\" -j CT --notrack\n",
        xt_svc_pin.display()
    ));
    if !has_jump("PREROUTING", CHAIN_PREROUTING) {
        out.push_str(&format!("-I PREROUTING 1 -j {CHAIN_PREROUTING}\n"));
    }
    if !has_jump("OUTPUT", CHAIN_OUTPUT) {
        out.push_str(&format!("-I OUTPUT 1 -j {CHAIN_OUTPUT}\n"));
    }
    out.push_str("COMMIT\n*filter\n");
    out.push_str(&format!(":{CHAIN_FILTER} - [0:0]\n"));
    out.push_str(&format!(
        "-A {CHAIN_FILTER} -m mark --mark {mark_svc:#x}/{mark_svc:#x} -m comment --comment \"kube-ipvs-bpf: service traffic (untracked)\" -j ACCEPT\n"
    ));
    if switch_window {
        out.push_str(&format!(
            "-A {CHAIN_FILTER} -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"{SWITCH_ACCEPT}\" -j ACCEPT\n"
        ));
    }
    for chain in ["INPUT", "FORWARD"] {
        if !has_jump(chain, CHAIN_FILTER) {
            out.push_str(&format!("-I {chain} 1 -j {CHAIN_FILTER}\n"));
        }
    }
    out.push_str("COMMIT\n");
    out
}

fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, RulesError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RulesError::Spawn {
            program: program.to_string(),
            source,
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|source| RulesError::Spawn {
                program: program.to_string(),
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|source| RulesError::Spawn {
            program: program.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(RulesError::Failed {
            program: program.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The current rules of the two tables the agent writes to (`raw`, `filter`), for one family.
fn save(backend: Backend, ipv6: bool) -> Result<String, RulesError> {
    let mut save = String::new();
    for table in ["raw", "filter"] {
        save.push_str(&run(&backend.program(ipv6, "save"), &["-t", table], None)?);
    }
    Ok(save)
}

/// The comments of the rules in each chain of ours (`restore_input` writes them).
const CHAIN_RULES: [(&str, &[&str]); 3] = [
    (
        CHAIN_PREROUTING,
        &["kube-ipvs-bpf: service traffic is not tracked"],
    ),
    (
        CHAIN_OUTPUT,
        &[
            "kube-ipvs-bpf: forwarded by IPVS, already untracked",
            "kube-ipvs-bpf: host service traffic is not tracked",
        ],
    ),
    (
        CHAIN_FILTER,
        &["kube-ipvs-bpf: service traffic (untracked)"],
    ),
];

/// The jumps into our chains: (built-in chain, our chain).
const JUMPS: [(&str, &str); 4] = [
    ("PREROUTING", CHAIN_PREROUTING),
    ("OUTPUT", CHAIN_OUTPUT),
    ("INPUT", CHAIN_FILTER),
    ("FORWARD", CHAIN_FILTER),
];

/// What `save` (the `raw` and `filter` tables as `iptables-save` prints them) lacks of our
/// rules: a chain, one of its rules (known by its comment), or a jump; and the switch window's
/// accept where it is not wanted (or missing where it is). Empty: all as wanted.
pub fn missing(save: &str, switch_window: bool) -> Vec<String> {
    let mut out = Vec::new();
    for (chain, comments) in CHAIN_RULES {
        if !save.lines().any(|l| l.starts_with(&format!(":{chain} "))) {
            out.push(format!("chain {chain} missing"));
            continue;
        }
        let rules: Vec<&str> = save
            .lines()
            .filter(|l| l.starts_with(&format!("-A {chain} ")))
            .collect();
        for c in comments.iter() {
            if !rules.iter().any(|r| r.contains(c)) {
                out.push(format!("rule \"{c}\" missing from {chain}"));
            }
        }
        if chain == CHAIN_FILTER {
            match (
                switch_window,
                rules.iter().any(|r| r.contains(SWITCH_ACCEPT)),
            ) {
                (true, false) => out.push(format!("rule \"{SWITCH_ACCEPT}\" missing from {chain}")),
                (false, true) => out.push(format!(
                    "rule \"{SWITCH_ACCEPT}\" in {chain} after the switch window closed"
                )),
                _ => {}
            }
        }
    }
    for (builtin, chain) in JUMPS {
        let jump = save.lines().any(|l| {
            l.starts_with(&format!("-A {builtin} ")) && l.ends_with(&format!("-j {chain}"))
        });
        if !jump {
            out.push(format!("jump {builtin} -> {chain} missing"));
        }
    }
    out
}

/// Writes the rules for one family (`switch_window`: see [`restore_input`]).
pub fn apply(
    backend: Backend,
    ipv6: bool,
    mark_svc: u32,
    xt_svc_pin: &Path,
    switch_window: bool,
) -> Result<(), RulesError> {
    let save = save(backend, ipv6)?;
    restore(
        backend,
        ipv6,
        &restore_input(&save, mark_svc, xt_svc_pin, switch_window),
    )
}

fn restore(backend: Backend, ipv6: bool, input: &str) -> Result<(), RulesError> {
    run(
        &backend.program(ipv6, "restore"),
        &["--noflush"],
        Some(input),
    )?;
    Ok(())
}

/// Checks the rules of one family against the kernel's (`iptables-save`) and rewrites them when
/// anything is missing; returns what was missing (empty: nothing was written).
pub fn repair(
    backend: Backend,
    ipv6: bool,
    mark_svc: u32,
    xt_svc_pin: &Path,
    switch_window: bool,
) -> Result<Vec<String>, RulesError> {
    let save = save(backend, ipv6)?;
    let missing = missing(&save, switch_window);
    if !missing.is_empty() {
        restore(
            backend,
            ipv6,
            &restore_input(&save, mark_svc, xt_svc_pin, switch_window),
        )?;
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_run_inserts_jumps_and_later_runs_only_rewrite_the_chains() {
        let pin = Path::new("/sys/fs/bpf/kube-ipvs-bpf/v1/prog_xt_svc");
        let first = restore_input(
            "*raw\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n",
            0x200000,
            pin,
            false,
        );
        assert!(first.contains("-I PREROUTING 1 -j KUBE-IPVS-BPF-PREROUTING\n"));
        assert!(first.contains("-I OUTPUT 1 -j KUBE-IPVS-BPF-OUTPUT\n"));
        assert!(first.contains("-I INPUT 1 -j KUBE-IPVS-BPF-FILTER\n"));
        assert!(first.contains("-I FORWARD 1 -j KUBE-IPVS-BPF-FILTER\n"));
        assert!(first.contains("-m mark --mark 0x200000/0x200000"));
        assert!(first.contains("-m bpf --object-pinned /sys/fs/bpf/kube-ipvs-bpf/v1/prog_xt_svc"));
        // Forwarded (already marked) packets return before the program match.
        let ret = first
            .find("-A KUBE-IPVS-BPF-OUTPUT -m mark --mark 0x200000/0x200000")
            .expect("mark return in OUTPUT");
        assert!(ret < first.find("-m bpf").expect("bpf match"), "{first}");
        assert!(
            first[ret..]
                .lines()
                .next()
                .is_some_and(|l| l.ends_with("-j RETURN"))
        );
        let save = "*raw\n-A PREROUTING -j KUBE-IPVS-BPF-PREROUTING\n-A OUTPUT -j KUBE-IPVS-BPF-OUTPUT\nCOMMIT\n*filter\n-A INPUT -j KUBE-IPVS-BPF-FILTER\n-A FORWARD -j KUBE-IPVS-BPF-FILTER\nCOMMIT\n";
        let again = restore_input(save, 0x200000, pin, false);
        assert!(!again.contains("-I "), "{again}");
        assert!(again.contains(":KUBE-IPVS-BPF-FILTER - [0:0]"));
    }

    #[test]
    fn missing_names_each_absent_chain_rule_and_jump() {
        let pin = Path::new("/sys/fs/bpf/kube-ipvs-bpf/v2/prog_xt_svc");
        // What the restore input creates, as iptables-save prints it (jumps appended).
        let mut save = String::new();
        for l in restore_input("", 0x200000, pin, false).lines() {
            let l = l.replace("-I ", "-A ").replace(" 1 -j", " -j");
            save.push_str(&l);
            save.push('\n');
        }
        assert_eq!(missing(&save, false), Vec::<String>::new(), "{save}");
        let without = |pred: &dyn Fn(&str) -> bool| -> String {
            save.lines()
                .filter(|l| !pred(l))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        assert_eq!(
            missing(
                &without(&|l| l == "-A INPUT -j KUBE-IPVS-BPF-FILTER"),
                false
            ),
            vec!["jump INPUT -> KUBE-IPVS-BPF-FILTER missing"]
        );
        assert_eq!(
            missing(&without(&|l| l.contains("host service traffic")), false),
            vec![
                "rule \"kube-ipvs-bpf: host service traffic is not tracked\" missing from KUBE-IPVS-BPF-OUTPUT"
            ]
        );
        // A flushed ruleset: everything.
        assert_eq!(missing("", false).len(), 7);
    }

    #[test]
    fn the_switch_windows_accept_is_wanted_while_it_is_open_and_unwanted_after() {
        let pin = Path::new("/sys/fs/bpf/kube-ipvs-bpf/v2/prog_xt_svc");
        let as_saved = |window: bool| -> String {
            restore_input("", 0x200000, pin, window)
                .lines()
                .map(|l| format!("{}\n", l.replace("-I ", "-A ").replace(" 1 -j", " -j")))
                .collect()
        };
        let (open, closed) = (as_saved(true), as_saved(false));
        let accept = open
            .lines()
            .find(|l| l.contains(SWITCH_ACCEPT))
            .expect("the window's accept");
        assert!(
            accept
                .starts_with("-A KUBE-IPVS-BPF-FILTER -m conntrack --ctstate RELATED,ESTABLISHED")
                && accept.ends_with("-j ACCEPT"),
            "{accept}"
        );
        assert!(!closed.contains(SWITCH_ACCEPT));
        assert!(missing(&open, true).is_empty());
        assert!(missing(&closed, false).is_empty());
        // Opened: the accept is missing; closed: it is left over. Either way a rewrite.
        assert_eq!(
            missing(&closed, true),
            vec![format!(
                "rule \"{SWITCH_ACCEPT}\" missing from KUBE-IPVS-BPF-FILTER"
            )]
        );
        assert_eq!(
            missing(&open, false),
            vec![format!(
                "rule \"{SWITCH_ACCEPT}\" in KUBE-IPVS-BPF-FILTER after the switch window closed"
            )]
        );
    }

    #[test]
    fn programs_per_backend_and_family() {
        assert_eq!(
            Backend::Default.program(false, "restore"),
            "iptables-restore"
        );
        assert_eq!(Backend::Nft.program(true, "save"), "ip6tables-nft-save");
        assert_eq!(
            Backend::Legacy.program(false, "save"),
            "iptables-legacy-save"
        );
    }
}
