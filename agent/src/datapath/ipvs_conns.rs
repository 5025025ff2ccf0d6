//! IPVS's own connection table, read from `/proc/net/ip_vs_conn` (IPVS's generic netlink has no
//! connection dump): which connections IPVS holds, in which state. The drain for a rollback
//! ([`super::drain`]) waits on it for the agent's connections to end, and the sweeper
//! ([`super::sweep`]) keeps the `conns` entry of an untranslated connection while IPVS holds it.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context;

use probes::maps::{L4Proto, Tuple};

/// Where the kernel lists the connections of the reading thread's network namespace.
pub const PROC_IP_VS_CONN: &str = "/proc/net/ip_vs_conn";

/// One IPVS connection of `/proc/net/ip_vs_conn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpvsConn {
    /// Client -> virtual service, as the agent keys it in `switch_flows`.
    pub client_to_service: Tuple,
    /// Client -> destination (backend), as the probe keys it in `conns`.
    pub client_to_backend: Tuple,
    /// IPVS's state name (`ESTABLISHED`, `FIN_WAIT`, `TIME_WAIT`, `UDP`, …).
    pub state: &'static str,
}

impl IpvsConn {
    /// Whether the connection can still carry data: IPVS holds it in another state than
    /// `TIME_WAIT` or `CLOSE` (both sides closed, or reset).
    pub fn open(&self) -> bool {
        !matches!(self.state, "TIME_WAIT" | "CLOSE")
    }
}

/// IPVS's state names (TCP's, UDP's, SCTP's), so a parsed state is one of them.
const STATE_NAMES: &[&str] = &[
    "NONE",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "SYNACK",
    "UDP",
    "INIT",
    "COOKIE_WAIT",
    "COOKIE_ECHOED",
    "SHUTDOWN_SENT",
    "SHUTDOWN_RECEIVED",
    "SHUTDOWN_ACK_SENT",
    "REJECTED",
    "ERR",
];

/// The connections of `/proc/net/ip_vs_conn`'s text (the kernel's `ip_vs_conn_seq_show`:
/// `Pro FromIP FPrt ToIP TPrt DestIP DPrt State Expires …`, IPv4 addresses and ports in hex,
/// IPv6 addresses written out in full, an IPv6 destination in brackets). Persistence templates
/// (client port 0) and lines that do not parse are left out.
pub fn parse(text: &str) -> Vec<IpvsConn> {
    text.lines().skip(1).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<IpvsConn> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 8 {
        return None;
    }
    let proto = match f[0] {
        "TCP" => L4Proto::Tcp,
        "UDP" => L4Proto::Udp,
        "SCTP" => L4Proto::Sctp,
        _ => return None,
    };
    let addr = |s: &str| -> Option<IpAddr> {
        let s = s.trim_start_matches('[').trim_end_matches(']');
        if s.contains(':') {
            s.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
        } else {
            u32::from_str_radix(s, 16)
                .ok()
                .map(|a| IpAddr::V4(Ipv4Addr::from(a)))
        }
    };
    let port = |s: &str| u16::from_str_radix(s, 16).ok();
    let (client, cport) = (addr(f[1])?, port(f[2])?);
    let (service, vport) = (addr(f[3])?, port(f[4])?);
    let (backend, dport) = (addr(f[5])?, port(f[6])?);
    if cport == 0 {
        return None;
    }
    let state = STATE_NAMES.iter().copied().find(|s| *s == f[7])?;
    Some(IpvsConn {
        client_to_service: Tuple::new(client, cport, service, vport, proto),
        client_to_backend: Tuple::new(client, cport, backend, dport, proto),
        state,
    })
}

/// IPVS's connections in the calling thread's network namespace.
pub fn read() -> anyhow::Result<Vec<IpvsConn>> {
    let text = std::fs::read_to_string(PROC_IP_VS_CONN)
        .with_context(|| format!("reading {PROC_IP_VS_CONN}"))?;
    Ok(parse(&text))
}

/// Every connection IPVS holds (in any state), by client -> backend tuple; `None` when the table
/// cannot be read (IPVS not loaded: it then holds none).
pub fn held_by_backend() -> Option<HashSet<Tuple>> {
    read()
        .ok()
        .map(|conns| conns.into_iter().map(|c| c.client_to_backend).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_vs_conn_lines_give_both_tuples_and_the_state() {
        // As 6.12's ip_vs_conn_seq_show prints them (header, IPv4 TCP, UDP, a template, IPv6).
        let text = "\
Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData
TCP 0A000102 9C40 0A600029 0050 0A000202 1F90 ESTABLISHED     899
UDP 0A000102 14E9 0A60000A 0035 0A000203 0035 UDP             299
TCP 0A000102 0000 0A600029 0050 0A000202 1F90 NONE            179
TCP 0A000103 9C41 0A600029 0050 0A000202 1F90 TIME_WAIT       119
TCP fd00:0000:0000:0000:0000:0000:0000:0002 9C42 fd00:0000:0000:0000:0000:0000:0000:0029 0050 [fd00:0000:0000:0000:0000:0000:0000:0003] 1F90 FIN_WAIT        119
garbage
";
        let conns = parse(text);
        let t = |a: &str, ap: u16, b: &str, bp: u16, p| {
            Tuple::new(a.parse().unwrap(), ap, b.parse().unwrap(), bp, p)
        };
        let tcp = L4Proto::Tcp;
        assert_eq!(
            conns,
            vec![
                IpvsConn {
                    client_to_service: t("10.0.1.2", 40000, "10.96.0.41", 80, tcp),
                    client_to_backend: t("10.0.1.2", 40000, "10.0.2.2", 8080, tcp),
                    state: "ESTABLISHED",
                },
                IpvsConn {
                    client_to_service: t("10.0.1.2", 5353, "10.96.0.10", 53, L4Proto::Udp),
                    client_to_backend: t("10.0.1.2", 5353, "10.0.2.3", 53, L4Proto::Udp),
                    state: "UDP",
                },
                IpvsConn {
                    client_to_service: t("10.0.1.3", 40001, "10.96.0.41", 80, tcp),
                    client_to_backend: t("10.0.1.3", 40001, "10.0.2.2", 8080, tcp),
                    state: "TIME_WAIT",
                },
                IpvsConn {
                    client_to_service: t("fd00::2", 40002, "fd00::29", 80, tcp),
                    client_to_backend: t("fd00::2", 40002, "fd00::3", 8080, tcp),
                    state: "FIN_WAIT",
                },
            ]
        );
        let open: Vec<bool> = conns.iter().map(IpvsConn::open).collect();
        assert_eq!(open, vec![true, true, false, true]);
    }
}
