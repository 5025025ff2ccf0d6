//! `bench-sync`: the agent at scale, inside the lab VM (via `scripts/bench sync`). A fake API
//! server holds N Services × M endpoints; the real agent (`--source kubernetes`, in a cgroup of
//! its own) programs them from empty; then single endpoint changes are applied one at a time
//! and the time until the kernel (an IPVS netlink dump of that service) shows each is measured,
//! with where each change's time went (the source's publish and the sync, from the agent's
//! log, and which threads and processes used the CPU meanwhile); then the agent idles with its
//! tables full (its CPU over `--idle-seconds`, sweeps included); then a rolling-update churn
//! (every `--churn-interval-ms` one Service's slice loses an endpoint and gains a new one, for
//! `--churn-seconds`) reports the agent's CPU and the change→kernel latency together. Prints one
//! JSON object: time to program, operations issued, latency percentiles, CPU, the agent's RSS
//! and its cgroup's `memory.current`. A benchmark: it asserts nothing about time.
//!
//! Clocks: latencies are the guest's CLOCK_MONOTONIC (under TCG it follows the host's real
//! time, so a slow emulated CPU makes them longer than on hardware); CPU figures are the
//! guest's `/proc` utime+stime ticks (USER_HZ) over that same wall time.

mod procstat;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ipvs::{IpvsHandle, ServiceKey};
use lab::Netns;
use lab::apiserver::API;
use serde_json::{Value, json};

use procstat::{busy_processes, cpu_ticks, stat_ticks, ticks_per_second};

/// The agent's cgroup (v2), whose `memory.current` charges its heap, page cache and kernel
/// objects (BPF maps included).
const AGENT_CGROUP: &str = "/sys/fs/cgroup/bench-sync-agent";

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The command line (numbers only; defaults in brackets).
struct Options {
    /// `--services` [10000] Services of `--endpoints` [10] endpoints each.
    services: usize,
    endpoints: usize,
    /// `--changes` [50] single endpoint additions, `--spacing-ms` [300] apart.
    changes: usize,
    spacing_ms: u64,
    /// The agent's `--min-sync-period` [0 ms], `--sync-period` [3600 s] (full resyncs),
    /// `--sweep-period` [10000 ms] and `--node-check-period` [5 s, the agent's default].
    min_sync_period_ms: u64,
    sync_period_s: u64,
    sweep_period_ms: u64,
    node_check_period_s: u64,
    /// The pause between the first sync and the first change [10 s] (the first sync's
    /// aftermath, e.g. 10,000 kube-ipvs0 address events, is not a change's cost); the idle
    /// phase [60 s]; the churn phase [60 s], one endpoint replaced every
    /// `--churn-interval-ms` [100].
    settle_seconds: u64,
    idle_seconds: u64,
    churn_seconds: u64,
    churn_interval_ms: u64,
    /// `--profile-first-sync` [0]: 1 records a system-wide `perf` profile (cpu-clock, call
    /// graphs) of the first sync (from the agent's "Kubernetes source synced", its first
    /// snapshot, to its "sync done"; perf's start-up takes the first moments), and prints its heaviest symbols
    /// (`first_sync_profile`: process, DSO, symbol, share of all samples).
    profile_first_sync: bool,
}

impl Options {
    fn parse() -> Self {
        Self {
            services: arg("--services", 10_000),
            endpoints: arg("--endpoints", 10),
            changes: arg("--changes", 50),
            spacing_ms: arg("--spacing-ms", 300) as u64,
            min_sync_period_ms: arg("--min-sync-period-ms", 0) as u64,
            sync_period_s: arg("--sync-period-s", 3600) as u64,
            sweep_period_ms: arg("--sweep-period-ms", 10_000) as u64,
            node_check_period_s: arg("--node-check-period-s", 5) as u64,
            settle_seconds: arg("--settle-seconds", 10) as u64,
            idle_seconds: arg("--idle-seconds", 60) as u64,
            churn_seconds: arg("--churn-seconds", 60) as u64,
            churn_interval_ms: arg("--churn-interval-ms", 100).max(1) as u64,
            profile_first_sync: arg("--profile-first-sync", 0) != 0,
        }
    }
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

/// The `n`th endpoint the churn phase adds (172.16.0.1 on: apart from [`endpoint`]'s).
fn churn_endpoint(n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 1)) + n as u32)
}

fn service(i: usize) -> String {
    let ip = vip(i);
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\nspec:\n  clusterIP: {ip}\n  clusterIPs: [{ip}]\n  ports:\n  - {{name: p, protocol: TCP, port: 80, targetPort: 8080}}\n---\n"
    )
}

/// Service `i`'s first `endpoints` endpoints.
fn endpoints_of(i: usize, endpoints: usize) -> Vec<Ipv4Addr> {
    (0..endpoints).map(|j| endpoint(i, j)).collect()
}

/// Service `i`'s EndpointSlice with these ready endpoints.
fn slice(i: usize, addresses: &[Ipv4Addr]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-1\n  namespace: bench\n  labels: {{kubernetes.io/service-name: s{i}}}\naddressType: IPv4\nports:\n- {{name: p, protocol: TCP, port: 8080}}\nendpoints:\n"
    );
    for a in addresses {
        s.push_str(&format!(
            "- addresses: [\"{a}\"]\n  conditions: {{ready: true}}\n"
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

/// POSTs `body` to the fake API server's control endpoint `path`, from the calling thread
/// (which must be in the bench's network namespace).
fn post(path: &str, body: &str) -> anyhow::Result<()> {
    lab::apiserver::request("POST", path, body).with_context(|| format!("POST {path}"))?;
    Ok(())
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

/// `--bpf-map-size` arguments for maps whose default size `services` would overflow: one
/// `svc_addrs` entry per ClusterIP and one `svc_ports` entry per port (both 65,536 by default,
/// `probes::maps`), with a quarter to spare, in powers of two.
fn map_sizes(services: usize) -> Vec<String> {
    let mut out = Vec::new();
    for (map, default) in [("svc_addrs", 65_536), ("svc_ports", 65_536)] {
        if services > default * 3 / 4 {
            out.push("--bpf-map-size".into());
            out.push(format!(
                "{map}={}",
                (services + services / 4).next_power_of_two()
            ));
        }
    }
    out
}

/// Makes the agent's cgroup: mounts cgroup2 on /sys/fs/cgroup if nothing is there (the lab's
/// initramfs does not), enables the memory controller for the root's children, and creates
/// [`AGENT_CGROUP`]. `None` (said on stderr) if any of it fails: the bench then runs without.
fn agent_cgroup() -> Option<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if !root.join("cgroup.controllers").exists() {
        let _ = std::fs::create_dir_all(root);
        let mounted = Command::new("mount")
            .args(["-t", "cgroup2", "none", "/sys/fs/cgroup"])
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("bench-sync: no cgroup2 at /sys/fs/cgroup: memory.current not reported");
            return None;
        }
    }
    if let Err(e) = std::fs::write(root.join("cgroup.subtree_control"), "+memory") {
        eprintln!("bench-sync: enabling the memory controller: {e}");
    }
    let dir = PathBuf::from(AGENT_CGROUP);
    let _ = std::fs::remove_dir(&dir);
    if let Err(e) = std::fs::create_dir(&dir) {
        eprintln!("bench-sync: creating {AGENT_CGROUP}: {e}");
        return None;
    }
    dir.join("memory.current").exists().then_some(dir)
}

/// The cgroup's memory, KiB: `memory.current` (everything charged to it: heap, page cache,
/// kernel objects such as BPF maps and sockets), `memory.peak` where the kernel has it, and
/// `memory.stat`'s main parts.
fn cgroup_memory_kib(dir: &Path) -> Value {
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(f))
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
            .map(|b| b / 1024)
    };
    let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
    let mut out = serde_json::Map::new();
    out.insert("current".into(), json!(read("memory.current")));
    out.insert("peak".into(), json!(read("memory.peak")));
    for key in [
        "anon",
        "file",
        "kernel",
        "kernel_stack",
        "pagetables",
        "percpu",
        "sock",
        "slab",
        "shmem",
    ] {
        let v = stat
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse::<u64>().ok());
        if let Some(v) = v {
            out.insert(key.into(), json!(v / 1024));
        }
    }
    Value::Object(out)
}

/// The whole guest's busy and total CPU ticks so far, from /proc/stat's `cpu` line (busy: all
/// but idle and iowait).
fn system_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle.min(total), total)
}

/// The CPU ticks of a process's children that it waited for (cutime+cstime: the agent's
/// `iptables-save`/`iptables-restore` runs, which a snapshot of /proc misses when they end
/// between two snapshots).
fn children_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<u64> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // After the command: state (not a number) is dropped, so cutime and cstime (fields 16 and
    // 17) are at 12 and 13.
    f.get(12).copied().unwrap_or(0) + f.get(13).copied().unwrap_or(0)
}

/// CPU use over a window: the agent's (total and by thread name) and the other processes'
/// that used any, with the whole guest's busy share.
struct CpuWindow {
    at: Instant,
    agent: u64,
    children: u64,
    threads: BTreeMap<u32, (String, u64)>,
    processes: BTreeMap<u32, (String, u64)>,
    system: (u64, u64),
}

impl CpuWindow {
    fn start(pid: u32) -> Self {
        Self {
            at: Instant::now(),
            agent: stat_ticks(&format!("/proc/{pid}/stat")).map_or(0, |s| s.1),
            children: children_ticks(pid),
            threads: cpu_ticks(&format!("/proc/{pid}/task")),
            processes: cpu_ticks("/proc"),
            system: system_ticks(),
        }
    }

    /// The window so far: seconds, the agent's CPU % of one CPU, its threads' and the busy
    /// processes' CPU seconds, and the guest's busy %.
    fn end(&self, pid: u32) -> Value {
        let secs = self.at.elapsed().as_secs_f64();
        let hz = ticks_per_second();
        let agent = stat_ticks(&format!("/proc/{pid}/stat")).map_or(0, |s| s.1);
        let (busy, total) = system_ticks();
        let round = |m: BTreeMap<String, f64>| -> BTreeMap<String, f64> {
            m.into_iter()
                .map(|(k, v)| (k, (v * 1000.0).round() / 1000.0))
                .collect()
        };
        let children = children_ticks(pid).saturating_sub(self.children);
        json!({
            "seconds": secs,
            "agent_children_cpu_s": children as f64 / hz,
            "agent_cpu_percent": (agent.saturating_sub(self.agent)) as f64 / hz / secs.max(1e-9) * 100.0,
            "agent_threads_cpu_s": round(busy_processes(&self.threads, &cpu_ticks(&format!("/proc/{pid}/task")))),
            "processes_cpu_s": round(busy_processes(&self.processes, &cpu_ticks("/proc"))),
            "system_busy_percent": busy.saturating_sub(self.system.0) as f64
                / (total.saturating_sub(self.system.1)).max(1) as f64 * 100.0,
        })
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// count, p50, p90, p99 and max of `values` (ms).
fn distribution(mut values: Vec<f64>) -> Value {
    values.sort_by(f64::total_cmp);
    json!({
        "count": values.len(),
        "p50": percentile(&values, 0.50),
        "p90": percentile(&values, 0.90),
        "p99": percentile(&values, 0.99),
        "max": values.last().copied().unwrap_or(0.0),
    })
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent's JSON log lines.
type Log = Receiver<Value>;

/// Seconds since the Unix epoch of an RFC 3339 UTC timestamp as the agent's JSON log writes it
/// (`2026-12-06T06:10:00.123456Z`).
fn unix_seconds(ts: &str) -> Option<f64> {
    let (date, time) = ts.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':').map(|x| x.parse::<f64>().ok());
    let (h, min, sec) = (t.next()??, t.next()??, t.next()??);
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + sec)
}

/// Now, in seconds since the Unix epoch (the clock the agent's log timestamps are on).
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Gives the calling thread (and the threads it starts: the runtime's blocking pool, which
/// posts the changes) nice 10. The changes are seen by polling IPVS every 2 ms, which at nice 0
/// took as much of the VM's one vCPU as the agent did while a change was under way (60 of 108
/// ms in the slowest changes): the observer must not slow down what it times. At nice 10 the
/// agent (nice 0) gets 90% of the CPU against it, and it still gets 88% against khugepaged
/// (nice 19), which at nice 19 delayed seeing one change by 28 ms. A change's POST starts on an
/// idle CPU (changes are spaced), so its own timing is unaffected.
fn observer_priority() {
    // SAFETY: setpriority takes no pointers; PRIO_PROCESS with a thread id sets that thread's
    // nice value (Linux).
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
    if r != 0 {
        eprintln!(
            "bench-sync: the IPVS poller keeps nice 0: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// One single endpoint change of the changes phase: its latency, and where the time went, in
/// ms from the POST (`t0`, seconds since the epoch; the caller adds when the API server
/// answered it, `posted_ms`) by the agent's own log timestamps: the source's snapshot
/// published ("source changed", debug), the sync's "sync done" line logged (after the sync and
/// the metrics and health updates that follow it) and, that line's time less the sync's
/// duration, when the sync started (at the latest); node checks that overlapped; and who used
/// the CPU meanwhile.
fn change_record(service: usize, t0: f64, latency_ms: f64, log: &[Value], cpu: Value) -> Value {
    let at =
        |v: &Value| -> Option<f64> { Some((unix_seconds(v["timestamp"].as_str()?)? - t0) * 1e3) };
    let after = |message: &str| {
        log.iter()
            .find(|v| v["message"] == message && at(v).is_some_and(|ms| ms >= 0.0))
    };
    let published = after("source changed").and_then(at);
    // Node checks that ran during the change (each line is logged at its end).
    let node_checks: Vec<Value> = log
        .iter()
        .filter(|v| v["message"] == "node state checked")
        .filter_map(|v| {
            let end = at(v)?;
            let ms = v["duration_ms"].as_f64()?;
            (end >= 0.0 && end - ms <= latency_ms).then(
                || json!({"ended_ms": end, "duration_ms": ms, "datapath_ms": v["datapath_ms"]}),
            )
        })
        .collect();
    let sync = after("sync done");
    let sync_ms = sync.and_then(|v| v["duration_ms"].as_f64());
    let sync_done = sync.and_then(at);
    json!({
        "service": service,
        "latency_ms": latency_ms,
        "published_ms": published,
        "sync_started_ms": sync_done.zip(sync_ms).map(|(d, s)| d - s),
        "sync_logged_ms": sync_done,
        "sync_ms": sync_ms,
        "node_checks": node_checks,
        "phases": sync.and_then(|v| v["phases"].as_str().and_then(|s| serde_json::from_str::<Value>(s).ok())),
        "cpu": cpu,
    })
}

/// The changes phase: `changes` single endpoint additions, one at a time, each timed until
/// the IPVS dump of its service shows it; returns each change's record, and that of one change
/// made first, untimed in the figures: the warm-up. The first change took 100-200 ms where the
/// next took 30-40, its POST and every phase of its sync 5-60x slower alike: most likely QEMU
/// TCG translating code on its first execution, as that change is the first to run the
/// incremental model, the scoped plans and the fake API server's update path. Runs on a thread
/// in the bench's namespace.
fn changes_phase(
    o: &Options,
    pid: u32,
    log: &Log,
    current: &mut HashMap<usize, Vec<Ipv4Addr>>,
) -> anyhow::Result<(Vec<Value>, Value)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    observer_priority();
    rt.block_on(async {
        let h = IpvsHandle::connect().await?;
        let mut out = Vec::new();
        let mut warmup = Value::Null;
        let mut lines = Vec::new();
        for c in 0..=o.changes {
            let i = (c * 7919) % o.services;
            let key = ServiceKey::tcp(IpAddr::V4(vip(i)), 80);
            let before = h.destinations(&key).await?.len();
            let addresses = current
                .entry(i)
                .or_insert_with(|| endpoints_of(i, o.endpoints));
            addresses.push(endpoint(i, addresses.len()));
            let body = slice(i, addresses);
            let cpu = CpuWindow::start(pid);
            let t0 = Instant::now();
            let t0_unix = unix_now();
            // The POST itself is part of the change's path (the API server accepting it).
            tokio::task::spawn_blocking(move || post("/control/apply", &body)).await??;
            let posted = t0.elapsed().as_secs_f64() * 1e3;
            let deadline = t0 + Duration::from_secs(30);
            let latency = loop {
                if h.destinations(&key).await?.len() > before {
                    break t0.elapsed().as_secs_f64() * 1e3;
                }
                if Instant::now() > deadline {
                    bail!("change {c} (service s{i}) not programmed within 30 s");
                }
                // Polled every 2 ms: the VM has one vCPU, which the agent needs too.
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            let cpu = cpu.end(pid);
            tokio::time::sleep(Duration::from_millis(o.spacing_ms)).await;
            lines.extend(log.try_iter());
            let mut record = change_record(i, t0_unix, latency, &lines, cpu);
            record["posted_ms"] = json!(posted);
            // From the API server's answer to the kernel: the watch, the agent, IPVS.
            record["after_post_ms"] = json!(latency - posted);
            if c == 0 {
                warmup = record;
            } else {
                out.push(record);
            }
            lines.clear();
        }
        Ok((out, warmup))
    })
}

/// The churn phase (a rolling update): every `churn_interval_ms` one Service's slice loses its
/// oldest endpoint and gains a new one, for `churn_seconds`; each change is timed until the
/// IPVS dump of its service shows the new endpoint (polled every 2 ms, several changes may be
/// under way). Returns the latencies (ms) and the changes not seen within 30 s.
fn churn_phase(
    o: &Options,
    current: HashMap<usize, Vec<Ipv4Addr>>,
) -> anyhow::Result<(Vec<f64>, usize)> {
    let (services, endpoints) = (o.services, o.endpoints);
    let interval = Duration::from_millis(o.churn_interval_ms);
    let length = Duration::from_secs(o.churn_seconds);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    observer_priority();
    rt.block_on(async move {
        let h = IpvsHandle::connect().await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(ServiceKey, IpAddr, Instant)>();
        let generator = tokio::spawn(async move {
            let mut current = current;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let end = Instant::now() + length;
            let mut n = 0;
            while Instant::now() < end {
                tick.tick().await;
                let i = (n * 104_729 + 17) % services;
                let addresses = current
                    .entry(i)
                    .or_insert_with(|| endpoints_of(i, endpoints));
                if !addresses.is_empty() {
                    addresses.remove(0);
                }
                let new = churn_endpoint(n);
                addresses.push(new);
                let body = slice(i, addresses);
                let t0 = Instant::now();
                tokio::task::spawn_blocking(move || post("/control/apply", &body)).await??;
                let key = ServiceKey::tcp(IpAddr::V4(vip(i)), 80);
                if tx.send((key, IpAddr::V4(new), t0)).is_err() {
                    break;
                }
                n += 1;
            }
            anyhow::Ok(n)
        });
        let mut pending: Vec<(ServiceKey, IpAddr, Instant)> = Vec::new();
        let mut latencies = Vec::new();
        let mut missed = 0;
        let mut open = true;
        while open || !pending.is_empty() {
            tokio::select! {
                m = rx.recv(), if open => match m {
                    Some(change) => pending.push(change),
                    None => open = false,
                },
                _ = tokio::time::sleep(Duration::from_millis(2)), if !pending.is_empty() => {
                    let mut still = Vec::new();
                    for (key, address, t0) in pending.drain(..) {
                        if h.destinations(&key).await?.iter().any(|d| d.address == address) {
                            latencies.push(t0.elapsed().as_secs_f64() * 1e3);
                        } else if t0.elapsed() > Duration::from_secs(30) {
                            missed += 1;
                        } else {
                            still.push((key, address, t0));
                        }
                    }
                    pending = still;
                }
            }
        }
        generator.await??;
        Ok((latencies, missed))
    })
}

/// `perf record -a -g` (cpu-clock) over the agent's first sync.
struct FirstSyncProfile(Kill);

const FIRST_SYNC_PERF_DATA: &str = "/tmp/perf-first-sync.data";

impl FirstSyncProfile {
    fn start() -> anyhow::Result<Self> {
        let perf = Command::new("perf")
            .args([
                "record",
                "-a",
                "-g",
                "-F",
                "499",
                "-o",
                FIRST_SYNC_PERF_DATA,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record (--profile-first-sync)")?;
        Ok(Self(Kill(perf)))
    }

    /// Stops the recording; the symbols over 0.2% of the samples, by process, DSO and symbol
    /// (self time), by process alone, and the agent's functions by inclusive time.
    fn finish(mut self) -> anyhow::Result<Value> {
        let pid = self.0.0.id().to_string();
        Command::new("kill").args(["-INT", &pid]).status()?;
        self.0.0.wait()?;
        let report = |sort: &str, limit: &str, more: &[&str]| -> anyhow::Result<Vec<String>> {
            let out = Command::new("perf")
                .args(["report", "-i", FIRST_SYNC_PERF_DATA, "--stdio", "-q"])
                .args(["-g", "none", "--sort", sort, "--percent-limit", limit])
                .args(more)
                .stderr(Stdio::null())
                .output()
                .context("perf report")?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                .filter(|l| !l.is_empty())
                .collect())
        };
        Ok(json!({
            "by_process": report("comm", "0.5", &["--no-children"])?,
            "symbols": report("comm,dso,sym", "0.2", &["--no-children"])?,
            // Inclusive (self + callees) in the agent's main thread (its runtime is
            // single-threaded): which calls hold the time.
            "agent_inclusive": report("sym", "1", &["--children", "--comms", "kube-ipvs-bpf"])?,
        }))
    }
}

fn main() -> anyhow::Result<()> {
    let o = Options::parse();
    let ns = Netns::new("bench-sync");
    ns.sh("ip link add eth0 type dummy && ip addr add 10.0.1.1/24 dev eth0 && ip link set eth0 up");

    let dir = std::path::PathBuf::from("/tmp/bench-sync-manifests");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    {
        // Written as generated: at 50,000 Services the whole text would be another 50 MB.
        let mut objects = std::io::BufWriter::new(std::fs::File::create(dir.join("objects.yaml"))?);
        for i in 0..o.services {
            objects.write_all(service(i).as_bytes())?;
            objects.write_all(slice(i, &endpoints_of(i, o.endpoints)).as_bytes())?;
        }
        objects.flush()?;
    }
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
    let api_pid = api.0.id();
    let mut line = String::new();
    BufReader::new(api.0.stdout.take().context("fake-apiserver stdout")?).read_line(&mut line)?;
    if !line.contains("listening") {
        bail!("fake-apiserver: {line}");
    }
    let api_rss_loaded = rss_kib(api_pid);

    let cgroup = agent_cgroup();
    // The agent joins its cgroup before it starts (sh writes its own pid, then execs nsenter,
    // which execs the agent: one pid throughout).
    let mut command = Command::new("sh");
    match &cgroup {
        Some(dir) => command
            .arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(dir.join("cgroup.procs")),
        None => command.arg("-c").arg("exec \"$@\"").arg("sh"),
    };
    // As the DaemonSet runs it: the lab's RUST_BACKTRACE=1 would have the first error logged
    // with a backtrace map the whole unstripped binary (its debug info) into the agent's RSS.
    command.env_remove("RUST_BACKTRACE");
    let start = Instant::now();
    let mut agent = Kill(
        command
            .arg("nsenter")
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
            .args(["--node-name", "lab", "--min-sync-period"])
            .arg(format!("{}ms", o.min_sync_period_ms))
            .arg("--sync-period")
            .arg(format!("{}s", o.sync_period_s))
            .arg("--sweep-period")
            .arg(format!("{}ms", o.sweep_period_ms))
            .arg("--node-check-period")
            .arg(format!("{}s", o.node_check_period_s))
            .args(map_sizes(o.services))
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
            // The source's "source changed" (debug) says when each snapshot was published, the
            // loop's "node state checked" (debug) when a node check held the loop's thread.
            .env(
                "RUST_LOG",
                "info,agent::source::kubernetes=debug,agent::sync=debug",
            )
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
    let mut profile = None;
    let first = loop {
        let v = rx
            .recv_timeout(Duration::from_secs(3600))
            .context("no first sync")?;
        if v["message"] == "sync done" {
            break v;
        }
        // The first snapshot (every Service listed): the first sync starts.
        if o.profile_first_sync && profile.is_none() && v["message"] == "Kubernetes source synced" {
            profile = Some(FirstSyncProfile::start()?);
        }
        if v["level"] == "ERROR" {
            eprintln!("agent: {v}");
        }
    };
    let programmed_s = start.elapsed().as_secs_f64();
    let first_sync_profile = profile.map(FirstSyncProfile::finish).transpose()?;
    let rss_after_sync = rss_kib(pid);
    let cgroup_after_sync = cgroup.as_deref().map(cgroup_memory_kib);

    // Single endpoint changes, each measured until the kernel shows it, once the first sync's
    // aftermath is over.
    std::thread::sleep(Duration::from_secs(o.settle_seconds));
    let o = std::sync::Arc::new(o);
    let ((changes, warmup), rx, current) = {
        let o = o.clone();
        ns.run(move || -> anyhow::Result<_> {
            let mut current = HashMap::new();
            let (changes, warmup) = changes_phase(&o, pid, &rx, &mut current)?;
            Ok(((changes, warmup), rx, current))
        })?
    };

    // Idle with the tables full: no API changes; sweeps and node checks run. After the last
    // change's state-file write (every 2 s at most).
    std::thread::sleep(Duration::from_secs(3));
    let _ = rx.try_iter().count();
    let idle_window = CpuWindow::start(pid);
    std::thread::sleep(Duration::from_secs(o.idle_seconds));
    let idle = idle_window.end(pid);
    let idle_log: Vec<Value> = rx.try_iter().collect();
    let idle_syncs = idle_log
        .iter()
        .filter(|v| v["message"] == "sync done")
        .count();
    let node_checks = |log: &[Value]| -> Value {
        let ms: Vec<f64> = log
            .iter()
            .filter(|v| v["message"] == "node state checked")
            .filter_map(|v| v["duration_ms"].as_f64())
            .collect();
        let mut d = distribution(ms.clone());
        d["total"] = json!(ms.iter().sum::<f64>());
        d
    };

    // The rolling-update churn: CPU and latency together.
    let churn_window = CpuWindow::start(pid);
    let (churn_latencies, churn_missed) = {
        let o = o.clone();
        ns.run(move || churn_phase(&o, current))?
    };
    let churn_cpu = churn_window.end(pid);
    let churn_log: Vec<Value> = rx.try_iter().collect();
    let churn_syncs: Vec<f64> = churn_log
        .iter()
        .filter(|v| v["message"] == "sync done")
        .filter_map(|v| v["duration_ms"].as_f64())
        .collect();

    let rss_end = rss_kib(pid);
    let cgroup_end = cgroup.as_deref().map(cgroup_memory_kib);
    // The agent's own account of each change's sync, and where its time went (per-phase
    // medians).
    let sync_ms: Vec<f64> = changes
        .iter()
        .filter_map(|c| c["sync_ms"].as_f64())
        .collect();
    let mut phases: BTreeMap<String, Vec<f64>> = Default::default();
    for c in &changes {
        for (k, ms) in c["phases"].as_object().into_iter().flatten() {
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
    let column =
        |name: &str| -> Vec<f64> { changes.iter().filter_map(|c| c[name].as_f64()).collect() };
    let mut latency = distribution(column("latency_ms"));
    latency["spacing_ms"] = json!(o.spacing_ms);
    latency["min_sync_period_ms"] = json!(o.min_sync_period_ms);
    latency["after_first_sync_s"] = json!(o.settle_seconds);
    // The untimed first change (see `changes_phase`), whole.
    latency["warmup"] = warmup;
    // The slowest changes in full: where their time went.
    let mut slowest = changes.clone();
    slowest.sort_by(|a, b| {
        b["latency_ms"]
            .as_f64()
            .unwrap_or(0.0)
            .total_cmp(&a["latency_ms"].as_f64().unwrap_or(0.0))
    });
    slowest.truncate(3);
    let mut sync_duration = distribution(sync_ms);
    sync_duration["phases_p50"] = Value::Object(phase_p50);
    let mut churn_latency = distribution(churn_latencies);
    churn_latency["missed"] = json!(churn_missed);
    let _ = lab::apiserver::control(&ns, "POST", "/control/compact", "");
    let ops: Value = first["ipvs_ops"]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "{}",
        json!({
            "kernel": release.trim(),
            "services": o.services,
            "endpoints_per_service": o.endpoints,
            "clocks": {
                "latency": "guest CLOCK_MONOTONIC (under TCG: host real time, emulated CPU)",
                "cpu": format!("guest /proc utime+stime ticks ({} per s) over guest wall time", ticks_per_second()),
            },
            "agent_options": {
                "min_sync_period_ms": o.min_sync_period_ms,
                "sync_period_s": o.sync_period_s,
                "sweep_period_ms": o.sweep_period_ms,
                "node_check_period_s": o.node_check_period_s,
            },
            "programmed_from_empty_s": programmed_s,
            "first_sync_ms": first["duration_ms"],
            "first_sync_profile": first_sync_profile,
            // Where the first sync's time went (the agent's phases, ms).
            "first_sync_phases_ms": first["phases"]
                .as_str()
                .and_then(|p| serde_json::from_str::<Value>(p).ok()),
            "first_sync_ipvs_ops": ops["issued"],
            "first_sync_map_changes": first["map_changes"],
            "change_latency_ms": latency,
            "change_latency_parts_ms": {
                "posted": distribution(column("posted_ms")),
                "after_post": distribution(column("after_post_ms")),
                "published": distribution(column("published_ms")),
                "sync_started": distribution(column("sync_started_ms")),
                "sync_logged": distribution(column("sync_logged_ms")),
                "slowest": slowest,
            },
            "change_sync_duration_ms": sync_duration,
            "idle": {
                "cpu": idle,
                "syncs": idle_syncs,
                "node_checks_ms": node_checks(&idle_log),
                "sweep_period_ms": o.sweep_period_ms,
                "node_check_period_s": o.node_check_period_s,
            },
            "churn": {
                "seconds": o.churn_seconds,
                "interval_ms": o.churn_interval_ms,
                "change_latency_ms": churn_latency,
                "sync_duration_ms": distribution(churn_syncs),
                "node_checks_ms": node_checks(&churn_log),
                "cpu": churn_cpu,
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
            "agent_cgroup_memory_kib": {"after_first_sync": cgroup_after_sync, "end": cgroup_end},
            "apiserver_rss_kib": {"loaded": api_rss_loaded, "end": rss_kib(api_pid)},
        })
    );
    drop(agent);
    if let Some(dir) = &cgroup {
        let _ = std::fs::remove_dir(dir);
    }
    let _ = std::fs::remove_dir_all("/sys/fs/bpf/bench-sync");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_sized_only_past_their_defaults() {
        assert!(map_sizes(10_000).is_empty());
        assert_eq!(
            map_sizes(50_000),
            [
                "--bpf-map-size",
                "svc_addrs=65536",
                "--bpf-map-size",
                "svc_ports=65536"
            ]
        );
    }

    #[test]
    fn log_timestamps_are_read_as_seconds_since_the_epoch() {
        assert_eq!(unix_seconds("1970-01-02T00:00:01.5Z"), Some(86_401.5));
        // `date -u -d 2024-03-01T12:00:00 +%s`: a leap year's March.
        assert_eq!(
            unix_seconds("2024-03-01T12:00:00.000000Z"),
            Some(1_709_294_400.0)
        );
        assert_eq!(unix_seconds("not a time"), None);
    }
}
