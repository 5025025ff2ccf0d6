//! Cleanup of node state: this module owns `kube-ipvs-bpf cleanup --kube-proxy` (what kube-proxy's
//! iptables, ipvs and nftables modes leave on a node: [`cleanup_kube_proxy`]) and
//! `kube-ipvs-bpf cleanup` (this agent's own state: [`cleanup_self`]). Both remove only what
//! they own, are idempotent (a second run finds nothing), report every item they remove (or
//! would remove, with `dry_run`), and go on past a failed step, reporting it.
//!
//! **kube-proxy**, in this order (rules before the ipsets they reference):
//! 1. its iptables chains and every jump to them, in the filter, nat, mangle and raw tables of
//!    `iptables-legacy`, `iptables-nft`, `ip6tables-legacy` and `ip6tables-nft`, through
//!    `*-save` and `*-restore --noflush` ([`iptables`]: named chains, never a blanket `KUBE-*`);
//! 2. its ipsets (`KUBE-CLUSTER-IP`, …, and their `KUBE-6-` IPv6 twins), through the ip_set
//!    netlink protocol ([`nfnetlink`]); a set still referenced by someone else's rule is reported
//!    and kept;
//! 3. its nf_tables tables, `ip kube-proxy` and `ip6 kube-proxy`, through an nfnetlink batch;
//! 4. unless `keep_ipvs`: the IPVS virtual services on `kube-ipvs0` addresses and on node
//!    addresses in the NodePort range, and those carrying this agent's mark (the ownership rule
//!    of [`crate::reconcile::ipvs`]), one by
//!    one — IPVS is never flushed, and firewall-mark services are never touched; then the
//!    `kube-ipvs0` interface. `keep_ipvs` leaves both for this agent to adopt in place (an
//!    ipvs-mode node keeps its IPVS connection table).
//!
//! **This agent**: its `KUBE-IPVS-BPF-*` chains, the jumps to them and its rules in the built-in
//! chains, known by their `kube-ipvs-bpf:` comment (all four iptables variants), its nf_tables table `inet kube-ipvs-bpf` (which the kube-proxy cleanup never
//! touches: [`is_kube_proxy_table`]), its TC filters (netlink clsact filters with its handle and priority on every
//! interface), its pinned BPF objects under the pin root (pinned links detached first), its IPVS
//! services and `kube-ipvs0` (same rule as above; unless `keep_ipvs`, as at the end of a drain
//! for the rollback to kube-proxy, which owns them again), and its state file.
//! `net.ipv4.vs.snat_reroute` goes back to 1, the kernel's default, which kube-proxy leaves; the
//! other IPVS sysctls it set are left as they are (kube-proxy wants the same values; their
//! previous values are not recorded).
//!
//! IPVS is only looked at when the `ip_vs` module is loaded (`/proc/net/ip_vs`): connecting
//! would load it. Everything happens in the network namespace of the calling thread.

pub mod iptables;
pub mod nfnetlink;

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Serialize;

use crate::model::DUMMY_INTERFACE;
use crate::node::{NodeError, Rtnl};
use crate::reconcile::ipvs::Ownership;
use iptables::{Owner, Variant};
use nfnetlink::{NFPROTO_IPV4, NFPROTO_IPV6, Nfnl, NftTable};

/// Name of kube-proxy's nf_tables tables (families `ip` and `ip6`).
pub const KUBE_PROXY_NFT_TABLE: &str = "kube-proxy";

/// Root of this agent's bpffs pins (each layout version in a subdirectory).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/kube-ipvs-bpf";

/// The ipsets of kube-proxy's ipvs mode (IPv4 names).
pub const KUBE_PROXY_IPSETS: &[&str] = &[
    "KUBE-LOOP-BACK",
    "KUBE-CLUSTER-IP",
    "KUBE-EXTERNAL-IP",
    "KUBE-EXTERNAL-IP-LOCAL",
    "KUBE-LOAD-BALANCER",
    "KUBE-LOAD-BALANCER-LOCAL",
    "KUBE-LOAD-BALANCER-FW",
    "KUBE-LOAD-BALANCER-SOURCE-IP",
    "KUBE-LOAD-BALANCER-SOURCE-CIDR",
    "KUBE-NODE-PORT-TCP",
    "KUBE-NODE-PORT-LOCAL-TCP",
    "KUBE-NODE-PORT-UDP",
    "KUBE-NODE-PORT-LOCAL-UDP",
    "KUBE-NODE-PORT-SCTP-HASH",
    "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
    "KUBE-HEALTH-CHECK-NODE-PORT",
    "KUBE-IPVS-IPS",
];

/// Every ipset name kube-proxy's ipvs mode uses: the IPv4 names and their IPv6 twins, which
/// kube-proxy names `KUBE-6-…` and truncates to 31 bytes.
pub fn kube_proxy_ipset_names() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for name in KUBE_PROXY_IPSETS {
        out.insert((*name).to_owned());
        let mut v6 = name.replacen("KUBE-", "KUBE-6-", 1);
        v6.truncate(31);
        out.insert(v6);
    }
    out
}

/// What to clean and how.
#[derive(Debug, Clone)]
pub struct CleanupOptions {
    /// Report what would be removed, remove nothing.
    pub dry_run: bool,
    /// Leave IPVS services and `kube-ipvs0`: for this agent to adopt (kube-proxy's cleanup), or
    /// for kube-proxy (this agent's, at the end of a drain).
    pub keep_ipvs: bool,
    /// The NodePort range (services on node addresses in it are proxy-owned).
    pub node_port_range: RangeInclusive<u16>,
    /// IPVS services whose address is in one of these are never deleted (`ipvs.excludeCIDRs`).
    pub ipvs_exclude_cidrs: Vec<IpNet>,
    /// This agent's bpffs pin root.
    pub pin_root: PathBuf,
    /// This agent's state directory.
    pub state_dir: PathBuf,
    /// The iptables variants to clean (default: all four).
    pub iptables_variants: Vec<Variant>,
}

impl Default for CleanupOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            keep_ipvs: false,
            node_port_range: crate::config::DEFAULT_NODE_PORT_RANGE,
            ipvs_exclude_cidrs: Vec::new(),
            pin_root: PathBuf::from(DEFAULT_PIN_ROOT),
            state_dir: PathBuf::from(crate::state::DEFAULT_STATE_DIR),
            iptables_variants: Variant::ALL.to_vec(),
        }
    }
}

/// One removed (or, in a dry run, removable) item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Removed {
    /// `iptables chain`, `iptables rule`, `ipset`, `nft table`, `ipvs service`, `interface`,
    /// `tc filter`, `bpf pins`, `state file`.
    pub kind: &'static str,
    pub name: String,
}

/// What a cleanup did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CleanupReport {
    pub dry_run: bool,
    pub removed: Vec<Removed>,
    /// Things looked at and deliberately left (with why).
    pub notes: Vec<String>,
    /// Steps that failed; the others still ran.
    pub errors: Vec<String>,
}

impl CleanupReport {
    /// Whether every step succeeded.
    pub fn is_ok(&self) -> bool {
        self.errors.is_empty()
    }

    fn removed(&mut self, kind: &'static str, name: impl Into<String>) {
        self.removed.push(Removed {
            kind,
            name: name.into(),
        });
    }
}

impl fmt::Display for CleanupReport {
    /// One line per item: `removed ipset KUBE-CLUSTER-IP` (or `would remove`), then notes and
    /// errors.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = if self.dry_run {
            "would remove"
        } else {
            "removed"
        };
        for r in &self.removed {
            writeln!(f, "{verb} {} {}", r.kind, r.name)?;
        }
        if self.removed.is_empty() {
            writeln!(f, "nothing to remove")?;
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        for e in &self.errors {
            writeln!(f, "error: {e}")?;
        }
        Ok(())
    }
}

/// A cleanup that could not start.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    #[error("rtnetlink: {0}")]
    Rtnetlink(#[from] NodeError),
}

/// Removes what kube-proxy left on this node (see the module documentation).
pub async fn cleanup_kube_proxy(opts: &CleanupOptions) -> Result<CleanupReport, CleanupError> {
    let mut report = CleanupReport {
        dry_run: opts.dry_run,
        ..CleanupReport::default()
    };
    iptables_step(opts, Owner::KubeProxy, &mut report);
    ipset_step(opts, &mut report);
    nft_step(opts, Owner::KubeProxy, &mut report);
    if opts.keep_ipvs {
        report.notes.push(format!(
            "IPVS services and {DUMMY_INTERFACE} kept (--keep-ipvs)"
        ));
    } else {
        let rtnl = Rtnl::connect()?;
        ipvs_step(opts, &rtnl, &mut report).await;
        interface_step(opts, &rtnl, &mut report).await;
    }
    Ok(report)
}

/// Removes this agent's own state from this node (see the module documentation).
pub async fn cleanup_self(opts: &CleanupOptions) -> Result<CleanupReport, CleanupError> {
    let mut report = CleanupReport {
        dry_run: opts.dry_run,
        ..CleanupReport::default()
    };
    let rtnl = Rtnl::connect()?;
    iptables_step(opts, Owner::Agent, &mut report);
    nft_step(opts, Owner::Agent, &mut report);
    tc_step(opts, &rtnl, &mut report).await;
    pins_step(opts, &mut report);
    if opts.keep_ipvs {
        report.notes.push(format!(
            "IPVS services and {DUMMY_INTERFACE} kept (kube-proxy's again after a drain)"
        ));
    } else {
        ipvs_step(opts, &rtnl, &mut report).await;
        interface_step(opts, &rtnl, &mut report).await;
    }
    state_step(opts, &mut report);
    snat_reroute_step(opts, &mut report);
    report.notes.push(
        "the other IPVS sysctls (net.ipv4.vs.*) and the ARP sysctls are left as they are"
            .to_owned(),
    );
    Ok(report)
}

fn iptables_step(opts: &CleanupOptions, owner: Owner, report: &mut CleanupReport) {
    for v in &opts.iptables_variants {
        let save = match iptables::save(*v) {
            Ok(Some(s)) => s,
            Ok(None) => {
                report
                    .notes
                    .push(format!("{v}-save not installed: {v} skipped"));
                continue;
            }
            Err(e) => {
                report.errors.push(e.to_string());
                continue;
            }
        };
        let plan = iptables::plan(&save, owner);
        if plan.is_empty() {
            continue;
        }
        if !opts.dry_run
            && let Err(e) = iptables::restore(*v, &plan.restore_input())
        {
            report.errors.push(e.to_string());
            continue;
        }
        for t in &plan.tables {
            for (chain, spec) in &t.jumps {
                report.removed(
                    "iptables rule",
                    format!("{v} -t {} -A {chain} {spec}", t.table),
                );
            }
            for c in &t.chains {
                report.removed("iptables chain", format!("{v} -t {} {c}", t.table));
            }
        }
    }
}

fn ipset_step(opts: &CleanupOptions, report: &mut CleanupReport) {
    let ours = kube_proxy_ipset_names();
    let result = Nfnl::open().and_then(|mut nl| {
        let names = nl.ipset_names()?;
        for name in names.iter().filter(|n| ours.contains(*n)) {
            if opts.dry_run {
                report.removed("ipset", name.clone());
                continue;
            }
            match nl.ipset_destroy(name) {
                Ok(true) => report.removed("ipset", name.clone()),
                Ok(false) => {}
                Err(e) => report.errors.push(e.to_string()),
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        report.errors.push(format!("ipsets: {e}"));
    }
}

/// Removes the nf_tables tables of `owner`: kube-proxy's ([`is_kube_proxy_table`]) or this
/// agent's ([`crate::datapath::notrack::table`]).
fn nft_step(opts: &CleanupOptions, owner: Owner, report: &mut CleanupReport) {
    let owned = |t: &NftTable| match owner {
        Owner::KubeProxy => is_kube_proxy_table(t),
        Owner::Agent => *t == crate::datapath::notrack::table(),
    };
    let result = Nfnl::open().and_then(|mut nl| {
        let tables = nl.nft_tables()?;
        for t in tables.iter().filter(|t| owned(t)) {
            if opts.dry_run {
                report.removed("nft table", t.to_string());
                continue;
            }
            match nl.nft_delete_table(t) {
                Ok(true) => report.removed("nft table", t.to_string()),
                Ok(false) => {}
                Err(e) => report.errors.push(e.to_string()),
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        report.errors.push(format!("nf_tables: {e}"));
    }
}

/// kube-proxy's nftables mode writes `ip kube-proxy` and `ip6 kube-proxy`, nothing else.
pub fn is_kube_proxy_table(t: &NftTable) -> bool {
    t.name == KUBE_PROXY_NFT_TABLE && (t.family == NFPROTO_IPV4 || t.family == NFPROTO_IPV6)
}

/// Whether the `ip_vs` module is loaded in this network namespace.
fn ipvs_loaded() -> bool {
    Path::new("/proc/net/ip_vs").exists()
}

async fn ipvs_step(opts: &CleanupOptions, rtnl: &Rtnl, report: &mut CleanupReport) {
    if !ipvs_loaded() {
        report
            .notes
            .push("IPVS is not loaded: no virtual service to remove".to_owned());
        return;
    }
    let ownership = match ownership(opts, rtnl).await {
        Ok(o) => o,
        Err(e) => {
            report.errors.push(format!("reading addresses: {e}"));
            return;
        }
    };
    let handle = match ipvs::IpvsHandle::connect().await {
        Ok(h) => h,
        Err(e) => {
            report.errors.push(format!("connecting to IPVS: {e}"));
            return;
        }
    };
    let services = match handle.services().await {
        Ok(s) => s,
        Err(e) => {
            report.errors.push(format!("listing IPVS services: {e}"));
            return;
        }
    };
    let mut kept = 0;
    for s in services {
        let excluded = match s.key {
            ipvs::ServiceKey::Tuple { address, .. } => {
                opts.ipvs_exclude_cidrs.iter().any(|c| c.contains(&address))
            }
            ipvs::ServiceKey::Fwmark { .. } => false,
        };
        if !ownership.owns(&s) || excluded {
            kept += 1;
            continue;
        }
        let name = s.key.to_string();
        if opts.dry_run {
            report.removed("ipvs service", name);
            continue;
        }
        match handle.delete_service(&s.key).await {
            Ok(()) | Err(ipvs::IpvsError::ServiceNotFound(_)) => {
                report.removed("ipvs service", name)
            }
            Err(e) => report
                .errors
                .push(format!("deleting IPVS service {name}: {e}")),
        }
    }
    if kept > 0 {
        report.notes.push(format!(
            "{kept} IPVS virtual service(s) of others left untouched"
        ));
    }
}

/// The proxy ownership rule, from the kernel's addresses.
async fn ownership(opts: &CleanupOptions, rtnl: &Rtnl) -> Result<Ownership, NodeError> {
    let bound = match rtnl.link_index(DUMMY_INTERFACE).await? {
        Some(i) => rtnl.addresses_on(i).await?,
        None => BTreeSet::new(),
    };
    let node_addresses: BTreeSet<IpAddr> = rtnl
        .addresses()
        .await?
        .into_iter()
        .filter(|a| a.interface != DUMMY_INTERFACE)
        .map(|a| a.address)
        .collect();
    Ok(Ownership {
        bound,
        node_addresses,
        node_port_range: opts.node_port_range.clone(),
        exclude: opts.ipvs_exclude_cidrs.clone(),
        recorded: BTreeSet::new(),
    })
}

async fn interface_step(opts: &CleanupOptions, rtnl: &Rtnl, report: &mut CleanupReport) {
    match rtnl.link_index(DUMMY_INTERFACE).await {
        Ok(None) => {}
        Ok(Some(_)) if opts.dry_run => report.removed("interface", DUMMY_INTERFACE),
        Ok(Some(_)) => match rtnl.delete_link(DUMMY_INTERFACE).await {
            Ok(()) => report.removed("interface", DUMMY_INTERFACE),
            Err(e) => report.errors.push(e.to_string()),
        },
        Err(e) => report.errors.push(e.to_string()),
    }
}

async fn tc_step(opts: &CleanupOptions, rtnl: &Rtnl, report: &mut CleanupReport) {
    let links = match rtnl.links().await {
        Ok(l) => l,
        Err(e) => {
            report
                .errors
                .push(format!("listing interfaces for TC filters: {e}"));
            return;
        }
    };
    // libbpf's query and detach identify a filter by interface, hook, handle and priority; the
    // program fd a hook is built with is not used by either.
    let placeholder = match std::fs::File::open("/dev/null") {
        Ok(f) => f,
        Err(e) => {
            report.errors.push(format!("TC filters: {e}"));
            return;
        }
    };
    for link in links {
        for (hook, dir) in [
            (libbpf_rs::TC_INGRESS, "ingress"),
            (libbpf_rs::TC_EGRESS, "egress"),
        ] {
            let Ok(ifindex) = i32::try_from(link.index) else {
                continue;
            };
            let mut h = libbpf_rs::TcHookBuilder::new(placeholder.as_fd())
                .ifindex(ifindex)
                .handle(probes::loader::CLSACT_HANDLE)
                .priority(probes::loader::CLSACT_PRIORITY)
                .hook(hook);
            if h.query().is_err() {
                continue;
            }
            let name = format!("{} {dir}", link.name);
            if opts.dry_run {
                report.removed("tc filter", name);
                continue;
            }
            match h.detach() {
                Ok(()) => report.removed("tc filter", name),
                Err(e) => report
                    .errors
                    .push(format!("detaching TC filter {name}: {e}")),
            }
        }
    }
}

fn pins_step(opts: &CleanupOptions, report: &mut CleanupReport) {
    let root = &opts.pin_root;
    if !root.exists() {
        return;
    }
    let name = root.display().to_string();
    if opts.dry_run {
        report.removed("bpf pins", name);
        return;
    }
    // Each layout version (`v1`, …) holds its own pinned links: detach those first.
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir()
                && let Err(err) = probes::loader::remove_pins(&p)
            {
                report
                    .errors
                    .push(format!("removing {}: {err}", p.display()));
            }
        }
    }
    match std::fs::remove_dir_all(root) {
        Ok(()) => report.removed("bpf pins", name),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => report.removed("bpf pins", name),
        Err(e) => report.errors.push(format!("removing {name}: {e}")),
    }
}

/// `net.ipv4.vs.snat_reroute` back to the kernel's default (1), which kube-proxy leaves, when
/// this agent's `auto` or `off` had it at 0 (`crate::datapath::reroute`). Not when IPVS is not
/// loaded (no `/proc/sys/net/ipv4/vs`).
fn snat_reroute_step(opts: &CleanupOptions, report: &mut CleanupReport) {
    use crate::datapath::{reroute, sysctl};
    let root = sysctl::default_root();
    let want = reroute::KERNEL_DEFAULT;
    // The value found when it is not the default (`set_in` writes the default in the same step).
    let found = if opts.dry_run {
        sysctl::read_in(&root, want.name).map(|v| (v != want.value).then_some(v))
    } else {
        sysctl::set_in(&root, &want)
    };
    match found {
        Ok(Some(old)) => report.removed("sysctl", format!("{} = {old}", want.name)),
        Ok(None) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => report
            .errors
            .push(format!("setting {} = {}: {e}", want.name, want.value)),
    }
}

fn state_step(opts: &CleanupOptions, report: &mut CleanupReport) {
    let file = crate::state::path(&opts.state_dir);
    let tmp = file
        .file_name()
        .map(|n| opts.state_dir.join(format!(".{}.tmp", n.to_string_lossy())));
    for p in std::iter::once(file).chain(tmp) {
        if !p.exists() {
            continue;
        }
        if opts.dry_run {
            report.removed("state file", p.display().to_string());
            continue;
        }
        match std::fs::remove_file(&p) {
            Ok(()) => report.removed("state file", p.display().to_string()),
            Err(e) => report.errors.push(format!("removing {}: {e}", p.display())),
        }
    }
    // The directory goes too when nothing else is in it.
    if !opts.dry_run {
        let _ = std::fs::remove_dir(&opts.state_dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipset_names_cover_the_reference_node_and_ipv6_twins() {
        let names = kube_proxy_ipset_names();
        let reference = include_str!("../../tests/fixtures/kube-proxy-v1.36/ipset.txt");
        let listed: Vec<&str> = reference
            .lines()
            .filter_map(|l| l.strip_prefix("Name: "))
            .collect();
        assert_eq!(listed.len(), 17);
        for n in listed {
            assert!(names.contains(n), "{n}");
        }
        assert!(names.contains("KUBE-6-CLUSTER-IP"));
        // 32 bytes, truncated as kube-proxy does.
        assert!(names.contains("KUBE-6-LOAD-BALANCER-SOURCE-CID"));
        assert!(names.contains("KUBE-6-NODE-PORT-LOCAL-SCTP-HAS"));
        assert!(names.iter().all(|n| n.len() <= 31));
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with("KUBE-SRC-") || n.starts_with("KUBE-DST-"))
        );
    }

    #[test]
    fn only_ip_and_ip6_kube_proxy_tables() {
        let t = |family, name: &str| NftTable {
            family,
            name: name.into(),
        };
        assert!(is_kube_proxy_table(&t(NFPROTO_IPV4, "kube-proxy")));
        assert!(is_kube_proxy_table(&t(NFPROTO_IPV6, "kube-proxy")));
        assert!(!is_kube_proxy_table(&t(
            nfnetlink::NFPROTO_INET,
            "kube-proxy"
        )));
        assert!(!is_kube_proxy_table(&t(NFPROTO_IPV4, "filter")));
        assert!(!is_kube_proxy_table(&t(NFPROTO_IPV4, "kube-proxy-canary")));
        // Ours is never kube-proxy's (the takeover and `cleanup --kube-proxy` keep it).
        assert!(!is_kube_proxy_table(&crate::datapath::notrack::table()));
    }

    #[test]
    fn report_text() {
        let mut r = CleanupReport {
            dry_run: true,
            ..Default::default()
        };
        assert_eq!(r.to_string(), "nothing to remove\n");
        r.removed("ipset", "KUBE-CLUSTER-IP");
        r.errors.push("x".into());
        assert_eq!(
            r.to_string(),
            "would remove ipset KUBE-CLUSTER-IP\nerror: x\n"
        );
        assert!(!r.is_ok());
    }
}
