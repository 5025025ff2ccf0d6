//! `run` (and kube-proxy's command line, through [`run_kubernetes`]): the start-up checks, the
//! listeners, the source, and the sync loop until a signal.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::bail;

use super::source::{Source, hostname_or};
use super::{DatapathKind, IptablesBackend, RunArgs};
use crate::admin::{health, metrics};
use crate::config;
use crate::model::NodePortAddresses;
use crate::source::kubernetes::{self, KubernetesSourceConfig};
use crate::source::watch::watch_path;
use crate::sync::{self, SyncConfig, Syncer};

/// Stops start-up when this process lacks a capability the selected backends need.
fn check_capabilities(dp: &config::DatapathSettings) -> anyhow::Result<()> {
    crate::capabilities::check(&crate::capabilities::required(
        dp.kind == DatapathKind::Bpf,
        dp.iptables_backend == IptablesBackend::Legacy
            || (dp.iptables_backend == IptablesBackend::Default
                && crate::capabilities::default_iptables_is_legacy()),
    ))?;
    Ok(())
}

/// kube-proxy's command line without `--cleanup` or `--init-only`: the agent on the
/// Kubernetes source with `cfg` (already resolved from kube-proxy's flags and `--config`);
/// `master` is kube-proxy's `--master`, the API server's URL over the kubeconfig's.
pub async fn run_kubernetes(
    cfg: config::AgentConfig,
    master: Option<String>,
) -> anyhow::Result<()> {
    check_capabilities(&cfg.datapath)?;
    run_resolved(Source::Kubernetes, "kubernetes", cfg, master).await
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let source = args.source.parsed()?;
    let cfg = args.source.agent_config(config::Overrides {
        min_sync_period: args.min_sync_period,
        sync_period: args.sync_period,
        drain_timeout: args.drain_timeout,
        sweep_period: args.sweep_period,
        snat_reroute: args.snat_reroute,
        ipvs_free_probe: args.ipvs_free_probe,
        state_dir: args.state_dir.clone(),
        healthz_bind_address: args.healthz_bind_address,
        metrics_bind_address: args.metrics_bind_address,
        node_check_period: args.node_check_period,
        iptables_backend: args.iptables_backend,
        datapath: args.datapath,
        bpf_pin_root: args.bpf_pin_root.clone(),
        bpf_map_sizes: args.bpf_map_sizes.clone(),
        ..Default::default()
    })?;
    check_capabilities(&cfg.datapath)?;
    run_resolved(source, &args.source.source, cfg, None).await
}

/// `source_name`: where the objects come from, as `--source` spells it (for the log).
async fn run_resolved(
    source: Source,
    source_name: &str,
    cfg: config::AgentConfig,
    master: Option<String>,
) -> anyhow::Result<()> {
    if let Some(adj) = cfg.oom_score_adj
        && let Err(e) = std::fs::write("/proc/self/oom_score_adj", adj.to_string())
    {
        tracing::warn!("setting oom_score_adj {adj}: {e}");
    }
    let node_name = hostname_or(cfg.node_name.clone());
    let sync_cfg = sync_config(&cfg, &node_name);
    tracing::info!(source = %source_name, node = %node_name, "starting");
    // Before anything is loaded, attached or created: the kernel can run the datapath, and no
    // other agent uses it. The lock is held until the process ends.
    let _lock = match &sync_cfg.datapath {
        Some(dp) => Some(datapath_preflight(dp)?),
        None => None,
    };

    // A running kube-proxy holds its healthz and metrics ports: change nothing on the node
    // until it is gone (docs/switching.md). A canary beside kube-proxy's iptables or nftables
    // mode (only labelled Services) shares the node with it by design, on ports of its own.
    if !cfg.model.only_labelled_services {
        let kube_proxy_ports = [cfg.listeners.healthz, cfg.listeners.metrics];
        if !crate::takeover::wait_for_kube_proxy(&kube_proxy_ports, shutdown_signal()).await {
            return Ok(());
        }
    }

    // Health and metrics first: a probe answers while the first sync is still coming.
    let mut observers = start_listeners(&cfg).await?;

    let snapshots = match source {
        Source::File(path) => watch_path(path, Duration::from_secs(1)),
        Source::Kubernetes => {
            let kcfg = KubernetesSourceConfig {
                kubeconfig: cfg.kubeconfig.clone(),
                node_name: node_name.clone(),
                master,
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
        watch_local_ports(&dp, cfg.timing.sync_period);
    }
    sync::run(syncer, snapshots, observers, shutdown_signal()).await
}

/// The sync loop's configuration: the parts of `cfg` it takes whole, and the datapath's
/// (without one when `cfg` asks for IPVS alone).
fn sync_config(cfg: &config::AgentConfig, node_name: &str) -> SyncConfig {
    let dp = &cfg.datapath;
    SyncConfig {
        model: cfg.model.clone(),
        node_name: node_name.to_owned(),
        node_ips: cfg.node_ips.clone(),
        timing: cfg.timing,
        node_port_range: cfg.node_port_range.clone(),
        state_dir: cfg.state_dir.clone(),
        ipvs: cfg.ipvs.clone(),
        datapath: (dp.kind == DatapathKind::Bpf).then(|| crate::datapath::DatapathConfig {
            pin_root: dp.pin_root.clone(),
            mark_svc: dp.mark_service,
            mark_masq: dp.mark_masquerade,
            mark_reply: dp.reply_mark(),
            snat_ports: dp.snat_port_range.as_ref().map(|r| (*r.start(), *r.end())),
            node_ports: (*cfg.node_port_range.start(), *cfg.node_port_range.end()),
            masquerade_all: cfg.model.masquerade_all,
            cluster_cidrs: cfg.model.cluster_cidrs.clone(),
            rules_backend: dp.iptables_backend.rules_backend(),
            strict_arp: cfg.ipvs.strict_arp,
            timeouts: cfg.ipvs.timeouts.sweep(),
            map_sizes: dp.map_sizes,
            sysctl_root: crate::datapath::sysctl::default_root(),
            snat_reroute: dp.snat_reroute,
            ipvs_free_probe: dp.ipvs_free_probe,
        }),
        sweep_period: dp.sweep_period,
        ..SyncConfig::default()
    }
}

/// Starts the health and metrics servers (a failure to bind stops start-up only with
/// `bindAddressHardFail`) and returns the observers of the sync loop, without its event
/// recorder (the Kubernetes source's).
async fn start_listeners(cfg: &config::AgentConfig) -> anyhow::Result<sync::Observers> {
    let families: Vec<metrics::IpFamily> = {
        let mut f: Vec<metrics::IpFamily> = cfg
            .model
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
            health::serve(cfg.listeners.healthz, health.clone())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        ),
        (
            "metrics",
            metrics::serve(cfg.listeners.metrics, metrics.clone())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        ),
    ] {
        if let Err(e) = r {
            if cfg.listeners.hard_fail {
                bail!("{what} server: {e}");
            }
            tracing::warn!("{what} server not started: {e}");
        }
    }
    let hc_bind = match &cfg.model.node_port_addresses {
        NodePortAddresses::AllLocal => Vec::new(),
        _ => cfg.node_ips.clone(),
    };
    Ok(sync::Observers {
        health: health.clone(),
        metrics: metrics.clone(),
        health_checks: health::HealthCheckServers::new(health, hc_bind),
        changes: metrics::ChangeTracker::new(std::time::SystemTime::now()),
        events: None,
    })
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
