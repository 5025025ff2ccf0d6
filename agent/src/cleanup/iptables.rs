//! iptables cleanup: which chains belong to kube-proxy and which to this agent ([`Owner`]), the
//! pure transformation of an `iptables-save` dump into the `iptables-restore --noflush` input that
//! removes them and every jump to them ([`plan`], [`Plan::restore_input`]), and the shell-outs to
//! the four `{ip,ip6}tables-{legacy,nft}-{save,restore}` commands ([`Variant`]).
//!
//! The restore input touches nothing but the owned chains, the rules that jump to them and (this
//! agent's) its rules in the built-in chains, known by their `kube-ipvs-bpf:` comment: it
//! flushes each owned chain (declaring an existing chain in `--noflush` mode flushes it),
//! deletes each jump by its exact rule text (`-D CHAIN <spec as saved>`, so a concurrent change
//! to another chain is never clobbered and a changed jump makes the whole table's transaction
//! fail rather than delete the wrong rule), then deletes the chains (`-X`). Every other chain and
//! rule stays as it is, byte for byte. This is how kube-proxy's own `CleanupLeftovers` works.
//!
//! kube-proxy's chains are named, not matched by the `KUBE-` prefix: other components use that
//! prefix too and must be left alone — kubelet (`KUBE-FIREWALL` in filter, `KUBE-KUBELET-CANARY`,
//! `KUBE-IPTABLES-HINT`), kube-router's network policies (`KUBE-ROUTER-*`, `KUBE-POD-FW-*`,
//! `KUBE-NWPLCY-*`) — and so does this agent (`KUBE-IPVS-BPF-*`).

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

/// Chains kube-proxy creates in its iptables mode, its ipvs mode and its former userspace mode
/// (in whatever table they are found, but see [`KUBELET_CHAINS`]).
pub const KUBE_PROXY_CHAINS: &[&str] = &[
    // iptables mode
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-MARK-DROP",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
    // ipvs mode
    "KUBE-NODE-PORT",
    "KUBE-LOAD-BALANCER",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
    // userspace mode (removed in v1.26)
    "KUBE-PORTALS-CONTAINER",
    "KUBE-PORTALS-HOST",
    "KUBE-NODEPORT-CONTAINER",
    "KUBE-NODEPORT-HOST",
    "KUBE-NODEPORT-NON-LOCAL",
];

/// Prefixes of kube-proxy's per-service and per-endpoint chains (iptables mode).
pub const KUBE_PROXY_CHAIN_PREFIXES: &[&str] = &[
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-EXT-",
    "KUBE-XLB-",
];

/// kubelet's chains, never removed. `KUBE-FIREWALL` is kubelet's in the filter table; in the nat
/// table it was kube-proxy's ipvs mode's (before v1.28).
pub const KUBELET_CHAINS: &[&str] = &["KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"];

/// Prefix of this agent's own chains.
pub const AGENT_CHAIN_PREFIX: &str = "KUBE-IPVS-BPF-";

/// Prefix of the comments of this agent's rules.
pub const AGENT_COMMENT_PREFIX: &str = "kube-ipvs-bpf:";

/// Whose chains to remove.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    KubeProxy,
    Agent,
}

impl Owner {
    /// Whether chain `chain` of table `table` is this owner's.
    pub fn owns(self, table: &str, chain: &str) -> bool {
        match self {
            Owner::Agent => chain.starts_with(AGENT_CHAIN_PREFIX),
            Owner::KubeProxy => {
                if chain.starts_with(AGENT_CHAIN_PREFIX) || KUBELET_CHAINS.contains(&chain) {
                    return false;
                }
                if chain == "KUBE-FIREWALL" {
                    return table == "nat";
                }
                KUBE_PROXY_CHAINS.contains(&chain)
                    || KUBE_PROXY_CHAIN_PREFIXES
                        .iter()
                        .any(|p| chain.starts_with(p))
            }
        }
    }
}

/// What to remove from one table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TablePlan {
    pub table: String,
    /// Owned chains, in the order the dump declares them.
    pub chains: Vec<String>,
    /// Rules of other chains that jump to an owned chain, and (this agent's) the rules of its
    /// own in built-in chains, known by their comment: (chain, rule text after `-A CHAIN `).
    pub jumps: Vec<(String, String)>,
}

/// What to remove from a whole dump.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub tables: Vec<TablePlan>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// The `iptables-restore --noflush` input that carries the plan out.
    pub fn restore_input(&self) -> String {
        let mut out = String::new();
        for t in &self.tables {
            out.push_str(&format!("*{}\n", t.table));
            for c in &t.chains {
                out.push_str(&format!(":{c} - [0:0]\n"));
            }
            for (chain, spec) in &t.jumps {
                out.push_str(&format!("-D {chain} {spec}\n"));
            }
            for c in &t.chains {
                out.push_str(&format!("-X {c}\n"));
            }
            out.push_str("COMMIT\n");
        }
        out
    }
}

/// Splits a rule into arguments as iptables-restore does: whitespace-separated, with double
/// quotes grouping (and `\"` escaping a quote inside them).
pub fn tokenize(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut has = false;
    let mut chars = rule.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_quotes && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => {
                in_quotes = !in_quotes;
                has = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    has = false;
                }
            }
            c => cur.push(c),
        }
    }
    if has || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The chain a rule jumps or goes to (`-j`/`--jump`/`-g`/`--goto`), if any.
pub fn target(spec: &str) -> Option<String> {
    let tokens = tokenize(spec);
    tokens
        .windows(2)
        .find(|w| matches!(w[0].as_str(), "-j" | "--jump" | "-g" | "--goto"))
        .map(|w| w[1].clone())
}

/// Strips a leading `[packets:bytes] ` counter (`iptables-save -c`).
fn strip_counters(line: &str) -> &str {
    if let Some(rest) = line.strip_prefix('[')
        && let Some((counters, rule)) = rest.split_once("] ")
        && counters
            .split(':')
            .all(|n| n.chars().all(|c| c.is_ascii_digit()))
    {
        return rule;
    }
    line
}

/// Whether a rule carries the comment of one of this agent's rules (`kube-ipvs-bpf: …`): its
/// accepts sit in the built-in chains themselves, with no chain of ours to jump to.
pub fn has_agent_comment(spec: &str) -> bool {
    tokenize(spec)
        .windows(2)
        .any(|w| w[0] == "--comment" && w[1].starts_with(AGENT_COMMENT_PREFIX))
}

/// Computes what to remove from an `iptables-save` dump (of any iptables variant, with or
/// without counters): `owner`'s chains, and the rules in other chains that jump to them.
/// Pure; see the module documentation for the guarantees.
pub fn plan(save: &str, owner: Owner) -> Plan {
    let mut tables = Vec::new();
    // The table being read: its name, declared chains and rules (chain, spec).
    type Reading = (String, Vec<String>, Vec<(String, String)>);
    let mut current: Option<Reading> = None;
    for raw in save.lines() {
        let line = raw.trim_end();
        if let Some(name) = line.strip_prefix('*') {
            current = Some((name.trim().to_owned(), Vec::new(), Vec::new()));
        } else if line == "COMMIT" {
            if let Some((table, chains, rules)) = current.take() {
                let owned: Vec<String> = chains
                    .into_iter()
                    .filter(|c| owner.owns(&table, c))
                    .collect();
                let owned_set: BTreeSet<&str> = owned.iter().map(String::as_str).collect();
                let jumps: Vec<(String, String)> = rules
                    .into_iter()
                    .filter(|(chain, spec)| {
                        !owned_set.contains(chain.as_str())
                            && (target(spec).is_some_and(|t| owned_set.contains(t.as_str()))
                                || (owner == Owner::Agent && has_agent_comment(spec)))
                    })
                    .collect();
                if !owned.is_empty() || !jumps.is_empty() {
                    tables.push(TablePlan {
                        table,
                        chains: owned,
                        jumps,
                    });
                }
            }
        } else if let Some((_, chains, rules)) = current.as_mut() {
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    chains.push(name.to_owned());
                }
            } else if let Some(rule) = strip_counters(line).strip_prefix("-A ")
                && let Some((chain, spec)) = rule.split_once(' ')
            {
                rules.push((chain.to_owned(), spec.to_owned()));
            }
        }
    }
    Plan { tables }
}

/// The `iptables-restore --noflush` input that removes `owner`'s chains and the jumps to them
/// from the state `save` describes (empty when there is nothing to remove).
pub fn removal_restore_input(save: &str, owner: Owner) -> String {
    plan(save, owner).restore_input()
}

/// One iptables flavour: IPv4 or IPv6, legacy (x_tables) or nft (nf_tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub ipv6: bool,
    pub nft: bool,
}

impl Variant {
    /// All four.
    pub const ALL: [Variant; 4] = [
        Variant {
            ipv6: false,
            nft: false,
        },
        Variant {
            ipv6: false,
            nft: true,
        },
        Variant {
            ipv6: true,
            nft: false,
        },
        Variant {
            ipv6: true,
            nft: true,
        },
    ];

    /// `iptables-nft`, `ip6tables-legacy`, …
    pub fn name(&self) -> &'static str {
        match (self.ipv6, self.nft) {
            (false, false) => "iptables-legacy",
            (false, true) => "iptables-nft",
            (true, false) => "ip6tables-legacy",
            (true, true) => "ip6tables-nft",
        }
    }

    fn command(&self, what: &str) -> String {
        format!("{}-{what}", self.name())
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A failed iptables command.
#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// The variant's current rules (`<variant>-save`); `Ok(None)` when the command is not installed.
pub fn save(v: Variant) -> Result<Option<String>, IptablesError> {
    let command = v.command("save");
    let out = match Command::new(&command).stdin(Stdio::null()).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(IptablesError::Spawn { command, source }),
    };
    if !out.status.success() {
        return Err(IptablesError::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Feeds `input` to `<variant>-restore --noflush` (one transaction per table).
pub fn restore(v: Variant, input: &str) -> Result<(), IptablesError> {
    let command = v.command("restore");
    let spawn_err = |source| IptablesError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = Command::new(&command)
        .args(["--noflush", "-w", "5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(IptablesError::Failed {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
