//! Benchmark of the datapath programs: ns per packet for each path, measured with
//! BPF_PROG_TEST_RUN on this host's kernel (root needed).
//!
//! Every timed run takes the path it is counted for: each run gets a fresh copy of its input
//! packet (repeat = 1), and the map state is prepared so the path is taken (an established entry
//! for the fast path, reverse NAT and ICMP errors; a new client tuple per run for first packets,
//! with the SNAT maps cleared every batch so they stay sparse). The counters are checked after
//! each path to prove it. The primary figure is the kernel's own accounting
//! (`kernel.bpf_stats_enabled`: run_time_ns / run_cnt deltas); the mean of the per-run duration
//! BPF_PROG_TEST_RUN reports is printed too (it includes the test-run timer's overhead), and so
//! is the floor: an empty program measured the same way.
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
    DevValue, L4Proto, Stats, SvcKey, SvcValue,
};
use probes::objects::BENCH_BASELINE_OBJECT;
use probes::{Datapath, DatapathOptions, DatapathProgram, SkbContext, TestRunOutput};
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
    let dp = Datapath::load(DatapathOptions {
        pin_root: pins.0.join("v1"),
        ..DatapathOptions::default()
    })?;
    dp.maps().set_config(&Config::default())?;
    dp.maps().devices.insert(
        &1,
        &DevValue::new(
            Some(Ipv4Addr::new(192, 0, 2, 1)),
            Some("2001:db8::1".parse()?),
        ),
    )?;
    let _stats = StatsEnabled::enable()?;
    let floor = baseline(iterations)?;
    let v4 = bench_family(&dp, Family::V4, iterations)?;
    let v6 = bench_family(&dp, Family::V6, iterations)?;
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();
    Ok(json!({
        "bpf": v4["stats"],
        "bpf_ipv6": v6["stats"],
        "test_run_duration_ns": { "ipv4": v4["test_run"], "ipv6": v6["test_run"] },
        "floor_ns": {
            "bpf_stats": (floor.stats_ns * 10.0).round() / 10.0,
            "test_run": (floor.test_run_ns * 10.0).round() / 10.0,
            "what": "an empty TC program measured the same way: subtract it for the programs' \
                     own cost (bpf_stats adds two sched_clock reads per run)",
        },
        "iterations_per_path": iterations,
        "kernel": kernel,
    }))
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
    let packet = tcp(
        IpAddr::V4(Ipv4Addr::new(10, 244, 1, 1)),
        40_000,
        IpAddr::V4(Ipv4Addr::new(10, 244, 2, 20)),
        8080,
        0x10,
    );
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
    let maps = dp.maps();
    for key in maps.snat_fwd.keys().collect::<Vec<_>>() {
        maps.snat_fwd.delete(&key)?;
    }
    for key in maps.snat_rev.keys().collect::<Vec<_>>() {
        maps.snat_rev.delete(&key)?;
    }
    Ok(())
}

fn bench_family(dp: &Datapath, f: Family, iterations: usize) -> BenchResult<Value> {
    let a = addresses(f);
    let total = WARMUP + iterations;
    clear_snat(dp)?;

    // First packet: a new client per run (port in the local range: a random SNAT port).
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
                a.backend,
                8080,
                0x02,
            )
        },
        |i| {
            if i % ALLOC_BATCH == 0 {
                clear_snat(dp)?;
            }
            Ok(())
        },
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

    dp.maps().svc_ports.insert(
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

    let round = |v: f64| (v * 10.0).round() / 10.0;
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
                       per run, SNAT maps cleared every 2000 runs",
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
