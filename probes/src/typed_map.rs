//! Typed access to the datapath's maps over libbpf-rs `MapHandle`s: get, update with flags,
//! delete, key iteration and per-CPU lookups summed. [`DatapathMaps`] opens every pinned map by
//! path without loading any program, which is what `inspect` and the agent's reconcilers use; it
//! owns the writes that must keep two maps consistent (`devices` with `device_slots`) and the
//! fields of `config` that describe the SNAT table.

use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use libbpf_rs::{ErrorKind, MapCore, MapFlags, MapHandle};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::{Error, Result};
use crate::maps::{
    AddrKey, AddrValue, CidrKey, Config, ConnValue, Counter, DEVICE_SLOTS, DevSlot, DevValue,
    DropEvent, FragKey, FragValue, RangeKey, SnatEntry, Stats, SvcKey, SvcValue, SwitchFlow, Tuple,
    map_names,
};
use crate::nat_table::{SnatHandles, SnatTable};
use crate::port_filter::{PortFilter, PortKind};

/// A plain-old-data type that can be a map key or value.
pub trait MapPod: FromBytes + IntoBytes + Immutable + KnownLayout + Copy {}
impl<T: FromBytes + IntoBytes + Immutable + KnownLayout + Copy> MapPod for T {}

/// How an update treats an existing entry (`BPF_ANY`, `BPF_NOEXIST`, `BPF_EXIST`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateFlags {
    /// Create or replace.
    Any,
    /// Create only (fails with `EEXIST` if present).
    NoExist,
    /// Replace only (fails with `ENOENT` if absent).
    Exist,
}

impl UpdateFlags {
    fn map_flags(self) -> MapFlags {
        match self {
            UpdateFlags::Any => MapFlags::ANY,
            UpdateFlags::NoExist => MapFlags::NO_EXIST,
            UpdateFlags::Exist => MapFlags::EXIST,
        }
    }
}

/// A map whose keys are `K` and values `V`, sizes checked when opened.
#[derive(Debug)]
pub struct TypedMap<K, V> {
    handle: MapHandle,
    name: String,
    _types: PhantomData<fn() -> (K, V)>,
}

fn check_layout<K>(handle: &MapHandle, name: &str, value_size: usize) -> Result<()> {
    let key = size_of::<K>();
    if handle.key_size() as usize != key || handle.value_size() as usize != value_size {
        return Err(Error::MapLayout {
            map: name.to_owned(),
            key_size: handle.key_size(),
            value_size: handle.value_size(),
            expected_key: key,
            expected_value: value_size,
        });
    }
    Ok(())
}

fn open_pinned_handle(path: &Path) -> Result<(MapHandle, String)> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let handle = MapHandle::from_pinned_path(path).map_err(|source| Error::Map {
        map: name.clone(),
        action: "open pinned",
        source,
    })?;
    Ok((handle, name))
}

impl<K: MapPod, V: MapPod> TypedMap<K, V> {
    /// Wraps a handle, checking the map's key and value sizes against `K` and `V`.
    pub fn from_handle(handle: MapHandle) -> Result<Self> {
        let name = handle.name().to_string_lossy().into_owned();
        check_layout::<K>(&handle, &name, size_of::<V>())?;
        Ok(TypedMap {
            handle,
            name,
            _types: PhantomData,
        })
    }

    /// Opens a pinned map.
    pub fn open_pinned(path: &Path) -> Result<Self> {
        let (handle, name) = open_pinned_handle(path)?;
        check_layout::<K>(&handle, &name, size_of::<V>())?;
        Ok(TypedMap {
            handle,
            name,
            _types: PhantomData,
        })
    }

    /// The map's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The map's capacity.
    pub fn max_entries(&self) -> u32 {
        self.handle.max_entries()
    }

    /// The underlying handle.
    pub fn handle(&self) -> &MapHandle {
        &self.handle
    }

    fn error(&self, action: &'static str, source: libbpf_rs::Error) -> Error {
        Error::Map {
            map: self.name.clone(),
            action,
            source,
        }
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &K) -> Result<Option<V>> {
        let mut value = V::new_zeroed();
        let found = self
            .handle
            .lookup_into(key.as_bytes(), value.as_mut_bytes(), MapFlags::ANY)
            .map_err(|e| self.error("lookup", e))?;
        Ok(found.then_some(value))
    }

    /// Writes `key` → `value`.
    pub fn update(&self, key: &K, value: &V, flags: UpdateFlags) -> Result<()> {
        self.handle
            .update(key.as_bytes(), value.as_bytes(), flags.map_flags())
            .map_err(|e| self.error("update", e))
    }

    /// Creates or replaces `key` → `value`.
    pub fn insert(&self, key: &K, value: &V) -> Result<()> {
        self.update(key, value, UpdateFlags::Any)
    }

    /// Deletes `key`; `false` when it was absent.
    pub fn delete(&self, key: &K) -> Result<bool> {
        match self.handle.delete(key.as_bytes()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.error("delete", e)),
        }
    }

    /// Deletes `keys` (`BPF_MAP_DELETE_BATCH`: one system call for up to [`DELETE_BATCH`] keys,
    /// where [`TypedMap::delete`] makes one each); a key absent by then is skipped. Returns how
    /// many were deleted. One delete per key where the kernel has no batch operations for the
    /// map's type.
    pub fn delete_all(&self, keys: &[K]) -> Result<usize> {
        let mut deleted = 0;
        let mut rest = keys;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(DELETE_BATCH)];
            let mut count = chunk.len() as u32;
            let opts = batch_opts();
            // SAFETY: `chunk` holds `count` keys of the map's key size (checked when the map was
            // opened), which the kernel only reads; `opts` is a valid `bpf_map_batch_opts`.
            let ret = unsafe {
                libbpf_rs::libbpf_sys::bpf_map_delete_batch(
                    self.handle.as_fd().as_raw_fd(),
                    chunk.as_ptr().cast(),
                    &mut count,
                    &opts,
                )
            };
            // The kernel stops at the first key it cannot delete and reports how many it did.
            let done = (count as usize).min(chunk.len());
            deleted += done;
            if ret == 0 {
                rest = &rest[chunk.len()..];
                continue;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // Absent: deleted since it was read, or evicted.
                Some(libc::ENOENT) => rest = &rest[done + 1..],
                _ if batch_unsupported(&e) => {
                    for key in &rest[done..] {
                        deleted += usize::from(self.delete(key)?);
                    }
                    return Ok(deleted);
                }
                _ => return Err(self.error("batch delete", e.into())),
            }
        }
        Ok(deleted)
    }

    /// The keys present now (the kernel's iteration: entries changing meanwhile may be missed).
    pub fn keys(&self) -> impl Iterator<Item = K> + '_ {
        self.handle
            .keys()
            .filter_map(|bytes| K::read_from_bytes(&bytes).ok())
    }

    /// Every entry present now, read in batches (`BPF_MAP_LOOKUP_BATCH`) where the kernel has
    /// them for this map type, else by a key walk ([`TypedMap::entries_walked`]).
    ///
    /// A batch walk of a hash map goes bucket by bucket, so it never returns more entries than
    /// the map holds, whatever programs insert and delete meanwhile (an entry inserted or
    /// deleted during the walk may or may not be seen). A key walk restarts from the first key
    /// whenever the key it stands on is deleted (an LRU map evicting under inserts), so it can
    /// return the same entries many times over and take as long.
    pub fn entries(&self) -> Result<Vec<(K, V)>> {
        match self.lookup_batch() {
            Ok(entries) => Ok(entries),
            Err(e) if batch_unsupported(&e) => self.entries_walked(),
            Err(e) => Err(self.error("batch lookup", e.into())),
        }
    }

    /// Every entry present now, by `BPF_MAP_LOOKUP_BATCH` only.
    pub fn entries_batched(&self) -> Result<Vec<(K, V)>> {
        self.lookup_batch()
            .map_err(|e| self.error("batch lookup", e.into()))
    }

    fn lookup_batch(&self) -> std::io::Result<Vec<(K, V)>> {
        /// Entries asked for per call (a hash map bucket holding more makes the kernel answer
        /// `ENOSPC`: the batch is then doubled).
        const BATCH: usize = 4096;
        let mut batch = BATCH.min(self.max_entries().max(1) as usize);
        let mut entries = Vec::new();
        let mut keys = vec![K::new_zeroed(); batch];
        let mut values = vec![V::new_zeroed(); batch];
        // The position token: a bucket number (u32) for hash maps, a key for arrays.
        let token_len = size_of::<K>().max(size_of::<u64>());
        let (mut in_token, mut out_token) = (vec![0u8; token_len], vec![0u8; token_len]);
        let mut first = true;
        let opts = batch_opts();
        loop {
            let mut count = batch as u32;
            // SAFETY: keys and values hold `batch` elements of the map's key and value sizes
            // (checked when the map was opened), the tokens are at least as large as a key and
            // a bucket number, and `opts` is a valid `bpf_map_batch_opts`.
            let ret = unsafe {
                libbpf_rs::libbpf_sys::bpf_map_lookup_batch(
                    self.handle.as_fd().as_raw_fd(),
                    if first {
                        std::ptr::null_mut()
                    } else {
                        in_token.as_mut_ptr().cast()
                    },
                    out_token.as_mut_ptr().cast(),
                    keys.as_mut_ptr().cast(),
                    values.as_mut_ptr().cast(),
                    &mut count,
                    &opts,
                )
            };
            let errno = if ret < 0 {
                std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO)
            } else {
                0
            };
            match errno {
                0 | libc::ENOENT => {
                    let n = (count as usize).min(batch);
                    entries.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
                    if errno == libc::ENOENT {
                        return Ok(entries);
                    }
                    std::mem::swap(&mut in_token, &mut out_token);
                    first = false;
                }
                libc::EINTR => {}
                libc::ENOSPC if batch < self.max_entries() as usize => {
                    batch *= 2;
                    keys.resize(batch, K::new_zeroed());
                    values.resize(batch, V::new_zeroed());
                }
                _ => return Err(std::io::Error::from_raw_os_error(errno)),
            }
        }
    }

    /// Every entry present now, by a key walk and a lookup per key (`BPF_MAP_GET_NEXT_KEY`);
    /// entries deleted during the walk are skipped. For map types without batch operations.
    pub fn entries_walked(&self) -> Result<Vec<(K, V)>> {
        let mut entries = Vec::new();
        for key in self.keys() {
            if let Some(value) = self.get(&key)? {
                entries.push((key, value));
            }
        }
        Ok(entries)
    }
}

/// The options of a batch operation: none but their size.
fn batch_opts() -> libbpf_rs::libbpf_sys::bpf_map_batch_opts {
    libbpf_rs::libbpf_sys::bpf_map_batch_opts {
        sz: size_of::<libbpf_rs::libbpf_sys::bpf_map_batch_opts>() as _,
        ..Default::default()
    }
}

/// Keys per `BPF_MAP_DELETE_BATCH` call ([`TypedMap::delete_all`]).
pub const DELETE_BATCH: usize = 4096;

/// Whether a batch operation failed because the kernel has none for the map's type (an LPM
/// trie; kernels before 5.6).
fn batch_unsupported(e: &std::io::Error) -> bool {
    /// The kernel's internal `ENOTSUPP`, which the bpf syscall passes to user space.
    const ENOTSUPP: i32 = 524;
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

/// A per-CPU array whose values are `V`.
#[derive(Debug)]
pub struct PerCpuArray<V> {
    handle: MapHandle,
    name: String,
    _types: PhantomData<fn() -> V>,
}

impl<V: MapPod> PerCpuArray<V> {
    /// Wraps a handle, checking sizes.
    pub fn from_handle(handle: MapHandle) -> Result<Self> {
        let name = handle.name().to_string_lossy().into_owned();
        check_layout::<u32>(&handle, &name, size_of::<V>())?;
        Ok(PerCpuArray {
            handle,
            name,
            _types: PhantomData,
        })
    }

    /// Opens a pinned per-CPU array.
    pub fn open_pinned(path: &Path) -> Result<Self> {
        let (handle, name) = open_pinned_handle(path)?;
        check_layout::<u32>(&handle, &name, size_of::<V>())?;
        Ok(PerCpuArray {
            handle,
            name,
            _types: PhantomData,
        })
    }

    /// The values of every possible CPU at `index`.
    pub fn get_per_cpu(&self, index: u32) -> Result<Vec<V>> {
        let per_cpu = self
            .handle
            .lookup_percpu(&index.to_ne_bytes(), MapFlags::ANY)
            .map_err(|source| Error::Map {
                map: self.name.clone(),
                action: "per-CPU lookup",
                source,
            })?
            .unwrap_or_default();
        Ok(per_cpu
            .iter()
            .filter_map(|bytes| V::read_from_prefix(bytes).ok().map(|(v, _)| v))
            .collect())
    }
}

impl PerCpuArray<u64> {
    /// The sum over CPUs of the counter at `index`.
    pub fn sum(&self, index: u32) -> Result<u64> {
        Ok(self
            .get_per_cpu(index)?
            .iter()
            .fold(0u64, |acc, v| acc.wrapping_add(*v)))
    }
}

/// Every map of the datapath, typed.
#[derive(Debug)]
pub struct DatapathMaps {
    /// `svc_ports`.
    pub svc_ports: TypedMap<SvcKey, SvcValue>,
    /// `svc_addrs`.
    pub svc_addrs: TypedMap<AddrKey, AddrValue>,
    /// `src_ranges` (value: 1).
    pub src_ranges: TypedMap<RangeKey, u8>,
    /// `cluster_cidrs` (value: 1).
    pub cluster_cidrs: TypedMap<CidrKey, u8>,
    /// `devices`, keyed by ifindex (write it with [`DatapathMaps::set_device`]).
    pub devices: TypedMap<u32, DevValue>,
    /// `device_slots` (kept by [`DatapathMaps::set_device`] and [`DatapathMaps::remove_device`]).
    pub device_slots: TypedMap<u32, DevSlot>,
    /// `config` (one entry, key 0; write it with [`DatapathMaps::set_config`]).
    pub config: TypedMap<u32, Config>,
    /// The SNAT table (`snat_records`, `snat_fwd`, `snat_rev`, `snat_locks`).
    pub snat: SnatTable,
    /// `conns`.
    pub conns: TypedMap<Tuple, ConnValue>,
    /// `frags`.
    pub frags: TypedMap<FragKey, FragValue>,
    /// `stats`.
    pub stats: PerCpuArray<u64>,
    /// `drop_last` (absent in the pins of an agent from before it existed).
    pub drop_last: Option<PerCpuArray<DropEvent>>,
    /// `switch_flows` (absent in the pins of an agent from before it existed).
    pub switch_flows: Option<TypedMap<Tuple, SwitchFlow>>,
    /// `port_filter` (absent in the pins of an agent from before it existed).
    pub port_filter: Option<PortFilter>,
    /// `config.flags` bits the loader owns (`CFG_F_DIRECT_WRITES`), kept by `set_config`.
    pub(crate) owned_flags: u32,
}

impl DatapathMaps {
    /// Opens every map pinned under `pin_root` (no program is loaded).
    pub fn open_pinned(pin_root: &Path) -> Result<Self> {
        let path = |name: &str| -> PathBuf { pin_root.join(name) };
        let config: TypedMap<u32, Config> = TypedMap::open_pinned(&path(map_names::CONFIG))?;
        let current = config.get(&0)?.unwrap_or_default();
        let handles = SnatHandles {
            records: open_pinned_handle(&path(map_names::SNAT_RECORDS))?.0,
            fwd: open_pinned_handle(&path(map_names::SNAT_FWD))?.0,
            rev: open_pinned_handle(&path(map_names::SNAT_REV))?.0,
            locks: open_pinned_handle(&path(map_names::SNAT_LOCKS))?.0,
        };
        Ok(DatapathMaps {
            svc_ports: TypedMap::open_pinned(&path(map_names::SVC_PORTS))?,
            svc_addrs: TypedMap::open_pinned(&path(map_names::SVC_ADDRS))?,
            src_ranges: TypedMap::open_pinned(&path(map_names::SRC_RANGES))?,
            cluster_cidrs: TypedMap::open_pinned(&path(map_names::CLUSTER_CIDRS))?,
            devices: TypedMap::open_pinned(&path(map_names::DEVICES))?,
            device_slots: TypedMap::open_pinned(&path(map_names::DEVICE_SLOTS))?,
            config,
            snat: SnatTable::open(&handles, current.nat_seed)?,
            conns: TypedMap::open_pinned(&path(map_names::CONNS))?,
            frags: TypedMap::open_pinned(&path(map_names::FRAGS))?,
            stats: PerCpuArray::open_pinned(&path(map_names::STATS))?,
            drop_last: match path(map_names::DROP_LAST) {
                p if p.exists() => Some(PerCpuArray::open_pinned(&p)?),
                _ => None,
            },
            switch_flows: match path(map_names::SWITCH_FLOWS) {
                p if p.exists() => Some(TypedMap::open_pinned(&p)?),
                _ => None,
            },
            port_filter: match path(map_names::PORT_FILTER) {
                p if p.exists() => Some(PortFilter::open(&open_pinned_handle(&p)?.0)?),
                _ => None,
            },
            owned_flags: current.flags & crate::maps::CFG_F_DIRECT_WRITES,
        })
    }

    /// Writes a `svc_ports` entry, its port put in the port filter first (bpf/port_filter.h).
    pub fn put_service_port(&self, key: &SvcKey, value: &SvcValue) -> Result<()> {
        if let Some(filter) = &self.port_filter {
            filter.add(PortKind::Service, key.port.get());
        }
        self.svc_ports.update(key, value, UpdateFlags::Any)
    }

    /// Puts an IPVS connection (client -> backend) in `conns` as the probe does, its backend
    /// port in the port filter first (tests and benchmarks).
    pub fn put_conn(&self, key: &Tuple, value: &ConnValue) -> Result<()> {
        if let Some(filter) = &self.port_filter {
            filter.add(PortKind::Backend, key.dport.get());
        }
        self.conns.insert(key, value)
    }

    /// Inserts a translated connection into the SNAT table as a program's allocation does, its
    /// backend port and node port put in the port filter first ([`SnatTable::insert`]: tests and
    /// benchmarks).
    pub fn insert_translation(
        &self,
        fwd_key: &Tuple,
        rev_key: &Tuple,
        fwd: &SnatEntry,
        rev: &SnatEntry,
    ) -> Result<u32> {
        if let Some(filter) = &self.port_filter {
            filter.add(PortKind::Backend, fwd_key.dport.get());
            filter.add(PortKind::Snat, rev_key.dport.get());
        }
        self.snat.insert(fwd_key, rev_key, fwd, rev)
    }

    /// Fills the port filter from the maps (every `conns` entry's and live SNAT record's
    /// backend port, every live record's node port, every `svc_ports` key's port) and then
    /// lets the programs trust it (`CFG_F_PORT_FILTER`). Call it once every program that keeps the filter is the one
    /// attached (the probe, and the TC programs on every device): an older agent's programs
    /// make entries without their bits, which the fill covers only up to this call. Returns
    /// whether the filter is in use (false when the pins have none).
    pub fn enable_port_filter(&self) -> Result<bool> {
        let Some(filter) = &self.port_filter else {
            return Ok(false);
        };
        let mut config = self.config()?.unwrap_or_default();
        if config.flags & crate::maps::CFG_F_PORT_FILTER != 0 {
            return Ok(true);
        }
        for (key, _) in self.conns.entries_batched()? {
            filter.add(PortKind::Backend, key.dport.get());
        }
        for (_, record) in self.snat.records() {
            filter.add(PortKind::Backend, record.fwd_key.dport.get());
            filter.add(PortKind::Snat, record.rev_key.dport.get());
        }
        for (key, _) in self.svc_ports.entries()? {
            filter.add(PortKind::Service, key.port.get());
        }
        config.flags |= crate::maps::CFG_F_PORT_FILTER;
        self.config.insert(&0, &config)?;
        Ok(true)
    }

    /// Whether the programs trust the port filter (`CFG_F_PORT_FILTER`).
    pub fn port_filter_enabled(&self) -> Result<bool> {
        Ok(self
            .config()?
            .is_some_and(|c| c.flags & crate::maps::CFG_F_PORT_FILTER != 0))
    }

    /// Every counter summed over CPUs.
    pub fn stats(&self) -> Result<Stats> {
        let mut stats = Stats::default();
        for &counter in Counter::ALL {
            stats.set(counter, self.stats.sum(counter.index())?);
        }
        Ok(stats)
    }

    /// Per drop reason that has one, the last packet dropped for it on any CPU (the newest
    /// over CPUs). Empty when `drop_last` is absent.
    pub fn last_drops(&self) -> Result<Vec<(Counter, DropEvent)>> {
        let Some(drop_last) = &self.drop_last else {
            return Ok(Vec::new());
        };
        let mut last = Vec::new();
        for &counter in Counter::DROPS {
            let newest = drop_last
                .get_per_cpu(counter.index())?
                .into_iter()
                .filter(|e| e.time_ns != 0)
                .max_by_key(|e| e.time_ns);
            if let Some(event) = newest {
                last.push((counter, event));
            }
        }
        Ok(last)
    }

    /// Adds `n` to a counter the agent keeps in `stats` (`probe_hit`, `probe_miss`: no program
    /// writes them). Written to the first CPU's value; a read sums every CPU.
    pub fn add_to_counter(&self, counter: Counter, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let index = counter.index();
        let mut values = self.stats.get_per_cpu(index)?;
        if let Some(first) = values.first_mut() {
            *first = first.wrapping_add(n);
        }
        let bytes: Vec<Vec<u8>> = values.iter().map(|v| v.to_ne_bytes().to_vec()).collect();
        self.stats
            .handle
            .update_percpu(&index.to_ne_bytes(), &bytes, MapFlags::ANY)
            .map_err(|source| Error::Map {
                map: self.stats.name.clone(),
                action: "per-CPU update",
                source,
            })
    }

    /// The datapath configuration (all zero until the agent writes it).
    pub fn config(&self) -> Result<Option<Config>> {
        self.config.get(&0)
    }

    /// Writes the datapath configuration. The SNAT table's fields (`nat_seed`, `nat_buckets`,
    /// `nat_records`) and the loader's flags are this map set's, whatever `config` says.
    pub fn set_config(&self, config: &Config) -> Result<()> {
        self.config.insert(&0, &self.complete(config))
    }

    /// `config` with the SNAT table's fields, the loader's flags and the switch flags as the map
    /// has them (`CFG_SWITCH_FLAGS`, set only by [`DatapathMaps::set_switch_flags`]) filled in
    /// (what [`DatapathMaps::set_config`] writes).
    pub fn complete(&self, config: &Config) -> Config {
        let kept_flags = crate::maps::CFG_SWITCH_FLAGS | crate::maps::CFG_F_PORT_FILTER;
        let kept = self
            .config()
            .ok()
            .flatten()
            .map_or(0, |c| c.flags & kept_flags);
        Config {
            flags: (config.flags & !kept_flags) | self.owned_flags | kept,
            nat_seed: self.snat.seed(),
            nat_buckets: self.snat.buckets(),
            nat_records: self.snat.capacity(),
            ..*config
        }
    }

    /// Sets the `set` bits and clears the `clear` bits of `CFG_SWITCH_FLAGS` (docs/switching.md),
    /// leaving the rest of the configuration as it is. Returns the flags written.
    pub fn set_switch_flags(&self, set: u32, clear: u32) -> Result<u32> {
        let mut config = self.config()?.unwrap_or_default();
        config.flags = (config.flags | (set & crate::maps::CFG_SWITCH_FLAGS))
            & !(clear & crate::maps::CFG_SWITCH_FLAGS & !set);
        self.config.insert(&0, &config)?;
        Ok(config.flags)
    }

    /// Opens or closes the switch window from kube-proxy (`CFG_F_SWITCH`, docs/switching.md),
    /// leaving the rest of the configuration as it is.
    pub fn set_switch_window(&self, open: bool) -> Result<()> {
        let bit = crate::maps::CFG_F_SWITCH;
        let (set, clear) = if open { (bit, 0) } else { (0, bit) };
        self.set_switch_flags(set, clear).map(|_| ())
    }

    /// The `CFG_SWITCH_FLAGS` bits the configuration has.
    pub fn switch_flags(&self) -> Result<u32> {
        Ok(self
            .config()?
            .map_or(0, |c| c.flags & crate::maps::CFG_SWITCH_FLAGS))
    }

    /// Whether the switch window is open.
    pub fn switch_window_open(&self) -> Result<bool> {
        Ok(self
            .config()?
            .is_some_and(|c| c.flags & crate::maps::CFG_F_SWITCH != 0))
    }

    /// Sets a device's SNAT sources: `devices`, and its `device_slots` slot unless another
    /// device still present holds it.
    pub fn set_device(&self, ifindex: u32, value: &DevValue) -> Result<()> {
        self.devices.insert(&ifindex, value)?;
        let slot = ifindex % DEVICE_SLOTS;
        let holder = self.device_slots.get(&slot)?.map_or(0, |s| s.ifindex);
        if holder == 0 || holder == ifindex || self.devices.get(&holder)?.is_none() {
            self.device_slots.insert(
                &slot,
                &DevSlot {
                    ifindex,
                    pad: 0,
                    value: *value,
                },
            )?;
        }
        Ok(())
    }

    /// Removes a device's SNAT sources; its slot goes to another device of the same slot, if
    /// any. `false` when it had none.
    pub fn remove_device(&self, ifindex: u32) -> Result<bool> {
        let removed = self.devices.delete(&ifindex)?;
        let slot = ifindex % DEVICE_SLOTS;
        if self
            .device_slots
            .get(&slot)?
            .is_some_and(|s| s.ifindex == ifindex)
        {
            let heir = self
                .devices
                .entries()?
                .into_iter()
                .find(|(other, _)| other % DEVICE_SLOTS == slot);
            let next = heir.map_or(DevSlot::default(), |(other, value)| DevSlot {
                ifindex: other,
                pad: 0,
                value,
            });
            self.device_slots.insert(&slot, &next)?;
        }
        Ok(removed)
    }
}
