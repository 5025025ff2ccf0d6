//! The node's eBPF datapath as the agent runs it (docs/datapath.md): loading (or re-using) the
//! pinned programs and maps, the sysctls, nf_tables table and iptables rules it needs, attaching the TC programs
//! to every device that can carry service traffic, the per-device SNAT source addresses, the
//! service maps (through [`crate::reconcile::datapath`]), counters and expiry.
//!
//! Restarts drop nothing: maps are pinned and re-used, TC programs are replaced in place (TCX
//! link update, or `tc filter replace` on clsact), and nothing is detached on exit.
//!
//! Ports: SNAT ports must stay outside the node's ephemeral ports (`net.ipv4.ip_local_port_range`)
//! and the NodePorts. An explicit `snatPortRange` that overlaps them stops start-up
//! ([`snat_ports`]); the automatic range is the widest one left. [`LocalPortWatch`] re-reads the
//! sysctl later: the datapath follows a change (the automatic range moves with it), and an
//! explicit range that now overlaps is logged as an error.

pub mod drain;
pub mod ipvs_conns;
pub mod lock;
pub mod notrack;
pub mod reroute;
pub mod rules;
pub mod sweep;
pub mod switch;
pub mod sysctl;
pub mod tuple_hash;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use ipnet::IpNet;
use probes::maps::{
    CFG_F_CLUSTER_CIDRS, CFG_F_MASQ_ALL, Config, DevValue, map_names, parse_local_port_range,
};
use probes::{
    Datapath as Loaded, DatapathOptions, DeviceKind, MapSizes, ProbeKind, ProbePreference, TypedMap,
};

use crate::model::{Changed, DUMMY_INTERFACE, DesiredState};
use crate::node::{AddressEntry, Link, LinkKind};
use crate::node_state::{DesiredNodeState, NodeStatePhase, Part, Repair, RepairReport, RulesSpec};
use crate::reconcile::datapath as maps_rec;

/// How the datapath is set up.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    pub pin_root: PathBuf,
    pub mark_svc: u32,
    pub mark_masq: u32,
    /// The reply mark bit (0: none), in `config.flags` ([`probes::maps::reply_mark_flags`]).
    pub mark_reply: u32,
    /// SNAT ports; `None`: the largest range outside `ip_local_port_range` and the NodePorts.
    pub snat_ports: Option<(u16, u16)>,
    pub node_ports: (u16, u16),
    pub masquerade_all: bool,
    pub cluster_cidrs: Vec<IpNet>,
    pub rules_backend: rules::Backend,
    pub strict_arp: bool,
    pub map_sizes: MapSizes,
    pub timeouts: sweep::Timeouts,
    /// Where sysctls are read and written ([`sysctl::default_root`]).
    pub sysctl_root: PathBuf,
    /// `net.ipv4.vs.snat_reroute` ([`reroute`]).
    pub snat_reroute: reroute::SnatReroute,
    /// Whether to attach the probe on IPVS freeing a connection ([`sweep::ConnsRemoval`]).
    pub ipvs_free_probe: bool,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            pin_root: PathBuf::from(probes::loader::DEFAULT_PIN_ROOT),
            mark_svc: probes::maps::DEFAULT_MARK_SVC,
            mark_masq: probes::maps::DEFAULT_MARK_MASQ,
            mark_reply: probes::maps::DEFAULT_MARK_REPLY,
            snat_ports: None,
            node_ports: (30000, 32767),
            masquerade_all: false,
            cluster_cidrs: Vec::new(),
            rules_backend: rules::Backend::Default,
            strict_arp: false,
            map_sizes: MapSizes::default(),
            timeouts: sweep::Timeouts::default(),
            sysctl_root: sysctl::default_root(),
            snat_reroute: reroute::SnatReroute::Auto,
            ipvs_free_probe: true,
        }
    }
}

/// The widest port range outside both the node's ephemeral ports and the NodePorts (SNAT ports
/// must never collide with the node's own sockets nor look like NodePort traffic).
pub fn snat_port_range(local: (u16, u16), node_ports: (u16, u16)) -> Option<(u16, u16)> {
    let mut taken = [local, node_ports];
    taken.sort();
    let mut best: Option<(u16, u16)> = None;
    let mut start: u32 = 1024;
    for (lo, hi) in taken {
        if (lo as u32) > start {
            let cand = (start as u16, lo - 1);
            if best.is_none_or(|b| cand.1 - cand.0 > b.1 - b.0) {
                best = Some(cand);
            }
        }
        start = start.max(hi as u32 + 1);
    }
    if start <= 65535 {
        let cand = (start as u16, 65535);
        if best.is_none_or(|b| cand.1 - cand.0 > b.1 - b.0) {
            best = Some(cand);
        }
    }
    best
}

fn overlaps(a: (u16, u16), b: (u16, u16)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

/// The node's ephemeral ports, `net.ipv4.ip_local_port_range` (of the agent's network
/// namespace, the host's).
pub fn local_port_range() -> anyhow::Result<(u16, u16)> {
    let text = sysctl::read("net.ipv4.ip_local_port_range")
        .context("reading net.ipv4.ip_local_port_range")?;
    parse_local_port_range(&text)
        .with_context(|| format!("net.ipv4.ip_local_port_range {text:?}: expected LOW HIGH"))
}

/// The SNAT ports for the node's ephemeral ports `local`: the `explicit` range, which must not
/// overlap them, else the widest range outside them and the NodePorts ([`snat_port_range`]).
/// The error names both ranges and the fixes.
pub fn snat_ports(
    explicit: Option<(u16, u16)>,
    local: (u16, u16),
    node_ports: (u16, u16),
) -> anyhow::Result<(u16, u16)> {
    match explicit {
        Some(snat) if overlaps(snat, local) => anyhow::bail!(
            "kubeIpvsBpf.datapath.snatPortRange {}-{} overlaps the node's ephemeral ports \
             (net.ipv4.ip_local_port_range {}-{}): translated connections would take ports the \
             node's own connections use; choose a range outside {}-{} (and the NodePorts {}-{}), \
             narrow ip_local_port_range, or leave snatPortRange unset for the widest free range",
            snat.0,
            snat.1,
            local.0,
            local.1,
            local.0,
            local.1,
            node_ports.0,
            node_ports.1
        ),
        Some(snat) => Ok(snat),
        None => snat_port_range(local, node_ports).with_context(|| {
            format!(
                "no port range is left for SNAT outside the node's ephemeral ports \
                 (net.ipv4.ip_local_port_range {}-{}) and the NodePorts {}-{}: narrow \
                 ip_local_port_range",
                local.0, local.1, node_ports.0, node_ports.1
            )
        }),
    }
}

/// The datapath's port configuration after `ip_local_port_range` became `local`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRanges {
    /// The node's ephemeral ports (the datapath keeps a client's port only outside them).
    pub local: (u16, u16),
    /// The SNAT ports.
    pub snat: (u16, u16),
    /// The SNAT ports overlap `local`: an explicit range (kept: the operator chose it), or an
    /// automatic one with no free range left (kept until one is).
    pub overlap: bool,
}

/// What the datapath uses once `ip_local_port_range` changed to `local`: an explicit range
/// stays; the automatic one moves to the widest free range (or stays when there is none).
pub fn ports_after_change(
    explicit: Option<(u16, u16)>,
    node_ports: (u16, u16),
    current_snat: (u16, u16),
    local: (u16, u16),
) -> PortRanges {
    let snat = match explicit {
        Some(snat) => snat,
        None => snat_port_range(local, node_ports).unwrap_or(current_snat),
    };
    PortRanges {
        local,
        snat,
        overlap: overlaps(snat, local),
    }
}

/// Watches `ip_local_port_range` for the running datapath (through its pinned `config` map),
/// for the agent to call periodically: start-up read the sysctl once, but an operator may
/// change it at any time.
pub struct LocalPortWatch {
    config: TypedMap<u32, Config>,
    explicit: Option<(u16, u16)>,
    node_ports: (u16, u16),
    /// The ephemeral ports last seen (or written by start-up).
    local: (u16, u16),
}

impl LocalPortWatch {
    /// Opens the `config` map pinned under the datapath's pin root (after [`Datapath::start`]).
    pub fn open(cfg: &DatapathConfig) -> anyhow::Result<LocalPortWatch> {
        let path = cfg.pin_root.join(map_names::CONFIG);
        let config: TypedMap<u32, Config> =
            TypedMap::open_pinned(&path).with_context(|| format!("opening {}", path.display()))?;
        let current = config.get(&0)?.unwrap_or_default();
        Ok(LocalPortWatch {
            config,
            explicit: cfg.snat_ports,
            node_ports: cfg.node_ports,
            local: (current.local_port_min, current.local_port_max),
        })
    }

    /// Re-reads `ip_local_port_range`. On a change: writes the new ephemeral ports (and the
    /// moved automatic SNAT range) into the datapath's configuration, logs it, and logs an error
    /// naming both ranges when the SNAT ports now overlap the ephemeral ones. Returns what
    /// changed (`None`: nothing). Each change is logged once.
    pub fn check(&mut self) -> anyhow::Result<Option<PortRanges>> {
        let local = local_port_range()?;
        if local == self.local {
            return Ok(None);
        }
        let current = self.config.get(&0)?.unwrap_or_default();
        let old_snat = (current.snat_port_min, current.snat_port_max);
        let next = ports_after_change(self.explicit, self.node_ports, old_snat, local);
        let config = Config {
            local_port_min: next.local.0,
            local_port_max: next.local.1,
            snat_port_min: next.snat.0,
            snat_port_max: next.snat.1,
            ..current
        };
        if config != current {
            self.config.insert(&0, &config)?;
        }
        let range = |r: (u16, u16)| format!("{}-{}", r.0, r.1);
        tracing::info!(
            old = %range(self.local),
            new = %range(local),
            "net.ipv4.ip_local_port_range changed: the datapath keeps client ports only outside the new range"
        );
        if next.snat != old_snat {
            tracing::warn!(
                old = %range(old_snat),
                new = %range(next.snat),
                "the automatic SNAT port range moved with ip_local_port_range: new translations use the new range, translated connections keep their ports"
            );
        }
        if next.overlap {
            let why = if self.explicit.is_some() {
                "kubeIpvsBpf.datapath.snatPortRange"
            } else {
                "no SNAT range is left outside it and the NodePorts, so the automatic one"
            };
            tracing::error!(
                snat_ports = %range(next.snat),
                local_ports = %range(local),
                "net.ipv4.ip_local_port_range now overlaps the SNAT ports ({why}): translated connections may take ports the node's own connections use; restore ip_local_port_range or change snatPortRange and restart the agent"
            );
        }
        self.local = local;
        Ok(Some(next))
    }
}

/// Whether a device gets the TC programs: everything that can carry service traffic, except
/// loopback, `kube-ipvs0` (nothing leaves by it) and devices enslaved to another (a bridge's
/// ports: the bridge device itself has the programs, and translating twice would be wrong).
pub fn eligible(link: &Link) -> bool {
    link.kind != LinkKind::Loopback && link.name != DUMMY_INTERFACE && link.master.is_none()
}

/// The SNAT sources of each device: its own first usable address per family (the one
/// MASQUERADE would choose), else the node's primary address of that family (what MASQUERADE
/// picks for a device without one, e.g. a pod's host-side veth).
pub fn device_sources(
    links: &[Link],
    addresses: &[AddressEntry],
    primary: (Option<Ipv4Addr>, Option<Ipv6Addr>),
) -> BTreeMap<u32, DevValue> {
    let mut out = BTreeMap::new();
    for l in links.iter().filter(|l| eligible(l)) {
        let own = |v6: bool| {
            addresses
                .iter()
                .filter(|a| a.index == l.index && a.usable_as_source() && a.address.is_ipv6() == v6)
                .map(|a| a.address)
                .next()
        };
        let v4 = match own(false) {
            Some(IpAddr::V4(a)) => Some(a),
            _ => primary.0,
        };
        let v6 = match own(true) {
            Some(IpAddr::V6(a)) => Some(a),
            _ => primary.1,
        };
        out.insert(l.index, DevValue::new(v4, v6));
    }
    out
}

/// The iptables the agent writes with: `configured`, or with [`rules::Backend::Default`] the
/// one the node's firewall uses ([`rules::detect_backend`]); the choice is logged.
fn resolve_backend(configured: rules::Backend) -> rules::Backend {
    if configured != rules::Backend::Default {
        tracing::info!(backend = ?configured, "iptables backend as configured (kubeIpvsBpf.iptablesBackend)");
        return configured;
    }
    let (backend, why) = rules::detect_backend();
    tracing::info!(backend = ?backend, reason = why, "iptables backend detected");
    backend
}

/// The running datapath.
pub struct Datapath {
    loaded: Loaded,
    cfg: DatapathConfig,
    observed: maps_rec::ObservedMaps,
    attached: HashMap<u32, (String, DeviceKind)>,
    sources: BTreeMap<u32, DevValue>,
    probe: Option<ProbeKind>,
    /// The address sets (service, NodePort) the service maps were last planned with.
    last_addresses: Option<[Arc<BTreeSet<IpAddr>>; 2]>,
    /// Whether the pins of other layout versions (an upgraded agent's) were removed: done once
    /// this datapath is attached to every device, so they never run together for long.
    other_layouts_removed: bool,
    /// Whether the node rules were written once (the first write decides nf_tables or
    /// iptables notrack, and logs it).
    rules_written: bool,
    /// Whether the programs trust the port filter (docs/datapath.md "Port filter"): turned on
    /// once the probe and every device run this agent's programs, which keep it.
    port_filter: bool,
    /// The sysctls, nf_tables table and iptables rules kept on the node (checked by [`Datapath::repair_node`]).
    node: DesiredNodeState,
    /// The last node check that found the rules whole (the next skips reading them back while
    /// the rulesets are unchanged).
    rules_checked: Option<crate::node_state::RulesChecked>,
}

/// What a device sync did.
#[derive(Debug, Default, serde::Serialize)]
pub struct DeviceReport {
    pub attached: Vec<String>,
    pub detached: Vec<String>,
    pub failures: Vec<String>,
}

impl Datapath {
    /// Sets the sysctls, loads the programs (re-using pinned maps), writes the configuration,
    /// attaches the IPVS probe and writes the iptables rules.
    pub fn start(cfg: DatapathConfig) -> anyhow::Result<Datapath> {
        let kernel = probes::loader::kernel_version();
        for s in sysctl::owned(kernel, cfg.strict_arp) {
            match sysctl::set_in(&cfg.sysctl_root, &s) {
                Ok(Some(old)) => {
                    tracing::info!(sysctl = s.name, old = %old, new = s.value, "sysctl set")
                }
                Ok(None) => {}
                Err(e) => anyhow::bail!("setting {} = {}: {e}", s.name, s.value),
            }
        }
        let loaded = Loaded::load(DatapathOptions {
            pin_root: cfg.pin_root.clone(),
            map_sizes: cfg.map_sizes,
            ..DatapathOptions::default()
        })
        .context("loading the eBPF datapath")?;
        for r in loaded.map_reuse() {
            tracing::debug!(?r, "pinned map");
        }
        tracing::info!(
            rewrite = if loaded.direct_writes() {
                "direct writes (nat_write tail call)"
            } else {
                "BPF helpers (the kernel has no bpf_cast_to_kern_ctx)"
            },
            "eBPF datapath loaded"
        );
        // An agent restarted during the switch window finds it open in the pinned config.
        let window = loaded.maps().switch_window_open().unwrap_or(false);
        let mut node = DesiredNodeState::new(
            NodeStatePhase::of_switch_window(window),
            cfg.sysctl_root.clone(),
            kernel,
            cfg.strict_arp,
            cfg.snat_reroute,
            Some(RulesSpec {
                backend: resolve_backend(cfg.rules_backend),
                // Until the first write finds nf_tables missing (see write_rules).
                notrack: rules::Notrack::Nftables,
                mark_svc: cfg.mark_svc,
                xt_svc_pin: loaded.xt_svc_pin_path(),
                ipv6: std::path::Path::new("/proc/sys/net/ipv6").exists(),
            }),
        );
        // Not fatal: the kernel's default (on) is the safe value.
        node.apply_snat_reroute();
        let mut dp = Datapath {
            node,
            rules_checked: None,
            loaded,
            cfg,
            observed: Default::default(),
            attached: HashMap::new(),
            sources: BTreeMap::new(),
            probe: None,
            last_addresses: None,
            other_layouts_removed: false,
            rules_written: false,
            port_filter: false,
        };
        dp.write_config()?;
        match dp.loaded.attach_ipvs_probe(ProbePreference::Auto) {
            Ok(kind) => {
                let passed_over = dp.loaded.ipvs_probe_passed_over().join("; ");
                tracing::info!(probe = ?kind, passed_over, "IPVS connection probe attached");
                dp.probe = Some(kind);
            }
            // Nothing depends on the probe alone (docs/datapath.md): run without it.
            Err(e) => tracing::warn!("IPVS connection probe not attached: {e}"),
        }
        if !dp.cfg.ipvs_free_probe {
            dp.loaded
                .detach_ipvs_free_probe()
                .context("detaching the probe on IPVS freeing a connection")?;
            tracing::info!(
                "probe on IPVS freeing a connection off (kubeIpvsBpf.datapath.ipvsFreeProbe): the \
                 sweeper removes conns entries, reading conns in full every minute"
            );
        } else {
            match dp.loaded.attach_ipvs_free_probe() {
                Ok(kind) => {
                    let passed_over = dp.loaded.ipvs_free_probe_passed_over().join("; ");
                    tracing::info!(
                        probe = ?kind,
                        passed_over,
                        "probe on IPVS freeing a connection attached: conns entries go with \
                         their connections"
                    );
                }
                // The sweeper then removes the entries itself (sweep::ConnsRemoval::BySweeper).
                Err(e) => tracing::warn!(
                    "probe on IPVS freeing a connection not attached, the sweeper reads conns in \
                     full every minute instead: {e}"
                ),
            }
        }
        dp.write_rules()?;
        dp.observed = maps_rec::observe(dp.loaded.maps()).context("reading the service maps")?;
        dp.sources = dp.loaded.maps().devices.entries()?.into_iter().collect();
        Ok(dp)
    }

    /// Opens the switch window from kube-proxy (docs/switching.md) for the open connections
    /// conntrack holds to `service_ports` (address, IP protocol, port), before the first sync:
    /// they stay tracked, keeping the NAT kube-proxy gave them, until they end. An agent
    /// restarted during the window finds its map pinned and goes on with it.
    pub fn seed_switch(
        &mut self,
        service_ports: &std::collections::HashSet<(IpAddr, u8, u16)>,
    ) -> anyhow::Result<()> {
        if drain::end(self.loaded.maps()).context("ending the drain under way")? {
            tracing::warn!(
                "a drain for the rollback to kube-proxy was under way: the agent takes the node \
                 back (the connections opened meanwhile are on conntrack and stay there)"
            );
        }
        let tracked =
            switch::seed_from_conntrack(self.loaded.maps(), service_ports, sweep::monotonic_ns())?;
        if tracked > 0 {
            tracing::info!(
                tuples = tracked,
                "switch window from kube-proxy open: connections conntrack holds to service ports \
                 stay tracked until they end"
            );
        }
        self.follow_switch_window()
    }

    /// Puts the node state in the phase of the switch window as the pinned config has it, and
    /// rewrites the iptables rules when that changed (the window's established accept added or
    /// dropped): the sweeper closes the window, the next node check follows.
    fn follow_switch_window(&mut self) -> anyhow::Result<()> {
        let open = self
            .loaded
            .maps()
            .switch_window_open()
            .context("reading the switch window's flag")?;
        let phase = NodeStatePhase::of_switch_window(open);
        if phase == self.node.phase {
            return Ok(());
        }
        self.node.phase = phase;
        self.write_rules()?;
        tracing::info!(
            window = if open { "open" } else { "closed" },
            "switch window from kube-proxy: filter chain's accept of established connections {}",
            if open { "added" } else { "dropped" }
        );
        Ok(())
    }

    fn write_config(&self) -> anyhow::Result<()> {
        let local = local_port_range().unwrap_or_else(|e| {
            let default = (
                probes::maps::DEFAULT_LOCAL_PORT_MIN,
                probes::maps::DEFAULT_LOCAL_PORT_MAX,
            );
            tracing::warn!(
                "{e:#}: taking the kernel's default {}-{}",
                default.0,
                default.1
            );
            default
        });
        let (snat_min, snat_max) = snat_ports(self.cfg.snat_ports, local, self.cfg.node_ports)?;
        let mut flags = probes::maps::reply_mark_flags(self.cfg.mark_reply);
        if self.cfg.masquerade_all {
            flags |= CFG_F_MASQ_ALL;
        }
        if !self.cfg.cluster_cidrs.is_empty() {
            flags |= CFG_F_CLUSTER_CIDRS;
        }
        let config = Config {
            mark_svc: self.cfg.mark_svc,
            mark_masq: self.cfg.mark_masq,
            snat_port_min: snat_min,
            snat_port_max: snat_max,
            local_port_min: local.0,
            local_port_max: local.1,
            flags,
            ..Config::default()
        };
        let config = self.loaded.maps().complete(&config);
        if self.loaded.maps().config()? != Some(config) {
            self.loaded.maps().set_config(&config)?;
            tracing::info!(snat_ports = %format!("{snat_min}-{snat_max}"), local_ports = %format!("{}-{}", local.0, local.1), "datapath configured");
        }
        Ok(())
    }

    /// Writes the nf_tables table ([`notrack`]) and the iptables rules of each family. A
    /// kernel without nf_tables (the table cannot be written at the first write) keeps the
    /// iptables notrack rule instead, from then on.
    fn write_rules(&mut self) -> anyhow::Result<()> {
        let window = self.node.phase == NodeStatePhase::Switch;
        let Some(spec) = &mut self.node.rules else {
            return Ok(());
        };
        if spec.notrack == rules::Notrack::Nftables {
            let written = crate::cleanup::nfnetlink::Nfnl::open()
                .and_then(|mut nl| notrack::apply(&mut nl, spec.mark_svc));
            match written {
                Ok(()) => {}
                Err(e) if !self.rules_written => {
                    tracing::warn!(
                        "nf_tables table inet {} not written ({e}): the kernel seems to lack                          nf_tables; service traffic is untracked by an iptables raw PREROUTING                          rule instead",
                        notrack::TABLE
                    );
                    spec.notrack = rules::Notrack::Iptables;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("writing nf_tables table inet {}", notrack::TABLE)
                    });
                }
            }
        }
        let spec = spec.clone();
        rules::apply(
            spec.backend,
            false,
            spec.mark_svc,
            &spec.xt_svc_pin,
            window,
            spec.notrack,
        )
        .context("writing the IPv4 iptables rules")?;
        if spec.ipv6 {
            rules::apply(
                spec.backend,
                true,
                spec.mark_svc,
                &spec.xt_svc_pin,
                window,
                spec.notrack,
            )
            .context("writing the IPv6 iptables rules")?;
        }
        if !self.rules_written {
            self.rules_written = true;
            tracing::info!(
                notrack = match spec.notrack {
                    rules::Notrack::Nftables => "nf_tables table inet kube-ipvs-bpf",
                    rules::Notrack::Iptables => "iptables raw PREROUTING",
                },
                "node rules written"
            );
        }
        Ok(())
    }

    /// Checks the node state this datapath keeps against the kernel and repairs what differs:
    /// the sysctls and iptables rules ([`DesiredNodeState::repair`]) and the TC programs on
    /// every device it attached to (re-attached when the kernel no longer runs them there). A
    /// device that cannot be re-attached is forgotten: the next device sync attaches it again.
    /// `net.ipv4.vs.snat_reroute`'s mode and whether it was last written on; `None` before the
    /// first decision was written.
    pub fn snat_reroute(&self) -> Option<(reroute::SnatReroute, bool)> {
        self.node
            .snat_reroute_applied
            .as_ref()
            .map(|d| (self.node.snat_reroute, d.value == "1"))
    }

    pub fn repair_node(&mut self) -> RepairReport {
        let mut report = RepairReport::default();
        if let Err(e) = self.follow_switch_window() {
            report.failed(format!(
                "following the switch window from kube-proxy: {e:#}"
            ));
        }
        report.extend(self.node.repair(&mut self.rules_checked));
        let mut devices: Vec<(u32, String, DeviceKind)> = self
            .attached
            .iter()
            .map(|(&i, (name, kind))| (i, name.clone(), *kind))
            .collect();
        devices.sort_by_key(|d| d.0);
        for (index, name, kind) in devices {
            let problems = match self.loaded.verify_tc(index) {
                Ok(p) if p.is_empty() => continue,
                Ok(p) => p,
                Err(e) => {
                    report.failed(format!("checking the TC programs on {name}: {e}"));
                    continue;
                }
            };
            // A device deleted since the last device sync (pods come and go): that sync
            // forgets it, nothing to repair.
            if nix::net::if_::if_nametoindex(name.as_str()).ok() != Some(index) {
                continue;
            }
            match self.loaded.attach_tc(index, kind) {
                Ok(_) => report.repairs.push(Repair::new(
                    Part::Tc,
                    format!("{name}: {}", problems.join("; ")),
                )),
                Err(e) => {
                    self.attached.remove(&index);
                    report.failed(format!(
                        "re-attaching to {name} ({}): {e}",
                        problems.join("; ")
                    ));
                }
            }
        }
        report
    }

    /// Attaches the programs to new eligible devices, forgets vanished ones, and keeps each
    /// device's SNAT sources up to date.
    pub fn sync_devices(
        &mut self,
        links: &[Link],
        addresses: &[AddressEntry],
        primary: (Option<Ipv4Addr>, Option<Ipv6Addr>),
    ) -> DeviceReport {
        let mut report = DeviceReport::default();
        let present: HashMap<u32, &Link> = links
            .iter()
            .filter(|l| eligible(l))
            .map(|l| (l.index, l))
            .collect();
        let gone: Vec<u32> = self
            .attached
            .keys()
            .filter(|i| !present.contains_key(i))
            .copied()
            .collect();
        for index in gone {
            if let Some((name, _)) = self.attached.remove(&index) {
                // The device is gone (its programs with it), or no longer eligible: its TCX
                // link pins must go too, or they keep the link and the program alive.
                if let Err(e) = self.loaded.detach_tc(index) {
                    report.failures.push(format!("detaching from {name}: {e}"));
                }
                report.detached.push(name);
            }
        }
        // Links pinned for devices that went while no agent ran, or by an agent that attached
        // to a device no longer eligible.
        match self
            .loaded
            .remove_stale_tcx_links(|index| present.contains_key(&index))
        {
            Ok(removed) => {
                for pin in removed {
                    tracing::info!(pin = %pin.display(), "stale TCX link removed");
                    let index = pin
                        .file_name()
                        .and_then(|n| probes::loader::tcx_link_ifindex(&n.to_string_lossy()));
                    if let Some(index) = index {
                        // A defunct link of a present device (its index re-used): attach anew.
                        self.attached.remove(&index);
                    }
                }
            }
            Err(e) => report
                .failures
                .push(format!("removing stale TCX link pins: {e}")),
        }
        for (&index, link) in &present {
            let kind = if link.kind == LinkKind::L3 {
                DeviceKind::L3
            } else {
                DeviceKind::Ethernet
            };
            if self.attached.get(&index).is_some_and(|(_, k)| *k == kind) {
                continue;
            }
            match self.loaded.attach_tc(index, kind) {
                Ok(mode) => {
                    tracing::info!(device = %link.name, mode = mode.as_str(), "datapath attached");
                    self.attached.insert(index, (link.name.clone(), kind));
                    report.attached.push(link.name.clone());
                }
                Err(e) => report
                    .failures
                    .push(format!("attaching to {}: {e}", link.name)),
            }
        }
        let want = device_sources(links, addresses, primary);
        let maps = self.loaded.maps();
        for (index, value) in &want {
            if self.sources.get(index) != Some(value) {
                match maps.set_device(*index, value) {
                    Ok(()) => {
                        self.sources.insert(*index, *value);
                    }
                    Err(e) => report
                        .failures
                        .push(format!("device {index} SNAT address: {e}")),
                }
            }
        }
        let stale: Vec<u32> = self
            .sources
            .keys()
            .filter(|i| !want.contains_key(i))
            .copied()
            .collect();
        for index in stale {
            if maps.remove_device(index).is_ok() {
                self.sources.remove(&index);
            }
        }
        if !self.other_layouts_removed && report.failures.is_empty() {
            self.remove_other_layouts();
        }
        if report.failures.is_empty() {
            self.enable_port_filter();
        }
        report
    }

    /// Lets the programs trust the port filter once nothing an older agent loaded can still add
    /// entries without their bits: this agent's probe is attached (it replaced the pinned one)
    /// and its programs are on every device. Without the probe the filter stays off (an older
    /// probe may still be attached); the datapath does every lookup then, as before.
    fn enable_port_filter(&mut self) {
        if self.port_filter || self.probe.is_none() {
            return;
        }
        match self.loaded.maps().enable_port_filter() {
            Ok(true) => {
                self.port_filter = true;
                tracing::info!("port filter on: lookups that cannot hit are skipped");
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("port filter left off: {e:#}"),
        }
    }

    /// Removes what an agent with another map layout left pinned (its programs, links, probe
    /// and maps): our programs run on every device by now. Its SNAT entries go with it (a layout
    /// change cannot carry them over), so connections it translated break at the upgrade.
    fn remove_other_layouts(&mut self) {
        self.other_layouts_removed = true;
        for old in probes::loader::other_layouts(&self.cfg.pin_root) {
            match probes::loader::remove_layout(&old) {
                Ok(left) if left.is_empty() => tracing::warn!(
                    pins = %old.display(),
                    "removed the datapath of another map layout (an upgrade): connections it translated are not carried over"
                ),
                Ok(left) => tracing::warn!(
                    pins = %old.display(),
                    left = %left.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "),
                    "removed the datapath of another map layout (an upgrade), except what is not ours"
                ),
                Err(e) => {
                    tracing::warn!(pins = %old.display(), "removing the datapath of another map layout: {e}")
                }
            }
        }
    }

    /// The map changes for `desired` (see [`maps_rec::plan`]): every service port, or only
    /// the `changed` ones.
    pub fn plan_maps(&mut self, desired: &DesiredState, changed: &Changed) -> maps_rec::MapPlan {
        let plan = self.plan_maps_inner(desired, changed);
        self.last_addresses = Some([
            desired.service_addresses.clone(),
            desired.node_port_addresses.clone(),
        ]);
        plan
    }

    fn plan_maps_inner(&self, desired: &DesiredState, changed: &Changed) -> maps_rec::MapPlan {
        let cidrs = &self.cfg.cluster_cidrs;
        match changed {
            Changed::All => {
                maps_rec::plan(&maps_rec::desired(desired, cidrs), &self.observed, None)
            }
            Changed::Keys(keys) => {
                let vss = keys.iter().filter_map(|k| desired.find(k)).map(|v| &**v);
                // The model replaces an address set only when its membership changes.
                let same_addresses = self.last_addresses.as_ref().is_some_and(|[a, b]| {
                    Arc::ptr_eq(a, &desired.service_addresses)
                        && Arc::ptr_eq(b, &desired.node_port_addresses)
                });
                let want = if same_addresses {
                    maps_rec::desired_ports_only(vss)
                } else {
                    maps_rec::desired_of(vss, desired, cidrs)
                };
                let scope = keys
                    .iter()
                    .map(|&k| probes::maps::SvcKey::from(k))
                    .collect();
                maps_rec::plan(&want, &self.observed, Some(&scope))
            }
        }
    }

    /// Applies map changes; returns how many were applied and the failures.
    pub fn apply_maps(&mut self, ops: &[maps_rec::MapOp]) -> (usize, Vec<String>) {
        maps_rec::apply(self.loaded.maps(), ops, &mut self.observed)
    }

    /// Re-reads the service maps (full resync: repairs drift).
    pub fn observe(&mut self) -> anyhow::Result<()> {
        self.observed = maps_rec::observe(self.loaded.maps())?;
        Ok(())
    }

    /// Every counter, summed over CPUs.
    pub fn stats(&self) -> probes::Result<probes::maps::Stats> {
        self.loaded.stats()
    }

    /// Takes the kernel's IPVS timeouts for the sweeper's (see [`sweep::Timeouts::with_ipvs`]);
    /// a sweeper started later uses them.
    pub fn follow_ipvs_timeouts(&mut self, ipvs: &ipvs::Timeouts) {
        self.cfg.timeouts = self.cfg.timeouts.with_ipvs(ipvs);
    }

    /// Starts the sweeper (expiry, resolution and the datapath metrics, every `period`) on a
    /// thread of its own, with its own handles on the pinned maps. It runs until dropped.
    pub fn start_sweeper(
        &self,
        period: std::time::Duration,
        metrics: crate::admin::metrics::Metrics,
    ) -> anyhow::Result<sweep::Sweeper> {
        let pins = self.loaded.pin_root();
        let maps = probes::DatapathMaps::open_pinned(pins)
            .with_context(|| format!("opening the maps pinned under {}", pins.display()))?;
        let removal = if self.loaded.ipvs_free_probe().is_some() {
            sweep::ConnsRemoval::AtIpvsFree
        } else {
            sweep::ConnsRemoval::BySweeper
        };
        sweep::Sweeper::start(maps, period, self.cfg.timeouts, metrics, removal)
            .context("starting the sweeper thread")
    }

    /// Which IPVS probe is attached, if any.
    pub fn probe(&self) -> Option<ProbeKind> {
        self.probe
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snat_ports_avoid_the_local_range_and_the_node_ports() {
        assert_eq!(
            snat_port_range((32768, 60999), (30000, 32767)),
            Some((1024, 29999))
        );
        assert_eq!(
            snat_port_range((1024, 40000), (30000, 32767)),
            Some((40001, 65535))
        );
        assert_eq!(snat_port_range((1024, 65535), (30000, 32767)), None);
        assert_eq!(
            snat_port_range((10000, 20000), (30000, 32767)),
            Some((32768, 65535))
        );
    }

    #[test]
    fn an_explicit_snat_range_must_avoid_the_ephemeral_ports() {
        let e = snat_ports(Some((1024, 40000)), (32768, 60999), (30000, 32767))
            .unwrap_err()
            .to_string();
        for needle in [
            "snatPortRange 1024-40000",
            "ip_local_port_range 32768-60999",
        ] {
            assert!(e.contains(needle), "{e:?} does not name {needle:?}");
        }
        assert_eq!(
            snat_ports(Some((1024, 20000)), (32768, 60999), (30000, 32767)).unwrap(),
            (1024, 20000)
        );
        assert_eq!(
            snat_ports(None, (32768, 60999), (30000, 32767)).unwrap(),
            (1024, 29999)
        );
        let e = snat_ports(None, (1024, 65535), (30000, 32767))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ip_local_port_range 1024-65535"), "{e}");
    }

    #[test]
    fn a_local_range_change_moves_the_automatic_range_and_flags_an_explicit_overlap() {
        let np = (30000, 32767);
        // Automatic: follows the sysctl.
        assert_eq!(
            ports_after_change(None, np, (1024, 29999), (1024, 40000)),
            PortRanges {
                local: (1024, 40000),
                snat: (40001, 65535),
                overlap: false
            }
        );
        // Automatic with nothing left: kept, and flagged.
        assert_eq!(
            ports_after_change(None, np, (1024, 29999), (1024, 65535)),
            PortRanges {
                local: (1024, 65535),
                snat: (1024, 29999),
                overlap: true
            }
        );
        // Explicit: kept; flagged when the new local range overlaps it.
        assert!(ports_after_change(Some((2000, 3000)), np, (2000, 3000), (1500, 5000)).overlap);
        assert_eq!(
            ports_after_change(Some((2000, 3000)), np, (2000, 3000), (40000, 50000)),
            PortRanges {
                local: (40000, 50000),
                snat: (2000, 3000),
                overlap: false
            }
        );
    }

    fn link(index: u32, name: &str, kind: LinkKind, master: Option<u32>) -> Link {
        Link {
            index,
            name: name.into(),
            kind,
            master,
        }
    }

    fn addr(index: u32, a: &str, secondary: bool) -> AddressEntry {
        AddressEntry {
            index,
            address: a.parse().unwrap(),
            prefix_len: 24,
            secondary,
        }
    }

    #[test]
    fn devices_get_their_own_address_or_the_node_primary() {
        let links = vec![
            link(1, "lo", LinkKind::Loopback, None),
            link(2, "eth0", LinkKind::Ethernet, None),
            link(3, "cni0", LinkKind::Ethernet, None),
            link(4, "veth1", LinkKind::Ethernet, Some(3)),
            link(5, "kube-ipvs0", LinkKind::Ethernet, None),
            link(6, "tunl0", LinkKind::L3, None),
        ];
        let addrs = vec![
            addr(1, "127.0.0.1", false),
            addr(2, "10.0.0.5", false),
            addr(2, "10.0.0.6", true),
            addr(2, "fe80::1", false),
            addr(2, "2001:db8::5", false),
            addr(3, "10.244.1.1", false),
            addr(5, "10.96.0.1", false),
        ];
        let primary = (
            Some("10.0.0.5".parse().unwrap()),
            Some("2001:db8::5".parse().unwrap()),
        );
        let d = device_sources(&links, &addrs, primary);
        assert_eq!(d.keys().copied().collect::<Vec<_>>(), vec![2, 3, 6]);
        assert_eq!(d[&2], DevValue::new(primary.0, primary.1));
        assert_eq!(
            d[&3],
            DevValue::new(Some("10.244.1.1".parse().unwrap()), primary.1)
        );
        assert_eq!(d[&6], DevValue::new(primary.0, primary.1));
    }
}
