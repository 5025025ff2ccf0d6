//! Raw netlink attributes of the IPVS family, one enum per nest.
//!
//! Every enum implements [`Nla`] (encoding) and
//! [`Parseable<NlaBuffer>`](netlink_packet_core::Parseable) (decoding) in the
//! style of `netlink-packet-route`, and keeps unknown attributes in an
//! `Other(DefaultNla)` variant so replies from newer kernels still decode.
//!
//! Values are stored as the kernel means them, with the byte order handled
//! here: ports (`__be16`) are held as ordinary host `u16` port numbers and
//! written in network order; addresses are the 16-byte `union nf_inet_addr`
//! ([`NfInetAddr`]); everything the kernel declares as plain `u16`/`u32`/`u64`
//! is host (native) order. Decoding a known attribute whose payload has the
//! wrong size is an error, never a panic.

mod dest;
mod info;
mod service;
mod stats;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{DecodeError, Emitable, Nla, NlaBuffer, NlasIterator, Parseable};

pub use dest::DestAttr;
pub use info::InfoAttr;
pub use service::ServiceAttr;
pub use stats::{Stats64Attr, StatsAttr};

/// The kernel's `union nf_inet_addr`: 16 bytes, an IPv4 address occupying the
/// first four (network order) and the rest zero.
///
/// Addresses are always sent as 16 bytes, as `libipvs` does; the kernel's
/// policy (`NLA_BINARY`, `.len = sizeof(union nf_inet_addr)`) accepts that for
/// both families. Decoding accepts 4 or 16 bytes. Which family the bytes hold
/// is carried by a separate attribute (`IPVS_SVC_ATTR_AF`,
/// `IPVS_DEST_ATTR_ADDR_FAMILY`), so conversion to [`IpAddr`] needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NfInetAddr(pub [u8; 16]);

impl NfInetAddr {
    /// Size of the union on the wire.
    pub const LEN: usize = 16;

    /// Decodes 4 (IPv4) or 16 bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut out = [0u8; 16];
        match bytes.len() {
            4 | 16 => {
                out[..bytes.len()].copy_from_slice(bytes);
                Ok(Self(out))
            }
            n => Err(DecodeError::from(format!(
                "address attribute: expected 4 or 16 bytes, got {n}"
            ))),
        }
    }

    /// The first four bytes as an IPv4 address.
    pub fn to_ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.0[0], self.0[1], self.0[2], self.0[3])
    }

    /// All sixteen bytes as an IPv6 address.
    pub fn to_ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.0)
    }
}

impl From<IpAddr> for NfInetAddr {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => v4.into(),
            IpAddr::V6(v6) => v6.into(),
        }
    }
}

impl From<Ipv4Addr> for NfInetAddr {
    fn from(ip: Ipv4Addr) -> Self {
        let mut out = [0u8; 16];
        out[..4].copy_from_slice(&ip.octets());
        Self(out)
    }
}

impl From<Ipv6Addr> for NfInetAddr {
    fn from(ip: Ipv6Addr) -> Self {
        Self(ip.octets())
    }
}

/// The kernel's `struct ip_vs_flags { __u32 flags; __u32 mask; }`, both
/// fields in host order. On add/edit the kernel computes
/// `new = (old & !mask) | (flags & mask)`; replies carry `mask = !0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IpVsFlags {
    /// Flag bits (`IP_VS_SVC_F_*`).
    pub flags: u32,
    /// Which bits of `flags` to apply.
    pub mask: u32,
}

impl IpVsFlags {
    /// Size on the wire.
    pub const LEN: usize = 8;

    fn parse(v: &[u8]) -> Result<Self, DecodeError> {
        let b: [u8; 8] = exact(v, "IPVS_SVC_ATTR_FLAGS")?;
        Ok(Self {
            flags: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            mask: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        })
    }

    fn emit(&self, buf: &mut [u8]) {
        buf[..4].copy_from_slice(&self.flags.to_ne_bytes());
        buf[4..8].copy_from_slice(&self.mask.to_ne_bytes());
    }
}

// ---- decoding helpers shared by the attribute modules ----

fn exact<const N: usize>(v: &[u8], what: &str) -> Result<[u8; N], DecodeError> {
    v.try_into()
        .map_err(|_| DecodeError::from(format!("{what}: expected {N} bytes, got {}", v.len())))
}

pub(crate) fn parse_u8(v: &[u8], what: &str) -> Result<u8, DecodeError> {
    Ok(exact::<1>(v, what)?[0])
}

pub(crate) fn parse_u16(v: &[u8], what: &str) -> Result<u16, DecodeError> {
    Ok(u16::from_ne_bytes(exact(v, what)?))
}

pub(crate) fn parse_be16(v: &[u8], what: &str) -> Result<u16, DecodeError> {
    Ok(u16::from_be_bytes(exact(v, what)?))
}

pub(crate) fn parse_u32(v: &[u8], what: &str) -> Result<u32, DecodeError> {
    Ok(u32::from_ne_bytes(exact(v, what)?))
}

pub(crate) fn parse_be32(v: &[u8], what: &str) -> Result<u32, DecodeError> {
    Ok(u32::from_be_bytes(exact(v, what)?))
}

pub(crate) fn parse_u64(v: &[u8], what: &str) -> Result<u64, DecodeError> {
    Ok(u64::from_ne_bytes(exact(v, what)?))
}

/// A NUL-terminated string: everything up to the first NUL (or the end).
pub(crate) fn parse_cstring(v: &[u8], what: &str) -> Result<String, DecodeError> {
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    String::from_utf8(v[..end].to_vec())
        .map_err(|e| DecodeError::from(format!("{what}: invalid UTF-8: {e}")))
}

/// Length of a string emitted with its terminating NUL.
pub(crate) fn cstring_len(s: &str) -> usize {
    s.len() + 1
}

pub(crate) fn emit_cstring(buf: &mut [u8], s: &str) {
    buf[..s.len()].copy_from_slice(s.as_bytes());
    buf[s.len()] = 0;
}

/// Decodes every attribute of a nest.
pub(crate) fn parse_nested<T>(v: &[u8], what: &str) -> Result<Vec<T>, DecodeError>
where
    T: for<'b> Parseable<NlaBuffer<&'b [u8]>>,
{
    let mut out = Vec::new();
    for nla in NlasIterator::new(v) {
        let nla = nla.map_err(|e| DecodeError::from(format!("{what}: {e}")))?;
        out.push(T::parse(&nla).map_err(|e| DecodeError::from(format!("{what}: {e}")))?);
    }
    Ok(out)
}

pub(crate) fn nested_len<T: Nla>(v: &[T]) -> usize {
    v.buffer_len()
}

pub(crate) fn emit_nested<T: Nla>(buf: &mut [u8], v: &[T]) {
    v.emit(buf)
}
