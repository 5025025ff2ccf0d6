//! Statistics nests: `IPVS_{SVC,DEST}_ATTR_STATS` and `..._STATS64`.
//!
//! Both use the `IPVS_STATS_ATTR_*` numbering but different widths
//! (`ip_vs_genl_fill_stats` vs `ip_vs_genl_fill_stats64`): in the legacy nest
//! the byte counters are u64 and everything else is u32 (truncated by the
//! kernel); in the 64-bit nest everything is u64. 64-bit values are written
//! with `nla_put_u64_64bit`, which may precede them with an empty
//! `IPVS_STATS_ATTR_PAD` attribute for alignment.

use netlink_packet_core::{DecodeError, DefaultNla, Nla, NlaBuffer, Parseable};

use super::{parse_u32, parse_u64};
use crate::constants::*;

/// One attribute of the legacy statistics nest (`IPVS_*_ATTR_STATS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatsAttr {
    /// `IPVS_STATS_ATTR_CONNS` (u32): connections scheduled.
    Conns(u32),
    /// `IPVS_STATS_ATTR_INPKTS` (u32): incoming packets.
    InPkts(u32),
    /// `IPVS_STATS_ATTR_OUTPKTS` (u32): outgoing packets.
    OutPkts(u32),
    /// `IPVS_STATS_ATTR_INBYTES` (u64): incoming bytes.
    InBytes(u64),
    /// `IPVS_STATS_ATTR_OUTBYTES` (u64): outgoing bytes.
    OutBytes(u64),
    /// `IPVS_STATS_ATTR_CPS` (u32): connection rate.
    Cps(u32),
    /// `IPVS_STATS_ATTR_INPPS` (u32): incoming packet rate.
    InPps(u32),
    /// `IPVS_STATS_ATTR_OUTPPS` (u32): outgoing packet rate.
    OutPps(u32),
    /// `IPVS_STATS_ATTR_INBPS` (u32): incoming byte rate.
    InBps(u32),
    /// `IPVS_STATS_ATTR_OUTBPS` (u32): outgoing byte rate.
    OutBps(u32),
    /// `IPVS_STATS_ATTR_PAD`: alignment padding (normally empty).
    Pad(Vec<u8>),
    /// Any attribute this crate does not know.
    Other(DefaultNla),
}

impl Nla for StatsAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::InBytes(_) | Self::OutBytes(_) => 8,
            Self::Conns(_)
            | Self::InPkts(_)
            | Self::OutPkts(_)
            | Self::Cps(_)
            | Self::InPps(_)
            | Self::OutPps(_)
            | Self::InBps(_)
            | Self::OutBps(_) => 4,
            Self::Pad(v) => v.len(),
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Conns(_) => IPVS_STATS_ATTR_CONNS,
            Self::InPkts(_) => IPVS_STATS_ATTR_INPKTS,
            Self::OutPkts(_) => IPVS_STATS_ATTR_OUTPKTS,
            Self::InBytes(_) => IPVS_STATS_ATTR_INBYTES,
            Self::OutBytes(_) => IPVS_STATS_ATTR_OUTBYTES,
            Self::Cps(_) => IPVS_STATS_ATTR_CPS,
            Self::InPps(_) => IPVS_STATS_ATTR_INPPS,
            Self::OutPps(_) => IPVS_STATS_ATTR_OUTPPS,
            Self::InBps(_) => IPVS_STATS_ATTR_INBPS,
            Self::OutBps(_) => IPVS_STATS_ATTR_OUTBPS,
            Self::Pad(_) => IPVS_STATS_ATTR_PAD,
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            Self::InBytes(v) | Self::OutBytes(v) => buf[..8].copy_from_slice(&v.to_ne_bytes()),
            Self::Conns(v)
            | Self::InPkts(v)
            | Self::OutPkts(v)
            | Self::Cps(v)
            | Self::InPps(v)
            | Self::OutPps(v)
            | Self::InBps(v)
            | Self::OutBps(v) => buf[..4].copy_from_slice(&v.to_ne_bytes()),
            Self::Pad(v) => buf[..v.len()].copy_from_slice(v),
            Self::Other(nla) => nla.emit_value(buf),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for StatsAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            IPVS_STATS_ATTR_CONNS => Self::Conns(parse_u32(v, "IPVS_STATS_ATTR_CONNS")?),
            IPVS_STATS_ATTR_INPKTS => Self::InPkts(parse_u32(v, "IPVS_STATS_ATTR_INPKTS")?),
            IPVS_STATS_ATTR_OUTPKTS => Self::OutPkts(parse_u32(v, "IPVS_STATS_ATTR_OUTPKTS")?),
            IPVS_STATS_ATTR_INBYTES => Self::InBytes(parse_u64(v, "IPVS_STATS_ATTR_INBYTES")?),
            IPVS_STATS_ATTR_OUTBYTES => Self::OutBytes(parse_u64(v, "IPVS_STATS_ATTR_OUTBYTES")?),
            IPVS_STATS_ATTR_CPS => Self::Cps(parse_u32(v, "IPVS_STATS_ATTR_CPS")?),
            IPVS_STATS_ATTR_INPPS => Self::InPps(parse_u32(v, "IPVS_STATS_ATTR_INPPS")?),
            IPVS_STATS_ATTR_OUTPPS => Self::OutPps(parse_u32(v, "IPVS_STATS_ATTR_OUTPPS")?),
            IPVS_STATS_ATTR_INBPS => Self::InBps(parse_u32(v, "IPVS_STATS_ATTR_INBPS")?),
            IPVS_STATS_ATTR_OUTBPS => Self::OutBps(parse_u32(v, "IPVS_STATS_ATTR_OUTBPS")?),
            IPVS_STATS_ATTR_PAD => Self::Pad(v.to_vec()),
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// One attribute of the 64-bit statistics nest (`IPVS_*_ATTR_STATS64`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stats64Attr {
    /// `IPVS_STATS_ATTR_CONNS` (u64): connections scheduled.
    Conns(u64),
    /// `IPVS_STATS_ATTR_INPKTS` (u64): incoming packets.
    InPkts(u64),
    /// `IPVS_STATS_ATTR_OUTPKTS` (u64): outgoing packets.
    OutPkts(u64),
    /// `IPVS_STATS_ATTR_INBYTES` (u64): incoming bytes.
    InBytes(u64),
    /// `IPVS_STATS_ATTR_OUTBYTES` (u64): outgoing bytes.
    OutBytes(u64),
    /// `IPVS_STATS_ATTR_CPS` (u64): connection rate.
    Cps(u64),
    /// `IPVS_STATS_ATTR_INPPS` (u64): incoming packet rate.
    InPps(u64),
    /// `IPVS_STATS_ATTR_OUTPPS` (u64): outgoing packet rate.
    OutPps(u64),
    /// `IPVS_STATS_ATTR_INBPS` (u64): incoming byte rate.
    InBps(u64),
    /// `IPVS_STATS_ATTR_OUTBPS` (u64): outgoing byte rate.
    OutBps(u64),
    /// `IPVS_STATS_ATTR_PAD`: alignment padding (normally empty).
    Pad(Vec<u8>),
    /// Any attribute this crate does not know.
    Other(DefaultNla),
}

impl Nla for Stats64Attr {
    fn value_len(&self) -> usize {
        match self {
            Self::Pad(v) => v.len(),
            Self::Other(nla) => nla.value_len(),
            _ => 8,
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Conns(_) => IPVS_STATS_ATTR_CONNS,
            Self::InPkts(_) => IPVS_STATS_ATTR_INPKTS,
            Self::OutPkts(_) => IPVS_STATS_ATTR_OUTPKTS,
            Self::InBytes(_) => IPVS_STATS_ATTR_INBYTES,
            Self::OutBytes(_) => IPVS_STATS_ATTR_OUTBYTES,
            Self::Cps(_) => IPVS_STATS_ATTR_CPS,
            Self::InPps(_) => IPVS_STATS_ATTR_INPPS,
            Self::OutPps(_) => IPVS_STATS_ATTR_OUTPPS,
            Self::InBps(_) => IPVS_STATS_ATTR_INBPS,
            Self::OutBps(_) => IPVS_STATS_ATTR_OUTBPS,
            Self::Pad(_) => IPVS_STATS_ATTR_PAD,
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            Self::Conns(v)
            | Self::InPkts(v)
            | Self::OutPkts(v)
            | Self::InBytes(v)
            | Self::OutBytes(v)
            | Self::Cps(v)
            | Self::InPps(v)
            | Self::OutPps(v)
            | Self::InBps(v)
            | Self::OutBps(v) => buf[..8].copy_from_slice(&v.to_ne_bytes()),
            Self::Pad(v) => buf[..v.len()].copy_from_slice(v),
            Self::Other(nla) => nla.emit_value(buf),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for Stats64Attr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            IPVS_STATS_ATTR_CONNS => Self::Conns(parse_u64(v, "IPVS_STATS_ATTR_CONNS (64)")?),
            IPVS_STATS_ATTR_INPKTS => Self::InPkts(parse_u64(v, "IPVS_STATS_ATTR_INPKTS (64)")?),
            IPVS_STATS_ATTR_OUTPKTS => Self::OutPkts(parse_u64(v, "IPVS_STATS_ATTR_OUTPKTS (64)")?),
            IPVS_STATS_ATTR_INBYTES => Self::InBytes(parse_u64(v, "IPVS_STATS_ATTR_INBYTES (64)")?),
            IPVS_STATS_ATTR_OUTBYTES => {
                Self::OutBytes(parse_u64(v, "IPVS_STATS_ATTR_OUTBYTES (64)")?)
            }
            IPVS_STATS_ATTR_CPS => Self::Cps(parse_u64(v, "IPVS_STATS_ATTR_CPS (64)")?),
            IPVS_STATS_ATTR_INPPS => Self::InPps(parse_u64(v, "IPVS_STATS_ATTR_INPPS (64)")?),
            IPVS_STATS_ATTR_OUTPPS => Self::OutPps(parse_u64(v, "IPVS_STATS_ATTR_OUTPPS (64)")?),
            IPVS_STATS_ATTR_INBPS => Self::InBps(parse_u64(v, "IPVS_STATS_ATTR_INBPS (64)")?),
            IPVS_STATS_ATTR_OUTBPS => Self::OutBps(parse_u64(v, "IPVS_STATS_ATTR_OUTBPS (64)")?),
            IPVS_STATS_ATTR_PAD => Self::Pad(v.to_vec()),
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}
