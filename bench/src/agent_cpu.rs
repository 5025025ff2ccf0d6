//! The agent's CPU time, read precisely, shared by the loadgen (each timed window) and the
//! datapath benchmark (its steady rate): a timed window of our datapath counts the agent at its
//! steady rate instead of whatever periodic work (a sweep pass, a node check) its phase caught.

/// The agent's command name.
pub const AGENT_COMM: &str = "kube-ipvs-bpf";

/// The CPU time (ns) of every thread of the processes named `comm`, by thread name
/// (`/proc/PID/task/TID/comm`): which of the agent's threads used it (the sweeper, the sync
/// loop's runtime, the admin servers). [`total`] sums it.
pub fn run_time_ns_by_thread(comm: &str) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for task in tasks_of(comm) {
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if let Some(ns) = schedstat_ns(&task) {
            *out.entry(name.trim_end().to_string()).or_insert(0) += ns;
        }
    }
    out
}

/// The task directories (`/proc/PID/task/TID`) of every process named `comm`.
fn tasks_of(comm: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in procs.flatten() {
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
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            out.extend(tasks.flatten().map(|t| t.path()));
        }
    }
    out
}

/// A task's CPU time (ns), the first field of its `schedstat`.
fn schedstat_ns(task: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(task.join("schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
}

/// The CPU time (ns) of all of [`run_time_ns_by_thread`]'s threads: every thread of the
/// processes named `comm`, in user and kernel mode, from the scheduler's own clock (schedstat's
/// first field; interrupt time is not charged to the task). Precise where utime+stime are
/// sampled: a task woken by a timer on the tick is charged whole ticks. `None` when no such
/// process runs or the kernel has no schedstat files.
pub fn total(threads: &std::collections::BTreeMap<String, u64>) -> Option<u64> {
    (!threads.is_empty()).then(|| threads.values().sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's CPU time (ns), from the same scheduler clock as schedstat.
    fn thread_cpu_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec for clock_gettime to write.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime");
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    #[test]
    fn counts_this_process_cpu_time_in_nanoseconds() {
        let own = std::fs::read_to_string("/proc/self/comm").expect("comm");
        let before = total(&run_time_ns_by_thread(own.trim_end())).expect("own schedstat");
        // Burn 20 ms of this thread's CPU time, however loaded the machine is.
        let (start, mut x) = (thread_cpu_ns(), 0u64);
        while thread_cpu_ns() - start < 20_000_000 {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        std::hint::black_box(x);
        let used = total(&run_time_ns_by_thread(own.trim_end())).expect("own schedstat") - before;
        assert!(used >= 20_000_000, "{used} ns");
        assert_eq!(total(&run_time_ns_by_thread("no-such-command-here")), None);
        // The same time by thread: this process's threads add up to at least it.
        let threads = run_time_ns_by_thread(own.trim_end());
        assert!(threads.values().sum::<u64>() >= used, "{threads:?}");
    }
}
