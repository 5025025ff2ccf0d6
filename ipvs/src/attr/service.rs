//! `IPVS_CMD_ATTR_SERVICE` nest: `IPVS_SVC_ATTR_*`.

use netlink_packet_core::{DecodeError, DefaultNla, Nla, NlaBuffer, Parseable};

use super::{
    IpVsFlags, NfInetAddr, Stats64Attr, StatsAttr, cstring_len, emit_cstring, emit_nested,
    nested_len, parse_be16, parse_be32, parse_cstring, parse_nested, parse_u16, parse_u32,
};
use crate::constants::*;

/// One attribute of a virtual service (`IPVS_SVC_ATTR_*`).
///
/// The kernel needs `Af` plus either `Fwmark` or `Protocol`+`Addr`+`Port` to
/// identify a service; adding or editing one also needs `SchedName`, `Flags`,
/// `Timeout` and `Netmask` (`ip_vs_genl_parse_service`, `full_entry`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceAttr {
    /// `IPVS_SVC_ATTR_AF`: u16 address family (`AF_INET`/`AF_INET6`).
    Af(u16),
    /// `IPVS_SVC_ATTR_PROTOCOL`: u16 IP protocol number.
    Protocol(u16),
    /// `IPVS_SVC_ATTR_ADDR`: virtual address.
    Addr(NfInetAddr),
    /// `IPVS_SVC_ATTR_PORT`: virtual port, a host-order number here,
    /// big-endian (`__be16`) on the wire.
    Port(u16),
    /// `IPVS_SVC_ATTR_FWMARK`: u32 firewall mark.
    Fwmark(u32),
    /// `IPVS_SVC_ATTR_SCHED_NAME`: scheduler name, NUL-terminated on the wire.
    SchedName(String),
    /// `IPVS_SVC_ATTR_FLAGS`: `struct ip_vs_flags`.
    Flags(IpVsFlags),
    /// `IPVS_SVC_ATTR_TIMEOUT`: u32 persistence timeout, seconds.
    Timeout(u32),
    /// `IPVS_SVC_ATTR_NETMASK`: the kernel's `__be32 netmask`, here as the
    /// value of its four wire bytes read big-endian. For `AF_INET` that is the
    /// mask itself (`0xffff_ff00` for /24). For `AF_INET6` the kernel stores a
    /// prefix length in that field with a plain cast (host order), so on a
    /// little-endian machine /128 reads back as `0x8000_0000` here; the typed
    /// layer ([`crate::Service::netmask`]) undoes that.
    Netmask(u32),
    /// `IPVS_SVC_ATTR_STATS`: 32-bit statistics nest (replies only).
    Stats(Vec<StatsAttr>),
    /// `IPVS_SVC_ATTR_PE_NAME`: persistence engine name, NUL-terminated.
    PeName(String),
    /// `IPVS_SVC_ATTR_STATS64`: 64-bit statistics nest (replies only).
    Stats64(Vec<Stats64Attr>),
    /// Any attribute this crate does not know.
    Other(DefaultNla),
}

impl Nla for ServiceAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Af(_) | Self::Protocol(_) | Self::Port(_) => 2,
            Self::Fwmark(_) | Self::Timeout(_) | Self::Netmask(_) => 4,
            Self::Addr(_) => NfInetAddr::LEN,
            Self::Flags(_) => IpVsFlags::LEN,
            Self::SchedName(s) | Self::PeName(s) => cstring_len(s),
            Self::Stats(v) => nested_len(v),
            Self::Stats64(v) => nested_len(v),
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Af(_) => IPVS_SVC_ATTR_AF,
            Self::Protocol(_) => IPVS_SVC_ATTR_PROTOCOL,
            Self::Addr(_) => IPVS_SVC_ATTR_ADDR,
            Self::Port(_) => IPVS_SVC_ATTR_PORT,
            Self::Fwmark(_) => IPVS_SVC_ATTR_FWMARK,
            Self::SchedName(_) => IPVS_SVC_ATTR_SCHED_NAME,
            Self::Flags(_) => IPVS_SVC_ATTR_FLAGS,
            Self::Timeout(_) => IPVS_SVC_ATTR_TIMEOUT,
            Self::Netmask(_) => IPVS_SVC_ATTR_NETMASK,
            Self::Stats(_) => IPVS_SVC_ATTR_STATS,
            Self::PeName(_) => IPVS_SVC_ATTR_PE_NAME,
            Self::Stats64(_) => IPVS_SVC_ATTR_STATS64,
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            Self::Af(v) | Self::Protocol(v) => buf[..2].copy_from_slice(&v.to_ne_bytes()),
            Self::Port(v) => buf[..2].copy_from_slice(&v.to_be_bytes()),
            Self::Fwmark(v) | Self::Timeout(v) => buf[..4].copy_from_slice(&v.to_ne_bytes()),
            Self::Netmask(v) => buf[..4].copy_from_slice(&v.to_be_bytes()),
            Self::Addr(a) => buf[..NfInetAddr::LEN].copy_from_slice(&a.0),
            Self::Flags(f) => f.emit(buf),
            Self::SchedName(s) | Self::PeName(s) => emit_cstring(buf, s),
            Self::Stats(v) => emit_nested(buf, v),
            Self::Stats64(v) => emit_nested(buf, v),
            Self::Other(nla) => nla.emit_value(buf),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for ServiceAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            IPVS_SVC_ATTR_AF => Self::Af(parse_u16(v, "IPVS_SVC_ATTR_AF")?),
            IPVS_SVC_ATTR_PROTOCOL => Self::Protocol(parse_u16(v, "IPVS_SVC_ATTR_PROTOCOL")?),
            IPVS_SVC_ATTR_ADDR => Self::Addr(NfInetAddr::parse(v)?),
            IPVS_SVC_ATTR_PORT => Self::Port(parse_be16(v, "IPVS_SVC_ATTR_PORT")?),
            IPVS_SVC_ATTR_FWMARK => Self::Fwmark(parse_u32(v, "IPVS_SVC_ATTR_FWMARK")?),
            IPVS_SVC_ATTR_SCHED_NAME => {
                Self::SchedName(parse_cstring(v, "IPVS_SVC_ATTR_SCHED_NAME")?)
            }
            IPVS_SVC_ATTR_FLAGS => Self::Flags(IpVsFlags::parse(v)?),
            IPVS_SVC_ATTR_TIMEOUT => Self::Timeout(parse_u32(v, "IPVS_SVC_ATTR_TIMEOUT")?),
            IPVS_SVC_ATTR_NETMASK => Self::Netmask(parse_be32(v, "IPVS_SVC_ATTR_NETMASK")?),
            IPVS_SVC_ATTR_STATS => Self::Stats(parse_nested(v, "IPVS_SVC_ATTR_STATS")?),
            IPVS_SVC_ATTR_PE_NAME => Self::PeName(parse_cstring(v, "IPVS_SVC_ATTR_PE_NAME")?),
            IPVS_SVC_ATTR_STATS64 => Self::Stats64(parse_nested(v, "IPVS_SVC_ATTR_STATS64")?),
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}
