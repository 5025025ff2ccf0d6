//! Expiry and resolution of datapath entries, and the sweeper thread that runs them. The
//! programs never delete: the agent sweeps the SNAT table (each record holds both directions of
//! a connection) and `conns` from their own state, with IPVS's timeouts measured from the last
//! packet seen in either direction, and, for an untranslated connection (no packet of it leaves
//! a trace in the maps), from IPVS's own connection table ([`super::ipvs_conns`]). TC egress
//! resolves a new record's service from the IPVS probe's `conns` when it allocates it; the
//! sweeper resolves only records an older program made without it.
//!
//! The [`Sweeper`] is a thread of its own with its own handles on the pinned maps: a pass over
//! full maps takes a while (docs/datapath.md, Expiry), and neither the sync loop nor the health
//! and metrics servers wait for it. Each pass also refreshes the datapath counters in the
//! metrics (drops by reason, map occupancy) and logs drops, at most once a minute per reason,
//! naming the last dropped packet's connection (`drop_last`).

use std::collections::{HashMap, HashSet};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use probes::DatapathMaps;
use probes::maps::{
    ConnValue, Counter, DropEvent, L4Proto, NatRecord, SNAT_F_PROBE_HIT, SNAT_F_RESOLVED,
    STATE_FIN, STATE_REPLY, STATE_RST, SvcKey, Tuple, addr_from_bytes,
};
use probes::nat_protocol::RecordSummary;

use super::ipvs_conns;
use super::tuple_hash::TupleHashing;
use crate::admin::metrics::{DROP_REASONS, Metrics};

/// Idle timeouts (IPVS's: tcp 900 s, tcpfin 120 s, udp 300 s by default, or the kernel's as
/// configured; a reset connection lingers 10 s as IPVS's CLOSE state, an unanswered SYN 60 s as
/// SYN_RECV).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: Duration,
    pub tcp_fin: Duration,
    pub tcp_rst: Duration,
    pub tcp_syn: Duration,
    pub udp: Duration,
    /// Other protocols (SCTP is not translated; its `conns` entries follow this).
    pub other: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp: Duration::from_secs(900),
            tcp_fin: Duration::from_secs(120),
            tcp_rst: Duration::from_secs(10),
            tcp_syn: Duration::from_secs(60),
            udp: Duration::from_secs(300),
            other: Duration::from_secs(900),
        }
    }
}

impl Timeouts {
    /// These timeouts with the kernel's IPVS ones (`ipvsadm --set`; 0 leaves a timeout as it
    /// is): the sweeper then expires what IPVS expires.
    pub fn with_ipvs(self, ipvs: &ipvs::Timeouts) -> Timeouts {
        let secs = |s: u32, old: Duration| {
            if s == 0 {
                old
            } else {
                Duration::from_secs(u64::from(s))
            }
        };
        Timeouts {
            tcp: secs(ipvs.tcp, self.tcp),
            tcp_fin: secs(ipvs.tcp_fin, self.tcp_fin),
            udp: secs(ipvs.udp, self.udp),
            ..self
        }
    }
}

/// No translated connection is removed before it has been idle this long, whatever the
/// configured timeouts say: a program's per-CPU flow cache keeps a translation for up to
/// `FLOW_CACHE_TTL_JIFFIES` (2.56 s at HZ=100) after it last refreshed the entry, and entries'
/// last-seen times have one second of resolution, so an entry removed sooner could outlive
/// itself in a cache.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// The idle timeout of a translated connection whose directions have seen `state` bits.
pub fn timeout_for(proto: u8, state: u8, t: &Timeouts) -> Duration {
    match L4Proto::from_number(proto) {
        Some(L4Proto::Tcp) => {
            if state & STATE_RST != 0 {
                t.tcp_rst
            } else if state & STATE_FIN != 0 {
                t.tcp_fin
            } else if state & STATE_REPLY == 0 {
                t.tcp_syn
            } else {
                t.tcp
            }
        }
        Some(L4Proto::Udp) => t.udp,
        _ => t.other,
    }
}

/// Whether a translated connection has expired at `now_ns` (CLOCK_MONOTONIC): its state is the
/// union of both directions', its last activity the later of the two.
pub fn expired(record: &NatRecord, now_ns: u64, t: &Timeouts) -> bool {
    summary_expired(&RecordSummary::of(record), now_ns, t)
}

/// [`expired`] on a record's summary, which a pass reads of every live record.
pub fn summary_expired(s: &RecordSummary, now_ns: u64, t: &Timeouts) -> bool {
    let idle = Duration::from_nanos(now_ns.saturating_sub(s.last_seen_ns));
    idle >= timeout_for(s.proto, s.state_bits, t).max(MIN_IDLE_TIMEOUT)
}

/// Whether a pass has work with a live record: its connection has expired, or its service is
/// still to resolve (an older program's record). The pass copies only those.
fn has_work(s: &RecordSummary, now_ns: u64, t: &Timeouts) -> bool {
    s.fwd_flags & SNAT_F_RESOLVED == 0 || summary_expired(s, now_ns, t)
}

/// What the SNAT table says of the connection a `conns` entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    /// No SNAT record has its tuple: the connection is not translated (or its record is gone).
    None,
    /// A live record: the connection lives as long as it does.
    Live,
    /// Its record expired in this pass, after being idle since `last_seen_ns`.
    Expired { last_seen_ns: u64 },
}

/// Whether a `conns` entry may have expired at `now_ns`. It follows the IPVS connection it
/// records: while a SNAT record translates the connection, that record's state and last packet
/// say when (the entry goes with it); an untranslated connection's packets leave no trace in any
/// map, so its entry is a candidate once it is older than IPVS's timeout of an established
/// connection of its protocol (tcp, udp), and [`sweep_records`] then asks IPVS's own table
/// whether the connection is still held.
pub fn conn_expired(
    key: &Tuple,
    conn: &ConnValue,
    translation: Translation,
    now_ns: u64,
    t: &Timeouts,
) -> bool {
    match translation {
        Translation::Live => false,
        // The probe rewrites the entry when IPVS makes a new connection with the same tuple: a
        // newer entry is that connection's.
        Translation::Expired { last_seen_ns } if conn.created_ns <= last_seen_ns => true,
        Translation::Expired { .. } | Translation::None => {
            let age = Duration::from_nanos(now_ns.saturating_sub(conn.created_ns));
            age >= timeout_for(key.proto, STATE_REPLY, t).max(MIN_IDLE_TIMEOUT)
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds (the programs' `bpf_ktime_get_ns` / coarse clock base).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SweepReport {
    /// SNAT records expired (unindexed) by this pass.
    pub snat_expired: usize,
    /// SNAT records live after it.
    pub snat_live: usize,
    /// Records expired by the previous pass, freed by this one.
    pub snat_reclaimed: usize,
    /// New SNAT records resolved against `conns`: found there, and not.
    pub probe_hits: usize,
    pub probe_misses: usize,
    /// `conns` entries removed.
    pub conns_expired: usize,
    /// `conns` entries of untranslated connections past their timeout kept because IPVS still
    /// holds the connection (a long-lived one).
    pub conns_held_by_ipvs: usize,
    /// `conns` entries left after it, when it read `conns` in full ([`ConnsRead::Full`]).
    pub conns_live: Option<usize>,
}

/// The resolution of a SNAT record TC egress made without one (an older program's): its
/// service port's id and flags, from the IPVS probe's `conns` entry for its forward tuple
/// (client → backend), if the probe recorded it. What egress does at allocation
/// (docs/datapath.md, TC egress step 3).
pub fn resolution(maps: &DatapathMaps, record: &NatRecord) -> probes::Result<(u32, u8)> {
    let Some(conn) = maps.conns.get(&record.fwd_key)? else {
        return Ok((0, SNAT_F_RESOLVED));
    };
    let svc_id = match L4Proto::from_number(record.fwd_key.proto) {
        Some(proto) => {
            let key = SvcKey::new(addr_from_bytes(conn.vaddr), conn.vport.get(), proto);
            maps.svc_ports.get(&key)?.map_or(0, |v| v.svc_id)
        }
        None => 0,
    };
    Ok((svc_id, SNAT_F_RESOLVED | SNAT_F_PROBE_HIT))
}

/// What a pass reads of `conns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnsRead {
    /// Every entry, in batches: the entries of the records expired since the last full read
    /// ([`ExpiredRecords`]) and of untranslated connections past their timeout are removed (in
    /// batches too), and the pass counts the live ones.
    Full,
    /// None: the forward tuples of the records this pass expires are kept for the next full
    /// read ([`ExpiredRecords`]), no system call per record. On a busy node `conns` holds every
    /// connection of the last 15 minutes (an untranslated one's entry lives as long as IPVS's
    /// established timeout), and reading it all was most of what a pass cost per connection.
    OfExpiredRecords,
}

/// Who removes the `conns` entry of a connection IPVS is done with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnsRemoval {
    /// The probe on IPVS freeing a connection (`ip_vs_conn_rcu_free`), as IPVS frees it: the
    /// sweeper keeps no [`ExpiredRecords`], and its full reads, every
    /// [`CONNS_FULL_READ_PASSES_AFTER_FREE`] passes, only find what that probe could not remove:
    /// entries an older probe wrote (without the connection's identity) and connections freed
    /// while no probe was attached, by age.
    AtIpvsFree,
    /// The sweeper (no probe on IPVS's free attached): a record's entry at the full read after its
    /// expiry ([`ExpiredRecords`]), an untranslated connection's once older than IPVS's
    /// established timeout and no longer in IPVS's table; a full read every
    /// [`CONNS_FULL_READ_PASSES`] passes.
    BySweeper,
}

impl ConnsRemoval {
    /// The passes from one full read of `conns` to the next.
    pub fn full_read_passes(self) -> u64 {
        match self {
            ConnsRemoval::AtIpvsFree => CONNS_FULL_READ_PASSES_AFTER_FREE,
            ConnsRemoval::BySweeper => CONNS_FULL_READ_PASSES,
        }
    }

    /// Which `conns` read pass number `pass` (from 0) of a sweeper makes: a full read on the
    /// first pass and every [`ConnsRemoval::full_read_passes`] after it.
    pub fn read_of_pass(self, pass: u64) -> ConnsRead {
        if pass.is_multiple_of(self.full_read_passes()) {
            ConnsRead::Full
        } else {
            ConnsRead::OfExpiredRecords
        }
    }
}

/// The records expired since the last full read of `conns`, by forward tuple, with their last
/// packet (CLOCK_MONOTONIC ns): their `conns` entries, which that read removes with the others
/// it finds over, unless the probe wrote one after the record's last packet (a new IPVS
/// connection on the same tuple). A sweeper keeps one across its passes; an entry it loses (the
/// agent restarted) is an untranslated connection's to the next agent, removed by age. Under
/// [`ConnsRemoval::AtIpvsFree`] it keeps nothing ([`ExpiredRecords::for_removal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredRecords {
    records: HashMap<Tuple, u64, TupleHashing>,
    /// Whether expired records are kept (the sweeper removes their entries).
    keep: bool,
}

impl Default for ExpiredRecords {
    fn default() -> Self {
        Self::for_removal(ConnsRemoval::BySweeper)
    }
}

impl ExpiredRecords {
    /// Empty, keeping the records a pass expires only if the sweeper removes their entries.
    pub fn for_removal(removal: ConnsRemoval) -> Self {
        ExpiredRecords {
            records: HashMap::default(),
            keep: removal == ConnsRemoval::BySweeper,
        }
    }

    fn insert(&mut self, key: Tuple, last_seen_ns: u64) {
        if self.keep {
            self.records.insert(key, last_seen_ns);
        }
    }

    /// Records waiting for the next full read.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Whether the record of forward tuple `key` is among them.
    pub fn contains(&self, key: &Tuple) -> bool {
        self.records.contains_key(key)
    }
}

/// Under [`ConnsRemoval::BySweeper`], the sweeper reads `conns` in full every this many passes
/// (a minute at the default period of 10 s), the first pass included; the other passes read
/// only what they expire ([`ConnsRead::OfExpiredRecords`]). An untranslated connection's entry
/// goes up to this many periods after its timeout; nothing reads it meanwhile but the replies'
/// lookups, which it marks as IPVS's own table would.
pub const CONNS_FULL_READ_PASSES: u64 = 6;

/// Under [`ConnsRemoval::AtIpvsFree`], the passes from one full read to the next: 15 minutes at
/// the default period, IPVS's established timeout. A full read costs about a microsecond per
/// entry under `-icount` (docs/benchmarks.json `sweep_icount`) and, on a map of 262,144
/// buckets, some 40 ms when empty.
pub const CONNS_FULL_READ_PASSES_AFTER_FREE: u64 = 90;

/// One pass that reads `conns` in full ([`sweep_pass`] with [`ConnsRead::Full`]), as a first
/// pass (no records expired before it).
pub fn sweep(maps: &DatapathMaps, now_ns: u64, t: &Timeouts) -> probes::Result<SweepReport> {
    sweep_pass(
        maps,
        now_ns,
        t,
        ConnsRead::Full,
        &mut ExpiredRecords::default(),
    )
}

/// One pass: frees the records the previous pass expired while it counts the live ones and
/// copies those it has work with (one walk of the records' state words, deciding on six words
/// of each live record: [`has_work`]), resolves the records an older program made without a
/// resolution, expires idle ones (unindexed now, freed at the next pass: a program that found
/// one just before is done with it by then), and removes the `conns` entries whose connection
/// is over ([`conn_expired`]) on a pass with [`ConnsRead::Full`]: every such entry, those of
/// the records expired since the last full read (`expired`, which other passes add to) among
/// them, the old enough ones looked up in the SNAT table.
pub fn sweep_pass(
    maps: &DatapathMaps,
    now_ns: u64,
    t: &Timeouts,
    read: ConnsRead,
    expired: &mut ExpiredRecords,
) -> probes::Result<SweepReport> {
    let (reclaimed, live, records) = maps.snat.reclaim_and_pick(|s| has_work(s, now_ns, t));
    let mut report = sweep_inner(
        maps,
        (live, records),
        now_ns,
        t,
        read,
        expired,
        ipvs_conns::held_by_backend,
    )?;
    report.snat_reclaimed = reclaimed;
    Ok(report)
}

/// [`sweep`] from `records`, the copy of the live records its pass starts from. The programs
/// go on while a pass runs, so an expiry decided on that copy is checked again on the record
/// as it is just before its removal: a SYN that reopened a closed connection since (its RST or
/// FIN timeout no longer applies), or a packet that refreshed it, keeps it.
pub fn sweep_records(
    maps: &DatapathMaps,
    records: Vec<(u32, NatRecord)>,
    now_ns: u64,
    t: &Timeouts,
) -> probes::Result<SweepReport> {
    sweep_with_ipvs(
        maps,
        records,
        now_ns,
        t,
        &mut ExpiredRecords::default(),
        ipvs_conns::held_by_backend,
    )
}

/// [`sweep_records`] with IPVS's connection table (by client -> backend tuple) read by
/// `ipvs_held` — at most once, and only when an untranslated connection's entry is past its
/// timeout; `None` (unreadable) expires such entries by age alone. A full read, after the
/// passes that left `expired`.
pub fn sweep_with_ipvs(
    maps: &DatapathMaps,
    records: Vec<(u32, NatRecord)>,
    now_ns: u64,
    t: &Timeouts,
    expired: &mut ExpiredRecords,
    ipvs_held: impl FnOnce() -> Option<HashSet<Tuple>>,
) -> probes::Result<SweepReport> {
    let reclaimed = maps.snat.reclaim();
    let mut report = sweep_inner(
        maps,
        (records.len(), records),
        now_ns,
        t,
        ConnsRead::Full,
        expired,
        ipvs_held,
    )?;
    report.snat_reclaimed = reclaimed;
    Ok(report)
}

/// A pass after its walk of the records, `(live, records)`: how many are live, and the copies of
/// those it has work with (all of them will do).
fn sweep_inner(
    maps: &DatapathMaps,
    (live, records): (usize, Vec<(u32, NatRecord)>),
    now_ns: u64,
    t: &Timeouts,
    read: ConnsRead,
    since_full_read: &mut ExpiredRecords,
    ipvs_held: impl FnOnce() -> Option<HashSet<Tuple>>,
) -> probes::Result<SweepReport> {
    let mut report = SweepReport::default();
    for (rec, record) in records {
        if record.fwd.flags & SNAT_F_RESOLVED == 0 {
            let (svc_id, flags) = resolution(maps, &record)?;
            maps.snat.resolve(rec, svc_id, flags);
            if flags & SNAT_F_PROBE_HIT != 0 {
                report.probe_hits += 1;
            } else {
                report.probe_misses += 1;
            }
        }
        let removed = expired(&record, now_ns, t)
            && maps.snat.unindex_if(rec, |now| {
                now.fwd_key == record.fwd_key && expired(now, now_ns, t)
            });
        if removed {
            report.snat_expired += 1;
            since_full_read.insert(record.fwd_key, record.last_seen_ns());
        }
    }
    report.snat_live = live.saturating_sub(report.snat_expired);
    if report.probe_hits > 0 {
        maps.add_to_counter(Counter::ProbeHit, report.probe_hits as u64)?;
    }
    if report.probe_misses > 0 {
        maps.add_to_counter(Counter::ProbeMiss, report.probe_misses as u64)?;
    }
    if read == ConnsRead::Full {
        expire_conns(maps, since_full_read, now_ns, t, ipvs_held, &mut report)?;
        since_full_read.records.clear();
    }
    Ok(report)
}

/// The full read's part of a pass: each `conns` entry whose connection is over is removed
/// ([`conn_expired`]; `expired_since`: the records expired since the last full read), in
/// batches, the others counted live.
fn expire_conns(
    maps: &DatapathMaps,
    expired_since: &ExpiredRecords,
    now_ns: u64,
    t: &Timeouts,
    ipvs_held: impl FnOnce() -> Option<HashSet<Tuple>>,
    report: &mut SweepReport,
) -> probes::Result<()> {
    let mut ipvs_held = Some(ipvs_held);
    let mut held: Option<HashSet<Tuple>> = None;
    let conns = maps.conns.entries()?;
    let mut live = 0;
    let mut over = Vec::new();
    for (key, conn) in &conns {
        let translation = match expired_since.records.get(key) {
            Some(&last_seen_ns) => Translation::Expired { last_seen_ns },
            // Younger than any timeout it can have: kept, whatever translates it.
            None if !conn_expired(key, conn, Translation::None, now_ns, t) => Translation::None,
            // A record indexed now and not expired by this pass is live (or new since).
            None => match maps.snat.find(probes::Index::Fwd, key) {
                Some(_) => Translation::Live,
                None => Translation::None,
            },
        };
        let mut expired = conn_expired(key, conn, translation, now_ns, t);
        // An untranslated connection past IPVS's timeout from its creation: over unless IPVS
        // still holds it (its timer restarts with every packet; a long-lived connection's
        // replies must stay marked).
        if expired && translation == Translation::None {
            if let Some(read) = ipvs_held.take() {
                held = read();
            }
            if held.as_ref().is_some_and(|h| h.contains(key)) {
                expired = false;
                report.conns_held_by_ipvs += 1;
            }
        }
        if expired {
            over.push(*key);
        } else {
            live += 1;
        }
    }
    // Deleted by key, as one delete each did: an entry the probe rewrote between the read and
    // here (a new IPVS connection on the tuple within the pass) goes too.
    report.conns_expired = maps.conns.delete_all(&over)?;
    report.conns_live = Some(live);
    Ok(())
}

/// Sweeps `maps` every `period` on a thread of its own, from its start until dropped, and
/// after each pass refreshes `metrics` (sweep duration and failures, map occupancy, the
/// datapath counters) and logs drops.
pub struct Sweeper {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sweeper {
    /// Starts the thread; the first pass runs at once.
    pub fn start(
        maps: DatapathMaps,
        period: Duration,
        timeouts: Timeouts,
        metrics: Metrics,
        removal: ConnsRemoval,
    ) -> std::io::Result<Sweeper> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sweeper".into())
            .spawn(move || {
                let mut drops = DropLog::default();
                let mut expired = ExpiredRecords::for_removal(removal);
                for pass in 0.. {
                    let read = removal.read_of_pass(pass);
                    sweep_once(&maps, &timeouts, &metrics, &mut drops, read, &mut expired);
                    match stopped.recv_timeout(period) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
            })?;
        Ok(Sweeper {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Sweeper {
    /// Stops the thread (after the pass under way, if any).
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One pass of the sweeper (reading `conns` as `read` says), measured, and the metrics it
/// refreshes: the `conns` occupancy only when it read the map in full.
pub fn sweep_once(
    maps: &DatapathMaps,
    t: &Timeouts,
    metrics: &Metrics,
    drops: &mut DropLog,
    read: ConnsRead,
    expired: &mut ExpiredRecords,
) {
    // The switch window's tuples still tracked (0 once closed), for the map gauges.
    let switch_tracked = match super::switch::refresh_from_conntrack(maps, monotonic_ns()) {
        Ok(Some(p)) => {
            if p.closed {
                tracing::info!(
                    removed = p.removed,
                    "node fully switched from kube-proxy: its last connection ended"
                );
            } else if p.removed > 0 {
                tracing::info!(
                    tuples = p.tracked,
                    removed = p.removed,
                    "switch window from kube-proxy: connections ended"
                );
            }
            p.tracked
        }
        Ok(None) => 0,
        Err(e) => {
            tracing::warn!("refreshing the switch window from kube-proxy: {e:#}");
            0
        }
    };
    let started = Instant::now();
    let result = sweep_pass(maps, monotonic_ns(), t, read, expired);
    let took = started.elapsed();
    match result {
        Ok(r) => {
            let mut occupancy = vec![
                ("snat", r.snat_live as u64, u64::from(maps.snat.capacity())),
                (
                    "switch_flows",
                    switch_tracked as u64,
                    u64::from(probes::maps::SWITCH_FLOWS_SIZE),
                ),
            ];
            if let Some(live) = r.conns_live {
                occupancy.push(("conns", live as u64, u64::from(maps.conns.max_entries())));
            }
            metrics.swept(
                took,
                &occupancy,
                &[
                    ("snat", r.snat_expired as u64),
                    ("conns", r.conns_expired as u64),
                ],
            );
            if r.snat_expired + r.conns_expired > 0 {
                tracing::debug!(
                    snat_expired = r.snat_expired,
                    snat_live = r.snat_live,
                    conns_expired = r.conns_expired,
                    conns_live = ?r.conns_live,
                    duration_ms = took.as_secs_f64() * 1e3,
                    "swept"
                );
            }
        }
        Err(e) => {
            metrics.sweep_failed(took);
            tracing::warn!("sweeping the datapath maps: {e}");
        }
    }
    match maps.stats() {
        Ok(stats) => {
            let counters: Vec<(&'static str, u64)> =
                stats.iter().map(|(c, v)| (c.name(), v)).collect();
            metrics.datapath_counters(&counters);
            let last_drops: Vec<(&'static str, DropEvent)> = match maps.last_drops() {
                Ok(last) => last.into_iter().map(|(c, e)| (c.name(), e)).collect(),
                Err(e) => {
                    tracing::debug!("reading the datapath's last drops: {e}");
                    Vec::new()
                }
            };
            drops.observe(&counters, &last_drops, Instant::now());
        }
        Err(e) => tracing::warn!("reading the datapath counters: {e}"),
    }
}

/// How often each drop reason is logged at most.
pub const DROP_LOG_PERIOD: Duration = Duration::from_secs(60);

/// Logs the datapath's drops from its counters, each reason at most once per
/// [`DROP_LOG_PERIOD`] with the packets dropped since it was last logged, and the connection of
/// the last packet dropped for that reason (`drop_last`: the programs record it on the drop
/// path) when it was dropped since the previous line.
#[derive(Debug, Default)]
pub struct DropLog {
    /// Per reason: the counter when last logged (or first seen), when it was logged, and the
    /// time of the last drop event named (CLOCK_MONOTONIC ns).
    last: HashMap<&'static str, (u64, Option<Instant>, u64)>,
}

/// One line [`DropLog::observe`] logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedDrops {
    /// The reason (a [`DROP_REASONS`] counter name).
    pub reason: &'static str,
    /// Packets dropped since the reason was last logged.
    pub dropped: u64,
    /// The connection of the last packet dropped for it, when the programs recorded one since
    /// the previous line.
    pub last: Option<Tuple>,
}

impl DropLog {
    /// Looks at a counter snapshot and the last drop event per reason (`last_drops`, times in
    /// CLOCK_MONOTONIC ns); returns the lines it logged.
    pub fn observe(
        &mut self,
        counters: &[(&'static str, u64)],
        last_drops: &[(&'static str, DropEvent)],
        now: Instant,
    ) -> Vec<LoggedDrops> {
        let mut logged = Vec::new();
        for &(name, value) in counters {
            if !DROP_REASONS.contains(&name) {
                continue;
            }
            let event = last_drops.iter().find(|(r, _)| *r == name).map(|(_, e)| e);
            let Some((base, at, named_ns)) = self.last.get_mut(name) else {
                // The first snapshot is the baseline: drops before this agent are not news.
                self.last
                    .insert(name, (value, None, event.map_or(0, |e| e.time_ns)));
                continue;
            };
            if value < *base {
                *base = 0; // the maps were recreated
            }
            let dropped = value - *base;
            if dropped > 0 && at.is_none_or(|t| now.duration_since(t) >= DROP_LOG_PERIOD) {
                let last = event.filter(|e| e.time_ns > *named_ns).map(|e| e.key);
                match &last {
                    Some(key) => tracing::warn!(
                        reason = name,
                        dropped,
                        total = value,
                        last_connection = %key,
                        "datapath dropped packets"
                    ),
                    None => tracing::warn!(
                        reason = name,
                        dropped,
                        total = value,
                        "datapath dropped packets"
                    ),
                }
                *base = value;
                *at = Some(now);
                if let Some(e) = event {
                    *named_ns = (*named_ns).max(e.time_ns);
                }
                logged.push(LoggedDrops {
                    reason: name,
                    dropped,
                    last,
                });
            }
        }
        logged
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use probes::maps::{STATE_SYN, SnatEntry};

    fn record(proto: L4Proto, fwd: (u8, u64), rev: Option<(u8, u64)>) -> NatRecord {
        let key = Tuple::new(
            "10.0.0.1".parse().unwrap(),
            40000,
            "10.244.0.2".parse().unwrap(),
            80,
            proto,
        );
        NatRecord {
            fwd_key: key,
            rev_key: key.reversed(),
            fwd: SnatEntry {
                state: fwd.0,
                last_seen_ns: fwd.1,
                ..SnatEntry::default()
            },
            rev: rev.map_or(SnatEntry::default(), |(state, last)| SnatEntry {
                state,
                last_seen_ns: last,
                ..SnatEntry::default()
            }),
            ..NatRecord::default()
        }
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn tcp_timeouts_follow_the_state_of_both_directions() {
        let t = Timeouts::default();
        let tcp = L4Proto::Tcp;
        // SYN only: 60 s.
        assert!(!expired(&record(tcp, (STATE_SYN, 0), None), 59 * S, &t));
        assert!(expired(&record(tcp, (STATE_SYN, 0), None), 60 * S, &t));
        // Answered: 900 s from the later direction.
        let answered = record(tcp, (STATE_SYN, 0), Some((STATE_REPLY, 100 * S)));
        assert!(!expired(&answered, 999 * S, &t));
        assert!(expired(&answered, 1000 * S, &t));
        // FIN from either side: 120 s; RST: 10 s.
        let fin = record(tcp, (STATE_SYN | STATE_FIN, 0), Some((STATE_REPLY, 0)));
        assert!(expired(&fin, 120 * S, &t));
        let rst = record(tcp, (STATE_SYN, 0), Some((STATE_REPLY | STATE_RST, 0)));
        assert!(!expired(&rst, 9 * S, &t));
        assert!(expired(&rst, 10 * S, &t));
    }

    #[test]
    fn no_connection_expires_before_the_flow_cache_lifetime() {
        let t = Timeouts {
            tcp_rst: Duration::from_secs(1),
            udp: Duration::from_secs(2),
            ..Timeouts::default()
        };
        let rst = record(
            L4Proto::Tcp,
            (STATE_SYN, 0),
            Some((STATE_REPLY | STATE_RST, 0)),
        );
        assert!(!expired(&rst, 4 * S, &t));
        assert!(expired(&rst, 5 * S, &t));
        assert!(!expired(&record(L4Proto::Udp, (0, 0), None), 4 * S, &t));
        assert!(expired(&record(L4Proto::Udp, (0, 0), None), 5 * S, &t));
        assert!(
            MIN_IDLE_TIMEOUT.as_millis()
                > u128::from(probes::maps::FLOW_CACHE_TTL_JIFFIES) * 10 + 1000,
            "the TTL at HZ=100 plus the last-seen resolution"
        );
    }

    #[test]
    fn udp_times_out_after_300_idle_seconds() {
        let t = Timeouts::default();
        let udp = record(L4Proto::Udp, (0, 10 * S), None);
        assert!(!expired(&udp, 309 * S, &t));
        assert!(expired(&udp, 310 * S, &t));
    }

    fn conn(created_ns: u64) -> ConnValue {
        ConnValue {
            created_ns,
            ..ConnValue::default()
        }
    }

    fn tuple(proto: L4Proto) -> Tuple {
        record(proto, (0, 0), None).fwd_key
    }

    #[test]
    fn conns_entries_follow_their_translation_else_the_ipvs_established_timeout() {
        let t = Timeouts::default();
        let (tcp, udp) = (tuple(L4Proto::Tcp), tuple(L4Proto::Udp));
        // Untranslated: IPVS's established timeout of the protocol, from creation.
        assert!(!conn_expired(
            &tcp,
            &conn(0),
            Translation::None,
            899 * S,
            &t
        ));
        assert!(conn_expired(&tcp, &conn(0), Translation::None, 900 * S, &t));
        assert!(!conn_expired(
            &udp,
            &conn(0),
            Translation::None,
            299 * S,
            &t
        ));
        assert!(conn_expired(&udp, &conn(0), Translation::None, 300 * S, &t));
        // Translated by a live record: kept, however old.
        assert!(!conn_expired(
            &tcp,
            &conn(0),
            Translation::Live,
            100_000 * S,
            &t
        ));
        // Its record expired: goes with it, unless the probe saw a newer connection since.
        let gone = Translation::Expired {
            last_seen_ns: 50 * S,
        };
        assert!(conn_expired(&tcp, &conn(10 * S), gone, 200 * S, &t));
        assert!(!conn_expired(&tcp, &conn(60 * S), gone, 200 * S, &t));
    }

    #[test]
    fn the_kernels_ipvs_timeouts_replace_the_defaults_where_set() {
        let t = Timeouts::default().with_ipvs(&ipvs::Timeouts {
            tcp: 3600,
            tcp_fin: 0,
            udp: 30,
        });
        assert_eq!(t.tcp, Duration::from_secs(3600));
        assert_eq!(t.tcp_fin, Duration::from_secs(120));
        assert_eq!(t.udp, Duration::from_secs(30));
        assert_eq!(t.tcp_rst, Timeouts::default().tcp_rst);
    }

    #[test]
    fn drops_are_logged_per_reason_at_most_once_a_period_with_what_accumulated() {
        let mut log = DropLog::default();
        let t0 = Instant::now();
        let reasons = |logged: Vec<LoggedDrops>| -> Vec<(&'static str, u64)> {
            logged.iter().map(|l| (l.reason, l.dropped)).collect()
        };
        // The first snapshot is the baseline; counters that are not drops are ignored.
        assert!(
            log.observe(&[("map_full", 10), ("snat_alloc", 5)], &[], t0)
                .is_empty()
        );
        assert_eq!(
            reasons(log.observe(&[("map_full", 12), ("snat_alloc", 9)], &[], t0)),
            vec![("map_full", 2)]
        );
        let soon = t0 + Duration::from_secs(10);
        assert!(log.observe(&[("map_full", 15)], &[], soon).is_empty());
        let later = t0 + DROP_LOG_PERIOD;
        assert_eq!(
            reasons(log.observe(&[("map_full", 16)], &[], later)),
            vec![("map_full", 4)]
        );
        // No new drops: nothing logged.
        let much_later = later + DROP_LOG_PERIOD;
        assert!(log.observe(&[("map_full", 16)], &[], much_later).is_empty());
    }

    #[test]
    fn a_drop_line_names_the_last_connection_dropped_since_the_previous_line() {
        let mut log = DropLog::default();
        let t0 = Instant::now();
        let conn = |port: u16, time_ns: u64| DropEvent {
            time_ns,
            key: Tuple::new(
                "10.0.0.1".parse().unwrap(),
                port,
                "10.96.0.10".parse().unwrap(),
                80,
                L4Proto::Tcp,
            ),
        };
        // A drop from before the agent started is the baseline, not named later.
        log.observe(
            &[("port_exhausted", 1)],
            &[("port_exhausted", conn(1000, 5))],
            t0,
        );
        let logged = log.observe(
            &[("port_exhausted", 3)],
            &[("port_exhausted", conn(1000, 5))],
            t0,
        );
        assert_eq!(logged[0].last, None);
        let later = t0 + DROP_LOG_PERIOD;
        let logged = log.observe(
            &[("port_exhausted", 4)],
            &[("port_exhausted", conn(40000, 9))],
            later,
        );
        assert_eq!(logged[0].last, Some(conn(40000, 9).key));
        assert_eq!(
            logged[0].last.unwrap().to_string(),
            "tcp 10.0.0.1:40000 -> 10.96.0.10:80"
        );
    }
}
