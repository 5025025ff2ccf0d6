//! The agent's CPU time, read precisely, shared by the loadgen (each timed window) and the
//! datapath benchmark (its steady rate): a timed window of our datapath counts the agent at its
//! steady rate instead of whatever periodic work (a sweep pass, a node check) its phase caught.

/// The agent's command name.
pub const AGENT_COMM: &str = "kube-ipvs-bpf";

/// CPU time (ns) of every thread of the processes named `comm`, in user and kernel mode, from
/// the scheduler's own clock (`/proc/PID/task/TID/schedstat`'s first field; interrupt time is
/// not charged to the task). Precise where utime+stime are sampled: a task woken by a timer on
/// the tick is charged whole ticks. `None` when no such process runs or the kernel has no
/// schedstat files.
pub fn run_time_ns(comm: &str) -> Option<u64> {
    let mut total = None;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let named = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim_end() == comm);
        if !named {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let ns = std::fs::read_to_string(t.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok());
            if let Some(ns) = ns {
                *total.get_or_insert(0) += ns;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn counts_this_process_cpu_time_in_nanoseconds() {
        let own = std::fs::read_to_string("/proc/self/comm").expect("comm");
        let before = run_time_ns(own.trim_end()).expect("own schedstat");
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(100) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        std::hint::black_box(x);
        let used = run_time_ns(own.trim_end()).expect("own schedstat") - before;
        // The loop ran 100 ms of wall time on this thread: at least most of it is CPU time.
        assert!(used >= 50_000_000, "{used} ns");
        assert_eq!(run_time_ns("no-such-command-here"), None);
    }
}
