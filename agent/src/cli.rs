//! This binary's own command line: `run`, `plan`, `inspect`, `cleanup` and `init`, their
//! flags, and how each prints (text for people, `--output json` for tools). kube-proxy's
//! command line is [`crate::kube_proxy_cli`]'s, which runs through [`run_kubernetes`] and
//! [`cleanup_as_kube_proxy`] here.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use serde_json::{Value, json};

use crate::admin::{health, metrics};
use crate::config;
use crate::model::{self, NodePortAddresses};
use crate::node::Rtnl;
use crate::reconcile::{addresses, ipvs as ipvs_rec};
use crate::source::Snapshot;
use crate::source::kubernetes::{self, KubernetesSourceConfig};
use crate::source::watch::{load_snapshot, watch_path};
use crate::state;
use crate::sync::{self, SyncConfig, Syncer};

/// `--version`: the version, the git commit built from, and the datapath's map layout (the
/// pin root's last component, [`probes::loader::DEFAULT_PIN_ROOT`]; a test keeps them equal).
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit: ",
    env!("KUBE_IPVS_BPF_COMMIT"),
    "\ndatapath layout: v2"
);

#[derive(Parser, Debug)]
#[command(
    name = "kube-ipvs-bpf",
    version,
    long_version = LONG_VERSION,
    about = "A kube-proxy replacement: IPVS services with conntrack-free eBPF SNAT",
    after_help = "Without a subcommand (or as `kube-ipvs-bpf kube-proxy ...`, or run under the \
                  name kube-proxy) it takes kube-proxy's command line: \
                  `kube-ipvs-bpf kube-proxy --help` lists those flags."
)]
pub struct Cli {
    /// Log format: text (colour only on a terminal) or json (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Program the kernel from a source and keep it in sync.
    Run(Box<RunArgs>),
    /// Print the desired state and the changes that would be made, changing nothing.
    Plan {
        #[command(flatten)]
        source: SourceArgs,
        /// Output: text for people, json for tools.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove what kube-proxy left on this node (`--kube-proxy`), or this agent's own state.
    Cleanup(CleanupArgs),
    /// Prepare the node (mount bpffs at the pin root if needed) and exit: the init container.
    Init {
        /// The bpffs mount point, mounted when the pin root is not on bpffs.
        #[arg(long, default_value = crate::init::DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Where the datapath pins its maps and programs (must be under --bpffs).
        #[arg(long, default_value = probes::loader::DEFAULT_PIN_ROOT)]
        bpf_pin_root: PathBuf,
    },
    /// Show what is programmed in the kernel.
    Inspect {
        #[command(subcommand)]
        what: InspectWhat,
    },
}

#[derive(Subcommand, Debug)]
pub enum InspectWhat {
    /// Virtual services with their Kubernetes Service, destinations, weights and counters.
    Services {
        /// Output: text for people, json for tools.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// The running agent's state directory (names the virtual services).
        #[arg(long, default_value = state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Source-NAT entries: client, node address:port, backend, service, state, age.
    Snat {
        /// Output: text for people, json for tools.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// The running agent's state directory (names the services).
        #[arg(long, default_value = state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Where the running agent pinned the datapath's maps.
        #[arg(long, default_value = probes::loader::DEFAULT_PIN_ROOT)]
        bpf_pin_root: PathBuf,
    },
    /// The switch window from kube-proxy: open or closed, the old connections kept on conntrack.
    Switch {
        /// Output: text for people, json for tools.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Where the running agent pinned the datapath's maps.
        #[arg(long, default_value = probes::loader::DEFAULT_PIN_ROOT)]
        bpf_pin_root: PathBuf,
    },
    /// The datapath's counters (summed over CPUs).
    Counters {
        /// Output: text for people, json for tools.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Where the running agent pinned the datapath's maps.
        #[arg(long, default_value = probes::loader::DEFAULT_PIN_ROOT)]
        bpf_pin_root: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct CleanupArgs {
    /// Remove kube-proxy's state (iptables, ipvs and nftables modes): KUBE-* chains, its nft
    /// tables and ipsets, IPVS services on kube-ipvs0. Without it: this agent's own state.
    #[arg(long)]
    pub kube_proxy: bool,
    /// With --kube-proxy: leave IPVS services and kube-ipvs0 for this agent to adopt.
    #[arg(long, requires = "kube_proxy")]
    pub keep_ipvs: bool,
    /// Report what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// This agent's bpffs pin root (all versions).
    #[arg(long, default_value = crate::cleanup::DEFAULT_PIN_ROOT)]
    pub pin_root: PathBuf,
    /// This agent's state directory.
    #[arg(long, default_value = state::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Configuration file (for the NodePort range and ipvs.excludeCIDRs).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output: text for people, json for tools.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// `cleanup` and `cleanup --kube-proxy`; fails unless everything was removed.
pub async fn cleanup(args: CleanupArgs) -> anyhow::Result<()> {
    let file = args.config.as_deref().map(config::load).transpose()?;
    let cfg = config::resolve(file.as_ref(), &config::Overrides::default())?;
    let opts = crate::cleanup::CleanupOptions {
        dry_run: args.dry_run,
        keep_ipvs: args.keep_ipvs,
        node_port_range: cfg.node_port_range.clone(),
        ipvs_exclude_cidrs: cfg.ipvs_exclude_cidrs.clone(),
        pin_root: args.pin_root,
        state_dir: args.state_dir,
        ..Default::default()
    };
    cleanup_with(&opts, args.kube_proxy, args.output).await
}

/// kube-proxy's `--cleanup`: this agent's own state (as `cleanup`), then kube-proxy's (as
/// `cleanup --kube-proxy`), with the NodePort range and `ipvs.excludeCIDRs` of `cfg`.
pub async fn cleanup_as_kube_proxy(cfg: &config::AgentConfig) -> anyhow::Result<()> {
    let opts = crate::cleanup::CleanupOptions {
        node_port_range: cfg.node_port_range.clone(),
        ipvs_exclude_cidrs: cfg.ipvs_exclude_cidrs.clone(),
        state_dir: cfg.state_dir.clone(),
        ..Default::default()
    };
    let ours = cleanup_with(&opts, false, Output::Text).await;
    let theirs = cleanup_with(&opts, true, Output::Text).await;
    ours.context("removing this agent's state")?;
    theirs.context("removing kube-proxy's state")
}

/// `cleanup` (`kube_proxy`: `cleanup --kube-proxy`) with `opts`; fails unless everything
/// was removed.
async fn cleanup_with(
    opts: &crate::cleanup::CleanupOptions,
    kube_proxy: bool,
    output: Output,
) -> anyhow::Result<()> {
    // Removing this agent's state (or, without --keep-ipvs, the IPVS services it owns too) while
    // an agent runs would pull the datapath from under it: take its lock. A dry run changes
    // nothing; a pin root that does not exist has no agent.
    let removes_ours = !kube_proxy || !opts.keep_ipvs;
    let _lock = if removes_ours && !opts.dry_run && opts.pin_root.exists() {
        Some(
            crate::datapath::lock::acquire(
                &crate::datapath::lock::lock_dir(),
                &opts.pin_root,
                "cleanup",
            )
            .context("cleanup")?,
        )
    } else {
        None
    };
    let report = if kube_proxy {
        crate::cleanup::cleanup_kube_proxy(opts).await?
    } else {
        crate::cleanup::cleanup_self(opts).await?
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Text => print!("{report}"),
    }
    if !report.is_ok() {
        bail!("cleanup incomplete (see the errors above)");
    }
    Ok(())
}

/// Which datapath `run` uses.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DatapathKind {
    /// IPVS plus the eBPF SNAT datapath (conntrack-free).
    Bpf,
    /// IPVS alone: no SNAT (for hosts without BPF; external and hairpin traffic needs SNAT).
    None,
}

/// Which iptables the agent writes its few rules with.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum IptablesBackend {
    /// `iptables-restore` as installed.
    Default,
    Nft,
    Legacy,
}

/// Where objects come from and who this node is.
#[derive(Args, Debug, Clone)]
pub struct SourceArgs {
    /// `kubernetes` (watch the API server) or `file:PATH` (a manifest file or a directory).
    #[arg(long, default_value = "kubernetes")]
    pub source: String,
    /// kubeconfig for `--source kubernetes` (default: in-cluster configuration, else
    /// $KUBECONFIG / ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (endpoints with this nodeName are local). Default: the hostname.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's InternalIP (repeatable). Default: the host's addresses.
    #[arg(long = "node-ip")]
    pub node_ips: Vec<IpAddr>,
    /// Pod CIDR (repeatable): ClusterIP clients outside it are masqueraded.
    #[arg(long = "cluster-cidr", value_delimiter = ',')]
    pub cluster_cidrs: Vec<IpNet>,
    /// Node addresses that carry NodePorts: `primary`, or CIDRs. Default: every local address.
    #[arg(long, value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// Default IPVS scheduler (default rr).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Masquerade every service connection.
    #[arg(long)]
    pub masquerade_all: bool,
    /// This proxy's service.kubernetes.io/service-proxy-name.
    #[arg(long)]
    pub proxy_name: Option<String>,
    /// Configuration file (a KubeProxyConfiguration or KubeIpvsBpfConfiguration); flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub source: SourceArgs,
    /// Shortest interval between two syncs (bursts of changes are coalesced; default 1s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub min_sync_period: Option<Duration>,
    /// Interval of full resyncs, which repair drift (default 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub sync_period: Option<Duration>,
    /// Longest drain of a removed TCP/SCTP destination before it is deleted anyway (default 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Where the state file for `inspect` is written (default /run/kube-ipvs-bpf).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// /healthz and /livez (default 0.0.0.0:10256, as kube-proxy).
    #[arg(long)]
    pub healthz_bind_address: Option<std::net::SocketAddr>,
    /// /metrics (default 127.0.0.1:10249, as kube-proxy).
    #[arg(long)]
    pub metrics_bind_address: Option<std::net::SocketAddr>,
    /// The datapath.
    #[arg(long, value_enum, default_value_t = DatapathKind::Bpf)]
    pub datapath: DatapathKind,
    /// Where the datapath's maps and programs are pinned (versioned).
    #[arg(long, default_value = probes::loader::DEFAULT_PIN_ROOT)]
    pub bpf_pin_root: PathBuf,
    /// iptables flavour for the agent's rules.
    #[arg(long, value_enum, default_value_t = IptablesBackend::Default)]
    pub iptables_backend: IptablesBackend,
    /// A datapath map's size, NAME=ENTRIES (repeatable; names: svc_ports, svc_addrs,
    /// src_ranges, cluster_cidrs, devices, snat, conns, frags; defaults in docs/datapath.md).
    /// Applies when the maps are created: a pinned map keeps its size.
    #[arg(long = "bpf-map-size", value_parser = parse_map_size)]
    pub bpf_map_sizes: Vec<(String, u32)>,
    /// How often expired SNAT entries are swept (default 10s; 100ms to 1m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub sweep_period: Option<Duration>,
    /// How often the node state outside IPVS (iptables rules, sysctls, TC programs,
    /// kube-ipvs0) is checked and repaired; nf_tables and kube-ipvs0 changes are noticed sooner.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub node_check_period: Duration,
}

fn parse_map_size(s: &str) -> Result<(String, u32), String> {
    let (name, n) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NAME=ENTRIES"))?;
    let n: u32 = n.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if n == 0 {
        return Err(format!("{s:?}: a map needs at least one entry"));
    }
    Ok((name.to_string(), n))
}

/// Map sizes from `--bpf-map-size` over the defaults; an unknown name is an error naming it.
fn map_sizes(overrides: &[(String, u32)]) -> anyhow::Result<probes::MapSizes> {
    let mut m = probes::MapSizes::default();
    for (name, n) in overrides {
        let slot = match name.as_str() {
            "svc_ports" => &mut m.svc_ports,
            "svc_addrs" => &mut m.svc_addrs,
            "src_ranges" => &mut m.src_ranges,
            "cluster_cidrs" => &mut m.cluster_cidrs,
            "devices" => &mut m.devices,
            "snat" => &mut m.snat,
            "conns" => &mut m.conns,
            "frags" => &mut m.frags,
            other => bail!("--bpf-map-size: unknown map {other:?}"),
        };
        *slot = *n;
    }
    Ok(m)
}

/// A parsed `--source`.
enum Source {
    File(PathBuf),
    Kubernetes,
}

impl SourceArgs {
    fn parsed(&self) -> anyhow::Result<Source> {
        match self.source.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(Source::File(PathBuf::from(path))),
            None if self.source == "kubernetes" => Ok(Source::Kubernetes),
            _ => bail!(
                "--source {:?}: expected kubernetes or file:PATH",
                self.source
            ),
        }
    }

    fn kubernetes(&self) -> KubernetesSourceConfig {
        KubernetesSourceConfig {
            kubeconfig: self.kubeconfig.clone(),
            node_name: self.node_name(),
            master: None,
        }
    }

    /// Loads the objects once (for `plan`).
    async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        Ok(match self.parsed()? {
            Source::File(path) => load_snapshot(&path, 1),
            Source::Kubernetes => {
                let cfg = self.kubernetes();
                let client = kubernetes::client(&cfg).await?;
                kubernetes::list_once(client, &cfg.node_name).await?
            }
        })
    }

    /// The resolved configuration: these flags (and `extra`), over the config file, over the
    /// defaults. An unknown or invalid setting is an error naming it.
    fn agent_config(&self, extra: config::Overrides) -> anyhow::Result<config::AgentConfig> {
        let file = self.config.as_deref().map(config::load).transpose()?;
        let flags = config::Overrides {
            node_name: self.node_name.clone(),
            node_ips: self.node_ips.clone(),
            cluster_cidrs: self.cluster_cidrs.clone(),
            node_port_addresses: self.nodeport_addresses.clone(),
            scheduler: self.scheduler.clone(),
            masquerade_all: self.masquerade_all.then_some(true),
            proxy_name: self.proxy_name.clone(),
            kubeconfig: self.kubeconfig.clone(),
            ..extra
        };
        let cfg = config::resolve(file.as_ref(), &flags)?;
        cfg.model_config().validate().context("scheduler")?;
        Ok(cfg)
    }

    fn node_name(&self) -> String {
        hostname_or(self.node_name.clone())
    }
}

/// `name`, else the host's name.
fn hostname_or(name: Option<String>) -> String {
    name.unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default()
    })
}

/// What `run` uses besides the resolved configuration: the node-side options that have no
/// kube-proxy equivalent (kube-proxy's command line runs with their defaults).
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// Where the objects come from, as `--source` spells it (for the log).
    pub source_name: String,
    pub datapath: DatapathKind,
    pub iptables_backend: IptablesBackend,
    pub bpf_pin_root: PathBuf,
    pub bpf_map_sizes: Vec<(String, u32)>,
    pub node_check_period: Duration,
    /// kube-proxy's `--master`: the API server's URL over the kubeconfig's.
    pub master: Option<String>,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            source_name: "kubernetes".into(),
            datapath: DatapathKind::Bpf,
            iptables_backend: IptablesBackend::Default,
            bpf_pin_root: PathBuf::from(probes::loader::DEFAULT_PIN_ROOT),
            bpf_map_sizes: Vec::new(),
            node_check_period: Duration::from_secs(5),
            master: None,
        }
    }
}

/// Stops start-up when this process lacks a capability the selected backends need.
fn check_capabilities(rt: &RuntimeOptions) -> anyhow::Result<()> {
    crate::capabilities::check(&crate::capabilities::required(
        rt.datapath == DatapathKind::Bpf,
        rt.iptables_backend == IptablesBackend::Legacy
            || (rt.iptables_backend == IptablesBackend::Default
                && crate::capabilities::default_iptables_is_legacy()),
    ))?;
    Ok(())
}

/// kube-proxy's command line without `--cleanup` or `--init-only`: the agent on the
/// Kubernetes source with `cfg` (already resolved from kube-proxy's flags and `--config`).
pub async fn run_kubernetes(cfg: config::AgentConfig, rt: RuntimeOptions) -> anyhow::Result<()> {
    check_capabilities(&rt)?;
    run_resolved(Source::Kubernetes, cfg, rt).await
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let source = args.source.parsed()?;
    let rt = RuntimeOptions {
        source_name: args.source.source.clone(),
        datapath: args.datapath,
        iptables_backend: args.iptables_backend,
        bpf_pin_root: args.bpf_pin_root.clone(),
        bpf_map_sizes: args.bpf_map_sizes.clone(),
        node_check_period: args.node_check_period,
        master: None,
    };
    check_capabilities(&rt)?;
    let cfg = args.source.agent_config(config::Overrides {
        min_sync_period: args.min_sync_period,
        sync_period: args.sync_period,
        drain_timeout: args.drain_timeout,
        sweep_period: args.sweep_period,
        state_dir: args.state_dir.clone(),
        healthz_bind_address: args.healthz_bind_address,
        metrics_bind_address: args.metrics_bind_address,
        ..Default::default()
    })?;
    run_resolved(source, cfg, rt).await
}

async fn run_resolved(
    source: Source,
    cfg: config::AgentConfig,
    args: RuntimeOptions,
) -> anyhow::Result<()> {
    if let Some(adj) = cfg.oom_score_adj
        && let Err(e) = std::fs::write("/proc/self/oom_score_adj", adj.to_string())
    {
        tracing::warn!("setting oom_score_adj {adj}: {e}");
    }
    let node_name = hostname_or(cfg.node_name.clone());
    let ipvs_timeouts = ipvs::Timeouts {
        tcp: cfg.ipvs_timeouts.tcp.map_or(0, |d| d.as_secs() as u32),
        tcp_fin: cfg.ipvs_timeouts.tcp_fin.map_or(0, |d| d.as_secs() as u32),
        udp: cfg.ipvs_timeouts.udp.map_or(0, |d| d.as_secs() as u32),
    };
    let mut sweep_timeouts = crate::datapath::sweep::Timeouts::default();
    if let Some(t) = cfg.ipvs_timeouts.tcp {
        sweep_timeouts.tcp = t;
    }
    if let Some(t) = cfg.ipvs_timeouts.tcp_fin {
        sweep_timeouts.tcp_fin = t;
    }
    if let Some(t) = cfg.ipvs_timeouts.udp {
        sweep_timeouts.udp = t;
    }
    let map_sizes = map_sizes(&args.bpf_map_sizes)?;
    let sync_cfg = SyncConfig {
        model: cfg.model_config(),
        node_name: node_name.clone(),
        node_ips: cfg.node_ips.clone(),
        min_sync_period: cfg.min_sync_period,
        sync_period: cfg.sync_period,
        drain_timeout: cfg.drain_timeout,
        node_port_range: cfg.node_port_range.clone(),
        state_dir: cfg.state_dir.clone(),
        ipvs_timeouts,
        ipvs_exclude_cidrs: cfg.ipvs_exclude_cidrs.clone(),
        datapath: (args.datapath == DatapathKind::Bpf).then(|| crate::datapath::DatapathConfig {
            pin_root: args.bpf_pin_root.clone(),
            mark_svc: cfg.datapath.mark_service,
            mark_masq: cfg.datapath.mark_masquerade,
            snat_ports: cfg
                .datapath
                .snat_port_range
                .as_ref()
                .map(|r| (*r.start(), *r.end())),
            node_ports: (*cfg.node_port_range.start(), *cfg.node_port_range.end()),
            masquerade_all: cfg.masquerade_all,
            cluster_cidrs: cfg.cluster_cidrs.clone(),
            rules_backend: match args.iptables_backend {
                IptablesBackend::Default => crate::datapath::rules::Backend::Default,
                IptablesBackend::Nft => crate::datapath::rules::Backend::Nft,
                IptablesBackend::Legacy => crate::datapath::rules::Backend::Legacy,
            },
            strict_arp: cfg.strict_arp,
            timeouts: sweep_timeouts,
            map_sizes,
            sysctl_root: crate::datapath::sysctl::default_root(),
        }),
        sweep_period: cfg.datapath.sweep_period,
        node_check_period: args.node_check_period,
        ..SyncConfig::default()
    };
    tracing::info!(source = %args.source_name, node = %node_name, "starting");
    // Before anything is loaded, attached or created: the kernel can run the datapath, and no
    // other agent uses it. The lock is held until the process ends.
    let _lock = match &sync_cfg.datapath {
        Some(dp) => Some(datapath_preflight(dp)?),
        None => None,
    };

    // A running kube-proxy holds its healthz and metrics ports: change nothing on the node
    // until it is gone (docs/switching.md). A canary beside kube-proxy's iptables or nftables
    // mode (only labelled Services) shares the node with it by design, on ports of its own.
    if !cfg.only_labelled_services {
        let kube_proxy_ports = [cfg.healthz_bind_address, cfg.metrics_bind_address];
        if !crate::takeover::wait_for_kube_proxy(&kube_proxy_ports, shutdown_signal()).await {
            return Ok(());
        }
    }

    // Health and metrics first: a probe answers while the first sync is still coming.
    let families: Vec<metrics::IpFamily> = {
        let mut f: Vec<metrics::IpFamily> = cfg
            .cluster_cidrs
            .iter()
            .map(|c| metrics::IpFamily::of(c.addr()))
            .chain(cfg.node_ips.iter().map(|a| metrics::IpFamily::of(*a)))
            .collect();
        if f.is_empty() {
            f.push(metrics::IpFamily::of(IpAddr::V4(
                std::net::Ipv4Addr::UNSPECIFIED,
            )));
        }
        f.sort();
        f.dedup();
        f
    };
    let metrics = metrics::Metrics::new(&families);
    let health = health::HealthState::new(cfg.health_timeout()).with_metrics(metrics.clone());
    for (what, r) in [
        (
            "health",
            health::serve(cfg.healthz_bind_address, health.clone())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        ),
        (
            "metrics",
            metrics::serve(cfg.metrics_bind_address, metrics.clone())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        ),
    ] {
        if let Err(e) = r {
            if cfg.bind_address_hard_fail {
                bail!("{what} server: {e}");
            }
            tracing::warn!("{what} server not started: {e}");
        }
    }
    let hc_bind = match &cfg.node_port_addresses {
        NodePortAddresses::AllLocal => Vec::new(),
        _ => cfg.node_ips.clone(),
    };
    let mut observers = sync::Observers {
        health: health.clone(),
        metrics: metrics.clone(),
        health_checks: health::HealthCheckServers::new(health, hc_bind),
        changes: metrics::ChangeTracker::new(std::time::SystemTime::now()),
        events: None,
    };

    let snapshots = match source {
        Source::File(path) => watch_path(path, Duration::from_secs(1)),
        Source::Kubernetes => {
            let kcfg = KubernetesSourceConfig {
                kubeconfig: cfg.kubeconfig.clone(),
                node_name: node_name.clone(),
                master: args.master.clone(),
            };
            let client = kubernetes::client(&kcfg).await?;
            observers.events = Some(std::sync::Arc::new(kubernetes::ServiceEvents::new(
                client.clone(),
                &node_name,
            )));
            // The first snapshot waits for complete lists of every kind: never sync a half
            // listed state (it would delete what is missing).
            tokio::select! {
                r = kubernetes::watch(client, kcfg.node_name.clone()) => r?,
                _ = shutdown_signal() => return Ok(()),
            }
        }
    };
    let port_watch = sync_cfg.datapath.clone();
    let syncer = Syncer::start(sync_cfg).await?;
    if let Some(dp) = port_watch {
        watch_local_ports(&dp, cfg.sync_period);
    }
    sync::run(syncer, snapshots, observers, shutdown_signal()).await
}

/// What `run` checks before it loads the datapath: the kernel's features (listed in the log;
/// a missing one the datapath needs stops start-up, each with its cause and fix), bpffs at the
/// pin root, the lock on the pin root ([`crate::datapath::lock`]), and an explicit SNAT range
/// against the node's ephemeral ports.
fn datapath_preflight(
    dp: &crate::datapath::DatapathConfig,
) -> anyhow::Result<crate::datapath::lock::PinRootLock> {
    let features = probes::KernelFeatures::detect();
    let report = features
        .report()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ");
    tracing::info!(features = %report, "kernel features for the eBPF datapath");
    let mut problems = features.problems();
    if let Err(e) = probes::features::check_pin_root(&dp.pin_root) {
        problems.push(e.to_string());
    }
    if !problems.is_empty() {
        bail!(
            "the eBPF datapath cannot run here:\n  - {}",
            problems.join("\n  - ")
        );
    }
    let lock =
        crate::datapath::lock::acquire(&crate::datapath::lock::lock_dir(), &dp.pin_root, "run")?;
    tracing::debug!(lock = %lock.path().display(), "datapath lock taken");
    match crate::datapath::local_port_range() {
        Ok(local) => {
            crate::datapath::snat_ports(dp.snat_ports, local, dp.node_ports)?;
        }
        Err(e) => tracing::warn!("{e:#}: the SNAT range is checked against the default"),
    }
    Ok(lock)
}

/// Re-reads `net.ipv4.ip_local_port_range` every `period` for the running datapath
/// ([`crate::datapath::LocalPortWatch`]): start-up read it once.
fn watch_local_ports(dp: &crate::datapath::DatapathConfig, period: Duration) {
    let mut watch = match crate::datapath::LocalPortWatch::open(dp) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("ip_local_port_range will not be watched: {e:#}");
            return;
        }
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            match watch.check() {
                Ok(_) => failing = false,
                // Once per run of failures.
                Err(e) if !std::mem::replace(&mut failing, true) => {
                    tracing::warn!("checking ip_local_port_range: {e:#}")
                }
                Err(_) => {}
            }
        }
    });
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

fn vs_json(v: &model::VirtualService) -> Value {
    json!({
        "service": v.service.to_string(),
        "port_name": v.port_name,
        "kind": v.kind.as_str(),
        "protocol": v.protocol.as_str(),
        "address": v.address,
        "port": v.port,
        "scheduler": v.scheduler,
        "persistence_timeout": v.persistence_timeout,
        "snat": v.snat,
        "masq_off_cluster": v.masq_off_cluster,
        "source_ranges": v.source_ranges,
        "destinations": v.destinations.iter().map(|d| json!({"address": d.address, "port": d.port, "weight": d.weight})).collect::<Vec<_>>(),
    })
}

fn op_text(op: &ipvs_rec::IpvsOp) -> String {
    use ipvs_rec::IpvsOp::*;
    match op {
        AddService(s) | EditService(s) => format!("{} {} {}", op.kind(), s.key, s.scheduler),
        DeleteService(k) => format!("{} {k}", op.kind()),
        AddDestination(k, d) | EditDestination(k, d) => {
            format!(
                "{} {k} -> {} weight {}",
                op.kind(),
                std::net::SocketAddr::new(d.address, d.port),
                d.weight
            )
        }
        DeleteDestination(k, a, p) => {
            format!("{} {k} -> {}", op.kind(), std::net::SocketAddr::new(*a, *p))
        }
    }
}

/// `plan`: the desired state and, where IPVS is available, the diff against the kernel.
pub async fn plan(args: SourceArgs, output: Output) -> anyhow::Result<()> {
    let snapshot = args.snapshot().await?;
    let agent_cfg = args.agent_config(config::Overrides::default())?;
    let cfg = agent_cfg.model_config();
    let rtnl = Rtnl::connect()?;
    let (links, entries) = sync::read_node(&rtnl).await?;
    let node = sync::node_info(
        &args.node_name(),
        &args.node_ips,
        snapshot.node.as_ref(),
        &links,
        &entries,
    );
    let desired = model::build(&snapshot.services, &snapshot.endpoint_slices, &node, &cfg);
    let mut warnings: Vec<String> = crate::reconcile::datapath::sctp_not_source_nated(
        desired.virtual_services.iter().map(|v| &**v),
    )
    .into_iter()
    .map(|v| format!("{v}: SCTP is passed to IPVS untranslated, not source-NATed"))
    .collect();
    let diff = match ipvs::IpvsHandle::connect().await {
        Ok(h) => {
            let observed = ipvs_rec::observe(&h).await.context("dumping IPVS")?;
            let bound = match rtnl.link_index(model::DUMMY_INTERFACE).await? {
                Some(i) => rtnl.addresses_on(i).await?,
                None => Default::default(),
            };
            let ownership = ipvs_rec::Ownership {
                bound: bound.clone(),
                node_addresses: node.addresses.iter().map(|a| a.address).collect(),
                node_port_range: agent_cfg.node_port_range.clone(),
                exclude: agent_cfg.ipvs_exclude_cidrs.clone(),
                recorded: Default::default(),
            };
            let want = ipvs_rec::desired(desired.virtual_services.iter().map(|v| &**v));
            for k in ipvs_rec::foreign_keys(&want, &observed, &ownership) {
                warnings.push(format!(
                    "{k} is held by an IPVS virtual service this agent did not create: not programmed"
                ));
            }
            let ops = ipvs_rec::plan(
                &want,
                &ipvs_rec::PlanContext {
                    observed: &observed,
                    ownership: &ownership,
                    drain_timeout: Duration::from_secs(300),
                    now: std::time::Instant::now(),
                    scope: None,
                },
                &mut Default::default(),
            );
            Some((ops, addresses::plan(&desired.bound_addresses, &bound)))
        }
        Err(e) => {
            warnings.push(format!(
                "no IPVS on this machine ({e}): showing the desired state only"
            ));
            None
        }
    };
    match output {
        Output::Json => {
            let diff_json = diff.as_ref().map(|(ops, a)| {
                json!({"ipvs": ops.iter().map(op_text).collect::<Vec<_>>(), "addresses": {"add": a.add, "remove": a.remove}})
            });
            let out = json!({
                "node": node.name,
                "virtual_services": desired.virtual_services.iter().map(|v| vs_json(v)).collect::<Vec<_>>(),
                "bound_addresses": desired.bound_addresses,
                "rejected": desired.rejected.iter().map(|r| json!({"object": r.object, "reason": r.reason})).collect::<Vec<_>>(),
                "diff": diff_json,
                "warnings": warnings,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Output::Text => {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "# desired ({} virtual services)",
                desired.virtual_services.len()
            );
            for v in &desired.virtual_services {
                println!("{v}");
            }
            for r in &desired.rejected {
                println!("# rejected {}: {}", r.object, r.reason);
            }
            if let Some((ops, a)) = diff {
                println!(
                    "# changes ({} IPVS operations, {} address changes)",
                    ops.len(),
                    a.add.len() + a.remove.len()
                );
                for op in &ops {
                    println!("{}", op_text(op));
                }
                for x in &a.add {
                    println!("add_address {x}");
                }
                for x in &a.remove {
                    println!("remove_address {x}");
                }
            }
        }
    }
    Ok(())
}

/// `inspect services`: the kernel's virtual services, named from the state file.
pub async fn inspect_services(output: Output, state_dir: PathBuf) -> anyhow::Result<()> {
    let h = ipvs::IpvsHandle::connect()
        .await
        .context("connecting to IPVS")?;
    let observed = ipvs_rec::observe_with(&h, true)
        .await
        .context("dumping IPVS")?;
    let rec = state::read(&state_dir)?;
    let mut rows = Vec::new();
    for (key, (svc, dests)) in &observed {
        let (proto, address, port) = match key {
            ipvs::ServiceKey::Tuple {
                protocol,
                address,
                port,
            } => (protocol.to_string(), Some(*address), *port),
            ipvs::ServiceKey::Fwmark { mark, .. } => (format!("FWM {mark}"), None, 0),
        };
        let named = rec
            .virtual_services
            .iter()
            .find(|r| Some(r.address) == address && r.port == port && r.protocol == proto);
        let st = svc.stats.unwrap_or_default();
        rows.push(json!({
            "service": named.map_or("-".to_string(), |r| format!("{}:{}", r.service, r.port_name)),
            "kind": named.map_or("foreign".to_string(), |r| r.kind.clone()),
            "protocol": proto,
            "address": address,
            "port": port,
            "scheduler": svc.scheduler,
            "persistence_timeout": svc.flags.contains(ipvs::ServiceFlags::PERSISTENT).then_some(svc.timeout),
            "snat": named.map(|r| r.snat),
            "connections": st.conns,
            "packets_in": st.inpkts,
            "packets_out": st.outpkts,
            "bytes_in": st.inbytes,
            "bytes_out": st.outbytes,
            "destinations": dests.values().map(|d| {
                let ds = d.stats.unwrap_or_default();
                json!({"address": d.address, "port": d.port, "weight": d.weight,
                       "active_connections": d.active_conns, "inactive_connections": d.inactive_conns,
                       "connections": ds.conns, "packets_in": ds.inpkts, "packets_out": ds.outpkts})
            }).collect::<Vec<_>>(),
        }));
    }
    if output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"services": rows}))?
        );
        return Ok(());
    }
    println!(
        "{:<32} {:<12} {:<5} {:<24} {:<6} {:>7} {:>8} {:>8}  DESTINATIONS (weight active/inactive)",
        "SERVICE", "KIND", "PROTO", "ADDRESS:PORT", "SCHED", "CONNS", "PKTS-IN", "PKTS-OUT"
    );
    for r in &rows {
        let addr = match r["address"].as_str() {
            Some(a) if a.contains(':') => format!("[{a}]:{}", r["port"]),
            Some(a) => format!("{a}:{}", r["port"]),
            None => "-".into(),
        };
        let dests: Vec<String> = r["destinations"]
            .as_array()
            .map(|ds| {
                ds.iter()
                    .map(|d| {
                        format!(
                            "{}:{}({} {}/{})",
                            d["address"].as_str().unwrap_or("?"),
                            d["port"],
                            d["weight"],
                            d["active_connections"],
                            d["inactive_connections"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<32} {:<12} {:<5} {:<24} {:<6} {:>7} {:>8} {:>8}  {}",
            r["service"].as_str().unwrap_or("-"),
            r["kind"].as_str().unwrap_or("-"),
            r["protocol"].as_str().unwrap_or("-"),
            addr,
            r["scheduler"].as_str().unwrap_or("-"),
            r["connections"],
            r["packets_in"],
            r["packets_out"],
            if dests.is_empty() {
                "none".to_string()
            } else {
                dests.join(" ")
            }
        );
    }
    Ok(())
}

fn state_names(
    rec: &state::Recorded,
) -> std::collections::HashMap<(std::net::IpAddr, u16, String), String> {
    rec.virtual_services
        .iter()
        .map(|r| {
            (
                (r.address, r.port, r.protocol.clone()),
                format!("{}:{}", r.service, r.port_name),
            )
        })
        .collect()
}

fn proto_name(p: u8) -> String {
    match probes::maps::L4Proto::from_number(p) {
        Some(probes::maps::L4Proto::Tcp) => "TCP".into(),
        Some(probes::maps::L4Proto::Udp) => "UDP".into(),
        Some(probes::maps::L4Proto::Sctp) => "SCTP".into(),
        _ => format!("proto-{p}"),
    }
}

/// Why a connection was source-NATed (the entry's `SNAT_F_*` reason bits).
fn reason_text(flags: u8) -> String {
    use probes::maps::{SNAT_F_HAIRPIN, SNAT_F_HOST, SNAT_F_MASQ, SNAT_F_OFFCLUSTER};
    let mut v = Vec::new();
    for (b, n) in [
        (SNAT_F_MASQ, "masquerade"),
        (SNAT_F_HAIRPIN, "hairpin"),
        (SNAT_F_OFFCLUSTER, "off-cluster-backend"),
        (SNAT_F_HOST, "host"),
    ] {
        if flags & b != 0 {
            v.push(n);
        }
    }
    v.join(",")
}

fn state_text(bits: u8) -> String {
    use probes::maps::{STATE_FIN, STATE_REPLY, STATE_RST, STATE_SYN};
    let mut v = Vec::new();
    for (b, n) in [
        (STATE_SYN, "syn"),
        (STATE_REPLY, "reply"),
        (STATE_FIN, "fin"),
        (STATE_RST, "rst"),
    ] {
        if bits & b != 0 {
            v.push(n);
        }
    }
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// `inspect snat`: every translated connection, from the pinned maps.
pub fn inspect_snat(output: Output, state_dir: PathBuf, pin_root: PathBuf) -> anyhow::Result<()> {
    use crate::datapath::sweep;
    let maps = probes::DatapathMaps::open_pinned(&pin_root).with_context(|| {
        format!(
            "opening the datapath maps under {} (is the agent running?)",
            pin_root.display()
        )
    })?;
    let names = state_names(&state::read(&state_dir)?);
    let now = sweep::monotonic_ns();
    let mut rows = Vec::new();
    for (_, record) in maps.snat.records() {
        let (key, fwd, rev) = (record.fwd_key, record.fwd, record.rev);
        let conn = maps.conns.get(&key)?;
        let proto = proto_name(key.proto);
        let service = conn.map(|c| {
            let vaddr = probes::maps::addr_from_bytes(c.vaddr);
            let vport = c.vport.get();
            names
                .get(&(vaddr, vport, proto.clone()))
                .cloned()
                .unwrap_or_else(|| std::net::SocketAddr::new(vaddr, vport).to_string())
        });
        let state = record.state_bits();
        let last = record.last_seen_ns();
        rows.push(json!({
            "protocol": proto,
            "client": std::net::SocketAddr::new(key.source(), key.sport.get()).to_string(),
            "node": std::net::SocketAddr::new(fwd.address(), fwd.port.get()).to_string(),
            "backend": std::net::SocketAddr::new(key.destination(), key.dport.get()).to_string(),
            "service": service,
            "state": state_text(state),
            "reason": reason_text(fwd.flags),
            "age_seconds": now.saturating_sub(fwd.created_ns) / 1_000_000_000,
            "idle_seconds": now.saturating_sub(last) / 1_000_000_000,
            "client_port_kept": rev.flags & probes::maps::SNAT_F_PORT_KEPT != 0,
        }));
    }
    // The table's occupancy, from the records' states (the sweeper frees DEAD ones next pass).
    let (used, busy, dead, free) = maps.snat.occupancy();
    let capacity = maps.snat.capacity();
    let occupancy = json!({
        "records": capacity,
        "used": used,
        "being_written": busy,
        "dead": dead,
        "free": free,
        "used_percent": used as f64 * 100.0 / f64::from(capacity.max(1)),
    });
    if output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"snat": rows, "occupancy": occupancy}))?
        );
        return Ok(());
    }
    println!(
        "SNAT table: {used} of {capacity} records in use ({:.1}%), {dead} dead (freed at the next sweep), {free} free",
        occupancy["used_percent"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<5} {:<28} {:<28} {:<28} {:<32} {:<16} {:>6} {:>6}",
        "PROTO", "CLIENT", "NODE ADDRESS", "BACKEND", "SERVICE", "STATE", "AGE", "IDLE"
    );
    for r in &rows {
        println!(
            "{:<5} {:<28} {:<28} {:<28} {:<32} {:<16} {:>6} {:>6}",
            r["protocol"].as_str().unwrap_or(""),
            r["client"].as_str().unwrap_or(""),
            r["node"].as_str().unwrap_or(""),
            r["backend"].as_str().unwrap_or(""),
            r["service"].as_str().unwrap_or("-"),
            r["state"].as_str().unwrap_or(""),
            r["age_seconds"],
            r["idle_seconds"],
        );
    }
    Ok(())
}

/// `inspect counters`: the datapath's counters.
pub fn inspect_counters(output: Output, pin_root: PathBuf) -> anyhow::Result<()> {
    let maps = probes::DatapathMaps::open_pinned(&pin_root).with_context(|| {
        format!(
            "opening the datapath maps under {} (is the agent running?)",
            pin_root.display()
        )
    })?;
    let stats = maps.stats()?;
    let counters: serde_json::Map<String, Value> = stats
        .iter()
        .map(|(c, v)| (c.name().to_string(), json!(v)))
        .collect();
    if output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"counters": counters}))?
        );
    } else {
        for (name, v) in &counters {
            println!("{name:<24} {v}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every flag of every subcommand says what it is for.
    #[test]
    fn every_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if a.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "kube-ipvs-bpf", &mut missing);
        assert!(missing.is_empty(), "flags without help: {missing:?}");
    }

    #[test]
    fn version_names_the_commit_and_the_datapath_layout() {
        let layout = std::path::Path::new(probes::loader::DEFAULT_PIN_ROOT)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        assert!(
            LONG_VERSION.ends_with(&format!("datapath layout: {layout}")),
            "{LONG_VERSION}"
        );
        assert!(LONG_VERSION.starts_with(env!("CARGO_PKG_VERSION")));
        let commit = env!("KUBE_IPVS_BPF_COMMIT");
        assert!(!commit.is_empty());
        assert!(LONG_VERSION.contains(&format!("commit: {commit}")));
    }
}
