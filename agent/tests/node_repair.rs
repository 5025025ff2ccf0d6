//! Host-kernel tests of the node state repair (`agent::node_state`, `Datapath::repair_node`,
//! `Datapath::sync_devices`): each runs in a fresh network namespace of its own (unshared by
//! its thread) with the real iptables-nft, nf_tables, sysctls and TCX of the running kernel, and
//! checks the kernel's own view afterwards (`iptables-save`, `/proc/sys`, pinned links, the
//! kernel's list of BPF links). The host kernel has no IPVS: the `vs.*` sysctls are files under
//! a stand-in sysctl root (`net/ipv4/conf` in it is the namespace's real one); the lab covers the
//! real `vs.conntrack` (`tests/lab/agent.rs`). A test whose tools or privileges are missing says
//! so and passes.

mod common;

use common::{in_netns, sh, small_map_sizes};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent::admin::metrics::Metrics;
use agent::datapath::reroute::SnatReroute;
use agent::datapath::{Datapath, DatapathConfig, rules};
use agent::node_state::{DesiredNodeState, NodeStatePhase, Part, RepairReport};

/// The service mark the tests' agent configures (the default).
const MARK_SVC: u32 = probes::maps::DEFAULT_MARK_SVC;

/// Our accept of service traffic in INPUT and FORWARD, as `iptables-save` prints it.
fn service_accept() -> String {
    format!(
        "-m mark --mark {MARK_SVC:#x}/{MARK_SVC:#x} -m comment --comment \"{}\" -j ACCEPT",
        rules::SERVICE_ACCEPT
    )
}

fn skip() -> bool {
    if common::skip_without(&[
        ("iptables-nft-save", "--version"),
        ("nft", "--version"),
        ("ip", "-V"),
    ]) {
        return true;
    }
    let bpffs = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"));
    if !bpffs {
        eprintln!("skipped: bpffs is not mounted");
    }
    !bpffs
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A pin directory (a layout `v2` under a per-test root) and a stand-in sysctl root, both
/// removed on drop.
struct Scratch {
    root: PathBuf,
    sysctls: tempfile::TempDir,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let root = PathBuf::from(format!(
            "/sys/fs/bpf/kib-repair-{tag}-{}",
            std::process::id()
        ));
        let _ = probes::loader::remove_pins(&root.join("v2"));
        let sysctls = tempfile::tempdir().unwrap();
        let vs = sysctls.path().join("net/ipv4/vs");
        std::fs::create_dir_all(&vs).unwrap();
        for (name, value) in [
            ("conntrack", "1"),
            ("expire_nodest_conn", "0"),
            ("expire_quiescent_template", "0"),
            ("snat_reroute", "1"),
        ] {
            std::fs::write(vs.join(name), value).unwrap();
        }
        std::os::unix::fs::symlink(
            "/proc/sys/net/ipv4/conf",
            sysctls.path().join("net/ipv4/conf"),
        )
        .unwrap();
        if Path::new("/proc/sys/net/ipv6").exists() {
            std::os::unix::fs::symlink("/proc/sys/net/ipv6", sysctls.path().join("net/ipv6"))
                .unwrap();
        }
        Scratch { root, sysctls }
    }

    fn config(&self) -> DatapathConfig {
        DatapathConfig {
            pin_root: self.root.join("v2"),
            rules_backend: rules::Backend::Nft,
            strict_arp: true,
            map_sizes: small_map_sizes(),
            sysctl_root: self.sysctls.path().to_path_buf(),
            ..DatapathConfig::default()
        }
    }

    fn links_dir(&self) -> PathBuf {
        self.root.join("v2").join("links")
    }

    /// The TCX link pins (file names).
    fn tcx_pins(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.links_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("tcx_"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = probes::loader::remove_pins(&self.root.join("v2"));
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The index of device `name` in the thread's namespace (`/sys/class/net` shows the host's).
fn ifindex(name: &str) -> u32 {
    let out = sh(&format!("ip -o link show dev {name}"));
    out.split(':').next().unwrap().trim().parse().unwrap()
}

fn veth(name: &str) -> u32 {
    sh(&format!(
        "ip link add {name} type veth peer name {name}p && ip link set {name} up && ip link set {name}p up"
    ));
    ifindex(name)
}

/// Reads the namespace's links and addresses and syncs the datapath's devices with them.
fn sync_devices(rt: &tokio::runtime::Runtime, dp: &mut Datapath) {
    let rtnl = rt.block_on(async { agent::node::Rtnl::connect() }).unwrap();
    let (links, entries) = rt.block_on(agent::sync::read_node(&rtnl)).unwrap();
    let report = dp.sync_devices(&links, &entries, (Some("192.0.2.1".parse().unwrap()), None));
    assert!(report.failures.is_empty(), "{:?}", report.failures);
}

/// The id of the BPF link pinned at `path`.
fn link_id(path: &Path) -> u32 {
    libbpf_rs::Link::open(path)
        .expect("pinned link")
        .info()
        .expect("link info")
        .id
}

/// Whether the kernel still has a BPF link with this id.
fn kernel_has_link(id: u32) -> bool {
    libbpf_rs::query::LinkInfoIter::default().any(|l| l.id == id)
}

fn parts(report: &RepairReport) -> Vec<Part> {
    report.repairs.iter().map(|r| r.part).collect()
}

#[test]
fn tcx_link_pins_of_deleted_devices_are_collected_at_start_and_while_running() {
    if skip() || !probes::loader::kernel_has_tcx() {
        eprintln!("skipped (needs TCX too)");
        return;
    }
    let scratch = Scratch::new("tcx");
    in_netns(|| {
        let rt = runtime();
        let gone_while_down = veth("kibdown");
        let gone_while_up = veth("kibup");
        let mut dp = Datapath::start(scratch.config()).expect("start the datapath");
        sync_devices(&rt, &mut dp);
        let pin = |index: u32, dir: &str| format!("tcx_{index}_{dir}");
        let pins = scratch.tcx_pins();
        for index in [gone_while_down, gone_while_up] {
            assert!(pins.contains(&pin(index, "ingress")), "{pins:?}");
            assert!(pins.contains(&pin(index, "egress")), "{pins:?}");
        }
        let down_links: Vec<u32> = ["ingress", "egress"]
            .map(|d| link_id(&scratch.links_dir().join(pin(gone_while_down, d))))
            .to_vec();

        // The agent stops; a device goes while it is down; a new agent starts.
        drop(dp);
        sh("ip link del kibdown");
        let mut dp = Datapath::start(scratch.config()).expect("restart the datapath");
        sync_devices(&rt, &mut dp);
        let pins = scratch.tcx_pins();
        assert!(
            !pins
                .iter()
                .any(|p| p.starts_with(&format!("tcx_{gone_while_down}_"))),
            "stale pins left: {pins:?}"
        );
        for id in down_links {
            assert!(!kernel_has_link(id), "the kernel still holds link {id}");
        }
        assert!(pins.contains(&pin(gone_while_up, "ingress")), "{pins:?}");

        // A device goes while the agent runs.
        let up_links: Vec<u32> = ["ingress", "egress"]
            .map(|d| link_id(&scratch.links_dir().join(pin(gone_while_up, d))))
            .to_vec();
        sh("ip link del kibup");
        sync_devices(&rt, &mut dp);
        let pins = scratch.tcx_pins();
        assert!(
            !pins
                .iter()
                .any(|p| p.starts_with(&format!("tcx_{gone_while_up}_"))),
            "stale pins left: {pins:?}"
        );
        for id in up_links {
            assert!(!kernel_has_link(id), "the kernel still holds link {id}");
        }
    })
    .expect("a network namespace");
}

#[test]
fn rules_sysctls_and_tc_programs_are_repaired_logged_and_counted() {
    if skip() {
        return;
    }
    let scratch = Scratch::new("rules");
    in_netns(|| {
        let rt = runtime();
        let nft_events = agent::node_state::nftables_events().expect("nf_tables monitor");
        let mut nft_events = nft_events;
        let dev = veth("kibrep");
        let mut dp = Datapath::start(scratch.config()).expect("start the datapath");
        sync_devices(&rt, &mut dp);
        let metrics = Metrics::new(&[]);
        let arp_ignore = "/proc/sys/net/ipv4/conf/all/arp_ignore";
        let conntrack = scratch.sysctls.path().join("net/ipv4/vs/conntrack");
        let missing = |ipv6: bool| {
            let tool = if ipv6 {
                "ip6tables-nft-save"
            } else {
                "iptables-nft-save"
            };
            rules::missing(
                &sh(&format!("{tool} -t raw; {tool} -t filter")),
                MARK_SVC,
                false,
                rules::Notrack::Nftables,
            )
        };

        // Start wrote everything: nothing to repair.
        assert_eq!(std::fs::read_to_string(arp_ignore).unwrap().trim(), "1");
        assert_eq!(std::fs::read_to_string(&conntrack).unwrap().trim(), "0");
        assert!(missing(false).is_empty() && missing(true).is_empty());
        let r = dp.repair_node();
        assert!(r.repairs.is_empty() && r.failures.is_empty(), "{r:?}");

        // A firewall reload: the whole ruleset flushed. The monitor notices.
        while nft_events.try_recv().is_ok() {}
        sh("nft flush ruleset");
        let deadline = Instant::now() + Duration::from_secs(10);
        while nft_events.try_recv().is_err() {
            assert!(
                Instant::now() < deadline,
                "no nf_tables notice of the flush"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!missing(false).is_empty());
        let r = dp.repair_node();
        assert_eq!(
            parts(&r),
            vec![Part::Nftables, Part::Iptables, Part::Iptables],
            "{r:?}"
        );
        assert!(
            r.repairs[0]
                .found
                .contains("chain inet kube-ipvs-bpf prerouting missing"),
            "{r:?}"
        );
        assert!(
            r.repairs[1].found.contains(&format!(
                "rule \"{}\" missing from INPUT",
                rules::SERVICE_ACCEPT
            )),
            "{r:?}"
        );
        assert!(sh("nft list table inet kube-ipvs-bpf").contains("notrack"));
        metrics.node_repairs(&r.repairs);
        assert_eq!(missing(false), Vec::<String>::new());
        assert_eq!(missing(true), Vec::<String>::new());

        // Our accept deleted, two sysctls changed by someone else.
        sh(&format!("iptables-nft -D INPUT {}", service_accept()));
        std::fs::write(arp_ignore, "0").unwrap();
        std::fs::write(&conntrack, "1").unwrap();
        let r = dp.repair_node();
        assert_eq!(
            parts(&r),
            vec![Part::Sysctl, Part::Sysctl, Part::Iptables],
            "{r:?}"
        );
        assert_eq!(r.repairs[0].found, "net.ipv4.vs.conntrack = 1 (want 0)");
        assert_eq!(
            r.repairs[1].found,
            "net.ipv4.conf.all.arp_ignore = 0 (want 1)"
        );
        assert_eq!(
            r.repairs[2].found,
            format!(
                "IPv4: rule \"{}\" missing from INPUT",
                rules::SERVICE_ACCEPT
            )
        );
        metrics.node_repairs(&r.repairs);
        assert_eq!(std::fs::read_to_string(arp_ignore).unwrap().trim(), "1");
        assert_eq!(std::fs::read_to_string(&conntrack).unwrap().trim(), "0");
        assert_eq!(missing(false), Vec::<String>::new());

        // The TC programs taken off the device (our link detached behind our back).
        let tc_pin = scratch.links_dir().join(format!("tcx_{dev}_ingress"));
        let tc_attached = probes::loader::kernel_has_tcx();
        if tc_attached {
            let program = libbpf_rs::Link::open(&tc_pin)
                .unwrap()
                .info()
                .unwrap()
                .prog_id;
            libbpf_rs::Link::open(&tc_pin).unwrap().detach().unwrap();
            let r = dp.repair_node();
            assert_eq!(parts(&r), vec![Part::Tc], "{r:?}");
            assert!(r.repairs[0].found.contains("kibrep"), "{r:?}");
            metrics.node_repairs(&r.repairs);
            let info = libbpf_rs::Link::open(&tc_pin).unwrap().info().unwrap();
            assert_eq!(info.prog_id, program);
            match info.info {
                libbpf_rs::query::LinkTypeInfo::Tcx(tcx) => assert_eq!(tcx.ifindex, dev),
                other => panic!("not a TCX link: {other:?}"),
            }
        } else {
            sh("tc qdisc del dev kibrep clsact");
            let r = dp.repair_node();
            assert_eq!(parts(&r), vec![Part::Tc], "{r:?}");
            metrics.node_repairs(&r.repairs);
            assert!(sh("tc filter show dev kibrep ingress").contains("bpf"));
        }
        let r = dp.repair_node();
        assert!(r.repairs.is_empty() && r.failures.is_empty(), "{r:?}");

        let text = metrics.encode();
        for (what, n) in [
            ("iptables", 3),
            ("nftables", 1),
            ("sysctl", 2),
            ("tc", 1),
            ("kube_ipvs0", 0),
        ] {
            let line = format!("kube_ipvs_bpf_node_repairs_total{{what=\"{what}\"}} {n}");
            assert!(text.contains(&line), "{line} not in:\n{text}");
        }
    })
    .expect("a network namespace");
}

/// The switch window from kube-proxy (docs/switching.md): while `CFG_F_SWITCH` is set INPUT
/// and FORWARD also accept `ct state established,related` (both families), the node check
/// follows the flag both ways without counting it as a repair, a flush during the window brings
/// the accept back with the rest, and an agent restarted during the window writes it at start.
#[test]
fn the_filter_rules_accept_established_connections_only_while_the_switch_window_is_open() {
    if skip() {
        return;
    }
    let scratch = Scratch::new("switch");
    in_netns(|| {
        let accept = |chain: &str| {
            format!(
                "-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"{}\" -j ACCEPT",
                rules::SWITCH_ACCEPT
            )
        };
        let has_accept = |ipv6: bool| {
            let tool = if ipv6 {
                "ip6tables-nft-save"
            } else {
                "iptables-nft-save"
            };
            let save = sh(&format!("{tool} -t filter"));
            ["INPUT", "FORWARD"]
                .iter()
                .all(|chain| save.lines().any(|l| l == accept(chain)))
        };
        let mut dp = Datapath::start(scratch.config()).expect("start the datapath");
        let maps = probes::DatapathMaps::open_pinned(&scratch.root.join("v2")).expect("the pins");
        assert!(!has_accept(false) && !has_accept(true));

        // The window opens (as `seed` does): the next check adds the accept, not a repair.
        maps.set_switch_window(true).expect("open the window");
        let r = dp.repair_node();
        assert!(r.repairs.is_empty() && r.failures.is_empty(), "{r:?}");
        assert!(has_accept(false) && has_accept(true));
        let r = dp.repair_node();
        assert!(r.repairs.is_empty() && r.failures.is_empty(), "{r:?}");

        // A firewall reload during the window: the accept comes back with the rest.
        sh("nft flush ruleset");
        let r = dp.repair_node();
        assert_eq!(
            parts(&r),
            vec![Part::Nftables, Part::Iptables, Part::Iptables],
            "{r:?}"
        );
        assert!(has_accept(false) && has_accept(true));

        // An agent restarted during the window writes it at start.
        drop(dp);
        sh("nft flush ruleset");
        let mut dp = Datapath::start(scratch.config()).expect("restart the datapath");
        assert!(has_accept(false) && has_accept(true));

        // The window closes (the sweeper's refresh): the next check drops it.
        maps.set_switch_window(false).expect("close the window");
        let r = dp.repair_node();
        assert!(r.repairs.is_empty() && r.failures.is_empty(), "{r:?}");
        assert!(!has_accept(false) && !has_accept(true));
        let save = sh("iptables-nft-save -t filter");
        assert!(
            save.contains(&format!("-A INPUT {}", service_accept())),
            "the service accept stays:\n{save}"
        );
        assert!(!save.contains(rules::SWITCH_ACCEPT), "{save}");
    })
    .expect("a network namespace");
}

#[test]
fn only_our_old_layout_is_removed_beside_the_pin_root_and_foreign_pins_stay() {
    if skip() {
        return;
    }
    let scratch = Scratch::new("layouts");
    in_netns(|| {
        let rt = runtime();
        // An old layout of ours (`v1`, real pins), with a pin of someone else's put in it, and
        // a foreign directory with a layout-like name beside it.
        let old = probes::Datapath::load(probes::DatapathOptions {
            pin_root: scratch.root.join("v1"),
            map_sizes: scratch.config().map_sizes,
            ..probes::DatapathOptions::default()
        })
        .expect("load the old layout");
        drop(old);
        let foreign = |path: &Path| {
            let opts = libbpf_rs::libbpf_sys::bpf_map_create_opts {
                sz: size_of::<libbpf_rs::libbpf_sys::bpf_map_create_opts>() as _,
                ..Default::default()
            };
            let mut map = libbpf_rs::MapHandle::create(
                libbpf_rs::MapType::Array,
                Some("theirs"),
                4,
                4,
                1,
                &opts,
            )
            .expect("create a map");
            map.pin(path).expect("pin it");
        };
        foreign(&scratch.root.join("v1").join("their_map"));
        std::fs::create_dir_all(scratch.root.join("v3")).unwrap();
        foreign(&scratch.root.join("v3").join("config"));
        assert!(scratch.root.join("v1").join("svc_ports").exists());

        let mut dp = Datapath::start(scratch.config()).expect("start the datapath");
        sync_devices(&rt, &mut dp);
        let left: BTreeSet<String> = std::fs::read_dir(scratch.root.join("v1"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, BTreeSet::from(["their_map".to_owned()]));
        assert!(scratch.root.join("v3").join("config").exists());
        assert!(scratch.root.join("v2").join("svc_ports").exists());
        drop(dp);
        let _ = std::fs::remove_file(scratch.root.join("v1").join("their_map"));
        let _ = std::fs::remove_file(scratch.root.join("v3").join("config"));
    })
    .expect("a network namespace");
}

#[test]
fn kube_ipvs0_deleted_or_stripped_of_an_address_is_restored() {
    if skip() {
        return;
    }
    in_netns(|| {
        let rt = runtime();
        rt.block_on(async {
            let rtnl = agent::node::Rtnl::connect().unwrap();
            let mut index = match rtnl.ensure_dummy("kube-ipvs0").await {
                Ok(index) => index,
                Err(e) => {
                    // No dummy driver in this kernel: the lab test covers it.
                    eprintln!("skipped: {e}");
                    return;
                }
            };
            let bound: BTreeSet<std::net::IpAddr> = ["10.96.0.1", "10.96.0.2", "fd00:96::1"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect();
            let to_bind: Vec<std::net::IpAddr> = bound.iter().copied().collect();
            for (a, r) in rtnl.change_addresses(index, agent::node::AddressChange::Add, &to_bind) {
                r.unwrap_or_else(|e| panic!("adding {a}: {e}"));
            }
            let on_device = || {
                let out = sh("ip -o addr show dev kube-ipvs0");
                bound
                    .iter()
                    .filter(|a| out.contains(&format!(" {a}/")))
                    .count()
            };
            let r = agent::node_state::repair_kube_ipvs0(&rtnl, &mut index, Some(&bound))
                .await
                .unwrap();
            assert!(r.repairs.is_empty() && !r.full_sync, "{r:?}");

            sh("ip addr del 10.96.0.2/32 dev kube-ipvs0");
            // Without the bound addresses only the link is checked (the periodic check while
            // kube-ipvs0's changes are followed): the missing address stays missing.
            let r = agent::node_state::repair_kube_ipvs0(&rtnl, &mut index, None)
                .await
                .unwrap();
            assert!(r.repairs.is_empty() && !r.full_sync, "{r:?}");
            assert_eq!(on_device(), 2);
            let r = agent::node_state::repair_kube_ipvs0(&rtnl, &mut index, Some(&bound))
                .await
                .unwrap();
            assert_eq!(parts(&r), vec![Part::KubeIpvs0], "{r:?}");
            assert_eq!(
                r.repairs[0].found,
                "addresses missing from kube-ipvs0: 10.96.0.2"
            );
            assert_eq!(on_device(), 3);

            let old = index;
            sh("ip link del kube-ipvs0");
            let r = agent::node_state::repair_kube_ipvs0(&rtnl, &mut index, Some(&bound))
                .await
                .unwrap();
            assert_eq!(parts(&r), vec![Part::KubeIpvs0, Part::KubeIpvs0], "{r:?}");
            assert!(r.full_sync);
            assert_ne!(index, old);
            assert_eq!(ifindex("kube-ipvs0"), index);
            assert_eq!(on_device(), 3);
        });
    })
    .expect("a network namespace");
}

/// An agent upgraded from one that kept its filter accept in a chain of its own
/// (`KUBE-IPVS-BPF-FILTER`, jumped to from INPUT and FORWARD) and jumped every raw OUTPUT packet
/// to `KUBE-IPVS-BPF-OUTPUT` (whose first rule returned marked ones): the start replaces that
/// layout in both families, the accept first in INPUT and FORWARD, the OUTPUT jump only for
/// unmarked packets, the old chain gone, the firewall's own rules where they were; a check
/// afterwards finds nothing to repair.
#[test]
fn the_filter_chain_and_output_jump_of_an_older_agent_are_replaced_at_start() {
    if skip() {
        return;
    }
    let scratch = Scratch::new("oldfilter");
    in_netns(|| {
        for tool in ["iptables-nft", "ip6tables-nft"] {
            sh(&format!(
                "{tool} -P INPUT DROP && \
                 {tool} -A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT && \
                 {tool} -N KUBE-IPVS-BPF-FILTER && \
                 {tool} -A KUBE-IPVS-BPF-FILTER -m mark --mark 0x200000/0x200000 -m comment --comment 'kube-ipvs-bpf: service traffic (untracked)' -j ACCEPT && \
                 {tool} -I INPUT 1 -j KUBE-IPVS-BPF-FILTER && \
                 {tool} -I FORWARD 1 -j KUBE-IPVS-BPF-FILTER && \
                 {tool} -t raw -N KUBE-IPVS-BPF-OUTPUT && \
                 {tool} -t raw -A KUBE-IPVS-BPF-OUTPUT -m mark --mark 0x200000/0x200000 -j RETURN && \
                 {tool} -t raw -I OUTPUT 1 -j KUBE-IPVS-BPF-OUTPUT"
            ));
        }
        let mut dp = Datapath::start(scratch.config()).expect("start the datapath");
        for (save, ipv6) in [("iptables-nft-save", false), ("ip6tables-nft-save", true)] {
            let all = sh(&format!("{save} -t raw; {save} -t filter"));
            assert!(!all.contains("KUBE-IPVS-BPF-FILTER"), "{save}:\n{all}");
            assert!(!all.contains("-j RETURN"), "{save}:\n{all}");
            for chain in ["INPUT", "FORWARD"] {
                let first = all.lines().find(|l| l.starts_with(&format!("-A {chain} ")));
                assert_eq!(
                    first,
                    Some(format!("-A {chain} {}", service_accept()).as_str()),
                    "{save}:\n{all}"
                );
            }
            assert!(
                all.contains("-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
                "{save}:\n{all}"
            );
            let output: Vec<&str> = all.lines().filter(|l| l.starts_with("-A OUTPUT ")).collect();
            assert_eq!(output.len(), 1, "{save}:\n{all}");
            assert!(output[0].starts_with("-A OUTPUT -m mark ! --mark 0x200000/0x200000"));
            assert_eq!(
                rules::missing(&all, MARK_SVC, false, rules::Notrack::Nftables),
                Vec::<String>::new(),
                "IPv6: {ipv6}"
            );
        }
        let r = dp.repair_node();
        assert!(r.repairs.is_empty() && r.failures.is_empty(), "{r:?}");
    })
    .expect("a network namespace");
}

/// An agent upgraded from one that untracked service traffic in iptables (raw PREROUTING,
/// `KUBE-IPVS-BPF-PREROUTING`): the start writes the nf_tables table and removes the old chain
/// and its jump, in both families; a check afterwards finds nothing to repair.
#[test]
fn the_iptables_prerouting_chain_of_an_older_agent_goes_when_the_table_is_written() {
    if skip() {
        return;
    }
    let scratch = Scratch::new("upgrade");
    in_netns(|| {
        for tool in ["iptables-nft", "ip6tables-nft"] {
            sh(&format!(
                "{tool} -t raw -N KUBE-IPVS-BPF-PREROUTING && \
                 {tool} -t raw -A KUBE-IPVS-BPF-PREROUTING -m mark --mark 0x200000/0x200000 -j CT --notrack && \
                 {tool} -t raw -I PREROUTING 1 -j KUBE-IPVS-BPF-PREROUTING"
            ));
        }
        let mut dp = Datapath::start(scratch.config()).expect("start the datapath");
        for tool in ["iptables-nft-save", "ip6tables-nft-save"] {
            let raw = sh(&format!("{tool} -t raw"));
            assert!(!raw.contains("KUBE-IPVS-BPF-PREROUTING"), "{tool}:\n{raw}");
            assert!(
                raw.contains(&format!("-m comment --comment \"{}\" -j KUBE-IPVS-BPF-OUTPUT", rules::OUTPUT_JUMP)),
                "{raw}"
            );
        }
        let table = sh("nft list table inet kube-ipvs-bpf");
        assert!(
            table.contains("meta mark & 0x00200000 == 0x00200000 notrack"),
            "{table}"
        );
        let r = dp.repair_node();
        assert!(r.repairs.is_empty() && r.failures.is_empty(), "{r:?}");
    })
    .expect("a network namespace");
}

/// The node check skips reading the rules back while nf_tables' generation is unchanged: it
/// must move with every transaction (ours, iptables-nft's, anyone's) and with nothing else.
#[test]
fn the_nf_tables_generation_moves_with_every_transaction_and_only_then() {
    if skip() {
        return;
    }
    in_netns(|| {
        let generation = || {
            agent::cleanup::nfnetlink::Nfnl::open()
                .unwrap()
                .nft_generation()
                .unwrap()
        };
        let g0 = generation();
        sh("ip link set lo up; nft list ruleset; iptables-nft-save; \
            bash -c 'for i in 1 2 3; do echo x > /dev/udp/127.0.0.1/9; done'");
        assert_eq!(generation(), g0, "reads and traffic changed the generation");
        sh("nft add table inet kib-gen");
        let g1 = generation();
        assert_ne!(g1, g0);
        sh("iptables-nft -A INPUT -i lo -j ACCEPT");
        let g2 = generation();
        assert_ne!(g2, g1);
        sh("nft flush ruleset");
        assert_ne!(generation(), g2);
    })
    .expect("a network namespace");
}

/// With legacy iptables the fingerprint is each table's `getsockopt` info: it changes when a
/// rule is added, deleted or replaced by one of another size, not when counters move.
#[test]
fn a_legacy_table_s_info_changes_with_its_rules_and_not_with_its_counters() {
    if skip() || common::skip_without(&[("iptables-legacy", "--version")]) {
        return;
    }
    in_netns(|| {
        sh("ip link set lo up");
        let info = |ipv6| rules::legacy_table_info(ipv6, "filter").unwrap();
        let (v4, v6) = (info(false), info(true));
        assert_eq!(v4.len(), 52);
        sh("iptables-legacy -A INPUT -i lo -j ACCEPT");
        let added = info(false);
        assert_ne!(added, v4);
        assert_eq!(info(true), v6, "an IPv4 rule changed the IPv6 table's info");
        sh("bash -c 'for i in 1 2 3; do echo x > /dev/udp/127.0.0.1/9; done'");
        assert!(
            sh("iptables-legacy-save -c -t filter").contains("-A INPUT -i lo -j ACCEPT")
                && !sh("iptables-legacy-save -c -t filter").contains("[0:0] -A INPUT -i lo"),
            "no packet counted"
        );
        assert_eq!(info(false), added, "counters changed the info");
        sh("iptables-legacy -R INPUT 1 -i lo -m comment --comment longer -j ACCEPT");
        assert_ne!(info(false), added);
        sh("ip6tables-legacy -A INPUT -i lo -j ACCEPT");
        assert_ne!(info(true), v6);
    })
    .expect("a network namespace");
}

/// On a node whose firewall is legacy iptables the rules are checked there: our accept deleted
/// behind the agent's back is found and written back, and a change to other rules of the same
/// tables makes the check read ours again and find them whole.
#[test]
fn on_a_legacy_iptables_node_a_deleted_accept_is_repaired() {
    if skip() || common::skip_without(&[("iptables-legacy-save", "--version")]) {
        return;
    }
    let scratch = Scratch::new("legacy");
    in_netns(|| {
        let mut dp = Datapath::start(DatapathConfig {
            rules_backend: rules::Backend::Legacy,
            ..scratch.config()
        })
        .expect("start the datapath");
        let save = || sh("iptables-legacy-save -t raw; iptables-legacy-save -t filter");
        assert_eq!(
            rules::missing(&save(), MARK_SVC, false, rules::Notrack::Nftables),
            Vec::<String>::new()
        );
        let r = dp.repair_node();
        assert!(r.repairs.is_empty() && r.failures.is_empty(), "{r:?}");

        sh(&format!("iptables-legacy -D FORWARD {}", service_accept()));
        let r = dp.repair_node();
        assert_eq!(parts(&r), vec![Part::Iptables], "{r:?}");
        assert_eq!(
            r.repairs[0].found,
            format!(
                "IPv4: rule \"{}\" missing from FORWARD",
                rules::SERVICE_ACCEPT
            )
        );
        assert_eq!(
            rules::missing(&save(), MARK_SVC, false, rules::Notrack::Nftables),
            Vec::<String>::new()
        );

        sh("iptables-legacy -A FORWARD -i lo -j ACCEPT");
        let r = dp.repair_node();
        assert!(r.repairs.is_empty() && r.failures.is_empty(), "{r:?}");
        assert!(save().contains("-A FORWARD -i lo -j ACCEPT"));
    })
    .expect("a network namespace");
}

/// The address reconciler keeps many requests on the wire at once: 1,000 addresses (IPv4 and
/// IPv6) bound on one device and then all removed but one, with the kernel's view and the
/// reconciler's agreeing after each step, and an address the kernel refuses reported without
/// stopping the others. (A veth stands in for kube-ipvs0: this kernel has no dummy driver.)
#[test]
fn a_thousand_addresses_are_bound_and_unbound_in_batches() {
    if skip() {
        return;
    }
    in_netns(|| {
        let rt = runtime();
        let index = veth("kibaddr");
        rt.block_on(async {
            use agent::reconcile::addresses::{AddressPlan, apply, plan};
            let rtnl = agent::node::Rtnl::connect().unwrap();
            let want: BTreeSet<std::net::IpAddr> = (0..1000u32)
                .map(|i| {
                    if i % 2 == 0 {
                        std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a60_0000 + i))
                    } else {
                        std::net::IpAddr::V6(std::net::Ipv6Addr::from(
                            0xfd00_0096_u128 << 96 | u128::from(i),
                        ))
                    }
                })
                .collect();
            let on_device = || addresses_on("kibaddr");
            let mut observed = BTreeSet::new();
            let failures = apply(&rtnl, index, &plan(&want, &observed), &mut observed);
            assert!(failures.is_empty(), "{failures:?}");
            assert_eq!(observed, want);
            assert_eq!(on_device(), want);

            let keep: BTreeSet<std::net::IpAddr> = want.iter().take(1).copied().collect();
            let failures = apply(&rtnl, index, &plan(&keep, &observed), &mut observed);
            assert!(failures.is_empty(), "{failures:?}");
            assert_eq!(observed, keep);
            assert_eq!(on_device(), keep);

            // A device index that does not exist: every request fails, each reported.
            let bad = AddressPlan {
                add: want.iter().skip(1).take(3).copied().collect(),
                remove: Vec::new(),
            };
            let failures = apply(&rtnl, 999_999, &bad, &mut observed);
            assert_eq!(failures.len(), 3, "{failures:?}");
            assert_eq!(observed, keep);
        });
    })
    .expect("a network namespace");
}

/// The addresses on `dev` as the kernel lists them.
fn addresses_on(dev: &str) -> BTreeSet<std::net::IpAddr> {
    sh(&format!("ip -o addr show dev {dev}"))
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet" || *w == "inet6")?;
            words.next()?.split('/').next()?.parse().ok()
        })
        .filter(|a: &std::net::IpAddr| !matches!(a, std::net::IpAddr::V6(v) if v.segments()[0] == 0xfe80))
        .collect()
}

/// The batched address requests (`Rtnl::change_addresses`): more than two batches of IPv4 and
/// IPv6 host addresses added and removed, one result per address in order, a request the kernel
/// refuses (already bound, not bound) failing alone in its batch; the kernel's view after each.
#[test]
fn batched_address_requests_answer_each_address() {
    if skip() {
        return;
    }
    in_netns(|| {
        let rt = runtime();
        let index = veth("kib-addr0");
        rt.block_on(async {
            let rtnl = agent::node::Rtnl::connect().unwrap();
            let mut addrs: Vec<std::net::IpAddr> = (0..250u32)
                .map(|i| std::net::IpAddr::from([10, 96, (i / 200) as u8, (i % 200 + 1) as u8]))
                .collect();
            addrs
                .extend((1..=50u16).map(|i| std::net::IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, i])));
            assert!(addrs.len() > 2 * agent::node::ADDRESS_BATCH);
            // Already bound: its request fails (EEXIST), the others of its batch do not.
            let present: std::net::IpAddr = "10.96.0.7".parse().unwrap();
            sh("ip addr add 10.96.0.7/32 dev kib-addr0");

            let results = rtnl.change_addresses(index, agent::node::AddressChange::Add, &addrs);
            assert_eq!(
                results.iter().map(|(a, _)| *a).collect::<Vec<_>>(),
                addrs,
                "one result per address, in order"
            );
            for (a, r) in &results {
                assert_eq!(r.is_err(), *a == present, "adding {a}: {r:?}");
            }
            let want: BTreeSet<std::net::IpAddr> = addrs.iter().copied().collect();
            assert_eq!(addresses_on("kib-addr0"), want);

            // Removed, with one address that is not bound: only its request fails.
            let absent: std::net::IpAddr = "10.96.9.9".parse().unwrap();
            let mut remove = addrs.clone();
            remove.insert(agent::node::ADDRESS_BATCH + 3, absent);
            let results = rtnl.change_addresses(index, agent::node::AddressChange::Remove, &remove);
            assert_eq!(results.len(), remove.len());
            for (a, r) in &results {
                assert_eq!(r.is_err(), *a == absent, "removing {a}: {r:?}");
            }
            assert_eq!(addresses_on("kib-addr0"), BTreeSet::new());
        });
    })
    .expect("a network namespace of its own");
}

/// `net.ipv4.vs.snat_reroute` in `auto` follows the namespace's routing policy as rtnetlink and
/// xfrm netlink report it: 0 with the kernel's own FIB rules; 1 once a source rule, a fwmark
/// rule, a VRF (its l3mdev rule), an IPv6 source route or an xfrm policy exists, each named in
/// the decision, and not counted as a repair; 0 again once it is gone. A 1 written by hand under
/// an unchanged policy is a repair.
#[test]
fn snat_reroute_in_auto_follows_the_routing_policy_and_a_hand_written_value_is_repaired() {
    if skip() {
        return;
    }
    in_netns(|| {
        let scratch = Scratch::new("reroute");
        let file = scratch.sysctls.path().join("net/ipv4/vs/snat_reroute");
        let value = || std::fs::read_to_string(&file).unwrap().trim().to_owned();
        let mut node = DesiredNodeState::new(
            NodeStatePhase::Normal,
            scratch.sysctls.path().to_path_buf(),
            Some((6, 12)),
            false,
            SnatReroute::Auto,
            None,
        );
        let quiet = |r: &RepairReport, what: &str| {
            assert!(
                r.repairs.is_empty() && r.failures.is_empty(),
                "{what}: {:?} {:?}",
                r.repairs,
                r.failures
            )
        };
        sh("ip link set lo up");
        quiet(&node.apply_snat_reroute(), "the kernel's own rules");
        assert_eq!(
            value(),
            "0",
            "the kernel's own rules: no reroute ({:?})",
            node.snat_reroute_applied
        );
        let cases = [
            (
                "ip rule add from 10.0.3.1 lookup 100",
                "ip rule del from 10.0.3.1 lookup 100",
                "from 10.0.3.1/32 lookup 100",
            ),
            (
                "ip -6 rule add fwmark 0x10 lookup main",
                "ip -6 rule del fwmark 0x10 lookup main",
                "IPv6 rule",
            ),
            (
                "ip link add kib-vrf type vrf table 10",
                "ip link del kib-vrf",
                "rule 1000:",
            ),
            (
                "ip -6 route add 2001:db8::/64 from 2001:db8:1::/64 dev lo",
                "ip -6 route del 2001:db8::/64 from 2001:db8:1::/64 dev lo",
                "1 IPv6 routes with a source prefix",
            ),
            (
                "ip xfrm policy add src 10.1.0.0/24 dst 10.2.0.0/24 dir out",
                "ip xfrm policy flush",
                "1 xfrm policies",
            ),
        ];
        for (add, remove, named) in cases {
            let out = std::process::Command::new("sh")
                .args(["-c", add])
                .output()
                .unwrap();
            if !out.status.success() {
                // A kernel without VRF, IPv6 subtrees or xfrm_user: that case cannot exist.
                eprintln!(
                    "skipped {add:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                continue;
            }
            quiet(&node.apply_snat_reroute(), add);
            assert_eq!(value(), "1", "after {add:?}");
            let why = &node.snat_reroute_applied.as_ref().unwrap().why;
            assert!(
                why.contains(named),
                "after {add:?}, the decision names {named:?}: {why}"
            );
            sh(remove);
            quiet(&node.apply_snat_reroute(), remove);
            assert_eq!(value(), "0", "after {remove:?}");
        }
        std::fs::write(&file, "1").unwrap();
        let r = node.apply_snat_reroute();
        assert_eq!(value(), "0", "the hand-written 1 rewritten");
        assert_eq!(r.repairs.len(), 1, "{:?}", r.repairs);
        assert_eq!(r.repairs[0].part, Part::Sysctl);
        assert!(
            r.repairs[0].found.contains("net.ipv4.vs.snat_reroute = 1"),
            "{:?}",
            r.repairs[0]
        );
    })
    .expect("a network namespace of its own");
}
