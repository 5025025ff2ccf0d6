//! The lab itself: the booted kernel has what every other lab test relies on, and the staged
//! agent and image root filesystem are built for the booted machine.

use std::path::Path;

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
    // (Trimmed: uname's newline made the arm64 label's suffix check fail.)
    let release = sh("uname -r");
    let release = release.trim();
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

/// The ELF machine (`e_machine`) of the executable at `path`.
fn elf_machine(path: &Path) -> u16 {
    let elf = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&elf[..4], b"\x7fELF", "{} is no ELF", path.display());
    // e_machine, little-endian at offset 18.
    u16::from_le_bytes([elf[18], elf[19]])
}

/// This machine's ELF `e_machine`: EM_X86_64 62, EM_AARCH64 183.
fn this_machine() -> u16 {
    match std::env::consts::ARCH {
        "x86_64" => 62,
        "aarch64" => 183,
        other => panic!("the lab runs x86_64 and aarch64, not {other}"),
    }
}

/// The staged agent (the image's stripped binary: amd64's, or arm64's in the arm64 lab) is an ELF
/// for this machine and runs: `--version` names the crate's version.
#[test]
fn the_staged_agent_is_built_for_this_machine_and_runs() {
    require_lab();
    let path = lab::agent::agent_path();
    let machine = elf_machine(&path);
    assert_eq!(
        machine,
        this_machine(),
        "{} is built for machine {machine}",
        path.display()
    );
    let out = sh(&format!("{} --version", path.display()));
    assert!(
        out.contains(env!("CARGO_PKG_VERSION")),
        "--version printed {out:?}"
    );
}

/// The image's root filesystem (scripts/image's amd64 one, or its arm64 one in the arm64 lab) is
/// built for this machine and its programs run here on its own libraries: chrooted into it, the
/// agent prints its version and `iptables-restore`, the one program the agent runs, answers
/// through Debian's alternatives.
#[test]
fn the_image_root_filesystem_is_built_for_this_machine_and_runs() {
    require_lab();
    let root = lab::image_rootfs();
    let agent = root.join("usr/local/bin/kube-ipvs-bpf");
    let machine = elf_machine(&agent);
    assert_eq!(
        machine,
        this_machine(),
        "{} is built for machine {machine}",
        agent.display()
    );
    let in_root = |cmd: &str| {
        sh(&format!(
            "env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin chroot {} {cmd} 2>&1",
            root.display()
        ))
    };
    let out = in_root("/usr/local/bin/kube-ipvs-bpf --version");
    assert!(
        out.contains(env!("CARGO_PKG_VERSION")),
        "the image's agent --version printed {out:?}"
    );
    let out = in_root("iptables-restore --version");
    assert!(
        out.starts_with("iptables-restore v"),
        "the image's iptables-restore --version printed {out:?}"
    );
}
