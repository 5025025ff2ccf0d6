//! Byte-exact encoding and decoding of every attribute of every nest, and of
//! whole messages, against bytes worked out by hand from
//! `include/uapi/linux/ip_vs.h` and `ip_vs_ctl.c`.
//!
//! Netlink attribute header: `u16 nla_len` (header + payload, without
//! padding), `u16 nla_type`, host order; payload padded to 4 bytes. Host-order
//! fields are written here for a little-endian machine.
#![cfg(target_endian = "little")]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipvs::attr::{DestAttr, InfoAttr, IpVsFlags, NfInetAddr, ServiceAttr, Stats64Attr, StatsAttr};
use ipvs::convert::{self, request};
use ipvs::{
    Destination, Family, ForwardMethod, IpvsCmd, IpvsCmdAttr, IpvsMessage, Protocol, Service,
    ServiceFlags, ServiceKey, Stats, TunnelConfig, TunnelFlags, TunnelType,
};
use netlink_packet_core::{
    DefaultNla, Emitable, NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload, Nla, NlaBuffer,
    Parseable,
};
use netlink_packet_generic::GenlMessage;

fn enc<T: Nla>(a: &T) -> Vec<u8> {
    let mut v = vec![0xaa; a.buffer_len()];
    a.emit(&mut v);
    v
}

fn dec<T>(bytes: &[u8]) -> T
where
    T: for<'a> Parseable<NlaBuffer<&'a [u8]>>,
{
    let buf = NlaBuffer::new_checked(bytes).expect("valid nla header");
    T::parse(&buf).expect("decodes")
}

/// Encodes to exactly `bytes` and decodes `bytes` back to the same value.
fn check<T>(attr: T, bytes: &[u8])
where
    T: Nla + PartialEq + std::fmt::Debug + for<'a> Parseable<NlaBuffer<&'a [u8]>>,
{
    assert_eq!(enc(&attr), bytes, "encoding {attr:?}");
    assert_eq!(dec::<T>(bytes), attr, "decoding {bytes:?}");
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().expect("ipv6 literal"))
}

fn addr_bytes(kind: u8, a: [u8; 16]) -> Vec<u8> {
    let mut v = vec![20, 0, kind, 0];
    v.extend_from_slice(&a);
    v
}

const V4_10_0_0_1: [u8; 16] = [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const V6_2001_DB8_1: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

// ------------------------------------------------------------ service nest

#[test]
fn svc_af() {
    check(ServiceAttr::Af(2), &[6, 0, 1, 0, 2, 0, 0, 0]);
    check(ServiceAttr::Af(10), &[6, 0, 1, 0, 10, 0, 0, 0]);
}

#[test]
fn svc_protocol() {
    check(ServiceAttr::Protocol(6), &[6, 0, 2, 0, 6, 0, 0, 0]);
    check(ServiceAttr::Protocol(17), &[6, 0, 2, 0, 17, 0, 0, 0]);
    check(ServiceAttr::Protocol(132), &[6, 0, 2, 0, 132, 0, 0, 0]);
}

#[test]
fn svc_addr_is_16_byte_union() {
    check(
        ServiceAttr::Addr(v4(10, 0, 0, 1).into()),
        &addr_bytes(3, V4_10_0_0_1),
    );
    check(
        ServiceAttr::Addr(v6("2001:db8::1").into()),
        &addr_bytes(3, V6_2001_DB8_1),
    );
    // A 4-byte IPv4 address is accepted on decode.
    assert_eq!(
        dec::<ServiceAttr>(&[8, 0, 3, 0, 10, 0, 0, 1]),
        ServiceAttr::Addr(v4(10, 0, 0, 1).into())
    );
}

#[test]
fn svc_port_is_network_order() {
    check(ServiceAttr::Port(80), &[6, 0, 4, 0, 0, 80, 0, 0]);
    check(ServiceAttr::Port(8080), &[6, 0, 4, 0, 0x1f, 0x90, 0, 0]);
}

#[test]
fn svc_fwmark() {
    check(ServiceAttr::Fwmark(0x0102_0304), &[8, 0, 5, 0, 4, 3, 2, 1]);
}

#[test]
fn svc_sched_name_nul_terminated_and_padded() {
    check(
        ServiceAttr::SchedName("rr".into()),
        &[7, 0, 6, 0, b'r', b'r', 0, 0],
    );
    check(
        ServiceAttr::SchedName("wlc".into()),
        &[8, 0, 6, 0, b'w', b'l', b'c', 0],
    );
    check(
        ServiceAttr::SchedName("lblcr".into()),
        &[10, 0, 6, 0, b'l', b'b', b'l', b'c', b'r', 0, 0, 0],
    );
}

#[test]
fn svc_flags_struct() {
    check(
        ServiceAttr::Flags(IpVsFlags {
            flags: 0x0000_0003,
            mask: 0xffff_ffff,
        }),
        &[12, 0, 7, 0, 3, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
    );
}

#[test]
fn svc_timeout() {
    check(ServiceAttr::Timeout(300), &[8, 0, 8, 0, 0x2c, 0x01, 0, 0]);
}

#[test]
fn svc_netmask_is_be32() {
    check(
        ServiceAttr::Netmask(0xffff_ff00),
        &[8, 0, 9, 0, 0xff, 0xff, 0xff, 0x00],
    );
}

#[test]
fn svc_stats_nest() {
    check(
        ServiceAttr::Stats(vec![StatsAttr::Conns(1), StatsAttr::InBytes(2)]),
        &[
            24, 0, 10, 0, // nest
            8, 0, 1, 0, 1, 0, 0, 0, // CONNS u32
            12, 0, 4, 0, 2, 0, 0, 0, 0, 0, 0, 0, // INBYTES u64
        ],
    );
}

#[test]
fn svc_pe_name() {
    check(
        ServiceAttr::PeName("sip".into()),
        &[8, 0, 11, 0, b's', b'i', b'p', 0],
    );
}

#[test]
fn svc_stats64_nest() {
    check(
        ServiceAttr::Stats64(vec![Stats64Attr::Conns(5)]),
        &[16, 0, 12, 0, 12, 0, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0],
    );
}

#[test]
fn svc_unknown_attr_survives() {
    check(
        ServiceAttr::Other(DefaultNla::new(99, vec![1, 2, 3])),
        &[7, 0, 99, 0, 1, 2, 3, 0],
    );
}

#[test]
fn svc_wrong_sizes_are_errors() {
    for bytes in [
        &[5u8, 0, 1, 0, 2, 0, 0, 0][..],         // AF of 1 byte
        &[8, 0, 4, 0, 0, 80, 0, 0],              // PORT of 4 bytes
        &[12, 0, 3, 0, 10, 0, 0, 1, 0, 0, 0, 0], // ADDR of 8 bytes
        &[8, 0, 7, 0, 0, 0, 0, 0],               // FLAGS of 4 bytes
        &[6, 0, 6, 0, 0xff, 0xfe, 0, 0],         // SCHED_NAME not UTF-8
    ] {
        let buf = NlaBuffer::new_checked(bytes).expect("header ok");
        assert!(ServiceAttr::parse(&buf).is_err(), "{bytes:?}");
    }
}

// --------------------------------------------------------- destination nest

#[test]
fn dest_addr() {
    check(
        DestAttr::Addr(NfInetAddr::from(v4(10, 0, 0, 1))),
        &addr_bytes(1, V4_10_0_0_1),
    );
    check(
        DestAttr::Addr(NfInetAddr::from(v6("2001:db8::1"))),
        &addr_bytes(1, V6_2001_DB8_1),
    );
}

#[test]
fn dest_port() {
    check(DestAttr::Port(8080), &[6, 0, 2, 0, 0x1f, 0x90, 0, 0]);
}

#[test]
fn dest_u32_attrs() {
    check(DestAttr::FwdMethod(2), &[8, 0, 3, 0, 2, 0, 0, 0]);
    check(DestAttr::Weight(100), &[8, 0, 4, 0, 100, 0, 0, 0]);
    check(DestAttr::UThresh(1000), &[8, 0, 5, 0, 0xe8, 0x03, 0, 0]);
    check(DestAttr::LThresh(10), &[8, 0, 6, 0, 10, 0, 0, 0]);
    check(DestAttr::ActiveConns(7), &[8, 0, 7, 0, 7, 0, 0, 0]);
    check(DestAttr::InactConns(8), &[8, 0, 8, 0, 8, 0, 0, 0]);
    check(DestAttr::PersistConns(9), &[8, 0, 9, 0, 9, 0, 0, 0]);
}

#[test]
fn dest_stats_nests() {
    check(
        DestAttr::Stats(vec![StatsAttr::OutPkts(3)]),
        &[12, 0, 10, 0, 8, 0, 3, 0, 3, 0, 0, 0],
    );
    check(
        DestAttr::Stats64(vec![Stats64Attr::OutBytes(0x0102_0304_0506_0708)]),
        &[16, 0, 12, 0, 12, 0, 5, 0, 8, 7, 6, 5, 4, 3, 2, 1],
    );
}

#[test]
fn dest_addr_family() {
    check(DestAttr::AddrFamily(10), &[6, 0, 11, 0, 10, 0, 0, 0]);
}

#[test]
fn dest_tunnel_attrs() {
    check(DestAttr::TunType(1), &[5, 0, 13, 0, 1, 0, 0, 0]);
    // TUN_PORT is __be16, TUN_FLAGS plain u16.
    check(DestAttr::TunPort(6080), &[6, 0, 14, 0, 0x17, 0xc0, 0, 0]);
    check(DestAttr::TunFlags(3), &[6, 0, 15, 0, 3, 0, 0, 0]);
}

#[test]
fn dest_unknown_attr_survives() {
    check(DestAttr::Other(DefaultNla::new(40, vec![])), &[4, 0, 40, 0]);
}

// -------------------------------------------------------------- stats nests

#[test]
fn stats32_every_attr() {
    let cases: Vec<(StatsAttr, Vec<u8>)> = vec![
        (StatsAttr::Conns(1), vec![8, 0, 1, 0, 1, 0, 0, 0]),
        (StatsAttr::InPkts(2), vec![8, 0, 2, 0, 2, 0, 0, 0]),
        (StatsAttr::OutPkts(3), vec![8, 0, 3, 0, 3, 0, 0, 0]),
        (
            StatsAttr::InBytes(0x1_0000_0004),
            vec![12, 0, 4, 0, 4, 0, 0, 0, 1, 0, 0, 0],
        ),
        (
            StatsAttr::OutBytes(5),
            vec![12, 0, 5, 0, 5, 0, 0, 0, 0, 0, 0, 0],
        ),
        (StatsAttr::Cps(6), vec![8, 0, 6, 0, 6, 0, 0, 0]),
        (StatsAttr::InPps(7), vec![8, 0, 7, 0, 7, 0, 0, 0]),
        (StatsAttr::OutPps(8), vec![8, 0, 8, 0, 8, 0, 0, 0]),
        (StatsAttr::InBps(9), vec![8, 0, 9, 0, 9, 0, 0, 0]),
        (StatsAttr::OutBps(10), vec![8, 0, 10, 0, 10, 0, 0, 0]),
        (StatsAttr::Pad(vec![]), vec![4, 0, 11, 0]),
        (
            StatsAttr::Other(DefaultNla::new(12, vec![1])),
            vec![5, 0, 12, 0, 1, 0, 0, 0],
        ),
    ];
    for (attr, bytes) in cases {
        check(attr, &bytes);
    }
}

#[test]
fn stats64_every_attr() {
    for kind in 1u8..=10 {
        let value = u64::from(kind) << 32 | u64::from(kind);
        let attr = match kind {
            1 => Stats64Attr::Conns(value),
            2 => Stats64Attr::InPkts(value),
            3 => Stats64Attr::OutPkts(value),
            4 => Stats64Attr::InBytes(value),
            5 => Stats64Attr::OutBytes(value),
            6 => Stats64Attr::Cps(value),
            7 => Stats64Attr::InPps(value),
            8 => Stats64Attr::OutPps(value),
            9 => Stats64Attr::InBps(value),
            _ => Stats64Attr::OutBps(value),
        };
        check(attr, &[12, 0, kind, 0, kind, 0, 0, 0, kind, 0, 0, 0]);
    }
    check(Stats64Attr::Pad(vec![]), &[4, 0, 11, 0]);
    // A 32-bit counter in the 64-bit nest is malformed.
    let buf = NlaBuffer::new_checked(&[8u8, 0, 1, 0, 1, 0, 0, 0][..]).expect("header");
    assert!(Stats64Attr::parse(&buf).is_err());
}

// -------------------------------------------------------- info and first level

#[test]
fn info_attrs() {
    check(InfoAttr::Version(0x0001_0201), &[8, 0, 1, 0, 1, 2, 1, 0]);
    check(InfoAttr::ConnTabSize(4096), &[8, 0, 2, 0, 0, 0x10, 0, 0]);
    check(
        InfoAttr::Other(DefaultNla::new(3, vec![0, 0, 0, 0])),
        &[8, 0, 3, 0, 0, 0, 0, 0],
    );
}

#[test]
fn cmd_attrs() {
    check(
        IpvsCmdAttr::TimeoutTcp(900),
        &[8, 0, 4, 0, 0x84, 0x03, 0, 0],
    );
    check(IpvsCmdAttr::TimeoutTcpFin(120), &[8, 0, 5, 0, 120, 0, 0, 0]);
    check(
        IpvsCmdAttr::TimeoutUdp(300),
        &[8, 0, 6, 0, 0x2c, 0x01, 0, 0],
    );
    check(
        IpvsCmdAttr::Service(vec![ServiceAttr::Fwmark(1)]),
        &[12, 0, 1, 0, 8, 0, 5, 0, 1, 0, 0, 0],
    );
    check(
        IpvsCmdAttr::Dest(vec![DestAttr::Port(80)]),
        &[12, 0, 2, 0, 6, 0, 2, 0, 0, 80, 0, 0],
    );
    check(
        IpvsCmdAttr::Daemon(vec![DefaultNla::new(1, vec![1, 0, 0, 0])]),
        &[12, 0, 3, 0, 8, 0, 1, 0, 1, 0, 0, 0],
    );
    check(
        IpvsCmdAttr::Other(DefaultNla::new(7, vec![])),
        &[4, 0, 7, 0],
    );
}

#[test]
fn nests_with_nla_f_nested_flag_decode() {
    // 0x8001 = NLA_F_NESTED | IPVS_CMD_ATTR_SERVICE.
    assert_eq!(
        dec::<IpvsCmdAttr>(&[12, 0, 0x01, 0x80, 8, 0, 5, 0, 1, 0, 0, 0]),
        IpvsCmdAttr::Service(vec![ServiceAttr::Fwmark(1)])
    );
}

// ----------------------------------------------------------- full messages

/// NEW_SERVICE for TCP 10.0.0.1:80 with scheduler "rr".
const NEW_SERVICE_TCP_RR: [u8; 104] = [
    // nlmsghdr: len 104, type 0x25 (family id), flags REQUEST|ACK, seq 1, pid 0
    104, 0, 0, 0, 0x25, 0, 0x05, 0, 1, 0, 0, 0, 0, 0, 0, 0, //
    // genlmsghdr: cmd NEW_SERVICE, version 1
    1, 1, 0, 0, //
    // IPVS_CMD_ATTR_SERVICE, 4 + 80 bytes
    84, 0, 1, 0, //
    6, 0, 1, 0, 2, 0, 0, 0, // AF_INET
    6, 0, 2, 0, 6, 0, 0, 0, // IPPROTO_TCP
    20, 0, 3, 0, 10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // 10.0.0.1
    6, 0, 4, 0, 0, 80, 0, 0, // port 80, big-endian
    7, 0, 6, 0, b'r', b'r', 0, 0, // "rr\0" + pad
    12, 0, 7, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, // flags 0, mask ~0
    8, 0, 8, 0, 0, 0, 0, 0, // timeout 0
    8, 0, 9, 0, 0xff, 0xff, 0xff, 0xff, // netmask 255.255.255.255
];

fn netlink_bytes(msg: IpvsMessage, family: u16, seq: u32) -> Vec<u8> {
    let mut genl = GenlMessage::from_payload(msg);
    genl.set_resolved_family_id(family);
    let mut nl = NetlinkMessage::from(genl);
    nl.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    nl.header.sequence_number = seq;
    nl.finalize();
    let mut out = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut out);
    out
}

fn tcp_10_0_0_1_80() -> ServiceKey {
    ServiceKey::Tuple {
        protocol: Protocol::Tcp,
        address: v4(10, 0, 0, 1),
        port: 80,
    }
}

#[test]
fn new_service_full_message_bytes() {
    let svc = Service::new(tcp_10_0_0_1_80(), "rr");
    let msg = request::add_service(&svc).expect("valid");
    assert_eq!(netlink_bytes(msg.clone(), 0x25, 1), NEW_SERVICE_TCP_RR);
    assert_eq!(
        msg.to_genl_bytes().expect("encodable"),
        NEW_SERVICE_TCP_RR[16..]
    );

    // And back.
    let nl = NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(&NEW_SERVICE_TCP_RR)
        .expect("decodes");
    assert_eq!(nl.header.message_type, 0x25);
    let NetlinkPayload::InnerMessage(genl) = nl.payload else {
        panic!("not an inner message");
    };
    assert_eq!(genl.payload, msg);
    assert_eq!(
        convert::service_from_message(&genl.payload).expect("typed"),
        svc
    );
}

#[test]
fn new_dest_full_message_bytes() {
    let dest = Destination::new(v4(192, 168, 1, 10), 8080);
    let msg = request::add_destination(&tcp_10_0_0_1_80(), &dest).expect("valid");
    let mut expected: Vec<u8> = vec![5, 1, 0, 0]; // NEW_DEST, version 1
    expected.extend_from_slice(&[48, 0, 1, 0]); // service identity nest
    expected.extend_from_slice(&[6, 0, 1, 0, 2, 0, 0, 0]);
    expected.extend_from_slice(&[6, 0, 2, 0, 6, 0, 0, 0]);
    expected.extend_from_slice(&addr_bytes(3, V4_10_0_0_1));
    expected.extend_from_slice(&[6, 0, 4, 0, 0, 80, 0, 0]);
    expected.extend_from_slice(&[72, 0, 2, 0]); // dest nest
    expected.extend_from_slice(&[6, 0, 11, 0, 2, 0, 0, 0]); // ADDR_FAMILY
    expected.extend_from_slice(&[20, 0, 1, 0, 192, 168, 1, 10]);
    expected.extend_from_slice(&[0; 12]);
    expected.extend_from_slice(&[6, 0, 2, 0, 0x1f, 0x90, 0, 0]); // port 8080
    expected.extend_from_slice(&[8, 0, 3, 0, 0, 0, 0, 0]); // masq
    expected.extend_from_slice(&[8, 0, 4, 0, 1, 0, 0, 0]); // weight 1
    expected.extend_from_slice(&[8, 0, 5, 0, 0, 0, 0, 0]); // upper 0
    expected.extend_from_slice(&[8, 0, 6, 0, 0, 0, 0, 0]); // lower 0
    assert_eq!(msg.to_genl_bytes().expect("encodable"), expected);
    let back = IpvsMessage::from_genl_bytes(&expected).expect("decodes");
    assert_eq!(back, msg);
    assert_eq!(
        convert::destination_from_message(&back, Family::Inet).expect("typed"),
        dest
    );
}

#[test]
fn fwmark_v6_persistent_service_bytes() {
    let mut svc = Service::new(ServiceKey::fwmark(Family::Inet6, 7), "sh");
    svc.flags = ServiceFlags::PERSISTENT | ServiceFlags::SH_PORT;
    svc.timeout = 360;
    svc.netmask = 64;
    svc.pe_name = Some("sip".into());
    let bytes = request::edit_service(&svc)
        .expect("valid")
        .to_genl_bytes()
        .expect("encodable");
    let expected: Vec<u8> = [
        &[2u8, 1, 0, 0][..],                                   // SET_SERVICE
        &[64, 0, 1, 0],                                        // service nest: 4 + 60
        &[6, 0, 1, 0, 10, 0, 0, 0],                            // AF_INET6
        &[8, 0, 5, 0, 7, 0, 0, 0],                             // fwmark 7
        &[7, 0, 6, 0, b's', b'h', 0, 0],                       // "sh"
        &[8, 0, 11, 0, b's', b'i', b'p', 0],                   // PE "sip"
        &[12, 0, 7, 0, 0x11, 0, 0, 0, 0xff, 0xff, 0xff, 0xff], // PERSISTENT|SCHED2
        &[8, 0, 8, 0, 0x68, 0x01, 0, 0],                       // timeout 360
        &[8, 0, 9, 0, 64, 0, 0, 0],                            // /64, host order (kernel cast)
    ]
    .concat();
    assert_eq!(bytes, expected);
    let back = IpvsMessage::from_genl_bytes(&bytes).expect("decodes");
    assert_eq!(convert::service_from_message(&back).expect("typed"), svc);
}

#[test]
fn tunnel_dest_bytes() {
    let mut dest = Destination::new(v6("2001:db8::1"), 0);
    dest.forward = ForwardMethod::Tunnel;
    dest.weight = 5;
    dest.tunnel = Some(TunnelConfig {
        tunnel_type: TunnelType::Gue,
        port: 6080,
        flags: TunnelFlags::CSUM,
    });
    // Mixed family (IPv6 real server behind an IPv4 service) is fine for tunnels.
    let msg = request::edit_destination(&tcp_10_0_0_1_80(), &dest).expect("valid");
    let IpvsCmdAttr::Dest(attrs) = &msg.nlas[1] else {
        panic!("no dest nest");
    };
    let bytes: Vec<u8> = attrs.iter().flat_map(enc).collect();
    let expected: Vec<u8> = [
        &[6u8, 0, 11, 0, 10, 0, 0, 0][..],
        &addr_bytes(1, V6_2001_DB8_1),
        &[6, 0, 2, 0, 0, 0, 0, 0],
        &[8, 0, 3, 0, 2, 0, 0, 0],
        &[8, 0, 4, 0, 5, 0, 0, 0],
        &[5, 0, 13, 0, 1, 0, 0, 0],
        &[6, 0, 14, 0, 0x17, 0xc0, 0, 0],
        &[6, 0, 15, 0, 1, 0, 0, 0],
        &[8, 0, 5, 0, 0, 0, 0, 0],
        &[8, 0, 6, 0, 0, 0, 0, 0],
    ]
    .concat();
    assert_eq!(bytes, expected);
    assert_eq!(
        convert::destination_from_message(
            &IpvsMessage::from_genl_bytes(&msg.to_genl_bytes().expect("enc")).expect("dec"),
            Family::Inet
        )
        .expect("typed"),
        dest
    );
}

/// A service dump entry as `ip_vs_genl_fill_service` writes it on a kernel
/// that pads 64-bit values (`IPVS_STATS_ATTR_PAD` before each u64).
#[test]
fn kernel_service_reply_with_pads_decodes() {
    let stats32: Vec<u8> = [
        &[8u8, 0, 1, 0, 3, 0, 0, 0][..], // conns 3
        &[8, 0, 2, 0, 4, 0, 0, 0],       // inpkts 4
        &[8, 0, 3, 0, 5, 0, 0, 0],       // outpkts 5
        &[4, 0, 11, 0],                  // pad
        &[12, 0, 4, 0, 6, 0, 0, 0, 0, 0, 0, 0],
        &[4, 0, 11, 0],
        &[12, 0, 5, 0, 7, 0, 0, 0, 0, 0, 0, 0],
        &[8, 0, 6, 0, 1, 0, 0, 0],
        &[8, 0, 7, 0, 1, 0, 0, 0],
        &[8, 0, 8, 0, 1, 0, 0, 0],
        &[8, 0, 9, 0, 1, 0, 0, 0],
        &[8, 0, 10, 0, 1, 0, 0, 0],
    ]
    .concat();
    let mut stats64 = Vec::new();
    for kind in 1u8..=10 {
        stats64.extend_from_slice(&[4, 0, 11, 0]);
        let v: u64 = if kind == 1 { 0x1_0000_0003 } else { 9 };
        stats64.extend_from_slice(&[12, 0, kind, 0]);
        stats64.extend_from_slice(&v.to_le_bytes());
    }
    let mut svc_nest: Vec<u8> = [
        &[6u8, 0, 1, 0, 10, 0, 0, 0][..],
        &[6, 0, 2, 0, 17, 0, 0, 0],
        &addr_bytes(3, V6_2001_DB8_1),
        &[6, 0, 4, 0, 0, 53, 0, 0],
        &[8, 0, 6, 0, b'w', b'r', b'r', 0],
    ]
    .concat();
    svc_nest.extend_from_slice(&[12, 0, 7, 0, 2, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    svc_nest.extend_from_slice(&[8, 0, 8, 0, 0, 0, 0, 0]);
    svc_nest.extend_from_slice(&[8, 0, 9, 0, 128, 0, 0, 0]);
    svc_nest.extend_from_slice(&((stats32.len() + 4) as u16).to_le_bytes());
    svc_nest.extend_from_slice(&[10, 0]);
    svc_nest.extend_from_slice(&stats32);
    svc_nest.extend_from_slice(&((stats64.len() + 4) as u16).to_le_bytes());
    svc_nest.extend_from_slice(&[12, 0]);
    svc_nest.extend_from_slice(&stats64);
    let mut genl = vec![1u8, 1, 0, 0];
    genl.extend_from_slice(&((svc_nest.len() + 4) as u16).to_le_bytes());
    genl.extend_from_slice(&[1, 0]);
    genl.extend_from_slice(&svc_nest);

    let msg = IpvsMessage::from_genl_bytes(&genl).expect("decodes");
    assert_eq!(msg.cmd, IpvsCmd::NewService);
    let svc = convert::service_from_message(&msg).expect("typed");
    assert_eq!(
        svc.key,
        ServiceKey::udp(v6("2001:db8::1"), 53),
        "key from AF/PROTOCOL/ADDR/PORT"
    );
    assert_eq!(svc.scheduler, "wrr");
    assert_eq!(svc.flags, ServiceFlags::HASHED);
    assert_eq!(svc.netmask, 128);
    let stats = svc.stats.expect("stats");
    assert!(stats.is_64bit);
    assert_eq!(stats.conns, 0x1_0000_0003, "64-bit value preferred");
    assert_eq!(stats.outbps, 9);
}

#[test]
fn stats_fall_back_to_32_bit_nest() {
    let s = convert::stats_from_attrs(
        Some(&[StatsAttr::Conns(u32::MAX), StatsAttr::InBytes(1 << 40)]),
        None,
    )
    .expect("stats");
    assert_eq!(
        s,
        Stats {
            conns: u64::from(u32::MAX),
            inbytes: 1 << 40,
            is_64bit: false,
            ..Stats::default()
        }
    );
    assert_eq!(convert::stats_from_attrs(None, None), None);
}

#[test]
fn get_info_reply_uses_info_attrs_at_top_level() {
    // IPVS_CMD_SET_INFO reply: attrs 1 and 2 are VERSION/CONN_TAB_SIZE here,
    // not SERVICE/DEST.
    let bytes = [
        14u8, 1, 0, 0, 8, 0, 1, 0, 1, 2, 1, 0, 8, 0, 2, 0, 0, 0x10, 0, 0,
    ];
    let msg = IpvsMessage::from_genl_bytes(&bytes).expect("decodes");
    assert_eq!(
        msg.nlas,
        vec![
            IpvsCmdAttr::Info(InfoAttr::Version(0x010201)),
            IpvsCmdAttr::Info(InfoAttr::ConnTabSize(4096)),
        ]
    );
    let info = convert::info_from_message(&msg).expect("typed");
    assert_eq!(info.version, (1, 2, 1));
    assert_eq!(info.conn_table_size, 4096);
    assert_eq!(msg.to_genl_bytes().expect("enc"), bytes);
}

#[test]
fn get_config_reply() {
    let bytes = [
        12u8, 1, 0, 0, 8, 0, 4, 0, 0x84, 0x03, 0, 0, 8, 0, 5, 0, 120, 0, 0, 0, 8, 0, 6, 0, 0x2c,
        0x01, 0, 0,
    ];
    let msg = IpvsMessage::from_genl_bytes(&bytes).expect("decodes");
    let t = convert::timeouts_from_message(&msg);
    assert_eq!((t.tcp, t.tcp_fin, t.udp), (900, 120, 300));
}

#[test]
fn zero_and_flush_bytes() {
    assert_eq!(
        request::flush().to_genl_bytes().expect("enc"),
        [17, 1, 0, 0]
    );
    assert_eq!(
        request::zero(None)
            .expect("ok")
            .to_genl_bytes()
            .expect("enc"),
        [16, 1, 0, 0]
    );
    assert_eq!(
        request::zero(Some(&ServiceKey::fwmark(Family::Inet, 3)))
            .expect("ok")
            .to_genl_bytes()
            .expect("enc"),
        [
            16, 1, 0, 0, 20, 0, 1, 0, 6, 0, 1, 0, 2, 0, 0, 0, 8, 0, 5, 0, 3, 0, 0, 0
        ]
    );
}

#[test]
fn delete_destination_bytes() {
    let msg = request::delete_destination(&ServiceKey::fwmark(Family::Inet, 1), v4(1, 2, 3, 4), 0)
        .expect("ok");
    let expected: Vec<u8> = [
        &[7u8, 1, 0, 0][..],
        &[20, 0, 1, 0, 6, 0, 1, 0, 2, 0, 0, 0, 8, 0, 5, 0, 1, 0, 0, 0],
        &[
            40, 0, 2, 0, 6, 0, 11, 0, 2, 0, 0, 0, 20, 0, 1, 0, 1, 2, 3, 4,
        ],
        &[0; 12],
        &[6, 0, 2, 0, 0, 0, 0, 0],
    ]
    .concat();
    assert_eq!(msg.to_genl_bytes().expect("enc"), expected);
}
