//! `bench-sync`: the agent at scale, inside the lab VM (via `scripts/bench sync`). A fake API
//! server holds N Services × M endpoints; the real agent (`--source kubernetes`) programs them
//! from empty; then single endpoint changes are applied one at a time and the time until the
//! kernel (an IPVS netlink dump of that service) shows each is measured. Prints one JSON object:
//! time to program, operations issued, the change→kernel latency percentiles, and the agent's
//! RSS. A benchmark: it asserts nothing about time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ipvs::{IpvsHandle, ServiceKey};
use lab::Netns;
use serde_json::{Value, json};

const API: &str = "127.0.0.1:6443";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        96 + (i / 62_500) as u8,
        ((i / 250) % 250) as u8,
        (i % 250) as u8 + 1,
    )
}

fn endpoint(i: usize, j: usize) -> Ipv4Addr {
    let n = i * 16 + j;
    Ipv4Addr::new(
        10,
        128 + (n / 62_500) as u8,
        ((n / 250) % 250) as u8,
        (n % 250) as u8 + 1,
    )
}

fn service(i: usize) -> String {
    let ip = vip(i);
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\nspec:\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  ports:\n  - {{name: p, protocol: TCP, port: 80, targetPort: 8080}}\n---\n"
    )
}

fn slice(i: usize, endpoints: usize) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: s{i}}}\naddressType: IPv4\nports:\n- {{name: p, protocol: TCP, port: 8080}}\nendpoints:\n"
    );
    for j in 0..endpoints {
        s.push_str(&format!(
            "- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n",
            endpoint(i, j)
        ));
    }
    s.push_str("---\n");
    s
}

fn bin(name: &str) -> String {
    std::env::var("KUBE_IPVS_BPF_BIN")
        .map(|b| b.replace("kube-ipvs-bpf", name))
        .unwrap_or_else(|_| name.to_string())
}

fn control(ns: &Netns, path: &str, body: String) -> anyhow::Result<()> {
    let path = path.to_string();
    ns.run(move || -> anyhow::Result<()> {
        let mut c = TcpStream::connect(API)?;
        write!(c, "POST {path} HTTP/1.1\r\nHost: {API}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
        let mut out = String::new();
        c.read_to_string(&mut out)?;
        if !out.starts_with("HTTP/1.1 2") {
            bail!("control {path}: {}", out.lines().next().unwrap_or(""));
        }
        Ok(())
    })
}

/// The agent's resident memory from /proc/PID/status, KiB: VmRSS and its peak (VmHWM), and
/// VmRSS's three parts: anonymous memory (the heap: what issue 17's goal counts), file pages
/// (the binary) and shared memory (the pages of mmapped BPF maps, e.g. the SNAT table).
fn rss_kib(pid: u32) -> Value {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    json!({
        "rss": field("VmRSS:"),
        "peak": field("VmHWM:"),
        "anon": field("RssAnon:"),
        "file": field("RssFile:"),
        "shmem": field("RssShmem:"),
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let services = arg("--services", 10_000);
    let endpoints = arg("--endpoints", 10);
    let changes = arg("--changes", 50);
    let spacing_ms = arg("--spacing-ms", 300) as u64;
    let ns = Netns::new("bench-sync");
    ns.sh("ip link add eth0 type dummy && ip addr add 10.0.1.1/24 dev eth0 && ip link set eth0 up");

    let dir = std::path::PathBuf::from("/tmp/bench-sync-manifests");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut objects = String::with_capacity(services * (400 + endpoints * 60));
    for i in 0..services {
        objects.push_str(&service(i));
        objects.push_str(&slice(i, endpoints));
    }
    std::fs::write(dir.join("objects.yaml"), objects)?;
    let kubeconfig = "/tmp/bench-sync-kubeconfig";
    let api = Kill(
        Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg(bin("fake-apiserver"))
            .args(["--listen", API, "--kubeconfig", kubeconfig, "--manifests"])
            .arg(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting fake-apiserver")?,
    );
    let mut api = api;
    let mut line = String::new();
    BufReader::new(api.0.stdout.take().context("fake-apiserver stdout")?).read_line(&mut line)?;
    if !line.contains("listening") {
        bail!("fake-apiserver: {line}");
    }

    let start = Instant::now();
    let mut agent = Kill(
        Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg(bin("kube-ipvs-bpf"))
            .args([
                "--log-format",
                "json",
                "run",
                "--source",
                "kubernetes",
                "--kubeconfig",
                kubeconfig,
            ])
            .args([
                "--node-name",
                "lab",
                "--min-sync-period",
                "100ms",
                "--sync-period",
                "1h",
            ])
            .args([
                "--bpf-pin-root",
                "/sys/fs/bpf/bench-sync",
                "--state-dir",
                "/tmp/bench-sync-state",
            ])
            .args([
                "--metrics-bind-address",
                "127.0.0.1:0",
                "--healthz-bind-address",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kube-ipvs-bpf")?,
    );
    let pid = agent.0.id();
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let stderr = agent.0.stderr.take().context("agent stderr")?;
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&l) {
                let _ = tx.send(v);
            }
        }
    });
    let first = loop {
        let v = rx
            .recv_timeout(Duration::from_secs(1800))
            .context("no first sync")?;
        if v["message"] == "sync done" {
            break v;
        }
        if v["level"] == "ERROR" {
            eprintln!("agent: {v}");
        }
    };
    let programmed_s = start.elapsed().as_secs_f64();
    let rss_after_sync = rss_kib(pid);

    // Single endpoint changes, each measured until the kernel shows it.
    let latencies = ns.run(move || -> anyhow::Result<Vec<f64>> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async {
            let h = IpvsHandle::connect().await?;
            let mut out = Vec::new();
            for c in 0..changes {
                let i = (c * 7919) % services;
                let key = ServiceKey::tcp(IpAddr::V4(vip(i)), 80);
                let before = h.destinations(&key).await?.len();
                let body = slice(i, endpoints + 1);
                let t0 = Instant::now();
                // The POST itself is part of the change's path (the API server accepting it).
                tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                    let mut c = TcpStream::connect(API)?;
                    write!(c, "POST /control/apply HTTP/1.1\r\nHost: {API}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
                    let mut out = String::new();
                    c.read_to_string(&mut out)?;
                    Ok(())
                })
                .await??;
                let deadline = t0 + Duration::from_secs(30);
                loop {
                    if h.destinations(&key).await?.len() > before {
                        out.push(t0.elapsed().as_secs_f64() * 1e3);
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!("change {c} (service s{i}) not programmed within 30 s");
                    }
                    // Polled every 2 ms: the VM has one vCPU, which the agent needs too.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                tokio::time::sleep(Duration::from_millis(spacing_ms)).await;
            }
            Ok(out)
        })
    })?;
    let rss_end = rss_kib(pid);
    // The agent's own account of each change's sync.
    let syncs: Vec<Value> = rx
        .try_iter()
        .filter(|v| v["message"] == "sync done")
        .collect();
    let mut sync_ms: Vec<f64> = syncs
        .iter()
        .filter_map(|v| v["duration_ms"].as_f64())
        .collect();
    sync_ms.sort_by(f64::total_cmp);
    // Per-phase medians (the agent logs where each sync's time went).
    let mut phases: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for v in &syncs {
        let p: Value = v["phases"]
            .as_str()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null);
        for (k, ms) in p.as_object().into_iter().flatten() {
            phases
                .entry(k.clone())
                .or_default()
                .push(ms.as_f64().unwrap_or(0.0));
        }
    }
    let phase_p50: serde_json::Map<String, Value> = phases
        .into_iter()
        .map(|(k, mut v)| {
            v.sort_by(f64::total_cmp);
            (k, json!(percentile(&v, 0.5)))
        })
        .collect();
    let _ = control(&ns, "/control/compact", String::new());
    let mut sorted = latencies.clone();
    sorted.sort_by(f64::total_cmp);
    let ops: Value = first["ipvs_ops"]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "{}",
        json!({
            "kernel": release.trim(),
            "services": services,
            "endpoints_per_service": endpoints,
            "programmed_from_empty_s": programmed_s,
            "first_sync_ms": first["duration_ms"],
            "first_sync_ipvs_ops": ops["issued"],
            "first_sync_map_changes": first["map_changes"],
            "change_latency_ms": {
                "count": sorted.len(),
                "p50": percentile(&sorted, 0.50),
                "p90": percentile(&sorted, 0.90),
                "p99": percentile(&sorted, 0.99),
                "max": sorted.last().copied().unwrap_or(0.0),
                "spacing_ms": spacing_ms,
                "min_sync_period_ms": 100,
            },
            "change_sync_duration_ms": {
                "count": sync_ms.len(),
                "p50": percentile(&sync_ms, 0.50),
                "p99": percentile(&sync_ms, 0.99),
                "phases_p50": phase_p50,
            },
            "agent_rss_kib": {
                "after_first_sync": rss_after_sync["rss"],
                "peak_after_first_sync": rss_after_sync["peak"],
                "end": rss_end["rss"],
                "peak": rss_end["peak"],
            },
            "agent_rss_parts_kib": {"after_first_sync": rss_after_sync, "end": rss_end},
            // The allocator's own account after the first sync's trim (glibc mallinfo2).
            "agent_heap_kib": {"in_use": first["heap_in_use_kib"], "free": first["heap_free_kib"]},
        })
    );
    drop(agent);
    let _ = std::fs::remove_dir_all("/sys/fs/bpf/bench-sync");
    Ok(())
}
