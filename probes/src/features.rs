//! What the running kernel and the pin root offer the datapath, checked before anything is
//! loaded: [`KernelFeatures`] (what the agent lists at start-up, and the problems that stop it)
//! and [`check_pin_root`] (bpffs at the pin root). Each problem names its cause and its fix.
//!
//! | feature | needed for | without it |
//! |---|---|---|
//! | kernel ≥ [`MINIMUM_KERNEL`] (6.1) | the oldest kernel the lab tests the datapath on | refused |
//! | not PREEMPT_RT | the SNAT table's bucket locks assume a holder is never preempted | refused |
//! | `/sys/kernel/btf/vmlinux` | CO-RE relocations, the kfunc lookup | refused |
//! | bpffs at the pin root (statfs magic [`BPF_FS_MAGIC`]) | pinned maps, links, `xt_svc` | refused |
//! | TCX (kernel ≥ 6.6) | atomic link replacement | netlink clsact filters (`tc filter replace`) |
//! | `bpf_cast_to_kern_ctx` (6.2+) | direct packet writes (`nat_write`) | the BPF rewrite helpers |
//! | `ip_vs` loaded, with module BTF `/sys/kernel/btf/ip_vs` | the IPVS connection probe | no probe (the sweeper resolves nothing; docs/datapath.md) |
//! | fexit on `ip_vs_conn_new` (7 arguments: x86-64 trampolines take them from 6.6) | the cheaper probe | kretprobe |

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `BPF_FS_MAGIC` (`include/uapi/linux/magic.h`): `statfs(2)`'s `f_type` on bpffs.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The oldest kernel the datapath runs on: the oldest one the lab tests (Debian 12's 6.1).
/// Older kernels may verify the programs or may not; nothing checks them, so they are refused.
pub const MINIMUM_KERNEL: (u32, u32) = (6, 1);

/// The first kernel with TCX links.
pub const TCX_KERNEL: (u32, u32) = (6, 6);

/// The first kernel whose x86-64 BPF trampolines take the 7 arguments of `ip_vs_conn_new`
/// (fexit); older ones get the kretprobe.
pub const FEXIT_7_ARGS_KERNEL: (u32, u32) = (6, 6);

/// `(major, minor)` of a kernel release string (`6.1.0-28-amd64`, `6.18.44-fc`).
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-', '+']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether the kernel is PREEMPT_RT: `/sys/kernel/realtime` reads `1` (`realtime`: its
/// contents, `None` when the file is missing), or the version string (`uname -v`,
/// `/proc/sys/kernel/version`) says `PREEMPT_RT`.
pub fn is_preempt_rt(realtime: Option<&str>, version: &str) -> bool {
    realtime.is_some_and(|r| r.trim() == "1")
        || version
            .split(|c: char| c.is_whitespace())
            .any(|word| word == "PREEMPT_RT")
}

/// What the running kernel offers the datapath (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelFeatures {
    /// `uname -r`.
    pub release: String,
    /// `(major, minor)` of [`KernelFeatures::release`].
    pub version: Option<(u32, u32)>,
    /// `/sys/kernel/btf/vmlinux` exists.
    pub vmlinux_btf: bool,
    /// The `ip_vs` module is loaded (`/sys/module/ip_vs`).
    pub ip_vs_loaded: bool,
    /// The `ip_vs` module's BTF (`/sys/kernel/btf/ip_vs`; built-in ip_vs is in vmlinux's).
    pub ip_vs_btf: bool,
    /// TCX links (kernel ≥ 6.6).
    pub tcx: bool,
    /// The `bpf_cast_to_kern_ctx` kfunc (in vmlinux's BTF).
    pub kern_ctx: bool,
    /// fexit can be expected to attach to `ip_vs_conn_new` (x86-64, kernel ≥ 6.6); the loader
    /// tries it and falls back to kretprobe either way.
    pub fexit_likely: bool,
    /// A PREEMPT_RT kernel.
    pub preempt_rt: bool,
}

fn read_trimmed(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

impl KernelFeatures {
    /// Looks at the running kernel (files under `/proc` and `/sys`, vmlinux's BTF).
    pub fn detect() -> KernelFeatures {
        let release = read_trimmed("/proc/sys/kernel/osrelease").unwrap_or_default();
        let version = parse_release(&release);
        let uname_v = read_trimmed("/proc/sys/kernel/version").unwrap_or_default();
        let realtime = read_trimmed("/sys/kernel/realtime");
        let ip_vs_loaded = Path::new("/sys/module/ip_vs").exists();
        let vmlinux_btf = Path::new("/sys/kernel/btf/vmlinux").exists();
        KernelFeatures {
            vmlinux_btf,
            ip_vs_loaded,
            // Built in: its types are in vmlinux's BTF (no module BTF file).
            ip_vs_btf: Path::new("/sys/kernel/btf/ip_vs").exists()
                || (ip_vs_loaded && !Path::new("/sys/module/ip_vs/initstate").exists()),
            tcx: version.is_some_and(|v| v >= TCX_KERNEL),
            kern_ctx: vmlinux_btf && crate::loader::kernel_has_kern_ctx(),
            fexit_likely: cfg!(target_arch = "x86_64")
                && version.is_some_and(|v| v >= FEXIT_7_ARGS_KERNEL),
            preempt_rt: is_preempt_rt(realtime.as_deref(), &uname_v),
            release,
            version,
        }
    }

    /// What stops the datapath on this kernel, each with its cause and its fix (empty: it can
    /// run).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let (min_major, min_minor) = MINIMUM_KERNEL;
        match self.version {
            Some(v) if v >= MINIMUM_KERNEL => {}
            Some((major, minor)) => out.push(format!(
                "kernel {} ({major}.{minor}) is older than {min_major}.{min_minor}, the oldest \
                 kernel the datapath is tested on: upgrade the kernel, or run with \
                 --datapath none (IPVS alone, without SNAT)",
                self.release
            )),
            None => out.push(format!(
                "cannot tell the kernel's version from {:?} (/proc/sys/kernel/osrelease): the \
                 datapath needs {min_major}.{min_minor} or later",
                self.release
            )),
        }
        if self.preempt_rt {
            out.push(
                "the kernel is PREEMPT_RT (/sys/kernel/realtime or uname -v): the SNAT table's \
                 bucket locks assume a lock holder is never preempted, which a real-time \
                 kernel does not guarantee (packets would stall or be dropped): use a kernel \
                 without PREEMPT_RT, or run with --datapath none (IPVS alone, without SNAT)"
                    .to_owned(),
            );
        }
        if !self.vmlinux_btf {
            out.push(
                "the kernel has no BTF (/sys/kernel/btf/vmlinux is missing): the programs are \
                 CO-RE and need a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major \
                 distribution kernel is), or run with --datapath none"
                    .to_owned(),
            );
        }
        out
    }

    /// What the agent lists at start-up: `(feature, what this kernel gives)`.
    pub fn report(&self) -> Vec<(&'static str, String)> {
        let yes_no = |b: bool, yes: &str, no: &str| if b { yes } else { no }.to_owned();
        vec![
            ("kernel", self.release.clone()),
            (
                "minimum_kernel",
                format!("{}.{}", MINIMUM_KERNEL.0, MINIMUM_KERNEL.1),
            ),
            (
                "btf",
                yes_no(self.vmlinux_btf, "yes", "missing (/sys/kernel/btf/vmlinux)"),
            ),
            ("preempt_rt", yes_no(self.preempt_rt, "yes (refused)", "no")),
            (
                "tc_attach",
                yes_no(
                    self.tcx,
                    "tcx",
                    "netlink clsact (no TCX before 6.6: replaced with tc filter replace)",
                ),
            ),
            (
                "rewrite",
                yes_no(
                    self.kern_ctx,
                    "direct writes (bpf_cast_to_kern_ctx)",
                    "BPF helpers (no bpf_cast_to_kern_ctx before 6.2)",
                ),
            ),
            (
                "ipvs_probe",
                if !self.ip_vs_loaded {
                    "none: the ip_vs module is not loaded yet (tried again at attach)".to_owned()
                } else if !self.ip_vs_btf {
                    "none likely: no BTF for ip_vs (/sys/kernel/btf/ip_vs; kernel built without \
                     CONFIG_DEBUG_INFO_BTF_MODULES)"
                        .to_owned()
                } else if self.fexit_likely {
                    "fexit (kretprobe fallback)".to_owned()
                } else {
                    "kretprobe (fexit on ip_vs_conn_new needs 6.6 on x86-64)".to_owned()
                },
            ),
        ]
    }
}

/// `statfs(2)`'s `f_type` of a path.
fn fs_magic(path: &Path) -> std::io::Result<i64> {
    let stat = nix::sys::statfs::statfs(path).map_err(std::io::Error::from)?;
    #[allow(clippy::unnecessary_cast)] // the field's type differs between libcs
    Ok(stat.filesystem_type().0 as i64)
}

/// A file system's name for its `statfs` magic, for messages.
fn fs_name(magic: i64) -> String {
    match magic {
        0x0102_1994 => "tmpfs".to_owned(),
        0x6265_6572 => "sysfs".to_owned(),
        0x9fa0 => "proc".to_owned(),
        0xef53 => "ext2/3/4".to_owned(),
        0x5846_5342 => "xfs".to_owned(),
        0x9123_683e => "btrfs".to_owned(),
        0x794c_7630 => "overlayfs".to_owned(),
        0x2fc1_2fc1 => "zfs".to_owned(),
        m => format!("file system magic {m:#x}"),
    }
}

/// The nearest ancestor of `path` (itself included) that exists.
fn nearest_existing(path: &Path) -> Option<PathBuf> {
    path.ancestors()
        .find(|p| !p.as_os_str().is_empty() && p.exists())
        .map(Path::to_path_buf)
}

/// Checks that `pin_root` is on bpffs, or, when it does not exist yet, that its nearest
/// existing ancestor is (the loader creates the directories). The error names what is there
/// instead and how to mount bpffs.
pub fn check_pin_root(pin_root: &Path) -> Result<()> {
    let existing = nearest_existing(pin_root).unwrap_or_else(|| PathBuf::from("/"));
    let magic = fs_magic(&existing).map_err(|source| Error::Io {
        action: "statfs",
        path: existing.clone(),
        source,
    })?;
    if magic == BPF_FS_MAGIC {
        return Ok(());
    }
    let found = if existing == pin_root {
        format!("it is on {}", fs_name(magic))
    } else {
        format!(
            "it does not exist and {} is on {}",
            existing.display(),
            fs_name(magic)
        )
    };
    Err(Error::PinRootNotBpffs {
        path: pin_root.to_path_buf(),
        found,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preempt_rt_from_the_realtime_file_or_the_version_string() {
        assert!(is_preempt_rt(Some("1\n"), "#1 SMP PREEMPT_DYNAMIC"));
        assert!(is_preempt_rt(
            None,
            "#1 SMP PREEMPT_RT Debian 6.1.112-1 (2024-09-30)"
        ));
        assert!(is_preempt_rt(Some("0"), "#1 SMP PREEMPT_RT Thu Jan 1"));
        assert!(!is_preempt_rt(Some("0"), "#1 SMP PREEMPT_DYNAMIC"));
        assert!(!is_preempt_rt(None, "#1 SMP PREEMPT_DYNAMIC @0"));
        assert!(!is_preempt_rt(None, "#1 SMP PREEMPT Debian 6.1.112-1"));
        assert!(!is_preempt_rt(None, ""));
    }

    #[test]
    fn releases_parse_to_major_and_minor() {
        assert_eq!(parse_release("6.1.0-28-amd64\n"), Some((6, 1)));
        assert_eq!(parse_release("6.18.44-fc-v1272"), Some((6, 18)));
        assert_eq!(parse_release("6.12+deb13-amd64"), Some((6, 12)));
        assert_eq!(parse_release("garbage"), None);
    }

    fn features(version: (u32, u32)) -> KernelFeatures {
        KernelFeatures {
            release: format!("{}.{}.0", version.0, version.1),
            version: Some(version),
            vmlinux_btf: true,
            ip_vs_loaded: true,
            ip_vs_btf: true,
            tcx: version >= TCX_KERNEL,
            kern_ctx: version >= (6, 2),
            fexit_likely: version >= FEXIT_7_ARGS_KERNEL,
            preempt_rt: false,
        }
    }

    #[test]
    fn problems_name_the_minimum_kernel_rt_and_btf() {
        assert!(features((6, 1)).problems().is_empty());
        assert!(features((6, 18)).problems().is_empty());
        let old = features((5, 15)).problems();
        assert_eq!(old.len(), 1, "{old:?}");
        assert!(
            old[0].contains("5.15") && old[0].contains("6.1") && old[0].contains("--datapath none"),
            "{old:?}"
        );
        let rt = KernelFeatures {
            preempt_rt: true,
            ..features((6, 12))
        }
        .problems();
        assert!(
            rt.len() == 1 && rt[0].contains("PREEMPT_RT") && rt[0].contains("preempted"),
            "{rt:?}"
        );
        let no_btf = KernelFeatures {
            vmlinux_btf: false,
            ..features((6, 12))
        }
        .problems();
        assert!(
            no_btf.len() == 1 && no_btf[0].contains("CONFIG_DEBUG_INFO_BTF"),
            "{no_btf:?}"
        );
    }
}
