//! The configuration file: its schema ([`FileConfig`]), loading and validation ([`load`],
//! [`parse`]), and the merge of flags, file and defaults into the resolved [`AgentConfig`]
//! ([`resolve`]). This module owns every decision about which setting means what; the CLI only
//! passes the flags the operator gave ([`Overrides`]).
//!
//! # Format
//!
//! YAML, in one of two kinds, which share one schema:
//! - `apiVersion: kubeproxy.config.k8s.io/v1alpha1`, `kind: KubeProxyConfiguration`: an operator
//!   can point the agent at the file of their kube-proxy ConfigMap as it is (kubeadm writes every
//!   field, mostly with zero values: a zero value asks for nothing and is always accepted);
//! - `apiVersion: kube-ipvs-bpf.io/v1alpha1`, `kind: KubeIpvsBpfConfiguration`: this agent's own.
//!
//! Fields mirror kube-proxy's `KubeProxyConfiguration` (v1alpha1, Kubernetes v1.36) where the
//! meaning matches, plus top-level `syncPeriod`, `minSyncPeriod` and `masqueradeAll` (which
//! kube-proxy spreads over its per-mode sections), plus the `kubeIpvsBpf` section. Unknown fields
//! stop start-up (serde `deny_unknown_fields`, the message names the field), and so does every
//! setting whose meaning this agent cannot honour; the error names the setting.
//!
//! # Precedence
//!
//! Flags > configuration file > defaults, field by field ([`resolve`]).
//!
//! # The resolved configuration
//!
//! [`AgentConfig`] owns one typed part per consumer, handed on whole: the service model's
//! ([`ModelConfig`]), the sync loop's timing ([`SyncTiming`]), IPVS's ([`IpvsSettings`]), the
//! listeners' ([`Listeners`]) and the eBPF datapath's ([`DatapathSettings`]).
//!
//! # Fields
//!
//! Every field, its default, its kube-proxy equivalent and what this agent does with it:
//! [`reference::FIELDS`], rendered as docs/configuration.md. "Zero" means absent, `null`, `""`,
//! `0`, `0s`, `false`, `{}` or `[]`: always accepted.
//!
//! Top-level `syncPeriod`/`minSyncPeriod` conflict with a different non-zero per-mode value
//! (an error names both). Zero durations mean "default", as in kube-proxy's own defaulting.
//!
//! # Our section
//!
//! ```yaml
//! kubeIpvsBpf:
//!   drainTimeout: 5m          # longest graceful drain of a removed TCP/SCTP destination
//!   stateDir: /run/kube-ipvs-bpf
//!   nodePortRange: 30000-32767  # kube-apiserver's --service-node-port-range
//!   serviceProxyName: ""      # service.kubernetes.io/service-proxy-name this agent answers to
//!   onlyLabelledServices: false # true: only Services with that label (beside kube-proxy)
//!   nodeCheckPeriod: 5s       # how often the node state outside IPVS is checked and repaired
//!   iptablesBackend: default  # default (the node firewall's, as kube-proxy's wrapper finds it), nft or legacy
//!   datapath:                 # read by the datapath loader
//!     kind: bpf               # bpf (IPVS + eBPF SNAT) or none (IPVS alone)
//!     pinRoot: /sys/fs/bpf/kube-ipvs-bpf/v2  # where maps and programs are pinned
//!     mapSizes: {snat: 262144}  # a map's entries, by name (applied when the map is created)
//!     markService: 0x200000
//!     markMasquerade: 0x400000
//!     markReply: 0x100000
//!     snatPortRange: 1024-29999   # default: the widest range outside the node's ephemeral
//!                                 # ports (ip_local_port_range) and the NodePorts; an explicit
//!                                 # range must avoid both (checked at start-up)
//!     sweepPeriod: 10s            # how often expired SNAT entries are swept (100ms..1m)
//!     snatReroute: auto           # net.ipv4.vs.snat_reroute: auto (off while routes depend on
//!                                 # the destination alone), on or off (datapath::reroute)
//!     ipvsFreeProbe: true         # the probe on IPVS freeing a connection removes its conns
//!                                 # entry; false: the sweeper does (sweep::ConnsRemoval)
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use crate::datapath::reroute::SnatReroute;
use crate::model::{self, ModelConfig, NodePortAddresses};

/// `apiVersion` of kube-proxy's configuration.
pub const KUBE_PROXY_API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
/// `kind` of kube-proxy's configuration.
pub const KUBE_PROXY_KIND: &str = "KubeProxyConfiguration";
/// `apiVersion` of this agent's own configuration.
pub const API_VERSION: &str = "kube-ipvs-bpf.io/v1alpha1";
/// `kind` of this agent's own configuration.
pub const KIND: &str = "KubeIpvsBpfConfiguration";

/// Default health server address (kube-proxy's).
pub const DEFAULT_HEALTHZ_BIND_ADDRESS: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 10256);
/// Default metrics server address (kube-proxy's).
pub const DEFAULT_METRICS_BIND_ADDRESS: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10249);
/// Default full-resync interval.
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);
/// Default shortest interval between two syncs.
pub const DEFAULT_MIN_SYNC_PERIOD: Duration = Duration::from_secs(1);
/// Default longest drain of a removed TCP/SCTP destination.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
/// Default interval of the SNAT table's sweeps.
pub const DEFAULT_SWEEP_PERIOD: Duration = Duration::from_secs(10);
/// Shortest sweep period: a pass walks the whole table, so shorter ones cost CPU for nothing.
pub const MIN_SWEEP_PERIOD: Duration = Duration::from_millis(100);
/// Longest sweep period: a connection's entries outlive its timeout by up to two periods (a
/// record is freed one pass after it is removed), so longer ones fill the table with dead
/// connections (a reset TCP connection times out after 10 s).
pub const MAX_SWEEP_PERIOD: Duration = Duration::from_secs(60);
/// Default interval of the node state's checks (outside IPVS).
pub const DEFAULT_NODE_CHECK_PERIOD: Duration = Duration::from_secs(5);
/// Default NodePort range (kube-apiserver's default `--service-node-port-range`).
pub const DEFAULT_NODE_PORT_RANGE: RangeInclusive<u16> = 30000..=32767;

/// A configuration that cannot be used, naming the file or the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not YAML, an unknown field, or a value of the wrong type (the message names the field).
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{setting}: {message}")]
    Invalid { setting: String, message: String },
    #[error("{setting}: not supported by kube-ipvs-bpf: {reason}")]
    Unsupported { setting: String, reason: String },
}

fn invalid(setting: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting: setting.into(),
        message: message.into(),
    }
}

fn unsupported(setting: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Unsupported {
        setting: setting.into(),
        reason: reason.into(),
    }
}

/// The configuration file as written. Every field is optional; see the module documentation
/// for what each one does.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileConfig {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    pub client_connection: Option<ClientConnection>,
    /// kube-proxy's `LoggingConfiguration`: accepted as anything, ignored.
    pub logging: Option<serde_yaml::Value>,
    pub hostname_override: Option<String>,
    pub bind_address: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub enable_profiling: Option<bool>,
    pub show_hidden_metrics_for_version: Option<String>,
    pub mode: Option<String>,
    pub iptables: Option<IptablesSection>,
    pub ipvs: Option<IpvsSection>,
    pub nftables: Option<NftablesSection>,
    /// Windows only: accepted as anything, ignored.
    pub winkernel: Option<serde_yaml::Value>,
    pub detect_local_mode: Option<String>,
    pub detect_local: Option<DetectLocal>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub oom_score_adj: Option<i32>,
    pub conntrack: Option<Conntrack>,
    pub config_sync_period: Option<String>,
    pub port_range: Option<String>,
    pub windows_run_as_service: Option<bool>,
    /// Full-resync interval (kube-proxy: `<mode>.syncPeriod`).
    pub sync_period: Option<String>,
    /// Shortest interval between two syncs (kube-proxy: `<mode>.minSyncPeriod`).
    pub min_sync_period: Option<String>,
    /// Masquerade every service connection (kube-proxy: `iptables.masqueradeAll`).
    pub masquerade_all: Option<bool>,
    pub kube_ipvs_bpf: Option<OwnSection>,
}

/// kube-proxy's `clientConnection`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientConnection {
    pub kubeconfig: Option<String>,
    pub accept_content_types: Option<String>,
    pub content_type: Option<String>,
    pub qps: Option<f64>,
    pub burst: Option<i64>,
}

/// kube-proxy's `iptables` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IptablesSection {
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: Option<bool>,
    pub localhost_node_ports: Option<bool>,
    #[serde(rename = "snatNodeInternalIP")]
    pub snat_node_internal_ip: Option<bool>,
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
}

/// kube-proxy's `ipvs` section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IpvsSection {
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
    pub scheduler: Option<String>,
    #[serde(rename = "excludeCIDRs")]
    pub exclude_cidrs: Option<Vec<String>>,
    #[serde(rename = "strictARP")]
    pub strict_arp: Option<bool>,
    pub tcp_timeout: Option<String>,
    pub tcp_fin_timeout: Option<String>,
    pub udp_timeout: Option<String>,
}

/// kube-proxy's `nftables` section (accepted, ignored).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NftablesSection {
    pub masquerade_bit: Option<i32>,
    pub masquerade_all: Option<bool>,
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
}

/// kube-proxy's `detectLocal` section (accepted, ignored).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DetectLocal {
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
}

/// kube-proxy's `conntrack` section: every field must be zero.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Conntrack {
    pub max_per_core: Option<i32>,
    pub min: Option<i32>,
    pub tcp_established_timeout: Option<String>,
    pub tcp_close_wait_timeout: Option<String>,
    pub tcp_be_liberal: Option<bool>,
    pub udp_timeout: Option<String>,
    pub udp_stream_timeout: Option<String>,
}

/// This agent's own section, `kubeIpvsBpf`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OwnSection {
    pub drain_timeout: Option<String>,
    pub state_dir: Option<PathBuf>,
    /// `first-last`, as kube-apiserver's `--service-node-port-range`.
    pub node_port_range: Option<String>,
    pub service_proxy_name: Option<String>,
    /// Handle only the Services labelled with `serviceProxyName` (to run beside kube-proxy).
    pub only_labelled_services: Option<bool>,
    /// How often the node state outside IPVS is checked and repaired (`--node-check-period`).
    pub node_check_period: Option<String>,
    /// `default`, `nft` or `legacy` (`--iptables-backend`).
    pub iptables_backend: Option<String>,
    pub datapath: Option<DatapathSection>,
}

/// `kubeIpvsBpf.datapath`: settings of the eBPF datapath (a placeholder the loader reads).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DatapathSection {
    /// `bpf` or `none` (`--datapath`).
    pub kind: Option<String>,
    /// Where the maps and programs are pinned (`--bpf-pin-root`).
    pub pin_root: Option<PathBuf>,
    /// Entries of a map, by name (`--bpf-map-size NAME=ENTRIES`).
    pub map_sizes: Option<BTreeMap<String, u32>>,
    pub mark_service: Option<u32>,
    pub mark_masquerade: Option<u32>,
    pub mark_reply: Option<u32>,
    /// `first-last`: ports the datapath SNATs to.
    pub snat_port_range: Option<String>,
    /// How often expired SNAT entries are swept (`--sweep-period`).
    pub sweep_period: Option<String>,
    /// `auto`, `on` or `off`: `net.ipv4.vs.snat_reroute` (`--snat-reroute`).
    pub snat_reroute: Option<String>,
    /// Whether the probe on IPVS freeing a connection is attached (`--ipvs-free-probe`).
    pub ipvs_free_probe: Option<bool>,
}

/// Flags given on the command line: `None` (or empty) where the operator gave none, so the file
/// or the default applies.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub node_name: Option<String>,
    pub node_ips: Vec<IpAddr>,
    pub cluster_cidrs: Vec<IpNet>,
    /// `primary`, `all`, or CIDRs, as `nodePortAddresses`.
    pub node_port_addresses: Vec<String>,
    pub scheduler: Option<String>,
    pub masquerade_all: Option<bool>,
    pub proxy_name: Option<String>,
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
    pub drain_timeout: Option<Duration>,
    pub sweep_period: Option<Duration>,
    pub snat_reroute: Option<SnatReroute>,
    pub ipvs_free_probe: Option<bool>,
    pub state_dir: Option<PathBuf>,
    pub healthz_bind_address: Option<SocketAddr>,
    pub metrics_bind_address: Option<SocketAddr>,
    pub kubeconfig: Option<PathBuf>,
    pub node_check_period: Option<Duration>,
    pub iptables_backend: Option<IptablesBackend>,
    pub datapath: Option<DatapathKind>,
    pub bpf_pin_root: Option<PathBuf>,
    /// `--bpf-map-size NAME=ENTRIES`, in the order given (a later one wins).
    pub bpf_map_sizes: Vec<(String, u32)>,
}

/// Which datapath `run` uses (`kubeIpvsBpf.datapath.kind`, `--datapath`).
#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq, Eq)]
pub enum DatapathKind {
    /// IPVS plus the eBPF SNAT datapath (conntrack-free).
    Bpf,
    /// IPVS alone: no SNAT (for hosts without BPF; external and hairpin traffic needs SNAT).
    None,
}

/// Which iptables the agent writes its few rules with (`kubeIpvsBpf.iptablesBackend`,
/// `--iptables-backend`).
#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq, Eq)]
pub enum IptablesBackend {
    /// The one the node's firewall uses (`datapath::rules::detect_backend`).
    Default,
    Nft,
    Legacy,
}

impl IptablesBackend {
    /// The datapath's rules backend.
    pub fn rules_backend(self) -> crate::datapath::rules::Backend {
        match self {
            IptablesBackend::Default => crate::datapath::rules::Backend::Default,
            IptablesBackend::Nft => crate::datapath::rules::Backend::Nft,
            IptablesBackend::Legacy => crate::datapath::rules::Backend::Legacy,
        }
    }
}

/// IPVS connection timeouts (`ipvsadm --set`); `None` leaves the kernel's value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IpvsTimeouts {
    pub tcp: Option<Duration>,
    pub tcp_fin: Option<Duration>,
    pub udp: Option<Duration>,
}

impl IpvsTimeouts {
    pub fn is_empty(&self) -> bool {
        self.tcp.is_none() && self.tcp_fin.is_none() && self.udp.is_none()
    }

    /// As IPVS takes them (`ipvsadm --set`): whole seconds, 0 leaves the kernel's value.
    pub fn kernel(&self) -> ipvs::Timeouts {
        let secs = |d: Option<Duration>| d.map_or(0, |d| d.as_secs() as u32);
        ipvs::Timeouts {
            tcp: secs(self.tcp),
            tcp_fin: secs(self.tcp_fin),
            udp: secs(self.udp),
        }
    }

    /// The SNAT sweeper's timeouts: these where set, its defaults elsewhere.
    pub fn sweep(&self) -> crate::datapath::sweep::Timeouts {
        let mut t = crate::datapath::sweep::Timeouts::default();
        if let Some(d) = self.tcp {
            t.tcp = d;
        }
        if let Some(d) = self.tcp_fin {
            t.tcp_fin = d;
        }
        if let Some(d) = self.udp {
            t.udp = d;
        }
        t
    }
}

/// The sync loop's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncTiming {
    /// Interval of full resyncs, which repair drift.
    pub sync_period: Duration,
    /// Shortest interval between two syncs.
    pub min_sync_period: Duration,
    /// Longest drain of a removed TCP/SCTP destination before it is deleted anyway.
    pub drain_timeout: Duration,
    /// How often the node state outside IPVS is checked and repaired.
    pub node_check_period: Duration,
}

impl Default for SyncTiming {
    fn default() -> Self {
        Self {
            sync_period: DEFAULT_SYNC_PERIOD,
            min_sync_period: DEFAULT_MIN_SYNC_PERIOD,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            node_check_period: DEFAULT_NODE_CHECK_PERIOD,
        }
    }
}

/// IPVS's settings (kube-proxy's `ipvs` section, but the scheduler: the model's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpvsSettings {
    pub timeouts: IpvsTimeouts,
    pub strict_arp: bool,
    /// IPVS services whose address is in one of these are never deleted.
    pub exclude_cidrs: Vec<IpNet>,
}

/// The health and metrics listeners ([`crate::admin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listeners {
    /// /healthz and /livez.
    pub healthz: SocketAddr,
    /// /metrics.
    pub metrics: SocketAddr,
    /// Whether failing to bind either address stops the agent.
    pub hard_fail: bool,
}

impl Default for Listeners {
    fn default() -> Self {
        Self {
            healthz: DEFAULT_HEALTHZ_BIND_ADDRESS,
            metrics: DEFAULT_METRICS_BIND_ADDRESS,
            hard_fail: false,
        }
    }
}

/// Settings of the datapath (`kubeIpvsBpf.datapath`, and the rules' iptables), for
/// [`crate::datapath::DatapathConfig`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathSettings {
    pub kind: DatapathKind,
    /// Where the maps and programs are pinned (versioned).
    pub pin_root: PathBuf,
    /// Which iptables writes the agent's rules.
    pub iptables_backend: IptablesBackend,
    /// The maps' sizes, applied when the maps are created.
    pub map_sizes: probes::MapSizes,
    pub mark_service: u32,
    pub mark_masquerade: u32,
    /// The mark bit of the replies TC ingress recognizes (0: none); `None`: the default
    /// ([`DatapathSettings::reply_mark`]).
    pub mark_reply: Option<u32>,
    /// SNAT ports; `None`: the datapath picks the widest range outside the node's ephemeral
    /// ports and the NodePorts.
    pub snat_port_range: Option<RangeInclusive<u16>>,
    /// How often expired SNAT entries are swept.
    pub sweep_period: Duration,
    /// `net.ipv4.vs.snat_reroute` (`crate::datapath::reroute`).
    pub snat_reroute: SnatReroute,
    /// Whether the probe on IPVS freeing a connection is attached (it removes the
    /// connection's `conns` entry; without it the sweeper does: `sweep::ConnsRemoval`).
    pub ipvs_free_probe: bool,
}

impl DatapathSettings {
    /// The reply mark bit: `markReply` as configured, else 0x100000 or, when markService or
    /// markMasquerade use that bit, the first of 0x800000, 0x1000000, 0x2000000, 0x80000 they
    /// leave free (a node configured before the reply mark existed keeps starting).
    pub fn reply_mark(&self) -> u32 {
        let taken = self.mark_service | self.mark_masquerade;
        self.mark_reply.unwrap_or_else(|| {
            [
                probes::maps::DEFAULT_MARK_REPLY,
                0x80_0000,
                0x100_0000,
                0x200_0000,
                0x8_0000,
            ]
            .into_iter()
            .find(|m| m & taken == 0)
            .unwrap_or(0)
        })
    }
}

impl Default for DatapathSettings {
    fn default() -> Self {
        Self {
            kind: DatapathKind::Bpf,
            pin_root: PathBuf::from(probes::loader::DEFAULT_PIN_ROOT),
            iptables_backend: IptablesBackend::Default,
            map_sizes: probes::MapSizes::default(),
            mark_service: probes::maps::DEFAULT_MARK_SVC,
            mark_masquerade: probes::maps::DEFAULT_MARK_MASQ,
            mark_reply: None,
            snat_port_range: None,
            sweep_period: DEFAULT_SWEEP_PERIOD,
            snat_reroute: SnatReroute::Auto,
            ipvs_free_probe: true,
        }
    }
}

/// The resolved configuration: flags over file over defaults, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// The Node's name; `None`: the hostname.
    pub node_name: Option<String>,
    /// The Node's IPs; empty: the Node object's InternalIPs, else the host's addresses.
    pub node_ips: Vec<IpAddr>,
    pub kubeconfig: Option<PathBuf>,
    pub oom_score_adj: Option<i32>,
    /// The service model's settings (cluster CIDRs, NodePort addresses, default scheduler,
    /// masquerading, service-proxy-name).
    pub model: ModelConfig,
    pub state_dir: PathBuf,
    pub node_port_range: RangeInclusive<u16>,
    pub timing: SyncTiming,
    pub ipvs: IpvsSettings,
    pub listeners: Listeners,
    pub datapath: DatapathSettings,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            node_name: None,
            node_ips: Vec::new(),
            kubeconfig: None,
            oom_score_adj: None,
            model: ModelConfig::default(),
            state_dir: PathBuf::from(crate::state::DEFAULT_STATE_DIR),
            node_port_range: DEFAULT_NODE_PORT_RANGE,
            timing: SyncTiming::default(),
            ipvs: IpvsSettings::default(),
            listeners: Listeners::default(),
            datapath: DatapathSettings::default(),
        }
    }
}

impl AgentConfig {
    /// How long a queued change may wait for a successful sync before the health check fails:
    /// 2 × `sync_period`, as kube-proxy.
    pub fn health_timeout(&self) -> Duration {
        self.timing.sync_period.saturating_mul(2)
    }
}

/// Reads and validates a configuration file. Every setting is checked here, so a file that loads
/// also resolves (with any flags).
pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_named(&text, path)
}

/// [`load`] on text.
pub fn parse(yaml: &str) -> Result<FileConfig, ConfigError> {
    parse_named(yaml, Path::new("<config>"))
}

fn parse_named(yaml: &str, path: &Path) -> Result<FileConfig, ConfigError> {
    let file: FileConfig = serde_yaml::from_str(yaml).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    resolve(Some(&file), &Overrides::default())?;
    Ok(file)
}

/// Merges the flags, the file and the defaults, field by field: a flag wins over the file, the
/// file over the default. Checks every setting (see the module documentation for the rules).
pub fn resolve(file: Option<&FileConfig>, flags: &Overrides) -> Result<AgentConfig, ConfigError> {
    let empty = FileConfig::default();
    let f = file.unwrap_or(&empty);
    let mut cfg = AgentConfig::default();
    if file.is_some() {
        check_kind(f)?;
    }
    check_unsupported(f)?;
    let iptables = f.iptables.clone().unwrap_or_default();
    let ipvs = f.ipvs.clone().unwrap_or_default();
    let own = f.kube_ipvs_bpf.clone().unwrap_or_default();
    file_node(f, &mut cfg)?;
    file_model(f, &iptables, &ipvs, &own, &mut cfg)?;
    file_sync(f, &iptables, &ipvs, &own, &mut cfg)?;
    file_ipvs(&ipvs, &mut cfg)?;
    file_datapath(&own, &mut cfg)?;
    apply_overrides(&mut cfg, flags)?;
    validate(&cfg)?;
    Ok(cfg)
}

/// The node's identity, the listeners, the API server's kubeconfig and oomScoreAdj.
fn file_node(f: &FileConfig, cfg: &mut AgentConfig) -> Result<(), ConfigError> {
    let bind_ip = match non_empty(&f.bind_address) {
        Some(s) => Some(
            s.parse::<IpAddr>()
                .map_err(|_| invalid("bindAddress", format!("{s:?} is not an IP address")))?,
        ),
        None => None,
    };
    if let Some(ip) = bind_ip {
        if !ip.is_unspecified() {
            cfg.node_ips = vec![ip];
        }
        if ip.is_ipv6() {
            cfg.listeners.healthz = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 10256);
            cfg.listeners.metrics = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 10249);
        }
    }
    if let Some(h) = non_empty(&f.hostname_override) {
        cfg.node_name = Some(h.trim().to_lowercase());
    }
    if let Some(s) = non_empty(&f.healthz_bind_address) {
        cfg.listeners.healthz = bind_address("healthzBindAddress", s, 10256)?;
    }
    if let Some(s) = non_empty(&f.metrics_bind_address) {
        cfg.listeners.metrics = bind_address("metricsBindAddress", s, 10249)?;
    }
    cfg.listeners.hard_fail = f.bind_address_hard_fail.unwrap_or(false);
    if let Some(k) = f
        .client_connection
        .as_ref()
        .and_then(|c| non_empty(&c.kubeconfig))
    {
        cfg.kubeconfig = Some(PathBuf::from(k));
    }
    if let Some(adj) = f.oom_score_adj {
        if !(-1000..=1000).contains(&adj) {
            return Err(invalid(
                "oomScoreAdj",
                format!("{adj} is outside -1000..=1000"),
            ));
        }
        cfg.oom_score_adj = Some(adj);
    }
    Ok(())
}

/// The service model's settings.
fn file_model(
    f: &FileConfig,
    iptables: &IptablesSection,
    ipvs: &IpvsSection,
    own: &OwnSection,
    cfg: &mut AgentConfig,
) -> Result<(), ConfigError> {
    if let Some(s) = non_empty(&f.cluster_cidr) {
        cfg.model.cluster_cidrs = cluster_cidrs("clusterCIDR", s)?;
    }
    if let Some(list) = f.node_port_addresses.as_ref().filter(|l| !l.is_empty()) {
        cfg.model.node_port_addresses = node_port_addresses("nodePortAddresses", list)?;
    }
    if let Some(s) = non_empty(&ipvs.scheduler) {
        cfg.model.default_scheduler = s.to_owned();
    }
    cfg.model.masquerade_all = f
        .masquerade_all
        .or(iptables.masquerade_all)
        .unwrap_or(false);
    if let Some(name) = non_empty(&own.service_proxy_name) {
        cfg.model.proxy_name = Some(name.to_owned());
    }
    cfg.model.only_labelled_services = own.only_labelled_services.unwrap_or(false);
    Ok(())
}

/// The sync loop's timing (the per-mode section's periods follow `mode`), the state
/// directory and the NodePort range.
fn file_sync(
    f: &FileConfig,
    iptables: &IptablesSection,
    ipvs: &IpvsSection,
    own: &OwnSection,
    cfg: &mut AgentConfig,
) -> Result<(), ConfigError> {
    let mode_ipvs = f.mode.as_deref() == Some("ipvs");
    let (section, sync_key, min_key) = if mode_ipvs {
        (
            (&ipvs.sync_period, &ipvs.min_sync_period),
            "ipvs.syncPeriod",
            "ipvs.minSyncPeriod",
        )
    } else {
        (
            (&iptables.sync_period, &iptables.min_sync_period),
            "iptables.syncPeriod",
            "iptables.minSyncPeriod",
        )
    };
    if let Some(d) = pick_duration(("syncPeriod", &f.sync_period), (sync_key, section.0))? {
        cfg.timing.sync_period = d;
    }
    if let Some(d) = pick_duration(("minSyncPeriod", &f.min_sync_period), (min_key, section.1))? {
        cfg.timing.min_sync_period = d;
    }
    if let Some(d) = opt_duration("kubeIpvsBpf.drainTimeout", &own.drain_timeout)? {
        cfg.timing.drain_timeout = d;
    }
    if let Some(d) = opt_duration("kubeIpvsBpf.nodeCheckPeriod", &own.node_check_period)? {
        cfg.timing.node_check_period = d;
    }
    if let Some(dir) = own.state_dir.as_ref().filter(|d| !d.as_os_str().is_empty()) {
        cfg.state_dir = dir.clone();
    }
    if let Some(s) = non_empty(&own.node_port_range) {
        cfg.node_port_range = port_range("kubeIpvsBpf.nodePortRange", s)?;
    }
    Ok(())
}

/// kube-proxy's `ipvs` section, but the scheduler (the model's).
fn file_ipvs(ipvs: &IpvsSection, cfg: &mut AgentConfig) -> Result<(), ConfigError> {
    cfg.ipvs.timeouts = IpvsTimeouts {
        tcp: opt_duration("ipvs.tcpTimeout", &ipvs.tcp_timeout)?,
        tcp_fin: opt_duration("ipvs.tcpFinTimeout", &ipvs.tcp_fin_timeout)?,
        udp: opt_duration("ipvs.udpTimeout", &ipvs.udp_timeout)?,
    };
    for (key, d) in [
        ("ipvs.tcpTimeout", cfg.ipvs.timeouts.tcp),
        ("ipvs.tcpFinTimeout", cfg.ipvs.timeouts.tcp_fin),
        ("ipvs.udpTimeout", cfg.ipvs.timeouts.udp),
    ] {
        if let Some(d) = d
            && (d.as_secs() > i32::MAX as u64 || d.subsec_nanos() != 0)
        {
            return Err(invalid(key, "must be a whole number of seconds"));
        }
    }
    cfg.ipvs.strict_arp = ipvs.strict_arp.unwrap_or(false);
    for (i, c) in ipvs.exclude_cidrs.iter().flatten().enumerate() {
        let net = c.trim().parse::<IpNet>().map_err(|_| {
            invalid(
                format!("ipvs.excludeCIDRs[{i}]"),
                format!("{c:?} is not a CIDR"),
            )
        })?;
        cfg.ipvs.exclude_cidrs.push(net);
    }
    Ok(())
}

/// `kubeIpvsBpf.datapath` and `kubeIpvsBpf.iptablesBackend`.
fn file_datapath(own: &OwnSection, cfg: &mut AgentConfig) -> Result<(), ConfigError> {
    if let Some(s) = non_empty(&own.iptables_backend) {
        cfg.datapath.iptables_backend = value_enum("kubeIpvsBpf.iptablesBackend", s)?;
    }
    if let Some(dp) = own.datapath.as_ref() {
        if let Some(s) = non_empty(&dp.kind) {
            cfg.datapath.kind = value_enum("kubeIpvsBpf.datapath.kind", s)?;
        }
        if let Some(root) = dp.pin_root.as_ref().filter(|r| !r.as_os_str().is_empty()) {
            cfg.datapath.pin_root = root.clone();
        }
        for (name, n) in dp.map_sizes.iter().flatten() {
            // Zero asks for nothing (the default), as every zero value of the file.
            if *n != 0 {
                set_map_size(
                    &mut cfg.datapath.map_sizes,
                    &format!("kubeIpvsBpf.datapath.mapSizes.{name}"),
                    name,
                    *n,
                )?;
            }
        }
        if let Some(m) = dp.mark_service {
            cfg.datapath.mark_service = m;
        }
        if let Some(m) = dp.mark_masquerade {
            cfg.datapath.mark_masquerade = m;
        }
        if let Some(m) = dp.mark_reply {
            cfg.datapath.mark_reply = Some(m);
        }
        if let Some(s) = non_empty(&dp.snat_port_range) {
            cfg.datapath.snat_port_range =
                Some(port_range("kubeIpvsBpf.datapath.snatPortRange", s)?);
        }
        // Zero is refused below (a sweep needs a period), not taken as "default".
        if let Some(s) = non_empty(&dp.sweep_period) {
            cfg.datapath.sweep_period = parse_go_duration(s)
                .map_err(|m| invalid("kubeIpvsBpf.datapath.sweepPeriod", format!("{s:?}: {m}")))?;
        }
        if let Some(s) = non_empty(&dp.snat_reroute) {
            cfg.datapath.snat_reroute = value_enum("kubeIpvsBpf.datapath.snatReroute", s)?;
        }
        over(&mut cfg.datapath.ipvs_free_probe, &dp.ipvs_free_probe);
    }
    Ok(())
}

/// `slot` becomes the flag's value where the flag was given.
fn over<T: Clone>(slot: &mut T, flag: &Option<T>) {
    if let Some(v) = flag {
        *slot = v.clone();
    }
}

fn apply_overrides(cfg: &mut AgentConfig, o: &Overrides) -> Result<(), ConfigError> {
    if let Some(n) = o.node_name.as_ref().filter(|n| !n.is_empty()) {
        cfg.node_name = Some(n.clone());
    }
    if !o.node_ips.is_empty() {
        cfg.node_ips = o.node_ips.clone();
    }
    if !o.cluster_cidrs.is_empty() {
        cfg.model.cluster_cidrs = o.cluster_cidrs.clone();
        check_cidr_families("--cluster-cidr", &cfg.model.cluster_cidrs)?;
    }
    if !o.node_port_addresses.is_empty() {
        cfg.model.node_port_addresses =
            node_port_addresses("--nodeport-addresses", &o.node_port_addresses)?;
    }
    over(&mut cfg.model.default_scheduler, &o.scheduler);
    over(&mut cfg.model.masquerade_all, &o.masquerade_all);
    if let Some(p) = &o.proxy_name {
        cfg.model.proxy_name = Some(p.clone()).filter(|p| !p.is_empty());
    }
    over(&mut cfg.timing.sync_period, &o.sync_period);
    over(&mut cfg.timing.min_sync_period, &o.min_sync_period);
    over(&mut cfg.timing.drain_timeout, &o.drain_timeout);
    over(&mut cfg.datapath.sweep_period, &o.sweep_period);
    over(&mut cfg.datapath.snat_reroute, &o.snat_reroute);
    over(&mut cfg.datapath.ipvs_free_probe, &o.ipvs_free_probe);
    over(&mut cfg.state_dir, &o.state_dir);
    over(&mut cfg.listeners.healthz, &o.healthz_bind_address);
    over(&mut cfg.listeners.metrics, &o.metrics_bind_address);
    if let Some(k) = &o.kubeconfig {
        cfg.kubeconfig = Some(k.clone());
    }
    over(&mut cfg.timing.node_check_period, &o.node_check_period);
    over(&mut cfg.datapath.iptables_backend, &o.iptables_backend);
    over(&mut cfg.datapath.kind, &o.datapath);
    over(&mut cfg.datapath.pin_root, &o.bpf_pin_root);
    for (name, n) in &o.bpf_map_sizes {
        set_map_size(&mut cfg.datapath.map_sizes, "--bpf-map-size", name, *n)?;
    }
    Ok(())
}

/// Checks that hold whatever their source.
fn validate(cfg: &AgentConfig) -> Result<(), ConfigError> {
    if !model::is_known_scheduler(&cfg.model.default_scheduler) {
        return Err(invalid(
            "ipvs.scheduler",
            format!(
                "unknown IPVS scheduler {:?} (known: {})",
                cfg.model.default_scheduler,
                model::KNOWN_SCHEDULERS.join(" ")
            ),
        ));
    }
    if cfg.timing.sync_period.is_zero() {
        return Err(invalid("syncPeriod", "must be greater than 0"));
    }
    if cfg.timing.min_sync_period > cfg.timing.sync_period {
        return Err(invalid(
            "minSyncPeriod",
            format!(
                "{} is longer than syncPeriod {}",
                humantime::format_duration(cfg.timing.min_sync_period),
                humantime::format_duration(cfg.timing.sync_period)
            ),
        ));
    }
    if cfg.model.only_labelled_services && cfg.model.proxy_name.is_none() {
        return Err(invalid(
            "kubeIpvsBpf.onlyLabelledServices",
            "needs kubeIpvsBpf.serviceProxyName: the label value to handle",
        ));
    }
    let dp = &cfg.datapath;
    if cfg.timing.node_check_period.is_zero() {
        return Err(invalid(
            "kubeIpvsBpf.nodeCheckPeriod (--node-check-period)",
            "must be greater than 0",
        ));
    }
    if dp.mark_service == 0 {
        return Err(invalid("kubeIpvsBpf.datapath.markService", "must not be 0"));
    }
    if dp.mark_masquerade == 0 {
        return Err(invalid(
            "kubeIpvsBpf.datapath.markMasquerade",
            "must not be 0",
        ));
    }
    if dp.mark_service & dp.mark_masquerade != 0 {
        return Err(invalid(
            "kubeIpvsBpf.datapath.markMasquerade",
            format!(
                "{:#x} shares bits with markService {:#x}",
                dp.mark_masquerade, dp.mark_service
            ),
        ));
    }
    if let Some(reply) = dp.mark_reply {
        if reply.count_ones() > 1 {
            return Err(invalid(
                "kubeIpvsBpf.datapath.markReply",
                format!("{reply:#x} is more than one bit (0: none)"),
            ));
        }
        if reply & (dp.mark_service | dp.mark_masquerade) != 0 {
            return Err(invalid(
                "kubeIpvsBpf.datapath.markReply",
                format!(
                    "{reply:#x} shares a bit with markService {:#x} or markMasquerade {:#x}",
                    dp.mark_service, dp.mark_masquerade
                ),
            ));
        }
    }
    for (key, mark) in [
        ("kubeIpvsBpf.datapath.markService", dp.mark_service),
        ("kubeIpvsBpf.datapath.markMasquerade", dp.mark_masquerade),
        ("kubeIpvsBpf.datapath.markReply", dp.reply_mark()),
    ] {
        // kube-proxy's masquerade (0x4000) and drop (0x8000) bits: a kube-proxy running beside
        // this agent (service-proxy-name) would act on our packets.
        if mark & 0xc000 != 0 {
            return Err(invalid(
                key,
                format!("{mark:#x} uses kube-proxy's mark bits 0x4000/0x8000"),
            ));
        }
    }
    let sweep = dp.sweep_period;
    if !(MIN_SWEEP_PERIOD..=MAX_SWEEP_PERIOD).contains(&sweep) {
        return Err(invalid(
            "kubeIpvsBpf.datapath.sweepPeriod (--sweep-period)",
            format!(
                "{} is outside {}..={}: {}",
                humantime::format_duration(sweep),
                humantime::format_duration(MIN_SWEEP_PERIOD),
                humantime::format_duration(MAX_SWEEP_PERIOD),
                if sweep < MIN_SWEEP_PERIOD {
                    "each sweep walks the whole SNAT table"
                } else {
                    "expired connections would hold their SNAT entries that much longer"
                }
            ),
        ));
    }
    let np = &cfg.node_port_range;
    if let Some(snat) = &dp.snat_port_range
        && np.start() <= snat.end()
        && snat.start() <= np.end()
    {
        return Err(invalid(
            "kubeIpvsBpf.datapath.snatPortRange",
            format!(
                "{}-{} overlaps the NodePort range {}-{}",
                snat.start(),
                snat.end(),
                np.start(),
                np.end()
            ),
        ));
    }
    Ok(())
}

fn check_kind(f: &FileConfig) -> Result<(), ConfigError> {
    let api = f.api_version.as_deref().unwrap_or("");
    let kind = f.kind.as_deref().unwrap_or("");
    match (api, kind) {
        (KUBE_PROXY_API_VERSION, KUBE_PROXY_KIND) | (API_VERSION, KIND) => Ok(()),
        ("", _) => Err(invalid(
            "apiVersion",
            format!("missing: expected {API_VERSION} or {KUBE_PROXY_API_VERSION}"),
        )),
        (_, "") => Err(invalid(
            "kind",
            format!("missing: expected {KIND} or {KUBE_PROXY_KIND}"),
        )),
        (KUBE_PROXY_API_VERSION, k) => Err(invalid(
            "kind",
            format!("{k:?}: apiVersion {KUBE_PROXY_API_VERSION} goes with kind {KUBE_PROXY_KIND}"),
        )),
        (API_VERSION, k) => Err(invalid(
            "kind",
            format!("{k:?}: apiVersion {API_VERSION} goes with kind {KIND}"),
        )),
        (a, _) => Err(invalid(
            "apiVersion",
            format!("{a:?}: expected {API_VERSION} or {KUBE_PROXY_API_VERSION}"),
        )),
    }
}

/// The kube-proxy settings this agent cannot honour.
fn check_unsupported(f: &FileConfig) -> Result<(), ConfigError> {
    if let Some(gate) = f.feature_gates.iter().flatten().next() {
        return Err(unsupported(
            format!("featureGates.{}", gate.0),
            "kube-proxy's feature gates do not exist here",
        ));
    }
    if f.enable_profiling == Some(true) {
        return Err(unsupported(
            "enableProfiling",
            "there is no profiling endpoint",
        ));
    }
    match non_empty(&f.mode) {
        None | Some("ipvs") => {}
        Some(m) => {
            return Err(unsupported(
                "mode",
                format!("{m:?}: this agent is an IPVS proxy (leave mode empty or set it to ipvs)"),
            ));
        }
    }
    if let Some(ipt) = &f.iptables {
        if let Some(bit) = ipt.masquerade_bit
            && bit != 14
        {
            return Err(unsupported(
                "iptables.masqueradeBit",
                "the datapath's marks are kubeIpvsBpf.datapath.markService/markMasquerade",
            ));
        }
        if ipt.localhost_node_ports == Some(true) {
            return Err(unsupported(
                "iptables.localhostNodePorts",
                "NodePorts are not served on loopback addresses (as in kube-proxy's ipvs mode)",
            ));
        }
        if ipt.snat_node_internal_ip == Some(true) {
            return Err(unsupported(
                "iptables.snatNodeInternalIP",
                "the datapath chooses the SNAT address",
            ));
        }
    }
    match non_empty(&f.detect_local_mode) {
        None | Some("ClusterCIDR") => {}
        Some(m) => {
            return Err(unsupported(
                "detectLocalMode",
                format!("{m:?}: local traffic is detected by clusterCIDR only"),
            ));
        }
    }
    if let Some(ct) = &f.conntrack {
        let reason = "this agent does not tune nf_conntrack (service traffic bypasses it); \
                      set the nf_conntrack sysctls on the node instead";
        let set = [
            (
                "conntrack.maxPerCore",
                ct.max_per_core.is_some_and(|v| v != 0),
            ),
            ("conntrack.min", ct.min.is_some_and(|v| v != 0)),
            (
                "conntrack.tcpEstablishedTimeout",
                !zero_duration(&ct.tcp_established_timeout),
            ),
            (
                "conntrack.tcpCloseWaitTimeout",
                !zero_duration(&ct.tcp_close_wait_timeout),
            ),
            ("conntrack.tcpBeLiberal", ct.tcp_be_liberal == Some(true)),
            ("conntrack.udpTimeout", !zero_duration(&ct.udp_timeout)),
            (
                "conntrack.udpStreamTimeout",
                !zero_duration(&ct.udp_stream_timeout),
            ),
        ];
        if let Some((key, _)) = set.iter().find(|(_, set)| *set) {
            return Err(unsupported(*key, reason));
        }
    }
    // Ignored fields still have to be well-formed durations where kube-proxy wants one.
    opt_duration("configSyncPeriod", &f.config_sync_period)?;
    if let Some(n) = &f.nftables {
        opt_duration("nftables.syncPeriod", &n.sync_period)?;
        opt_duration("nftables.minSyncPeriod", &n.min_sync_period)?;
    }
    Ok(())
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn zero_duration(s: &Option<String>) -> bool {
    match non_empty(s) {
        None => true,
        Some(s) => parse_go_duration(s).is_ok_and(|d| d.is_zero()),
    }
}

/// A duration setting: `None` when absent or zero (zero means "default", as in kube-proxy).
fn opt_duration(key: &str, s: &Option<String>) -> Result<Option<Duration>, ConfigError> {
    match non_empty(s) {
        None => Ok(None),
        Some(s) => {
            let d = parse_go_duration(s).map_err(|m| invalid(key, format!("{s:?}: {m}")))?;
            Ok(Some(d).filter(|d| !d.is_zero()))
        }
    }
}

/// A top-level duration and its kube-proxy per-mode twin: either may be set; both set must agree.
fn pick_duration(
    top: (&str, &Option<String>),
    section: (&str, &Option<String>),
) -> Result<Option<Duration>, ConfigError> {
    let a = opt_duration(top.0, top.1)?;
    let b = opt_duration(section.0, section.1)?;
    match (a, b) {
        (Some(a), Some(b)) if a != b => Err(invalid(
            top.0,
            format!(
                "{} conflicts with {} {}: set one of them",
                humantime::format_duration(a),
                section.0,
                humantime::format_duration(b)
            ),
        )),
        (a, b) => Ok(a.or(b)),
    }
}

/// Parses a Go `time.Duration` string (`300ms`, `1m30s`, `1.5h`, `0`), as metav1.Duration
/// fields hold. Negative durations are refused.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let body = s.strip_prefix('+').unwrap_or(s);
    if body.starts_with('-') {
        return Err("must not be negative".into());
    }
    if body == "0" {
        return Ok(Duration::ZERO);
    }
    if body.is_empty() {
        return Err("empty duration".into());
    }
    // Nanoseconds, exact (no floating point): integer part × unit + fraction × unit / 10^digits.
    let mut total: u128 = 0;
    let mut rest = body;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_len);
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
            return Err(format!("invalid duration (expected a number at {rest:?})"));
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => {
                return Err(format!(
                    "missing unit in duration {s:?} (ns, us, ms, s, m, h)"
                ));
            }
            u => return Err(format!("unknown unit {u:?} in duration {s:?}")),
        };
        let too_long = || format!("duration {s:?} is too long");
        let int_value: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| too_long())?
        };
        let mut frac_value: u128 = 0;
        let mut frac_scale: u128 = 1;
        for c in frac.chars().take(18) {
            frac_value = frac_value * 10 + u128::from(c.to_digit(10).unwrap_or(0));
            frac_scale *= 10;
        }
        total = int_value
            .checked_mul(scale)
            .and_then(|v| v.checked_add(frac_value * scale / frac_scale))
            .and_then(|v| total.checked_add(v))
            .ok_or_else(too_long)?;
        rest = next;
    }
    // Go's limit: about 292 years (i64 nanoseconds).
    if total > i64::MAX as u128 {
        return Err(format!("duration {s:?} is too long"));
    }
    let secs = (total / 1_000_000_000) as u64;
    let nanos = (total % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

fn bind_address(key: &str, s: &str, default_port: u16) -> Result<SocketAddr, ConfigError> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = s.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    Err(invalid(key, format!("{s:?} is not IP:port")))
}

fn check_cidr_families(key: &str, cidrs: &[IpNet]) -> Result<(), ConfigError> {
    let v4 = cidrs.iter().filter(|c| matches!(c, IpNet::V4(_))).count();
    let v6 = cidrs.len() - v4;
    if v4 > 1 || v6 > 1 {
        return Err(invalid(key, "at most one CIDR per IP family"));
    }
    Ok(())
}

fn cluster_cidrs(key: &str, s: &str) -> Result<Vec<IpNet>, ConfigError> {
    let cidrs = s
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse::<IpNet>()
                .map_err(|_| invalid(key, format!("{c:?} is not a CIDR")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_cidr_families(key, &cidrs)?;
    Ok(cidrs)
}

/// `nodePortAddresses`: `primary` alone, `all` (every local address), or CIDRs.
pub fn node_port_addresses(key: &str, list: &[String]) -> Result<NodePortAddresses, ConfigError> {
    let items: Vec<&str> = list
        .iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if items.is_empty() {
        return Ok(NodePortAddresses::AllLocal);
    }
    if items.contains(&"localhost") {
        return Err(unsupported(
            key,
            "\"localhost\": NodePorts are not served on loopback addresses",
        ));
    }
    if items.contains(&"primary") {
        if items.len() > 1 {
            return Err(unsupported(
                key,
                "\"primary\" cannot be combined with other entries",
            ));
        }
        return Ok(NodePortAddresses::Primary);
    }
    if items.contains(&"all") {
        return Ok(NodePortAddresses::AllLocal);
    }
    let cidrs = items
        .iter()
        .map(|c| {
            c.parse::<IpNet>()
                .map_err(|_| invalid(key, format!("{c:?} is not a CIDR, primary or all")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NodePortAddresses::Cidrs(cidrs))
}

/// A value of a clap `ValueEnum` (`kind: bpf`), spelled as its flag takes it.
fn value_enum<T: clap::ValueEnum>(key: &str, s: &str) -> Result<T, ConfigError> {
    T::from_str(s, false).map_err(|_| {
        let known: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_owned()))
            .collect();
        invalid(key, format!("{s:?}: expected one of {}", known.join(", ")))
    })
}

/// Sets the size of map `name` (one of [`MAP_NAMES`]); `key` names the setting in an error.
fn set_map_size(
    sizes: &mut probes::MapSizes,
    key: &str,
    name: &str,
    entries: u32,
) -> Result<(), ConfigError> {
    let slot = match name {
        "svc_ports" => &mut sizes.svc_ports,
        "svc_addrs" => &mut sizes.svc_addrs,
        "src_ranges" => &mut sizes.src_ranges,
        "cluster_cidrs" => &mut sizes.cluster_cidrs,
        "devices" => &mut sizes.devices,
        "snat" => &mut sizes.snat,
        "conns" => &mut sizes.conns,
        "frags" => &mut sizes.frags,
        other => {
            return Err(invalid(
                key,
                format!("unknown map {other:?} (known: {})", MAP_NAMES.join(", ")),
            ));
        }
    };
    if entries == 0 {
        return Err(invalid(key, "a map needs at least one entry"));
    }
    *slot = entries;
    Ok(())
}

/// The maps whose size is configurable (`kubeIpvsBpf.datapath.mapSizes`, `--bpf-map-size`).
pub const MAP_NAMES: &[&str] = &[
    "svc_ports",
    "svc_addrs",
    "src_ranges",
    "cluster_cidrs",
    "devices",
    "snat",
    "conns",
    "frags",
];

/// `first-last` → an inclusive port range.
fn port_range(key: &str, s: &str) -> Result<RangeInclusive<u16>, ConfigError> {
    let bad = || invalid(key, format!("{s:?}: expected FIRST-LAST, e.g. 30000-32767"));
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if a == 0 || a > b {
        return Err(bad());
    }
    Ok(a..=b)
}

pub mod reference;
#[cfg(test)]
mod tests;
