//! Host-kernel tests of the loader: TC attachment by TCX and by netlink clsact on a veth, the
//! in-place replacement a restarted agent does, map reuse across a restart, the pinned `xt_svc`,
//! opening pinned maps without programs, and the IPVS probe's error where ip_vs is missing.
//! Needs root.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use libbpf_rs::{Link, ProgramHandle};
use probes::maps::{Counter, L4Proto, Tuple};
use probes::{
    Datapath, DatapathMaps, DatapathOptions, DatapathProgram, DeviceKind, Error, MapSizes,
    ProbePreference, RewritePolicy, TcAttachMode, TcAttachPolicy,
};

/// A veth pair, deleted on drop.
struct Veth {
    name: String,
    ifindex: u32,
}

impl Veth {
    fn new(tag: &str) -> Veth {
        let name = format!("kib{}{tag}", std::process::id() % 100_000);
        let peer = format!("{name}p");
        let _ = Command::new("ip")
            .args(["link", "del", &name])
            .stderr(Stdio::null())
            .status();
        let status = Command::new("ip")
            .args(["link", "add", &name, "type", "veth", "peer", "name", &peer])
            .status()
            .expect("run ip");
        assert!(status.success(), "ip link add {name}");
        let ifindex = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
            .expect("ifindex")
            .trim()
            .parse()
            .expect("ifindex number");
        Veth { name, ifindex }
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

fn load(root: &Path, tc_attach: TcAttachPolicy) -> Datapath {
    Datapath::load(DatapathOptions {
        pin_root: root.to_path_buf(),
        map_sizes: test_map_sizes(),
        tc_attach,
        rewrite: RewritePolicy::Auto,
        nat_seed: None,
    })
    .expect("load datapath")
}

fn link_id(path: &Path) -> u32 {
    Link::open(path)
        .expect("pinned link")
        .info()
        .expect("link info")
        .id
}

#[test]
fn tcx_attach_and_restart_replace_in_place() {
    if !probes::loader::kernel_has_tcx() {
        eprintln!("kernel without TCX: skipped");
        return;
    }
    let pins = PinDir::new("tcx_restart");
    let veth = Veth::new("t");
    let mut first = load(&pins.root, TcAttachPolicy::Auto);
    let mode = first
        .attach_tc(veth.ifindex, DeviceKind::Ethernet)
        .expect("attach");
    assert_eq!(mode, TcAttachMode::Tcx);
    let ingress = first.attached_programs(veth.ifindex, true).expect("query");
    let egress = first.attached_programs(veth.ifindex, false).expect("query");
    assert_eq!(
        ingress.tcx,
        Some(first.program_id(DatapathProgram::TcIngress).expect("id"))
    );
    assert_eq!(
        egress.tcx,
        Some(first.program_id(DatapathProgram::TcEgress).expect("id"))
    );
    assert_eq!((ingress.netlink, egress.netlink), (None, None));
    let link_path = pins
        .root
        .join("links")
        .join(format!("tcx_{}_ingress", veth.ifindex));
    let link_before = link_id(&link_path);

    // Restart: a new agent loads (reusing the pinned maps) and swaps the programs inside the
    // same links; the L3 variants this time, to see the swap.
    let mut second = load(&pins.root, TcAttachPolicy::Auto);
    drop(first);
    let mode = second
        .attach_tc(veth.ifindex, DeviceKind::L3)
        .expect("re-attach");
    assert_eq!(mode, TcAttachMode::Tcx);
    assert_eq!(
        link_id(&link_path),
        link_before,
        "the same link was updated"
    );
    let ingress = second.attached_programs(veth.ifindex, true).expect("query");
    assert_eq!(
        ingress.tcx,
        Some(second.program_id(DatapathProgram::TcIngressL3).expect("id"))
    );

    second.detach_tc(veth.ifindex).expect("detach");
    let ingress = second.attached_programs(veth.ifindex, true).expect("query");
    assert_eq!((ingress.tcx, ingress.netlink), (None, None));
    assert!(!link_path.exists());
}

#[test]
fn netlink_attach_and_restart_replace() {
    let pins = PinDir::new("netlink_restart");
    let veth = Veth::new("n");
    let mut first = load(&pins.root, TcAttachPolicy::Netlink);
    let mode = first
        .attach_tc(veth.ifindex, DeviceKind::Ethernet)
        .expect("attach");
    assert_eq!(mode, TcAttachMode::Netlink);
    let egress = first.attached_programs(veth.ifindex, false).expect("query");
    assert_eq!(
        egress.netlink,
        Some(first.program_id(DatapathProgram::TcEgress).expect("id"))
    );
    assert_eq!(egress.tcx, None);

    let mut second = load(&pins.root, TcAttachPolicy::Netlink);
    second
        .attach_tc(veth.ifindex, DeviceKind::Ethernet)
        .expect("re-attach");
    let egress = second
        .attached_programs(veth.ifindex, false)
        .expect("query");
    assert_eq!(
        egress.netlink,
        Some(second.program_id(DatapathProgram::TcEgress).expect("id")),
        "the filter now runs the new program"
    );
    drop(first);

    if probes::loader::kernel_has_tcx() {
        // Switching mechanism removes the other one's attachment.
        let mut third = load(&pins.root, TcAttachPolicy::Tcx);
        assert_eq!(
            third
                .attach_tc(veth.ifindex, DeviceKind::Ethernet)
                .expect("tcx"),
            TcAttachMode::Tcx
        );
        let egress = third.attached_programs(veth.ifindex, false).expect("query");
        assert_eq!(egress.netlink, None);
        assert!(egress.tcx.is_some());
        third.detach_tc(veth.ifindex).expect("detach");
    } else {
        second.detach_tc(veth.ifindex).expect("detach");
    }
    let egress = second
        .attached_programs(veth.ifindex, false)
        .expect("query");
    assert_eq!((egress.tcx, egress.netlink), (None, None));
}

#[test]
fn verify_tc_reports_a_removed_attachment_and_attach_tc_restores_it() {
    let pins = PinDir::new("verify_tc");
    let veth = Veth::new("v");
    let mut policies = vec![TcAttachPolicy::Netlink];
    if probes::loader::kernel_has_tcx() {
        policies.push(TcAttachPolicy::Tcx);
    }
    for policy in policies {
        let mut dp = load(&pins.root, policy);
        dp.attach_tc(veth.ifindex, DeviceKind::Ethernet)
            .expect("attach");
        assert_eq!(
            dp.verify_tc(veth.ifindex).expect("verify"),
            Vec::<String>::new()
        );
        // Someone removes our ingress program: the clsact qdisc deleted, or the TCX link
        // detached.
        let expected = if policy == TcAttachPolicy::Netlink {
            let status = Command::new("tc")
                .args(["qdisc", "del", "dev", &veth.name, "clsact"])
                .status()
                .expect("run tc");
            assert!(status.success());
            vec![
                "no clsact ingress filter".to_owned(),
                "no clsact egress filter".to_owned(),
            ]
        } else {
            let path = pins
                .root
                .join("links")
                .join(format!("tcx_{}_ingress", veth.ifindex));
            Link::open(&path).expect("link").detach().expect("detach");
            vec![format!("TCX ingress link detached (device 0)")]
        };
        assert_eq!(dp.verify_tc(veth.ifindex).expect("verify"), expected);
        dp.attach_tc(veth.ifindex, DeviceKind::Ethernet)
            .expect("re-attach");
        assert_eq!(
            dp.verify_tc(veth.ifindex).expect("verify"),
            Vec::<String>::new()
        );
        let ingress = dp.attached_programs(veth.ifindex, true).expect("query");
        let ours = Some(dp.program_id(DatapathProgram::TcIngress).expect("id"));
        if policy == TcAttachPolicy::Netlink {
            assert_eq!(ingress.netlink, ours);
        } else {
            assert_eq!(ingress.tcx, ours);
        }
        dp.detach_tc(veth.ifindex).expect("detach");
    }
}

#[test]
fn restart_keeps_snat_entries_and_pinned_sizes() {
    let pins = PinDir::new("restart_maps");
    let f = Family::V4;
    let first = load(&pins.root, TcAttachPolicy::Auto);
    let fixture_config = probes::maps::Config::default();
    first.maps().set_config(&fixture_config).expect("config");
    first
        .maps()
        .set_device(
            LOOPBACK_IFINDEX,
            &probes::maps::DevValue::new(Some("192.0.2.1".parse().expect("ip")), None),
        )
        .expect("devices");
    let run = |dp: &Datapath, mark: u32| {
        dp.test_run(
            DatapathProgram::TcEgress,
            &tcp(client(f), 40_000, backend(f), 8080, TCP_ACK),
            &probes::SkbContext {
                mark,
                ifindex: LOOPBACK_IFINDEX,
                ingress_ifindex: 0,
            },
        )
        .expect("run")
    };
    let out = run(&first, probes::maps::DEFAULT_MARK_MASQ);
    let port = parse_frame(&out.packet).sport();
    assert!(first.map_reuse().iter().all(|m| !m.reused));
    let first_seed = first.maps().snat.seed();
    drop(first);

    // Bigger sizes requested: pinned maps keep theirs (and their entries).
    let second = Datapath::load(DatapathOptions {
        pin_root: pins.root.clone(),
        map_sizes: MapSizes {
            snat: 4096,
            ..test_map_sizes()
        },
        tc_attach: TcAttachPolicy::Auto,
        rewrite: RewritePolicy::Auto,
        nat_seed: None,
    })
    .expect("reload");
    for reuse in second.map_reuse() {
        assert!(reuse.reused, "{} not reused", reuse.name);
        if reuse.name == "snat_records" {
            assert_eq!(reuse.requested_max_entries, Some(4096));
            assert_eq!(reuse.max_entries, test_map_sizes().snat);
        }
    }
    assert_eq!(
        second.maps().snat.seed(),
        first_seed,
        "the reused table keeps its hash seed"
    );
    let out = run(&second, 0);
    assert_eq!(
        parse_frame(&out.packet).sport(),
        port,
        "fast path after restart"
    );
    let stats = second.stats().expect("stats");
    assert_eq!(stats.get(Counter::SnatAlloc), 1);
    assert_eq!(stats.get(Counter::FwdHit), 1);

    // `inspect`: the pinned maps open by path, without programs.
    let maps = DatapathMaps::open_pinned(&pins.root).expect("open pinned maps");
    let entry = maps
        .snat
        .lookup_fwd(&Tuple::new(
            client(f),
            40_000,
            backend(f),
            8080,
            L4Proto::Tcp,
        ))
        .expect("entry kept");
    assert_eq!(entry.port.get(), port);
    assert_eq!(maps.snat.len(), 1);
    assert_eq!(maps.stats().expect("stats"), stats);
    assert_eq!(
        maps.config().expect("config"),
        Some(second.maps().complete(&fixture_config))
    );
}

#[test]
fn xt_svc_pin_is_replaced_on_reload() {
    let pins = PinDir::new("xt_svc_pin");
    let first = load(&pins.root, TcAttachPolicy::Auto);
    let path = first.xt_svc_pin_path();
    let pinned = ProgramHandle::from_pinned_path(&path).expect("pinned xt_svc");
    assert_eq!(
        pinned.id(),
        first.program_id(DatapathProgram::XtSvc).expect("id")
    );
    let second = load(&pins.root, TcAttachPolicy::Auto);
    let pinned = ProgramHandle::from_pinned_path(&path).expect("pinned xt_svc");
    assert_eq!(
        pinned.id(),
        second.program_id(DatapathProgram::XtSvc).expect("id")
    );
    drop(first);
}

#[test]
fn ipvs_probe_reports_missing_ip_vs() {
    if Path::new("/sys/module/ip_vs").exists() {
        eprintln!("ip_vs is loaded here: this test is for hosts without it");
        return;
    }
    let pins = PinDir::new("probe_missing");
    let mut dp = load(&pins.root, TcAttachPolicy::Auto);
    match dp.attach_ipvs_probe(ProbePreference::Auto) {
        Err(Error::ProbeUnavailable(reason)) => assert!(reason.contains("ip_vs"), "{reason}"),
        other => panic!("expected ProbeUnavailable, got {other:?}"),
    }
    assert_eq!(dp.ipvs_probe(), None);
}

/// An agent from before a counter was added left a shorter `stats` pinned: the loader replaces
/// it (counters restart at zero) rather than reuse it, so every counter has a slot and reading
/// them works; the next load reuses the new one.
#[test]
fn shorter_pinned_stats_is_replaced() {
    use libbpf_rs::{MapCore, MapHandle, MapType};
    let pins = PinDir::new("short_stats");
    std::fs::create_dir_all(&pins.root).expect("pin root");
    let short = Counter::COUNT as u32 - 1;
    let opts = libbpf_rs::libbpf_sys::bpf_map_create_opts {
        sz: size_of::<libbpf_rs::libbpf_sys::bpf_map_create_opts>() as _,
        ..Default::default()
    };
    let mut old = MapHandle::create(MapType::PercpuArray, Some("stats"), 4, 8, short, &opts)
        .expect("create the old stats");
    old.pin(pins.root.join("stats")).expect("pin the old stats");

    let dp = load(&pins.root, TcAttachPolicy::Auto);
    let stats = dp
        .map_reuse()
        .iter()
        .find(|m| m.name == "stats")
        .expect("stats");
    assert!(!stats.reused, "the short stats is not reused");
    assert_eq!(stats.max_entries, Counter::COUNT as u32);
    let pinned = MapHandle::from_pinned_path(pins.root.join("stats")).expect("pinned stats");
    assert_eq!(pinned.max_entries(), Counter::COUNT as u32);
    assert_ne!(
        pinned.info().expect("info").info.id,
        old.info().expect("info").info.id,
        "a new map is pinned"
    );
    assert_eq!(
        dp.stats()
            .expect("every counter reads")
            .get(Counter::LockBusy),
        0
    );
    drop(dp);
    let again = load(&pins.root, TcAttachPolicy::Auto);
    assert!(
        again
            .map_reuse()
            .iter()
            .find(|m| m.name == "stats")
            .is_some_and(|m| m.reused),
        "then reused"
    );
}

/// Pins left by an agent from before `drop_last` existed: reading them (as `inspect` does)
/// works without it, and the next load creates and pins it.
#[test]
fn pins_from_before_drop_last_are_read_and_completed_at_load() {
    let pins = PinDir::new("no_drop_last");
    drop(load(&pins.root, TcAttachPolicy::Auto));
    std::fs::remove_file(pins.root.join("drop_last")).expect("unpin drop_last");
    let maps = DatapathMaps::open_pinned(&pins.root).expect("open pins without drop_last");
    assert!(maps.drop_last.is_none());
    assert_eq!(maps.last_drops().expect("no drop_last: nothing"), vec![]);
    drop(maps);
    let dp = load(&pins.root, TcAttachPolicy::Auto);
    let reuse = dp
        .map_reuse()
        .iter()
        .find(|m| m.name == "drop_last")
        .expect("drop_last");
    assert!(!reuse.reused);
    assert!(pins.root.join("drop_last").exists(), "pinned again");
}
