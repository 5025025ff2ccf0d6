//! kube-ipvs-bpf agent library. Data flows one way: sources → model → reconcilers → kernel.
//!
//! - [`source`]: where Services and EndpointSlices come from (files; Kubernetes later);
//! - [`model`]: the desired state of the node, computed from them (pure);
//! - [`reconcile`]: diffs of desired against the kernel's own view, and their appliers;
//! - [`sync`]: the loop that ties them together;
//! - [`datapath`]: the eBPF datapath (programs, maps, sysctls, iptables rules, expiry);
//! - [`node`]: the node's interfaces and addresses (rtnetlink);
//! - [`node_state`]: the node state kept outside IPVS (sysctls, rules, TC, kube-ipvs0) and its
//!   repair;
//! - [`state`]: the state file `inspect` reads;
//! - [`capabilities`]: the capabilities `run` checks for at start;
//! - [`init`]: the init container's node preparation (bpffs);
//! - [`cli`]: the command line.
//!
//! The binary (`main.rs`) stays a thin wrapper around these modules.

pub mod capabilities;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod health;
pub mod init;
pub mod metrics;
pub mod model;
pub mod node;
pub mod node_state;
pub mod reconcile;
pub mod source;
pub mod state;
pub mod sync;
