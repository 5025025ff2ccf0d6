//! The crate's error type: every failure of opening, loading, attaching, pinning and map access,
//! with the object, map, program, device or path it concerns.

use std::path::PathBuf;

/// An error of the datapath loader or of a map access.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or loading a BPF object failed (libbpf's messages, the verifier log among them,
    /// go to the log at debug level: see [`crate::libbpf_log`]).
    #[error("BPF object {object}: {action}: {source}")]
    Object {
        /// Which object (`datapath`, `ipvs_probe`).
        object: &'static str,
        /// What was being done.
        action: &'static str,
        /// The libbpf error.
        source: libbpf_rs::Error,
    },
    /// Loading a BPF object into the kernel failed; `log` is what libbpf said about it (its
    /// last warnings, the end of the verifier log among them).
    #[error("BPF object {object}: load: {source}{}", libbpf_said(log))]
    Load {
        /// Which object (`datapath`, `ipvs_probe`).
        object: &'static str,
        /// The libbpf error.
        source: libbpf_rs::Error,
        /// libbpf's last warnings before the failure (empty when it said nothing).
        log: Vec<String>,
    },
    /// The pin root is not on a BPF file system.
    #[error(
        "the BPF pin root {path} is not on bpffs ({found}): mount bpffs there with \
         `mount -t bpf bpf /sys/fs/bpf` (systemd mounts it at boot; the DaemonSet's mount-bpf-fs \
         init container does it too), or choose a --bpf-pin-root under a bpffs mount"
    )]
    PinRootNotBpffs {
        /// The pin root.
        path: PathBuf,
        /// What is there instead.
        found: String,
    },
    /// A map operation failed.
    #[error("map {map}: {action}: {source}")]
    Map {
        /// The map's name.
        map: String,
        /// What was being done.
        action: &'static str,
        /// The libbpf error.
        source: libbpf_rs::Error,
    },
    /// A program operation failed.
    #[error("program {program}: {action}: {source}")]
    Program {
        /// The program's name.
        program: &'static str,
        /// What was being done.
        action: &'static str,
        /// The libbpf error.
        source: libbpf_rs::Error,
    },
    /// A map's key or value size is not the size of the Rust type used with it.
    #[error(
        "map {map}: key/value size {key_size}/{value_size}, expected {expected_key}/{expected_value}"
    )]
    MapLayout {
        /// The map's name.
        map: String,
        /// Its key size.
        key_size: u32,
        /// Its value size.
        value_size: u32,
        /// The Rust key size.
        expected_key: usize,
        /// The Rust value size.
        expected_value: usize,
    },
    /// A map is missing from an object.
    #[error("map {0} is not in the object")]
    MissingMap(&'static str),
    /// A program is missing from an object.
    #[error("program {0} is not in the object")]
    MissingProgram(&'static str),
    /// Attaching a TC program failed.
    #[error("attach {program} to ifindex {ifindex} ({mode}): {source}")]
    TcAttach {
        /// The program.
        program: &'static str,
        /// The device.
        ifindex: u32,
        /// `tcx` or `netlink`.
        mode: &'static str,
        /// The libbpf error.
        source: libbpf_rs::Error,
    },
    /// Detaching TC programs failed.
    #[error("detach from ifindex {ifindex} ({mode}): {source}")]
    TcDetach {
        /// The device.
        ifindex: u32,
        /// `tcx` or `netlink`.
        mode: &'static str,
        /// The libbpf error.
        source: libbpf_rs::Error,
    },
    /// Neither probe flavour could be loaded and attached.
    #[error("IPVS probe unavailable: {0}")]
    ProbeUnavailable(String),
    /// Pinning or unpinning an object failed.
    #[error("pin {path}: {source}")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// The libbpf error.
        source: libbpf_rs::Error,
    },
    /// A file-system operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Mapping a map into memory failed.
    #[error("map {map}: mmap: {source}")]
    Mmap {
        /// The map's name.
        map: String,
        /// The error.
        source: std::io::Error,
    },
    /// An insert into the SNAT table found no room (the tuple's index buckets or the records).
    #[error("SNAT table: no room for {0}")]
    TableFull(&'static str),
    /// An insert into the SNAT table found its tuple present.
    #[error("SNAT table: the {0} tuple is present")]
    TableExists(&'static str),
    /// An insert into the SNAT table found a bucket lock held by a program for too long.
    #[error("SNAT table: a {0} bucket stayed locked")]
    TableBusy(&'static str),
    /// BPF_PROG_TEST_RUN failed.
    #[error("test run of {program}: {source}")]
    TestRun {
        /// The program.
        program: &'static str,
        /// The libbpf error.
        source: libbpf_rs::Error,
    },
}

fn libbpf_said(log: &[String]) -> String {
    if log.is_empty() {
        String::new()
    } else {
        format!("; libbpf said: {}", log.join(" | "))
    }
}

/// The crate's result type.
impl Error {
    /// Whether a map update failed because the map already holds its `max_entries` (`E2BIG`).
    pub fn is_map_full(&self) -> bool {
        matches!(self, Error::Map { source, .. } if source.kind() == libbpf_rs::ErrorKind::TooBig)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
