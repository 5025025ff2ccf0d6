//! kube-ipvs-bpf agent library. Data flows one way: sources → model → reconcilers → kernel.
//!
//! - [`source`]: where Services, EndpointSlices and the Node come from (the Kubernetes API,
//!   or files);
//! - [`model`]: the desired state of the node, computed from them (pure);
//! - [`reconcile`]: diffs of desired against the kernel's own view (IPVS, kube-ipvs0's
//!   addresses, the datapath maps), and their appliers;
//! - [`sync`]: the loop that ties them together;
//! - [`datapath`]: the eBPF datapath as the agent runs it (programs, maps, sysctls, iptables
//!   rules, the pin root lock, expiry);
//! - [`node`]: the node's interfaces and addresses (rtnetlink);
//! - [`node_state`]: the node state kept outside IPVS (sysctls, rules, TC, kube-ipvs0) and its
//!   repair;
//! - [`admin`]: every listener of the process (proxy health, healthCheckNodePorts, metrics);
//! - [`state`]: the state file `inspect` reads;
//! - [`cleanup`]: removing kube-proxy's node state, or the agent's own;
//! - [`conntrack`]: nf_conntrack's table over ctnetlink (the switch from kube-proxy);
//! - [`config`]: the configuration file (kube-proxy's `KubeProxyConfiguration` and the
//!   agent's extensions) and its resolution with the flags;
//! - [`takeover`]: waiting for a running kube-proxy to stop before changing the node;
//! - [`capabilities`]: the capabilities `run` checks for at start;
//! - [`init`]: the init container's node preparation (bpffs);
//! - [`cli`]: this binary's command line (the clap types and the dispatch; one module per
//!   command);
//! - [`kube_proxy_cli`]: kube-proxy's command line (flags, precedence with `--config`);
//! - [`logging`]: the log subscriber and the one-line error rendering;
//! - [`heap`]: the allocator's account, and returning its free pages after a full sync.
//!
//! The binary (`main.rs`) stays a thin wrapper around these modules.

pub mod admin;
pub mod capabilities;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod conntrack;
pub mod datapath;
pub mod heap;
pub mod init;
pub mod kube_proxy_cli;
pub mod logging;
pub mod model;
pub mod node;
pub mod node_state;
pub mod reconcile;
pub mod source;
pub mod state;
pub mod sync;
pub mod takeover;
