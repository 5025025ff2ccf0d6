//! `IPVS_CMD_ATTR_DEST` nest: `IPVS_DEST_ATTR_*`.

use netlink_packet_core::{DecodeError, DefaultNla, Nla, NlaBuffer, Parseable};

use super::{
    NfInetAddr, Stats64Attr, StatsAttr, emit_nested, nested_len, parse_be16, parse_nested,
    parse_u8, parse_u16, parse_u32,
};
use crate::constants::*;

/// One attribute of a destination / real server (`IPVS_DEST_ATTR_*`).
///
/// The kernel needs `Addr` and `Port` to identify a destination (plus
/// `AddrFamily` when it differs from the service's); adding or editing one
/// also needs `FwdMethod`, `Weight`, `UThresh` and `LThresh`
/// (`ip_vs_genl_parse_dest`, `full_entry`). The connection counters and
/// statistics only appear in replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestAttr {
    /// `IPVS_DEST_ATTR_ADDR`: real server address.
    Addr(NfInetAddr),
    /// `IPVS_DEST_ATTR_PORT`: real server port, host-order number here,
    /// big-endian (`__be16`) on the wire.
    Port(u16),
    /// `IPVS_DEST_ATTR_FWD_METHOD`: u32, `IP_VS_CONN_F_*` forwarding bits
    /// (the kernel masks it with `IP_VS_CONN_F_FWD_MASK`).
    FwdMethod(u32),
    /// `IPVS_DEST_ATTR_WEIGHT`: u32 (the kernel's `int`; negative is refused).
    Weight(u32),
    /// `IPVS_DEST_ATTR_U_THRESH`: u32 upper connection threshold.
    UThresh(u32),
    /// `IPVS_DEST_ATTR_L_THRESH`: u32 lower connection threshold.
    LThresh(u32),
    /// `IPVS_DEST_ATTR_ACTIVE_CONNS`: u32 (replies only).
    ActiveConns(u32),
    /// `IPVS_DEST_ATTR_INACT_CONNS`: u32 (replies only).
    InactConns(u32),
    /// `IPVS_DEST_ATTR_PERSIST_CONNS`: u32 (replies only).
    PersistConns(u32),
    /// `IPVS_DEST_ATTR_STATS`: 32-bit statistics nest (replies only).
    Stats(Vec<StatsAttr>),
    /// `IPVS_DEST_ATTR_ADDR_FAMILY`: u16 address family of `Addr`.
    AddrFamily(u16),
    /// `IPVS_DEST_ATTR_STATS64`: 64-bit statistics nest (replies only).
    Stats64(Vec<Stats64Attr>),
    /// `IPVS_DEST_ATTR_TUN_TYPE`: u8 tunnel type (`IP_VS_CONN_F_TUNNEL_TYPE_*`).
    TunType(u8),
    /// `IPVS_DEST_ATTR_TUN_PORT`: tunnel port, host-order number here,
    /// big-endian (`__be16`) on the wire.
    TunPort(u16),
    /// `IPVS_DEST_ATTR_TUN_FLAGS`: u16 (`IP_VS_TUNNEL_ENCAP_FLAG_*`).
    TunFlags(u16),
    /// Any attribute this crate does not know.
    Other(DefaultNla),
}

impl Nla for DestAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Addr(_) => NfInetAddr::LEN,
            Self::TunType(_) => 1,
            Self::Port(_) | Self::AddrFamily(_) | Self::TunPort(_) | Self::TunFlags(_) => 2,
            Self::FwdMethod(_)
            | Self::Weight(_)
            | Self::UThresh(_)
            | Self::LThresh(_)
            | Self::ActiveConns(_)
            | Self::InactConns(_)
            | Self::PersistConns(_) => 4,
            Self::Stats(v) => nested_len(v),
            Self::Stats64(v) => nested_len(v),
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Addr(_) => IPVS_DEST_ATTR_ADDR,
            Self::Port(_) => IPVS_DEST_ATTR_PORT,
            Self::FwdMethod(_) => IPVS_DEST_ATTR_FWD_METHOD,
            Self::Weight(_) => IPVS_DEST_ATTR_WEIGHT,
            Self::UThresh(_) => IPVS_DEST_ATTR_U_THRESH,
            Self::LThresh(_) => IPVS_DEST_ATTR_L_THRESH,
            Self::ActiveConns(_) => IPVS_DEST_ATTR_ACTIVE_CONNS,
            Self::InactConns(_) => IPVS_DEST_ATTR_INACT_CONNS,
            Self::PersistConns(_) => IPVS_DEST_ATTR_PERSIST_CONNS,
            Self::Stats(_) => IPVS_DEST_ATTR_STATS,
            Self::AddrFamily(_) => IPVS_DEST_ATTR_ADDR_FAMILY,
            Self::Stats64(_) => IPVS_DEST_ATTR_STATS64,
            Self::TunType(_) => IPVS_DEST_ATTR_TUN_TYPE,
            Self::TunPort(_) => IPVS_DEST_ATTR_TUN_PORT,
            Self::TunFlags(_) => IPVS_DEST_ATTR_TUN_FLAGS,
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            Self::Addr(a) => buf[..NfInetAddr::LEN].copy_from_slice(&a.0),
            Self::Port(v) | Self::TunPort(v) => buf[..2].copy_from_slice(&v.to_be_bytes()),
            Self::AddrFamily(v) | Self::TunFlags(v) => buf[..2].copy_from_slice(&v.to_ne_bytes()),
            Self::TunType(v) => buf[0] = *v,
            Self::FwdMethod(v)
            | Self::Weight(v)
            | Self::UThresh(v)
            | Self::LThresh(v)
            | Self::ActiveConns(v)
            | Self::InactConns(v)
            | Self::PersistConns(v) => buf[..4].copy_from_slice(&v.to_ne_bytes()),
            Self::Stats(v) => emit_nested(buf, v),
            Self::Stats64(v) => emit_nested(buf, v),
            Self::Other(nla) => nla.emit_value(buf),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for DestAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            IPVS_DEST_ATTR_ADDR => Self::Addr(NfInetAddr::parse(v)?),
            IPVS_DEST_ATTR_PORT => Self::Port(parse_be16(v, "IPVS_DEST_ATTR_PORT")?),
            IPVS_DEST_ATTR_FWD_METHOD => {
                Self::FwdMethod(parse_u32(v, "IPVS_DEST_ATTR_FWD_METHOD")?)
            }
            IPVS_DEST_ATTR_WEIGHT => Self::Weight(parse_u32(v, "IPVS_DEST_ATTR_WEIGHT")?),
            IPVS_DEST_ATTR_U_THRESH => Self::UThresh(parse_u32(v, "IPVS_DEST_ATTR_U_THRESH")?),
            IPVS_DEST_ATTR_L_THRESH => Self::LThresh(parse_u32(v, "IPVS_DEST_ATTR_L_THRESH")?),
            IPVS_DEST_ATTR_ACTIVE_CONNS => {
                Self::ActiveConns(parse_u32(v, "IPVS_DEST_ATTR_ACTIVE_CONNS")?)
            }
            IPVS_DEST_ATTR_INACT_CONNS => {
                Self::InactConns(parse_u32(v, "IPVS_DEST_ATTR_INACT_CONNS")?)
            }
            IPVS_DEST_ATTR_PERSIST_CONNS => {
                Self::PersistConns(parse_u32(v, "IPVS_DEST_ATTR_PERSIST_CONNS")?)
            }
            IPVS_DEST_ATTR_STATS => Self::Stats(parse_nested(v, "IPVS_DEST_ATTR_STATS")?),
            IPVS_DEST_ATTR_ADDR_FAMILY => {
                Self::AddrFamily(parse_u16(v, "IPVS_DEST_ATTR_ADDR_FAMILY")?)
            }
            IPVS_DEST_ATTR_STATS64 => Self::Stats64(parse_nested(v, "IPVS_DEST_ATTR_STATS64")?),
            IPVS_DEST_ATTR_TUN_TYPE => Self::TunType(parse_u8(v, "IPVS_DEST_ATTR_TUN_TYPE")?),
            IPVS_DEST_ATTR_TUN_PORT => Self::TunPort(parse_be16(v, "IPVS_DEST_ATTR_TUN_PORT")?),
            IPVS_DEST_ATTR_TUN_FLAGS => Self::TunFlags(parse_u16(v, "IPVS_DEST_ATTR_TUN_FLAGS")?),
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}
