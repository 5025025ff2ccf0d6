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
