//! `net.ipv4.vs.snat_reroute`: whether IPVS routes a reply again after giving it the service's
//! address as its source (`kubeIpvsBpf.datapath.snatReroute`: `auto`, `on` or `off`), and the
//! node's routing policy that decides it in `auto`.
//!
//! With it on (the kernel's default), IPVS calls `ip_route_me_harder` on every reply it
//! forwards: a second route lookup per packet, about 4.5 µs of node CPU per NodePort
//! connection under `-icount` on 6.12 (docs/benchmarks.md). nftables mode makes no such lookup:
//! netfilter reverses a DNAT after routing, and the reply keeps the route its original source
//! (the backend) got. The second lookup gives a different route only when the route depends on
//! the source address, which on Linux takes one of:
//! - a FIB rule other than the kernel's own (`ip rule`: source, fwmark, iif/oif, uid, port,
//!   tos, VRF's l3mdev rule, any table but local, main and default, `not`);
//! - an IPv6 route with a source prefix (`ip -6 route add … from …`) in the main table;
//! - an xfrm (IPsec) policy: the reroute also looks up its bundle by the new source.
//!
//! `auto` turns the reroute off only when the node has none of these, and back on as soon as a
//! check finds one: the node check reads them every `nodeCheckPeriod`, and soon after any FIB
//! rule changes (rtnetlink's rule groups, followed by `crate::node::link_events`). A check that
//! cannot read them turns it on. `cleanup` sets it back to 1, the kernel's default, which
//! kube-proxy leaves.

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, ParseableParametrized};
use netlink_packet_route::route::{RouteHeader, RouteMessage};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::sysctl::Sysctl;
use crate::cleanup::nfnetlink::{Nfnl, NfnlError, Received};

/// The sysctl (both families: IPVS reroutes IPv6 replies under the same switch).
pub const SYSCTL: &str = "net.ipv4.vs.snat_reroute";

/// The kernel's default, which `cleanup` restores.
pub const KERNEL_DEFAULT: Sysctl = Sysctl {
    name: SYSCTL,
    value: "1",
};

const NETLINK_ROUTE: isize = 0;
const NETLINK_XFRM: isize = 6;
/// `XFRM_MSG_GETPOLICY`: with `NLM_F_DUMP`, every policy of the namespace.
const XFRM_MSG_GETPOLICY: u16 = 21;
/// `suppress_prefixlength` and `suppress_ifgroup` unset, as the kernel sends them.
const NONE: u32 = u32::MAX;
const RT_TABLE_DEFAULT: u32 = 253;
const RT_TABLE_MAIN: u32 = 254;
const RT_TABLE_LOCAL: u32 = 255;

/// `kubeIpvsBpf.datapath.snatReroute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SnatReroute {
    /// Off while the node routes by destination alone, on otherwise (the module documentation).
    #[default]
    Auto,
    /// The kernel's default: every forwarded reply is routed again by its new source.
    On,
    /// Never rerouted: for an operator who knows the node's routing policy does not depend on
    /// the source (or whose rules `auto` cannot tell apart).
    Off,
}

impl SnatReroute {
    /// The setting's name, as the configuration spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            SnatReroute::Auto => "auto",
            SnatReroute::On => "on",
            SnatReroute::Off => "off",
        }
    }
}

/// The value chosen for the sysctl and why (logged when it changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub value: &'static str,
    pub why: String,
}

impl Decision {
    pub fn sysctl(&self) -> Sysctl {
        Sysctl {
            name: SYSCTL,
            value: self.value,
        }
    }
}

/// The value for `mode`, given what reading the routing policy found ([`source_dependence`]:
/// what makes a route depend on the source, or the error reading it).
pub fn decide(
    mode: SnatReroute,
    policy: impl FnOnce() -> Result<Vec<String>, NfnlError>,
) -> Decision {
    let on = |why: String| Decision { value: "1", why };
    match mode {
        SnatReroute::On => on("kubeIpvsBpf.datapath.snatReroute is on".to_owned()),
        SnatReroute::Off => Decision {
            value: "0",
            why: "kubeIpvsBpf.datapath.snatReroute is off".to_owned(),
        },
        SnatReroute::Auto => match policy() {
            Ok(found) if found.is_empty() => Decision {
                value: "0",
                why: "routes depend on the destination alone: the kernel's own FIB rules, no \
                      IPv6 source routes, no xfrm policies"
                    .to_owned(),
            },
            Ok(found) => on(format!(
                "routes may depend on the source: {}",
                found.join("; ")
            )),
            Err(e) => on(format!("cannot read the routing policy: {e}")),
        },
    }
}

/// Whether a FIB rule sends every packet to the local, main or default table whatever its
/// source: no selector, no `not`, action `lookup`. The kernel's own rules are such rules.
pub fn rule_is_source_blind(rule: &RuleMessage) -> bool {
    let h = &rule.header;
    let mut table = u32::from(h.table);
    if h.src_len != 0
        || h.dst_len != 0
        || h.tos != 0
        || h.action != RuleAction::ToTable
        || h.flags.contains(RuleFlags::Invert)
    {
        return false;
    }
    for a in &rule.attributes {
        match a {
            RuleAttribute::Priority(_) | RuleAttribute::Protocol(_) => {}
            // -1: none (the kernel sends them for every rule).
            RuleAttribute::SuppressPrefixLen(NONE) | RuleAttribute::SuppressIfGroup(NONE) => {}
            RuleAttribute::Table(t) => table = *t,
            // Anything else selects packets or changes the lookup.
            _ => return false,
        }
    }
    matches!(table, RT_TABLE_LOCAL | RT_TABLE_MAIN | RT_TABLE_DEFAULT)
}

/// A FIB rule as `ip rule` shows its main parts, for logs.
pub fn describe_rule(rule: &RuleMessage) -> String {
    let h = &rule.header;
    let mut parts = Vec::new();
    let mut table = u32::from(h.table);
    let mut priority = 0;
    let mut selectors = Vec::new();
    if h.flags.contains(RuleFlags::Invert) {
        selectors.push("not".to_owned());
    }
    for a in &rule.attributes {
        match a {
            RuleAttribute::Priority(p) => priority = *p,
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Source(ip) => selectors.push(format!("from {ip}/{}", h.src_len)),
            RuleAttribute::Destination(ip) => selectors.push(format!("to {ip}/{}", h.dst_len)),
            RuleAttribute::Iifname(n) => selectors.push(format!("iif {n}")),
            RuleAttribute::Oifname(n) => selectors.push(format!("oif {n}")),
            RuleAttribute::FwMark(m) => selectors.push(format!("fwmark {m:#x}")),
            RuleAttribute::Protocol(_)
            | RuleAttribute::FwMask(_)
            | RuleAttribute::SuppressPrefixLen(NONE)
            | RuleAttribute::SuppressIfGroup(NONE) => {}
            other => selectors.push(format!("{other:?}")),
        }
    }
    let family = if h.family == AddressFamily::Inet6 {
        "IPv6"
    } else {
        "IPv4"
    };
    parts.push(format!("{family} rule {priority}:"));
    if selectors.is_empty() {
        parts.push("from all".to_owned());
    }
    parts.extend(selectors);
    match h.action {
        RuleAction::ToTable => parts.push(format!("lookup {table}")),
        other => parts.push(format!("{other:?}").to_lowercase()),
    }
    parts.join(" ")
}

fn route_request(message: RouteNetlinkMessage, seq: u32) -> Vec<u8> {
    let mut req = NetlinkMessage::from(message);
    req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    req.header.sequence_number = seq;
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    buf
}

/// The `RTM_GETRULE` dump request of one family.
pub fn rule_dump_request(family: AddressFamily, seq: u32) -> Vec<u8> {
    let mut m = RuleMessage::default();
    m.header.family = family;
    route_request(RouteNetlinkMessage::GetRule(m), seq)
}

/// The `RTM_GETROUTE` dump request of the IPv6 main table (filtered by the kernel under
/// `NETLINK_GET_STRICT_CHK`).
pub fn ipv6_main_routes_request(seq: u32) -> Vec<u8> {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet6;
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    route_request(RouteNetlinkMessage::GetRoute(m), seq)
}

/// The `XFRM_MSG_GETPOLICY` dump request: a bare header.
pub fn xfrm_policy_dump_request(seq: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(16);
    b.extend_from_slice(&16u32.to_ne_bytes());
    b.extend_from_slice(&XFRM_MSG_GETPOLICY.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b
}

/// The rtnetlink messages of a dump's replies (those it cannot parse skipped).
fn route_messages(msgs: &[Received]) -> Vec<RouteNetlinkMessage> {
    msgs.iter()
        .filter_map(|m| RouteNetlinkMessage::parse_with_param(m.payload.as_slice(), m.ty).ok())
        .collect()
}

/// What makes a route on this node (the calling thread's network namespace) depend on the
/// packet's source: each rule that is not source-blind ([`rule_is_source_blind`]), each IPv6
/// main-table route with a source prefix, and the number of xfrm policies. Empty: none.
/// `ipv6`: the kernel has IPv6.
pub fn source_dependence(ipv6: bool) -> Result<Vec<String>, NfnlError> {
    let mut found = Vec::new();
    let mut route = Nfnl::open_protocol(NETLINK_ROUTE)?;
    route.strict_checking()?;
    let families: &[AddressFamily] = if ipv6 {
        &[AddressFamily::Inet, AddressFamily::Inet6]
    } else {
        &[AddressFamily::Inet]
    };
    for &family in families {
        let msgs = route.dump("dumping the FIB rules", |seq| {
            rule_dump_request(family, seq)
        })?;
        for m in route_messages(&msgs) {
            if let RouteNetlinkMessage::NewRule(rule) = m
                && !rule_is_source_blind(&rule)
            {
                found.push(describe_rule(&rule));
            }
        }
    }
    if ipv6 {
        let msgs = route.dump("dumping the IPv6 main table", ipv6_main_routes_request)?;
        let sourced = route_messages(&msgs)
            .into_iter()
            .filter(|m| {
                matches!(m, RouteNetlinkMessage::NewRoute(r)
                    if r.header.source_prefix_length != 0
                        && r.header.table == RouteHeader::RT_TABLE_MAIN)
            })
            .count();
        if sourced > 0 {
            found.push(format!("{sourced} IPv6 routes with a source prefix"));
        }
    }
    match Nfnl::open_protocol(NETLINK_XFRM) {
        Ok(mut xfrm) => {
            let policies = xfrm.dump("dumping the xfrm policies", xfrm_policy_dump_request)?;
            if !policies.is_empty() {
                found.push(format!("{} xfrm policies (ip xfrm policy)", policies.len()));
            }
        }
        // No xfrm_user (not built, not loadable): nothing can have added a policy through it.
        Err(NfnlError::Io(e)) if e.raw_os_error() == Some(libc::EPROTONOSUPPORT) => {}
        Err(e) => return Err(e),
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::route::RouteProtocol;

    fn rule(priority: u32, table: u32) -> RuleMessage {
        let mut r = RuleMessage::default();
        r.header.family = AddressFamily::Inet;
        r.header.action = RuleAction::ToTable;
        r.header.table = table.min(255) as u8;
        r.attributes.push(RuleAttribute::Table(table));
        if priority != 0 {
            r.attributes.push(RuleAttribute::Priority(priority));
        }
        r.attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Kernel));
        r.attributes
            .push(RuleAttribute::SuppressPrefixLen(u32::MAX));
        r.attributes.push(RuleAttribute::SuppressIfGroup(u32::MAX));
        r
    }

    #[test]
    fn the_kernels_own_rules_are_source_blind_and_any_selector_or_other_table_is_not() {
        for (p, t) in [(0, 255), (32766, 254), (32767, 253)] {
            assert!(rule_is_source_blind(&rule(p, t)), "{p}: lookup {t}");
        }
        assert!(!rule_is_source_blind(&rule(100, 100)));
        let mut from = rule(100, 254);
        from.header.src_len = 24;
        from.attributes
            .push(RuleAttribute::Source("10.0.3.0".parse().unwrap()));
        assert!(!rule_is_source_blind(&from));
        assert_eq!(
            describe_rule(&from),
            "IPv4 rule 100: from 10.0.3.0/24 lookup 254"
        );
        let mut mark = rule(99, 254);
        mark.attributes.push(RuleAttribute::FwMark(0x100));
        assert!(!rule_is_source_blind(&mark));
        let mut iif = rule(98, 254);
        iif.attributes.push(RuleAttribute::Iifname("eth1".into()));
        assert!(!rule_is_source_blind(&iif));
        let mut not = rule(97, 254);
        not.header.flags |= RuleFlags::Invert;
        assert!(!rule_is_source_blind(&not));
        let mut suppress = rule(96, 254);
        suppress
            .attributes
            .push(RuleAttribute::SuppressPrefixLen(0));
        assert!(!rule_is_source_blind(&suppress));
        let mut goto = rule(95, 254);
        goto.header.action = RuleAction::Goto;
        assert!(!rule_is_source_blind(&goto));
        assert_eq!(
            describe_rule(&rule(100, 100)),
            "IPv4 rule 100: from all lookup 100"
        );
    }

    #[test]
    fn auto_is_off_only_when_nothing_depends_on_the_source_and_on_when_unreadable() {
        assert_eq!(decide(SnatReroute::Auto, || Ok(vec![])).value, "0");
        let d = decide(SnatReroute::Auto, || {
            Ok(vec!["IPv4 rule 100: from 10.0.3.1/32 lookup 100".into()])
        });
        assert_eq!(d.value, "1");
        assert!(d.why.contains("from 10.0.3.1/32"), "{}", d.why);
        let d = decide(SnatReroute::Auto, || Err(NfnlError::Malformed("test")));
        assert_eq!(d.value, "1");
        assert!(d.why.contains("cannot read"), "{}", d.why);
        let unread = || -> Result<Vec<String>, NfnlError> { panic!("on and off read nothing") };
        assert_eq!(decide(SnatReroute::On, unread).value, "1");
        assert_eq!(decide(SnatReroute::Off, unread).value, "0");
    }

    #[test]
    fn dump_requests_are_what_the_kernel_expects() {
        let r = rule_dump_request(AddressFamily::Inet6, 7);
        // nlmsghdr: length, RTM_GETRULE (34), REQUEST|DUMP, seq 7; fib_rule_hdr family 10.
        assert_eq!(
            u32::from_ne_bytes(r[0..4].try_into().unwrap()) as usize,
            r.len()
        );
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), 34);
        assert_eq!(u16::from_ne_bytes([r[6], r[7]]), 0x301);
        assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), 7);
        assert_eq!(r[16], 10);
        let r = ipv6_main_routes_request(1);
        // RTM_GETROUTE (26); rtmsg: family 10, dst/src len 0, tos 0, table 254.
        assert_eq!(u16::from_ne_bytes([r[4], r[5]]), 26);
        assert_eq!(&r[16..21], &[10, 0, 0, 0, 254]);
        let x = xfrm_policy_dump_request(3);
        assert_eq!(x.len(), 16);
        assert_eq!(u16::from_ne_bytes([x[4], x[5]]), 21);
        assert_eq!(u16::from_ne_bytes([x[6], x[7]]), 0x301);
    }
}
