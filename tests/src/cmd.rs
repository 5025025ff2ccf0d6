//! Running shell commands from tests: the kernel's tools (ipvsadm, ip, nft, conntrack…) are
//! how tests look at the kernel's view.

use std::process::Command;

/// Runs `cmd` with `sh -c` and returns its stdout; panics with stderr when it fails.
pub fn sh(cmd: &str) -> String {
    try_sh(cmd).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Like [`sh`], but a failure is an error (for the benchmark programs, which must not panic).
pub fn try_sh(cmd: &str) -> anyhow::Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run `{cmd}`: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "`{cmd}` failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
