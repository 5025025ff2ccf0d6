//! Object sources: where the Services and EndpointSlices fed to the [`crate::model`] come from.
//!
//! - [`kubernetes`]: the API server (list and watch of Services, EndpointSlices and this node's
//!   Node, kube-proxy's label selectors);
//! - [`file`](mod@file): manifests on disk (a file or a directory), in the formats kubectl reads;
//! - [`watch`]: re-reading a file source when it changes.
//!
//! A source publishes [`Snapshot`]s: the complete set of objects, each time it changes, as
//! persistent maps ([`Objects`]) shared with its store, so publishing costs O(1) and the model
//! finds what changed since the snapshot it last read without walking the others.

pub mod file;
pub mod kubernetes;
pub mod watch;

use crate::model::{EndpointSliceInfo, Objects, ServiceInfo};
use k8s_openapi::api::core::v1::Node;

/// Every Service and EndpointSlice a source knows at one moment, and this node's Node object
/// when the source has one (its InternalIPs, zone and labels feed the model; its deletion and
/// taints feed the health check).
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Shared with the source's store: publishing a change copies nothing.
    /// Reduced to what the agent reads as they arrive ([`ServiceInfo`]).
    pub services: Objects<ServiceInfo>,
    /// Reduced to what the agent reads as they arrive ([`EndpointSliceInfo`]).
    pub endpoint_slices: Objects<EndpointSliceInfo>,
    pub node: Option<Node>,
    /// Increases with every change.
    pub generation: u64,
}
