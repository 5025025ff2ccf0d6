//! The fake API server's HTTP handling: the Kubernetes REST paths (list, paged list, get,
//! watch, create, merge-patch, replace, delete), `/version`, and the `/control/...` endpoints
//! the `fake-apiserver` binary is driven with.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::store::{ApiError, ChangeType, ObjectKey, ResourceType, Selector};
use super::{RecordedRequest, Shared, lock};

/// Default watch duration when the client sets no `timeoutSeconds` (the real server picks
/// between 30 and 60 minutes).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

fn json_response(code: StatusCode, v: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn error_response(e: &ApiError) -> Response {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &e.status())
}

/// An object as the server returns it alone or in a watch event: with its type fields.
fn typed(t: &ResourceType, obj: &Value) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("kind".into(), Value::String(t.kind.clone()));
    out.insert("apiVersion".into(), Value::String(t.api_version.clone()));
    if let Some(map) = obj.as_object() {
        for (k, v) in map {
            out.insert(k.clone(), v.clone());
        }
    }
    Value::Object(out)
}

/// The one handler of the server.
pub(super) async fn handle(
    State(sh): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query: BTreeMap<String, String> = Query::try_from_uri(&uri)
        .map(|Query(q)| q)
        .unwrap_or_default();
    let path = uri.path().trim_end_matches('/').to_string();
    if let Some(control) = path.strip_prefix("/control/") {
        return super::control::handle(&sh, &method, control, &query, &body).await;
    }
    lock(&sh.requests).push(RecordedRequest {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        content_type: headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    });
    let fault = lock(&sh.faults)
        .iter()
        .find(|(prefix, _)| path.starts_with(prefix.as_str()))
        .map(|(_, code)| *code);
    if let Some(code) = fault {
        return error_response(&ApiError::new(
            code,
            "InternalError",
            format!("injected failure of {path}"),
        ));
    }
    let denial = lock(&sh.authz).as_ref().and_then(|a| {
        let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
        a.check(method.as_str(), &path, watch)
    });
    if let Some(message) = denial {
        lock(&sh.denied).push(format!("{method} {path}"));
        return error_response(&ApiError::new(403, "Forbidden", message));
    }
    if path == "/version" {
        return json_response(
            StatusCode::OK,
            &json!({
                "major": "1", "minor": "36", "gitVersion": "v1.36.0-fake",
                "gitCommit": "", "gitTreeState": "clean", "buildDate": "2024-01-01T00:00:00Z",
                "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64",
            }),
        );
    }
    match resource_request(&sh, &method, &path, &query, &body) {
        Ok(Handled::Response(r)) => r,
        Ok(Handled::Watch(w)) => watch_response(*w),
        Err(e) => error_response(&e),
    }
}

/// What a resource request turned into.
enum Handled {
    Response(Response),
    Watch(Box<WatchRequest>),
}

/// A parsed resource path.
struct Target {
    t: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_target(sh: &Shared, path: &str) -> Result<Target, ApiError> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (api_version, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_string(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => {
            return Err(ApiError::not_found(format!(
                "the server could not find {path}"
            )));
        }
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural, tail @ ..] if tail.len() <= 1 => (
            Some(ns.to_string()),
            *plural,
            tail.first().map(|s| s.to_string()),
        ),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(name.to_string())),
        _ => {
            return Err(ApiError::not_found(format!(
                "the server could not find {path}"
            )));
        }
    };
    let store = lock(&sh.store);
    let t = store
        .resource_type(&api_version, plural)
        .cloned()
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "the server could not find the requested resource {api_version} {plural}"
            ))
        })?;
    if namespace.is_some() && !t.namespaced {
        return Err(ApiError::not_found(format!(
            "{plural} is not a namespaced resource"
        )));
    }
    Ok(Target { t, namespace, name })
}

fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {s:?}")))
}

fn resource_request(
    sh: &Arc<Shared>,
    method: &Method,
    path: &str,
    q: &BTreeMap<String, String>,
    body: &Bytes,
) -> Result<Handled, ApiError> {
    let target = parse_target(sh, path)?;
    let t = &target.t;
    let key = |name: &str, ns: Option<&str>| ObjectKey {
        api_version: t.api_version.clone(),
        plural: t.plural.clone(),
        namespace: if t.namespaced {
            ns.unwrap_or("default").to_string()
        } else {
            String::new()
        },
        name: name.to_string(),
    };
    let ok =
        |code: StatusCode, obj: &Value| Ok(Handled::Response(json_response(code, &typed(t, obj))));
    match (method.clone(), &target.name) {
        (Method::GET, None) => {
            let sel = Selector::parse(
                q.get("labelSelector").map(String::as_str),
                q.get("fieldSelector").map(String::as_str),
            )?;
            let sel = match &target.namespace {
                Some(ns) => sel.in_namespace(ns),
                None => sel,
            };
            if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
                return Ok(Handled::Watch(Box::new(WatchRequest::new(
                    sh,
                    t.clone(),
                    sel,
                    q,
                )?)));
            }
            list(sh, t, &sel, q).map(|v| Handled::Response(json_response(StatusCode::OK, &v)))
        }
        (Method::GET, Some(name)) => {
            let store = lock(&sh.store);
            match store.get(&key(name, target.namespace.as_deref())) {
                Some(obj) => ok(StatusCode::OK, obj),
                None => Err(ApiError::not_found(format!(
                    "{} {name:?} not found",
                    t.plural
                ))),
            }
        }
        (Method::POST, None) => {
            let mut obj: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
            if let (Some(ns), Some(meta)) = (
                &target.namespace,
                obj.get_mut("metadata").and_then(Value::as_object_mut),
            ) {
                meta.insert("namespace".into(), Value::String(ns.clone()));
            }
            let name = obj
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let created = {
                let mut store = lock(&sh.store);
                if store
                    .get(&key(&name, target.namespace.as_deref()))
                    .is_some()
                {
                    return Err(ApiError::new(
                        409,
                        "AlreadyExists",
                        format!("{} {name:?} already exists", t.plural),
                    ));
                }
                store.put(t, obj)?
            };
            sh.notify();
            ok(StatusCode::CREATED, &created)
        }
        (Method::PUT | Method::PATCH, Some(name)) => {
            let patch: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
            let k = key(name, target.namespace.as_deref());
            let updated = {
                let mut store = lock(&sh.store);
                let Some(current) = store.get(&k).cloned() else {
                    return Err(ApiError::not_found(format!(
                        "{} {name:?} not found",
                        t.plural
                    )));
                };
                let mut obj = if method == Method::PUT {
                    patch
                } else {
                    let mut obj = current;
                    merge_patch(&mut obj, &patch);
                    obj
                };
                if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.insert("name".into(), Value::String(k.name.clone()));
                    meta.insert("namespace".into(), Value::String(k.namespace.clone()));
                }
                store.put(t, obj)?
            };
            sh.notify();
            ok(StatusCode::OK, &updated)
        }
        (Method::DELETE, Some(name)) => {
            let deleted = lock(&sh.store).delete(&key(name, target.namespace.as_deref()));
            match deleted {
                Some(obj) => {
                    sh.notify();
                    ok(StatusCode::OK, &obj)
                }
                None => Err(ApiError::not_found(format!(
                    "{} {name:?} not found",
                    t.plural
                ))),
            }
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {path}"),
        )),
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Some(t) = target.as_object_mut() {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// A list, honouring `resourceVersion`, `resourceVersionMatch`, `limit` and `continue` the way
/// the real server does.
fn list(
    sh: &Shared,
    t: &ResourceType,
    sel: &Selector,
    q: &BTreeMap<String, String>,
) -> Result<Value, ApiError> {
    let store = lock(&sh.store);
    let current = store.resource_version();
    let (at, after) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let mut parts = token.splitn(3, '|');
            let (Some(rv), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(ApiError::bad_request(format!(
                    "invalid continue token {token:?}"
                )));
            };
            let rv = parse_rv(rv)?;
            if rv < store.compacted() {
                return Err(ApiError::gone(
                    "The provided continue parameter is too old to display a consistent list \
                     result. You can start a new list without the continue parameter.",
                ));
            }
            (rv, Some((ns.to_string(), name.to_string())))
        }
        None => {
            let rv = q.get("resourceVersion").filter(|r| !r.is_empty());
            let exact = q.get("resourceVersionMatch").map(String::as_str) == Some("Exact");
            match rv {
                None => (current, None),
                Some(r) if r == "0" && !exact => (current, None),
                Some(r) => {
                    let r = parse_rv(r)?;
                    if r > current {
                        return Err(ApiError::new(
                            504,
                            "Timeout",
                            format!("Too large resource version: {r}, current: {current}"),
                        ));
                    }
                    if exact { (r, None) } else { (current, None) }
                }
            }
        }
    };
    let objects = store.state_at(t, Some(at))?;
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let matching: Vec<((String, String), Value)> = objects
        .into_iter()
        .filter(|(k, _)| after.as_ref().is_none_or(|a| k > a))
        .filter(|(_, v)| sel.matches(v))
        .collect();
    let take = limit.unwrap_or(usize::MAX).min(matching.len());
    let remaining = matching.len() - take;
    let mut meta = serde_json::Map::new();
    meta.insert("resourceVersion".into(), Value::String(at.to_string()));
    if remaining > 0
        && let Some(((ns, name), _)) = take.checked_sub(1).and_then(|i| matching.get(i))
    {
        meta.insert(
            "continue".into(),
            Value::String(format!("{at}|{ns}|{name}")),
        );
        meta.insert("remainingItemCount".into(), json!(remaining));
    }
    let items: Vec<Value> = matching.into_iter().take(take).map(|(_, v)| v).collect();
    Ok(json!({
        "kind": format!("{}List", t.kind),
        "apiVersion": t.api_version,
        "metadata": meta,
        "items": items,
    }))
}

/// A watch being served.
struct WatchRequest {
    sh: Arc<Shared>,
    t: ResourceType,
    sel: Selector,
    cursor: u64,
    pending: VecDeque<Value>,
    done: bool,
    deadline: tokio::time::Instant,
    bookmarks: bool,
    rv_rx: watch::Receiver<u64>,
    bookmark_rx: watch::Receiver<u64>,
}

impl WatchRequest {
    fn new(
        sh: &Arc<Shared>,
        t: ResourceType,
        sel: Selector,
        q: &BTreeMap<String, String>,
    ) -> Result<WatchRequest, ApiError> {
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|s| s.parse::<u64>().ok())
            .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
        let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
        let initial_events = q.get("sendInitialEvents").is_some_and(|b| b == "true");
        let mut rv_rx = sh.rv_tx.subscribe();
        rv_rx.borrow_and_update();
        let mut bookmark_rx = sh.bookmark_tx.subscribe();
        bookmark_rx.borrow_and_update();
        let mut w = WatchRequest {
            sh: sh.clone(),
            t,
            sel,
            cursor: 0,
            pending: VecDeque::new(),
            done: false,
            deadline: tokio::time::Instant::now() + timeout,
            bookmarks,
            rv_rx,
            bookmark_rx,
        };
        let rv = q.get("resourceVersion").filter(|r| !r.is_empty());
        match rv {
            Some(r) if r != "0" && !initial_events => w.cursor = parse_rv(r)?,
            _ => {
                // "Start at most recent" / "any": the current state as ADDED events first.
                let store = lock(&sh.store);
                w.cursor = store.resource_version();
                for obj in store.state_at(&w.t, None)?.values() {
                    if w.sel.matches(obj) {
                        w.pending.push_back(w.event("ADDED", obj));
                    }
                }
                if initial_events {
                    if !bookmarks {
                        return Err(ApiError::bad_request(
                            "sendInitialEvents requires allowWatchBookmarks=true",
                        ));
                    }
                    let bm = w.bookmark(&[("k8s.io/initial-events-end", "true")]);
                    w.pending.push_back(bm);
                }
            }
        }
        Ok(w)
    }

    fn event(&self, kind: &str, obj: &Value) -> Value {
        json!({"type": kind, "object": typed(&self.t, obj)})
    }

    fn bookmark(&self, annotations: &[(&str, &str)]) -> Value {
        let mut meta = json!({"resourceVersion": self.cursor.to_string()});
        if !annotations.is_empty() {
            let a: serde_json::Map<String, Value> = annotations
                .iter()
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .collect();
            meta["annotations"] = Value::Object(a);
        }
        json!({"type": "BOOKMARK", "object": {
            "kind": self.t.kind, "apiVersion": self.t.api_version, "metadata": meta,
        }})
    }

    /// Queues the events of the changes after the cursor, or a 410 ERROR event if they were
    /// compacted away.
    fn poll_store(&mut self) {
        let store = lock(&self.sh.store);
        let mut events = Vec::new();
        match store.changes_after(self.cursor) {
            Err(e) => {
                events.push(json!({"type": "ERROR", "object": e.status()}));
                self.done = true;
            }
            Ok(changes) => {
                for c in changes {
                    if c.key.api_version != self.t.api_version || c.key.plural != self.t.plural {
                        continue;
                    }
                    let was = c.prev.as_ref().is_some_and(|p| self.sel.matches(p));
                    let is = c.change != ChangeType::Deleted && self.sel.matches(&c.object);
                    let kind = match (c.change, was, is) {
                        (ChangeType::Deleted, true, _) => Some("DELETED"),
                        (ChangeType::Deleted, false, _) => None,
                        (_, true, true) => Some("MODIFIED"),
                        (_, false, true) => Some("ADDED"),
                        (_, true, false) => Some("DELETED"),
                        (_, false, false) => None,
                    };
                    if let Some(kind) = kind {
                        events.push(self.event(kind, &c.object));
                    }
                }
                self.cursor = self.cursor.max(store.resource_version());
            }
        }
        self.pending.extend(events);
    }

    /// The next line of the response body; `None` ends it.
    async fn next_line(&mut self) -> Option<Bytes> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                let mut line = ev.to_string().into_bytes();
                line.push(b'\n');
                return Some(Bytes::from(line));
            }
            if self.done {
                return None;
            }
            self.rv_rx.borrow_and_update();
            self.poll_store();
            if !self.pending.is_empty() || self.done {
                continue;
            }
            tokio::select! {
                r = self.rv_rx.changed() => {
                    if r.is_err() {
                        self.done = true;
                    }
                }
                r = self.bookmark_rx.changed(), if self.bookmarks => {
                    if r.is_err() {
                        self.done = true;
                    } else {
                        self.poll_store();
                        if !self.done {
                            let bm = self.bookmark(&[]);
                            self.pending.push_back(bm);
                        }
                    }
                }
                _ = tokio::time::sleep_until(self.deadline) => self.done = true,
            }
        }
    }
}

fn watch_response(w: WatchRequest) -> Response {
    let stream = futures::stream::unfold(w, |mut w| async move {
        let line = w.next_line().await?;
        Some((Ok::<_, std::convert::Infallible>(line), w))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
