//! Watching a file source: the manifests are re-read whenever a file under the path changes
//! (polled, so it also follows ConfigMap-style symlink swaps), and each new set of objects is
//! published as a [`Snapshot`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::Snapshot;
use super::file::{ManifestReader, is_manifest_name};
use crate::model::{EndpointSliceInfo, ServiceInfo};

/// What identifies the content of a path cheaply: the name, size and modification time of each
/// file the loader reads (a directory's other entries, e.g. a temporary file being written
/// before it is renamed into place, change nothing).
fn fingerprint(path: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let files: Vec<PathBuf> = match std::fs::read_dir(path) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_manifest_name(p))
            .collect(),
        Err(_) => vec![path.to_path_buf()],
    };
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
    read_snapshot(&mut ManifestReader::default(), path, generation)
}

/// Loads `path` with `reader` (which keeps each file's last good content), logging every error,
/// every skipped directory entry and every file whose last good content is used.
pub fn read_snapshot(reader: &mut ManifestReader, path: &Path, generation: u64) -> Snapshot {
    let loaded = reader.load(path);
    for e in &loaded.errors {
        tracing::warn!(file = %e.file.display(), object = e.object.as_deref().unwrap_or(""), "{}", e.message);
    }
    for e in &loaded.skipped {
        tracing::warn!(file = %e.file.display(), "{}", e.message);
    }
    for f in &loaded.kept {
        tracing::warn!(file = %f.display(), "keeping the objects of this file's last good read until it reads cleanly");
    }
    Snapshot {
        // The first object of a (namespace, name) is used, the model rejects the others.
        services: loaded
            .services
            .into_iter()
            .map(|s| Arc::new(ServiceInfo::from(s)))
            .collect(),
        endpoint_slices: loaded
            .endpoint_slices
            .into_iter()
            .map(|s| Arc::new(EndpointSliceInfo::from(s)))
            .collect(),
        node: None,
        generation,
    }
}

/// Loads `path` now and spawns a task that publishes a new snapshot after every change.
pub fn watch_path(path: PathBuf, poll: Duration) -> watch::Receiver<Arc<Snapshot>> {
    let mut seen = fingerprint(&path);
    let mut reader = ManifestReader::default();
    let (tx, rx) = watch::channel(Arc::new(read_snapshot(&mut reader, &path, 1)));
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
            let snapshot = read_snapshot(&mut reader, &path, generation);
            if tx.send(Arc::new(snapshot)).is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns1}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
";

    #[test]
    fn fingerprint_ignores_files_the_loader_does_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("services.yaml"), SVC).expect("write");
        let before = fingerprint(dir.path());
        // A writer's temporary file, before it is renamed into place.
        std::fs::write(dir.path().join(".services.yaml.tmp"), SVC).expect("write");
        std::fs::write(dir.path().join("notes.txt"), "x").expect("write");
        assert_eq!(fingerprint(dir.path()), before);
        std::fs::write(dir.path().join("more.json"), "{}").expect("write");
        assert_ne!(fingerprint(dir.path()), before);
    }

    #[test]
    fn fingerprint_of_a_single_file_follows_its_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("services.yaml");
        std::fs::write(&file, SVC).expect("write");
        let before = fingerprint(&file);
        std::fs::write(&file, format!("{SVC}---\n{SVC}")).expect("write");
        assert_ne!(fingerprint(&file), before);
    }

    #[tokio::test]
    async fn a_temporary_file_publishes_nothing_until_renamed_into_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("services.yaml"), SVC).expect("write");
        let mut rx = watch_path(dir.path().to_path_buf(), Duration::from_millis(5));
        assert_eq!(rx.borrow_and_update().generation, 1);
        let tmp = dir.path().join(".services.yaml.tmp");
        std::fs::write(&tmp, SVC.replace("name: a", "name: b")).expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!rx.has_changed().expect("watcher alive"));
        std::fs::rename(&tmp, dir.path().join("services.yaml")).expect("rename");
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("a snapshot after the rename")
            .expect("watcher alive");
        let snap = rx.borrow_and_update().clone();
        assert_eq!(snap.generation, 2);
        assert_eq!(snap.services.len(), 1);
        let first = snap.services.iter().next().expect("a Service");
        assert_eq!(&*first.name, "b");
    }
}
