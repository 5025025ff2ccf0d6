//! `kube-ipvs-bpf init`: the node preparation the DaemonSet's init container does before the
//! agent starts (as kube-proxy's `--init-only`), so the image needs no shell: mounting bpffs
//! where the datapath pins its maps and links, if nothing is mounted there yet.
//!
//! It is idempotent: when the pin root (or its nearest existing ancestor) already lies on
//! bpffs, it changes nothing. The mount is made with mount(2) directly (no `mount` binary).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::errno::Errno;
use nix::mount::{MsFlags, mount};

/// Where bpffs is mounted by default (systemd mounts it there too).
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// What `init` prepares.
#[derive(Clone, Debug)]
pub struct InitConfig {
    /// The bpffs mount point: mounted there when the pin root is not on bpffs.
    pub bpffs: PathBuf,
    /// The datapath's pin root; it must lie under `bpffs`.
    pub pin_root: PathBuf,
}

/// What `run` did, for the log and the tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitOutcome {
    /// The pin root was already on bpffs: nothing was changed.
    AlreadyMounted,
    /// bpffs was mounted at the mount point.
    Mounted,
}

/// Mounts bpffs at `config.bpffs` unless the pin root is already on bpffs.
pub fn run(config: &InitConfig) -> anyhow::Result<InitOutcome> {
    let InitConfig { bpffs, pin_root } = config;
    if !pin_root.starts_with(bpffs) {
        bail!(
            "the BPF pin root {} is not under the bpffs mount point {}",
            pin_root.display(),
            bpffs.display()
        );
    }
    if probes::features::check_pin_root(pin_root).is_ok() {
        tracing::info!(path = %bpffs.display(), "bpffs is already mounted");
        return Ok(InitOutcome::AlreadyMounted);
    }
    std::fs::create_dir_all(bpffs)
        .with_context(|| format!("cannot create the bpffs mount point {}", bpffs.display()))?;
    mount_bpffs(bpffs)?;
    probes::features::check_pin_root(pin_root).with_context(|| {
        format!(
            "bpffs was mounted at {} but the pin root is still not on it",
            bpffs.display()
        )
    })?;
    tracing::info!(path = %bpffs.display(), "mounted bpffs");
    Ok(InitOutcome::Mounted)
}

/// mount -t bpf bpf PATH -o nosuid,nodev,noexec,mode=0700 (systemd's options).
fn mount_bpffs(path: &Path) -> anyhow::Result<()> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RELATIME;
    match mount(Some("bpf"), path, Some("bpf"), flags, Some("mode=0700")) {
        Ok(()) => Ok(()),
        Err(Errno::EPERM) => bail!(
            "cannot mount bpffs at {}: mount(2) needs CAP_SYS_ADMIN (the init container must be \
             privileged, as Bidirectional mount propagation requires), or mount bpffs on the \
             host (systemd does by default)",
            path.display()
        ),
        Err(e) => Err(std::io::Error::from(e))
            .with_context(|| format!("cannot mount bpffs at {}", path.display())),
    }
}
