//! Watching a file source: the manifests are re-read whenever a file under the path changes
//! (polled, so it also follows ConfigMap-style symlink swaps), and each new set of objects is
//! published as a [`Snapshot`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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

/// Loads `path` once, logging every error with the file and object it is about.
pub fn load_snapshot(path: &Path, generation: u64) -> Snapshot {
    let loaded = load_path(path);
    for e in &loaded.errors {
        tracing::warn!(file = %e.file.display(), object = e.object.as_deref().unwrap_or(""), "{}", e.message);
    }
    Snapshot {
        services: loaded.services,
        endpoint_slices: loaded.endpoint_slices,
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
