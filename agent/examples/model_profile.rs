//! Times the memoized model at scale (native): the first build and single-endpoint changes.

use std::sync::Arc;
use std::time::Instant;

use agent::model::{Changed, LocalAddress, ModelCache, ModelConfig, NodeInfo};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

fn service(i: usize) -> Arc<Service> {
    let ip = format!("10.{}.{}.{}", 96 + i / 62500, (i / 250) % 250, i % 250 + 1);
    Arc::new(serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": format!("s{i}"), "resourceVersion": "1"}, "spec": {"clusterIP": ip, "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]}})).expect("service"))
}

fn slice(i: usize, rv: &str, k: usize) -> Arc<EndpointSlice> {
    let eps: Vec<_> = (0..k).map(|j| json!({"addresses": [format!("10.200.{}.{}", i % 250, j + 1)], "conditions": {"ready": true}})).collect();
    Arc::new(serde_json::from_value(json!({"metadata": {"namespace": "ns", "name": format!("s{i}-1"), "resourceVersion": rv, "labels": {"kubernetes.io/service-name": format!("s{i}")}}, "addressType": "IPv4", "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}], "endpoints": eps})).expect("slice"))
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let services: Vec<_> = (0..n).map(service).collect();
    let mut slices: Vec<_> = (0..n).map(|i| slice(i, "1", 10)).collect();
    let node = NodeInfo {
        name: "n".into(),
        addresses: vec![LocalAddress {
            address: "10.0.0.1".parse().expect("ip"),
            interface: "eth0".into(),
        }],
        ..Default::default()
    };
    let cfg = ModelConfig::default();
    let mut cache = ModelCache::default();
    let t = Instant::now();
    cache.build_shared(services.clone(), slices.clone(), &node, &cfg);
    println!("first build of {n}: {:?}", t.elapsed());
    for round in 0..5 {
        slices[round * 17] = slice(round * 17, "2", 11);
        let t = Instant::now();
        let (d, c) = cache.build_shared(services.clone(), slices.clone(), &node, &cfg);
        let one = matches!(&c, Changed::Keys(k) if k.len() == 1);
        println!(
            "one change: {:?} ({} virtual services, one key changed: {one})",
            t.elapsed(),
            d.virtual_services.len()
        );
    }
}
