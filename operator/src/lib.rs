//! The cryopod operator: reconciles PodCheckpoint, PodRestore, PodMigration and
//! CheckpointStorage, calls the node agents and reports status, conditions and events.
//!
//! Built so far: the `checkpointedPodTemplate` a checkpoint records ([`template`]).
//! The controllers follow (issue #5, `docs/design.md`).

#![forbid(unsafe_code)]

pub mod template;
