//! Rust mirrors of the datapath's map keys and values (`bpf/structs.h`, `bpf/consts.h`,
//! docs/datapath.md): the `#[repr(C)]` structs with their explicit padding, the flag, state and
//! counter constants, the default marks, port ranges and map sizes, and the conversions between
//! `IpAddr` and the 16-byte (IPv4-mapped) form every map uses. Byte conversion is zerocopy's;
//! `tests/btf_layout.rs` checks every struct, and every constant mirrored from a C enum of
//! `bpf/consts.h` (by its C name), against the BTF of the compiled objects.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use zerocopy::byteorder::network_endian::{U16 as Be16, U32 as Be32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// A 16-byte address as stored in every map (IPv4 as `::ffff:a.b.c.d`).
pub type Addr = [u8; 16];

/// Default service mark (`config.mark_svc`): notrack, accepted by the filter chains.
pub const DEFAULT_MARK_SVC: u32 = 0x0020_0000;
/// Default masquerade mark (`config.mark_masq`).
pub const DEFAULT_MARK_MASQ: u32 = 0x0040_0000;
/// Default reply mark (`config.flags` bits 24-29, [`reply_mark_flags`]): set with the service
/// mark on the replies TC ingress recognizes, so that TC egress passes them at once.
pub const DEFAULT_MARK_REPLY: u32 = 0x0010_0000;
/// Default lowest SNAT port: below it are privileged ports.
pub const DEFAULT_SNAT_PORT_MIN: u16 = 1024;
/// Default highest SNAT port: below the NodePort range (30000-32767) and below Linux's default
/// `ip_local_port_range` (32768-60999), so translated connections never collide with the node's
/// own sockets' ephemeral ports.
pub const DEFAULT_SNAT_PORT_MAX: u16 = 29_999;
/// Linux's default `net.ipv4.ip_local_port_range` lower bound.
pub const DEFAULT_LOCAL_PORT_MIN: u16 = 32_768;
/// Linux's default `net.ipv4.ip_local_port_range` upper bound.
pub const DEFAULT_LOCAL_PORT_MAX: u16 = 60_999;

/// `svc_value.flags`: masquerade every connection (external address with `Cluster` policy, or
/// masquerade-all).
pub const SVC_F_MASQ: u32 = 0x1;
/// `svc_value.flags`: masquerade clients outside the cluster CIDRs (ClusterIPs).
pub const SVC_F_MASQ_OFFCLUSTER: u32 = 0x2;
/// `svc_value.flags`: `loadBalancerSourceRanges` apply (`src_ranges`).
pub const SVC_F_SRC_RANGES: u32 = 0x4;

/// `addr_value.flags`: a ClusterIP/LB/external IP; TCP/UDP/SCTP to any other port is dropped.
pub const ADDR_F_SERVICE: u32 = 0x1;
/// `addr_value.flags`: a node address carrying NodePorts.
pub const ADDR_F_NODE: u32 = 0x2;

/// `config.flags`: masquerade every service connection.
pub const CFG_F_MASQ_ALL: u32 = 0x1;
/// `config.flags`: `cluster_cidrs` holds at least one prefix (set it whenever it does).
pub const CFG_F_CLUSTER_CIDRS: u32 = 0x2;
/// `config.flags`: the direct-write programs (`nat_write_*`) are installed, so translations take
/// the fast path. Owned by the loader: [`crate::DatapathMaps::set_config`] keeps it.
pub const CFG_F_DIRECT_WRITES: u32 = 0x4;
/// `config.flags`: the switch window from kube-proxy is open: the connections in `switch_flows`
/// are left to conntrack (docs/switching.md).
pub const CFG_F_SWITCH: u32 = 0x8;
/// `config.flags`: the rollback drain (docs/switching.md): only the connections in `switch_flows`
/// (the agent's, by client -> service tuple) are marked and translated, no new SNAT record is
/// made, and the probe records nothing.
pub const CFG_F_DRAIN: u32 = 0x10;
/// `config.flags`: the probe also puts each new IPVS connection in `switch_flows` (while a drain
/// is prepared).
pub const CFG_F_DRAIN_RECORD: u32 = 0x20;
/// `config.flags` bits 24-29 ([`CFG_REPLY_MARK_MASK`]): the reply mark's bit number plus one,
/// 0 for none (the `config` value has no room for a third mark word, and its layout is the
/// pinned map's).
pub const CFG_REPLY_MARK_SHIFT: u32 = 24;
/// `config.flags`: where the reply mark's bit number is ([`CFG_REPLY_MARK_SHIFT`]).
pub const CFG_REPLY_MARK_MASK: u32 = 0x3f00_0000;

/// The `config.flags` bits that make `mark` the reply mark: its bit number plus one at
/// [`CFG_REPLY_MARK_SHIFT`]; 0 (no reply mark) unless `mark` is a single bit.
pub fn reply_mark_flags(mark: u32) -> u32 {
    if mark.count_ones() != 1 {
        return 0;
    }
    (mark.trailing_zeros() + 1) << CFG_REPLY_MARK_SHIFT
}

/// `config.flags`: `port_filter` holds every port it must (the agent filled it from the maps after
/// the programs that keep it were attached): the programs skip the lookups it rules out. Set only
/// by [`crate::DatapathMaps::enable_port_filter`]; every other configuration write keeps it.
pub const CFG_F_PORT_FILTER: u32 = 0x40;
/// `port_filter`: 64-bit words per bitmap (`PORT_FILTER_WORDS`).
pub const PORT_FILTER_WORDS: usize = 65536 / 64;
/// The `config.flags` bits of a switch between kube-proxy and the agent, each set only by the
/// switch's own code ([`crate::DatapathMaps::set_switch_flags`]): every other configuration write
/// keeps them.
pub const CFG_SWITCH_FLAGS: u32 = CFG_F_SWITCH | CFG_F_DRAIN | CFG_F_DRAIN_RECORD;
/// `switch_flows`' capacity (fixed: four tuples for each of 262,144 conntrack entries; the map is
/// not preallocated).
pub const SWITCH_FLOWS_SIZE: u32 = 4 * 262_144;

/// `snat_entry.state`: a TCP SYN was seen.
pub const STATE_SYN: u8 = 0x01;
/// `snat_entry.state`: a TCP FIN was seen (either side).
pub const STATE_FIN: u8 = 0x02;
/// `snat_entry.state`: a TCP RST was seen (either side).
pub const STATE_RST: u8 = 0x04;
/// `snat_entry.state`: a reply was seen.
pub const STATE_REPLY: u8 = 0x08;

/// `snat_entry.flags`: the client's own port was kept.
pub const SNAT_F_PORT_KEPT: u8 = 0x01;
/// `snat_entry.flags`: the IPVS probe recorded the connection; `svc_id` is its service port.
pub const SNAT_F_PROBE_HIT: u8 = 0x02;
/// `snat_entry.flags`: translated because of the masquerade mark.
pub const SNAT_F_MASQ: u8 = 0x04;
/// `snat_entry.flags`: translated as a hairpin (source == destination).
pub const SNAT_F_HAIRPIN: u8 = 0x08;
/// `snat_entry.flags`: translated because the service backend is outside the cluster CIDRs.
pub const SNAT_F_OFFCLUSTER: u8 = 0x10;
/// `snat_entry.flags`: a host-originated connection from a service address.
pub const SNAT_F_HOST: u8 = 0x20;
/// `snat_entry.flags`: the connection was looked up in `conns` (`svc_id`, [`SNAT_F_PROBE_HIT`],
/// the `probe_hit`/`probe_miss` counters): by TC egress when it allocated the record, or by the
/// agent's sweeper for a record an older program made without it.
pub const SNAT_F_RESOLVED: u8 = 0x40;

/// IPVS connection flag: a persistence template (the probe records none).
pub const IP_VS_CONN_F_TEMPLATE: u32 = 0x1000;
/// `conn_value.conn_id_hi`: the entry carries its IPVS connection's identity.
pub const CONN_ID_SET_HI: u16 = 0x8000;

/// Default `svc_ports` size.
pub const DEFAULT_SVC_PORTS_SIZE: u32 = 65_536;
/// Default `svc_addrs` size: that of `svc_ports` (every service address has at least one port
/// there, so `svc_ports` fills first; 16,384 ran out at 50,000 Services).
pub const DEFAULT_SVC_ADDRS_SIZE: u32 = 65_536;
/// Default `src_ranges` size.
pub const DEFAULT_SRC_RANGES_SIZE: u32 = 16_384;
/// Default `cluster_cidrs` size.
pub const DEFAULT_CLUSTER_CIDRS_SIZE: u32 = 256;
/// Default `devices` size.
pub const DEFAULT_DEVICES_SIZE: u32 = 1_024;
/// Default size of the SNAT table: records in `snat_records` (each index, `snat_fwd` and
/// `snat_rev`, has two ways per record: `2 * size / NAT_WAYS` buckets, rounded up).
pub const DEFAULT_SNAT_SIZE: u32 = 262_144;
/// Default `conns` size.
pub const DEFAULT_CONNS_SIZE: u32 = 262_144;
/// Default `frags` size.
pub const DEFAULT_FRAGS_SIZE: u32 = 8_192;

/// Names of the pinned maps, as they appear under the pin root.
pub mod map_names {
    /// `svc_ports`: service (address, port, protocol) → flags, id.
    pub const SVC_PORTS: &str = "svc_ports";
    /// `svc_addrs`: service or node address → flags.
    pub const SVC_ADDRS: &str = "svc_addrs";
    /// `src_ranges`: (service id, source prefix) → allowed.
    pub const SRC_RANGES: &str = "src_ranges";
    /// `cluster_cidrs`: cluster prefixes.
    pub const CLUSTER_CIDRS: &str = "cluster_cidrs";
    /// `devices`: ifindex → SNAT source addresses.
    pub const DEVICES: &str = "devices";
    /// `device_slots`: `devices` direct-mapped by ifindex (what the programs read first).
    pub const DEVICE_SLOTS: &str = "device_slots";
    /// `config`: marks, port ranges, flags.
    pub const CONFIG: &str = "config";
    /// `snat_records`: one record per translated connection.
    pub const SNAT_RECORDS: &str = "snat_records";
    /// `snat_fwd`: index of the records by the tuple as the packet leaves.
    pub const SNAT_FWD: &str = "snat_fwd";
    /// `snat_rev`: index of the records by the tuple as the reply arrives.
    pub const SNAT_REV: &str = "snat_rev";
    /// `snat_locks`: the bucket locks of both indexes.
    pub const SNAT_LOCKS: &str = "snat_locks";
    /// `conns`: IPVS connections seen by the probe.
    pub const CONNS: &str = "conns";
    /// `frags`: ports of first fragments.
    pub const FRAGS: &str = "frags";
    /// `stats`: per-CPU counters.
    pub const STATS: &str = "stats";
    /// `drop_last`: per CPU and per drop reason (a `stats` index), the last packet dropped.
    pub const DROP_LAST: &str = "drop_last";
    /// `switch_flows`: the connections kube-proxy's conntrack held at the switch, by tuple.
    pub const SWITCH_FLOWS: &str = "switch_flows";
    /// `port_filter`: the backend ports, service ports and translations' node ports in use, one
    /// bit per port.
    pub const PORT_FILTER: &str = "port_filter";
    /// Every map name.
    pub const ALL: [&str; 17] = [
        SVC_PORTS,
        SVC_ADDRS,
        SRC_RANGES,
        CLUSTER_CIDRS,
        DEVICES,
        DEVICE_SLOTS,
        CONFIG,
        SNAT_RECORDS,
        SNAT_FWD,
        SNAT_REV,
        SNAT_LOCKS,
        CONNS,
        FRAGS,
        STATS,
        DROP_LAST,
        SWITCH_FLOWS,
        PORT_FILTER,
    ];
    /// `flow_cache`: per-CPU cache of translations in front of the SNAT table.
    pub const FLOW_CACHE: &str = "flow_cache";
    /// `cpu_scratch`: per-CPU hand-off to `nat_write_*`, clock cache, port and record
    /// allocation state.
    pub const CPU_SCRATCH: &str = "cpu_scratch";
    /// `flow_gen`: per `flow_cache` index, a counter of the SNAT records egress created for its
    /// tuples (shared by all CPUs); egress "no SNAT" verdicts hold while it is unchanged.
    pub const FLOW_GEN: &str = "flow_gen";
    /// `nat_writers_egress`: program array, slot 0 `nat_write_egress`.
    pub const NAT_WRITERS_EGRESS: &str = "nat_writers_egress";
    /// `nat_writers_ingress`: program array, slot 0 `nat_write_ingress`.
    pub const NAT_WRITERS_INGRESS: &str = "nat_writers_ingress";
    /// The datapath object's own maps: never pinned, each loaded object has its own (the
    /// kernel empties the program arrays when the agent that loaded them exits).
    pub const PER_OBJECT: [&str; 5] = [
        FLOW_CACHE,
        CPU_SCRATCH,
        FLOW_GEN,
        NAT_WRITERS_EGRESS,
        NAT_WRITERS_INGRESS,
    ];
}

/// Error building a key from user input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// A prefix length longer than the address family allows.
    #[error("prefix length {len} is too long for {addr}")]
    PrefixTooLong {
        /// The address.
        addr: IpAddr,
        /// The prefix length given.
        len: u8,
    },
}

/// The 16-byte form of an address: IPv6 as is, IPv4 mapped (`::ffff:a.b.c.d`).
pub fn addr_to_bytes(addr: IpAddr) -> Addr {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address of a 16-byte form: IPv4-mapped addresses come back as IPv4.
pub fn addr_from_bytes(bytes: Addr) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// Prefix length in the 128-bit space: `96 + n` for IPv4, `n` for IPv6; host bits of the
/// address cleared.
fn prefix_in_v6_space(addr: IpAddr, len: u8) -> Result<(u32, Addr), KeyError> {
    let (bits, max) = match addr {
        IpAddr::V4(_) => (96 + u32::from(len), 32),
        IpAddr::V6(_) => (u32::from(len), 128),
    };
    if len > max {
        return Err(KeyError::PrefixTooLong { addr, len });
    }
    let mut bytes = addr_to_bytes(addr);
    let value = u128::from_be_bytes(bytes);
    let mask = if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits)
    };
    bytes = (value & mask).to_be_bytes();
    Ok((bits, bytes))
}

/// An L4 protocol that has ports (the only ones in service keys and tuples).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum L4Proto {
    /// TCP (6).
    Tcp = 6,
    /// UDP (17).
    Udp = 17,
    /// SCTP (132).
    Sctp = 132,
}

impl L4Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        self as u8
    }

    /// The protocol of an IP protocol number, if it has ports.
    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            6 => Some(L4Proto::Tcp),
            17 => Some(L4Proto::Udp),
            132 => Some(L4Proto::Sctp),
            _ => None,
        }
    }
}

/// `struct svc_key`: a service port (address, port, protocol).
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct SvcKey {
    /// Service address (16-byte form).
    pub addr: Addr,
    /// Port, network byte order.
    pub port: Be16,
    /// IP protocol number.
    pub proto: u8,
    /// Padding, zero.
    pub pad: u8,
}

/// One write of the key's 20 bytes, as [`Tuple`]'s.
impl Hash for SvcKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.as_bytes());
    }
}

impl SvcKey {
    /// The key of `addr:port/proto`.
    pub fn new(addr: IpAddr, port: u16, proto: L4Proto) -> Self {
        SvcKey {
            addr: addr_to_bytes(addr),
            port: Be16::new(port),
            proto: proto.number(),
            pad: 0,
        }
    }
}

/// `struct svc_value`: what the datapath knows of a service port.
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[repr(C)]
pub struct SvcValue {
    /// `SVC_F_*`.
    pub flags: u32,
    /// The agent's id of the service port (keys `src_ranges`, recorded in SNAT entries).
    pub svc_id: u32,
}

/// `struct addr_key`: an address.
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[repr(C)]
pub struct AddrKey {
    /// The address (16-byte form).
    pub addr: Addr,
}

impl AddrKey {
    /// The key of `addr`.
    pub fn new(addr: IpAddr) -> Self {
        AddrKey {
            addr: addr_to_bytes(addr),
        }
    }
}

/// `struct addr_value`: what an address is.
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[repr(C)]
pub struct AddrValue {
    /// `ADDR_F_*`.
    pub flags: u32,
    /// Padding, zero.
    pub pad: u32,
}

/// `struct range_key`: LPM key of `src_ranges`; `prefixlen` counts the 32 bits of `svc_id` first.
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[repr(C)]
pub struct RangeKey {
    /// Prefix length in bits, over `svc_id` then `addr`.
    pub prefixlen: u32,
    /// Service port id.
    pub svc_id: u32,
    /// Source prefix (16-byte form).
    pub addr: Addr,
}

impl RangeKey {
    /// The entry allowing `addr/len` for service port `svc_id`.
    pub fn new(svc_id: u32, addr: IpAddr, len: u8) -> Result<Self, KeyError> {
        let (bits, addr) = prefix_in_v6_space(addr, len)?;
        Ok(RangeKey {
            prefixlen: 32 + bits,
            svc_id,
            addr,
        })
    }
}

/// `struct cidr_key`: LPM key of `cluster_cidrs`.
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[repr(C)]
pub struct CidrKey {
    /// Prefix length in bits over the 16-byte form (`96 + n` for IPv4).
    pub prefixlen: u32,
    /// The prefix (16-byte form).
    pub addr: Addr,
}

impl CidrKey {
    /// The key of `addr/len`.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, KeyError> {
        let (prefixlen, addr) = prefix_in_v6_space(addr, len)?;
        Ok(CidrKey { prefixlen, addr })
    }
}

/// `struct dev_value`: the SNAT source addresses of a device (the addresses MASQUERADE would
/// pick); all-zero for a family means "none" (`no_snat_addr`).
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[repr(C)]
pub struct DevValue {
    /// IPv4 source, IPv4-mapped; zero when none.
    pub addr4: Addr,
    /// IPv6 source; zero when none.
    pub addr6: Addr,
    /// Reserved, zero.
    pub flags: u32,
    /// Padding, zero.
    pub pad: u32,
}

/// Slots of `device_slots` (`DEVICE_SLOTS`): a device's slot is its ifindex modulo this.
pub const DEVICE_SLOTS: u32 = 4096;

/// `struct dev_slot`: a `device_slots` entry, `devices[ifindex]` for the device it names (0: none).
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[repr(C)]
pub struct DevSlot {
    /// The device, 0 when the slot is empty.
    pub ifindex: u32,
    /// Padding, zero.
    pub pad: u32,
    /// Its `devices` value.
    pub value: DevValue,
}

impl DevValue {
    /// The value for a device with these SNAT sources.
    pub fn new(addr4: Option<Ipv4Addr>, addr6: Option<Ipv6Addr>) -> Self {
        DevValue {
            addr4: addr4.map_or([0; 16], |a| addr_to_bytes(IpAddr::V4(a))),
            addr6: addr6.map_or([0; 16], |a| a.octets()),
            flags: 0,
            pad: 0,
        }
    }
}

/// `struct tuple`: a connection as one packet carries it (the tuples of a SNAT record, the key of
/// `conns`).
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct Tuple {
    /// Source address (16-byte form).
    pub saddr: Addr,
    /// Destination address (16-byte form).
    pub daddr: Addr,
    /// Source port, network byte order.
    pub sport: Be16,
    /// Destination port, network byte order.
    pub dport: Be16,
    /// IP protocol number.
    pub proto: u8,
    /// Padding, zero.
    pub pad: [u8; 3],
}

/// One write of the key's 40 bytes (every byte a field: `IntoBytes`, so as `Eq` compares):
/// the sweeper hashes every `conns` key of a pass, and hashed field by field (eleven writes)
/// a key cost SipHash about 800 instructions.
impl Hash for Tuple {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.as_bytes());
    }
}

impl Tuple {
    /// The protocol as the tuple's text form starts: `tcp`, `udp`, `sctp` or `proto N`.
    pub fn protocol_name(&self) -> String {
        match L4Proto::from_number(self.proto) {
            Some(L4Proto::Tcp) => "tcp".to_owned(),
            Some(L4Proto::Udp) => "udp".to_owned(),
            Some(L4Proto::Sctp) => "sctp".to_owned(),
            None => format!("proto {}", self.proto),
        }
    }

    /// The tuple `saddr:sport -> daddr:dport/proto`.
    pub fn new(saddr: IpAddr, sport: u16, daddr: IpAddr, dport: u16, proto: L4Proto) -> Self {
        Tuple {
            saddr: addr_to_bytes(saddr),
            daddr: addr_to_bytes(daddr),
            sport: Be16::new(sport),
            dport: Be16::new(dport),
            proto: proto.number(),
            pad: [0; 3],
        }
    }

    /// The other direction of the same connection.
    pub fn reversed(&self) -> Self {
        Tuple {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            pad: [0; 3],
        }
    }

    /// Source address.
    pub fn source(&self) -> IpAddr {
        addr_from_bytes(self.saddr)
    }

    /// Destination address.
    pub fn destination(&self) -> IpAddr {
        addr_from_bytes(self.daddr)
    }
}

/// `tcp 10.0.0.1:40000 -> 10.96.0.10:80` (IPv6 addresses in brackets).
impl std::fmt::Display for Tuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = self.protocol_name();
        let sock = |addr: IpAddr, port: Be16| std::net::SocketAddr::new(addr, port.get());
        write!(
            f,
            "{proto} {} -> {}",
            sock(self.source(), self.sport),
            sock(self.destination(), self.dport)
        )
    }
}

/// `struct snat_entry`: one direction of a SNAT record: `fwd`, the translated source (node
/// address, SNAT port); `rev`, the original client. The sweeper combines the two: the
/// connection's state is `fwd.state | rev.state`, its last activity
/// `max(fwd.last_seen_ns, rev.last_seen_ns)`.
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[repr(C)]
pub struct SnatEntry {
    /// Address (16-byte form).
    pub addr: Addr,
    /// Port, network byte order.
    pub port: Be16,
    /// `STATE_*` bits seen.
    pub state: u8,
    /// `SNAT_F_*`.
    pub flags: u8,
    /// Service port id (0 when the probe missed the connection).
    pub svc_id: u32,
    /// Creation, CLOCK_MONOTONIC ns.
    pub created_ns: u64,
    /// Last packet in this entry's direction (refreshed at most once a second), CLOCK_MONOTONIC ns.
    pub last_seen_ns: u64,
}

impl SnatEntry {
    /// The address.
    pub fn address(&self) -> IpAddr {
        addr_from_bytes(self.addr)
    }
}

/// Ways of a SNAT index bucket (`NAT_WAYS`).
pub const NAT_WAYS: usize = 6;
/// Buckets a SNAT index insert or lookup walks at most (`NAT_PROBE_BUCKETS`): the home bucket
/// and, while each is marked overflowed, the next ones.
pub const NAT_PROBE_BUCKETS: u32 = 4;
/// Lock stripes per SNAT index (`NAT_LOCK_STRIPES`): a bucket's lock is `snat_locks[bucket %
/// NAT_LOCK_STRIPES]` (`snat_fwd`), or that plus `NAT_LOCK_STRIPES` (`snat_rev`).
pub const NAT_LOCK_STRIPES: u32 = 8192;
/// `nat_bucket.tag`: the way is free.
pub const TAG_FREE: u8 = 0x00;
/// `nat_bucket.tag`: the way is claimed by an insert.
pub const TAG_BUSY: u8 = 0x01;
/// `nat_bucket.tag`: set in every tag of a way holding a record (7 bits of the hash below it).
pub const TAG_VALID: u8 = 0x80;
/// `nat_record.state`: free.
pub const REC_FREE: u32 = 0;
/// `nat_record.state`: allocated by a program, being written.
pub const REC_BUSY: u32 = 1;
/// `nat_record.state`: a live connection, indexed.
pub const REC_USED: u32 = 2;
/// `nat_record.state`: unindexed by the sweeper; freed at its next pass.
pub const REC_DEAD: u32 = 3;

/// `struct nat_bucket`: a bucket of `snat_fwd` or `snat_rev` (32 bytes; its first 8 are the
/// control word the programs read at once).
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[repr(C, align(8))]
pub struct NatBucket {
    /// Per way: [`TAG_FREE`], [`TAG_BUSY`] or the tag of the tuple it indexes.
    pub tag: [u8; NAT_WAYS],
    /// Set once an insert went past this bucket because it was full.
    pub overflow: u8,
    /// Padding, zero.
    pub pad: u8,
    /// Per way: the record's number.
    pub rec: [u32; NAT_WAYS],
}

/// `struct nat_record`: a translated connection, in `snat_records`.
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[repr(C)]
pub struct NatRecord {
    /// [`REC_FREE`], [`REC_BUSY`], [`REC_USED`] or [`REC_DEAD`].
    pub state: u32,
    /// Padding, zero.
    pub pad: u32,
    /// The connection as it leaves (client → backend).
    pub fwd_key: Tuple,
    /// Its replies as they arrive (backend → node address:SNAT port).
    pub rev_key: Tuple,
    /// The translated source (node address:SNAT port) and the egress state.
    pub fwd: SnatEntry,
    /// The original client and the ingress state.
    pub rev: SnatEntry,
}

impl NatRecord {
    /// The connection's state: both directions' bits.
    pub fn state_bits(&self) -> u8 {
        self.fwd.state | self.rev.state
    }

    /// The connection's last activity: the later of both directions' (CLOCK_MONOTONIC ns).
    pub fn last_seen_ns(&self) -> u64 {
        self.fwd.last_seen_ns.max(self.rev.last_seen_ns)
    }
}

/// `struct drop_event`: the last packet a CPU dropped for one reason (`drop_last`'s value,
/// indexed by the reason's [`Counter`] index). Written only on the drop path; the sweeper names
/// the connection when it logs the drops.
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[repr(C)]
pub struct DropEvent {
    /// When it was dropped, CLOCK_MONOTONIC ns (0: never).
    pub time_ns: u64,
    /// The connection as the dropped packet carried it.
    pub key: Tuple,
}

/// `struct switch_flow`: a connection open at a switch, which keeps the handling it had
/// (docs/switching.md): at a takeover, one kube-proxy's conntrack entry held (under each of the
/// entry's four tuples; written by the agent); at a rollback, one the agent handled (under its
/// client -> service tuple; written by the agent and the probe).
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[repr(C)]
pub struct SwitchFlow {
    /// The conntrack entry's id (takeover); 0 (rollback).
    pub ct_id: u32,
    pub pad: u32,
    /// The agent's last dump (conntrack's, or IPVS's) that listed the connection, CLOCK_MONOTONIC
    /// ns.
    pub seen_ns: u64,
}

/// `struct port_filter`, `port_filter`'s one value: one bit per port (host byte order; word
/// `port / 64`, bit `port % 64`). `backend`: the destination port of every connection IPVS
/// scheduled and of every translated connection as it leaves; `service`: the port of every
/// `svc_ports` key; `snat`: the node's port of every translation (its reply tuple's destination
/// port). Set before the entry they stand for, never cleared (bpf/port_filter.h).
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct PortFilterValue {
    pub backend: [u64; PORT_FILTER_WORDS],
    pub service: [u64; PORT_FILTER_WORDS],
    pub snat: [u64; PORT_FILTER_WORDS],
}

/// `struct conn_value`: an IPVS connection seen by the probe.
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[repr(C)]
pub struct ConnValue {
    /// Service (virtual) address (16-byte form).
    pub vaddr: Addr,
    /// Service port, network byte order.
    pub vport: Be16,
    /// The IPVS connection's identity, bits 32..47 ([`CONN_ID_SET_HI`] set when it has one);
    /// see [`ConnValue::ipvs_conn_id`].
    pub conn_id_hi: u16,
    /// Its bits 0..32.
    pub conn_id_lo: u32,
    /// When the probe saw it, CLOCK_MONOTONIC ns.
    pub created_ns: u64,
}

impl ConnValue {
    /// The identity of the IPVS connection the entry records (its kernel address >> 3, 47 bits),
    /// which the probe on IPVS freeing a connection compares before removing the entry; `None`
    /// in an entry an older probe wrote.
    pub fn ipvs_conn_id(&self) -> Option<u64> {
        (self.conn_id_hi & CONN_ID_SET_HI != 0).then(|| {
            (u64::from(self.conn_id_hi & !CONN_ID_SET_HI) << 32) | u64::from(self.conn_id_lo)
        })
    }
}

/// `struct frag_key`: a fragmented datagram as its fragments arrive (before translation).
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[repr(C)]
pub struct FragKey {
    /// Source address (16-byte form).
    pub saddr: Addr,
    /// Destination address (16-byte form).
    pub daddr: Addr,
    /// Fragment id, network byte order (IPv4: the 16-bit id in the low-order bytes).
    pub id: Be32,
    /// IP protocol number.
    pub proto: u8,
    /// Padding, zero.
    pub pad: [u8; 3],
}

/// `struct frag_value`: the ports of a datagram's first fragment.
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[repr(C)]
pub struct FragValue {
    /// Source port, network byte order.
    pub sport: Be16,
    /// Destination port, network byte order.
    pub dport: Be16,
}

/// Slots per CPU of `flow_cache` (`FLOW_CACHE_SLOTS`).
pub const FLOW_CACHE_SLOTS: u32 = 1024;
/// How long a `flow_cache` slot stays valid, in jiffies (`FLOW_CACHE_TTL_JIFFIES`: 0.256 s at
/// HZ=1000, 2.56 s at HZ=100).
pub const FLOW_CACHE_TTL_JIFFIES: u64 = 256;

/// `struct flow_slot`: one `flow_cache` slot, the translation of one connection direction copied
/// from the SNAT table or a verdict on an untranslated flow (only the programs read and write it;
/// mirrored for the layout check and for tests).
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct FlowSlot {
    /// Source address of the tuple the slot translates (16-byte form).
    pub saddr: Addr,
    /// Its destination address.
    pub daddr: Addr,
    /// Its source port, network byte order.
    pub sport: Be16,
    /// Its destination port, network byte order.
    pub dport: Be16,
    /// Its IP protocol number.
    pub proto: u8,
    /// 0: source (egress), 1: destination (ingress); 2 and 3: an egress or ingress verdict
    /// without translation (flow_cache.h), in the first three words of `addr` (egress: service
    /// marks, their mask, `flow_gen` counter; ingress: mark bits, 0, counter).
    pub dir: u8,
    /// 4 or 6; 0: empty.
    pub family: u8,
    /// State bits the table entry already has.
    pub state: u8,
    /// Translated address (16-byte form).
    pub addr: Addr,
    /// Translated port, network byte order.
    pub port: Be16,
    /// Padding, zero.
    pub pad: u16,
    /// Low 32 bits of `bpf_jiffies64()` when the slot was filled.
    pub filled_jiffies: u32,
    /// A translation's `snat_records` record, where the fast path records a FIN or RST.
    pub record: u32,
    /// Padding, zero.
    pub pad2: u32,
}

/// `struct nat_job`: a rewrite handed from the TC programs to `nat_write_*` by the general path
/// (in [`CpuScratch`]; the fast path hands off in `skb->cb`).
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct NatJob {
    /// New address (16-byte form).
    pub addr: Addr,
    /// New port, network byte order.
    pub port: Be16,
    /// 0: source, 1: destination.
    pub dir: u8,
    /// 4 or 6.
    pub family: u8,
    /// IP protocol number.
    pub proto: u8,
    /// Whether the L4 header (ports, checksum) is rewritten.
    pub has_l4: u8,
    /// Offset of the IP header.
    pub l3_off: u16,
    /// Offset of the L4 header.
    pub l4_off: u16,
    /// Padding, zero.
    pub pad: u16,
}

/// `struct cpu_scratch`: the per-CPU scratch of the datapath object (only the programs use it;
/// mirrored for the layout check).
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct CpuScratch {
    /// The general path's hand-off to `nat_write_*`.
    pub job: NatJob,
    /// xorshift32 state of port allocation (0: not seeded yet).
    pub rng: u32,
    /// Next `snat_records` entry to try (0: none yet).
    pub rec_cursor: u32,
    /// RFC 6056 algorithm 3's counter of port allocation.
    pub port_counter: u32,
    /// The jiffy `clock_ns` was read in.
    pub clock_jiffies: u64,
    /// `bpf_ktime_get_coarse_ns()` read in `clock_jiffies`.
    pub clock_ns: u64,
    /// An allocation's reply tuple (off the programs' stack).
    pub rev_key: Tuple,
    /// An allocation's reverse entry.
    pub rev_value: SnatEntry,
    /// An allocation's claim in `snat_rev`.
    pub rev_claim: NatClaim,
    /// An allocation's claim in `snat_fwd`.
    pub fwd_claim: NatClaim,
}

/// `struct nat_claim`: a way an insert holds in a SNAT index (programs only; mirrored for the
/// layout check).
#[derive(
    FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[repr(C)]
pub struct NatClaim {
    /// The bucket whose stripe lock is held.
    pub home: u32,
    /// The bucket of the claimed way.
    pub bucket: u32,
    /// The way.
    pub way: u32,
    /// Its tag byte.
    pub tag: u32,
}

/// `struct config`: the datapath's settings (the single entry of `config`). While `mark_svc` is
/// 0 the programs pass every packet untouched.
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(C)]
pub struct Config {
    /// Service mark bit(s).
    pub mark_svc: u32,
    /// Masquerade mark bit(s).
    pub mark_masq: u32,
    /// Lowest SNAT port (host byte order, inclusive).
    pub snat_port_min: u16,
    /// Highest SNAT port (host byte order, inclusive).
    pub snat_port_max: u16,
    /// `ip_local_port_range` lower bound (host byte order).
    pub local_port_min: u16,
    /// `ip_local_port_range` upper bound (host byte order).
    pub local_port_max: u16,
    /// `CFG_F_*`.
    pub flags: u32,
    /// Hash seed of the SNAT indexes (the loader's; kept by configuration writes).
    pub nat_seed: u32,
    /// Buckets of `snat_fwd` and of `snat_rev` (the loader's).
    pub nat_buckets: u32,
    /// Records of `snat_records` (the loader's).
    pub nat_records: u32,
}

impl Default for Config {
    /// Default marks, SNAT range and Linux's default local port range; no flags; the SNAT table
    /// fields zero (the loader's, filled in when the configuration is written).
    fn default() -> Self {
        Config {
            mark_svc: DEFAULT_MARK_SVC,
            mark_masq: DEFAULT_MARK_MASQ,
            snat_port_min: DEFAULT_SNAT_PORT_MIN,
            snat_port_max: DEFAULT_SNAT_PORT_MAX,
            local_port_min: DEFAULT_LOCAL_PORT_MIN,
            local_port_max: DEFAULT_LOCAL_PORT_MAX,
            flags: 0,
            nat_seed: 0,
            nat_buckets: 0,
            nat_records: 0,
        }
    }
}

/// Parses the content of `/proc/sys/net/ipv4/ip_local_port_range` ("32768\t60999\n").
pub fn parse_local_port_range(text: &str) -> Option<(u16, u16)> {
    let mut fields = text.split_whitespace();
    let low = fields.next()?.parse().ok()?;
    let high = fields.next()?.parse().ok()?;
    (low <= high).then_some((low, high))
}

/// Declares [`Counter`] (the `stats` indices, in order) and [`Stats`] (one named field each).
macro_rules! counters {
    ($( $(#[$doc:meta])* $variant:ident => $field:ident, )*) => {
        /// A per-CPU counter of `stats` (its index is the enum value).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum Counter {
            $( $(#[$doc])* $variant, )*
        }

        impl Counter {
            /// Every counter, in index order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant),*];
            /// Number of counters (`STAT_MAX`, the size of `stats`).
            pub const COUNT: usize = Counter::ALL.len();

            /// The counter's name in docs/datapath.md.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Counter::$variant => stringify!($field),)*
                }
            }
        }

        /// The counters of `stats`, summed over CPUs.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct Stats {
            $( $(#[$doc])* pub $field: u64, )*
        }

        impl Stats {
            /// The value of one counter.
            pub fn get(&self, counter: Counter) -> u64 {
                match counter {
                    $(Counter::$variant => self.$field,)*
                }
            }

            /// Sets one counter.
            pub fn set(&mut self, counter: Counter, value: u64) {
                match counter {
                    $(Counter::$variant => self.$field = value,)*
                }
            }
        }
    };
}

counters! {
    /// New SNAT mappings.
    SnatAlloc => snat_alloc,
    /// New SNAT mappings that kept the client's port.
    SnatPortReuse => snat_port_reuse,
    /// Packets dropped: no free SNAT port after 32 probes.
    PortExhausted => port_exhausted,
    /// Packets dropped: the SNAT table full (no record, or the tuple's index buckets full).
    MapFull => map_full,
    /// Replies reverse-translated.
    RevHit => rev_hit,
    /// Packets translated by the established fast path.
    FwdHit => fwd_hit,
    /// ICMP errors translated.
    IcmpXlate => icmp_xlate,
    /// Non-first fragments translated.
    FragXlate => frag_xlate,
    /// Non-first fragments of a flow needing SNAT dropped (first fragment unknown).
    FragMiss => frag_miss,
    /// Connections recorded by the IPVS probe.
    ProbeConn => probe_conn,
    /// IPVS persistence templates skipped by the probe.
    ProbeTemplateSkipped => probe_template_skipped,
    /// Translated connections the IPVS probe had recorded (counted by TC egress when it
    /// allocates the record and finds the connection in `conns`).
    ProbeHit => probe_hit,
    /// Translated connections without a `conns` entry (counted likewise).
    ProbeMiss => probe_miss,
    /// Packets dropped: other port on a service address.
    FilteredPort => filtered_port,
    /// Packets dropped: source outside `loadBalancerSourceRanges`.
    FilteredSrcRange => filtered_src_range,
    /// Packets to a service port marked.
    SvcMarked => svc_marked,
    /// Replies of untranslated service connections marked.
    ReplyMarked => reply_marked,
    /// Packets needing SNAT passed untranslated: no SNAT address for the device and family.
    NoSnatAddr => no_snat_addr,
    /// Malformed or truncated IP packets (passed), or rewrites a helper refused (dropped).
    ParseError => parse_error,
    /// Packets dropped: a SNAT table bucket lock the new connection's insert needed stayed
    /// taken (bpf/table.h; only a preempted holder, as in a test run, holds one that long).
    LockBusy => lock_busy,
    /// `conns` entries the probe on IPVS freeing a connection removed (the entry was that
    /// connection's).
    ProbeFreeRemoved => probe_free_removed,
    /// `conns` entries it kept: a newer connection's on the same tuple, or an older probe's
    /// without an identity (left to the sweeper).
    ProbeFreeKept => probe_free_kept,
}

impl Counter {
    /// The counters that count dropped packets (each has a `drop_last` slot the programs fill).
    pub const DROPS: &'static [Counter] = &[
        Counter::PortExhausted,
        Counter::MapFull,
        Counter::LockBusy,
        Counter::FragMiss,
        Counter::FilteredPort,
        Counter::FilteredSrcRange,
    ];

    /// Index in `stats`.
    pub fn index(self) -> u32 {
        self as u32
    }
}

impl Stats {
    /// Every counter with its value, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (Counter, u64)> + '_ {
        Counter::ALL.iter().map(|&c| (c, self.get(c)))
    }

    /// `self - earlier` per counter (saturating): what moved in between.
    pub fn delta(&self, earlier: &Stats) -> Stats {
        let mut delta = Stats::default();
        for &counter in Counter::ALL {
            delta.set(
                counter,
                self.get(counter).saturating_sub(earlier.get(counter)),
            );
        }
        delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_is_mapped_and_round_trips() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        let bytes = addr_to_bytes(v4);
        assert_eq!(bytes[..12], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(bytes[12..], [10, 1, 2, 3]);
        assert_eq!(addr_from_bytes(bytes), v4);
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(addr_from_bytes(addr_to_bytes(v6)), v6);
    }

    #[test]
    fn prefixes_live_in_the_v6_space() {
        let key = CidrKey::new("10.244.1.7".parse().unwrap(), 16).unwrap();
        assert_eq!(key.prefixlen, 112);
        assert_eq!(
            addr_from_bytes(key.addr),
            "10.244.0.0".parse::<IpAddr>().unwrap()
        );
        let key = RangeKey::new(7, "fd00::1:2".parse().unwrap(), 64).unwrap();
        assert_eq!(key.prefixlen, 96);
        assert_eq!(key.svc_id, 7);
        assert_eq!(
            addr_from_bytes(key.addr),
            "fd00::".parse::<IpAddr>().unwrap()
        );
        assert!(CidrKey::new("10.0.0.0".parse().unwrap(), 33).is_err());
        assert_eq!(CidrKey::new("::".parse().unwrap(), 0).unwrap().prefixlen, 0);
    }

    #[test]
    fn counters_are_indexed_in_order() {
        assert_eq!(Counter::COUNT, 22);
        for (i, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(counter.index() as usize, i);
        }
        assert_eq!(Counter::ParseError.name(), "parse_error");
        assert_eq!(Counter::ProbeFreeKept.name(), "probe_free_kept");
        let mut stats = Stats::default();
        stats.set(Counter::RevHit, 3);
        assert_eq!(stats.rev_hit, 3);
    }

    #[test]
    fn local_port_range_parses() {
        assert_eq!(
            parse_local_port_range("32768\t60999\n"),
            Some((32768, 60999))
        );
        assert_eq!(parse_local_port_range("5 4"), None);
    }

    #[test]
    fn ports_are_network_order_on_the_wire() {
        let key = SvcKey::new("10.0.0.1".parse().unwrap(), 0x1234, L4Proto::Tcp);
        assert_eq!(key.as_bytes()[16..20], [0x12, 0x34, 6, 0]);
    }
}
