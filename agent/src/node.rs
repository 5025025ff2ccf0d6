//! The node's own network view and the `kube-ipvs0` interface, through rtnetlink: interfaces,
//! their addresses, and adding/removing service addresses, one by one or in batches of
//! [`ADDRESS_BATCH`] requests per system call.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
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
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Address requests per system call in [`Rtnl::change_addresses`]: the kernel handles every
/// request of a `sendmsg` before it returns, so a first sync's 10,000 addresses cost 79 calls
/// instead of 10,000 round trips through the connection task, and the kernel's address
/// lifetime check (`check_lifetime`, queued by every address added, a walk of every address)
/// gets in between batches rather than between addresses. Their 128 acknowledgements (about
/// 1 KiB each in the receive queue) fit in the socket's buffer.
pub const ADDRESS_BATCH: usize = 128;

/// Whether [`Rtnl::change_addresses`] adds or removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressChange {
    Add,
    Remove,
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
    /// A second socket, without a connection task, for batches of address requests.
    batch: Arc<Mutex<BatchSocket>>,
}

/// The socket of [`Rtnl::change_addresses`] and its next sequence number.
struct BatchSocket {
    socket: Socket,
    sequence: AtomicU32,
}

impl Rtnl {
    /// Opens the sockets and spawns the connection on the current tokio runtime.
    pub fn connect() -> Result<Rtnl, NodeError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NodeError::Connect)?;
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NodeError::Connect)?;
        socket.bind_auto().map_err(NodeError::Connect)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NodeError::Connect)?;
        socket.set_rx_buf_sz(4 << 20).map_err(NodeError::Connect)?;
        tokio::spawn(conn);
        Ok(Rtnl {
            handle,
            batch: Arc::new(Mutex::new(BatchSocket {
                socket,
                sequence: AtomicU32::new(1),
            })),
        })
    }

    /// Adds or removes host addresses (/32 or /128) on interface `index`, [`ADDRESS_BATCH`]
    /// requests per system call; each address's result, in the order given. Blocks the calling
    /// thread while the kernel handles a batch (as a single request through the connection
    /// would, in its `sendmsg`).
    pub fn change_addresses(
        &self,
        index: u32,
        change: AddressChange,
        addresses: &[IpAddr],
    ) -> Vec<(IpAddr, Result<(), NodeError>)> {
        let what = |a: &IpAddr| match change {
            AddressChange::Add => format!("adding address {a}"),
            AddressChange::Remove => format!("removing address {a}"),
        };
        let batch = match self.batch.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut results = Vec::with_capacity(addresses.len());
        for chunk in addresses.chunks(ADDRESS_BATCH) {
            match batch.send(index, change, chunk) {
                Ok(answers) => results.extend(chunk.iter().zip(answers).map(|(a, answer)| {
                    (
                        *a,
                        answer.map_err(|source| NodeError::Netlink {
                            what: what(a),
                            source,
                        }),
                    )
                })),
                Err(e) => results.extend(chunk.iter().map(|a| {
                    (
                        *a,
                        Err(NodeError::Io {
                            what: what(a),
                            source: std::io::Error::new(e.kind(), e.to_string()),
                        }),
                    )
                })),
            }
        }
        results
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
}

/// The request that adds (`NLM_F_CREATE | NLM_F_EXCL`, as `ip addr add`) or removes host
/// address `address` on interface `index`; IPv6 without duplicate address detection (a service
/// address is ours, and DAD would leave it unusable, "tentative", for a second or more).
fn address_request(
    index: u32,
    change: AddressChange,
    address: IpAddr,
    sequence: u32,
) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut msg = AddressMessage::default();
    msg.header.index = index;
    msg.header.prefix_len = if address.is_ipv4() { 32 } else { 128 };
    msg.header.family = if address.is_ipv4() {
        netlink_packet_route::AddressFamily::Inet
    } else {
        netlink_packet_route::AddressFamily::Inet6
    };
    if address.is_ipv6() && change == AddressChange::Add {
        msg.header.flags |= AddressHeaderFlags::Nodad;
    }
    msg.attributes.push(AddressAttribute::Local(address));
    msg.attributes.push(AddressAttribute::Address(address));
    let (payload, flags) = match change {
        AddressChange::Add => (
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        ),
        AddressChange::Remove => (
            RouteNetlinkMessage::DelAddress(msg),
            NLM_F_REQUEST | NLM_F_ACK,
        ),
    };
    let mut req = NetlinkMessage::from(payload);
    req.header.flags = flags;
    req.header.sequence_number = sequence;
    req.finalize();
    req
}

impl BatchSocket {
    /// Sends one request per address in one `sendmsg` and reads their acknowledgements (all
    /// queued by the time it returns): each address's answer, in order; a request left
    /// unanswered is `RequestFailed`.
    fn send(
        &self,
        index: u32,
        change: AddressChange,
        addresses: &[IpAddr],
    ) -> std::io::Result<Vec<Result<(), rtnetlink::Error>>> {
        let first = self
            .sequence
            .fetch_add(addresses.len() as u32, Ordering::Relaxed);
        let requests: Vec<_> = addresses
            .iter()
            .enumerate()
            .map(|(i, a)| address_request(index, change, *a, first.wrapping_add(i as u32)))
            .collect();
        let mut buf = vec![0u8; requests.iter().map(|r| r.buffer_len()).sum()];
        let mut at = 0;
        for r in &requests {
            r.serialize(&mut buf[at..at + r.buffer_len()]);
            at += r.buffer_len();
        }
        self.socket.send(&buf, 0)?;
        let mut answers: BTreeMap<u32, Result<(), rtnetlink::Error>> = BTreeMap::new();
        let mut rx = Vec::with_capacity(64 * 1024);
        while answers.len() < addresses.len() {
            rx.clear();
            match self.socket.recv(&mut rx, libc::MSG_DONTWAIT) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
            let mut off = 0;
            while off + 16 <= rx.len() {
                let len =
                    u32::from_ne_bytes([rx[off], rx[off + 1], rx[off + 2], rx[off + 3]]) as usize;
                if len < 16 || off + len > rx.len() {
                    break;
                }
                if let Ok(m) =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[off..off + len])
                {
                    let seq = m.header.sequence_number.wrapping_sub(first);
                    if (seq as usize) < addresses.len()
                        && let NetlinkPayload::Error(e) = m.payload
                    {
                        let answer = match e.code {
                            None => Ok(()),
                            Some(_) => Err(rtnetlink::Error::NetlinkError(e)),
                        };
                        answers.insert(seq, answer);
                    }
                }
                off += (len + 3) & !3;
            }
        }
        Ok((0..addresses.len() as u32)
            .map(|i| {
                answers
                    .remove(&i)
                    .unwrap_or(Err(rtnetlink::Error::RequestFailed))
            })
            .collect())
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

/// A change on the node that [`link_events`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeEvent {
    /// A link or one of its addresses changed: the interface's index.
    Link(u32),
    /// A FIB rule was added or deleted (either family): the routing policy
    /// `datapath::reroute` reads.
    Rule,
}

/// Every link, address and FIB rule change on the node (rtnetlink multicast groups
/// RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTNLGRP_IPV4_RULE and
/// RTNLGRP_IPV6_RULE).
pub fn link_events() -> Result<tokio::sync::mpsc::UnboundedReceiver<NodeEvent>, NodeError> {
    use futures::StreamExt;
    use netlink_packet_core::NetlinkPayload;
    use netlink_packet_route::RouteNetlinkMessage as M;
    use netlink_sys::AsyncSocket;
    let (mut conn, _handle, mut messages) =
        rtnetlink::new_connection().map_err(NodeError::Connect)?;
    let group = |g: libc::c_uint| 1u32 << (g - 1);
    let groups = (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32
        | group(libc::RTNLGRP_IPV4_RULE)
        | group(libc::RTNLGRP_IPV6_RULE);
    conn.socket_mut()
        .socket_mut()
        .bind(&netlink_sys::SocketAddr::new(0, groups))
        .map_err(NodeError::Connect)?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let event = match msg.payload {
                NetlinkPayload::InnerMessage(M::NewLink(m) | M::DelLink(m)) => {
                    NodeEvent::Link(m.header.index)
                }
                NetlinkPayload::InnerMessage(M::NewAddress(m) | M::DelAddress(m)) => {
                    NodeEvent::Link(m.header.index)
                }
                NetlinkPayload::InnerMessage(M::NewRule(_) | M::DelRule(_)) => NodeEvent::Rule,
                _ => continue,
            };
            if tx.send(event).is_err() {
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
