//! The agent's iptables rules, written with `iptables-restore --noflush` (and
//! `ip6tables-restore`), as kube-proxy writes its own: the one place the agent runs a program
//! rather than a library. Every chain is named `KUBE-IPVS-BPF-*`; the only changes outside them
//! are the jumps inserted first in the built-in chains.
//!
//! - raw PREROUTING, only where the kernel has no nf_tables ([`Notrack::Iptables`]): packets
//!   carrying the service mark (set by TC ingress) are not tracked. Elsewhere the agent's own
//!   nf_tables table does this natively (`datapath::notrack`), and a PREROUTING chain of ours
//!   left by an older agent is removed;
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
//!
//! Which iptables: the configured backend, or with `default` the one the node's firewall uses,
//! found as kube-proxy's iptables wrapper finds it ([`detect_backend`]).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

pub const CHAIN_PREROUTING: &str = "KUBE-IPVS-BPF-PREROUTING";
pub const CHAIN_OUTPUT: &str = "KUBE-IPVS-BPF-OUTPUT";
pub const CHAIN_FILTER: &str = "KUBE-IPVS-BPF-FILTER";

/// The comment of the filter rule kept only while the switch window from kube-proxy is open.
pub const SWITCH_ACCEPT: &str = "kube-ipvs-bpf: connections open before the switch from kube-proxy";

/// The iptables tables the agent keeps rules in.
pub const TABLES: [&str; 2] = ["raw", "filter"];

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

/// Where service traffic is untracked at PREROUTING.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notrack {
    /// The agent's nf_tables table (`datapath::notrack`): no iptables PREROUTING chain.
    Nftables,
    /// The kernel has no nf_tables: `raw PREROUTING -m mark … -j CT --notrack`.
    Iptables,
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
/// `ct state established,related`). With [`Notrack::Nftables`] there is no PREROUTING chain of
/// ours: one found in `save` is removed with its jump.
pub fn restore_input(
    save: &str,
    mark_svc: u32,
    xt_svc_pin: &Path,
    switch_window: bool,
    notrack: Notrack,
) -> String {
    let has_jump = |chain: &str, target: &str| {
        save.lines()
            .any(|l| l.starts_with(&format!("-A {chain} ")) && l.contains(&format!("-j {target}")))
    };
    let mut out = String::new();
    out.push_str("*raw\n");
    let has_prerouting = save
        .lines()
        .any(|l| l.starts_with(&format!(":{CHAIN_PREROUTING} ")));
    if notrack == Notrack::Iptables || has_prerouting {
        out.push_str(&format!(":{CHAIN_PREROUTING} - [0:0]\n"));
    }
    out.push_str(&format!(":{CHAIN_OUTPUT} - [0:0]\n"));
    match notrack {
        Notrack::Iptables => {
            out.push_str(&format!(
                "-A {CHAIN_PREROUTING} -m mark --mark {mark_svc:#x}/{mark_svc:#x} -m comment --comment \"kube-ipvs-bpf: service traffic is not tracked\" -j CT --notrack\n"
            ));
            if !has_jump("PREROUTING", CHAIN_PREROUTING) {
                out.push_str(&format!("-I PREROUTING 1 -j {CHAIN_PREROUTING}\n"));
            }
        }
        Notrack::Nftables => {
            for l in save.lines() {
                if l.starts_with("-A PREROUTING ") && l.ends_with(&format!("-j {CHAIN_PREROUTING}"))
                {
                    out.push_str(&format!("{}\n", l.replacen("-A ", "-D ", 1)));
                }
            }
            if has_prerouting {
                out.push_str(&format!("-X {CHAIN_PREROUTING}\n"));
            }
        }
    }
    // IPVS sends what it forwards through LOCAL_OUT: those packets carry the mark TC ingress
    // set and were untracked in PREROUTING, so they skip the (costlier) program match.
    out.push_str(&format!(
        "-A {CHAIN_OUTPUT} -m mark --mark {mark_svc:#x}/{mark_svc:#x} -m comment --comment \"kube-ipvs-bpf: forwarded by IPVS, already untracked\" -j RETURN\n"
    ));
    out.push_str(&format!(
        "-A {CHAIN_OUTPUT} -m bpf --object-pinned {} -m comment --comment \"kube-ipvs-bpf: host service traffic is not tracked\" -j CT --notrack\n",
        xt_svc_pin.display()
    ));
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
    for table in TABLES {
        save.push_str(&run(&backend.program(ipv6, "save"), &["-t", table], None)?);
    }
    Ok(save)
}

/// `IPT_SO_GET_INFO` and `IP6T_SO_GET_INFO` (`IPT_BASE_CTL` + 0, at `SOL_IP` and `SOL_IPV6`).
const SO_GET_INFO: libc::c_int = 64;

/// The size of `struct ipt_getinfo` (and `ip6t_getinfo`): the table's name (32 bytes), then
/// `valid_hooks`, `hook_entry[5]`, `underflow[5]`, `num_entries` and `size` (u32 each).
const GETINFO_LEN: usize = 84;

/// What legacy iptables (x_tables) says of table `table` of one family without listing it:
/// its hooks, the offsets of their entries and underflows, its number of entries and its size
/// in bytes (`struct ipt_getinfo` after the name, 52 bytes). Adding, deleting or replacing a
/// rule by one of another size changes it; counters do not. One `getsockopt` on a raw socket
/// (`CAP_NET_RAW`); the kernel loads the table's module when it is not loaded.
pub fn legacy_table_info(ipv6: bool, table: &str) -> std::io::Result<Vec<u8>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let (domain, level) = if ipv6 {
        (libc::AF_INET6, libc::SOL_IPV6)
    } else {
        (libc::AF_INET, libc::SOL_IP)
    };
    // SAFETY: socket(2) has no memory arguments; the descriptor is owned from here on.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut info = [0u8; GETINFO_LEN];
    let name = table.as_bytes();
    if name.len() >= 32 {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    info[..name.len()].copy_from_slice(name);
    let mut len = GETINFO_LEN as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes, as the kernel requires exactly.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            SO_GET_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info[32..].to_vec())
}

/// The comments of the rules in each chain of ours (`restore_input` writes them); the
/// PREROUTING chain only with [`Notrack::Iptables`].
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
/// rules: a chain, one of its rules (known by its comment), or a jump; the switch window's
/// accept where it is not wanted (or missing where it is); with [`Notrack::Nftables`], a
/// PREROUTING chain of ours left over. Empty: all as wanted.
pub fn missing(save: &str, switch_window: bool, notrack: Notrack) -> Vec<String> {
    let mut out = Vec::new();
    let has_chain = |chain: &str| save.lines().any(|l| l.starts_with(&format!(":{chain} ")));
    for (chain, comments) in CHAIN_RULES {
        if chain == CHAIN_PREROUTING && notrack == Notrack::Nftables {
            if has_chain(chain) {
                out.push(format!(
                    "chain {chain} left over (nf_tables untracks service traffic)"
                ));
            }
            continue;
        }
        if !has_chain(chain) {
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
        if chain == CHAIN_PREROUTING && notrack == Notrack::Nftables {
            continue;
        }
        let jump = save.lines().any(|l| {
            l.starts_with(&format!("-A {builtin} ")) && l.ends_with(&format!("-j {chain}"))
        });
        if !jump {
            out.push(format!("jump {builtin} -> {chain} missing"));
        }
    }
    out
}

/// Writes the rules for one family (`switch_window`, `notrack`: see [`restore_input`]).
pub fn apply(
    backend: Backend,
    ipv6: bool,
    mark_svc: u32,
    xt_svc_pin: &Path,
    switch_window: bool,
    notrack: Notrack,
) -> Result<(), RulesError> {
    let save = save(backend, ipv6)?;
    restore(
        backend,
        ipv6,
        &restore_input(&save, mark_svc, xt_svc_pin, switch_window, notrack),
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
    notrack: Notrack,
) -> Result<Vec<String>, RulesError> {
    let save = save(backend, ipv6)?;
    let missing = missing(&save, switch_window, notrack);
    if !missing.is_empty() {
        restore(
            backend,
            ipv6,
            &restore_input(&save, mark_svc, xt_svc_pin, switch_window, notrack),
        )?;
    }
    Ok(missing)
}

/// The chains kubelet creates in the mangle table (1.17 on), which kube-proxy's iptables
/// wrapper looks for first.
const KUBELET_HINTS: [&str; 2] = [":KUBE-IPTABLES-HINT ", ":KUBE-KUBELET-CANARY "];

/// What the node's rules say about its iptables, as `iptables-*-save` printed them (IPv4 and
/// IPv6 concatenated; `None`: that program did not run).
#[derive(Debug, Default, Clone)]
pub struct SavedRules {
    /// `iptables-nft-save -t mangle` and `ip6tables-nft-save -t mangle`.
    pub nft_mangle: Option<String>,
    /// `iptables-legacy-save` and `ip6tables-legacy-save`, every table (`-t mangle` would
    /// create the legacy mangle table).
    pub legacy_all: Option<String>,
    /// `iptables-nft-save` and `ip6tables-nft-save`, every table.
    pub nft_all: Option<String>,
}

/// The backend the node's firewall uses, decided as kube-proxy's iptables wrapper
/// (kubernetes-sigs/iptables-wrappers) decides it: kubelet's hint chains in iptables-nft's
/// mangle table, else in iptables-legacy's; else the variant with more rules (legacy only when
/// it has strictly more). Our own rules are not counted (they follow this choice). `None`: no
/// variant's save ran (only `iptables` as installed).
pub fn choose_backend(saved: &SavedRules) -> Option<(Backend, &'static str)> {
    let hinted = |s: &Option<String>| {
        s.as_deref().is_some_and(|s| {
            s.lines()
                .any(|l| KUBELET_HINTS.iter().any(|h| l.starts_with(h)))
        })
    };
    let rules = |s: &Option<String>| {
        s.as_deref().map_or(0, |s| {
            s.lines()
                .filter(|l| l.starts_with('-') && !l.contains("KUBE-IPVS-BPF-"))
                .count()
        })
    };
    if saved.nft_mangle.is_none() && saved.legacy_all.is_none() && saved.nft_all.is_none() {
        return None;
    }
    if hinted(&saved.nft_mangle) {
        return Some((
            Backend::Nft,
            "kubelet's KUBE-IPTABLES-HINT chain is in iptables-nft",
        ));
    }
    if hinted(&saved.legacy_all) {
        return Some((
            Backend::Legacy,
            "kubelet's KUBE-IPTABLES-HINT chain is in iptables-legacy",
        ));
    }
    if saved.legacy_all.is_some() && rules(&saved.legacy_all) > rules(&saved.nft_all) {
        return Some((
            Backend::Legacy,
            "iptables-legacy holds more rules than iptables-nft",
        ));
    }
    if saved.nft_all.is_some() {
        return Some((
            Backend::Nft,
            "iptables-nft holds at least as many rules as iptables-legacy",
        ));
    }
    Some((Backend::Legacy, "only iptables-legacy is installed"))
}

/// The output of both families' `*-save` of one variant (`None` when neither ran).
fn save_both(variant: &str, args: &[&str]) -> Option<String> {
    let mut out: Option<String> = None;
    for base in ["iptables", "ip6tables"] {
        if let Ok(s) = run(&format!("{base}-{variant}-save"), args, None) {
            out.get_or_insert_with(String::new).push_str(&s);
        }
    }
    out
}

/// Reads the node's rules ([`SavedRules`]) and decides the backend ([`choose_backend`]);
/// [`Backend::Default`] when no variant's save runs.
pub fn detect_backend() -> (Backend, &'static str) {
    let saved = SavedRules {
        nft_mangle: save_both("nft", &["-t", "mangle"]),
        legacy_all: save_both("legacy", &[]),
        nft_all: save_both("nft", &[]),
    };
    choose_backend(&saved).unwrap_or((
        Backend::Default,
        "neither iptables-nft-save nor iptables-legacy-save runs: iptables as installed",
    ))
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
            Notrack::Iptables,
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
        let again = restore_input(save, 0x200000, pin, false, Notrack::Iptables);
        assert!(!again.contains("-I "), "{again}");
        assert!(again.contains(":KUBE-IPVS-BPF-FILTER - [0:0]"));
    }

    #[test]
    fn missing_names_each_absent_chain_rule_and_jump() {
        let pin = Path::new("/sys/fs/bpf/kube-ipvs-bpf/v2/prog_xt_svc");
        // What the restore input creates, as iptables-save prints it (jumps appended).
        let mut save = String::new();
        for l in restore_input("", 0x200000, pin, false, Notrack::Iptables).lines() {
            let l = l.replace("-I ", "-A ").replace(" 1 -j", " -j");
            save.push_str(&l);
            save.push('\n');
        }
        assert_eq!(
            missing(&save, false, Notrack::Iptables),
            Vec::<String>::new(),
            "{save}"
        );
        let without = |pred: &dyn Fn(&str) -> bool| -> String {
            save.lines()
                .filter(|l| !pred(l))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        assert_eq!(
            missing(
                &without(&|l| l == "-A INPUT -j KUBE-IPVS-BPF-FILTER"),
                false,
                Notrack::Iptables
            ),
            vec!["jump INPUT -> KUBE-IPVS-BPF-FILTER missing"]
        );
        assert_eq!(
            missing(
                &without(&|l| l.contains("host service traffic")),
                false,
                Notrack::Iptables
            ),
            vec![
                "rule \"kube-ipvs-bpf: host service traffic is not tracked\" missing from KUBE-IPVS-BPF-OUTPUT"
            ]
        );
        // A flushed ruleset: everything.
        assert_eq!(missing("", false, Notrack::Iptables).len(), 7);
    }

    #[test]
    fn the_switch_windows_accept_is_wanted_while_it_is_open_and_unwanted_after() {
        let pin = Path::new("/sys/fs/bpf/kube-ipvs-bpf/v2/prog_xt_svc");
        let as_saved = |window: bool| -> String {
            restore_input("", 0x200000, pin, window, Notrack::Iptables)
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
        assert!(missing(&open, true, Notrack::Iptables).is_empty());
        assert!(missing(&closed, false, Notrack::Iptables).is_empty());
        // Opened: the accept is missing; closed: it is left over. Either way a rewrite.
        assert_eq!(
            missing(&closed, true, Notrack::Iptables),
            vec![format!(
                "rule \"{SWITCH_ACCEPT}\" missing from KUBE-IPVS-BPF-FILTER"
            )]
        );
        assert_eq!(
            missing(&open, false, Notrack::Iptables),
            vec![format!(
                "rule \"{SWITCH_ACCEPT}\" in KUBE-IPVS-BPF-FILTER after the switch window closed"
            )]
        );
    }

    /// `restore_input`'s output as `iptables-save` would print it afterwards (jumps appended).
    fn as_saved(input: &str) -> String {
        input
            .lines()
            .filter(|l| !l.starts_with("-D ") && !l.starts_with("-X "))
            .map(|l| format!("{}\n", l.replace("-I ", "-A ").replace(" 1 -j", " -j")))
            .collect()
    }

    #[test]
    fn with_nftables_notrack_there_is_no_prerouting_chain_and_an_old_one_is_removed() {
        let pin = Path::new("/sys/fs/bpf/kube-ipvs-bpf/v2/prog_xt_svc");
        let fresh = restore_input("", 0x200000, pin, false, Notrack::Nftables);
        assert!(!fresh.contains(CHAIN_PREROUTING), "{fresh}");
        assert!(fresh.contains("-I OUTPUT 1 -j KUBE-IPVS-BPF-OUTPUT\n"));
        assert!(fresh.contains("-m bpf --object-pinned"));
        assert!(fresh.contains("-I INPUT 1 -j KUBE-IPVS-BPF-FILTER\n"));
        let saved = as_saved(&fresh);
        assert!(missing(&saved, false, Notrack::Nftables).is_empty());
        // The iptables-only ruleset lacks nothing but has a PREROUTING chain too many.
        let old = as_saved(&restore_input("", 0x200000, pin, false, Notrack::Iptables));
        assert_eq!(
            missing(&old, false, Notrack::Nftables),
            vec![format!(
                "chain {CHAIN_PREROUTING} left over (nf_tables untracks service traffic)"
            )]
        );
        // Rewriting it flushes the chain, deletes the jump, then the chain.
        let upgrade = restore_input(&old, 0x200000, pin, false, Notrack::Nftables);
        let flush = upgrade
            .find(":KUBE-IPVS-BPF-PREROUTING - [0:0]\n")
            .expect("flush");
        let unjump = upgrade
            .find("-D PREROUTING -j KUBE-IPVS-BPF-PREROUTING\n")
            .expect("jump deleted");
        let delete = upgrade
            .find("-X KUBE-IPVS-BPF-PREROUTING\n")
            .expect("chain deleted");
        assert!(flush < unjump && unjump < delete, "{upgrade}");
        assert!(
            !upgrade.contains("-A KUBE-IPVS-BPF-PREROUTING"),
            "{upgrade}"
        );
        // And the other way: a kernel without nf_tables wants the chain back.
        assert_eq!(
            missing(&saved, false, Notrack::Iptables),
            vec![
                format!("chain {CHAIN_PREROUTING} missing"),
                format!("jump PREROUTING -> {CHAIN_PREROUTING} missing"),
            ]
        );
    }

    fn saved(nft_mangle: Option<&str>, legacy: Option<&str>, nft: Option<&str>) -> SavedRules {
        SavedRules {
            nft_mangle: nft_mangle.map(str::to_owned),
            legacy_all: legacy.map(str::to_owned),
            nft_all: nft.map(str::to_owned),
        }
    }

    #[test]
    fn the_backend_is_the_one_kubelets_hint_chain_or_most_rules_are_in() {
        let hint = "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
        let canary = "*mangle\n:KUBE-KUBELET-CANARY - [0:0]\nCOMMIT\n";
        let two = "*filter\n-A INPUT -j ACCEPT\n-A FORWARD -j DROP\nCOMMIT\n";
        let one = "*filter\n-A INPUT -j ACCEPT\nCOMMIT\n";
        let b = |s: SavedRules| choose_backend(&s).map(|(b, _)| b);
        assert_eq!(
            b(saved(Some(hint), Some(two), Some(""))),
            Some(Backend::Nft)
        );
        assert_eq!(
            b(saved(Some(canary), Some(two), Some(""))),
            Some(Backend::Nft)
        );
        // The hint in legacy wins over more rules in nft.
        let legacy_hint = format!("{hint}{one}");
        assert_eq!(
            b(saved(Some(""), Some(&legacy_hint), Some(two))),
            Some(Backend::Legacy)
        );
        // No hint: legacy only with strictly more rules.
        assert_eq!(
            b(saved(Some(""), Some(two), Some(one))),
            Some(Backend::Legacy)
        );
        assert_eq!(b(saved(Some(""), Some(one), Some(one))), Some(Backend::Nft));
        assert_eq!(b(saved(Some(""), Some(""), Some(""))), Some(Backend::Nft));
        // Our own rules do not count (they follow this choice).
        let ours = format!(
            "*filter\n-A INPUT -j {CHAIN_FILTER}\n-A FORWARD -j {CHAIN_FILTER}\n-A {CHAIN_FILTER} -j ACCEPT\nCOMMIT\n"
        );
        assert_eq!(
            b(saved(Some(""), Some(&ours), Some(one))),
            Some(Backend::Nft)
        );
        // One variant installed.
        assert_eq!(b(saved(None, Some(""), None)), Some(Backend::Legacy));
        assert_eq!(b(saved(Some(""), None, Some(""))), Some(Backend::Nft));
        assert_eq!(b(saved(None, None, None)), None);
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
