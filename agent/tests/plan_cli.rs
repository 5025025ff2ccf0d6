//! `kube-ipvs-bpf plan --output json` is a contract other tools read: the fields the issue
//! lists, with their types, for the sample Services. On a machine without IPVS (this host) it
//! prints the desired state and says so in `warnings`.

use std::process::Command;

use serde_json::Value;

#[test]
fn plan_json_holds_the_documented_fields() {
    let out = Command::new(env!("CARGO_BIN_EXE_kube-ipvs-bpf"))
        .args(["plan", "--source"])
        .arg(format!(
            "file:{}/../manifests/examples",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args([
            "--node-name",
            "lab",
            "--node-ip",
            "10.0.1.1",
            "--output",
            "json",
        ])
        .output()
        .expect("run kube-ipvs-bpf plan");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: Value = serde_json::from_slice(&out.stdout).expect("plan prints JSON");
    let vss = plan["virtual_services"]
        .as_array()
        .expect("virtual_services");
    assert!(!vss.is_empty());
    for vs in vss {
        assert!(
            vs["service"].as_str().is_some_and(|s| s.contains('/')),
            "{vs}"
        );
        assert!(
            ["TCP", "UDP", "SCTP"].contains(&vs["protocol"].as_str().unwrap_or("")),
            "{vs}"
        );
        assert!(
            vs["address"]
                .as_str()
                .is_some_and(|a| a.parse::<std::net::IpAddr>().is_ok()),
            "{vs}"
        );
        assert!(
            vs["port"]
                .as_u64()
                .is_some_and(|p| (1..=65535).contains(&p)),
            "{vs}"
        );
        assert!(vs["scheduler"].is_string(), "{vs}");
        assert!(
            vs["persistence_timeout"].is_null() || vs["persistence_timeout"].is_u64(),
            "{vs}"
        );
        assert!(vs["snat"].is_boolean(), "{vs}");
        // Spelled as Kubernetes spells them.
        assert!(
            ["ClusterIP", "NodePort", "LoadBalancer", "ExternalIP"]
                .contains(&vs["kind"].as_str().unwrap_or("")),
            "{vs}"
        );
        for d in vs["destinations"].as_array().expect("destinations") {
            assert!(
                d["address"].is_string() && d["port"].is_u64() && d["weight"].is_u64(),
                "{d}"
            );
        }
    }
    let web = vss
        .iter()
        .find(|v| v["address"] == "10.96.0.10" && v["port"] == 80)
        .expect("demo/web's ClusterIP");
    assert_eq!(web["service"], "demo/web");
    assert_eq!(web["kind"], "ClusterIP");
    assert_eq!(web["snat"], false);
    assert_eq!(web["destinations"].as_array().map(Vec::len), Some(2));
    let sticky = vss
        .iter()
        .find(|v| v["address"] == "10.96.0.11")
        .expect("demo/sticky");
    assert_eq!(sticky["persistence_timeout"], 600);
    assert_eq!(sticky["scheduler"], "wlc");
    let nodeport = vss.iter().find(|v| v["port"] == 30080).expect("a NodePort");
    assert_eq!(nodeport["snat"], true);
}

/// Special addresses (metadata-service, loopback, unspecified, multicast) given as external
/// IPs, LB ingress IPs or cluster IPs: `plan` lists each as a rejection, in JSON and in text,
/// and programs none of them.
#[test]
fn plan_prints_special_address_rejections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("special.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1
kind: Service
metadata: {name: ext, namespace: t}
spec: {clusterIP: 10.96.0.50, externalIPs: [169.254.169.254, 198.51.100.7], ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: t}
spec: {type: LoadBalancer, clusterIP: 10.96.0.51, ports: [{port: 80, nodePort: 30051}]}
status: {loadBalancer: {ingress: [{ip: 0.0.0.0}, {ip: 224.0.0.251}]}}
---
apiVersion: v1
kind: Service
metadata: {name: loop, namespace: t}
spec: {clusterIP: 127.0.0.1, ports: [{port: 80}]}
",
    )
    .expect("write");
    let run = |output: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_kube-ipvs-bpf"))
            .args(["plan", "--source"])
            .arg(format!("file:{}", file.display()))
            .args(["--node-name", "lab", "--node-ip", "10.0.1.1"])
            .args(["--output", output])
            .output()
            .expect("run kube-ipvs-bpf plan");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    };
    let want = [
        (
            "Service t/ext",
            "external IP 169.254.169.254 is a link-local address; not programmed",
        ),
        (
            "Service t/lb",
            "load balancer ingress IP 0.0.0.0 is an unspecified address; not programmed",
        ),
        (
            "Service t/lb",
            "load balancer ingress IP 224.0.0.251 is a multicast address; not programmed",
        ),
        (
            "Service t/loop",
            "cluster IP 127.0.0.1 is a loopback address",
        ),
    ];
    let plan: Value = serde_json::from_str(&run("json")).expect("plan prints JSON");
    let rejected: Vec<(String, String)> = plan["rejected"]
        .as_array()
        .expect("rejected")
        .iter()
        .map(|r| {
            (
                r["object"].as_str().unwrap_or("").to_owned(),
                r["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        rejected,
        want.iter()
            .map(|(o, r)| (o.to_string(), r.to_string()))
            .collect::<Vec<_>>()
    );
    let addresses: Vec<&str> = plan["virtual_services"]
        .as_array()
        .expect("virtual_services")
        .iter()
        .filter_map(|v| v["address"].as_str())
        .collect();
    for special in ["169.254.169.254", "0.0.0.0", "224.0.0.251", "127.0.0.1"] {
        assert!(!addresses.contains(&special), "{special} in {addresses:?}");
    }
    // The rest of those Services is programmed.
    for good in ["10.96.0.50", "198.51.100.7", "10.96.0.51"] {
        assert!(addresses.contains(&good), "{good} not in {addresses:?}");
    }
    let text = run("text");
    for (object, reason) in want {
        let line = format!("# rejected {object}: {reason}");
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
}
