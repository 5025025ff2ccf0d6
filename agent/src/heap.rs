//! The process heap as glibc's allocator holds it: how much of it is in use and how much is
//! free inside its arenas ([`usage`]), and giving the free pages back to the kernel after the
//! bursts of a full sync ([`trim`]). The first list and the first sync allocate and free far
//! more than the agent keeps (whole API pages, netlink batches, the kernel's IPVS dump); glibc
//! keeps such freed memory in its arenas, resident, until `malloc_trim` returns it.
//!
//! On a C library other than glibc both are no-ops (`None`).

/// What the allocator holds, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapUsage {
    /// Allocated and not freed (`uordblks + hblkhd`).
    pub in_use: u64,
    /// Free, but kept by the allocator (`fordblks`): resident unless trimmed.
    pub free: u64,
}

/// The allocator's current account (glibc's `mallinfo2`: it walks every arena's bins, a few
/// microseconds).
pub fn usage() -> Option<HeapUsage> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 has no preconditions; it returns a struct by value.
        let m = unsafe { libc::mallinfo2() };
        Some(HeapUsage {
            in_use: (m.uordblks + m.hblkhd) as u64,
            free: m.fordblks as u64,
        })
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Returns the allocator's free pages to the kernel (`malloc_trim(0)`: the top of every arena
/// and every whole free page inside them) and gives the account after it. Costs in proportion
/// to the heap (milliseconds at 10,000 Services): call it after a full sync, not per change.
pub fn trim() -> Option<HeapUsage> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only releases memory the allocator holds free.
        unsafe { libc::malloc_trim(0) };
    }
    usage()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn usage_counts_a_live_allocation_and_trim_keeps_it() {
        // Other tests allocate and free concurrently: only a lower bound holds.
        let block: Vec<u8> = std::hint::black_box(vec![1u8; 64 << 20]);
        assert!(usage().expect("glibc").in_use >= 64 << 20);
        assert!(trim().expect("glibc").in_use >= 64 << 20);
        assert_eq!(block.iter().map(|&b| b as usize).sum::<usize>(), 64 << 20);
    }
}
