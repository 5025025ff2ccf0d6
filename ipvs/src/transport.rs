//! What travels through `netlink-proto`, and how a request's replies are
//! gathered.
//!
//! The connection carries [`RawGenl`]: the netlink message type plus the
//! undecoded generic-netlink payload. Decoding into [`crate::IpvsMessage`]
//! happens afterwards, in the handle. This matters because `netlink-proto`'s
//! codec silently drops any message whose inner payload fails to decode: a
//! malformed dump entry would vanish (or a lost terminator would hang the
//! request). Raw payloads never fail there, so every defect surfaces as
//! [`crate::IpvsError::Decode`].

use std::convert::Infallible;

use futures::{Stream, StreamExt};
use netlink_packet_core::{
    NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_DUMP_INTR, NetlinkDeserializable, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NetlinkSerializable, NlasIterator,
};

use crate::attr::parse_cstring;

/// `NLMSGERR_ATTR_MSG`: extended-ack error string.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// Size of `struct nlmsghdr`.
const NLMSG_HDRLEN: usize = 16;

/// A netlink message kept as bytes: its type (the genl family id) and the
/// generic-netlink payload (genl header + attributes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawGenl {
    pub message_type: u16,
    pub payload: Vec<u8>,
}

impl NetlinkSerializable for RawGenl {
    fn message_type(&self) -> u16 {
        self.message_type
    }

    fn buffer_len(&self) -> usize {
        self.payload.len()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        buffer[..self.payload.len()].copy_from_slice(&self.payload);
    }
}

impl NetlinkDeserializable for RawGenl {
    type Error = Infallible;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, Infallible> {
        Ok(Self {
            message_type: header.message_type,
            payload: payload.to_vec(),
        })
    }
}

/// Why a request did not produce replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The kernel answered with an error (positive errno) and maybe an
    /// extended-ack message.
    Errno { errno: i32, ext: Option<String> },
    /// The reply stream ended without `NLMSG_DONE` or an ack.
    Closed,
    /// The socket's receive buffer overflowed (`ENOBUFS`).
    Overrun,
    /// A dump was marked `NLM_F_DUMP_INTR`.
    DumpInterrupted,
    /// The request timed out.
    TimedOut,
    /// `netlink-proto` refused the request.
    Connection(String),
}

/// Reads one request's replies until its terminator: an ack or error
/// (`NLMSG_ERROR`) for doit requests, `NLMSG_DONE` for dumps.
pub(crate) async fn collect<S>(mut stream: S) -> Result<Vec<RawGenl>, Failure>
where
    S: Stream<Item = NetlinkMessage<RawGenl>> + Unpin,
{
    let mut out = Vec::new();
    let mut interrupted = false;
    while let Some(msg) = stream.next().await {
        let flags = msg.header.flags;
        match msg.payload {
            NetlinkPayload::InnerMessage(raw) => {
                interrupted |= flags & NLM_F_DUMP_INTR != 0;
                out.push(raw);
            }
            NetlinkPayload::Error(e) => {
                return match e.code {
                    None => finish(out, interrupted),
                    Some(code) => Err(Failure::Errno {
                        errno: code.get().saturating_abs(),
                        ext: error_ext_msg(flags, &e.header),
                    }),
                };
            }
            NetlinkPayload::Done(d) => {
                if d.code != 0 {
                    return Err(Failure::Errno {
                        errno: d.code.saturating_abs(),
                        ext: if flags & NLM_F_ACK_TLVS != 0 {
                            tlv_msg(&d.extended_ack)
                        } else {
                            None
                        },
                    });
                }
                return finish(out, interrupted);
            }
            NetlinkPayload::Overrun(_) => return Err(Failure::Overrun),
            _ => {}
        }
    }
    Err(Failure::Closed)
}

fn finish(out: Vec<RawGenl>, interrupted: bool) -> Result<Vec<RawGenl>, Failure> {
    if interrupted {
        Err(Failure::DumpInterrupted)
    } else {
        Ok(out)
    }
}

/// The extended-ack message of an `NLMSG_ERROR`. `rest` is everything after
/// the errno: the echoed request header (whole request unless
/// `NLM_F_CAPPED`), then the TLVs if `NLM_F_ACK_TLVS`.
pub(crate) fn error_ext_msg(flags: u16, rest: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let offset = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        let len = u32::from_ne_bytes(rest.get(..4)?.try_into().ok()?);
        usize::try_from(len).ok()?.checked_add(3)? & !3
    };
    tlv_msg(rest.get(offset..)?)
}

/// `NLMSGERR_ATTR_MSG` among extended-ack TLVs.
pub(crate) fn tlv_msg(tlvs: &[u8]) -> Option<String> {
    for nla in NlasIterator::new(tlvs) {
        let nla = nla.ok()?;
        if nla.kind() == NLMSGERR_ATTR_MSG {
            return parse_cstring(nla.value(), "NLMSGERR_ATTR_MSG").ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use futures::stream;
    use netlink_packet_core::{DoneMessage, ErrorMessage, NLM_F_MULTIPART};
    use proptest::prelude::*;
    use std::num::NonZeroI32;

    fn inner(flags: u16, payload: Vec<u8>) -> NetlinkMessage<RawGenl> {
        let mut m = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(RawGenl {
                message_type: 0x20,
                payload,
            }),
        );
        m.header.flags = flags;
        m
    }

    fn error(code: i32, flags: u16, header: Vec<u8>) -> NetlinkMessage<RawGenl> {
        let mut e = ErrorMessage::default();
        e.code = NonZeroI32::new(code);
        e.header = header;
        let mut m = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::Error(e));
        m.header.flags = flags;
        m
    }

    fn done(code: i32) -> NetlinkMessage<RawGenl> {
        let mut d = DoneMessage::default();
        d.code = code;
        NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::Done(d))
    }

    fn run(msgs: Vec<NetlinkMessage<RawGenl>>) -> Result<Vec<RawGenl>, Failure> {
        block_on(collect(stream::iter(msgs)))
    }

    #[test]
    fn multipart_dump_until_done() {
        let r = run(vec![
            inner(NLM_F_MULTIPART, vec![1]),
            inner(NLM_F_MULTIPART, vec![2]),
            done(0),
            inner(0, vec![3]),
        ]);
        let r = r.unwrap_or_default();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].payload, vec![2]);
    }

    #[test]
    fn empty_dump() {
        assert_eq!(run(vec![done(0)]), Ok(vec![]));
    }

    #[test]
    fn doit_reply_then_ack() {
        let r = run(vec![inner(0, vec![9]), error(0, 0, vec![])]);
        assert_eq!(r.map(|v| v.len()), Ok(1));
    }

    #[test]
    fn nack_is_errno() {
        assert_eq!(
            run(vec![error(-libc::ESRCH, 0, vec![0; 16])]),
            Err(Failure::Errno {
                errno: libc::ESRCH,
                ext: None
            })
        );
    }

    #[test]
    fn done_with_error_code() {
        assert_eq!(
            run(vec![inner(NLM_F_MULTIPART, vec![1]), done(-libc::EBUSY)]),
            Err(Failure::Errno {
                errno: libc::EBUSY,
                ext: None
            })
        );
    }

    #[test]
    fn missing_terminator_is_closed() {
        assert_eq!(
            run(vec![inner(NLM_F_MULTIPART, vec![1])]),
            Err(Failure::Closed)
        );
        assert_eq!(run(vec![]), Err(Failure::Closed));
    }

    #[test]
    fn overrun_and_interrupted_dump() {
        let mut o = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::Overrun(vec![]));
        o.header.flags = 0;
        assert_eq!(run(vec![o]), Err(Failure::Overrun));
        assert_eq!(
            run(vec![
                inner(NLM_F_MULTIPART | NLM_F_DUMP_INTR, vec![1]),
                done(0)
            ]),
            Err(Failure::DumpInterrupted)
        );
    }

    fn msg_tlv(s: &str) -> Vec<u8> {
        let len = 4 + s.len() + 1;
        let mut v = Vec::new();
        v.extend_from_slice(&(len as u16).to_ne_bytes());
        v.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    #[test]
    fn ext_ack_capped() {
        let mut rest = vec![0u8; 16];
        rest.extend(msg_tlv("bad scheduler"));
        let r = run(vec![error(
            -libc::EINVAL,
            NLM_F_ACK_TLVS | NLM_F_CAPPED,
            rest,
        )]);
        assert_eq!(
            r,
            Err(Failure::Errno {
                errno: libc::EINVAL,
                ext: Some("bad scheduler".into())
            })
        );
    }

    #[test]
    fn ext_ack_uncapped_skips_echoed_request() {
        // Echoed request: nlmsghdr with length 22 (16 + 6 bytes payload),
        // padded to 24.
        let mut rest = vec![0u8; 24];
        rest[..4].copy_from_slice(&22u32.to_ne_bytes());
        rest.extend(msg_tlv("x"));
        assert_eq!(error_ext_msg(NLM_F_ACK_TLVS, &rest), Some("x".into()));
        // Without the TLV flag nothing is parsed.
        assert_eq!(error_ext_msg(0, &rest), None);
        // A bogus echoed length never panics.
        let mut bad = vec![0xffu8; 8];
        bad.extend(msg_tlv("y"));
        assert_eq!(error_ext_msg(NLM_F_ACK_TLVS, &bad), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn ext_ack_parsers_never_panic(flags in any::<u16>(), bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = error_ext_msg(flags, &bytes);
            let _ = tlv_msg(&bytes);
        }

        #[test]
        fn collect_never_panics(
            kinds in proptest::collection::vec((0u8..5, any::<u16>(), any::<i32>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..8)
        ) {
            let msgs = kinds.into_iter().map(|(k, flags, code, bytes)| match k {
                0 => inner(flags, bytes),
                1 => error(code, flags, bytes),
                2 => {
                    let mut d = DoneMessage::default();
                    d.code = code;
                    d.extended_ack = bytes;
                    let mut m = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::Done(d));
                    m.header.flags = flags;
                    m
                }
                3 => NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::Noop),
                _ => NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::Overrun(bytes)),
            }).collect::<Vec<_>>();
            let _ = run(msgs);
        }
    }
}
