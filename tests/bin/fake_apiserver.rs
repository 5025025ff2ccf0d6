//! `fake-apiserver`: the fake Kubernetes API server of [`lab::fake_apiserver`] as a process,
//! for lab tests that run the agent with `--source kubernetes` inside the QEMU VM.
//!
//! ```text
//! fake-apiserver [--listen 127.0.0.1:6443] [--manifests DIR] [--kubeconfig PATH]
//! ```
//!
//! Loads every `*.yaml`/`*.yml`/`*.json` file of `DIR` (in name order), writes a kubeconfig
//! pointing at itself to `PATH`, prints `listening on http://ADDR` and serves until SIGTERM or
//! SIGINT. While it runs, it is driven over HTTP on the same port: `POST /control/apply` (a
//! YAML body), `POST /control/delete?kind=..&namespace=..&name=..`, `POST /control/compact`,
//! `POST /control/bookmarks`, `POST /control/disconnect`, `POST /control/down?seconds=S`,
//! `GET /control/requests`, `GET /control/events` (see the library module for details).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use lab::fake_apiserver::FakeApiServer;

struct Args {
    listen: SocketAddr,
    manifests: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 6443)),
        manifests: None,
        kubeconfig: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--listen" => {
                let v = value()?;
                args.listen = v.parse().with_context(|| format!("--listen {v:?}"))?;
            }
            "--manifests" => args.manifests = Some(PathBuf::from(value()?)),
            "--kubeconfig" => args.kubeconfig = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                println!("fake-apiserver [--listen ADDR] [--manifests DIR] [--kubeconfig PATH]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(args)
}

fn load_dir(server: &FakeApiServer, dir: &Path) -> anyhow::Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    files.sort();
    for f in files {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        server
            .apply_yaml(&text)
            .with_context(|| format!("loading {}", f.display()))?;
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let server = FakeApiServer::start_on(args.listen).await?;
    if let Some(dir) = &args.manifests {
        load_dir(&server, dir)?;
    }
    if let Some(path) = &args.kubeconfig {
        server.write_kubeconfig(path)?;
    }
    println!("listening on {}", server.url());
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
