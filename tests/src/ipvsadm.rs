//! The kernel's IPVS state as `ipvsadm` reports it: the reference that lab tests compare the
//! `ipvs` library and the agent against. `ipvsadm` talks to the kernel itself, so what it
//! prints is the kernel's view, not ours.

use std::collections::HashMap;
use std::net::IpAddr;

/// Counters from `--stats --exact` (conns, packets, bytes) or `--rate --exact` (per second).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub conns: u64,
    pub inpkts: u64,
    pub outpkts: u64,
    pub inbytes: u64,
    pub outbytes: u64,
}

/// One real server line, merged from every `ipvsadm -Ln` variant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dest {
    pub address: Option<IpAddr>,
    pub port: u16,
    /// "Masq", "Route", "Tunnel" or "Local".
    pub forward: String,
    pub weight: u32,
    pub active: u32,
    pub inactive: u32,
    pub persistent_conns: u32,
    pub upper_threshold: u32,
    pub lower_threshold: u32,
    /// `--tun-info` column, e.g. "gue:6080:-c", or "n/a".
    pub tunnel: String,
    pub stats: Counters,
    pub rates: Counters,
}

/// One virtual service, merged from every `ipvsadm -Ln` variant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Service {
    /// "TCP", "UDP", "SCTP" or "FWM".
    pub proto: String,
    pub address: Option<IpAddr>,
    pub port: u16,
    pub fwmark: Option<u32>,
    /// True for an IPv6 fwmark service.
    pub fwmark_v6: bool,
    pub scheduler: String,
    pub persistent: Option<u32>,
    /// The `mask` shown after `persistent` (dotted for IPv4, a prefix length for IPv6).
    pub netmask: Option<String>,
    pub one_packet: bool,
    pub pe: Option<String>,
    /// Scheduler flags shown in parentheses, e.g. ["mh-fallback", "mh-port"].
    pub sched_flags: Vec<String>,
    pub stats: Counters,
    pub rates: Counters,
    pub destinations: Vec<Dest>,
}

impl Service {
    /// "TCP 10.0.0.1:80", "UDP [fd00::1]:53" or "FWM 100", as ipvsadm names it.
    pub fn key(&self) -> String {
        match self.fwmark {
            Some(m) => format!("FWM {m}"),
            None => format!("{} {}", self.proto, endpoint(self.address, self.port)),
        }
    }

    /// The destination at `address:port`, if the kernel has it.
    pub fn dest(&self, address: IpAddr, port: u16) -> Option<&Dest> {
        self.destinations
            .iter()
            .find(|d| d.address == Some(address) && d.port == port)
    }
}

fn endpoint(a: Option<IpAddr>, port: u16) -> String {
    match a {
        Some(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        Some(IpAddr::V4(v4)) => format!("{v4}:{port}"),
        None => format!("?:{port}"),
    }
}

/// Parses "10.0.0.1:80" or "[fd00::1]:53".
pub fn parse_endpoint(s: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = if let Some(rest) = s.strip_prefix('[') {
        let (a, p) = rest.split_once("]:")?;
        (a, p)
    } else {
        s.rsplit_once(':')?
    };
    Some((addr.parse().ok()?, port.parse().ok()?))
}

fn num<T: std::str::FromStr + Default>(s: Option<&&str>) -> T {
    s.and_then(|v| v.parse().ok()).unwrap_or_default()
}

/// Lines of one `ipvsadm -Ln…` listing, grouped: (service line tokens, dest line tokens).
type Listing = Vec<(Vec<String>, Vec<Vec<String>>)>;

fn split_listing(text: &str) -> Listing {
    let mut out: Listing = Vec::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("IP Virtual Server")
            || t.starts_with("Prot ")
            || t.starts_with("-> RemoteAddress")
        {
            continue;
        }
        if let Some(rest) = t.strip_prefix("-> ") {
            let toks = rest.split_whitespace().map(str::to_string).collect();
            if let Some(last) = out.last_mut() {
                last.1.push(toks);
            }
        } else if !t.is_empty() {
            out.push((
                t.split_whitespace().map(str::to_string).collect(),
                Vec::new(),
            ));
        }
    }
    out
}

fn service_key_of(toks: &[String]) -> String {
    format!(
        "{} {}",
        toks.first().map_or("", |s| s),
        toks.get(1).map_or("", |s| s)
    )
}

/// Parses the plain `ipvsadm -Ln` listing (services with flags, dests with forward/weight/conns).
pub fn parse_list(text: &str) -> Vec<Service> {
    let mut services = Vec::new();
    for (stoks, dtoks) in split_listing(text) {
        let mut s = Service {
            proto: stoks.first().cloned().unwrap_or_default(),
            ..Default::default()
        };
        let mut rest = stoks.iter().skip(2).peekable();
        if s.proto == "FWM" {
            s.fwmark = stoks.get(1).and_then(|m| m.parse().ok());
            if rest.peek().map(|t| t.as_str()) == Some("IPv6") {
                s.fwmark_v6 = true;
                rest.next();
            }
        } else if let Some((a, p)) = stoks.get(1).and_then(|e| parse_endpoint(e)) {
            s.address = Some(a);
            s.port = p;
        }
        s.scheduler = rest.next().cloned().unwrap_or_default();
        while let Some(tok) = rest.next() {
            match tok.as_str() {
                "persistent" => s.persistent = rest.next().and_then(|v| v.parse().ok()),
                "mask" => s.netmask = rest.next().cloned(),
                "ops" => s.one_packet = true,
                "pe" => s.pe = rest.next().cloned(),
                t if t.starts_with('(') => {
                    s.sched_flags = t
                        .trim_matches(|c| c == '(' || c == ')')
                        .split(',')
                        .map(str::to_string)
                        .collect()
                }
                _ => {}
            }
        }
        for d in dtoks {
            let (address, port) = d
                .first()
                .and_then(|e| parse_endpoint(e))
                .map_or((None, 0), |(a, p)| (Some(a), p));
            let v: Vec<&str> = d.iter().map(String::as_str).collect();
            s.destinations.push(Dest {
                address,
                port,
                forward: v.get(1).map_or(String::new(), |f| f.to_string()),
                weight: num(v.get(2)),
                active: num(v.get(3)),
                inactive: num(v.get(4)),
                ..Default::default()
            });
        }
        services.push(s);
    }
    services
}

fn counters(v: &[String], from: usize) -> Counters {
    let n = |i: usize| v.get(from + i).and_then(|x| x.parse().ok()).unwrap_or(0);
    Counters {
        conns: n(0),
        inpkts: n(1),
        outpkts: n(2),
        inbytes: n(3),
        outbytes: n(4),
    }
}

/// Merges a numeric listing (`--stats --exact`, `--rate --exact`, `--thresholds`,
/// `--persistent-conn`, `--tun-info`) into `services`, matching by service and dest key.
fn merge(
    services: &mut [Service],
    text: &str,
    mut apply_s: impl FnMut(&mut Service, &[String]),
    mut apply_d: impl FnMut(&mut Dest, &[String]),
) {
    let index: HashMap<String, usize> = services
        .iter()
        .enumerate()
        .map(|(i, s)| (s.key(), i))
        .collect();
    for (stoks, dtoks) in split_listing(text) {
        let Some(&i) = index.get(&service_key_of(&stoks)) else {
            continue;
        };
        let s = &mut services[i];
        apply_s(s, &stoks);
        for d in dtoks {
            let Some((a, p)) = d.first().and_then(|e| parse_endpoint(e)) else {
                continue;
            };
            if let Some(dest) = s
                .destinations
                .iter_mut()
                .find(|x| x.address == Some(a) && x.port == p)
            {
                apply_d(dest, &d);
            }
        }
    }
}

/// The full view: runs every `ipvsadm -Ln` variant through `run` (which executes a shell
/// command, e.g. inside a namespace, and returns stdout) and merges them.
pub fn view(run: impl Fn(&str) -> String) -> Vec<Service> {
    let mut services = parse_list(&run("ipvsadm -Ln"));
    merge(
        &mut services,
        &run("ipvsadm -Ln --stats --exact"),
        |s, t| s.stats = counters(t, 2),
        |d, t| d.stats = counters(t, 1),
    );
    merge(
        &mut services,
        &run("ipvsadm -Ln --rate --exact"),
        |s, t| s.rates = counters(t, 2),
        |d, t| d.rates = counters(t, 1),
    );
    merge(
        &mut services,
        &run("ipvsadm -Ln --thresholds"),
        |_, _| {},
        |d, t| {
            d.upper_threshold = t.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            d.lower_threshold = t.get(2).and_then(|v| v.parse().ok()).unwrap_or(0);
        },
    );
    merge(
        &mut services,
        &run("ipvsadm -Ln --persistent-conn"),
        |_, _| {},
        |d, t| {
            d.persistent_conns = t.get(2).and_then(|v| v.parse().ok()).unwrap_or(0);
        },
    );
    merge(
        &mut services,
        &run("ipvsadm -Ln --tun-info"),
        |_, _| {},
        |d, t| {
            d.tunnel = t.get(2).cloned().unwrap_or_default();
        },
    );
    services
}

/// `ipvsadm -L --timeout` → (tcp, tcpfin, udp) seconds.
pub fn parse_timeouts(text: &str) -> Option<(u32, u32, u32)> {
    let line = text.lines().find(|l| l.starts_with("Timeout"))?;
    let nums: Vec<u32> = line
        .rsplit_once(':')?
        .1
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    Some((*nums.first()?, *nums.get(1)?, *nums.get(2)?))
}

/// "IP Virtual Server version 1.2.1 (size=4096)" → ("1.2.1", 4096).
pub fn parse_version(text: &str) -> Option<(String, u32)> {
    let line = text
        .lines()
        .find(|l| l.starts_with("IP Virtual Server version"))?;
    let mut it = line.split_whitespace().skip(4);
    let version = it.next()?.to_string();
    let size = it
        .next()?
        .trim_start_matches("(size=")
        .trim_end_matches(')')
        .parse()
        .ok()?;
    Some((version, size))
}

/// One entry of `ipvsadm -Lnc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conn {
    pub proto: String,
    pub state: String,
    pub source: (IpAddr, u16),
    pub virtual_: (IpAddr, u16),
    pub destination: (IpAddr, u16),
}

/// Parses `ipvsadm -Lnc` (connections with endpoints; templates show port 0).
pub fn parse_conns(text: &str) -> Vec<Conn> {
    text.lines()
        .filter_map(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            if t.len() < 6 || t[0] == "pro" {
                return None;
            }
            Some(Conn {
                proto: t[0].to_string(),
                state: t[2].to_string(),
                source: parse_endpoint(t[3])?,
                virtual_: parse_endpoint(t[4])?,
                destination: parse_endpoint(t[5])?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = "IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  10.0.0.1:80 wlc persistent 300 mask 255.255.255.0
  -> 10.1.1.1:8080                Masq    3      0          0         
  -> 10.1.1.2:80                  Tunnel  1      2          5         
SCTP 10.0.0.5:3868 sh (sh-port)
UDP  [fd00::1]:53 mh (mh-fallback,mh-port)
  -> [fd00::2]:5353               Masq    1      0          0         
FWM  100 rr ops
";
    const STATS: &str = "IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port               Conns   InPkts  OutPkts  InBytes OutBytes
  -> RemoteAddress:Port
TCP  10.0.0.1:80                         7        50        40      3000      4000
  -> 10.1.1.1:8080                       7        50        40      3000      4000
  -> 10.1.1.2:80                         0        0        0        0        0
FWM  100                                 1        2        3        4        5
";
    const THRESH: &str = "IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port            Uthreshold Lthreshold ActiveConn InActConn 
  -> RemoteAddress:Port
TCP  10.0.0.1:80 wlc persistent 300 mask 255.255.255.0
  -> 10.1.1.1:8080                100        10         0          0         
";
    const TUN: &str = "Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward TunnelInfo    Weight ActiveConn InActConn
TCP  10.0.0.1:80 wlc persistent 300 mask 255.255.255.0
  -> 10.1.1.2:80                  Tunnel  gue:6080:-c   1      0          0         
";

    #[test]
    fn parses_services_flags_and_dests() {
        let s = parse_list(LIST);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].key(), "TCP 10.0.0.1:80");
        assert_eq!(s[0].scheduler, "wlc");
        assert_eq!(s[0].persistent, Some(300));
        assert_eq!(s[0].netmask.as_deref(), Some("255.255.255.0"));
        assert_eq!(s[0].destinations.len(), 2);
        assert_eq!(s[0].destinations[1].forward, "Tunnel");
        assert_eq!(s[0].destinations[1].active, 2);
        assert_eq!(s[0].destinations[1].inactive, 5);
        assert_eq!(s[1].sched_flags, vec!["sh-port"]);
        assert_eq!(s[2].key(), "UDP [fd00::1]:53");
        assert_eq!(s[2].destinations[0].port, 5353);
        assert_eq!(s[3].fwmark, Some(100));
        assert!(s[3].one_packet);
    }

    #[test]
    fn merges_stats_thresholds_and_tunnel_info() {
        let texts = [
            ("ipvsadm -Ln", LIST),
            ("ipvsadm -Ln --stats --exact", STATS),
            ("ipvsadm -Ln --thresholds", THRESH),
            ("ipvsadm -Ln --tun-info", TUN),
        ];
        let s = view(|cmd| {
            texts
                .iter()
                .find(|(c, _)| *c == cmd)
                .map_or(String::new(), |(_, t)| t.to_string())
        });
        assert_eq!(
            s[0].stats,
            Counters {
                conns: 7,
                inpkts: 50,
                outpkts: 40,
                inbytes: 3000,
                outbytes: 4000
            }
        );
        assert_eq!(s[0].destinations[0].stats.inbytes, 3000);
        assert_eq!(s[0].destinations[0].upper_threshold, 100);
        assert_eq!(s[0].destinations[0].lower_threshold, 10);
        assert_eq!(s[0].destinations[1].tunnel, "gue:6080:-c");
        assert_eq!(s[3].stats.outbytes, 5);
    }

    #[test]
    fn parses_timeouts_version_and_conns() {
        assert_eq!(
            parse_timeouts("Timeout (tcp tcpfin udp): 900 120 300\n"),
            Some((900, 120, 300))
        );
        assert_eq!(parse_version(LIST), Some(("1.2.1".into(), 4096)));
        let c = parse_conns(
            "IPVS connection entries\npro expire state       source             virtual            destination\nTCP 01:57  FIN_WAIT    10.0.0.2:40000     10.0.0.1:80        10.1.1.1:80\n",
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].state, "FIN_WAIT");
        assert_eq!(c[0].source.1, 40000);
    }
}
