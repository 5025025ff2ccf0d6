//! The switch window from kube-proxy (docs/switching.md): the connections kube-proxy's conntrack
//! entries hold when the agent takes a node over stay kube-proxy's until they end. This module
//! owns `switch_flows` and the `CFG_F_SWITCH` flag: [`seed`] fills the map from a conntrack dump
//! at start and opens the window; [`refresh`] (each sweep pass while the window is open) prunes
//! the tuples of entries conntrack no longer holds, and closes the window once the map is empty.

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
    let mut progress = SwitchProgress::default();
    for (tuple, flow) in map.entries()? {
        if current.contains_key(&tuple) {
            map.insert(
                &tuple,
                &SwitchFlow {
                    seen_ns: now_ns,
                    ..flow
                },
            )?;
            progress.tracked += 1;
        } else if map.delete(&tuple)? {
            progress.removed += 1;
        }
    }
    if progress.tracked == 0 && maps.switch_window_open()? {
        maps.set_switch_window(false)?;
        progress.closed = true;
    }
    Ok(progress)
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
