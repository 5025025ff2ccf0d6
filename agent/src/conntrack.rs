//! nf_conntrack's table read over ctnetlink, without the `conntrack` tool: this module owns the
//! dump request, the parsing of its entries ([`CtEntry`]: original and reply tuples, TCP state,
//! status, id) and the blocking dump on [`Nfnl`]. The switch from kube-proxy
//! (docs/switching.md) reads the connections kube-proxy's ipvs mode left tracked from it.
//!
//! Layouts (`include/uapi/linux/netfilter/nfnetlink_conntrack.h`): messages of subsystem
//! `NFNL_SUBSYS_CTNETLINK` (1); `IPCTNL_MSG_CT_GET` (1) with `NLM_F_DUMP` asks for every entry
//! of `nfgen_family` (`NFPROTO_UNSPEC`: both families), answered by `IPCTNL_MSG_CT_NEW` (0)
//! messages. An entry carries `CTA_TUPLE_ORIG` (1) and `CTA_TUPLE_REPLY` (2), each nesting
//! `CTA_TUPLE_IP` (1: `CTA_IP_V4_SRC`/`DST` 1/2, `CTA_IP_V6_SRC`/`DST` 3/4) and
//! `CTA_TUPLE_PROTO` (2: `CTA_PROTO_NUM` 1, `CTA_PROTO_SRC_PORT`/`DST_PORT` 2/3, big-endian);
//! `CTA_STATUS` (3, big-endian u32, `IPS_*`); `CTA_PROTOINFO` (4) nesting `CTA_PROTOINFO_TCP`
//! (1) nesting `CTA_PROTOINFO_TCP_STATE` (1, u8); `CTA_ID` (12, big-endian u32).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::cleanup::nfnetlink::{
    NFPROTO_UNSPEC, NLM_F_DUMP, NLM_F_REQUEST, Nfnl, NfnlError, Received, message, parse_attrs,
    parse_nlattrs,
};

pub const NFNL_SUBSYS_CTNETLINK: u8 = 1;
pub const IPCTNL_MSG_CT_NEW: u8 = 0;
pub const IPCTNL_MSG_CT_GET: u8 = 1;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_ID: u16 = 12;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;

/// `IPS_SRC_NAT`: the entry source-NATs (kube-proxy's MASQUERADE acted on it).
pub const IPS_SRC_NAT: u32 = 1 << 4;
/// `IPS_DST_NAT`.
pub const IPS_DST_NAT: u32 = 1 << 5;

/// `TCP_CONNTRACK_ESTABLISHED`.
pub const TCP_CONNTRACK_ESTABLISHED: u8 = 3;

/// One direction of a conntrack entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtTuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Ports (0 for protocols without them).
    pub sport: u16,
    pub dport: u16,
}

impl CtTuple {
    /// The same tuple seen from the other end.
    pub fn reversed(&self) -> Self {
        CtTuple {
            src: self.dst,
            dst: self.src,
            proto: self.proto,
            sport: self.dport,
            dport: self.sport,
        }
    }
}

/// `proto 6 10.0.0.1:40000 -> 10.96.0.10:80`.
impl std::fmt::Display for CtTuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "proto {} {} -> {}",
            self.proto,
            SocketAddr::new(self.src, self.sport),
            SocketAddr::new(self.dst, self.dport)
        )
    }
}

/// A conntrack entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtEntry {
    /// The kernel's id of the entry (`CTA_ID`), 0 when absent.
    pub id: u32,
    /// The direction of the first packet.
    pub orig: CtTuple,
    /// The direction replies are expected in (after NAT).
    pub reply: CtTuple,
    /// `IPS_*` status bits.
    pub status: u32,
    /// TCP state (`TCP_CONNTRACK_*`), for TCP entries.
    pub tcp_state: Option<u8>,
}

fn ct_type(cmd: u8) -> u16 {
    u16::from(NFNL_SUBSYS_CTNETLINK) << 8 | u16::from(cmd)
}

/// A dump of every conntrack entry of both families.
pub fn ct_dump_request(seq: u32) -> Vec<u8> {
    message(
        ct_type(IPCTNL_MSG_CT_GET),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        NFPROTO_UNSPEC,
        0,
        &[],
    )
}

fn find<'a>(attrs: &[(u16, &'a [u8])], ty: u16) -> Option<&'a [u8]> {
    attrs.iter().find(|(t, _)| *t == ty).map(|(_, v)| *v)
}

fn be16(v: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(v.get(..2)?.try_into().ok()?))
}

fn be32(v: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?))
}

fn parse_tuple(value: &[u8]) -> Option<CtTuple> {
    let attrs = parse_nlattrs(value);
    let ip = parse_nlattrs(find(&attrs, CTA_TUPLE_IP)?);
    let addr4 = |ty| -> Option<IpAddr> {
        let b: [u8; 4] = find(&ip, ty)?.get(..4)?.try_into().ok()?;
        Some(IpAddr::V4(Ipv4Addr::from(b)))
    };
    let addr6 = |ty| -> Option<IpAddr> {
        let b: [u8; 16] = find(&ip, ty)?.get(..16)?.try_into().ok()?;
        Some(IpAddr::V6(Ipv6Addr::from(b)))
    };
    let (src, dst) = match (addr4(CTA_IP_V4_SRC), addr4(CTA_IP_V4_DST)) {
        (Some(s), Some(d)) => (s, d),
        _ => (addr6(CTA_IP_V6_SRC)?, addr6(CTA_IP_V6_DST)?),
    };
    let proto = parse_nlattrs(find(&attrs, CTA_TUPLE_PROTO)?);
    Some(CtTuple {
        src,
        dst,
        proto: *find(&proto, CTA_PROTO_NUM)?.first()?,
        sport: find(&proto, CTA_PROTO_SRC_PORT).and_then(be16).unwrap_or(0),
        dport: find(&proto, CTA_PROTO_DST_PORT).and_then(be16).unwrap_or(0),
    })
}

/// The entry of one `IPCTNL_MSG_CT_NEW` message's payload (after the header); `None` when it
/// lacks a tuple.
pub fn parse_entry(payload: &[u8]) -> Option<CtEntry> {
    let attrs = parse_attrs(payload);
    let tcp_state = find(&attrs, CTA_PROTOINFO)
        .map(parse_nlattrs)
        .and_then(|p| find(&p, CTA_PROTOINFO_TCP).map(parse_nlattrs))
        .and_then(|t| find(&t, CTA_PROTOINFO_TCP_STATE).and_then(|v| v.first().copied()));
    Some(CtEntry {
        id: find(&attrs, CTA_ID).and_then(be32).unwrap_or(0),
        orig: parse_tuple(find(&attrs, CTA_TUPLE_ORIG)?)?,
        reply: parse_tuple(find(&attrs, CTA_TUPLE_REPLY)?)?,
        status: find(&attrs, CTA_STATUS).and_then(be32).unwrap_or(0),
        tcp_state,
    })
}

/// The entries of a dump's replies (messages that are not entries are skipped).
pub fn parse_entries(msgs: &[Received]) -> Vec<CtEntry> {
    msgs.iter()
        .filter(|m| m.ty == ct_type(IPCTNL_MSG_CT_NEW))
        .filter_map(|m| parse_entry(&m.payload))
        .collect()
}

impl Nfnl {
    /// Every conntrack entry of the calling thread's network namespace.
    pub fn conntrack_entries(&mut self) -> Result<Vec<CtEntry>, NfnlError> {
        let msgs = self.dump("listing conntrack entries", ct_dump_request)?;
        Ok(parse_entries(&msgs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cleanup::nfnetlink::attr;

    fn nest(ty: u16, inner: &[Vec<u8>]) -> Vec<u8> {
        attr(ty | 0x8000, &inner.concat())
    }

    fn tuple_attr(
        ty: u16,
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        sport: u16,
        dport: u16,
    ) -> Vec<u8> {
        nest(
            ty,
            &[
                nest(
                    CTA_TUPLE_IP,
                    &[attr(CTA_IP_V4_SRC, &src), attr(CTA_IP_V4_DST, &dst)],
                ),
                nest(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[proto]),
                        attr(CTA_PROTO_SRC_PORT, &sport.to_be_bytes()),
                        attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
                    ],
                ),
            ],
        )
    }

    #[test]
    fn the_dump_request_is_a_ctnetlink_get_dump_of_both_families() {
        let m = ct_dump_request(7);
        assert_eq!(m.len(), 20);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), 0x0101);
        assert_eq!(u16::from_ne_bytes([m[6], m[7]]), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(u32::from_ne_bytes([m[8], m[9], m[10], m[11]]), 7);
        assert_eq!(m[16], NFPROTO_UNSPEC);
    }

    #[test]
    fn an_entry_parses_into_its_tuples_status_tcp_state_and_id() {
        // A NodePort connection kube-proxy masqueraded: client 192.0.2.7:40000 -> node
        // 10.0.0.1:30080, replies from backend 10.244.1.2:8080 to the node's port 21530.
        let mut payload = vec![2, 0, 0, 0]; // nfgenmsg: AF_INET
        payload.extend(tuple_attr(
            CTA_TUPLE_ORIG,
            [192, 0, 2, 7],
            [10, 0, 0, 1],
            6,
            40000,
            30080,
        ));
        payload.extend(tuple_attr(
            CTA_TUPLE_REPLY,
            [10, 244, 1, 2],
            [10, 0, 0, 1],
            6,
            8080,
            21530,
        ));
        payload.extend(attr(
            CTA_STATUS,
            &(IPS_SRC_NAT | IPS_DST_NAT | 0x8).to_be_bytes(),
        ));
        payload.extend(nest(
            CTA_PROTOINFO,
            &[nest(
                CTA_PROTOINFO_TCP,
                &[attr(CTA_PROTOINFO_TCP_STATE, &[TCP_CONNTRACK_ESTABLISHED])],
            )],
        ));
        payload.extend(attr(CTA_ID, &0xdead_beefu32.to_be_bytes()));
        let e = parse_entry(&payload).expect("entry");
        assert_eq!(
            e.orig.to_string(),
            "proto 6 192.0.2.7:40000 -> 10.0.0.1:30080"
        );
        assert_eq!(
            e.reply.to_string(),
            "proto 6 10.244.1.2:8080 -> 10.0.0.1:21530"
        );
        assert_eq!(e.status & IPS_SRC_NAT, IPS_SRC_NAT);
        assert_eq!(e.tcp_state, Some(TCP_CONNTRACK_ESTABLISHED));
        assert_eq!(e.id, 0xdead_beef);
        assert_eq!(e.reply.reversed().src, e.reply.dst);
    }

    #[test]
    fn an_entry_without_tuples_is_skipped_and_garbage_does_not_panic() {
        let mut payload = vec![2, 0, 0, 0];
        payload.extend(attr(CTA_STATUS, &8u32.to_be_bytes()));
        assert_eq!(parse_entry(&payload), None);
        for n in 0..64u8 {
            let junk: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            let _ = parse_entry(&junk);
        }
    }
}
