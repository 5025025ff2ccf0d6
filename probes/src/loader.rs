//! Loading and attaching the datapath: [`Datapath`] owns the loaded datapath object, its pinned
//! maps and `xt_svc` pin, the TC attachments (TCX links or netlink clsact filters) and the IPVS
//! probe.
//!
//! Restart semantics. Every map is pinned by name under a versioned pin root, and `load()` reuses
//! whatever is pinned there (with its size), so a restarted agent keeps every SNAT entry. The
//! programs left attached by the previous agent keep running until the new ones replace them,
//! and the replacement is atomic on both paths:
//! - TCX (kernel ≥ 6.6): each link is pinned (`<pin root>/links/tcx_<ifindex>_<dir>`); a new
//!   agent opens the pinned link and swaps the program inside it with `BPF_LINK_UPDATE`, so there
//!   is no instant with no program and no instant with two;
//! - netlink clsact (older kernels): the filter has a fixed handle and priority and is written
//!   with `BPF_TC_F_REPLACE` (`tc filter replace`), which swaps the program in one operation.
//!
//! The IPVS probe link is pinned too (`<pin root>/links/ipvs_probe`): a new probe is attached
//! before the old one is detached (for an instant both record, which is harmless).
//!
//! `xt_svc` is pinned at `<pin root>/prog_xt_svc` by rename over the old pin; the iptables rule
//! keeps the program it resolved when it was written (same maps), so the agent re-applies its
//! rules after a load to pick up the new one.

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::time::Duration;

use libbpf_rs::{
    AsRawLibbpf, Link, MapCore, MapHandle, Object, ObjectBuilder, OpenObject, Program,
    ProgramAttachType, ProgramInput, ProgramMut, TC_EGRESS, TC_INGRESS, TcHook,
};

use crate::error::{Error, Result};
use crate::maps::{self, Stats, map_names};
use crate::maps::{CFG_F_DIRECT_WRITES, CFG_F_PORT_FILTER, Config};
use crate::nat_table::{SnatHandles, SnatTable};
use crate::objects::{
    DATAPATH_OBJECT, DatapathProgram, FREE_PROBE_FENTRY_PROGRAM, FREE_PROBE_KPROBE_PROGRAM,
    FREE_PROBE_TARGET_FUNCTION, IPVS_PROBE_OBJECT, NAT_WRITERS, PROBE_FEXIT_PROGRAM,
    PROBE_KRETPROBE_PROGRAM, PROBE_SCHEDULE_FEXIT_PROGRAM, PROBE_TARGET_FUNCTION,
};
use crate::port_filter::PortFilter;
use crate::typed_map::{DatapathMaps, PerCpuArray, TypedMap};

/// Default pin root; `v2` is the map layout version (a layout change gets a new directory).
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/kube-ipvs-bpf/v2";
/// File name of the pinned `xt_svc` program under the pin root.
pub const XT_SVC_PIN_NAME: &str = "prog_xt_svc";
/// Directory of pinned links under the pin root.
pub const LINKS_DIR: &str = "links";
/// File name of the pinned IPVS probe link under [`LINKS_DIR`].
pub const PROBE_LINK_NAME: &str = "ipvs_probe";
/// File name of the pinned link of the probe on IPVS freeing a connection under [`LINKS_DIR`].
pub const FREE_PROBE_LINK_NAME: &str = "ipvs_free_probe";
/// Handle of the clsact filters (netlink path).
pub const CLSACT_HANDLE: u32 = 0x4b49;
/// Priority of the clsact filters (netlink path).
pub const CLSACT_PRIORITY: u32 = 0x4b49;

/// Sizes (max_entries) of the maps whose size is configurable. Applied when a map is created;
/// a map already pinned keeps its size (see [`Datapath::map_reuse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    /// `svc_ports` (default 65 536).
    pub svc_ports: u32,
    /// `svc_addrs` (default 65 536, as `svc_ports`: every service address has a port there).
    pub svc_addrs: u32,
    /// `src_ranges` (default 16 384).
    pub src_ranges: u32,
    /// `cluster_cidrs` (default 256).
    pub cluster_cidrs: u32,
    /// `devices` (default 1 024).
    pub devices: u32,
    /// The SNAT table: records in `snat_records` (default 262 144); `snat_fwd` and `snat_rev`
    /// get two ways per record each.
    pub snat: u32,
    /// `conns` (default 262 144).
    pub conns: u32,
    /// `frags` (default 8 192).
    pub frags: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            svc_ports: maps::DEFAULT_SVC_PORTS_SIZE,
            svc_addrs: maps::DEFAULT_SVC_ADDRS_SIZE,
            src_ranges: maps::DEFAULT_SRC_RANGES_SIZE,
            cluster_cidrs: maps::DEFAULT_CLUSTER_CIDRS_SIZE,
            devices: maps::DEFAULT_DEVICES_SIZE,
            snat: maps::DEFAULT_SNAT_SIZE,
            conns: maps::DEFAULT_CONNS_SIZE,
            frags: maps::DEFAULT_FRAGS_SIZE,
        }
    }
}

impl MapSizes {
    /// The size (max_entries) for a map name; `None` for fixed-size maps (`config`, `stats`,
    /// `device_slots`).
    pub fn for_map(&self, name: &str) -> Option<u32> {
        match name {
            map_names::SVC_PORTS => Some(self.svc_ports),
            map_names::SVC_ADDRS => Some(self.svc_addrs),
            map_names::SRC_RANGES => Some(self.src_ranges),
            map_names::CLUSTER_CIDRS => Some(self.cluster_cidrs),
            map_names::DEVICES => Some(self.devices),
            map_names::SNAT_RECORDS => Some(self.snat.max(1)),
            map_names::SNAT_FWD | map_names::SNAT_REV => {
                Some((2 * self.snat.max(1)).div_ceil(maps::NAT_WAYS as u32))
            }
            map_names::CONNS => Some(self.conns),
            map_names::FRAGS => Some(self.frags),
            _ => None,
        }
    }
}

/// How TC programs are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcAttachPolicy {
    /// TCX where the kernel has it (≥ 6.6), netlink clsact otherwise.
    Auto,
    /// TCX only (fails on older kernels).
    Tcx,
    /// Netlink clsact only.
    Netlink,
}

/// What [`Datapath::load`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathOptions {
    /// Where maps, links and `xt_svc` are pinned (default [`DEFAULT_PIN_ROOT`]).
    pub pin_root: PathBuf,
    /// Map sizes for maps that do not exist yet.
    pub map_sizes: MapSizes,
    /// TC attachment mechanism.
    pub tc_attach: TcAttachPolicy,
    /// How translated packets are rewritten.
    pub rewrite: RewritePolicy,
    /// The SNAT table's hash seed when the table is created (tests use a fixed one); `None`:
    /// random. A table reused from its pins keeps its own.
    pub nat_seed: Option<u32>,
}

/// How the TC programs rewrite a translated packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewritePolicy {
    /// Direct packet writes with inline checksums (the `nat_write` tail call) where the kernel
    /// has `bpf_cast_to_kern_ctx` (6.2+), the BPF helpers otherwise.
    Auto,
    /// Always the helpers (`bpf_skb_store_bytes`, `bpf_l4_csum_replace`).
    Helpers,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        DatapathOptions {
            pin_root: PathBuf::from(DEFAULT_PIN_ROOT),
            map_sizes: MapSizes::default(),
            tc_attach: TcAttachPolicy::Auto,
            rewrite: RewritePolicy::Auto,
            nat_seed: None,
        }
    }
}

/// The link layer of a device, which picks the program variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// Ethernet header (most devices).
    Ethernet,
    /// No link-layer header (`tunl0`, `wg0`, tun devices).
    L3,
}

impl DeviceKind {
    fn programs(self) -> (DatapathProgram, DatapathProgram) {
        match self {
            DeviceKind::Ethernet => (DatapathProgram::TcIngress, DatapathProgram::TcEgress),
            DeviceKind::L3 => (DatapathProgram::TcIngressL3, DatapathProgram::TcEgressL3),
        }
    }
}

/// How the TC programs of a device are attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcAttachMode {
    /// TCX links (pinned).
    Tcx,
    /// Netlink clsact filters with [`CLSACT_HANDLE`]/[`CLSACT_PRIORITY`].
    Netlink,
}

impl TcAttachMode {
    /// `tcx` or `netlink`.
    pub fn as_str(self) -> &'static str {
        match self {
            TcAttachMode::Tcx => "tcx",
            TcAttachMode::Netlink => "netlink",
        }
    }
}

/// Which IPVS probe flavour to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbePreference {
    /// fexit, falling back to kretprobe.
    Auto,
    /// fexit only (either function).
    Fexit,
    /// kretprobe only.
    Kretprobe,
}

/// The IPVS probe flavour attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// `fexit/ip_vs_conn_new` (BPF trampoline; needs a trampoline taking 7 arguments: 6.12, not 6.1).
    Fexit,
    /// `fexit/ip_vs_schedule` (5 arguments: 6.1), which returns every connection a
    /// virtual service schedules; a kretprobe costs more per connection.
    FexitSchedule,
    /// `kretprobe/ip_vs_conn_new` (every kernel).
    Kretprobe,
}

impl ProbeKind {
    fn program(self) -> &'static str {
        match self {
            ProbeKind::Fexit => PROBE_FEXIT_PROGRAM,
            ProbeKind::FexitSchedule => PROBE_SCHEDULE_FEXIT_PROGRAM,
            ProbeKind::Kretprobe => PROBE_KRETPROBE_PROGRAM,
        }
    }
}

/// The flavour of the probe on IPVS freeing a connection (`ip_vs_conn_rcu_free`), which
/// removes the connection's `conns` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeProbeKind {
    /// `fentry/ip_vs_conn_rcu_free` (BPF trampoline; the function in the module's BTF).
    Fentry,
    /// `kprobe/ip_vs_conn_rcu_free` (the function in kallsyms).
    Kprobe,
}

impl FreeProbeKind {
    fn program(self) -> &'static str {
        match self {
            FreeProbeKind::Fentry => FREE_PROBE_FENTRY_PROGRAM,
            FreeProbeKind::Kprobe => FREE_PROBE_KPROBE_PROGRAM,
        }
    }
}

/// What happened to one map at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapReuse {
    /// The map's name.
    pub name: String,
    /// Whether the pinned map was reused (its entries kept).
    pub reused: bool,
    /// The size asked for in [`MapSizes`] (`None` for fixed-size maps).
    pub requested_max_entries: Option<u32>,
    /// The map's size (a reused map keeps its own).
    pub max_entries: u32,
}

/// The `struct __sk_buff` fields a test run may set (others must be zero for the kernel).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SkbContext {
    /// `skb->mark`.
    pub mark: u32,
    /// The device (`skb->dev`); 0 or 1 means loopback, anything else must exist.
    pub ifindex: u32,
    /// `skb->skb_iif`.
    pub ingress_ifindex: u32,
}

/// Program ids attached to one direction of a device, per mechanism.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttachedPrograms {
    /// The program in our pinned TCX link.
    pub tcx: Option<u32>,
    /// The program in our clsact filter.
    pub netlink: Option<u32>,
}

/// The kernel's run-time accounting of a program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgramRunStats {
    /// Total time spent in the program, ns.
    pub run_time_ns: u64,
    /// Number of runs.
    pub run_cnt: u64,
}

/// What a test run returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRunOutput {
    /// The program's return value (`TC_ACT_*`, or the socket filter's verdict).
    pub return_value: u32,
    /// The packet after the run.
    pub packet: Vec<u8>,
    /// `skb->mark` after the run.
    pub mark: u32,
    /// The kernel-measured duration per repetition.
    pub duration: Duration,
}

/// `TC_ACT_UNSPEC` as returned in [`TestRunOutput::return_value`].
pub const TC_ACT_UNSPEC: u32 = u32::MAX;
/// `TC_ACT_SHOT`.
pub const TC_ACT_SHOT: u32 = 2;

/// BPF_PROG_TEST_RUN flag `BPF_F_TEST_SKB_CHECKSUM_COMPLETE` (Linux >= 6.11): the skb is
/// `CHECKSUM_COMPLETE`, `skb->csum` covering the packet from its network header, and the kernel
/// fails the run with `EBADMSG` when the program leaves `skb->csum` inconsistent with the packet.
pub const TEST_RUN_CHECKSUM_COMPLETE: u32 = 1 << 2;

#[derive(Debug)]
struct AttachedDevice {
    kind: DeviceKind,
    mode: TcAttachMode,
    /// TCX links (ingress, egress), held open while attached; empty on the netlink path.
    _links: Vec<Link>,
}

#[derive(Debug)]
struct AttachedProbe<K> {
    kind: K,
    /// Why each flavour tried before `kind` did not attach.
    passed_over: Vec<String>,
    link: Link,
    _object: Object,
}

/// The loaded datapath. Dropping it leaves everything attached and pinned (a restarted agent
/// relies on that); [`Datapath::detach_tc`], [`Datapath::detach_ipvs_probe`] and [`remove_pins`]
/// undo it.
#[derive(Debug)]
pub struct Datapath {
    object: Object,
    options: DatapathOptions,
    tcx_attach_types: bool,
    direct_writes: bool,
    map_reuse: Vec<MapReuse>,
    maps: DatapathMaps,
    devices: BTreeMap<u32, AttachedDevice>,
    probe: Option<AttachedProbe<ProbeKind>>,
    free_probe: Option<AttachedProbe<FreeProbeKind>>,
}

fn object_error(
    object: &'static str,
    action: &'static str,
) -> impl FnOnce(libbpf_rs::Error) -> Error {
    move |source| Error::Object {
        object,
        action,
        source,
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io {
        action,
        path,
        source,
    }
}

/// `(major, minor)` of the running kernel, from `/proc/sys/kernel/osrelease`.
pub fn kernel_version() -> Option<(u32, u32)> {
    crate::features::parse_release(&fs::read_to_string("/proc/sys/kernel/osrelease").ok()?)
}

/// Whether the running kernel has TCX (6.6 and later).
pub fn kernel_has_tcx() -> bool {
    kernel_version().is_some_and(|v| v >= crate::features::TCX_KERNEL)
}

/// Loads an opened object into the kernel; a failure carries libbpf's last warnings (the end
/// of the verifier log among them) when its messages are routed ([`crate::libbpf_log`]).
fn load_object(open: OpenObject, object: &'static str) -> Result<Object> {
    crate::libbpf_log::clear_warnings();
    open.load().map_err(|source| Error::Load {
        object,
        source,
        log: crate::libbpf_log::take_warnings(),
    })
}

/// Whether the kernel has the `bpf_cast_to_kern_ctx` kfunc (Linux 6.2+), which `nat_write`
/// needs to read the skb's checksum state: looked up in the kernel's BTF.
pub fn kernel_has_kern_ctx() -> bool {
    libbpf_rs::btf::Btf::from_vmlinux().is_ok_and(|btf| {
        btf.type_by_name::<libbpf_rs::btf::types::Func<'_>>("bpf_cast_to_kern_ctx")
            .is_some()
    })
}

/// Sets each map's size: the pinned map's own when one exists (libbpf then reuses it), else the
/// requested size. A pinned `stats` (or `drop_last`, indexed like it) with fewer counters than
/// the object's (an agent from before a counter was added) is unpinned instead, so a new one is
/// created: the counters restart at
/// zero (programs still attached keep counting in the old one until they are replaced), where
/// reusing it would leave the new counters without a slot.
fn size_maps(
    open: &mut OpenObject,
    pin_root: &Path,
    sizes: &MapSizes,
    object: &'static str,
) -> Result<Vec<MapReuse>> {
    let mut reuse = Vec::new();
    for mut map in open.maps_mut() {
        let name = map.name().to_string_lossy().into_owned();
        if !map_names::ALL.contains(&name.as_str()) {
            continue;
        }
        let requested = sizes.for_map(&name);
        let pinned = pin_root.join(&name);
        if (name == map_names::STATS || name == map_names::DROP_LAST) && pinned.exists() {
            let handle = MapHandle::from_pinned_path(&pinned).map_err(|source| Error::Map {
                map: name.clone(),
                action: "open pinned",
                source,
            })?;
            if handle.max_entries() < map.max_entries() {
                fs::remove_file(&pinned).map_err(io_error("remove", &pinned))?;
            }
        }
        let (reused, max_entries) = if pinned.exists() {
            let handle = MapHandle::from_pinned_path(&pinned).map_err(|source| Error::Map {
                map: name.clone(),
                action: "open pinned",
                source,
            })?;
            (true, handle.max_entries())
        } else {
            (false, requested.unwrap_or_else(|| map.max_entries()))
        };
        map.set_max_entries(max_entries)
            .map_err(object_error(object, "set map size"))?;
        reuse.push(MapReuse {
            name,
            reused,
            requested_max_entries: requested,
            max_entries,
        });
    }
    Ok(reuse)
}

fn open_datapath(
    options: &DatapathOptions,
    tcx: bool,
    direct_writes: bool,
) -> Result<(Object, Vec<MapReuse>)> {
    let mut builder = ObjectBuilder::default();
    builder
        .pin_root_path(&options.pin_root)
        .map_err(object_error("datapath", "set pin root"))?;
    let mut open = builder
        .open_memory(DATAPATH_OBJECT)
        .map_err(object_error("datapath", "open"))?;
    let reuse = size_maps(&mut open, &options.pin_root, &options.map_sizes, "datapath")?;
    for mut prog in open.progs_mut() {
        if NAT_WRITERS.iter().any(|(writer, _)| prog.name() == *writer) {
            prog.set_autoload(direct_writes);
        }
    }
    if tcx {
        for mut prog in open.progs_mut() {
            let attach = match prog.name().to_str() {
                Some("tc_ingress" | "tc_ingress_l3" | "nat_write_ingress") => {
                    ProgramAttachType::TcxIngress
                }
                Some("tc_egress" | "tc_egress_l3" | "nat_write_egress") => {
                    ProgramAttachType::TcxEgress
                }
                _ => continue,
            };
            prog.set_attach_type(attach);
        }
    }
    let object = load_object(open, "datapath")?;
    Ok((object, reuse))
}

fn find_program<'obj>(object: &'obj Object, name: &'static str) -> Result<ProgramMut<'obj>> {
    object
        .progs_mut()
        .find(|p| p.name() == name)
        .ok_or(Error::MissingProgram(name))
}

fn map_handle(object: &Object, name: &'static str) -> Result<MapHandle> {
    let map = object
        .maps()
        .find(|m| m.name() == name)
        .ok_or(Error::MissingMap(name))?;
    MapHandle::try_from(&map).map_err(|source| Error::Map {
        map: name.to_owned(),
        action: "duplicate handle",
        source,
    })
}

/// The typed maps of a loaded datapath object, and the configuration's loader fields written:
/// the SNAT table's hash seed (kept when the table was reused from its pins, a new random one
/// otherwise), its sizes, and `CFG_F_DIRECT_WRITES` when the writers are installed.
fn datapath_maps(
    object: &Object,
    table_reused: bool,
    filter_reused: bool,
    direct_writes: bool,
    new_seed: Option<u32>,
) -> Result<DatapathMaps> {
    let config: TypedMap<u32, Config> =
        TypedMap::from_handle(map_handle(object, map_names::CONFIG)?)?;
    let current = config.get(&0)?.unwrap_or_default();
    let seed = if table_reused && current.nat_seed != 0 {
        current.nat_seed
    } else {
        new_seed.unwrap_or_else(random_seed)
    };
    let handles = SnatHandles {
        records: map_handle(object, map_names::SNAT_RECORDS)?,
        fwd: map_handle(object, map_names::SNAT_FWD)?,
        rev: map_handle(object, map_names::SNAT_REV)?,
        locks: map_handle(object, map_names::SNAT_LOCKS)?,
    };
    let maps = DatapathMaps {
        svc_ports: TypedMap::from_handle(map_handle(object, map_names::SVC_PORTS)?)?,
        svc_addrs: TypedMap::from_handle(map_handle(object, map_names::SVC_ADDRS)?)?,
        src_ranges: TypedMap::from_handle(map_handle(object, map_names::SRC_RANGES)?)?,
        cluster_cidrs: TypedMap::from_handle(map_handle(object, map_names::CLUSTER_CIDRS)?)?,
        devices: TypedMap::from_handle(map_handle(object, map_names::DEVICES)?)?,
        device_slots: TypedMap::from_handle(map_handle(object, map_names::DEVICE_SLOTS)?)?,
        config,
        snat: SnatTable::open(&handles, seed)?,
        conns: TypedMap::from_handle(map_handle(object, map_names::CONNS)?)?,
        frags: TypedMap::from_handle(map_handle(object, map_names::FRAGS)?)?,
        stats: PerCpuArray::from_handle(map_handle(object, map_names::STATS)?)?,
        drop_last: Some(PerCpuArray::from_handle(map_handle(
            object,
            map_names::DROP_LAST,
        )?)?),
        switch_flows: Some(TypedMap::from_handle(map_handle(
            object,
            map_names::SWITCH_FLOWS,
        )?)?),
        port_filter: Some(PortFilter::open(&map_handle(
            object,
            map_names::PORT_FILTER,
        )?)?),
        owned_flags: if direct_writes {
            CFG_F_DIRECT_WRITES
        } else {
            0
        },
    };
    // The loader's fields; the agent's (all zero on a new map: programs inert) are kept. A new
    // port filter is empty: the programs must not trust it until the agent fills it.
    let mut config = maps.complete(&Config {
        flags: current.flags & !CFG_F_DIRECT_WRITES,
        ..current
    });
    if !filter_reused {
        config.flags &= !CFG_F_PORT_FILTER;
    }
    maps.config.insert(&0, &config)?;
    Ok(maps)
}

/// A nonzero random 32-bit seed from the kernel.
fn random_seed() -> u32 {
    let mut bytes = [0u8; 4];
    // SAFETY: getrandom writes at most bytes.len() bytes into the buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    let seed = if n == 4 {
        u32::from_ne_bytes(bytes)
    } else {
        // getrandom cannot fail for 4 bytes once the pool is up; fall back to the clock.
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0x2545_f491, |d| d.subsec_nanos())
    };
    seed.max(1)
}

/// Puts each `nat_write_*` program into slot 0 of its `nat_writers_*` array, the tail call every
/// translation goes through.
fn install_nat_writers(object: &Object) -> Result<()> {
    for (writer, array) in NAT_WRITERS {
        let program = find_program(object, writer)?;
        let fd = program.as_fd().as_raw_fd();
        let map = object
            .maps()
            .find(|m| m.name() == array)
            .ok_or(Error::MissingMap(array))?;
        map.update(
            &0u32.to_ne_bytes(),
            &fd.to_ne_bytes(),
            libbpf_rs::MapFlags::ANY,
        )
        .map_err(|source| Error::Map {
            map: array.to_owned(),
            action: "install the direct-write program",
            source,
        })?;
    }
    Ok(())
}

/// Pins `xt_svc` under a temporary name and renames it over the final pin (atomic on bpffs;
/// bpffs refuses dots in names).
fn pin_xt_svc(object: &Object, pin_root: &Path) -> Result<()> {
    let target = pin_root.join(XT_SVC_PIN_NAME);
    let temporary = pin_root.join(format!("{XT_SVC_PIN_NAME}_new_{}", std::process::id()));
    if temporary.exists() {
        fs::remove_file(&temporary).map_err(io_error("remove", &temporary))?;
    }
    let mut program = find_program(object, DatapathProgram::XtSvc.name())?;
    program.pin(&temporary).map_err(|source| Error::Pin {
        path: temporary.clone(),
        source,
    })?;
    fs::rename(&temporary, &target).map_err(io_error("rename pin", &target))
}

/// Creates a TCX link (appended after the device's other TCX programs).
fn tcx_attach(program: &Program<'_>, ifindex: u32) -> std::result::Result<Link, libbpf_rs::Error> {
    let ifindex = i32::try_from(ifindex)
        .map_err(|_| libbpf_rs::Error::from(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    let opts = libbpf_rs::libbpf_sys::bpf_tcx_opts {
        sz: size_of::<libbpf_rs::libbpf_sys::bpf_tcx_opts>() as _,
        ..Default::default()
    };
    // SAFETY: the program pointer is valid for the borrow of `program`, and `opts` outlives the
    // call; libbpf returns a new link or NULL with errno set.
    let link = unsafe {
        libbpf_rs::libbpf_sys::bpf_program__attach_tcx(
            program.as_libbpf_object().as_ptr(),
            ifindex,
            &opts,
        )
    };
    match NonNull::new(link) {
        // SAFETY: a non-NULL pointer from bpf_program__attach_tcx is a valid link we now own.
        Some(link) => Ok(unsafe { Link::from_ptr(link) }),
        None => Err(libbpf_rs::Error::from(std::io::Error::last_os_error())),
    }
}

fn is_unsupported(error: &libbpf_rs::Error) -> bool {
    matches!(
        error.kind(),
        libbpf_rs::ErrorKind::InvalidInput | libbpf_rs::ErrorKind::Unsupported
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

fn clsact_hook(program: &Program<'_>, ifindex: u32, direction: Direction) -> TcHook {
    let mut hook = TcHook::new(program.as_fd());
    hook.ifindex(ifindex as i32)
        .handle(CLSACT_HANDLE)
        .priority(CLSACT_PRIORITY)
        .attach_point(match direction {
            Direction::Ingress => TC_INGRESS,
            Direction::Egress => TC_EGRESS,
        });
    hook
}

impl Datapath {
    /// Opens the datapath object, sizes its maps (reusing every map pinned under
    /// `options.pin_root`), loads it, and pins `xt_svc`. Nothing is attached yet. A pin root
    /// outside bpffs is refused first ([`Error::PinRootNotBpffs`]): libbpf would only say
    /// "Invalid argument" or "No such file or directory".
    pub fn load(options: DatapathOptions) -> Result<Datapath> {
        crate::features::check_pin_root(&options.pin_root)?;
        fs::create_dir_all(&options.pin_root).map_err(io_error("create", &options.pin_root))?;
        let tcx_attach_types = match options.tc_attach {
            TcAttachPolicy::Netlink => false,
            TcAttachPolicy::Tcx => true,
            TcAttachPolicy::Auto => kernel_has_tcx(),
        };
        let direct_writes = match options.rewrite {
            RewritePolicy::Helpers => false,
            RewritePolicy::Auto => kernel_has_kern_ctx(),
        };
        let (object, map_reuse) = open_datapath(&options, tcx_attach_types, direct_writes)?;
        if direct_writes {
            install_nat_writers(&object)?;
        }
        pin_xt_svc(&object, &options.pin_root)?;
        let table_reused = map_reuse
            .iter()
            .filter(|r| r.name.starts_with("snat_"))
            .all(|r| r.reused);
        let filter_reused = map_reuse
            .iter()
            .any(|r| r.name == map_names::PORT_FILTER && r.reused);
        let maps = datapath_maps(
            &object,
            table_reused,
            filter_reused,
            direct_writes,
            options.nat_seed,
        )?;
        Ok(Datapath {
            object,
            options,
            tcx_attach_types,
            direct_writes,
            map_reuse,
            maps,
            devices: BTreeMap::new(),
            probe: None,
            free_probe: None,
        })
    }

    /// Whether translated packets are rewritten by `nat_write` (direct writes) rather than
    /// the helpers (see [`RewritePolicy`]).
    pub fn direct_writes(&self) -> bool {
        self.direct_writes
    }

    /// The pin root.
    pub fn pin_root(&self) -> &Path {
        &self.options.pin_root
    }

    /// Path of the pinned `xt_svc` program (for `-m bpf --object-pinned`).
    pub fn xt_svc_pin_path(&self) -> PathBuf {
        self.options.pin_root.join(XT_SVC_PIN_NAME)
    }

    /// Per map: reused from a pin or created, and its size.
    pub fn map_reuse(&self) -> &[MapReuse] {
        &self.map_reuse
    }

    /// Typed handles on every map.
    pub fn maps(&self) -> &DatapathMaps {
        &self.maps
    }

    /// Every counter summed over CPUs.
    pub fn stats(&self) -> Result<Stats> {
        self.maps.stats()
    }

    fn tcx_link_path(&self, ifindex: u32, direction: Direction) -> PathBuf {
        self.options
            .pin_root
            .join(LINKS_DIR)
            .join(format!("tcx_{ifindex}_{}", direction.label()))
    }

    fn links_dir(&self) -> Result<PathBuf> {
        let dir = self.options.pin_root.join(LINKS_DIR);
        fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
        Ok(dir)
    }

    /// Attaches one direction by TCX: swaps the program inside the pinned link when there is
    /// one (atomic), else creates and pins a link.
    fn attach_tcx_direction(
        &self,
        program: DatapathProgram,
        ifindex: u32,
        direction: Direction,
    ) -> Result<Link> {
        let prog = find_program(&self.object, program.name())?;
        let path = self.tcx_link_path(ifindex, direction);
        let attach_error = |source| Error::TcAttach {
            program: program.name(),
            ifindex,
            mode: "tcx",
            source,
        };
        if path.exists() {
            if let Ok(mut link) = Link::open(&path) {
                if link.update_prog(&prog).is_ok() {
                    return Ok(link);
                }
                // A defunct link (its device went away, the ifindex was reused): replace it.
                let _ = link.detach();
            }
            fs::remove_file(&path).map_err(io_error("remove stale link", &path))?;
        }
        self.links_dir()?;
        let mut link = tcx_attach(&prog, ifindex).map_err(attach_error)?;
        link.pin(&path).map_err(|source| Error::Pin {
            path: path.clone(),
            source,
        })?;
        Ok(link)
    }

    fn attach_netlink_direction(
        &self,
        program: DatapathProgram,
        ifindex: u32,
        direction: Direction,
    ) -> Result<()> {
        let prog = find_program(&self.object, program.name())?;
        let attach_error = |source| Error::TcAttach {
            program: program.name(),
            ifindex,
            mode: "netlink",
            source,
        };
        let mut hook = clsact_hook(&prog, ifindex, direction);
        hook.create().map_err(attach_error)?;
        hook.replace(true);
        hook.attach().map_err(attach_error)?;
        Ok(())
    }

    /// Removes our clsact filter of one direction, if present.
    fn detach_netlink_direction(&self, ifindex: u32, direction: Direction) -> Result<()> {
        let prog = find_program(&self.object, DatapathProgram::TcIngress.name())?;
        let mut hook = clsact_hook(&prog, ifindex, direction);
        if hook.query().is_err() {
            return Ok(());
        }
        hook.detach().map_err(|source| Error::TcDetach {
            ifindex,
            mode: "netlink",
            source,
        })
    }

    /// Removes the pinned TCX link of one direction, if present.
    fn detach_tcx_direction(&self, ifindex: u32, direction: Direction) -> Result<()> {
        let path = self.tcx_link_path(ifindex, direction);
        if !path.exists() {
            return Ok(());
        }
        if let Ok(link) = Link::open(&path) {
            // A defunct link cannot be detached again; its pin is removed all the same.
            let _ = link.detach();
        }
        fs::remove_file(&path).map_err(io_error("remove link pin", &path))
    }

    fn attach_tcx_device(&self, ifindex: u32, kind: DeviceKind) -> Result<Vec<Link>> {
        let (ingress, egress) = kind.programs();
        let ingress_link = self.attach_tcx_direction(ingress, ifindex, Direction::Ingress)?;
        let egress_link = self.attach_tcx_direction(egress, ifindex, Direction::Egress)?;
        Ok(vec![ingress_link, egress_link])
    }

    /// Attaches the TC programs for `kind` to both directions of device `ifindex`, replacing
    /// whatever version of them is attached (atomically, see the module documentation). With
    /// [`TcAttachPolicy::Auto`], TCX is used where it works and netlink clsact otherwise. A
    /// leftover attachment of the other mechanism is removed afterwards.
    pub fn attach_tc(&mut self, ifindex: u32, kind: DeviceKind) -> Result<TcAttachMode> {
        let (mode, links) = match self.options.tc_attach {
            TcAttachPolicy::Netlink => (TcAttachMode::Netlink, Vec::new()),
            TcAttachPolicy::Tcx => (TcAttachMode::Tcx, self.attach_tcx_device(ifindex, kind)?),
            TcAttachPolicy::Auto if !self.tcx_attach_types => (TcAttachMode::Netlink, Vec::new()),
            TcAttachPolicy::Auto => match self.attach_tcx_device(ifindex, kind) {
                Ok(links) => (TcAttachMode::Tcx, links),
                Err(Error::TcAttach { source, .. }) if is_unsupported(&source) => {
                    (TcAttachMode::Netlink, Vec::new())
                }
                Err(error) => return Err(error),
            },
        };
        let (ingress, egress) = kind.programs();
        match mode {
            TcAttachMode::Netlink => {
                self.attach_netlink_direction(ingress, ifindex, Direction::Ingress)?;
                self.attach_netlink_direction(egress, ifindex, Direction::Egress)?;
                self.detach_tcx_direction(ifindex, Direction::Ingress)?;
                self.detach_tcx_direction(ifindex, Direction::Egress)?;
            }
            TcAttachMode::Tcx => {
                self.detach_netlink_direction(ifindex, Direction::Ingress)?;
                self.detach_netlink_direction(ifindex, Direction::Egress)?;
            }
        }
        self.devices.insert(
            ifindex,
            AttachedDevice {
                kind,
                mode,
                _links: links,
            },
        );
        Ok(mode)
    }

    /// Detaches our TC programs from device `ifindex` (both mechanisms, whoever attached them).
    pub fn detach_tc(&mut self, ifindex: u32) -> Result<()> {
        self.devices.remove(&ifindex);
        for direction in [Direction::Ingress, Direction::Egress] {
            self.detach_tcx_direction(ifindex, direction)?;
            self.detach_netlink_direction(ifindex, direction)?;
        }
        Ok(())
    }

    /// Collects pinned TCX links that hold a program for nothing: every `links/tcx_<ifindex>_*`
    /// whose device `keep` refuses (gone, or no longer one the programs belong on), and every
    /// link the kernel reports defunct (its device was deleted; the index may be in use again).
    /// Such a pin keeps its link, and with it an old program and that program's own maps,
    /// until reboot. Each is detached and unpinned; returns the pins removed.
    pub fn remove_stale_tcx_links(&mut self, keep: impl Fn(u32) -> bool) -> Result<Vec<PathBuf>> {
        let dir = self.options.pin_root.join(LINKS_DIR);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error("list", &dir)(e)),
        };
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let Some(ifindex) = tcx_link_ifindex(&entry.file_name().to_string_lossy()) else {
                continue;
            };
            let path = entry.path();
            let link = Link::open(&path).ok();
            let defunct = link.as_ref().is_some_and(|link| {
                matches!(link.info(), Ok(info) if matches!(
                    info.info,
                    libbpf_rs::query::LinkTypeInfo::Tcx(ref tcx) if tcx.ifindex != ifindex
                ))
            });
            if keep(ifindex) && !defunct && link.is_some() {
                continue;
            }
            if let Some(link) = link {
                // A defunct link cannot be detached again; its pin is removed all the same.
                let _ = link.detach();
            }
            if defunct || !keep(ifindex) {
                // Our own open links of the device go too (they hold the program as well).
                if self
                    .devices
                    .get(&ifindex)
                    .is_some_and(|d| d.mode == TcAttachMode::Tcx)
                {
                    self.devices.remove(&ifindex);
                }
            }
            fs::remove_file(&path).map_err(io_error("remove stale link pin", &path))?;
            removed.push(path);
        }
        removed.sort();
        Ok(removed)
    }

    /// What is wrong with the attachment of device `ifindex` this `Datapath` made, as the kernel
    /// reports it (empty: both directions run our programs): the pinned TCX link must exist, be
    /// attached to the device and run our program; or the clsact filter with our handle and
    /// priority must exist and run our program.
    pub fn verify_tc(&self, ifindex: u32) -> Result<Vec<String>> {
        let Some(device) = self.devices.get(&ifindex) else {
            return Ok(vec!["not attached by this datapath".to_owned()]);
        };
        let (ingress, egress) = device.kind.programs();
        let mut problems = Vec::new();
        for (program, direction) in [(ingress, Direction::Ingress), (egress, Direction::Egress)] {
            let want = self.program_id(program)?;
            let dir = direction.label();
            match device.mode {
                TcAttachMode::Tcx => {
                    let path = self.tcx_link_path(ifindex, direction);
                    let info = Link::open(&path).ok().and_then(|link| link.info().ok());
                    match info {
                        None => problems.push(format!("no pinned TCX {dir} link")),
                        Some(info) => {
                            let on = match info.info {
                                libbpf_rs::query::LinkTypeInfo::Tcx(ref tcx) => tcx.ifindex,
                                _ => 0,
                            };
                            if on != ifindex {
                                problems.push(format!("TCX {dir} link detached (device {on})"));
                            } else if info.prog_id != want {
                                problems.push(format!(
                                    "TCX {dir} link runs program {}, not ours ({want})",
                                    info.prog_id
                                ));
                            }
                        }
                    }
                }
                TcAttachMode::Netlink => {
                    let prog = find_program(&self.object, program.name())?;
                    match clsact_hook(&prog, ifindex, direction).query() {
                        Ok(id) if id == want => {}
                        Ok(id) => problems.push(format!(
                            "clsact {dir} filter runs program {id}, not ours ({want})"
                        )),
                        Err(_) => problems.push(format!("no clsact {dir} filter")),
                    }
                }
            }
        }
        Ok(problems)
    }

    /// Devices this `Datapath` attached: ifindex, kind, mode.
    pub fn attached_devices(&self) -> impl Iterator<Item = (u32, DeviceKind, TcAttachMode)> + '_ {
        self.devices
            .iter()
            .map(|(&ifindex, device)| (ifindex, device.kind, device.mode))
    }

    /// The kernel ids of our programs attached to one direction of a device, per mechanism
    /// (whoever attached them: the pinned TCX link, and the clsact filter with our handle and
    /// priority).
    pub fn attached_programs(&self, ifindex: u32, ingress: bool) -> Result<AttachedPrograms> {
        let direction = if ingress {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        let path = self.tcx_link_path(ifindex, direction);
        let tcx = path
            .exists()
            .then(|| Link::open(&path).ok())
            .flatten()
            .and_then(|link| link.info().ok())
            .map(|info| info.prog_id);
        let prog = find_program(&self.object, DatapathProgram::TcIngress.name())?;
        let mut hook = clsact_hook(&prog, ifindex, direction);
        let netlink = hook.query().ok();
        Ok(AttachedPrograms { tcx, netlink })
    }

    /// The kernel's id of one of our loaded programs.
    pub fn program_id(&self, program: DatapathProgram) -> Result<u32> {
        let prog = find_program(&self.object, program.name())?;
        Program::id_from_fd(prog.as_fd()).map_err(|source| Error::Program {
            program: program.name(),
            action: "get id",
            source,
        })
    }

    /// The kernel's run-time accounting of one of our programs (`run_time_ns`/`run_cnt` move
    /// only while `kernel.bpf_stats_enabled` is 1).
    pub fn program_run_stats(&self, program: DatapathProgram) -> Result<ProgramRunStats> {
        let id = self.program_id(program)?;
        libbpf_rs::query::ProgInfoIter::default()
            .find(|info| info.id == id)
            .map(|info| ProgramRunStats {
                run_time_ns: info.run_time_ns,
                run_cnt: info.run_cnt,
            })
            .ok_or(Error::MissingProgram(program.name()))
    }

    /// Loads the probe object with only `program` in it and attaches that program.
    fn try_probe(
        &self,
        program: &'static str,
        kprobe: Option<(bool, &str)>,
    ) -> Result<(Object, Link)> {
        let mut builder = ObjectBuilder::default();
        builder
            .pin_root_path(&self.options.pin_root)
            .map_err(object_error("ipvs_probe", "set pin root"))?;
        let mut open = builder
            .open_memory(IPVS_PROBE_OBJECT)
            .map_err(object_error("ipvs_probe", "open"))?;
        size_maps(
            &mut open,
            &self.options.pin_root,
            &self.options.map_sizes,
            "ipvs_probe",
        )?;
        for mut prog in open.progs_mut() {
            let wanted = prog.name() == program;
            prog.set_autoload(wanted);
        }
        let object = load_object(open, "ipvs_probe")?;
        let loaded = find_program(&object, program)?;
        let link = match kprobe {
            None => loaded.attach_trace(),
            Some((retprobe, function)) => loaded.attach_kprobe(retprobe, function),
        }
        .map_err(object_error("ipvs_probe", "attach"))?;
        Ok((object, link))
    }

    /// Attaches the first of `candidates` that loads and attaches (`try_one`), pinned as
    /// `link_name` under [`LINKS_DIR`]: the new link is attached before a previous one (pinned by
    /// an earlier run, or `previous`) is detached.
    fn attach_pinned_probe<K: Copy + std::fmt::Debug>(
        &self,
        candidates: &[K],
        link_name: &str,
        previous: Option<AttachedProbe<K>>,
        try_one: impl Fn(K) -> Result<(Object, Link)>,
    ) -> Result<AttachedProbe<K>> {
        let mut failures = Vec::new();
        for &kind in candidates {
            match try_one(kind) {
                Ok((object, mut link)) => {
                    let path = self.links_dir()?.join(link_name);
                    self.remove_link_pin(link_name)?;
                    if let Some(previous) = previous {
                        let _ = previous.link.detach();
                    }
                    link.pin(&path).map_err(|source| Error::Pin {
                        path: path.clone(),
                        source,
                    })?;
                    return Ok(AttachedProbe {
                        kind,
                        passed_over: failures,
                        link,
                        _object: object,
                    });
                }
                Err(error) => {
                    // libbpf's error keeps the kernel's errno in its sources.
                    let mut reason = error.to_string();
                    let mut source = std::error::Error::source(&error);
                    while let Some(cause) = source {
                        reason = format!("{reason}: {cause}");
                        source = cause.source();
                    }
                    failures.push(format!("{kind:?}: {reason}"))
                }
            }
        }
        Err(Error::ProbeUnavailable(failures.join("; ")))
    }

    fn require_ip_vs() -> Result<()> {
        if Path::new("/sys/module/ip_vs").exists() {
            Ok(())
        } else {
            Err(Error::ProbeUnavailable(
                "the ip_vs module is not loaded (/sys/module/ip_vs is missing)".to_owned(),
            ))
        }
    }

    /// Attaches the IPVS connection probe: fexit on `ip_vs_conn_new`, then on `ip_vs_schedule`
    /// (when allowed by `preference`), then kretprobe. The new probe is attached before a
    /// previous one (pinned by an earlier run) is detached. Returns the flavour attached.
    pub fn attach_ipvs_probe(&mut self, preference: ProbePreference) -> Result<ProbeKind> {
        Self::require_ip_vs()?;
        let candidates: &[ProbeKind] = match preference {
            ProbePreference::Auto => &[
                ProbeKind::Fexit,
                ProbeKind::FexitSchedule,
                ProbeKind::Kretprobe,
            ],
            ProbePreference::Fexit => &[ProbeKind::Fexit, ProbeKind::FexitSchedule],
            ProbePreference::Kretprobe => &[ProbeKind::Kretprobe],
        };
        let previous = self.probe.take();
        let probe = self.attach_pinned_probe(candidates, PROBE_LINK_NAME, previous, |kind| {
            let kprobe = (kind == ProbeKind::Kretprobe).then_some((true, PROBE_TARGET_FUNCTION));
            self.try_probe(kind.program(), kprobe)
        })?;
        let kind = probe.kind;
        self.probe = Some(probe);
        Ok(kind)
    }

    /// The IPVS probe flavour attached by this `Datapath`, if any.
    pub fn ipvs_probe(&self) -> Option<ProbeKind> {
        self.probe.as_ref().map(|p| p.kind)
    }

    /// Why each flavour preferred to the attached one did not attach ("Fexit: …").
    pub fn ipvs_probe_passed_over(&self) -> &[String] {
        self.probe.as_ref().map_or(&[], |p| &p.passed_over)
    }

    /// Attaches the probe on IPVS freeing a connection (`ip_vs_conn_rcu_free`), which removes
    /// the connection's `conns` entry: fentry, then kprobe, pinned beside the connection probe.
    /// Returns the flavour attached.
    pub fn attach_ipvs_free_probe(&mut self) -> Result<FreeProbeKind> {
        Self::require_ip_vs()?;
        let previous = self.free_probe.take();
        let probe = self.attach_pinned_probe(
            &[FreeProbeKind::Fentry, FreeProbeKind::Kprobe],
            FREE_PROBE_LINK_NAME,
            previous,
            |kind| {
                let kprobe =
                    (kind == FreeProbeKind::Kprobe).then_some((false, FREE_PROBE_TARGET_FUNCTION));
                self.try_probe(kind.program(), kprobe)
            },
        )?;
        let kind = probe.kind;
        self.free_probe = Some(probe);
        Ok(kind)
    }

    /// The flavour of the probe on IPVS freeing a connection attached by this `Datapath`.
    pub fn ipvs_free_probe(&self) -> Option<FreeProbeKind> {
        self.free_probe.as_ref().map(|p| p.kind)
    }

    /// Why each flavour of it preferred to the attached one did not attach.
    pub fn ipvs_free_probe_passed_over(&self) -> &[String] {
        self.free_probe.as_ref().map_or(&[], |p| &p.passed_over)
    }

    /// Detaches the probe on IPVS freeing a connection (ours, or one pinned by an earlier run).
    pub fn detach_ipvs_free_probe(&mut self) -> Result<()> {
        if let Some(probe) = self.free_probe.take() {
            let _ = probe.link.detach();
        }
        self.remove_link_pin(FREE_PROBE_LINK_NAME)
    }

    /// Detaches and unpins the pinned link `name` under [`LINKS_DIR`], if any.
    fn remove_link_pin(&self, name: &str) -> Result<()> {
        let path = self.options.pin_root.join(LINKS_DIR).join(name);
        if path.exists() {
            if let Ok(link) = Link::open(&path) {
                let _ = link.detach();
            }
            fs::remove_file(&path).map_err(io_error("remove probe pin", &path))?;
        }
        Ok(())
    }

    /// Detaches the IPVS probes, the connection probe and the probe on its free (ours, or
    /// ones pinned by an earlier run).
    pub fn detach_ipvs_probe(&mut self) -> Result<()> {
        if let Some(probe) = self.probe.take() {
            let _ = probe.link.detach();
        }
        self.remove_link_pin(PROBE_LINK_NAME)?;
        self.detach_ipvs_free_probe()
    }

    /// Runs one of the datapath programs once on `packet` with BPF_PROG_TEST_RUN.
    ///
    /// The kernel treats `packet` as an Ethernet frame (it must be at least 14 bytes): TC
    /// programs see all of it (the `_l3` variants parse it as IP from its first byte), the
    /// socket filter `xt_svc` sees it from byte 14, as xt_bpf would from the IP header.
    pub fn test_run(
        &self,
        program: DatapathProgram,
        packet: &[u8],
        context: &SkbContext,
    ) -> Result<TestRunOutput> {
        self.test_run_repeat(program, packet, context, 1)
    }

    /// Runs one of the datapath programs `repeat` times on one skb made from `packet`
    /// (BPF_PROG_TEST_RUN with `repeat`): every run sees the packet, mark and map state the
    /// previous run left, and [`TestRunOutput::duration`] is the kernel's mean per run.
    pub fn test_run_repeat(
        &self,
        program: DatapathProgram,
        packet: &[u8],
        context: &SkbContext,
        repeat: u32,
    ) -> Result<TestRunOutput> {
        self.test_run_with_flags(program, packet, context, repeat, 0)
    }

    /// [`Datapath::test_run_repeat`] with BPF_PROG_TEST_RUN flags, e.g.
    /// [`TEST_RUN_CHECKSUM_COMPLETE`]. A kernel without a flag fails the run with `EINVAL`.
    pub fn test_run_with_flags(
        &self,
        program: DatapathProgram,
        packet: &[u8],
        context: &SkbContext,
        repeat: u32,
        flags: u32,
    ) -> Result<TestRunOutput> {
        let prog = find_program(&self.object, program.name())?;
        let mut context_in = skb_context_bytes(context);
        let mut context_out = vec![0u8; context_in.len()];
        let mut data_out = vec![0u8; packet.len() + 256];
        let input = ProgramInput {
            context_in: Some(&mut context_in),
            context_out: Some(&mut context_out),
            data_in: Some(packet),
            data_out: Some(&mut data_out),
            repeat: repeat.max(1),
            flags,
            ..ProgramInput::default()
        };
        let output = prog.test_run(input).map_err(|source| Error::TestRun {
            program: program.name(),
            source,
        })?;
        let packet = output.data.map(|d| d.to_vec()).unwrap_or_default();
        let mark = output.context.map_or(0, |c| read_u32(c, SKB_MARK_OFFSET));
        Ok(TestRunOutput {
            return_value: output.return_value,
            packet,
            mark,
            duration: output.duration,
        })
    }
}

/// Whether `name` is a layout directory's name: `v` and a number (`v1`, `v2`, …).
fn is_layout_name(name: &str) -> bool {
    name.len() > 1 && name.starts_with('v') && name[1..].bytes().all(|b| b.is_ascii_digit())
}

/// The device index of a pinned TCX link's file name (`tcx_<ifindex>_ingress|egress`).
pub fn tcx_link_ifindex(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("tcx_")?;
    let (index, direction) = rest.split_once('_')?;
    if direction != Direction::Ingress.label() && direction != Direction::Egress.label() {
        return None;
    }
    index.parse().ok()
}

/// Whether `name` is something a layout directory of ours holds at its top: a map of any
/// layout (`v1`'s are a subset of today's), `prog_xt_svc` (or its temporary pin
/// `prog_xt_svc_new_<pid>`, left by a crash between pin and rename), or [`LINKS_DIR`].
fn is_our_layout_entry(name: &str) -> bool {
    map_names::ALL.contains(&name)
        || name == XT_SVC_PIN_NAME
        || name == LINKS_DIR
        || name
            .strip_prefix(XT_SVC_PIN_NAME)
            .and_then(|r| r.strip_prefix("_new_"))
            .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `name` is a link pin of ours under [`LINKS_DIR`].
fn is_our_link_entry(name: &str) -> bool {
    name == PROBE_LINK_NAME || name == FREE_PROBE_LINK_NAME || tcx_link_ifindex(name).is_some()
}

/// Whether `dir` holds one of our layouts: the maps every layout has had (`config`,
/// `svc_ports`, `conns`) are pinned in it.
fn holds_our_layout(dir: &Path) -> bool {
    [map_names::CONFIG, map_names::SVC_PORTS, map_names::CONNS]
        .iter()
        .all(|m| dir.join(m).exists())
}

/// The other layout versions of ours pinned beside `pin_root`: only when `pin_root` is itself a
/// layout directory (`…/v<N>`), its sibling directories `v<M>` that hold our maps (see
/// `holds_our_layout`). What an agent of another layout left, to remove (with
/// [`remove_layout`]) once this one's programs are attached. A custom `--bpf-pin-root` not named
/// `v<N>` has no siblings of ours: nothing beside it is ever touched.
pub fn other_layouts(pin_root: &Path) -> Vec<PathBuf> {
    let (Some(parent), Some(own)) = (pin_root.parent(), pin_root.file_name()) else {
        return Vec::new();
    };
    if !is_layout_name(&own.to_string_lossy()) {
        return Vec::new();
    }
    let Ok(entries) = fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name() != own)
        .filter(|e| is_layout_name(&e.file_name().to_string_lossy()))
        .filter(|e| e.path().is_dir() && holds_our_layout(&e.path()))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// Removes one of our layouts (a directory [`other_layouts`] found): detaches and unpins its
/// links, unpins its maps and programs, and removes the directories left empty. Only names of
/// ours are removed: anything else in it stays, and is returned (to be logged).
pub fn remove_layout(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut left = Vec::new();
    let links = dir.join(LINKS_DIR);
    if links.is_dir() {
        for entry in fs::read_dir(&links)
            .map_err(io_error("list", &links))?
            .flatten()
        {
            let path = entry.path();
            if !is_our_link_entry(&entry.file_name().to_string_lossy()) {
                left.push(path);
                continue;
            }
            if let Ok(link) = Link::open(&path) {
                // A defunct link cannot be detached again; its pin is removed all the same.
                let _ = link.detach();
            }
            fs::remove_file(&path).map_err(io_error("remove link pin", &path))?;
        }
    }
    for entry in fs::read_dir(dir).map_err(io_error("list", dir))?.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == LINKS_DIR && path.is_dir() {
            // Fails when not empty: what is left in it is listed above.
            let _ = fs::remove_dir(&path);
        } else if is_our_layout_entry(&name) && !path.is_dir() {
            fs::remove_file(&path).map_err(io_error("remove pin", &path))?;
        } else {
            left.push(path);
        }
    }
    if left.is_empty() {
        fs::remove_dir(dir).map_err(io_error("remove", dir))?;
    }
    left.sort();
    Ok(left)
}

/// Removes everything pinned under `pin_root` (detaching pinned links first): the programs and
/// maps go away once nothing else uses them. Netlink clsact filters are per device: detach them
/// with [`Datapath::detach_tc`] first.
pub fn remove_pins(pin_root: &Path) -> Result<()> {
    let links = pin_root.join(LINKS_DIR);
    if let Ok(entries) = fs::read_dir(&links) {
        for entry in entries.flatten() {
            if let Ok(link) = Link::open(entry.path()) {
                let _ = link.detach();
            }
        }
    }
    if pin_root.exists() {
        fs::remove_dir_all(pin_root).map_err(io_error("remove", pin_root))?;
    }
    Ok(())
}

/// Offsets in the uapi `struct __sk_buff` (a stable ABI) of the fields a test run sets.
const SKB_MARK_OFFSET: usize = 8;
const SKB_INGRESS_IFINDEX_OFFSET: usize = 36;
const SKB_IFINDEX_OFFSET: usize = 40;
/// Room for `struct __sk_buff` (192 bytes on 6.18): the kernel wants the output buffer at least
/// as large as its own struct and accepts a longer input whose tail is zero.
const SKB_CONTEXT_SIZE: usize = 256;

fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    bytes
        .get(offset..offset + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_ne_bytes)
}

/// A `struct __sk_buff` as bytes with only the fields the kernel accepts from user space set.
fn skb_context_bytes(context: &SkbContext) -> Vec<u8> {
    let mut bytes = vec![0u8; SKB_CONTEXT_SIZE];
    let mut put = |offset: usize, value: u32| {
        if let Some(slot) = bytes.get_mut(offset..offset + 4) {
            slot.copy_from_slice(&value.to_ne_bytes());
        }
    };
    put(SKB_MARK_OFFSET, context.mark);
    put(SKB_IFINDEX_OFFSET, context.ifindex);
    put(SKB_INGRESS_IFINDEX_OFFSET, context.ingress_ifindex);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcx_link_names() {
        assert_eq!(tcx_link_ifindex("tcx_12_ingress"), Some(12));
        assert_eq!(tcx_link_ifindex("tcx_7_egress"), Some(7));
        assert_eq!(tcx_link_ifindex("tcx_7_sideways"), None);
        assert_eq!(tcx_link_ifindex("tcx_x_egress"), None);
        assert_eq!(tcx_link_ifindex("ipvs_probe"), None);
        assert!(is_our_layout_entry("prog_xt_svc_new_123"));
        assert!(!is_our_layout_entry("prog_xt_svc_new_"));
        assert!(!is_our_layout_entry("their_map"));
    }

    /// Plain files stand in for pins here (`probes/tests/attach.rs` has the bpffs version).
    #[test]
    fn only_our_layouts_beside_a_versioned_root_are_found_and_only_our_names_removed() {
        let base = std::env::temp_dir().join(format!("kib-layouts-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let ours = |dir: &Path| {
            fs::create_dir_all(dir.join(LINKS_DIR)).expect("mkdir");
            for m in ["config", "svc_ports", "conns", "snat_fwd", "prog_xt_svc"] {
                fs::write(dir.join(m), b"").expect("pin");
            }
            fs::write(dir.join(LINKS_DIR).join("tcx_3_ingress"), b"").expect("pin");
        };
        ours(&base.join("v1"));
        ours(&base.join("v10"));
        // v3: ours, with something foreign in it; v4: a foreign directory with a version name.
        ours(&base.join("v3"));
        fs::write(base.join("v3").join("their_map"), b"").expect("pin");
        fs::write(base.join("v3").join(LINKS_DIR).join("their_link"), b"").expect("pin");
        fs::create_dir_all(base.join("v4")).expect("mkdir");
        fs::write(base.join("v4").join("config"), b"").expect("pin");
        for dir in ["v2", "vx", "links"] {
            fs::create_dir_all(base.join(dir)).expect("mkdir");
        }
        fs::write(base.join("v5"), b"a file").expect("file");
        let found = other_layouts(&base.join("v2"));
        assert_eq!(
            found,
            vec![base.join("v1"), base.join("v10"), base.join("v3")]
        );
        // A custom pin root that is not a layout directory has no layouts beside it.
        assert!(other_layouts(&base.join("links")).is_empty());

        assert_eq!(
            remove_layout(&base.join("v1")).expect("remove"),
            Vec::<PathBuf>::new()
        );
        assert!(!base.join("v1").exists());
        let left = remove_layout(&base.join("v3")).expect("remove");
        assert_eq!(
            left,
            vec![
                base.join("v3").join(LINKS_DIR).join("their_link"),
                base.join("v3").join("their_map"),
            ]
        );
        assert!(!base.join("v3").join("config").exists());
        assert!(
            !base
                .join("v3")
                .join(LINKS_DIR)
                .join("tcx_3_ingress")
                .exists()
        );
        assert!(base.join("v4").join("config").exists());
        let _ = fs::remove_dir_all(&base);
    }
}
