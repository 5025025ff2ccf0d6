//! The rollback to kube-proxy's ipvs mode without resetting a connection (docs/switching.md,
//! "Rollback"): the drain. This module owns the `CFG_F_DRAIN` and `CFG_F_DRAIN_RECORD` flags and,
//! while they are set, `switch_flows`: [`begin`] hands every new connection to conntrack (and
//! kube-proxy's rules) while the connections the agent handled keep being marked and translated;
//! [`refresh`] forgets those IPVS no longer holds open; [`run`] is `kube-ipvs-bpf drain` (and
//! the agent's `--drain-on-exit`): begin, wait for the agent's last connection to end, then
//! remove the agent's datapath (never IPVS nor `kube-ipvs0`, which are kube-proxy's again);
//! [`end`] is an agent taking the node back during a drain.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use probes::DatapathMaps;
use probes::maps::{CFG_F_DRAIN, CFG_F_DRAIN_RECORD, CFG_F_SWITCH, ConnValue, SwitchFlow, Tuple};

use super::ipvs_conns::{self, IpvsConn};
use super::sweep::monotonic_ns;
use super::switch;
use super::sysctl::{self, Sysctl};

/// kube-proxy's ipvs mode needs IPVS connections on conntrack (its MASQUERADE): from the drain
/// on, IPVS latches it on every new connection, while the agent's keep the flag they were made
/// with (off).
pub const CONNTRACK_ON: Sysctl = Sysctl {
    name: "net.ipv4.vs.conntrack",
    value: "1",
};

/// The `switch_flows` key of the connection a `conns` entry records: its client -> service
/// tuple, as TC ingress and `xt_svc` see its packets before IPVS.
pub fn client_to_service(conn: &Tuple, value: &ConnValue) -> Tuple {
    Tuple {
        daddr: value.vaddr,
        dport: value.vport,
        ..*conn
    }
}

/// Starts the drain on `maps` (docs/switching.md, "Rollback"), in this order, so that no
/// connection changes hands while it is open:
/// 1. `CFG_F_DRAIN_RECORD`: the probe puts every connection IPVS makes from now on in
///    `switch_flows` (the programs still mark all of them);
/// 2. `net.ipv4.vs.conntrack=1` under `proc_sys`;
/// 3. `switch_flows` emptied of a takeover's tuples (those connections are conntrack's either
///    way), then filled with the client -> service tuple of every `conns` entry;
/// 4. `CFG_F_DRAIN` (and the two other switch flags cleared): from here the programs mark only
///    the tuples in `switch_flows`, make no SNAT record, and the probe records nothing.
///
/// Returns the tuples in `switch_flows`. A drain already under way (an interrupted `drain`) is
/// taken up where it is.
pub fn begin(maps: &DatapathMaps, proc_sys: &std::path::Path) -> anyhow::Result<usize> {
    let map = maps
        .switch_flows
        .as_ref()
        .context("the pinned datapath has no switch_flows map (an older agent's): cannot drain")?;
    if maps.switch_flags()? & CFG_F_DRAIN != 0 {
        return Ok(map.entries()?.len());
    }
    maps.set_switch_flags(CFG_F_DRAIN_RECORD, 0)
        .context("setting CFG_F_DRAIN_RECORD")?;
    sysctl::set_in(proc_sys, &CONNTRACK_ON)
        .with_context(|| format!("setting {}={}", CONNTRACK_ON.name, CONNTRACK_ON.value))?;
    if maps.switch_flags()? & CFG_F_SWITCH != 0 {
        switch::clear(map)?;
    }
    let now_ns = monotonic_ns();
    for (conn, value) in maps.conns.entries().context("reading conns")? {
        map.insert(
            &client_to_service(&conn, &value),
            &SwitchFlow {
                ct_id: 0,
                pad: 0,
                seen_ns: now_ns,
            },
        )?;
    }
    maps.set_switch_flags(CFG_F_DRAIN, CFG_F_DRAIN_RECORD | CFG_F_SWITCH)
        .context("setting CFG_F_DRAIN")?;
    Ok(map.entries()?.len())
}

/// Whether a drain is under way on `maps`.
pub fn draining(maps: &DatapathMaps) -> probes::Result<bool> {
    Ok(maps.switch_flags()? & (CFG_F_DRAIN | CFG_F_DRAIN_RECORD) != 0)
}

/// Ends a drain (an agent taking the node back): clears the drain flags and empties
/// `switch_flows`. The connections opened during it are on conntrack; the agent's takeover
/// (`switch::seed_from_conntrack`) keeps them there. Returns whether a drain was under way.
pub fn end(maps: &DatapathMaps) -> anyhow::Result<bool> {
    if !draining(maps)? {
        return Ok(false);
    }
    maps.set_switch_flags(0, CFG_F_DRAIN | CFG_F_DRAIN_RECORD)?;
    if let Some(map) = &maps.switch_flows {
        switch::clear(map)?;
    }
    Ok(true)
}

/// The open connections IPVS holds in the calling thread's network namespace, by client ->
/// service tuple.
pub fn ipvs_open_connections() -> anyhow::Result<HashSet<Tuple>> {
    Ok(ipvs_conns::read()?
        .into_iter()
        .filter(IpvsConn::open)
        .map(|c| c.client_to_service)
        .collect())
}

/// What a [`refresh`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DrainProgress {
    /// The agent's connections still open (tuples in `switch_flows`).
    pub open: usize,
    /// Forgotten now: IPVS no longer holds them open.
    pub ended: usize,
}

/// Removes from `switch_flows` every tuple not in `open` (IPVS's open connections, read now) and
/// refreshes the others' `seen_ns`. Never adds one: during a drain the probe records nothing and
/// new connections are conntrack's.
pub fn refresh(
    maps: &DatapathMaps,
    open: &HashSet<Tuple>,
    now_ns: u64,
) -> anyhow::Result<DrainProgress> {
    let map = maps
        .switch_flows
        .as_ref()
        .context("the pinned datapath has no switch_flows map")?;
    let (open, ended) = switch::keep_only(map, |t| open.contains(t), now_ns)?;
    Ok(DrainProgress { open, ended })
}

/// How `kube-ipvs-bpf drain` runs.
#[derive(Debug, Clone)]
pub struct DrainOptions {
    /// The agent's pin root (its maps and programs).
    pub pin_root: PathBuf,
    /// The agent's state directory (its state file goes at the end).
    pub state_dir: PathBuf,
    /// Where sysctls are written.
    pub proc_sys: PathBuf,
    /// How often IPVS's connections are read.
    pub period: Duration,
    /// The longest wait for the agent's connections to end; those still open then are cut when
    /// the datapath goes. `None`: no limit.
    pub timeout: Option<Duration>,
    /// Remove the datapath at the end (false: leave it draining, `--no-cleanup`).
    pub cleanup: bool,
}

/// What a drain did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DrainReport {
    /// The agent's connections when the drain began.
    pub connections_at_start: usize,
    /// Still open when it ended (cut by the cleanup: non-zero only after the timeout).
    pub connections_left: usize,
    /// The cleanup's report, when it ran.
    pub cleanup: Option<crate::cleanup::CleanupReport>,
}

/// `kube-ipvs-bpf drain` (the caller holds the pin root's lock, or is the agent exiting with
/// `--drain-on-exit`): [`begin`], then [`refresh`] every `period` until the agent's last
/// connection has ended (or the timeout), then, with `cleanup`, the agent's datapath removed:
/// its iptables rules, TC programs, probe, pins and state file, as `kube-ipvs-bpf cleanup`
/// removes them, but IPVS's services and `kube-ipvs0` left to kube-proxy.
pub async fn run(opts: &DrainOptions) -> anyhow::Result<DrainReport> {
    let maps = DatapathMaps::open_pinned(&opts.pin_root).with_context(|| {
        format!(
            "opening the datapath maps under {} (nothing to drain?)",
            opts.pin_root.display()
        )
    })?;
    let mut report = DrainReport {
        connections_at_start: begin(&maps, &opts.proc_sys)?,
        ..DrainReport::default()
    };
    tracing::info!(
        connections = report.connections_at_start,
        "draining for the rollback to kube-proxy: new connections go to conntrack, the agent's \
         keep their translation until they end"
    );
    let started = Instant::now();
    let mut last_open = usize::MAX;
    loop {
        let open = ipvs_open_connections()?;
        let progress = refresh(&maps, &open, monotonic_ns())?;
        if progress.open != last_open {
            tracing::info!(
                open = progress.open,
                "drain: the agent's connections still open"
            );
            last_open = progress.open;
        }
        report.connections_left = progress.open;
        if progress.open == 0 {
            break;
        }
        if opts.timeout.is_some_and(|t| started.elapsed() >= t) {
            tracing::warn!(
                open = progress.open,
                "drain timeout: the agent's connections still open are cut when its datapath goes"
            );
            break;
        }
        tokio::time::sleep(opts.period).await;
    }
    drop(maps);
    if opts.cleanup {
        let cleanup = crate::cleanup::cleanup_self(&crate::cleanup::CleanupOptions {
            keep_ipvs: true,
            pin_root: opts.pin_root.clone(),
            state_dir: opts.state_dir.clone(),
            ..Default::default()
        })
        .await?;
        report.cleanup = Some(cleanup);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use probes::maps::L4Proto;

    #[test]
    fn a_conns_entry_is_keyed_by_its_client_and_virtual_service() {
        let conn = Tuple::new(
            "10.0.1.2".parse().unwrap(),
            40000,
            "10.0.2.2".parse().unwrap(),
            8080,
            L4Proto::Tcp,
        );
        let service = Tuple::new(
            "10.0.1.2".parse().unwrap(),
            40000,
            "10.96.0.41".parse().unwrap(),
            80,
            L4Proto::Tcp,
        );
        let value = ConnValue {
            vaddr: service.daddr,
            vport: service.dport,
            ..ConnValue::default()
        };
        assert_eq!(client_to_service(&conn, &value), service);
    }
}
