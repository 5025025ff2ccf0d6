//! Benchmark of the datapath programs: ns per packet for each path, measured with
//! BPF_PROG_TEST_RUN on this host's kernel (root needed). Two methods, each with every timed run
//! taking the path it is counted for (checked by the path's counter moving by exactly the
//! number of runs, and by the packet each run leaves):
//!
//! 1. **repeat** (the headline, `bpf.*`): one BPF_PROG_TEST_RUN with `repeat` = N and
//!    `kernel.bpf_stats_enabled` off; the figure is the kernel's own mean duration per run. Each
//!    run sees the packet and map state the previous one left, so the state is built so that the
//!    path repeats: for the fast path and reverse NAT two entries translate the packet back and
//!    forth (A → B → A …, a real rewrite every run);
//!    for ICMP errors the same with the quoted packet; for first packets each translated packet
//!    is itself a new connection (its SNAT source is a new client tuple), so every run allocates
//!    a new mapping (batches of 2,000, each to a backend of its own, in a table of the agent's
//!    default size that nothing clears, so it fills up as on a node; the local port range is set
//!    to cover the SNAT ports so each run takes the common path: an allocated port, no attempt to
//!    keep the client's). `floor_ns` is an empty program measured the same way (the test loop and
//!    the call into the program, which a real TC hook pays too), a round of it right before
//!    each round of a path: `bpf_own.*` is the median of the rounds' differences. Figures are
//!    medians over 7 rounds, then over 3 datapaths loaded one after the other.
//! 2. **single runs** (`bpf_detail.single_run`): repeat = 1 on a fresh copy of the input per run
//!    with `kernel.bpf_stats_enabled` on; run_time_ns / run_cnt deltas (each run also pays two
//!    sched_clock reads for the accounting; the empty program's figure is given beside it).
//!
//! Usage: `cargo run --release -p probes --example bench_datapath [iterations]`

use std::error::Error;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use libbpf_rs::query::ProgInfoIter;
use libbpf_rs::{ObjectBuilder, Program, ProgramInput};
use probes::maps::{
    ADDR_F_SERVICE, AddrKey, AddrValue, Config, Counter, DEFAULT_MARK_MASQ, DEFAULT_MARK_SVC,
    DEFAULT_SNAT_PORT_MIN, DevValue, L4Proto, SnatEntry, Stats, SvcKey, SvcValue, Tuple,
    addr_to_bytes,
};
use probes::objects::BENCH_BASELINE_OBJECT;
use probes::{
    Datapath, DatapathOptions, DatapathProgram, RewritePolicy, SkbContext, TestRunOutput,
};
use serde_json::{Value, json};
use std::os::fd::AsFd;

type BenchResult<T> = Result<T, Box<dyn Error>>;

const SVC: u32 = DEFAULT_MARK_SVC;
const MASQ: u32 = DEFAULT_MARK_MASQ;
const WARMUP: usize = 2_000;
const ALLOC_BATCH: usize = 2_000;
const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

fn main() -> ExitCode {
    let iterations = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100_000usize);
    match run(iterations) {
        Ok(report) => {
            println!("{report:#}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("bench_datapath: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Restores `kernel.bpf_stats_enabled` on drop.
struct StatsEnabled(String);

impl StatsEnabled {
    fn enable() -> BenchResult<StatsEnabled> {
        let previous = fs::read_to_string(STATS_SYSCTL)?.trim().to_owned();
        fs::write(STATS_SYSCTL, "1")?;
        Ok(StatsEnabled(previous))
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        let _ = fs::write(STATS_SYSCTL, &self.0);
    }
}

/// Removes the bench's pins on drop.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = probes::loader::remove_pins(&self.0);
    }
}

fn ensure_bpffs() -> BenchResult<()> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()?;
        if !status.success() {
            return Err("mount -t bpf bpf /sys/fs/bpf failed".into());
        }
    }
    Ok(())
}

fn run(iterations: usize) -> BenchResult<Value> {
    ensure_bpffs()?;
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/kib-bench-{}",
        std::process::id()
    )));
    // 1. repeat runs, bpf_stats off (it would add its own clock reads to every run), each round
    //    of a path right after a round of the empty program; PASSES datapaths loaded one after
    //    the other (each with maps of its own: where a large map lands in memory changes its
    //    cost from one load to the next), the median of their figures.
    let floor = Floor::load(iterations)?;
    let mut v4_passes = Vec::new();
    let mut v6_passes = Vec::new();
    for pass in 0..PASSES {
        let pass_pins = Pins(pins.0.join(format!("pass{pass}")));
        let dp = load(pass_pins.0.join("v2"), RewritePolicy::Auto)?;
        v4_passes.push(bench_family_repeat(&dp, &floor, Family::V4, iterations)?);
        v6_passes.push(bench_family_repeat(&dp, &floor, Family::V6, iterations)?);
    }
    let v4 = median_of_passes(&v4_passes);
    let v6 = median_of_passes(&v6_passes);
    let dp = load(pins.0.join("v2"), RewritePolicy::Auto)?;
    // The same on the helper rewrite (what kernels without bpf_cast_to_kern_ctx run).
    let helpers_pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/kib-bench-helpers-{}",
        std::process::id()
    )));
    let helpers = load(helpers_pins.0.join("v2"), RewritePolicy::Helpers)?;
    let v4_helpers = bench_family_repeat(&helpers, &floor, Family::V4, iterations)?;
    drop(helpers);
    drop(helpers_pins);

    // 2. single runs, bpf_stats on.
    let single = {
        let _stats = StatsEnabled::enable()?;
        let floor = baseline(iterations)?;
        let v4 = bench_family(&dp, Family::V4, iterations)?;
        let v6 = bench_family(&dp, Family::V6, iterations)?;
        json!({
            "ipv4": v4["stats"],
            "ipv6": v6["stats"],
            "test_run_duration_ns": { "ipv4": v4["test_run"], "ipv6": v6["test_run"] },
            "floor_ns": {
                "bpf_stats": round(floor.stats_ns),
                "test_run": round(floor.test_run_ns),
                "what": "an empty TC program measured the same way (bpf_stats adds two \
                         sched_clock reads per run, the single test run its timer)",
            },
        })
    };
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();
    let rewrite = if dp.direct_writes() {
        "direct writes (nat_write_* tail call)"
    } else {
        "BPF helpers"
    };
    Ok(json!({
        "bpf": figures(&v4, rewrite, PASSES),
        "bpf_own": own(&v4),
        "bpf_ipv6": figures(&v6, rewrite, PASSES),
        "bpf_ipv6_own": own(&v6),
        "bpf_helpers": figures(&v4_helpers, "BPF helpers", 1),
        "single_run": single,
        "iterations_per_path": iterations,
        "kernel": kernel,
    }))
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn load(pin_root: PathBuf, rewrite: RewritePolicy) -> BenchResult<Datapath> {
    let dp = Datapath::load(DatapathOptions {
        pin_root,
        rewrite,
        ..DatapathOptions::default()
    })?;
    dp.maps().set_config(&Config::default())?;
    // As the agent runs them: the programs trust the port filter (bpf/port_filter.h).
    dp.maps().enable_port_filter()?;
    dp.maps().set_device(
        1,
        &DevValue::new(
            Some(Ipv4Addr::new(192, 0, 2, 1)),
            Some("2001:db8::1".parse()?),
        ),
    )?;
    Ok(dp)
}

/// A path's figures with the repeat method: the medians over rounds of its mean per run, of the
/// empty program's (measured right before each of its rounds), and of their difference.
#[derive(Debug, Clone, Copy)]
struct Measure {
    raw: f64,
    floor: f64,
    own: f64,
}

/// The repeat method's figures of one family, with the method stated.
fn figures(paths: &[(&'static str, Measure)], rewrite: &str, passes: usize) -> Value {
    let mut out = serde_json::Map::new();
    for (name, m) in paths {
        out.insert(format!("{name}_ns"), json!(round(m.raw)));
    }
    let floors: Vec<f64> = paths.iter().map(|(_, m)| m.floor).collect();
    if !floors.is_empty() {
        out.insert("floor_ns".into(), json!(round(median(floors))));
    }
    out.insert("rewrite".into(), json!(rewrite));
    out.insert(
        "method".into(),
        json!(format!(
            "BPF_PROG_TEST_RUN repeat=N with kernel.bpf_stats_enabled=0: the kernel's mean \
                 duration per run, median of 7 rounds{}; every run takes the path (counter \
                 moved by exactly the runs; a two-entry cycle rewrites the packet back and forth \
                 for the fast path, reverse NAT and ICMP errors; each first packet's translated \
                 packet is the next run's new connection, 2,000 per batch, a backend per batch, \
                 the table never cleared); floor_ns: an empty program measured the same way, a \
                 round of it right before each round of a path",
            if passes > 1 {
                format!(
                    ", then the median over {passes} datapaths loaded one after the other \
                         (maps of their own)"
                )
            } else {
                String::new()
            }
        )),
    );
    Value::Object(out)
}

/// What the programs themselves cost: per path, the median over rounds of the round's figure
/// minus the empty program's round just before it.
fn own(paths: &[(&'static str, Measure)]) -> Value {
    let mut out = serde_json::Map::new();
    for (name, m) in paths {
        out.insert(format!("{name}_ns"), json!(round(m.own)));
    }
    Value::Object(out)
}

const REPEAT_ROUNDS: usize = 7;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The packet the empty program is measured with (it never looks at it).
fn floor_packet() -> Vec<u8> {
    tcp(
        IpAddr::V4(Ipv4Addr::new(10, 244, 1, 1)),
        40_000,
        IpAddr::V4(Ipv4Addr::new(10, 244, 2, 20)),
        8080,
        0x10,
    )
}

/// The empty program (the measurement floor: the test-run loop and the call into a program,
/// which a real TC hook pays too), for rounds of repeat runs.
struct Floor {
    object: libbpf_rs::Object,
    packet: Vec<u8>,
    iterations: u32,
}

impl Floor {
    fn load(iterations: usize) -> BenchResult<Floor> {
        let object = ObjectBuilder::default()
            .open_memory(BENCH_BASELINE_OBJECT)?
            .load()?;
        let packet = floor_packet();
        let floor = Floor {
            object,
            packet,
            iterations: iterations as u32,
        };
        floor.round()?; // warm-up
        Ok(floor)
    }

    /// One round: the mean duration per run of `iterations` repeat runs.
    fn round(&self) -> BenchResult<f64> {
        let program = self
            .object
            .progs_mut()
            .find(|p| p.name() == "bench_baseline")
            .ok_or("bench_baseline program missing")?;
        let mut out = vec![0u8; self.packet.len() + 64];
        let input = ProgramInput {
            data_in: Some(&self.packet),
            data_out: Some(&mut out),
            repeat: self.iterations,
            ..ProgramInput::default()
        };
        Ok(program.test_run(input)?.duration.as_nanos() as f64)
    }
}

/// Datapaths loaded for the repeat method.
const PASSES: usize = 3;

/// Per path, the median over passes of each figure.
fn median_of_passes(passes: &[Vec<(&'static str, Measure)>]) -> Vec<(&'static str, Measure)> {
    let Some(first) = passes.first() else {
        return Vec::new();
    };
    first
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            let all: Vec<Measure> = passes
                .iter()
                .filter_map(|p| p.get(i))
                .map(|p| p.1)
                .collect();
            let field = |f: fn(&Measure) -> f64| median(all.iter().map(f).collect());
            (
                *name,
                Measure {
                    raw: field(|m| m.raw),
                    floor: field(|m| m.floor),
                    own: field(|m| m.own),
                },
            )
        })
        .collect()
}

/// Medians of per-round (path, floor) pairs.
fn measure_rounds(pairs: &[(f64, f64)]) -> Measure {
    Measure {
        raw: median(pairs.iter().map(|p| p.0).collect()),
        floor: median(pairs.iter().map(|p| p.1).collect()),
        own: median(pairs.iter().map(|p| p.0 - p.1).collect()),
    }
}

/// `rounds` + 1 test runs of `runs` repetitions each on `packet` (the first is a warm-up),
/// each checked by `check` and by `counter` (when given) moving by exactly `runs`, and each
/// after a round of the empty program; the medians. `between` runs (untimed) before each round.
#[allow(clippy::too_many_arguments)]
fn repeat_path(
    dp: &Datapath,
    floor: &Floor,
    program: DatapathProgram,
    mark: u32,
    packet: &[u8],
    runs: u32,
    rounds: usize,
    counter: Option<Counter>,
    mut between: impl FnMut() -> BenchResult<()>,
    check: impl Fn(&TestRunOutput) -> bool,
) -> BenchResult<Measure> {
    let context = SkbContext {
        mark,
        ifindex: 1,
        ingress_ifindex: 0,
    };
    let mut pairs = Vec::new();
    for round in 0..rounds + 1 {
        between()?;
        let floor_ns = floor.round()?;
        let before = dp.stats()?;
        let out = dp.test_run_repeat(program, packet, &context, runs)?;
        let delta = dp.stats()?.delta(&before);
        if !check(&out) {
            return Err(format!("{program:?}: a round did not leave the expected packet").into());
        }
        match counter {
            Some(c) if delta.get(c) != u64::from(runs) => {
                return Err(format!(
                    "{program:?}: {} moved by {}, expected {runs}",
                    c.name(),
                    delta.get(c)
                )
                .into());
            }
            None if delta != Stats::default() => {
                return Err(format!("{program:?}: a counter moved on passthrough").into());
            }
            _ => {}
        }
        if round > 0 {
            pairs.push((out.duration.as_nanos() as f64, floor_ns));
        }
    }
    Ok(measure_rounds(&pairs))
}

/// The SNAT port of the cycle client:40000 <-> node:port (any port of the SNAT range).
const CYCLE_PORT: u16 = 2_000;

fn entry(addr: IpAddr, port: u16) -> SnatEntry {
    SnatEntry {
        addr: addr_to_bytes(addr),
        port: Tuple::new(addr, port, addr, 0, L4Proto::Tcp).sport,
        ..SnatEntry::default()
    }
}

/// Two records whose translations cycle: client:40000 -> backend leaves as node:port, and
/// node:port -> backend leaves as client:40000; their replies come back the other way. A packet
/// rewritten by one is translated back by the other, so repeated runs take the same path.
fn insert_cycle(dp: &Datapath, f: Family, port: u16) -> BenchResult<()> {
    let a = addresses(f);
    let c = client(f, 0);
    for (from, from_port, to, to_port) in [(c, 40_000, a.node, port), (a.node, port, c, 40_000)] {
        dp.maps().insert_translation(
            &Tuple::new(from, from_port, a.backend, 8080, L4Proto::Tcp),
            &Tuple::new(a.backend, 8080, to, to_port, L4Proto::Tcp),
            &entry(to, to_port),
            &entry(from, from_port),
        )?;
    }
    Ok(())
}

/// Every path of one family with the repeat method: (name, ns per run).
fn bench_family_repeat(
    dp: &Datapath,
    floor: &Floor,
    f: Family,
    iterations: usize,
) -> BenchResult<Vec<(&'static str, Measure)>> {
    let a = addresses(f);
    let runs = (iterations as u32).max(2) & !1; // even: a cycle ends where it started
    let c = client(f, 0);
    let maps = dp.maps();
    clear_snat(dp)?;
    let mut out = Vec::new();

    // Fast path: the cycle client:40000 -> node:CYCLE_PORT -> client:40000 (two records; after
    // the first two runs each direction is served from its flow-cache slot).
    let port = CYCLE_PORT;
    insert_cycle(dp, f, port)?;
    let packet = tcp(c, 40_000, a.backend, 8080, 0x10);
    let ns = repeat_path(
        dp,
        floor,
        DatapathProgram::TcEgress,
        0,
        &packet,
        runs,
        REPEAT_ROUNDS,
        Some(Counter::FwdHit),
        || Ok(()),
        |o| o.packet == packet,
    )?;
    out.push(("fast_path", ns));
    // The runs were served from the flow cache: with the hash entries gone (and the slots
    // younger than their TTL), the packet is still translated.
    clear_snat(dp)?;
    let context = SkbContext {
        mark: 0,
        ifindex: 1,
        ingress_ifindex: 0,
    };
    if dp
        .test_run(DatapathProgram::TcEgress, &packet, &context)?
        .packet
        == packet
    {
        return Err("fast path: the runs were not served from the flow cache".into());
    }

    // Reverse NAT and ICMP errors: the reply tuple cycles between node:port and client (the
    // reverse sides of the same two records).
    let port = CYCLE_PORT;
    insert_cycle(dp, f, port)?;
    let reply = tcp(a.backend, 8080, a.node, port, 0x10);
    out.push((
        "reverse_nat",
        repeat_path(
            dp,
            floor,
            DatapathProgram::TcIngress,
            0,
            &reply,
            runs,
            REPEAT_ROUNDS,
            Some(Counter::RevHit),
            || Ok(()),
            |o| o.packet == reply,
        )?,
    ));
    let quoted = tcp(a.node, port, a.backend, 8080, 0x10);
    let error = icmp_too_big(a.router, a.node, &quoted[14..]);
    out.push((
        "icmp_error",
        repeat_path(
            dp,
            floor,
            DatapathProgram::TcIngress,
            0,
            &error,
            runs,
            REPEAT_ROUNDS,
            Some(Counter::IcmpXlate),
            || Ok(()),
            |o| o.packet == error,
        )?,
    ));
    clear_snat(dp)?;

    // Passthrough and service classification: the packet is left as it is.
    let other = tcp(client(f, 1), 40_001, a.backend, 8080, 0x10);
    out.push((
        "passthrough",
        repeat_path(
            dp,
            floor,
            DatapathProgram::TcEgress,
            0,
            &other,
            runs,
            REPEAT_ROUNDS,
            None,
            || Ok(()),
            |o| o.packet == other,
        )?,
    ));
    maps.put_service_port(
        &SvcKey::new(a.vip, 80, L4Proto::Tcp),
        &SvcValue {
            flags: 0,
            svc_id: 1,
        },
    )?;
    maps.svc_addrs.insert(
        &AddrKey::new(a.vip),
        &AddrValue {
            flags: ADDR_F_SERVICE,
            pad: 0,
        },
    )?;
    let to_service = tcp(client(f, 2), 40_002, a.vip, 80, 0x02);
    out.push((
        "service_classification",
        repeat_path(
            dp,
            floor,
            DatapathProgram::TcIngress,
            0,
            &to_service,
            runs,
            REPEAT_ROUNDS,
            Some(Counter::SvcMarked),
            || Ok(()),
            |o| o.mark == SVC,
        )?,
    ));

    // First packets: the local port range covers the SNAT ports, so every translated packet
    // (node:port -> backend, the next run's input) is a new client whose port is allocated. Each
    // batch goes to a backend of its own: the table fills up as on a node (nothing is cleared),
    // and every batch has the whole SNAT port range to itself.
    maps.set_config(&Config {
        local_port_min: DEFAULT_SNAT_PORT_MIN,
        ..Config::default()
    })?;
    let batches = (iterations / ALLOC_BATCH).clamp(REPEAT_ROUNDS, 50);
    let mut pairs = Vec::new();
    for batch in 0..=batches {
        let first = tcp(c, 40_000, backend(f, batch + 1), 8080, 0x02);
        let floor_ns = floor.round()?;
        let before = dp.stats()?;
        let context = SkbContext {
            mark: SVC | MASQ,
            ifindex: 1,
            ingress_ifindex: 0,
        };
        let out = dp.test_run_repeat(
            DatapathProgram::TcEgress,
            &first,
            &context,
            ALLOC_BATCH as u32,
        )?;
        if ip_of(&out.packet).0 != a.node {
            return Err("first packets: a batch did not leave a translated packet".into());
        }
        counter_moved(dp, &before, Counter::SnatAlloc, ALLOC_BATCH)?;
        if batch > 0 {
            pairs.push((out.duration.as_nanos() as f64, floor_ns));
        }
    }
    out.push(("first_packet", measure_rounds(&pairs)));
    maps.set_config(&Config::default())?;
    clear_snat(dp)?;
    Ok(out)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

struct Addresses {
    node: IpAddr,
    vip: IpAddr,
    backend: IpAddr,
    router: IpAddr,
}

fn addresses(f: Family) -> Addresses {
    match f {
        Family::V4 => Addresses {
            node: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            vip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
            backend: IpAddr::V4(Ipv4Addr::new(10, 244, 2, 20)),
            router: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 254)),
        },
        Family::V6 => Addresses {
            node: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
            vip: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10)),
            backend: IpAddr::V6(Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 0x20)),
            router: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe)),
        },
    }
}

/// The n-th distinct pod address (10.244.0.0/16 or fd00:244::/32).
fn client(f: Family, n: usize) -> IpAddr {
    let n = n as u32;
    match f {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(
            10,
            244,
            (1 + n / 250) as u8,
            (1 + n % 250) as u8,
        )),
        Family::V6 => IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0x244,
            1,
            0,
            0,
            0,
            (n >> 16) as u16,
            n as u16,
        )),
    }
}

/// The n-th distinct backend address (10.245.0.0/16 or fd00:245::/32), n >= 1.
fn backend(f: Family, n: usize) -> IpAddr {
    let n = n as u32;
    match f {
        Family::V4 => IpAddr::V4(Ipv4Addr::new(10, 245, (n / 250) as u8, (1 + n % 250) as u8)),
        Family::V6 => IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0x245,
            0,
            0,
            0,
            0,
            (n >> 16) as u16,
            n as u16,
        )),
    }
}

/// The empty baseline program, measured like the paths.
fn baseline(iterations: usize) -> BenchResult<Measured> {
    let object = ObjectBuilder::default()
        .open_memory(BENCH_BASELINE_OBJECT)?
        .load()?;
    let program = object
        .progs_mut()
        .find(|p| p.name() == "bench_baseline")
        .ok_or("bench_baseline program missing")?;
    let id = Program::id_from_fd(program.as_fd())?;
    let run_stats = || {
        ProgInfoIter::default()
            .find(|info| info.id == id)
            .map(|info| (info.run_time_ns, info.run_cnt))
            .ok_or("baseline program not listed")
    };
    let packet = floor_packet();
    let mut total = std::time::Duration::ZERO;
    let mut before = (0, 0);
    for i in 0..WARMUP + iterations {
        if i == WARMUP {
            before = run_stats()?;
            total = std::time::Duration::ZERO;
        }
        let mut out = vec![0u8; packet.len() + 64];
        let input = ProgramInput {
            data_in: Some(&packet),
            data_out: Some(&mut out),
            repeat: 1,
            ..ProgramInput::default()
        };
        total += program.test_run(input)?.duration;
    }
    let after = run_stats()?;
    let runs = (after.1 - before.1) as f64;
    Ok(Measured {
        stats_ns: (after.0 - before.0) as f64 / runs,
        test_run_ns: total.as_nanos() as f64 / iterations as f64,
    })
}

struct Measured {
    stats_ns: f64,
    test_run_ns: f64,
}

/// Runs `program` `iterations` times (after a warm-up) on `input(i)`, returning the kernel's
/// accounting and the mean test-run duration. `between(i)` runs before run i, untimed.
fn measure(
    dp: &Datapath,
    program: DatapathProgram,
    mark: u32,
    iterations: usize,
    mut input: impl FnMut(usize) -> Vec<u8>,
    mut between: impl FnMut(usize) -> BenchResult<()>,
    check: impl Fn(&TestRunOutput) -> bool,
) -> BenchResult<Measured> {
    let context = SkbContext {
        mark,
        ifindex: 1,
        ingress_ifindex: 0,
    };
    for i in 0..WARMUP {
        between(i)?;
        dp.test_run(program, &input(i), &context)?;
    }
    let before = dp.program_run_stats(program)?;
    let mut total = std::time::Duration::ZERO;
    for i in WARMUP..WARMUP + iterations {
        between(i)?;
        let packet = input(i);
        let out = dp.test_run(program, &packet, &context)?;
        if !check(&out) {
            return Err(format!("{program:?}: run {i} did not take the measured path").into());
        }
        total += out.duration;
    }
    let after = dp.program_run_stats(program)?;
    let runs = after.run_cnt - before.run_cnt;
    if runs != iterations as u64 {
        return Err(format!("{program:?}: {runs} runs accounted, expected {iterations}").into());
    }
    Ok(Measured {
        stats_ns: (after.run_time_ns - before.run_time_ns) as f64 / runs as f64,
        test_run_ns: total.as_nanos() as f64 / iterations as f64,
    })
}

fn counter_moved(
    dp: &Datapath,
    before: &Stats,
    counter: Counter,
    expected: usize,
) -> BenchResult<()> {
    let moved = dp.stats()?.delta(before).get(counter);
    if moved != expected as u64 {
        return Err(format!("{} moved by {moved}, expected {expected}", counter.name()).into());
    }
    Ok(())
}

fn clear_snat(dp: &Datapath) -> BenchResult<()> {
    dp.maps().snat.clear();
    Ok(())
}

fn bench_family(dp: &Datapath, f: Family, iterations: usize) -> BenchResult<Value> {
    let a = addresses(f);
    let total = WARMUP + iterations;
    clear_snat(dp)?;

    // First packet: a new client per run (port in the local range: an allocated SNAT port),
    // a new backend every ALLOC_BATCH runs; the table fills up as it would on a node.
    let before = dp.stats()?;
    let first = measure(
        dp,
        DatapathProgram::TcEgress,
        SVC | MASQ,
        iterations,
        |i| {
            tcp(
                client(f, i % ALLOC_BATCH + 1),
                40_000,
                backend(f, i / ALLOC_BATCH + 1),
                8080,
                0x02,
            )
        },
        |_| Ok(()),
        |out| out.return_value == u32::MAX && ip_of(&out.packet).0 == a.node,
    )?;
    counter_moved(dp, &before, Counter::SnatAlloc, total)?;
    clear_snat(dp)?;

    // One established connection for the fast path, reverse NAT and ICMP errors.
    let established = tcp(client(f, 0), 40_000, a.backend, 8080, 0x10);
    let translated = dp.test_run(
        DatapathProgram::TcEgress,
        &established,
        &SkbContext {
            mark: SVC | MASQ,
            ifindex: 1,
            ingress_ifindex: 0,
        },
    )?;
    let snat_port = ports_of(&translated.packet).0;

    let before = dp.stats()?;
    let fast = measure(
        dp,
        DatapathProgram::TcEgress,
        0,
        iterations,
        |_| established.clone(),
        |_| Ok(()),
        |out| ports_of(&out.packet).0 == snat_port,
    )?;
    counter_moved(dp, &before, Counter::FwdHit, total)?;

    let reply = tcp(a.backend, 8080, a.node, snat_port, 0x10);
    let before = dp.stats()?;
    let reverse = measure(
        dp,
        DatapathProgram::TcIngress,
        0,
        iterations,
        |_| reply.clone(),
        |_| Ok(()),
        |out| ports_of(&out.packet).1 == 40_000,
    )?;
    counter_moved(dp, &before, Counter::RevHit, total)?;

    let error = icmp_too_big(a.router, a.node, &translated.packet[14..]);
    let before = dp.stats()?;
    let icmp = measure(
        dp,
        DatapathProgram::TcIngress,
        0,
        iterations,
        |_| error.clone(),
        |_| Ok(()),
        |out| out.mark == SVC,
    )?;
    counter_moved(dp, &before, Counter::IcmpXlate, total)?;

    let other = tcp(client(f, 1), 40_001, a.backend, 8080, 0x10);
    let before = dp.stats()?;
    let passthrough = measure(
        dp,
        DatapathProgram::TcEgress,
        0,
        iterations,
        |_| other.clone(),
        |_| Ok(()),
        |out| out.packet == other,
    )?;
    if dp.stats()?.delta(&before) != Stats::default() {
        return Err("passthrough moved a counter".into());
    }

    dp.maps().put_service_port(
        &SvcKey::new(a.vip, 80, L4Proto::Tcp),
        &SvcValue {
            flags: 0,
            svc_id: 1,
        },
    )?;
    dp.maps().svc_addrs.insert(
        &AddrKey::new(a.vip),
        &AddrValue {
            flags: ADDR_F_SERVICE,
            pad: 0,
        },
    )?;
    let to_service = tcp(client(f, 2), 40_002, a.vip, 80, 0x02);
    let before = dp.stats()?;
    let classify = measure(
        dp,
        DatapathProgram::TcIngress,
        0,
        iterations,
        |_| to_service.clone(),
        |_| Ok(()),
        |out| out.mark == SVC,
    )?;
    counter_moved(dp, &before, Counter::SvcMarked, total)?;

    Ok(json!({
        "stats": {
            "fast_path_ns": round(fast.stats_ns),
            "first_packet_ns": round(first.stats_ns),
            "reverse_nat_ns": round(reverse.stats_ns),
            "icmp_error_ns": round(icmp.stats_ns),
            "passthrough_ns": round(passthrough.stats_ns),
            "service_classification_ns": round(classify.stats_ns),
            "method": "kernel.bpf_stats_enabled run_time_ns/run_cnt deltas over single \
                       BPF_PROG_TEST_RUN runs (repeat=1), each on a fresh copy of the input \
                       packet with map state prepared so every run takes the path (checked \
                       per run and by the path's counter); first packets: a new client tuple \
                       per run, a new backend every 2000 runs (the table fills up)",
        },
        "test_run": {
            "fast_path_ns": round(fast.test_run_ns),
            "first_packet_ns": round(first.test_run_ns),
            "reverse_nat_ns": round(reverse.test_run_ns),
            "icmp_error_ns": round(icmp.test_run_ns),
            "passthrough_ns": round(passthrough.test_run_ns),
            "service_classification_ns": round(classify.test_run_ns),
        },
    }))
}

// --- packets (minimal builder: Ethernet + IPv4/IPv6 + TCP or ICMP error) --------------------

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u64 = data
        .chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = [octets(src), octets(dst)].concat();
    if src.is_ipv4() {
        p.extend([0, proto]);
        p.extend((len as u16).to_be_bytes());
    } else {
        p.extend((len as u32).to_be_bytes());
        p.extend([0, 0, 0, proto]);
    }
    p
}

fn ip_frame(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    if src.is_ipv4() {
        frame.extend([0x08, 0x00]);
        let mut h = vec![0x45, 0];
        h.extend(((20 + l4.len()) as u16).to_be_bytes());
        h.extend([0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
        h.extend(octets(src));
        h.extend(octets(dst));
        let sum = checksum(&h);
        h[10..12].copy_from_slice(&sum.to_be_bytes());
        frame.extend(h);
    } else {
        frame.extend([0x86, 0xdd]);
        frame.extend([0x60, 0, 0, 0]);
        frame.extend((l4.len() as u16).to_be_bytes());
        frame.extend([proto, 64]);
        frame.extend(octets(src));
        frame.extend(octets(dst));
    }
    frame.extend_from_slice(l4);
    frame
}

fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let sum = checksum(&[pseudo(src, dst, 6, 20), h.clone()].concat());
    h[16..18].copy_from_slice(&sum.to_be_bytes());
    ip_frame(src, dst, 6, &h)
}

fn icmp_too_big(src: IpAddr, dst: IpAddr, quoted: &[u8]) -> Vec<u8> {
    let (proto, kind, code) = if src.is_ipv4() { (1, 3, 4) } else { (58, 2, 0) };
    let mut m = vec![kind, code, 0, 0, 0, 0, 0x05, 0x78];
    m.extend_from_slice(quoted);
    let sum = if proto == 1 {
        checksum(&m)
    } else {
        checksum(&[pseudo(src, dst, proto, m.len()), m.clone()].concat())
    };
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    ip_frame(src, dst, proto, &m)
}

/// (source, destination) of an Ethernet frame.
fn ip_of(frame: &[u8]) -> (IpAddr, IpAddr) {
    let ip = &frame[14..];
    if ip[0] >> 4 == 4 {
        let s: [u8; 4] = ip[12..16].try_into().unwrap_or_default();
        let d: [u8; 4] = ip[16..20].try_into().unwrap_or_default();
        (IpAddr::from(s), IpAddr::from(d))
    } else {
        let s: [u8; 16] = ip[8..24].try_into().unwrap_or_default();
        let d: [u8; 16] = ip[24..40].try_into().unwrap_or_default();
        (IpAddr::from(s), IpAddr::from(d))
    }
}

/// (source port, destination port) of a TCP frame without IP options or extension headers.
fn ports_of(frame: &[u8]) -> (u16, u16) {
    let l4 = if frame[14] >> 4 == 4 { 34 } else { 54 };
    (
        u16::from_be_bytes([frame[l4], frame[l4 + 1]]),
        u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]),
    )
}
