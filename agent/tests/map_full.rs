//! Host-kernel test of what the agent does when a datapath map is full: the entries that fit
//! are written, the rest are refused by the kernel (`E2BIG`), and the sync reports one failure
//! per full map naming it and how to make room, not one per entry (at 50,000 Services, with
//! `svc_addrs` too small, that was tens of thousands of error lines per sync). Needs root and
//! bpffs; says so and passes otherwise.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use agent::reconcile::datapath::{MapOp, ObservedMaps, apply};
use probes::maps::{ADDR_F_SERVICE, AddrKey, AddrValue, L4Proto, SvcKey, SvcValue};

#[test]
fn a_full_map_takes_what_fits_and_is_reported_once_with_its_remedy() {
    if !common::can_load_datapath() {
        return;
    }
    let pins = common::test_pins("map-full");
    let dp = probes::Datapath::load(probes::DatapathOptions {
        pin_root: pins.0.join("v2"),
        map_sizes: common::small_map_sizes(),
        ..probes::DatapathOptions::default()
    })
    .expect("load datapath");
    let capacity = common::small_map_sizes().svc_addrs as usize;
    let address = |i: usize| IpAddr::V4(Ipv4Addr::new(10, 96, (i >> 8) as u8, i as u8));
    // Ten ports (room for them), then 30 more addresses than svc_addrs holds.
    let mut ops: Vec<MapOp> = (0..10)
        .map(|i| {
            MapOp::PutPort(
                SvcKey::new(address(i), 80, L4Proto::Tcp),
                SvcValue {
                    flags: 0,
                    svc_id: i as u32 + 1,
                },
            )
        })
        .collect();
    ops.extend((0..capacity + 30).map(|i| {
        MapOp::PutAddr(
            AddrKey::new(address(i)),
            AddrValue {
                flags: ADDR_F_SERVICE,
                pad: 0,
            },
        )
    }));
    let mut observed = ObservedMaps::default();
    let (done, failures) = apply(dp.maps(), &ops, &mut observed);

    assert_eq!(done, 10 + capacity);
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(
        failures[0].starts_with("map svc_addrs is full: 30 entries not written"),
        "{failures:?}"
    );
    assert!(
        failures[0].contains("--bpf-map-size svc_addrs=ENTRIES"),
        "{failures:?}"
    );
    // The kernel's view: the map is full, and every port went in.
    assert_eq!(dp.maps().svc_addrs.keys().count(), capacity);
    assert_eq!(dp.maps().svc_ports.keys().count(), 10);
}
