//! The DaemonSet run for real: the image's root filesystem (scripts/image, staged at
//! /lab/image/rootfs) under crun, with OCI configurations generated from
//! manifests/daemonset.yaml by `lab::oci` (containerd's defaults: capabilities = the add list,
//! not privileged, /proc/sys read-only, masked paths; host network, the hostPath mounts, env,
//! args), against the fake API server. The init container runs `kube-ipvs-bpf init`; the agent
//! programs IPVS, source-NATs a NodePort connection without a conntrack entry and answers
//! /healthz; without any capability the selected backends need it stops at start naming it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lab::agent::{Manifests, service_yaml, slice_yaml};
use lab::apiserver::ApiServer;
use lab::netns::Netns;
use lab::oci::{self, PodEnv};
use lab::topology::SnatTopology;
use lab::traffic::{Server, http_get, seen_source, tcp_request};
use lab::{ipvsadm, require_lab};

const DAEMONSET: &str = include_str!("../../manifests/daemonset.yaml");
const CONFIGMAP: &str = include_str!("../../manifests/configmap.yaml");
const AGENT: &str = "kube-ipvs-bpf";
const INIT: &str = "mount-bpf-fs";

/// The configMap volume's files: the ConfigMap's config.yaml with the pod CIDRs set and a
/// kubeconfig for the fake API server (clientConnection.kubeconfig), as an operator would.
fn config_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(format!("/tmp/{name}-config"));
    std::fs::create_dir_all(&dir).unwrap();
    let cm: serde_yaml::Value = serde_yaml::from_str(CONFIGMAP).unwrap();
    let config = cm["data"]["config.yaml"]
        .as_str()
        .expect("config.yaml in the ConfigMap");
    let config = config.replace(
        "clusterCIDR: \"\"",
        &format!("clusterCIDR: \"{}\"", SnatTopology::CLUSTER_CIDRS),
    ) + "clientConnection:\n  kubeconfig: /etc/kube-ipvs-bpf/kubeconfig\n";
    std::fs::write(dir.join("config.yaml"), config).unwrap();
    dir
}

fn pod_env(config: &Path, drop_caps: &[&str], extra_args: &[&str]) -> PodEnv {
    PodEnv {
        rootfs: lab::image_rootfs(),
        entrypoint: vec!["/usr/local/bin/kube-ipvs-bpf".into()],
        node_name: "lab".into(),
        config_map_dirs: [("config".to_owned(), config.to_path_buf())].into(),
        drop_caps: drop_caps.iter().map(|c| c.to_string()).collect(),
        extra_args: extra_args.iter().map(|c| c.to_string()).collect(),
        ..PodEnv::default()
    }
}

/// Writes a bundle for `container` and creates its hostPaths as the kubelet does.
fn bundle(id: &str, container: &str, pod: &PodEnv) -> PathBuf {
    let ds = oci::parse_daemonset(DAEMONSET).unwrap();
    let spec = oci::pod_spec(&ds).unwrap();
    for h in oci::host_paths(spec, container).unwrap() {
        match h.kind.as_str() {
            "DirectoryOrCreate" => std::fs::create_dir_all(&h.path).unwrap(),
            "FileOrCreate" if !h.path.exists() => {
                std::fs::create_dir_all(h.path.parent().unwrap()).unwrap();
                std::fs::write(&h.path, "").unwrap();
            }
            _ => assert!(h.path.exists(), "hostPath {} missing", h.path.display()),
        }
    }
    let config = oci::config(&ds, container, pod).unwrap();
    let dir = PathBuf::from(format!("/tmp/bundle-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    dir
}

/// `crun run` of a bundle in the node's network namespace (host network).
fn crun(ns: &Netns, id: &str, bundle: &Path) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", ns.path()))
        .args([
            "crun",
            "--cgroup-manager=disabled",
            "run",
            "--no-pivot",
            "--bundle",
        ])
        .arg(bundle)
        .arg(id);
    c
}

/// Runs a container to its end (bounded); returns (exit code, stdout + stderr).
fn run_to_end(ns: &Netns, id: &str, bundle: &Path, timeout: Duration) -> (i32, String) {
    let log = bundle.join("out.log");
    let f = std::fs::File::create(&log).unwrap();
    let mut child = crun(ns, id, bundle)
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .stdin(Stdio::null())
        .spawn()
        .expect("crun");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = Command::new("crun").args(["kill", id, "KILL"]).status();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = Command::new("crun").args(["delete", "-f", id]).output();
    (
        status.code().unwrap_or(128),
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

/// A running container, killed and deleted on drop.
struct Running {
    id: String,
    child: Child,
    log: PathBuf,
}

impl Running {
    fn start(ns: &Netns, id: &str, bundle: &Path) -> Running {
        let log = bundle.join("out.log");
        let f = std::fs::File::create(&log).unwrap();
        let child = crun(ns, id, bundle)
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .expect("crun");
        Running {
            id: id.to_owned(),
            child,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("crun")
            .args(["kill", &self.id, "KILL"])
            .output();
        let _ = self.child.wait();
        let _ = Command::new("crun")
            .args(["delete", "-f", &self.id])
            .output();
    }
}

fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn remove_default_pins() {
    let _ = std::fs::remove_dir_all("/sys/fs/bpf/kube-ipvs-bpf");
}

#[test]
fn the_daemonset_under_crun_programs_ipvs_snats_a_nodeport_without_conntrack_and_is_healthy() {
    require_lab();
    let t = SnatTopology::new("ctr");
    t.node_firewall(false);
    let _srv = Server::tcp(&t.remote, "10.244.2.2:8080".parse().unwrap());
    let m = Manifests::new("ctr");
    m.write(
        "svc.yaml",
        &(service_yaml("web", "10.96.0.10", 80, Some(30080))
            + &slice_yaml("web", &["10.244.2.2"], 8080)
                .replace("nodeName: lab", "nodeName: other")),
    );
    let config = config_dir("ctr");
    let kubeconfig = config.join("kubeconfig");
    let _api = ApiServer::start(&t.node, &m, kubeconfig.to_str().expect("UTF-8 path"));

    // The init container: bpffs is already mounted by the guest's init, so it changes nothing.
    let pod = pod_env(&config, &[], &[]);
    let (rc, out) = run_to_end(
        &t.node,
        "ctr-init",
        &bundle("ctr-init", INIT, &pod),
        Duration::from_secs(120),
    );
    assert_eq!(rc, 0, "the init container failed:\n{out}");
    assert!(out.contains("bpffs is already mounted"), "{out}");

    remove_default_pins();
    let agent = Running::start(&t.node, "ctr-agent", &bundle("ctr-agent", AGENT, &pod));
    let vip = "TCP 10.0.1.1:30080";
    eventually("the NodePort in IPVS", Duration::from_secs(300), || {
        ipvsadm::view(|c| t.node.sh(c))
            .iter()
            .any(|s| s.key() == vip && s.destinations.len() == 1)
    });
    eventually("/healthz answers 200", Duration::from_secs(120), || {
        http_get(&t.node, "127.0.0.1:10256", "/healthz")
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
    });

    let before = t.conntrack_count();
    for _ in 0..3 {
        let a = tcp_request(&t.client, "10.0.1.1:30080".parse().unwrap())
            .unwrap_or_else(|e| panic!("NodePort: {e}\nagent log:\n{}", agent.log()));
        assert_eq!(
            seen_source(&a).map(|s| s.ip().to_string()).as_deref(),
            Some("10.0.2.1"),
            "the remote pod must see the node's address: {a}"
        );
    }
    assert_eq!(
        t.conntrack_count(),
        before,
        "NodePort connections were tracked"
    );
    let listed = t.node.sh("conntrack -L 2>/dev/null");
    assert!(
        !listed.contains("dport=30080"),
        "service flows in conntrack:\n{listed}"
    );
    drop(agent);
    remove_default_pins();
}

#[test]
fn the_agent_container_without_a_needed_capability_stops_at_start_naming_it() {
    require_lab();
    let ds = oci::parse_daemonset(DAEMONSET).unwrap();
    let spec = oci::pod_spec(&ds).unwrap();
    let add = oci::container(spec, AGENT)
        .unwrap()
        .security_context
        .clone()
        .unwrap()
        .capabilities
        .unwrap()
        .add
        .unwrap();
    assert!(!add.is_empty());
    let ns = Netns::new("ctr-caps");
    let config = config_dir("ctr-caps");
    for cap in &add {
        // NET_RAW is needed by iptables-legacy only; the image's iptables-restore is nft.
        let extra: &[&str] = if cap == "NET_RAW" {
            &["--iptables-backend", "legacy"]
        } else {
            &[]
        };
        let id = format!("ctr-no-{}", cap.to_lowercase());
        let pod = pod_env(&config, &[cap.as_str()], extra);
        let (rc, out) = run_to_end(
            &ns,
            &id,
            &bundle(&id, AGENT, &pod),
            Duration::from_secs(120),
        );
        assert_ne!(rc, 0, "without {cap} the agent kept running:\n{out}");
        assert!(
            out.contains(&format!("CAP_{cap}")),
            "without {cap}, the error does not name it:\n{out}"
        );
    }
}
