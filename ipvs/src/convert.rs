//! Conversion between the typed layer ([`crate::types`]) and attribute lists
//! / messages ([`crate::attr`], [`crate::message`]).
//!
//! * `*_attrs` functions build attribute lists from typed values without
//!   validating them; [`validate_service`] and [`validate_destination`] check
//!   what the kernel would refuse.
//! * [`request`] builds the exact messages [`crate::IpvsHandle`] sends
//!   (validated, in `libipvs` attribute order).
//! * [`reply`] builds messages shaped like the kernel's replies (including
//!   statistics), for tests and fakes.
//! * `*_from_*` functions decode replies; missing identity attributes,
//!   unknown address families and the like are [`IpvsError::Decode`].

use std::net::IpAddr;

use crate::attr::{DestAttr, IpVsFlags, NfInetAddr, ServiceAttr, Stats64Attr, StatsAttr};
use crate::constants::{MAX_PE_NAME_LEN, MAX_SCHEDULER_NAME_LEN};
use crate::error::{IpvsError, NameKind, Operation};
use crate::message::{IpvsCmd, IpvsCmdAttr, IpvsMessage};
use crate::types::{
    Destination, Family, ForwardMethod, Info, Protocol, Service, ServiceFlags, ServiceKey, Stats,
    Timeouts, TunnelConfig, TunnelFlags, TunnelType,
};

fn decode_err(msg: impl Into<String>) -> IpvsError {
    IpvsError::Decode(msg.into())
}

fn ip_from(addr: &NfInetAddr, family: Family) -> IpAddr {
    match family {
        Family::Inet => IpAddr::V4(addr.to_ipv4()),
        Family::Inet6 => IpAddr::V6(addr.to_ipv6()),
    }
}

/// The `IPVS_SVC_ATTR_NETMASK` wire value (see [`ServiceAttr::Netmask`]) for
/// a typed netmask: the IPv4 mask in network order, or the IPv6 prefix length
/// in host order (the kernel casts the `__be32` field to `u32`).
pub fn netmask_to_wire(family: Family, netmask: u32) -> u32 {
    match family {
        Family::Inet => netmask,
        Family::Inet6 => u32::from_be_bytes(netmask.to_ne_bytes()),
    }
}

/// Inverse of [`netmask_to_wire`].
pub fn netmask_from_wire(family: Family, wire: u32) -> u32 {
    match family {
        Family::Inet => wire,
        Family::Inet6 => u32::from_ne_bytes(wire.to_be_bytes()),
    }
}

// ---------------------------------------------------------------- services

/// The identifying attributes of a service: `AF`, then `FWMARK` or
/// `PROTOCOL`, `ADDR`, `PORT`.
pub fn service_key_attrs(key: &ServiceKey) -> Vec<ServiceAttr> {
    let mut v = vec![ServiceAttr::Af(key.family().af())];
    match key {
        ServiceKey::Fwmark { mark, .. } => v.push(ServiceAttr::Fwmark(*mark)),
        ServiceKey::Tuple {
            protocol,
            address,
            port,
        } => {
            v.push(ServiceAttr::Protocol(protocol.number()));
            v.push(ServiceAttr::Addr((*address).into()));
            v.push(ServiceAttr::Port(*port));
        }
    }
    v
}

/// The full attribute set of a service as sent by add/edit: identity,
/// `SCHED_NAME`, `PE_NAME` (if any), `FLAGS` (mask `!0`, i.e. replace all),
/// `TIMEOUT`, `NETMASK`. Statistics are not included. Not validated.
pub fn service_attrs(svc: &Service) -> Vec<ServiceAttr> {
    let family = svc.key.family();
    let mut v = service_key_attrs(&svc.key);
    v.push(ServiceAttr::SchedName(svc.scheduler.clone()));
    if let Some(pe) = &svc.pe_name {
        v.push(ServiceAttr::PeName(pe.clone()));
    }
    v.push(ServiceAttr::Flags(IpVsFlags {
        flags: svc.flags.bits(),
        mask: u32::MAX,
    }));
    v.push(ServiceAttr::Timeout(svc.timeout));
    v.push(ServiceAttr::Netmask(netmask_to_wire(family, svc.netmask)));
    v
}

/// A service's attributes in the order `ip_vs_genl_fill_service` writes
/// them: [`service_attrs`] (with flags mask `!0`, as the kernel reports),
/// then `STATS` and (for 64-bit stats) `STATS64` when [`Service::stats`] is
/// set.
pub fn service_reply_attrs(svc: &Service) -> Vec<ServiceAttr> {
    let mut v = service_attrs(svc);
    if let Some(stats) = &svc.stats {
        let (s32, s64) = stats_attrs(stats);
        v.push(ServiceAttr::Stats(s32));
        if let Some(s64) = s64 {
            v.push(ServiceAttr::Stats64(s64));
        }
    }
    v
}

/// Checks a service key the way the kernel would.
pub fn validate_service_key(key: &ServiceKey, op: Operation) -> Result<(), IpvsError> {
    if let ServiceKey::Fwmark { mark: 0, .. } = key {
        return Err(IpvsError::InvalidArgument {
            op,
            detail:
                "a firewall-mark service needs a non-zero mark (the kernel treats 0 as no mark)"
                    .into(),
        });
    }
    Ok(())
}

fn validate_name(
    name: &str,
    kind: NameKind,
    max: usize,
    allow_empty: bool,
    op: Operation,
) -> Result<(), IpvsError> {
    if name.len() > max {
        return Err(IpvsError::NameTooLong {
            kind,
            name: name.to_string(),
            max,
        });
    }
    if name.as_bytes().contains(&0) {
        return Err(IpvsError::InvalidArgument {
            op,
            detail: format!("{kind} name {name:?} contains a NUL byte"),
        });
    }
    if !allow_empty && name.is_empty() {
        return Err(IpvsError::InvalidArgument {
            op,
            detail: format!("{kind} name is empty (use \"none\" for no scheduler)"),
        });
    }
    Ok(())
}

/// Checks a service for add/edit: non-zero fwmark, scheduler name of 1 to
/// [`MAX_SCHEDULER_NAME_LEN`] bytes, persistence engine name of at most
/// [`MAX_PE_NAME_LEN`] bytes (the kernel policies' `NLA_NUL_STRING` limits),
/// no NUL inside names, and an IPv6 netmask (prefix length) in `1..=128`
/// (`ip_vs_add_service`/`ip_vs_edit_service` return `EINVAL` otherwise).
pub fn validate_service(svc: &Service, op: Operation) -> Result<(), IpvsError> {
    validate_service_key(&svc.key, op)?;
    validate_name(
        &svc.scheduler,
        NameKind::Scheduler,
        MAX_SCHEDULER_NAME_LEN,
        false,
        op,
    )?;
    if let Some(pe) = &svc.pe_name {
        validate_name(pe, NameKind::PersistenceEngine, MAX_PE_NAME_LEN, true, op)?;
    }
    if svc.key.family() == Family::Inet6 && !(1..=128).contains(&svc.netmask) {
        return Err(IpvsError::InvalidArgument {
            op,
            detail: format!(
                "IPv6 service netmask is a prefix length and must be in 1..=128, got {}",
                svc.netmask
            ),
        });
    }
    Ok(())
}

/// Decodes a service from the attributes of an `IPVS_CMD_ATTR_SERVICE` nest.
pub fn service_from_attrs(attrs: &[ServiceAttr]) -> Result<Service, IpvsError> {
    let (mut af, mut proto, mut addr, mut port, mut fwmark) = (None, None, None, None, None);
    let (mut sched, mut flags, mut timeout, mut netmask, mut pe) = (None, None, None, None, None);
    let (mut s32, mut s64) = (None, None);
    for a in attrs {
        match a {
            ServiceAttr::Af(v) => af = Some(*v),
            ServiceAttr::Protocol(v) => proto = Some(*v),
            ServiceAttr::Addr(v) => addr = Some(*v),
            ServiceAttr::Port(v) => port = Some(*v),
            ServiceAttr::Fwmark(v) => fwmark = Some(*v),
            ServiceAttr::SchedName(v) => sched = Some(v.clone()),
            ServiceAttr::Flags(v) => flags = Some(*v),
            ServiceAttr::Timeout(v) => timeout = Some(*v),
            ServiceAttr::Netmask(v) => netmask = Some(*v),
            ServiceAttr::Stats(v) => s32 = Some(v.as_slice()),
            ServiceAttr::PeName(v) => pe = Some(v.clone()),
            ServiceAttr::Stats64(v) => s64 = Some(v.as_slice()),
            ServiceAttr::Other(_) => {}
        }
    }
    let af = af.ok_or_else(|| decode_err("service without IPVS_SVC_ATTR_AF"))?;
    let family = Family::from_af(af)
        .ok_or_else(|| decode_err(format!("service with unknown address family {af}")))?;
    let key = match fwmark {
        Some(mark) if mark != 0 => ServiceKey::Fwmark { family, mark },
        _ => {
            let (Some(proto), Some(addr), Some(port)) = (proto, addr, port) else {
                return Err(decode_err(
                    "service without IPVS_SVC_ATTR_FWMARK or PROTOCOL/ADDR/PORT",
                ));
            };
            ServiceKey::Tuple {
                protocol: Protocol::from_number(proto),
                address: ip_from(&addr, family),
                port,
            }
        }
    };
    let scheduler = sched.ok_or_else(|| decode_err("service without IPVS_SVC_ATTR_SCHED_NAME"))?;
    Ok(Service {
        key,
        scheduler,
        flags: ServiceFlags(flags.map(|f| f.flags).unwrap_or(0)),
        timeout: timeout.unwrap_or(0),
        netmask: netmask_from_wire(family, netmask.unwrap_or(0)),
        pe_name: pe,
        stats: stats_from_attrs(s32, s64).map(Box::new),
    })
}

/// Decodes the service of a reply message (`IPVS_CMD_NEW_SERVICE` with an
/// `IPVS_CMD_ATTR_SERVICE` nest).
pub fn service_from_message(msg: &IpvsMessage) -> Result<Service, IpvsError> {
    let attrs = msg
        .nlas
        .iter()
        .find_map(|a| match a {
            IpvsCmdAttr::Service(v) => Some(v),
            _ => None,
        })
        .ok_or_else(|| decode_err(format!("{} reply without IPVS_CMD_ATTR_SERVICE", msg.cmd)))?;
    service_from_attrs(attrs)
}

// ------------------------------------------------------------ destinations

/// The identifying attributes of a destination: `ADDR_FAMILY`, `ADDR`,
/// `PORT`.
pub fn destination_key_attrs(address: IpAddr, port: u16) -> Vec<DestAttr> {
    vec![
        DestAttr::AddrFamily(Family::of(&address).af()),
        DestAttr::Addr(address.into()),
        DestAttr::Port(port),
    ]
}

/// The full attribute set of a destination as sent by add/edit: identity,
/// `FWD_METHOD`, `WEIGHT`, the tunnel attributes when [`Destination::tunnel`]
/// is set, `U_THRESH`, `L_THRESH`. Counters and statistics are not included.
/// Not validated.
pub fn destination_attrs(d: &Destination) -> Vec<DestAttr> {
    let mut v = destination_key_attrs(d.address, d.port);
    v.push(DestAttr::FwdMethod(d.forward.bits()));
    v.push(DestAttr::Weight(d.weight));
    if let Some(t) = &d.tunnel {
        v.push(DestAttr::TunType(t.tunnel_type.number()));
        v.push(DestAttr::TunPort(t.port));
        v.push(DestAttr::TunFlags(t.flags.0));
    }
    v.push(DestAttr::UThresh(d.upper_threshold));
    v.push(DestAttr::LThresh(d.lower_threshold));
    v
}

/// A destination's attributes in the order `ip_vs_genl_fill_dest` writes
/// them: `ADDR`, `PORT`, `FWD_METHOD`, `WEIGHT`, `TUN_TYPE`, `TUN_PORT`,
/// `TUN_FLAGS` (zero without a tunnel), `U_THRESH`, `L_THRESH`, the three
/// connection counters, `ADDR_FAMILY`, then `STATS` and (for 64-bit stats)
/// `STATS64` when [`Destination::stats`] is set.
pub fn destination_reply_attrs(d: &Destination) -> Vec<DestAttr> {
    let t = d.tunnel.unwrap_or_default();
    let mut v = vec![
        DestAttr::Addr(d.address.into()),
        DestAttr::Port(d.port),
        DestAttr::FwdMethod(d.forward.bits()),
        DestAttr::Weight(d.weight),
        DestAttr::TunType(t.tunnel_type.number()),
        DestAttr::TunPort(t.port),
        DestAttr::TunFlags(t.flags.0),
        DestAttr::UThresh(d.upper_threshold),
        DestAttr::LThresh(d.lower_threshold),
        DestAttr::ActiveConns(d.active_conns),
        DestAttr::InactConns(d.inactive_conns),
        DestAttr::PersistConns(d.persistent_conns),
        DestAttr::AddrFamily(d.family().af()),
    ];
    if let Some(stats) = &d.stats {
        let (s32, s64) = stats_attrs(stats);
        v.push(DestAttr::Stats(s32));
        if let Some(s64) = s64 {
            v.push(DestAttr::Stats64(s64));
        }
    }
    v
}

/// Checks a destination for add/edit in a service of `service_family`:
/// weight and upper threshold at most `i32::MAX`, lower threshold not above
/// upper (`ERANGE`/`EINVAL` in `ip_vs_add_dest`), tunnel settings only with
/// [`ForwardMethod::Tunnel`], a non-zero port for GUE, and a family different
/// from the service's only for tunnels (`ip_vs_genl_set_cmd`).
pub fn validate_destination(
    service_family: Family,
    d: &Destination,
    op: Operation,
) -> Result<(), IpvsError> {
    let invalid = |detail: String| Err(IpvsError::InvalidArgument { op, detail });
    let int_max = i32::MAX as u32;
    if d.weight > int_max {
        return invalid(format!("weight {} exceeds {int_max}", d.weight));
    }
    if d.upper_threshold > int_max {
        return invalid(format!(
            "upper threshold {} exceeds {int_max}",
            d.upper_threshold
        ));
    }
    if d.lower_threshold > d.upper_threshold {
        return invalid(format!(
            "lower threshold {} exceeds upper threshold {}",
            d.lower_threshold, d.upper_threshold
        ));
    }
    if let Some(t) = &d.tunnel {
        if d.forward != ForwardMethod::Tunnel {
            return invalid("tunnel settings need ForwardMethod::Tunnel".into());
        }
        if t.tunnel_type == TunnelType::Gue && t.port == 0 {
            return invalid("a GUE tunnel needs a non-zero port".into());
        }
    }
    if d.family() != service_family && d.forward != ForwardMethod::Tunnel {
        return invalid(format!(
            "an {} destination in an {} service needs ForwardMethod::Tunnel",
            d.family(),
            service_family
        ));
    }
    Ok(())
}

/// Decodes a destination from the attributes of an `IPVS_CMD_ATTR_DEST`
/// nest. `service_family` is used when the reply has no
/// `IPVS_DEST_ATTR_ADDR_FAMILY` (as the kernel itself assumes).
pub fn destination_from_attrs(
    attrs: &[DestAttr],
    service_family: Family,
) -> Result<Destination, IpvsError> {
    let (mut addr, mut port, mut af, mut fwd, mut weight) = (None, None, None, None, None);
    let (mut uth, mut lth, mut act, mut inact, mut pers) = (None, None, None, None, None);
    let (mut tun_type, mut tun_port, mut tun_flags, mut s32, mut s64) =
        (None, None, None, None, None);
    for a in attrs {
        match a {
            DestAttr::Addr(v) => addr = Some(*v),
            DestAttr::Port(v) => port = Some(*v),
            DestAttr::FwdMethod(v) => fwd = Some(*v),
            DestAttr::Weight(v) => weight = Some(*v),
            DestAttr::UThresh(v) => uth = Some(*v),
            DestAttr::LThresh(v) => lth = Some(*v),
            DestAttr::ActiveConns(v) => act = Some(*v),
            DestAttr::InactConns(v) => inact = Some(*v),
            DestAttr::PersistConns(v) => pers = Some(*v),
            DestAttr::Stats(v) => s32 = Some(v.as_slice()),
            DestAttr::AddrFamily(v) => af = Some(*v),
            DestAttr::Stats64(v) => s64 = Some(v.as_slice()),
            DestAttr::TunType(v) => tun_type = Some(*v),
            DestAttr::TunPort(v) => tun_port = Some(*v),
            DestAttr::TunFlags(v) => tun_flags = Some(*v),
            DestAttr::Other(_) => {}
        }
    }
    let addr = addr.ok_or_else(|| decode_err("destination without IPVS_DEST_ATTR_ADDR"))?;
    let port = port.ok_or_else(|| decode_err("destination without IPVS_DEST_ATTR_PORT"))?;
    let family = match af {
        None => service_family,
        Some(af) => Family::from_af(af)
            .ok_or_else(|| decode_err(format!("destination with unknown address family {af}")))?,
    };
    let forward = ForwardMethod::from_bits(fwd.unwrap_or(0));
    let tunnel = (forward == ForwardMethod::Tunnel).then(|| TunnelConfig {
        tunnel_type: TunnelType::from_number(tun_type.unwrap_or(0)),
        port: tun_port.unwrap_or(0),
        flags: TunnelFlags(tun_flags.unwrap_or(0)),
    });
    Ok(Destination {
        address: ip_from(&addr, family),
        port,
        forward,
        weight: weight.unwrap_or(0),
        upper_threshold: uth.unwrap_or(0),
        lower_threshold: lth.unwrap_or(0),
        tunnel,
        active_conns: act.unwrap_or(0),
        inactive_conns: inact.unwrap_or(0),
        persistent_conns: pers.unwrap_or(0),
        stats: stats_from_attrs(s32, s64).map(Box::new),
    })
}

/// Decodes the destination of a reply message (`IPVS_CMD_NEW_DEST` with an
/// `IPVS_CMD_ATTR_DEST` nest).
pub fn destination_from_message(
    msg: &IpvsMessage,
    service_family: Family,
) -> Result<Destination, IpvsError> {
    let attrs = msg
        .nlas
        .iter()
        .find_map(|a| match a {
            IpvsCmdAttr::Dest(v) => Some(v),
            _ => None,
        })
        .ok_or_else(|| decode_err(format!("{} reply without IPVS_CMD_ATTR_DEST", msg.cmd)))?;
    destination_from_attrs(attrs, service_family)
}

// ---------------------------------------------------------------- stats

/// The statistics nests the kernel writes: the legacy one (32-bit counters
/// truncated, 64-bit byte counters) and, if [`Stats::is_64bit`], the 64-bit
/// one. Attribute order follows `ip_vs_genl_fill_stats{,64}`.
pub fn stats_attrs(s: &Stats) -> (Vec<StatsAttr>, Option<Vec<Stats64Attr>>) {
    let s32 = vec![
        StatsAttr::Conns(s.conns as u32),
        StatsAttr::InPkts(s.inpkts as u32),
        StatsAttr::OutPkts(s.outpkts as u32),
        StatsAttr::InBytes(s.inbytes),
        StatsAttr::OutBytes(s.outbytes),
        StatsAttr::Cps(s.cps as u32),
        StatsAttr::InPps(s.inpps as u32),
        StatsAttr::OutPps(s.outpps as u32),
        StatsAttr::InBps(s.inbps as u32),
        StatsAttr::OutBps(s.outbps as u32),
    ];
    let s64 = s.is_64bit.then(|| {
        vec![
            Stats64Attr::Conns(s.conns),
            Stats64Attr::InPkts(s.inpkts),
            Stats64Attr::OutPkts(s.outpkts),
            Stats64Attr::InBytes(s.inbytes),
            Stats64Attr::OutBytes(s.outbytes),
            Stats64Attr::Cps(s.cps),
            Stats64Attr::InPps(s.inpps),
            Stats64Attr::OutPps(s.outpps),
            Stats64Attr::InBps(s.inbps),
            Stats64Attr::OutBps(s.outbps),
        ]
    });
    (s32, s64)
}

/// Typed statistics from the 64-bit nest if present, else the 32-bit one.
/// Counters missing from the nest are 0.
pub fn stats_from_attrs(s32: Option<&[StatsAttr]>, s64: Option<&[Stats64Attr]>) -> Option<Stats> {
    if let Some(attrs) = s64 {
        let mut s = Stats {
            is_64bit: true,
            ..Stats::default()
        };
        for a in attrs {
            match a {
                Stats64Attr::Conns(v) => s.conns = *v,
                Stats64Attr::InPkts(v) => s.inpkts = *v,
                Stats64Attr::OutPkts(v) => s.outpkts = *v,
                Stats64Attr::InBytes(v) => s.inbytes = *v,
                Stats64Attr::OutBytes(v) => s.outbytes = *v,
                Stats64Attr::Cps(v) => s.cps = *v,
                Stats64Attr::InPps(v) => s.inpps = *v,
                Stats64Attr::OutPps(v) => s.outpps = *v,
                Stats64Attr::InBps(v) => s.inbps = *v,
                Stats64Attr::OutBps(v) => s.outbps = *v,
                Stats64Attr::Pad(_) | Stats64Attr::Other(_) => {}
            }
        }
        return Some(s);
    }
    let attrs = s32?;
    let mut s = Stats::default();
    for a in attrs {
        match a {
            StatsAttr::Conns(v) => s.conns = (*v).into(),
            StatsAttr::InPkts(v) => s.inpkts = (*v).into(),
            StatsAttr::OutPkts(v) => s.outpkts = (*v).into(),
            StatsAttr::InBytes(v) => s.inbytes = *v,
            StatsAttr::OutBytes(v) => s.outbytes = *v,
            StatsAttr::Cps(v) => s.cps = (*v).into(),
            StatsAttr::InPps(v) => s.inpps = (*v).into(),
            StatsAttr::OutPps(v) => s.outpps = (*v).into(),
            StatsAttr::InBps(v) => s.inbps = (*v).into(),
            StatsAttr::OutBps(v) => s.outbps = (*v).into(),
            StatsAttr::Pad(_) | StatsAttr::Other(_) => {}
        }
    }
    Some(s)
}

// ------------------------------------------------------- info and config

/// Decodes a `GET_INFO` reply.
pub fn info_from_message(msg: &IpvsMessage) -> Result<Info, IpvsError> {
    use crate::attr::InfoAttr;
    let (mut version, mut size) = (None, None);
    for a in &msg.nlas {
        match a {
            IpvsCmdAttr::Info(InfoAttr::Version(v)) => version = Some(*v),
            IpvsCmdAttr::Info(InfoAttr::ConnTabSize(v)) => size = Some(*v),
            _ => {}
        }
    }
    let v = version.ok_or_else(|| decode_err("GET_INFO reply without IPVS_INFO_ATTR_VERSION"))?;
    let conn_table_size =
        size.ok_or_else(|| decode_err("GET_INFO reply without IPVS_INFO_ATTR_CONN_TAB_SIZE"))?;
    Ok(Info {
        version: ((v >> 16) as u8, (v >> 8) as u8, v as u8),
        conn_table_size,
    })
}

/// The three timeout attributes.
pub fn timeouts_attrs(t: &Timeouts) -> Vec<IpvsCmdAttr> {
    vec![
        IpvsCmdAttr::TimeoutTcp(t.tcp),
        IpvsCmdAttr::TimeoutTcpFin(t.tcp_fin),
        IpvsCmdAttr::TimeoutUdp(t.udp),
    ]
}

/// Decodes a `GET_CONFIG` reply; absent timeouts are 0.
pub fn timeouts_from_message(msg: &IpvsMessage) -> Timeouts {
    let mut t = Timeouts::default();
    for a in &msg.nlas {
        match a {
            IpvsCmdAttr::TimeoutTcp(v) => t.tcp = *v,
            IpvsCmdAttr::TimeoutTcpFin(v) => t.tcp_fin = *v,
            IpvsCmdAttr::TimeoutUdp(v) => t.udp = *v,
            _ => {}
        }
    }
    t
}

/// The request messages [`crate::IpvsHandle`] sends. Builders that take
/// user input validate it first.
pub mod request {
    use super::*;

    /// `IPVS_CMD_GET_INFO` (doit).
    pub fn get_info() -> IpvsMessage {
        IpvsMessage::new(IpvsCmd::GetInfo, vec![])
    }

    /// `IPVS_CMD_GET_CONFIG` (doit).
    pub fn get_timeouts() -> IpvsMessage {
        IpvsMessage::new(IpvsCmd::GetConfig, vec![])
    }

    /// `IPVS_CMD_SET_CONFIG` with the three timeouts. Values above
    /// `i32::MAX` are refused (the kernel reads them into an `int`).
    pub fn set_timeouts(t: &Timeouts) -> Result<IpvsMessage, IpvsError> {
        for (name, v) in [("tcp", t.tcp), ("tcp_fin", t.tcp_fin), ("udp", t.udp)] {
            if v > i32::MAX as u32 {
                return Err(IpvsError::InvalidArgument {
                    op: Operation::SetTimeouts,
                    detail: format!("{name} timeout {v} exceeds {}", i32::MAX),
                });
            }
        }
        Ok(IpvsMessage::new(IpvsCmd::SetConfig, timeouts_attrs(t)))
    }

    /// `IPVS_CMD_FLUSH`.
    pub fn flush() -> IpvsMessage {
        IpvsMessage::new(IpvsCmd::Flush, vec![])
    }

    /// `IPVS_CMD_ZERO`, for one service or (without a service nest) all.
    pub fn zero(service: Option<&ServiceKey>) -> Result<IpvsMessage, IpvsError> {
        let mut nlas = vec![];
        if let Some(k) = service {
            validate_service_key(k, Operation::Zero)?;
            nlas.push(IpvsCmdAttr::Service(service_key_attrs(k)));
        }
        Ok(IpvsMessage::new(IpvsCmd::Zero, nlas))
    }

    /// `IPVS_CMD_GET_SERVICE` without attributes, sent as a dump.
    pub fn list_services() -> IpvsMessage {
        IpvsMessage::new(IpvsCmd::GetService, vec![])
    }

    /// `IPVS_CMD_GET_SERVICE` (doit) for one service.
    pub fn get_service(key: &ServiceKey) -> Result<IpvsMessage, IpvsError> {
        validate_service_key(key, Operation::GetService)?;
        Ok(IpvsMessage::new(
            IpvsCmd::GetService,
            vec![IpvsCmdAttr::Service(service_key_attrs(key))],
        ))
    }

    /// `IPVS_CMD_NEW_SERVICE` with the full attribute set.
    pub fn add_service(svc: &Service) -> Result<IpvsMessage, IpvsError> {
        validate_service(svc, Operation::AddService)?;
        Ok(IpvsMessage::new(
            IpvsCmd::NewService,
            vec![IpvsCmdAttr::Service(service_attrs(svc))],
        ))
    }

    /// `IPVS_CMD_SET_SERVICE` with the full attribute set (the kernel
    /// requires it: `ip_vs_genl_parse_service` with `full_entry`).
    pub fn edit_service(svc: &Service) -> Result<IpvsMessage, IpvsError> {
        validate_service(svc, Operation::EditService)?;
        Ok(IpvsMessage::new(
            IpvsCmd::SetService,
            vec![IpvsCmdAttr::Service(service_attrs(svc))],
        ))
    }

    /// `IPVS_CMD_DEL_SERVICE`.
    pub fn delete_service(key: &ServiceKey) -> Result<IpvsMessage, IpvsError> {
        validate_service_key(key, Operation::DeleteService)?;
        Ok(IpvsMessage::new(
            IpvsCmd::DelService,
            vec![IpvsCmdAttr::Service(service_key_attrs(key))],
        ))
    }

    /// `IPVS_CMD_GET_DEST` for a service, sent as a dump.
    pub fn list_destinations(key: &ServiceKey) -> Result<IpvsMessage, IpvsError> {
        validate_service_key(key, Operation::ListDestinations)?;
        Ok(IpvsMessage::new(
            IpvsCmd::GetDest,
            vec![IpvsCmdAttr::Service(service_key_attrs(key))],
        ))
    }

    fn dest_msg(
        cmd: IpvsCmd,
        op: Operation,
        key: &ServiceKey,
        d: &Destination,
    ) -> Result<IpvsMessage, IpvsError> {
        validate_service_key(key, op)?;
        validate_destination(key.family(), d, op)?;
        Ok(IpvsMessage::new(
            cmd,
            vec![
                IpvsCmdAttr::Service(service_key_attrs(key)),
                IpvsCmdAttr::Dest(destination_attrs(d)),
            ],
        ))
    }

    /// `IPVS_CMD_NEW_DEST`: service identity plus the full destination.
    pub fn add_destination(key: &ServiceKey, d: &Destination) -> Result<IpvsMessage, IpvsError> {
        dest_msg(IpvsCmd::NewDest, Operation::AddDestination, key, d)
    }

    /// `IPVS_CMD_SET_DEST`: service identity plus the full destination.
    pub fn edit_destination(key: &ServiceKey, d: &Destination) -> Result<IpvsMessage, IpvsError> {
        dest_msg(IpvsCmd::SetDest, Operation::EditDestination, key, d)
    }

    /// `IPVS_CMD_DEL_DEST`: service identity plus destination identity.
    pub fn delete_destination(
        key: &ServiceKey,
        address: IpAddr,
        port: u16,
    ) -> Result<IpvsMessage, IpvsError> {
        validate_service_key(key, Operation::DeleteDestination)?;
        Ok(IpvsMessage::new(
            IpvsCmd::DelDest,
            vec![
                IpvsCmdAttr::Service(service_key_attrs(key)),
                IpvsCmdAttr::Dest(destination_key_attrs(address, port)),
            ],
        ))
    }
}

/// Messages shaped like the kernel's replies, for tests and fakes.
pub mod reply {
    use super::*;
    use crate::attr::InfoAttr;

    /// A service reply/dump entry (`IPVS_CMD_NEW_SERVICE`).
    pub fn service(svc: &Service) -> IpvsMessage {
        IpvsMessage::new(
            IpvsCmd::NewService,
            vec![IpvsCmdAttr::Service(service_reply_attrs(svc))],
        )
    }

    /// A destination dump entry (`IPVS_CMD_NEW_DEST`).
    pub fn destination(d: &Destination) -> IpvsMessage {
        IpvsMessage::new(
            IpvsCmd::NewDest,
            vec![IpvsCmdAttr::Dest(destination_reply_attrs(d))],
        )
    }

    /// A `GET_INFO` reply (`IPVS_CMD_SET_INFO`).
    pub fn info(info: &Info) -> IpvsMessage {
        let (a, b, c) = info.version;
        let code = (u32::from(a) << 16) | (u32::from(b) << 8) | u32::from(c);
        IpvsMessage::new(
            IpvsCmd::SetInfo,
            vec![
                IpvsCmdAttr::Info(InfoAttr::Version(code)),
                IpvsCmdAttr::Info(InfoAttr::ConnTabSize(info.conn_table_size)),
            ],
        )
    }

    /// A `GET_CONFIG` reply (`IPVS_CMD_SET_CONFIG`).
    pub fn timeouts(t: &Timeouts) -> IpvsMessage {
        IpvsMessage::new(IpvsCmd::SetConfig, timeouts_attrs(t))
    }
}
