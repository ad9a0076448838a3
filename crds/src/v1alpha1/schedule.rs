//! CheckpointSchedule: checkpoint the pods a selector picks, on a cron schedule,
//! keeping the last few of each.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{DNS_SUBDOMAIN, conditions_schema};
// The PodCheckpoint's defaults: a schedule's checkpoint is the one a user would write.
use crate::v1alpha1::checkpoint::{default_max_freeze_seconds, default_timeout_seconds};
use crate::v1alpha1::{EncryptionSpec, TcpSpec};

/// Condition reasons of a CheckpointSchedule's `Ready` condition.
pub mod schedule_reasons {
    /// The schedule is valid and not suspended; `status.nextScheduleTime` says when
    /// it runs next.
    pub const SCHEDULED: &str = "Scheduled";
    /// `spec.schedule` is not a cron expression the operator understands; nothing runs.
    pub const INVALID_SCHEDULE: &str = "InvalidSchedule";
    /// `spec.suspend` is true; nothing runs until it is false again.
    pub const SUSPENDED: &str = "Suspended";
}

/// The label on each PodCheckpoint a schedule creates: the schedule's name.
pub const SCHEDULE_LABEL: &str = "cryopod.io/schedule";

/// What the admission checks of `spec.schedule` (the operator checks the ranges):
/// five fields (minute, hour, day of month, month, day of week), each a list of `*`,
/// numbers or ranges with an optional `/step`, or one of the `@hourly`-like macros.
pub const CRON_PATTERN: &str = r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|(\*|[0-9]{1,2}(-[0-9]{1,2})?)(/[0-9]{1,2})?(,(\*|[0-9]{1,2}(-[0-9]{1,2})?)(/[0-9]{1,2})?)*( +(\*|[0-9]{1,2}(-[0-9]{1,2})?)(/[0-9]{1,2})?(,(\*|[0-9]{1,2}(-[0-9]{1,2})?)(/[0-9]{1,2})?)*){4})$";

/// Checkpoint every Running pod that `selector` picks in this namespace at each time
/// `schedule` names (UTC), and keep the newest `keepLast` Ready checkpoints of each pod
/// made by this schedule. The PodCheckpoints are named after the schedule, the pod
/// and the scheduled minute, labelled `cryopod.io/schedule`, and owned by the
/// schedule: deleting it deletes them (unless deleted with `--cascade=orphan`).
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "cryopod.io",
    version = "v1alpha1",
    kind = "CheckpointSchedule",
    plural = "checkpointschedules",
    singular = "checkpointschedule",
    shortname = "cpsched",
    category = "cryopod",
    namespaced,
    status = "CheckpointScheduleStatus",
    doc = "CheckpointSchedule checkpoints the pods a label selector picks on a cron schedule (UTC) and keeps the last few checkpoints of each pod.",
    // Its name is the value of the label on its checkpoints.
    validation = Rule::new("self.metadata.name.size() <= 63").message("metadata.name: at most 63 characters, as it labels the schedule's checkpoints"),
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(name = "Suspend", type_ = "boolean", json_path = ".spec.suspend"),
    printcolumn(name = "Last", type_ = "date", json_path = ".status.lastScheduleTime"),
    printcolumn(name = "Next", type_ = "date", json_path = ".status.nextScheduleTime"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointScheduleSpec {
    /// When to checkpoint, in UTC, as in crontab(5): `minute hour day-of-month month
    /// day-of-week`, each `*`, a number, a range `a-b`, a step `*/n` or `a-b/n`, or a
    /// comma-separated list of those; day of week 0-7 with 0 and 7 Sunday. When both
    /// day fields are restricted (neither starts with `*`), a day matches either, as
    /// in classic cron. `@hourly`, `@daily` (`@midnight`), `@weekly`, `@monthly` and
    /// `@yearly` (`@annually`) are accepted. Names (`MON`, `JAN`) are not.
    #[schemars(length(min = 1, max = 128), regex(pattern = CRON_PATTERN))]
    pub schedule: String,

    /// The pods to checkpoint, in this namespace; only Running pods are. An empty
    /// selector picks every pod of the namespace.
    pub selector: LabelSelector,

    /// How many Ready checkpoints this schedule keeps per pod; older ones are deleted
    /// with their stored objects. Checkpoints that other schedules or users made are
    /// not counted and not touched. The schedule also keeps at most this many failed
    /// checkpoints per pod, for their messages.
    #[schemars(range(min = 1, max = 1000))]
    pub keep_last: i32,

    /// No new checkpoints while true; those running finish. Times that pass while
    /// suspended are missed runs: on resuming, only the latest of them runs, and
    /// only within `startingDeadlineSeconds` when that is set.
    #[serde(default)]
    pub suspend: bool,

    /// A run that is missed (the operator was down, or the schedule suspended) by
    /// more than this many seconds is skipped. Whatever this says, of several missed
    /// runs only the latest is made up for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86_400))]
    pub starting_deadline_seconds: Option<i64>,

    /// The spec of each PodCheckpoint made (the source pod and retention are the
    /// schedule's).
    #[serde(default)]
    pub checkpoint_template: CheckpointTemplate,
}

/// The fields of a PodCheckpoint's spec that a schedule passes on: the same meaning
/// and bounds as there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointTemplate {
    /// Name of the CheckpointStorage to write to; the default one when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub storage: Option<String>,

    /// Deadline for each whole checkpoint.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 10, max = 3600))]
    pub timeout_seconds: i32,

    /// Longest time the pod may stay frozen.
    #[serde(default = "default_max_freeze_seconds")]
    #[schemars(range(min = 1, max = 600))]
    pub max_freeze_seconds: i32,

    /// What happens to established TCP connections.
    #[serde(default)]
    pub tcp: TcpSpec,

    /// Encrypt the stored objects with age to the keys of this Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionSpec>,
}

impl Default for CheckpointTemplate {
    fn default() -> Self {
        Self {
            storage: None,
            timeout_seconds: default_timeout_seconds(),
            max_freeze_seconds: default_max_freeze_seconds(),
            tcp: TcpSpec::default(),
            encryption: None,
        }
    }
}

/// Observed state of a CheckpointSchedule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointScheduleStatus {
    /// The last scheduled time the schedule ran (created its checkpoints) or skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,

    /// The next time it runs; absent while suspended or invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,

    /// Each pod with checkpoints of this schedule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub pods: Vec<ScheduledPod>,

    /// `Ready`: True with `Scheduled`, False with `InvalidSchedule` or `Suspended`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A pod's checkpoints made by the schedule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduledPod {
    /// The pod's name (`spec.sourcePodName` of its checkpoints).
    pub pod_name: String,
    /// Its newest checkpoint of this schedule, whatever its phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint_name: Option<String>,
    /// Its Ready checkpoints of this schedule.
    #[serde(default)]
    pub ready: i32,
    /// Its Failed checkpoints of this schedule that are kept.
    #[serde(default)]
    pub failed: i32,
}
