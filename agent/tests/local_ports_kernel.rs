//! Host-kernel test of `agent::datapath::LocalPortWatch`: in a network namespace of its own (the
//! sysctl is per namespace), a change of `net.ipv4.ip_local_port_range` after start-up reaches
//! the loaded datapath's `config` map (read back from the kernel): the automatic SNAT range
//! moves out of the new ephemeral ports, an explicit one stays and is reported as overlapping.
//! Needs root and bpffs (mounted when missing); says so and passes without them.

mod common;

use common::{can_load_datapath, test_pins};

use agent::datapath::{DatapathConfig, LocalPortWatch, snat_ports};
use probes::maps::Config;
use probes::{Datapath, DatapathOptions, MapSizes};

fn set_local_ports(low: u16, high: u16) {
    std::fs::write(
        "/proc/sys/net/ipv4/ip_local_port_range",
        format!("{low} {high}"),
    )
    .expect("write ip_local_port_range");
}

fn ports(c: &Config) -> ((u16, u16), (u16, u16)) {
    (
        (c.local_port_min, c.local_port_max),
        (c.snat_port_min, c.snat_port_max),
    )
}

#[test]
fn a_later_ip_local_port_range_change_reaches_the_datapath() {
    if !can_load_datapath() {
        return;
    }
    // This thread alone moves to a new network namespace: its sysctls are its own.
    std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        let pins = test_pins("ports");
        let pin_root = pins.0.join("v2");
        let dp = Datapath::load(DatapathOptions {
            pin_root: pin_root.clone(),
            map_sizes: MapSizes {
                svc_ports: 16,
                svc_addrs: 16,
                src_ranges: 16,
                cluster_cidrs: 16,
                devices: 16,
                snat: 64,
                conns: 64,
                frags: 16,
            },
            ..DatapathOptions::default()
        })
        .expect("load the datapath");
        let node_ports = (30000, 32767);
        // What start-up wrote, with the namespace's ephemeral ports then.
        set_local_ports(32768, 60999);
        let snat = snat_ports(None, (32768, 60999), node_ports).expect("automatic range");
        assert_eq!(snat, (1024, 29999));
        let config = dp.maps().config().expect("read config").unwrap_or_default();
        dp.maps()
            .set_config(&Config {
                local_port_min: 32768,
                local_port_max: 60999,
                snat_port_min: snat.0,
                snat_port_max: snat.1,
                ..config
            })
            .expect("write config");

        let automatic = DatapathConfig {
            pin_root: pin_root.clone(),
            node_ports,
            snat_ports: None,
            ..DatapathConfig::default()
        };
        let mut watch = LocalPortWatch::open(&automatic).expect("watch");
        assert_eq!(watch.check().expect("check"), None, "nothing changed yet");

        // The operator widens the ephemeral ports over the SNAT range.
        set_local_ports(1024, 40000);
        let change = watch.check().expect("check").expect("a change");
        assert!(!change.overlap);
        let seen = dp.maps().config().expect("read").expect("config");
        assert_eq!(ports(&seen), ((1024, 40000), (40001, 65535)));
        assert_eq!(watch.check().expect("check"), None, "reported once");

        // An explicit range is kept, and reported when the ephemeral ports now overlap it.
        let explicit = DatapathConfig {
            snat_ports: Some((40001, 50000)),
            ..automatic
        };
        let mut watch = LocalPortWatch::open(&explicit).expect("watch");
        set_local_ports(45000, 60999);
        let change = watch.check().expect("check").expect("a change");
        assert!(change.overlap, "{change:?}");
        let seen = dp.maps().config().expect("read").expect("config");
        assert_eq!(ports(&seen), ((45000, 60999), (40001, 50000)));
        drop(dp);
    })
    .join()
    .expect("the namespace thread");
}
