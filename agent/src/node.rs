//! The node's own network view and the `kube-ipvs0` interface, through rtnetlink: interfaces,
//! their addresses, and adding/removing service addresses one by one.

use std::collections::BTreeSet;
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::{Handle, LinkDummy};

use crate::model::LocalAddress;

/// Errors talking rtnetlink, naming what was being done.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot open an rtnetlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface {0} not found")]
    NoSuchInterface(String),
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Netlink { what, source }
}

/// How a device frames packets, for the datapath (programs parse from the Ethernet header or
/// from the IP header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum LinkKind {
    Ethernet,
    /// No link-layer header (tunl0, wg0, ipip, sit, tun).
    L3,
    Loopback,
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: LinkKind,
    /// The device it is enslaved to (a bridge port, a bond slave), if any.
    pub master: Option<u32>,
}

/// An address on an interface, as rtnetlink lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AddressEntry {
    pub index: u32,
    pub address: IpAddr,
    pub prefix_len: u8,
    /// IPv4 secondary address (not the one the kernel picks as a source).
    pub secondary: bool,
}

impl AddressEntry {
    /// An address a masquerading source could be: not secondary, not link-local, not loopback.
    pub fn usable_as_source(&self) -> bool {
        !self.secondary
            && !self.address.is_loopback()
            && match self.address {
                IpAddr::V4(a) => !a.is_link_local(),
                IpAddr::V6(a) => (a.segments()[0] & 0xffc0) != 0xfe80,
            }
    }
}

/// An rtnetlink client in the namespace of the thread that opened it.
#[derive(Clone)]
pub struct Rtnl {
    handle: Handle,
}

impl Rtnl {
    /// Opens the socket and spawns its connection on the current tokio runtime.
    pub fn connect() -> Result<Rtnl, NodeError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NodeError::Connect)?;
        tokio::spawn(conn);
        Ok(Rtnl { handle })
    }

    /// Every interface.
    pub async fn links(&self) -> Result<Vec<Link>, NodeError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing interfaces"))?;
        Ok(msgs.iter().map(link_of).collect())
    }

    /// Every address on every interface, in the kernel's order (primary addresses first).
    pub async fn address_entries(&self) -> Result<Vec<AddressEntry>, NodeError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing addresses"))?;
        Ok(msgs
            .iter()
            .filter_map(|m| {
                Some(AddressEntry {
                    index: m.header.index,
                    address: address_of(m)?,
                    prefix_len: m.header.prefix_len,
                    secondary: m
                        .header
                        .flags
                        .contains(netlink_packet_route::address::AddressHeaderFlags::Secondary),
                })
            })
            .collect())
    }

    /// Every address on every interface, with the interface's name.
    pub async fn addresses(&self) -> Result<Vec<LocalAddress>, NodeError> {
        let links = self.links().await?;
        Ok(local_addresses(&links, &self.address_entries().await?))
    }

    /// The index of interface `name`, if it exists.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, NodeError> {
        let found: Result<Vec<LinkMessage>, _> = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_collect()
            .await;
        match found {
            Ok(msgs) => Ok(msgs.first().map(|m| m.header.index)),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl(format!("looking up interface {name}"))(e)),
        }
    }

    /// Creates the dummy interface `name` if it is missing (left down, as kube-proxy leaves
    /// kube-ipvs0: addresses on it are local all the same); returns its index.
    pub async fn ensure_dummy(&self, name: &str) -> Result<u32, NodeError> {
        if let Some(index) = self.link_index(name).await? {
            return Ok(index);
        }
        self.handle
            .link()
            .add(LinkDummy::new(name).build())
            .execute()
            .await
            .map_err(nl(format!("creating dummy interface {name}")))?;
        self.link_index(name)
            .await?
            .ok_or_else(|| NodeError::NoSuchInterface(name.to_string()))
    }

    /// Deletes interface `name` if it exists.
    pub async fn delete_link(&self, name: &str) -> Result<(), NodeError> {
        if let Some(index) = self.link_index(name).await? {
            self.handle
                .link()
                .del(index)
                .execute()
                .await
                .map_err(nl(format!("deleting interface {name}")))?;
        }
        Ok(())
    }

    /// The addresses on interface `index`.
    pub async fn addresses_on(&self, index: u32) -> Result<BTreeSet<IpAddr>, NodeError> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing addresses"))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(address_of)
            .collect())
    }

    /// Adds `address` as a host address (/32 or /128) on interface `index`.
    pub async fn add_address(&self, index: u32, address: IpAddr) -> Result<(), NodeError> {
        let prefix = if address.is_ipv4() { 32 } else { 128 };
        let mut req = self.handle.address().add(index, address, prefix);
        if address.is_ipv6() {
            // No duplicate address detection: a service address is ours, and DAD would leave
            // it unusable ("tentative") for a second or more.
            req.message_mut().header.flags |=
                netlink_packet_route::address::AddressHeaderFlags::Nodad;
        }
        req.execute()
            .await
            .map_err(nl(format!("adding address {address}")))
    }

    /// Removes host address `address` from interface `index`.
    pub async fn del_address(&self, index: u32, address: IpAddr) -> Result<(), NodeError> {
        let prefix = if address.is_ipv4() { 32 } else { 128 };
        let mut msg = AddressMessage::default();
        msg.header.index = index;
        msg.header.prefix_len = prefix;
        msg.header.family = if address.is_ipv4() {
            netlink_packet_route::AddressFamily::Inet
        } else {
            netlink_packet_route::AddressFamily::Inet6
        };
        msg.attributes.push(AddressAttribute::Local(address));
        msg.attributes.push(AddressAttribute::Address(address));
        self.handle
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(nl(format!("removing address {address}")))
    }
}

/// Names each address with its interface's name.
pub fn local_addresses(links: &[Link], entries: &[AddressEntry]) -> Vec<LocalAddress> {
    entries
        .iter()
        .map(|e| LocalAddress {
            address: e.address,
            interface: links
                .iter()
                .find(|l| l.index == e.index)
                .map(|l| l.name.clone())
                .unwrap_or_default(),
        })
        .collect()
}

/// The interface index of every link or address change on the node (rtnetlink multicast
/// groups RTMGRP_LINK, RTMGRP_IPV4_IFADDR and RTMGRP_IPV6_IFADDR).
pub fn link_events() -> Result<tokio::sync::mpsc::UnboundedReceiver<u32>, NodeError> {
    use futures::StreamExt;
    use netlink_packet_core::NetlinkPayload;
    use netlink_packet_route::RouteNetlinkMessage as M;
    use netlink_sys::AsyncSocket;
    let (mut conn, _handle, mut messages) =
        rtnetlink::new_connection().map_err(NodeError::Connect)?;
    let groups = (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
    conn.socket_mut()
        .socket_mut()
        .bind(&netlink_sys::SocketAddr::new(0, groups))
        .map_err(NodeError::Connect)?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let index = match msg.payload {
                NetlinkPayload::InnerMessage(M::NewLink(m) | M::DelLink(m)) => m.header.index,
                NetlinkPayload::InnerMessage(M::NewAddress(m) | M::DelAddress(m)) => m.header.index,
                _ => continue,
            };
            if tx.send(index).is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

fn link_of(m: &LinkMessage) -> Link {
    let name = m
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default();
    let kind = match m.header.link_layer_type {
        LinkLayerType::Loopback => LinkKind::Loopback,
        LinkLayerType::Ether => LinkKind::Ethernet,
        _ => LinkKind::L3,
    };
    let master = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::Controller(i) => Some(*i),
        _ => None,
    });
    Link {
        index: m.header.index,
        name,
        kind,
        master,
    }
}

/// The interface address of an address message (IFA_LOCAL for IPv4 point-to-point, else
/// IFA_ADDRESS).
fn address_of(m: &AddressMessage) -> Option<IpAddr> {
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}
