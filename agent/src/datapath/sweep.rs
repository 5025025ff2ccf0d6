//! Expiry of datapath entries. The programs never delete: the agent sweeps `snat_fwd` (with
//! its `snat_rev` twin) and `conns` from their own state, with IPVS-like timeouts measured from
//! the last packet seen in either direction.

use std::time::Duration;

use probes::DatapathMaps;
use probes::maps::{L4Proto, STATE_FIN, STATE_REPLY, STATE_RST, SnatEntry, Tuple};

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
pub fn expired(
    key: &Tuple,
    fwd: &SnatEntry,
    rev: Option<&SnatEntry>,
    now_ns: u64,
    t: &Timeouts,
) -> bool {
    let state = fwd.state | rev.map_or(0, |r| r.state);
    let last = fwd.last_seen_ns.max(rev.map_or(0, |r| r.last_seen_ns));
    let idle = Duration::from_nanos(now_ns.saturating_sub(last));
    idle >= timeout_for(key.proto, state, t).max(MIN_IDLE_TIMEOUT)
}

/// The `snat_rev` key of a forward entry: the reply, from the backend to the node address.
pub fn reverse_key(fwd_key: &Tuple, fwd: &SnatEntry) -> Tuple {
    Tuple {
        saddr: fwd_key.daddr,
        daddr: fwd.addr,
        sport: fwd_key.dport,
        dport: fwd.port,
        proto: fwd_key.proto,
        pad: [0; 3],
    }
}

/// CLOCK_MONOTONIC in nanoseconds (the programs' `bpf_ktime_get_ns` / coarse clock base).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SweepReport {
    pub snat_expired: usize,
    pub snat_live: usize,
    pub conns_expired: usize,
}

/// Removes expired entries: the forward entry first (no new packet is translated by it), then
/// its reverse twin (the port becomes free).
pub fn sweep(maps: &DatapathMaps, now_ns: u64, t: &Timeouts) -> probes::Result<SweepReport> {
    let mut report = SweepReport::default();
    for (key, fwd) in maps.snat_fwd.entries()? {
        let rkey = reverse_key(&key, &fwd);
        let rev = maps.snat_rev.get(&rkey)?;
        if expired(&key, &fwd, rev.as_ref(), now_ns, t) {
            maps.snat_fwd.delete(&key)?;
            maps.snat_rev.delete(&rkey)?;
            report.snat_expired += 1;
        } else {
            report.snat_live += 1;
        }
    }
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
    use probes::maps::STATE_SYN;

    fn entry(state: u8, last: u64) -> SnatEntry {
        SnatEntry {
            state,
            last_seen_ns: last,
            ..SnatEntry::default()
        }
    }

    fn key(proto: L4Proto) -> Tuple {
        Tuple::new(
            "10.0.0.1".parse().unwrap(),
            40000,
            "10.244.0.2".parse().unwrap(),
            80,
            proto,
        )
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn tcp_timeouts_follow_the_state_of_both_directions() {
        let t = Timeouts::default();
        let k = key(L4Proto::Tcp);
        // SYN only: 60 s.
        assert!(!expired(&k, &entry(STATE_SYN, 0), None, 59 * S, &t));
        assert!(expired(&k, &entry(STATE_SYN, 0), None, 60 * S, &t));
        // Answered: 900 s from the later direction.
        let rev = entry(STATE_REPLY, 100 * S);
        assert!(!expired(&k, &entry(STATE_SYN, 0), Some(&rev), 999 * S, &t));
        assert!(expired(&k, &entry(STATE_SYN, 0), Some(&rev), 1000 * S, &t));
        // FIN from either side: 120 s; RST: 10 s.
        assert!(expired(
            &k,
            &entry(STATE_SYN | STATE_FIN, 0),
            Some(&entry(STATE_REPLY, 0)),
            120 * S,
            &t
        ));
        assert!(!expired(
            &k,
            &entry(STATE_SYN, 0),
            Some(&entry(STATE_REPLY | STATE_RST, 0)),
            9 * S,
            &t
        ));
        assert!(expired(
            &k,
            &entry(STATE_SYN, 0),
            Some(&entry(STATE_REPLY | STATE_RST, 0)),
            10 * S,
            &t
        ));
    }

    #[test]
    fn no_connection_expires_before_the_flow_cache_lifetime() {
        let t = Timeouts {
            tcp_rst: Duration::from_secs(1),
            udp: Duration::from_secs(2),
            ..Timeouts::default()
        };
        let rst = Some(entry(STATE_REPLY | STATE_RST, 0));
        assert!(!expired(
            &key(L4Proto::Tcp),
            &entry(STATE_SYN, 0),
            rst.as_ref(),
            4 * S,
            &t
        ));
        assert!(expired(
            &key(L4Proto::Tcp),
            &entry(STATE_SYN, 0),
            rst.as_ref(),
            5 * S,
            &t
        ));
        assert!(!expired(&key(L4Proto::Udp), &entry(0, 0), None, 4 * S, &t));
        assert!(expired(&key(L4Proto::Udp), &entry(0, 0), None, 5 * S, &t));
        assert!(
            MIN_IDLE_TIMEOUT.as_millis()
                > u128::from(probes::maps::FLOW_CACHE_TTL_JIFFIES) * 10 + 1000,
            "the TTL at HZ=100 plus the last-seen resolution"
        );
    }

    #[test]
    fn udp_times_out_after_300_idle_seconds() {
        let t = Timeouts::default();
        let k = key(L4Proto::Udp);
        assert!(!expired(&k, &entry(0, 10 * S), None, 309 * S, &t));
        assert!(expired(&k, &entry(0, 10 * S), None, 310 * S, &t));
    }

    #[test]
    fn reverse_key_is_the_reply_to_the_node_address() {
        let k = key(L4Proto::Tcp);
        let node: std::net::IpAddr = "192.168.0.1".parse().unwrap();
        let port = Tuple::new(node, 1234, node, 0, L4Proto::Tcp).sport;
        let fwd = SnatEntry {
            addr: probes::maps::addr_to_bytes(node),
            port,
            ..Default::default()
        };
        let r = reverse_key(&k, &fwd);
        assert_eq!(
            r.source(),
            "10.244.0.2".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(
            r.destination(),
            "192.168.0.1".parse::<std::net::IpAddr>().unwrap()
        );
        assert_eq!(r.sport, k.dport);
        assert_eq!(r.dport.get(), 1234);
    }
}
