//! The typed layer: what users of the crate build and read.
//!
//! These types say what a service or destination *is*; [`crate::convert`]
//! turns them into attribute lists and back, and [`crate::IpvsHandle`] sends
//! them.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::{BitAnd, BitOr, BitOrAssign};

use crate::constants::*;

/// Address family of a service or destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4 (`AF_INET`).
    Inet,
    /// IPv6 (`AF_INET6`).
    Inet6,
}

impl Family {
    /// The `AF_*` number.
    pub fn af(self) -> u16 {
        match self {
            Self::Inet => AF_INET,
            Self::Inet6 => AF_INET6,
        }
    }

    /// The family for an `AF_*` number, if it is IPv4 or IPv6.
    pub fn from_af(af: u16) -> Option<Self> {
        match af {
            AF_INET => Some(Self::Inet),
            AF_INET6 => Some(Self::Inet6),
            _ => None,
        }
    }

    /// The family of an address.
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::Inet,
            IpAddr::V6(_) => Self::Inet6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Inet => "IPv4",
            Self::Inet6 => "IPv6",
        })
    }
}

/// Transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP (`IPPROTO_TCP`, 6).
    Tcp,
    /// UDP (`IPPROTO_UDP`, 17).
    Udp,
    /// SCTP (`IPPROTO_SCTP`, 132).
    Sctp,
    /// Any other protocol number. The netlink path of the kernel does not
    /// restrict the protocol, so a service created by another tool may carry
    /// one; it is kept rather than failing a whole dump.
    Other(u16),
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u16 {
        match self {
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
            Self::Sctp => IPPROTO_SCTP,
            Self::Other(n) => n,
        }
    }

    /// The protocol for an IP protocol number.
    pub fn from_number(n: u16) -> Self {
        match n {
            IPPROTO_TCP => Self::Tcp,
            IPPROTO_UDP => Self::Udp,
            IPPROTO_SCTP => Self::Sctp,
            n => Self::Other(n),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp => f.write_str("TCP"),
            Self::Udp => f.write_str("UDP"),
            Self::Sctp => f.write_str("SCTP"),
            Self::Other(n) => write!(f, "proto-{n}"),
        }
    }
}

/// What identifies a virtual service in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceKey {
    /// A `protocol address:port` service; the family follows the address.
    Tuple {
        /// Transport protocol.
        protocol: Protocol,
        /// Virtual IP.
        address: IpAddr,
        /// Virtual port (host-order number; port 0 is the kernel's catch-all).
        port: u16,
    },
    /// A firewall-mark service.
    Fwmark {
        /// Address family the mark applies to.
        family: Family,
        /// The mark; must be non-zero (the kernel treats 0 as "no fwmark").
        mark: u32,
    },
}

impl ServiceKey {
    /// A TCP service.
    pub fn tcp(address: IpAddr, port: u16) -> Self {
        Self::Tuple {
            protocol: Protocol::Tcp,
            address,
            port,
        }
    }

    /// A UDP service.
    pub fn udp(address: IpAddr, port: u16) -> Self {
        Self::Tuple {
            protocol: Protocol::Udp,
            address,
            port,
        }
    }

    /// An SCTP service.
    pub fn sctp(address: IpAddr, port: u16) -> Self {
        Self::Tuple {
            protocol: Protocol::Sctp,
            address,
            port,
        }
    }

    /// A firewall-mark service.
    pub fn fwmark(family: Family, mark: u32) -> Self {
        Self::Fwmark { family, mark }
    }

    /// Address family of the service.
    pub fn family(&self) -> Family {
        match self {
            Self::Tuple { address, .. } => Family::of(address),
            Self::Fwmark { family, .. } => *family,
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tuple {
                protocol,
                address,
                port,
            } => write!(f, "{protocol} {}", SocketAddr::new(*address, *port)),
            Self::Fwmark { family, mark } => write!(f, "FWM {mark} ({family})"),
        }
    }
}

/// Virtual service flags (`IP_VS_SVC_F_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ServiceFlags(pub u32);

impl ServiceFlags {
    /// No flags.
    pub const EMPTY: Self = Self(0);
    /// `IP_VS_SVC_F_PERSISTENT`: persistent service (see [`Service::timeout`]
    /// and [`Service::netmask`]).
    pub const PERSISTENT: Self = Self(IP_VS_SVC_F_PERSISTENT);
    /// `IP_VS_SVC_F_HASHED`: set by the kernel on every service it reports;
    /// ignored when sent.
    pub const HASHED: Self = Self(IP_VS_SVC_F_HASHED);
    /// `IP_VS_SVC_F_ONEPACKET`: one-packet scheduling (UDP).
    pub const ONE_PACKET: Self = Self(IP_VS_SVC_F_ONEPACKET);
    /// `IP_VS_SVC_F_SCHED1`: scheduler flag 1.
    pub const SCHED1: Self = Self(IP_VS_SVC_F_SCHED1);
    /// `IP_VS_SVC_F_SCHED2`: scheduler flag 2.
    pub const SCHED2: Self = Self(IP_VS_SVC_F_SCHED2);
    /// `IP_VS_SVC_F_SCHED3`: scheduler flag 3.
    pub const SCHED3: Self = Self(IP_VS_SVC_F_SCHED3);
    /// `sh` scheduler: fall back to another server (`IP_VS_SVC_F_SCHED_SH_FALLBACK`
    /// = SCHED1).
    pub const SH_FALLBACK: Self = Self::SCHED1;
    /// `sh` scheduler: hash the source port too (`IP_VS_SVC_F_SCHED_SH_PORT`
    /// = SCHED2).
    pub const SH_PORT: Self = Self::SCHED2;
    /// `mh` scheduler: fall back to another server (`IP_VS_SVC_F_SCHED_MH_FALLBACK`
    /// = SCHED1, defined in `ip_vs_mh.c`).
    pub const MH_FALLBACK: Self = Self::SCHED1;
    /// `mh` scheduler: hash the source port too (`IP_VS_SVC_F_SCHED_MH_PORT`
    /// = SCHED2, defined in `ip_vs_mh.c`).
    pub const MH_PORT: Self = Self::SCHED2;

    /// The raw bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// Whether every bit of `other` is set.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Sets the bits of `other`.
    pub fn insert(&mut self, other: Self) {
        self.0 |= other.0;
    }

    /// Clears the bits of `other`.
    pub fn remove(&mut self, other: Self) {
        self.0 &= !other.0;
    }

    /// These flags without the kernel-maintained [`Self::HASHED`] bit, for
    /// comparing a desired service with what the kernel reports.
    pub fn without_hashed(self) -> Self {
        Self(self.0 & !IP_VS_SVC_F_HASHED)
    }
}

impl BitOr for ServiceFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl BitOrAssign for ServiceFlags {
    fn bitor_assign(&mut self, rhs: Self) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for ServiceFlags {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        Self(self.0 & rhs.0)
    }
}

/// Traffic counters and rate estimates of a service or destination.
///
/// Filled from `IPVS_*_ATTR_STATS64` when the kernel sends it (every kernel
/// this crate targets does), otherwise from the legacy `IPVS_*_ATTR_STATS`
/// nest whose counters other than bytes are 32-bit and wrap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Stats {
    /// Connections scheduled.
    pub conns: u64,
    /// Incoming packets.
    pub inpkts: u64,
    /// Outgoing packets.
    pub outpkts: u64,
    /// Incoming bytes.
    pub inbytes: u64,
    /// Outgoing bytes.
    pub outbytes: u64,
    /// Connections per second (estimator).
    pub cps: u64,
    /// Incoming packets per second.
    pub inpps: u64,
    /// Outgoing packets per second.
    pub outpps: u64,
    /// Incoming bytes per second.
    pub inbps: u64,
    /// Outgoing bytes per second.
    pub outbps: u64,
    /// `true` when the values came from the 64-bit nest; `false` when only
    /// the 32-bit one was present (so `conns`, packets and rates wrap at 2^32).
    pub is_64bit: bool,
}

/// A virtual service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// What identifies the service.
    pub key: ServiceKey,
    /// Scheduler name (`rr`, `wrr`, `lc`, `wlc`, `sh`, `mh`, ... or `none`);
    /// at most [`MAX_SCHEDULER_NAME_LEN`] bytes.
    pub scheduler: String,
    /// Service flags. Services read from the kernel always have
    /// [`ServiceFlags::HASHED`] set.
    pub flags: ServiceFlags,
    /// Persistence timeout in seconds (used with [`ServiceFlags::PERSISTENT`]).
    pub timeout: u32,
    /// Persistence granularity. For IPv4 services a host-order mask
    /// (`0xffff_ffff` = per client address, `0xffff_ff00` = per /24); for
    /// IPv6 services a prefix length, which the kernel requires to be in
    /// `1..=128` even for non-persistent services.
    pub netmask: u32,
    /// Persistence engine name (e.g. `sip`); at most [`MAX_PE_NAME_LEN`]
    /// bytes. `None` on edit removes the engine.
    pub pe_name: Option<String>,
    /// Statistics; present in services read from the kernel, ignored when
    /// sending. Boxed: a table of services kept in memory without them costs
    /// a pointer each, not the 88 bytes of [`Stats`].
    pub stats: Option<Box<Stats>>,
}

impl Service {
    /// A service with the given scheduler, no flags, no persistence, and the
    /// full-address netmask of its family (`255.255.255.255` or `/128`).
    pub fn new(key: ServiceKey, scheduler: impl Into<String>) -> Self {
        let netmask = match key.family() {
            Family::Inet => u32::MAX,
            Family::Inet6 => 128,
        };
        Self {
            key,
            scheduler: scheduler.into(),
            flags: ServiceFlags::EMPTY,
            timeout: 0,
            netmask,
            pe_name: None,
            stats: None,
        }
    }
}

/// How packets reach a destination (`IP_VS_CONN_F_*` forwarding method).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ForwardMethod {
    /// NAT (`IP_VS_CONN_F_MASQ`, ipvsadm `-m`).
    #[default]
    Masquerade,
    /// Local node (`IP_VS_CONN_F_LOCALNODE`).
    Local,
    /// IP-in-IP / GUE / GRE tunnel (`IP_VS_CONN_F_TUNNEL`, ipvsadm `-i`);
    /// see [`Destination::tunnel`].
    Tunnel,
    /// Direct routing (`IP_VS_CONN_F_DROUTE`, ipvsadm `-g`).
    DirectRoute,
    /// Cache bypass (`IP_VS_CONN_F_BYPASS`).
    Bypass,
    /// A value within `IP_VS_CONN_F_FWD_MASK` with no name (5..=7); the
    /// kernel stores whatever it is given, so it is kept.
    Other(u32),
}

impl ForwardMethod {
    /// The `IP_VS_CONN_F_*` value.
    pub fn bits(self) -> u32 {
        match self {
            Self::Masquerade => IP_VS_CONN_F_MASQ,
            Self::Local => IP_VS_CONN_F_LOCALNODE,
            Self::Tunnel => IP_VS_CONN_F_TUNNEL,
            Self::DirectRoute => IP_VS_CONN_F_DROUTE,
            Self::Bypass => IP_VS_CONN_F_BYPASS,
            Self::Other(v) => v,
        }
    }

    /// The method for a `IPVS_DEST_ATTR_FWD_METHOD` value (masked with
    /// `IP_VS_CONN_F_FWD_MASK`, as the kernel does).
    pub fn from_bits(v: u32) -> Self {
        match v & IP_VS_CONN_F_FWD_MASK {
            IP_VS_CONN_F_MASQ => Self::Masquerade,
            IP_VS_CONN_F_LOCALNODE => Self::Local,
            IP_VS_CONN_F_TUNNEL => Self::Tunnel,
            IP_VS_CONN_F_DROUTE => Self::DirectRoute,
            IP_VS_CONN_F_BYPASS => Self::Bypass,
            other => Self::Other(other),
        }
    }
}

/// Tunnel encapsulation (`IP_VS_CONN_F_TUNNEL_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TunnelType {
    /// IP-in-IP (the kernel's default).
    #[default]
    Ipip,
    /// Generic UDP Encapsulation; needs a non-zero [`TunnelConfig::port`].
    Gue,
    /// GRE.
    Gre,
    /// Any other value (the kernel does not validate it).
    Other(u8),
}

impl TunnelType {
    /// The `IP_VS_CONN_F_TUNNEL_TYPE_*` value.
    pub fn number(self) -> u8 {
        match self {
            Self::Ipip => IP_VS_CONN_F_TUNNEL_TYPE_IPIP,
            Self::Gue => IP_VS_CONN_F_TUNNEL_TYPE_GUE,
            Self::Gre => IP_VS_CONN_F_TUNNEL_TYPE_GRE,
            Self::Other(v) => v,
        }
    }

    /// The type for a `IPVS_DEST_ATTR_TUN_TYPE` value.
    pub fn from_number(v: u8) -> Self {
        match v {
            IP_VS_CONN_F_TUNNEL_TYPE_IPIP => Self::Ipip,
            IP_VS_CONN_F_TUNNEL_TYPE_GUE => Self::Gue,
            IP_VS_CONN_F_TUNNEL_TYPE_GRE => Self::Gre,
            v => Self::Other(v),
        }
    }
}

/// Tunnel encapsulation flags (`IP_VS_TUNNEL_ENCAP_FLAG_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TunnelFlags(pub u16);

impl TunnelFlags {
    /// `IP_VS_TUNNEL_ENCAP_FLAG_NOCSUM`: no checksum.
    pub const NOCSUM: Self = Self(IP_VS_TUNNEL_ENCAP_FLAG_NOCSUM);
    /// `IP_VS_TUNNEL_ENCAP_FLAG_CSUM`: checksum.
    pub const CSUM: Self = Self(IP_VS_TUNNEL_ENCAP_FLAG_CSUM);
    /// `IP_VS_TUNNEL_ENCAP_FLAG_REMCSUM`: remote checksum offload.
    pub const REMCSUM: Self = Self(IP_VS_TUNNEL_ENCAP_FLAG_REMCSUM);
}

/// Tunnel parameters of a [`ForwardMethod::Tunnel`] destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TunnelConfig {
    /// Encapsulation.
    pub tunnel_type: TunnelType,
    /// Destination UDP port for GUE (host-order number); 0 otherwise.
    pub port: u16,
    /// Encapsulation flags.
    pub flags: TunnelFlags,
}

/// A destination (real server) of a virtual service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Real server address. Its family may differ from the service's only
    /// with [`ForwardMethod::Tunnel`] (the kernel's mixed-family rule); it is
    /// sent as `IPVS_DEST_ATTR_ADDR_FAMILY`.
    pub address: IpAddr,
    /// Real server port (host-order number).
    pub port: u16,
    /// Forwarding method.
    pub forward: ForwardMethod,
    /// Scheduling weight; at most `i32::MAX` (the kernel's `int`). 0 drains.
    pub weight: u32,
    /// Upper connection threshold (0 = none); at most `i32::MAX`.
    pub upper_threshold: u32,
    /// Lower connection threshold (0 = 75% of upper); must not exceed
    /// `upper_threshold`.
    pub lower_threshold: u32,
    /// Tunnel parameters; only with [`ForwardMethod::Tunnel`]. Read back as
    /// `Some` for every tunnel destination (IPIP when never set).
    pub tunnel: Option<TunnelConfig>,
    /// Active connections (read-only; ignored when sending).
    pub active_conns: u32,
    /// Inactive connections (read-only).
    pub inactive_conns: u32,
    /// Persistence templates (read-only).
    pub persistent_conns: u32,
    /// Statistics (read-only; present in destinations read from the kernel).
    /// Boxed, as [`Service::stats`].
    pub stats: Option<Box<Stats>>,
}

impl Destination {
    /// A masquerading destination with weight 1 and no thresholds.
    pub fn new(address: IpAddr, port: u16) -> Self {
        Self {
            address,
            port,
            forward: ForwardMethod::Masquerade,
            weight: 1,
            upper_threshold: 0,
            lower_threshold: 0,
            tunnel: None,
            active_conns: 0,
            inactive_conns: 0,
            persistent_conns: 0,
            stats: None,
        }
    }

    /// Address family of the destination.
    pub fn family(&self) -> Family {
        Family::of(&self.address)
    }
}

/// Connection timeouts in seconds (`ipvsadm --set tcp tcpfin udp`).
///
/// When setting, 0 leaves that timeout unchanged (`ip_vs_set_timeout`). When
/// read, a timeout is 0 if the kernel was built without that protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Timeouts {
    /// Established TCP connections.
    pub tcp: u32,
    /// TCP connections after a FIN.
    pub tcp_fin: u32,
    /// UDP.
    pub udp: u32,
}

/// General IPVS information (`IPVS_CMD_GET_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Info {
    /// IPVS version (major, minor, patch), from `IP_VS_VERSION_CODE`.
    pub version: (u8, u8, u8),
    /// Size of the connection hash table.
    pub conn_table_size: u32,
}
