//! Watching a file source: the manifests are re-read whenever a file under the path changes
//! (polled, so it also follows ConfigMap-style symlink swaps), and each new set of objects is
//! published as a [`Snapshot`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use std::hash::{Hash, Hasher};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::watch;

use super::Snapshot;
use super::file::load_path;

/// What identifies the content of a path cheaply: each file's name, size and modification time.
fn fingerprint(path: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut files = vec![path.to_path_buf()];
    if let Ok(rd) = std::fs::read_dir(path) {
        files.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
    }
    let mut out: Vec<_> = files
        .into_iter()
        .map(|f| {
            let m = std::fs::metadata(&f).ok();
            let len = m.as_ref().map_or(0, |m| m.len());
            (f, len, m.and_then(|m| m.modified().ok()))
        })
        .collect();
    out.sort();
    out
}

/// Gives an object without a `resourceVersion` a hash of its content as one (so unchanged
/// objects of a re-read file are recognized, as the API server's versions are), and returns it
/// shared, with its (namespace, name).
fn versioned<K: k8s_openapi::Metadata<Ty = ObjectMeta> + serde::Serialize>(mut obj: K) -> Arc<K> {
    if obj.metadata().resource_version.is_none() {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_vec(&obj).unwrap_or_default().hash(&mut h);
        obj.metadata_mut().resource_version = Some(format!("file-{:016x}", h.finish()));
    }
    Arc::new(obj)
}

/// Objects in (namespace, name) order, as the Kubernetes source keeps them.
fn sorted<K: k8s_openapi::Metadata<Ty = ObjectMeta>>(mut v: Vec<Arc<K>>) -> Vec<Arc<K>> {
    v.sort_by(|a, b| {
        let k = |o: &Arc<K>| {
            let m = o.metadata();
            (
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default(),
            )
        };
        k(a).cmp(&k(b))
    });
    v
}

/// Loads `path` once, logging every error with the file and object it is about.
pub fn load_snapshot(path: &Path, generation: u64) -> Snapshot {
    let loaded = load_path(path);
    for e in &loaded.errors {
        tracing::warn!(file = %e.file.display(), object = e.object.as_deref().unwrap_or(""), "{}", e.message);
    }
    Snapshot {
        services: sorted(loaded.services.into_iter().map(versioned).collect()),
        endpoint_slices: sorted(loaded.endpoint_slices.into_iter().map(versioned).collect()),
        node: None,
        generation,
    }
}

/// Loads `path` now and spawns a task that publishes a new snapshot after every change.
pub fn watch_path(path: PathBuf, poll: Duration) -> watch::Receiver<Arc<Snapshot>> {
    let mut seen = fingerprint(&path);
    let (tx, rx) = watch::channel(Arc::new(load_snapshot(&path, 1)));
    tokio::spawn(async move {
        let mut generation = 1;
        loop {
            tokio::time::sleep(poll).await;
            let now = fingerprint(&path);
            if now == seen {
                continue;
            }
            seen = now;
            generation += 1;
            tracing::info!(path = %path.display(), generation, "source changed");
            if tx.send(Arc::new(load_snapshot(&path, generation))).is_err() {
                return;
            }
        }
    });
    rx
}
