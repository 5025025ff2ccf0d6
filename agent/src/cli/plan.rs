//! `plan`: the desired state and the changes that would be made, changing nothing.

use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

use super::{Output, SourceArgs};
use crate::config;
use crate::model;
use crate::node::Rtnl;
use crate::reconcile::{addresses, ipvs as ipvs_rec};
use crate::sync;

fn vs_json(v: &model::VirtualService) -> Value {
    json!({
        "service": v.service.to_string(),
        "port_name": v.port_name,
        "kind": v.kind.as_str(),
        "protocol": v.protocol.as_str(),
        "address": v.address,
        "port": v.port,
        "scheduler": v.scheduler,
        "persistence_timeout": v.persistence_timeout,
        "snat": v.snat,
        "masq_off_cluster": v.masq_off_cluster,
        "source_ranges": v.source_ranges,
        "destinations": v.destinations.iter().map(|d| json!({"address": d.address, "port": d.port, "weight": d.weight})).collect::<Vec<_>>(),
    })
}

fn op_text(op: &ipvs_rec::IpvsOp) -> String {
    use ipvs_rec::IpvsOp::*;
    match op {
        AddService(s) | EditService(s) => format!("{} {} {}", op.kind(), s.key, s.scheduler),
        DeleteService(k) => format!("{} {k}", op.kind()),
        AddDestination(k, d) | EditDestination(k, d) => {
            format!(
                "{} {k} -> {} weight {}",
                op.kind(),
                std::net::SocketAddr::new(d.address, d.port),
                d.weight
            )
        }
        DeleteDestination(k, a, p) => {
            format!("{} {k} -> {}", op.kind(), std::net::SocketAddr::new(*a, *p))
        }
    }
}

/// `plan`: the desired state and, where IPVS is available, the diff against the kernel.
pub async fn plan(args: SourceArgs, output: Output) -> anyhow::Result<()> {
    let snapshot = args.snapshot().await?;
    let agent_cfg = args.agent_config(config::Overrides::default())?;
    let cfg = &agent_cfg.model;
    let rtnl = Rtnl::connect()?;
    let (links, entries) = sync::read_node(&rtnl).await?;
    let node = sync::node_info(
        &args.node_name(),
        &args.node_ips,
        snapshot.node.as_ref(),
        &links,
        &entries,
    );
    let desired = model::build_objects(&snapshot.services, &snapshot.endpoint_slices, &node, cfg);
    let mut warnings: Vec<String> = crate::reconcile::datapath::sctp_not_source_nated(
        desired.virtual_services.iter().map(|v| &**v),
    )
    .into_iter()
    .map(|v| format!("{v}: SCTP is passed to IPVS untranslated, not source-NATed"))
    .collect();
    let diff = match ipvs::IpvsHandle::connect().await {
        Ok(h) => {
            let observed = ipvs_rec::observe(&h).await.context("dumping IPVS")?;
            let bound = match rtnl.link_index(model::DUMMY_INTERFACE).await? {
                Some(i) => rtnl.addresses_on(i).await?,
                None => Default::default(),
            };
            let ownership = ipvs_rec::Ownership {
                bound: bound.clone(),
                node_addresses: node.addresses.iter().map(|a| a.address).collect(),
                node_port_range: agent_cfg.node_port_range.clone(),
                exclude: agent_cfg.ipvs.exclude_cidrs.clone(),
                recorded: Default::default(),
            };
            let want = ipvs_rec::desired(desired.virtual_services.iter().map(|v| &**v));
            for k in ipvs_rec::foreign_keys(&want, &observed, &ownership) {
                warnings.push(format!(
                    "{k} is held by an IPVS virtual service this agent did not create: not programmed"
                ));
            }
            let ops = ipvs_rec::plan(
                &want,
                &ipvs_rec::PlanContext {
                    observed: &observed,
                    ownership: &ownership,
                    drain_timeout: Duration::from_secs(300),
                    now: std::time::Instant::now(),
                    scope: None,
                },
                &mut Default::default(),
            );
            Some((ops, addresses::plan(&desired.bound_addresses, &bound)))
        }
        Err(e) => {
            warnings.push(format!(
                "no IPVS on this machine ({e}): showing the desired state only"
            ));
            None
        }
    };
    match output {
        Output::Json => {
            let diff_json = diff.as_ref().map(|(ops, a)| {
                json!({"ipvs": ops.iter().map(op_text).collect::<Vec<_>>(), "addresses": {"add": a.add, "remove": a.remove}})
            });
            let out = json!({
                "node": node.name,
                "virtual_services": desired.virtual_services.iter().map(|v| vs_json(v)).collect::<Vec<_>>(),
                "bound_addresses": desired.bound_addresses,
                "rejected": desired.rejected.iter().map(|r| json!({"object": r.object, "reason": r.reason})).collect::<Vec<_>>(),
                "diff": diff_json,
                "warnings": warnings,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        Output::Text => {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "# desired ({} virtual services)",
                desired.virtual_services.len()
            );
            for v in &desired.virtual_services {
                println!("{v}");
            }
            for r in &desired.rejected {
                println!("# rejected {}: {}", r.object, r.reason);
            }
            if let Some((ops, a)) = diff {
                println!(
                    "# changes ({} IPVS operations, {} address changes)",
                    ops.len(),
                    a.add.len() + a.remove.len()
                );
                for op in &ops {
                    println!("{}", op_text(op));
                }
                for x in &a.add {
                    println!("add_address {x}");
                }
                for x in &a.remove {
                    println!("remove_address {x}");
                }
            }
        }
    }
    Ok(())
}
