//! `drain`: the rollback to kube-proxy's ipvs mode ([`crate::datapath::drain`]), run with the
//! agent stopped.

use anyhow::{Context, bail};

use super::{DrainArgs, Output};
use crate::datapath::drain::{self, DrainOptions};
use crate::datapath::{lock, sysctl};

/// `drain`: takes the pin root's lock (an agent still running there is named, and nothing
/// changes), drains, and fails when the datapath's removal was incomplete.
pub async fn drain(args: DrainArgs) -> anyhow::Result<()> {
    let _lock = lock::acquire(&lock::lock_dir(), &args.bpf_pin_root, "drain").context("drain")?;
    let opts = DrainOptions {
        pin_root: args.bpf_pin_root,
        state_dir: args.state_dir,
        proc_sys: sysctl::default_root(),
        period: args.period,
        timeout: (!args.timeout.is_zero()).then_some(args.timeout),
        cleanup: !args.no_cleanup,
    };
    let report = drain::run(&opts).await?;
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Text => {
            println!(
                "drained: {} connections of the agent at the start, {} still open at the end",
                report.connections_at_start, report.connections_left
            );
            if let Some(c) = &report.cleanup {
                print!("{c}");
            }
        }
    }
    if report.cleanup.as_ref().is_some_and(|c| !c.is_ok()) {
        bail!("the datapath's removal is incomplete (see the errors above)");
    }
    Ok(())
}
