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

use crate::cleanup::iptables;

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

/// The comment of the filter accept of service traffic, first in INPUT and FORWARD.
pub const SERVICE_ACCEPT: &str = "kube-ipvs-bpf: service traffic (untracked)";

/// The comment of the raw OUTPUT jump to [`CHAIN_OUTPUT`] (packets without the service mark).
pub const OUTPUT_JUMP: &str = "kube-ipvs-bpf: host traffic, not untracked yet";

/// The comment of the rule in [`CHAIN_OUTPUT`].
const HOST_NOTRACK: &str = "kube-ipvs-bpf: host service traffic is not tracked";

/// The comment of the rule in [`CHAIN_PREROUTING`].
const PREROUTING_NOTRACK: &str = "kube-ipvs-bpf: service traffic is not tracked";

/// Whether a rule spec (after `-A CHAIN `, as `iptables-save` prints it) is one of ours in a
/// built-in chain: it carries a comment of ours or jumps to a chain of ours (as `cleanup` finds
/// them).
fn is_ours(spec: &str) -> bool {
    iptables::has_agent_comment(spec)
        || iptables::target(spec).is_some_and(|t| t.starts_with(iptables::AGENT_CHAIN_PREFIX))
}

/// A rule of ours in a built-in chain: its table and chain, its comment (empty for the
/// PREROUTING jump) and its spec, written as `iptables-save` prints it back (legacy and nft
/// alike), so that a saved rule is this one when its text is the same.
struct BuiltinRule {
    table: &'static str,
    chain: &'static str,
    comment: &'static str,
    spec: String,
}

impl BuiltinRule {
    /// Whether saved rule `spec` (after `-A CHAIN `) is this one.
    fn matches(&self, spec: &str) -> bool {
        spec == self.spec
    }
}

/// The rules of ours that sit in built-in chains, first in them:
/// - filter INPUT and FORWARD: accept service-marked packets (untracked: `ct state
///   established` never matches them), as one rule with no jump, so that an accepted packet
///   walks one rule; while the switch window is open, also `ct state established,related`;
/// - raw OUTPUT: a jump to [`CHAIN_OUTPUT`] for packets *without* the service mark. IPVS sends
///   what it forwards through LOCAL_OUT, marked and untracked in PREROUTING already: those
///   packets fail the jump's mark match and walk nothing of ours;
/// - raw PREROUTING, with [`Notrack::Iptables`] only: the jump to [`CHAIN_PREROUTING`].
fn builtin_rules(mark_svc: u32, switch_window: bool, notrack: Notrack) -> Vec<BuiltinRule> {
    let mark = format!("{mark_svc:#x}/{mark_svc:#x}");
    let mut rules = Vec::new();
    if notrack == Notrack::Iptables {
        rules.push(BuiltinRule {
            table: "raw",
            chain: "PREROUTING",
            comment: "",
            spec: format!("-j {CHAIN_PREROUTING}"),
        });
    }
    rules.push(BuiltinRule {
        table: "raw",
        chain: "OUTPUT",
        comment: OUTPUT_JUMP,
        spec: format!(
            "-m mark ! --mark {mark} -m comment --comment \"{OUTPUT_JUMP}\" -j {CHAIN_OUTPUT}"
        ),
    });
    for chain in ["INPUT", "FORWARD"] {
        rules.push(BuiltinRule {
            table: "filter",
            chain,
            comment: SERVICE_ACCEPT,
            spec: format!(
                "-m mark --mark {mark} -m comment --comment \"{SERVICE_ACCEPT}\" -j ACCEPT"
            ),
        });
        if switch_window {
            rules.push(BuiltinRule {
                table: "filter",
                chain,
                comment: SWITCH_ACCEPT,
                spec: format!(
                    "-m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"{SWITCH_ACCEPT}\" -j ACCEPT"
                ),
            });
        }
    }
    rules
}

/// The saved rules of one table (`*table` … `COMMIT` of `save`) outside our own chains:
/// (chain, spec).
fn table_rules<'a>(save: &'a str, table: &str) -> Vec<(&'a str, &'a str)> {
    let mut in_table = false;
    let mut out = Vec::new();
    for l in save.lines() {
        if let Some(name) = l.strip_prefix('*') {
            in_table = name.trim() == table;
        } else if in_table
            && let Some((chain, spec)) = l.strip_prefix("-A ").and_then(|r| r.split_once(' '))
            && !chain.starts_with("KUBE-IPVS-BPF-")
        {
            out.push((chain, spec));
        }
    }
    out
}

/// How the built-in rules of ours in one table of `save` differ from `wanted`: the wanted rules
/// missing, and the saved rules of ours that are not wanted, as (chain, spec).
fn builtin_changes<'s, 'w>(
    save: &'s str,
    table: &str,
    wanted: &'w [BuiltinRule],
) -> (Vec<&'w BuiltinRule>, Vec<(&'s str, &'s str)>) {
    let saved = table_rules(save, table);
    let absent = wanted
        .iter()
        .filter(|w| w.table == table)
        .filter(|w| {
            !saved
                .iter()
                .any(|(c, spec)| *c == w.chain && w.matches(spec))
        })
        .collect();
    let unwanted = saved
        .into_iter()
        .filter(|(chain, spec)| {
            is_ours(spec)
                && !wanted
                    .iter()
                    .any(|w| w.table == table && w.chain == *chain && w.matches(spec))
        })
        .collect();
    (absent, unwanted)
}

/// Whether `save` declares chain `chain` (in any table: our chain names are unique).
fn has_chain(save: &str, chain: &str) -> bool {
    save.lines().any(|l| l.starts_with(&format!(":{chain} ")))
}

/// The restore input that (re)writes the agent's chains and its rules in the built-in chains
/// (`save`: the output of `iptables-save` for the `raw` and `filter` tables): each chain of ours
/// is rewritten whole; a built-in rule of ours that is missing is inserted first in its chain,
/// and one that is not wanted any more (the switch window's accept after it closed, a rule with
/// another mark, the jumps of an older agent) is deleted by its saved text. `switch_window`: the
/// switch window from kube-proxy is open. With [`Notrack::Nftables`] there is no PREROUTING
/// chain of ours: one found in `save` is removed with its jump; so is the filter chain an older
/// agent jumped to.
pub fn restore_input(
    save: &str,
    mark_svc: u32,
    xt_svc_pin: &Path,
    switch_window: bool,
    notrack: Notrack,
) -> String {
    let wanted = builtin_rules(mark_svc, switch_window, notrack);
    let mut out = String::new();
    for table in TABLES {
        out.push_str(&format!("*{table}\n"));
        // Our chains: declared (which flushes them), then their rules.
        let mut removed = Vec::new();
        if table == "raw" {
            let has_prerouting = has_chain(save, CHAIN_PREROUTING);
            if notrack == Notrack::Iptables {
                out.push_str(&format!(":{CHAIN_PREROUTING} - [0:0]\n"));
                out.push_str(&format!(
                    "-A {CHAIN_PREROUTING} -m mark --mark {mark_svc:#x}/{mark_svc:#x} -m comment --comment \"{PREROUTING_NOTRACK}\" -j CT --notrack\n"
                ));
            } else if has_prerouting {
                out.push_str(&format!(":{CHAIN_PREROUTING} - [0:0]\n"));
                removed.push(CHAIN_PREROUTING);
            }
            out.push_str(&format!(":{CHAIN_OUTPUT} - [0:0]\n"));
            out.push_str(&format!(
                "-A {CHAIN_OUTPUT} -m bpf --object-pinned {} -m comment --comment \"{HOST_NOTRACK}\" -j CT --notrack\n",
                xt_svc_pin.display()
            ));
        } else if has_chain(save, CHAIN_FILTER) {
            out.push_str(&format!(":{CHAIN_FILTER} - [0:0]\n"));
            removed.push(CHAIN_FILTER);
        }
        // Built-in rules of ours not wanted (any more), then the wanted ones missing.
        let (absent, unwanted) = builtin_changes(save, table, &wanted);
        for (chain, spec) in unwanted {
            out.push_str(&format!("-D {chain} {spec}\n"));
        }
        for w in absent {
            out.push_str(&format!("-I {} 1 {}\n", w.chain, w.spec));
        }
        for chain in removed {
            out.push_str(&format!("-X {chain}\n"));
        }
        out.push_str("COMMIT\n");
    }
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

/// What `save` (the `raw` and `filter` tables as `iptables-save` prints them) lacks of our
/// rules, or holds that is not wanted: a chain of ours or its rule (known by its comment), a
/// built-in rule of ours (the switch window's accept included, while it is open) or one left
/// over (the switch window's accept after it closed, another mark, an older agent's jumps and
/// chains). Empty: all as wanted.
pub fn missing(save: &str, mark_svc: u32, switch_window: bool, notrack: Notrack) -> Vec<String> {
    let mut out = Vec::new();
    let chain_rules = |chain: &str| -> Vec<&str> {
        save.lines()
            .filter(|l| l.starts_with(&format!("-A {chain} ")))
            .collect()
    };
    let mut chains = vec![(CHAIN_OUTPUT, HOST_NOTRACK)];
    if notrack == Notrack::Iptables {
        chains.push((CHAIN_PREROUTING, PREROUTING_NOTRACK));
    } else if has_chain(save, CHAIN_PREROUTING) {
        out.push(format!(
            "chain {CHAIN_PREROUTING} left over (nf_tables untracks service traffic)"
        ));
    }
    if has_chain(save, CHAIN_FILTER) {
        out.push(format!(
            "chain {CHAIN_FILTER} left over (the accept is in INPUT and FORWARD)"
        ));
    }
    for (chain, comment) in chains {
        if !has_chain(save, chain) {
            out.push(format!("chain {chain} missing"));
        } else if !chain_rules(chain).iter().any(|r| r.contains(comment)) {
            out.push(format!("rule \"{comment}\" missing from {chain}"));
        }
    }
    let wanted = builtin_rules(mark_svc, switch_window, notrack);
    for table in TABLES {
        let (absent, unwanted) = builtin_changes(save, table, &wanted);
        for w in absent {
            out.push(if w.comment.is_empty() {
                format!("jump {} -> {CHAIN_PREROUTING} missing", w.chain)
            } else {
                format!("rule \"{}\" missing from {}", w.comment, w.chain)
            });
        }
        for (chain, spec) in unwanted {
            out.push(if spec.contains(SWITCH_ACCEPT) {
                format!("rule \"{SWITCH_ACCEPT}\" in {chain} after the switch window closed")
            } else {
                format!("rule \"{spec}\" in {chain} not wanted")
            });
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
    let missing = missing(&save, mark_svc, switch_window, notrack);
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

    /// `restore_input`'s output as `iptables-save` would print it afterwards: inserted rules
    /// (`-I CHAIN 1`) listed as appended, deletions and chain removals gone. (Apply it to an
    /// empty `save` only: a real restore keeps the saved rules too.)
    fn as_saved(input: &str) -> String {
        input
            .lines()
            .filter(|l| !l.starts_with("-D ") && !l.starts_with("-X "))
            .map(|l| {
                let l = match l.strip_prefix("-I ").and_then(|r| r.split_once(" 1 ")) {
                    Some((chain, spec)) => format!("-A {chain} {spec}"),
                    None => l.to_owned(),
                };
                format!("{l}\n")
            })
            .collect()
    }

    const PIN: &str = "/sys/fs/bpf/kube-ipvs-bpf/v2/prog_xt_svc";
    const SERVICE_RULE: &str = "-m mark --mark 0x200000/0x200000 -m comment --comment \"kube-ipvs-bpf: service traffic (untracked)\" -j ACCEPT";
    const OUTPUT_RULE: &str = "-m mark ! --mark 0x200000/0x200000 -m comment --comment \"kube-ipvs-bpf: host traffic, not untracked yet\" -j KUBE-IPVS-BPF-OUTPUT";

    #[test]
    fn first_run_inserts_the_builtin_rules_and_later_runs_only_rewrite_the_chains() {
        let pin = Path::new(PIN);
        let first = restore_input(
            "*raw\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n",
            0x200000,
            pin,
            false,
            Notrack::Iptables,
        );
        assert!(first.contains("-I PREROUTING 1 -j KUBE-IPVS-BPF-PREROUTING\n"));
        // Service traffic is accepted by one rule first in INPUT and FORWARD, with no jump.
        assert!(
            first.contains(&format!("-I INPUT 1 {SERVICE_RULE}\n")),
            "{first}"
        );
        assert!(
            first.contains(&format!("-I FORWARD 1 {SERVICE_RULE}\n")),
            "{first}"
        );
        assert!(!first.contains(CHAIN_FILTER), "{first}");
        // Packets IPVS forwards (marked) do not jump to the program match.
        assert!(
            first.contains(&format!("-I OUTPUT 1 {OUTPUT_RULE}\n")),
            "{first}"
        );
        assert!(first.contains(&format!(
            "-A KUBE-IPVS-BPF-OUTPUT -m bpf --object-pinned {PIN} -m comment"
        )));
        assert!(!first.contains("-j RETURN"), "{first}");
        let again = restore_input(&as_saved(&first), 0x200000, pin, false, Notrack::Iptables);
        assert!(!again.contains("-I ") && !again.contains("-D "), "{again}");
        assert!(again.contains(":KUBE-IPVS-BPF-OUTPUT - [0:0]"));
    }

    #[test]
    fn an_older_agents_jumps_and_filter_chain_are_replaced() {
        let pin = Path::new(PIN);
        let old = "*raw\n:OUTPUT ACCEPT [0:0]\n:KUBE-IPVS-BPF-OUTPUT - [0:0]\n-A OUTPUT -j KUBE-IPVS-BPF-OUTPUT\n-A KUBE-IPVS-BPF-OUTPUT -m mark --mark 0x200000/0x200000 -m comment --comment \"kube-ipvs-bpf: forwarded by IPVS, already untracked\" -j RETURN\nCOMMIT\n*filter\n:INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:KUBE-IPVS-BPF-FILTER - [0:0]\n-A INPUT -j KUBE-IPVS-BPF-FILTER\n-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n-A FORWARD -j KUBE-IPVS-BPF-FILTER\n-A KUBE-IPVS-BPF-FILTER -m mark --mark 0x200000/0x200000 -m comment --comment \"kube-ipvs-bpf: service traffic (untracked)\" -j ACCEPT\nCOMMIT\n";
        let found = missing(old, 0x200000, false, Notrack::Nftables);
        assert_eq!(
            found,
            vec![
                format!("chain {CHAIN_FILTER} left over (the accept is in INPUT and FORWARD)"),
                format!("rule \"{HOST_NOTRACK}\" missing from {CHAIN_OUTPUT}"),
                format!("rule \"{OUTPUT_JUMP}\" missing from OUTPUT"),
                format!("rule \"-j {CHAIN_OUTPUT}\" in OUTPUT not wanted"),
                format!("rule \"{SERVICE_ACCEPT}\" missing from INPUT"),
                format!("rule \"{SERVICE_ACCEPT}\" missing from FORWARD"),
                format!("rule \"-j {CHAIN_FILTER}\" in INPUT not wanted"),
                format!("rule \"-j {CHAIN_FILTER}\" in FORWARD not wanted"),
            ]
        );
        let upgrade = restore_input(old, 0x200000, pin, false, Notrack::Nftables);
        // The filter chain is flushed, the jumps to it deleted, then the chain.
        let flush = upgrade
            .find(":KUBE-IPVS-BPF-FILTER - [0:0]\n")
            .expect("flush");
        let unjump = upgrade
            .find("-D INPUT -j KUBE-IPVS-BPF-FILTER\n")
            .expect("jump deleted");
        let delete = upgrade
            .find("-X KUBE-IPVS-BPF-FILTER\n")
            .expect("chain deleted");
        assert!(flush < unjump && unjump < delete, "{upgrade}");
        assert!(upgrade.contains("-D FORWARD -j KUBE-IPVS-BPF-FILTER\n"));
        assert!(upgrade.contains("-D OUTPUT -j KUBE-IPVS-BPF-OUTPUT\n"));
        assert!(upgrade.contains(&format!("-I OUTPUT 1 {OUTPUT_RULE}\n")));
        assert!(upgrade.contains(&format!("-I INPUT 1 {SERVICE_RULE}\n")));
        // The firewall's own rule is never touched.
        assert!(
            !upgrade.contains("RELATED,ESTABLISHED -j ACCEPT"),
            "{upgrade}"
        );
    }

    #[test]
    fn missing_names_each_absent_chain_and_rule() {
        let save = as_saved(&restore_input(
            "",
            0x200000,
            Path::new(PIN),
            false,
            Notrack::Iptables,
        ));
        assert_eq!(
            missing(&save, 0x200000, false, Notrack::Iptables),
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
                &without(&|l| l.starts_with("-A INPUT ")),
                0x200000,
                false,
                Notrack::Iptables
            ),
            vec![format!("rule \"{SERVICE_ACCEPT}\" missing from INPUT")]
        );
        assert_eq!(
            missing(
                &without(&|l| l.contains("host service traffic")),
                0x200000,
                false,
                Notrack::Iptables
            ),
            vec![format!(
                "rule \"{HOST_NOTRACK}\" missing from {CHAIN_OUTPUT}"
            )]
        );
        // Another service mark: each built-in rule of ours is replaced (missing, not wanted).
        assert_eq!(missing(&save, 0x400, false, Notrack::Iptables).len(), 6);
        // A flushed ruleset: everything.
        assert_eq!(missing("", 0x200000, false, Notrack::Iptables).len(), 6);
    }

    #[test]
    fn the_switch_windows_accept_is_wanted_while_it_is_open_and_unwanted_after() {
        let as_saved_at = |window: bool| -> String {
            as_saved(&restore_input(
                "",
                0x200000,
                Path::new(PIN),
                window,
                Notrack::Iptables,
            ))
        };
        let (open, closed) = (as_saved_at(true), as_saved_at(false));
        let accepts: Vec<&str> = open.lines().filter(|l| l.contains(SWITCH_ACCEPT)).collect();
        assert_eq!(accepts.len(), 2, "{open}");
        assert!(
            accepts[0].starts_with("-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED")
                && accepts[0].ends_with("-j ACCEPT"),
            "{accepts:?}"
        );
        assert!(!closed.contains(SWITCH_ACCEPT));
        assert!(missing(&open, 0x200000, true, Notrack::Iptables).is_empty());
        assert!(missing(&closed, 0x200000, false, Notrack::Iptables).is_empty());
        // Opened: the accepts are missing; closed: they are left over. Either way a rewrite.
        assert_eq!(
            missing(&closed, 0x200000, true, Notrack::Iptables),
            vec![
                format!("rule \"{SWITCH_ACCEPT}\" missing from INPUT"),
                format!("rule \"{SWITCH_ACCEPT}\" missing from FORWARD"),
            ]
        );
        assert_eq!(
            missing(&open, 0x200000, false, Notrack::Iptables),
            vec![
                format!("rule \"{SWITCH_ACCEPT}\" in INPUT after the switch window closed"),
                format!("rule \"{SWITCH_ACCEPT}\" in FORWARD after the switch window closed"),
            ]
        );
        let close = restore_input(&open, 0x200000, Path::new(PIN), false, Notrack::Iptables);
        assert_eq!(close.matches("-D ").count(), 2, "{close}");
        assert!(!close.contains("-I "), "{close}");
    }

    #[test]
    fn with_nftables_notrack_there_is_no_prerouting_chain_and_an_old_one_is_removed() {
        let pin = Path::new(PIN);
        let fresh = restore_input("", 0x200000, pin, false, Notrack::Nftables);
        assert!(!fresh.contains(CHAIN_PREROUTING), "{fresh}");
        assert!(fresh.contains(&format!("-I OUTPUT 1 {OUTPUT_RULE}\n")));
        assert!(fresh.contains("-m bpf --object-pinned"));
        assert!(fresh.contains(&format!("-I INPUT 1 {SERVICE_RULE}\n")));
        let saved = as_saved(&fresh);
        assert!(missing(&saved, 0x200000, false, Notrack::Nftables).is_empty());
        // The iptables-only ruleset lacks nothing but has a PREROUTING chain and jump too many.
        let old = as_saved(&restore_input("", 0x200000, pin, false, Notrack::Iptables));
        assert_eq!(
            missing(&old, 0x200000, false, Notrack::Nftables),
            vec![
                format!("chain {CHAIN_PREROUTING} left over (nf_tables untracks service traffic)"),
                format!("rule \"-j {CHAIN_PREROUTING}\" in PREROUTING not wanted"),
            ]
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
            missing(&saved, 0x200000, false, Notrack::Iptables),
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
