//! Running shell commands from tests: the kernel's tools (ipvsadm, ip, nft, conntrack…) are
//! how tests look at the kernel's view.

use std::process::Command;

/// Runs `cmd` with `sh -c` and returns its stdout; panics with stderr when it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{cmd}`: {e}"));
    if !out.status.success() {
        panic!(
            "`{cmd}` failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` and returns (exit code, stdout, stderr) without judging it.
pub fn sh_status(cmd: &str) -> (i32, String, String) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{cmd}`: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `cmd` and reports whether it exited 0.
pub fn sh_ok(cmd: &str) -> bool {
    sh_status(cmd).0 == 0
}
