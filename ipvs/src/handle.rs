//! [`IpvsHandle`]: the async client.

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use netlink_packet_core::{
    Emitable, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NlasIterator,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_proto::ConnectionHandle;
use netlink_proto::sys::{AsyncSocket, SocketAddr, protocols::NETLINK_GENERIC};
use tokio::sync::{Semaphore, oneshot};

use crate::constants::IPVS_GENL_NAME;
use crate::convert::{self, request};
use crate::error::{ErrCtx, IpvsError, describe_errno};
use crate::message::{GENL_HEADER_LEN, IpvsMessage};
use crate::transport::{Failure, RawGenl, collect};
use crate::types::{Destination, Info, Service, ServiceKey, Timeouts};

/// `GENL_ID_CTRL`: the generic netlink controller's fixed family id.
const GENL_ID_CTRL: u16 = 0x10;
/// `CTRL_ATTR_FAMILY_ID`.
const CTRL_ATTR_FAMILY_ID: u16 = 1;

/// Tuning for [`IpvsHandle::connect_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandleConfig {
    /// Most requests in flight on the socket at once; further requests wait.
    /// Bounds the replies queued in the socket's receive buffer so the
    /// kernel never has to drop one (a dropped reply would leave its request
    /// waiting forever, or until [`Self::request_timeout`]). Default 256.
    pub max_in_flight: usize,
    /// Receive buffer size to request, in bytes (`SO_RCVBUFFORCE`, which
    /// needs `CAP_NET_ADMIN` like IPVS itself, falling back to `SO_RCVBUF`,
    /// capped by `net.core.rmem_max`). 0 keeps the system default.
    /// Default 8 MiB.
    pub receive_buffer: usize,
    /// Give up on a request after this long with [`IpvsError::Timeout`].
    /// `None` (the default) waits forever. Needs a tokio runtime with the
    /// time driver enabled.
    pub request_timeout: Option<Duration>,
}

impl Default for HandleConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            receive_buffer: 8 << 20,
            request_timeout: None,
        }
    }
}

#[derive(Debug)]
struct Inner {
    conn: ConnectionHandle<RawGenl>,
    family_id: u16,
    runtime: tokio::runtime::Handle,
    in_flight: Arc<Semaphore>,
    dump_lock: Arc<Semaphore>,
    timeout: Option<Duration>,
}

/// An async client for the kernel's IPVS generic-netlink family.
///
/// One handle owns one `NETLINK_GENERIC` socket whose connection task runs
/// on the tokio runtime it was created in; the task ends when the last clone
/// of the handle is dropped.
///
/// # Concurrency
///
/// Every method takes `&self` and the handle is cheap to [`Clone`], so many
/// requests can be in flight at once and their replies are matched by
/// sequence number:
///
/// ```no_run
/// # async fn f(h: ipvs::IpvsHandle, dests: Vec<ipvs::Destination>, key: ipvs::ServiceKey)
/// # -> Result<(), ipvs::IpvsError> {
/// use futures::stream::{self, StreamExt, TryStreamExt};
///
/// stream::iter(&dests)
///     .map(|d| h.add_destination(&key, d))
///     .buffer_unordered(64)
///     .try_collect::<Vec<()>>()
///     .await?;
/// # Ok(()) }
/// ```
///
/// At most [`HandleConfig::max_in_flight`] requests are on the wire at once.
/// The kernel runs only one dump per socket, so dumps ([`Self::services`],
/// [`Self::destinations`]) are serialized per handle while other requests
/// keep flowing; open more handles for parallel dumps.
///
/// A request whose future is dropped is still read to its end in the
/// background (so the socket stays consistent); its effect on the kernel is
/// whatever the kernel did.
#[derive(Debug, Clone)]
pub struct IpvsHandle {
    inner: Arc<Inner>,
}

impl IpvsHandle {
    /// Opens a handle with [`HandleConfig::default`]; see [`Self::connect_with`].
    pub fn connect() -> impl Future<Output = Result<IpvsHandle, IpvsError>> + Send + 'static {
        Self::connect_with(HandleConfig::default())
    }

    /// Opens a `NETLINK_GENERIC` socket, spawns its connection task on the
    /// current tokio runtime and resolves the `IPVS` family id.
    ///
    /// # Network namespace
    ///
    /// The socket is created synchronously when this function is *called*,
    /// before the returned future is first polled, so it belongs to the
    /// network namespace of the calling thread at that moment; a netlink
    /// socket stays in its namespace for life. To manage another namespace,
    /// `setns(2)` the current thread, call this, and switch back, e.g. inside
    /// `tokio::task::block_in_place` or on a dedicated thread that holds a
    /// runtime handle (`Handle::enter`).
    ///
    /// # Errors
    ///
    /// [`IpvsError::Connection`] outside a tokio runtime, [`IpvsError::Io`]
    /// if the socket cannot be opened, [`IpvsError::FamilyNotFound`] if
    /// `ip_vs` is not loaded (the kernel's genetlink controller may first try
    /// to load it through the module alias `net-pf-16-proto-16-family-IPVS`).
    pub fn connect_with(
        config: HandleConfig,
    ) -> impl Future<Output = Result<IpvsHandle, IpvsError>> + Send + 'static {
        let opened = Self::open(&config);
        async move {
            let mut inner = opened?;
            inner.family_id = resolve_family(&inner, IPVS_GENL_NAME).await?;
            Ok(IpvsHandle {
                inner: Arc::new(inner),
            })
        }
    }

    fn open(config: &HandleConfig) -> Result<Inner, IpvsError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            IpvsError::Connection(
                "IpvsHandle::connect must be called within a tokio runtime".into(),
            )
        })?;
        let (mut conn, handle, unsolicited) =
            netlink_proto::new_connection::<RawGenl>(NETLINK_GENERIC)?;
        // Forward terminators so a request's stream ends visibly with an ack
        // or NLMSG_DONE, not just by closing.
        conn.set_forward_done(true);
        conn.set_forward_ack(true);
        {
            let sock = conn.socket_mut().socket_mut();
            // Best effort: both exist since Linux 4.12/4.3.
            let _ = sock.set_ext_ack(true);
            let _ = sock.set_cap_ack(true);
            if config.receive_buffer > 0 {
                set_receive_buffer(sock, config.receive_buffer);
            }
        }
        // Nothing is multicast to us; dropping the receiver makes the
        // connection discard unsolicited messages.
        drop(unsolicited);
        runtime.spawn(conn);
        Ok(Inner {
            conn: handle,
            family_id: 0,
            runtime,
            in_flight: Arc::new(Semaphore::new(
                config.max_in_flight.clamp(1, Semaphore::MAX_PERMITS),
            )),
            dump_lock: Arc::new(Semaphore::new(1)),
            timeout: config.request_timeout,
        })
    }

    /// The resolved id of the `IPVS` generic netlink family.
    pub fn family_id(&self) -> u16 {
        self.inner.family_id
    }

    /// A [`crate::IpvsBatch`] for this handle's family, on a socket of its own opened in the
    /// calling thread's network namespace; `per_send` requests per `sendmsg`.
    pub fn batch(&self, per_send: usize) -> Result<crate::IpvsBatch, IpvsError> {
        crate::IpvsBatch::open(self.inner.family_id, per_send)
    }

    async fn execute(
        &self,
        ctx: &ErrCtx<'_>,
        msg: IpvsMessage,
        dump: bool,
    ) -> Result<Vec<IpvsMessage>, IpvsError> {
        let payload = msg.to_genl_bytes()?;
        let family = self.inner.family_id;
        let replies = transact(&self.inner, family, payload, dump)
            .await
            .map_err(|f| failure_error(ctx, f))?;
        replies
            .into_iter()
            .map(|raw| {
                if raw.message_type != family {
                    return Err(IpvsError::Decode(format!(
                        "reply of netlink type {} where the IPVS family is {family}",
                        raw.message_type
                    )));
                }
                IpvsMessage::from_genl_bytes(&raw.payload)
            })
            .collect()
    }

    /// Sends a raw message and returns the decoded replies. With `dump` the
    /// request carries `NLM_F_DUMP` and every multipart reply up to
    /// `NLMSG_DONE` is returned; otherwise it carries `NLM_F_ACK` and the
    /// replies before the ack are returned (none for most set commands).
    /// Kernel errors become [`IpvsError::Kernel`],
    /// [`IpvsError::PermissionDenied`] or [`IpvsError::InvalidArgument`]
    /// with [`crate::Operation::Raw`].
    pub async fn request(
        &self,
        msg: IpvsMessage,
        dump: bool,
    ) -> Result<Vec<IpvsMessage>, IpvsError> {
        let ctx = ErrCtx::Raw(msg.cmd);
        self.execute(&ctx, msg, dump).await
    }

    /// IPVS version and connection table size (`IPVS_CMD_GET_INFO`).
    pub async fn info(&self) -> Result<Info, IpvsError> {
        let replies = self
            .execute(&ErrCtx::GetInfo, request::get_info(), false)
            .await?;
        let msg = replies
            .first()
            .ok_or_else(|| IpvsError::Decode("no reply to IPVS_CMD_GET_INFO".into()))?;
        convert::info_from_message(msg)
    }

    /// The TCP, TCP-FIN and UDP timeouts (`IPVS_CMD_GET_CONFIG`).
    pub async fn timeouts(&self) -> Result<Timeouts, IpvsError> {
        let replies = self
            .execute(&ErrCtx::GetTimeouts, request::get_timeouts(), false)
            .await?;
        let msg = replies
            .first()
            .ok_or_else(|| IpvsError::Decode("no reply to IPVS_CMD_GET_CONFIG".into()))?;
        Ok(convert::timeouts_from_message(msg))
    }

    /// Sets timeouts (`IPVS_CMD_SET_CONFIG`); a 0 field leaves that timeout
    /// unchanged.
    pub async fn set_timeouts(&self, timeouts: &Timeouts) -> Result<(), IpvsError> {
        let msg = request::set_timeouts(timeouts)?;
        self.execute(&ErrCtx::SetTimeouts, msg, false).await?;
        Ok(())
    }

    /// Deletes every service and destination in the namespace
    /// (`IPVS_CMD_FLUSH`).
    pub async fn flush(&self) -> Result<(), IpvsError> {
        self.execute(&ErrCtx::Flush, request::flush(), false)
            .await?;
        Ok(())
    }

    /// Zeroes the counters of one service and its destinations, or of
    /// everything with `None` (`IPVS_CMD_ZERO`).
    pub async fn zero(&self, service: Option<&ServiceKey>) -> Result<(), IpvsError> {
        let msg = request::zero(service)?;
        self.execute(&ErrCtx::Zero(service), msg, false).await?;
        Ok(())
    }

    /// Every service in the namespace (dump of `IPVS_CMD_GET_SERVICE`).
    pub async fn services(&self) -> Result<Vec<Service>, IpvsError> {
        let replies = self
            .execute(&ErrCtx::ListServices, request::list_services(), true)
            .await?;
        replies.iter().map(convert::service_from_message).collect()
    }

    /// One service (`IPVS_CMD_GET_SERVICE`); [`IpvsError::ServiceNotFound`]
    /// if it does not exist.
    pub async fn service(&self, key: &ServiceKey) -> Result<Service, IpvsError> {
        let msg = request::get_service(key)?;
        let replies = self.execute(&ErrCtx::GetService(key), msg, false).await?;
        let msg = replies
            .first()
            .ok_or_else(|| IpvsError::Decode("no reply to IPVS_CMD_GET_SERVICE".into()))?;
        convert::service_from_message(msg)
    }

    /// Adds a service (`IPVS_CMD_NEW_SERVICE`).
    ///
    /// Errors: [`IpvsError::ServiceExists`], [`IpvsError::UnknownScheduler`]
    /// (and the persistence-engine variants), [`IpvsError::NameTooLong`] and
    /// [`IpvsError::InvalidArgument`] (checked before sending, see
    /// [`convert::validate_service`]).
    pub async fn add_service(&self, service: &Service) -> Result<(), IpvsError> {
        let msg = request::add_service(service)?;
        self.execute(&ErrCtx::AddService(service), msg, false)
            .await?;
        Ok(())
    }

    /// Replaces a service's scheduler, flags, timeout, netmask and
    /// persistence engine (`IPVS_CMD_SET_SERVICE` with the full attribute
    /// set). Errors as [`Self::add_service`], plus
    /// [`IpvsError::ServiceNotFound`].
    pub async fn edit_service(&self, service: &Service) -> Result<(), IpvsError> {
        let msg = request::edit_service(service)?;
        self.execute(&ErrCtx::EditService(service), msg, false)
            .await?;
        Ok(())
    }

    /// Deletes a service and its destinations (`IPVS_CMD_DEL_SERVICE`);
    /// [`IpvsError::ServiceNotFound`] if it does not exist.
    pub async fn delete_service(&self, key: &ServiceKey) -> Result<(), IpvsError> {
        let msg = request::delete_service(key)?;
        self.execute(&ErrCtx::DeleteService(key), msg, false)
            .await?;
        Ok(())
    }

    /// The destinations of a service (dump of `IPVS_CMD_GET_DEST`).
    ///
    /// The kernel answers a dump for a missing service with an empty list,
    /// so an empty result is confirmed with a `GET_SERVICE`; a missing
    /// service is [`IpvsError::ServiceNotFound`].
    pub async fn destinations(&self, key: &ServiceKey) -> Result<Vec<Destination>, IpvsError> {
        let msg = request::list_destinations(key)?;
        let replies = self
            .execute(&ErrCtx::ListDestinations(key), msg, true)
            .await?;
        if replies.is_empty() {
            let msg = request::get_service(key)?;
            self.execute(&ErrCtx::ListDestinations(key), msg, false)
                .await?;
            return Ok(vec![]);
        }
        let family = key.family();
        replies
            .iter()
            .map(|m| convert::destination_from_message(m, family))
            .collect()
    }

    /// Adds a destination to a service (`IPVS_CMD_NEW_DEST`).
    ///
    /// Errors: [`IpvsError::ServiceNotFound`],
    /// [`IpvsError::DestinationExists`], [`IpvsError::InvalidArgument`]
    /// (checked before sending, see [`convert::validate_destination`]).
    pub async fn add_destination(
        &self,
        service: &ServiceKey,
        destination: &Destination,
    ) -> Result<(), IpvsError> {
        let msg = request::add_destination(service, destination)?;
        self.execute(&ErrCtx::AddDestination(service, destination), msg, false)
            .await?;
        Ok(())
    }

    /// Replaces a destination's forwarding method, weight, thresholds and
    /// tunnel settings (`IPVS_CMD_SET_DEST`). Errors:
    /// [`IpvsError::ServiceNotFound`], [`IpvsError::DestinationNotFound`],
    /// [`IpvsError::InvalidArgument`].
    pub async fn edit_destination(
        &self,
        service: &ServiceKey,
        destination: &Destination,
    ) -> Result<(), IpvsError> {
        let msg = request::edit_destination(service, destination)?;
        self.execute(&ErrCtx::EditDestination(service, destination), msg, false)
            .await?;
        Ok(())
    }

    /// Removes a destination from a service (`IPVS_CMD_DEL_DEST`). Errors:
    /// [`IpvsError::ServiceNotFound`], [`IpvsError::DestinationNotFound`].
    pub async fn delete_destination(
        &self,
        service: &ServiceKey,
        address: IpAddr,
        port: u16,
    ) -> Result<(), IpvsError> {
        let msg = request::delete_destination(service, address, port)?;
        self.execute(
            &ErrCtx::DeleteDestination(service, address, port),
            msg,
            false,
        )
        .await?;
        Ok(())
    }
}

/// Resolves a generic netlink family id with `CTRL_CMD_GETFAMILY`.
async fn resolve_family(inner: &Inner, name: &str) -> Result<u16, IpvsError> {
    let ctx = ErrCtx::ResolveFamily;
    let mut genl = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(name.to_string())],
    });
    genl.finalize();
    let mut payload = vec![0u8; genl.buffer_len()];
    genl.emit(&mut payload);
    let replies = transact(inner, GENL_ID_CTRL, payload, false)
        .await
        .map_err(|f| failure_error(&ctx, f))?;
    // Decoded by hand: only CTRL_ATTR_FAMILY_ID is needed, and the
    // generic ctrl decoder of netlink-packet-generic is not hardened
    // against malformed nested policy attributes.
    for raw in replies {
        if raw.message_type != GENL_ID_CTRL {
            continue;
        }
        let attrs = raw.payload.get(GENL_HEADER_LEN..).unwrap_or_default();
        for nla in NlasIterator::new(attrs) {
            let nla = nla.map_err(IpvsError::from)?;
            if nla.kind() == CTRL_ATTR_FAMILY_ID {
                let id: [u8; 2] = nla
                    .value()
                    .try_into()
                    .map_err(|_| IpvsError::Decode("CTRL_ATTR_FAMILY_ID is not 2 bytes".into()))?;
                return Ok(u16::from_ne_bytes(id));
            }
        }
    }
    Err(IpvsError::Decode(
        "CTRL_CMD_GETFAMILY reply without CTRL_ATTR_FAMILY_ID".into(),
    ))
}

/// Sends one request and gathers its replies. The gathering runs as a task
/// that holds the in-flight (and dump) permits until the request's
/// terminator arrives, so cancelling the caller cannot let a second dump
/// start on the socket while the first is still running (`EBUSY`).
async fn transact(
    inner: &Inner,
    message_type: u16,
    payload: Vec<u8>,
    dump: bool,
) -> Result<Vec<RawGenl>, Failure> {
    let closed = |_| Failure::Connection("handle semaphores closed".into());
    let dump_permit = if dump {
        Some(
            inner
                .dump_lock
                .clone()
                .acquire_owned()
                .await
                .map_err(closed)?,
        )
    } else {
        None
    };
    let permit = inner
        .in_flight
        .clone()
        .acquire_owned()
        .await
        .map_err(closed)?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { NLM_F_ACK };
    let mut nl = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(RawGenl {
            message_type,
            payload,
        }),
    );
    nl.finalize();
    let stream = inner
        .conn
        .request(nl, SocketAddr::new(0, 0))
        .map_err(|e| Failure::Connection(e.to_string()))?;
    let timeout = inner.timeout;
    let (tx, rx) = oneshot::channel();
    inner.runtime.spawn(async move {
        let result = match timeout {
            Some(d) => tokio::time::timeout(d, collect(stream))
                .await
                .unwrap_or(Err(Failure::TimedOut)),
            None => collect(stream).await,
        };
        drop(permit);
        drop(dump_permit);
        let _ = tx.send(result);
    });
    rx.await
        .map_err(|_| Failure::Connection("request task ended without an answer".into()))?
}

fn failure_error(ctx: &ErrCtx<'_>, f: Failure) -> IpvsError {
    let op = ctx.op();
    match f {
        Failure::Errno { errno, ext } => ctx.error(errno, ext.as_deref()),
        Failure::Closed => IpvsError::Connection(format!(
            "{op}: the netlink connection closed before the kernel answered"
        )),
        Failure::Overrun => IpvsError::Kernel {
            op,
            errno: libc::ENOBUFS,
            message: describe_errno(
                libc::ENOBUFS,
                Some("netlink receive buffer overrun, replies were lost"),
            ),
        },
        Failure::DumpInterrupted => IpvsError::Kernel {
            op,
            errno: libc::EINTR,
            message: describe_errno(
                libc::EINTR,
                Some("dump interrupted by a concurrent change (NLM_F_DUMP_INTR); retry"),
            ),
        },
        Failure::TimedOut => IpvsError::Timeout { op },
        Failure::Connection(s) => IpvsError::Connection(format!("{op}: {s}")),
    }
}

pub(crate) fn set_receive_buffer(sock: &netlink_sys::Socket, bytes: usize) {
    let val = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the fd is a live socket owned by `sock`; `val` outlives the
    // call and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let _ = sock.set_rx_buf_sz(val);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Operation;

    /// CTRL_CMD_GETFAMILY for `name` (doit), or for every family (dump).
    fn getfamily(name: Option<&str>) -> Vec<u8> {
        let mut genl = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: name
                .map(|n| vec![GenlCtrlAttrs::FamilyName(n.to_string())])
                .unwrap_or_default(),
        });
        genl.finalize();
        let mut payload = vec![0u8; genl.buffer_len()];
        genl.emit(&mut payload);
        payload
    }

    /// The transport against the real kernel, using the generic netlink
    /// controller (always present, unprivileged): resolution, doit+ack,
    /// multipart dumps to NLMSG_DONE, errors, and many concurrent requests
    /// including concurrent dumps (which the kernel would refuse with EBUSY
    /// on one socket if they were not serialized).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn transport_against_the_kernel_controller() {
        let inner = match IpvsHandle::open(&HandleConfig {
            max_in_flight: 8,
            ..HandleConfig::default()
        }) {
            Ok(i) => Arc::new(i),
            // No netlink in this sandbox: nothing to test.
            Err(IpvsError::Io(e)) => {
                eprintln!("skipping: cannot open a netlink socket: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            resolve_family(&inner, "nlctrl").await.ok(),
            Some(GENL_ID_CTRL)
        );
        let missing = resolve_family(&inner, "nosuchfamily").await;
        assert!(
            matches!(missing, Err(IpvsError::FamilyNotFound)),
            "{missing:?}"
        );

        let mut tasks = Vec::new();
        for i in 0..64 {
            let inner = inner.clone();
            tasks.push(tokio::spawn(async move {
                let dump = i % 4 == 0;
                let payload = getfamily((!dump).then_some("nlctrl"));
                transact(&inner, GENL_ID_CTRL, payload, dump).await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let replies = t.await.expect("task").expect("request succeeds");
            if i % 4 == 0 {
                assert!(replies.len() > 1, "a dump lists every family");
            } else {
                assert_eq!(replies.len(), 1, "one reply before the ack");
            }
        }

        // A cancelled dump does not break the next one.
        let fut = transact(&inner, GENL_ID_CTRL, getfamily(None), true);
        drop(fut);
        let first = transact(&inner, GENL_ID_CTRL, getfamily(None), true);
        let _ = tokio::time::timeout(Duration::from_micros(1), first).await;
        let again = transact(&inner, GENL_ID_CTRL, getfamily(None), true).await;
        assert!(again.map(|r| !r.is_empty()).unwrap_or(false));

        // IPVS itself: either resolvable, or reported as not loaded.
        match IpvsHandle::connect().await {
            Ok(h) => assert_ne!(h.family_id(), 0),
            Err(IpvsError::FamilyNotFound) => {}
            Err(e) => panic!("unexpected: {e}"),
        }
    }

    /// Compile-time check: the handle is shareable and its futures can be
    /// spawned.
    #[allow(dead_code)]
    fn handle_and_futures_are_send(h: &IpvsHandle, k: &ServiceKey, s: &Service, d: &Destination) {
        fn send_sync<T: Send + Sync>(_: &T) {}
        fn send<T: Send>(_: T) {}
        send_sync(h);
        send(IpvsHandle::connect());
        send(h.info());
        send(h.timeouts());
        send(h.set_timeouts(&Timeouts::default()));
        send(h.flush());
        send(h.zero(Some(k)));
        send(h.services());
        send(h.service(k));
        send(h.add_service(s));
        send(h.edit_service(s));
        send(h.delete_service(k));
        send(h.destinations(k));
        send(h.add_destination(k, d));
        send(h.edit_destination(k, d));
        send(h.delete_destination(k, d.address, d.port));
        send(h.request(IpvsMessage::new(crate::IpvsCmd::Flush, vec![]), false));
    }

    #[test]
    fn connect_outside_runtime_is_an_error_not_a_panic() {
        let fut = IpvsHandle::connect();
        let r = futures::executor::block_on(fut);
        assert!(matches!(r, Err(IpvsError::Connection(_))), "{r:?}");
    }

    #[test]
    fn failures_map_to_errors() {
        let ctx = ErrCtx::Flush;
        assert!(matches!(
            failure_error(&ctx, Failure::Closed),
            IpvsError::Connection(_)
        ));
        assert!(matches!(
            failure_error(&ctx, Failure::TimedOut),
            IpvsError::Timeout {
                op: Operation::Flush
            }
        ));
        assert!(matches!(
            failure_error(&ctx, Failure::Overrun),
            IpvsError::Kernel {
                errno: libc::ENOBUFS,
                ..
            }
        ));
        assert!(matches!(
            failure_error(&ctx, Failure::DumpInterrupted),
            IpvsError::Kernel {
                errno: libc::EINTR,
                ..
            }
        ));
        assert!(matches!(
            failure_error(
                &ctx,
                Failure::Errno {
                    errno: libc::EPERM,
                    ext: None
                }
            ),
            IpvsError::PermissionDenied { .. }
        ));
    }
}
