//! Object sources: where the Services and EndpointSlices fed to the [`crate::model`] come from.
//!
//! - [`file`](mod@file): manifests on disk (a file or a directory), in the formats kubectl reads.

pub mod file;
