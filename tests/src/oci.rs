//! An OCI runtime `config.json` generated from a container of the DaemonSet's pod spec
//! (manifests/daemonset.yaml, read as a Kubernetes object), the way containerd's CRI plugin
//! builds one: its defaults (mounts, masked and read-only paths, namespaces) plus what the pod
//! spec says (image entrypoint + args with `$(VAR)` expanded, env, capabilities = the add list
//! only unless privileged, host network, the volume mounts with their propagation). What a
//! kubelet supplies from outside the spec (a configMap's files, the node name, optional
//! configMap keys) comes from [`PodEnv`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use serde_json::{Value, json};

/// containerd's default masked paths (`oci.defaultUnixMaskedPaths`).
pub const MASKED_PATHS: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];
/// containerd's default read-only paths.
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];
/// Every capability (privileged containers), as runtimes list them.
pub const ALL_CAPS: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// What the kubelet provides besides the spec.
#[derive(Clone, Debug, Default)]
pub struct PodEnv {
    /// The image's unpacked root filesystem.
    pub rootfs: PathBuf,
    /// The image's ENTRYPOINT (used when the container has no `command`).
    pub entrypoint: Vec<String>,
    /// `spec.nodeName`.
    pub node_name: String,
    /// A directory holding each configMap volume's files, by volume name.
    pub config_map_dirs: BTreeMap<String, PathBuf>,
    /// configMap keys for `configMapKeyRef` env, by (configMap, key); missing optional keys
    /// leave the variable unset.
    pub config_map_keys: BTreeMap<(String, String), String>,
    /// Capabilities removed from the add list (the negative tests).
    pub drop_caps: Vec<String>,
    /// Arguments appended after the spec's.
    pub extra_args: Vec<String>,
}

/// A hostPath volume the kubelet prepares before starting the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPath {
    pub path: PathBuf,
    /// `Directory`, `DirectoryOrCreate`, `FileOrCreate`, … (empty: none).
    pub kind: String,
}

/// The DaemonSet in `yaml` (one document).
pub fn parse_daemonset(yaml: &str) -> anyhow::Result<DaemonSet> {
    serde_yaml::from_str(yaml).context("parsing the DaemonSet")
}

/// The pod spec of a DaemonSet.
pub fn pod_spec(ds: &DaemonSet) -> anyhow::Result<&PodSpec> {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("the DaemonSet has no pod spec")
}

/// The container (or init container) named `name`.
pub fn container<'a>(spec: &'a PodSpec, name: &str) -> anyhow::Result<&'a Container> {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .with_context(|| format!("no container {name:?} in the pod spec"))
}

/// The hostPath volumes `name` mounts, for the test to create as the kubelet would.
pub fn host_paths(spec: &PodSpec, name: &str) -> anyhow::Result<Vec<HostPath>> {
    let c = container(spec, name)?;
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let v = volume(spec, &m.name)?;
        if let Some(h) = &v.host_path {
            out.push(HostPath {
                path: PathBuf::from(&h.path),
                kind: h.type_.clone().unwrap_or_default(),
            });
        }
    }
    Ok(out)
}

fn volume<'a>(
    spec: &'a PodSpec,
    name: &str,
) -> anyhow::Result<&'a k8s_openapi::api::core::v1::Volume> {
    spec.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .with_context(|| format!("no volume {name:?}"))
}

/// Kubernetes' `$(VAR)` expansion in command and args (`$$` escapes, unknown stay as written).
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = env.iter().find(|(k, _)| *k == inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The container's environment, as the kubelet resolves it.
fn environment(c: &Container, pod: &PodEnv) -> anyhow::Result<Vec<(String, String)>> {
    let mut env = Vec::new();
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => Some(v.clone()),
            (None, Some(from)) => {
                if let Some(f) = &from.field_ref {
                    match f.field_path.as_str() {
                        "spec.nodeName" => Some(pod.node_name.clone()),
                        other => bail!("env {}: fieldRef {other} is not supported", e.name),
                    }
                } else if let Some(k) = &from.config_map_key_ref {
                    let found = pod.config_map_keys.get(&(k.name.clone(), k.key.clone()));
                    match (found, k.optional) {
                        (Some(v), _) => Some(v.clone()),
                        (None, Some(true)) => None,
                        (None, _) => bail!("env {}: configMap key {} missing", e.name, k.key),
                    }
                } else {
                    bail!("env {}: unsupported valueFrom", e.name)
                }
            }
            (None, None) => Some(String::new()),
        };
        if let Some(v) = value {
            env.push((e.name.clone(), v));
        }
    }
    Ok(env)
}

fn mount(destination: &str, kind: &str, source: &str, options: &[&str]) -> Value {
    json!({ "destination": destination, "type": kind, "source": source, "options": options })
}

/// The OCI runtime configuration for container `name` of the DaemonSet's pod.
pub fn config(ds: &DaemonSet, name: &str, pod: &PodEnv) -> anyhow::Result<Value> {
    let spec = pod_spec(ds)?;
    let c = container(spec, name)?;
    let sc = c.security_context.clone().unwrap_or_default();
    let privileged = sc.privileged == Some(true);
    let host_network = spec.host_network == Some(true);

    let env = environment(c, pod)?;
    let mut args: Vec<String> = match &c.command {
        Some(cmd) => cmd.clone(),
        None => pod.entrypoint.clone(),
    };
    args.extend(c.args.iter().flatten().cloned());
    let mut args: Vec<String> = args.iter().map(|a| expand(a, &env)).collect();
    args.extend(pod.extra_args.iter().cloned());
    let mut env_list =
        vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned()];
    if host_network {
        // The kubelet sets HOSTNAME to the node's name for host-network pods.
        env_list.push(format!("HOSTNAME={}", pod.node_name));
    }
    env_list.extend(env.iter().map(|(k, v)| format!("{k}={v}")));

    let caps: Vec<String> = if privileged {
        ALL_CAPS.iter().map(|c| format!("CAP_{c}")).collect()
    } else {
        let caps = sc.capabilities.clone().unwrap_or_default();
        let drops_all = caps.drop.iter().flatten().any(|d| d == "ALL");
        if !drops_all {
            bail!("container {name}: only `drop: [ALL]` plus an add list is supported");
        }
        caps.add
            .iter()
            .flatten()
            .filter(|a| !pod.drop_caps.contains(a))
            .map(|a| format!("CAP_{a}"))
            .collect()
    };

    // containerd's default mounts; /sys is read-only unless privileged.
    let sys_ro = if privileged { "rw" } else { "ro" };
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", sys_ro],
        ),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", sys_ro],
        ),
    ];
    let mut propagation_shared = false;
    for m in c.volume_mounts.iter().flatten() {
        let v = volume(spec, &m.name)?;
        let source = if let Some(h) = &v.host_path {
            PathBuf::from(&h.path)
        } else if v.config_map.is_some() {
            pod.config_map_dirs
                .get(&m.name)
                .cloned()
                .with_context(|| format!("no directory for configMap volume {}", m.name))?
        } else {
            bail!(
                "volume {}: only hostPath and configMap volumes are supported",
                m.name
            )
        };
        let propagation = match m.mount_propagation.as_deref() {
            Some("Bidirectional") => {
                if !privileged {
                    bail!(
                        "{}: Bidirectional propagation needs a privileged container",
                        m.name
                    );
                }
                propagation_shared = true;
                "rshared"
            }
            Some("HostToContainer") => "rslave",
            _ => "rprivate",
        };
        let ro = if m.read_only == Some(true) {
            "ro"
        } else {
            "rw"
        };
        mounts.push(mount(
            &m.mount_path,
            "bind",
            &path_str(&source)?,
            &["rbind", propagation, ro],
        ));
    }

    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "mount"}),
    ];
    if !host_network {
        namespaces.push(json!({"type": "network"}));
        namespaces.push(json!({"type": "uts"}));
    }
    let mut linux = json!({
        "namespaces": namespaces,
        // The host's mounts must reach HostToContainer volumes (and leave by Bidirectional ones).
        "rootfsPropagation": if propagation_shared { "rshared" } else { "rslave" },
    });
    if !privileged {
        linux["maskedPaths"] = json!(MASKED_PATHS);
        linux["readonlyPaths"] = json!(READONLY_PATHS);
    }
    let seccomp = sc.seccomp_profile.as_ref().map(|p| p.type_.as_str());
    if !privileged && seccomp != Some("Unconfined") {
        bail!("container {name}: only an Unconfined seccomp profile is supported here");
    }

    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": sc.run_as_user.unwrap_or(0), "gid": 0 },
            "args": args,
            "env": env_list,
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
            },
            // allowPrivilegeEscalation defaults to true: no_new_privs off.
            "noNewPrivileges": sc.allow_privilege_escalation == Some(false),
        },
        "root": { "path": path_str(&pod.rootfs)?, "readonly": sc.read_only_root_filesystem == Some(true) },
        "hostname": if host_network { Value::Null } else { json!(name) },
        "mounts": mounts,
        "linux": linux,
    }))
}

fn path_str(p: &Path) -> anyhow::Result<String> {
    p.to_str()
        .map(str::to_owned)
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAEMONSET: &str = include_str!("../../manifests/daemonset.yaml");

    fn pod() -> PodEnv {
        PodEnv {
            rootfs: "/rootfs".into(),
            entrypoint: vec!["/usr/local/bin/kube-ipvs-bpf".into()],
            node_name: "lab".into(),
            config_map_dirs: [("config".to_owned(), PathBuf::from("/cfg"))].into(),
            ..PodEnv::default()
        }
    }

    #[test]
    fn agent_container_gets_the_add_list_host_network_masked_paths_and_the_mounts() {
        let ds = parse_daemonset(DAEMONSET).unwrap();
        let spec = pod_spec(&ds).unwrap();
        let c = container(spec, "kube-ipvs-bpf").unwrap();
        let cfg = config(&ds, "kube-ipvs-bpf", &pod()).unwrap();
        let add: Vec<String> = c
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap()
            .add
            .clone()
            .unwrap()
            .iter()
            .map(|a| format!("CAP_{a}"))
            .collect();
        assert_eq!(cfg["process"]["capabilities"]["effective"], json!(add));
        let ns: Vec<&str> = cfg["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert!(!ns.contains(&"network"));
        assert!(
            cfg["linux"]["readonlyPaths"]
                .as_array()
                .unwrap()
                .contains(&json!("/proc/sys"))
        );
        assert_eq!(
            cfg["linux"]["maskedPaths"].as_array().unwrap().len(),
            MASKED_PATHS.len()
        );
        let args: Vec<&str> = cfg["process"]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args[0], "/usr/local/bin/kube-ipvs-bpf");
        assert!(
            args.windows(2).any(|w| w == ["--node-name", "lab"]),
            "{args:?}"
        );
        let dests: Vec<&str> = cfg["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["destination"].as_str().unwrap())
            .collect();
        for m in c.volume_mounts.as_ref().unwrap() {
            assert!(dests.contains(&m.mount_path.as_str()), "{}", m.mount_path);
        }
        let bpf = cfg["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/sys/fs/bpf")
            .unwrap();
        assert!(
            bpf["options"]
                .as_array()
                .unwrap()
                .contains(&json!("rslave"))
        );
    }

    #[test]
    fn init_container_is_privileged_with_bidirectional_bpffs() {
        let ds = parse_daemonset(DAEMONSET).unwrap();
        let cfg = config(&ds, "mount-bpf-fs", &pod()).unwrap();
        assert_eq!(
            cfg["process"]["args"],
            json!(["/usr/local/bin/kube-ipvs-bpf", "init"])
        );
        assert!(cfg["linux"].get("maskedPaths").is_none());
        assert_eq!(cfg["linux"]["rootfsPropagation"], "rshared");
    }

    #[test]
    fn dollar_paren_expansion() {
        let env = vec![("A".to_owned(), "x".to_owned())];
        assert_eq!(expand("$(A)-$$(A)-$(B)", &env), "x-$(A)-$(B)");
    }
}
