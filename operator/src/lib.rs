//! The cryopod operator: reconciles PodCheckpoint, PodRestore, PodMigration and
//! CheckpointStorage, calls the node agents and reports status, conditions and events.
//!
//! Built so far: the `checkpointedPodTemplate` a checkpoint records ([`template`]),
//! and the pod a restore creates from it ([`restore_pod`]).
//! The controllers follow (issue #5, `docs/design.md`).

#![forbid(unsafe_code)]

pub mod restore_pod;
pub mod template;
