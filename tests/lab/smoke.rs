//! The lab itself: the booted kernel has what every other lab test relies on.

use lab::{Netns, require_lab, sh};

#[test]
fn kernel_has_ipvs_with_module_btf() {
    require_lab();
    assert!(std::path::Path::new("/sys/kernel/btf/vmlinux").exists());
    sh("modprobe ip_vs");
    assert!(
        std::path::Path::new("/sys/kernel/btf/ip_vs").exists(),
        "ip_vs module BTF missing"
    );
    let release = sh("uname -r");
    assert!(
        release.starts_with(&lab::lab_kernel()),
        "booted {release}, expected {}",
        lab::lab_kernel()
    );
}

#[test]
fn each_network_namespace_has_its_own_ipvs_table() {
    require_lab();
    let a = Netns::new("smoke-a");
    let b = Netns::new("smoke-b");
    a.sh("ipvsadm -A -t 10.9.9.9:80 -s rr");
    assert!(a.sh("ipvsadm -Ln").contains("10.9.9.9:80"));
    assert!(!b.sh("ipvsadm -Ln").contains("10.9.9.9:80"));
}

#[test]
fn bpffs_and_tracefs_are_mounted() {
    require_lab();
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(mounts.contains(" /sys/fs/bpf bpf "), "{mounts}");
    assert!(mounts.contains("tracefs"), "{mounts}");
}
