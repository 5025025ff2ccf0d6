//! Test support shared by the host-kernel tests: bpffs mounting, per-test pin directories, a
//! loaded datapath fixture, and a packet builder/checker with its own internet checksum (nothing
//! here reuses program code).
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Once;

use probes::maps::{Config, ConnValue, DevValue, Tuple};
use probes::{
    Datapath, DatapathOptions, DatapathProgram, MapSizes, RewritePolicy, SkbContext,
    TcAttachPolicy, TestRunOutput,
};

thread_local! {
    /// The rewrite policy of the fixtures this test thread loads (see [`with_rewrite`]).
    static REWRITE: std::cell::Cell<RewritePolicy> = const { std::cell::Cell::new(RewritePolicy::Auto) };
}

/// Runs `body` with every [`Fixture`] it loads using `policy` (tests run one per thread).
pub fn with_rewrite(policy: RewritePolicy, body: impl FnOnce()) {
    REWRITE.with(|r| r.set(policy));
    body();
    REWRITE.with(|r| r.set(RewritePolicy::Auto));
}

pub const TC_ACT_UNSPEC: u32 = u32::MAX;
pub const TC_ACT_SHOT: u32 = 2;
pub const ETH_LEN: usize = 14;
pub const LOOPBACK_IFINDEX: u32 = 1;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

/// Mounts bpffs on /sys/fs/bpf unless it already is (once per process).
pub fn ensure_bpffs() {
    static MOUNT: Once = Once::new();
    MOUNT.call_once(|| {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let mounted = mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "));
        if !mounted {
            let status = Command::new("mount")
                .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
                .status()
                .expect("run mount");
            assert!(status.success(), "mount -t bpf bpf /sys/fs/bpf failed");
        }
    });
}

/// A unique pin directory for one test, removed (with everything pinned in it) on drop.
pub struct PinDir {
    pub base: PathBuf,
    pub root: PathBuf,
}

impl PinDir {
    pub fn new(test: &str) -> PinDir {
        ensure_bpffs();
        let base = PathBuf::from(format!(
            "/sys/fs/bpf/kib-test-{}-{test}",
            std::process::id()
        ));
        let _ = probes::loader::remove_pins(&base);
        PinDir {
            root: base.join("v1"),
            base,
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = probes::loader::remove_pins(&self.base);
    }
}

/// The SNAT table's hash seed in the fixtures (tests compute positions with it).
pub const TEST_NAT_SEED: u32 = 0x5eed_1234;

/// Small maps: tests run in parallel and preallocated hashes of the default size are large.
pub fn test_map_sizes() -> MapSizes {
    MapSizes {
        svc_ports: 256,
        svc_addrs: 256,
        src_ranges: 256,
        cluster_cidrs: 64,
        devices: 64,
        snat: 1024,
        conns: 1024,
        frags: 256,
    }
}

/// The options a [`Fixture`] loads its datapath with, at `pin_root` (a test that loads again over
/// a fixture's pins uses the same).
pub fn fixture_options(pin_root: PathBuf, map_sizes: MapSizes) -> DatapathOptions {
    DatapathOptions {
        pin_root,
        map_sizes,
        tc_attach: TcAttachPolicy::Auto,
        rewrite: REWRITE.with(|r| r.get()),
        nat_seed: Some(TEST_NAT_SEED),
    }
}

pub struct Fixture {
    pub dp: Datapath,
    pub pins: PinDir,
}

impl Fixture {
    /// A loaded datapath with the default config and loopback's SNAT addresses set.
    pub fn new(test: &str) -> Fixture {
        Fixture::with_sizes(test, test_map_sizes())
    }

    pub fn with_sizes(test: &str, map_sizes: MapSizes) -> Fixture {
        let pins = PinDir::new(test);
        let dp =
            Datapath::load(fixture_options(pins.root.clone(), map_sizes)).expect("load datapath");
        let fixture = Fixture { dp, pins };
        fixture.set_config(Config::default());
        // As the agent runs them: the programs trust the port filter (bpf/port_filter.h).
        assert!(
            fixture.dp.maps().enable_port_filter().expect("port filter"),
            "port filter"
        );
        let node4 = match node(Family::V4) {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => unreachable!(),
        };
        let node6 = match node(Family::V6) {
            IpAddr::V6(a) => a,
            IpAddr::V4(_) => unreachable!(),
        };
        fixture
            .dp
            .maps()
            .set_device(LOOPBACK_IFINDEX, &DevValue::new(Some(node4), Some(node6)))
            .expect("devices");
        fixture
    }

    /// Puts an IPVS connection (client -> backend) in `conns` as the probe does: its backend
    /// port in the port filter first.
    pub fn probe_conn(&self, key: &Tuple, value: &ConnValue) {
        self.dp.maps().put_conn(key, value).expect("conns");
    }

    pub fn set_config(&self, config: Config) {
        self.dp.maps().set_config(&config).expect("config");
    }

    pub fn run(&self, program: DatapathProgram, packet: &[u8], mark: u32) -> TestRunOutput {
        self.dp
            .test_run(
                program,
                packet,
                &SkbContext {
                    mark,
                    ifindex: LOOPBACK_IFINDEX,
                    ingress_ifindex: 0,
                },
            )
            .expect("test run")
    }

    pub fn egress(&self, packet: &[u8], mark: u32) -> TestRunOutput {
        self.run(DatapathProgram::TcEgress, packet, mark)
    }

    pub fn ingress(&self, packet: &[u8], mark: u32) -> TestRunOutput {
        self.run(DatapathProgram::TcIngress, packet, mark)
    }

    pub fn stats(&self) -> probes::maps::Stats {
        self.dp.stats().expect("stats")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn v6(text: &str) -> IpAddr {
    IpAddr::V6(text.parse::<Ipv6Addr>().expect("ipv6"))
}

/// The device's SNAT source.
pub fn node(f: Family) -> IpAddr {
    match f {
        Family::V4 => v4(192, 0, 2, 1),
        Family::V6 => v6("2001:db8::1"),
    }
}
/// A pod (inside the cluster CIDRs).
pub fn client(f: Family) -> IpAddr {
    match f {
        Family::V4 => v4(10, 244, 1, 10),
        Family::V6 => v6("fd00:244:1::10"),
    }
}
/// Another pod.
pub fn client_b(f: Family) -> IpAddr {
    match f {
        Family::V4 => v4(10, 244, 1, 11),
        Family::V6 => v6("fd00:244:1::11"),
    }
}
/// A third pod.
pub fn client_c(f: Family) -> IpAddr {
    match f {
        Family::V4 => v4(10, 244, 1, 12),
        Family::V6 => v6("fd00:244:1::12"),
    }
}
/// A client outside the cluster.
pub fn offcluster(f: Family) -> IpAddr {
    match f {
        Family::V4 => v4(198, 51, 100, 7),
        Family::V6 => v6("2001:db8:100::7"),
    }
}
/// A ClusterIP.
pub fn vip(f: Family) -> IpAddr {
    match f {
        Family::V4 => v4(10, 96, 0, 10),
        Family::V6 => v6("fd00:96::10"),
    }
}
/// A backend pod.
pub fn backend(f: Family) -> IpAddr {
    match f {
        Family::V4 => v4(10, 244, 2, 20),
        Family::V6 => v6("fd00:244:2::20"),
    }
}
/// A router sending ICMP errors.
pub fn router(f: Family) -> IpAddr {
    match f {
        Family::V4 => v4(192, 0, 2, 254),
        Family::V6 => v6("2001:db8::fe"),
    }
}
/// The cluster CIDR containing pods, and its length.
pub fn cluster_cidr(f: Family) -> (IpAddr, u8) {
    match f {
        Family::V4 => (v4(10, 244, 0, 0), 16),
        Family::V6 => (v6("fd00:244::"), 32),
    }
}

// ---------------------------------------------------------------------------------------------
// Checksums (independent of the programs).

/// RFC 1071 internet checksum of the concatenation of `chunks`.
pub fn internet_checksum(chunks: &[&[u8]]) -> u16 {
    let data: Vec<u8> = chunks.concat();
    let mut sum: u64 = 0;
    for pair in data.chunks(2) {
        let word = if pair.len() == 2 {
            u16::from_be_bytes([pair[0], pair[1]])
        } else {
            u16::from_be_bytes([pair[0], 0])
        };
        sum += u64::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn addr_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

pub fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend(addr_bytes(src));
    p.extend(addr_bytes(dst));
    match src {
        IpAddr::V4(_) => {
            p.push(0);
            p.push(proto);
            p.extend((len as u16).to_be_bytes());
        }
        IpAddr::V6(_) => {
            p.extend((len as u32).to_be_bytes());
            p.extend([0, 0, 0, proto]);
        }
    }
    p
}

// ---------------------------------------------------------------------------------------------
// Building.

#[derive(Debug, Clone)]
pub enum Transport {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
    },
    Udp {
        sport: u16,
        dport: u16,
    },
    /// SCTP common header with a fixed (fake) CRC32c: the datapath never changes its ports.
    Sctp {
        sport: u16,
        dport: u16,
    },
    /// ICMP (IPv4) or ICMPv6 (IPv6) by the family of the addresses.
    Icmp {
        kind: u8,
        code: u8,
        rest: [u8; 4],
    },
}

impl Transport {
    pub fn proto(&self, f: Family) -> u8 {
        match self {
            Transport::Tcp { .. } => PROTO_TCP,
            Transport::Udp { .. } => PROTO_UDP,
            Transport::Sctp { .. } => PROTO_SCTP,
            Transport::Icmp { .. } => match f {
                Family::V4 => PROTO_ICMP,
                Family::V6 => PROTO_ICMPV6,
            },
        }
    }
}

pub fn family_of(a: IpAddr) -> Family {
    match a {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

/// The L4 segment (header + payload) with a correct checksum.
pub fn l4_segment(src: IpAddr, dst: IpAddr, transport: &Transport, payload: &[u8]) -> Vec<u8> {
    let f = family_of(src);
    let proto = transport.proto(f);
    let (mut segment, csum_at) = match *transport {
        Transport::Tcp {
            sport,
            dport,
            flags,
        } => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[4..8].copy_from_slice(&0x0102_0304u32.to_be_bytes());
            h[12] = 5 << 4;
            h[13] = flags;
            h[14..16].copy_from_slice(&64240u16.to_be_bytes());
            (h, Some(16))
        }
        Transport::Udp { sport, dport } => {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            (h, Some(6))
        }
        Transport::Sctp { sport, dport } => {
            let mut h = vec![0u8; 12];
            h[0..2].copy_from_slice(&sport.to_be_bytes());
            h[2..4].copy_from_slice(&dport.to_be_bytes());
            h[4..8].copy_from_slice(&0xdead_beefu32.to_be_bytes());
            h[8..12].copy_from_slice(&0x1234_5678u32.to_be_bytes());
            (h, None)
        }
        Transport::Icmp { kind, code, rest } => {
            let mut h = vec![kind, code, 0, 0];
            h.extend(rest);
            (h, Some(2))
        }
    };
    segment.extend_from_slice(payload);
    if let Some(at) = csum_at {
        let sum = if proto == PROTO_ICMP {
            internet_checksum(&[&segment])
        } else {
            internet_checksum(&[&pseudo_header(src, dst, proto, segment.len()), &segment])
        };
        let sum = if proto == PROTO_UDP && sum == 0 {
            0xffff
        } else {
            sum
        };
        segment[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    segment
}

/// An IP packet around an L4 payload; `frag` = (offset in bytes, more fragments).
pub fn ip_packet(
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    l4: &[u8],
    id: u32,
    frag: Option<(usize, bool)>,
) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0u8; 20];
            h[0] = 0x45;
            h[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            h[4..6].copy_from_slice(&(id as u16).to_be_bytes());
            let frag_field = match frag {
                Some((offset, more)) => ((offset / 8) as u16) | if more { 0x2000 } else { 0 },
                None => 0x4000, // DF
            };
            h[6..8].copy_from_slice(&frag_field.to_be_bytes());
            h[8] = 64;
            h[9] = proto;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            let sum = internet_checksum(&[&h]);
            h[10..12].copy_from_slice(&sum.to_be_bytes());
            h.extend_from_slice(l4);
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let ext_len = if frag.is_some() { 8 } else { 0 };
            let mut h = vec![0u8; 40];
            h[0] = 0x60;
            h[4..6].copy_from_slice(&((ext_len + l4.len()) as u16).to_be_bytes());
            h[6] = if frag.is_some() { 44 } else { proto };
            h[7] = 64;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            if let Some((offset, more)) = frag {
                let field = (offset as u16) | u16::from(more);
                h.extend([proto, 0]);
                h.extend(field.to_be_bytes());
                h.extend(id.to_be_bytes());
            }
            h.extend_from_slice(l4);
            h
        }
        _ => panic!("mixed families"),
    }
}

/// An IPv4 packet with 4 bytes of options (NOP, NOP, NOP, EOL): the L4 header is not right after
/// a 20-byte header.
pub fn ipv4_with_options(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 24];
    h[0] = 0x46;
    h[2..4].copy_from_slice(&((24 + l4.len()) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x2345u16.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    h[20..24].copy_from_slice(&[1, 1, 1, 0]);
    let sum = internet_checksum(&[&h]);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(l4);
    h
}

/// An Ethernet frame around an IP packet.
pub fn ethernet(ip: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
    let ethertype: u16 = if ip[0] >> 4 == 6 { 0x86dd } else { 0x0800 };
    frame.extend(ethertype.to_be_bytes());
    frame.extend_from_slice(ip);
    frame
}

/// A complete Ethernet frame: `src:sport -> dst:dport` per `transport`, with `payload`.
pub fn frame(src: IpAddr, dst: IpAddr, transport: Transport, payload: &[u8]) -> Vec<u8> {
    let l4 = l4_segment(src, dst, &transport, payload);
    ethernet(&ip_packet(
        src,
        dst,
        transport.proto(family_of(src)),
        &l4,
        0x1234,
        None,
    ))
}

pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, flags: u8) -> Vec<u8> {
    frame(
        src,
        dst,
        Transport::Tcp {
            sport,
            dport,
            flags,
        },
        &[],
    )
}

pub fn udp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16, payload: &[u8]) -> Vec<u8> {
    frame(src, dst, Transport::Udp { sport, dport }, payload)
}

/// An ICMP(v6) error from `from` to `to` quoting `quoted` (an IP packet): IPv4 fragmentation
/// needed (3/4, MTU 1400) or IPv6 packet too big (2/0, MTU 1400).
pub fn icmp_too_big(from: IpAddr, to: IpAddr, quoted: &[u8]) -> Vec<u8> {
    let transport = match family_of(from) {
        Family::V4 => Transport::Icmp {
            kind: 3,
            code: 4,
            rest: [0, 0, 0x05, 0x78],
        },
        Family::V6 => Transport::Icmp {
            kind: 2,
            code: 0,
            rest: [0, 0, 0x05, 0x78],
        },
    };
    frame(from, to, transport, quoted)
}

// ---------------------------------------------------------------------------------------------
// Parsing and checking.

#[derive(Debug, Clone)]
pub struct Parsed {
    pub family: Family,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// IP header length including IPv6 extension headers.
    pub header_len: usize,
    /// Bytes after the IP header(s).
    pub l4: Vec<u8>,
    pub frag_offset: usize,
    pub more_fragments: bool,
    pub is_fragment: bool,
}

impl Parsed {
    pub fn sport(&self) -> u16 {
        u16::from_be_bytes([self.l4[0], self.l4[1]])
    }
    pub fn dport(&self) -> u16 {
        u16::from_be_bytes([self.l4[2], self.l4[3]])
    }
}

/// Parses an IP packet (no link layer).
pub fn parse_ip(ip: &[u8]) -> Parsed {
    match ip[0] >> 4 {
        4 => {
            let ihl = usize::from(ip[0] & 0xf) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let frag = u16::from_be_bytes([ip[6], ip[7]]);
            Parsed {
                family: Family::V4,
                src: IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15])),
                dst: IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19])),
                proto: ip[9],
                header_len: ihl,
                l4: ip[ihl..total.min(ip.len())].to_vec(),
                frag_offset: usize::from(frag & 0x1fff) * 8,
                more_fragments: frag & 0x2000 != 0,
                is_fragment: frag & 0x3fff != 0,
            }
        }
        6 => {
            let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let mut s = [0u8; 16];
            s.copy_from_slice(&ip[8..24]);
            let mut d = [0u8; 16];
            d.copy_from_slice(&ip[24..40]);
            let mut proto = ip[6];
            let mut off = 40;
            let (mut frag_offset, mut more, mut is_fragment) = (0, false, false);
            if proto == 44 {
                let field = u16::from_be_bytes([ip[42], ip[43]]);
                frag_offset = usize::from(field & 0xfff8);
                more = field & 1 != 0;
                is_fragment = true;
                proto = ip[40];
                off += 8;
            }
            Parsed {
                family: Family::V6,
                src: IpAddr::V6(Ipv6Addr::from(s)),
                dst: IpAddr::V6(Ipv6Addr::from(d)),
                proto,
                header_len: off,
                l4: ip[off..(40 + payload_len).min(ip.len())].to_vec(),
                frag_offset,
                more_fragments: more,
                is_fragment,
            }
        }
        v => panic!("not IP (version {v})"),
    }
}

/// Parses an Ethernet frame.
pub fn parse_frame(frame: &[u8]) -> Parsed {
    parse_ip(&frame[ETH_LEN..])
}

/// Verifies the L4 checksum of a whole (unfragmented or reassembled) segment.
pub fn check_l4_checksum(family: Family, src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) {
    match proto {
        PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => {
            if proto == PROTO_UDP && family == Family::V4 && l4[6..8] == [0, 0] {
                return;
            }
            let sum = internet_checksum(&[&pseudo_header(src, dst, proto, l4.len()), l4]);
            assert_eq!(sum, 0, "bad L4 checksum (proto {proto}) {src} -> {dst}");
        }
        PROTO_ICMP => {
            assert_eq!(internet_checksum(&[l4]), 0, "bad ICMP checksum");
        }
        _ => {}
    }
}

/// Verifies every checksum of an IP packet: the IPv4 header, the L4 checksum (unless it is a
/// fragment), and for ICMP errors the quoted IPv4 header and, when fully quoted, the quoted L4
/// checksum. Returns the parsed packet.
pub fn check_ip(ip: &[u8]) -> Parsed {
    let parsed = parse_ip(ip);
    if parsed.family == Family::V4 {
        assert_eq!(
            internet_checksum(&[&ip[..parsed.header_len]]),
            0,
            "bad IPv4 header checksum"
        );
    }
    if !parsed.is_fragment {
        check_l4_checksum(
            parsed.family,
            parsed.src,
            parsed.dst,
            parsed.proto,
            &parsed.l4,
        );
        let is_error = match parsed.proto {
            PROTO_ICMP => matches!(parsed.l4[0], 3 | 11 | 12),
            PROTO_ICMPV6 => matches!(parsed.l4[0], 1..=4),
            _ => false,
        };
        if is_error {
            check_quoted(&parsed.l4[8..]);
        }
    }
    parsed
}

/// Checks a quoted packet: IPv4 header checksum; L4 checksum when the quote is complete.
pub fn check_quoted(quoted: &[u8]) -> Parsed {
    let inner = parse_ip(quoted);
    if inner.family == Family::V4 {
        assert_eq!(
            internet_checksum(&[&quoted[..inner.header_len]]),
            0,
            "bad quoted IPv4 header checksum"
        );
    }
    let complete = match inner.family {
        Family::V4 => quoted.len() >= usize::from(u16::from_be_bytes([quoted[2], quoted[3]])),
        Family::V6 => quoted.len() >= 40 + usize::from(u16::from_be_bytes([quoted[4], quoted[5]])),
    };
    if complete {
        check_l4_checksum(inner.family, inner.src, inner.dst, inner.proto, &inner.l4);
    }
    inner
}

/// Verifies every checksum of an Ethernet frame.
pub fn check_frame(frame: &[u8]) -> Parsed {
    check_ip(&frame[ETH_LEN..])
}

/// Pins the calling thread to one CPU.
pub fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and sched_setaffinity only touch
    // it and the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity({cpu}): {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Runs `body` on a thread pinned to `cpu` and returns what it returns.
pub fn on_cpu<T: Send>(cpu: usize, body: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                pin_to(cpu);
                body()
            })
            .join()
            .expect("pinned test thread")
    })
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: as in pin_to; sched_getaffinity fills the set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}
