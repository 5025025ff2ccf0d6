//! What the agent's host-kernel tests share: a pin directory removed on drop, the check that
//! the test can load a datapath at all (root and bpffs, mounted when missing), and running code
//! in a network namespace of its own. Each test file uses a part of it.
#![allow(dead_code)]

use std::path::PathBuf;

/// A pin directory under bpffs, with every pin below it removed on drop.
pub struct Pins(pub PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = probes::loader::remove_pins(&self.0);
    }
}

/// A pin directory of its own for test `name` (this process's id appended).
pub fn test_pins(name: &str) -> Pins {
    Pins(PathBuf::from(format!(
        "/sys/fs/bpf/kib-agent-{name}-{}",
        std::process::id()
    )))
}

/// Map sizes small enough for a test to load many datapaths.
pub fn small_map_sizes() -> probes::MapSizes {
    probes::MapSizes {
        svc_ports: 64,
        svc_addrs: 64,
        src_ranges: 64,
        cluster_cidrs: 64,
        devices: 64,
        snat: 256,
        conns: 256,
        frags: 64,
    }
}

/// Whether bpffs is mounted at /sys/fs/bpf (mounting it when it is not).
fn bpffs() -> bool {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"));
    mounted
        || std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .is_ok_and(|s| s.success())
}

/// Whether this process can load a datapath (root, bpffs); says so when it cannot, and the
/// test then passes without running.
pub fn can_load_datapath() -> bool {
    if !nix::unistd::geteuid().is_root() || !bpffs() {
        eprintln!("needs root and bpffs: skipped");
        return false;
    }
    true
}

/// A datapath loaded under `pins` (layout `v2`) with `map_sizes`, the default config, device 1
/// translating to `node`, and one service port, `vip`:80/TCP, as service id 7. (Not every test
/// file that shares this module loads one.)
pub fn load_with_one_service(
    pins: &Pins,
    map_sizes: probes::MapSizes,
    node: std::net::Ipv4Addr,
    vip: std::net::Ipv4Addr,
) -> probes::Datapath {
    use probes::maps::{Config, DevValue, L4Proto, SvcKey, SvcValue};
    let dp = probes::Datapath::load(probes::DatapathOptions {
        pin_root: pins.0.join("v2"),
        map_sizes,
        ..probes::DatapathOptions::default()
    })
    .expect("load datapath");
    let maps = dp.maps();
    maps.set_config(&Config::default()).expect("config");
    maps.set_device(1, &DevValue::new(Some(node), None))
        .expect("device");
    maps.svc_ports
        .insert(
            &SvcKey::new(std::net::IpAddr::V4(vip), 80, L4Proto::Tcp),
            &SvcValue {
                flags: 0,
                svc_id: 7,
            },
        )
        .expect("svc_ports");
    dp
}

/// Runs `f` on a thread in a new network namespace; `None` when one cannot be made.
pub fn in_netns<R: Send>(f: impl FnOnce() -> R + Send) -> Option<R> {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            Some(f())
        })
        .join()
        .expect("test thread panicked")
    })
}

/// Whether a test must be skipped: not root, or one of `tools` (program, version flag) does not
/// run. Says which; the test then passes without running.
pub fn skip_without(tools: &[(&str, &str)]) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return true;
    }
    for (tool, flag) in tools {
        if !std::process::Command::new(tool)
            .arg(flag)
            .output()
            .is_ok_and(|o| o.status.success())
        {
            eprintln!("skipped: {tool} not installed");
            return true;
        }
    }
    false
}

/// Runs `cmd` with `sh -c` and returns its output; panics (with its stderr) when it fails.
pub fn sh(cmd: &str) -> String {
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
