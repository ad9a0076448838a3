//! PodRestore: bring a checkpointed pod back as a new pod, on any node.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{DNS_LABEL, DNS_SUBDOMAIN, NodeTarget, conditions_schema, tenant_string_map};

/// Condition reasons of a PodRestore's `Ready` condition.
pub mod restore_reasons {
    /// Accepted, not started yet.
    pub const PENDING: &str = "Pending";
    /// The checkpoint is being fetched, verified and restored.
    pub const RESTORE_IN_PROGRESS: &str = "RestoreInProgress";
    /// The restored pod is Running and Ready.
    pub const RESTORE_COMPLETED: &str = "RestoreCompleted";
    /// The restore failed; the message names the cause.
    pub const RESTORE_FAILED: &str = "RestoreFailed";
    /// The checkpoint is in another namespace that does not grant restores to this one.
    pub const NOT_PERMITTED: &str = "NotPermitted";
    /// `checkpointName` does not exist in this namespace.
    pub const CHECKPOINT_NOT_FOUND: &str = "CheckpointNotFound";
    /// The checkpoint exists but is not Ready.
    pub const CHECKPOINT_NOT_READY: &str = "CheckpointNotReady";
    /// A stored object's digest did not match the manifest.
    pub const CHECKPOINT_CORRUPT: &str = "CheckpointCorrupt";
    /// No node matches the target, or the target fails the compatibility check.
    pub const NO_COMPATIBLE_NODE: &str = "NoCompatibleNode";
    /// `timeoutSeconds` elapsed.
    pub const TIMED_OUT: &str = "TimedOut";
}

/// Restore a Ready PodCheckpoint as a new pod. The pod's shared state is restored
/// first, then every container continues from where it was frozen.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "cryopod.io",
    version = "v1alpha1",
    kind = "PodRestore",
    plural = "podrestores",
    singular = "podrestore",
    shortname = "cprs",
    category = "cryopod",
    namespaced,
    status = "PodRestoreStatus",
    doc = "PodRestore restores a checkpointed pod, all its containers and shared state, as a new pod on a chosen node.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Checkpoint", type_ = "string", json_path = ".spec.checkpointName"),
    printcolumn(name = "Pod", type_ = "string", json_path = ".status.restoredPodName"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(
        name = "Restore(ms)",
        type_ = "integer",
        json_path = ".status.timings.totalMillis",
        description = "from accepted to Running and Ready"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable after creation; create a new PodRestore instead"))]
pub struct PodRestoreSpec {
    /// Name of a Ready PodCheckpoint in this namespace, or in `checkpointNamespace`.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub checkpoint_name: String,

    /// Namespace of the PodCheckpoint when it is not this one. That PodCheckpoint
    /// must grant it: its annotation `cryopod.io/restore-namespaces` lists this
    /// namespace (comma-separated) or is `*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL))]
    pub checkpoint_namespace: Option<String>,

    /// Where to run the restored pod. When omitted, the operator picks a ready node
    /// that passes the compatibility check (CRIU, kernel, CPU features, cgroups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<NodeTarget>,

    /// Name of the new pod. Defaults to the checkpointed pod's name when that name
    /// is free, else `<name>-restored-<5 random characters>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub pod_name: Option<String>,

    /// Labels set on the new pod, over the checkpointed ones. Keys under
    /// `cryopod.io/` are refused: they are the operator's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "tenant_string_map")]
    pub labels: BTreeMap<String, String>,

    /// Annotations set on the new pod, over the checkpointed ones. Keys under
    /// `cryopod.io/` are refused: they are the operator's (the restore's binding
    /// among them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "tenant_string_map")]
    pub annotations: BTreeMap<String, String>,

    /// Deadline for fetch, verification, restore and readiness.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 10, max = 3600))]
    pub timeout_seconds: i32,
}

fn default_timeout_seconds() -> i32 {
    300
}

/// Observed state of a PodRestore.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodRestoreStatus {
    /// What the target's agent is doing now: `Fetching` while it fetches and verifies
    /// the checkpoint's objects, then `Restoring` while the pod starts from them; a
    /// migration's target then shows `HeldStopped` while its processes wait, stopped,
    /// for the source to be stopped for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,

    /// Bytes fetched so far (as stored) of all the checkpoint's objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<crate::common::OperationProgress>,

    /// Where the restore is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<RestorePhase>,
    /// Name of the restored pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_pod_name: Option<String>,
    /// UID of the restored pod.
    #[serde(rename = "restoredPodUID", default, skip_serializing_if = "Option::is_none")]
    pub restored_pod_uid: Option<String>,
    /// Node the pod was restored on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Operation id on the node agent; lets a restarted operator re-attach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
    /// When the operator started working on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it became Ready or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// When the operator saw the restored pod Running and Ready, to the microsecond:
    /// where a migration's downtime ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_time: Option<MicroTime>,
    /// How long each stage took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<RestoreTimings>,
    /// `Ready` and friends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Life of a PodRestore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RestorePhase {
    /// Accepted, choosing a node.
    Pending,
    /// The target agent fetches and verifies the checkpoint.
    Fetching,
    /// The new pod is being created and its containers restored.
    Restoring,
    /// The restored pod is Running and Ready.
    Ready,
    /// Failed for good; see the `Ready` condition.
    Failed,
}

/// Durations in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreTimings {
    /// Download and digest verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch_millis: Option<i64>,
    /// From the pod's creation to all containers restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_millis: Option<i64>,
    /// The whole operation, up to Running and Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_millis: Option<i64>,
}
