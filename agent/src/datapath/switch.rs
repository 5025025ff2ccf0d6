//! The switch window from kube-proxy (docs/switching.md): the connections kube-proxy's conntrack
//! entries hold when the agent takes a node over stay kube-proxy's until they end. This module
//! owns `switch_flows` and the `CFG_F_SWITCH` flag: [`seed`] fills the map from a conntrack dump
//! at start and opens the window; [`refresh`] (each sweep pass while the window is open) prunes
//! the tuples of entries conntrack no longer holds, and closes the window once the map is empty;
//! [`inspect`] is `kube-ipvs-bpf inspect switch` (which also shows a rollback's drain,
//! [`super::drain`]).

use std::collections::HashMap;
use std::net::IpAddr;

use anyhow::Context;

use probes::DatapathMaps;
use probes::maps::{SwitchFlow, Tuple};

use crate::cleanup::nfnetlink::Nfnl;
use crate::conntrack::CtEntry;
use crate::takeover::{old_flow_tuples, open_flow_tuples};

/// What a [`refresh`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SwitchProgress {
    /// Tuples still in `switch_flows` (four per old connection).
    pub tracked: usize,
    /// Tuples removed now (their connection ended).
    pub removed: usize,
    /// Whether this refresh closed the window (the map is empty).
    pub closed: bool,
}

/// Puts `flows` (tuple → conntrack id) in `switch_flows` and opens the window when the map holds
/// any (also when it already did: an agent restarted during the window). Returns how many tuples
/// the map holds. Nothing happens, and the window stays as it is, when the pins have no
/// `switch_flows` (an agent from before it).
pub fn seed(
    maps: &DatapathMaps,
    flows: &HashMap<Tuple, u32>,
    now_ns: u64,
) -> probes::Result<usize> {
    let Some(map) = &maps.switch_flows else {
        return Ok(0);
    };
    for (tuple, &ct_id) in flows {
        map.insert(
            tuple,
            &SwitchFlow {
                ct_id,
                pad: 0,
                seen_ns: now_ns,
            },
        )?;
    }
    let tracked = map.entries()?.len();
    if tracked > 0 {
        maps.set_switch_window(true)?;
    }
    Ok(tracked)
}

/// Removes from `switch_flows` every tuple not in `current` (the open connections' tuples of a
/// conntrack dump taken now), refreshes the others' `seen_ns`, and closes the window when none is
/// left. Never adds a tuple: after the switch, service connections are untracked, so conntrack
/// only holds the old ones.
pub fn refresh(
    maps: &DatapathMaps,
    current: &HashMap<Tuple, u32>,
    now_ns: u64,
) -> probes::Result<SwitchProgress> {
    let Some(map) = &maps.switch_flows else {
        return Ok(SwitchProgress::default());
    };
    let (tracked, removed) = keep_only(map, |t| current.contains_key(t), now_ns)?;
    let mut progress = SwitchProgress {
        tracked,
        removed,
        closed: false,
    };
    if progress.tracked == 0 && maps.switch_window_open()? {
        maps.set_switch_window(false)?;
        progress.closed = true;
    }
    Ok(progress)
}

/// Removes from `switch_flows` (`map`) every tuple whose connection is no longer `open` and
/// refreshes the others' `seen_ns` to `now_ns`. Returns how many it kept and removed.
pub fn keep_only(
    map: &probes::typed_map::TypedMap<Tuple, SwitchFlow>,
    open: impl Fn(&Tuple) -> bool,
    now_ns: u64,
) -> probes::Result<(usize, usize)> {
    let (mut kept, mut removed) = (0, 0);
    for (tuple, flow) in map.entries()? {
        if open(&tuple) {
            map.insert(
                &tuple,
                &SwitchFlow {
                    seen_ns: now_ns,
                    ..flow
                },
            )?;
            kept += 1;
        } else if map.delete(&tuple)? {
            removed += 1;
        }
    }
    Ok((kept, removed))
}

/// Empties `switch_flows` (`map`).
pub fn clear(map: &probes::typed_map::TypedMap<Tuple, SwitchFlow>) -> probes::Result<()> {
    for (tuple, _) in map.entries()? {
        map.delete(&tuple)?;
    }
    Ok(())
}

/// Every open connection's tuples in `entries`, whatever its destination ([`refresh`] only
/// prunes, so a non-service entry's tuples match nothing in the map).
pub fn open_tuples(entries: &[CtEntry]) -> HashMap<Tuple, u32> {
    entries.iter().flat_map(open_flow_tuples).collect()
}

/// Seeds the window at start from the calling thread's conntrack table: the open connections
/// whose original destination is one of `service_ports` (address, IP protocol, port: the IPVS
/// virtual services on the node, which are kube-proxy's at a takeover). Returns the tuples the
/// map holds.
pub fn seed_from_conntrack(
    maps: &DatapathMaps,
    service_ports: &std::collections::HashSet<(IpAddr, u8, u16)>,
    now_ns: u64,
) -> anyhow::Result<usize> {
    let entries = conntrack_dump()?;
    let flows = old_flow_tuples(&entries, |address, proto, port| {
        service_ports.contains(&(address, proto, port))
    });
    seed(maps, &flows, now_ns).context("filling switch_flows")
}

/// One refresh from a conntrack dump taken now, when the window is open (`None` otherwise).
pub fn refresh_from_conntrack(
    maps: &DatapathMaps,
    now_ns: u64,
) -> anyhow::Result<Option<SwitchProgress>> {
    if !maps.switch_window_open()? {
        return Ok(None);
    }
    let entries = conntrack_dump()?;
    refresh(maps, &open_tuples(&entries), now_ns)
        .map(Some)
        .context("pruning switch_flows")
}

/// Every entry of the calling thread's conntrack table, over ctnetlink.
fn conntrack_dump() -> anyhow::Result<Vec<CtEntry>> {
    Nfnl::open()
        .context("opening ctnetlink")?
        .conntrack_entries()
        .context("dumping conntrack")
}

/// One old connection in the switch window, as `inspect switch` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OldConnection {
    /// The conntrack entry's id (`conntrack -L -o id`).
    pub conntrack_id: u32,
    pub protocol: String,
    /// Its tuples in `switch_flows` (the entry's original and reply tuples and both reversed),
    /// sorted.
    pub tuples: Vec<String>,
    /// Seconds since the agent's last conntrack dump that listed it (the sweep period at most
    /// while the agent runs).
    pub seen_seconds_ago: u64,
}

/// The switch window as `inspect switch` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WindowReport {
    /// Whether `CFG_F_SWITCH` is set.
    pub open: bool,
    /// Whether a drain for the rollback to kube-proxy is under way (`switch_flows` then holds the
    /// agent's connections, one client -> service tuple each, conntrack id 0).
    pub draining: bool,
    /// Old connections (conntrack entries) still in `switch_flows`.
    pub connections: usize,
    /// Their tuples (four each).
    pub tuples: usize,
    pub old_connections: Vec<OldConnection>,
}

/// The window's report from the flags and `switch_flows`' entries, at `now_ns`: grouped by
/// conntrack entry (a takeover's four tuples each), or one per tuple while `draining`.
pub fn window_report(
    open: bool,
    draining: bool,
    entries: &[(Tuple, SwitchFlow)],
    now_ns: u64,
) -> WindowReport {
    let mut by_id: std::collections::BTreeMap<(u32, usize), OldConnection> = Default::default();
    for (i, (tuple, flow)) in entries.iter().enumerate() {
        let key = (flow.ct_id, if draining { i } else { 0 });
        let c = by_id.entry(key).or_insert_with(|| OldConnection {
            conntrack_id: flow.ct_id,
            protocol: tuple.protocol_name(),
            tuples: Vec::new(),
            seen_seconds_ago: u64::MAX,
        });
        c.tuples.push(tuple.to_string());
        c.seen_seconds_ago = c
            .seen_seconds_ago
            .min(now_ns.saturating_sub(flow.seen_ns) / 1_000_000_000);
    }
    let old_connections: Vec<OldConnection> = by_id
        .into_values()
        .map(|mut c| {
            c.tuples.sort();
            c
        })
        .collect();
    WindowReport {
        open,
        draining,
        connections: old_connections.len(),
        tuples: entries.len(),
        old_connections,
    }
}

impl std::fmt::Display for WindowReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.draining {
            writeln!(
                f,
                "rollback to kube-proxy: draining, {} of the agent's connections still open (new ones are conntrack's)",
                self.connections
            )?;
        } else if self.open {
            writeln!(
                f,
                "switch window from kube-proxy: open, {} old connections ({} tuples) stay on conntrack until they end",
                self.connections, self.tuples
            )?;
        } else {
            writeln!(
                f,
                "switch window from kube-proxy: closed ({} old connections, {} tuples)",
                self.connections, self.tuples
            )?;
        }
        if self.old_connections.is_empty() {
            return Ok(());
        }
        writeln!(
            f,
            "{:<12} {:<5} {:>6}  TUPLES",
            "CONNTRACK ID", "PROTO", "SEEN"
        )?;
        for c in &self.old_connections {
            let tuples: Vec<&str> = c
                .tuples
                .iter()
                .map(|t| t.split_once(' ').map_or(t.as_str(), |(_, rest)| rest))
                .collect();
            writeln!(
                f,
                "{:<12} {:<5} {:>5}s  {}",
                c.conntrack_id,
                c.protocol,
                c.seen_seconds_ago,
                tuples.join("; ")
            )?;
        }
        Ok(())
    }
}

/// `inspect switch`: the window (open or closed) and the old connections it keeps, from the
/// pinned maps, as text or JSON.
pub fn inspect(json: bool, pin_root: &std::path::Path) -> anyhow::Result<()> {
    let maps = DatapathMaps::open_pinned(pin_root).with_context(|| {
        format!(
            "opening the datapath maps under {} (is the agent running?)",
            pin_root.display()
        )
    })?;
    let open = maps
        .switch_window_open()
        .context("reading the switch window's flag")?;
    let entries = match &maps.switch_flows {
        Some(map) => map.entries().context("reading switch_flows")?,
        None => Vec::new(),
    };
    let draining = super::drain::draining(&maps).context("reading the drain's flags")?;
    let report = window_report(open, draining, &entries, super::sweep::monotonic_ns());
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use probes::maps::L4Proto;

    #[test]
    fn the_report_groups_the_tuples_by_conntrack_entry() {
        let t = |a: &str, ap: u16, b: &str, bp: u16, p: L4Proto| {
            Tuple::new(a.parse().unwrap(), ap, b.parse().unwrap(), bp, p)
        };
        let flow = |ct_id: u32, seen_s: u64| SwitchFlow {
            ct_id,
            pad: 0,
            seen_ns: seen_s * 1_000_000_000,
        };
        let tcp = t("10.0.1.2", 40000, "10.96.0.41", 80, L4Proto::Tcp);
        let tcp_reply = t("10.0.2.2", 8080, "10.0.2.1", 21530, L4Proto::Tcp);
        let udp = t("10.0.1.2", 5353, "10.96.0.10", 53, L4Proto::Udp);
        let entries = vec![
            (tcp, flow(7, 10)),
            (tcp.reversed(), flow(7, 10)),
            (tcp_reply, flow(7, 12)),
            (tcp_reply.reversed(), flow(7, 12)),
            (udp, flow(9, 12)),
            (udp.reversed(), flow(9, 12)),
        ];
        let r = window_report(true, false, &entries, 15 * 1_000_000_000);
        assert_eq!((r.open, r.connections, r.tuples), (true, 2, 6));
        let first = &r.old_connections[0];
        assert_eq!(
            (
                first.conntrack_id,
                first.protocol.as_str(),
                first.seen_seconds_ago
            ),
            (7, "tcp", 3)
        );
        assert_eq!(first.tuples.len(), 4);
        assert!(
            first
                .tuples
                .contains(&"tcp 10.0.2.2:8080 -> 10.0.2.1:21530".to_owned())
        );
        assert_eq!(r.old_connections[1].protocol, "udp");
        let text = r.to_string();
        assert!(
            text.starts_with("switch window from kube-proxy: open, 2 old connections (6 tuples)")
        );
        assert!(text.contains("10.0.1.2:40000 -> 10.96.0.41:80"), "{text}");
        let closed = window_report(false, false, &[], 0);
        assert_eq!(
            closed.to_string(),
            "switch window from kube-proxy: closed (0 old connections, 0 tuples)\n"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["old_connections"][0]["conntrack_id"], 7);
        assert_eq!(json["open"], true);
        // During a drain each tuple is one of the agent's connections.
        let drain = [
            (
                tcp,
                SwitchFlow {
                    ct_id: 0,
                    ..flow(0, 12)
                },
            ),
            (
                udp,
                SwitchFlow {
                    ct_id: 0,
                    ..flow(0, 14)
                },
            ),
        ];
        let r = window_report(false, true, &drain, 15 * 1_000_000_000);
        assert_eq!((r.draining, r.connections, r.tuples), (true, 2, 2));
        assert!(
            r.to_string().starts_with(
                "rollback to kube-proxy: draining, 2 of the agent's connections still open"
            ),
            "{r}"
        );
    }
}
