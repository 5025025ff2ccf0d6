//! `loadgen`: the datapath benchmark's traffic generator and its server, one binary, one JSON
//! object on stdout per run. This program owns the wire protocol between the two and the
//! figures of one traffic run: rates, latency percentiles, failures by kind, the machine's CPU
//! time over the timed window (`/proc/stat`), the agent's within it (`agent_s`, its threads'
//! schedstat, where it runs) and the process's own rusage.
//!
//! Modes (every client mode is bounded in count and in time, `--max-time`):
//! - `server`: answers TCP requests (any number per connection, multi-threaded, held
//!   connections stay open until the client closes them) and UDP requests;
//! - `cps`: short connections at a fixed concurrency: connect, one request/response, close;
//! - `rr`: request/response on kept-alive connections;
//! - `bulk`: one large response per stream (throughput);
//! - `udp-rr`: UDP request/response;
//! - `hold`: opens N connections (a bounded number of connects in flight), proves each with one
//!   request/response, holds them all, and reports how many failed.
//!
//! Wire protocol: a TCP request is a 16-byte header — magic `LGN1`, the request payload length
//! (u32 BE), the response length (u64 BE) — followed by the payload; the server answers with
//! that many bytes. A UDP request is magic, a sequence number (u32 BE) and the response length
//! (u64 BE); the answer starts with the magic and the sequence number.
//!
//! The program only talks to the address it is given; the benchmark runs it inside lab network
//! namespaces (`nsenter --net=…`).

mod agent_cpu;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::sync::Mutex;

const MAGIC: [u8; 4] = *b"LGN1";
const CHUNK: usize = 64 * 1024;
/// What the server answers with. Static: a per-connection buffer (allocated, zeroed, faulted
/// in, freed) costs more CPU than the kernel's whole service path and would dilute every ratio.
static RESPONSE: [u8; CHUNK] = [b'z'; CHUNK];

#[derive(Parser)]
#[command(
    about = "Benchmark traffic: short connections, request/response, bulk, UDP, held connections"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

/// Options every client mode shares.
#[derive(clap::Args, Clone)]
struct Target {
    /// Where to connect (a service address, or a backend for a direct baseline).
    #[arg(long)]
    to: SocketAddr,
    /// Timeout of each connect and of each response (seconds).
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
    /// The whole run stops after this long (seconds); the output says it was cut short.
    #[arg(long, default_value_t = 600.0)]
    max_time: f64,
}

#[derive(Subcommand)]
enum Mode {
    /// Serve TCP and UDP requests until killed or `--max-time`.
    Server {
        /// TCP listen address (repeatable).
        #[arg(long)]
        tcp: Vec<SocketAddr>,
        /// UDP address (repeatable).
        #[arg(long)]
        udp: Vec<SocketAddr>,
        /// Exit after this many seconds.
        #[arg(long, default_value_t = 6.0 * 3600.0)]
        max_time: f64,
    },
    /// Short connections at a fixed concurrency: connect, one request/response, close.
    Cps {
        #[command(flatten)]
        target: Target,
        /// Connections in total.
        #[arg(long, default_value_t = 1000)]
        conns: u64,
        /// Connections in flight at any time.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Request payload bytes.
        #[arg(long, default_value_t = 64)]
        request: u32,
        /// Response bytes.
        #[arg(long, default_value_t = 128)]
        response: u64,
    },
    /// Request/response on kept-alive connections.
    Rr {
        #[command(flatten)]
        target: Target,
        /// Connections (each carries requests one after another).
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Requests in total.
        #[arg(long, default_value_t = 5000)]
        requests: u64,
        #[arg(long, default_value_t = 64)]
        request: u32,
        #[arg(long, default_value_t = 128)]
        response: u64,
    },
    /// Bulk download: each stream asks for bytes/streams bytes in one response.
    Bulk {
        #[command(flatten)]
        target: Target,
        /// Bytes in total.
        #[arg(long, default_value_t = 64 << 20)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        streams: usize,
    },
    /// UDP request/response.
    UdpRr {
        #[command(flatten)]
        target: Target,
        /// Requests in total.
        #[arg(long, default_value_t = 2000)]
        requests: u64,
        /// Sockets, each with one request in flight.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 64)]
        request: u32,
        #[arg(long, default_value_t = 128)]
        response: u64,
    },
    /// Open N connections and hold them; report how many failed.
    Hold {
        #[command(flatten)]
        target: Target,
        /// Connections to open.
        #[arg(long, default_value_t = 5000)]
        conns: usize,
        /// Connects in flight at any time.
        #[arg(long, default_value_t = 256)]
        in_flight: usize,
        /// How long to hold the open connections once every attempt has finished (seconds).
        #[arg(long, default_value_t = 2.0)]
        hold: f64,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("loadgen: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    raise_nofile();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let out = rt.block_on(async {
        match cli.mode {
            Mode::Server { tcp, udp, max_time } => server(tcp, udp, max_time).await,
            Mode::Cps {
                target,
                conns,
                concurrency,
                request,
                response,
            } => cps(target, conns, concurrency, request, response).await,
            Mode::Rr {
                target,
                connections,
                requests,
                request,
                response,
            } => rr(target, connections, requests, request, response).await,
            Mode::Bulk {
                target,
                bytes,
                streams,
            } => bulk(target, bytes, streams).await,
            Mode::UdpRr {
                target,
                requests,
                concurrency,
                request,
                response,
            } => udp_rr(target, requests, concurrency, request, response).await,
            Mode::Hold {
                target,
                conns,
                in_flight,
                hold,
            } => hold_conns(target, conns, in_flight, hold).await,
        }
    })?;
    if let Some(v) = out {
        println!("{v}");
    }
    Ok(())
}

/// Raises RLIMIT_NOFILE to its hard limit (and the hard limit to `nr_open` when allowed): the
/// held-connection case opens thousands of sockets.
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let want = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err()
        && let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

// --- measurements ---------------------------------------------------------------------------

/// The `cpu` line of /proc/stat, in seconds.
#[derive(Clone, Copy, Default)]
struct CpuTimes {
    user: f64,
    nice: f64,
    system: f64,
    idle: f64,
    iowait: f64,
    irq: f64,
    softirq: f64,
    steal: f64,
}

impl CpuTimes {
    fn read() -> CpuTimes {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
            n if n > 0 => n as f64,
            _ => 100.0,
        };
        let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
            return CpuTimes::default();
        };
        let v: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse::<f64>().unwrap_or(0.0) / hz)
            .collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0.0);
        CpuTimes {
            user: at(0),
            nice: at(1),
            system: at(2),
            idle: at(3),
            iowait: at(4),
            irq: at(5),
            softirq: at(6),
            steal: at(7),
        }
    }

    fn busy(&self) -> f64 {
        self.user + self.nice + self.system + self.irq + self.softirq + self.steal
    }

    /// The window from `self` to `end`, as JSON (seconds of CPU time, all CPUs).
    fn delta_json(&self, end: &CpuTimes, window: f64) -> Value {
        json!({
            "window_s": window,
            "busy_s": end.busy() - self.busy(),
            "user_s": (end.user + end.nice) - (self.user + self.nice),
            "system_s": end.system - self.system,
            "softirq_s": end.softirq - self.softirq,
            "irq_s": end.irq - self.irq,
            "idle_s": (end.idle + end.iowait) - (self.idle + self.iowait),
        })
    }
}

fn rusage_json() -> Value {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(r) => {
            let s = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            json!({ "user_s": s(r.user_time()), "system_s": s(r.system_time()) })
        }
        Err(_) => Value::Null,
    }
}

/// Latency percentiles (µs) of the samples.
fn latency_json(samples: &mut [u64]) -> Value {
    if samples.is_empty() {
        return Value::Null;
    }
    samples.sort_unstable();
    let pct = |p: f64| {
        let i = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i]
    };
    let mean = samples.iter().sum::<u64>() as f64 / samples.len() as f64;
    json!({
        "p50": pct(0.50),
        "p90": pct(0.90),
        "p99": pct(0.99),
        "p999": pct(0.999),
        "max": samples[samples.len() - 1],
        "mean": mean,
        "samples": samples.len(),
    })
}

/// Failures by kind.
#[derive(Default)]
struct Failures(BTreeMap<String, u64>);

impl Failures {
    fn add(&mut self, e: &std::io::Error) {
        let kind = match e.kind() {
            std::io::ErrorKind::TimedOut => "timeout".to_string(),
            std::io::ErrorKind::ConnectionRefused => "refused".to_string(),
            std::io::ErrorKind::ConnectionReset => "reset".to_string(),
            std::io::ErrorKind::UnexpectedEof => "eof".to_string(),
            k => format!("{k:?}").to_lowercase(),
        };
        *self.0.entry(kind).or_default() += 1;
    }

    fn merge(&mut self, other: Failures) {
        for (k, v) in other.0 {
            *self.0.entry(k).or_default() += v;
        }
    }

    fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// The window of one run: start time and CPU times (the machine's, and the agent's where it
/// runs), and the deadline.
struct Window {
    start: Instant,
    cpu: CpuTimes,
    agent_threads: BTreeMap<String, u64>,
    deadline: Instant,
}

impl Window {
    fn open(max_time: f64) -> Window {
        let agent_threads = agent_cpu::run_time_ns_by_thread(agent_cpu::AGENT_COMM);
        let cpu = CpuTimes::read();
        let start = Instant::now();
        Window {
            start,
            cpu,
            agent_threads,
            deadline: start + Duration::from_secs_f64(max_time),
        }
    }

    /// Closes the window: elapsed seconds and the CPU figures, with the agent's CPU time in the
    /// window (`agent_s`, null without an agent) and the threads that used it.
    fn close(&self) -> (f64, Value) {
        let elapsed = self.start.elapsed().as_secs_f64();
        let end = CpuTimes::read();
        let threads_end = agent_cpu::run_time_ns_by_thread(agent_cpu::AGENT_COMM);
        let mut cpu = self.cpu.delta_json(&end, elapsed);
        let (start, end_ns) = (
            agent_cpu::total(&self.agent_threads),
            agent_cpu::total(&threads_end),
        );
        cpu["agent_s"] = match (start, end_ns) {
            (Some(a), Some(b)) => json!(b.saturating_sub(a) as f64 / 1e9),
            _ => Value::Null,
        };
        let threads: BTreeMap<&String, f64> = threads_end
            .iter()
            .map(|(name, ns)| {
                let before = self.agent_threads.get(name).copied().unwrap_or(0);
                (name, ns.saturating_sub(before) as f64 / 1e9)
            })
            .filter(|(_, s)| *s > 0.0)
            .collect();
        cpu["agent_threads_s"] = json!(threads);
        (elapsed, cpu)
    }

    fn expired(&self) -> bool {
        Instant::now() >= self.deadline
    }
}

fn timeout_err() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out")
}

async fn with_timeout<T>(
    d: Duration,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(d, f)
        .await
        .unwrap_or_else(|_| Err(timeout_err()))
}

fn request_header(payload: u32, response: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&payload.to_be_bytes());
    h[8..].copy_from_slice(&response.to_be_bytes());
    h
}

/// One request/response on `s`: writes the header and payload, reads the whole response.
async fn exchange(
    s: &mut TcpStream,
    req: &[u8],
    response: u64,
    buf: &mut [u8],
) -> std::io::Result<()> {
    s.write_all(req).await?;
    let mut left = response;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = s.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        left -= n as u64;
    }
    Ok(())
}

fn request_bytes(payload: u32, response: u64) -> Vec<u8> {
    let mut req = request_header(payload, response).to_vec();
    req.resize(16 + payload as usize, b'q');
    req
}

// --- server ---------------------------------------------------------------------------------

async fn server(
    tcp: Vec<SocketAddr>,
    udp: Vec<SocketAddr>,
    max_time: f64,
) -> Result<Option<Value>> {
    if tcp.is_empty() && udp.is_empty() {
        bail!("nothing to serve: give --tcp and/or --udp");
    }
    let served = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for addr in tcp {
        let sock = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .context("TCP socket")?;
        sock.set_reuseaddr(true).context("SO_REUSEADDR")?;
        sock.bind(addr).with_context(|| format!("bind {addr}"))?;
        let listener = sock
            .listen(65535)
            .with_context(|| format!("listen {addr}"))?;
        let served = served.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let served = served.clone();
                tokio::spawn(async move {
                    let _ = serve_tcp(s, &served).await;
                });
            }
        }));
    }
    for addr in udp {
        let sock = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("bind UDP {addr}"))?;
        let served = served.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            let mut reply = vec![b'r'; 65507];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                if n < 16 || buf[..4] != MAGIC {
                    continue;
                }
                let len = u64::from_be_bytes(buf[8..16].try_into().unwrap_or([0; 8]))
                    .clamp(8, reply.len() as u64) as usize;
                reply[..8].copy_from_slice(&buf[..8]);
                let _ = sock.send_to(&reply[..len], peer).await;
                served.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    println!("ready");
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs_f64(max_time)) => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => { s.recv().await; }
                Err(_) => std::future::pending::<()>().await,
            }
        } => {}
    }
    for t in tasks {
        t.abort();
    }
    Ok(Some(
        json!({ "mode": "server", "served": served.load(Ordering::Relaxed) }),
    ))
}

/// Answers requests on one connection until the client closes it.
async fn serve_tcp(mut s: TcpStream, served: &AtomicU64) -> std::io::Result<()> {
    let _ = s.set_nodelay(true);
    let mut sink = [0u8; 512];
    loop {
        let mut h = [0u8; 16];
        match s.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        if h[..4] != MAGIC {
            return Ok(());
        }
        let mut payload = u32::from_be_bytes(h[4..8].try_into().unwrap_or([0; 4])) as usize;
        while payload > 0 {
            let n = payload.min(sink.len());
            s.read_exact(&mut sink[..n]).await?;
            payload -= n;
        }
        let mut left = u64::from_be_bytes(h[8..16].try_into().unwrap_or([0; 8]));
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            s.write_all(&RESPONSE[..n]).await?;
            left -= n as u64;
        }
        served.fetch_add(1, Ordering::Relaxed);
    }
}

// --- clients --------------------------------------------------------------------------------

async fn cps(
    t: Target,
    conns: u64,
    concurrency: usize,
    request: u32,
    response: u64,
) -> Result<Option<Value>> {
    let timeout = Duration::from_secs_f64(t.timeout);
    let next = Arc::new(AtomicU64::new(0));
    let w = Window::open(t.max_time);
    let deadline = w.deadline;
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let next = next.clone();
        let to = t.to;
        workers.push(tokio::spawn(async move {
            let req = request_bytes(request, response);
            let mut buf = vec![0u8; CHUNK];
            let (mut lat, mut fail) = (Vec::new(), Failures::default());
            while Instant::now() < deadline && next.fetch_add(1, Ordering::Relaxed) < conns {
                let t0 = Instant::now();
                let r = async {
                    let mut s = with_timeout(timeout, TcpStream::connect(to)).await?;
                    s.set_nodelay(true)?;
                    with_timeout(timeout, exchange(&mut s, &req, response, &mut buf)).await
                }
                .await;
                match r {
                    Ok(()) => lat.push(t0.elapsed().as_micros() as u64),
                    Err(e) => fail.add(&e),
                }
            }
            (lat, fail)
        }));
    }
    let (lat, fail) = join_workers(workers).await?;
    let attempted = lat.len() as u64 + fail.total();
    Ok(Some(window_report(
        &w,
        lat,
        fail,
        json!({ "mode": "cps", "to": t.to.to_string(), "concurrency": concurrency, "attempted": attempted }),
    )))
}

/// Waits for every worker and gathers their latencies (µs) and failures.
async fn join_workers(
    workers: Vec<tokio::task::JoinHandle<(Vec<u64>, Failures)>>,
) -> Result<(Vec<u64>, Failures)> {
    let (mut lat, mut fail) = (Vec::new(), Failures::default());
    for wk in workers {
        let (l, f) = wk.await.context("worker")?;
        lat.extend(l);
        fail.merge(f);
    }
    Ok((lat, fail))
}

/// Closes the timed window and reports what every request mode reports (successes, failures,
/// rate, latency percentiles, CPU), after the mode's own fields in `head`.
fn window_report(w: &Window, mut lat: Vec<u64>, fail: Failures, mut head: Value) -> Value {
    let (elapsed, cpu) = w.close();
    let ok = lat.len() as u64;
    let common = json!({
        "ok": ok,
        "failed": fail.total(),
        "failures": fail.0,
        "truncated": w.expired(),
        "elapsed_s": elapsed,
        "rate_per_s": ok as f64 / elapsed,
        "latency_us": latency_json(&mut lat),
        "cpu": cpu,
        "rusage": rusage_json(),
    });
    if let (Some(h), Value::Object(c)) = (head.as_object_mut(), common) {
        h.extend(c);
    }
    head
}

async fn rr(
    t: Target,
    connections: usize,
    requests: u64,
    request: u32,
    response: u64,
) -> Result<Option<Value>> {
    let timeout = Duration::from_secs_f64(t.timeout);
    // Connections are opened before the window: this mode measures requests only.
    let mut streams = Vec::new();
    for _ in 0..connections.max(1) {
        let s = with_timeout(timeout, TcpStream::connect(t.to))
            .await
            .with_context(|| format!("connect {}", t.to))?;
        s.set_nodelay(true)?;
        streams.push(s);
    }
    let next = Arc::new(AtomicU64::new(0));
    let w = Window::open(t.max_time);
    let deadline = w.deadline;
    let mut workers = Vec::new();
    for mut s in streams {
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let req = request_bytes(request, response);
            let mut buf = vec![0u8; CHUNK];
            let (mut lat, mut fail) = (Vec::new(), Failures::default());
            while Instant::now() < deadline && next.fetch_add(1, Ordering::Relaxed) < requests {
                let t0 = Instant::now();
                match with_timeout(timeout, exchange(&mut s, &req, response, &mut buf)).await {
                    Ok(()) => lat.push(t0.elapsed().as_micros() as u64),
                    Err(e) => {
                        fail.add(&e);
                        break;
                    }
                }
            }
            (lat, fail)
        }));
    }
    let (lat, fail) = join_workers(workers).await?;
    Ok(Some(window_report(
        &w,
        lat,
        fail,
        json!({ "mode": "rr", "to": t.to.to_string(), "connections": connections }),
    )))
}

async fn bulk(t: Target, bytes: u64, streams: usize) -> Result<Option<Value>> {
    let timeout = Duration::from_secs_f64(t.timeout);
    let per = bytes / streams.max(1) as u64;
    let w = Window::open(t.max_time);
    let deadline = w.deadline;
    let received = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..streams.max(1) {
        let (to, received) = (t.to, received.clone());
        workers.push(tokio::spawn(async move {
            let mut s = with_timeout(timeout, TcpStream::connect(to)).await?;
            s.write_all(&request_header(0, per)).await?;
            let mut buf = vec![0u8; 4 * CHUNK];
            let mut left = per;
            while left > 0 {
                if Instant::now() >= deadline {
                    return Err(timeout_err());
                }
                let n = with_timeout(timeout, s.read(&mut buf)).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                left = left.saturating_sub(n as u64);
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
            Ok::<(), std::io::Error>(())
        }));
    }
    let mut fail = Failures::default();
    for wk in workers {
        if let Err(e) = wk.await.context("worker")? {
            fail.add(&e);
        }
    }
    let (elapsed, cpu) = w.close();
    let got = received.load(Ordering::Relaxed);
    Ok(Some(json!({
        "mode": "bulk",
        "to": t.to.to_string(),
        "streams": streams,
        "bytes": got,
        "failed": fail.total(),
        "failures": fail.0,
        "truncated": w.expired(),
        "elapsed_s": elapsed,
        "rate_per_s": got as f64 * 8.0 / 1e6 / elapsed,
        "unit": "Mbit/s",
        "cpu": cpu,
        "rusage": rusage_json(),
    })))
}

async fn udp_rr(
    t: Target,
    requests: u64,
    concurrency: usize,
    request: u32,
    response: u64,
) -> Result<Option<Value>> {
    let timeout = Duration::from_secs_f64(t.timeout);
    let mut socks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let bind: SocketAddr = if t.to.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        };
        let s = UdpSocket::bind(bind).await.context("bind UDP")?;
        s.connect(t.to)
            .await
            .with_context(|| format!("connect {}", t.to))?;
        socks.push(s);
    }
    let next = Arc::new(AtomicU64::new(0));
    let w = Window::open(t.max_time);
    let deadline = w.deadline;
    let mut workers = Vec::new();
    for s in socks {
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut req = vec![b'u'; 16 + request as usize];
            req[..4].copy_from_slice(&MAGIC);
            req[8..16].copy_from_slice(&response.to_be_bytes());
            let mut buf = vec![0u8; 65536];
            let (mut lat, mut lost) = (Vec::new(), 0u64);
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= requests || Instant::now() >= deadline {
                    break;
                }
                let seq = seq as u32;
                req[4..8].copy_from_slice(&seq.to_be_bytes());
                let t0 = Instant::now();
                if s.send(&req).await.is_err() {
                    lost += 1;
                    continue;
                }
                let answered = tokio::time::timeout(timeout, async {
                    loop {
                        match s.recv(&mut buf).await {
                            Ok(n) if n >= 8 && buf[4..8] == seq.to_be_bytes() => return true,
                            Ok(_) => continue, // a late answer to an earlier request
                            Err(_) => return false,
                        }
                    }
                })
                .await
                .unwrap_or(false);
                if answered {
                    lat.push(t0.elapsed().as_micros() as u64);
                } else {
                    lost += 1;
                }
            }
            (lat, lost)
        }));
    }
    let (mut lat, mut lost) = (Vec::new(), 0);
    for wk in workers {
        let (l, n) = wk.await.context("worker")?;
        lat.extend(l);
        lost += n;
    }
    let mut fail = Failures::default();
    if lost > 0 {
        fail.0.insert("timeout".into(), lost);
    }
    Ok(Some(window_report(
        &w,
        lat,
        fail,
        json!({ "mode": "udp-rr", "to": t.to.to_string(), "concurrency": concurrency }),
    )))
}

async fn hold_conns(t: Target, conns: usize, in_flight: usize, hold: f64) -> Result<Option<Value>> {
    let timeout = Duration::from_secs_f64(t.timeout);
    let held = Arc::new(Mutex::new(Vec::with_capacity(conns)));
    let gate = Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
    let w = Window::open(t.max_time);
    let deadline = w.deadline;
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let permit = gate.clone().acquire_owned().await.context("semaphore")?;
        if Instant::now() >= deadline {
            break;
        }
        let (to, held) = (t.to, held.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let t0 = Instant::now();
            let r = async {
                let mut s = with_timeout(timeout, TcpStream::connect(to)).await?;
                let mut buf = [0u8; 64];
                with_timeout(
                    timeout,
                    exchange(&mut s, &request_header(0, 16), 16, &mut buf),
                )
                .await?;
                Ok::<TcpStream, std::io::Error>(s)
            }
            .await;
            match r {
                Ok(s) => {
                    held.lock().await.push(s);
                    Ok(t0.elapsed().as_micros() as u64)
                }
                Err(e) => Err(e),
            }
        }));
    }
    let attempted = tasks.len();
    let (mut lat, mut fail) = (Vec::new(), Failures::default());
    for task in tasks {
        match task.await.context("connection task")? {
            Ok(us) => lat.push(us),
            Err(e) => fail.add(&e),
        }
    }
    let (elapsed, cpu) = w.close();
    let established = held.lock().await.len();
    // Every held connection still answers after the hold (the table-full case must not lose
    // them either).
    tokio::time::sleep(Duration::from_secs_f64(hold)).await;
    let mut alive = 0usize;
    let mut buf = [0u8; 64];
    for s in held.lock().await.iter_mut() {
        if with_timeout(timeout, exchange(s, &request_header(0, 16), 16, &mut buf))
            .await
            .is_ok()
        {
            alive += 1;
        }
    }
    held.lock().await.clear();
    Ok(Some(json!({
        "mode": "hold",
        "to": t.to.to_string(),
        "conns": conns,
        "attempted": attempted,
        "established": established,
        "failed": conns - established,
        "failures": fail.0,
        "alive_after_hold": alive,
        "hold_s": hold,
        "elapsed_s": elapsed,
        "latency_us": latency_json(&mut lat),
        "cpu": cpu,
        "rusage": rusage_json(),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<u64> = (1..=1000).rev().collect();
        let l = latency_json(&mut v);
        assert_eq!(l["p50"], 500);
        assert_eq!(l["p99"], 990);
        assert_eq!(l["p999"], 999);
        assert_eq!(l["max"], 1000);
        assert_eq!(latency_json(&mut []), Value::Null);
    }

    #[test]
    fn requests_carry_their_sizes() {
        let r = request_bytes(3, 1 << 33);
        assert_eq!(r.len(), 19);
        assert_eq!(&r[..4], b"LGN1");
        assert_eq!(u32::from_be_bytes(r[4..8].try_into().unwrap()), 3);
        assert_eq!(u64::from_be_bytes(r[8..16].try_into().unwrap()), 1 << 33);
    }

    #[tokio::test]
    async fn a_server_answers_short_and_held_connections() {
        let listener = TcpSocket::new_v4().unwrap();
        listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listener.listen(16).unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let s2 = served.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let s2 = s2.clone();
                tokio::spawn(async move {
                    let _ = serve_tcp(s, &s2).await;
                });
            }
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = vec![0u8; CHUNK];
        for _ in 0..3 {
            exchange(&mut c, &request_bytes(10, 100_000), 100_000, &mut buf)
                .await
                .unwrap();
        }
        assert_eq!(served.load(Ordering::Relaxed), 3);
    }
}
