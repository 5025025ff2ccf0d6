//! What the agent's host-kernel tests share: a pin directory removed on drop, and the check that
//! the test can load a datapath at all (root and bpffs, mounted when missing).

use std::path::PathBuf;

/// A pin directory under bpffs, with every pin below it removed on drop.
pub struct Pins(pub PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = probes::loader::remove_pins(&self.0);
    }
}

/// Whether bpffs is mounted at /sys/fs/bpf (mounting it when it is not).
fn bpffs() -> bool {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"));
    mounted
        || std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .is_ok_and(|s| s.success())
}

/// Whether this process can load a datapath (root, bpffs); says so when it cannot, and the
/// test then passes without running.
pub fn can_load_datapath() -> bool {
    if !nix::unistd::geteuid().is_root() || !bpffs() {
        eprintln!("needs root and bpffs: skipped");
        return false;
    }
    true
}
