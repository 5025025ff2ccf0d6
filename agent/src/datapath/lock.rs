//! One agent per datapath: [`PinRootLock`], an exclusive `fcntl` lock that `run` takes before
//! anything is loaded or attached, and that `cleanup` takes before removing anything. Two
//! agents on one pin root would free each other's SNAT records (each one's sweeper sees the
//! other's as unresolved or expired) and fight over the TC attachments.
//!
//! bpffs holds only pinned objects (no regular files), so the lock is a file in
//! [`DEFAULT_LOCK_DIR`] (`$KUBE_IPVS_BPF_LOCK_DIR`), named by the device and inode of the pin
//! base: the pin root, or its parent when the pin root is a layout version directory (`v2`),
//! so agents of two layout versions exclude each other too. Device and inode name the same
//! directory in every mount namespace (a pod's `/sys/fs/bpf`, a debug container's
//! `/host/sys/fs/bpf`). The holder writes its pid, command and pin root into the file; a second
//! taker is told the holder's pid (`F_GETLK`, as seen from its own pid namespace) and what the
//! file says. The lock goes with the holder's process (it needs no clean-up after a crash).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, fcntl};

/// Where lock files are (the DaemonSet mounts the host's `/run/kube-ipvs-bpf` there).
pub const DEFAULT_LOCK_DIR: &str = "/run/kube-ipvs-bpf";
/// Environment variable that moves [`DEFAULT_LOCK_DIR`] (a debug container with the host's
/// `/run` at `/host/run`).
pub const LOCK_DIR_ENV: &str = "KUBE_IPVS_BPF_LOCK_DIR";

/// The lock directory: `$KUBE_IPVS_BPF_LOCK_DIR`, else [`DEFAULT_LOCK_DIR`].
pub fn lock_dir() -> PathBuf {
    std::env::var_os(LOCK_DIR_ENV)
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_LOCK_DIR), PathBuf::from)
}

/// The directory one agent owns: `pin_root`, or its parent when `pin_root` is a layout version
/// directory (`v<N>`, see `probes::loader::other_layouts`).
pub fn pin_base(pin_root: &Path) -> PathBuf {
    let versioned = pin_root
        .file_name()
        .map(|n| n.to_string_lossy())
        .is_some_and(|n| {
            n.len() > 1 && n.starts_with('v') && n[1..].bytes().all(|b| b.is_ascii_digit())
        });
    match pin_root.parent() {
        Some(parent) if versioned && !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => pin_root.to_path_buf(),
    }
}

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "another kube-ipvs-bpf is using the datapath under {}: {holder} holds {}; two agents on \
         one pin root free each other's SNAT records: stop that one first (or give this one \
         another --bpf-pin-root)",
        pin_base.display(),
        lock.display()
    )]
    Held {
        pin_base: PathBuf,
        lock: PathBuf,
        /// The holder: its pid and what it wrote into the file.
        holder: String,
    },
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LockError {
    let path = path.to_path_buf();
    move |source| LockError::Io {
        action,
        path,
        source,
    }
}

/// A held lock on one pin base; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct PinRootLock {
    _file: File,
    path: PathBuf,
}

impl PinRootLock {
    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn whole_file(kind: libc::c_short) -> libc::flock {
    // SAFETY: `flock` is a plain C struct; all-zero is a valid value of every field.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0;
    fl
}

/// Takes the lock of `pin_root`'s pin base (created when missing) in `lock_dir`, without
/// waiting; `command` is written into the file for a second taker to read. Fails with
/// [`LockError::Held`], naming the holder's pid, while another process holds it.
pub fn acquire(lock_dir: &Path, pin_root: &Path, command: &str) -> Result<PinRootLock, LockError> {
    let base = pin_base(pin_root);
    std::fs::create_dir_all(&base).map_err(io("create", &base))?;
    let meta = std::fs::metadata(&base).map_err(io("stat", &base))?;
    std::fs::create_dir_all(lock_dir).map_err(io("create", lock_dir))?;
    let path = lock_dir.join(format!("pins-{:x}-{}.lock", meta.dev(), meta.ino()));
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(io("open", &path))?;
    let lock = whole_file(libc::F_WRLCK as libc::c_short);
    if let Err(errno) = fcntl(file.as_fd(), FcntlArg::F_SETLK(&lock)) {
        if errno != nix::errno::Errno::EAGAIN && errno != nix::errno::Errno::EACCES {
            return Err(io("lock", &path)(errno.into()));
        }
        let mut query = whole_file(libc::F_WRLCK as libc::c_short);
        let pid = fcntl(file.as_fd(), FcntlArg::F_GETLK(&mut query))
            .ok()
            .filter(|_| query.l_type != libc::F_UNLCK as libc::c_short)
            .map(|_| query.l_pid);
        let mut written = String::new();
        let _ = file.read_to_string(&mut written);
        let written = written.split_whitespace().collect::<Vec<_>>().join(" ");
        let holder = match pid {
            // 0: the holder is in another pid namespace (a pod) and invisible from here.
            Some(pid) if pid > 0 => format!("pid {pid} ({written})"),
            _ => format!("a process of another pid namespace ({written})"),
        };
        return Err(LockError::Held {
            pin_base: base,
            lock: path,
            holder,
        });
    }
    let contents = format!(
        "pid {} command {command:?} pin_root {}\n",
        std::process::id(),
        pin_root.display()
    );
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(contents.as_bytes()))
        .map_err(io("write", &path))?;
    Ok(PinRootLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    #[test]
    fn the_pin_base_is_the_parent_of_a_layout_version() {
        assert_eq!(
            pin_base(Path::new("/sys/fs/bpf/kube-ipvs-bpf/v2")),
            Path::new("/sys/fs/bpf/kube-ipvs-bpf")
        );
        assert_eq!(
            pin_base(Path::new("/sys/fs/bpf/kube-ipvs-bpf")),
            Path::new("/sys/fs/bpf/kube-ipvs-bpf")
        );
        assert_eq!(
            pin_base(Path::new("/sys/fs/bpf/lab-x")),
            Path::new("/sys/fs/bpf/lab-x")
        );
        assert_eq!(pin_base(Path::new("/x/vv")), Path::new("/x/vv"));
    }

    /// Not a test on its own: the lock holder that `a_second_taker_is_told_the_holders_pid`
    /// runs in a child process (POSIX locks are per process). Takes the lock named by the
    /// environment, says so, and holds it until its stdin closes.
    #[test]
    fn lock_holder_child() {
        let (Some(dir), Some(root)) = (
            std::env::var_os("KIB_TEST_LOCK_DIR"),
            std::env::var_os("KIB_TEST_PIN_ROOT"),
        ) else {
            return;
        };
        let lock = acquire(Path::new(&dir), Path::new(&root), "run").expect("child: lock");
        println!("LOCKED {}", lock.path().display());
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }

    #[test]
    fn a_second_taker_is_told_the_holders_pid() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("locks");
        let root = tmp.path().join("bpf/kube-ipvs-bpf/v2");
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "datapath::lock::tests::lock_holder_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("KIB_TEST_LOCK_DIR", &dir)
            .env("KIB_TEST_PIN_ROOT", &root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the holder");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let locked = lines
            .by_ref()
            .map_while(Result::ok)
            .find(|l| l.contains("LOCKED "));
        assert!(locked.is_some(), "the holder did not take the lock");

        // Another layout version of the same agent, and a cleanup of the whole base.
        for (other, command) in [(root.clone(), "run"), (root.join("../v3"), "run")] {
            let e = acquire(&dir, &other, command).expect_err("second lock");
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("pid {}", child.id())),
                "{msg:?} does not name the holder's pid {}",
                child.id()
            );
            assert!(msg.contains("command \"run\""), "{msg}");
        }
        let e = acquire(
            &dir,
            &root.parent().unwrap().canonicalize().unwrap(),
            "cleanup",
        )
        .expect_err("cleanup while held");
        assert!(
            e.to_string().contains(&format!("pid {}", child.id())),
            "{e}"
        );

        drop(child.stdin.take());
        lines.for_each(drop);
        let _ = child.wait();
        // Released with its holder.
        let lock = acquire(&dir, &root, "run").expect("lock after the holder exited");
        let written = std::fs::read_to_string(lock.path()).expect("read");
        assert!(
            written.contains(&format!("pid {}", std::process::id())),
            "{written}"
        );
    }
}
