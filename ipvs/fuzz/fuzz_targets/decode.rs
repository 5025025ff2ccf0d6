//! Feeds arbitrary bytes to the IPVS message decoder and the typed
//! conversions, both as a generic-netlink payload and as a whole netlink
//! datagram. Anything that decodes must re-encode and decode again without
//! panicking.
#![no_main]

use ipvs::{Family, IpvsCmdAttr, IpvsMessage, convert};
use libfuzzer_sys::fuzz_target;
use netlink_packet_core::NetlinkMessage;
use netlink_packet_generic::GenlMessage;

fn typed(msg: &IpvsMessage) {
    let _ = convert::service_from_message(msg);
    let _ = convert::destination_from_message(msg, Family::Inet);
    let _ = convert::destination_from_message(msg, Family::Inet6);
    let _ = convert::info_from_message(msg);
    let _ = convert::timeouts_from_message(msg);
    for a in &msg.nlas {
        match a {
            IpvsCmdAttr::Service(v) => {
                let _ = convert::service_from_attrs(v);
            }
            IpvsCmdAttr::Dest(v) => {
                let _ = convert::destination_from_attrs(v, Family::Inet);
            }
            _ => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = IpvsMessage::from_genl_bytes(data) {
        typed(&msg);
        if let Ok(bytes) = msg.to_genl_bytes() {
            let again = IpvsMessage::from_genl_bytes(&bytes).expect("re-encoded message decodes");
            typed(&again);
        }
    }
    if let Ok(nl) = NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(data) {
        if let netlink_packet_core::NetlinkPayload::InnerMessage(g) = nl.payload {
            typed(&g.payload);
        }
    }
});
