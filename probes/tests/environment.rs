//! Host tests of the loader's environment checks: a pin root outside bpffs (tmpfs mounted in
//! its place, or missing with no bpffs above it) is refused with an error naming bpffs and how
//! to mount it, before libbpf's "Invalid argument"; and the kernel feature report agrees with
//! the kernel's own view (`uname`, `/sys/kernel/btf`, bpftool's BTF dump). Mounting needs root:
//! without it those tests say so and pass.

use std::path::{Path, PathBuf};
use std::process::Command;

use probes::features::{self, KernelFeatures, MINIMUM_KERNEL, TCX_KERNEL};
use probes::{Datapath, DatapathOptions, Error, MapSizes};

fn small() -> MapSizes {
    MapSizes {
        svc_ports: 16,
        svc_addrs: 16,
        src_ranges: 16,
        cluster_cidrs: 16,
        devices: 16,
        snat: 64,
        conns: 64,
        frags: 16,
    }
}

/// A temporary directory with a tmpfs mounted on it; unmounted and removed on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(tag: &str) -> Option<Tmpfs> {
        let dir = std::env::temp_dir().join(format!("kib-env-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[track_caller]
fn assert_names_bpffs(error: &Error, pin_root: &Path, found: &str) {
    let message = error.to_string();
    assert!(
        matches!(error, Error::PinRootNotBpffs { .. }),
        "not a bpffs error: {message}"
    );
    for needle in [
        &pin_root.display().to_string(),
        "bpffs",
        "mount -t bpf bpf /sys/fs/bpf",
        found,
    ] {
        assert!(
            message.contains(needle),
            "{message:?} does not say {needle:?}"
        );
    }
}

#[test]
fn a_pin_root_on_tmpfs_is_refused_naming_bpffs() {
    let Some(tmpfs) = Tmpfs::mount("tmpfs") else {
        eprintln!("needs root (mount): skipped");
        return;
    };
    let pin_root = tmpfs.0.join("v2");
    std::fs::create_dir_all(&pin_root).expect("mkdir on tmpfs");
    // The kernel's own view: statfs says tmpfs there.
    let fstype = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(&pin_root)
        .output()
        .expect("stat -f");
    assert_eq!(String::from_utf8_lossy(&fstype.stdout).trim(), "tmpfs");
    let error = Datapath::load(DatapathOptions {
        pin_root: pin_root.clone(),
        map_sizes: small(),
        ..DatapathOptions::default()
    })
    .expect_err("a datapath pinned on tmpfs");
    assert_names_bpffs(&error, &pin_root, "it is on tmpfs");
    // Nothing was created there.
    assert_eq!(std::fs::read_dir(&pin_root).expect("read").count(), 0);
}

#[test]
fn a_missing_pin_root_without_bpffs_above_is_refused_naming_bpffs() {
    let Some(tmpfs) = Tmpfs::mount("missing") else {
        eprintln!("needs root (mount): skipped");
        return;
    };
    let pin_root = tmpfs.0.join("kube-ipvs-bpf/v2");
    let error = Datapath::load(DatapathOptions {
        pin_root: pin_root.clone(),
        map_sizes: small(),
        ..DatapathOptions::default()
    })
    .expect_err("a datapath pinned under tmpfs");
    assert_names_bpffs(
        &error,
        &pin_root,
        &format!("it does not exist and {} is on tmpfs", tmpfs.0.display()),
    );
    assert!(
        !pin_root.exists(),
        "the loader created {}",
        pin_root.display()
    );
}

#[test]
fn a_pin_root_on_bpffs_passes_the_check() {
    let Some(tmpfs) = Tmpfs::mount("bpffs") else {
        eprintln!("needs root (mount): skipped");
        return;
    };
    // A bpffs instance of its own, on a directory of the tmpfs.
    let dir = tmpfs.0.join("bpf");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let ok = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("cannot mount bpffs: skipped");
        return;
    }
    let checked = features::check_pin_root(&dir.join("kube-ipvs-bpf/v2"));
    let _ = Command::new("umount").arg(&dir).status();
    checked.expect("a missing pin root under bpffs");
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

#[test]
fn the_feature_report_matches_the_kernels_own_view() {
    let f = KernelFeatures::detect();
    let release = command_output("uname", &["-r"]).expect("uname -r");
    let uname_v = command_output("uname", &["-v"]).expect("uname -v");
    assert_eq!(f.release, release.trim());
    let version = features::parse_release(&release).expect("a kernel version");
    assert_eq!(f.version, Some(version));
    assert_eq!(f.tcx, version >= TCX_KERNEL, "TCX on {release}");
    assert_eq!(f.preempt_rt, uname_v.contains("PREEMPT_RT"), "{uname_v}");
    assert_eq!(f.vmlinux_btf, Path::new("/sys/kernel/btf/vmlinux").exists());
    assert_eq!(f.ip_vs_loaded, Path::new("/sys/module/ip_vs").exists());
    // bpftool's reading of the kernel's BTF, where bpftool is installed.
    if let Some(dump) = command_output(
        "bpftool",
        &["btf", "dump", "file", "/sys/kernel/btf/vmlinux"],
    ) {
        let has = dump
            .lines()
            .any(|l| l.starts_with("[") && l.contains("FUNC 'bpf_cast_to_kern_ctx'"));
        assert_eq!(f.kern_ctx, has, "bpf_cast_to_kern_ctx in vmlinux BTF");
    }
    let supported = version >= MINIMUM_KERNEL
        && !uname_v.contains("PREEMPT_RT")
        && Path::new("/sys/kernel/btf/vmlinux").exists();
    assert_eq!(f.problems().is_empty(), supported, "{:?}", f.problems());
    let report = f.report();
    let tc = report
        .iter()
        .find(|(k, _)| *k == "tc_attach")
        .map(|(_, v)| v.as_str());
    assert_eq!(tc == Some("tcx"), version >= TCX_KERNEL, "{report:?}");
}
