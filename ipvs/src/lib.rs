//! Typed async client for the Linux kernel's IPVS generic-netlink family
//! (`"IPVS"`, version 1, `include/uapi/linux/ip_vs.h`).
//!
//! This crate owns everything kube-ipvs-bpf needs to read and program IPVS:
//! virtual services (TCP/UDP/SCTP, IPv4/IPv6, firewall marks, schedulers,
//! persistence, flags, persistence engines), their destinations (forwarding
//! method, weight, thresholds, tunnels, mixed-family), statistics (64-bit
//! when the kernel sends them), timeouts, general info, flush and zero. It
//! does not own the sync daemon (its nest is passed through raw) nor any
//! policy about what services should exist.
//!
//! # Layers
//!
//! * Typed layer ([`types`], re-exported at the root): [`ServiceKey`],
//!   [`Service`], [`Destination`], [`Stats`], [`Timeouts`], [`Info`].
//! * Client: [`IpvsHandle`], async, `&self`, pipelinable; and [`IpvsBatch`],
//!   blocking, for many changes at once (many requests per `sendmsg`, only
//!   failures answered: a first sync's 110,000 changes in under a thousand
//!   system calls each way).
//! * Raw layer: [`message::IpvsMessage`] (implements
//!   `netlink_packet_generic::GenlFamily`, `Emitable` and
//!   `ParseableParametrized`) and the per-nest attribute enums in [`attr`];
//!   [`convert`] maps between the two layers and builds the exact request
//!   messages the handle sends.
//!
//! # Example
//!
//! ```no_run
//! use std::net::{IpAddr, Ipv4Addr};
//! use ipvs::{Destination, IpvsHandle, Service, ServiceKey};
//!
//! # async fn f() -> Result<(), ipvs::IpvsError> {
//! let ipvs = IpvsHandle::connect().await?;
//! let key = ServiceKey::tcp(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)), 443);
//! ipvs.add_service(&Service::new(key, "rr")).await?;
//! let backend = Destination::new(IpAddr::V4(Ipv4Addr::new(10, 244, 1, 7)), 8443);
//! ipvs.add_destination(&key, &backend).await?;
//! for svc in ipvs.services().await? {
//!     println!("{} {}", svc.key, svc.scheduler);
//! }
//! # Ok(()) }
//! ```
//!
//! # Robustness
//!
//! Nothing the kernel sends can panic this crate: malformed or truncated
//! replies are [`IpvsError::Decode`], unknown attributes are kept as
//! `Other(DefaultNla)`. Kernel errors are mapped per operation to typed
//! errors (see [`error`]).

#![deny(missing_docs)]

pub mod attr;
mod batch;
pub mod constants;
pub mod convert;
pub mod error;
mod handle;
pub mod message;
mod transport;
pub mod types;

pub use batch::{Change, IpvsBatch, MAX_BATCH};
pub use error::{IpvsError, NameKind, Operation};
pub use handle::{HandleConfig, IpvsHandle};
pub use message::{IpvsCmd, IpvsCmdAttr, IpvsMessage};
pub use types::{
    Destination, Family, ForwardMethod, Info, Protocol, Service, ServiceFlags, ServiceKey, Stats,
    Timeouts, TunnelConfig, TunnelFlags, TunnelType,
};
