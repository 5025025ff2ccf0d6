//! A fake Kubernetes API server: the one test double of the project, for the Kubernetes
//! source (the real kube-apiserver cannot run here). It speaks enough of the API, over plain
//! HTTP/1.1 without authentication, for kube-rs list/watch as a real server answers them:
//!
//! - `GET /api/v1/{plural}`, `/apis/{group}/{version}/{plural}`, their
//!   `/namespaces/{ns}/...` forms and `.../{name}`, for Services, EndpointSlices, Nodes
//!   (and Endpoints, Pods, Namespaces, ConfigMaps, Events, or any type [`FakeApiServer::apply`]
//!   is given); `labelSelector` (`k`, `!k`, `k=v`, `k!=v`, `k in (..)`, `k notin (..)`) and
//!   `fieldSelector` (`metadata.name`, `metadata.namespace`);
//! - lists with `resourceVersion` (unset: most recent; `0`: any; `N`: not older than N, or
//!   exactly N with `resourceVersionMatch=Exact`), `limit` and `continue` (a consistent
//!   snapshot across pages); `410 Gone` for a compacted revision;
//! - `?watch=true`: newline-delimited WatchEvents (ADDED/MODIFIED/DELETED/BOOKMARK/ERROR)
//!   after `resourceVersion` (unset or `0`: the current state as ADDED first),
//!   `allowWatchBookmarks`, `sendInitialEvents`, `timeoutSeconds`; an object leaving the
//!   selector is DELETED, entering it ADDED; a watch from a compacted revision gets an ERROR
//!   event carrying a `Status` 410 "Expired" and ends, as the real server does;
//! - POST (create), PATCH (merge patch), PUT and DELETE of objects: Events posted by a
//!   recorder (`events.k8s.io/v1` and core `v1`) are stored and can be read back;
//! - `/version`;
//! - optionally, RBAC: only the rules of one ClusterRole are allowed, anything else is `403
//!   Forbidden` ([`authz`]).
//!
//! Like etcd, one global revision counter is bumped by every change. Tests drive the server
//! with [`FakeApiServer`]: [`apply`](FakeApiServer::apply) / [`delete`](FakeApiServer::delete),
//! [`compact`](FakeApiServer::compact) (forget history, so resuming watchers get 410),
//! [`send_bookmarks`](FakeApiServer::send_bookmarks), [`disconnect`](FakeApiServer::disconnect)
//! (drop every connection), [`stop`](FakeApiServer::stop) / [`start`](FakeApiServer::start)
//! (gone and back on the same port), [`requests`](FakeApiServer::requests),
//! [`fail_requests`](FakeApiServer::fail_requests) (injected errors) and
//! [`write_kubeconfig`](FakeApiServer::write_kubeconfig).
//!
//! The `fake-apiserver` binary (`tests/bin/fake_apiserver.rs`) serves the same on an
//! address, loads manifests from a directory, and is driven over HTTP on the same port:
//!
//! | request | effect |
//! | --- | --- |
//! | `POST /control/apply` (body: YAML or JSON, multi-document) | create or replace objects |
//! | `POST /control/delete?kind=K&name=N[&namespace=NS][&apiVersion=V]` | delete one object |
//! | `POST /control/compact` | forget history: resuming watchers get 410 |
//! | `POST /control/bookmarks` | send a BOOKMARK on every watch that allows them |
//! | `POST /control/disconnect` | drop every connection (watches end abruptly) |
//! | `POST /control/down?seconds=S` | stop listening and drop connections, for S seconds |
//! | `GET /control/requests` | the API requests received, as JSON |
//! | `GET /control/events` | the Events posted, as JSON |
//! | `GET /control/resource-version` | the current revision |
//! | `POST /control/authorize` (body: a ClusterRole, YAML or JSON; empty: allow everything) | allow only its rules |
//! | `GET /control/denied` | the requests refused with 403, as JSON |

pub mod authz;
mod control;
mod http;
pub mod store;

use std::any::TypeId;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::{NamespaceResourceScope, Resource};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

pub use store::{ApiError, ResourceType, Selector, Store};

/// Locks a mutex, ignoring poisoning (a panicking test must not hide the server's state).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One API request the server received (control requests excluded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
}

impl RecordedRequest {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }

    pub fn is_watch(&self) -> bool {
        self.method == "GET" && matches!(self.param("watch"), Some("true" | "1"))
    }

    /// A list (not a watch, not a get) of the resource at `path`.
    pub fn is_list_of(&self, path: &str) -> bool {
        self.method == "GET" && self.path == path && !self.is_watch()
    }

    pub fn is_watch_of(&self, path: &str) -> bool {
        self.path == path && self.is_watch()
    }
}

/// The state every connection handler shares.
pub(crate) struct Shared {
    store: Mutex<Store>,
    /// The current revision, for watches to wait on.
    rv_tx: watch::Sender<u64>,
    /// Bumped to make every watch send a BOOKMARK.
    bookmark_tx: watch::Sender<u64>,
    /// Bumped to drop every connection.
    kill_tx: watch::Sender<u64>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Injected failures: API requests whose path starts with the prefix get the status code.
    faults: Mutex<Vec<(String, u16)>>,
    /// RBAC: when set, only its rules are allowed.
    authz: Mutex<Option<authz::Authorizer>>,
    /// The requests refused by `authz` ("METHOD PATH").
    denied: Mutex<Vec<String>>,
    addr: SocketAddr,
    serving: Mutex<Option<JoinHandle<()>>>,
    /// Asks the supervisor task to stop the server for a while (`/control/down`).
    down_tx: mpsc::UnboundedSender<Duration>,
}

/// The resource type of a k8s-openapi type.
pub fn resource_type_of<K>() -> ResourceType
where
    K: Resource,
    K::Scope: 'static,
{
    ResourceType::new(
        K::API_VERSION,
        K::URL_PATH_SEGMENT,
        K::KIND,
        TypeId::of::<K::Scope>() == TypeId::of::<NamespaceResourceScope>(),
    )
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl Shared {
    /// Wakes the watches after a change.
    fn notify(&self) {
        let rv = lock(&self.store).resource_version();
        self.rv_tx.send_replace(rv);
    }

    async fn stop(&self) {
        let task = lock(&self.serving).take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    async fn start(self: &Arc<Self>) -> anyhow::Result<()> {
        if lock(&self.serving).is_some() {
            return Ok(());
        }
        let listener = bind(self.addr).with_context(|| format!("listening on {}", self.addr))?;
        let task = tokio::spawn(serve(listener, self.clone()));
        *lock(&self.serving) = Some(task);
        Ok(())
    }

    fn put_value(&self, value: Value) -> anyhow::Result<u64> {
        let api_version = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .context("object without apiVersion")?
            .to_string();
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .context("object without kind")?
            .to_string();
        if kind == "List" || kind.ends_with("List") {
            let mut rv = 0;
            for item in value
                .get("items")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                rv = self.put_value(item.clone())?;
            }
            return Ok(rv);
        }
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let what = format!("{kind} {name:?}");
        // Catch broken test manifests here rather than in the client under test.
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => serde_json::from_value::<Service>(value.clone())
                .map(drop)
                .with_context(|| format!("invalid {what}"))?,
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                serde_json::from_value::<EndpointSlice>(value.clone())
                    .map(drop)
                    .with_context(|| format!("invalid {what}"))?
            }
            ("v1", "Node") => serde_json::from_value::<Node>(value.clone())
                .map(drop)
                .with_context(|| format!("invalid {what}"))?,
            _ => {}
        }
        let rv = {
            let mut store = lock(&self.store);
            let t = store
                .type_of_kind(&api_version, &kind)
                .cloned()
                .with_context(|| format!("unknown kind {api_version} {kind}"))?;
            store
                .put(&t, value)
                .map_err(|e| anyhow::anyhow!("{what}: {}", e.message))?;
            store.resource_version()
        };
        self.notify();
        Ok(rv)
    }

    fn apply_yaml(&self, text: &str) -> anyhow::Result<u64> {
        let mut rv = lock(&self.store).resource_version();
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let value = Value::deserialize(doc).with_context(|| format!("document {i}"))?;
            if value.is_null() {
                continue;
            }
            rv = self
                .put_value(value)
                .with_context(|| format!("document {i}"))?;
        }
        Ok(rv)
    }

    fn delete_kind(
        &self,
        api_version: Option<&str>,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> anyhow::Result<bool> {
        let deleted = {
            let mut store = lock(&self.store);
            let types: Vec<ResourceType> = ResourceType::builtin()
                .into_iter()
                .filter(|t| t.kind == kind && api_version.is_none_or(|v| v == t.api_version))
                .collect();
            let t = match types.as_slice() {
                [t] => t.clone(),
                [] => match api_version.and_then(|v| store.type_of_kind(v, kind)) {
                    Some(t) => t.clone(),
                    None => bail!("unknown kind {kind}"),
                },
                _ => bail!("kind {kind} is ambiguous: give apiVersion"),
            };
            let key = store::ObjectKey {
                api_version: t.api_version.clone(),
                plural: t.plural.clone(),
                namespace: if t.namespaced {
                    namespace.unwrap_or("default").to_string()
                } else {
                    String::new()
                },
                name: name.to_string(),
            };
            store.delete(&key).is_some()
        };
        if deleted {
            self.notify();
        }
        Ok(deleted)
    }

    fn event_values(&self) -> Vec<Value> {
        lock(&self.store)
            .all()
            .filter(|(k, _)| k.plural == "events")
            .map(|(k, v)| {
                let mut v = v.clone();
                v["apiVersion"] = Value::String(k.api_version.clone());
                v["kind"] = Value::String("Event".into());
                v
            })
            .collect()
    }
}

/// Accepts connections until aborted; drops them all when `kill_tx` is bumped.
async fn serve(listener: TcpListener, sh: Arc<Shared>) {
    let router = Router::new().fallback(http::handle).with_state(sh.clone());
    let mut kill = sh.kill_tx.subscribe();
    kill.borrow_and_update();
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let svc = TowerToHyperService::new(router.clone());
                    conns.spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            changed = kill.changed() => {
                if changed.is_err() {
                    return;
                }
                conns.abort_all();
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// A kubeconfig for a server at `url` (plain HTTP, no credentials).
pub fn kubeconfig_for(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n  - name: fake\n    cluster:\n      server: {url}\n\
         users:\n  - name: fake\n    user: {{}}\ncontexts:\n  - name: fake\n    context:\n      \
         cluster: fake\n      user: fake\n      namespace: default\ncurrent-context: fake\n"
    )
}

/// Serves `/control/down` requests: stop, wait, start.
async fn supervise(sh: Arc<Shared>, mut down_rx: mpsc::UnboundedReceiver<Duration>) {
    while let Some(down) = down_rx.recv().await {
        // Let the control request's response go out first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        sh.stop().await;
        tokio::time::sleep(down).await;
        if let Err(e) = sh.start().await {
            eprintln!("fake-apiserver: restarting on {}: {e:#}", sh.addr);
        }
    }
}

/// A running fake API server (see the module documentation). Dropping it stops it.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    supervisor: JoinHandle<()>,
}

impl FakeApiServer {
    /// Starts a server on a free port of 127.0.0.1.
    pub async fn new() -> anyhow::Result<FakeApiServer> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts a server on `addr` (port 0: any free port; it is kept across stop/start).
    pub async fn start_on(addr: SocketAddr) -> anyhow::Result<FakeApiServer> {
        let listener = bind(addr).with_context(|| format!("listening on {addr}"))?;
        let addr = listener.local_addr().context("local address")?;
        let store = Store::new();
        let rv = store.resource_version();
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            rv_tx: watch::channel(rv).0,
            bookmark_tx: watch::channel(0).0,
            kill_tx: watch::channel(0).0,
            requests: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            authz: Mutex::new(None),
            denied: Mutex::new(Vec::new()),
            addr,
            serving: Mutex::new(None),
            down_tx,
        });
        let task = tokio::spawn(serve(listener, shared.clone()));
        *lock(&shared.serving) = Some(task);
        let supervisor = tokio::spawn(supervise(shared.clone(), down_rx));
        Ok(FakeApiServer { shared, supervisor })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    pub fn kubeconfig_yaml(&self) -> String {
        kubeconfig_for(&self.url())
    }

    /// Writes a kubeconfig pointing at this server.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, self.kubeconfig_yaml())
            .with_context(|| format!("writing kubeconfig {}", path.display()))
    }

    /// Creates or replaces an object; returns the new revision.
    pub fn apply<K>(&self, obj: &K) -> anyhow::Result<u64>
    where
        K: Resource + Serialize,
        K::Scope: 'static,
    {
        let t = resource_type_of::<K>();
        let value = serde_json::to_value(obj).context("serializing the object")?;
        let rv = {
            let mut store = lock(&self.shared.store);
            store.register(t.clone());
            store
                .put(&t, value)
                .map_err(|e| anyhow::anyhow!("{} {}: {}", t.kind, e.code, e.message))?;
            store.resource_version()
        };
        self.shared.notify();
        Ok(rv)
    }

    /// Creates or replaces every object of a multi-document YAML (or JSON) text.
    pub fn apply_yaml(&self, text: &str) -> anyhow::Result<u64> {
        self.shared.apply_yaml(text)
    }

    /// Deletes an object (`namespace` is ignored for cluster-scoped types); false if absent.
    pub fn delete<K>(&self, namespace: Option<&str>, name: &str) -> bool
    where
        K: Resource,
        K::Scope: 'static,
    {
        let t = resource_type_of::<K>();
        let key = store::ObjectKey {
            api_version: t.api_version,
            plural: t.plural,
            namespace: if t.namespaced {
                namespace.unwrap_or("default").to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        };
        let deleted = lock(&self.shared.store).delete(&key).is_some();
        if deleted {
            self.shared.notify();
        }
        deleted
    }

    /// Deletes an object by kind name, as `/control/delete` does.
    pub fn delete_kind(
        &self,
        api_version: Option<&str>,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> anyhow::Result<bool> {
        self.shared.delete_kind(api_version, kind, namespace, name)
    }

    /// Every stored object of type `K`, as the server holds it (with resourceVersion, uid).
    pub fn objects<K>(&self) -> anyhow::Result<Vec<K>>
    where
        K: Resource + DeserializeOwned,
        K::Scope: 'static,
    {
        let t = resource_type_of::<K>();
        let store = lock(&self.shared.store);
        store
            .state_at(&t, None)
            .map_err(|e| anyhow::anyhow!(e.message))?
            .into_values()
            .map(|v| serde_json::from_value(v).with_context(|| format!("decoding a {}", K::KIND)))
            .collect()
    }

    /// The Events posted to the server (`events.k8s.io/v1` and core `v1`), as JSON.
    pub fn events(&self) -> Vec<Value> {
        self.shared.event_values()
    }

    /// The current revision (the last change's `resourceVersion`).
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).resource_version()
    }

    /// Forgets the history before now: watches and paged lists resuming from an older
    /// revision get `410 Gone`.
    pub fn compact(&self) {
        lock(&self.shared.store).compact();
    }

    /// Makes every watch that allows bookmarks send one, at the current revision.
    pub fn send_bookmarks(&self) {
        self.shared.bookmark_tx.send_modify(|n| *n += 1);
    }

    /// Drops every open connection (watches end abruptly); new ones are accepted.
    pub fn disconnect(&self) {
        self.shared.kill_tx.send_modify(|n| *n += 1);
    }

    /// Stops listening and drops every connection: the server is gone until [`Self::start`].
    /// Objects can still be changed meanwhile.
    pub async fn stop(&self) {
        self.shared.stop().await;
    }

    /// Listens again, on the same address.
    pub async fn start(&self) -> anyhow::Result<()> {
        self.shared.start().await
    }

    pub fn is_serving(&self) -> bool {
        lock(&self.shared.serving).is_some()
    }

    /// The API requests received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.shared.requests).clear();
    }

    /// Makes every API request whose path starts with `path_prefix` fail with `code` (a
    /// `Status` body, as the real server's errors), until [`Self::clear_faults`].
    pub fn fail_requests(&self, path_prefix: &str, code: u16) {
        lock(&self.shared.faults).push((path_prefix.to_string(), code));
    }

    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }

    /// Allows only the rules of `authorizer` (`None`: everything), as RBAC would.
    pub fn authorize(&self, authorizer: Option<authz::Authorizer>) {
        *lock(&self.shared.authz) = authorizer;
    }

    /// The requests refused with 403 so far ("METHOD PATH").
    pub fn denied(&self) -> Vec<String> {
        lock(&self.shared.denied).clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.supervisor.abort();
        if let Some(task) = lock(&self.shared.serving).take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// One HTTP/1.1 request on a fresh connection; the raw response (chunked bodies left as
    /// they are: the tests look for substrings).
    async fn http(server: &FakeApiServer, method: &str, target: &str, body: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(server.addr())
            .await
            .expect("connect");
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
            .await
            .expect("response timed out")
            .expect("read");
        out
    }

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: NAME, namespace: lab, \
                       labels: {app: APP}}\nspec: {clusterIP: 10.96.0.10}\n---\n";

    fn svc(name: &str, app: &str) -> String {
        SVC.replace("NAME", name).replace("APP", app)
    }

    #[tokio::test]
    async fn under_rbac_only_the_roles_rules_are_allowed() {
        let server = FakeApiServer::new().await.expect("server");
        server.apply_yaml(&svc("a", "web")).expect("apply");
        let r = http(
            &server,
            "POST",
            "/control/authorize",
            authz::SYSTEM_NODE_PROXIER,
        )
        .await;
        assert!(r.contains("system:node-proxier"), "{r}");
        let list = http(&server, "GET", "/api/v1/services", "").await;
        assert!(list.starts_with("HTTP/1.1 200"), "{list}");
        let get = http(&server, "GET", "/api/v1/namespaces/lab/services/a", "").await;
        assert!(get.starts_with("HTTP/1.1 403"), "{get}");
        assert!(get.contains("\"reason\":\"Forbidden\""), "{get}");
        assert!(
            http(&server, "GET", "/version", "")
                .await
                .starts_with("HTTP/1.1 200")
        );
        assert_eq!(server.denied(), ["GET /api/v1/namespaces/lab/services/a"]);
        let denied = http(&server, "GET", "/control/denied", "").await;
        assert!(denied.contains("services/a"), "{denied}");
        // An empty role: everything allowed again.
        http(&server, "POST", "/control/authorize", "").await;
        let get = http(&server, "GET", "/api/v1/namespaces/lab/services/a", "").await;
        assert!(get.starts_with("HTTP/1.1 200"), "{get}");
    }

    #[tokio::test]
    async fn control_endpoints_paging_and_watch_semantics() {
        let server = FakeApiServer::new().await.expect("server");
        let yaml = format!("{}{}{}", svc("a", "web"), svc("b", "web"), svc("c", "db"));
        let r = http(&server, "POST", "/control/apply", &yaml).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let rv = server.resource_version();

        // Paging: a consistent snapshot even if objects change between pages.
        let r = http(
            &server,
            "GET",
            "/api/v1/namespaces/lab/services?limit=2",
            "",
        )
        .await;
        assert!(r.contains("\"remainingItemCount\":1"), "{r}");
        let token = format!("{rv}|lab|b");
        assert!(r.contains(&format!("\"continue\":\"{token}\"")), "{r}");
        server.apply_yaml(&svc("d", "db")).expect("apply");
        let r = http(
            &server,
            "GET",
            &format!(
                "/api/v1/services?limit=2&continue={}",
                token.replace('|', "%7C")
            ),
            "",
        )
        .await;
        assert!(
            r.contains("\"name\":\"c\"") && !r.contains("\"name\":\"d\""),
            "{r}"
        );

        // A label change out of the selector is a DELETED event for that watch.
        server.apply_yaml(&svc("a", "db")).expect("apply");
        let r = http(&server, "GET", &format!("/api/v1/services?watch=1&labelSelector=app%3Dweb&resourceVersion={rv}&timeoutSeconds=1"), "").await;
        assert!(
            r.contains("\"type\":\"DELETED\"") && r.contains("\"name\":\"a\""),
            "{r}"
        );
        assert!(!r.contains("\"name\":\"d\""), "{r}");

        // Exact reads of old revisions work until compaction, then 410.
        let q = format!("/api/v1/services?resourceVersion={rv}&resourceVersionMatch=Exact");
        assert!(
            http(&server, "GET", &q, "")
                .await
                .starts_with("HTTP/1.1 200")
        );
        let r = http(&server, "POST", "/control/compact", "").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(
            http(&server, "GET", &q, "")
                .await
                .starts_with("HTTP/1.1 410")
        );

        let r = http(
            &server,
            "POST",
            "/control/delete?kind=Service&namespace=lab&name=a",
            "",
        )
        .await;
        assert!(r.contains("\"deleted\":true"), "{r}");
        assert!(
            http(&server, "GET", "/api/v1/namespaces/lab/services/a", "")
                .await
                .starts_with("HTTP/1.1 404")
        );
        let r = http(&server, "GET", "/control/requests", "").await;
        assert!(r.contains("resourceVersionMatch"), "{r}");

        // Down for a while, then back on the same port.
        http(&server, "POST", "/control/down?seconds=0.5", "").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(tokio::net::TcpStream::connect(server.addr()).await.is_err());
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(
            http(&server, "GET", "/version", "")
                .await
                .starts_with("HTTP/1.1 200")
        );
    }
}
