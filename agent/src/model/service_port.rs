//! [`ServicePort`]: a virtual service's address, protocol and port, the one key the model, the
//! IPVS reconciler and the datapath reconciler share; and every conversion of the model's
//! [`Protocol`] and of a service port to and from the `ipvs` and `probes` types.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use probes::maps::{L4Proto, SvcKey};

use super::{Protocol, VirtualService};

/// A service port: address, protocol, port. Ordered by address, then protocol, then port (the
/// order of the model's virtual services).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePort {
    pub address: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

impl ServicePort {
    pub fn new(address: IpAddr, protocol: Protocol, port: u16) -> Self {
        ServicePort {
            address,
            protocol,
            port,
        }
    }

    /// The service port of a virtual service.
    pub fn of(vs: &VirtualService) -> Self {
        ServicePort::new(vs.address, vs.protocol, vs.port)
    }

    /// The IPVS virtual service key.
    pub fn ipvs_key(self) -> ipvs::ServiceKey {
        ipvs::ServiceKey::Tuple {
            protocol: self.protocol.into(),
            address: self.address,
            port: self.port,
        }
    }
}

/// `10.96.0.10:53/UDP` (`[fd00::10]:53/UDP`).
impl fmt::Display for ServicePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.address, self.port),
            self.protocol.as_str()
        )
    }
}

impl From<ServicePort> for SvcKey {
    fn from(p: ServicePort) -> SvcKey {
        SvcKey::new(p.address, p.port, p.protocol.into())
    }
}

impl From<Protocol> for ipvs::Protocol {
    fn from(p: Protocol) -> ipvs::Protocol {
        match p {
            Protocol::Tcp => ipvs::Protocol::Tcp,
            Protocol::Udp => ipvs::Protocol::Udp,
            Protocol::Sctp => ipvs::Protocol::Sctp,
        }
    }
}

/// The model's protocol of an IPVS one (the agent only programs TCP, UDP and SCTP).
impl TryFrom<ipvs::Protocol> for Protocol {
    type Error = ipvs::Protocol;

    fn try_from(p: ipvs::Protocol) -> Result<Protocol, ipvs::Protocol> {
        match p {
            ipvs::Protocol::Tcp => Ok(Protocol::Tcp),
            ipvs::Protocol::Udp => Ok(Protocol::Udp),
            ipvs::Protocol::Sctp => Ok(Protocol::Sctp),
            other => Err(other),
        }
    }
}

impl From<Protocol> for L4Proto {
    fn from(p: Protocol) -> L4Proto {
        match p {
            Protocol::Tcp => L4Proto::Tcp,
            Protocol::Udp => L4Proto::Udp,
            Protocol::Sctp => L4Proto::Sctp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_convert_both_ways_and_other_ipvs_protocols_are_refused() {
        for p in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            assert_eq!(Protocol::try_from(ipvs::Protocol::from(p)), Ok(p));
            assert_eq!(
                L4Proto::from(p).number(),
                ipvs::Protocol::from(p).number() as u8
            );
        }
        assert_eq!(
            Protocol::try_from(ipvs::Protocol::Other(50)),
            Err(ipvs::Protocol::Other(50))
        );
    }

    #[test]
    fn a_service_port_keys_ipvs_and_the_datapath_alike() {
        let p = ServicePort::new("10.96.0.10".parse().unwrap(), Protocol::Udp, 53);
        assert_eq!(p.to_string(), "10.96.0.10:53/UDP");
        assert_eq!(
            SvcKey::from(p),
            SvcKey::new("10.96.0.10".parse().unwrap(), 53, L4Proto::Udp)
        );
        assert_eq!(
            p.ipvs_key(),
            ipvs::ServiceKey::Tuple {
                protocol: ipvs::Protocol::Udp,
                address: "10.96.0.10".parse().unwrap(),
                port: 53
            }
        );
    }
}
