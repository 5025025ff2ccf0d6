//! Running the real `kube-ipvs-bpf` binary in a lab namespace, with manifests in a temporary
//! directory, and following its JSON log (what it did, e.g. how many netlink operations each
//! sync issued).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::Netns;

/// The agent binary staged into the lab (`KUBE_IPVS_BPF_BIN`).
pub fn agent_bin() -> String {
    std::env::var("KUBE_IPVS_BPF_BIN").unwrap_or_else(|_| "kube-ipvs-bpf".to_string())
}

/// The agent binary's absolute path ([`agent_bin`], looked up on `PATH` if it is a bare name).
pub fn agent_path() -> PathBuf {
    let bin = agent_bin();
    if bin.contains('/') {
        return std::fs::canonicalize(&bin).unwrap_or_else(|_| PathBuf::from(bin));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(&bin))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(bin))
}

/// A directory of manifests the agent watches (and one beside it for other files, such as a
/// configuration file, which the watched directory must not hold).
pub struct Manifests {
    pub dir: PathBuf,
    pub other_dir: PathBuf,
}

impl Manifests {
    pub fn new(name: &str) -> Manifests {
        let dir = PathBuf::from(format!("/tmp/manifests-{name}-{}", std::process::id()));
        let other_dir = PathBuf::from(format!("/tmp/files-{name}-{}", std::process::id()));
        for d in [&dir, &other_dir] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d).expect("manifest dir");
        }
        Manifests { dir, other_dir }
    }

    /// Writes a file outside the watched directory.
    pub fn write_other(&self, file: &str, content: &str) {
        std::fs::write(self.other_dir.join(file), content).expect("write file");
    }

    /// Writes (or replaces) one manifest file.
    pub fn write(&self, file: &str, content: &str) {
        let tmp = self.dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, content).expect("write manifest");
        std::fs::rename(&tmp, self.dir.join(file)).expect("rename manifest");
    }

    pub fn remove(&self, file: &str) {
        let _ = std::fs::remove_file(self.dir.join(file));
    }
}

/// A ClusterIP (or, with `node_port`, NodePort) Service manifest with one TCP port.
pub fn service_yaml(name: &str, cluster_ip: &str, port: u16, node_port: Option<u16>) -> String {
    let (ty, np) = match node_port {
        Some(n) => ("NodePort", format!("\n      nodePort: {n}")),
        None => ("ClusterIP", String::new()),
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: lab\nspec:\n  type: {ty}\n  clusterIP: {cluster_ip}\n  clusterIPs: [{cluster_ip}]\n  ports:\n    - name: p\n      protocol: TCP\n      port: {port}\n      targetPort: 8080{np}\n---\n"
    )
}

/// An EndpointSlice for `service` with ready endpoints `ips` on port `port`, all on node "lab".
pub fn slice_yaml(service: &str, ips: &[&str], port: u16) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-1\n  namespace: lab\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n  - name: p\n    protocol: TCP\n    port: {port}\nendpoints:\n"
    );
    for ip in ips {
        s.push_str(&format!(
            "  - addresses: [{ip}]\n    conditions: {{ready: true}}\n    nodeName: lab\n"
        ));
    }
    s.push_str("---\n");
    s
}

/// A running agent; killed on drop, and then its pinned datapath (programs, links, maps) is
/// removed (unless it was [`Agent::stop`]ped for a restart test).
pub struct Agent {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
    raw: Arc<Mutex<Vec<String>>>,
    pin_root: String,
    remove_pins: bool,
}

/// The datapath pin root of the agent running in `ns` (one per namespace, so tests that share
/// a lab boot never share maps).
pub fn pin_root(ns: &Netns) -> String {
    format!("/sys/fs/bpf/lab-{}", ns.name())
}

impl Agent {
    /// Starts `kube-ipvs-bpf run --source file:DIR` inside `ns` with JSON logs and fast syncs;
    /// `extra` adds flags.
    pub fn start(ns: &Netns, manifests: &Path, extra: &[&str]) -> Agent {
        Agent::start_source(ns, &format!("file:{}", manifests.display()), extra)
    }

    /// Like [`Agent::start`] with any `--source` (e.g. `kubernetes`, with `--kubeconfig` in
    /// `extra`).
    pub fn start_source(ns: &Netns, source: &str, extra: &[&str]) -> Agent {
        Agent::try_start_source(ns, source, &pin_root(ns), extra)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`Agent::start_source`] with the datapath pinned under `pin_root`, and a failure to
    /// start is an error.
    pub fn try_start_source(
        ns: &Netns,
        source: &str,
        pin_root: &str,
        extra: &[&str],
    ) -> anyhow::Result<Agent> {
        let state = format!("/tmp/agent-state-{}", ns.name());
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path()))
            .arg(agent_bin())
            .args([
                "--log-format",
                "json",
                "run",
                "--node-name",
                "lab",
                "--min-sync-period",
                "100ms",
            ])
            .args(["--source", source])
            .args(["--state-dir", &state, "--bpf-pin-root", pin_root])
            .args(extra)
            // The sweeper's passes that expire something ("swept") are logged at debug: tests
            // that count SNAT records can tell an expiry from a lost record.
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG")
                    .unwrap_or_else(|_| "info,agent::datapath::sweep=debug".to_string()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        Agent::spawn(cmd, pin_root)
    }

    /// Starts the agent inside `ns` as `program` (a path to the agent binary, or a link to it
    /// named e.g. `kube-proxy`) with exactly `args`, its datapath pinned under `pin_root` (what
    /// the command line selects; removed on drop). Its log is text unless `args` ask for JSON:
    /// [`Agent::log_text`] holds every line either way.
    pub fn start_command(ns: &Netns, program: &str, args: &[&str], pin_root: &str) -> Agent {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", ns.path()))
            .arg(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        Agent::spawn(cmd, pin_root).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Whether the agent has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    fn spawn(mut cmd: Command, pin_root: &str) -> anyhow::Result<Agent> {
        let mut child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("start {:?}: {e}", cmd.get_args().nth(1)))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow::anyhow!("the agent's stderr is not piped"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let (l, r) = (lines.clone(), raw.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    l.lock().unwrap_or_else(|p| p.into_inner()).push(v);
                }
                r.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        Ok(Agent {
            child,
            lines,
            raw,
            pin_root: pin_root.to_string(),
            remove_pins: true,
        })
    }

    /// Every log line so far (for failure messages).
    pub fn log_text(&self) -> String {
        self.raw
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    /// Parsed log events so far.
    pub fn events(&self) -> Vec<Value> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits (up to `timeout`) for the first event after `skip` events that satisfies `pred`.
    pub fn wait_for(&self, skip: usize, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.events().into_iter().skip(skip).find(|v| pred(v)) {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "no matching agent log event within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Like [`Agent::wait_for`], but a timeout (or the agent exiting) is an error.
    pub fn try_wait_for(
        &mut self,
        skip: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.events().into_iter().skip(skip).find(|v| pred(v)) {
                return Ok(v);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                anyhow::bail!("the agent exited ({status}); log:\n{}", self.log_text());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "no matching agent log event within {timeout:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the next "sync done" event (after `skip` events) whose source generation is at
    /// least `generation`.
    pub fn wait_sync(&self, skip: usize, generation: u64) -> Value {
        // Generous: a cold start loads and verifies the BPF programs under TCG, slower still
        // on a busy machine (6.1's verifier took 64 s with three guests sharing two cores). The
        // bound only caps how long a failure takes.
        self.wait_for(skip, Duration::from_secs(300), |v| {
            v["message"] == "sync done" && v["generation"].as_u64() >= Some(generation)
        })
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Number of events so far (a mark to wait from).
    pub fn mark(&self) -> usize {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// `inspect snat --output json` for this agent (its state and pins), run inside `ns`.
    pub fn inspect_snat(&self, ns: &Netns) -> Value {
        let out = ns.sh(&format!(
            "{} inspect snat --output json --state-dir /tmp/agent-state-{} --bpf-pin-root {}",
            agent_bin(),
            ns.name(),
            self.pin_root
        ));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("inspect snat output: {e}: {out}"))
    }

    /// `inspect switch --output json` for this agent (the switch window from kube-proxy), run
    /// inside `ns`.
    pub fn inspect_switch(&self, ns: &Netns) -> Value {
        let out = ns.sh(&format!(
            "{} inspect switch --output json --bpf-pin-root {}",
            agent_bin(),
            self.pin_root
        ));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("inspect switch output: {e}: {out}"))
    }

    /// `inspect counters --output json` for this agent: counter name → value.
    pub fn counters(&self, ns: &Netns) -> std::collections::BTreeMap<String, u64> {
        self.try_counters(ns).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`Agent::counters`], but a failure is an error (for the benchmark programs).
    pub fn try_counters(
        &self,
        ns: &Netns,
    ) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
        let out = ns.try_sh(&format!(
            "{} inspect counters --output json --bpf-pin-root {}",
            agent_bin(),
            self.pin_root
        ))?;
        let v: Value = serde_json::from_str(&out)
            .map_err(|e| anyhow::anyhow!("inspect counters output: {e}: {out}"))?;
        Ok(u64_map(&v["counters"]))
    }

    /// Stops the agent with SIGTERM and waits for it; its pinned datapath stays (a restart).
    pub fn stop(mut self) {
        self.remove_pins = false;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.remove_pins {
            let _ = std::fs::remove_dir_all(&self.pin_root);
        }
    }
}

/// The IPVS operations a "sync done" event reports: kind → count (issued).
pub fn ops_issued(event: &Value) -> std::collections::BTreeMap<String, u64> {
    let parsed: Value = event["ipvs_ops"]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    u64_map(&parsed["issued"])
}

/// A JSON object of counts as a map (absent or not an object: empty).
fn u64_map(v: &Value) -> std::collections::BTreeMap<String, u64> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}
