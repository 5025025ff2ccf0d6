//! Object sources: where the Services and EndpointSlices fed to the [`crate::model`] come from.
//!
//! - [`kubernetes`]: the API server (list and watch of Services, EndpointSlices and this node's
//!   Node, kube-proxy's label selectors);
//! - [`file`](mod@file): manifests on disk (a file or a directory), in the formats kubectl reads;
//! - [`watch`]: re-reading a file source when it changes.
//!
//! A source publishes [`Snapshot`]s: the complete set of objects, each time it changes.

pub mod file;
pub mod kubernetes;
pub mod watch;

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// Every Service and EndpointSlice a source knows at one moment, and this node's Node object
/// when the source has one (its InternalIPs, zone and labels feed the model; its deletion and
/// taints feed the health check).
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Shared with the source's store: publishing a change copies pointers, not objects.
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub node: Option<Node>,
    /// Increases with every change.
    pub generation: u64,
}
