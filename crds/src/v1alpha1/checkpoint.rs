//! PodCheckpoint: freeze a pod at one instant and store it as one unit.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{DNS_SUBDOMAIN, LocalSecretReference, UID, conditions_schema, preserve_unknown_object};

/// The annotation by which a PodCheckpoint grants restores from other namespaces:
/// a comma-separated list of namespaces, or `*` for every namespace. Restores from
/// its own namespace need no grant.
pub const RESTORE_NAMESPACES_ANNOTATION: &str = "cryopod.io/restore-namespaces";

/// Whether a PodCheckpoint's grant annotation lets `namespace` restore it.
pub fn grants_restore_to(annotation: Option<&str>, namespace: &str) -> bool {
    annotation.is_some_and(|a| a.split(',').map(str::trim).any(|n| n == "*" || n == namespace))
}

/// Condition reasons of a PodCheckpoint's `Ready` condition.
pub mod checkpoint_reasons {
    /// Accepted, not started yet.
    pub const PENDING: &str = "Pending";
    /// The agent is freezing, dumping or uploading.
    pub const CHECKPOINT_IN_PROGRESS: &str = "CheckpointInProgress";
    /// Every object is stored and verified and the manifest is written.
    pub const CHECKPOINT_COMPLETED: &str = "CheckpointCompleted";
    /// The checkpoint failed; the message names the cause.
    pub const CHECKPOINT_FAILED: &str = "CheckpointFailed";
    /// The pod named by `sourcePodName` now has a different UID than `sourcePodUID`.
    pub const SOURCE_POD_REPLACED: &str = "SourcePodReplaced";
    /// The source pod does not exist.
    pub const SOURCE_POD_NOT_FOUND: &str = "SourcePodNotFound";
    /// The named CheckpointStorage does not exist, or no default one is usable.
    pub const STORAGE_NOT_FOUND: &str = "StorageNotFound";
    /// The pod uses something that cannot be checkpointed (hostNetwork, devices, ...).
    pub const UNSUPPORTED_POD: &str = "UnsupportedPod";
    /// `timeoutSeconds` elapsed before the checkpoint was stored.
    pub const TIMED_OUT: &str = "TimedOut";
    /// The checkpoint's objects were removed after `retention`.
    pub const EXPIRED: &str = "Expired";
    /// No cryopod node agent serves the source pod's node.
    pub const NODE_AGENT_UNAVAILABLE: &str = "NodeAgentUnavailable";
}

/// Freeze every container of a pod at one instant, dump it with CRIU together with
/// what the containers share (`/dev/shm`, emptyDirs, rootfs changes), and store it
/// in a CheckpointStorage as one unit that a PodRestore or PodMigration can bring back
/// on any node.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "cryopod.io",
    version = "v1alpha1",
    kind = "PodCheckpoint",
    plural = "podcheckpoints",
    singular = "podcheckpoint",
    shortname = "cpck",
    category = "cryopod",
    namespaced,
    status = "PodCheckpointStatus",
    doc = "PodCheckpoint checkpoints every container of one pod at one instant, together with the state they share, and stores the result as one unit.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Pod", type_ = "string", json_path = ".spec.sourcePodName"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(
        name = "Size",
        type_ = "integer",
        json_path = ".status.sizes.storedBytes",
        description = "bytes stored, after compression"
    ),
    printcolumn(
        name = "Freeze(ms)",
        type_ = "integer",
        json_path = ".status.timings.freezeWindowMillis",
        description = "how long the pod was frozen"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable after creation; create a new PodCheckpoint instead"))]
pub struct PodCheckpointSpec {
    /// Name of the pod to checkpoint, in the PodCheckpoint's own namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub source_pod_name: String,

    /// UID of the pod to checkpoint. When set and the live pod has another UID
    /// (it was deleted and re-created), the checkpoint fails with reason
    /// `SourcePodReplaced` instead of capturing the wrong pod.
    #[serde(rename = "sourcePodUID", default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = UID), length(max = 36))]
    pub source_pod_uid: Option<String>,

    /// Deadline for the whole checkpoint (hooks, freeze, dump, upload, verify).
    /// When it passes, the pod is thawed and the checkpoint fails with `TimedOut`.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 10, max = 3600))]
    pub timeout_seconds: i32,

    /// Longest time the pod may stay frozen. The agent thaws the pod when it passes,
    /// whatever else happens, and fails the checkpoint.
    #[serde(default = "default_max_freeze_seconds")]
    #[schemars(range(min = 1, max = 600))]
    pub max_freeze_seconds: i32,

    /// Name of the CheckpointStorage to write to. When omitted, the one annotated
    /// `cryopod.io/default-storage: "true"` is used, else the node-local directory
    /// `/var/lib/cryopod/checkpoints` on the pod's node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub storage: Option<String>,

    /// What the source pod does once it is dumped: `Running` (thawed, it carries on)
    /// or `Stopped` (its containers are stopped, as for a migration).
    #[serde(default)]
    pub post_checkpoint_state: PostCheckpointState,

    /// What happens to established TCP connections. Connections inside the pod
    /// (over 127.0.0.1 or ::1) are always kept.
    #[serde(default)]
    pub tcp: TcpSpec,

    /// Application hooks: before the freeze, and after each restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Hooks>,

    /// Encrypt the stored objects with age (X25519) to the keys of this Secret.
    /// Without it, an operator that seals by default (the chart's
    /// `encryption.byDefault`, on unless turned off) makes an age key for this
    /// checkpoint alone, kept in the operator's namespace; otherwise the objects
    /// are stored in the clear (compressed only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionSpec>,

    /// How long the stored checkpoint is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionSpec>,
}

pub(crate) fn default_timeout_seconds() -> i32 {
    300
}

pub(crate) fn default_max_freeze_seconds() -> i32 {
    30
}

/// What the source pod does after the dump.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PostCheckpointState {
    /// The pod is thawed and carries on.
    #[default]
    Running,
    /// The pod's processes are stopped after the dump (CRIU leaves them dead).
    Stopped,
}

/// Handling of established TCP connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpSpec {
    /// Connections bound to the pod IP, whose peers are outside the pod.
    /// A restored pod usually has another IP, so they cannot simply continue.
    #[serde(rename = "podIPConnections", default)]
    pub pod_ip_connections: PodIpConnections,
}

/// What to do with connections bound to the pod IP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PodIpConnections {
    /// Restore them closed: the application sees a reset and reconnects.
    #[default]
    Close,
    /// Fail the checkpoint, naming the connection, when any exists.
    Refuse,
}

/// Application hooks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hooks {
    /// Run in order before the pod is frozen, e.g. to flush buffers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub pre_checkpoint: Vec<Hook>,

    /// Run in order in each pod restored from this checkpoint, once its containers
    /// run and before its PodRestore is Ready (a migration hands over or deletes its
    /// source only then), e.g. to refresh its address. A failing hook fails the
    /// restore, and deletes the restored pod (but a migration's target whose source
    /// was stopped for good, which is kept), unless it ignores failure. At least once:
    /// an operator restart at that moment runs them again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub post_restore: Vec<Hook>,
}

/// One hook: exactly one of `exec`, `httpGet` and `signal`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.exec) ? 1 : 0) + (has(self.httpGet) ? 1 : 0) + (has(self.signal) ? 1 : 0) == 1")
    .message("a hook needs exactly one of exec, httpGet and signal"))]
pub struct Hook {
    /// Container the hook acts on.
    #[schemars(length(min = 1, max = 63))]
    pub container: String,

    /// Run a command in the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecHook>,

    /// Send an HTTP GET to the pod; a 2xx answer is success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetHook>,

    /// Send a signal to the container's main process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<SignalHook>,

    /// Deadline for this hook.
    #[serde(default = "default_hook_timeout_seconds")]
    #[schemars(range(min = 1, max = 300))]
    pub timeout_seconds: i32,

    /// What a failed or timed-out hook does to the operation.
    #[serde(default)]
    pub failure_policy: HookFailurePolicy,
}

fn default_hook_timeout_seconds() -> i32 {
    10
}

/// A command hook.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecHook {
    /// The command and its arguments, run without a shell. Exit code 0 is success.
    #[schemars(length(min = 1, max = 32), inner(length(max = 4096)))]
    pub command: Vec<String>,
}

/// An HTTP GET hook against the pod IP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpGetHook {
    /// Path to request.
    #[serde(default = "default_http_path")]
    #[schemars(length(min = 1, max = 2048), regex(pattern = "^/"))]
    pub path: String,

    /// Port on the pod IP.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// `HTTP` or `HTTPS` (the certificate is not verified, as for probes).
    #[serde(default)]
    pub scheme: HttpScheme,
}

fn default_http_path() -> String {
    "/".to_owned()
}

/// URL scheme of an HTTP hook.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpScheme {
    /// Plain HTTP.
    #[default]
    Http,
    /// HTTPS without certificate verification.
    Https,
}

/// A signal hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SignalHook {
    /// The signal to send to the container's main process.
    pub name: HookSignal,
}

/// Signals a hook may send. Terminating signals are left out on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum HookSignal {
    /// Hang-up, often "reload".
    #[serde(rename = "SIGHUP")]
    Hup,
    /// User signal 1.
    #[serde(rename = "SIGUSR1")]
    Usr1,
    /// User signal 2.
    #[serde(rename = "SIGUSR2")]
    Usr2,
    /// Window change, used by some servers to quiesce.
    #[serde(rename = "SIGWINCH")]
    Winch,
}

/// What a failed hook does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum HookFailurePolicy {
    /// Fail the checkpoint or restore; a frozen pod is thawed first.
    #[default]
    Fail,
    /// Record an event and carry on.
    Ignore,
}

/// Encryption at rest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionSpec {
    /// Secret in this namespace holding `recipients` (age public keys, one a line;
    /// all a checkpoint needs) and `identity` (the age private key; only restores
    /// read it).
    pub secret_ref: LocalSecretReference,
}

/// How long a checkpoint is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.ttlSeconds) || has(self.keepLast)")
    .message("retention needs ttlSeconds, keepLast or both"))]
pub struct RetentionSpec {
    /// Delete the PodCheckpoint and its stored objects this long after it became Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 31_536_000))]
    pub ttl_seconds: Option<i64>,

    /// Keep only this many Ready checkpoints of the same source pod that also set
    /// `keepLast`; older ones are deleted with their objects. A CheckpointSchedule's
    /// checkpoints count only among that schedule's, and the others only among
    /// those no schedule made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_last: Option<i32>,
}

/// Observed state of a PodCheckpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodCheckpointStatus {
    /// Where the checkpoint is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<CheckpointPhase>,

    /// Node the source pod ran on, whose agent took the checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,

    /// UID of the pod that was checkpointed.
    #[serde(rename = "sourcePodUID", default, skip_serializing_if = "Option::is_none")]
    pub source_pod_uid: Option<String>,

    /// Where the checkpoint's objects and manifest are stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_location: Option<CheckpointLocation>,

    /// Operation id on the node agent; lets a restarted operator re-attach.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,

    /// What the node agent is doing now: `Discovering`, `Freezing`, `Dumping`,
    /// `Storing`, `Thawed` (a checkpoint); `Restoring`, `Releasing` (a migration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,

    /// Bytes moved so far while the checkpoint is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<crate::common::OperationProgress>,

    /// When the operator started working on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the pod was frozen, to the microsecond (the node's clock): where a
    /// migration's downtime begins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_time: Option<MicroTime>,

    /// When it became Ready or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// The pod's metadata and spec as checkpointed, with node-specific and
    /// status-like fields removed; a restore creates its new pod from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub checkpointed_pod_template: Option<PodTemplateSpec>,

    /// Every container captured, in pod order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checkpointed_containers: Vec<CheckpointedContainer>,

    /// How long each stage took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<CheckpointTimings>,

    /// How much was captured and stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sizes: Option<CheckpointSizes>,

    /// `sha256:<hex>` of the stored manifest, which lists every object with its digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<String>,

    /// What the stored manifest says, copied for people to read without the store:
    /// each object, the node's facts and the encryption. Informational: a restore
    /// trusts only the signed manifest itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<ManifestSummary>,

    /// `Ready` and friends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Life of a PodCheckpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum CheckpointPhase {
    /// Accepted, waiting for the pod's node agent.
    Pending,
    /// Hooks, freeze and dump are running.
    Checkpointing,
    /// The pod is thawed (or stopped); objects are being uploaded and verified.
    Uploading,
    /// Stored and verified; usable by restores.
    Ready,
    /// Failed for good; see the `Ready` condition.
    Failed,
}

/// Where a checkpoint is stored: exactly the member named by `type` is set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointLocation {
    /// Which member is set.
    #[serde(rename = "type")]
    pub type_: CheckpointLocationType,
    /// Set when `type` is `ObjectStore`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_store: Option<ObjectStoreLocation>,
    /// Set when `type` is `NodeLocal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_local: Option<NodeLocalLocation>,
}

/// Discriminator of [`CheckpointLocation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum CheckpointLocationType {
    /// In a CheckpointStorage reachable from every node.
    ObjectStore,
    /// In a directory on one node; restorable only there.
    NodeLocal,
}

/// A checkpoint in a CheckpointStorage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStoreLocation {
    /// Name of the CheckpointStorage.
    pub storage: String,
    /// Key prefix of every object of this checkpoint; the manifest is `<prefix>manifest.json`.
    pub prefix: String,
}

/// A checkpoint in a node's directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeLocalLocation {
    /// Node that holds it.
    pub node_name: String,
    /// Directory on that node.
    pub path: String,
}

/// One captured container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointedContainer {
    /// Container name.
    pub name: String,
    /// Image as written in the pod spec.
    pub image: String,
    /// Image digest the container ran; restores pin it.
    #[serde(rename = "imageID", default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// Object key of its checkpoint archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<String>,
}

/// Durations in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointTimings {
    /// From the pod freeze to the last container's thaw or stop: the application's pause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_window_millis: Option<i64>,
    /// CRIU dumps of all containers (they run in parallel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dump_millis: Option<i64>,
    /// Packaging, upload and verification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_millis: Option<i64>,
    /// The whole operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_millis: Option<i64>,
}

/// What a checkpoint's manifest holds, as its agent stored it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManifestSummary {
    /// Every stored object but the manifest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 512))]
    pub objects: Vec<StoredObject>,
    /// The kernel of the node it was taken on (`uname -r`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kernel: String,
    /// CRIU's version on that node.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub criu_version: String,
    /// `V1` or `V2`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cgroup_version: String,
    /// How many CPU feature flags the node had (a restore needs them all).
    #[serde(default)]
    pub cpu_flags: i32,
    /// `age` when the objects are encrypted; empty when they are not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub encryption: String,
    /// The age recipients (public keys) the objects are encrypted to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub recipients: Vec<String>,
}

/// One stored object of a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoredObject {
    /// Key under the checkpoint's prefix.
    pub key: String,
    /// Bytes stored (compressed, encrypted).
    pub size: i64,
    /// Bytes before compression.
    pub raw_size: i64,
    /// sha256 of the stored bytes, hex.
    pub sha256: String,
}

/// Sizes in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSizes {
    /// Raw size of everything captured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captured_bytes: Option<i64>,
    /// Bytes stored after compression (and encryption).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<i64>,
    /// Number of stored objects, manifest included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objects: Option<i64>,
}
