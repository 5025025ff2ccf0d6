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
    // The lab's kernel label is the version, with "-arm64" for Debian's arm64 kernels.
    let release = sh("uname -r");
    let label = lab::lab_kernel();
    let (version, arch) = label.split_once('-').unwrap_or((&label, ""));
    assert!(
        release.starts_with(version) && release.ends_with(arch),
        "booted {release}, expected {label}"
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

/// The staged agent (the image's stripped binary: amd64's, or arm64's in the arm64 lab) is an ELF
/// for this machine and runs: `--version` names the crate's version.
#[test]
fn the_staged_agent_is_built_for_this_machine_and_runs() {
    require_lab();
    let path = lab::agent::agent_path();
    let elf = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&elf[..4], b"\x7fELF", "{} is no ELF", path.display());
    // e_machine, little-endian at offset 18: EM_X86_64 62, EM_AARCH64 183.
    let machine = u16::from_le_bytes([elf[18], elf[19]]);
    let expected = match std::env::consts::ARCH {
        "x86_64" => 62,
        "aarch64" => 183,
        other => panic!("the lab runs x86_64 and aarch64, not {other}"),
    };
    assert_eq!(
        machine,
        expected,
        "{} is built for machine {machine}",
        path.display()
    );
    let out = sh(&format!("{} --version", path.display()));
    assert!(
        out.contains(env!("CARGO_PKG_VERSION")),
        "--version printed {out:?}"
    );
}
