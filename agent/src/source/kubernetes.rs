//! The Kubernetes source: kube-rs watchers on Services, EndpointSlices (discovery.k8s.io/v1)
//! and this node's Node, published as [`Snapshot`]s on a `tokio::sync::watch` channel like the
//! file source's.
//!
//! - Nothing is published before the first list of all three resources has completed: an
//!   empty Service list at startup would make the agent delete everything.
//! - A relist (after a `410 Gone`, or any watch restart kube-rs cannot resume) is buffered and
//!   swapped in whole ([`reflect`]), so no snapshot ever misses objects because of it.
//! - An API server that is down leaves the last snapshot in place; the watchers retry with
//!   exponential backoff, logging each failure, and catch up when it returns.
//! - Changes are coalesced: a burst of events publishes one snapshot, at most every
//!   [`WatchOptions::min_publish_interval`]; changes only the server makes (resourceVersion,
//!   Node heartbeats) publish nothing.
//! - Services and EndpointSlices labelled `service.kubernetes.io/headless` are filtered out
//!   server-side, as kube-proxy does; `service.kubernetes.io/service-proxy-name` is left to
//!   the model, which keeps the Services labelled with our own proxy name.
//!
//! [`ServiceEvents`] posts Kubernetes Events on Services that cannot be programmed.

mod events;
mod reflect;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::Snapshot;
use crate::model::{EndpointSliceInfo, ServiceInfo};
pub use events::{
    REJECTION_REASON, REPORTING_CONTROLLER, RejectionWarning, ServiceEvents, rejection_warnings,
    service_uid,
};
use reflect::{Reflected, Stores, Watched};

/// The label selector of Services and EndpointSlices (kube-proxy's, less the proxy name).
pub const LABEL_SELECTOR: &str = "!service.kubernetes.io/headless";

/// Page size of lists.
const PAGE_SIZE: u32 = 500;

/// How to reach the API server, and who this node is.
#[derive(Debug, Clone, Default)]
pub struct KubernetesSourceConfig {
    /// `--kubeconfig`; `None`: `KUBECONFIG`, `~/.kube/config`, else the in-cluster config.
    pub kubeconfig: Option<PathBuf>,
    /// This node's name: its Node object is watched.
    pub node_name: String,
    /// kube-proxy's `--master`: the API server's URL, over the kubeconfig's (without a
    /// kubeconfig: that URL alone, with no credentials, as kube-proxy's client does).
    pub master: Option<String>,
}

/// Tuning of [`watch_with`].
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// First retry delay after an API error; doubled on each consecutive one...
    pub backoff_min: Duration,
    /// ...up to this.
    pub backoff_max: Duration,
    /// `timeoutSeconds` of watch requests (`None`: kube-rs's 290 s).
    pub watch_timeout: Option<u32>,
    /// How long after a change the snapshot is built, to gather a burst.
    pub debounce: Duration,
    /// Shortest interval between two published snapshots.
    pub min_publish_interval: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            watch_timeout: None,
            debounce: Duration::from_millis(5),
            min_publish_interval: Duration::from_millis(50),
        }
    }
}

/// A client from `--kubeconfig`, else from the environment (`KUBECONFIG`, `~/.kube/config`,
/// in-cluster service account).
pub async fn client(cfg: &KubernetesSourceConfig) -> anyhow::Result<Client> {
    let master = cfg
        .master
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty());
    let mut config = match (&cfg.kubeconfig, master) {
        (None, Some(url)) => kube::Config::new(
            url.parse()
                .with_context(|| format!("--master {url:?} is not a URL"))?,
        ),
        (Some(path), _) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        (None, None) => kube::Config::infer()
            .await
            .context("no kubeconfig and no in-cluster config")?,
    };
    if let Some(url) = master {
        config.cluster_url = url
            .parse()
            .with_context(|| format!("--master {url:?} is not a URL"))?;
    }
    let url = config.cluster_url.clone();
    Client::try_from(config).with_context(|| format!("building a client for {url}"))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the watcher tasks and the publisher share.
struct Shared {
    stores: Mutex<Stores>,
    /// Bumped on every change the model sees.
    changes: watch::Sender<u64>,
}

/// Exponential backoff without jitter (one client per node: no herd to spread).
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// The full chain of an error, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let c_s = c.to_string();
        if !s.contains(&c_s) {
            s.push_str(": ");
            s.push_str(&c_s);
        }
        src = c.source();
    }
    s
}

/// Runs one resource's watcher forever, feeding its store.
async fn run_watcher<K>(
    api: Api<K>,
    config: watcher::Config,
    opts: WatchOptions,
    shared: Arc<Shared>,
    store: fn(&mut Stores) -> &mut Reflected<K>,
) where
    K: Resource<DynamicType = ()> + Watched + DeserializeOwned + std::fmt::Debug + Send,
    K: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
    K: 'static,
{
    let resource = K::plural(&());
    let mut backoff = Backoff::new(opts.backoff_min, opts.backoff_max);
    let mut failing_since: Option<Instant> = None;
    let mut stream = std::pin::pin!(watcher(api, config));
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                let progress =
                    !matches!(event, watcher::Event::Init | watcher::Event::InitApply(_));
                if progress {
                    backoff.reset();
                    if let Some(since) = failing_since.take() {
                        tracing::info!(%resource, after = ?since.elapsed(), "watch recovered");
                    }
                }
                if matches!(event, watcher::Event::InitDone) {
                    tracing::debug!(%resource, "list complete");
                }
                let changed = store(&mut lock(&shared.stores)).apply(event);
                if changed {
                    shared.changes.send_modify(|n| *n += 1);
                }
            }
            Err(e) => {
                failing_since.get_or_insert_with(Instant::now);
                let delay = match &e {
                    watcher::Error::WatchError(status) if status.code == 410 => {
                        // The server answers again: relist soon, whatever the outage was.
                        backoff.reset();
                        let delay = backoff.next_delay();
                        tracing::info!(%resource, error = %chain(&e), relist_in = ?delay, "resourceVersion expired: relisting");
                        delay
                    }
                    _ => {
                        let delay = backoff.next_delay();
                        tracing::warn!(%resource, error = %chain(&e), retry_in = ?delay, "watching the API server failed");
                        delay
                    }
                };
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Builds and publishes snapshots after changes until every receiver is gone, then stops the
/// watchers (dropping `watchers` aborts them).
async fn publish(
    shared: Arc<Shared>,
    tx: watch::Sender<Arc<Snapshot>>,
    mut changes: watch::Receiver<u64>,
    node_name: String,
    opts: WatchOptions,
    _watchers: JoinSet<()>,
) {
    let mut generation = tx.borrow().generation;
    let mut last = Instant::now();
    loop {
        tokio::select! {
            _ = tx.closed() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
        let at = (Instant::now() + opts.debounce).max(last + opts.min_publish_interval);
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep_until(at) => {}
        }
        changes.borrow_and_update();
        generation += 1;
        let snapshot = lock(&shared.stores).snapshot(&node_name, generation);
        last = Instant::now();
        tracing::debug!(
            generation,
            services = snapshot.services.len(),
            endpoint_slices = snapshot.endpoint_slices.len(),
            "source changed"
        );
        if tx.send(Arc::new(snapshot)).is_err() {
            return;
        }
    }
}

/// [`watch_with`] with the default options.
pub async fn watch(
    client: Client,
    node_name: String,
) -> anyhow::Result<watch::Receiver<Arc<Snapshot>>> {
    watch_with(client, node_name, WatchOptions::default()).await
}

/// Starts the watchers and returns once the first lists of Services, EndpointSlices and the
/// Node have all completed (retrying for as long as it takes: bound it with a timeout if
/// needed), with that state as the channel's current value (generation 1). A task then
/// publishes a new snapshot after every change, until every receiver is dropped.
pub async fn watch_with(
    client: Client,
    node_name: String,
    opts: WatchOptions,
) -> anyhow::Result<watch::Receiver<Arc<Snapshot>>> {
    let shared = Arc::new(Shared {
        stores: Mutex::new(Stores::default()),
        changes: watch::channel(0).0,
    });
    let mut changes = shared.changes.subscribe();
    let base = |c: watcher::Config| {
        let c = c.page_size(PAGE_SIZE);
        match opts.watch_timeout {
            Some(t) => c.timeout(t),
            None => c,
        }
    };
    let mut watchers = JoinSet::new();
    watchers.spawn(run_watcher(
        Api::<Service>::all(client.clone()),
        base(watcher::Config::default().labels(LABEL_SELECTOR)),
        opts.clone(),
        shared.clone(),
        |s| &mut s.services,
    ));
    watchers.spawn(run_watcher(
        Api::<EndpointSlice>::all(client.clone()),
        base(watcher::Config::default().labels(LABEL_SELECTOR)),
        opts.clone(),
        shared.clone(),
        |s| &mut s.endpoint_slices,
    ));
    watchers.spawn(run_watcher(
        Api::<Node>::all(client),
        base(watcher::Config::default().fields(&format!("metadata.name={node_name}"))),
        opts.clone(),
        shared.clone(),
        |s| &mut s.node,
    ));
    loop {
        if lock(&shared.stores).all_listed() {
            break;
        }
        changes
            .changed()
            .await
            .context("the Kubernetes watchers stopped")?;
    }
    changes.borrow_and_update();
    let first = lock(&shared.stores).snapshot(&node_name, 1);
    tracing::info!(
        services = first.services.len(),
        endpoint_slices = first.endpoint_slices.len(),
        node = first.node.is_some(),
        "Kubernetes source synced"
    );
    if first.node.is_none() {
        tracing::warn!(node = %node_name, "no Node object with this name");
    }
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(publish(shared, tx, changes, node_name, opts, watchers));
    Ok(rx)
}

/// Every object of `api` matching `lp`, page by page.
async fn list_all<K>(api: &Api<K>, lp: ListParams) -> Result<Vec<K>, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let mut lp = lp.limit(PAGE_SIZE);
    let mut out = Vec::new();
    loop {
        let page = api.list(&lp).await?;
        out.extend(page.items);
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => lp = lp.continue_token(&token),
            None => return Ok(out),
        }
    }
}

/// One consistent read of everything [`watch`] would publish (`plan --source kubernetes`).
pub async fn list_once(client: Client, node_name: &str) -> anyhow::Result<Snapshot> {
    let lp = ListParams::default().labels(LABEL_SELECTOR);
    let services = list_all(&Api::<Service>::all(client.clone()), lp.clone())
        .await
        .context("listing Services")?;
    let endpoint_slices = list_all(&Api::<EndpointSlice>::all(client.clone()), lp)
        .await
        .context("listing EndpointSlices")?;
    let node = if node_name.is_empty() {
        None
    } else {
        Api::<Node>::all(client)
            .get_opt(node_name)
            .await
            .with_context(|| format!("getting Node {node_name:?}"))?
    };
    Ok(Snapshot {
        services: services
            .into_iter()
            .map(|s| Arc::new(ServiceInfo::from(s)))
            .collect(),
        endpoint_slices: endpoint_slices
            .into_iter()
            .map(|s| Arc::new(EndpointSliceInfo::from(s)))
            .collect(),
        node,
        generation: 1,
    })
}
