//! The compiled BPF objects (built from `bpf/*.bpf.c` by `build.rs`) and the names of the programs
//! they contain.

/// `bpf/datapath.bpf.c`: the TC programs and the `xt_svc` socket filter.
pub const DATAPATH_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/datapath.bpf.o"));

/// `bpf/ipvs_probe.bpf.c`: the fexit and kretprobe programs on `ip_vs_conn_new`, and the fentry
/// and kprobe programs on `ip_vs_conn_rcu_free`.
pub const IPVS_PROBE_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ipvs_probe.bpf.o"));

/// A program of the datapath object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatapathProgram {
    /// TC ingress on a device with an Ethernet header.
    TcIngress,
    /// TC ingress on a device without a link-layer header (`tunl0`, `wg0`).
    TcIngressL3,
    /// TC egress on a device with an Ethernet header.
    TcEgress,
    /// TC egress on a device without a link-layer header.
    TcEgressL3,
    /// Socket filter for the iptables raw OUTPUT `-m bpf --object-pinned` match.
    XtSvc,
}

impl DatapathProgram {
    /// Every program of the datapath object.
    pub const ALL: [DatapathProgram; 5] = [
        DatapathProgram::TcIngress,
        DatapathProgram::TcIngressL3,
        DatapathProgram::TcEgress,
        DatapathProgram::TcEgressL3,
        DatapathProgram::XtSvc,
    ];

    /// The function name in the object.
    pub fn name(self) -> &'static str {
        match self {
            DatapathProgram::TcIngress => "tc_ingress",
            DatapathProgram::TcIngressL3 => "tc_ingress_l3",
            DatapathProgram::TcEgress => "tc_egress",
            DatapathProgram::TcEgressL3 => "tc_egress_l3",
            DatapathProgram::XtSvc => "xt_svc",
        }
    }
}

/// The datapath object's tail-call targets that rewrite packets with direct writes, with the
/// program array each sits in (slot 0), egress then ingress. Loaded only where the kernel has
/// `bpf_cast_to_kern_ctx` (see [`crate::loader::kernel_has_kern_ctx`]).
pub const NAT_WRITERS: [(&str, &str); 2] = [
    ("nat_write_egress", "nat_writers_egress"),
    ("nat_write_ingress", "nat_writers_ingress"),
];

/// Name of the fexit program on `ip_vs_conn_new` in [`IPVS_PROBE_OBJECT`].
pub const PROBE_FEXIT_PROGRAM: &str = "ipvs_conn_new_fexit";
/// Name of the fexit program on `ip_vs_schedule` (which makes every connection a virtual
/// service schedules, through `ip_vs_conn_new`) in [`IPVS_PROBE_OBJECT`].
pub const PROBE_SCHEDULE_FEXIT_PROGRAM: &str = "ipvs_schedule_fexit";
/// Name of the kretprobe program on `ip_vs_conn_new` in [`IPVS_PROBE_OBJECT`].
pub const PROBE_KRETPROBE_PROGRAM: &str = "ipvs_conn_new_kretprobe";
/// The kernel function the probe hooks.
pub const PROBE_TARGET_FUNCTION: &str = "ip_vs_conn_new";
/// Name of the fentry program on `ip_vs_conn_rcu_free` (IPVS freeing a connection) in
/// [`IPVS_PROBE_OBJECT`].
pub const FREE_PROBE_FENTRY_PROGRAM: &str = "ipvs_conn_free_fentry";
/// Name of the kprobe program on `ip_vs_conn_rcu_free` in [`IPVS_PROBE_OBJECT`].
pub const FREE_PROBE_KPROBE_PROGRAM: &str = "ipvs_conn_free_kprobe";
/// The kernel function the probe on IPVS freeing a connection hooks.
pub const FREE_PROBE_TARGET_FUNCTION: &str = "ip_vs_conn_rcu_free";

/// `bpf/bench_baseline.bpf.c`: an empty TC program (`bench_baseline`) the benchmark measures to
/// report the measurement floor. Not part of the datapath.
pub const BENCH_BASELINE_OBJECT: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/bench_baseline.bpf.o"));
