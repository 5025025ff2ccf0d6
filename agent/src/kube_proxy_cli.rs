//! kube-proxy's command line: the binary invoked as kube-proxy is (no subcommand, or under the
//! name `kube-proxy`) accepts kube-proxy v1.36's flags, current and deprecated, so a kube-proxy
//! DaemonSet's command line can be kept as it is. This module owns which invocation is
//! kube-proxy's ([`is_kube_proxy_invocation`]), the flags ([`KubeProxyArgs`]), kube-proxy's
//! precedence between them and `--config`, and what the invocation does ([`Resolved`]); the
//! meaning of each setting stays with [`crate::config`], which the flags are handed to as the
//! `KubeProxyConfiguration` they stand for.
//!
//! # Precedence (kube-proxy's)
//!
//! With `--config`, the file is the whole configuration: every flag that stands for a
//! configuration field is ignored, and this agent logs one warning naming them (kube-proxy
//! ignores them silently). Still honoured with `--config`: `--hostname-override` (over the
//! file's `hostnameOverride`), `--master`, `--cleanup`, `--init-only` and the logging flags
//! (`-v`, `--logging-format`, ...). Without `--config`, the flags are the configuration, over
//! kube-proxy's defaults. `--iptables-(min-)sync-period` count unless `--proxy-mode=ipvs`,
//! `--ipvs-(min-)sync-period` only with it, as in kube-proxy.
//!
//! # Decisions
//!
//! - Refused by name (start-up stops): `--proxy-mode` other than `ipvs` (or empty),
//!   `--ipvs-scheduler` not an IPVS scheduler, `--feature-gates` with any gate,
//!   `--profiling`, `--detect-local-mode` other than `ClusterCIDR`, `--write-config-to`,
//!   `--healthz-port=0`/`--metrics-port=0` and empty `--healthz-bind-address`/
//!   `--metrics-bind-address` (kube-proxy: disable the server; here they cannot be disabled),
//!   `--logging-format` other than `text`/`json`, and whatever the configuration file refuses
//!   for the field a flag stands for (the error names the flag).
//! - Accepted and ignored with one log line: the `--conntrack-*` flags (service traffic
//!   bypasses nf_conntrack here, so this agent tunes none of its settings),
//!   `--kube-api-qps/-burst/-content-type`, `--config-sync-period`,
//!   `--show-hidden-metrics-for-version`, `--vmodule` and the `--log-*` buffer flags.
//! - `--healthz-port`/`--metrics-port` (deprecated in kube-proxy): the port of the health or
//!   metrics address, on the IP of `--healthz-bind-address`/`--metrics-bind-address` (else
//!   the default's); a port given in the address wins. Ignored with `--config`.
//! - `-v`: 0 to 3 log at info, 4 and 5 at debug, 6 and more at trace (`RUST_LOG` wins).
//! - `--cleanup`: this agent's own state and kube-proxy's (`cleanup`, then
//!   `cleanup --kube-proxy`), then exit. `--init-only`: `init` (mount bpffs), then exit.
//!   A run does the same preparation first, as kube-proxy's does its privileged steps (a
//!   failure there is a warning: the datapath's start-up check then names what is missing).
//! - Names are read as kube-proxy's flag library reads them: `--flag=value` or
//!   `--flag value`, booleans `--flag` or `--flag=false`, `_` the same as `-`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};

use crate::cli::LogFormat;
use crate::config::{self, AgentConfig, ConfigError, FileConfig};

/// The subcommands of this binary's own command line: an invocation starting with one of them
/// is not kube-proxy's.
const SUBCOMMANDS: &[&str] = &["run", "plan", "cleanup", "init", "inspect", "help"];

/// Whether `args` (with the program name first) is kube-proxy's command line: the program is
/// named `kube-proxy`, or its first argument is `kube-proxy`, or it starts with a flag that is
/// not this binary's own (`--log-format`, `--help`, `--version`). No argument at all is this
/// binary's own usage.
pub fn is_kube_proxy_invocation(args: &[OsString]) -> bool {
    let program = args
        .first()
        .map(|a| {
            std::path::Path::new(a)
                .file_name()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default();
    if program == "kube-proxy" {
        return true;
    }
    let mut rest = args.iter().skip(1).map(|a| a.to_string_lossy());
    loop {
        let Some(first) = rest.next() else {
            return false;
        };
        match first.as_ref() {
            "--log-format" => {
                rest.next();
            }
            f if f.starts_with("--log-format=") => {}
            "kube-proxy" => return true,
            "-h" | "--help" | "-V" | "--version" => return false,
            f if SUBCOMMANDS.contains(&f) => return false,
            f => return f.starts_with('-'),
        }
    }
}

/// The arguments kube-proxy's flags are parsed from: without the program name or a leading
/// `kube-proxy`, with `_` in flag names read as `-` (kube-proxy's flag normalisation).
pub fn kube_proxy_args(args: &[OsString]) -> Vec<OsString> {
    let mut out: Vec<OsString> = vec!["kube-proxy".into()];
    let mut rest = args.iter().skip(1).peekable();
    if rest.peek().is_some_and(|a| *a == "kube-proxy") {
        rest.next();
    }
    for a in rest {
        let s = a.to_string_lossy();
        match s.strip_prefix("--") {
            Some(flag) if !flag.is_empty() => {
                let (name, value) = match flag.split_once('=') {
                    Some((n, v)) => (n, Some(v)),
                    None => (flag, None),
                };
                let name = name.replace('_', "-");
                out.push(match value {
                    Some(v) => format!("--{name}={v}").into(),
                    None => format!("--{name}").into(),
                });
            }
            _ => out.push(a.clone()),
        }
    }
    out
}

/// Go's `strconv.ParseBool`, as kube-proxy's boolean flags take.
fn go_bool(s: &str) -> Result<bool, String> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean (true or false)")),
    }
}

/// A Go duration (`30s`, `1m30s`, `0`), kept as written for the configuration.
fn go_duration(s: &str) -> Result<String, String> {
    config::parse_go_duration(s).map(|_| s.to_owned())
}

/// kube-proxy v1.36's command line (see the module documentation for what each does here).
#[derive(Parser, Debug, Default, Clone)]
#[command(
    name = "kube-proxy",
    about = "kube-ipvs-bpf with kube-proxy's command line: an IPVS proxy with conntrack-free \
             eBPF SNAT, configured by kube-proxy's flags or its KubeProxyConfiguration file",
    after_help = "This binary's own commands: kube-ipvs-bpf run|plan|inspect|cleanup|init --help",
    version,
    long_version = crate::cli::LONG_VERSION
)]
pub struct KubeProxyArgs {
    /// The configuration file (a KubeProxyConfiguration, e.g. the kube-proxy ConfigMap's
    /// config.conf). When given, the flags that stand for its fields are ignored (a warning
    /// names them).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// kube-proxy writes its default configuration there and exits: not supported (refused).
    #[arg(long, value_name = "FILE")]
    pub write_config_to: Option<PathBuf>,
    /// Remove this agent's state and kube-proxy's (iptables, ipvs and nftables modes) from
    /// the node, then exit.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub cleanup: Option<bool>,
    /// Prepare the node (mount bpffs where the datapath pins its maps), then exit.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub init_only: Option<bool>,
    /// Feature gates, KEY=BOOL,...: kube-proxy's gates do not exist here (any gate is refused).
    #[arg(long, value_name = "KEY=BOOL,...")]
    pub feature_gates: Option<String>,
    /// kubeconfig with the API server's address and credentials (default: in-cluster).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The API server's URL, over the kubeconfig's.
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,
    /// Content type of API requests (accepted, ignored).
    #[arg(long)]
    pub kube_api_content_type: Option<String>,
    /// Burst of API requests (accepted, ignored).
    #[arg(long)]
    pub kube_api_burst: Option<i64>,
    /// Queries per second to the API server (accepted, ignored).
    #[arg(long)]
    pub kube_api_qps: Option<f64>,
    /// This node's name (default: the hostname). Honoured with --config too.
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,
    /// This node's primary IP (0.0.0.0 or :: : unset).
    #[arg(long, value_name = "IP")]
    pub bind_address: Option<String>,
    /// IP:port of /healthz and /livez (default 0.0.0.0:10256).
    #[arg(long, value_name = "IP:PORT")]
    pub healthz_bind_address: Option<String>,
    /// IP:port of /metrics (default 127.0.0.1:10249).
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_bind_address: Option<String>,
    /// Whether failing to bind the health or metrics address stops the agent.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub bind_address_hard_fail: Option<bool>,
    /// Profiling endpoint: none here (true is refused).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub profiling: Option<bool>,
    /// Hidden metrics of a previous version (accepted, ignored: there are none).
    #[arg(long, value_name = "VERSION")]
    pub show_hidden_metrics_for_version: Option<String>,
    /// The proxy mode: ipvs (or empty); iptables, nftables and kernelspace are refused.
    #[arg(long, value_name = "MODE")]
    pub proxy_mode: Option<String>,
    /// kube-proxy's masquerade mark bit: only 14 (its default) is accepted.
    #[arg(long, value_name = "BIT")]
    pub iptables_masquerade_bit: Option<i32>,
    /// Source-NAT every connection to a Service.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub masquerade_all: Option<bool>,
    /// NodePorts on localhost: never served here, as in kube-proxy's ipvs mode (true is refused).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub iptables_localhost_nodeports: Option<bool>,
    /// Full resync interval, unless --proxy-mode=ipvs.
    #[arg(long, value_name = "DURATION", value_parser = go_duration)]
    pub iptables_sync_period: Option<String>,
    /// Shortest interval between two syncs, unless --proxy-mode=ipvs.
    #[arg(long, value_name = "DURATION", value_parser = go_duration)]
    pub iptables_min_sync_period: Option<String>,
    /// Full resync interval, with --proxy-mode=ipvs (default 30s).
    #[arg(long, value_name = "DURATION", value_parser = go_duration)]
    pub ipvs_sync_period: Option<String>,
    /// Shortest interval between two syncs, with --proxy-mode=ipvs (default 1s).
    #[arg(long, value_name = "DURATION", value_parser = go_duration)]
    pub ipvs_min_sync_period: Option<String>,
    /// Full resync interval, whatever the mode (this agent's name; default 30s).
    #[arg(long, value_name = "DURATION", value_parser = go_duration)]
    pub sync_period: Option<String>,
    /// Shortest interval between two syncs, whatever the mode (this agent's name; default 1s).
    #[arg(long, value_name = "DURATION", value_parser = go_duration)]
    pub min_sync_period: Option<String>,
    /// The default IPVS scheduler (rr, wrr, lc, wlc, lblc, lblcr, sh, dh, sed, nq, mh, ...).
    #[arg(long, value_name = "SCHEDULER")]
    pub ipvs_scheduler: Option<String>,
    /// CIDRs whose IPVS services are never removed (comma-separated).
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    pub ipvs_exclude_cidrs: Vec<String>,
    /// Strict ARP (arp_ignore=1, arp_announce=2).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub ipvs_strict_arp: Option<bool>,
    /// IPVS TCP idle timeout (0: the kernel's).
    #[arg(long, value_name = "DURATION", value_parser = go_duration)]
    pub ipvs_tcp_timeout: Option<String>,
    /// IPVS TCP timeout after a FIN (0: the kernel's).
    #[arg(long, value_name = "DURATION", value_parser = go_duration)]
    pub ipvs_tcpfin_timeout: Option<String>,
    /// IPVS UDP timeout (0: the kernel's).
    #[arg(long, value_name = "DURATION", value_parser = go_duration)]
    pub ipvs_udp_timeout: Option<String>,
    /// How local traffic is detected: ClusterCIDR only (others are refused).
    #[arg(long, value_name = "MODE")]
    pub detect_local_mode: Option<String>,
    /// Bridge of --detect-local-mode=BridgeInterface (accepted, ignored: that mode is refused).
    #[arg(long, value_name = "INTERFACE")]
    pub pod_bridge_interface: Option<String>,
    /// Prefix of --detect-local-mode=InterfaceNamePrefix (accepted, ignored: that mode is
    /// refused).
    #[arg(long, value_name = "PREFIX")]
    pub pod_interface_name_prefix: Option<String>,
    /// The pods' CIDRs (one per IP family, comma-separated): clients outside are masqueraded.
    #[arg(long, value_name = "CIDR[,CIDR]")]
    pub cluster_cidr: Option<String>,
    /// Node addresses that serve NodePorts: CIDRs, or primary (default: every local address).
    #[arg(long, value_name = "CIDR,...|primary", value_delimiter = ',')]
    pub nodeport_addresses: Vec<String>,
    /// This process's oom_score_adj (-1000..1000).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub oom_score_adj: Option<i32>,
    /// nf_conntrack tuning (accepted, ignored: service traffic bypasses nf_conntrack here).
    #[arg(long, value_name = "N")]
    pub conntrack_max_per_core: Option<i32>,
    /// nf_conntrack tuning (accepted, ignored: service traffic bypasses nf_conntrack here).
    #[arg(long, value_name = "N")]
    pub conntrack_min: Option<i32>,
    /// nf_conntrack tuning (accepted, ignored: service traffic bypasses nf_conntrack here).
    #[arg(long, value_name = "DURATION", value_parser = go_duration)]
    pub conntrack_tcp_timeout_established: Option<String>,
    /// nf_conntrack tuning (accepted, ignored: service traffic bypasses nf_conntrack here).
    #[arg(long, value_name = "DURATION", value_parser = go_duration)]
    pub conntrack_tcp_timeout_close_wait: Option<String>,
    /// nf_conntrack tuning (accepted, ignored: service traffic bypasses nf_conntrack here).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub conntrack_tcp_be_liberal: Option<bool>,
    /// nf_conntrack tuning (accepted, ignored: service traffic bypasses nf_conntrack here).
    #[arg(long, value_name = "DURATION", value_parser = go_duration)]
    pub conntrack_udp_timeout: Option<String>,
    /// nf_conntrack tuning (accepted, ignored: service traffic bypasses nf_conntrack here).
    #[arg(long, value_name = "DURATION", value_parser = go_duration)]
    pub conntrack_udp_timeout_stream: Option<String>,
    /// Informer resync interval (accepted, ignored).
    #[arg(long, value_name = "DURATION", value_parser = go_duration)]
    pub config_sync_period: Option<String>,
    /// Deprecated in kube-proxy: the health server's port (0, disabling it, is refused).
    #[arg(long, value_name = "PORT")]
    pub healthz_port: Option<u16>,
    /// Deprecated in kube-proxy: the metrics server's port (0, disabling it, is refused).
    #[arg(long, value_name = "PORT")]
    pub metrics_port: Option<u16>,
    /// Log verbosity: 0-3 info, 4-5 debug, 6+ trace (RUST_LOG wins).
    #[arg(short = 'v', long = "v", value_name = "LEVEL")]
    pub verbosity: Option<u32>,
    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT")]
    pub logging_format: Option<String>,
    /// Per-file verbosity (accepted, ignored: use RUST_LOG).
    #[arg(long, value_name = "PATTERN=N,...")]
    pub vmodule: Option<String>,
    /// Log flush interval (accepted, ignored: logs are not buffered).
    #[arg(long, value_name = "DURATION", value_parser = go_duration)]
    pub log_flush_frequency: Option<String>,
    /// Info messages to stdout (accepted, ignored: logs go to stderr).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub log_text_split_stream: Option<bool>,
    /// Buffer of split text logs (accepted, ignored).
    #[arg(long, value_name = "SIZE")]
    pub log_text_info_buffer_size: Option<String>,
    /// Info messages to stdout (accepted, ignored: logs go to stderr).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool)]
    pub log_json_split_stream: Option<bool>,
    /// Buffer of split JSON logs (accepted, ignored).
    #[arg(long, value_name = "SIZE")]
    pub log_json_info_buffer_size: Option<String>,
}

/// Flags honoured with `--config` (kube-proxy's: those outside the configuration object, the
/// hostname override and the logging flags).
const KEPT_WITH_CONFIG: &[&str] = &[
    "config",
    "write_config_to",
    "cleanup",
    "init_only",
    "master",
    "hostname_override",
    "verbosity",
    "logging_format",
    "vmodule",
    "log_flush_frequency",
    "log_text_split_stream",
    "log_text_info_buffer_size",
    "log_json_split_stream",
    "log_json_info_buffer_size",
];

/// Flags accepted and ignored (one log line names those given).
const IGNORED: &[&str] = &[
    "kube_api_content_type",
    "kube_api_burst",
    "kube_api_qps",
    "show_hidden_metrics_for_version",
    "config_sync_period",
    "pod_bridge_interface",
    "pod_interface_name_prefix",
    "vmodule",
    "log_flush_frequency",
    "log_text_split_stream",
    "log_text_info_buffer_size",
    "log_json_split_stream",
    "log_json_info_buffer_size",
];

/// Which configuration field each flag stands for, to name the flag in the errors that the
/// configuration gives about that field.
const FLAG_OF_SETTING: &[(&str, &str)] = &[
    ("featureGates", "--feature-gates"),
    ("clientConnection.kubeconfig", "--kubeconfig"),
    ("hostnameOverride", "--hostname-override"),
    ("bindAddress", "--bind-address"),
    ("healthzBindAddress", "--healthz-bind-address"),
    ("metricsBindAddress", "--metrics-bind-address"),
    ("enableProfiling", "--profiling"),
    ("mode", "--proxy-mode"),
    ("iptables.masqueradeBit", "--iptables-masquerade-bit"),
    (
        "iptables.localhostNodePorts",
        "--iptables-localhost-nodeports",
    ),
    ("iptables.syncPeriod", "--iptables-sync-period"),
    ("iptables.minSyncPeriod", "--iptables-min-sync-period"),
    ("ipvs.syncPeriod", "--ipvs-sync-period"),
    ("ipvs.minSyncPeriod", "--ipvs-min-sync-period"),
    ("ipvs.scheduler", "--ipvs-scheduler"),
    ("ipvs.excludeCIDRs", "--ipvs-exclude-cidrs"),
    ("ipvs.tcpTimeout", "--ipvs-tcp-timeout"),
    ("ipvs.tcpFinTimeout", "--ipvs-tcpfin-timeout"),
    ("ipvs.udpTimeout", "--ipvs-udp-timeout"),
    ("detectLocalMode", "--detect-local-mode"),
    ("clusterCIDR", "--cluster-cidr"),
    ("nodePortAddresses", "--nodeport-addresses"),
    ("oomScoreAdj", "--oom-score-adj"),
    ("minSyncPeriod", "--min-sync-period"),
    ("syncPeriod", "--sync-period"),
];

/// What the invocation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run the agent on the Kubernetes source.
    Run,
    /// `--cleanup`: remove this agent's and kube-proxy's state, then exit.
    Cleanup,
    /// `--init-only`: prepare the node (bpffs), then exit.
    InitOnly,
}

/// A kube-proxy command line, resolved.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub action: Action,
    pub config: AgentConfig,
    /// `--master`.
    pub master: Option<String>,
    pub log_format: LogFormat,
    /// The default log filter (`-v`), when `RUST_LOG` is not set.
    pub log_level: &'static str,
    /// Flags that were ignored because `--config` was given (as `--name`).
    pub ignored_for_config: Vec<String>,
    /// Flags accepted and ignored (as `--name`), and the `--conntrack-*` ones apart.
    pub ignored: Vec<String>,
    pub ignored_conntrack: Vec<String>,
    /// Other remarks for the log (e.g. a per-mode flag that does not apply).
    pub notes: Vec<String>,
}

/// kube-proxy's flags as parsed, with which of them the command line gave.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub args: KubeProxyArgs,
    /// Field names (as in [`KubeProxyArgs`]) of the flags given on the command line.
    given: Vec<String>,
    /// Field name → `--long-name`.
    names: BTreeMap<String, String>,
}

impl Parsed {
    fn given(&self, id: &str) -> bool {
        self.given.iter().any(|g| g == id)
    }

    fn flag(&self, id: &str) -> String {
        self.names
            .get(id)
            .cloned()
            .unwrap_or_else(|| format!("--{}", id.replace('_', "-")))
    }

    fn flags_given(&self, filter: impl Fn(&str) -> bool) -> Vec<String> {
        let mut v: Vec<String> = self
            .given
            .iter()
            .filter(|g| filter(g))
            .map(|g| self.flag(g))
            .collect();
        v.sort();
        v
    }
}

/// Parses kube-proxy's command line (`args` as [`kube_proxy_args`] returns them: the program
/// name first). `--help` and bad flags are clap errors, to be printed with `exit()`.
pub fn parse(args: Vec<OsString>) -> Result<Parsed, clap::Error> {
    let cmd = KubeProxyArgs::command();
    let names: BTreeMap<String, String> = cmd
        .get_arguments()
        .map(|a| {
            let id = a.get_id().to_string();
            let name = a
                .get_long()
                .map(|l| format!("--{l}"))
                .unwrap_or_else(|| id.clone());
            (id, name)
        })
        .collect();
    let matches: ArgMatches = cmd.try_get_matches_from(args)?;
    let given = names
        .keys()
        .filter(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
        .cloned()
        .collect();
    let args = KubeProxyArgs::from_arg_matches(&matches)?;
    Ok(Parsed { args, given, names })
}

fn some_nonempty(v: &[String]) -> Option<Vec<String>> {
    (!v.is_empty()).then(|| v.to_vec())
}

/// `--feature-gates A=true,B=false` as a map; a malformed entry is an error naming it.
fn feature_gates(s: &str) -> anyhow::Result<BTreeMap<String, bool>> {
    let mut gates = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--feature-gates: {item:?} is not KEY=BOOL"))?;
        let v = go_bool(v.trim()).map_err(|e| anyhow::anyhow!("--feature-gates: {k}: {e}"))?;
        gates.insert(k.trim().to_owned(), v);
    }
    Ok(gates)
}

/// `--X-bind-address` with the deprecated `--X-port`: the port goes on the address's IP
/// unless the address names its own port; 0 (kube-proxy: disable the server) is refused.
fn address_with_port(
    address: Option<&str>,
    port: Option<u16>,
    default: std::net::SocketAddr,
    port_flag: &str,
) -> anyhow::Result<Option<String>> {
    let Some(port) = port else {
        return Ok(address.map(str::to_owned));
    };
    if port == 0 {
        anyhow::bail!(
            "{port_flag}=0: the server cannot be disabled here (kube-ipvs-bpf always serves it)"
        );
    }
    let address = address.map(str::trim).filter(|a| !a.is_empty());
    if let Some(a) = address
        && a.parse::<std::net::SocketAddr>().is_ok()
    {
        return Ok(Some(a.to_owned()));
    }
    let ip = match address {
        Some(a) => a.trim_matches(|c| c == '[' || c == ']').to_owned(),
        None => default.ip().to_string(),
    };
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|_| anyhow::anyhow!("{port_flag}: {ip:?} is not an IP address"))?;
    Ok(Some(std::net::SocketAddr::new(ip, port).to_string()))
}

/// The configuration file the flags stand for (no `--config`).
fn file_from_flags(p: &Parsed) -> anyhow::Result<FileConfig> {
    let a = &p.args;
    let client_connection = config::ClientConnection {
        kubeconfig: a.kubeconfig.as_ref().map(|k| k.display().to_string()),
        content_type: a.kube_api_content_type.clone(),
        qps: a.kube_api_qps,
        burst: a.kube_api_burst,
        ..Default::default()
    };
    let iptables = config::IptablesSection {
        masquerade_bit: a.iptables_masquerade_bit,
        localhost_node_ports: a.iptables_localhost_nodeports,
        sync_period: a.iptables_sync_period.clone(),
        min_sync_period: a.iptables_min_sync_period.clone(),
        ..Default::default()
    };
    let ipvs = config::IpvsSection {
        sync_period: a.ipvs_sync_period.clone(),
        min_sync_period: a.ipvs_min_sync_period.clone(),
        scheduler: a.ipvs_scheduler.clone(),
        exclude_cidrs: some_nonempty(&a.ipvs_exclude_cidrs),
        strict_arp: a.ipvs_strict_arp,
        tcp_timeout: a.ipvs_tcp_timeout.clone(),
        tcp_fin_timeout: a.ipvs_tcpfin_timeout.clone(),
        udp_timeout: a.ipvs_udp_timeout.clone(),
    };
    let detect_local = config::DetectLocal {
        bridge_interface: a.pod_bridge_interface.clone(),
        interface_name_prefix: a.pod_interface_name_prefix.clone(),
    };
    Ok(FileConfig {
        api_version: Some(config::KUBE_PROXY_API_VERSION.into()),
        kind: Some(config::KUBE_PROXY_KIND.into()),
        feature_gates: a.feature_gates.as_deref().map(feature_gates).transpose()?,
        client_connection: Some(client_connection),
        hostname_override: a.hostname_override.clone(),
        bind_address: a.bind_address.clone(),
        healthz_bind_address: address_with_port(
            a.healthz_bind_address.as_deref(),
            a.healthz_port,
            config::DEFAULT_HEALTHZ_BIND_ADDRESS,
            "--healthz-port",
        )?,
        metrics_bind_address: address_with_port(
            a.metrics_bind_address.as_deref(),
            a.metrics_port,
            config::DEFAULT_METRICS_BIND_ADDRESS,
            "--metrics-port",
        )?,
        bind_address_hard_fail: a.bind_address_hard_fail,
        enable_profiling: a.profiling,
        show_hidden_metrics_for_version: a.show_hidden_metrics_for_version.clone(),
        mode: a.proxy_mode.clone(),
        iptables: Some(iptables),
        ipvs: Some(ipvs),
        detect_local_mode: a.detect_local_mode.clone(),
        detect_local: Some(detect_local),
        cluster_cidr: a.cluster_cidr.clone(),
        node_port_addresses: some_nonempty(&a.nodeport_addresses),
        oom_score_adj: a.oom_score_adj,
        config_sync_period: a.config_sync_period.clone(),
        sync_period: a.sync_period.clone(),
        min_sync_period: a.min_sync_period.clone(),
        masquerade_all: a.masquerade_all,
        ..Default::default()
    })
}

/// A configuration error about a field, naming the flag that stands for it.
fn name_the_flag(e: ConfigError) -> ConfigError {
    let flag = |setting: &str| {
        FLAG_OF_SETTING
            .iter()
            .find(|(key, _)| {
                setting == *key
                    || setting.starts_with(&format!("{key}."))
                    || setting.starts_with(&format!("{key}["))
            })
            .map(|(key, flag)| {
                if setting == *key {
                    (*flag).to_owned()
                } else {
                    format!("{flag} ({setting})")
                }
            })
    };
    match e {
        ConfigError::Invalid { setting, message } => ConfigError::Invalid {
            setting: flag(&setting).unwrap_or(setting),
            message,
        },
        ConfigError::Unsupported { setting, reason } => ConfigError::Unsupported {
            setting: flag(&setting).unwrap_or(setting),
            reason,
        },
        other => other,
    }
}

/// Resolves a parsed kube-proxy command line: the configuration (from `--config`, or from the
/// flags), the action and the logging, with kube-proxy's precedence (module documentation).
pub fn resolve(p: &Parsed) -> anyhow::Result<Resolved> {
    let a = &p.args;
    if let Some(path) = &a.write_config_to {
        anyhow::bail!(
            "--write-config-to {}: not supported by kube-ipvs-bpf (its configuration reference \
             is docs/configuration.md)",
            path.display()
        );
    }
    if let Some(f) = a.logging_format.as_deref().map(str::trim)
        && !matches!(f, "" | "text" | "json")
    {
        anyhow::bail!("--logging-format {f:?}: not supported (text or json)");
    }
    let (log_format, log_level) = log_settings(a);
    if let Some(h) = &a.hostname_override
        && !h.is_empty()
        && h.trim().is_empty()
    {
        anyhow::bail!("--hostname-override: an empty name is invalid");
    }
    let mut notes = Vec::new();
    let (config, ignored_for_config) = match &a.config {
        Some(path) => {
            let mut file = config::load(path)?;
            if let Some(h) = a.hostname_override.as_deref().filter(|h| !h.is_empty()) {
                file.hostname_override = Some(h.trim().to_lowercase());
            }
            let cfg = config::resolve(Some(&file), &config::Overrides::default())?;
            let ignored = p.flags_given(|id| !KEPT_WITH_CONFIG.contains(&id));
            (cfg, ignored)
        }
        None => {
            for (id, value) in [
                ("healthz_bind_address", &a.healthz_bind_address),
                ("metrics_bind_address", &a.metrics_bind_address),
            ] {
                if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                    anyhow::bail!(
                        "{}=\"\": the server cannot be disabled here (kube-ipvs-bpf always serves it)",
                        p.flag(id)
                    );
                }
            }
            let file = file_from_flags(p)?;
            let ipvs_mode = a.proxy_mode.as_deref().map(str::trim) == Some("ipvs");
            let per_mode: &[&str] = if ipvs_mode {
                &["iptables_sync_period", "iptables_min_sync_period"]
            } else {
                &["ipvs_sync_period", "ipvs_min_sync_period"]
            };
            for id in per_mode.iter().filter(|id| p.given(id)) {
                notes.push(format!(
                    "{} is ignored: {} (as in kube-proxy)",
                    p.flag(id),
                    if ipvs_mode {
                        "it applies only when --proxy-mode is not ipvs"
                    } else {
                        "it applies only with --proxy-mode=ipvs"
                    }
                ));
            }
            let cfg = config::resolve(Some(&file), &config::Overrides::default())
                .map_err(name_the_flag)?;
            (cfg, Vec::new())
        }
    };
    let ignored =
        p.flags_given(|id| IGNORED.contains(&id) && !ignored_for(&ignored_for_config, p, id));
    let ignored_conntrack = if a.config.is_some() {
        Vec::new()
    } else {
        p.flags_given(|id| id.starts_with("conntrack_"))
    };
    let action = if a.cleanup == Some(true) {
        Action::Cleanup
    } else if a.init_only == Some(true) {
        Action::InitOnly
    } else {
        Action::Run
    };
    Ok(Resolved {
        action,
        config,
        master: a.master.clone().filter(|m| !m.trim().is_empty()),
        log_format,
        log_level,
        ignored_for_config,
        ignored,
        ignored_conntrack,
        notes,
    })
}

/// The log format and default filter of `--logging-format` and `-v` (an unknown format is
/// text here; [`resolve`] refuses it by name).
pub fn log_settings(a: &KubeProxyArgs) -> (LogFormat, &'static str) {
    let format = match a.logging_format.as_deref().map(str::trim) {
        Some("json") => LogFormat::Json,
        _ => LogFormat::Text,
    };
    let level = match a.verbosity.unwrap_or(0) {
        0..=3 => "info",
        4..=5 => "debug",
        _ => "trace",
    };
    (format, level)
}

/// Does what a resolved kube-proxy command line asks: runs the agent, or cleans up, or
/// prepares the node, and returns.
pub async fn execute(r: Resolved) -> anyhow::Result<()> {
    match r.action {
        Action::Cleanup => crate::cli::cleanup_as_kube_proxy(&r.config).await,
        Action::InitOnly => crate::init::run(&crate::init::InitConfig {
            bpffs: PathBuf::from(crate::init::DEFAULT_BPFFS),
            pin_root: r.config.datapath.pin_root.clone(),
        })
        .map(|_| ()),
        Action::Run => {
            // As kube-proxy, a run does the privileged preparation --init-only does alone: so
            // kube-proxy's own DaemonSet (privileged, no bpffs volume, no init container) runs
            // the agent with only its image swapped. Without the privilege, the datapath's
            // start-up check names what is missing.
            if let Err(e) = crate::init::run(&crate::init::InitConfig {
                bpffs: PathBuf::from(crate::init::DEFAULT_BPFFS),
                pin_root: r.config.datapath.pin_root.clone(),
            }) {
                tracing::warn!("{}", crate::logging::error_line(&e));
            }
            crate::cli::run_kubernetes(r.config, r.master).await
        }
    }
}

/// Whether flag `id` is already reported as ignored because of `--config`.
fn ignored_for(ignored_for_config: &[String], p: &Parsed, id: &str) -> bool {
    ignored_for_config.contains(&p.flag(id))
}

impl Resolved {
    /// Logs what was ignored, once, naming the flags.
    pub fn log_ignored(&self) {
        if !self.ignored_for_config.is_empty() {
            tracing::warn!(
                flags = %self.ignored_for_config.join(" "),
                "flags ignored because --config is given (as kube-proxy does): set these in the \
                 configuration file"
            );
        }
        if !self.ignored_conntrack.is_empty() {
            tracing::info!(
                flags = %self.ignored_conntrack.join(" "),
                "conntrack flags ignored: service traffic bypasses nf_conntrack here, so no \
                 conntrack setting is tuned"
            );
        }
        if !self.ignored.is_empty() {
            tracing::info!(flags = %self.ignored.join(" "), "flags accepted and ignored");
        }
        for n in &self.notes {
            tracing::warn!("{n}");
        }
    }
}

#[cfg(test)]
mod tests;
