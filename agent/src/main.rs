//! kube-ipvs-bpf command-line entry point: parses the command line, sets up logging and runs
//! the chosen command (see `agent::cli`).

use clap::Parser;
use tracing_subscriber::EnvFilter;

use agent::cli::{self, Cli, Command, InspectWhat, LogFormat};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    // libbpf's messages (e.g. "Parent Qdisc doesn't exists" at each attach) at debug level.
    probes::libbpf_log::route_to_tracing();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
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
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
