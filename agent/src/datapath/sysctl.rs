//! The sysctls this agent owns, and writing them through /proc/sys.
//!
//! | sysctl | value | why |
//! |---|---|---|
//! | `net.ipv4.vs.conntrack` | 0 | IPVS marks its packets untracked: no conntrack entry per service connection (kube-proxy's ipvs mode needs 1 for MASQUERADE; the SNAT here is done in eBPF). Per network namespace, so this agent cannot share a node with kube-proxy's ipvs mode. |
//! | `net.ipv4.vs.expire_nodest_conn` | 1 | connections to a deleted destination are expired at their next packet, as kube-proxy sets it |
//! | `net.ipv4.vs.expire_quiescent_template` | 1 | persistence templates to a weight-0 destination expire, as kube-proxy sets it |
//! | `net.ipv4.vs.conn_reuse_mode` | 0 on kernels < 5.9 | the 1 s SYN drop on port reuse (kubernetes#81775), as kube-proxy sets it; left alone on newer kernels |
//! | `net.ipv4.conf.all.arp_ignore` / `arp_announce` | 1 / 2 with strict ARP | service addresses on kube-ipvs0 are not answered for on other interfaces (kube-proxy's `ipvs.strictARP`) |
//!
//! `net.ipv4.vs.snat_reroute` depends on the node's routing policy at each check, not on the
//! kernel: `super::reroute` decides it.

use std::path::{Path, PathBuf};

/// A sysctl the agent sets: dotted name, value, and the reason (for logs and docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sysctl {
    pub name: &'static str,
    pub value: &'static str,
}

/// The sysctls to set on this kernel.
pub fn owned(kernel: Option<(u32, u32)>, strict_arp: bool) -> Vec<Sysctl> {
    let mut v = vec![
        Sysctl {
            name: "net.ipv4.vs.conntrack",
            value: "0",
        },
        Sysctl {
            name: "net.ipv4.vs.expire_nodest_conn",
            value: "1",
        },
        Sysctl {
            name: "net.ipv4.vs.expire_quiescent_template",
            value: "1",
        },
    ];
    if kernel.is_some_and(|k| k < (5, 9)) {
        v.push(Sysctl {
            name: "net.ipv4.vs.conn_reuse_mode",
            value: "0",
        });
    }
    if strict_arp {
        v.push(Sysctl {
            name: "net.ipv4.conf.all.arp_ignore",
            value: "1",
        });
        v.push(Sysctl {
            name: "net.ipv4.conf.all.arp_announce",
            value: "2",
        });
    }
    v
}

/// Where sysctls are written: `$KUBE_IPVS_BPF_PROC_SYS` (the DaemonSet mounts the host's
/// `/proc/sys/net` writable there, as container runtimes mount `/proc/sys` read-only), else
/// `/proc/sys`.
pub fn default_root() -> PathBuf {
    std::env::var_os("KUBE_IPVS_BPF_PROC_SYS")
        .unwrap_or_else(|| "/proc/sys".into())
        .into()
}

fn path_in(root: &Path, name: &str) -> PathBuf {
    root.join(name.replace('.', "/"))
}

#[cfg(test)]
fn path(name: &str) -> PathBuf {
    path_in(&default_root(), name)
}

/// Reads a sysctl (trimmed) under `root` (see [`default_root`]).
pub fn read_in(root: &Path, name: &str) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path_in(root, name))?
        .trim()
        .to_string())
}

/// Reads a sysctl (trimmed).
pub fn read(name: &str) -> std::io::Result<String> {
    read_in(&default_root(), name)
}

/// Sets a sysctl under `root` if it differs; returns the previous value when it changed.
pub fn set_in(root: &Path, s: &Sysctl) -> std::io::Result<Option<String>> {
    let old = read_in(root, s.name)?;
    if old == s.value {
        return Ok(None);
    }
    std::fs::write(path_in(root, s.name), s.value)?;
    Ok(Some(old))
}

/// Sets a sysctl if it differs; returns the previous value when it changed.
pub fn set(s: &Sysctl) -> std::io::Result<Option<String>> {
    set_in(&default_root(), s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_reuse_mode_only_on_old_kernels_and_arp_only_when_strict() {
        let names = |v: Vec<Sysctl>| v.into_iter().map(|s| s.name).collect::<Vec<_>>();
        assert!(!names(owned(Some((6, 1)), false)).contains(&"net.ipv4.vs.conn_reuse_mode"));
        assert!(names(owned(Some((5, 4)), false)).contains(&"net.ipv4.vs.conn_reuse_mode"));
        assert!(names(owned(Some((6, 12)), true)).contains(&"net.ipv4.conf.all.arp_ignore"));
        assert_eq!(
            owned(Some((6, 12)), false)[0],
            Sysctl {
                name: "net.ipv4.vs.conntrack",
                value: "0"
            }
        );
        assert_eq!(
            path("net.ipv4.vs.conntrack"),
            PathBuf::from("/proc/sys/net/ipv4/vs/conntrack")
        );
    }
}
