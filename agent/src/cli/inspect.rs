//! `inspect services`, `inspect snat` and `inspect counters`: what is programmed in the kernel,
//! read back from IPVS and the pinned datapath maps.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::{Value, json};

use super::Output;
use crate::reconcile::ipvs as ipvs_rec;
use crate::state;

/// `inspect services`: the kernel's virtual services, named from the state file.
pub async fn inspect_services(output: Output, state_dir: PathBuf) -> anyhow::Result<()> {
    let h = ipvs::IpvsHandle::connect()
        .await
        .context("connecting to IPVS")?;
    let observed = ipvs_rec::observe_with_stats(&h)
        .await
        .context("dumping IPVS")?;
    let rec = state::read(&state_dir)?;
    let mut rows = Vec::new();
    for (key, (svc, dests)) in &observed {
        let (proto, address, port) = match key {
            ipvs::ServiceKey::Tuple {
                protocol,
                address,
                port,
            } => (protocol.to_string(), Some(*address), *port),
            ipvs::ServiceKey::Fwmark { mark, .. } => (format!("FWM {mark}"), None, 0),
        };
        let named = rec
            .virtual_services
            .iter()
            .find(|r| Some(r.address) == address && r.port == port && r.protocol == proto);
        let st = svc.stats.as_deref().copied().unwrap_or_default();
        rows.push(json!({
            "service": named.map_or("-".to_string(), |r| format!("{}:{}", r.service, r.port_name)),
            "kind": named.map_or("foreign".to_string(), |r| r.kind.clone()),
            "protocol": proto,
            "address": address,
            "port": port,
            "scheduler": svc.scheduler,
            "persistence_timeout": svc.flags.contains(ipvs::ServiceFlags::PERSISTENT).then_some(svc.timeout),
            "snat": named.map(|r| r.snat),
            "connections": st.conns,
            "packets_in": st.inpkts,
            "packets_out": st.outpkts,
            "bytes_in": st.inbytes,
            "bytes_out": st.outbytes,
            "destinations": dests.values().map(|d| {
                let ds = d.stats.as_deref().copied().unwrap_or_default();
                json!({"address": d.address, "port": d.port, "weight": d.weight,
                       "active_connections": d.active_conns, "inactive_connections": d.inactive_conns,
                       "connections": ds.conns, "packets_in": ds.inpkts, "packets_out": ds.outpkts})
            }).collect::<Vec<_>>(),
        }));
    }
    if output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"services": rows}))?
        );
        return Ok(());
    }
    println!(
        "{:<32} {:<12} {:<5} {:<24} {:<6} {:>7} {:>8} {:>8}  DESTINATIONS (weight active/inactive)",
        "SERVICE", "KIND", "PROTO", "ADDRESS:PORT", "SCHED", "CONNS", "PKTS-IN", "PKTS-OUT"
    );
    for r in &rows {
        let addr = match r["address"].as_str() {
            Some(a) if a.contains(':') => format!("[{a}]:{}", r["port"]),
            Some(a) => format!("{a}:{}", r["port"]),
            None => "-".into(),
        };
        let dests: Vec<String> = r["destinations"]
            .as_array()
            .map(|ds| {
                ds.iter()
                    .map(|d| {
                        format!(
                            "{}:{}({} {}/{})",
                            d["address"].as_str().unwrap_or("?"),
                            d["port"],
                            d["weight"],
                            d["active_connections"],
                            d["inactive_connections"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<32} {:<12} {:<5} {:<24} {:<6} {:>7} {:>8} {:>8}  {}",
            r["service"].as_str().unwrap_or("-"),
            r["kind"].as_str().unwrap_or("-"),
            r["protocol"].as_str().unwrap_or("-"),
            addr,
            r["scheduler"].as_str().unwrap_or("-"),
            r["connections"],
            r["packets_in"],
            r["packets_out"],
            if dests.is_empty() {
                "none".to_string()
            } else {
                dests.join(" ")
            }
        );
    }
    Ok(())
}

fn state_names(
    rec: &state::Recorded,
) -> std::collections::HashMap<(std::net::IpAddr, u16, String), String> {
    rec.virtual_services
        .iter()
        .map(|r| {
            (
                (r.address, r.port, r.protocol.clone()),
                format!("{}:{}", r.service, r.port_name),
            )
        })
        .collect()
}

fn proto_name(p: u8) -> String {
    match probes::maps::L4Proto::from_number(p) {
        Some(probes::maps::L4Proto::Tcp) => "TCP".into(),
        Some(probes::maps::L4Proto::Udp) => "UDP".into(),
        Some(probes::maps::L4Proto::Sctp) => "SCTP".into(),
        _ => format!("proto-{p}"),
    }
}

/// The names of the bits of `bits` that `names` lists, comma-separated, in `names`' order.
fn bit_names(bits: u8, names: &[(u8, &str)]) -> String {
    names
        .iter()
        .filter(|(bit, _)| bits & bit != 0)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(",")
}

/// Why a connection was source-NATed (the entry's `SNAT_F_*` reason bits).
fn reason_text(flags: u8) -> String {
    use probes::maps::{SNAT_F_HAIRPIN, SNAT_F_HOST, SNAT_F_MASQ, SNAT_F_OFFCLUSTER};
    bit_names(
        flags,
        &[
            (SNAT_F_MASQ, "masquerade"),
            (SNAT_F_HAIRPIN, "hairpin"),
            (SNAT_F_OFFCLUSTER, "off-cluster-backend"),
            (SNAT_F_HOST, "host"),
        ],
    )
}

/// The TCP state bits an entry has seen (`STATE_*`), `-` for none.
fn state_text(bits: u8) -> String {
    use probes::maps::{STATE_FIN, STATE_REPLY, STATE_RST, STATE_SYN};
    let names = bit_names(
        bits,
        &[
            (STATE_SYN, "syn"),
            (STATE_REPLY, "reply"),
            (STATE_FIN, "fin"),
            (STATE_RST, "rst"),
        ],
    );
    if names.is_empty() { "-".into() } else { names }
}

/// `inspect snat`: every translated connection, from the pinned maps.
pub fn inspect_snat(output: Output, state_dir: PathBuf, pin_root: PathBuf) -> anyhow::Result<()> {
    use crate::datapath::sweep;
    let maps = probes::DatapathMaps::open_pinned(&pin_root).with_context(|| {
        format!(
            "opening the datapath maps under {} (is the agent running?)",
            pin_root.display()
        )
    })?;
    let names = state_names(&state::read(&state_dir)?);
    let now = sweep::monotonic_ns();
    let mut rows = Vec::new();
    for (_, record) in maps.snat.records() {
        let (key, fwd, rev) = (record.fwd_key, record.fwd, record.rev);
        let conn = maps.conns.get(&key)?;
        let proto = proto_name(key.proto);
        let service = conn.map(|c| {
            let vaddr = probes::maps::addr_from_bytes(c.vaddr);
            let vport = c.vport.get();
            names
                .get(&(vaddr, vport, proto.clone()))
                .cloned()
                .unwrap_or_else(|| std::net::SocketAddr::new(vaddr, vport).to_string())
        });
        let state = record.state_bits();
        let last = record.last_seen_ns();
        rows.push(json!({
            "protocol": proto,
            "client": std::net::SocketAddr::new(key.source(), key.sport.get()).to_string(),
            "node": std::net::SocketAddr::new(fwd.address(), fwd.port.get()).to_string(),
            "backend": std::net::SocketAddr::new(key.destination(), key.dport.get()).to_string(),
            "service": service,
            "state": state_text(state),
            "reason": reason_text(fwd.flags),
            "age_seconds": now.saturating_sub(fwd.created_ns) / 1_000_000_000,
            "idle_seconds": now.saturating_sub(last) / 1_000_000_000,
            "client_port_kept": rev.flags & probes::maps::SNAT_F_PORT_KEPT != 0,
        }));
    }
    // The table's occupancy, from the records' states (the sweeper frees DEAD ones next pass).
    let (used, busy, dead, free) = maps.snat.occupancy();
    let capacity = maps.snat.capacity();
    let occupancy = json!({
        "records": capacity,
        "used": used,
        "being_written": busy,
        "dead": dead,
        "free": free,
        "used_percent": used as f64 * 100.0 / f64::from(capacity.max(1)),
    });
    if output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"snat": rows, "occupancy": occupancy}))?
        );
        return Ok(());
    }
    println!(
        "SNAT table: {used} of {capacity} records in use ({:.1}%), {dead} dead (freed at the next sweep), {free} free",
        occupancy["used_percent"].as_f64().unwrap_or(0.0)
    );
    println!(
        "{:<5} {:<28} {:<28} {:<28} {:<32} {:<16} {:>6} {:>6}",
        "PROTO", "CLIENT", "NODE ADDRESS", "BACKEND", "SERVICE", "STATE", "AGE", "IDLE"
    );
    for r in &rows {
        println!(
            "{:<5} {:<28} {:<28} {:<28} {:<32} {:<16} {:>6} {:>6}",
            r["protocol"].as_str().unwrap_or(""),
            r["client"].as_str().unwrap_or(""),
            r["node"].as_str().unwrap_or(""),
            r["backend"].as_str().unwrap_or(""),
            r["service"].as_str().unwrap_or("-"),
            r["state"].as_str().unwrap_or(""),
            r["age_seconds"],
            r["idle_seconds"],
        );
    }
    Ok(())
}

/// `inspect counters`: the datapath's counters.
pub fn inspect_counters(output: Output, pin_root: PathBuf) -> anyhow::Result<()> {
    let maps = probes::DatapathMaps::open_pinned(&pin_root).with_context(|| {
        format!(
            "opening the datapath maps under {} (is the agent running?)",
            pin_root.display()
        )
    })?;
    let stats = maps.stats()?;
    let counters: serde_json::Map<String, Value> = stats
        .iter()
        .map(|(c, v)| (c.name().to_string(), json!(v)))
        .collect();
    if output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"counters": counters}))?
        );
    } else {
        for (name, v) in &counters {
            println!("{name:<24} {v}");
        }
    }
    Ok(())
}
