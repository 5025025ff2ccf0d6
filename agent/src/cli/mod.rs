//! This binary's own command line: the clap types of `run`, `plan`, `inspect`, `cleanup`,
//! `drain` and `init` with their flags, and the dispatch of a parsed command to its module (one
//! per command: [`run`], [`plan`], [`inspect`], [`cleanup`], [`drain`]; `init` is
//! [`crate::init`]'s), and
//! `--version`. How each prints: text for people, `--output json` for tools. kube-proxy's
//! command line is [`crate::kube_proxy_cli`]'s, which runs through [`run_kubernetes`] and
//! [`cleanup_as_kube_proxy`].

mod cleanup;
mod drain;
mod inspect;
mod plan;
mod run;
mod source;

use std::net::IpAddr;
use std::path::PathBuf;

use crate::datapath::reroute::SnatReroute;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::state;

pub use crate::config::{DatapathKind, IptablesBackend};
pub use cleanup::{cleanup, cleanup_as_kube_proxy};
pub use drain::drain;
pub use inspect::{inspect_counters, inspect_services, inspect_snat};
pub use plan::plan;
pub use run::{run, run_kubernetes};

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
    /// Roll this node back to kube-proxy's ipvs mode without resetting a connection (run it with
    /// the agent stopped): new connections go to conntrack and kube-proxy's rules, the agent's
    /// keep their translation until they end, then its datapath is removed. IPVS's services and
    /// kube-ipvs0 are left to kube-proxy. See docs/switching.md.
    Drain(DrainArgs),
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
    /// The switch window from kube-proxy: open or closed, the old connections kept on conntrack;
    /// or a rollback's drain and the agent's connections still open.
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

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// Where the agent pinned the datapath's maps and programs.
    #[arg(long, default_value = probes::loader::DEFAULT_PIN_ROOT)]
    pub bpf_pin_root: PathBuf,
    /// The agent's state directory (its state file is removed at the end).
    #[arg(long, default_value = state::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// The longest wait for the agent's connections to end; those still open then are cut
    /// when its datapath goes. 0: no limit.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15m")]
    pub timeout: Duration,
    /// How often IPVS's connection table is read for the agent's connections still open.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub period: Duration,
    /// Leave the datapath in place, draining, when the agent's connections have ended (remove
    /// it later with `kube-ipvs-bpf cleanup`).
    #[arg(long)]
    pub no_cleanup: bool,
    /// Output: text for people, json for tools.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
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
    /// The datapath (default bpf).
    #[arg(long, value_enum)]
    pub datapath: Option<DatapathKind>,
    /// Where the datapath's maps and programs are pinned (default: under
    /// /sys/fs/bpf/kube-ipvs-bpf, the map layout's version last, see --version).
    #[arg(long)]
    pub bpf_pin_root: Option<PathBuf>,
    /// iptables flavour for the agent's rules (default: the node firewall's, detected at start).
    #[arg(long, value_enum)]
    pub iptables_backend: Option<IptablesBackend>,
    /// A datapath map's size, NAME=ENTRIES (repeatable; names: svc_ports, svc_addrs,
    /// src_ranges, cluster_cidrs, devices, snat, conns, frags; defaults in docs/datapath.md).
    /// Applies when the maps are created: a pinned map keeps its size.
    #[arg(long = "bpf-map-size", value_parser = parse_map_size)]
    pub bpf_map_sizes: Vec<(String, u32)>,
    /// How often expired SNAT entries are swept (default 10s; 100ms to 1m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub sweep_period: Option<Duration>,
    /// Whether IPVS routes each reply again after giving it the service's source address
    /// (net.ipv4.vs.snat_reroute): auto (default) turns it off while no FIB rule, IPv6 source
    /// route or xfrm policy can make a route depend on the source, and on otherwise.
    #[arg(long, value_enum)]
    pub snat_reroute: Option<SnatReroute>,
    /// Attach the probe on IPVS freeing a connection, which removes the connection's conns
    /// entry as IPVS frees it (default true); false: the sweeper removes the entries, reading
    /// conns in full every minute.
    #[arg(long)]
    pub ipvs_free_probe: Option<bool>,
    /// How often the node state outside IPVS (iptables rules, sysctls, TC programs,
    /// kube-ipvs0) is checked and repaired; nf_tables and kube-ipvs0 changes are noticed sooner
    /// (default 5s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub node_check_period: Option<Duration>,
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

/// Runs a parsed command of this binary's own command line.
pub async fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => run(*args).await,
        Command::Plan { source, output } => plan(source, output).await,
        Command::Cleanup(args) => cleanup(args).await,
        Command::Drain(args) => drain(args).await,
        Command::Init {
            bpffs,
            bpf_pin_root,
        } => crate::init::run(&crate::init::InitConfig {
            bpffs,
            pin_root: bpf_pin_root,
        })
        .map(|_| ()),
        Command::Inspect {
            what: InspectWhat::Services { output, state_dir },
        } => inspect_services(output, state_dir).await,
        Command::Inspect {
            what:
                InspectWhat::Snat {
                    output,
                    state_dir,
                    bpf_pin_root,
                },
        } => inspect_snat(output, state_dir, bpf_pin_root),
        Command::Inspect {
            what:
                InspectWhat::Counters {
                    output,
                    bpf_pin_root,
                },
        } => inspect_counters(output, bpf_pin_root),
        Command::Inspect {
            what:
                InspectWhat::Switch {
                    output,
                    bpf_pin_root,
                },
        } => crate::datapath::switch::inspect(output == Output::Json, &bpf_pin_root),
    }
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
