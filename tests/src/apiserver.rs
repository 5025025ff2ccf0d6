//! The `fake-apiserver` binary run inside a lab namespace, and its `/control/...` API (see
//! [`crate::fake_apiserver`]), for lab tests that run the agent against it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::agent::Manifests;
use crate::netns::Netns;

/// Where the fake API server listens, inside the namespace.
pub const API: &str = "127.0.0.1:6443";

/// The `fake-apiserver` binary, in a namespace; killed on drop.
pub struct ApiServer {
    child: Child,
}

impl ApiServer {
    /// Starts it in `ns` serving `manifests`, and writes a kubeconfig for it at `kubeconfig`.
    pub fn start(ns: &Netns, manifests: &Manifests, kubeconfig: &str) -> ApiServer {
        let bin = std::env::var("KUBE_IPVS_BPF_BIN")
            .map(|b| b.replace("kube-ipvs-bpf", "fake-apiserver"))
            .unwrap_or_else(|_| "fake-apiserver".into());
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg(bin)
            .args(["--listen", API, "--kubeconfig", kubeconfig, "--manifests"])
            .arg(&manifests.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start fake-apiserver");
        let s = ApiServer { child };
        let deadline = Instant::now() + Duration::from_secs(60);
        while control(ns, "GET", "/control/resource-version", "").is_err() {
            assert!(Instant::now() < deadline, "fake-apiserver did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One plain HTTP/1.1 request to the fake server's control API, from inside `ns`.
pub fn control(ns: &Netns, method: &str, path: &str, body: &str) -> std::io::Result<String> {
    let (method, path, body) = (method.to_string(), path.to_string(), body.to_string());
    ns.run(move || request(&method, &path, &body))
}

/// [`control`] from the calling thread, which must be in the server's namespace (a benchmark
/// timing the request does not pay for a thread entering the namespace).
pub fn request(method: &str, path: &str, body: &str) -> std::io::Result<String> {
    let mut c = TcpStream::connect_timeout(
        &API.parse::<SocketAddr>().expect("addr"),
        Duration::from_secs(2),
    )?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: {API}\r\nContent-Type: application/yaml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    if !out.starts_with("HTTP/1.1 2") {
        return Err(std::io::Error::other(out));
    }
    Ok(out)
}
