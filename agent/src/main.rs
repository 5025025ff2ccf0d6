//! kube-ipvs-bpf command-line entry point: tells kube-proxy's command line from this binary's
//! own (`agent::kube_proxy_cli`), sets up logging (`agent::logging`) and runs the chosen
//! command (`agent::cli::execute`).

use std::ffi::OsString;

use clap::Parser;

use agent::cli::{self, Cli};
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
    block_on(cli::execute(cli.command))
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
