//! libbpf's messages: [`route_to_tracing`] sends them to `tracing` (target `libbpf`) at debug
//! level (libbpf's debug level at trace), instead of libbpf's default of printing them on stderr
//! (e.g. "Parent Qdisc doesn't exists" each time a device without a clsact qdisc is looked at).
//! Its last warnings are kept, so a failed load can say what libbpf said
//! ([`crate::Error::Load`]).

use std::collections::VecDeque;
use std::sync::Mutex;

use libbpf_rs::PrintLevel;

/// How many of libbpf's last warning lines are kept.
const KEPT_WARNINGS: usize = 24;

static WARNINGS: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());

fn print(level: PrintLevel, message: String) {
    let message = message.trim_end();
    match level {
        PrintLevel::Debug => tracing::trace!(target: "libbpf", "{message}"),
        PrintLevel::Info => tracing::debug!(target: "libbpf", "{message}"),
        PrintLevel::Warn => {
            tracing::debug!(target: "libbpf", "{message}");
            let mut kept = WARNINGS.lock().unwrap_or_else(|p| p.into_inner());
            for line in message.lines().filter(|l| !l.trim().is_empty()) {
                if kept.len() == KEPT_WARNINGS {
                    kept.pop_front();
                }
                kept.push_back(line.trim().to_owned());
            }
        }
    }
}

/// Sends libbpf's messages to `tracing` from now on (process-wide). libbpf's own debug
/// messages (one per map, relocation and section) are formatted only when `tracing` wants
/// `libbpf` at trace level.
pub fn route_to_tracing() {
    let min = if tracing::enabled!(target: "libbpf", tracing::Level::TRACE) {
        PrintLevel::Debug
    } else {
        PrintLevel::Info
    };
    libbpf_rs::set_print(Some((min, print)));
}

/// Forgets the warnings kept so far (before an operation whose warnings [`take_warnings`]
/// returns).
pub fn clear_warnings() {
    WARNINGS.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// libbpf's warnings since [`clear_warnings`] (the last few), oldest first.
pub fn take_warnings() -> Vec<String> {
    WARNINGS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_kept_line_by_line_and_bounded() {
        clear_warnings();
        print(PrintLevel::Info, "not kept\n".into());
        print(PrintLevel::Warn, "libbpf: first\nsecond\n".into());
        assert_eq!(take_warnings(), vec!["libbpf: first", "second"]);
        for i in 0..100 {
            print(PrintLevel::Warn, format!("w{i}\n"));
        }
        let kept = take_warnings();
        assert_eq!(kept.len(), KEPT_WARNINGS);
        assert_eq!(kept.last().map(String::as_str), Some("w99"));
        assert!(take_warnings().is_empty());
    }
}
