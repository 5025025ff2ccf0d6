//! Errors, and the mapping from the kernel's errno to typed errors.
//!
//! The errno a request fails with means different things per command; the
//! mapping follows `net/netfilter/ipvs/ip_vs_ctl.c`:
//!
//! | errno        | command(s)                               | meaning / error                                  |
//! |--------------|------------------------------------------|--------------------------------------------------|
//! | `EPERM`      | any (`GENL_ADMIN_PERM`)                  | [`IpvsError::PermissionDenied`]                  |
//! | `EEXIST`     | `NEW_SERVICE`                            | [`IpvsError::ServiceExists`]                     |
//! | `ESRCH`      | every command naming a service but `NEW_SERVICE` (`ip_vs_genl_set_cmd`, `ip_vs_genl_get_cmd`) | [`IpvsError::ServiceNotFound`] |
//! | `ENOENT`     | `NEW_SERVICE`, `SET_SERVICE`             | scheduler or persistence engine module not found |
//! | `EEXIST`     | `NEW_DEST`                               | [`IpvsError::DestinationExists`]                 |
//! | `ENOENT`     | `SET_DEST`, `DEL_DEST`                   | [`IpvsError::DestinationNotFound`]               |
//! | `ERANGE`     | `NEW_DEST`, `SET_DEST`                   | negative weight, lower > upper threshold         |
//! | `EINVAL`     | any                                      | [`IpvsError::InvalidArgument`]                   |
//! | `EAFNOSUPPORT` | any naming a service/destination       | [`IpvsError::InvalidArgument`] (IPv6 disabled)   |
//! | `ENOENT`     | `CTRL_CMD_GETFAMILY`, and commands IPVS itself never fails with `ENOENT` (genetlink's "unknown family id") | [`IpvsError::FamilyNotFound`] |
//!
//! Anything else is [`IpvsError::Kernel`] with the errno.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::DecodeError;

use crate::message::IpvsCmd;
use crate::types::{Destination, Service, ServiceKey};

/// The operation a request was for, named in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Resolving the `IPVS` generic netlink family id.
    ResolveFamily,
    /// [`crate::IpvsHandle::info`].
    GetInfo,
    /// [`crate::IpvsHandle::timeouts`].
    GetTimeouts,
    /// [`crate::IpvsHandle::set_timeouts`].
    SetTimeouts,
    /// [`crate::IpvsHandle::flush`].
    Flush,
    /// [`crate::IpvsHandle::zero`].
    Zero,
    /// [`crate::IpvsHandle::services`].
    ListServices,
    /// [`crate::IpvsHandle::service`].
    GetService,
    /// [`crate::IpvsHandle::add_service`].
    AddService,
    /// [`crate::IpvsHandle::edit_service`].
    EditService,
    /// [`crate::IpvsHandle::delete_service`].
    DeleteService,
    /// [`crate::IpvsHandle::destinations`].
    ListDestinations,
    /// [`crate::IpvsHandle::add_destination`].
    AddDestination,
    /// [`crate::IpvsHandle::edit_destination`].
    EditDestination,
    /// [`crate::IpvsHandle::delete_destination`].
    DeleteDestination,
    /// A raw request ([`crate::IpvsHandle::request`]) with this command.
    Raw(IpvsCmd),
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::ResolveFamily => "resolve the IPVS netlink family",
            Self::GetInfo => "get IPVS info",
            Self::GetTimeouts => "get timeouts",
            Self::SetTimeouts => "set timeouts",
            Self::Flush => "flush",
            Self::Zero => "zero counters",
            Self::ListServices => "list services",
            Self::GetService => "get service",
            Self::AddService => "add service",
            Self::EditService => "edit service",
            Self::DeleteService => "delete service",
            Self::ListDestinations => "list destinations",
            Self::AddDestination => "add destination",
            Self::EditDestination => "edit destination",
            Self::DeleteDestination => "delete destination",
            Self::Raw(cmd) => return write!(f, "raw {cmd} request"),
        };
        f.write_str(s)
    }
}

/// Which kind of name was refused by [`IpvsError::NameTooLong`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NameKind {
    /// A scheduler name (`IPVS_SVC_ATTR_SCHED_NAME`).
    Scheduler,
    /// A persistence engine name (`IPVS_SVC_ATTR_PE_NAME`).
    PersistenceEngine,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Scheduler => "scheduler",
            Self::PersistenceEngine => "persistence engine",
        })
    }
}

/// Everything that can go wrong talking to IPVS.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IpvsError {
    /// The kernel has no `IPVS` generic netlink family.
    #[error(
        "the IPVS generic netlink family is not registered: is the ip_vs kernel module loaded (modprobe ip_vs)?"
    )]
    FamilyNotFound,
    /// Adding a service that already exists (`EEXIST`).
    #[error("virtual service {0} already exists")]
    ServiceExists(ServiceKey),
    /// The named service does not exist (`ESRCH`).
    #[error("virtual service {0} does not exist")]
    ServiceNotFound(ServiceKey),
    /// Adding a destination that already exists in the service (`EEXIST`).
    #[error(
        "destination {} already exists in virtual service {service}",
        SocketAddr::new(*.address, *.port)
    )]
    DestinationExists {
        /// The service.
        service: ServiceKey,
        /// Destination address.
        address: IpAddr,
        /// Destination port.
        port: u16,
    },
    /// The destination is not in the service (`ENOENT` on edit/delete).
    #[error(
        "destination {} does not exist in virtual service {service}",
        SocketAddr::new(*.address, *.port)
    )]
    DestinationNotFound {
        /// The service.
        service: ServiceKey,
        /// Destination address.
        address: IpAddr,
        /// Destination port.
        port: u16,
    },
    /// The kernel has no such scheduler (`ENOENT` on add/edit service; the
    /// kernel tried to load `ip_vs_<name>`).
    #[error("unknown IPVS scheduler {0:?} (kernel module ip_vs_{0} not available)")]
    UnknownScheduler(String),
    /// The kernel has no such persistence engine (`ENOENT` on add/edit of a
    /// service whose scheduler is `none`).
    #[error("unknown IPVS persistence engine {0:?} (kernel module ip_vs_pe_{0} not available)")]
    UnknownPersistenceEngine(String),
    /// `ENOENT` on add/edit of a service with both a scheduler and a
    /// persistence engine: the kernel does not say which one is missing.
    #[error("unknown IPVS scheduler {scheduler:?} or persistence engine {pe_name:?}")]
    UnknownSchedulerOrPersistenceEngine {
        /// The scheduler that was asked for.
        scheduler: String,
        /// The persistence engine that was asked for.
        pe_name: String,
    },
    /// A scheduler or persistence engine name the kernel's policy would
    /// refuse; detected before sending.
    #[error("{kind} name {name:?} is too long ({} bytes, at most {max})", .name.len())]
    NameTooLong {
        /// Which name.
        kind: NameKind,
        /// The name.
        name: String,
        /// The longest accepted length in bytes (without the NUL).
        max: usize,
    },
    /// The request was invalid: refused before sending, or `EINVAL`,
    /// `ERANGE` or `EAFNOSUPPORT` from the kernel.
    #[error("{op}: invalid argument: {detail}")]
    InvalidArgument {
        /// The operation.
        op: Operation,
        /// What was wrong.
        detail: String,
    },
    /// The caller lacks `CAP_NET_ADMIN` in the network namespace's user
    /// namespace (`EPERM`).
    #[error("{op}: permission denied (CAP_NET_ADMIN is required)")]
    PermissionDenied {
        /// The operation.
        op: Operation,
    },
    /// Any other error the kernel returned.
    #[error("{op} failed: {message} (errno {errno})")]
    Kernel {
        /// The operation.
        op: Operation,
        /// Positive errno.
        errno: i32,
        /// `strerror` text, plus the kernel's extended-ack message if any.
        message: String,
    },
    /// A reply was malformed or truncated.
    #[error("malformed IPVS netlink reply: {0}")]
    Decode(String),
    /// Socket I/O failed (opening the netlink socket).
    #[error("netlink socket error: {0}")]
    Io(#[from] std::io::Error),
    /// The netlink connection failed or closed, or no tokio runtime.
    #[error("netlink connection: {0}")]
    Connection(String),
    /// The request did not complete within the configured timeout
    /// ([`crate::HandleConfig::request_timeout`]).
    #[error("{op}: timed out waiting for the kernel")]
    Timeout {
        /// The operation.
        op: Operation,
    },
}

impl From<DecodeError> for IpvsError {
    fn from(e: DecodeError) -> Self {
        Self::Decode(e.to_string())
    }
}

/// What a request was about, to turn its errno into a typed error.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ErrCtx<'a> {
    ResolveFamily,
    GetInfo,
    GetTimeouts,
    SetTimeouts,
    Flush,
    Zero(Option<&'a ServiceKey>),
    ListServices,
    GetService(&'a ServiceKey),
    AddService(&'a Service),
    EditService(&'a Service),
    DeleteService(&'a ServiceKey),
    ListDestinations(&'a ServiceKey),
    AddDestination(&'a ServiceKey, &'a Destination),
    EditDestination(&'a ServiceKey, &'a Destination),
    DeleteDestination(&'a ServiceKey, IpAddr, u16),
    Raw(IpvsCmd),
}

impl ErrCtx<'_> {
    pub(crate) fn op(&self) -> Operation {
        match self {
            Self::ResolveFamily => Operation::ResolveFamily,
            Self::GetInfo => Operation::GetInfo,
            Self::GetTimeouts => Operation::GetTimeouts,
            Self::SetTimeouts => Operation::SetTimeouts,
            Self::Flush => Operation::Flush,
            Self::Zero(_) => Operation::Zero,
            Self::ListServices => Operation::ListServices,
            Self::GetService(_) => Operation::GetService,
            Self::AddService(_) => Operation::AddService,
            Self::EditService(_) => Operation::EditService,
            Self::DeleteService(_) => Operation::DeleteService,
            Self::ListDestinations(_) => Operation::ListDestinations,
            Self::AddDestination(..) => Operation::AddDestination,
            Self::EditDestination(..) => Operation::EditDestination,
            Self::DeleteDestination(..) => Operation::DeleteDestination,
            Self::Raw(cmd) => Operation::Raw(*cmd),
        }
    }

    /// The service the request names, if any.
    fn service(&self) -> Option<&ServiceKey> {
        match self {
            Self::Zero(k) => *k,
            Self::GetService(k)
            | Self::DeleteService(k)
            | Self::ListDestinations(k)
            | Self::AddDestination(k, _)
            | Self::EditDestination(k, _)
            | Self::DeleteDestination(k, _, _) => Some(k),
            Self::AddService(s) | Self::EditService(s) => Some(&s.key),
            _ => None,
        }
    }

    /// The destination the request names, if any.
    fn destination(&self) -> Option<(ServiceKey, IpAddr, u16)> {
        match self {
            Self::AddDestination(k, d) | Self::EditDestination(k, d) => {
                Some((**k, d.address, d.port))
            }
            Self::DeleteDestination(k, a, p) => Some((**k, *a, *p)),
            _ => None,
        }
    }

    /// Maps a positive errno returned for this request to an error.
    pub(crate) fn error(&self, errno: i32, ext_msg: Option<&str>) -> IpvsError {
        let op = self.op();
        let invalid = |hint: &str| IpvsError::InvalidArgument {
            op,
            detail: match ext_msg {
                Some(m) if !m.is_empty() => format!("{m} ({hint})"),
                _ => hint.to_string(),
            },
        };
        if errno == libc::EPERM || errno == libc::EACCES {
            return IpvsError::PermissionDenied { op };
        }
        match (self, errno) {
            (Self::ResolveFamily, libc::ENOENT) => return IpvsError::FamilyNotFound,
            (Self::AddService(s), libc::EEXIST) => return IpvsError::ServiceExists(s.key),
            (Self::AddService(s) | Self::EditService(s), libc::ENOENT) => {
                return unknown_module(s);
            }
            (Self::AddService(_) | Self::EditService(_), libc::EINVAL) => {
                return invalid(
                    "kernel refused the service; an IPv6 service needs a netmask (prefix length) in 1..=128",
                );
            }
            (Self::AddDestination(..), libc::EEXIST) => {
                if let Some((service, address, port)) = self.destination() {
                    return IpvsError::DestinationExists {
                        service,
                        address,
                        port,
                    };
                }
            }
            (Self::EditDestination(..) | Self::DeleteDestination(..), libc::ENOENT) => {
                if let Some((service, address, port)) = self.destination() {
                    return IpvsError::DestinationNotFound {
                        service,
                        address,
                        port,
                    };
                }
            }
            (Self::AddDestination(..) | Self::EditDestination(..), libc::ERANGE) => {
                return invalid("negative weight, or lower threshold above upper threshold");
            }
            (Self::AddDestination(..) | Self::EditDestination(..), libc::EINVAL) => {
                return invalid(
                    "kernel refused the destination: address not unicast/local, GUE tunnel without port, upper threshold above INT_MAX, or a mixed-family destination that is not a tunnel (or a sync daemon is running)",
                );
            }
            (Self::SetTimeouts, libc::EINVAL) => {
                return invalid("timeouts must be at most INT_MAX/HZ seconds");
            }
            // Commands IPVS itself never fails with ENOENT: genetlink answers
            // ENOENT for an unknown family id (ip_vs unloaded since connect).
            (
                Self::GetInfo
                | Self::GetTimeouts
                | Self::SetTimeouts
                | Self::Flush
                | Self::Zero(_)
                | Self::ListServices
                | Self::GetService(_)
                | Self::DeleteService(_)
                | Self::ListDestinations(_),
                libc::ENOENT,
            ) => return IpvsError::FamilyNotFound,
            _ => {}
        }
        if errno == libc::ESRCH
            && let Some(k) = self.service()
            && !matches!(self, Self::AddService(_))
        {
            return IpvsError::ServiceNotFound(*k);
        }
        if errno == libc::EAFNOSUPPORT && self.service().is_some() {
            return invalid("address family not supported by the kernel (IPv6 disabled?)");
        }
        if errno == libc::EINVAL {
            return invalid("kernel refused the request");
        }
        IpvsError::Kernel {
            op,
            errno,
            message: describe_errno(errno, ext_msg),
        }
    }
}

fn unknown_module(s: &Service) -> IpvsError {
    match s.pe_name.as_deref().filter(|p| !p.is_empty()) {
        None => IpvsError::UnknownScheduler(s.scheduler.clone()),
        Some(pe) if s.scheduler == "none" => IpvsError::UnknownPersistenceEngine(pe.to_string()),
        Some(pe) => IpvsError::UnknownSchedulerOrPersistenceEngine {
            scheduler: s.scheduler.clone(),
            pe_name: pe.to_string(),
        },
    }
}

/// `strerror` text of an errno, with the kernel's extended-ack message.
pub(crate) fn describe_errno(errno: i32, ext_msg: Option<&str>) -> String {
    let base = std::io::Error::from_raw_os_error(errno).to_string();
    match ext_msg {
        Some(m) if !m.is_empty() => format!("{base}: {m}"),
        _ => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Family, ForwardMethod};
    use std::net::Ipv4Addr;

    fn key() -> ServiceKey {
        ServiceKey::tcp(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 80)
    }

    fn svc() -> Service {
        Service::new(key(), "rr")
    }

    fn dest() -> Destination {
        Destination::new(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1)), 8080)
    }

    #[test]
    fn permission_denied_for_every_operation() {
        let k = key();
        let s = svc();
        let d = dest();
        let ctxs = [
            ErrCtx::ResolveFamily,
            ErrCtx::GetInfo,
            ErrCtx::GetTimeouts,
            ErrCtx::SetTimeouts,
            ErrCtx::Flush,
            ErrCtx::Zero(None),
            ErrCtx::Zero(Some(&k)),
            ErrCtx::ListServices,
            ErrCtx::GetService(&k),
            ErrCtx::AddService(&s),
            ErrCtx::EditService(&s),
            ErrCtx::DeleteService(&k),
            ErrCtx::ListDestinations(&k),
            ErrCtx::AddDestination(&k, &d),
            ErrCtx::EditDestination(&k, &d),
            ErrCtx::DeleteDestination(&k, d.address, d.port),
            ErrCtx::Raw(IpvsCmd::Flush),
        ];
        for ctx in ctxs {
            for errno in [libc::EPERM, libc::EACCES] {
                match ctx.error(errno, None) {
                    IpvsError::PermissionDenied { op } => assert_eq!(op, ctx.op()),
                    e => panic!("{ctx:?} {errno}: {e:?}"),
                }
            }
        }
    }

    #[test]
    fn resolve_family() {
        assert!(matches!(
            ErrCtx::ResolveFamily.error(libc::ENOENT, None),
            IpvsError::FamilyNotFound
        ));
        assert!(matches!(
            ErrCtx::ResolveFamily.error(libc::EIO, None),
            IpvsError::Kernel {
                op: Operation::ResolveFamily,
                errno: libc::EIO,
                ..
            }
        ));
    }

    #[test]
    fn add_service() {
        let s = svc();
        let ctx = ErrCtx::AddService(&s);
        assert!(matches!(ctx.error(libc::EEXIST, None), IpvsError::ServiceExists(k) if k == key()));
        assert!(
            matches!(ctx.error(libc::ENOENT, None), IpvsError::UnknownScheduler(n) if n == "rr")
        );
        assert!(matches!(
            ctx.error(libc::EINVAL, None),
            IpvsError::InvalidArgument {
                op: Operation::AddService,
                ..
            }
        ));
        assert!(matches!(
            ctx.error(libc::EAFNOSUPPORT, None),
            IpvsError::InvalidArgument { .. }
        ));
        // ESRCH never comes for NEW_SERVICE; if it did it is not "not found".
        assert!(matches!(
            ctx.error(libc::ESRCH, None),
            IpvsError::Kernel {
                errno: libc::ESRCH,
                ..
            }
        ));
        assert!(matches!(
            ctx.error(libc::ENOMEM, None),
            IpvsError::Kernel {
                op: Operation::AddService,
                errno: libc::ENOMEM,
                ..
            }
        ));
    }

    #[test]
    fn add_service_unknown_pe_disambiguation() {
        let mut s = svc();
        s.pe_name = Some("sip".into());
        assert!(matches!(
            ErrCtx::AddService(&s).error(libc::ENOENT, None),
            IpvsError::UnknownSchedulerOrPersistenceEngine { scheduler, pe_name }
                if scheduler == "rr" && pe_name == "sip"
        ));
        s.scheduler = "none".into();
        assert!(matches!(
            ErrCtx::EditService(&s).error(libc::ENOENT, None),
            IpvsError::UnknownPersistenceEngine(p) if p == "sip"
        ));
        s.pe_name = Some(String::new());
        s.scheduler = "foo".into();
        assert!(matches!(
            ErrCtx::AddService(&s).error(libc::ENOENT, None),
            IpvsError::UnknownScheduler(n) if n == "foo"
        ));
    }

    #[test]
    fn edit_service() {
        let s = svc();
        let ctx = ErrCtx::EditService(&s);
        assert!(
            matches!(ctx.error(libc::ESRCH, None), IpvsError::ServiceNotFound(k) if k == key())
        );
        assert!(matches!(
            ctx.error(libc::ENOENT, None),
            IpvsError::UnknownScheduler(_)
        ));
        assert!(matches!(
            ctx.error(libc::EINVAL, None),
            IpvsError::InvalidArgument { .. }
        ));
    }

    #[test]
    fn service_lookups() {
        let k = key();
        for ctx in [
            ErrCtx::DeleteService(&k),
            ErrCtx::GetService(&k),
            ErrCtx::ListDestinations(&k),
            ErrCtx::Zero(Some(&k)),
        ] {
            assert!(
                matches!(ctx.error(libc::ESRCH, None), IpvsError::ServiceNotFound(x) if x == k),
                "{ctx:?}"
            );
            assert!(matches!(
                ctx.error(libc::ENOENT, None),
                IpvsError::FamilyNotFound
            ));
            assert!(matches!(
                ctx.error(libc::EINVAL, None),
                IpvsError::InvalidArgument { .. }
            ));
        }
    }

    #[test]
    fn add_destination() {
        let k = key();
        let d = dest();
        let ctx = ErrCtx::AddDestination(&k, &d);
        assert!(matches!(ctx.error(libc::ESRCH, None), IpvsError::ServiceNotFound(x) if x == k));
        assert!(matches!(
            ctx.error(libc::EEXIST, None),
            IpvsError::DestinationExists { service, address, port }
                if service == k && address == d.address && port == 8080
        ));
        assert!(matches!(
            ctx.error(libc::ERANGE, None),
            IpvsError::InvalidArgument { .. }
        ));
        assert!(matches!(
            ctx.error(libc::EINVAL, None),
            IpvsError::InvalidArgument { .. }
        ));
        // ENOENT is not a documented NEW_DEST result: keep the errno.
        assert!(matches!(
            ctx.error(libc::ENOENT, None),
            IpvsError::Kernel {
                errno: libc::ENOENT,
                ..
            }
        ));
    }

    #[test]
    fn edit_and_delete_destination() {
        let k = key();
        let mut d = dest();
        d.forward = ForwardMethod::DirectRoute;
        for ctx in [
            ErrCtx::EditDestination(&k, &d),
            ErrCtx::DeleteDestination(&k, d.address, d.port),
        ] {
            assert!(
                matches!(ctx.error(libc::ESRCH, None), IpvsError::ServiceNotFound(x) if x == k)
            );
            assert!(matches!(
                ctx.error(libc::ENOENT, None),
                IpvsError::DestinationNotFound { service, address, port }
                    if service == k && address == d.address && port == 8080
            ));
        }
        assert!(matches!(
            ErrCtx::EditDestination(&k, &d).error(libc::ERANGE, None),
            IpvsError::InvalidArgument { .. }
        ));
    }

    #[test]
    fn global_commands() {
        assert!(matches!(
            ErrCtx::SetTimeouts.error(libc::EINVAL, None),
            IpvsError::InvalidArgument {
                op: Operation::SetTimeouts,
                ..
            }
        ));
        for ctx in [
            ErrCtx::GetInfo,
            ErrCtx::GetTimeouts,
            ErrCtx::Flush,
            ErrCtx::Zero(None),
            ErrCtx::ListServices,
        ] {
            assert!(matches!(
                ctx.error(libc::ENOENT, None),
                IpvsError::FamilyNotFound
            ));
            assert!(matches!(
                ctx.error(libc::ENOMEM, None),
                IpvsError::Kernel { .. }
            ));
            // No service named: ESRCH stays a raw errno.
            assert!(matches!(
                ctx.error(libc::ESRCH, None),
                IpvsError::Kernel { .. }
            ));
        }
        assert!(matches!(
            ErrCtx::Raw(IpvsCmd::Flush).error(libc::ENOENT, None),
            IpvsError::Kernel { .. }
        ));
    }

    #[test]
    fn ext_ack_message_is_kept() {
        match ErrCtx::Flush.error(libc::EOPNOTSUPP, Some("nope")) {
            IpvsError::Kernel { message, .. } => assert!(message.ends_with(": nope"), "{message}"),
            e => panic!("{e:?}"),
        }
        match ErrCtx::SetTimeouts.error(libc::EINVAL, Some("bad attr")) {
            IpvsError::InvalidArgument { detail, .. } => assert!(detail.starts_with("bad attr")),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn display_names_objects() {
        let k = ServiceKey::tcp(
            "fd00::1".parse().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            443,
        );
        let e = IpvsError::DestinationNotFound {
            service: k,
            address: "fd00::2".parse().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            port: 8443,
        };
        assert_eq!(
            e.to_string(),
            "destination [fd00::2]:8443 does not exist in virtual service TCP [fd00::1]:443"
        );
        assert_eq!(
            IpvsError::ServiceNotFound(ServiceKey::fwmark(Family::Inet, 7)).to_string(),
            "virtual service FWM 7 (IPv4) does not exist"
        );
    }
}
