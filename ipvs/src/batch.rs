//! [`IpvsBatch`]: changes to the IPVS table sent many per `sendmsg`, on a blocking socket of
//! their own.
//!
//! The kernel handles every request of a `sendmsg` before the call returns (generic netlink is
//! synchronous, and IPVS serializes its changes under one mutex anyway), so nothing is gained
//! by keeping requests "in flight" on the async [`crate::IpvsHandle`]; what costs there is the
//! per-request machinery (a task, two channels and a system call each way per request). Here a
//! batch is one buffer and one `sendmsg`. Only the batch's last request asks for an
//! acknowledgement: the kernel answers a request without `NLM_F_ACK` only when it fails, in
//! order, so once the last request's acknowledgement is read every failure of the batch has
//! been read before it, and every request not answered succeeded.

use std::net::IpAddr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};

use crate::convert::request;
use crate::error::{ErrCtx, IpvsError};
use crate::message::IpvsMessage;
use crate::transport::{RawGenl, error_ext_msg};
use crate::types::{Destination, Service, ServiceKey};

/// Most requests per `sendmsg` ([`IpvsBatch::open`] caps its argument to it). The failures of
/// a batch wait in the socket's receive buffer until its last request's acknowledgement is
/// read: 256 error messages (a few hundred bytes of buffer each, with the capped acks this
/// socket asks for) stay far below the receive buffer it asks for, or the kernel's default.
pub const MAX_BATCH: usize = 256;

/// Receive buffer asked for (`SO_RCVBUFFORCE`, else `SO_RCVBUF` up to `net.core.rmem_max`).
const RECEIVE_BUFFER: usize = 4 << 20;

/// One change to the IPVS table, as [`crate::IpvsHandle`]'s methods of the same names make it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change<'a> {
    /// [`crate::IpvsHandle::add_service`].
    AddService(&'a Service),
    /// [`crate::IpvsHandle::edit_service`].
    EditService(&'a Service),
    /// [`crate::IpvsHandle::delete_service`].
    DeleteService(&'a ServiceKey),
    /// [`crate::IpvsHandle::add_destination`].
    AddDestination(&'a ServiceKey, &'a Destination),
    /// [`crate::IpvsHandle::edit_destination`].
    EditDestination(&'a ServiceKey, &'a Destination),
    /// [`crate::IpvsHandle::delete_destination`] (the destination's address and port).
    DeleteDestination(&'a ServiceKey, IpAddr, u16),
}

impl<'a> Change<'a> {
    fn request(&self) -> Result<IpvsMessage, IpvsError> {
        match *self {
            Change::AddService(s) => request::add_service(s),
            Change::EditService(s) => request::edit_service(s),
            Change::DeleteService(k) => request::delete_service(k),
            Change::AddDestination(k, d) => request::add_destination(k, d),
            Change::EditDestination(k, d) => request::edit_destination(k, d),
            Change::DeleteDestination(k, a, p) => request::delete_destination(k, a, p),
        }
    }

    fn context(&self) -> ErrCtx<'a> {
        match *self {
            Change::AddService(s) => ErrCtx::AddService(s),
            Change::EditService(s) => ErrCtx::EditService(s),
            Change::DeleteService(k) => ErrCtx::DeleteService(k),
            Change::AddDestination(k, d) => ErrCtx::AddDestination(k, d),
            Change::EditDestination(k, d) => ErrCtx::EditDestination(k, d),
            Change::DeleteDestination(k, a, p) => ErrCtx::DeleteDestination(k, a, p),
        }
    }
}

/// A blocking client for batches of IPVS changes, on a `NETLINK_GENERIC` socket of its own
/// (opened in the network namespace of the thread that calls [`Self::open`]).
#[derive(Debug)]
pub struct IpvsBatch {
    socket: Socket,
    family_id: u16,
    per_send: usize,
    sequence: u32,
    send: Vec<u8>,
    receive: Vec<u8>,
}

impl IpvsBatch {
    /// Opens the socket; `family_id` is the IPVS family's ([`crate::IpvsHandle::family_id`]),
    /// `per_send` the requests per `sendmsg` (1 to [`MAX_BATCH`]).
    pub fn open(family_id: u16, per_send: usize) -> Result<IpvsBatch, IpvsError> {
        let mut socket = Socket::new(NETLINK_GENERIC)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Best effort, as on the async handle: both exist since Linux 4.12/4.3.
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        crate::handle::set_receive_buffer(&socket, RECEIVE_BUFFER);
        Ok(IpvsBatch {
            socket,
            family_id,
            per_send: per_send.clamp(1, MAX_BATCH),
            sequence: 0,
            send: Vec::new(),
            receive: vec![0; 64 << 10],
        })
    }

    /// Applies `changes` in order, [`Self::open`]'s `per_send` per `sendmsg`; returns the
    /// failures, each with its change's position in `changes` (every other change succeeded).
    /// Each change is independent of the others: a failed one (the errors of the
    /// [`crate::IpvsHandle`] method of the same name) does not stop the next. Only one
    /// `sendmsg`'s worth is held at a time. Blocks the calling thread while the kernel applies
    /// them.
    pub fn apply<'c>(
        &mut self,
        changes: impl IntoIterator<Item = Change<'c>>,
    ) -> Vec<(usize, IpvsError)> {
        let mut changes = changes.into_iter();
        let mut chunk = Vec::with_capacity(self.per_send);
        let (mut failures, mut offset) = (Vec::new(), 0);
        loop {
            chunk.clear();
            chunk.extend(changes.by_ref().take(self.per_send));
            if chunk.is_empty() {
                return failures;
            }
            failures.extend(
                self.apply_chunk(&chunk)
                    .into_iter()
                    .enumerate()
                    .filter_map(|(i, r)| r.err().map(|e| (offset + i, e))),
            );
            offset += chunk.len();
        }
    }

    fn apply_chunk(&mut self, changes: &[Change<'_>]) -> Vec<Result<(), IpvsError>> {
        let mut results: Vec<Option<Result<(), IpvsError>>> = Vec::with_capacity(changes.len());
        let mut payloads = Vec::with_capacity(changes.len());
        for (i, c) in changes.iter().enumerate() {
            match c.request().and_then(|m| m.to_genl_bytes()) {
                Ok(p) => {
                    payloads.push((i, p));
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let Some(&(last, _)) = payloads.last() else {
            return results.into_iter().flatten().collect();
        };
        // Sequence numbers of this batch: first + position in `changes`.
        let first = self.sequence.wrapping_add(1);
        self.sequence = self.sequence.wrapping_add(changes.len() as u32);
        self.send.clear();
        for (i, payload) in payloads {
            let mut header = NetlinkHeader::default();
            header.flags = NLM_F_REQUEST | if i == last { NLM_F_ACK } else { 0 };
            header.sequence_number = first.wrapping_add(i as u32);
            let mut msg = NetlinkMessage::new(
                header,
                NetlinkPayload::InnerMessage(RawGenl {
                    message_type: self.family_id,
                    payload,
                }),
            );
            msg.finalize();
            let at = self.send.len();
            // Each message starts 4-byte aligned (NLMSG_ALIGN).
            let len = (msg.buffer_len() + 3) & !3;
            self.send.resize(at + len, 0);
            msg.serialize(&mut self.send[at..at + msg.buffer_len()]);
        }
        let unanswered = |results: &mut Vec<Option<Result<(), IpvsError>>>,
                          why: &dyn Fn() -> IpvsError| {
            for r in results.iter_mut().filter(|r| r.is_none()) {
                *r = Some(Err(why()));
            }
        };
        if let Err(e) = self.socket.send(&self.send, 0) {
            let kind = e.kind();
            let text = e.to_string();
            unanswered(&mut results, &|| {
                IpvsError::Io(std::io::Error::new(
                    kind,
                    format!("sending a batch: {text}"),
                ))
            });
        } else if let Err(e) = self.read_answers(changes, first, last, &mut results) {
            // Which requests the kernel applied is unknown: none is reported as done.
            let text = e.to_string();
            unanswered(&mut results, &|| {
                IpvsError::Connection(format!("reading a batch's answers: {text}"))
            });
        }
        // Requests the kernel did not answer succeeded.
        results.into_iter().map(|r| r.unwrap_or(Ok(()))).collect()
    }

    /// Reads the batch's answers until the last request's: each failure goes into its
    /// change's result.
    fn read_answers(
        &mut self,
        changes: &[Change<'_>],
        first: u32,
        last: usize,
        results: &mut [Option<Result<(), IpvsError>>],
    ) -> std::io::Result<()> {
        loop {
            // Everything is queued before `sendmsg` returns: a read that would wait means an
            // answer was lost (the receive buffer overran).
            let n = match self
                .socket
                .recv(&mut &mut self.receive[..], libc::MSG_DONTWAIT)
            {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        "the answer to the batch's last request is missing",
                    ));
                }
                Err(e) => return Err(e),
            };
            let mut at = 0;
            // One datagram may hold several messages, each NLMSG_ALIGNed.
            while let Some(len) = self
                .receive
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(|b| u32::from_ne_bytes(b) as usize)
                .filter(|&len| len >= 16 && at + len <= n)
            {
                let msg = NetlinkMessage::<RawGenl>::deserialize(&self.receive[at..at + len]);
                at += (len + 3) & !3;
                let Ok(NetlinkMessage {
                    header,
                    payload: NetlinkPayload::Error(e),
                    ..
                }) = msg
                else {
                    continue;
                };
                let index = header.sequence_number.wrapping_sub(first) as usize;
                let Some(change) = changes.get(index) else {
                    continue; // not this batch's
                };
                let result = match e.code {
                    None => Ok(()),
                    Some(code) => Err(change.context().error(
                        code.get().saturating_abs(),
                        error_ext_msg(header.flags, &e.header).as_deref(),
                    )),
                };
                if let Some(slot) = results.get_mut(index) {
                    *slot = Some(result);
                }
                if index == last {
                    return Ok(());
                }
            }
        }
    }
}
