//! [`EndpointSliceInfo`]: an EndpointSlice as the agent keeps it, reduced when it arrives to the
//! fields the model and the metrics read (kube-proxy's `endpointSliceInfo` likewise keeps a
//! slice's ports and endpoints, not the object).
//!
//! The sources hold one per slice for as long as it exists, so its size is the agent's memory:
//! a `k8s_openapi` `Endpoint` is ~370 bytes on the heap before any string, this one ~56. What is
//! dropped is what nothing reads: `managedFields`, other labels and annotations, `zone`,
//! `targetRef`, `hostname`, `deprecatedTopology`, the addresses after the first (kube-proxy
//! uses the first), `appProtocol`. Two infos are equal when everything kept is, so a change to
//! a dropped field alone is no change.

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};

use super::object_key;
use super::validate::parse_ip;
use super::{SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL};

/// Label the EndpointSlice controller puts on slices of headless Services.
pub(crate) const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// The EndpointSlice controller's annotation with the time of the change that made it write
/// the slice (RFC 3339): the start of `kubeproxy_network_programming_duration_seconds`.
pub const LAST_CHANGE_TRIGGER_TIME_ANNOTATION: &str =
    "endpoints.kubernetes.io/last-change-trigger-time";

/// An EndpointSlice reduced to what the agent reads (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointSliceInfo {
    /// `metadata.namespace`, "default" when unset or empty.
    pub namespace: Box<str>,
    pub name: Box<str>,
    /// The [`SERVICE_NAME_LABEL`] label: the Service the slice belongs to.
    pub service_name: Option<Box<str>>,
    /// The [`SERVICE_PROXY_NAME_LABEL`] label.
    pub proxy_name: Option<Box<str>>,
    /// Labelled [`HEADLESS_LABEL`].
    pub headless: bool,
    /// [`LAST_CHANGE_TRIGGER_TIME_ANNOTATION`], as written.
    pub last_change_trigger_time: Option<Box<str>>,
    /// `addressType`: "IPv4", "IPv6", "FQDN" or something the model rejects.
    pub address_type: Box<str>,
    pub ports: Box<[SlicePort]>,
    pub endpoints: Box<[SliceEndpoint]>,
}

/// One of `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Option<Box<str>>,
    pub protocol: Option<Box<str>>,
    pub port: Option<i32>,
}

/// One of `endpoints`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// The first of `addresses`; `None` without one.
    pub address: Option<SliceAddress>,
    /// `conditions.ready`, `serving` and `terminating` as written (`None`: unset).
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<Box<str>>,
    /// `hints`, when it names a zone or a node (rare: boxed).
    pub hints: Option<Box<SliceHints>>,
}

/// An endpoint's first address: parsed as kube-proxy parses it, or as written when it is not
/// an address (the model reports it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SliceAddress {
    Ip(IpAddr),
    Invalid(Box<str>),
}

/// `hints.forZones[].name` and `hints.forNodes[].name`, each sorted and de-duplicated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceHints {
    pub zones: Box<[Box<str>]>,
    pub nodes: Box<[Box<str>]>,
}

fn sorted_names(names: impl Iterator<Item = String>) -> Box<[Box<str>]> {
    let mut v: Vec<Box<str>> = names.map(String::into_boxed_str).collect();
    v.sort();
    v.dedup();
    v.into_boxed_slice()
}

impl From<EndpointPort> for SlicePort {
    fn from(p: EndpointPort) -> Self {
        SlicePort {
            name: p.name.map(String::into_boxed_str),
            protocol: p.protocol.map(String::into_boxed_str),
            port: p.port,
        }
    }
}

impl From<Endpoint> for SliceEndpoint {
    fn from(ep: Endpoint) -> Self {
        let address = ep.addresses.into_iter().next().map(|a| match parse_ip(&a) {
            Some(ip) => SliceAddress::Ip(ip),
            None => SliceAddress::Invalid(a.into()),
        });
        let cond = ep.conditions.unwrap_or_default();
        let hints = ep.hints.and_then(|h| {
            let zones = sorted_names(h.for_zones.into_iter().flatten().map(|z| z.name));
            let nodes = sorted_names(h.for_nodes.into_iter().flatten().map(|n| n.name));
            (!zones.is_empty() || !nodes.is_empty()).then(|| Box::new(SliceHints { zones, nodes }))
        });
        SliceEndpoint {
            address,
            ready: cond.ready,
            serving: cond.serving,
            terminating: cond.terminating,
            node_name: ep.node_name.map(String::into_boxed_str),
            hints,
        }
    }
}

impl From<EndpointSlice> for EndpointSliceInfo {
    fn from(s: EndpointSlice) -> Self {
        let meta = s.metadata;
        let (namespace, name) = object_key(&meta);
        let (namespace, name): (Box<str>, Box<str>) = (namespace.into(), name.into());
        let mut labels = meta.labels.unwrap_or_default();
        let headless = labels.contains_key(HEADLESS_LABEL);
        EndpointSliceInfo {
            namespace,
            name,
            service_name: labels
                .remove(SERVICE_NAME_LABEL)
                .map(String::into_boxed_str),
            proxy_name: labels
                .remove(SERVICE_PROXY_NAME_LABEL)
                .map(String::into_boxed_str),
            headless,
            last_change_trigger_time: meta
                .annotations
                .and_then(|mut a| a.remove(LAST_CHANGE_TRIGGER_TIME_ANNOTATION))
                .map(String::into_boxed_str),
            address_type: s.address_type.into(),
            ports: s.ports.into_iter().flatten().map(SlicePort::from).collect(),
            endpoints: s
                .endpoints
                .into_iter()
                .flatten()
                .map(SliceEndpoint::from)
                .collect(),
        }
    }
}

impl From<&EndpointSlice> for EndpointSliceInfo {
    fn from(s: &EndpointSlice) -> Self {
        s.clone().into()
    }
}

impl EndpointSliceInfo {
    /// (namespace, name).
    pub fn key(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }

    /// The (namespace, name) of the Service it belongs to; `None` without the
    /// [`SERVICE_NAME_LABEL`] label (or with an empty one).
    pub fn service(&self) -> Option<(&str, &str)> {
        self.service_name
            .as_deref()
            .filter(|n| !n.is_empty())
            .map(|n| (&*self.namespace, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).expect("slice")
    }

    #[test]
    fn keeps_what_the_model_reads_and_drops_the_rest() {
        let s = slice(serde_json::json!({
            "metadata": {"name": "web-1", "resourceVersion": "7",
                         "labels": {"kubernetes.io/service-name": "web", "app": "x",
                                    "service.kubernetes.io/service-proxy-name": "p"},
                         "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-01-01T00:00:00Z",
                                         "other": "y"},
                         "managedFields": [{"manager": "m"}]},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
            "endpoints": [
                {"addresses": ["10.0.0.1", "10.0.0.9"], "conditions": {"ready": false, "terminating": true},
                 "nodeName": "n1", "zone": "z", "targetRef": {"kind": "Pod", "name": "p"},
                 "hints": {"forZones": [{"name": "b"}, {"name": "a"}, {"name": "b"}]}},
                {"addresses": ["not-an-ip"]},
                {"addresses": []}
            ]
        }));
        let info = EndpointSliceInfo::from(s);
        assert_eq!(info.key(), ("default", "web-1"));
        assert_eq!(info.service(), Some(("default", "web")));
        assert_eq!(info.proxy_name.as_deref(), Some("p"));
        assert!(!info.headless);
        assert_eq!(
            info.last_change_trigger_time.as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
        assert_eq!(
            &*info.ports,
            [SlicePort {
                name: Some("http".into()),
                protocol: Some("TCP".into()),
                port: Some(8080)
            }]
        );
        let e = &info.endpoints;
        assert_eq!(
            e[0],
            SliceEndpoint {
                address: Some(SliceAddress::Ip("10.0.0.1".parse().expect("ip"))),
                ready: Some(false),
                serving: None,
                terminating: Some(true),
                node_name: Some("n1".into()),
                hints: Some(Box::new(SliceHints {
                    zones: vec!["a".into(), "b".into()].into(),
                    nodes: Box::default(),
                })),
            }
        );
        assert_eq!(
            e[1].address,
            Some(SliceAddress::Invalid("not-an-ip".into()))
        );
        assert_eq!(e[2].address, None);
    }

    #[test]
    fn a_change_to_a_dropped_field_alone_is_no_change() {
        let with = |rv: &str, zone: &str| {
            EndpointSliceInfo::from(slice(serde_json::json!({
                "metadata": {"namespace": "a", "name": "s", "resourceVersion": rv,
                             "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.0.0.1"], "zone": zone}]
            })))
        };
        assert_eq!(with("1", "z1"), with("2", "z2"));
    }
}
