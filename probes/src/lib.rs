//! The eBPF datapath of kube-ipvs-bpf: the C programs under `bpf/` (compiled by `build.rs` and
//! embedded), the Rust mirrors of their maps, typed map access, and the loader that pins,
//! attaches and replaces them. The contract is docs/datapath.md.

pub mod error;
pub mod features;
pub mod libbpf_log;
pub mod loader;
pub mod maps;
pub mod nat_protocol;
pub mod nat_table;
pub mod objects;
pub mod port_filter;
pub mod typed_map;

pub use error::{Error, Result};
pub use features::KernelFeatures;
pub use loader::{
    AttachedPrograms, Datapath, DatapathOptions, DeviceKind, FreeProbeKind, MapReuse, MapSizes,
    ProbeKind, ProbePreference, ProgramRunStats, RewritePolicy, SkbContext,
    TEST_RUN_CHECKSUM_COMPLETE, TcAttachMode, TcAttachPolicy, TestRunOutput,
};
pub use nat_table::{Index, SnatTable};
pub use objects::DatapathProgram;
pub use port_filter::{PortFilter, PortKind};
pub use typed_map::{DatapathMaps, PerCpuArray, TypedMap, UpdateFlags};
