//! CheckpointStorage: where checkpoints are kept, like a StorageClass.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{DNS_SUBDOMAIN, SecretReference, conditions_schema};

/// Annotation that marks the CheckpointStorage used when a resource names none.
pub const DEFAULT_STORAGE_ANNOTATION: &str = "cryopod.io/default-storage";

/// Directory used on each node when no CheckpointStorage exists at all.
pub const EMBEDDED_LOCAL_PATH: &str = "/var/lib/cryopod/checkpoints";

/// Condition reasons of a CheckpointStorage's `Ready` condition.
pub mod storage_reasons {
    /// The backend answered and the credentials work.
    pub const REACHABLE: &str = "Reachable";
    /// The credentials Secret is missing or lacks a key.
    pub const CREDENTIALS_INVALID: &str = "CredentialsInvalid";
    /// The backend did not answer or refused access.
    pub const UNREACHABLE: &str = "Unreachable";
}

/// A place to keep checkpoints: an S3-compatible bucket, a GCS bucket, an Azure
/// container, or a local directory. Cluster-scoped, like a StorageClass; annotate
/// one with `cryopod.io/default-storage: "true"` to make it the default.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "cryopod.io",
    version = "v1alpha1",
    kind = "CheckpointStorage",
    plural = "checkpointstorages",
    singular = "checkpointstorage",
    shortname = "cpstor",
    category = "cryopod",
    status = "CheckpointStorageStatus",
    doc = "CheckpointStorage is a place where cryopod keeps checkpoints, such as an S3-compatible bucket or a local directory.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(
        name = "Default",
        type_ = "string",
        json_path = ".metadata.annotations.cryopod\\.io/default-storage"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self == oldSelf").message("spec is immutable after creation; create a new CheckpointStorage instead"),
    validation = Rule::new("has(self.s3) == (self.type == 'S3')").message("spec.s3 must be set when type is S3, and only then"),
    validation = Rule::new("has(self.gcs) == (self.type == 'GCS')").message("spec.gcs must be set when type is GCS, and only then"),
    validation = Rule::new("has(self.azure) == (self.type == 'Azure')").message("spec.azure must be set when type is Azure, and only then"),
    validation = Rule::new("has(self.local) == (self.type == 'Local')").message("spec.local must be set when type is Local, and only then"),
)]
pub struct CheckpointStorageSpec {
    /// Which backend member is set.
    #[serde(rename = "type")]
    pub type_: StorageType,

    /// Key prefix under which every checkpoint is stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512), regex(pattern = "^[A-Za-z0-9!_.*'()/-]*$"))]
    pub prefix: Option<String>,

    /// An S3-compatible bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Storage>,

    /// A Google Cloud Storage bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcs: Option<GcsStorage>,

    /// An Azure Blob Storage container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureStorage>,

    /// A directory: on each node's disk, or in a shared PersistentVolumeClaim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalStorage>,
}

/// Backend kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum StorageType {
    /// S3 or any S3-compatible server.
    S3,
    /// Google Cloud Storage.
    #[serde(rename = "GCS")]
    Gcs,
    /// Azure Blob Storage.
    Azure,
    /// A directory.
    Local,
}

/// An S3-compatible bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Storage {
    /// Endpoint URL for S3-compatible servers; AWS's regional endpoint when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = "^https?://[^\\s]+$"))]
    pub endpoint: Option<String>,

    /// Bucket name.
    #[schemars(length(min = 3, max = 63), regex(pattern = "^[a-z0-9][a-z0-9.-]*[a-z0-9]$"))]
    pub bucket: String,

    /// Region; most S3-compatible servers accept the default.
    #[serde(default = "default_region")]
    #[schemars(length(min = 1, max = 64))]
    pub region: String,

    /// Address buckets as `<endpoint>/<bucket>` instead of `<bucket>.<endpoint>`;
    /// most self-hosted servers need it.
    #[serde(default)]
    pub force_path_style: bool,

    /// Secret with `accessKeyId` and `secretAccessKey` (and optionally `sessionToken`).
    /// When omitted, the agents' own environment or instance credentials are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,
}

fn default_region() -> String {
    "us-east-1".to_owned()
}

/// A Google Cloud Storage bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GcsStorage {
    /// Bucket name.
    #[schemars(length(min = 3, max = 222))]
    pub bucket: String,

    /// Secret with `serviceAccount.json`. When omitted, workload identity is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,
}

/// An Azure Blob Storage container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureStorage {
    /// Storage account name.
    #[schemars(length(min = 3, max = 24), regex(pattern = "^[a-z0-9]+$"))]
    pub account: String,

    /// Container name.
    #[schemars(length(min = 3, max = 63), regex(pattern = "^[a-z0-9][a-z0-9-]*[a-z0-9]$"))]
    pub container: String,

    /// Secret with `accessKey`. When omitted, workload identity is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,
}

/// A directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.persistentVolumeClaim)")
    .message("local.persistentVolumeClaim: not supported yet; use a node directory or S3"))]
pub struct LocalStorage {
    /// Absolute path on each node's disk: checkpoints there are restorable only on
    /// the node that took them. It must lie under one of the agents' local roots (with
    /// the chart: the embedded `/var/lib/cryopod/checkpoints` and
    /// `agent.localStorageRoots`); the agent refuses any other.
    #[serde(default = "default_local_path")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = "^/"))]
    pub path: String,

    /// A shared (ReadWriteMany) claim mounted into every agent, which would make
    /// checkpoints restorable on any node. Not supported yet: refused when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<ClaimReference>,
}

fn default_local_path() -> String {
    EMBEDDED_LOCAL_PATH.to_owned()
}

/// A PersistentVolumeClaim in a named namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimReference {
    /// Claim name.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub claim_name: String,
    /// Claim namespace (usually the operator's).
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
}

/// Observed state of a CheckpointStorage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointStorageStatus {
    /// When the operator last checked that the backend answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checked_time: Option<Time>,
    /// `Ready` tells whether the backend is reachable with its credentials.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
