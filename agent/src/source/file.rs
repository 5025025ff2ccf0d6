//! Manifest files → Services and EndpointSlices.
//!
//! This module owns reading manifests the way `kubectl apply -f` accepts them: a file, or a
//! directory (not recursive) of `*.yaml`, `*.yml` and `*.json` files read in name order; each
//! file holds multi-document YAML or one or more JSON objects, and any object may be a `List`
//! (`kind: List`, `ServiceList`, …) whose `items` are read in turn. `v1 Service` and
//! `discovery.k8s.io/v1 EndpointSlice` objects are kept; other kinds are skipped. A missing
//! namespace becomes `default`.
//!
//! Errors never stop the load: a YAML syntax error, an unreadable file or an invalid object is
//! reported (naming the file, and the object when its kind/namespace/name can be read) and the
//! other documents and files are still loaded.

use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

/// Everything read from a path.
#[derive(Debug, Default)]
pub struct LoadedObjects {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub errors: Vec<SourceError>,
}

/// A file, document or object that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SourceError {
    pub file: PathBuf,
    /// `Kind namespace/name` when it could be read.
    pub object: Option<String>,
    pub message: String,
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(o) = &self.object {
            write!(f, ": {o}")?;
        }
        write!(f, ": {}", self.message)
    }
}

const EXTENSIONS: &[&str] = &["yaml", "yml", "json"];

/// Loads a manifest file, or every manifest file directly inside a directory.
pub fn load_path(path: &Path) -> LoadedObjects {
    let mut out = LoadedObjects::default();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            out.error(path, None, format!("cannot read: {e}"));
            return out;
        }
    };
    if !meta.is_dir() {
        load_file(path, &mut out);
        return out;
    }
    let entries = match std::fs::read_dir(path) {
        Ok(e) => e,
        Err(e) => {
            out.error(path, None, format!("cannot list directory: {e}"));
            return out;
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => {
                let p = entry.path();
                if is_manifest_name(&p) && p.is_file() {
                    files.push(p);
                }
            }
            Err(e) => out.error(path, None, format!("cannot list directory: {e}")),
        }
    }
    files.sort();
    for f in &files {
        load_file(f, &mut out);
    }
    out
}

/// Whether a directory entry is read as manifests: a `.yaml`, `.yml` or `.json` name. (Anything
/// else in the directory, such as an editor's or a writer's temporary file, is ignored.)
pub(crate) fn is_manifest_name(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

impl LoadedObjects {
    fn error(&mut self, file: &Path, object: Option<String>, message: String) {
        self.errors.push(SourceError {
            file: file.to_owned(),
            object,
            message,
        });
    }
}

fn load_file(path: &Path, out: &mut LoadedObjects) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            out.error(path, None, format!("cannot read: {e}"));
            return;
        }
    };
    load_text_into(path, &text, out);
}

/// Reads the text of a manifest file named `path` (JSON for a `.json` name, else YAML) without
/// touching the file system: what [`load_path`] does with each file it reads.
pub fn load_text(path: &Path, text: &str) -> LoadedObjects {
    let mut out = LoadedObjects::default();
    load_text_into(path, text, &mut out);
    out
}

fn load_text_into(path: &Path, text: &str, out: &mut LoadedObjects) {
    let is_json = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if is_json {
        load_json(path, text, out);
    } else {
        load_yaml(path, text, out);
    }
}

/// One or more concatenated JSON values.
fn load_json(path: &Path, text: &str, out: &mut LoadedObjects) {
    for value in serde_json::Deserializer::from_str(text).into_iter::<Value>() {
        match value {
            Ok(v) => load_value(path, v, out),
            Err(e) => {
                // The stream cannot be resynchronised after a syntax error.
                out.error(path, None, format!("JSON syntax error: {e}"));
                return;
            }
        }
    }
}

/// A YAML document and the line (1-based) it starts on.
struct Document {
    first_line: usize,
    text: String,
}

/// Splits a YAML stream at `---` / `...` markers, so that a syntax error in one document does
/// not lose the others. (YAML forbids these markers at column 0 inside content, so splitting
/// on them is exact.)
fn split_documents(text: &str) -> Vec<Document> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut first_line = 1;
    let mut has_content = false;
    let mut flush = |current: &mut String, first_line: usize, has_content: &mut bool| {
        if *has_content {
            docs.push(Document {
                first_line,
                text: std::mem::take(current),
            });
        }
        current.clear();
        *has_content = false;
    };
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        let bare = line.trim_end();
        let start_marker = bare == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if start_marker || bare == "..." {
            flush(&mut current, first_line, &mut has_content);
            first_line = lineno;
            if start_marker {
                // Content may follow the marker on the same line (`--- {a: 1}`, `--- !tag`).
                let rest = &line[3..];
                if !rest.trim().is_empty() {
                    has_content |= !rest.trim_start().starts_with('#');
                    current.push_str(rest);
                }
                current.push('\n');
            } else {
                // Keep line numbers: the next document starts after this line.
                first_line = lineno + 1;
            }
            continue;
        }
        if !has_content && bare.starts_with('%') {
            // A directive (`%YAML 1.2`) before the document's `---`.
            current.push('\n');
            continue;
        }
        let t = bare.trim_start();
        if !t.is_empty() && !t.starts_with('#') {
            has_content = true;
        }
        current.push_str(line);
        current.push('\n');
    }
    flush(&mut current, first_line, &mut has_content);
    docs
}

fn load_yaml(path: &Path, text: &str, out: &mut LoadedObjects) {
    for doc in split_documents(text) {
        let value: serde_yaml::Value = match serde_yaml::from_str(&doc.text) {
            Ok(v) => v,
            Err(e) => {
                // serde_yaml counts lines from the start of the document; report them from the
                // start of the file.
                let text = e.to_string();
                let at = match e.location() {
                    Some(l) => {
                        let problem = text.split(" at line ").next().unwrap_or(&text);
                        format!(
                            "line {} column {}: {problem}",
                            doc.first_line + l.line().saturating_sub(1),
                            l.column()
                        )
                    }
                    None => format!("the document starting at line {}: {text}", doc.first_line),
                };
                out.error(path, None, format!("YAML syntax error at {at}"));
                continue;
            }
        };
        match serde_json::to_value(value) {
            Ok(v) => load_value(path, v, out),
            Err(e) => out.error(
                path,
                None,
                format!(
                    "document starting at line {} is not a Kubernetes object: {e}",
                    doc.first_line
                ),
            ),
        }
    }
}

/// `Kind namespace/name`, as far as it can be read.
fn describe(v: &Value) -> Option<String> {
    let kind = v.get("kind")?.as_str()?;
    let meta = v.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    Some(match name {
        Some(name) => format!("{kind} {ns}/{name}"),
        None => kind.to_owned(),
    })
}

fn load_value(path: &Path, mut v: Value, out: &mut LoadedObjects) {
    if v.is_null() {
        return; // empty document
    }
    let Some(obj) = v.as_object_mut() else {
        out.error(path, None, "document is not an object".to_owned());
        return;
    };
    let Some(kind) = obj.get("kind").and_then(Value::as_str).map(str::to_owned) else {
        out.error(path, describe(&v), "object has no kind".to_owned());
        return;
    };
    if kind.ends_with("List") && obj.contains_key("items") {
        match obj.remove("items") {
            Some(Value::Array(items)) => {
                for item in items {
                    load_value(path, item, out);
                }
            }
            Some(Value::Null) => {}
            Some(_) => out.error(path, Some(kind), "items is not a list".to_owned()),
            None => {}
        }
        return;
    }
    let expected_api = match kind.as_str() {
        "Service" => "v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        _ => return, // another kind: not ours
    };
    let object = describe(&v);
    let api = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    if api != expected_api {
        out.error(
            path,
            object,
            format!("unsupported apiVersion {api:?} for {kind} (want {expected_api:?})"),
        );
        return;
    }
    let has_name = v
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    if !has_name {
        out.error(path, object, "metadata.name is required".to_owned());
        return;
    }
    // Default the namespace before deserialising, so that both typed objects and error
    // messages agree on it.
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        let empty = meta
            .get("namespace")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty);
        if empty {
            meta.insert("namespace".to_owned(), Value::String("default".to_owned()));
        }
    }
    let result = if kind == "Service" {
        serde_json::from_value::<Service>(v).map(|s| out.services.push(s))
    } else {
        serde_json::from_value::<EndpointSlice>(v).map(|s| out.endpoint_slices.push(s))
    };
    if let Err(e) = result {
        out.error(path, object, format!("invalid {kind}: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, text).expect("write test file");
        p
    }

    fn names(loaded: &LoadedObjects) -> Vec<String> {
        let svc = loaded.services.iter().map(|s| {
            format!(
                "Service {}/{}",
                s.metadata.namespace.as_deref().unwrap_or("?"),
                s.metadata.name.as_deref().unwrap_or("?")
            )
        });
        let eps = loaded.endpoint_slices.iter().map(|s| {
            format!(
                "EndpointSlice {}/{}",
                s.metadata.namespace.as_deref().unwrap_or("?"),
                s.metadata.name.as_deref().unwrap_or("?")
            )
        });
        svc.chain(eps).collect()
    }

    const SVC_A: &str = "apiVersion: v1
kind: Service
metadata:
  name: a
  namespace: ns1
spec:
  clusterIP: 10.96.0.10
  ports:
  - name: http
    port: 80
";

    const SLICE_A: &str = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: a-1
  namespace: ns1
  labels:
    kubernetes.io/service-name: a
addressType: IPv4
ports:
- name: http
  port: 8080
endpoints:
- addresses: [10.244.1.2]
";

    #[test]
    fn multi_document_yaml() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!("# leading comment\n---\n{SVC_A}---\n{SLICE_A}---\n# empty\n...\n");
        let f = write(dir.path(), "all.yaml", &text);
        let loaded = load_path(&f);
        assert_eq!(loaded.errors, vec![]);
        assert_eq!(names(&loaded), ["Service ns1/a", "EndpointSlice ns1/a-1"]);
        let spec = loaded.services[0].spec.as_ref().expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
    }

    #[test]
    fn list_kind_with_items() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = "apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: b, namespace: ns2}
  spec: {clusterIP: 10.96.0.11, ports: [{port: 53, protocol: UDP}]}
- apiVersion: v1
  kind: ServiceList
  items:
  - apiVersion: v1
    kind: Service
    metadata: {name: c, namespace: ns2}
    spec: {clusterIP: 10.96.0.12}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: skipped}
";
        let f = write(dir.path(), "list.yml", text);
        let loaded = load_path(&f);
        assert_eq!(loaded.errors, vec![]);
        assert_eq!(names(&loaded), ["Service ns2/b", "Service ns2/c"]);
    }

    #[test]
    fn json_single_list_and_concatenated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"j1","namespace":"x"},"spec":{"clusterIP":"10.96.0.20"}}
{"apiVersion":"v1","kind":"List","items":[
  {"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"j1-a","namespace":"x","labels":{"kubernetes.io/service-name":"j1"}},"addressType":"IPv4","endpoints":[]}
]}"#;
        let f = write(dir.path(), "objs.json", text);
        let loaded = load_path(&f);
        assert_eq!(loaded.errors, vec![]);
        assert_eq!(names(&loaded), ["Service x/j1", "EndpointSlice x/j1-a"]);
    }

    #[test]
    fn other_kinds_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm}}\ndata: {{a: b}}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n---\n{SVC_A}"
        );
        let f = write(dir.path(), "mixed.yaml", &text);
        let loaded = load_path(&f);
        assert_eq!(loaded.errors, vec![]);
        assert_eq!(names(&loaded), ["Service ns1/a"]);
    }

    #[test]
    fn yaml_syntax_error_names_file_and_keeps_other_documents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!("{SVC_A}---\nkind: Service\nmetadata: [unclosed\n---\n{SLICE_A}");
        let f = write(dir.path(), "broken.yaml", &text);
        let loaded = load_path(&f);
        assert_eq!(names(&loaded), ["Service ns1/a", "EndpointSlice ns1/a-1"]);
        assert_eq!(loaded.errors.len(), 1, "{:?}", loaded.errors);
        let e = &loaded.errors[0];
        assert_eq!(e.file, f);
        assert_eq!(e.object, None);
        assert!(e.message.contains("YAML syntax error"), "{}", e.message);
        // Located in the file (the unclosed list ends where the next document starts).
        assert_eq!(
            e.message,
            "YAML syntax error at line 14 column 1: did not find expected ',' or ']'"
        );
        assert!(e.to_string().contains("broken.yaml"), "{e}");
    }

    #[test]
    fn invalid_document_names_the_object() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: bad, namespace: kp}}\n\
             spec: {{ports: not-a-list}}\n---\n\
             apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\n\
             metadata: {{name: old}}\naddressType: IPv4\nendpoints: []\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{namespace: kp}}\n---\n\
             - just\n- a list\n---\n\
             metadata: {{name: no-kind}}\n---\n{SVC_A}"
        );
        let f = write(dir.path(), "invalid.yaml", &text);
        let loaded = load_path(&f);
        assert_eq!(names(&loaded), ["Service ns1/a"]);
        let got: Vec<(Option<&str>, &str)> = loaded
            .errors
            .iter()
            .map(|e| (e.object.as_deref(), e.message.as_str()))
            .collect();
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!(got[0].0, Some("Service kp/bad"));
        assert!(got[0].1.starts_with("invalid Service:"), "{}", got[0].1);
        assert_eq!(got[1].0, Some("EndpointSlice default/old"));
        assert!(got[1].1.contains("unsupported apiVersion"), "{}", got[1].1);
        assert_eq!(got[2], (Some("Service"), "metadata.name is required"));
        assert_eq!(got[3], (None, "document is not an object"));
        assert_eq!(got[4], (None, "object has no kind"));
        assert!(loaded.errors.iter().all(|e| e.file == f));
    }

    #[test]
    fn namespace_defaults_to_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: nons}\nspec: {clusterIP: 10.96.0.9}\n\
                    ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                    metadata: {name: nons-1, namespace: ''}\naddressType: IPv4\nendpoints: []\n";
        let f = write(dir.path(), "nons.yaml", text);
        let loaded = load_path(&f);
        assert_eq!(loaded.errors, vec![]);
        assert_eq!(
            names(&loaded),
            ["Service default/nons", "EndpointSlice default/nons-1"]
        );
    }

    #[test]
    fn directory_is_flat_sorted_and_filtered_by_extension() {
        let dir = tempfile::tempdir().expect("tempdir");
        let svc = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: 10.96.1.1}}\n"
            )
        };
        write(dir.path(), "b.yml", &svc("from-b"));
        write(dir.path(), "a.yaml", &svc("from-a"));
        write(
            dir.path(),
            "c.json",
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"from-c"}}"#,
        );
        write(dir.path(), "d.txt", &svc("from-txt"));
        write(dir.path(), "e.yaml", "kind: [broken\n");
        let sub = dir.path().join("sub.yaml");
        fs::create_dir(&sub).expect("mkdir");
        write(&sub, "nested.yaml", &svc("from-nested"));
        let loaded = load_path(dir.path());
        assert_eq!(
            names(&loaded),
            [
                "Service default/from-a",
                "Service default/from-b",
                "Service default/from-c"
            ]
        );
        assert_eq!(loaded.errors.len(), 1);
        assert_eq!(loaded.errors[0].file, dir.path().join("e.yaml"));
    }

    #[test]
    fn json_syntax_error_keeps_earlier_objects() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"ok"}} {"kind": "#;
        let f = write(dir.path(), "x.json", text);
        let loaded = load_path(&f);
        assert_eq!(names(&loaded), ["Service default/ok"]);
        assert_eq!(loaded.errors.len(), 1);
        assert!(loaded.errors[0].message.starts_with("JSON syntax error"));
    }

    #[test]
    fn missing_path_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("nope.yaml");
        let loaded = load_path(&p);
        assert_eq!(names(&loaded), Vec::<String>::new());
        assert_eq!(loaded.errors.len(), 1);
        assert_eq!(loaded.errors[0].file, p);
        assert!(loaded.errors[0].message.starts_with("cannot read"));
    }
}
