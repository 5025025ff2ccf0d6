//! `cleanup` (this agent's own state, or kube-proxy's with `--kube-proxy`) and kube-proxy's
//! `--cleanup`.

use anyhow::{Context, bail};

use super::{CleanupArgs, Output};
use crate::config;

/// `cleanup` and `cleanup --kube-proxy`; fails unless everything was removed.
pub async fn cleanup(args: CleanupArgs) -> anyhow::Result<()> {
    let file = args.config.as_deref().map(config::load).transpose()?;
    let cfg = config::resolve(file.as_ref(), &config::Overrides::default())?;
    let opts = crate::cleanup::CleanupOptions {
        dry_run: args.dry_run,
        keep_ipvs: args.keep_ipvs,
        node_port_range: cfg.node_port_range.clone(),
        ipvs_exclude_cidrs: cfg.ipvs.exclude_cidrs.clone(),
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
        ipvs_exclude_cidrs: cfg.ipvs.exclude_cidrs.clone(),
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
