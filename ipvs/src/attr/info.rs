//! `IPVS_INFO_ATTR_*`: the first-level attributes of a `GET_INFO` reply.
//!
//! The kernel puts these at the top level of the `IPVS_CMD_SET_INFO` reply
//! (`ip_vs_genl_get_cmd`), where their numbers overlap `IPVS_CMD_ATTR_*`; the
//! message decoder therefore picks this enum by command.

use netlink_packet_core::{DecodeError, DefaultNla, Nla, NlaBuffer, Parseable};

use super::parse_u32;
use crate::constants::*;

/// One attribute of a `GET_INFO` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoAttr {
    /// `IPVS_INFO_ATTR_VERSION`: u32 `IP_VS_VERSION_CODE` (`0x010201` = 1.2.1).
    Version(u32),
    /// `IPVS_INFO_ATTR_CONN_TAB_SIZE`: u32 connection hash table size.
    ConnTabSize(u32),
    /// Any attribute this crate does not know.
    Other(DefaultNla),
}

impl Nla for InfoAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Version(_) | Self::ConnTabSize(_) => 4,
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            Self::Version(_) => IPVS_INFO_ATTR_VERSION,
            Self::ConnTabSize(_) => IPVS_INFO_ATTR_CONN_TAB_SIZE,
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            Self::Version(v) | Self::ConnTabSize(v) => buf[..4].copy_from_slice(&v.to_ne_bytes()),
            Self::Other(nla) => nla.emit_value(buf),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for InfoAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            IPVS_INFO_ATTR_VERSION => Self::Version(parse_u32(v, "IPVS_INFO_ATTR_VERSION")?),
            IPVS_INFO_ATTR_CONN_TAB_SIZE => {
                Self::ConnTabSize(parse_u32(v, "IPVS_INFO_ATTR_CONN_TAB_SIZE")?)
            }
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}
