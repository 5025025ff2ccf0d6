//! kube-ipvs-bpf command-line entry point: tells kube-proxy's command line from this binary's
//! own (`agent::kube_proxy_cli`), sets up logging (`agent::logging`) and runs the chosen
//! command (see `agent::cli`).

use std::ffi::OsString;

use clap::Parser;

use agent::cli::{self, Cli, Command, InspectWhat};
use agent::kube_proxy_cli;

fn main() -> std::process::ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    if kube_proxy_cli::is_kube_proxy_invocation(&args) {
        let parsed = match kube_proxy_cli::parse(kube_proxy_cli::kube_proxy_args(&args)) {
            Ok(p) => p,
            Err(e) => e.exit(),
        };
        // The logging flags first, so that what follows is logged as asked.
        let (format, level) = kube_proxy_cli::log_settings(&parsed.args);
        agent::logging::init(format, level);
        probes::libbpf_log::route_to_tracing();
        return block_on(async move {
            let resolved = kube_proxy_cli::resolve(&parsed)?;
            resolved.log_ignored();
            kube_proxy_cli::execute(resolved).await
        });
    }
    let cli = Cli::parse_from(args);
    agent::logging::init(cli.log_format, "info");
    // libbpf's messages (e.g. "Parent Qdisc doesn't exists" at each attach) at debug level.
    probes::libbpf_log::route_to_tracing();
    block_on(async {
        match cli.command {
            Command::Run(args) => cli::run(*args).await,
            Command::Plan { source, output } => cli::plan(source, output).await,
            Command::Cleanup(args) => cli::cleanup(args).await,
            Command::Init {
                bpffs,
                bpf_pin_root,
            } => agent::init::run(&agent::init::InitConfig {
                bpffs,
                pin_root: bpf_pin_root,
            })
            .map(|_| ()),
            Command::Inspect {
                what: InspectWhat::Services { output, state_dir },
            } => cli::inspect_services(output, state_dir).await,
            Command::Inspect {
                what:
                    InspectWhat::Snat {
                        output,
                        state_dir,
                        bpf_pin_root,
                    },
            } => cli::inspect_snat(output, state_dir, bpf_pin_root),
            Command::Inspect {
                what:
                    InspectWhat::Counters {
                        output,
                        bpf_pin_root,
                    },
            } => cli::inspect_counters(output, bpf_pin_root),
            Command::Inspect {
                what:
                    InspectWhat::Switch {
                        output,
                        bpf_pin_root,
                    },
            } => agent::datapath::switch::inspect(output == cli::Output::Json, &bpf_pin_root),
        }
    })
}

/// Runs `f` on a single-threaded runtime; an error is logged once, on one line.
fn block_on(f: impl std::future::Future<Output = anyhow::Result<()>>) -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", agent::logging::error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
