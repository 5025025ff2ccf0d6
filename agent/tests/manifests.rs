//! The deployment manifests (`manifests/`): each parses into its Kubernetes type, the RBAC
//! grants exactly what the agent needs, the DaemonSet has exactly the documented privileges and
//! the mounts, probes and arguments the agent expects, and the ConfigMap's configuration loads.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// The agent container's capabilities, each with why it is needed (the DaemonSet's comment says
/// the same, and why SYS_ADMIN, SYS_RESOURCE and SYS_MODULE are not needed).
const CAPABILITIES: &[(&str, &str)] = &[
    (
        "NET_ADMIN",
        "IPVS genetlink, rtnetlink, iptables restores, nf_tables/ipset netlink, TC filters, net sysctls",
    ),
    ("NET_RAW", "iptables-legacy's raw socket"),
    ("BPF", "bpf(): maps, programs, pins (kernel >= 5.8)"),
    (
        "PERFMON",
        "attaching the IPVS probe (fentry/kprobe) (kernel >= 5.8)",
    ),
];

/// What the agent reads and writes in the API: (API group, resource, verb).
const RBAC: &[(&str, &str, &[&str])] = &[
    ("", "services", &["get", "list", "watch"]),
    ("", "nodes", &["get", "list", "watch"]),
    (
        "discovery.k8s.io",
        "endpointslices",
        &["get", "list", "watch"],
    ),
    ("", "events", &["create", "patch"]),
    ("events.k8s.io", "events", &["create", "patch"]),
];

const NAMESPACE: &str = "kube-system";
const NAME: &str = "kube-ipvs-bpf";

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

fn load<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let p = dir().join(file);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn daemonset() -> DaemonSet {
    load("daemonset.yaml")
}

fn pod(ds: &DaemonSet) -> PodSpec {
    ds.spec.as_ref().unwrap().template.spec.clone().unwrap()
}

fn agent_container(spec: &PodSpec) -> Container {
    spec.containers
        .iter()
        .find(|c| c.name == NAME)
        .cloned()
        .expect("agent container")
}

#[test]
fn kustomization_lists_every_manifest() {
    let k: serde_yaml::Value = load("kustomization.yaml");
    let listed: BTreeSet<String> = k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(listed, on_disk);
    let image = &k["images"][0]["name"];
    for c in pod(&daemonset())
        .containers
        .iter()
        .chain(pod(&daemonset()).init_containers.iter().flatten())
    {
        assert!(
            c.image
                .as_deref()
                .unwrap()
                .starts_with(image.as_str().unwrap()),
            "{} uses another image than the kustomization sets",
            c.name
        );
    }
}

#[test]
fn service_account() {
    let sa: ServiceAccount = load("serviceaccount.yaml");
    assert_eq!(sa.metadata.name.as_deref(), Some(NAME));
    assert_eq!(sa.metadata.namespace.as_deref(), Some(NAMESPACE));
}

#[test]
fn cluster_role_grants_exactly_what_the_agent_needs() {
    let role: ClusterRole = load("clusterrole.yaml");
    assert_eq!(role.metadata.name.as_deref(), Some(NAME));
    assert!(role.aggregation_rule.is_none());
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap() {
        assert!(rule.non_resource_urls.is_none(), "{rule:?}");
        assert!(rule.resource_names.is_none(), "{rule:?}");
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    assert!(!group.contains('*') && !resource.contains('*') && verb != "*");
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let wanted: BTreeSet<(String, String, String)> = RBAC
        .iter()
        .flat_map(|(g, r, verbs)| {
            verbs
                .iter()
                .map(move |v| (g.to_string(), r.to_string(), v.to_string()))
        })
        .collect();
    assert_eq!(granted, wanted);
}

#[test]
fn cluster_role_binding_binds_the_service_account() {
    let b: ClusterRoleBinding = load("clusterrolebinding.yaml");
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert_eq!(b.role_ref.name, NAME);
    let subjects = b.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, NAME);
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    let spec = pod(&daemonset());
    assert_eq!(spec.service_account_name.as_deref(), Some(NAME));
}

#[test]
fn configmap_config_loads() {
    let cm: ConfigMap = load("configmap.yaml");
    assert_eq!(cm.metadata.namespace.as_deref(), Some(NAMESPACE));
    let data = cm.data.unwrap();
    let file = agent::config::parse(&data["config.yaml"]).unwrap_or_else(|e| panic!("{e}"));
    let cfg = agent::config::resolve(Some(&file), &agent::config::Overrides::default()).unwrap();
    assert_eq!(cfg.listeners.healthz.port(), 10256);
    assert_eq!(cfg.state_dir, Path::new("/run/kube-ipvs-bpf"));
    // The probes and the mounts follow the configuration.
    let c = agent_container(&pod(&daemonset()));
    let mounts = c.volume_mounts.unwrap();
    assert!(mounts.iter().any(|m| m.mount_path == "/run/kube-ipvs-bpf"));
    let config_mount = mounts.iter().find(|m| m.name == "config").unwrap();
    let args = c.args.unwrap();
    let config_arg = &args[args.iter().position(|a| a == "--config").unwrap() + 1];
    assert_eq!(
        Path::new(&config_arg),
        Path::new(&config_mount.mount_path).join("config.yaml")
    );
}

#[test]
fn daemonset_shape() {
    let ds = daemonset();
    assert_eq!(ds.metadata.namespace.as_deref(), Some(NAMESPACE));
    let spec = pod(&ds);
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = spec.tolerations.clone().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "{tolerations:?}"
    );
    let c = agent_container(&spec);
    let args = c.args.clone().unwrap();
    assert_eq!(args[..3], ["run", "--source", "kubernetes"]);
    assert!(
        args.windows(2)
            .any(|w| w == ["--config", "/etc/kube-ipvs-bpf/config.yaml"])
    );
    let env = c.env.clone().unwrap();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
}

#[test]
fn daemonset_capabilities_are_exactly_the_documented_ones() {
    let spec = pod(&daemonset());
    let c = agent_container(&spec);
    let sc = c.security_context.unwrap();
    assert_ne!(
        sc.privileged,
        Some(true),
        "the agent container is not privileged"
    );
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop.unwrap(), ["ALL"]);
    let added: BTreeSet<String> = caps.add.unwrap().into_iter().collect();
    let documented: BTreeSet<String> = CAPABILITIES.iter().map(|(c, _)| c.to_string()).collect();
    assert_eq!(added, documented);
    // The DaemonSet's own comment explains each one.
    let text = std::fs::read_to_string(dir().join("daemonset.yaml")).unwrap();
    for (cap, _) in CAPABILITIES {
        assert!(
            text.contains(&format!("#   {cap} ")),
            "{cap} is not explained"
        );
    }
    // The only privileged container is the one that may mount bpffs on the host.
    for init in spec.init_containers.unwrap() {
        let privileged = init.security_context.and_then(|s| s.privileged) == Some(true);
        assert!(
            !privileged || init.name == "mount-bpf-fs",
            "{} is privileged",
            init.name
        );
    }
}

#[test]
fn daemonset_bpffs_outlives_the_pod() {
    let spec = pod(&daemonset());
    let vol = spec
        .volumes
        .clone()
        .unwrap()
        .into_iter()
        .find(|v| {
            v.host_path
                .as_ref()
                .is_some_and(|h| h.path == "/sys/fs/bpf")
        })
        .expect("a hostPath volume of /sys/fs/bpf");
    // The mount made by the init container propagates to the host (Bidirectional, which needs
    // a privileged container); the agent sees the host's bpffs.
    let init = spec
        .init_containers
        .clone()
        .unwrap()
        .into_iter()
        .find(|c| c.name == "mount-bpf-fs")
        .unwrap();
    assert_eq!(init.security_context.unwrap().privileged, Some(true));
    let m = init
        .volume_mounts
        .unwrap()
        .into_iter()
        .find(|m| m.name == vol.name)
        .unwrap();
    assert_eq!(m.mount_path, "/sys/fs/bpf");
    assert_eq!(m.mount_propagation.as_deref(), Some("Bidirectional"));
    let agent = agent_container(&spec)
        .volume_mounts
        .unwrap()
        .into_iter()
        .find(|m| m.name == vol.name)
        .unwrap();
    assert_eq!(agent.mount_path, "/sys/fs/bpf");
    assert_eq!(agent.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_ne!(agent.read_only, Some(true));
}

#[test]
fn daemonset_host_mounts() {
    let spec = pod(&daemonset());
    let volumes = spec.volumes.clone().unwrap();
    let host = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.clone())
            .unwrap_or_else(|| panic!("hostPath volume {name}"))
    };
    assert_eq!(host("host-proc-sys-net").path, "/proc/sys/net");
    assert_eq!(host("state").path, "/run/kube-ipvs-bpf");
    assert_eq!(host("xtables-lock").path, "/run/xtables.lock");
    let c = agent_container(&spec);
    let mounts = c.volume_mounts.clone().unwrap();
    let sysctl = mounts
        .iter()
        .find(|m| m.name == "host-proc-sys-net")
        .unwrap();
    assert_eq!(sysctl.mount_path, "/host/proc/sys/net");
    assert_ne!(sysctl.read_only, Some(true));
    let env = c.env.unwrap();
    let root = env
        .iter()
        .find(|e| e.name == "KUBE_IPVS_BPF_PROC_SYS")
        .and_then(|e| e.value.clone())
        .unwrap();
    assert_eq!(Path::new(&root).join("net"), Path::new(&sysctl.mount_path));
}

#[test]
fn daemonset_probes_use_the_health_port() {
    let c = agent_container(&pod(&daemonset()));
    for (probe, path) in [
        (c.liveness_probe.clone().unwrap(), "/livez"),
        (c.readiness_probe.clone().unwrap(), "/healthz"),
    ] {
        let get = probe.http_get.unwrap();
        assert_eq!(get.port, IntOrString::Int(10256));
        assert_eq!(get.path.as_deref(), Some(path));
    }
}
