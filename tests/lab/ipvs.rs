//! The `ipvs` library against a real kernel: every operation is done through the library and
//! checked against what `ipvsadm` (which asks the kernel itself) reports. Each test works in
//! its own network namespace, so each has its own IPVS table.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use futures::StreamExt;
use ipvs::{
    Destination, Family, ForwardMethod, IpvsError, IpvsHandle, Protocol, Service, ServiceFlags,
    ServiceKey, Timeouts, TunnelConfig, TunnelFlags, TunnelType,
};
use lab::ipvsadm;
use lab::traffic::{Server, tcp_request, udp_request_from};
use lab::{Netns, Topology, require_lab};

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().expect("ipv6"))
}

/// The kernel's view of the namespace's IPVS table, through ipvsadm.
fn kernel(ns: &Netns) -> BTreeMap<String, ipvsadm::Service> {
    ipvsadm::view(|cmd| ns.sh(cmd))
        .into_iter()
        .map(|s| (s.key(), s))
        .collect()
}

/// ipvsadm's name for a service key.
fn key_name(key: &ServiceKey) -> String {
    match key {
        ServiceKey::Tuple {
            protocol,
            address,
            port,
        } => {
            format!("{protocol} {}", SocketAddr::new(*address, *port))
        }
        ServiceKey::Fwmark { mark, .. } => format!("FWM {mark}"),
    }
}

fn forward_name(f: ForwardMethod) -> &'static str {
    match f {
        ForwardMethod::Masquerade => "Masq",
        ForwardMethod::DirectRoute => "Route",
        ForwardMethod::Tunnel => "Tunnel",
        ForwardMethod::Local => "Local",
        _ => "?",
    }
}

/// Asserts that the kernel (ipvsadm) holds exactly `expected`: the same services with the
/// same scheduler, flags, persistence and destinations (forwarding, weight, thresholds, tunnel).
fn assert_kernel_holds(ns: &Netns, expected: &[(Service, Vec<Destination>)]) {
    let k = kernel(ns);
    assert_eq!(
        k.keys().cloned().collect::<Vec<_>>(),
        {
            let mut v: Vec<String> = expected.iter().map(|(s, _)| key_name(&s.key)).collect();
            v.sort();
            v
        },
        "service set differs"
    );
    for (svc, dests) in expected {
        let ks = &k[&key_name(&svc.key)];
        let what = key_name(&svc.key);
        assert_eq!(ks.scheduler, svc.scheduler, "{what}: scheduler");
        let persistent = svc.flags.contains(ServiceFlags::PERSISTENT);
        assert_eq!(
            ks.persistent,
            persistent.then_some(svc.timeout),
            "{what}: persistence"
        );
        assert_eq!(
            ks.one_packet,
            svc.flags.contains(ServiceFlags::ONE_PACKET),
            "{what}: ops"
        );
        assert_eq!(ks.pe, svc.pe_name, "{what}: pe");
        if persistent {
            let full = match svc.key.family() {
                Family::Inet => u32::MAX,
                Family::Inet6 => 128,
            };
            let shown = match svc.key.family() {
                Family::Inet => Ipv4Addr::from(svc.netmask).to_string(),
                Family::Inet6 => svc.netmask.to_string(),
            };
            assert_eq!(
                ks.netmask,
                (svc.netmask != full).then_some(shown),
                "{what}: netmask"
            );
        }
        let mut sched_flags = Vec::new();
        let (f1, f2) = match svc.scheduler.as_str() {
            "sh" => ("sh-fallback", "sh-port"),
            "mh" => ("mh-fallback", "mh-port"),
            _ => ("flag-1", "flag-2"),
        };
        if svc.flags.contains(ServiceFlags::SCHED1) {
            sched_flags.push(f1.to_string());
        }
        if svc.flags.contains(ServiceFlags::SCHED2) {
            sched_flags.push(f2.to_string());
        }
        assert_eq!(ks.sched_flags, sched_flags, "{what}: scheduler flags");
        assert_eq!(
            ks.destinations.len(),
            dests.len(),
            "{what}: destination count"
        );
        for d in dests {
            let kd = ks
                .dest(d.address, d.port)
                .unwrap_or_else(|| panic!("{what}: destination {} {} missing", d.address, d.port));
            assert_eq!(
                kd.forward,
                forward_name(d.forward),
                "{what} -> {}: forward",
                d.address
            );
            assert_eq!(kd.weight, d.weight, "{what} -> {}: weight", d.address);
            assert_eq!(
                kd.upper_threshold, d.upper_threshold,
                "{what} -> {}: uthreshold",
                d.address
            );
            assert_eq!(
                kd.lower_threshold, d.lower_threshold,
                "{what} -> {}: lthreshold",
                d.address
            );
            if let Some(t) = d.tunnel {
                let expect = match t.tunnel_type {
                    TunnelType::Gue => format!("gue:{}", t.port),
                    TunnelType::Gre => "gre".to_string(),
                    _ => "ipip".to_string(),
                };
                assert!(
                    kd.tunnel.starts_with(&expect),
                    "{what}: tunnel {} vs {expect}",
                    kd.tunnel
                );
            }
        }
    }
}

/// The library's own listing, in the same shape as `expected` (for comparing both ways).
async fn library_holds(h: &IpvsHandle) -> Vec<(Service, Vec<Destination>)> {
    let mut out = Vec::new();
    for s in h.services().await.expect("services") {
        let d = h.destinations(&s.key).await.expect("destinations");
        out.push((s, d));
    }
    out
}

/// Normalizes what the kernel reports back (HASHED flag, read-only counters) so it can be
/// compared with what was sent.
fn sent_form(
    list: &[(Service, Vec<Destination>)],
) -> BTreeMap<String, (Service, Vec<Destination>)> {
    list.iter()
        .map(|(s, d)| {
            let mut s = s.clone();
            s.flags = s.flags.without_hashed();
            s.stats = None;
            let mut d: Vec<Destination> = d
                .iter()
                .map(|d| Destination {
                    active_conns: 0,
                    inactive_conns: 0,
                    persistent_conns: 0,
                    stats: None,
                    tunnel: if d.forward == ForwardMethod::Tunnel {
                        d.tunnel
                    } else {
                        None
                    },
                    ..d.clone()
                })
                .collect();
            d.sort_by_key(|d| (d.address, d.port));
            (key_name(&s.key), (s, d))
        })
        .collect()
}

fn all_kinds() -> Vec<(Service, Vec<Destination>)> {
    let mut tcp = Service::new(ServiceKey::tcp(v4(10, 96, 0, 1), 80), "wlc");
    tcp.flags = ServiceFlags::PERSISTENT;
    tcp.timeout = 300;
    tcp.netmask = 0xffff_ff00;
    let masq = Destination {
        weight: 3,
        upper_threshold: 100,
        lower_threshold: 10,
        ..Destination::new(v4(10, 244, 1, 1), 8080)
    };
    let gue = Destination {
        forward: ForwardMethod::Tunnel,
        tunnel: Some(TunnelConfig {
            tunnel_type: TunnelType::Gue,
            port: 6080,
            flags: TunnelFlags::NOCSUM,
        }),
        ..Destination::new(v4(10, 244, 1, 2), 80)
    };
    let ipip = Destination {
        forward: ForwardMethod::Tunnel,
        tunnel: Some(TunnelConfig::default()),
        ..Destination::new(v4(10, 244, 1, 4), 80)
    };
    let route = Destination {
        forward: ForwardMethod::DirectRoute,
        weight: 0,
        ..Destination::new(v4(10, 244, 1, 3), 80)
    };
    let mut udp6 = Service::new(ServiceKey::udp(v6("fd00::10"), 53), "mh");
    udp6.flags = ServiceFlags::MH_FALLBACK | ServiceFlags::MH_PORT;
    let udp6_dest = Destination::new(v6("fd00:244::2"), 5353);
    let mut persist6 = Service::new(ServiceKey::tcp(v6("fd00::11"), 443), "rr");
    persist6.flags = ServiceFlags::PERSISTENT;
    persist6.timeout = 10800;
    persist6.netmask = 64;
    let mut sctp = Service::new(ServiceKey::sctp(v4(10, 96, 0, 5), 3868), "sh");
    sctp.flags = ServiceFlags::SH_PORT;
    let sctp_dest = Destination::new(v4(10, 244, 2, 1), 3868);
    let mut fwm = Service::new(ServiceKey::fwmark(Family::Inet, 100), "rr");
    fwm.flags = ServiceFlags::ONE_PACKET;
    let fwm_dest = Destination::new(v4(10, 244, 3, 1), 0);
    let fwm6 = Service::new(ServiceKey::fwmark(Family::Inet6, 101), "lc");
    let mut sip = Service::new(ServiceKey::udp(v4(10, 96, 0, 6), 5060), "rr");
    sip.flags = ServiceFlags::PERSISTENT;
    sip.timeout = 60;
    sip.pe_name = Some("sip".into());
    vec![
        (tcp, vec![masq, gue, ipip, route]),
        (udp6, vec![udp6_dest]),
        (persist6, vec![]),
        (sctp, vec![sctp_dest]),
        (fwm, vec![fwm_dest]),
        (fwm6, vec![]),
        (sip, vec![]),
    ]
}

async fn program(h: &IpvsHandle, list: &[(Service, Vec<Destination>)]) {
    for (s, dests) in list {
        h.add_service(s)
            .await
            .unwrap_or_else(|e| panic!("add {}: {e}", s.key));
        for d in dests {
            h.add_destination(&s.key, d)
                .await
                .unwrap_or_else(|e| panic!("add {} -> {}: {e}", s.key, d.address));
        }
    }
}

#[test]
fn info_reports_the_kernels_version_and_table_size() {
    require_lab();
    let ns = Netns::new("ipvs-info");
    let info = ns
        .block_on(|| async { IpvsHandle::connect().await?.info().await })
        .expect("info");
    let (version, size) = ipvsadm::parse_version(&ns.sh("ipvsadm -Ln")).expect("ipvsadm version");
    assert_eq!(
        format!("{}.{}.{}", info.version.0, info.version.1, info.version.2),
        version
    );
    assert_eq!(info.conn_table_size, size);
}

#[test]
fn timeouts_set_through_the_library_are_the_kernels() {
    require_lab();
    let ns = Netns::new("ipvs-timeouts");
    let (before, after) = ns.block_on(|| async {
        let h = IpvsHandle::connect().await.expect("connect");
        let before = h.timeouts().await.expect("timeouts");
        h.set_timeouts(&Timeouts {
            tcp: 901,
            tcp_fin: 121,
            udp: 301,
        })
        .await
        .expect("set");
        (before, h.timeouts().await.expect("timeouts"))
    });
    assert_eq!(
        after,
        Timeouts {
            tcp: 901,
            tcp_fin: 121,
            udp: 301
        }
    );
    assert_eq!(
        ipvsadm::parse_timeouts(&ns.sh("ipvsadm -L --timeout")),
        Some((901, 121, 301))
    );
    assert_eq!(
        before,
        Timeouts {
            tcp: 900,
            tcp_fin: 120,
            udp: 300
        }
    );
}

#[test]
fn services_and_destinations_of_every_kind_are_reflected_exactly() {
    require_lab();
    let ns = Netns::new("ipvs-kinds");
    let wanted = all_kinds();
    let w = wanted.clone();
    let listed = ns.block_on(move || async move {
        let h = IpvsHandle::connect().await.expect("connect");
        program(&h, &w).await;
        library_holds(&h).await
    });
    assert_kernel_holds(&ns, &wanted);
    // And the library reads back exactly what it wrote.
    assert_eq!(sent_form(&listed), sent_form(&wanted));
}

#[test]
fn get_edit_and_delete_are_reflected_exactly() {
    require_lab();
    let ns = Netns::new("ipvs-edit");
    let mut wanted = all_kinds();
    let w = wanted.clone();
    ns.block_on(move || async move {
        program(&IpvsHandle::connect().await.expect("connect"), &w).await
    });

    // Edit: scheduler and persistence of the first service, weight/thresholds/method of a dest.
    let (mut svc, mut dests) = wanted.remove(0);
    svc.scheduler = "rr".into();
    svc.flags = ServiceFlags::EMPTY;
    svc.timeout = 0;
    svc.netmask = u32::MAX;
    dests[0].weight = 7;
    dests[0].upper_threshold = 50;
    dests[0].lower_threshold = 5;
    dests[3].forward = ForwardMethod::Masquerade;
    dests[3].weight = 2;
    let removed = dests.remove(1);
    let (s2, d2, k2) = (svc.clone(), dests.clone(), svc.key);
    let got = ns.block_on(move || async move {
        let h = IpvsHandle::connect().await.expect("connect");
        h.edit_service(&s2).await.expect("edit service");
        h.edit_destination(&k2, &d2[0]).await.expect("edit dest");
        h.edit_destination(&k2, &d2[2]).await.expect("edit dest");
        h.delete_destination(&k2, removed.address, removed.port)
            .await
            .expect("delete dest");
        h.service(&k2).await.expect("get")
    });
    assert_eq!(got.scheduler, "rr");
    assert!(!got.flags.contains(ServiceFlags::PERSISTENT));
    wanted.insert(0, (svc, dests));
    assert_kernel_holds(&ns, &wanted);

    // Delete every service: nothing is left.
    let keys: Vec<ServiceKey> = wanted.iter().map(|(s, _)| s.key).collect();
    ns.block_on(move || async move {
        let h = IpvsHandle::connect().await.expect("connect");
        for k in keys {
            h.delete_service(&k).await.expect("delete");
        }
    });
    assert!(kernel(&ns).is_empty());
}

#[test]
fn flush_removes_everything() {
    require_lab();
    let ns = Netns::new("ipvs-flush");
    let w = all_kinds();
    ns.block_on(move || async move {
        let h = IpvsHandle::connect().await.expect("connect");
        program(&h, &w).await;
        h.flush().await.expect("flush");
    });
    assert!(kernel(&ns).is_empty());
    assert_eq!(ns.sh("ipvsadm -Sn").trim(), "");
}

/// TCP 10.96.1.1:80 (rr) with destination 10.244.0.9:80, added through the library.
fn one_service_with_a_destination(ns: &Netns) -> (Service, Destination) {
    let svc = Service::new(ServiceKey::tcp(v4(10, 96, 1, 1), 80), "rr");
    let dest = Destination::new(v4(10, 244, 0, 9), 80);
    let (s, d) = (svc.clone(), dest.clone());
    ns.block_on(move || async move {
        let h = IpvsHandle::connect().await.expect("connect");
        h.add_service(&s).await.expect("add");
        h.add_destination(&s.key, &d).await.expect("add dest");
    });
    (svc, dest)
}

#[test]
fn errors_are_typed_and_leave_the_kernel_unchanged() {
    require_lab();
    let ns = Netns::new("ipvs-errors");
    let (svc, dest) = one_service_with_a_destination(&ns);
    let before = ns.sh("ipvsadm -Sn");
    let missing = ServiceKey::udp(v4(10, 96, 1, 2), 53);
    let errors = ns.block_on(move || async move {
        let h = IpvsHandle::connect().await.expect("connect");
        let bad_sched = Service::new(ServiceKey::tcp(v4(10, 96, 1, 3), 80), "nosuchsched");
        vec![
            h.add_service(&svc).await,
            h.delete_service(&missing).await,
            h.edit_service(&Service::new(missing, "rr")).await,
            h.add_service(&bad_sched).await,
            h.add_destination(&svc.key, &dest).await,
            h.delete_destination(&svc.key, v4(10, 244, 0, 10), 80).await,
            h.add_destination(&missing, &dest).await,
        ]
    });
    let after = ns.sh("ipvsadm -Sn");
    assert_eq!(before, after, "a failed operation changed the kernel");
    let e: Vec<String> = errors.iter().map(|r| format!("{r:?}")).collect();
    assert!(
        matches!(errors[0], Err(IpvsError::ServiceExists(_))),
        "{}",
        e[0]
    );
    assert!(
        matches!(errors[1], Err(IpvsError::ServiceNotFound(_))),
        "{}",
        e[1]
    );
    assert!(
        matches!(errors[2], Err(IpvsError::ServiceNotFound(_))),
        "{}",
        e[2]
    );
    assert!(
        matches!(&errors[3], Err(IpvsError::UnknownScheduler(s)) if s == "nosuchsched"),
        "{}",
        e[3]
    );
    assert!(
        matches!(errors[4], Err(IpvsError::DestinationExists { .. })),
        "{}",
        e[4]
    );
    assert!(
        matches!(errors[5], Err(IpvsError::DestinationNotFound { .. })),
        "{}",
        e[5]
    );
    assert!(
        matches!(errors[6], Err(IpvsError::ServiceNotFound(_))),
        "{}",
        e[6]
    );
}

/// Batches of 4 per `sendmsg`: every change is applied in order, each failure is typed as the
/// single-request methods type it (whether it is a batch's last request, which carries the
/// acknowledgement, or not), a change refused before sending leaves its batch's others alone,
/// and the kernel ends with exactly what the successes made.
#[test]
fn batches_apply_each_change_in_order_and_type_each_failure() {
    require_lab();
    let ns = Netns::new("ipvs-batch");
    let (svc, dest) = one_service_with_a_destination(&ns);
    let a = Service::new(ServiceKey::tcp(v4(10, 96, 1, 2), 80), "rr");
    let mut a_wlc = a.clone();
    a_wlc.scheduler = "wlc".into();
    let a_dest = Destination::new(v4(10, 244, 0, 20), 8080);
    let b = Service::new(ServiceKey::udp(v6("fd00::10"), 53), "rr");
    let b_dest = Destination::new(v6("fd00:244::5"), 5353);
    let missing = ServiceKey::udp(v4(10, 96, 1, 9), 53);
    let bad_sched = Service::new(ServiceKey::tcp(v4(10, 96, 1, 3), 80), "nosuchsched");
    let too_long = Service::new(ServiceKey::tcp(v4(10, 96, 1, 4), 80), "x".repeat(40));
    let results = ns.block_on(move || async move {
        let h = IpvsHandle::connect().await.expect("connect");
        let mut batch = h.batch(4).expect("batch socket");
        batch.apply([
            // First sendmsg: its last request fails.
            ipvs::Change::AddService(&a),
            ipvs::Change::AddService(&svc),
            ipvs::Change::AddDestination(&a.key, &a_dest),
            ipvs::Change::AddDestination(&missing, &dest),
            // Second: failures around a success.
            ipvs::Change::DeleteDestination(&svc.key, v4(10, 244, 0, 10), 80),
            ipvs::Change::AddService(&bad_sched),
            ipvs::Change::EditService(&a_wlc),
            ipvs::Change::AddDestination(&a.key, &a_dest),
            // Third: its last change is refused before sending.
            ipvs::Change::DeleteService(&svc.key),
            ipvs::Change::AddService(&b),
            ipvs::Change::AddDestination(&b.key, &b_dest),
            ipvs::Change::AddService(&too_long),
        ])
    });
    // Failures only, by index: every other change succeeded.
    let failed: Vec<usize> = results.iter().map(|(i, _)| *i).collect();
    assert_eq!(failed, vec![1, 3, 4, 5, 7, 11], "{results:?}");
    let error = |i: usize| &results.iter().find(|(at, _)| *at == i).expect("failed").1;
    assert!(
        matches!(error(1), IpvsError::ServiceExists(_)),
        "{:?}",
        error(1)
    );
    assert!(
        matches!(error(3), IpvsError::ServiceNotFound(_)),
        "{:?}",
        error(3)
    );
    assert!(
        matches!(error(4), IpvsError::DestinationNotFound { .. }),
        "{:?}",
        error(4)
    );
    assert!(
        matches!(error(5), IpvsError::UnknownScheduler(s) if s == "nosuchsched"),
        "{:?}",
        error(5)
    );
    assert!(
        matches!(error(7), IpvsError::DestinationExists { .. }),
        "{:?}",
        error(7)
    );
    assert!(
        matches!(error(11), IpvsError::NameTooLong { .. }),
        "{:?}",
        error(11)
    );

    let k = kernel(&ns);
    assert_eq!(
        k.keys().cloned().collect::<Vec<_>>(),
        vec![
            "TCP 10.96.1.2:80".to_string(),
            "UDP [fd00::10]:53".to_string()
        ],
        "{k:?}"
    );
    let ka = &k["TCP 10.96.1.2:80"];
    assert_eq!(ka.scheduler, "wlc");
    assert_eq!(ka.destinations.len(), 1);
    assert!(ka.dest(v4(10, 244, 0, 20), 8080).is_some(), "{ka:?}");
    let kb = &k["UDP [fd00::10]:53"];
    assert!(kb.dest(v6("fd00:244::5"), 5353).is_some(), "{kb:?}");
}

/// client → VIP (IPVS on the node) → backend, TCP and UDP, IPv4 and IPv6; then the
/// library's statistics and connection counts equal ipvsadm's.
#[test]
fn traffic_through_a_service_and_statistics_match_ipvsadm() {
    require_lab();
    let t = Topology::new("ipvs-traffic");
    t.bind_service_address("10.96.0.10/32");
    t.bind_service_address("fd00:96::10/128");
    let _tcp4 = Server::tcp(&t.backend, "10.0.2.2:8080".parse().unwrap());
    let _tcp6 = Server::tcp(&t.backend, "[fd00:2::2]:8080".parse().unwrap());
    let _udp4 = Server::udp(&t.backend, "10.0.2.2:5353".parse().unwrap(), 0);
    let services = vec![
        (
            Service::new(ServiceKey::tcp(v4(10, 96, 0, 10), 80), "rr"),
            Destination::new(v4(10, 0, 2, 2), 8080),
        ),
        (
            Service::new(ServiceKey::tcp(v6("fd00:96::10"), 80), "rr"),
            Destination::new(v6("fd00:2::2"), 8080),
        ),
        (
            Service::new(ServiceKey::udp(v4(10, 96, 0, 10), 53), "rr"),
            Destination::new(v4(10, 0, 2, 2), 5353),
        ),
    ];
    let s = services.clone();
    t.node.block_on(move || async move {
        let h = IpvsHandle::connect().await.expect("connect");
        for (svc, d) in &s {
            h.add_service(svc).await.expect("add");
            h.add_destination(&svc.key, d).await.expect("add dest");
        }
    });
    // The kernel picks each UDP socket's port at random: two requests from one port are one
    // connection to IPVS (CI once drew a repeat), so the UDP service counts the distinct ports.
    let mut udp_ports = std::collections::BTreeSet::new();
    for _ in 0..5 {
        let a = tcp_request(&t.client, "10.96.0.10:80".parse().unwrap()).expect("tcp4 via service");
        assert!(a.starts_with("10.0.1.2:"), "backend saw {a}");
        let a =
            tcp_request(&t.client, "[fd00:96::10]:80".parse().unwrap()).expect("tcp6 via service");
        assert!(a.starts_with("[fd00:1::2]:"), "backend saw {a}");
        let (from, a) = udp_request_from(&t.client, "10.96.0.10:53".parse().unwrap())
            .expect("udp4 via service");
        assert!(a.starts_with("10.0.1.2:"), "backend saw {a}");
        udp_ports.insert(from.port());
    }
    let udp_conns = udp_ports.len() as u64;
    let expected = move |key: &ServiceKey| match key {
        ServiceKey::Tuple {
            protocol: Protocol::Udp,
            ..
        } => udp_conns,
        _ => 5,
    };
    // IPVS folds its per-CPU counters into what it reports on its estimator tick (every 2 s):
    // wait for a tick after the traffic, then the counters are still and both readers agree.
    // Up to 30 s: the estimator is a kthread, and a loaded TCG guest can hold it back.
    let lib = t.node.block_on(move || async move {
        let h = IpvsHandle::connect().await.expect("connect");
        for _ in 0..150 {
            let l = library_holds(&h).await;
            if l.iter().all(|(s, _)| {
                s.stats
                    .as_ref()
                    .is_some_and(|st| st.conns == expected(&s.key))
            }) {
                return l;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        library_holds(&h).await
    });
    let k = kernel(&t.node);
    for (svc, dests) in &lib {
        let ks = &k[&key_name(&svc.key)];
        let st = svc.stats.as_deref().copied().expect("service stats");
        assert_eq!(st.conns, expected(&svc.key), "{}: connections", svc.key);
        let counters = ipvsadm::Counters {
            conns: st.conns,
            inpkts: st.inpkts,
            outpkts: st.outpkts,
            inbytes: st.inbytes,
            outbytes: st.outbytes,
        };
        assert_eq!(counters, ks.stats, "{}: statistics", svc.key);
        for d in dests {
            let kd = ks.dest(d.address, d.port).expect("dest");
            let ds = d.stats.as_deref().copied().expect("dest stats");
            assert_eq!(
                (ds.conns, ds.inpkts, ds.outpkts, ds.inbytes, ds.outbytes),
                (
                    kd.stats.conns,
                    kd.stats.inpkts,
                    kd.stats.outpkts,
                    kd.stats.inbytes,
                    kd.stats.outbytes
                ),
                "{} -> {}: statistics",
                svc.key,
                d.address
            );
            assert_eq!(
                (d.active_conns, d.inactive_conns),
                (kd.active, kd.inactive),
                "{}: connection counts",
                svc.key
            );
        }
    }
    // The connections IPVS tracked are the ones the client made.
    let conns = ipvsadm::parse_conns(&t.node.sh("ipvsadm -Lnc"));
    assert!(
        conns.iter().filter(|c| c.proto == "TCP").count() >= 10,
        "{conns:?}"
    );
    assert!(
        conns
            .iter()
            .all(|c| c.source.0 == v4(10, 0, 1, 2) || c.source.0 == v6("fd00:1::2"))
    );

    // Zeroing the counters through the library is what ipvsadm then reports.
    t.node.block_on(|| async {
        IpvsHandle::connect()
            .await
            .expect("connect")
            .zero(None)
            .await
            .expect("zero")
    });
    assert!(
        kernel(&t.node)
            .values()
            .all(|s| s.stats == ipvsadm::Counters::default())
    );
}

/// 1,000 services × 10 destinations, created concurrently, listed back and matched one for
/// one against ipvsadm; then edited (scheduler, weight, persistence) and deleted.
#[test]
fn a_thousand_services_with_ten_destinations_each() {
    require_lab();
    let ns = Netns::new("ipvs-1000");
    let mut wanted: Vec<(Service, Vec<Destination>)> = (0..1000u32)
        .map(|i| {
            let vip = v4(10, 96, (i / 250) as u8, (i % 250) as u8 + 1);
            let svc = Service::new(ServiceKey::tcp(vip, 80 + (i % 3) as u16), "rr");
            let dests = (0..10u32)
                .map(|j| {
                    Destination::new(
                        v4(10, 244, (i % 200) as u8, (j * 20 + i / 200) as u8 + 1),
                        8080,
                    )
                })
                .collect();
            (svc, dests)
        })
        .collect();
    let w = wanted.clone();
    let listed = ns.block_on(move || async move {
        let h = IpvsHandle::connect().await.expect("connect");
        let ops = w.iter().map(|(s, _)| {
            let h = h.clone();
            let s = s.clone();
            async move { h.add_service(&s).await }
        });
        for r in futures::stream::iter(ops)
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await
        {
            r.expect("add service");
        }
        let ops = w
            .iter()
            .flat_map(|(s, ds)| ds.iter().map(move |d| (s.key, d.clone())))
            .map(|(k, d)| {
                let h = h.clone();
                async move { h.add_destination(&k, &d).await }
            });
        for r in futures::stream::iter(ops)
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await
        {
            r.expect("add destination");
        }
        library_holds(&h).await
    });
    assert_eq!(listed.len(), 1000);
    assert_eq!(sent_form(&listed), sent_form(&wanted));
    assert_kernel_holds(&ns, &wanted);

    // Edits: every 10th service gets wlc + persistence, its first destination weight 5.
    for (i, (s, d)) in wanted.iter_mut().enumerate() {
        if i % 10 == 0 {
            s.scheduler = "wlc".into();
            s.flags = ServiceFlags::PERSISTENT;
            s.timeout = 600;
            d[0].weight = 5;
        }
    }
    let w = wanted.clone();
    ns.block_on(move || async move {
        let h = IpvsHandle::connect().await.expect("connect");
        for (s, d) in w.iter().step_by(10) {
            h.edit_service(s).await.expect("edit");
            h.edit_destination(&s.key, &d[0]).await.expect("edit dest");
        }
    });
    assert_kernel_holds(&ns, &wanted);

    let keys: Vec<ServiceKey> = wanted.iter().map(|(s, _)| s.key).collect();
    ns.block_on(move || async move {
        let h = IpvsHandle::connect().await.expect("connect");
        let ops = keys.into_iter().map(|k| {
            let h = h.clone();
            async move { h.delete_service(&k).await }
        });
        for r in futures::stream::iter(ops)
            .buffer_unordered(64)
            .collect::<Vec<_>>()
            .await
        {
            r.expect("delete");
        }
    });
    assert_eq!(
        ns.sh("ipvsadm -Sn").trim(),
        "",
        "deletes left something behind"
    );
}
