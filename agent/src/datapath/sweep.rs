//! Expiry and resolution of datapath entries. The programs never delete: the agent sweeps the
//! SNAT table (each record holds both directions of a connection) and `conns` from their own
//! state, with IPVS-like timeouts measured from the last packet seen in either direction. It
//! also resolves each new SNAT record against the IPVS probe's `conns` (its service, and the
//! `probe_hit`/`probe_miss` counters), which the programs leave out of a connection's first
//! packet.

use std::time::Duration;

use probes::DatapathMaps;
use probes::maps::{
    Counter, L4Proto, NatRecord, SNAT_F_PROBE_HIT, SNAT_F_RESOLVED, STATE_FIN, STATE_REPLY,
    STATE_RST, SvcKey, addr_from_bytes,
};

/// Idle timeouts (IPVS's defaults: tcp 900 s, tcpfin 120 s, udp 300 s; a reset connection
/// lingers 10 s as IPVS's CLOSE state, an unanswered SYN 60 s as SYN_RECV).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: Duration,
    pub tcp_fin: Duration,
    pub tcp_rst: Duration,
    pub tcp_syn: Duration,
    pub udp: Duration,
    /// Other protocols (SCTP is not translated; kept for completeness).
    pub other: Duration,
    /// `conns` entries (the probe's record of an IPVS connection) older than this are removed;
    /// the map is an LRU, so this only bounds how long a stale entry can linger.
    pub conn_record: Duration,
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
            conn_record: Duration::from_secs(3 * 3600),
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
    let idle = Duration::from_nanos(now_ns.saturating_sub(record.last_seen_ns()));
    idle >= timeout_for(record.fwd_key.proto, record.state_bits(), t).max(MIN_IDLE_TIMEOUT)
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
}

/// The resolution of a new SNAT record: its service port's id and flags, from the IPVS probe's
/// `conns` entry for its forward tuple (client → backend), if the probe recorded it.
pub fn resolution(maps: &DatapathMaps, record: &NatRecord) -> probes::Result<(u32, u8)> {
    let Some(conn) = maps.conns.get(&record.fwd_key)? else {
        return Ok((0, SNAT_F_RESOLVED));
    };
    let svc_id = match L4Proto::from_number(record.fwd_key.proto) {
        Some(proto) => maps
            .svc_ports
            .get(&SvcKey::new(
                addr_from_bytes(conn.vaddr),
                conn.vport.get(),
                proto,
            ))?
            .map_or(0, |v| v.svc_id),
        None => 0,
    };
    Ok((svc_id, SNAT_F_RESOLVED | SNAT_F_PROBE_HIT))
}

/// One pass: frees the records the previous pass expired, resolves new records, expires idle
/// ones (unindexed now, freed at the next pass: a program that found one just before is done
/// with it by then), and removes old `conns` entries.
pub fn sweep(maps: &DatapathMaps, now_ns: u64, t: &Timeouts) -> probes::Result<SweepReport> {
    let mut report = SweepReport {
        snat_reclaimed: maps.snat.reclaim(),
        ..SweepReport::default()
    };
    for (rec, record) in maps.snat.records() {
        if record.fwd.flags & SNAT_F_RESOLVED == 0 {
            let (svc_id, flags) = resolution(maps, &record)?;
            maps.snat.resolve(rec, svc_id, flags);
            if flags & SNAT_F_PROBE_HIT != 0 {
                report.probe_hits += 1;
            } else {
                report.probe_misses += 1;
            }
        }
        if expired(&record, now_ns, t) {
            if maps.snat.unindex(rec) {
                report.snat_expired += 1;
            }
        } else {
            report.snat_live += 1;
        }
    }
    maps.add_to_counter(Counter::ProbeHit, report.probe_hits as u64)?;
    maps.add_to_counter(Counter::ProbeMiss, report.probe_misses as u64)?;
    for (key, conn) in maps.conns.entries()? {
        if Duration::from_nanos(now_ns.saturating_sub(conn.created_ns)) >= t.conn_record {
            maps.conns.delete(&key)?;
            report.conns_expired += 1;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use probes::maps::{STATE_SYN, SnatEntry, Tuple};

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
}
