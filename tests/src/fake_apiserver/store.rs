//! The fake API server's storage, modelled on etcd behind the kube-apiserver: every object of
//! every resource type under one global revision counter (the `resourceVersion`), a history of
//! changes from which watches resume and consistent lists are served, and compaction, after
//! which resuming from an older revision fails with `410 Gone`. Also label and field selectors.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Map, Value, json};

/// One resource type the server serves, e.g. `v1 services`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceType {
    /// `v1` for the core group, else `group/version`.
    pub api_version: String,
    /// The URL path segment, e.g. `services`.
    pub plural: String,
    pub kind: String,
    pub namespaced: bool,
}

impl ResourceType {
    pub fn new(api_version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self {
            api_version: api_version.to_string(),
            plural: plural.to_string(),
            kind: kind.to_string(),
            namespaced,
        }
    }

    /// The types every fake server knows from the start.
    pub fn builtin() -> Vec<ResourceType> {
        vec![
            Self::new("v1", "services", "Service", true),
            Self::new(
                "discovery.k8s.io/v1",
                "endpointslices",
                "EndpointSlice",
                true,
            ),
            Self::new("v1", "nodes", "Node", false),
            Self::new("v1", "endpoints", "Endpoints", true),
            Self::new("v1", "pods", "Pod", true),
            Self::new("v1", "namespaces", "Namespace", false),
            Self::new("v1", "configmaps", "ConfigMap", true),
            Self::new("v1", "events", "Event", true),
            Self::new("events.k8s.io/v1", "events", "Event", true),
        ]
    }

    fn key(&self) -> (String, String) {
        (self.api_version.clone(), self.plural.clone())
    }
}

/// Where an object lives: its type, namespace ("" when cluster-scoped) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub api_version: String,
    pub plural: String,
    pub namespace: String,
    pub name: String,
}

/// What a change did to an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One entry of the history: the object after the change (its last state, with the deletion's
/// revision, for a deletion) and before it.
#[derive(Clone, Debug)]
pub struct Change {
    pub rv: u64,
    pub key: ObjectKey,
    pub change: ChangeType,
    pub object: Value,
    pub prev: Option<Value>,
}

/// Why a request cannot be served, as the API server's `Status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, "NotFound", message)
    }

    /// The `Status` object the API server sends, in a response body or an ERROR watch event.
    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

/// All objects, their history since the last compaction, and the revision counter.
#[derive(Debug)]
pub struct Store {
    rv: u64,
    /// Revisions up to and including this one are forgotten.
    compacted: u64,
    types: BTreeMap<(String, String), ResourceType>,
    objects: BTreeMap<ObjectKey, Value>,
    history: VecDeque<Change>,
    uid_counter: u64,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        let mut s = Store {
            // Like a fresh etcd that already holds a few objects: revisions are never 0.
            rv: 1,
            compacted: 0,
            types: BTreeMap::new(),
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            uid_counter: 0,
        };
        for t in ResourceType::builtin() {
            s.register(t);
        }
        s
    }

    pub fn register(&mut self, t: ResourceType) {
        self.types.entry(t.key()).or_insert(t);
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    pub fn resource_type(&self, api_version: &str, plural: &str) -> Option<&ResourceType> {
        self.types
            .get(&(api_version.to_string(), plural.to_string()))
    }

    pub fn type_of_kind(&self, api_version: &str, kind: &str) -> Option<&ResourceType> {
        self.types
            .values()
            .find(|t| t.api_version == api_version && t.kind == kind)
    }

    /// Forgets the history up to now: watches and paged lists from older revisions get 410.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        self.history.clear();
    }

    fn key_of(&self, t: &ResourceType, obj: &Value) -> Result<ObjectKey, ApiError> {
        let meta = obj.get("metadata");
        let name = meta
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::new(422, "Invalid", "metadata.name: Required value"))?;
        let namespace = if t.namespaced {
            meta.and_then(|m| m.get("namespace"))
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        Ok(ObjectKey {
            api_version: t.api_version.clone(),
            plural: t.plural.clone(),
            namespace,
            name: name.to_string(),
        })
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&Value> {
        self.objects.get(key)
    }

    /// Creates the object, or replaces it if it exists (`kubectl apply` without the merge).
    /// Sets `resourceVersion`, and `uid`/`creationTimestamp` when new. Returns the stored object.
    pub fn put(&mut self, t: &ResourceType, mut obj: Value) -> Result<Value, ApiError> {
        let key = self.key_of(t, &obj)?;
        let prev = self.objects.get(&key).cloned();
        self.rv += 1;
        let rv = self.rv;
        let Some(map) = obj.as_object_mut() else {
            return Err(ApiError::bad_request("object is not a JSON object"));
        };
        // Stored objects carry no type fields; the HTTP layer adds them where the server does.
        map.remove("apiVersion");
        map.remove("kind");
        let meta = map
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        let Some(meta) = meta.as_object_mut() else {
            return Err(ApiError::bad_request("metadata is not a JSON object"));
        };
        if t.namespaced {
            meta.insert("namespace".into(), Value::String(key.namespace.clone()));
        } else {
            meta.remove("namespace");
        }
        let prev_meta = prev.as_ref().and_then(|p| p.get("metadata"));
        for field in ["uid", "creationTimestamp"] {
            if let Some(v) = prev_meta.and_then(|m| m.get(field)) {
                meta.insert(field.into(), v.clone());
            }
        }
        if !meta.contains_key("uid") {
            self.uid_counter += 1;
            meta.insert(
                "uid".into(),
                Value::String(format!("00000000-0000-4000-8000-{:012x}", self.uid_counter)),
            );
        }
        meta.entry("creationTimestamp")
            .or_insert_with(|| Value::String("2024-01-01T00:00:00Z".into()));
        meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        let change = if prev.is_some() {
            ChangeType::Modified
        } else {
            ChangeType::Added
        };
        self.objects.insert(key.clone(), obj.clone());
        self.history.push_back(Change {
            rv,
            key,
            change,
            object: obj.clone(),
            prev,
        });
        Ok(obj)
    }

    /// Deletes an object; returns its last state (with the deletion's revision), if it existed.
    pub fn delete(&mut self, key: &ObjectKey) -> Option<Value> {
        let prev = self.objects.remove(key)?;
        self.rv += 1;
        let mut last = prev.clone();
        if let Some(meta) = last.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(self.rv.to_string()));
        }
        self.history.push_back(Change {
            rv: self.rv,
            key: key.clone(),
            change: ChangeType::Deleted,
            object: last.clone(),
            prev: Some(prev),
        });
        Some(last)
    }

    /// The objects of type `t` as they were at revision `rv` (`None`: now), sorted by
    /// namespace and name like etcd keys. 410 if that revision was compacted away.
    pub fn state_at(
        &self,
        t: &ResourceType,
        rv: Option<u64>,
    ) -> Result<BTreeMap<(String, String), Value>, ApiError> {
        let rv = match rv {
            Some(r) if r < self.rv => {
                if r < self.compacted {
                    return Err(ApiError::gone(format!(
                        "too old resource version: {r} ({})",
                        self.compacted
                    )));
                }
                Some(r)
            }
            _ => None,
        };
        let mut out: BTreeMap<(String, String), Value> = self
            .objects
            .iter()
            .filter(|(k, _)| k.api_version == t.api_version && k.plural == t.plural)
            .map(|(k, v)| ((k.namespace.clone(), k.name.clone()), v.clone()))
            .collect();
        if let Some(rv) = rv {
            for c in self.history.iter().rev().take_while(|c| c.rv > rv) {
                if c.key.api_version != t.api_version || c.key.plural != t.plural {
                    continue;
                }
                let k = (c.key.namespace.clone(), c.key.name.clone());
                match &c.prev {
                    Some(p) => {
                        out.insert(k, p.clone());
                    }
                    None => {
                        out.remove(&k);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The changes after revision `after`, or 410 if some of them were compacted away.
    pub fn changes_after(&self, after: u64) -> Result<impl Iterator<Item = &Change>, ApiError> {
        if after < self.compacted {
            return Err(ApiError::gone(format!(
                "too old resource version: {after} ({})",
                self.compacted
            )));
        }
        Ok(self.history.iter().filter(move |c| c.rv > after))
    }

    /// Every object of every type.
    pub fn all(&self) -> impl Iterator<Item = (&ObjectKey, &Value)> {
        self.objects.iter()
    }
}

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// One requirement of a field selector.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FieldReq {
    path: String,
    value: String,
    equal: bool,
}

/// A parsed `labelSelector` and `fieldSelector`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
    /// The namespace of the request path, if any.
    namespace: Option<String>,
}

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn set_values(s: &str) -> Result<Vec<String>, ApiError> {
    let inner = s
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| ApiError::bad_request(format!("unable to parse requirement: {s:?}")))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl Selector {
    /// Parses the selectors; an unsupported field is a 400, as on the real server.
    pub fn parse(label: Option<&str>, field: Option<&str>) -> Result<Selector, ApiError> {
        let mut sel = Selector::default();
        for req in split_top(label.unwrap_or("")) {
            let r = if let Some(k) = req.strip_prefix('!') {
                LabelReq::NotExists(k.trim().to_string())
            } else if let Some((k, v)) = req.split_once("!=") {
                LabelReq::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = req.split_once("==") {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = req.split_once('=') {
                LabelReq::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = req.split_once(" notin ") {
                LabelReq::NotIn(k.trim().into(), set_values(v)?)
            } else if let Some((k, v)) = req.split_once(" in ") {
                LabelReq::In(k.trim().into(), set_values(v)?)
            } else if req.contains([' ', '(', ')']) {
                return Err(ApiError::bad_request(format!(
                    "unable to parse requirement: {req:?}"
                )));
            } else {
                LabelReq::Exists(req.to_string())
            };
            sel.labels.push(r);
        }
        for req in split_top(field.unwrap_or("")) {
            let (path, value, equal) = if let Some((k, v)) = req.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = req.split_once("==") {
                (k, v, true)
            } else if let Some((k, v)) = req.split_once('=') {
                (k, v, true)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: {req:?}"
                )));
            };
            let path = path.trim();
            if !matches!(path, "metadata.name" | "metadata.namespace") {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {path}"
                )));
            }
            sel.fields.push(FieldReq {
                path: path.to_string(),
                value: value.trim().to_string(),
                equal,
            });
        }
        Ok(sel)
    }

    /// Restricts the selector to one namespace (a request under `/namespaces/{ns}/`).
    pub fn in_namespace(mut self, namespace: &str) -> Selector {
        self.namespace = Some(namespace.to_string());
        self
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let meta = obj.get("metadata");
        if let Some(ns) = &self.namespace
            && meta
                .and_then(|m| m.get("namespace"))
                .and_then(Value::as_str)
                != Some(ns)
        {
            return false;
        }
        let label = |k: &str| {
            meta.and_then(|m| m.get("labels"))
                .and_then(|l| l.get(k))
                .and_then(Value::as_str)
        };
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::Eq(k, v) => label(k) == Some(v),
            LabelReq::NotEq(k, v) => label(k) != Some(v),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            LabelReq::NotIn(k, vs) => label(k).is_none_or(|l| !vs.iter().any(|v| v == l)),
        });
        let fields_ok = self.fields.iter().all(|f| {
            let field = f
                .path
                .strip_prefix("metadata.")
                .and_then(|p| meta.and_then(|m| m.get(p)))
                .and_then(Value::as_str)
                .unwrap_or("");
            (field == f.value) == f.equal
        });
        labels_ok && fields_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, labels: Value) -> Value {
        json!({"metadata": {"namespace": ns, "name": name, "labels": labels}, "spec": {}})
    }

    #[test]
    fn selectors() {
        let s = svc(
            "a",
            "x",
            json!({"app": "web", "service.kubernetes.io/headless": ""}),
        );
        let m = |l: &str, f: &str| {
            Selector::parse(Some(l), Some(f))
                .expect("parse")
                .matches(&s)
        };
        assert!(m("app=web", ""));
        assert!(m("app in (web, db)", "metadata.name=x"));
        assert!(!m("app notin (web)", ""));
        assert!(!m("!service.kubernetes.io/headless", ""));
        assert!(m("app,app!=db", "metadata.namespace!=b"));
        assert!(!m("", "metadata.name=y"));
        assert!(Selector::parse(None, Some("spec.nodeName=a")).is_err());
    }

    #[test]
    fn history_and_compaction() {
        let mut st = Store::new();
        let t = ResourceType::new("v1", "services", "Service", true);
        let rv0 = st.resource_version();
        st.put(&t, svc("a", "x", json!({}))).expect("put");
        let rv1 = st.resource_version();
        st.put(&t, svc("a", "y", json!({}))).expect("put");
        let k = st
            .all()
            .map(|(k, _)| k.clone())
            .find(|k| k.name == "x")
            .expect("x");
        st.delete(&k).expect("delete");
        assert_eq!(st.state_at(&t, Some(rv1)).expect("at rv1").len(), 1);
        assert_eq!(st.state_at(&t, Some(rv0)).expect("at rv0").len(), 0);
        assert_eq!(st.state_at(&t, None).expect("now").len(), 1);
        assert_eq!(st.changes_after(rv0).expect("changes").count(), 3);
        st.compact();
        assert_eq!(st.state_at(&t, Some(rv1)).map_err(|e| e.code), Err(410));
        assert!(st.changes_after(rv1).is_err());
        assert_eq!(
            st.changes_after(st.resource_version())
                .expect("none")
                .count(),
            0
        );
    }
}
