//! Times one endpoint change at scale, per phase, on the host (issue 17): N Services × M
//! endpoints (default 10,000 × 10) are built once, then single endpoint changes are applied one
//! at a time and each phase of the agent's path is timed: the source publishing its snapshot,
//! the model, and the plans of the datapath maps, kube-ipvs0's addresses and IPVS (the sync
//! loop's order, against a kernel view that holds the first build). Prints p50/p99 per phase in
//! µs, host wall clock (`Instant`, CLOCK_MONOTONIC). A benchmark: it asserts nothing about
//! time. Run `cargo run --release -p agent --example change_profile [SERVICES] [CHANGES]`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::model::{
    Changed, DesiredState, EndpointSliceInfo, LocalAddress, ModelCache, ModelConfig, NodeInfo,
    Objects, ServiceInfo,
};
use agent::reconcile::datapath::{self as maps_rec, MapOp, ObservedMaps};
use agent::reconcile::ipvs as ipvs_rec;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

fn service(i: usize) -> ServiceInfo {
    let ip = format!("10.{}.{}.{}", 96 + i / 62500, (i / 250) % 250, i % 250 + 1);
    serde_json::from_value::<Service>(json!({
        "metadata": {"namespace": "ns", "name": format!("s{i}"), "resourceVersion": "1"},
        "spec": {"clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "p", "port": 80, "protocol": "TCP"}]}
    }))
    .expect("service")
    .into()
}

fn slice(i: usize, rv: usize, endpoints: usize) -> EndpointSliceInfo {
    let eps: Vec<_> = (0..endpoints)
        .map(|j| {
            let n = i * 16 + j;
            let ip = format!("10.{}.{}.{}", 128 + n / 62500, (n / 250) % 250, n % 250 + 1);
            json!({"addresses": [ip], "conditions": {"ready": true}})
        })
        .collect();
    serde_json::from_value::<EndpointSlice>(json!({
        "metadata": {"namespace": "ns", "name": format!("s{i}-1"), "resourceVersion": rv.to_string(),
                     "labels": {"kubernetes.io/service-name": format!("s{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps
    }))
    .expect("slice")
    .into()
}

/// The source's store and what publishing a change costs (as the Kubernetes source's
/// `Stores::snapshot` does it: its maps, shared, into the snapshot).
struct Store {
    services: Objects<ServiceInfo>,
    slices: Objects<EndpointSliceInfo>,
}

type Published = (Objects<ServiceInfo>, Objects<EndpointSliceInfo>);

impl Store {
    fn publish(&self) -> Published {
        (self.services.clone(), self.slices.clone())
    }
}

/// What the kernel holds after the first build was applied.
fn observed_maps(plan: &maps_rec::MapPlan) -> ObservedMaps {
    let mut o = ObservedMaps::default();
    for op in &plan.additions {
        match op {
            MapOp::PutPort(k, v) => {
                o.max_id = o.max_id.max(v.svc_id);
                o.svc_ports.insert(*k, *v);
            }
            MapOp::PutAddr(k, v) => {
                o.svc_addrs.insert(*k, *v);
            }
            MapOp::PutRange(k) => {
                o.src_ranges.insert(*k);
            }
            MapOp::PutCidr(k) => {
                o.cluster_cidrs.insert(*k);
            }
            _ => {}
        }
    }
    o
}

fn observed_ipvs(want: &ipvs_rec::DesiredIpvs) -> ipvs_rec::ObservedIpvs {
    want.iter()
        .map(|(k, d)| {
            let dests = d
                .destinations
                .iter()
                .map(|(&(a, p), &w)| {
                    let mut dest = ipvs::Destination::new(a, p);
                    dest.weight = w;
                    ((a, p), ipvs_rec::ObservedDest::from(&dest))
                })
                .collect();
            (*k, (d.service.clone(), dests))
        })
        .collect()
}

/// This process's resident set (VmRSS), in MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Per-change durations of each phase.
#[derive(Default)]
struct Phases(BTreeMap<&'static str, Vec<Duration>>);

impl Phases {
    fn time<T>(&mut self, name: &'static str, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.0.entry(name).or_default().push(t.elapsed());
        out
    }
}

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>().ok());
    let n = args.next().flatten().unwrap_or(10_000);
    let changes = args.next().flatten().unwrap_or(500);
    let endpoints = 10;
    let mut store = Store {
        services: (0..n).map(|i| Arc::new(service(i))).collect(),
        slices: (0..n).map(|i| Arc::new(slice(i, 1, endpoints))).collect(),
    };
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
    let (services, slices) = store.publish();
    let (first, _) = cache.build_objects(&services, &slices, &node, &cfg);
    let first_build = t.elapsed();
    let rss_first = rss_mib();
    let maps = observed_maps(&maps_rec::plan(
        &maps_rec::desired(&first, &[]),
        &ObservedMaps::default(),
        None,
    ));
    let observed = observed_ipvs(&ipvs_rec::desired(
        first.virtual_services.iter().map(|v| &**v),
    ));
    let ownership = ipvs_rec::Ownership {
        bound: (*first.bound_addresses).clone(),
        node_addresses: node.addresses.iter().map(|a| a.address).collect(),
        node_port_range: 30000..=32767,
        exclude: Vec::new(),
        recorded: BTreeSet::new(),
    };
    let mut drains = ipvs_rec::Drains::default();
    let bound: BTreeSet<IpAddr> = (*first.bound_addresses).clone();
    let virtual_services = first.virtual_services.len();
    let mut last_addresses = [
        first.service_addresses.clone(),
        first.node_port_addresses.clone(),
    ];
    drop(first);

    let mut phases = Phases::default();
    let mut ops = 0usize;
    for c in 0..changes {
        // One endpoint more or less on one Service, as a watch event brings it.
        let i = (c * 7919) % n;
        let k = endpoints + (c % 2);
        let changed = Arc::new(slice(i, c + 2, k));
        let total = Instant::now();
        let (services, slices) = phases.time("publish", || {
            store.slices.insert(changed);
            store.publish()
        });
        let (desired, changed): (DesiredState, Changed) = phases.time("model", || {
            cache.build_objects(&services, &slices, &node, &cfg)
        });
        let Changed::Keys(keys) = &changed else {
            panic!("a single change rebuilt everything")
        };
        let map_plan = phases.time("maps_plan", || {
            let vss = keys.iter().filter_map(|k| desired.find(k)).map(|v| &**v);
            let same = Arc::ptr_eq(&last_addresses[0], &desired.service_addresses)
                && Arc::ptr_eq(&last_addresses[1], &desired.node_port_addresses);
            let want = if same {
                maps_rec::desired_ports_only(vss)
            } else {
                maps_rec::desired_of(vss, &desired, &[])
            };
            let scope: HashSet<_> = keys
                .iter()
                .map(|&k| probes::maps::SvcKey::from(k))
                .collect();
            maps_rec::plan(&want, &maps, Some(&scope))
        });
        last_addresses = [
            desired.service_addresses.clone(),
            desired.node_port_addresses.clone(),
        ];
        let addresses: Vec<IpAddr> = phases.time("addresses_plan", || {
            keys.iter()
                .map(|k| k.address)
                .filter(|a| desired.bound_addresses.contains(a) != bound.contains(a))
                .collect()
        });
        let ipvs_ops = phases.time("ipvs_plan", || {
            let scope: BTreeSet<ipvs::ServiceKey> = keys.iter().map(|k| k.ipvs_key()).collect();
            let want = ipvs_rec::desired(keys.iter().filter_map(|k| desired.find(k)).map(|v| &**v));
            let ctx = ipvs_rec::PlanContext {
                observed: &observed,
                ownership: &ownership,
                drain_timeout: Duration::from_secs(60),
                now: Instant::now(),
                scope: Some(&scope),
            };
            ipvs_rec::plan(&want, &ctx, &mut drains)
        });
        phases.time("drop", || drop(desired));
        phases.0.entry("total").or_default().push(total.elapsed());
        ops += ipvs_ops.len() + map_plan.additions.len() + addresses.len();
    }
    println!(
        "{n} Services x {endpoints} endpoints ({virtual_services} virtual services): first build {:.1} ms; {changes} single endpoint changes ({ops} operations planned)",
        first_build.as_secs_f64() * 1e3
    );
    println!(
        "RSS: {rss_first:.1} MiB after the first build, {:.1} MiB after the changes",
        rss_mib()
    );
    println!("per change, µs (host wall clock, Instant):");
    println!("{:<16} {:>10} {:>10} {:>10}", "phase", "p50", "p99", "max");
    for (name, mut d) in phases.0 {
        d.sort();
        let at = |q: f64| d[((d.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e6;
        println!(
            "{name:<16} {:>10.1} {:>10.1} {:>10.1}",
            at(0.5),
            at(0.99),
            at(1.0)
        );
    }
}
