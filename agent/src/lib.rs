//! kube-ipvs-bpf agent library: the service model and the object sources that feed it.
//!
//! The binary (`main.rs`) stays a thin wrapper around these modules.

pub mod model;
pub mod source;
