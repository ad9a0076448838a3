//! PodMigration: checkpoint, restore elsewhere, then retire the source.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::TcpSpec;
use crate::common::{DNS_SUBDOMAIN, NodeTarget, UID, conditions_schema};

/// Condition reasons of a PodMigration's `Ready` condition.
pub mod migration_reasons {
    /// Accepted, not started yet.
    pub const PENDING: &str = "Pending";
    /// Checkpoint or restore under way.
    pub const MIGRATION_IN_PROGRESS: &str = "MigrationInProgress";
    /// The pod runs on the target and the source is gone.
    pub const MIGRATION_COMPLETED: &str = "MigrationCompleted";
    /// The migration failed and the source pod was brought back.
    pub const ROLLED_BACK: &str = "RolledBack";
    /// The migration failed; the message names the cause.
    pub const MIGRATION_FAILED: &str = "MigrationFailed";
    /// The pod named by `sourcePodName` has another UID than `sourcePodUID`.
    pub const SOURCE_POD_REPLACED: &str = "SourcePodReplaced";
    /// The source pod does not exist.
    pub const SOURCE_POD_NOT_FOUND: &str = "SourcePodNotFound";
    /// A PodDisruptionBudget does not allow the source to go now.
    pub const DISRUPTION_NOT_ALLOWED: &str = "DisruptionNotAllowed";
    /// No ready node other than the source's matches the target.
    pub const NO_COMPATIBLE_NODE: &str = "NoCompatibleNode";
    /// `timeoutSeconds` elapsed.
    pub const TIMED_OUT: &str = "TimedOut";
    /// The source was thawed before the target took over (its freeze deadline passed,
    /// or its agent restarted): it ran on past the checkpoint, so it stays and the
    /// restored pod is deleted. The message says why.
    pub const SOURCE_RESUMED: &str = "SourceResumed";
}

/// Move a running pod to another node without losing its in-memory state:
/// checkpoint it (stopping it at the last moment), restore it on the target, and
/// delete the source only once the target is Running.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "cryopod.io",
    version = "v1alpha1",
    kind = "PodMigration",
    plural = "podmigrations",
    singular = "podmigration",
    shortname = "cpmig",
    category = "cryopod",
    namespaced,
    status = "PodMigrationStatus",
    doc = "PodMigration moves a running pod to another node with its in-memory state: checkpoint, restore on the target, then retire the source.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Pod", type_ = "string", json_path = ".spec.sourcePodName"),
    printcolumn(name = "From", type_ = "string", json_path = ".status.sourceNodeName"),
    printcolumn(name = "To", type_ = "string", json_path = ".status.targetNodeName"),
    printcolumn(
        name = "Downtime(ms)",
        type_ = "integer",
        json_path = ".status.downtimeMillis",
        description = "from the freeze on the source to Running on the target"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable after creation; create a new PodMigration instead"))]
#[x_kube(validation = Rule::new("!has(self.storage) || !has(self.transfer) || self.transfer != 'Direct'").message("spec.storage: a Direct transfer keeps no copy in a CheckpointStorage; omit storage or use transfer ViaStore"))]
pub struct PodMigrationSpec {
    /// Name of the pod to move, in the PodMigration's own namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub source_pod_name: String,

    /// UID of the pod to move; a different live UID fails with `SourcePodReplaced`.
    #[serde(rename = "sourcePodUID", default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = UID), length(max = 36))]
    pub source_pod_uid: Option<String>,

    /// Where to move it. When omitted, any other ready node that passes the
    /// compatibility check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<NodeTarget>,

    /// Deadline for the whole migration. When it passes, `failurePolicy` applies.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 30, max = 7200))]
    pub timeout_seconds: i32,

    /// What happens when the migration fails after the source was touched.
    #[serde(default)]
    pub failure_policy: MigrationFailurePolicy,

    /// CheckpointStorage for the intermediate checkpoint; the default one if omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub storage: Option<String>,

    /// What happens to established TCP connections (see PodCheckpoint).
    #[serde(default)]
    pub tcp: TcpSpec,

    /// How the checkpoint goes from the source node to the target (docs/design.md,
    /// "Transfer modes"): `ViaStore` through the CheckpointStorage, `Direct` from the
    /// source's agent to the target's over TLS, without an object store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<MigrationTransfer>,
}

/// How a migration moves its checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MigrationTransfer {
    /// Stored in the CheckpointStorage (`spec.storage`, else the default one) and
    /// fetched from it by the target: three passes through the store while the source
    /// is frozen, and a copy that outlives the migration until its checkpoint is
    /// deleted. Works wherever both nodes reach the store.
    #[default]
    ViaStore,
    /// Staged in the source node's local store and read by the
    /// target's agent from the source's agent over TLS (the source's certificate
    /// checked, a read grant for this checkpoint alone). No copy is kept in a
    /// CheckpointStorage; the staged one is deleted with the migration's checkpoint.
    /// The agents' port must be reachable from node to node.
    Direct,
}

fn default_timeout_seconds() -> i32 {
    600
}

/// Failure handling of a migration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MigrationFailurePolicy {
    /// Bring the source back: thaw it; a StatefulSet pod, whose source is stopped
    /// before the restore takes its name, is recreated by its StatefulSet (with its
    /// volumes, without its memory). Any half-restored target is removed.
    #[default]
    Rollback,
    /// Leave everything as it is for inspection (the source may stay stopped).
    Retain,
}

/// Observed state of a PodMigration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodMigrationStatus {
    /// Where the migration is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,
    /// UID of the source pod when the migration started.
    #[serde(rename = "sourcePodUID", default, skip_serializing_if = "Option::is_none")]
    pub source_pod_uid: Option<String>,
    /// The controller that owns the source pod, as `Kind/name` (`ReplicaSet/web-7d4b9`,
    /// `StatefulSet/db`); unset for a bare pod. A StatefulSet pod comes back under
    /// its own name; a ReplicaSet's restored pod is adopted by it in place of the
    /// source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_controller: Option<String>,
    /// Node the pod left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node_name: Option<String>,
    /// Node the pod moved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node_name: Option<String>,
    /// The PodCheckpoint this migration created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_name: Option<String>,
    /// The PodRestore this migration created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_name: Option<String>,
    /// Name of the pod on the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pod_name: Option<String>,
    /// From the freeze on the source to Running on the target, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_millis: Option<i64>,
    /// What the node agent is doing now: `Discovering`, `Freezing`, `Dumping`,
    /// `Storing`, `Thawed` (a checkpoint); `Transferring` (the target fetches the
    /// checkpoint; `progress` counts its bytes), `Restoring`, `HeldStopped`,
    /// `Releasing` (a migration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,

    /// Bytes moved so far while the checkpoint is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<crate::common::OperationProgress>,

    /// When the operator started working on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it succeeded, rolled back or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// `Ready` and friends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Life of a PodMigration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MigrationPhase {
    /// Accepted, choosing a target.
    Pending,
    /// The source is being checkpointed.
    Checkpointing,
    /// The pod is being restored on the target.
    Restoring,
    /// The target runs; the source is being deleted.
    Finalizing,
    /// Done: the pod runs on the target, the source is gone.
    Succeeded,
    /// Failed, and the source was brought back.
    RolledBack,
    /// Failed; see the `Ready` condition.
    Failed,
}
