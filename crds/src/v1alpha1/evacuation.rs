//! NodeEvacuation: take every pod off a node, migrating what can keep its memory.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{DNS_SUBDOMAIN, NodeTarget, conditions_schema};

/// Condition reasons of a NodeEvacuation's `Ready` condition, and of each pod's outcome.
pub mod evacuation_reasons {
    /// Pods are being moved.
    pub const EVACUATING: &str = "Evacuating";
    /// Every pod has its outcome and none failed.
    pub const EVACUATED: &str = "Evacuated";
    /// Every pod has its outcome, and at least one failed.
    pub const PODS_FAILED: &str = "PodsFailed";
    /// `spec.nodeName` is not a node.
    pub const NODE_NOT_FOUND: &str = "NodeNotFound";
    /// A PodDisruptionBudget does not allow the pod to go now; it waits.
    pub const DISRUPTION_NOT_ALLOWED: &str = "DisruptionNotAllowed";
    /// Pods of a DaemonSet run on every node: they stay.
    pub const DAEMON_SET_POD: &str = "DaemonSetPod";
    /// A static (mirror) pod belongs to the node's kubelet: it stays.
    pub const STATIC_POD: &str = "StaticPod";
    /// The pod has finished; nothing runs to move.
    pub const FINISHED_POD: &str = "FinishedPod";
    /// The pod shares the node's network namespace; it cannot keep its address.
    pub const HOST_NETWORK: &str = "HostNetwork";
    /// A Job's pod: its controller re-runs it elsewhere.
    pub const JOB_POD: &str = "JobPod";
    /// The pod's controller is of a kind migrations do not hand pods back to.
    pub const UNSUPPORTED_CONTROLLER: &str = "UnsupportedController";
    /// One of cryopod's own pods (its operator): never migrated by itself.
    pub const CRYOPOD_COMPONENT: &str = "CryopodComponent";
    /// The operator watches only another namespace: the pod is left, never evicted.
    pub const NAMESPACE_NOT_WATCHED: &str = "NamespaceNotWatched";
    /// The API server refused the eviction for another cause than a budget.
    pub const EVICTION_REFUSED: &str = "EvictionRefused";
    /// The pod was deleted or replaced before its turn.
    pub const POD_GONE: &str = "PodGone";
}

/// Empty a node for maintenance: cordon it, migrate every pod that can keep its
/// memory to other nodes (a few at a time, each only when its PodDisruptionBudgets
/// allow), and evict or leave the rest as `unmigratable` says. Deleting it starts no
/// new migration; those running finish.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "cryopod.io",
    version = "v1alpha1",
    kind = "NodeEvacuation",
    plural = "nodeevacuations",
    singular = "nodeevacuation",
    shortname = "cpevac",
    category = "cryopod",
    status = "NodeEvacuationStatus",
    doc = "NodeEvacuation cordons a node and moves its pods off it: migrated with their memory where possible, otherwise evicted or left as the spec says.",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Done", type_ = "integer", json_path = ".status.done"),
    printcolumn(name = "Total", type_ = "integer", json_path = ".status.total"),
    printcolumn(name = "Failed", type_ = "integer", json_path = ".status.failed"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable after creation; create a new NodeEvacuation instead"))]
#[x_kube(validation = Rule::new("!has(self.storage) || !has(self.transfer) || self.transfer != 'Direct'").message("spec.storage: a Direct transfer keeps no copy in a CheckpointStorage; omit storage or use transfer ViaStore"))]
pub struct NodeEvacuationSpec {
    /// The node to empty.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub node_name: String,

    /// Pods moved at once (migrations and evictions together).
    #[serde(default = "default_max_concurrent")]
    #[schemars(range(min = 1, max = 16))]
    pub max_concurrent: i32,

    /// What happens to a pod that cannot be migrated (host network, a Job's pod, a
    /// controller migrations do not support): `Evict` it through the Eviction API,
    /// or `Skip` it and leave it running. DaemonSet, static and finished pods are
    /// always left.
    #[serde(default)]
    pub unmigratable: UnmigratablePolicy,

    /// Where the migrated pods go. When omitted, any other ready node that passes
    /// the compatibility check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<NodeTarget>,

    /// `timeoutSeconds` of each PodMigration.
    #[serde(default = "default_migration_timeout_seconds")]
    #[schemars(range(min = 30, max = 7200))]
    pub migration_timeout_seconds: i32,

    /// CheckpointStorage of each migration's checkpoint; the default one if omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub storage: Option<String>,

    /// Each migration's `spec.transfer` (see PodMigration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<super::MigrationTransfer>,
}

fn default_max_concurrent() -> i32 {
    1
}

fn default_migration_timeout_seconds() -> i32 {
    600
}

/// What a NodeEvacuation does with a pod it cannot migrate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UnmigratablePolicy {
    /// Evict it through the Eviction API (its PodDisruptionBudgets apply); its
    /// controller, if any, starts a new one elsewhere, without its memory.
    #[default]
    Evict,
    /// Leave it running on the node.
    Skip,
}

/// Observed state of a NodeEvacuation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeEvacuationStatus {
    /// Where the evacuation is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<EvacuationPhase>,
    /// Pods that were on the node when the evacuation started (each appears in `pods`).
    #[serde(default)]
    pub total: i32,
    /// Pods with a final outcome.
    #[serde(default)]
    pub done: i32,
    /// Pods that run elsewhere with their memory.
    #[serde(default)]
    pub migrated: i32,
    /// Pods evicted.
    #[serde(default)]
    pub evicted: i32,
    /// Pods left on the node.
    #[serde(default)]
    pub skipped: i32,
    /// Pods whose migration or eviction failed; they stay on the node.
    #[serde(default)]
    pub failed: i32,
    /// Each pod of the node and what became of it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub pods: Vec<EvacuatedPod>,
    /// When the operator started working on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When every pod had its outcome.
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

/// Life of a NodeEvacuation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EvacuationPhase {
    /// Pods are being moved off the node, which is cordoned.
    Evacuating,
    /// Every pod has its outcome and none failed.
    Succeeded,
    /// Every pod has its outcome and some failed, or the node does not exist.
    Failed,
}

/// One pod of the node and what the evacuation did with it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvacuatedPod {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The pod's UID when the evacuation found it.
    #[serde(rename = "uid")]
    pub uid: String,
    /// What the evacuation does with it.
    pub action: EvacuationAction,
    /// What became of it.
    pub outcome: PodOutcome,
    /// Why: a reason in CamelCase (see the runbook), set for skipped, failed and
    /// waiting pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The detail of the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The PodMigration that moves it, in the pod's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_name: Option<String>,
    /// PodMigrations started for it: a migration refused by a PodDisruptionBudget
    /// before it touched the pod is tried again later under a new name.
    #[serde(default)]
    pub attempts: i32,
    /// Where it runs now, once migrated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node_name: Option<String>,
}

/// What an evacuation does with a pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EvacuationAction {
    /// Moved with its memory by a PodMigration.
    #[default]
    Migrate,
    /// Evicted through the Eviction API.
    Evict,
    /// Left on the node.
    Skip,
}

/// What became of a pod of an evacuated node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PodOutcome {
    /// Not started: waiting for a free slot or for its PodDisruptionBudget.
    #[default]
    Waiting,
    /// Its PodMigration runs.
    Migrating,
    /// Its eviction was accepted; it is terminating.
    Evicting,
    /// It runs on another node with its memory.
    Migrated,
    /// It was evicted.
    Evicted,
    /// It was left on the node.
    Skipped,
    /// Its migration or eviction failed; it stays (`reason` and `message` say why).
    Failed,
}

impl PodOutcome {
    /// Whether nothing more happens to the pod.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Migrated | Self::Evicted | Self::Skipped | Self::Failed)
    }
}
