//! Hostile input: arbitrary bytes, and mutated or truncated valid messages,
//! fed to the message decoder and the typed conversions must never panic.
//! What decodes must re-encode (when it fits) and decode to the same value.

use std::net::{IpAddr, Ipv4Addr};

use ipvs::convert::{self, reply, request};
use ipvs::{
    Destination, Family, ForwardMethod, Info, IpvsCmdAttr, IpvsMessage, Service, ServiceFlags,
    ServiceKey, Stats, Timeouts, TunnelConfig, TunnelType,
};
use netlink_packet_core::{NetlinkMessage, ParseableParametrized};
use netlink_packet_generic::{GenlHeader, GenlMessage};
use proptest::prelude::*;

/// Decodes `bytes` as a genl payload and runs every typed conversion on the
/// result. Returns the decoded message, if any.
fn exercise(bytes: &[u8]) -> Option<IpvsMessage> {
    let msg = IpvsMessage::from_genl_bytes(bytes).ok()?;
    typed(&msg);
    // Whatever decodes re-encodes (if each attribute still fits a netlink
    // header) and decodes to the same thing.
    if let Ok(again) = msg.to_genl_bytes() {
        let back = IpvsMessage::from_genl_bytes(&again);
        assert_eq!(back.ok(), Some(normalize(&msg)), "re-encode of {bytes:?}");
    }
    Some(msg)
}

/// netlink-packet-core 0.9 cannot emit an attribute with both
/// NLA_F_NESTED and NLA_F_NET_BYTEORDER: it keeps only NLA_F_NESTED. The
/// kernel never sends such a thing; apply the same loss to compare.
fn normalize(msg: &IpvsMessage) -> IpvsMessage {
    use ipvs::attr::{DestAttr, InfoAttr, ServiceAttr, Stats64Attr, StatsAttr};
    use netlink_packet_core::{DefaultNla, NLA_F_NESTED, NLA_F_NET_BYTEORDER, Nla};
    fn d(n: &DefaultNla) -> DefaultNla {
        let mut kind = n.kind();
        if kind & NLA_F_NESTED != 0 {
            kind &= !NLA_F_NET_BYTEORDER;
        }
        let mut value = vec![0u8; n.value_len()];
        n.emit_value(&mut value);
        DefaultNla::new(kind, value)
    }
    fn s32(v: &[StatsAttr]) -> Vec<StatsAttr> {
        v.iter()
            .map(|a| match a {
                StatsAttr::Other(n) => StatsAttr::Other(d(n)),
                a => a.clone(),
            })
            .collect()
    }
    fn s64(v: &[Stats64Attr]) -> Vec<Stats64Attr> {
        v.iter()
            .map(|a| match a {
                Stats64Attr::Other(n) => Stats64Attr::Other(d(n)),
                a => a.clone(),
            })
            .collect()
    }
    let nlas = msg
        .nlas
        .iter()
        .map(|a| match a {
            IpvsCmdAttr::Service(v) => IpvsCmdAttr::Service(
                v.iter()
                    .map(|a| match a {
                        ServiceAttr::Other(n) => ServiceAttr::Other(d(n)),
                        ServiceAttr::Stats(v) => ServiceAttr::Stats(s32(v)),
                        ServiceAttr::Stats64(v) => ServiceAttr::Stats64(s64(v)),
                        a => a.clone(),
                    })
                    .collect(),
            ),
            IpvsCmdAttr::Dest(v) => IpvsCmdAttr::Dest(
                v.iter()
                    .map(|a| match a {
                        DestAttr::Other(n) => DestAttr::Other(d(n)),
                        DestAttr::Stats(v) => DestAttr::Stats(s32(v)),
                        DestAttr::Stats64(v) => DestAttr::Stats64(s64(v)),
                        a => a.clone(),
                    })
                    .collect(),
            ),
            IpvsCmdAttr::Daemon(v) => IpvsCmdAttr::Daemon(v.iter().map(d).collect()),
            IpvsCmdAttr::Info(InfoAttr::Other(n)) => IpvsCmdAttr::Info(InfoAttr::Other(d(n))),
            IpvsCmdAttr::Other(n) => IpvsCmdAttr::Other(d(n)),
            a => a.clone(),
        })
        .collect();
    IpvsMessage::new(msg.cmd, nlas)
}

fn typed(msg: &IpvsMessage) {
    let _ = convert::service_from_message(msg);
    let _ = convert::destination_from_message(msg, Family::Inet);
    let _ = convert::destination_from_message(msg, Family::Inet6);
    let _ = convert::info_from_message(msg);
    let _ = convert::timeouts_from_message(msg);
    for a in &msg.nlas {
        match a {
            IpvsCmdAttr::Service(attrs) => {
                let _ = convert::service_from_attrs(attrs);
            }
            IpvsCmdAttr::Dest(attrs) => {
                let _ = convert::destination_from_attrs(attrs, Family::Inet6);
            }
            _ => {}
        }
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let key4 = ServiceKey::tcp(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 80);
    let key6 = ServiceKey::udp(IpAddr::V6("fd00::1".parse().expect("v6")), 53);
    let mut svc = Service::new(key6, "sh");
    svc.flags = ServiceFlags::PERSISTENT | ServiceFlags::HASHED;
    svc.pe_name = Some("sip".into());
    svc.stats = Some(Box::new(Stats {
        conns: 1 << 40,
        is_64bit: true,
        ..Stats::default()
    }));
    let mut d = Destination::new(IpAddr::V6("fd00::2".parse().expect("v6")), 8080);
    d.forward = ForwardMethod::Tunnel;
    d.tunnel = Some(TunnelConfig {
        tunnel_type: TunnelType::Gue,
        port: 6080,
        ..TunnelConfig::default()
    });
    d.stats = Some(Box::default());
    let msgs = [
        request::add_service(&Service::new(key4, "rr")).expect("valid"),
        request::add_destination(
            &key4,
            &Destination::new(IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4)), 1),
        )
        .expect("valid"),
        reply::service(&svc),
        reply::destination(&d),
        reply::info(&Info {
            version: (1, 2, 1),
            conn_table_size: 4096,
        }),
        reply::timeouts(&Timeouts {
            tcp: 1,
            tcp_fin: 2,
            udp: 3,
        }),
        request::zero(Some(&ServiceKey::fwmark(Family::Inet, 9))).expect("valid"),
    ];
    msgs.iter()
        .map(|m| m.to_genl_bytes().expect("encodable"))
        .collect()
}

#[test]
fn seeds_decode() {
    for s in seeds() {
        assert!(exercise(&s).is_some());
    }
}

#[test]
fn every_truncation_of_every_seed() {
    for s in seeds() {
        for n in 0..s.len() {
            let _ = exercise(&s[..n]);
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (
            any::<usize>(),
            prop_oneof![Just(0u8), Just(0xff), Just(4), Just(3), any::<u8>()]
        )
            .prop_map(|(i, b)| Mutation::Set(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        (any::<usize>(), 1usize..8).prop_map(|(i, n)| Mutation::Remove(i, n)),
    ]
}

fn apply(mut v: Vec<u8>, muts: &[Mutation]) -> Vec<u8> {
    for m in muts {
        let len = v.len().max(1);
        match m {
            Mutation::Flip(i, b) => {
                if let Some(x) = v.get_mut(i % len) {
                    *x ^= b;
                }
            }
            Mutation::Set(i, b) => {
                if let Some(x) = v.get_mut(i % len) {
                    *x = *b;
                }
            }
            Mutation::Truncate(n) => v.truncate(n % len),
            Mutation::Insert(i, bytes) => {
                let at = i % (v.len() + 1);
                v.splice(at..at, bytes.iter().copied());
            }
            Mutation::Remove(i, n) => {
                let at = i % len;
                let end = (at + n).min(v.len());
                if at < end {
                    v.drain(at..end);
                }
            }
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_genl_payloads(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = exercise(&bytes);
    }

    #[test]
    fn arbitrary_attrs_under_every_command(cmd in any::<u8>(), bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(msg) = IpvsMessage::parse_with_param(&bytes[..], GenlHeader { cmd, version: 1 }) {
            typed(&msg);
        }
    }

    #[test]
    fn arbitrary_netlink_datagrams(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(&bytes);
    }

    #[test]
    fn mutated_valid_messages(
        seed in 0usize..7,
        muts in proptest::collection::vec(arb_mutation(), 1..6),
    ) {
        let s = seeds();
        let bytes = apply(s[seed % s.len()].clone(), &muts);
        let _ = exercise(&bytes);
        // The same bytes framed as a netlink datagram.
        let mut nl = Vec::with_capacity(bytes.len() + 16);
        nl.extend_from_slice(&((bytes.len() + 16) as u32).to_ne_bytes());
        nl.extend_from_slice(&[0x25, 0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        nl.extend_from_slice(&bytes);
        let _ = NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(&nl);
    }
}

#[path = "../../tests/fuzz_driver.rs"]
mod fuzz_driver;

/// Random attribute trees: `struct nlattr` headers (length, type with the nested and
/// byte-order flags now and then) around random payloads or nested trees, with lengths that are
/// sometimes wrong. Random bytes rarely frame even one attribute; these reach the typed
/// conversions.
fn random_attrs(rng: &mut fuzz_driver::Rng, depth: u32, out: &mut Vec<u8>) {
    for _ in 0..rng.range(0, 5) {
        let kind = rng.range(0, 18) as u16
            | if rng.chance(1, 4) { 0x8000 } else { 0 }
            | if rng.chance(1, 16) { 0x4000 } else { 0 };
        let mut payload = Vec::new();
        if depth < 3 && rng.chance(1, 3) {
            random_attrs(rng, depth + 1, &mut payload);
        } else {
            let n = *rng.pick(&[0usize, 1, 2, 4, 8, 16, 20, 32, 40, 64]);
            let n = if rng.chance(1, 4) {
                rng.range(0, 70)
            } else {
                n
            };
            payload = rng.bytes(n);
        }
        let mut len = (4 + payload.len()) as u16;
        if rng.chance(1, 16) {
            len = rng.u16() % 128;
        }
        out.extend(len.to_ne_bytes());
        out.extend(kind.to_ne_bytes());
        out.extend(&payload);
        while !out.len().is_multiple_of(4) && !rng.chance(1, 32) {
            out.push(0);
        }
    }
}

/// The bounded fuzz run of the decoder (`scripts/test`'s fuzz step sets FUZZ_SECONDS; a plain
/// `cargo test` runs it for 2 s): generated attribute trees under every command, mutated valid
/// messages, and either framed as a whole netlink datagram. Whatever decodes must re-encode and
/// decode to the same message (`exercise`); nothing may panic.
#[test]
fn fuzz_decoder_bounded() {
    let corpus = seeds();
    fuzz_driver::run("netlink-decoder", 2.0, |rng, n| {
        let mut bytes = match rng.below(3) {
            0 => {
                let mut b = vec![rng.u8(), if rng.chance(7, 8) { 1 } else { rng.u8() }, 0, 0];
                random_attrs(rng, 0, &mut b);
                b
            }
            _ => rng.pick(&corpus).clone(),
        };
        if rng.chance(3, 4) {
            let donor = rng.pick(&corpus).clone();
            fuzz_driver::mutate(rng, &mut bytes, 1024, Some(&donor));
        }
        let input = bytes.clone();
        let outcome = std::panic::catch_unwind(move || {
            let _ = exercise(&bytes);
            let mut nl = Vec::with_capacity(bytes.len() + 16);
            nl.extend_from_slice(&((bytes.len() + 16) as u32).to_ne_bytes());
            nl.extend_from_slice(&[0x25, 0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
            nl.extend_from_slice(&bytes);
            let _ = NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(&nl);
        });
        if let Err(panic) = outcome {
            eprintln!(
                "fuzz netlink-decoder: execution {n} failed on genl payload {}",
                fuzz_driver::hex(&input)
            );
            std::panic::resume_unwind(panic);
        }
    });
}
