//! Reconcilers: each compares the desired state with what the kernel reports and applies the
//! smallest set of changes, touching only what this agent owns.
//!
//! - [`ipvs`]: virtual services and destinations (generic netlink), graceful termination;
//! - [`addresses`]: service addresses on `kube-ipvs0` (rtnetlink);
//! - [`datapath`]: the service maps of the eBPF datapath.

pub mod addresses;
pub mod datapath;
pub mod ipvs;
