//! Taking a node over from a running kube-proxy (docs/switching.md, "Order of the takeover"):
//! while another process holds kube-proxy's healthz or metrics port, kube-proxy is taken to be
//! running, and the agent changes nothing on the node (a running kube-proxy rewrites its chains
//! on every sync and may set `vs.conntrack` back). This module owns that wait, which
//! connections kube-proxy left tracked stay its own until they end ([`old_flow_tuples`]), and
//! the removal of kube-proxy's chains, ipsets and nf_tables tables once the agent serves the
//! node ([`remove_kube_proxy_state`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use probes::maps::{L4Proto, Tuple};

use crate::conntrack::{CtEntry, CtTuple};

/// TCP states (`TCP_CONNTRACK_*`) of a connection still open: SYN_SENT (1) to LAST_ACK (6).
/// TIME_WAIT (7) and CLOSE (8) have ended; their tuples may be reused by new connections.
const TCP_OPEN_STATES: std::ops::RangeInclusive<u8> = 1..=6;

fn tuple_of(t: &CtTuple) -> Option<Tuple> {
    let proto = L4Proto::from_number(t.proto)?;
    Some(Tuple::new(t.src, t.sport, t.dst, t.dport, proto))
}

/// The `switch_flows` keys of the service connections among `entries` (docs/switching.md): for
/// each entry whose original destination is a service port (`is_service_port(address,
/// protocol, port)`) and that is still open, the four tuples under which the datapath meets its
/// packets: the original and reply tuples and both reversed.
pub fn old_flow_tuples(
    entries: &[CtEntry],
    is_service_port: impl Fn(IpAddr, u8, u16) -> bool,
) -> HashMap<Tuple, u32> {
    entries
        .iter()
        .filter(|e| is_service_port(e.orig.dst, e.orig.proto, e.orig.dport))
        .flat_map(open_flow_tuples)
        .collect()
}

/// The four tuples of `entry` with its conntrack id, if the connection is still open (TCP:
/// SYN_SENT to LAST_ACK; other protocols: while the entry exists).
pub fn open_flow_tuples(entry: &CtEntry) -> Vec<(Tuple, u32)> {
    if entry.orig.proto == 6
        && !entry
            .tcp_state
            .is_some_and(|s| TCP_OPEN_STATES.contains(&s))
    {
        return Vec::new();
    }
    [
        entry.orig,
        entry.orig.reversed(),
        entry.reply,
        entry.reply.reversed(),
    ]
    .iter()
    .filter_map(tuple_of)
    .map(|t| (t, entry.id))
    .collect()
}

/// Step 4 of the takeover (docs/switching.md): removes what `cleanup --kube-proxy --keep-ipvs`
/// removes (kube-proxy's iptables chains and the jumps to them, its ipsets, its nf_tables
/// tables), never IPVS services or `kube-ipvs0`, which the agent adopted in place. Called once
/// the agent serves the node (after its first sync: kube-proxy gone, the agent's rules written,
/// its programs attached). The old connections need none of it: their NAT lives in their
/// conntrack entries, and the switch window's filter accept stands in for `KUBE-FORWARD`.
/// What was removed is logged once, at info; a node with nothing of kube-proxy's logs nothing.
/// Returns whether every step succeeded (a failed one is logged; the sync loop tries again at
/// its next full resync).
pub async fn remove_kube_proxy_state(
    node_port_range: std::ops::RangeInclusive<u16>,
    ipvs_exclude_cidrs: Vec<ipnet::IpNet>,
) -> bool {
    let opts = crate::cleanup::CleanupOptions {
        keep_ipvs: true,
        node_port_range,
        ipvs_exclude_cidrs,
        ..crate::cleanup::CleanupOptions::default()
    };
    let report = match crate::cleanup::cleanup_kube_proxy(&opts).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("removing kube-proxy's chains and ipsets: {e}");
            return false;
        }
    };
    if !report.removed.is_empty() {
        let count = |kind: &str| report.removed.iter().filter(|r| r.kind == kind).count();
        tracing::info!(
            iptables_chains = count("iptables chain"),
            iptables_rules = count("iptables rule"),
            ipsets = count("ipset"),
            nft_tables = count("nft table"),
            removed = %report
                .removed
                .iter()
                .map(|r| format!("{} {}", r.kind, r.name))
                .collect::<Vec<_>>()
                .join(", "),
            "removed kube-proxy's chains and ipsets (IPVS services and kube-ipvs0 adopted in place)"
        );
    }
    for e in &report.errors {
        tracing::warn!("removing kube-proxy's chains and ipsets: {e}");
    }
    report.is_ok()
}

/// How often the ports are tried.
pub const RETRY_PERIOD: Duration = Duration::from_secs(1);
/// How often the wait is logged.
pub const LOG_PERIOD: Duration = Duration::from_secs(30);

/// Whether another process listens on `address` (binding it fails with `EADDRINUSE`). Any
/// other failure (an address this node does not have, no permission) is not taken as a sign of
/// kube-proxy.
pub fn held_by_another_process(address: SocketAddr) -> bool {
    match std::net::TcpListener::bind(address) {
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::AddrInUse,
    }
}

/// The addresses of `addresses` another process holds.
pub fn held(addresses: &[SocketAddr]) -> Vec<SocketAddr> {
    addresses
        .iter()
        .copied()
        .filter(|a| held_by_another_process(*a))
        .collect()
}

/// Waits until no other process holds any of `addresses` (kube-proxy's healthz and metrics
/// ports, as this agent is configured to serve them), logging the wait. Returns `false` when
/// `shutdown` fired first.
pub async fn wait_for_kube_proxy(
    addresses: &[SocketAddr],
    shutdown: impl std::future::Future<Output = ()>,
) -> bool {
    let mut busy = held(addresses);
    if busy.is_empty() {
        return true;
    }
    tokio::pin!(shutdown);
    let mut waited = Duration::ZERO;
    let mut logged_at: Option<Duration> = None;
    loop {
        if logged_at.is_none_or(|t| waited - t >= LOG_PERIOD) {
            let list: Vec<String> = busy.iter().map(ToString::to_string).collect();
            tracing::warn!(
                held = %list.join(", "),
                waited_s = waited.as_secs(),
                "waiting for kube-proxy to stop: another process holds its ports; this agent changes nothing on the node until they are free"
            );
            logged_at = Some(waited);
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_PERIOD) => {}
            _ = &mut shutdown => return false,
        }
        waited += RETRY_PERIOD;
        busy = held(addresses);
        if busy.is_empty() {
            tracing::info!(
                waited_s = waited.as_secs(),
                "kube-proxy's ports are free: taking the node over"
            );
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::TCP_CONNTRACK_ESTABLISHED;

    fn ct(src: &str, dst: &str, proto: u8) -> CtTuple {
        let (s, d): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        CtTuple {
            src: s.ip(),
            dst: d.ip(),
            proto,
            sport: s.port(),
            dport: d.port(),
        }
    }

    #[test]
    fn an_open_service_connection_gives_its_four_tuples_and_others_none() {
        // A NodePort connection kube-proxy masqueraded (client -> node:30080, reply from the
        // backend to the node's port 21530), a closed one, and one to no service.
        let nodeport = CtEntry {
            id: 1,
            orig: ct("192.0.2.7:40000", "10.0.0.1:30080", 6),
            reply: ct("10.244.1.2:8080", "10.0.0.1:21530", 6),
            status: 0,
            tcp_state: Some(TCP_CONNTRACK_ESTABLISHED),
        };
        let closed = CtEntry {
            id: 2,
            orig: ct("192.0.2.8:40000", "10.0.0.1:30080", 6),
            reply: ct("10.244.1.2:8080", "10.0.0.1:21531", 6),
            status: 0,
            tcp_state: Some(7),
        };
        let other = CtEntry {
            id: 3,
            orig: ct("10.0.0.1:5000", "203.0.113.9:443", 6),
            reply: ct("203.0.113.9:443", "10.0.0.1:5000", 6),
            status: 0,
            tcp_state: Some(TCP_CONNTRACK_ESTABLISHED),
        };
        let udp = CtEntry {
            id: 4,
            orig: ct("10.244.1.5:5353", "10.96.0.10:53", 17),
            reply: ct("10.244.2.2:53", "10.244.1.5:5353", 17),
            status: 0,
            tcp_state: None,
        };
        let service = |a: IpAddr, proto: u8, port: u16| {
            (a == "10.0.0.1".parse::<IpAddr>().unwrap() && proto == 6 && port == 30080)
                || (a == "10.96.0.10".parse::<IpAddr>().unwrap() && proto == 17 && port == 53)
        };
        let got = old_flow_tuples(&[nodeport.clone(), closed, other, udp.clone()], service);
        let want: HashMap<Tuple, u32> = [nodeport, udp]
            .iter()
            .flat_map(|e| {
                [e.orig, e.orig.reversed(), e.reply, e.reply.reversed()].map(|t| (t, e.id))
            })
            .filter_map(|(t, id)| tuple_of(&t).map(|t| (t, id)))
            .collect();
        assert_eq!(got, want);
        assert_eq!(got.len(), 8);
        // The request as TC egress sees it after kube-proxy's masquerade: node:21530 -> backend.
        assert!(got.contains_key(&Tuple::new(
            "10.0.0.1".parse().unwrap(),
            21530,
            "10.244.1.2".parse().unwrap(),
            8080,
            probes::maps::L4Proto::Tcp
        )));
    }

    #[tokio::test]
    async fn the_wait_lasts_while_another_socket_holds_the_port_and_ends_when_it_closes() {
        let kube_proxy = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let address = kube_proxy.local_addr().expect("address");
        assert!(held_by_another_process(address));
        assert_eq!(held(&[address]), vec![address]);
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let holder = tokio::spawn(async move {
            let _ = released.await;
            drop(kube_proxy);
        });
        let waiting =
            tokio::spawn(
                async move { wait_for_kube_proxy(&[address], std::future::pending()).await },
            );
        // Two retry periods with the port held: still waiting.
        tokio::time::sleep(RETRY_PERIOD * 2).await;
        assert!(!waiting.is_finished(), "returned while the port was held");
        let _ = release.send(());
        holder.await.expect("holder");
        assert!(
            waiting.await.expect("wait"),
            "ended by the port, not shutdown"
        );
        assert!(!held_by_another_process(address));
    }

    #[tokio::test]
    async fn a_free_port_means_no_wait_and_shutdown_ends_a_wait() {
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("listen")
            .local_addr()
            .expect("address");
        assert!(wait_for_kube_proxy(&[free], std::future::pending()).await);
        let kube_proxy = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let held_address = kube_proxy.local_addr().expect("address");
        assert!(!wait_for_kube_proxy(&[held_address], async {}).await);
    }
}
