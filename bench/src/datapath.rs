//! `bench-datapath`: the side-by-side datapath benchmark, run inside the lab VM by
//! `scripts/bench datapath`. This program owns the benchmark's plan and its raw figures: on one
//! kernel, with the same topology and traffic, it programs in turn kube-proxy's ipvs mode,
//! kube-proxy's nftables mode and this project's agent, runs the traffic cases against each,
//! and writes one JSON document with every per-round figure (the report generator,
//! `bench-report`, turns it into medians, spreads and ratios).
//!
//! Topology: `lab::topology::SnatTopology`, fresh for every datapath in every round (nothing of
//! one datapath survives into the next): client 10.0.1.2 → node 10.0.1.1 → router → remote pod
//! 10.244.2.2, local pod 10.244.1.2 behind the node's `cni0`. The node carries a
//! conntrack-using firewall (`node_firewall(false)`) as real nodes do. The Service under test,
//! `bench/web`, has ClusterIP 10.96.0.10 (TCP 80, UDP 53) and NodePorts 30080/TCP and
//! 30053/UDP on 10.0.1.1 only, with the remote pod as its one endpoint (port 8080/5353), so
//! NodePort replies come back only if the node source-NATs.
//!
//! Per round: a direct baseline (no Service, no firewall: the client and the pod reach the
//! remote pod straight, the router routing the client's network back), then per datapath
//! (ipvs, nftables, ours) with 1 Service and then with `BENCH_FILL` more ClusterIP Services
//! (endpoints on other addresses): short-connection CPS to the ClusterIP (from the local pod)
//! and to the NodePort (from the client) at `BENCH_CONCURRENCY`; with 1 Service also the same
//! one connection at a time (latency without queueing, a quarter of the connections),
//! request/response on kept-alive connections, bulk throughput and UDP request/response
//! through the NodePort, and traffic that is not service traffic through the same devices (the
//! local pod and the node itself connecting straight to the remote pod), which the direct
//! baseline and a `firewall` reference (the node's firewall, no service proxy) run too. After the
//! rounds, per datapath on a fresh topology: conntrack events per connection (`conntrack -E`),
//! BPF run-time statistics (ours; `kernel.bpf_stats_enabled`, outside the timed windows), a
//! system-wide `perf` profile of each CPS case (also of the direct baseline) with the call
//! chains of the symbols named in `BENCH_PROFILE_CALLERS`, and
//! the table-full case (`nf_conntrack_max` = `BENCH_CT_MAX`, `BENCH_HOLD_CONNS` held
//! connections through the NodePort).
//!
//! Environment (defaults in brackets): BENCH_ROUNDS [5], BENCH_CONNS [2000] connections per CPS
//! case, BENCH_CONCURRENCY [16], BENCH_RR_REQUESTS [2000], BENCH_BULK_MB [32],
//! BENCH_UDP_REQUESTS [1000], BENCH_FILL [10000], BENCH_DETAIL_FILL [0] (1: the detail phase
//! with the fill Services too, for profiles of the filled case), BENCH_EVENT_CONNS [200],
//! BENCH_PROFILE_CONNS [1000] (per profiled case, when `perf` is on PATH), BENCH_PROFILE_CALLERS
//! [__memset,nft_do_chain] (symbols whose callers each
//! profile keeps: `perf report --no-children -g callee`), BENCH_HOLD_CONNS
//! [5000], BENCH_CT_MAX [1024], BENCH_IDLE_SECONDS [60] (the window without traffic after the
//! profiles, six of the agent's sweep periods, one of them a full read of `conns`: its steady
//! CPU rate, which the report counts in
//! every timed window of ours instead of the agent's CPU the window caught), BENCH_DATAPATHS
//! [firewall,ipvs,nftables,ours], BENCH_CLOCK (a label:
//! tcg or icount), KUBE_IPVS_BPF_BIN, LOADGEN_BIN (default: beside this program).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lab::agent::{Agent, agent_bin};
use lab::kube_proxy::{self, ConntrackGlobals, NodeConfig, Protocol, ServicePort};
use lab::topology::SnatTopology;
use lab::{Netns, try_sh};
use serde_json::{Value, json};

mod agent_cpu;
mod procstat;
use procstat::{busy_processes, cpu_ticks, stat_ticks, ticks_per_second};

const CLUSTER_IP: &str = "10.96.0.10";
const NODE_IP: &str = "10.0.1.1";
const REMOTE_POD: &str = "10.244.2.2";
const TCP_NODE_PORT: u16 = 30080;
/// The remote pod's port for traffic that is not service traffic: not an endpoint of the
/// Service. Connections straight to the endpoint's own port (8080) from a client port that a
/// service case used within IPVS's TIME_WAIT (2 minutes) are answered by IPVS with the service's
/// address (its out hook finds the old connection), so they fail in ipvs mode and in ours alike:
/// 411 and 393 of 6,000 from the local pod at 7ac1347 on 6.12, none in nftables mode.
const OTHER_PORT: u16 = 8081;
const UDP_NODE_PORT: u16 = 30053;
/// The agent's sweep period (its default `--sweep-period`, which the benchmark runs it with).
const AGENT_SWEEP_PERIOD: Duration = Duration::from_secs(10);
/// Every this many of its passes reads `conns` in full when no probe on IPVS's free is attached
/// (agent::datapath::sweep::CONNS_FULL_READ_PASSES): the one that removes the `conns` entries of
/// the records the passes before it expired. The windows keep this length with the probe too.
const AGENT_FULL_READ_PASSES: u32 = 6;
/// The probe on IPVS freeing a connection, as `bpftool prog show` names it (15 characters of
/// `ipvs_conn_free_fentry` or `ipvs_conn_free_kprobe`).
const FREE_PROBE_PROGRAM_PREFIX: &str = "ipvs_conn_free";
/// Services per nft transaction when the extra Services are added in nftables mode.
const NFT_BATCH: usize = 500;

// --- configuration --------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Config {
    rounds: usize,
    conns: u64,
    concurrency: usize,
    rr_requests: u64,
    bulk_mb: u64,
    udp_requests: u64,
    fill: usize,
    /// The detail phase (events, BPF statistics, profiles, idle, table full) with the fill
    /// Services too (`BENCH_DETAIL_FILL=1`): where the time of the filled case goes.
    detail_fill: bool,
    event_conns: u64,
    profile_conns: u64,
    hold_conns: usize,
    ct_max: u64,
    idle_seconds: u64,
    datapaths: Vec<Datapath>,
    clock: String,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v}: not a number")),
        Err(_) => Ok(default),
    }
}

impl Config {
    fn from_env() -> Result<Config> {
        let datapaths = std::env::var("BENCH_DATAPATHS")
            .unwrap_or_else(|_| "firewall,ipvs,nftables,ours".into())
            .split(',')
            .map(Datapath::parse)
            .collect::<Result<Vec<_>>>()?;
        Ok(Config {
            rounds: env_num("BENCH_ROUNDS", 5)?,
            conns: env_num("BENCH_CONNS", 2000)?,
            concurrency: env_num("BENCH_CONCURRENCY", 16)?,
            rr_requests: env_num("BENCH_RR_REQUESTS", 2000)?,
            bulk_mb: env_num("BENCH_BULK_MB", 32)?,
            udp_requests: env_num("BENCH_UDP_REQUESTS", 1000)?,
            fill: env_num("BENCH_FILL", 10_000)?,
            detail_fill: env_num("BENCH_DETAIL_FILL", 0u8)? != 0,
            event_conns: env_num("BENCH_EVENT_CONNS", 200)?,
            profile_conns: env_num("BENCH_PROFILE_CONNS", 1000)?,
            hold_conns: env_num("BENCH_HOLD_CONNS", 5000)?,
            ct_max: env_num("BENCH_CT_MAX", 1024)?,
            // Six of the agent's 10 s sweep periods, one of them a full read of `conns`
            // (AGENT_FULL_READ_PASSES), and twelve of its 5 s node checks
            // (whole ones, whatever the phase).
            idle_seconds: env_num("BENCH_IDLE_SECONDS", 60)?,
            datapaths,
            clock: std::env::var("BENCH_CLOCK").unwrap_or_else(|_| "tcg".into()),
        })
    }

    fn json(&self) -> Value {
        json!({
            "rounds": self.rounds,
            "conns": self.conns,
            "concurrency": self.concurrency,
            "rr_requests": self.rr_requests,
            "bulk_mb": self.bulk_mb,
            "udp_requests": self.udp_requests,
            "fill_services": self.fill,
            "detail_fill": self.detail_fill,
            "event_conns": self.event_conns,
            "profile_conns": self.profile_conns,
            "hold_conns": self.hold_conns,
            "ct_max": self.ct_max,
            "idle_seconds": self.idle_seconds,
            "datapaths": self.datapaths.iter().map(|d| d.name()).collect::<Vec<_>>(),
            "clock": self.clock,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Datapath {
    /// No service proxy: the node with its firewall alone, the reference for traffic that is
    /// not service traffic (what each proxy adds to it).
    Firewall,
    Ipvs,
    Nftables,
    Ours,
}

impl Datapath {
    fn parse(s: &str) -> Result<Datapath> {
        Ok(match s.trim() {
            "firewall" => Datapath::Firewall,
            "ipvs" => Datapath::Ipvs,
            "nftables" => Datapath::Nftables,
            "ours" => Datapath::Ours,
            other => bail!("unknown datapath {other:?} (firewall, ipvs, nftables, ours)"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Datapath::Firewall => "firewall",
            Datapath::Ipvs => "ipvs",
            Datapath::Nftables => "nftables",
            Datapath::Ours => "ours",
        }
    }

    /// A service proxy (every datapath but the firewall-only reference).
    fn serves(self) -> bool {
        self != Datapath::Firewall
    }
}

// --- services -------------------------------------------------------------------------------

fn node_config() -> NodeConfig {
    NodeConfig {
        cluster_cidr: "10.244.0.0/16".into(),
        service_cidr: "10.96.0.0/16".into(),
        nodeport_addresses: vec![Ipv4Addr::new(10, 0, 1, 1)],
    }
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap_or(Ipv4Addr::UNSPECIFIED)
}

/// The Service under test: `bench/web`, TCP 80 and UDP 53 with NodePorts, one remote endpoint.
fn bench_services() -> Vec<ServicePort> {
    let tcp = ServicePort {
        node_port: Some(TCP_NODE_PORT),
        ..ServicePort::cluster_ip(
            "bench",
            "web",
            "http",
            Protocol::Tcp,
            ip(CLUSTER_IP),
            80,
            &[(ip(REMOTE_POD), 8080)],
        )
    };
    let udp = ServicePort {
        node_port: Some(UDP_NODE_PORT),
        ..ServicePort::cluster_ip(
            "bench",
            "web",
            "dns",
            Protocol::Udp,
            ip(CLUSTER_IP),
            53,
            &[(ip(REMOTE_POD), 5353)],
        )
    };
    vec![tcp, udp]
}

/// `n` more ClusterIP Services (`fill/svc-N`, 10.96.100.1 onwards, TCP 80), each with one
/// endpoint on another node (10.244.64.1 onwards): present, never used by the traffic.
fn fill_services(n: usize) -> Vec<ServicePort> {
    (0..n)
        .map(|i| {
            let (hi, lo) = ((i / 250) as u8, (i % 250) as u8 + 1);
            ServicePort::cluster_ip(
                "fill",
                &format!("svc-{i}"),
                "http",
                Protocol::Tcp,
                Ipv4Addr::new(10, 96, 100 + hi, lo),
                80,
                &[(Ipv4Addr::new(10, 244, 64 + hi, lo), 8080)],
            )
        })
        .collect()
}

/// The same Services as manifests for the agent's file source (one Service per name, its
/// ports together; one EndpointSlice per Service).
fn manifests(services: &[ServicePort]) -> String {
    let mut by_name: BTreeMap<(String, String), Vec<&ServicePort>> = BTreeMap::new();
    for s in services {
        by_name
            .entry((s.namespace.clone(), s.name.clone()))
            .or_default()
            .push(s);
    }
    let mut y = String::new();
    for ((ns, name), ports) in by_name {
        let ty = if ports.iter().any(|p| p.node_port.is_some()) {
            "NodePort"
        } else {
            "ClusterIP"
        };
        let cip = ports[0].cluster_ip;
        y += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  type: {ty}\n  clusterIP: {cip}\n  clusterIPs: [{cip}]\n  ports:\n"
        );
        for p in &ports {
            let target = p.endpoints.first().map_or(p.port, |e| e.port);
            let np = p
                .node_port
                .map_or(String::new(), |n| format!(", nodePort: {n}"));
            y += &format!(
                "    - {{name: {}, protocol: {}, port: {}, targetPort: {target}{np}}}\n",
                p.port_name,
                p.protocol.lower().to_uppercase(),
                p.port
            );
        }
        y += "---\n";
        y += &format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports:\n"
        );
        for p in &ports {
            let target = p.endpoints.first().map_or(p.port, |e| e.port);
            y += &format!(
                "  - {{name: {}, protocol: {}, port: {target}}}\n",
                p.port_name,
                p.protocol.lower().to_uppercase()
            );
        }
        y += "endpoints:\n";
        let mut ips: Vec<Ipv4Addr> = ports
            .iter()
            .flat_map(|p| p.endpoints.iter().map(|e| e.ip))
            .collect();
        ips.sort();
        ips.dedup();
        for e in ips {
            y += &format!(
                "  - addresses: [\"{e}\"]\n    conditions: {{ready: true}}\n    nodeName: other\n"
            );
        }
        y += "---\n";
    }
    y
}

// --- processes ------------------------------------------------------------------------------

fn loadgen_bin() -> PathBuf {
    if let Ok(p) = std::env::var("LOADGEN_BIN") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("loadgen")))
        .unwrap_or_else(|| PathBuf::from("loadgen"))
}

/// Progress on stderr (the serial console) and, when `BENCH_PROGRESS` names a file (the run
/// script puts it on the 9p share), there too: the console reaches the host in blocks.
fn log(msg: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    let msg = format!("[{t:7.1}s] {msg}");
    eprintln!("bench-datapath: {msg}");
    if let Ok(path) = std::env::var("BENCH_PROGRESS")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        use std::io::Write;
        let _ = writeln!(f, "{msg}");
    }
}

/// `loadgen server` in a namespace, killed on drop.
struct LoadServer {
    child: Child,
}

impl LoadServer {
    fn start(ns: &Netns, args: &[&str]) -> Result<LoadServer> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg(loadgen_bin())
            .arg("server")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start loadgen server")?;
        let stdout = child.stdout.take().context("loadgen server stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(|l| l.ok()).unwrap_or_default();
            let _ = tx.send(first);
            for _ in lines {}
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) if l.trim() == "ready" => Ok(LoadServer { child }),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("loadgen server did not start: {other:?}")
            }
        }
    }
}

impl Drop for LoadServer {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// Runs a loadgen client mode in `ns` and returns its JSON.
fn loadgen(ns: &Netns, args: &[String]) -> Result<Value> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path()))
        .arg(loadgen_bin())
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .context("run loadgen")?;
    if !out.status.success() {
        bail!("loadgen {} failed ({})", args.join(" "), out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("loadgen output: {text}"))
}

fn ct_count(ns: &Netns) -> Result<u64> {
    ns.try_sh("cat /proc/sys/net/netfilter/nf_conntrack_count")?
        .trim()
        .parse()
        .context("nf_conntrack_count")
}

/// `conntrack -C` in the node namespace.
fn ct_table_size(ns: &Netns) -> Result<u64> {
    ns.try_sh("conntrack -C")?
        .trim()
        .parse()
        .context("conntrack -C")
}

// --- datapaths ------------------------------------------------------------------------------

/// One programmed datapath on a topology.
struct Active {
    dp: Datapath,
    agent: Option<Agent>,
    manifests: Option<PathBuf>,
    pin_root: String,
    state_dir: String,
    globals: ConntrackGlobals,
}

impl Active {
    /// Programs `dp` on the topology's node with `services`; returns it and the seconds it took.
    fn program(
        dp: Datapath,
        t: &SnatTopology,
        services: &[ServicePort],
        globals: ConntrackGlobals,
    ) -> Result<(Active, f64)> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let started = Instant::now();
        let mut a = Active {
            dp,
            agent: None,
            manifests: None,
            pin_root: format!("/sys/fs/bpf/bench-{}", t.node.name()),
            state_dir: format!("/tmp/agent-state-{}", t.node.name()),
            globals,
        };
        match dp {
            Datapath::Firewall => t.try_node_firewall(false)?,
            Datapath::Ipvs => {
                ConntrackGlobals::apply_kube_proxy(cpus)?;
                kube_proxy::apply_ipvs_mode(&t.node, services, &node_config())?;
                t.try_node_firewall(false)?;
            }
            Datapath::Nftables => {
                ConntrackGlobals::apply_kube_proxy(cpus)?;
                t.try_node_firewall(false)?;
                kube_proxy::apply_nftables_mode(&t.node, services, &node_config())?;
            }
            Datapath::Ours => {
                t.try_node_firewall(false)?;
                let dir = PathBuf::from(format!("/tmp/bench-manifests-{}", t.node.name()));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).context("manifest dir")?;
                write_manifests(&dir, services)?;
                let mut agent = Agent::try_start_source(
                    &t.node,
                    &format!("file:{}", dir.display()),
                    &format!("{}/v1", a.pin_root),
                    &[
                        "--cluster-cidr",
                        SnatTopology::CLUSTER_CIDRS,
                        "--nodeport-addresses",
                        "10.0.1.1/32",
                        "--sync-period",
                        "1h",
                    ],
                )?;
                agent.try_wait_for(0, Duration::from_secs(900), |v| {
                    v["message"] == "sync done" && v["generation"].as_u64() >= Some(1)
                })?;
                wait_quiet(
                    agent.pid(),
                    Duration::from_secs(2),
                    Duration::from_secs(120),
                );
                a.agent = Some(agent);
                a.manifests = Some(dir);
            }
        }
        Ok((a, started.elapsed().as_secs_f64()))
    }

    /// Adds Services (`all`: every Service now present, `added` the new ones); returns seconds.
    fn add(&mut self, t: &SnatTopology, all: &[ServicePort], added: &[ServicePort]) -> Result<f64> {
        let started = Instant::now();
        match self.dp {
            Datapath::Firewall => bail!("no service proxy to add Services to"),
            Datapath::Ipvs => {
                kube_proxy::add_ipvs_mode_services(&t.node, all, added, &node_config())?
            }
            // kube-proxy's partial syncs: one transaction per NFT_BATCH services. (One
            // transaction of 10,000 Services costs minutes under TCG on these kernels: every
            // anonymous `numgen` map's name allocation scans all sets of the table, and lookups
            // by id scan the transaction.)
            Datapath::Nftables => {
                kube_proxy::add_nftables_mode_services(&t.node, added, &node_config(), NFT_BATCH)?
            }
            Datapath::Ours => {
                let (Some(agent), Some(dir)) = (self.agent.as_mut(), self.manifests.as_ref())
                else {
                    bail!("the agent is not running");
                };
                let mark = agent.mark();
                write_manifests(dir, all)?;
                agent.try_wait_for(mark, Duration::from_secs(1800), |v| {
                    v["message"] == "sync done" && v["generation"].as_u64() >= Some(2)
                })?;
                wait_quiet(
                    agent.pid(),
                    Duration::from_secs(2),
                    Duration::from_secs(120),
                );
            }
        }
        Ok(started.elapsed().as_secs_f64())
    }

    /// The agent's counters (ours only).
    fn counters(&self, t: &SnatTopology) -> BTreeMap<String, u64> {
        self.agent
            .as_ref()
            .and_then(|a| a.try_counters(&t.node).ok())
            .unwrap_or_default()
    }

    /// Removes the datapath completely and resets the kernel-wide conntrack limits.
    fn teardown(mut self, t: &SnatTopology) -> Result<()> {
        match self.dp {
            Datapath::Firewall => {}
            Datapath::Ipvs => kube_proxy::teardown_ipvs_mode(&t.node)?,
            Datapath::Nftables => kube_proxy::teardown_nftables_mode(&t.node)?,
            Datapath::Ours => {
                if let Some(agent) = self.agent.take() {
                    agent.stop();
                }
                t.node.try_sh(&format!(
                    "{} cleanup --pin-root {} --state-dir {}",
                    agent_bin(),
                    self.pin_root,
                    self.state_dir
                ))?;
                if let Some(dir) = self.manifests.take() {
                    let _ = std::fs::remove_dir_all(dir);
                }
                // The IPVS probe is kernel-wide: nothing of ours may keep running into the next
                // datapath's measurements. (Programs are freed after an RCU grace period.)
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    let left = our_programs()?;
                    if left.is_empty() {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!("programs left after cleanup: {left:?}");
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        self.globals.write()
    }
}

/// Waits until process `pid` has used no CPU for `quiet` (its work after a sync — the state
/// file, metrics, freeing memory — must not land in a timed window); at most `max`.
fn wait_quiet(pid: u32, quiet: Duration, max: Duration) -> f64 {
    let cpu = || stat_ticks(&format!("/proc/{pid}/stat")).map(|(_, ticks)| ticks);
    let start = Instant::now();
    let mut last = cpu();
    let mut since = Instant::now();
    while start.elapsed() < max {
        std::thread::sleep(Duration::from_millis(250));
        let now = cpu();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            break;
        }
    }
    start.elapsed().as_secs_f64()
}

/// This project's programs still loaded in the kernel.
fn our_programs() -> Result<Vec<String>> {
    let progs: Value =
        serde_json::from_str(&try_sh("bpftool prog show --json")?).unwrap_or(Value::Null);
    Ok(progs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .filter(|n| n.starts_with("ipvs_") || n.starts_with("tc_") || *n == "xt_svc")
        .map(String::from)
        .collect())
}

fn write_manifests(dir: &std::path::Path, services: &[ServicePort]) -> Result<()> {
    let tmp = dir.join(".services.yaml.tmp");
    std::fs::write(&tmp, manifests(services)).context("write manifests")?;
    std::fs::rename(&tmp, dir.join("services.yaml")).context("rename manifests")
}

// --- cases ----------------------------------------------------------------------------------

/// A traffic case: where it runs from and the loadgen arguments.
/// The namespace a case's loadgen runs in.
#[derive(Clone, Copy)]
enum Source {
    /// The local pod, behind the node's `cni0`.
    Pod,
    /// The off-cluster client.
    Client,
    /// The node itself.
    Node,
}

impl Source {
    fn ns(self, t: &SnatTopology) -> &Netns {
        match self {
            Source::Pod => &t.pod,
            Source::Client => &t.client,
            Source::Node => &t.node,
        }
    }
}

struct Case {
    name: &'static str,
    from: Source,
    args: Vec<String>,
    /// Connections it opens (for per-connection figures).
    conns: u64,
}

fn cps_args(to: &str, conns: u64, concurrency: usize) -> Vec<String> {
    [
        "cps",
        "--to",
        to,
        "--conns",
        &conns.to_string(),
        "--concurrency",
        &concurrency.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Where a run's cases connect to: the Service (ClusterIP from the local pod, NodePort and its
/// UDP port from the client), or, for the direct baseline, the remote pod itself.
struct Targets {
    clusterip: String,
    nodeport: String,
    udp: String,
}

impl Targets {
    fn service() -> Targets {
        Targets {
            clusterip: format!("{CLUSTER_IP}:80"),
            nodeport: format!("{NODE_IP}:{TCP_NODE_PORT}"),
            udp: format!("{NODE_IP}:{UDP_NODE_PORT}"),
        }
    }

    fn direct() -> Targets {
        Targets {
            clusterip: format!("{REMOTE_POD}:8080"),
            nodeport: format!("{REMOTE_POD}:8080"),
            udp: format!("{REMOTE_POD}:5353"),
        }
    }
}

fn cases(cfg: &Config, full: bool, to: &Targets) -> Vec<Case> {
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let np = to.nodeport.clone();
    let mut v = vec![
        Case {
            name: "cps_clusterip",
            from: Source::Pod,
            args: cps_args(&to.clusterip, cfg.conns, cfg.concurrency),
            conns: cfg.conns,
        },
        Case {
            name: "cps_nodeport",
            from: Source::Client,
            args: cps_args(&np, cfg.conns, cfg.concurrency),
            conns: cfg.conns,
        },
    ];
    if full {
        // Latency without queueing: one connection at a time.
        for (name, from, to) in [
            ("lat_clusterip", Source::Pod, to.clusterip.clone()),
            ("lat_nodeport", Source::Client, np.clone()),
        ] {
            let n = (cfg.conns / 4).max(1);
            v.push(Case {
                name,
                from,
                args: cps_args(&to, n, 1),
                conns: n,
            });
        }
        v.push(Case {
            name: "rr_nodeport",
            from: Source::Client,
            args: s(&[
                "rr",
                "--to",
                &np,
                "--requests",
                &cfg.rr_requests.to_string(),
                "--connections",
                &cfg.concurrency.to_string(),
            ]),
            conns: cfg.concurrency as u64,
        });
        v.push(Case {
            name: "bulk_nodeport",
            from: Source::Client,
            args: s(&[
                "bulk",
                "--to",
                &np,
                "--bytes",
                &(cfg.bulk_mb << 20).to_string(),
            ]),
            conns: 1,
        });
        v.push(Case {
            name: "udp_nodeport",
            from: Source::Client,
            args: s(&[
                "udp-rr",
                "--to",
                &to.udp,
                "--requests",
                &cfg.udp_requests.to_string(),
                "--concurrency",
                &cfg.concurrency.to_string(),
                "--timeout",
                "1",
            ]),
            conns: cfg.concurrency as u64,
        });
    }
    v
}

/// Traffic that is not service traffic, through the node's devices: the local pod and the node
/// itself connecting straight to the remote pod, on a port that is no endpoint ([`OTHER_PORT`]). Every datapath runs them with its 1 Service
/// (the firewall-only reference with none), and so does the direct baseline: what each adds over
/// the firewall alone is what it costs traffic it does not serve.
fn other_cases(cfg: &Config) -> Vec<Case> {
    let to = format!("{REMOTE_POD}:{OTHER_PORT}");
    [
        ("cps_pod_to_pod", Source::Pod),
        ("cps_node_to_remote", Source::Node),
    ]
    .into_iter()
    .map(|(name, from)| Case {
        name,
        from,
        args: cps_args(&to, cfg.conns, cfg.concurrency),
        conns: cfg.conns,
    })
    .collect()
}

/// Runs one case: conntrack before and after, the datapath's counters, the loadgen figures.
fn run_case(t: &SnatTopology, active: Option<&Active>, case: &Case) -> Result<Value> {
    let ns = case.from.ns(t);
    // Every case starts from an empty conntrack table, so its growth is the entries it made
    // (none expire within a window: TIME_WAIT lasts 120 s) and no datapath carries another
    // case's entries.
    let t0 = Instant::now();
    t.node.try_sh("conntrack -F 2>/dev/null; true")?;
    let ct_before = ct_count(&t.node)?;
    let counters_before = active.map(|a| a.counters(t)).unwrap_or_default();
    let procs_before = cpu_ticks("/proc");
    let t1 = Instant::now();
    let lg = loadgen(ns, &case.args)?;
    let t2 = Instant::now();
    let procs = busy_processes(&procs_before, &cpu_ticks("/proc"));
    let ct_after = ct_count(&t.node)?;
    let peak = ct_table_size(&t.node)?;
    let counters_after = active.map(|a| a.counters(t)).unwrap_or_default();
    let steps = json!({
        "before_s": (t1 - t0).as_secs_f64(),
        "loadgen_s": (t2 - t1).as_secs_f64(),
        "after_s": t2.elapsed().as_secs_f64(),
    });
    let delta: BTreeMap<&String, u64> = counters_after
        .iter()
        .map(|(k, v)| {
            (
                k,
                v.saturating_sub(counters_before.get(k).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, v)| *v > 0)
        .collect();
    let growth = ct_after as i64 - ct_before as i64;
    Ok(json!({
        "loadgen": lg,
        "conns": case.conns,
        "conntrack": {
            "before": ct_before,
            "after": ct_after,
            "growth": growth,
            "per_conn": growth as f64 / case.conns.max(1) as f64,
            "peak": peak,
        },
        "counters": delta,
        "steps": steps,
        "processes_cpu_s": procs,
    }))
}

/// Proves every path works before anything is timed (a NodePort answer proves the SNAT: the
/// router has no route back to the client).
fn verify(t: &SnatTopology) -> Result<()> {
    let checks = [
        (&t.pod, cps_args(&format!("{CLUSTER_IP}:80"), 3, 1)),
        (
            &t.client,
            cps_args(&format!("{NODE_IP}:{TCP_NODE_PORT}"), 3, 1),
        ),
        (
            &t.client,
            [
                "udp-rr",
                "--to",
                &format!("{NODE_IP}:{UDP_NODE_PORT}"),
                "--requests",
                "3",
                "--concurrency",
                "1",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ),
    ];
    for (ns, args) in checks {
        let v = loadgen(ns, &args)?;
        if v["ok"].as_u64() != Some(3) {
            bail!("{} failed: {v}\n{}", args.join(" "), diagnostics(t));
        }
    }
    Ok(())
}

fn diagnostics(t: &SnatTopology) -> String {
    let mut out = String::new();
    for cmd in [
        "ipvsadm -Ln",
        "iptables-save",
        "nft list ruleset | head -80",
        "ip -br addr",
        "conntrack -L 2>/dev/null | head -20",
    ] {
        let (_, o, e) = t.node.sh_status(cmd);
        out += &format!("--- {cmd}\n{o}{e}");
    }
    out
}

/// The remote pod's servers, with a deep accept queue for the held-connection case.
fn start_servers(t: &SnatTopology) -> Result<LoadServer> {
    t.remote
        .try_sh("sysctl -qw net.core.somaxconn=65535 net.ipv4.tcp_max_syn_backlog=65535")?;
    LoadServer::start(
        &t.remote,
        &[
            "--tcp",
            &format!("{REMOTE_POD}:8080"),
            "--tcp",
            &format!("{REMOTE_POD}:{OTHER_PORT}"),
            "--udp",
            &format!("{REMOTE_POD}:5353"),
        ],
    )
}

// --- phases ---------------------------------------------------------------------------------

/// The direct baseline of a round: every case's traffic to the remote pod itself, no Service,
/// no firewall (no conntrack), the router routing the client's network back. Each case's node
/// share is its CPU per unit less this.
fn baseline(cfg: &Config, round: usize) -> Result<Vec<Value>> {
    let t = SnatTopology::try_new(&format!("b{round}"))?;
    t.router.try_sh("ip route add 10.0.1.0/24 via 10.0.2.1")?;
    let _srv = start_servers(&t)?;
    let all = cases(cfg, true, &Targets::direct())
        .into_iter()
        .chain(other_cases(cfg));
    reference_cases(&t, round, "direct", all)
}

/// Runs the cases of a reference without a service proxy (`label`: the direct baseline, or the
/// firewall alone), recorded with 0 Services.
fn reference_cases(
    t: &SnatTopology,
    round: usize,
    label: &str,
    cases: impl IntoIterator<Item = Case>,
) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for case in cases {
        let r = run_case(t, None, &case)?;
        log(&format!(
            "round {round} {label} {}: {:.0}/s",
            case.name,
            r["loadgen"]["rate_per_s"].as_f64().unwrap_or(0.0)
        ));
        out.push(json!({
            "round": round, "datapath": label, "services": 0, "case": case.name, "result": r,
        }));
    }
    Ok(out)
}

/// One datapath in one round: 1 Service, then with the fill Services.
fn datapath_round(
    cfg: &Config,
    round: usize,
    dp: Datapath,
    globals: ConntrackGlobals,
    fill: &[ServicePort],
) -> Result<Vec<Value>> {
    let t = SnatTopology::try_new(&format!("r{round}{}", &dp.name()[..2]))?;
    let _srv = start_servers(&t)?;
    let bench = bench_services();
    let (mut active, program_s) = Active::program(dp, &t, &bench, globals)?;
    if !dp.serves() {
        return firewall_round(cfg, round, &t, active);
    }
    verify(&t)?;
    log(&format!(
        "round {round} {}: programmed in {program_s:.1}s",
        dp.name()
    ));
    let mut out = Vec::new();
    let mut all = bench.clone();
    // First the agent's rate without traffic, over a full read's interval of sweep periods with
    // maps the cases have not filled: what the report subtracts from its CPU over the span
    // below, and counts in each timed window instead of what the window caught (the idle window
    // after the profiles finds the maps holding what the detail phase left).
    let idle = agent_total_ns().map(|before| {
        let start = Instant::now();
        std::thread::sleep(AGENT_FULL_READ_PASSES * AGENT_SWEEP_PERIOD);
        let after = agent_total_ns().unwrap_or(before);
        (
            after.saturating_sub(before) as f64 / 1e9,
            start.elapsed().as_secs_f64(),
        )
    });
    // Then its CPU over the round's cases and the lives of the records they made: IPVS's FIN
    // timeout after the last case (a closed connection's record lives that long after its last
    // packet), two sweep periods more (a pass has then expired each of them, and the next freed
    // it, whatever their phase) and a full read's interval (the full read after their expiry
    // has removed their `conns` entries). The report charges its per-connection part to the
    // service connections (Metric::CpuPerUnit).
    let threads_start = agent_cpu::run_time_ns_by_thread(agent_cpu::AGENT_COMM);
    let agent_start = agent_cpu::total(&threads_start);
    let span_start = Instant::now();
    for with_fill in [false, true] {
        if with_fill && fill.is_empty() {
            continue;
        }
        let add_s = if with_fill {
            all.extend(fill.iter().cloned());
            let s = active.add(&t, &all, fill)?;
            verify(&t)?;
            log(&format!(
                "round {round} {}: {} more Services in {s:.1}s",
                dp.name(),
                fill.len()
            ));
            s
        } else {
            program_s
        };
        // Services present (bench/web counts once, whatever its ports).
        let services = if with_fill { 1 + fill.len() } else { 1 };
        let others = if with_fill { vec![] } else { other_cases(cfg) };
        for case in cases(cfg, !with_fill, &Targets::service())
            .into_iter()
            .chain(others)
        {
            let r = run_case(&t, Some(&active), &case)?;
            log(&format!(
                "round {round} {} services={services} {}: {:.0}/s p99 {}us ct/conn {:.2}",
                dp.name(),
                case.name,
                r["loadgen"]["rate_per_s"].as_f64().unwrap_or(0.0),
                r["loadgen"]["latency_us"]["p99"],
                r["conntrack"]["per_conn"].as_f64().unwrap_or(0.0)
            ));
            out.push(json!({
                "round": round,
                "datapath": dp.name(),
                "services": services,
                "case": case.name,
                "program_s": add_s,
                "result": r,
            }));
        }
    }
    if let Some(a0) = agent_start {
        let fin = ipvs_tcp_fin_timeout(&t);
        let tail = fin + (2 + AGENT_FULL_READ_PASSES) * AGENT_SWEEP_PERIOD;
        // IPVS frees the round's connections here, mostly (its TIME_WAIT is as long as the FIN
        // timeout), and the probe on that free removes their `conns` entries in the kernel: its
        // run time (bpf_stats, on over the tail, where no timed window runs) is the agent's
        // work too.
        let stats_on =
            dp == Datapath::Ours && try_sh("sysctl -qw kernel.bpf_stats_enabled=1").is_ok();
        let free_before = stats_on.then(bpf_prog_stats).and_then(Result::ok);
        std::thread::sleep(tail);
        let free_after = stats_on.then(bpf_prog_stats).and_then(Result::ok);
        if stats_on {
            try_sh("sysctl -qw kernel.bpf_stats_enabled=0")?;
        }
        let free_probe = free_before.zip(free_after).map(|(before, after)| {
            let (mut runs, mut ns) = (0u64, 0u64);
            for (prog, &(cnt, time)) in &after {
                if prog.starts_with(FREE_PROBE_PROGRAM_PREFIX) {
                    let (c0, n0) = before.get(prog).copied().unwrap_or((0, 0));
                    runs += cnt.saturating_sub(c0);
                    ns += time.saturating_sub(n0);
                }
            }
            json!({"runs": runs, "run_time_ns": ns})
        });
        let threads_end = agent_cpu::run_time_ns_by_thread(agent_cpu::AGENT_COMM);
        if let Some(a1) = agent_cpu::total(&threads_end) {
            let threads: BTreeMap<String, f64> = threads_end
                .into_iter()
                .map(|(name, ns)| {
                    let before = threads_start.get(&name).copied().unwrap_or(0);
                    (name, ns.saturating_sub(before) as f64 / 1e9)
                })
                .filter(|(_, s)| *s > 0.0)
                .collect();
            let agent = json!({
                "cpu_s": a1.saturating_sub(a0) as f64 / 1e9,
                "span_s": span_start.elapsed().as_secs_f64(),
                "tail_s": tail.as_secs_f64(),
                "idle_cpu_s": idle.map(|(cpu, _)| cpu),
                "idle_s": idle.map(|(_, s)| s),
                "threads_cpu_s": threads,
                "free_probe": free_probe,
            });
            log(&format!("round {round} {}: agent {agent}", dp.name()));
            for r in &mut out {
                r["agent_round"] = agent.clone();
            }
        }
    }
    let t0 = Instant::now();
    active.teardown(&t)?;
    drop(_srv);
    drop(t);
    log(&format!(
        "round {round} {}: torn down in {:.1}s",
        dp.name(),
        t0.elapsed().as_secs_f64()
    ));
    Ok(out)
}

/// The agent's CPU time (ns) now: [`agent_cpu::total`] of its threads; `None` without an agent.
fn agent_total_ns() -> Option<u64> {
    agent_cpu::total(&agent_cpu::run_time_ns_by_thread(agent_cpu::AGENT_COMM))
}

/// IPVS's timeout of a TCP connection after its FIN in the node's namespace (`ipvsadm -L
/// --timeout`: `Timeout (tcp tcpfin udp): 900 120 300`), the life of a closed connection's SNAT
/// record after its last packet; IPVS's default (120 s) when it cannot be read.
fn ipvs_tcp_fin_timeout(t: &SnatTopology) -> Duration {
    let read = t.node.try_sh("ipvsadm -L --timeout").ok().and_then(|out| {
        let (_, values) = out.split_once(':')?;
        values.split_whitespace().nth(1)?.parse::<u64>().ok()
    });
    Duration::from_secs(read.unwrap_or(120))
}

/// The firewall-only reference in one round: the traffic that is not service traffic
/// ([`other_cases`]).
fn firewall_round(
    cfg: &Config,
    round: usize,
    t: &SnatTopology,
    active: Active,
) -> Result<Vec<Value>> {
    let out = reference_cases(t, round, "firewall", other_cases(cfg))?;
    active.teardown(t)?;
    Ok(out)
}

/// `conntrack -E` (NEW events) in a namespace while `f` runs.
fn count_new_events(ns: &Netns, f: impl FnOnce() -> Result<Value>) -> Result<(u64, Value)> {
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", ns.path()))
        .args(["conntrack", "-E", "-e", "NEW"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("conntrack -E")?;
    let mut stdout = child.stdout.take().context("conntrack -E stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    std::thread::sleep(Duration::from_millis(500));
    let r = f();
    std::thread::sleep(Duration::from_millis(500));
    let _ = child.kill();
    let _ = child.wait();
    let text = reader.join().unwrap_or_default();
    let n = text.lines().filter(|l| l.contains("[NEW]")).count() as u64;
    Ok((n, r?))
}

/// Calls of `__nf_conntrack_alloc` (every conntrack entry the kernel allocates, confirmed or
/// not, in any namespace) counted by a kprobe event with a hist trigger in tracefs. Used only
/// outside the timed windows: the probe's own cost would land on the datapaths that allocate.
struct CtAllocProbe;

impl CtAllocProbe {
    const EVENT: &'static str = "/sys/kernel/tracing/events/kprobes/kib_ct_alloc";

    /// Starts counting; None (and nothing left behind) when the kernel has no kprobe events or
    /// nf_conntrack is not loaded.
    fn start() -> Option<Self> {
        let setup = format!(
            "([ -d /sys/kernel/tracing/events ] || mount -t tracefs nodev /sys/kernel/tracing) && \
             echo 'p:kib_ct_alloc __nf_conntrack_alloc' >> /sys/kernel/tracing/kprobe_events && \
             echo 'hist:keys=common_type' > {0}/trigger && echo 1 > {0}/enable",
            Self::EVENT
        );
        match try_sh(&setup) {
            Ok(_) => Some(CtAllocProbe),
            Err(e) => {
                log(&format!("conntrack allocation counter unavailable: {e:#}"));
                Self::remove();
                None
            }
        }
    }

    /// Allocations counted since start (the hist trigger's total hit count).
    fn count(&self) -> Option<u64> {
        let hist = std::fs::read_to_string(format!("{}/hist", Self::EVENT)).ok()?;
        hist.lines()
            .find_map(|l| l.trim().strip_prefix("Hits:"))
            .and_then(|n| n.trim().parse().ok())
    }

    fn remove() {
        let _ = try_sh(&format!(
            "echo 0 > {0}/enable; echo '!hist:keys=common_type' > {0}/trigger; \
             echo '-:kib_ct_alloc' >> /sys/kernel/tracing/kprobe_events; true",
            Self::EVENT
        ));
    }
}

impl Drop for CtAllocProbe {
    fn drop(&mut self) {
        Self::remove();
    }
}

/// Per-program BPF run counts and times (`bpftool prog show`, with bpf_stats enabled).
fn bpf_prog_stats() -> Result<BTreeMap<String, (u64, u64)>> {
    let v: Value =
        serde_json::from_str(&try_sh("bpftool prog show --json")?).context("bpftool prog show")?;
    let mut out = BTreeMap::new();
    for p in v.as_array().into_iter().flatten() {
        let name = format!(
            "{}#{}",
            p["name"].as_str().unwrap_or("?"),
            p["id"].as_u64().unwrap_or(0)
        );
        out.insert(
            name,
            (
                p["run_cnt"].as_u64().unwrap_or(0),
                p["run_time_ns"].as_u64().unwrap_or(0),
            ),
        );
    }
    Ok(out)
}

/// Per datapath, on a fresh topology: conntrack events per connection, BPF run-time statistics
/// (ours), and the table-full case.
fn detail(
    cfg: &Config,
    dp: Datapath,
    globals: ConntrackGlobals,
    fill: &[ServicePort],
) -> Result<Value> {
    let t = SnatTopology::try_new(&format!("d{}", &dp.name()[..2]))?;
    let _srv = start_servers(&t)?;
    let bench = bench_services();
    let (mut active, _) = Active::program(dp, &t, &bench, globals)?;
    verify(&t)?;
    let services = if cfg.detail_fill && !fill.is_empty() {
        let all: Vec<ServicePort> = bench.iter().chain(fill).cloned().collect();
        active.add(&t, &all, fill)?;
        verify(&t)?;
        1 + fill.len()
    } else {
        1
    };
    let mut events = serde_json::Map::new();
    for (name, from, to) in [
        ("clusterip", Source::Pod, format!("{CLUSTER_IP}:80")),
        (
            "nodeport",
            Source::Client,
            format!("{NODE_IP}:{TCP_NODE_PORT}"),
        ),
    ] {
        let ns = from.ns(&t);
        let before = ct_count(&t.node)?;
        let allocs = CtAllocProbe::start();
        let (n, lg) =
            count_new_events(&t.node, || loadgen(ns, &cps_args(&to, cfg.event_conns, 4)))?;
        let allocated = allocs.as_ref().and_then(CtAllocProbe::count);
        drop(allocs);
        let after = ct_count(&t.node)?;
        let ok = lg["ok"].as_u64().unwrap_or(0);
        events.insert(
            name.into(),
            json!({
                "conns": ok,
                "new_events": n,
                "new_events_per_conn": n as f64 / ok.max(1) as f64,
                "count_growth": after as i64 - before as i64,
                "growth_per_conn": (after as i64 - before as i64) as f64 / ok.max(1) as f64,
                "allocs": allocated,
                "allocs_per_conn": allocated.map(|a| a as f64 / ok.max(1) as f64),
            }),
        );
    }

    // Where the time goes in our datapath: the BPF programs' own run time per connection,
    // measured outside the timed windows (bpf_stats costs two clock reads per run).
    let mut bpf = serde_json::Map::new();
    if dp == Datapath::Ours {
        try_sh("sysctl -qw kernel.bpf_stats_enabled=1")?;
        // And on traffic that is not service traffic: the runs it pays, and what each costs.
        for (name, from, to) in [
            ("clusterip", Source::Pod, format!("{CLUSTER_IP}:80")),
            (
                "nodeport",
                Source::Client,
                format!("{NODE_IP}:{TCP_NODE_PORT}"),
            ),
            (
                "pod_to_pod",
                Source::Pod,
                format!("{REMOTE_POD}:{OTHER_PORT}"),
            ),
            (
                "node_to_remote",
                Source::Node,
                format!("{REMOTE_POD}:{OTHER_PORT}"),
            ),
        ] {
            let ns = from.ns(&t);
            let c0 = active.counters(&t);
            let before = bpf_prog_stats()?;
            let lg = loadgen(ns, &cps_args(&to, cfg.event_conns, 4))?;
            let after = bpf_prog_stats()?;
            let c1 = active.counters(&t);
            let ok = lg["ok"].as_u64().unwrap_or(0).max(1) as f64;
            let mut progs = serde_json::Map::new();
            let (mut total_ns, mut total_runs) = (0u64, 0u64);
            for (prog, (cnt, ns_)) in &after {
                let (c0_, n0) = before.get(prog).copied().unwrap_or((0, 0));
                let (dc, dn) = (cnt.saturating_sub(c0_), ns_.saturating_sub(n0));
                if dc == 0 {
                    continue;
                }
                total_ns += dn;
                total_runs += dc;
                progs.insert(
                    prog.clone(),
                    json!({
                        "runs": dc, "run_time_ns": dn,
                        "runs_per_conn": dc as f64 / ok,
                        "ns_per_run": dn as f64 / dc as f64,
                        "ns_per_conn": dn as f64 / ok,
                    }),
                );
            }
            let counters: BTreeMap<&String, f64> = c1
                .iter()
                .map(|(k, v)| {
                    (
                        k,
                        v.saturating_sub(c0.get(k).copied().unwrap_or(0)) as f64 / ok,
                    )
                })
                .filter(|(_, v)| *v > 0.0)
                .collect();
            bpf.insert(
                name.into(),
                json!({
                    "conns": ok,
                    "programs": progs,
                    "bpf_ns_per_conn": total_ns as f64 / ok,
                    "bpf_runs_per_conn": total_runs as f64 / ok,
                    "counters_per_conn": counters,
                    "loadgen_cpu": lg["cpu"],
                }),
            );
        }
        try_sh("sysctl -qw kernel.bpf_stats_enabled=0")?;
    }

    log(&format!(
        "{}: conntrack events and BPF statistics done",
        dp.name()
    ));
    // Where the time goes, whatever the datapath: a system-wide profile of each CPS case.
    let profiles = json!({
        "clusterip": profile(&t.pod, &format!("{CLUSTER_IP}:80"), cfg.profile_conns, cfg.concurrency)?,
        "nodeport": profile(&t.client, &format!("{NODE_IP}:{TCP_NODE_PORT}"), cfg.profile_conns, cfg.concurrency)?,
        // The node's own traffic, not to a Service (what the datapath costs it).
        "node_to_remote": profile(&t.node, &format!("{REMOTE_POD}:{OTHER_PORT}"), cfg.profile_conns, cfg.concurrency)?,
    });

    log(&format!("{}: profiles done", dp.name()));
    // The datapath's periodic work without traffic (ours: the agent's sweeps and node checks),
    // which a timed window catches or misses by its phase.
    let idle = idle_window(Duration::from_secs(cfg.idle_seconds));
    // The table-full case: a small conntrack table and many held connections.
    t.node.try_sh("conntrack -F 2>/dev/null; true")?;
    let dmesg_before = table_full_messages();
    ConntrackGlobals::set_max(cfg.ct_max)?;
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak, path) = (stop.clone(), peak.clone(), t.node.path());
        std::thread::spawn(move || {
            let ns_file = std::fs::File::open(&path);
            if let Ok(f) = ns_file
                && nix::sched::setns(
                    std::os::fd::AsFd::as_fd(&f),
                    nix::sched::CloneFlags::CLONE_NEWNET,
                )
                .is_ok()
            {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(s) =
                        std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
                        && let Ok(n) = s.trim().parse::<u64>()
                    {
                        peak.fetch_max(n, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        })
    };
    let hold = loadgen(
        &t.client,
        &[
            "hold".to_string(),
            "--to".into(),
            format!("{NODE_IP}:{TCP_NODE_PORT}"),
            "--conns".into(),
            cfg.hold_conns.to_string(),
            "--timeout".into(),
            "3".into(),
            "--hold".into(),
            "2".into(),
        ],
    );
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let reset = globals.write();
    let hold = hold?;
    reset?;
    let table_full = json!({
        "ct_max": cfg.ct_max,
        "conns": cfg.hold_conns,
        "failed": hold["failed"],
        "established": hold["established"],
        "alive_after_hold": hold["alive_after_hold"],
        "peak_conntrack_count": peak.load(Ordering::Relaxed),
        "kernel_table_full_messages": table_full_messages().saturating_sub(dmesg_before),
        "loadgen": hold,
    });
    log(&format!(
        "{} table full: {} of {} failed (peak conntrack {})",
        dp.name(),
        table_full["failed"],
        cfg.hold_conns,
        table_full["peak_conntrack_count"]
    ));
    active.teardown(&t)?;
    Ok(json!({
        "datapath": dp.name(),
        "services": services,
        "conntrack_events": events,
        "bpf_stats": bpf,
        "profile": profiles,
        "idle": idle,
        "table_full": table_full,
    }))
}

/// The whole guest's busy CPU over `window` without traffic (`/proc/stat`: all CPUs' time
/// less idle and iowait), and the processes that used it.
fn idle_window(window: Duration) -> Value {
    let busy_ticks = || -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let v: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let total: u64 = v.iter().take(8).sum();
        Some(total.saturating_sub(v.get(3)? + v.get(4).unwrap_or(&0)))
    };
    let agent = agent_total_ns;
    let (p0, a0, b0, start) = (cpu_ticks("/proc"), agent(), busy_ticks(), Instant::now());
    std::thread::sleep(window);
    let (b1, window_s, a1, p1) = (
        busy_ticks(),
        start.elapsed().as_secs_f64(),
        agent(),
        cpu_ticks("/proc"),
    );
    match (b0, b1) {
        (Some(b0), Some(b1)) => json!({
            "window_s": window_s,
            "busy_s": b1.saturating_sub(b0) as f64 / ticks_per_second(),
            "processes_cpu_s": busy_processes(&p0, &p1),
            // The agent's steady rate (schedstat, precise): what the report counts for it in
            // every timed window of ours instead of what the window's phase caught.
            "agent_cpu_s": match (a0, a1) {
                (Some(a0), Some(a1)) => json!(a1.saturating_sub(a0) as f64 / 1e9),
                _ => Value::Null,
            },
        }),
        _ => Value::Null,
    }
}

/// A system-wide profile (`perf record -a`, cpu-clock) of a NodePort or ClusterIP CPS run from
/// `ns`: every symbol's CPU time per connection, and the loadgen figures. Null when `perf` is
/// not staged.
fn profile(ns: &Netns, to: &str, conns: u64, concurrency: usize) -> Result<Value> {
    if try_sh("command -v perf >/dev/null").is_err() {
        return Ok(Value::Null);
    }
    let data = format!("/tmp/perf-{}.data", ns.name());
    let out = Command::new("perf")
        .args([
            "record", "-a", "-g", "-q", "-F", "5000", "-o", &data, "--", "nsenter",
        ])
        .arg(format!("--net={}", ns.path()))
        .arg(loadgen_bin())
        .args(cps_args(to, conns, concurrency))
        .stderr(Stdio::inherit())
        .output()
        .context("perf record")?;
    if !out.status.success() {
        bail!("perf record failed ({})", out.status);
    }
    let lg: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim())
        .context("loadgen output under perf")?;
    let report = try_sh(&format!(
        "perf report -i {data} --stdio -q --no-children --sort dso,sym -F overhead,period,dso,sym --percent-limit 0 2>/dev/null"
    ))?;
    // Who calls the symbols worth attributing (callee order: each symbol, then the chains of
    // its callers, as shares of all samples).
    let mut callers = serde_json::Map::new();
    let wanted = std::env::var("BENCH_PROFILE_CALLERS")
        .unwrap_or_else(|_| "__memset,nft_do_chain".to_string());
    for sym in wanted.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let text = try_sh(&format!(
            "perf report -i {data} --stdio -q --no-children --sort sym -S '{sym}' \
             -g graph,0.25,callee,function,percent --max-stack 16 2>/dev/null | head -n 120"
        ))
        .unwrap_or_default();
        if !text.trim().is_empty() {
            callers.insert(sym.to_string(), Value::String(text));
        }
    }
    let _ = std::fs::remove_file(&data);
    let ok = lg["ok"].as_u64().unwrap_or(0).max(1) as f64;
    let mut symbols = Vec::new();
    let mut total = 0.0;
    for line in report.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(mark) = f.iter().position(|x| *x == "[k]" || *x == "[.]") else {
            continue;
        };
        if mark < 3 {
            continue;
        }
        let Ok(period) = f[1].parse::<f64>() else {
            continue;
        };
        let dso = f[2..mark].join(" ");
        let sym = f[mark + 1..].join(" ");
        total += period;
        symbols.push(json!({
            "dso": dso,
            "sym": sym,
            "kernel": f[mark] == "[k]",
            "ns_per_conn": period / ok,
        }));
    }
    Ok(json!({
        "conns": ok,
        "event": "cpu-clock",
        "total_ns_per_conn": total / ok,
        "symbols": symbols,
        "callers": callers,
        "loadgen": lg,
    }))
}

/// Profiles of the direct baseline (no Service), for the difference with each datapath's.
fn detail_direct(cfg: &Config) -> Result<Value> {
    let t = SnatTopology::try_new("ddi")?;
    t.router.try_sh("ip route add 10.0.1.0/24 via 10.0.2.1")?;
    let _srv = start_servers(&t)?;
    let to = format!("{REMOTE_POD}:8080");
    Ok(json!({
        "datapath": "direct",
        "profile": {
            "clusterip": profile(&t.pod, &to, cfg.profile_conns, cfg.concurrency)?,
            "nodeport": profile(&t.client, &to, cfg.profile_conns, cfg.concurrency)?,
            "node_to_remote": profile(&t.node, &format!("{REMOTE_POD}:{OTHER_PORT}"), cfg.profile_conns, cfg.concurrency)?,
        },
    }))
}

/// "nf_conntrack: table full, dropping packet" lines in the kernel log (rate-limited, so a
/// lower bound of the drops).
fn table_full_messages() -> u64 {
    try_sh("dmesg 2>/dev/null | grep -c 'table full' || true")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench-datapath: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let out_path = std::env::args()
        .skip_while(|a| a != "--out")
        .nth(1)
        .map(PathBuf::from);
    let cfg = Config::from_env()?;
    log(&format!("config {}", cfg.json()));
    for tool in [
        "ipvsadm",
        "ipset",
        "nft",
        "iptables-restore",
        "conntrack",
        "bpftool",
    ] {
        try_sh(&format!("command -v {tool} >/dev/null"))
            .with_context(|| format!("{tool} is missing"))?;
    }
    if !loadgen_bin().exists() {
        bail!("{} not found (LOADGEN_BIN)", loadgen_bin().display());
    }
    // JIT-ed BPF programs get symbols (for the profiles).
    let _ = try_sh("sysctl -qw net.core.bpf_jit_kallsyms=1");
    let globals = ConntrackGlobals::read()?;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let fill = fill_services(cfg.fill);
    let started = Instant::now();
    let mut records = Vec::new();
    let mut details = Vec::new();
    let mut error = None;
    let result = (|| -> Result<()> {
        for round in 0..cfg.rounds {
            records.extend(baseline(&cfg, round)?);
            for &dp in &cfg.datapaths {
                records.extend(datapath_round(&cfg, round, dp, globals, &fill)?);
            }
        }
        details.push(detail_direct(&cfg)?);
        for &dp in cfg.datapaths.iter().filter(|dp| dp.serves()) {
            details.push(detail(&cfg, dp, globals, &fill)?);
        }
        Ok(())
    })();
    if let Err(e) = result {
        error = Some(format!("{e:#}"));
    }
    let _ = globals.write();
    let doc = json!({
        "kernel": release,
        "lab_kernel": lab::lab_kernel(),
        "clock": cfg.clock,
        "config": cfg.json(),
        "cpus": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "conntrack_defaults": { "max": globals.max, "hashsize": globals.hashsize },
        "elapsed_s": started.elapsed().as_secs_f64(),
        "records": records,
        "details": details,
        "error": error,
    });
    let text = serde_json::to_string(&doc).context("JSON")?;
    match &out_path {
        Some(p) => std::fs::write(p, &text).with_context(|| format!("write {}", p.display()))?,
        None => println!("{text}"),
    }
    if let Some(e) = error {
        bail!("{e}");
    }
    log(&format!("done in {:.0}s", started.elapsed().as_secs_f64()));
    Ok(())
}
