//! `--source` and the flags `run` and `plan` share ([`SourceArgs`]): where the objects come
//! from, and the resolved configuration from these flags and `--config`.

use std::path::PathBuf;

use anyhow::{Context, bail};

use super::SourceArgs;
use crate::config;
use crate::source::Snapshot;
use crate::source::kubernetes::{self, KubernetesSourceConfig};
use crate::source::watch::load_snapshot;

/// A parsed `--source`.
pub(super) enum Source {
    File(PathBuf),
    Kubernetes,
}

impl SourceArgs {
    pub(super) fn parsed(&self) -> anyhow::Result<Source> {
        match self.source.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(Source::File(PathBuf::from(path))),
            None if self.source == "kubernetes" => Ok(Source::Kubernetes),
            _ => bail!(
                "--source {:?}: expected kubernetes or file:PATH",
                self.source
            ),
        }
    }

    pub(super) fn kubernetes(&self) -> KubernetesSourceConfig {
        KubernetesSourceConfig {
            kubeconfig: self.kubeconfig.clone(),
            node_name: self.node_name(),
            master: None,
        }
    }

    /// Loads the objects once (for `plan`).
    pub(super) async fn snapshot(&self) -> anyhow::Result<Snapshot> {
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
    pub(super) fn agent_config(
        &self,
        extra: config::Overrides,
    ) -> anyhow::Result<config::AgentConfig> {
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
        cfg.model.validate().context("scheduler")?;
        Ok(cfg)
    }

    pub(super) fn node_name(&self) -> String {
        hostname_or(self.node_name.clone())
    }
}

/// `name`, else the host's name.
pub(super) fn hostname_or(name: Option<String>) -> String {
    name.unwrap_or_else(|| {
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default()
    })
}
