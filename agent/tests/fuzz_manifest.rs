//! Bounded fuzzing of the file source's manifest parser (`source::file::load_text`, what
//! `load_path` does with each file) and of the model built from what it loads.
//!
//! Inputs: documents generated from the structure of Services, EndpointSlices, Lists and other
//! kinds (valid and invalid field values, wrongly typed fields, missing kinds, names and
//! apiVersions), written as multi-document YAML or concatenated JSON; byte mutations of those
//! and of the example manifests in `manifests/examples`; YAML fragments (anchors, aliases, tags,
//! flow collections, document markers, deep nesting) spliced in.
//!
//! Oracles: nothing panics or hangs (the driver's watchdog); every error names the file; an
//! unmutated generated stream loads exactly the objects it holds and reports exactly one error
//! per invalid object; and the model built from whatever loads satisfies its invariants (sorted
//! and unique virtual services, ports in 1..=65535, destinations of the service's family with
//! weight 1, known schedulers, affinity timeouts in 1..=86400, source ranges only on load
//! balancers and of their family, the same service and bound address sets, sorted rejections),
//! builds the same twice, and a `ModelCache` carried over from the previous input builds the
//! same as a fresh build.
//!
//! `FUZZ_SECONDS` bounds the run (default 2 s; `scripts/test` sets it), `FUZZ_SEED` replays one.

#[path = "../../tests/fuzz_driver.rs"]
mod fuzz_driver;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use agent::model::{
    self, DesiredState, KNOWN_SCHEDULERS, LocalAddress, ModelCache, ModelConfig, NodeInfo,
    NodePortAddresses, VirtualServiceKind,
};
use agent::source::file::{LoadedObjects, load_path, load_text};
use fuzz_driver::Rng;
use serde_json::{Value, json};

/// What an unmutated generated stream must load.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Expected {
    services: usize,
    slices: usize,
    errors: usize,
}

const IPS: &[&str] = &[
    "10.96.0.10",
    "10.96.0.11",
    "10.244.1.2",
    "10.244.1.3",
    "192.168.1.10",
    "203.0.113.7",
    "fd00:96::10",
    "fd00:244::2",
    "2001:db8::10",
    "::ffff:10.96.0.12",
    "010.096.000.013",
    "0.0.0.0",
    "::",
    "255.255.255.255",
    "None",
    "",
    "10.96.0",
    "not-an-ip",
    "1.2.3.4/24",
];

const NAMES: &[&str] = &["web", "dns", "sticky", "a", "x-y.z", "", "kube-dns", "web"];
const NAMESPACES: &[&str] = &["default", "demo", "", "kube-system"];

fn pick_str(rng: &mut Rng, items: &[&str]) -> Value {
    Value::String((*rng.pick(items)).to_owned())
}

fn ip(rng: &mut Rng) -> Value {
    pick_str(rng, IPS)
}

fn port_number(rng: &mut Rng) -> i64 {
    *rng.pick(&[
        0,
        1,
        53,
        80,
        443,
        8080,
        30080,
        65535,
        65536,
        -1,
        2_147_483_647,
    ])
}

/// A field set to a value of the wrong type for its typed field: deserialising the object fails.
fn wrongly_typed(rng: &mut Rng, obj: &mut Value) -> bool {
    match rng.below(3) {
        0 => {
            obj["metadata"]["labels"] = json!(["not", "a", "map"]);
            true
        }
        1 => {
            obj["metadata"]["annotations"] = json!(7);
            true
        }
        _ => {
            if obj.get("spec").is_some() {
                obj["spec"]["ports"] = json!({"port": 80});
            } else {
                obj["endpoints"] = json!("everywhere");
            }
            true
        }
    }
}

fn metadata(rng: &mut Rng, service_name: Option<&str>) -> Value {
    let mut m = serde_json::Map::new();
    if !rng.chance(1, 20) {
        m.insert("name".into(), pick_str(rng, NAMES));
    }
    if rng.chance(3, 4) {
        m.insert("namespace".into(), pick_str(rng, NAMESPACES));
    }
    let mut labels = serde_json::Map::new();
    if let Some(svc) = service_name {
        labels.insert(
            "kubernetes.io/service-name".into(),
            Value::String(svc.to_owned()),
        );
    }
    if rng.chance(1, 8) {
        labels.insert(
            model::SERVICE_PROXY_NAME_LABEL.into(),
            pick_str(rng, &["kube-ipvs-bpf", "other", ""]),
        );
    }
    if !labels.is_empty() {
        m.insert("labels".into(), Value::Object(labels));
    }
    if rng.chance(1, 4) {
        m.insert(
            "annotations".into(),
            json!({ model::SCHEDULER_ANNOTATION: *rng.pick(&["rr", "wlc", "mh", "bogus", ""]) }),
        );
    }
    Value::Object(m)
}

fn service(rng: &mut Rng) -> Value {
    let mut spec = serde_json::Map::new();
    if rng.chance(4, 5) {
        spec.insert(
            "type".into(),
            pick_str(
                rng,
                &[
                    "ClusterIP",
                    "NodePort",
                    "LoadBalancer",
                    "ExternalName",
                    "Bogus",
                    "",
                ],
            ),
        );
    }
    if rng.chance(4, 5) {
        spec.insert("clusterIP".into(), ip(rng));
    }
    if rng.chance(1, 2) {
        let ips: Vec<Value> = (0..rng.range(0, 3)).map(|_| ip(rng)).collect();
        spec.insert("clusterIPs".into(), Value::Array(ips));
    }
    let ports: Vec<Value> = (0..rng.range(0, 4))
        .map(|_| {
            let mut p = serde_json::Map::new();
            if rng.chance(3, 4) {
                p.insert(
                    "name".into(),
                    pick_str(rng, &["http", "dns", "", "https", "http"]),
                );
            }
            if rng.chance(4, 5) {
                p.insert(
                    "protocol".into(),
                    pick_str(rng, &["TCP", "UDP", "SCTP", "ICMP", "tcp", ""]),
                );
            }
            p.insert("port".into(), json!(port_number(rng)));
            if rng.chance(1, 2) {
                p.insert(
                    "targetPort".into(),
                    if rng.chance(1, 2) {
                        json!(port_number(rng))
                    } else {
                        json!("http")
                    },
                );
            }
            if rng.chance(1, 3) {
                p.insert("nodePort".into(), json!(port_number(rng)));
            }
            Value::Object(p)
        })
        .collect();
    spec.insert("ports".into(), Value::Array(ports));
    if rng.chance(1, 4) {
        let ips: Vec<Value> = (0..rng.range(0, 3)).map(|_| ip(rng)).collect();
        spec.insert("externalIPs".into(), Value::Array(ips));
    }
    for (field, values) in [
        (
            "externalTrafficPolicy",
            &["Cluster", "Local", "Bogus", ""][..],
        ),
        ("internalTrafficPolicy", &["Cluster", "Local", "Bogus"][..]),
        ("sessionAffinity", &["None", "ClientIP", "Bogus"][..]),
    ] {
        if rng.chance(1, 4) {
            spec.insert(field.into(), pick_str(rng, values));
        }
    }
    if rng.chance(1, 4) {
        let t: i64 = *rng.pick(&[0, 1, 600, 86_400, 86_401, -5]);
        spec.insert(
            "sessionAffinityConfig".into(),
            json!({"clientIP": {"timeoutSeconds": t}}),
        );
    }
    if rng.chance(1, 4) {
        let ranges: Vec<Value> = (0..rng.range(0, 3))
            .map(|_| {
                pick_str(
                    rng,
                    &[
                        "198.51.100.0/24",
                        " 10.0.0.0/8 ",
                        "2001:db8::/64",
                        "10.1.2.3/33",
                        "x",
                        "10.1.2.3",
                    ],
                )
            })
            .collect();
        spec.insert("loadBalancerSourceRanges".into(), Value::Array(ranges));
    }
    if rng.chance(1, 6) {
        spec.insert("healthCheckNodePort".into(), json!(port_number(rng)));
    }
    let mut svc = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(rng, None),
        "spec": Value::Object(spec),
    });
    if rng.chance(1, 4) {
        let ingress: Vec<Value> = (0..rng.range(0, 3))
            .map(|_| {
                let mut i = serde_json::Map::new();
                if rng.chance(4, 5) {
                    i.insert("ip".into(), ip(rng));
                }
                if rng.chance(1, 3) {
                    i.insert("ipMode".into(), pick_str(rng, &["VIP", "Proxy", "Bogus"]));
                }
                if rng.chance(1, 5) {
                    i.insert("hostname".into(), json!("lb.example"));
                }
                Value::Object(i)
            })
            .collect();
        svc["status"] = json!({"loadBalancer": {"ingress": ingress}});
    }
    svc
}

fn endpoint_slice(rng: &mut Rng) -> Value {
    let svc = *rng.pick(NAMES);
    let v6 = rng.chance(1, 3);
    let endpoints: Vec<Value> = (0..rng.range(0, 4))
        .map(|_| {
            let addresses: Vec<Value> = (0..rng.range(0, 3)).map(|_| ip(rng)).collect();
            let mut e = json!({ "addresses": addresses });
            if rng.chance(3, 4) {
                let mut c = serde_json::Map::new();
                for k in ["ready", "serving", "terminating"] {
                    if rng.chance(1, 2) {
                        c.insert(k.into(), json!(rng.chance(1, 2)));
                    }
                }
                e["conditions"] = Value::Object(c);
            }
            if rng.chance(1, 2) {
                e["nodeName"] = pick_str(rng, &["node-a", "node-b", ""]);
            }
            if rng.chance(1, 4) {
                e["zone"] = pick_str(rng, &["zone-a", "zone-b"]);
                e["hints"] = json!({"forZones": [{"name": *rng.pick(&["zone-a", "zone-b"])}]});
            }
            e
        })
        .collect();
    let ports: Vec<Value> = (0..rng.range(0, 3))
        .map(|_| {
            let mut p = serde_json::Map::new();
            if rng.chance(3, 4) {
                p.insert("name".into(), pick_str(rng, &["http", "dns", ""]));
            }
            if rng.chance(3, 4) {
                p.insert(
                    "protocol".into(),
                    pick_str(rng, &["TCP", "UDP", "SCTP", "Bogus"]),
                );
            }
            if rng.chance(4, 5) {
                p.insert("port".into(), json!(port_number(rng)));
            }
            Value::Object(p)
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": metadata(rng, Some(svc)),
        "addressType": if v6 { "IPv6" } else { *rng.pick(&["IPv4", "IPv4", "FQDN"]) },
        "endpoints": endpoints,
        "ports": ports,
    })
}

/// One object (possibly a List of objects) and what loading it must give.
fn object(rng: &mut Rng, depth: u32) -> (Value, Expected) {
    let mut expected = Expected::default();
    let choice = rng.below(20);
    if choice < 2 && depth < 2 {
        let mut items = Vec::new();
        for _ in 0..rng.range(0, 3) {
            let (item, e) = object(rng, depth + 1);
            items.push(item);
            expected.services += e.services;
            expected.slices += e.slices;
            expected.errors += e.errors;
        }
        let kind = *rng.pick(&["List", "ServiceList", "EndpointSliceList"]);
        return (
            json!({"apiVersion": "v1", "kind": kind, "items": items}),
            expected,
        );
    }
    if choice == 2 {
        let kind = *rng.pick(&["ConfigMap", "Node", "Pod", "Endpoints"]);
        return (
            json!({"apiVersion": "v1", "kind": kind, "metadata": {"name": "other"}}),
            expected,
        );
    }
    if choice == 3 {
        expected.errors = 1;
        return (
            json!({"apiVersion": "v1", "metadata": {"name": "kindless"}}),
            expected,
        );
    }
    let is_service = choice < 12;
    let mut obj = if is_service {
        service(rng)
    } else {
        endpoint_slice(rng)
    };
    let mut fails = false;
    if rng.chance(1, 12) {
        obj["apiVersion"] = pick_str(rng, &["v2", "", "discovery.k8s.io/v1beta1", "apps/v1"]);
        fails = true;
    }
    let has_name = obj["metadata"]
        .get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    fails |= !has_name;
    if rng.chance(1, 12) {
        fails |= wrongly_typed(rng, &mut obj);
    }
    if fails {
        expected.errors = 1;
    } else if is_service {
        expected.services = 1;
    } else {
        expected.slices = 1;
    }
    (obj, expected)
}

/// A stream of documents as YAML (`---`-separated) or JSON (concatenated) text.
fn stream(rng: &mut Rng, json: bool) -> (String, Expected) {
    let mut text = String::new();
    let mut expected = Expected::default();
    if !json && rng.chance(1, 4) {
        text.push_str("# generated\n");
    }
    for i in 0..rng.range(0, 5) {
        let (obj, e) = object(rng, 0);
        expected.services += e.services;
        expected.slices += e.slices;
        expected.errors += e.errors;
        if json {
            let piece = if rng.chance(1, 2) {
                serde_json::to_string_pretty(&obj)
            } else {
                serde_json::to_string(&obj)
            };
            text.push_str(&piece.expect("json"));
            text.push('\n');
        } else {
            if i > 0 || rng.chance(1, 2) {
                text.push_str("---\n");
            }
            text.push_str(&serde_yaml::to_string(&obj).expect("yaml"));
            if rng.chance(1, 8) {
                text.push_str("...\n");
            }
        }
    }
    (text, expected)
}

/// YAML and JSON tokens worth splicing into text.
const FRAGMENTS: &[&str] = &[
    "---\n",
    "--- ",
    "...\n",
    "%YAML 1.2\n",
    "&a ",
    "*a",
    "<<: *a\n",
    "!!str ",
    "!tag ",
    "{",
    "}",
    "[",
    "]",
    ": ",
    "- ",
    "\n  ",
    "\t",
    "\"",
    "'",
    "|\n",
    ">-\n",
    "? ",
    "kind: List\nitems:\n",
    "kind: Service\n",
    "apiVersion: v1\n",
    "null",
    "~",
    "1e999",
    "0x1F",
    "\u{feff}",
    "\u{0}",
    "é",
];

fn mutate_text(rng: &mut Rng, text: &str, donor: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    for _ in 0..rng.range(1, 3) {
        if rng.chance(1, 2) {
            let frag = rng.pick(FRAGMENTS).as_bytes();
            let at = rng.below(bytes.len() + 1);
            bytes.splice(at..at, frag.iter().copied());
        } else {
            fuzz_driver::mutate(rng, &mut bytes, 64 * 1024, Some(donor.as_bytes()));
        }
    }
    if rng.chance(1, 40) {
        // Deep nesting.
        let depth = rng.range(10, 400);
        let open = if rng.chance(1, 2) { "[" } else { "{a: " };
        let at = rng.below(bytes.len() + 1);
        let nest = open.repeat(depth);
        bytes.splice(at..at, nest.bytes());
    }
    bytes
}

fn node() -> NodeInfo {
    let addr = |a: &str, i: &str| LocalAddress {
        address: a.parse().expect("ip"),
        interface: i.to_owned(),
    };
    NodeInfo {
        name: "node-a".into(),
        addresses: vec![
            addr("127.0.0.1", "lo"),
            addr("192.168.1.10", "eth0"),
            addr("2001:db8::10", "eth0"),
            addr("fe80::1", "eth0"),
            addr("203.0.113.7", "eth1"),
            addr("10.96.0.10", model::DUMMY_INTERFACE),
        ],
        internal_ips: vec!["192.168.1.10".parse().expect("ip")],
        zone: Some("zone-a".into()),
        labels: BTreeMap::new(),
    }
}

fn config(rng: &mut Rng) -> ModelConfig {
    let cidrs = [
        "10.244.0.0/16",
        "fd00:244::/32",
        "0.0.0.0/0",
        "192.168.0.0/16",
    ];
    let mut cfg = ModelConfig {
        masquerade_all: rng.chance(1, 4),
        ..ModelConfig::default()
    };
    for c in cidrs.iter().take(rng.range(0, 2)) {
        cfg.cluster_cidrs.push(c.parse().expect("cidr"));
    }
    cfg.node_port_addresses = match rng.below(3) {
        0 => NodePortAddresses::AllLocal,
        1 => NodePortAddresses::Primary,
        _ => NodePortAddresses::Cidrs(vec![rng.pick(&cidrs).parse().expect("cidr")]),
    };
    if rng.chance(1, 4) {
        cfg.proxy_name = Some("kube-ipvs-bpf".into());
        cfg.only_labelled_services = rng.chance(1, 2);
    }
    cfg.default_scheduler = (*rng.pick(&["rr", "wlc"])).to_owned();
    cfg
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// The model's invariants (see the module doc).
fn check_state(state: &DesiredState) {
    let vss: Vec<_> = state.virtual_services.iter().collect();
    for pair in vss.windows(2) {
        let key = |v: &model::VirtualService| (v.address, v.protocol, v.port);
        assert!(
            key(pair[0]) < key(pair[1]),
            "virtual services not sorted/unique: {} / {}",
            pair[0],
            pair[1]
        );
    }
    for vs in vss {
        assert_ne!(vs.port, 0, "port 0: {vs}");
        assert!(
            KNOWN_SCHEDULERS.contains(&vs.scheduler.as_str()),
            "scheduler: {vs}"
        );
        if let Some(t) = vs.persistence_timeout {
            assert!((1..=86_400).contains(&t), "affinity timeout: {vs}");
        }
        if !vs.source_ranges.is_empty() {
            assert_eq!(
                vs.kind,
                VirtualServiceKind::LoadBalancer,
                "source ranges: {vs}"
            );
        }
        for r in &vs.source_ranges {
            assert!(
                same_family(r.addr(), vs.address),
                "source range family: {vs}"
            );
        }
        for d in &vs.destinations {
            assert_ne!(d.port, 0, "destination port 0: {vs}");
            assert_eq!(d.weight, 1, "weight: {vs}");
            assert!(
                same_family(d.address, vs.address),
                "destination family: {vs}"
            );
        }
        for pair in vs.destinations.windows(2) {
            assert!(
                (pair[0].address, pair[0].port) < (pair[1].address, pair[1].port),
                "destinations not sorted/unique: {vs}"
            );
        }
        if vs.kind == VirtualServiceKind::ClusterIp {
            assert!(
                state.service_addresses.contains(&vs.address),
                "ClusterIP not a service address: {vs}"
            );
        }
    }
    assert_eq!(state.bound_addresses, state.service_addresses);
    assert!(
        state.rejected.windows(2).all(|p| p[0] <= p[1]),
        "rejections not sorted"
    );
    for h in &state.health_check_node_ports {
        assert_ne!(h.port, 0);
    }
}

fn check_loaded(loaded: &LoadedObjects, path: &Path) {
    for e in &loaded.errors {
        assert_eq!(e.file, path, "error names another file: {e}");
        assert!(!e.message.is_empty());
    }
}

#[test]
fn fuzz_manifest_parser_bounded() {
    let examples_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
    let mut examples: Vec<String> = Vec::new();
    for f in [
        "services.yaml",
        "endpointslices.yaml",
        "scaled/endpointslices.yaml",
    ] {
        examples.push(std::fs::read_to_string(examples_dir.join(f)).expect("example manifest"));
    }
    let node = node();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cache = ModelCache::default();
    let mut cfg = ModelConfig::default();
    let mut previous: Vec<u8> = Vec::new();

    fuzz_driver::run("manifest-parser", 2.0, |rng, n| {
        if n % 64 == 0 {
            cfg = config(rng);
        }
        let json = rng.chance(1, 4);
        let path = PathBuf::from(if json { "fuzz.json" } else { "fuzz.yaml" });
        let (text, expected, mutated) = match rng.below(4) {
            0 => {
                let base = rng.pick(&examples).clone();
                let donor = rng.pick(&examples).clone();
                (base.clone(), None, Some(mutate_text(rng, &base, &donor)))
            }
            1 => {
                let (text, _) = stream(rng, json);
                let donor = rng.pick(&examples).clone();
                let m = mutate_text(rng, &text, &donor);
                (text, None, Some(m))
            }
            _ => {
                let (text, e) = stream(rng, json);
                (text, Some(e), None)
            }
        };
        let input = mutated.unwrap_or_else(|| text.into_bytes());
        let through_file = rng.chance(1, 50);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let (path_used, loaded) = if through_file {
                let file = tmp.path().join(&path);
                std::fs::write(&file, &input).expect("write");
                (file.clone(), load_path(&file))
            } else {
                let text = String::from_utf8_lossy(&input);
                (path.clone(), load_text(&path, &text))
            };
            check_loaded(&loaded, &path_used);
            if let Some(e) = expected {
                let got = Expected {
                    services: loaded.services.len(),
                    slices: loaded.endpoint_slices.len(),
                    errors: loaded.errors.len(),
                };
                assert_eq!(
                    got, e,
                    "loaded objects of an unmutated stream; errors: {:?}",
                    loaded.errors
                );
            }
            let (services, slices) = (&loaded.services, &loaded.endpoint_slices);
            let state = model::build(services, slices, &node, &cfg);
            check_state(&state);
            assert_eq!(
                model::build(services, slices, &node, &cfg),
                state,
                "a second build differs"
            );
            let (cached, _) = cache.build(services, slices, &node, &cfg);
            assert_eq!(
                cached, state,
                "the model cache (carried over) differs from a fresh build"
            );
        }));
        if let Err(panic) = outcome {
            eprintln!(
                "fuzz manifest-parser: execution {n} failed on {} ({} bytes): {}\n  \
                 (the model cache last built from {})",
                path.display(),
                input.len(),
                fuzz_driver::show(&input),
                fuzz_driver::show(&previous),
            );
            std::panic::resume_unwind(panic);
        }
        previous = input;
    });
}
