//! `kube-ipvs-bpf init` on the host, each case in a private mount namespace (`unshare
//! --mount --propagation private`) so nothing reaches the host's mounts: it mounts bpffs at
//! the mount point (the kernel's mountinfo shows one bpf mount there), a second run changes
//! nothing, and without CAP_SYS_ADMIN it fails naming the capability.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_kube-ipvs-bpf");

fn skip_unless_root_with(tools: &[&str]) -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root");
        return true;
    }
    for t in tools {
        if Command::new("which")
            .arg(t)
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            eprintln!("skipped: {t} not installed");
            return true;
        }
    }
    false
}

/// Runs `script` with `sh` in a new private mount namespace; returns (status ok, stdout, stderr).
fn in_private_mount_ns(script: &str) -> (bool, String, String) {
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .output()
        .expect("unshare runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The mountinfo lines (the kernel's view, inside the namespace) whose mount point is `dir`.
fn mountinfo_script(dir: &Path) -> String {
    format!(
        "awk '$5 == \"{}\" {{ for (i = 7; i <= NF; i++) if ($i == \"-\") print $(i+1) }}' /proc/self/mountinfo",
        dir.display()
    )
}

#[test]
fn init_mounts_bpffs_once_and_a_second_run_changes_nothing() {
    if skip_unless_root_with(&["unshare", "awk"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let bpffs = tmp.path().join("bpf");
    let pin_root = bpffs.join("kube-ipvs-bpf/v2");
    let init = format!(
        "{BIN} init --bpffs {} --bpf-pin-root {}",
        bpffs.display(),
        pin_root.display()
    );
    let script = format!("set -e; {init}; {init}; {}", mountinfo_script(&bpffs));
    let (ok, stdout, stderr) = in_private_mount_ns(&script);
    assert!(ok, "init failed: {stderr}");
    let types: Vec<&str> = stdout.lines().collect();
    assert_eq!(types, ["bpf"], "mounts at {}: {stdout}", bpffs.display());
    assert!(stderr.contains("mounted bpffs"), "{stderr}");
    assert!(stderr.contains("already mounted"), "{stderr}");
}

#[test]
fn init_without_cap_sys_admin_fails_naming_it() {
    if skip_unless_root_with(&["unshare", "setpriv", "awk"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let bpffs = tmp.path().join("bpf");
    let script = format!(
        "setpriv --inh-caps=-sys_admin --bounding-set=-sys_admin {BIN} init --bpffs {} \
         --bpf-pin-root {}/pins; echo rc=$?; {}",
        bpffs.display(),
        bpffs.display(),
        mountinfo_script(&bpffs)
    );
    let (_, stdout, stderr) = in_private_mount_ns(&script);
    assert!(stdout.starts_with("rc=1\n"), "{stdout} {stderr}");
    assert_eq!(stdout.lines().count(), 1, "nothing is mounted: {stdout}");
    assert!(stderr.contains("CAP_SYS_ADMIN"), "{stderr}");
}

#[test]
fn init_refuses_a_pin_root_outside_the_mount_point() {
    let out = Command::new(BIN)
        .args([
            "init",
            "--bpffs",
            "/nonexistent/bpf",
            "--bpf-pin-root",
            "/elsewhere/pins",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not under the bpffs mount point"),
        "{stderr}"
    );
}

/// kube-proxy's `--init-only` is `init` with the defaults: with `/sys/fs/bpf` hidden under a
/// tmpfs (a private mount namespace), it mounts bpffs there and exits.
#[test]
fn kube_proxy_init_only_mounts_bpffs_at_the_default_place() {
    if skip_unless_root_with(&["unshare", "awk"]) {
        return;
    }
    let script = format!(
        "mount -t tmpfs tmpfs /sys/fs/bpf && {BIN} --init-only && {}",
        mountinfo_script(Path::new("/sys/fs/bpf"))
    );
    let (ok, stdout, stderr) = in_private_mount_ns(&script);
    assert!(ok, "--init-only failed: {stderr}");
    assert_eq!(stdout.lines().last(), Some("bpf"), "{stdout}");
    assert!(stderr.contains("mounted bpffs"), "{stderr}");
}
