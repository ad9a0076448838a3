//! The cryopod operator: reconciles PodCheckpoint, PodRestore, PodMigration and
//! CheckpointStorage, calls the node agents and reports status, conditions and events.
//!
//! Not built yet; see issue #5 and `docs/design.md`. The crate exists so the
//! workspace layout, lints and CI are in place from the start.

#![forbid(unsafe_code)]
