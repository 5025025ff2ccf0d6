//! How the process logs and prints its errors: the tracing subscriber (text with colour only
//! when stderr is a terminal, or JSON), and the one-line rendering of an error with its causes,
//! each cause once ([`error_line`]).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Installs the subscriber: logs go to stderr, filtered by `RUST_LOG`, else `default_filter`.
/// Text carries ANSI colour only when stderr is a terminal; JSON never does.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.with_ansi(false).json().flatten_event(true).init(),
    }
}

/// `error: cause: cause ...` on one line, each cause once: a cause whose text an outer message
/// already holds (an error that prints its source, e.g. "reading F: No such file or directory
/// (os error 2)" over the io::Error itself) is not repeated. Line breaks inside a message
/// become "; ".
pub fn error_line(e: &anyhow::Error) -> String {
    chain_line(e.chain())
}

/// [`error_line`] over any chain of causes, outermost first.
pub fn chain_line<'a>(
    chain: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>,
) -> String {
    let mut out = String::new();
    for cause in chain {
        let mut text = String::new();
        for line in cause
            .to_string()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
        {
            if !text.is_empty() {
                text.push_str(if text.ends_with(':') { " " } else { "; " });
            }
            text.push_str(line);
        }
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading {path}: {source}")]
    struct ReadError {
        path: String,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn a_cause_already_printed_by_its_parent_is_not_repeated() {
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let e = anyhow::Error::new(ReadError {
            path: "/etc/x.yaml".into(),
            source: io,
        })
        .context("loading the configuration");
        let line = error_line(&e);
        assert_eq!(
            line,
            "loading the configuration: reading /etc/x.yaml: No such file or directory (os error 2)"
        );
        assert_eq!(line.matches("os error 2").count(), 1, "{line}");
        // anyhow's own alternate form repeats it: what this formatter is for.
        assert_eq!(format!("{e:#}").matches("os error 2").count(), 2);
    }

    #[test]
    fn causes_that_add_something_are_kept_in_order_on_one_line() {
        let e = anyhow::anyhow!("the eBPF datapath cannot run here:\n  - no BTF\n  - no bpffs")
            .context("start-up");
        assert_eq!(
            error_line(&e),
            "start-up: the eBPF datapath cannot run here: - no BTF; - no bpffs"
        );
        let e = anyhow::Error::new(std::io::Error::other("connection refused"))
            .context("connecting to 127.0.0.1:6443");
        assert_eq!(
            error_line(&e),
            "connecting to 127.0.0.1:6443: connection refused"
        );
    }
}
