//! What the lab tests share: running commands, network namespaces, and parsers for the
//! kernel's own view of its state (ipvsadm, conntrack). Lab tests are the cargo test targets
//! named `lab_*` (declared with `test = false`, so a plain `cargo test` skips them);
//! `scripts/lab test` builds them and runs them inside the QEMU kernel lab, where
//! [`require_lab`] holds.

pub mod agent;
pub mod apiserver;
pub mod cmd;
pub mod fake_apiserver;
pub mod ipvsadm;
pub mod kube_proxy;
pub mod netns;
pub mod oci;
pub mod topology;
pub mod traffic;

pub use cmd::{sh, sh_ok, sh_status, try_sh};
pub use netns::Netns;
pub use topology::Topology;

/// Panics with a clear message unless running inside the kernel lab (`scripts/lab test`
/// sets `LAB=1`): lab tests change the kernel's global state and need IPVS.
pub fn require_lab() {
    if std::env::var("LAB").as_deref() != Ok("1") {
        panic!("this is a lab test: run it with `scripts/lab test` (it needs a real IPVS kernel)");
    }
}

/// The kernel series the lab booted ("6.1" or "6.12"), from `LAB_KERNEL`.
pub fn lab_kernel() -> String {
    std::env::var("LAB_KERNEL").unwrap_or_else(|_| "host".to_string())
}

/// The image's root filesystem as `scripts/lab` stages it (`LAB_IMAGE_ROOTFS`, default
/// /lab/image/rootfs): scripts/image's amd64 one, or its arm64 one in the arm64 lab. Panics
/// naming the path when it holds no agent.
pub fn image_rootfs() -> std::path::PathBuf {
    let p = std::path::PathBuf::from(
        std::env::var("LAB_IMAGE_ROOTFS").unwrap_or_else(|_| "/lab/image/rootfs".into()),
    );
    assert!(
        p.join("usr/local/bin/kube-ipvs-bpf").exists(),
        "no image root filesystem at {} (scripts/image builds it, scripts/lab stages it)",
        p.display()
    );
    p
}

/// Directory where a test may leave artifacts; the lab copies it back to the host.
pub fn artifacts_dir(test: &str) -> std::path::PathBuf {
    let base = std::env::var("LAB_ARTIFACTS").unwrap_or_else(|_| "/lab/artifacts".to_string());
    let dir = std::path::Path::new(&base).join(test);
    let _ = std::fs::create_dir_all(&dir);
    dir
}
