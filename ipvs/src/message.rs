//! The IPVS generic-netlink message: a command plus first-level attributes.
//!
//! [`IpvsMessage`] implements [`GenlFamily`], [`Emitable`] and
//! [`ParseableParametrized<[u8], GenlHeader>`](ParseableParametrized), so it
//! plugs into `netlink_packet_generic::GenlMessage` like any rust-netlink
//! family. [`IpvsMessage::to_genl_bytes`] / [`IpvsMessage::from_genl_bytes`]
//! are checked shortcuts for the generic-netlink payload (the 4-byte genl
//! header followed by the attributes).

use std::fmt;

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, Nla, NlaBuffer, NlasIterator, Parseable,
    ParseableParametrized,
};
use netlink_packet_generic::{GenlFamily, GenlHeader};

use crate::IpvsError;
use crate::attr::{
    DestAttr, InfoAttr, ServiceAttr, emit_nested, nested_len, parse_nested, parse_u32,
};
use crate::constants::*;

/// Size of the generic netlink header (`struct genlmsghdr`).
pub const GENL_HEADER_LEN: usize = 4;

/// Largest attribute payload a netlink attribute header can describe
/// (`nla_len` is a u16 that includes the 4-byte header).
pub const MAX_NLA_PAYLOAD: usize = u16::MAX as usize - 4;

/// An IPVS command (`IPVS_CMD_*`), the `cmd` byte of the genl header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpvsCmd {
    /// `IPVS_CMD_NEW_SERVICE`: add a service; command of service replies.
    NewService,
    /// `IPVS_CMD_SET_SERVICE`: edit a service.
    SetService,
    /// `IPVS_CMD_DEL_SERVICE`: delete a service.
    DelService,
    /// `IPVS_CMD_GET_SERVICE`: get one service, or dump all of them.
    GetService,
    /// `IPVS_CMD_NEW_DEST`: add a destination; command of destination replies.
    NewDest,
    /// `IPVS_CMD_SET_DEST`: edit a destination.
    SetDest,
    /// `IPVS_CMD_DEL_DEST`: delete a destination.
    DelDest,
    /// `IPVS_CMD_GET_DEST`: dump the destinations of a service.
    GetDest,
    /// `IPVS_CMD_NEW_DAEMON`: start a sync daemon.
    NewDaemon,
    /// `IPVS_CMD_DEL_DAEMON`: stop a sync daemon.
    DelDaemon,
    /// `IPVS_CMD_GET_DAEMON`: dump sync daemons.
    GetDaemon,
    /// `IPVS_CMD_SET_CONFIG`: set timeouts; command of `GET_CONFIG` replies.
    SetConfig,
    /// `IPVS_CMD_GET_CONFIG`: get timeouts.
    GetConfig,
    /// `IPVS_CMD_SET_INFO`: command of `GET_INFO` replies.
    SetInfo,
    /// `IPVS_CMD_GET_INFO`: get version and connection table size.
    GetInfo,
    /// `IPVS_CMD_ZERO`: zero counters.
    Zero,
    /// `IPVS_CMD_FLUSH`: delete every service.
    Flush,
    /// Any other command value (including `IPVS_CMD_UNSPEC`).
    Other(u8),
}

impl From<u8> for IpvsCmd {
    fn from(v: u8) -> Self {
        match v {
            IPVS_CMD_NEW_SERVICE => Self::NewService,
            IPVS_CMD_SET_SERVICE => Self::SetService,
            IPVS_CMD_DEL_SERVICE => Self::DelService,
            IPVS_CMD_GET_SERVICE => Self::GetService,
            IPVS_CMD_NEW_DEST => Self::NewDest,
            IPVS_CMD_SET_DEST => Self::SetDest,
            IPVS_CMD_DEL_DEST => Self::DelDest,
            IPVS_CMD_GET_DEST => Self::GetDest,
            IPVS_CMD_NEW_DAEMON => Self::NewDaemon,
            IPVS_CMD_DEL_DAEMON => Self::DelDaemon,
            IPVS_CMD_GET_DAEMON => Self::GetDaemon,
            IPVS_CMD_SET_CONFIG => Self::SetConfig,
            IPVS_CMD_GET_CONFIG => Self::GetConfig,
            IPVS_CMD_SET_INFO => Self::SetInfo,
            IPVS_CMD_GET_INFO => Self::GetInfo,
            IPVS_CMD_ZERO => Self::Zero,
            IPVS_CMD_FLUSH => Self::Flush,
            other => Self::Other(other),
        }
    }
}

impl From<IpvsCmd> for u8 {
    fn from(c: IpvsCmd) -> u8 {
        match c {
            IpvsCmd::NewService => IPVS_CMD_NEW_SERVICE,
            IpvsCmd::SetService => IPVS_CMD_SET_SERVICE,
            IpvsCmd::DelService => IPVS_CMD_DEL_SERVICE,
            IpvsCmd::GetService => IPVS_CMD_GET_SERVICE,
            IpvsCmd::NewDest => IPVS_CMD_NEW_DEST,
            IpvsCmd::SetDest => IPVS_CMD_SET_DEST,
            IpvsCmd::DelDest => IPVS_CMD_DEL_DEST,
            IpvsCmd::GetDest => IPVS_CMD_GET_DEST,
            IpvsCmd::NewDaemon => IPVS_CMD_NEW_DAEMON,
            IpvsCmd::DelDaemon => IPVS_CMD_DEL_DAEMON,
            IpvsCmd::GetDaemon => IPVS_CMD_GET_DAEMON,
            IpvsCmd::SetConfig => IPVS_CMD_SET_CONFIG,
            IpvsCmd::GetConfig => IPVS_CMD_GET_CONFIG,
            IpvsCmd::SetInfo => IPVS_CMD_SET_INFO,
            IpvsCmd::GetInfo => IPVS_CMD_GET_INFO,
            IpvsCmd::Zero => IPVS_CMD_ZERO,
            IpvsCmd::Flush => IPVS_CMD_FLUSH,
            IpvsCmd::Other(v) => v,
        }
    }
}

impl fmt::Display for IpvsCmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::NewService => "IPVS_CMD_NEW_SERVICE",
            Self::SetService => "IPVS_CMD_SET_SERVICE",
            Self::DelService => "IPVS_CMD_DEL_SERVICE",
            Self::GetService => "IPVS_CMD_GET_SERVICE",
            Self::NewDest => "IPVS_CMD_NEW_DEST",
            Self::SetDest => "IPVS_CMD_SET_DEST",
            Self::DelDest => "IPVS_CMD_DEL_DEST",
            Self::GetDest => "IPVS_CMD_GET_DEST",
            Self::NewDaemon => "IPVS_CMD_NEW_DAEMON",
            Self::DelDaemon => "IPVS_CMD_DEL_DAEMON",
            Self::GetDaemon => "IPVS_CMD_GET_DAEMON",
            Self::SetConfig => "IPVS_CMD_SET_CONFIG",
            Self::GetConfig => "IPVS_CMD_GET_CONFIG",
            Self::SetInfo => "IPVS_CMD_SET_INFO",
            Self::GetInfo => "IPVS_CMD_GET_INFO",
            Self::Zero => "IPVS_CMD_ZERO",
            Self::Flush => "IPVS_CMD_FLUSH",
            Self::Other(v) => return write!(f, "IPVS command {v}"),
        };
        f.write_str(name)
    }
}

/// A first-level attribute (`IPVS_CMD_ATTR_*`), or, in `GET_INFO` replies,
/// an [`InfoAttr`] (the kernel puts those at the top level too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpvsCmdAttr {
    /// `IPVS_CMD_ATTR_SERVICE`: nested service attributes.
    Service(Vec<ServiceAttr>),
    /// `IPVS_CMD_ATTR_DEST`: nested destination attributes.
    Dest(Vec<DestAttr>),
    /// `IPVS_CMD_ATTR_DAEMON`: nested sync-daemon attributes, kept raw.
    Daemon(Vec<DefaultNla>),
    /// `IPVS_CMD_ATTR_TIMEOUT_TCP`: u32 seconds.
    TimeoutTcp(u32),
    /// `IPVS_CMD_ATTR_TIMEOUT_TCP_FIN`: u32 seconds.
    TimeoutTcpFin(u32),
    /// `IPVS_CMD_ATTR_TIMEOUT_UDP`: u32 seconds.
    TimeoutUdp(u32),
    /// A first-level `IPVS_INFO_ATTR_*` (only in `IPVS_CMD_SET_INFO` /
    /// `IPVS_CMD_GET_INFO` messages).
    Info(InfoAttr),
    /// Any attribute this crate does not know.
    Other(DefaultNla),
}

impl Nla for IpvsCmdAttr {
    fn value_len(&self) -> usize {
        match self {
            Self::Service(v) => nested_len(v),
            Self::Dest(v) => nested_len(v),
            Self::Daemon(v) => nested_len(v),
            Self::TimeoutTcp(_) | Self::TimeoutTcpFin(_) | Self::TimeoutUdp(_) => 4,
            Self::Info(a) => a.value_len(),
            Self::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        // Nests are written without NLA_F_NESTED, like the kernel's own
        // replies (nla_nest_start_noflag) and libipvs.
        match self {
            Self::Service(_) => IPVS_CMD_ATTR_SERVICE,
            Self::Dest(_) => IPVS_CMD_ATTR_DEST,
            Self::Daemon(_) => IPVS_CMD_ATTR_DAEMON,
            Self::TimeoutTcp(_) => IPVS_CMD_ATTR_TIMEOUT_TCP,
            Self::TimeoutTcpFin(_) => IPVS_CMD_ATTR_TIMEOUT_TCP_FIN,
            Self::TimeoutUdp(_) => IPVS_CMD_ATTR_TIMEOUT_UDP,
            Self::Info(a) => a.kind(),
            Self::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buf: &mut [u8]) {
        match self {
            Self::Service(v) => emit_nested(buf, v),
            Self::Dest(v) => emit_nested(buf, v),
            Self::Daemon(v) => emit_nested(buf, v),
            Self::TimeoutTcp(v) | Self::TimeoutTcpFin(v) | Self::TimeoutUdp(v) => {
                buf[..4].copy_from_slice(&v.to_ne_bytes())
            }
            Self::Info(a) => a.emit_value(buf),
            Self::Other(nla) => nla.emit_value(buf),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for IpvsCmdAttr {
    /// Decodes a first-level attribute of any command except
    /// `SET_INFO`/`GET_INFO` (see [`IpvsMessage`]'s parser for those).
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let v = buf.value();
        Ok(match buf.kind() {
            IPVS_CMD_ATTR_SERVICE => Self::Service(parse_nested(v, "IPVS_CMD_ATTR_SERVICE")?),
            IPVS_CMD_ATTR_DEST => Self::Dest(parse_nested(v, "IPVS_CMD_ATTR_DEST")?),
            IPVS_CMD_ATTR_DAEMON => Self::Daemon(parse_nested(v, "IPVS_CMD_ATTR_DAEMON")?),
            IPVS_CMD_ATTR_TIMEOUT_TCP => {
                Self::TimeoutTcp(parse_u32(v, "IPVS_CMD_ATTR_TIMEOUT_TCP")?)
            }
            IPVS_CMD_ATTR_TIMEOUT_TCP_FIN => {
                Self::TimeoutTcpFin(parse_u32(v, "IPVS_CMD_ATTR_TIMEOUT_TCP_FIN")?)
            }
            IPVS_CMD_ATTR_TIMEOUT_UDP => {
                Self::TimeoutUdp(parse_u32(v, "IPVS_CMD_ATTR_TIMEOUT_UDP")?)
            }
            _ => Self::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// An IPVS generic-netlink message: the command and its first-level
/// attributes, in the style of `netlink-packet-route`'s messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpvsMessage {
    /// The genl command.
    pub cmd: IpvsCmd,
    /// First-level attributes, in wire order.
    pub nlas: Vec<IpvsCmdAttr>,
}

impl IpvsMessage {
    /// A message with the given command and attributes.
    pub fn new(cmd: IpvsCmd, nlas: Vec<IpvsCmdAttr>) -> Self {
        Self { cmd, nlas }
    }

    /// Checks that every attribute fits a netlink attribute header (payload
    /// of at most [`MAX_NLA_PAYLOAD`] bytes). Emitting a message that fails
    /// this check through the raw [`Emitable`] impl would produce a corrupt
    /// length field; [`Self::to_genl_bytes`] calls it first.
    pub fn check_encodable(&self) -> Result<(), IpvsError> {
        // A nested attribute is never longer than its parent, so checking the
        // first level covers every level.
        for nla in &self.nlas {
            if nla.value_len() > MAX_NLA_PAYLOAD {
                return Err(IpvsError::InvalidArgument {
                    op: crate::Operation::Raw(self.cmd),
                    detail: format!(
                        "attribute type {} has a {}-byte payload; netlink allows at most {}",
                        nla.kind() & netlink_packet_core::NLA_TYPE_MASK,
                        nla.value_len(),
                        MAX_NLA_PAYLOAD
                    ),
                });
            }
        }
        Ok(())
    }

    /// Encodes the generic-netlink payload: `struct genlmsghdr` (command,
    /// version 1, reserved 0) followed by the attributes.
    pub fn to_genl_bytes(&self) -> Result<Vec<u8>, IpvsError> {
        self.check_encodable()?;
        let mut out = vec![0u8; GENL_HEADER_LEN + self.buffer_len()];
        out[0] = self.cmd.into();
        out[1] = IPVS_GENL_VERSION;
        self.emit(&mut out[GENL_HEADER_LEN..]);
        Ok(out)
    }

    /// Decodes a generic-netlink payload (genl header plus attributes).
    /// Malformed or truncated input is an [`IpvsError::Decode`].
    pub fn from_genl_bytes(bytes: &[u8]) -> Result<Self, IpvsError> {
        let header = GenlHeader::parse(bytes).map_err(IpvsError::from)?;
        let rest = bytes.get(GENL_HEADER_LEN..).unwrap_or_default();
        Self::parse_with_param(rest, header).map_err(IpvsError::from)
    }
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        IPVS_GENL_NAME
    }

    fn command(&self) -> u8 {
        self.cmd.into()
    }

    fn version(&self) -> u8 {
        IPVS_GENL_VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.nlas.as_slice().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.nlas.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let cmd = IpvsCmd::from(header.cmd);
        let info = matches!(cmd, IpvsCmd::SetInfo | IpvsCmd::GetInfo);
        let mut nlas = Vec::new();
        for nla in NlasIterator::new(buf) {
            let nla = nla.map_err(|e| DecodeError::from(format!("{cmd}: {e}")))?;
            let attr = if info {
                IpvsCmdAttr::Info(InfoAttr::parse(&nla)?)
            } else {
                IpvsCmdAttr::parse(&nla)?
            };
            nlas.push(attr);
        }
        Ok(Self { cmd, nlas })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_attribute_is_refused_not_emitted() {
        let big = DefaultNla::new(99, vec![0u8; MAX_NLA_PAYLOAD + 1]);
        let msg = IpvsMessage::new(IpvsCmd::Flush, vec![IpvsCmdAttr::Other(big)]);
        assert!(matches!(
            msg.to_genl_bytes(),
            Err(IpvsError::InvalidArgument { .. })
        ));
        // A nest whose children fit but whose total does not.
        let child = DefaultNla::new(1, vec![0u8; MAX_NLA_PAYLOAD - 4]);
        let msg = IpvsMessage::new(
            IpvsCmd::NewDaemon,
            vec![IpvsCmdAttr::Daemon(vec![child.clone(), child])],
        );
        assert!(msg.to_genl_bytes().is_err());
        let fits = DefaultNla::new(99, vec![0u8; MAX_NLA_PAYLOAD]);
        let msg = IpvsMessage::new(IpvsCmd::Flush, vec![IpvsCmdAttr::Other(fits)]);
        assert_eq!(
            msg.to_genl_bytes().map(|b| b.len()).ok(),
            Some(GENL_HEADER_LEN + 4 + MAX_NLA_PAYLOAD + 1)
        );
    }

    #[test]
    fn short_genl_header_is_a_decode_error() {
        for n in 0..GENL_HEADER_LEN {
            assert!(matches!(
                IpvsMessage::from_genl_bytes(&[1u8; 4][..n]),
                Err(IpvsError::Decode(_))
            ));
        }
    }

    #[test]
    fn bad_address_lengths() {
        use crate::attr::NfInetAddr;
        for n in [0usize, 1, 3, 5, 8, 15, 17, 32] {
            assert!(NfInetAddr::parse(&vec![1u8; n]).is_err(), "{n}");
        }
        assert_eq!(
            NfInetAddr::parse(&[1, 2, 3, 4]).map(|a| a.to_ipv4()).ok(),
            Some(std::net::Ipv4Addr::new(1, 2, 3, 4))
        );
    }
}
