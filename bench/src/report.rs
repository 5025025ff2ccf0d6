//! `bench-report`: turns the raw documents `bench-datapath` writes (one per kernel and clock)
//! into the published datapath benchmark. This program owns the statistics and their
//! presentation — medians, spreads, the ours/theirs ratios (paired by round), the goals, the
//! profile breakdown — and writes `docs/benchmarks.md`, a text-free bar chart
//! (`docs/benchmarks.png`, drawn with plotters' bitmap backend; its legend is in the markdown)
//! and the datapath keys of `docs/benchmarks.json` (merged: every other key is kept). It
//! measures nothing.
//!
//! Usage: `bench-report --json FILE --md FILE --png FILE --commit REV [--date YYYY-MM-DD] RAW...`

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value, json};

const DATAPATHS: [&str; 3] = ["ipvs", "nftables", "ours"];
/// The datapaths and the firewall-only reference (the node's firewall, no service proxy), which
/// runs only the cases of traffic that is not service traffic ([`OTHER_CASES`]).
const SUMMARIZED: [&str; 4] = ["firewall", "ipvs", "nftables", "ours"];
/// Traffic that is not service traffic through the node's devices: the local pod and the node
/// itself connecting straight to the remote pod.
const OTHER_CASES: [(&str, &str); 2] = [
    ("cps_pod_to_pod", "pod to a remote pod"),
    ("cps_node_to_remote", "the node to a remote pod"),
];

/// Whether a case opens short connections through a Service (one each: the agent's work per
/// connection is charged to it).
fn is_service_connection_case(case: &str) -> bool {
    (case.starts_with("cps_") || case.starts_with("lat_"))
        && !OTHER_CASES.iter().any(|(c, _)| *c == case)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("bench-report: {e:#}");
        std::process::exit(1);
    }
}

struct Args {
    json: PathBuf,
    md: PathBuf,
    png: PathBuf,
    commit: String,
    date: String,
    raw: Vec<PathBuf>,
    json_sections_only: bool,
}

fn args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut json, mut md, mut png, mut commit, mut date) = (None, None, None, None, None);
    let mut raw = Vec::new();
    let mut json_sections_only = false;
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--json" => json = Some(PathBuf::from(val()?)),
            "--md" => md = Some(PathBuf::from(val()?)),
            "--png" => png = Some(PathBuf::from(val()?)),
            "--commit" => commit = Some(val()?),
            "--date" => date = Some(val()?),
            "--json-sections" => json_sections_only = true,
            _ if a.starts_with("--") => bail!("unknown option {a}"),
            _ => raw.push(PathBuf::from(a)),
        }
    }
    if raw.is_empty() && !json_sections_only {
        bail!(
            "usage: bench-report --json FILE --md FILE --png FILE --commit REV RAW...\n       \
             bench-report --json-sections --json FILE --md FILE"
        );
    }
    Ok(Args {
        json: json.context("--json")?,
        md: md.context("--md")?,
        png: png
            .or_else(|| json_sections_only.then(PathBuf::new))
            .context("--png")?,
        commit: commit.unwrap_or_else(|| "unknown".into()),
        date: date.unwrap_or_else(today),
        raw,
        json_sections_only,
    })
}

/// Today's date (UTC), from the system clock.
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = secs / 86_400 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

// --- statistics -----------------------------------------------------------------------------

fn median(v: &[f64]) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// Median, extremes and spread ((max − min) / median) of per-round values.
fn stat(v: &[f64]) -> Value {
    let Some(m) = median(v) else {
        return Value::Null;
    };
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({
        "median": round(m),
        "min": round(min),
        "max": round(max),
        "spread_pct": if m != 0.0 { round((max - min) / m.abs() * 100.0) } else { 0.0 },
        "rounds": v.iter().map(|x| round(*x)).collect::<Vec<_>>(),
    })
}

fn round(x: f64) -> f64 {
    if x.abs() >= 100.0 {
        (x * 10.0).round() / 10.0
    } else {
        (x * 10_000.0).round() / 10_000.0
    }
}

// --- one run --------------------------------------------------------------------------------

/// One raw document: a kernel and a clock.
struct RunDoc {
    doc: Value,
    /// "6.12", "6.1".
    series: String,
    clock: String,
    cpus: f64,
}

impl RunDoc {
    fn load(path: &PathBuf) -> Result<RunDoc> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let doc: Value =
            serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        let series = doc["lab_kernel"].as_str().unwrap_or("?").to_string();
        let clock = doc["clock"].as_str().unwrap_or("?").to_string();
        let cpus = doc["cpus"].as_f64().unwrap_or(1.0);
        Ok(RunDoc {
            doc,
            series,
            clock,
            cpus,
        })
    }

    fn key(&self) -> String {
        format!("kernel_{}", self.series.replace('.', "_"))
    }

    fn records(&self) -> impl Iterator<Item = &Value> {
        self.doc["records"].as_array().into_iter().flatten()
    }

    fn rounds(&self) -> Vec<u64> {
        let mut r: Vec<u64> = self.records().filter_map(|r| r["round"].as_u64()).collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    /// Service counts measured, ascending (1, 1 + fill).
    fn service_counts(&self) -> Vec<u64> {
        let mut r: Vec<u64> = self
            .records()
            .filter(|r| r["datapath"] != "direct" && r["datapath"] != "firewall")
            .filter_map(|r| r["services"].as_u64())
            .collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    fn record(&self, round: u64, dp: &str, services: u64, case: &str) -> Option<&Value> {
        self.records().find(|r| {
            r["round"].as_u64() == Some(round)
                && r["datapath"] == dp
                && r["case"] == case
                // The direct baseline has no Services; the firewall reference, recorded with
                // none, sits in the 1-Service row beside the proxies' runs of the same cases.
                && (dp == "direct"
                    || (dp == "firewall" && services == 1)
                    || r["services"].as_u64() == Some(services))
        })
    }

    /// The agent's steady CPU rate (CPU seconds per second) in the record's round: its CPU
    /// without traffic over a full read's interval before the round's cases (`agent_round`'s
    /// `idle_cpu_s` over `idle_s`, maps the cases have not filled), else over the idle window
    /// after the profiles (whole sweep periods, maps holding what the detail phase left).
    /// `None` without an agent.
    fn agent_rate(&self, rec: &Value) -> Option<f64> {
        let round = &rec["agent_round"];
        let (cpu, window) = match (round["idle_cpu_s"].as_f64(), round["idle_s"].as_f64()) {
            (Some(cpu), Some(window)) => (cpu, window),
            _ => {
                let idle = &self.detail(rec["datapath"].as_str()?)?["idle"];
                (idle["agent_cpu_s"].as_f64()?, idle["window_s"].as_f64()?)
            }
        };
        (window > 0.0).then(|| cpu / window)
    }

    /// The agent's CPU per service connection (seconds) in the record's round: its CPU over
    /// the round's cases and, after them, IPVS's FIN timeout, two sweep periods and a full
    /// read's interval (`agent_round`: the lives of the records the cases made, their expiry and
    /// their `conns` entries' removal included), less its rate without traffic over that span,
    /// over the connections the round's short-connection service cases made (records read by
    /// each pass and expired, `conns` entries read and removed), plus the run time of the probe
    /// on IPVS freeing a connection over the tail (`agent_round.free_probe`: it removes the
    /// entries in the kernel as IPVS frees their connections). Charged to ClusterIP
    /// connections too, which make no record.
    /// What it leaves out without that probe: the full reads of an untranslated connection's
    /// `conns` entry after the span (its entry then lives as long as IPVS's established
    /// timeout, 15 minutes). With it, the trampoline's few instructions around each run.
    fn agent_per_connection(&self, rec: &Value) -> Option<f64> {
        let agent = &rec["agent_round"];
        let (cpu, span) = (agent["cpu_s"].as_f64()?, agent["span_s"].as_f64()?);
        // The probe on IPVS freeing a connection: its run time over the tail, in the kernel.
        let cpu = cpu + agent["free_probe"]["run_time_ns"].as_f64().unwrap_or(0.0) / 1e9;
        let conns: f64 = self
            .records()
            .filter(|r| r["round"] == rec["round"] && r["datapath"] == rec["datapath"])
            .filter(|r| r["case"].as_str().is_some_and(is_service_connection_case))
            .filter_map(|r| r["result"]["loadgen"]["ok"].as_f64())
            .sum();
        let rate = self.agent_rate(rec)?;
        (conns > 0.0).then(|| ((cpu - rate * span) / conns).max(0.0))
    }

    fn detail(&self, dp: &str) -> Option<&Value> {
        self.doc["details"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["datapath"] == dp)
    }

    /// A metric of one record (see [`Metric`]).
    fn metric(&self, rec: &Value, m: Metric) -> Option<f64> {
        let r = &rec["result"];
        let lg = &r["loadgen"];
        let case = rec["case"].as_str().unwrap_or("");
        match m {
            Metric::Rate => lg["rate_per_s"].as_f64(),
            Metric::P50 => lg["latency_us"]["p50"].as_f64(),
            Metric::P99 => lg["latency_us"]["p99"].as_f64(),
            Metric::P999 => lg["latency_us"]["p999"].as_f64(),
            Metric::CpuPerUnit => {
                // Busy CPU time of the whole guest over the window: window × CPUs − idle (the
                // window is measured precisely; /proc/stat's idle ticks are ~0 when saturated).
                let window = lg["cpu"]["window_s"].as_f64()?;
                let mut busy = window * self.cpus - lg["cpu"]["idle_s"].as_f64().unwrap_or(0.0);
                // The agent, counted whatever the window's phase caught of it (a sweep pass, a
                // node check, or nothing): its CPU in the window replaced by its rate without
                // traffic for the window's length, plus its work per service connection.
                if let (Some(in_window), Some(rate)) =
                    (lg["cpu"]["agent_s"].as_f64(), self.agent_rate(rec))
                {
                    busy += rate * window - in_window;
                    if is_service_connection_case(case) {
                        busy += self.agent_per_connection(rec).unwrap_or(0.0)
                            * lg["ok"].as_f64().unwrap_or(0.0);
                    }
                }
                let units = if case.starts_with("bulk") {
                    lg["bytes"].as_f64()? / f64::from(1u32 << 20)
                } else {
                    lg["ok"].as_f64()?
                };
                (units > 0.0).then(|| busy.max(0.0) / units * 1e6)
            }
            Metric::CtPerConn => r["conntrack"]["per_conn"].as_f64(),
            Metric::CtPeak => r["conntrack"]["peak"].as_f64(),
            Metric::Failed => lg["failed"].as_f64(),
        }
    }

    /// The per-round values of a metric.
    fn series_of(&self, dp: &str, services: u64, case: &str, m: Metric) -> Vec<(u64, f64)> {
        self.rounds()
            .into_iter()
            .filter_map(|round| {
                let rec = self.record(round, dp, services, case)?;
                Some((round, self.metric(rec, m)?))
            })
            .collect()
    }

    /// CPU per connection of the service path: the case's minus the direct baseline's in the
    /// same round (µs).
    fn node_cpu(&self, dp: &str, services: u64, case: &str) -> Vec<(u64, f64)> {
        let base: BTreeMap<u64, f64> = self
            .series_of("direct", 0, case, Metric::CpuPerUnit)
            .into_iter()
            .collect();
        self.series_of(dp, services, case, Metric::CpuPerUnit)
            .into_iter()
            .filter_map(|(r, v)| Some((r, v - base.get(&r)?)))
            .collect()
    }

    /// Median over rounds of ours/theirs (paired by round).
    fn paired_ratio(a: &[(u64, f64)], b: &[(u64, f64)]) -> Option<f64> {
        let b: BTreeMap<u64, f64> = b.iter().copied().collect();
        let v: Vec<f64> = a
            .iter()
            .filter_map(|(r, x)| b.get(r).filter(|y| **y != 0.0).map(|y| x / y))
            .collect();
        median(&v)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Metric {
    Rate,
    P50,
    P99,
    P999,
    CpuPerUnit,
    CtPerConn,
    CtPeak,
    Failed,
}

impl Metric {
    fn key(self) -> &'static str {
        match self {
            Metric::Rate => "rate",
            Metric::P50 => "p50_us",
            Metric::P99 => "p99_us",
            Metric::P999 => "p999_us",
            Metric::CpuPerUnit => "cpu_us_per_unit",
            Metric::CtPerConn => "conntrack_per_conn",
            Metric::CtPeak => "conntrack_peak",
            Metric::Failed => "failed",
        }
    }
}

const METRICS: [Metric; 8] = [
    Metric::Rate,
    Metric::P50,
    Metric::P99,
    Metric::P999,
    Metric::CpuPerUnit,
    Metric::CtPerConn,
    Metric::CtPeak,
    Metric::Failed,
];

/// Functions of the `ip_vs` module not named `ip_vs*` (its TCP and UDP protocol handlers, its
/// reply path), which the guest's `perf` reports as `[kernel.kallsyms]` like the rest.
const IPVS_MODULE_SYMBOLS: [&str; 13] = [
    "tcp_state_transition",
    "tcp_dnat_handler",
    "tcp_snat_handler",
    "tcp_conn_schedule",
    "set_tcp_state",
    "udp_state_transition",
    "udp_dnat_handler",
    "udp_snat_handler",
    "udp_conn_schedule",
    "handle_response",
    "ensure_mtu_ok",
    "crosses_local_route_boundary",
    "is_new_conn",
];

/// Profile symbol → category (for "where the time goes").
fn category(sym: &str, dso: &str, kernel: bool) -> &'static str {
    let starts = |p: &[&str]| p.iter().any(|x| sym.starts_with(x));
    if starts(&["bpf_prog_", "bpf_trampoline"]) {
        "BPF programs (JIT code)"
    } else if starts(&[
        "bpf_",
        "htab_",
        "__htab",
        "array_map",
        "trie_",
        "longest_prefix",
        "__bpf",
        "lookup_nulls",
        "pcpu_freelist",
        "___bpf",
        "csum_diff",
        "tcx_",
        "tc_run",
        "cls_bpf",
        "tcf_",
        "sch_handle",
        "mini_qdisc",
        "sk_filter",
    ]) {
        "BPF helpers, maps, TC hook"
    } else if starts(&["ip_vs", "__ip_vs"]) || IPVS_MODULE_SYMBOLS.contains(&sym) {
        "IPVS"
    } else if starts(&[
        "nf_conntrack",
        "__nf_conntrack",
        "nf_ct_",
        "__nf_ct",
        "nf_confirm",
        "ipv4_confirm",
        "init_conntrack",
        "nf_nat",
        "__nf_nat",
        "masquerade",
        "hash_conntrack",
        "nf_checksum",
        "nf_ip_checksum",
        "__nf_ip_checksum",
        "resolve_normal_ct",
        "tcp_in_window",
        "tcp_error",
        "nf_l4proto",
        "ipv4_conntrack",
        "nf_defrag",
        "nf_xfrm",
        "get_l4proto",
        "nf_csum",
    ]) || dso.contains("nf_conntrack")
        || dso.contains("nf_nat")
    {
        "conntrack and NAT"
    } else if starts(&[
        "nft_",
        "nf_tables",
        "__nft",
        "xt_",
        "ipt_",
        "ip_set",
        "hash_ip",
        "bitmap_",
        "mtype_",
        "iptable_",
        "set_match",
        "compat_",
        "addrtype",
        "mark_mt",
        "conntrack_mt",
        "comment_mt",
        "hash_net",
    ]) || dso.contains("nf_tables")
        || dso.contains("ip_set")
        || dso.contains("xt_")
    {
        "iptables / nftables rules"
    } else if starts(&["nf_hook_slow", "nf_hook", "__nf_hook"]) {
        "netfilter hook dispatch"
    } else if starts(&[
        "fib_",
        "ip_route",
        "__ip_route",
        "rt_",
        "dst_",
        "ipv4_dst",
        "__mkroute",
        "ip_mkroute",
        "fib4",
        "l3mdev",
        "find_exception",
        "ip_rt_",
    ]) {
        "routing"
    } else if !kernel && dso == "kube-ipvs-bpf" {
        "the agent (user space)"
    } else if !kernel {
        "user space (loadgen)"
    } else if starts(&[
        "pv_native_safe_halt",
        "default_idle",
        "cpuidle",
        "do_idle",
        "poll_idle",
    ]) {
        "idle"
    } else {
        "rest of the kernel (TCP/IP, veth, scheduler, syscalls)"
    }
}

const CATEGORIES: [&str; 12] = [
    "BPF programs (JIT code)",
    "BPF helpers, maps, TC hook",
    "IPVS",
    "conntrack and NAT",
    "iptables / nftables rules",
    "netfilter hook dispatch",
    "routing",
    "rest of the kernel (TCP/IP, veth, scheduler, syscalls)",
    "user space (loadgen)",
    "the agent (user space)",
    "idle",
    "total",
];

/// Category → µs per connection.
type Categories = BTreeMap<&'static str, f64>;
/// Symbol (JIT-ed programs by name) → (µs per connection, category).
type Symbols = BTreeMap<String, (f64, &'static str)>;

/// Profile of one datapath and case, by category and by symbol.
fn profile_breakdown(p: &Value) -> (Categories, Symbols) {
    let mut cats = BTreeMap::new();
    let mut syms = BTreeMap::new();
    for s in p["symbols"].as_array().into_iter().flatten() {
        let sym = s["sym"].as_str().unwrap_or("?");
        let dso = s["dso"].as_str().unwrap_or("");
        let us = s["ns_per_conn"].as_f64().unwrap_or(0.0) / 1000.0;
        let c = category(sym, dso, s["kernel"].as_bool().unwrap_or(true));
        *cats.entry(c).or_insert(0.0) += us;
        *cats.entry("total").or_insert(0.0) += us;
        // JIT-ed programs carry their tag in the name: group by program name.
        let name = if let Some(rest) = sym.strip_prefix("bpf_prog_") {
            format!("bpf_prog_{}", rest.split_once('_').map_or(rest, |(_, n)| n))
        } else {
            sym.to_string()
        };
        syms.entry(name).or_insert((0.0, c)).0 += us;
    }
    (cats, syms)
}

/// Everything computed from one run.
fn summarize(run: &RunDoc) -> Value {
    let mut cases = Map::new();
    let services = run.service_counts();
    let mut all_cases: Vec<String> = run
        .records()
        .filter_map(|r| r["case"].as_str().map(String::from))
        .collect();
    all_cases.sort();
    all_cases.dedup();
    for case in &all_cases {
        let mut by_services = Map::new();
        for &n in &services {
            let mut by_dp = Map::new();
            for dp in SUMMARIZED {
                let mut m = Map::new();
                for metric in METRICS {
                    let v: Vec<f64> = run
                        .series_of(dp, n, case, metric)
                        .into_iter()
                        .map(|x| x.1)
                        .collect();
                    if !v.is_empty() {
                        m.insert(metric.key().into(), stat(&v));
                    }
                }
                let node: Vec<f64> = run.node_cpu(dp, n, case).into_iter().map(|x| x.1).collect();
                if !node.is_empty() {
                    m.insert("node_cpu_us_per_conn".into(), stat(&node));
                }
                if let Some(p) = run
                    .record(0, dp, n, case)
                    .and_then(|r| r["program_s"].as_f64())
                {
                    m.insert("program_s_round0".into(), json!(round(p)));
                }
                if !m.is_empty() {
                    by_dp.insert(dp.into(), Value::Object(m));
                }
            }
            // Paired ratios ours/theirs.
            let mut ratios = Map::new();
            for theirs in ["ipvs", "nftables"] {
                for (metric, name) in [
                    (Metric::Rate, "rate"),
                    (Metric::P99, "p99"),
                    (Metric::CpuPerUnit, "cpu"),
                ] {
                    let a = run.series_of("ours", n, case, metric);
                    let b = run.series_of(theirs, n, case, metric);
                    if let Some(r) = RunDoc::paired_ratio(&a, &b) {
                        ratios.insert(format!("{name}_vs_{theirs}"), json!(round(r)));
                    }
                }
                let a = run.node_cpu("ours", n, case);
                let b = run.node_cpu(theirs, n, case);
                if let Some(r) = RunDoc::paired_ratio(&a, &b) {
                    ratios.insert(format!("node_cpu_vs_{theirs}"), json!(round(r)));
                }
            }
            // What each datapath adds over the firewall alone (µs per connection, median over
            // rounds of the paired difference): its cost on traffic it does not serve.
            let firewall: BTreeMap<u64, f64> =
                run.node_cpu("firewall", n, case).into_iter().collect();
            if !firewall.is_empty() {
                for dp in DATAPATHS {
                    let d: Vec<f64> = run
                        .node_cpu(dp, n, case)
                        .into_iter()
                        .filter_map(|(r, v)| Some(v - firewall.get(&r)?))
                        .collect();
                    if let Some(m) = median(&d) {
                        ratios.insert(format!("{dp}_minus_firewall_us"), json!(round(m)));
                    }
                }
            }
            if !by_dp.is_empty() {
                by_dp.insert("ratios".into(), Value::Object(ratios));
                by_services.insert(n.to_string(), Value::Object(by_dp));
            }
        }
        // The direct baseline.
        let mut direct = Map::new();
        for metric in [Metric::Rate, Metric::P99, Metric::CpuPerUnit] {
            let v: Vec<f64> = run
                .series_of("direct", 0, case, metric)
                .into_iter()
                .map(|x| x.1)
                .collect();
            if !v.is_empty() {
                direct.insert(metric.key().into(), stat(&v));
            }
        }
        if !direct.is_empty() {
            by_services.insert("direct".into(), Value::Object(direct));
        }
        cases.insert(case.clone(), Value::Object(by_services));
    }

    // Details: conntrack events, table full, BPF statistics, profiles.
    let mut details = Map::new();
    for dp in DATAPATHS {
        let Some(d) = run.detail(dp) else { continue };
        // A figure of the agent's in each round (from the round's NodePort record), scaled:
        // the median over rounds.
        let agent_median = |figure: fn(&RunDoc, &Value) -> Option<f64>, scale: f64| {
            median(
                &run.rounds()
                    .into_iter()
                    .filter_map(|r| run.record(r, dp, 1, "cps_nodeport"))
                    .filter_map(|r| figure(run, r))
                    .map(|x| x * scale)
                    .collect::<Vec<_>>(),
            )
            .map(round)
        };
        let mut profile = Map::new();
        for case in ["nodeport", "clusterip"] {
            let p = &d["profile"][case];
            if p.is_null() {
                continue;
            }
            let (cats, syms) = profile_breakdown(p);
            let (direct, direct_syms) = run
                .detail("direct")
                .map(|x| profile_breakdown(&x["profile"][case]))
                .unwrap_or_default();
            // The symbols that cost most more than in the direct baseline.
            let mut extra: Vec<(String, f64, &str)> = syms
                .iter()
                .map(|(k, (v, c))| (k.clone(), v - direct_syms.get(k).map_or(0.0, |x| x.0), *c))
                .filter(|x| x.1 > 0.0)
                .collect();
            extra.sort_by(|a, b| b.1.total_cmp(&a.1));
            extra.truncate(15);
            profile.insert(
                format!("{case}_top_extra_symbols"),
                Value::Array(
                    extra
                        .into_iter()
                        .map(|(s, v, c)| json!({"sym": s, "us_per_conn": round(v), "category": c}))
                        .collect(),
                ),
            );
            if let Some(c) = p["callers"].as_object().filter(|c| !c.is_empty()) {
                profile.insert(format!("{case}_callers"), Value::Object(c.clone()));
            }
            let row: Map<String, Value> = CATEGORIES
                .iter()
                .map(|c| {
                    let v = cats.get(c).copied().unwrap_or(0.0);
                    let base = direct.get(c).copied().unwrap_or(0.0);
                    (
                        c.to_string(),
                        json!({ "us_per_conn": round(v), "minus_direct": round(v - base) }),
                    )
                })
                .collect();
            profile.insert(case.into(), Value::Object(row));
        }
        details.insert(
            dp.into(),
            json!({
                "conntrack_events": d["conntrack_events"],
                "table_full": {
                    "failed": d["table_full"]["failed"],
                    "established": d["table_full"]["established"],
                    "conns": d["table_full"]["conns"],
                    "ct_max": d["table_full"]["ct_max"],
                    "alive_after_hold": d["table_full"]["alive_after_hold"],
                    "peak_conntrack_count": d["table_full"]["peak_conntrack_count"],
                },
                "bpf_stats": bpf_summary(&d["bpf_stats"]),
                "profile_us_per_conn": profile,
                "idle": idle_summary(&d["idle"]),
                // The agent's work per service connection (µs; median over rounds), which the
                // node shares of ours count.
                "agent_us_per_service_conn": agent_median(RunDoc::agent_per_connection, 1e6),
                // The agent's CPU without traffic (ms a second; median over rounds), which the
                // node shares of ours count for each window's length.
                "agent_idle_ms_per_s": agent_median(RunDoc::agent_rate, 1e3),
            }),
        );
    }
    json!({
        "kernel": run.doc["kernel"],
        "clock": run.clock,
        "config": run.doc["config"],
        "cpus": run.cpus,
        "elapsed_s": run.doc["elapsed_s"],
        "error": run.doc["error"],
        "cases": cases,
        "details": details,
    })
}

/// The guest's busy CPU without traffic (bench-datapath's `idle`), in ms per second.
fn idle_summary(i: &Value) -> Value {
    match (i["busy_s"].as_f64(), i["window_s"].as_f64()) {
        (Some(busy), Some(window)) if window > 0.0 => json!({
            "window_s": round(window),
            "busy_ms_per_s": round(busy * 1000.0 / window),
            "agent_ms_per_s": i["agent_cpu_s"].as_f64().map(|a| round(a * 1000.0 / window)),
            "processes_cpu_s": i["processes_cpu_s"],
        }),
        _ => Value::Null,
    }
}

fn bpf_summary(b: &Value) -> Value {
    let Some(obj) = b.as_object() else {
        return Value::Null;
    };
    let mut out = Map::new();
    for (case, v) in obj {
        let mut progs = Map::new();
        for (name, p) in v["programs"].as_object().into_iter().flatten() {
            let short = name.split('#').next().unwrap_or(name).to_string();
            progs.insert(
                short,
                json!({
                    "runs_per_conn": round(p["runs_per_conn"].as_f64().unwrap_or(0.0)),
                    "ns_per_run": round(p["ns_per_run"].as_f64().unwrap_or(0.0)),
                    "ns_per_conn": round(p["ns_per_conn"].as_f64().unwrap_or(0.0)),
                }),
            );
        }
        let (ns, runs) = (
            v["bpf_ns_per_conn"].as_f64(),
            v["bpf_runs_per_conn"].as_f64(),
        );
        out.insert(
            case.clone(),
            json!({
                "bpf_ns_per_conn": round(ns.unwrap_or(0.0)),
                "bpf_runs_per_conn": round(runs.unwrap_or(0.0)),
                "ns_per_run": ns.zip(runs.filter(|r| *r > 0.0)).map(|(n, r)| round(n / r)),
                "programs": progs,
                "counters_per_conn": v["counters_per_conn"],
            }),
        );
    }
    Value::Object(out)
}

// --- headline and goals ---------------------------------------------------------------------

fn get<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(v, |v, k| &v[*k])
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    get(v, path).as_f64()
}

/// The top-level ratios of one run summary (1 Service).
fn headline_ratios(s: &Value) -> Value {
    let r = |case: &str, key: &str| num(s, &["cases", case, "1", "ratios", key]);
    let r10k = |case: &str, key: &str| {
        get(s, &["cases", case])
            .as_object()
            .and_then(|m| {
                m.iter()
                    .filter(|(k, _)| k.parse::<u64>().is_ok_and(|n| n > 1))
                    .map(|(_, v)| v["ratios"][key].as_f64())
                    .next()
            })
            .flatten()
    };
    json!({
        "nodeport_cps_vs_ipvs": r("cps_nodeport", "rate_vs_ipvs"),
        "nodeport_cps_vs_nftables": r("cps_nodeport", "rate_vs_nftables"),
        "clusterip_cps_vs_ipvs": r("cps_clusterip", "rate_vs_ipvs"),
        "clusterip_cps_vs_nftables": r("cps_clusterip", "rate_vs_nftables"),
        "p99_vs_ipvs": r("cps_nodeport", "p99_vs_ipvs"),
        "p99_vs_nftables": r("cps_nodeport", "p99_vs_nftables"),
        "clusterip_p99_vs_ipvs": r("cps_clusterip", "p99_vs_ipvs"),
        "p99_one_at_a_time_vs_ipvs": r("lat_nodeport", "p99_vs_ipvs"),
        "nodeport_cps_vs_ipvs_10k": r10k("cps_nodeport", "rate_vs_ipvs"),
        "nodeport_cps_vs_nftables_10k": r10k("cps_nodeport", "rate_vs_nftables"),
        "clusterip_cps_vs_ipvs_10k": r10k("cps_clusterip", "rate_vs_ipvs"),
        "clusterip_cps_vs_nftables_10k": r10k("cps_clusterip", "rate_vs_nftables"),
        "nodeport_node_cpu_vs_ipvs": r("cps_nodeport", "node_cpu_vs_ipvs"),
        "nodeport_node_cpu_vs_nftables": r("cps_nodeport", "node_cpu_vs_nftables"),
        "clusterip_node_cpu_vs_ipvs": r("cps_clusterip", "node_cpu_vs_ipvs"),
        "clusterip_node_cpu_vs_nftables": r("cps_clusterip", "node_cpu_vs_nftables"),
        "rr_node_cpu_vs_nftables": r("rr_nodeport", "node_cpu_vs_nftables"),
        "udp_node_cpu_vs_nftables": r("udp_nodeport", "node_cpu_vs_nftables"),
        "bulk_node_cpu_vs_nftables": r("bulk_nodeport", "node_cpu_vs_nftables"),
        "pod_to_pod_ours_minus_firewall_us": r("cps_pod_to_pod", "ours_minus_firewall_us"),
        "node_to_remote_ours_minus_firewall_us": r("cps_node_to_remote", "ours_minus_firewall_us"),
        "pod_to_pod_ns_per_bpf_run": num(s, &["details", "ours", "bpf_stats", "pod_to_pod", "ns_per_run"]),
    })
}

/// Conntrack entries per service connection in our datapath: the largest of the timed cases'
/// `nf_conntrack_count` growth and the NEW events of the event pass.
fn ours_conntrack_per_conn(s: &Value) -> Option<f64> {
    let mut worst: Option<f64> = None;
    let mut see = |v: Option<f64>| {
        if let Some(v) = v {
            worst = Some(worst.map_or(v, |w: f64| w.max(v)));
        }
    };
    // Traffic that is not service traffic is tracked by design (the node's firewall).
    let services = get(s, &["cases"])
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(case, _)| !OTHER_CASES.iter().any(|(other, _)| other == case));
    for (_, by_n) in services {
        for (n, v) in by_n.as_object().into_iter().flatten() {
            if n != "direct" {
                see(num(v, &["ours", "conntrack_per_conn", "max"]));
            }
        }
    }
    for case in ["nodeport", "clusterip"] {
        let e = get(s, &["details", "ours", "conntrack_events", case]);
        see(e["new_events_per_conn"].as_f64());
        see(e["growth_per_conn"].as_f64());
        see(e["allocs_per_conn"].as_f64());
    }
    worst
}

struct Goal {
    what: &'static str,
    key: &'static str,
    target: f64,
    /// true: measured must be ≥ target; false: ≤.
    at_least: bool,
}

/// Issue 15's goals: the node's share of CPU per connection (minus the direct baseline) under
/// `-icount`, stage 1 (IPVS forwarding every packet) and stage 2 (the moonshot).
const GOALS: [Goal; 12] = [
    Goal {
        what: "NodePort node CPU per connection vs nftables mode (stage 1)",
        key: "nodeport_node_cpu_vs_nftables",
        target: 0.95,
        at_least: false,
    },
    Goal {
        what: "ClusterIP node CPU per connection vs nftables mode (stage 1)",
        key: "clusterip_node_cpu_vs_nftables",
        target: 1.0,
        at_least: false,
    },
    Goal {
        what: "NodePort kept-alive requests, node CPU per request vs nftables mode (stage 1)",
        key: "rr_node_cpu_vs_nftables",
        target: 1.0,
        at_least: false,
    },
    Goal {
        what: "NodePort UDP request/response, node CPU per request vs nftables mode (stage 1)",
        key: "udp_node_cpu_vs_nftables",
        target: 1.0,
        at_least: false,
    },
    Goal {
        what: "NodePort bulk download, node CPU per MiB vs nftables mode (stage 1)",
        key: "bulk_node_cpu_vs_nftables",
        target: 1.0,
        at_least: false,
    },
    Goal {
        what: "NodePort node CPU per connection vs ipvs mode",
        key: "nodeport_node_cpu_vs_ipvs",
        target: 0.5,
        at_least: false,
    },
    Goal {
        what: "ClusterIP node CPU per connection vs ipvs mode",
        key: "clusterip_node_cpu_vs_ipvs",
        target: 0.5,
        at_least: false,
    },
    Goal {
        what: "NodePort node CPU per connection vs nftables mode (stage 2)",
        key: "nodeport_node_cpu_vs_nftables",
        target: 0.8,
        at_least: false,
    },
    Goal {
        what: "ClusterIP node CPU per connection vs nftables mode (stage 2)",
        key: "clusterip_node_cpu_vs_nftables",
        target: 0.9,
        at_least: false,
    },
    Goal {
        what: "pod to a remote pod, not a Service: node CPU ours adds per connection over the firewall alone (µs)",
        key: "pod_to_pod_ours_minus_firewall_us",
        target: 1.0,
        at_least: false,
    },
    Goal {
        what: "the node to a remote pod, not a Service: node CPU ours adds per connection over the firewall alone (µs)",
        key: "node_to_remote_ours_minus_firewall_us",
        target: 1.0,
        at_least: false,
    },
    Goal {
        what: "pod to a remote pod: BPF run time per run (bpf_stats ns: guest instructions under -icount, its clock reads included)",
        key: "pod_to_pod_ns_per_bpf_run",
        target: 60.0,
        at_least: false,
    },
];

fn verdict(measured: Option<f64>, target: f64, at_least: bool) -> String {
    match measured {
        None => "not measured".into(),
        Some(m) if (at_least && m >= target) || (!at_least && m <= target) => "met".into(),
        Some(m) => {
            let by = if at_least {
                (target - m) / target * 100.0
            } else {
                (m - target) / target * 100.0
            };
            format!("missed by {by:.0}%")
        }
    }
}

// --- markdown -------------------------------------------------------------------------------

/// An object's numbers and short strings as `name value`, and (`depth` > 0) those of its
/// objects `depth` levels down as `name.inner value`; arrays are left out.
fn scalars(v: &Value, depth: usize) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in v.as_object().into_iter().flatten() {
        match v {
            Value::Number(n) if n.is_u64() => out.push(format!("{k} {n}")),
            Value::Number(n) => out.push(format!("{k} {}", f(n.as_f64()))),
            Value::String(s) if s.len() < 40 => out.push(format!("{k} {s}")),
            Value::Object(_) if depth > 0 => out.extend(
                scalars(v, depth - 1)
                    .into_iter()
                    .map(|s| format!("{k}.{s}")),
            ),
            _ => {}
        }
    }
    out
}

fn f(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(x) if x.abs() >= 1000.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 100.0 => format!("{x:.1}"),
        Some(x) if x.abs() >= 1.0 => format!("{x:.2}"),
        Some(x) => format!("{x:.3}"),
    }
}

/// "median ±spread%" of a stat.
fn ms(v: &Value) -> String {
    match v["median"].as_f64() {
        None => "–".into(),
        Some(m) => format!(
            "{} ±{:.0}%",
            f(Some(m)),
            v["spread_pct"].as_f64().unwrap_or(0.0) / 2.0
        ),
    }
}

fn run_title(s: &Value) -> String {
    format!(
        "{} — {}",
        s["kernel"].as_str().unwrap_or("?"),
        if s["clock"] == "icount" {
            "QEMU TCG with -icount (guest time = instruction count)"
        } else {
            "QEMU TCG, wall clock"
        }
    )
}

fn service_keys(s: &Value, case: &str) -> Vec<String> {
    let mut v: Vec<String> = get(s, &["cases", case])
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k.clone())
        .filter(|k| k != "direct")
        .collect();
    v.sort_by_key(|k| k.parse::<u64>().unwrap_or(0));
    v
}

fn case_label(case: &str) -> &'static str {
    match case {
        "cps_nodeport" => "NodePort short connections (CPS)",
        "cps_clusterip" => "ClusterIP short connections (CPS)",
        "lat_nodeport" => "NodePort, one connection at a time (CPS)",
        "lat_clusterip" => "ClusterIP, one connection at a time (CPS)",
        "rr_nodeport" => "NodePort requests on kept-alive connections (req/s)",
        "bulk_nodeport" => "NodePort bulk download (Mbit/s)",
        "udp_nodeport" => "NodePort UDP request/response (req/s)",
        _ => "other",
    }
}

const CASE_ORDER: [&str; 7] = [
    "cps_nodeport",
    "cps_clusterip",
    "lat_nodeport",
    "lat_clusterip",
    "rr_nodeport",
    "bulk_nodeport",
    "udp_nodeport",
];

fn markdown(
    summaries: &[(String, String, Value)],
    headline: Option<&(String, String, Value)>,
    doc: &Value,
    date: &str,
    commit: &str,
) -> String {
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# Benchmarks\n");
    let _ = writeln!(
        w,
        "Written by `scripts/bench` on {date} from commit `{commit}`. Every figure here is also in \
         `docs/benchmarks.json`.\n"
    );
    let _ = writeln!(
        w,
        "## Datapath: kube-proxy ipvs mode, kube-proxy nftables mode and kube-ipvs-bpf\n"
    );
    let _ = writeln!(
        w,
        "> **Absolute figures are not hardware speeds.** The guest runs on an emulated CPU (QEMU \
         TCG, one vCPU); connections per second, latencies and CPU times are those of the \
         emulator. What counts are the **ratios between the datapaths**, measured in one run, on \
         the same kernel, topology and traffic, in alternating rounds. Wall-clock TCG figures are \
         noisy (the host is shared); the `-icount` runs drive the guest clock by the instruction \
         count, so their figures are repeatable and their times are instruction counts (shift 0: \
         1 µs = 1,000 guest instructions)."
    );
    md.push('\n');
    // How.
    if let Some((_, _, s)) = summaries.first() {
        let c = &s["config"];
        let _ = writeln!(
            md,
            "### How it was measured\n\n\
             `scripts/bench datapath` boots each kernel in the lab VM twice (plain TCG, then \
             `-icount`) and runs `bench-datapath` (bench/src/datapath.rs) there. Topology \
             (`SnatTopology`, built afresh for every datapath in every round): an off-cluster \
             client 10.0.1.2 → the node 10.0.1.1 → a router → the remote pod 10.244.2.2; a local \
             pod 10.244.1.2 behind the node's `cni0`. The router has no route back to the client, \
             so NodePort replies arrive only if the node source-NATs. The node carries a \
             conntrack-using firewall (`ct state established,related accept`). The Service \
             under test has ClusterIP 10.96.0.10 (TCP 80, UDP 53) and NodePorts 30080/TCP and \
             30053/UDP on 10.0.1.1 only, in all three datapaths.\n\n\
             - **ipvs**: kube-proxy v1.36's ipvs mode as it programs a node (its sysctls incl. \
             `vs.conntrack=1`, its ipsets, `KUBE-*` iptables chains with the 0x4000 mark and \
             `MASQUERADE --random-fully`, IPVS services, ClusterIPs on `kube-ipvs0`), generated \
             by `tests/src/kube_proxy.rs` and checked against a real kube-proxy's node state;\n\
             - **nftables**: kube-proxy v1.36's nftables mode (`ip`/`ip6 kube-proxy` tables: \
             service maps, `numgen` DNAT, `masquerade fully-random` on 0x4000), same source;\n\
             - **ours**: the real agent binary (`kube-ipvs-bpf run --source file:… \
             --sync-period 1h`, release build), timed only after its first sync.\n\n\
             Each round: a direct baseline (the same traffic straight to the pod, no Service, no \
             firewall), then ipvs, nftables, ours, each with 1 Service and then with {} more \
             ClusterIP Services (endpoints elsewhere); with 1 Service each also carries traffic that is \
             not service traffic (the local pod and the node itself connecting straight to the \
             remote pod), which the direct baseline and a firewall-only reference (the node's \
             firewall, no service proxy) carry too. Rounds: {}. Short connections (connect, \
             one 64-byte request, a 128-byte response, close) at concurrency {}: {} per case; \
             one at a time: a quarter of that; {} requests on {} kept-alive connections; a {} \
             MiB download; {} UDP requests. Ratios are ours/theirs, the median over rounds of \
             the per-round ratio; `±` is half the spread (max − min) over rounds, relative to \
             the median.\n\n\
             **CPU per connection** is the guest's busy CPU time over the timed window (window × \
             CPUs − idle) divided by connections. Ours counts the agent whatever a window's \
             phase caught of it (a sweep pass costs tens of ms under `-icount`): its CPU \
             within the window (its threads' schedstat) is replaced by its rate without traffic \
             (over a minute before each round's cases: six sweep periods, one full read of \
             `conns`) for the window's length \
             plus, for each connection through a Service, its work per connection (its CPU over \
             the round's cases and, after them, IPVS's FIN timeout, two sweep periods and a \
             minute — the lives of the records they made, their expiry and their `conns` \
             entries' removal included — less that rate, over the \
             connections the round's short-connection service cases made); the **node's \
             share** subtracts the direct \
             baseline of the same round, which carries the client's and the server's constant \
             costs (loadgen, both TCP stacks, veth, routing), so the ratio of node shares is the \
             service path's cost undiluted. (The loadgen processes' own rusage is recorded but \
             not subtracted: with tick-based accounting the kernel charges softirq work done in \
             a process's context — the node's forwarding, here — to that process.)\n\n\
             Conntrack: `nf_conntrack_count` growth in the node's namespace over each timed case, \
             `conntrack -C` after it (the table's peak: entries only grow within a case), and \
             `conntrack -E` NEW events over {} connections per path (not `conntrack -S`, whose \
             insert counter reads 0 on these kernels) with, over the same connections, every \
             conntrack entry allocated (calls of `__nf_conntrack_alloc`, confirmed or not, \
             counted by a kprobe event's hist trigger: outside the timed windows, where the \
             probe would cost the datapaths that allocate); the conntrack table is flushed before \
             each timed case. Table full: `nf_conntrack_max` = {}, {} connections opened \
             (256 connects in flight, 3 s timeout) and held through the NodePort.\n\n\
             Setup details that keep the comparison fair: kube-proxy's kernel-wide conntrack \
             settings (`nf_conntrack_max` 131072) are applied for its two modes and reset \
             after; the agent's probe and programs are removed (`kube-ipvs-bpf cleanup`, then \
             checked with bpftool) before the next datapath; after each of the agent's syncs \
             the timed cases wait until its process has used no CPU for 2 s. nftables mode \
             gets the extra Services in transactions of 500 (as kube-proxy's partial syncs \
             add them): one 10,000-Service transaction takes minutes under TCG on these \
             kernels (each anonymous `numgen` map's name allocation scans every set of the \
             table). The traffic never leaves the lab namespaces.\n",
            c["fill_services"],
            c["rounds"],
            c["concurrency"],
            c["conns"],
            c["rr_requests"],
            c["concurrency"],
            c["bulk_mb"],
            c["udp_requests"],
            c["event_conns"],
            c["ct_max"],
            c["hold_conns"],
        );
    }

    // Goals.
    let _ = writeln!(md, "### Goals\n");
    let mut head = "| goal | target |".to_string();
    let mut sep = "|---|---|".to_string();
    for (series, clock, _) in summaries {
        head += &format!(" {series} {clock} |");
        sep += "---|";
    }
    let _ = writeln!(md, "{head}\n{sep}");
    for g in &GOALS {
        let mut row = format!(
            "| {} | {} {} |",
            g.what,
            if g.at_least { "≥" } else { "≤" },
            g.target
        );
        for (_, _, s) in summaries {
            let m = num(&headline_ratios(s), &[g.key]);
            row += &format!(" {} ({}) |", f(m), verdict(m, g.target, g.at_least));
        }
        let _ = writeln!(md, "{row}");
    }
    let mut row = "| conntrack entries per service connection (ours) | 0 |".to_string();
    for (_, _, s) in summaries {
        let m = ours_conntrack_per_conn(s);
        row += &format!(" {} ({}) |", f(m), verdict(m, 0.0, false));
    }
    let _ = writeln!(md, "{row}");
    let mut row = "| failed connections, table full (ours) | 0 |".to_string();
    for (_, _, s) in summaries {
        let m = num(s, &["details", "ours", "table_full", "failed"]);
        row += &format!(" {} ({}) |", f(m), verdict(m, 0.0, false));
    }
    let _ = writeln!(md, "{row}\n");
    if let Some((series, clock, _)) = headline {
        let _ = writeln!(
            md,
            "The top-level `ratios.*` of docs/benchmarks.json are the {series} {clock} run's.\n"
        );
    }

    // Per run.
    for (_, _, s) in summaries {
        let _ = writeln!(md, "### {}\n", run_title(s));
        if let Some(e) = s["error"].as_str() {
            let _ = writeln!(md, "**The run stopped early:** `{e}`\n");
        }
        let _ = writeln!(
            md,
            "| case | Services | direct | ipvs | nftables | ours | ours/ipvs | ours/nftables |\n|---|---|---|---|---|---|---|---|"
        );
        for case in CASE_ORDER {
            for n in service_keys(s, case) {
                let c = get(s, &["cases", case, &n]);
                let d = get(s, &["cases", case, "direct", "rate"]);
                let _ = writeln!(
                    md,
                    "| {} | {n} | {} | {} | {} | {} | {} | {} |",
                    case_label(case),
                    if n == "1" { ms(d) } else { "".into() },
                    ms(&c["ipvs"]["rate"]),
                    ms(&c["nftables"]["rate"]),
                    ms(&c["ours"]["rate"]),
                    f(c["ratios"]["rate_vs_ipvs"].as_f64()),
                    f(c["ratios"]["rate_vs_nftables"].as_f64()),
                );
            }
        }
        let _ = writeln!(
            md,
            "\nLatency (µs; short connections at concurrency {c} include queueing on the one vCPU):\n\n\
             | case | Services | ipvs p50 / p99 / p99.9 | nftables p50 / p99 / p99.9 | ours p50 / p99 / p99.9 | p99 ours/ipvs | p99 ours/nftables |\n|---|---|---|---|---|---|---|",
            c = s["config"]["concurrency"]
        );
        for case in CASE_ORDER {
            if case.starts_with("bulk") {
                continue;
            }
            for n in service_keys(s, case) {
                let c = get(s, &["cases", case, &n]);
                let l = |dp: &str| {
                    format!(
                        "{} / {} / {}",
                        f(c[dp]["p50_us"]["median"].as_f64()),
                        f(c[dp]["p99_us"]["median"].as_f64()),
                        f(c[dp]["p999_us"]["median"].as_f64())
                    )
                };
                let _ = writeln!(
                    md,
                    "| {} | {n} | {} | {} | {} | {} | {} |",
                    case_label(case),
                    l("ipvs"),
                    l("nftables"),
                    l("ours"),
                    f(c["ratios"]["p99_vs_ipvs"].as_f64()),
                    f(c["ratios"]["p99_vs_nftables"].as_f64()),
                );
            }
        }
        let _ = writeln!(
            md,
            "\nCPU per connection (µs; per request for request/response, per MiB for bulk), whole \
             guest, and the node's share (minus the direct baseline):\n\n\
             | case | Services | direct | ipvs | nftables | ours | node: ipvs | node: nftables | node: ours | node ours/ipvs | node ours/nftables |\n|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for case in CASE_ORDER {
            for n in service_keys(s, case) {
                let c = get(s, &["cases", case, &n]);
                let cpu = |dp: &str| f(c[dp]["cpu_us_per_unit"]["median"].as_f64());
                let node = |dp: &str| f(c[dp]["node_cpu_us_per_conn"]["median"].as_f64());
                let _ = writeln!(
                    md,
                    "| {} | {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    case_label(case),
                    if n == "1" {
                        f(num(
                            s,
                            &["cases", case, "direct", "cpu_us_per_unit", "median"],
                        ))
                    } else {
                        "".into()
                    },
                    cpu("ipvs"),
                    cpu("nftables"),
                    cpu("ours"),
                    node("ipvs"),
                    node("nftables"),
                    node("ours"),
                    f(c["ratios"]["node_cpu_vs_ipvs"].as_f64()),
                    f(c["ratios"]["node_cpu_vs_nftables"].as_f64()),
                );
            }
        }
        // Conntrack.
        let _ = writeln!(
            md,
            "\nConntrack in the node's namespace (entries per connection: median over rounds of \
             the growth in each timed case; NEW events per connection from `conntrack -E`; peak \
             `conntrack -C`):\n\n\
             | datapath | growth per conn, NodePort / ClusterIP | NEW events per conn, NodePort / ClusterIP | `__nf_conntrack_alloc` calls per conn, NodePort / ClusterIP | peak `conntrack -C` (NodePort CPS, 1 Service) | table full: failed of held | peak count when full |\n|---|---|---|---|---|---|---|"
        );
        for dp in DATAPATHS {
            let ev = get(s, &["details", dp, "conntrack_events"]);
            let tf = get(s, &["details", dp, "table_full"]);
            let _ = writeln!(
                md,
                "| {dp} | {} / {} | {} / {} | {} / {} | {} | {} of {} | {} |",
                f(num(
                    s,
                    &[
                        "cases",
                        "cps_nodeport",
                        "1",
                        dp,
                        "conntrack_per_conn",
                        "median"
                    ]
                )),
                f(num(
                    s,
                    &[
                        "cases",
                        "cps_clusterip",
                        "1",
                        dp,
                        "conntrack_per_conn",
                        "median"
                    ]
                )),
                f(ev["nodeport"]["new_events_per_conn"].as_f64()),
                f(ev["clusterip"]["new_events_per_conn"].as_f64()),
                f(ev["nodeport"]["allocs_per_conn"].as_f64()),
                f(ev["clusterip"]["allocs_per_conn"].as_f64()),
                f(num(
                    s,
                    &["cases", "cps_nodeport", "1", dp, "conntrack_peak", "median"]
                )),
                f(tf["failed"].as_f64()),
                f(tf["conns"].as_f64()),
                f(tf["peak_conntrack_count"].as_f64()),
            );
        }
        other_traffic_table(&mut md, s);
        let _ = writeln!(
            md,
            "\nProgramming time in round 0 (s): {}\n",
            DATAPATHS
                .iter()
                .map(|dp| {
                    let ks = service_keys(s, "cps_nodeport");
                    let t: Vec<String> = ks
                        .iter()
                        .map(|n| {
                            format!(
                                "{n} Services {}",
                                f(num(
                                    s,
                                    &["cases", "cps_nodeport", n, dp, "program_s_round0"]
                                ))
                            )
                        })
                        .collect();
                    format!("{dp}: {}", t.join(", "))
                })
                .collect::<Vec<_>>()
                .join("; ")
        );
        // The periodic work a timed window catches or misses by its phase (ours: the agent's).
        let idle: Vec<String> = DATAPATHS
            .iter()
            .filter_map(|dp| {
                let ms = num(s, &["details", dp, "idle", "busy_ms_per_s"])?;
                let cps = num(s, &["cases", "cps_nodeport", "1", dp, "rate", "median"]);
                Some(match cps.filter(|c| *c > 0.0) {
                    Some(cps) => format!(
                        "{dp} {} ms/s ({} µs per connection at its NodePort CPS)",
                        f(Some(ms)),
                        f(Some(ms * 1000.0 / cps))
                    ),
                    None => format!("{dp} {} ms/s", f(Some(ms))),
                })
            })
            .collect();
        if !idle.is_empty() {
            let _ = writeln!(
                md,
                "Busy CPU without traffic over {} s after the profiles (periodic work, such as \
                 the agent's node checks and sweeps, that a timed window catches or misses by \
                 its phase; from the guest's ticks): {}. The agent's own CPU over that window, \
                 from its threads' schedstat: {} ms/s (its maps then hold what the detail phase \
                 left; the node shares count the rate measured before each round's cases).\n",
                f(s["config"]["idle_seconds"].as_f64()),
                idle.join("; "),
                f(num(s, &["details", "ours", "idle", "agent_ms_per_s"])),
            );
        }
    }

    where_time_goes(&mut md, summaries, headline);

    // Chart.
    let _ = writeln!(
        md,
        "### Chart\n\n![datapath ratios](benchmarks.png)\n\n\
         Everything is relative to kube-proxy ipvs mode = 1.0 (the thick line), higher is \
         better; each bar carries its value. Panels, top to bottom: {}. Groups: short-connection \
         CPS for NodePort and ClusterIP (and with the extra Services, when the run had them), \
         then node-CPU efficiency (ipvs mode's node share per connection divided by the \
         datapath's). The text is DejaVu Sans (Debian's fonts-dejavu-core).\n",
        summaries
            .iter()
            .map(|(k, c, _)| format!("{k} {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    json_sections(&mut md, doc);
    md
}

/// Traffic that is not service traffic: each datapath's node CPU per connection (minus the direct
/// baseline), what it adds over the firewall alone, and our programs' runs on it.
fn other_traffic_table(md: &mut String, s: &Value) {
    if OTHER_CASES
        .iter()
        .all(|(case, _)| get(s, &["cases", case, "1"]).is_null())
    {
        return;
    }
    let _ = writeln!(
        md,
        "\nTraffic that is not service traffic, through the same devices (short connections \
         straight to a port of the remote pod that is no endpoint; the firewall column is the \
         node with its firewall and no service proxy): node CPU per connection minus the direct baseline (µs), and what each \
         datapath adds over the firewall alone:\n\n\
         | case | firewall | ipvs | nftables | ours | ipvs − firewall | nftables − firewall | ours − firewall | our BPF runs per conn | our BPF ns per run |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for (case, label) in OTHER_CASES {
        let c = get(s, &["cases", case, "1"]);
        let node = |dp: &str| f(c[dp]["node_cpu_us_per_conn"]["median"].as_f64());
        let over = |dp: &str| f(c["ratios"][format!("{dp}_minus_firewall_us")].as_f64());
        let bpf_case = case.trim_start_matches("cps_");
        let b = get(s, &["details", "ours", "bpf_stats", bpf_case]);
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            node("firewall"),
            node("ipvs"),
            node("nftables"),
            node("ours"),
            over("ipvs"),
            over("nftables"),
            over("ours"),
            f(b["bpf_runs_per_conn"].as_f64()),
            f(b["ns_per_run"].as_f64()),
        );
    }
}

/// The sections made from docs/benchmarks.json alone, after the datapath's: the eBPF
/// micro-benchmarks, the IPVS library, the sync bench at 10,000 Services (`sync`) and any other
/// size run on demand (`sync_N`).
fn json_sections(md: &mut String, doc: &Value) {
    bpf_section(md, doc);
    // Other benchmarks kept in the JSON: the IPVS library, then the sync bench at 10,000
    // Services (`sync`) and any other size run on demand (`sync_N`).
    let mut others = vec![
        (
            "ipvs".to_string(),
            "IPVS library (`scripts/bench ipvs`)".to_string(),
        ),
        (
            "ipvs_icount".to_string(),
            "IPVS library under -icount (`LAB_ICOUNT=0 scripts/bench ipvs`: times are guest \
             instruction counts, 1 s = 10^9)"
                .to_string(),
        ),
    ];
    for key in doc.as_object().into_iter().flatten().map(|(k, _)| k) {
        if let Some(cpus) = key.strip_prefix("ipvs_smp") {
            others.push((
                key.clone(),
                format!("IPVS library, {cpus} vCPUs (`LAB_SMP={cpus} scripts/bench ipvs`)"),
            ));
            continue;
        }
        let title = match key.strip_prefix("sync_") {
            _ if key == "sync" => "Agent sync (`scripts/bench sync`)".to_string(),
            Some("icount") => "Agent sync under -icount (`LAB_ICOUNT=0 scripts/bench sync`: \
                               times are guest instruction counts, 1 s = 10^9)"
                .to_string(),
            Some(n) if n.starts_with("smp") => {
                let cpus = &n[3..];
                format!("Agent sync, {cpus} vCPUs (`LAB_SMP={cpus} scripts/bench sync`)")
            }
            Some(n) => {
                format!("Agent sync, {n} Services (`BENCH_SERVICES={n} scripts/bench sync`)")
            }
            None => continue,
        };
        others.push((key.clone(), title));
    }
    for (key, title) in others {
        let Some(obj) = doc[&key].as_object() else {
            continue;
        };
        let _ = writeln!(md, "## {title}\n");
        if key.starts_with("sync") {
            let _ = writeln!(
                md,
                "The agent (`--source kubernetes`, a fake API server, its own cgroup) programs \
                 the Services from empty; after one untimed warm-up change (its record is \
                 `change_latency_ms.warmup`: the first change's POST and sync ran 5-60x slower \
                 than the next ones', most likely QEMU translating code the first sync never \
                 ran), single endpoint changes are timed \
                 from the POST \
                 to the IPVS dump showing them, polled every 2 ms at nice 10 so that the \
                 poller does not take the one vCPU from the agent (`change_latency_ms`, at the \
                 `--min-sync-period` \
                 in `agent_options`; `change_latency_parts_ms`: the POST's own time \
                 (`posted`: the fake API server, in the same one-vCPU guest) and the rest \
                 (`after_post`), when the source published and the sync ran, and the slowest \
                 changes with the CPU used meanwhile); then 60 s \
                 idle with the tables full (`idle`, sweeps and node checks included) and a \
                 rolling-update churn (`churn`: one endpoint replaced every `interval_ms`, CPU \
                 and latency together). Memory: VmRSS and its parts, and the cgroup's \
                 `memory.current` (BPF maps and other kernel memory included). Clocks: latencies \
                 on the guest's wall clock (TCG: host real time, emulated CPU), CPU from the \
                 guest's /proc ticks.\n"
            );
        }
        for (k, v) in obj {
            let _ = writeln!(md, "- `{key}.{k}`: {}", scalars(v, 0).join(", "));
            // Nested figures (latency distributions, CPU, memory), one line each.
            for (kk, vv) in v.as_object().into_iter().flatten() {
                let line = scalars(vv, 1);
                if vv.is_object() && !line.is_empty() {
                    let _ = writeln!(md, "  - {kk}: {}", line.join(", "));
                }
            }
        }
        md.push('\n');
    }
}

/// The eBPF micro-benchmark section (`scripts/bench bpf`), from `bpf` and `bpf_detail`.
fn bpf_section(md: &mut String, doc: &Value) {
    if let Some(bpf) = doc["bpf"].as_object() {
        let d = &doc["bpf_detail"];
        let _ = writeln!(
            md,
            "## eBPF datapath micro-benchmarks (`scripts/bench bpf`)\n\n\
             On the host kernel ({}), ns per packet. Method: {}. *own* is the median over rounds \
             of a round's figure minus the empty program's round before it (the empty program: \
             {} ns, the test-run loop and the indirect call into the program, which a TC hook \
             pays too); the rewrite is {} (helpers: the same paths with the BPF-helper rewrite \
             6.1 uses); single run: {}.\n\n\
             | path | IPv4 ns | IPv4 own | IPv6 ns | IPv6 own | IPv4 helpers | IPv4 single run |\n\
             |---|---|---|---|---|---|---|",
            d["kernel"].as_str().unwrap_or("?"),
            bpf["method"].as_str().unwrap_or("see benchmarks.json"),
            f(bpf.get("floor_ns").and_then(Value::as_f64)),
            bpf["rewrite"].as_str().unwrap_or("?"),
            d["single_run"]["ipv4"]["method"]
                .as_str()
                .unwrap_or("see bpf_detail in benchmarks.json"),
        );
        for (k, v) in bpf {
            let Some(x) = v.as_f64() else { continue };
            if k == "floor_ns" {
                continue;
            }
            let cell = |path: &Value| f(path[k].as_f64());
            let _ = writeln!(
                md,
                "| `{k}` | {} | {} | {} | {} | {} | {} |",
                f(Some(x)),
                cell(&d["bpf_own"]),
                cell(&d["bpf_ipv6"]),
                cell(&d["bpf_ipv6_own"]),
                cell(&d["bpf_helpers"]),
                cell(&d["single_run"]["ipv4"]),
            );
        }
        let goal = |key: &str, limit: f64| match bpf.get(key).and_then(Value::as_f64) {
            Some(x) => format!(
                "`{key}` ≤ {limit}: {} ({})",
                f(Some(x)),
                if x <= limit { "met" } else { "missed" }
            ),
            None => format!("`{key}` ≤ {limit}: not measured"),
        };
        let _ = writeln!(
            md,
            "\nGoals (issue 3, IPv4, the figure as measured): {}; {}.",
            goal("fast_path_ns", 50.0),
            goal("first_packet_ns", 300.0),
        );
        md.push('\n');
    }
}

/// Replaces the sections of an existing report that are made from docs/benchmarks.json alone
/// (`--json-sections`: `scripts/bench bpf`, `ipvs` and `sync` refresh their figures without the
/// datapath runs' raw files). They are the report's last sections: everything from the first of
/// their headings on is rewritten.
fn replace_json_sections(report: &str, doc: &Value) -> String {
    const HEADS: [&str; 3] = [
        "## eBPF datapath micro-benchmarks",
        "## IPVS library",
        "## Agent sync",
    ];
    let mut sections = String::new();
    json_sections(&mut sections, doc);
    let start = HEADS.iter().filter_map(|h| report.find(h)).min();
    match start {
        Some(start) => format!("{}{sections}", &report[..start]),
        None if report.is_empty() => sections,
        None => format!("{}\n\n{sections}", report.trim_end_matches('\n')),
    }
}

/// "Where the time goes": profile categories, BPF statistics, and what would close the gaps.
fn where_time_goes(
    md: &mut String,
    summaries: &[(String, String, Value)],
    headline: Option<&(String, String, Value)>,
) {
    let _ = writeln!(md, "### Where the time goes\n");
    let _ = writeln!(
        md,
        "System-wide `perf record -a` (cpu-clock) of each CPS case at the end of every run \
         (outside the timed rounds), symbols grouped by subsystem; µs per connection for the \
         datapath, and in brackets the difference with the direct baseline's profile (the \
         service path's own cost). Under `-icount` a µs is 1,000 guest instructions.\n"
    );
    for (series, clock, s) in summaries {
        if clock != "icount"
            && summaries
                .iter()
                .any(|(k, c, _)| k == series && c == "icount")
        {
            continue;
        }
        for case in ["nodeport", "clusterip"] {
            if get(s, &["details", "ours", "profile_us_per_conn", case]).is_null() {
                continue;
            }
            let _ = writeln!(
                md,
                "{series} {clock}, {case} (µs per connection):\n\n| category | ipvs | nftables | ours |\n|---|---|---|---|"
            );
            for c in CATEGORIES {
                let cell = |dp: &str| {
                    let v = get(s, &["details", dp, "profile_us_per_conn", case, c]);
                    format!(
                        "{} ({:+.1})",
                        f(v["us_per_conn"].as_f64()),
                        v["minus_direct"].as_f64().unwrap_or(0.0)
                    )
                };
                let _ = writeln!(
                    md,
                    "| {c} | {} | {} | {} |",
                    cell("ipvs"),
                    cell("nftables"),
                    cell("ours")
                );
            }
            md.push('\n');
        }
    }
    // The symbols behind our datapath's share.
    if let Some((series, clock, s)) = headline {
        let top = get(
            s,
            &[
                "details",
                "ours",
                "profile_us_per_conn",
                "nodeport_top_extra_symbols",
            ],
        );
        if let Some(list) = top.as_array().filter(|l| !l.is_empty()) {
            let _ = writeln!(
                md,
                "Ours, NodePort ({series} {clock}): the symbols that cost most over the direct \
                 baseline (µs per connection):\n\n| symbol | category | µs/conn |\n|---|---|---|"
            );
            for x in list {
                let _ = writeln!(
                    md,
                    "| `{}` | {} | {} |",
                    x["sym"].as_str().unwrap_or("?"),
                    x["category"].as_str().unwrap_or("?"),
                    f(x["us_per_conn"].as_f64())
                );
            }
            md.push('\n');
        }
        // Who calls the symbols worth attributing, in ours and in nftables mode (`perf report
        // --no-children -g callee`: shares of all the profile's samples).
        for dp in ["ours", "nftables"] {
            let callers = get(
                s,
                &["details", dp, "profile_us_per_conn", "nodeport_callers"],
            );
            for (sym, text) in callers.as_object().into_iter().flatten() {
                let Some(text) = text.as_str().filter(|t| !t.trim().is_empty()) else {
                    continue;
                };
                let _ = writeln!(
                    md,
                    "Callers of `{sym}`, {dp}, NodePort ({series} {clock}; percentages of all \
                     samples):\n\n```text\n{}\n```\n",
                    text.trim_end()
                );
            }
        }
    }
    // BPF statistics.
    if let Some((series, clock, s)) = headline {
        let b = get(s, &["details", "ours", "bpf_stats"]);
        if let Some(obj) = b.as_object() {
            let _ = writeln!(
                md,
                "Our BPF programs' own run time ({series} {clock}, `kernel.bpf_stats_enabled`, \
                 measured outside the timed windows; runs and ns per connection):\n\n\
                 | case | program | runs/conn | ns/run | ns/conn |\n|---|---|---|---|---|"
            );
            for (case, v) in obj {
                for (prog, p) in v["programs"].as_object().into_iter().flatten() {
                    let _ = writeln!(
                        md,
                        "| {case} | `{prog}` | {} | {} | {} |",
                        f(p["runs_per_conn"].as_f64()),
                        f(p["ns_per_run"].as_f64()),
                        f(p["ns_per_conn"].as_f64())
                    );
                }
                let counters: Vec<String> = v["counters_per_conn"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, x)| format!("{k} {}", f(x.as_f64())))
                    .collect();
                let _ = writeln!(
                    md,
                    "| {case} | all | | | **{}** |\n| {case} | counters per connection | {} | | |",
                    f(v["bpf_ns_per_conn"].as_f64()),
                    counters.join(", ")
                );
            }
            md.push('\n');
        }
        analysis(md, s, series, clock);
    }
}

/// The reading of the headline run's figures: which goals are missed, by how much, where the
/// service path's time goes, and what would close the gap. Every number comes from the data.
fn analysis(md: &mut String, s: &Value, series: &str, clock: &str) {
    let r = headline_ratios(s);
    let p = |dp: &str, c: &str, case: &str| {
        num(
            s,
            &[
                "details",
                dp,
                "profile_us_per_conn",
                case,
                c,
                "minus_direct",
            ],
        )
        .unwrap_or(0.0)
    };
    let node = |dp: &str, case: &str| {
        num(
            s,
            &["cases", case, "1", dp, "node_cpu_us_per_conn", "median"],
        )
    };
    let _ = writeln!(md, "### Reading ({series} {clock})\n");
    // CPU per NodePort connection (µs), median over rounds.
    let cpu = |dp: &str| {
        let path: &[&str] = if dp == "direct" {
            &[
                "cases",
                "cps_nodeport",
                "direct",
                "cpu_us_per_unit",
                "median",
            ]
        } else {
            &[
                "cases",
                "cps_nodeport",
                "1",
                dp,
                "cpu_us_per_unit",
                "median",
            ]
        };
        num(s, path)
    };
    let _ = writeln!(
        md,
        "- **End-to-end CPS** is diluted: client, server and both TCP stacks share the one vCPU \
         with the node and cost {} µs per NodePort connection on their own (the direct \
         baseline). Ours reaches {}× ipvs mode and {}× nftables mode for NodePort, {}× and {}× \
         for ClusterIP. A service path that cost nothing would reach at most {}× ipvs mode and \
         {}× nftables mode here (their CPU per connection over the direct baseline's), so CPS \
         goals above that are out of reach of this topology by construction; the node's share \
         below isolates the service path (TKE measured with clients and servers on other \
         machines).",
        f(cpu("direct")),
        f(r["nodeport_cps_vs_ipvs"].as_f64()),
        f(r["nodeport_cps_vs_nftables"].as_f64()),
        f(r["clusterip_cps_vs_ipvs"].as_f64()),
        f(r["clusterip_cps_vs_nftables"].as_f64()),
        f(cpu("ipvs").zip(cpu("direct")).map(|(a, b)| a / b)),
        f(cpu("nftables").zip(cpu("direct")).map(|(a, b)| a / b)),
    );
    let _ = writeln!(
        md,
        "- **The node's share** (service path only): NodePort {} µs per connection in ipvs \
         mode, {} in nftables mode, {} ours ({}× ipvs, {}× nftables); ClusterIP {} / {} / {} \
         ({}× ipvs, {}× nftables).",
        f(node("ipvs", "cps_nodeport")),
        f(node("nftables", "cps_nodeport")),
        f(node("ours", "cps_nodeport")),
        f(r["nodeport_node_cpu_vs_ipvs"].as_f64()),
        f(r["nodeport_node_cpu_vs_nftables"].as_f64()),
        f(node("ipvs", "cps_clusterip")),
        f(node("nftables", "cps_clusterip")),
        f(node("ours", "cps_clusterip")),
        f(r["clusterip_node_cpu_vs_ipvs"].as_f64()),
        f(r["clusterip_node_cpu_vs_nftables"].as_f64()),
    );
    // The agent's periodic work, which a timed window catches or misses by its phase: the node
    // shares above count it at its steady rate instead (Metric::CpuPerUnit).
    if let (Some(ms), Some(cps)) = (
        num(s, &["details", "ours", "agent_idle_ms_per_s"])
            .or_else(|| num(s, &["details", "ours", "idle", "agent_ms_per_s"])),
        num(s, &["cases", "cps_nodeport", "1", "ours", "rate", "median"]),
    ) {
        let per_conn = num(s, &["details", "ours", "agent_us_per_service_conn"]);
        let at_rate = (cps > 0.0).then(|| ms * 1000.0 / cps);
        let _ = writeln!(
            md,
            "- **The agent** is in the node shares of ours whatever a window's phase caught of \
             it: {} ms of CPU a second without traffic (over a minute before each round's \
             cases: its sweeps and node checks), {} µs per connection at the NodePort CPS, and \
             {} µs of work per service connection (the sweeper's reads of its record over its \
             life, its expiry and the removal of its `conns` entry, and the full reads of \
             `conns` over the round and the records' life after it; not the full reads of an \
             untranslated connection's entry after that, which lives 15 minutes): {} µs per \
             NodePort connection in all.",
            f(Some(ms)),
            f(at_rate),
            f(per_conn),
            f(per_conn.map(|b| b + at_rate.unwrap_or(0.0))),
        );
    }
    let ct = p("ipvs", "conntrack and NAT", "nodeport");
    let ctn = p("nftables", "conntrack and NAT", "nodeport");
    let bpf = p("ours", "BPF programs (JIT code)", "nodeport")
        + p("ours", "BPF helpers, maps, TC hook", "nodeport");
    let ours_rules = p("ours", "iptables / nftables rules", "nodeport");
    let ipvs_core = p("ours", "IPVS", "nodeport");
    let _ = writeln!(
        md,
        "- What ours removes (NodePort profile, minus direct): conntrack and NAT, {ct:.1} µs per \
         connection in ipvs mode and {ctn:.1} in nftables mode, and most of kube-proxy's rule \
         evaluation ({:.1} / {:.1} µs). What it adds: BPF programs, helpers and map lookups \
         {bpf:.1} µs, its own rules (the nf_tables `notrack`, the filter accept first in INPUT \
         and FORWARD, the raw OUTPUT jump that forwarded packets fail) plus the node's firewall \
         evaluated on untracked packets {ours_rules:.1} µs, and IPVS itself stays ({ipvs_core:.1} µs, as in ipvs mode). nftables mode needs no \
         IPVS at all, which is why it is the harder comparison.",
        p("ipvs", "iptables / nftables rules", "nodeport"),
        p("nftables", "iptables / nftables rules", "nodeport"),
    );
    let _ = writeln!(
        md,
        "- What would close the gap, from this profile (the flow cache keeps the ingress verdicts \
         of untranslated flows and the translations of established ones, so most of those runs \
         are a slot lookup, and egress passes the replies ingress recognized on their reply \
         mark; `bpf_stats` above counts what is left): (1) the general path's runs — the SYNs, \
         the first reply, the first egress run of an untranslated flow (FINs and RSTs of \
         translated flows take the fast path and record their state through the slot's record) — \
         still hash 20–40-byte keys (`conns`, `svc_ports`) and walk `cluster_cidrs`' LPM trie, \
         and the IPVS probe's `conns` insert is a hash-map update per connection; (2) the \
         iptables-nft base chains every service packet still walks (one rule of ours each; \
         IPVS's reroute of each forwarded reply, `vs.snat_reroute`, is off on this node, whose \
         routes depend on the destination alone); (3) IPVS's own cost \
         (about 10 µs per connection) is the floor of this design: going below nftables mode \
         needs IPVS's per-packet work gone for established packets (stage 2). `__memset` is not \
         ours: it is the kernel zeroing each allocation (`CONFIG_INIT_ON_ALLOC_DEFAULT_ON=y` in \
         Debian's kernels), mostly of the endpoints' skbs and sockets, in every datapath and the \
         direct baseline alike (its callers above); at this profile's 1,000 connections it moved \
         by up to 8 µs between two runs of the same code."
    );
    let missed: Vec<String> = GOALS
        .iter()
        .filter_map(|g| {
            let m = r[g.key].as_f64();
            let v = verdict(m, g.target, g.at_least);
            (v != "met").then(|| format!("{} {} ({v})", g.what, f(m)))
        })
        .collect();
    if !missed.is_empty() {
        let _ = writeln!(md, "- Goals missed in this run: {}.", missed.join("; "));
    }
    md.push('\n');
}

// --- chart ----------------------------------------------------------------------------------

/// Grouped bars per run, relative to ipvs mode (text-free; legend in the markdown).
/// The font of the chart's text (Debian's fonts-dejavu-core, which `scripts/bench` installs).
const CHART_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// The chart: per run (kernel and clock) a panel of bars relative to kube-proxy's ipvs mode
/// (= 1.0): short-connection CPS for NodePort and ClusterIP (and with the extra Services, when
/// the run had them), then node-CPU efficiency (ipvs mode's node share per connection divided by
/// the datapath's). Higher is better everywhere; each bar carries its value.
fn chart(path: &PathBuf, summaries: &[(String, String, Value)]) -> Result<()> {
    use plotters::prelude::*;
    use plotters::style::{FontStyle, register_font};

    let font = std::fs::read(CHART_FONT)
        .with_context(|| format!("read {CHART_FONT} (Debian package fonts-dejavu-core)"))?;
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("{CHART_FONT}: not a font"))?;

    // Per panel: its title and its groups (label, one value per datapath).
    type Group = (String, Vec<Option<f64>>);
    let panels: Vec<(String, Vec<Group>)> = summaries
        .iter()
        .map(|(series, clock, s)| {
            let big = service_keys(s, "cps_nodeport")
                .into_iter()
                .find(|k| k != "1");
            let mut groups: Vec<Group> = Vec::new();
            let mut cases = vec![
                ("NodePort CPS".to_string(), "cps_nodeport", "1".to_string()),
                (
                    "ClusterIP CPS".to_string(),
                    "cps_clusterip",
                    "1".to_string(),
                ),
            ];
            if let Some(n) = &big {
                cases.push((
                    format!("NodePort CPS, {n} Services"),
                    "cps_nodeport",
                    n.clone(),
                ));
                cases.push((
                    format!("ClusterIP CPS, {n} Services"),
                    "cps_clusterip",
                    n.clone(),
                ));
            }
            for (label, case, n) in cases {
                let ipvs = num(s, &["cases", case, &n, "ipvs", "rate", "median"]);
                let v = DATAPATHS
                    .iter()
                    .map(|dp| {
                        num(s, &["cases", case, &n, dp, "rate", "median"])
                            .zip(ipvs)
                            .map(|(x, b)| x / b)
                    })
                    .collect();
                groups.push((label, v));
            }
            for (label, case) in [
                ("NodePort node-CPU efficiency", "cps_nodeport"),
                ("ClusterIP node-CPU efficiency", "cps_clusterip"),
            ] {
                let ipvs = num(
                    s,
                    &["cases", case, "1", "ipvs", "node_cpu_us_per_conn", "median"],
                );
                let v = DATAPATHS
                    .iter()
                    .map(|dp| {
                        num(
                            s,
                            &["cases", case, "1", dp, "node_cpu_us_per_conn", "median"],
                        )
                        .zip(ipvs)
                        .and_then(|(x, b)| (x > 0.0).then(|| b / x))
                    })
                    .collect();
                groups.push((label.to_string(), v));
            }
            let title = format!(
                "{series} {}: relative to kube-proxy ipvs mode (= 1.0), higher is better",
                if clock == "icount" {
                    "(QEMU -icount)"
                } else {
                    "(QEMU TCG)"
                }
            );
            (title, groups)
        })
        .collect();

    let (w, ph) = (1400u32, 380u32);
    let root = BitMapBackend::new(path, (w, ph * panels.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE).context("chart")?;
    let colors = [
        RGBColor(128, 128, 128),
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
    ];
    let names = [
        "kube-proxy ipvs mode",
        "kube-proxy nftables mode",
        "kube-ipvs-bpf",
    ];
    let top = panels
        .iter()
        .flat_map(|(_, g)| g.iter().flat_map(|(_, v)| v.iter().flatten().copied()))
        .fold(2.0f64, f64::max)
        .min(4.0)
        * 1.08;
    let text = |size: u32| ("sans-serif", size).into_font().color(&BLACK);
    for (i, (title, groups)) in panels.iter().enumerate() {
        let y0 = i as i32 * ph as i32;
        let (left, right, bottom, height) =
            (70, w as i32 - 20, y0 + ph as i32 - 60, ph as i32 - 120);
        let y = |v: f64| bottom - (v / top * height as f64) as i32;
        root.draw(&Text::new(title.clone(), (left, y0 + 10), text(20)))
            .context("chart")?;
        // Legend, right of the title line.
        for (k, name) in names.iter().enumerate() {
            let x = right - 720 + k as i32 * 240;
            root.draw(&Rectangle::new(
                [(x, y0 + 40), (x + 14, y0 + 54)],
                colors[k].filled(),
            ))
            .context("chart")?;
            root.draw(&Text::new(name.to_string(), (x + 20, y0 + 39), text(15)))
                .context("chart")?;
        }
        // Grid every 0.25 with labels every 0.5, the 1.0 line thick; the y axis's name.
        let mut v = 0.0;
        while v <= top {
            let c = if (v - 1.0).abs() < 1e-9 {
                BLACK.stroke_width(3)
            } else {
                RGBColor(220, 220, 220).stroke_width(1)
            };
            root.draw(&PathElement::new(vec![(left, y(v)), (right, y(v))], c))
                .context("chart")?;
            if ((v * 2.0).round() - v * 2.0).abs() < 1e-9 {
                root.draw(&Text::new(
                    format!("{v:.1}×"),
                    (left - 45, y(v) - 8),
                    text(14),
                ))
                .context("chart")?;
            }
            v += 0.25;
        }
        let gw = (right - left) / groups.len().max(1) as i32;
        let bw = gw * 3 / 4 / 3;
        for (g, (label, values)) in groups.iter().enumerate() {
            let gx = left + g as i32 * gw;
            for (dp, val) in values.iter().enumerate() {
                let Some(val) = val else { continue };
                let x0 = gx + gw / 8 + dp as i32 * bw;
                let x1 = x0 + bw - 4;
                root.draw(&Rectangle::new(
                    [(x0, y(val.min(top))), (x1, bottom)],
                    colors[dp].filled(),
                ))
                .context("chart")?;
                root.draw(&Text::new(
                    format!("{val:.2}"),
                    (x0, y(val.min(top)) - 18),
                    text(13),
                ))
                .context("chart")?;
            }
            root.draw(&Text::new(
                label.clone(),
                (gx + gw / 8, bottom + 10),
                text(15),
            ))
            .context("chart")?;
        }
        // Panel separator.
        root.draw(&PathElement::new(
            vec![(0, y0 + ph as i32 - 1), (w as i32, y0 + ph as i32 - 1)],
            RGBColor(160, 160, 160).stroke_width(2),
        ))
        .context("chart")?;
    }
    root.present().context("write the chart")?;
    Ok(())
}

// --- main -----------------------------------------------------------------------------------

fn run() -> Result<()> {
    let a = args()?;
    if a.json_sections_only {
        let doc: Value = serde_json::from_str(
            &std::fs::read_to_string(&a.json)
                .with_context(|| format!("read {}", a.json.display()))?,
        )
        .with_context(|| format!("parse {}", a.json.display()))?;
        let report = std::fs::read_to_string(&a.md).unwrap_or_default();
        std::fs::write(&a.md, replace_json_sections(&report, &doc))
            .with_context(|| format!("write {}", a.md.display()))?;
        return Ok(());
    }
    let mut runs: Vec<RunDoc> = a.raw.iter().map(RunDoc::load).collect::<Result<_>>()?;
    // 6.12 first, icount before tcg.
    runs.sort_by_key(|r| {
        (
            std::cmp::Reverse(
                r.series
                    .split('.')
                    .map(|x| x.parse::<u32>().unwrap_or(0))
                    .collect::<Vec<_>>(),
            ),
            r.clock != "icount",
        )
    });
    let summaries: Vec<(String, String, Value)> = runs
        .iter()
        .map(|r| (r.series.clone(), r.clock.clone(), summarize(r)))
        .collect();
    let headline = summaries
        .iter()
        .find(|(k, c, _)| k == "6.12" && c == "icount")
        .or_else(|| summaries.first());

    let mut doc: Value = match std::fs::read_to_string(&a.json) {
        Ok(t) => serde_json::from_str(&t).with_context(|| format!("parse {}", a.json.display()))?,
        Err(_) => json!({}),
    };
    if !doc.is_object() {
        doc = json!({});
    }
    let mut datapath = Map::new();
    for (r, (_, clock, s)) in runs.iter().zip(&summaries) {
        let entry = datapath
            .entry(r.key())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .context("datapath entry")?;
        let mut s = s.clone();
        s["ratios"] = headline_ratios(&s);
        entry.insert(clock.clone(), s);
    }
    if let Some((series, clock, s)) = headline {
        doc["ratios"] = headline_ratios(s);
        doc["ratios"]["source"] = json!(format!("kernel {series}, {clock}"));
        doc["conntrack_inserts_per_conn"] = json!(ours_conntrack_per_conn(s));
        let mut tf = Map::new();
        for dp in DATAPATHS {
            tf.insert(
                dp.into(),
                get(s, &["details", dp, "table_full", "failed"]).clone(),
            );
        }
        doc["table_full_failures"] = Value::Object(tf);
        doc["kernel"] = s["kernel"].clone();
    }
    // The commit and date these datapath figures were measured at (other sections keep theirs).
    datapath.insert("commit".into(), json!(a.commit));
    datapath.insert("date".into(), json!(a.date));
    doc["datapath"] = Value::Object(datapath);
    doc["commit"] = json!(a.commit);
    doc["date"] = json!(a.date);

    let md = markdown(&summaries, headline, &doc, &a.date, &a.commit);
    std::fs::write(&a.md, md).with_context(|| format!("write {}", a.md.display()))?;
    chart(&a.png, &summaries)?;
    let mut text = serde_json::to_string_pretty(&doc).context("JSON")?;
    text.push('\n');
    std::fs::write(&a.json, text).with_context(|| format!("write {}", a.json.display()))?;
    eprintln!(
        "bench-report: wrote {}, {}, {}",
        a.md.display(),
        a.png.display(),
        a.json.display()
    );
    if let Some((_, _, s)) = headline {
        println!("{}", serde_json::to_string_pretty(&headline_ratios(s))?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_spreads_and_paired_ratios() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let s = stat(&[90.0, 100.0, 110.0]);
        assert_eq!(s["median"], 100.0);
        assert_eq!(s["spread_pct"], 20.0);
        let a = [(0, 2.0), (1, 3.0), (2, 5.0)];
        let b = [(0, 1.0), (1, 2.0), (3, 9.0)];
        // Rounds 0 and 1 pair up: ratios 2.0 and 1.5.
        assert_eq!(RunDoc::paired_ratio(&a, &b), Some(1.75));
    }

    /// A record of one case: `busy_s` of guest CPU over `ok` connections (1 CPU, no idle), the
    /// conntrack entries of the traffic that is not service traffic (the firewall's).
    fn record(dp: &str, services: u64, case: &str, busy_s: f64, ok: f64) -> Value {
        let ct = if OTHER_CASES.iter().any(|(c, _)| *c == case) {
            1.0
        } else {
            0.0
        };
        json!({
            "round": 0, "datapath": dp, "services": services, "case": case,
            "result": {
                "loadgen": {"ok": ok, "cpu": {"window_s": busy_s, "idle_s": 0.0}},
                "conntrack": {"per_conn": ct},
            },
        })
    }

    #[test]
    fn traffic_that_is_no_service_traffic_is_measured_over_the_firewall_alone() {
        let case = "cps_pod_to_pod";
        let doc = json!({
            "lab_kernel": "6.12", "clock": "icount", "cpus": 1,
            "records": [
                record("direct", 0, case, 0.100, 1000.0),
                record("firewall", 0, case, 0.110, 1000.0),
                record("nftables", 1, case, 0.113, 1000.0),
                record("ours", 1, case, 0.1105, 1000.0),
                record("ours", 1, "cps_nodeport", 0.2, 1000.0),
                record("ours", 10001, "cps_nodeport", 0.2, 1000.0),
            ],
            "details": [{"datapath": "ours", "bpf_stats": {"pod_to_pod": {
                "bpf_ns_per_conn": 1200.0, "bpf_runs_per_conn": 20.0, "programs": {},
            }}}],
        });
        let run = RunDoc {
            doc,
            series: "6.12".into(),
            clock: "icount".into(),
            cpus: 1.0,
        };
        let s = summarize(&run);
        let c = &s["cases"][case]["1"];
        // Node shares: firewall 10 µs, nftables 13, ours 10.5 over the direct baseline's 100.
        assert_eq!(c["firewall"]["node_cpu_us_per_conn"]["median"], 10.0);
        assert_eq!(c["ratios"]["ours_minus_firewall_us"], 0.5);
        assert_eq!(c["ratios"]["nftables_minus_firewall_us"], 3.0);
        // The firewall is no row of the filled case.
        assert!(s["cases"][case]["10001"].is_null(), "{s}");
        // Tracked by the node's firewall, as it should be: no service connection's entry.
        assert_eq!(ours_conntrack_per_conn(&s), Some(0.0));
        let h = headline_ratios(&s);
        assert_eq!(h["pod_to_pod_ours_minus_firewall_us"], 0.5);
        assert_eq!(h["pod_to_pod_ns_per_bpf_run"], 60.0);
        let mut md = String::new();
        other_traffic_table(&mut md, &s);
        assert!(
            md.contains(
                "| pod to a remote pod | 10.00 | – | 13.00 | 10.50 | – | 3.00 | 0.500 | 20.00 | 60.00 |"
            ),
            "{md}"
        );
    }

    #[test]
    fn the_agent_counts_at_its_steady_rate_not_what_a_window_caught() {
        let case = "cps_nodeport";
        let with_agent = |busy_s: f64, agent_s: f64| {
            let mut r = record("ours", 1, case, busy_s, 1000.0);
            r["result"]["loadgen"]["cpu"]["agent_s"] = json!(agent_s);
            r
        };
        let doc = |ours: Value| {
            json!({
                "lab_kernel": "6.12", "clock": "icount", "cpus": 1,
                "records": [record("direct", 0, case, 0.100, 1000.0), ours],
                // 3 ms of agent CPU a second without traffic.
                "details": [{"datapath": "ours",
                    "idle": {"window_s": 30.0, "busy_s": 0.2, "agent_cpu_s": 0.09}}],
            })
        };
        let share = |ours: Value| {
            let run = RunDoc {
                doc: doc(ours),
                series: "6.12".into(),
                clock: "icount".into(),
                cpus: 1.0,
            };
            run.node_cpu("ours", 1, case)[0].1
        };
        // A 0.2 s window that caught a 12 ms sweep pass, and one that caught nothing: each
        // counts 0.6 ms of agent CPU instead (3 ms/s for 0.2 s), over 1000 connections.
        let caught = share(with_agent(0.2, 0.012));
        let missed = share(with_agent(0.2, 0.0));
        assert!((caught - 88.6).abs() < 1e-9, "{caught}");
        assert!((missed - 100.6).abs() < 1e-9, "{missed}");
        // Without the agent's figures (another datapath, an older document) the window stands.
        assert!((share(record("ours", 1, case, 0.2, 1000.0)) - 100.0).abs() < 1e-9);
        // Its work per connection: 65 ms over a 20 s round, 60 of them its rate without
        // traffic, so 5 ms over the round's 1000 service connections, 5 µs each.
        let mut round = with_agent(0.2, 0.0);
        round["agent_round"] = json!({"cpu_s": 0.065, "span_s": 20.0});
        let charged = share(round.clone());
        assert!((charged - 105.6).abs() < 1e-9, "{charged}");
        // Measured before the round's cases, its rate without traffic is that round's (1 ms/s
        // here, the idle window after the profiles said 3): 0.2 ms for the window, and 45 of the
        // 65 ms its work, 45 µs a connection.
        round["agent_round"]["idle_cpu_s"] = json!(0.06);
        round["agent_round"]["idle_s"] = json!(60.0);
        let own_rate = share(round.clone());
        assert!((own_rate - 145.2).abs() < 1e-9, "{own_rate}");
        // The probe on IPVS's free ran 5 ms in the kernel over the tail: 5 µs a connection more.
        round["agent_round"]["free_probe"] = json!({"runs": 1000, "run_time_ns": 5_000_000});
        let with_free = share(round);
        assert!((with_free - 150.2).abs() < 1e-9, "{with_free}");
        assert!(is_service_connection_case("lat_clusterip"));
        assert!(!is_service_connection_case("cps_pod_to_pod"));
        assert!(!is_service_connection_case("rr_nodeport"));
    }

    #[test]
    fn verdicts_say_by_how_much() {
        assert_eq!(verdict(Some(1.8), 1.7, true), "met");
        assert_eq!(verdict(Some(0.85), 1.7, true), "missed by 50%");
        assert_eq!(verdict(Some(0.9), 0.6, false), "missed by 50%");
        assert_eq!(verdict(Some(0.0), 0.0, false), "met");
        assert_eq!(verdict(None, 1.0, true), "not measured");
    }

    #[test]
    fn profile_symbols_fall_into_their_subsystems() {
        assert_eq!(
            category(
                "bpf_prog_3ac866ed5826ab52_tc_egress",
                "[kernel.kallsyms]",
                true
            ),
            "BPF programs (JIT code)"
        );
        assert_eq!(
            category("htab_map_hash", "[kernel.kallsyms]", true),
            "BPF helpers, maps, TC hook"
        );
        assert_eq!(category("ip_vs_in_hook", "[ip_vs]", true), "IPVS");
        assert_eq!(
            category("tcp_state_transition", "[kernel.kallsyms]", true),
            "IPVS"
        );
        assert_eq!(
            category("<alloc::vec::Vec<T>>::from_iter", "kube-ipvs-bpf", false),
            "the agent (user space)"
        );
        assert_eq!(
            category("nf_conntrack_in", "[nf_conntrack]", true),
            "conntrack and NAT"
        );
        assert_eq!(
            category("nft_do_chain", "[kernel.kallsyms]", true),
            "iptables / nftables rules"
        );
        assert_eq!(
            category("tcp_v4_rcv", "[kernel.kallsyms]", true),
            "rest of the kernel (TCP/IP, veth, scheduler, syscalls)"
        );
        assert_eq!(
            category("0x15354a", "libc.so.6", false),
            "user space (loadgen)"
        );
    }

    #[test]
    fn dates_are_civil() {
        let d = today();
        assert_eq!(d.len(), 10);
        assert!(d.starts_with("20"), "{d}");
    }

    #[test]
    fn json_sections_replace_the_sections_made_from_the_json_and_keep_the_datapath() {
        let doc = json!({
            "bpf": {"fast_path_ns": 62.0, "floor_ns": 26.0, "method": "m", "rewrite": "r"},
            "bpf_detail": {"kernel": "k", "bpf_own": {"fast_path_ns": 36.0}},
            "ipvs": {"kernel_6_12": {"create_total_s": 14.8}},
            "sync": {"kernel_6_12": {"first_sync_ms": 17659.5}},
        });
        let report = "# B\n\n## Datapath: x\n\nkeep\n\n## eBPF datapath micro-benchmarks (x)\n\n\
                      old\n\n## IPVS library\n\nold ipvs\n\n## Agent sync (x)\n\nold sync\n";
        let out = replace_json_sections(report, &doc);
        assert!(
            out.starts_with("# B\n\n## Datapath: x\n\nkeep\n\n## eBPF datapath micro-benchmarks"),
            "{out}"
        );
        assert!(out.contains("| `fast_path_ns` | 62.00 | 36.00 |"), "{out}");
        assert!(
            out.contains("`fast_path_ns` ≤ 50: 62.00 (missed)")
                && out.contains("`first_packet_ns` ≤ 300: not measured"),
            "{out}"
        );
        assert!(
            out.contains("- `ipvs.kernel_6_12`: create_total_s 14.8"),
            "{out}"
        );
        assert!(
            out.contains("- `sync.kernel_6_12`: first_sync_ms 17660"),
            "{out}"
        );
        assert!(
            !out.contains("old ipvs")
                && !out.contains("old sync")
                && !out.contains("\n\nold\n")
                && !out.contains("floor_ns`"),
            "{out}"
        );
        // A report without those sections gets them appended.
        let out = replace_json_sections("# B\n\n## Datapath: x\n", &doc);
        assert!(out.starts_with("# B\n\n## Datapath: x\n\n## eBPF"), "{out}");
    }
}
