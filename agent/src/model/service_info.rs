//! [`ServiceInfo`]: a Service as the agent keeps it, reduced when it arrives to the fields the
//! model, the metrics and the Events read (kube-proxy's `BaseServicePortInfo` likewise keeps
//! what it proxies, not the object).
//!
//! The sources hold one per Service for as long as it exists: a `k8s_openapi` `Service` is
//! ~800 bytes before any string, this one ~200. What is dropped is what nothing reads:
//! `managedFields`, other labels and annotations, `selector`, `targetPort`s, `ipFamilies`,
//! status conditions. Two infos are equal when everything kept is, so a change to a dropped
//! field alone is no change.

use k8s_openapi::api::core::v1::{Service, ServicePort as K8sServicePort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::object_key;
use super::{SCHEDULER_ANNOTATION, SERVICE_PROXY_NAME_LABEL};

/// A Service reduced to what the agent reads (see the module documentation). Text fields are
/// as written: the model validates them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// `metadata.namespace`, "default" when unset or empty.
    pub namespace: Box<str>,
    pub name: Box<str>,
    /// `metadata.uid` (the Events about the Service name it).
    pub uid: Option<Box<str>>,
    /// `metadata.creationTimestamp` (the older Service wins an address both claim).
    pub created: Option<Time>,
    /// The [`SERVICE_PROXY_NAME_LABEL`] label.
    pub proxy_name: Option<Box<str>>,
    /// The [`SCHEDULER_ANNOTATION`] annotation.
    pub scheduler: Option<Box<str>>,
    /// `spec.type`.
    pub type_: Option<Box<str>>,
    pub cluster_ip: Option<Box<str>>,
    /// `spec.clusterIPs` (`None`: unset).
    pub cluster_ips: Option<Box<[Box<str>]>>,
    pub external_ips: Box<[Box<str>]>,
    pub load_balancer_source_ranges: Box<[Box<str>]>,
    pub ports: Box<[ServicePortInfo]>,
    pub external_traffic_policy: Option<Box<str>>,
    pub internal_traffic_policy: Option<Box<str>>,
    pub session_affinity: Option<Box<str>>,
    /// `spec.sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout: Option<i32>,
    pub health_check_node_port: Option<i32>,
    /// `status.loadBalancer.ingress[]`: (`ip`, `ipMode`), hostname-only entries left out.
    pub load_balancer_ingress: Box<[LoadBalancerIngressInfo]>,
}

/// One of `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub name: Option<Box<str>>,
    pub protocol: Option<Box<str>>,
    pub port: i32,
    pub node_port: Option<i32>,
}

/// One of `status.loadBalancer.ingress` with an `ip`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadBalancerIngressInfo {
    pub ip: Box<str>,
    pub ip_mode: Option<Box<str>>,
}

fn boxed_list(v: Option<Vec<String>>) -> Box<[Box<str>]> {
    v.into_iter()
        .flatten()
        .map(String::into_boxed_str)
        .collect()
}

impl From<K8sServicePort> for ServicePortInfo {
    fn from(p: K8sServicePort) -> Self {
        ServicePortInfo {
            name: p.name.map(String::into_boxed_str),
            protocol: p.protocol.map(String::into_boxed_str),
            port: p.port,
            node_port: p.node_port,
        }
    }
}

impl From<Service> for ServiceInfo {
    fn from(svc: Service) -> Self {
        let meta = svc.metadata;
        let (namespace, name) = object_key(&meta);
        let (namespace, name): (Box<str>, Box<str>) = (namespace.into(), name.into());
        let spec = svc.spec.unwrap_or_default();
        let load_balancer_ingress = svc
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .into_iter()
            .flatten()
            .filter_map(|i| {
                Some(LoadBalancerIngressInfo {
                    ip: Box::<str>::from(i.ip.filter(|ip| !ip.is_empty())?),
                    ip_mode: i.ip_mode.map(String::into_boxed_str),
                })
            })
            .collect();
        ServiceInfo {
            namespace,
            name,
            uid: meta.uid.map(String::into_boxed_str),
            created: meta.creation_timestamp,
            proxy_name: meta
                .labels
                .and_then(|mut l| l.remove(SERVICE_PROXY_NAME_LABEL))
                .map(String::into_boxed_str),
            scheduler: meta
                .annotations
                .and_then(|mut a| a.remove(SCHEDULER_ANNOTATION))
                .map(String::into_boxed_str),
            type_: spec.type_.map(String::into_boxed_str),
            cluster_ip: spec.cluster_ip.map(String::into_boxed_str),
            cluster_ips: spec
                .cluster_ips
                .map(|v| v.into_iter().map(String::into_boxed_str).collect()),
            external_ips: boxed_list(spec.external_ips),
            load_balancer_source_ranges: boxed_list(spec.load_balancer_source_ranges),
            ports: spec
                .ports
                .into_iter()
                .flatten()
                .map(ServicePortInfo::from)
                .collect(),
            external_traffic_policy: spec.external_traffic_policy.map(String::into_boxed_str),
            internal_traffic_policy: spec.internal_traffic_policy.map(String::into_boxed_str),
            session_affinity: spec.session_affinity.map(String::into_boxed_str),
            affinity_timeout: spec
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds),
            health_check_node_port: spec.health_check_node_port,
            load_balancer_ingress,
        }
    }
}

impl From<&Service> for ServiceInfo {
    fn from(svc: &Service) -> Self {
        svc.clone().into()
    }
}

impl ServiceInfo {
    /// (namespace, name).
    pub fn key(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(v: serde_json::Value) -> Service {
        serde_json::from_value(v).expect("service")
    }

    #[test]
    fn keeps_what_the_model_reads_and_drops_the_rest() {
        let info = ServiceInfo::from(service(serde_json::json!({
            "metadata": {"name": "web", "uid": "u1", "resourceVersion": "4",
                         "creationTimestamp": "2026-01-01T00:00:00Z",
                         "labels": {"service.kubernetes.io/service-proxy-name": "p", "app": "x"},
                         "annotations": {"kube-ipvs-bpf.io/scheduler": "wlc", "other": "y"},
                         "managedFields": [{"manager": "m"}]},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                     "externalIPs": ["192.0.2.1"], "loadBalancerSourceRanges": ["10.0.0.0/8"],
                     "selector": {"app": "x"}, "ipFamilies": ["IPv4"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080,
                                "nodePort": 30080}],
                     "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Cluster",
                     "sessionAffinity": "ClientIP",
                     "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}},
                     "healthCheckNodePort": 32000},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.1", "ipMode": "Proxy"},
                                                    {"hostname": "lb.example"}]}}
        })));
        assert_eq!(info.key(), ("default", "web"));
        assert_eq!(info.uid.as_deref(), Some("u1"));
        assert!(info.created.is_some());
        assert_eq!(info.proxy_name.as_deref(), Some("p"));
        assert_eq!(info.scheduler.as_deref(), Some("wlc"));
        assert_eq!(info.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(info.cluster_ip.as_deref(), Some("10.96.0.1"));
        assert_eq!(info.cluster_ips.as_deref().map(<[_]>::len), Some(1));
        assert_eq!(&*info.external_ips, [Box::from("192.0.2.1")]);
        assert_eq!(
            &*info.load_balancer_source_ranges,
            [Box::from("10.0.0.0/8")]
        );
        assert_eq!(
            &*info.ports,
            [ServicePortInfo {
                name: Some("http".into()),
                protocol: Some("TCP".into()),
                port: 80,
                node_port: Some(30080)
            }]
        );
        assert_eq!(info.external_traffic_policy.as_deref(), Some("Local"));
        assert_eq!(info.internal_traffic_policy.as_deref(), Some("Cluster"));
        assert_eq!(info.session_affinity.as_deref(), Some("ClientIP"));
        assert_eq!(info.affinity_timeout, Some(60));
        assert_eq!(info.health_check_node_port, Some(32000));
        assert_eq!(
            &*info.load_balancer_ingress,
            [LoadBalancerIngressInfo {
                ip: "203.0.113.1".into(),
                ip_mode: Some("Proxy".into())
            }]
        );
    }

    #[test]
    fn a_change_to_a_dropped_field_alone_is_no_change() {
        let with = |rv: &str, selector: &str| {
            ServiceInfo::from(service(serde_json::json!({
                "metadata": {"namespace": "a", "name": "s", "resourceVersion": rv},
                "spec": {"clusterIP": "10.96.0.1", "selector": {"app": selector},
                         "ports": [{"port": 80, "targetPort": selector}]}
            })))
        };
        assert_eq!(with("1", "x"), with("2", "y"));
    }
}
