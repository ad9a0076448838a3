//! The `cryopod.io/v1alpha1` API: the resources SREs `kubectl apply`.
//!
//! These types have no I/O. The CRD YAML under `charts/cryopod/crds/` is generated
//! from them (`make crds`), and a test fails when the committed YAML is stale.
//!
//! Field names follow KEP-5823 (pod-level checkpoint) where it has one
//! (`sourcePodName`, `sourcePodUID`, `checkpointLocation`, `checkpointedPodTemplate`,
//! the `Ready` condition), so users can move to the upstream API later.

#![forbid(unsafe_code)]
// kube's repeated `printcolumn(type_ = ...)` arguments look like duplicated attributes to clippy.
#![allow(clippy::duplicated_attributes)]

pub mod common;
pub mod crdgen;
pub mod examples;
pub mod v1alpha1;

/// The API group of every cryopod resource.
pub const GROUP: &str = "cryopod.io";
/// The only served version.
pub const VERSION: &str = "v1alpha1";
