//! The capabilities `run` needs for the backends it selected, checked once at start against the
//! process's effective set (`CapEff` in /proc/self/status), so that a container missing one
//! stops at once with an error naming it, instead of failing later with a bare EPERM.
//!
//! | capability | needed by | also satisfied by |
//! |---|---|---|
//! | CAP_NET_ADMIN | IPVS, rtnetlink, iptables rules, TC filters, net sysctls | — |
//! | CAP_BPF | the bpf datapath: maps, programs, pins | CAP_SYS_ADMIN |
//! | CAP_PERFMON | the bpf datapath: the IPVS probe (kprobe/fexit) and its kernel reads | CAP_SYS_ADMIN |
//! | CAP_NET_RAW | iptables-legacy (a raw socket) | — |

use std::path::Path;

use anyhow::{Context, bail};

/// A capability by its number (`include/uapi/linux/capability.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub number: u32,
    pub name: &'static str,
}

pub const CAP_NET_ADMIN: Capability = Capability {
    number: 12,
    name: "CAP_NET_ADMIN",
};
pub const CAP_NET_RAW: Capability = Capability {
    number: 13,
    name: "CAP_NET_RAW",
};
pub const CAP_SYS_ADMIN: Capability = Capability {
    number: 21,
    name: "CAP_SYS_ADMIN",
};
pub const CAP_PERFMON: Capability = Capability {
    number: 38,
    name: "CAP_PERFMON",
};
pub const CAP_BPF: Capability = Capability {
    number: 39,
    name: "CAP_BPF",
};

/// One capability the selected backends need, why, and what may stand in for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub capability: Capability,
    pub needed_by: &'static str,
    pub or: Option<Capability>,
}

/// What the selected backends need: `bpf_datapath` (the eBPF SNAT datapath is on) and
/// `iptables_legacy` (the rules are written with iptables-legacy).
pub fn required(bpf_datapath: bool, iptables_legacy: bool) -> Vec<Requirement> {
    let mut r = vec![Requirement {
        capability: CAP_NET_ADMIN,
        needed_by: "IPVS, rtnetlink, iptables rules and TC filters",
        or: None,
    }];
    if bpf_datapath {
        r.push(Requirement {
            capability: CAP_BPF,
            needed_by: "the bpf datapath (maps, programs, pins)",
            or: Some(CAP_SYS_ADMIN),
        });
        r.push(Requirement {
            capability: CAP_PERFMON,
            needed_by: "the bpf datapath's IPVS probe (kprobe/fexit)",
            or: Some(CAP_SYS_ADMIN),
        });
    }
    if iptables_legacy {
        r.push(Requirement {
            capability: CAP_NET_RAW,
            needed_by: "iptables-legacy (raw socket)",
            or: None,
        });
    }
    r
}

/// The effective capability set from a `/proc/PID/status` text.
pub fn parse_effective(status: &str) -> anyhow::Result<u64> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff line")?;
    u64::from_str_radix(hex.trim(), 16).with_context(|| format!("CapEff {:?}", hex.trim()))
}

/// The requirements `effective` does not meet.
pub fn missing(effective: u64, requirements: &[Requirement]) -> Vec<Requirement> {
    let has = |c: Capability| effective & (1u64 << c.number) != 0;
    requirements
        .iter()
        .filter(|r| !has(r.capability) && !r.or.is_some_and(has))
        .cloned()
        .collect()
}

/// Checks this process's effective set; the error names every missing capability.
pub fn check(requirements: &[Requirement]) -> anyhow::Result<()> {
    let path = Path::new("/proc/self/status");
    let status =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let effective = parse_effective(&status).with_context(|| format!("in {}", path.display()))?;
    let lacking = missing(effective, requirements);
    if lacking.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = lacking
        .iter()
        .map(|r| match r.or {
            Some(or) => format!("{} (or {}) for {}", r.capability.name, or.name, r.needed_by),
            None => format!("{} for {}", r.capability.name, r.needed_by),
        })
        .collect();
    bail!(
        "missing capabilities: {} (add them to the container's securityContext.capabilities)",
        list.join("; ")
    )
}

/// Whether `iptables-restore` on PATH is iptables-legacy (Debian's alternatives link it to
/// xtables-legacy-multi or xtables-nft-multi).
pub fn default_iptables_is_legacy() -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("iptables-restore"))
        .find(|p| p.exists())
        .and_then(|p| std::fs::canonicalize(p).ok())
        .and_then(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().contains("legacy"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_set_from_proc_status() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000000c000003000\n";
        let eff = parse_effective(status).unwrap();
        assert_eq!(eff, (1 << 12) | (1 << 13) | (1 << 38) | (1 << 39));
        assert!(missing(eff, &required(true, true)).is_empty());
    }

    #[test]
    fn each_dropped_capability_is_named() {
        let all = (1u64 << 12) | (1 << 13) | (1 << 38) | (1 << 39);
        for cap in [CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF, CAP_PERFMON] {
            let lacking = missing(all & !(1 << cap.number), &required(true, true));
            assert_eq!(lacking.len(), 1, "{}", cap.name);
            assert_eq!(lacking[0].capability, cap);
        }
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon_and_nft_needs_no_net_raw() {
        let eff = (1u64 << 12) | (1 << 21);
        assert!(missing(eff, &required(true, false)).is_empty());
        assert_eq!(
            missing(eff, &required(true, true))[0].capability,
            CAP_NET_RAW
        );
        assert!(missing(1 << 12, &required(false, false)).is_empty());
    }
}
