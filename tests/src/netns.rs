//! Named network namespaces for tests (as `ip netns add` makes them, under /run/netns), so each
//! test gets its own IPVS table, conntrack table and links, and traffic stays inside.

use std::fs::File;
use std::future::Future;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};

use crate::cmd::{sh, try_sh};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A named network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a fresh namespace named `<prefix>-<pid>-<n>` with loopback up.
    pub fn new(prefix: &str) -> Netns {
        Netns::try_new(prefix).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Like [`Netns::new`], but a failure is an error.
    pub fn try_new(prefix: &str) -> anyhow::Result<Netns> {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        try_sh(&format!("ip netns add {name}"))?;
        let ns = Netns { name };
        ns.try_sh("ip link set lo up")?;
        Ok(ns)
    }

    /// The namespace's name (for `ip netns exec`, `ip link set … netns NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs a shell command inside the namespace (with nsenter: `ip netns exec` remounts /sys
    /// and would hide bpffs) and returns stdout; panics when it fails.
    pub fn sh(&self, cmd: &str) -> String {
        sh(&self.wrap(cmd))
    }

    /// Like [`Netns::sh`], but a failure is an error.
    pub fn try_sh(&self, cmd: &str) -> anyhow::Result<String> {
        try_sh(&self.wrap(cmd))
    }

    /// Like [`crate::sh_status`], inside the namespace.
    pub fn sh_status(&self, cmd: &str) -> (i32, String, String) {
        crate::cmd::sh_status(&self.wrap(cmd))
    }

    /// The command line that runs `cmd` in this namespace.
    pub fn wrap(&self, cmd: &str) -> String {
        format!(
            "nsenter --net={} sh -c '{}'",
            self.path(),
            cmd.replace('\'', r"'\''")
        )
    }

    /// Runs `f` on a new thread that has joined this namespace (sockets it opens, netlink
    /// included, belong to the namespace) and returns its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Runs the future to completion on a single-threaded tokio runtime whose thread has
    /// joined this namespace.
    pub fn block_on<F>(&self, make: impl FnOnce() -> F + Send + 'static) -> F::Output
    where
        F: Future,
        F::Output: Send + 'static,
    {
        self.run(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(make())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = crate::cmd::sh_status(&format!("ip netns del {}", self.name));
    }
}
