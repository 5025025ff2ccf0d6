//! Build script: records the git commit the binary is built from, for `--version`
//! (`KUBE_IPVS_BPF_COMMIT`; from the environment when set, e.g. in an image build without
//! `.git`, else `git rev-parse`, else "unknown").

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=KUBE_IPVS_BPF_COMMIT");
    let commit = match std::env::var("KUBE_IPVS_BPF_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_owned(),
        _ => {
            // Rebuild when HEAD moves: HEAD itself (a branch switch) and the branch's ref.
            if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
                println!("cargo:rerun-if-changed={dir}/HEAD");
            }
            if let (Some(common), Some(head)) = (
                git(&["rev-parse", "--git-common-dir"]),
                git(&["rev-parse", "--symbolic-full-name", "HEAD"]),
            ) {
                println!("cargo:rerun-if-changed={common}/{head}");
                println!("cargo:rerun-if-changed={common}/packed-refs");
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=KUBE_IPVS_BPF_COMMIT={commit}");
}
