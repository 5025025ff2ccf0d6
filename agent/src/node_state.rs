//! The node state the agent keeps outside IPVS and the BPF maps, as a desired value, and its
//! repair: the sysctls (`datapath::sysctl`), the agent's nf_tables table (`datapath::notrack`),
//! the iptables rules (`datapath::rules`), the TC
//! attachments (checked by `datapath::Datapath::repair_node`) and `kube-ipvs0` (its existence
//! and the service addresses bound on it, [`repair_kube_ipvs0`]; it is left down, as kube-proxy
//! leaves it, so being down is not drift).
//!
//! All of it is written at start and can be undone behind the agent's back: a firewall reload
//! (Debian's nftables service starts with `flush ruleset`) drops the rules, a tool writes
//! `net.ipv4.vs.conntrack=1`, someone deletes `kube-ipvs0` or a clsact qdisc. Each check reads the
//! kernel's own view (nfnetlink dumps, `iptables-save`, `/proc/sys`, the pinned TCX link or the clsact filter,
//! rtnetlink) and rewrites what differs; the rules are read back only when the rulesets changed
//! since a check found them whole ([`RulesChecked`]); every repair is logged at warn with what was found and
//! counted in `kube_ipvs_bpf_node_repairs_total{what}`. The sync loop runs the check every
//! `--node-check-period` (the safety net; also the only notice on legacy iptables) and soon after
//! any nf_tables change ([`nftables_events`], the `NFNLGRP_NFTABLES` multicast group: prompt
//! notice of a ruleset flush on nft-based iptables) or any change to `kube-ipvs0` (rtnetlink).
//!
//! The desired state depends on a [`NodeStatePhase`]: the normal one, or the switch window from
//! kube-proxy (docs/switching.md), in which the filter chain also accepts the connections
//! kube-proxy opened (`ct state established,related`). The datapath follows the window's flag
//! (`CFG_F_SWITCH`) into the phase at each check.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::datapath::{notrack, reroute, rules, sysctl};
use crate::model::DUMMY_INTERFACE;
use crate::node::{AddressChange, NodeError, Rtnl};

/// Which set of node state the agent wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NodeStatePhase {
    /// This agent alone serves the node: every sysctl and rule of its own.
    #[default]
    Normal,
    /// The switch window from kube-proxy is open (docs/switching.md): the normal state, and the
    /// filter chain also accepts `ct state established,related` (the connections kube-proxy
    /// opened, still tracked), as kube-proxy's KUBE-FORWARD did.
    Switch,
}

impl NodeStatePhase {
    /// The phase of a switch window open (`true`) or closed.
    pub fn of_switch_window(open: bool) -> NodeStatePhase {
        if open {
            NodeStatePhase::Switch
        } else {
            NodeStatePhase::Normal
        }
    }
}

/// The part of the node state a repair touched: the `what` label of
/// `kube_ipvs_bpf_node_repairs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    Iptables,
    Nftables,
    Sysctl,
    Tc,
    KubeIpvs0,
}

impl Part {
    pub const ALL: [Part; 5] = [
        Part::Iptables,
        Part::Nftables,
        Part::Sysctl,
        Part::Tc,
        Part::KubeIpvs0,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Part::Iptables => "iptables",
            Part::Nftables => "nftables",
            Part::Sysctl => "sysctl",
            Part::Tc => "tc",
            Part::KubeIpvs0 => "kube_ipvs0",
        }
    }
}

/// One repair: what was rewritten, and what the kernel showed before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    pub part: Part,
    pub found: String,
}

impl Repair {
    /// A repair of `part`, logged at warn with what was `found`.
    pub fn new(part: Part, found: String) -> Repair {
        tracing::warn!(what = part.as_str(), found = %found, "node state repaired");
        Repair { part, found }
    }
}

/// What one check of the node state did.
#[derive(Debug, Default)]
pub struct RepairReport {
    pub repairs: Vec<Repair>,
    /// Checks or repairs that failed (logged; retried at the next check).
    pub failures: Vec<String>,
    /// `kube-ipvs0` was re-created: the next sync must be a full one.
    pub full_sync: bool,
}

impl RepairReport {
    pub fn extend(&mut self, other: RepairReport) {
        self.repairs.extend(other.repairs);
        self.failures.extend(other.failures);
        self.full_sync |= other.full_sync;
    }

    /// A check or repair that failed (logged at warn).
    pub fn failed(&mut self, what: String) {
        tracing::warn!("node state: {what}");
        self.failures.push(what);
    }
}

/// The nf_tables table and iptables rules the agent keeps (see `datapath::notrack`,
/// `datapath::rules`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesSpec {
    pub backend: rules::Backend,
    /// Where service traffic is untracked at PREROUTING: the agent's nf_tables table, or an
    /// iptables rule on a kernel without nf_tables.
    pub notrack: rules::Notrack,
    pub mark_svc: u32,
    /// The pinned `xt_svc` program the OUTPUT rule matches with.
    pub xt_svc_pin: PathBuf,
    /// Whether the IPv6 rules are kept too (the kernel has IPv6).
    pub ipv6: bool,
}

/// The sysctls and iptables rules the agent wants on the node in a phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredNodeState {
    pub phase: NodeStatePhase,
    /// Where the sysctls are read and written (`/proc/sys`, see `sysctl::default_root`).
    pub sysctl_root: PathBuf,
    pub sysctls: Vec<sysctl::Sysctl>,
    /// `net.ipv4.vs.snat_reroute`, decided at each check from the routing policy
    /// ([`reroute`]).
    pub snat_reroute: reroute::SnatReroute,
    /// The decision last written: a new one is logged at info, the value found changed under
    /// the same one is a repair.
    pub snat_reroute_applied: Option<reroute::Decision>,
    pub rules: Option<RulesSpec>,
}

impl DesiredNodeState {
    /// The desired state of `phase` on a kernel of version `kernel`.
    pub fn new(
        phase: NodeStatePhase,
        sysctl_root: PathBuf,
        kernel: Option<(u32, u32)>,
        strict_arp: bool,
        snat_reroute: reroute::SnatReroute,
        rules: Option<RulesSpec>,
    ) -> DesiredNodeState {
        DesiredNodeState {
            phase,
            sysctl_root,
            sysctls: sysctl::owned(kernel, strict_arp),
            snat_reroute,
            snat_reroute_applied: None,
            rules,
        }
    }

    /// Decides `net.ipv4.vs.snat_reroute` from the routing policy as it is now and writes it
    /// if it differs. A failure to read the policy decides "on" ([`reroute::decide`]).
    pub fn apply_snat_reroute(&mut self) -> RepairReport {
        let mut report = RepairReport::default();
        let ipv6 = self.sysctl_root.join("net/ipv6").exists();
        let decision = reroute::decide(self.snat_reroute, || reroute::source_dependence(ipv6));
        let s = decision.sysctl();
        let unchanged = self.snat_reroute_applied.as_ref() == Some(&decision);
        match sysctl::set_in(&self.sysctl_root, &s) {
            Ok(Some(old)) if unchanged => report.repairs.push(Repair::new(
                Part::Sysctl,
                format!("{} = {old} (want {}: {})", s.name, s.value, decision.why),
            )),
            Ok(old) => {
                if !unchanged {
                    tracing::info!(
                        sysctl = s.name,
                        value = s.value,
                        previous = old.as_deref().unwrap_or(s.value),
                        why = %decision.why,
                        "IPVS reroute of replies decided"
                    );
                }
                self.snat_reroute_applied = Some(decision);
            }
            Err(e) => report.failed(format!("setting {} = {}: {e}", s.name, s.value)),
        }
        report
    }

    /// Reads each sysctl and the rules back from the kernel and rewrites what differs.
    /// `checked`: what the rulesets looked like at the last check that found the rules whole
    /// ([`RulesChecked`]); while they still look so, the rules are not read back. Updated here.
    pub fn repair(&mut self, checked: &mut Option<RulesChecked>) -> RepairReport {
        let mut report = self.apply_snat_reroute();
        for s in &self.sysctls {
            match sysctl::set_in(&self.sysctl_root, s) {
                Ok(Some(old)) => report.repairs.push(Repair::new(
                    Part::Sysctl,
                    format!("{} = {old} (want {})", s.name, s.value),
                )),
                Ok(None) => {}
                Err(e) => report.failed(format!("setting {} = {}: {e}", s.name, s.value)),
            }
        }
        if let Some(spec) = &self.rules {
            let now = std::time::Instant::now();
            let seen = spec.fingerprint();
            if let (Some(seen), Some(c)) = (&seen, checked.as_ref())
                && c.unchanged(seen, self.phase, now)
            {
                return report;
            }
            let before = report.repairs.len() + report.failures.len();
            self.repair_rules(spec, &mut report);
            let whole = report.repairs.len() + report.failures.len() == before;
            // A repair wrote the rules (a new generation): the next check reads them once more
            // and records that one.
            *checked = seen.filter(|_| whole).map(|fingerprint| RulesChecked {
                fingerprint,
                phase: self.phase,
                at: now,
            });
        }
        report
    }

    /// Reads the agent's nf_tables table and iptables rules back and rewrites what is missing.
    fn repair_rules(&self, spec: &RulesSpec, report: &mut RepairReport) {
        {
            if spec.notrack == rules::Notrack::Nftables {
                match notrack::repair(spec.mark_svc) {
                    Ok(found) if found.is_empty() => {}
                    Ok(found) => report
                        .repairs
                        .push(Repair::new(Part::Nftables, found.join("; "))),
                    Err(e) => report.failed(format!(
                        "checking nf_tables table inet {}: {e}",
                        notrack::TABLE
                    )),
                }
            }
            let families: &[bool] = if spec.ipv6 { &[false, true] } else { &[false] };
            for &ipv6 in families {
                let family = if ipv6 { "IPv6" } else { "IPv4" };
                match rules::repair(
                    spec.backend,
                    ipv6,
                    spec.mark_svc,
                    &spec.xt_svc_pin,
                    self.phase == NodeStatePhase::Switch,
                    spec.notrack,
                ) {
                    Ok(found) if found.is_empty() => {}
                    Ok(found) => report.repairs.push(Repair::new(
                        Part::Iptables,
                        format!("{family}: {}", found.join("; ")),
                    )),
                    Err(e) => report.failed(format!("checking the {family} iptables rules: {e}")),
                }
            }
        }
    }
}

impl RulesSpec {
    /// What the rulesets holding these rules look like now, without reading the rules:
    /// nf_tables' generation (iptables-nft and the agent's table), and with legacy iptables
    /// each of its tables' [`rules::legacy_table_info`]. `None`: unknown (`iptables` as
    /// installed, whichever it is; or a read failed), so the rules are read back.
    pub fn fingerprint(&self) -> Option<RulesFingerprint> {
        let nft = rules::Backend::Nft == self.backend || self.notrack == rules::Notrack::Nftables;
        let nft_generation = if nft {
            let generation = crate::cleanup::nfnetlink::Nfnl::open()
                .and_then(|mut nl| nl.nft_generation())
                .inspect_err(|e| tracing::debug!("nf_tables generation unknown: {e}"))
                .ok()?;
            Some(generation)
        } else {
            None
        };
        let legacy = match self.backend {
            rules::Backend::Default => return None,
            rules::Backend::Nft => Vec::new(),
            rules::Backend::Legacy => {
                let families: &[bool] = if self.ipv6 { &[false, true] } else { &[false] };
                let mut infos = Vec::new();
                for &ipv6 in families {
                    for table in rules::TABLES {
                        let info = rules::legacy_table_info(ipv6, table)
                            .inspect_err(|e| {
                                tracing::debug!(table, ipv6, "legacy iptables table unknown: {e}")
                            })
                            .ok()?;
                        infos.push(info);
                    }
                }
                infos
            }
        };
        Some(RulesFingerprint {
            nft_generation,
            legacy,
        })
    }
}

/// What the rulesets holding the agent's rules looked like ([`RulesSpec::fingerprint`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesFingerprint {
    /// nf_tables' generation: every committed transaction bumps it (any table's, a `flush
    /// ruleset`, iptables-nft's rules), and nothing else does.
    nft_generation: Option<u32>,
    /// With legacy iptables, [`rules::legacy_table_info`] of each of [`rules::TABLES`] per family.
    legacy: Vec<Vec<u8>>,
}

/// How long a legacy iptables fingerprint vouches for the rules: a rule replaced by one of the
/// same size leaves it unchanged, so the rules are read back at least this often there.
pub const LEGACY_RULES_RECHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// A check that found the agent's rules whole: the rulesets' fingerprint read before it, in
/// which phase, and when. Reading the rules back costs four `iptables-save` runs (IPv4 and IPv6,
/// raw and filter): 2% of a CPU at one check every 5 s under TCG. While the fingerprint stays the
/// same nobody changed them: the check reads only the fingerprint (one nfnetlink request, or a
/// `getsockopt` per legacy table).
#[derive(Debug, Clone)]
pub struct RulesChecked {
    fingerprint: RulesFingerprint,
    phase: NodeStatePhase,
    at: std::time::Instant,
}

impl RulesChecked {
    /// Whether the rules found whole then are known to be whole still, rulesets looking as
    /// `seen` now, in `phase` (the switch window changes what is wanted).
    fn unchanged(
        &self,
        seen: &RulesFingerprint,
        phase: NodeStatePhase,
        now: std::time::Instant,
    ) -> bool {
        self.fingerprint == *seen
            && self.phase == phase
            && (seen.legacy.is_empty() || now.duration_since(self.at) < LEGACY_RULES_RECHECK)
    }
}

/// Checks `kube-ipvs0`: it must exist (re-created when it does not: `index` follows) and, with
/// `bound`, hold every address in it (the ones the agent bound; a missing one is added back).
/// Comparing the addresses means dumping them all (10,000 at 10,000 Services): the sync loop
/// does it after a change to `kube-ipvs0`, not on every periodic check. Addresses the agent did
/// not bind are left to the full resync.
pub async fn repair_kube_ipvs0(
    rtnl: &Rtnl,
    index: &mut u32,
    bound: Option<&BTreeSet<IpAddr>>,
) -> Result<RepairReport, NodeError> {
    let mut report = RepairReport::default();
    match rtnl.link_index(DUMMY_INTERFACE).await? {
        Some(i) if i == *index => {}
        found => {
            let now = rtnl.ensure_dummy(DUMMY_INTERFACE).await?;
            let what = match found {
                None => "missing".to_owned(),
                Some(i) => format!("re-created by someone else (index {i}, was {index})"),
            };
            report.repairs.push(Repair::new(
                Part::KubeIpvs0,
                format!("{DUMMY_INTERFACE} {what}"),
            ));
            *index = now;
            report.full_sync = true;
        }
    }
    let Some(bound) = bound else {
        return Ok(report);
    };
    let on = rtnl.addresses_on(*index).await?;
    let missing: Vec<IpAddr> = bound.difference(&on).copied().collect();
    if !missing.is_empty() {
        let mut added = Vec::new();
        for (a, r) in rtnl.change_addresses(*index, AddressChange::Add, &missing) {
            match r {
                Ok(()) => added.push(a.to_string()),
                Err(e) => report.failed(format!("adding {a} back to {DUMMY_INTERFACE}: {e}")),
            }
        }
        if !added.is_empty() {
            report.repairs.push(Repair::new(
                Part::KubeIpvs0,
                format!(
                    "addresses missing from {DUMMY_INTERFACE}: {}",
                    added.join(", ")
                ),
            ));
        }
    }
    Ok(report)
}

/// `NFNLGRP_NFTABLES`: the nfnetlink multicast group of nf_tables changes.
pub const NFNLGRP_NFTABLES: u32 = 7;

/// Notice of nf_tables changes in the calling thread's network namespace: a message on the
/// returned channel soon after any change (tables, chains, rules: iptables-nft's too, and a
/// `flush ruleset`); bursts are coalesced (the channel holds one notice). A thread reads the
/// multicast group until the receiver is dropped. Legacy iptables sends nothing here: the
/// periodic check covers it.
pub fn nftables_events() -> std::io::Result<tokio::sync::mpsc::Receiver<()>> {
    use std::os::fd::AsFd;
    let mut socket = netlink_sys::Socket::new(crate::cleanup::nfnetlink::NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.add_membership(NFNLGRP_NFTABLES)?;
    // Wakes up every second to notice a dropped receiver.
    nix::sys::socket::setsockopt(
        &socket.as_fd(),
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(1, 0),
    )
    .map_err(std::io::Error::from)?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    std::thread::Builder::new()
        .name("nftables-events".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match socket.recv(&mut &mut buf[..], 0) {
                    // ENOBUFS: events were lost (a burst); something changed all the same.
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::Interrupted
                        ) =>
                    {
                        if tx.is_closed() {
                            return;
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("nf_tables change notices stopped: {e}");
                        return;
                    }
                }
                if let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                    return;
                }
            }
        })?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_normal_phase_wants_every_owned_sysctl_and_the_rules() {
        let spec = RulesSpec {
            backend: rules::Backend::Nft,
            notrack: rules::Notrack::Nftables,
            mark_svc: 0x200000,
            xt_svc_pin: PathBuf::from("/sys/fs/bpf/x/prog_xt_svc"),
            ipv6: true,
        };
        let d = DesiredNodeState::new(
            NodeStatePhase::Normal,
            PathBuf::from("/proc/sys"),
            Some((6, 12)),
            false,
            reroute::SnatReroute::Auto,
            Some(spec.clone()),
        );
        assert_eq!(d.sysctls, sysctl::owned(Some((6, 12)), false));
        assert_eq!(d.rules, Some(spec));
        assert_eq!(
            Part::ALL.map(Part::as_str),
            ["iptables", "nftables", "sysctl", "tc", "kube_ipvs0"]
        );
    }

    #[test]
    fn rules_found_whole_stay_whole_only_while_the_rulesets_and_the_phase_are_unchanged() {
        let at = std::time::Instant::now();
        let nft = |generation| RulesFingerprint {
            nft_generation: Some(generation),
            legacy: Vec::new(),
        };
        let checked = RulesChecked {
            fingerprint: nft(7),
            phase: NodeStatePhase::Normal,
            at,
        };
        let hour = at + std::time::Duration::from_secs(3600);
        assert!(checked.unchanged(&nft(7), NodeStatePhase::Normal, hour));
        assert!(!checked.unchanged(&nft(8), NodeStatePhase::Normal, at));
        assert!(!checked.unchanged(&nft(7), NodeStatePhase::Switch, at));
        // Legacy iptables: a rule replaced by one of the same size looks the same, so the rules
        // are read back after LEGACY_RULES_RECHECK all the same.
        let legacy = RulesFingerprint {
            nft_generation: Some(7),
            legacy: vec![vec![1; 52], vec![2; 52]],
        };
        let checked = RulesChecked {
            fingerprint: legacy.clone(),
            ..checked
        };
        assert!(checked.unchanged(&legacy, NodeStatePhase::Normal, at));
        assert!(!checked.unchanged(&legacy, NodeStatePhase::Normal, at + LEGACY_RULES_RECHECK));
        let mut grown = legacy.clone();
        grown.legacy[1][48] = 3;
        assert!(!checked.unchanged(&grown, NodeStatePhase::Normal, at));
    }
}
