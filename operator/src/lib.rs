//! The cryopod operator: reconciles PodCheckpoint, PodRestore, PodMigration,
//! CheckpointStorage, NodeEvacuation and CheckpointSchedule, calls the node agents and
//! reports status, conditions and events.
//!
//! Built so far: the PodCheckpoint ([`checkpoint`]), PodRestore ([`restore`]) and
//! PodMigration ([`migration`], bare pods) controllers, with storage
//! resolution ([`storage`]), the agents' locator and mTLS client ([`agents`]) and
//! metrics ([`metrics`]); the `checkpointedPodTemplate` ([`template`]) and the pod a
//! restore creates ([`restore_pod`]). The NodeEvacuation ([`evacuation`]) and
//! CheckpointSchedule ([`schedule`], with its [`cron`] expressions) controllers
//! create those operations.

#![forbid(unsafe_code)]

pub mod agents;
pub mod checkpoint;
pub mod compat;
pub mod context;
pub mod cron;
pub mod evacuation;
pub mod keys;
pub mod leader;
pub mod metrics;
pub mod migration;
pub mod restore;
pub mod restore_pod;
pub mod run;
pub mod schedule;
pub mod signer;
pub mod starts;
pub mod storage;
pub mod storage_probe;
pub mod template;
pub mod workload;
