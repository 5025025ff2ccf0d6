//! CPU time from `/proc`, shared by the benchmarks that say which process (or thread) used the
//! CPU in a window: utime+stime in clock ticks per process or per thread, and their difference
//! between two snapshots in seconds by command name.

use std::collections::BTreeMap;

/// Clock ticks per second (`USER_HZ`), the unit of `/proc/PID/stat`'s utime and stime.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// utime+stime (clock ticks) of every process (`dir` = `/proc`, by pid) or of every thread of
/// one process (`/proc/PID/task`, by thread id), with its command or thread name.
pub fn cpu_ticks(dir: &str) -> BTreeMap<u32, (String, u64)> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let Some(id) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(stat) = stat_ticks(&format!("{dir}/{id}/stat")) {
            out.insert(id, stat);
        }
    }
    out
}

/// A process's or thread's command name and utime+stime (clock ticks), from its `stat` file.
pub fn stat_ticks(path: &str) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command is in parentheses and may hold spaces; after it, state is field 3, utime 14
    // and stime 15.
    let open = stat.find('(')?;
    let (head, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((head[open + 1..].to_string(), ticks))
}

/// The processes (or threads) that used CPU between two snapshots of [`cpu_ticks`], in
/// seconds, by command name (which process besides the one measured ran in a timed window: an
/// agent, kernel threads).
pub fn busy_processes(
    before: &BTreeMap<u32, (String, u64)>,
    after: &BTreeMap<u32, (String, u64)>,
) -> BTreeMap<String, f64> {
    let hz = ticks_per_second();
    let mut out: BTreeMap<String, f64> = BTreeMap::new();
    for (pid, (comm, ticks)) in after {
        let used = ticks - before.get(pid).map_or(0, |b| b.1.min(*ticks));
        if used > 0 {
            *out.entry(comm.clone()).or_default() += used as f64 / hz;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's CPU time (ns).
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
    fn reads_this_process_and_its_threads_names_and_cpu_ticks() {
        // Burn three ticks' worth of this thread's CPU time (not of wall time, which a loaded
        // machine can leave without one tick of CPU), so the tick count is non-zero.
        let tick_ns = (1e9 / ticks_per_second()) as u64;
        let (start, mut x) = (thread_cpu_ns(), 0u64);
        while thread_cpu_ns() - start < 3 * tick_ns {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        std::hint::black_box(x);
        let pid = std::process::id();
        let (comm, ticks) = stat_ticks(&format!("/proc/{pid}/stat")).expect("own /proc stat");
        let own = std::fs::read_to_string("/proc/self/comm").expect("comm");
        assert_eq!(comm, own.trim_end());
        assert!(ticks > 0);
        assert!(cpu_ticks("/proc").contains_key(&pid));
        // The main thread's id is the pid.
        assert!(cpu_ticks(&format!("/proc/{pid}/task")).contains_key(&pid));
    }
}
