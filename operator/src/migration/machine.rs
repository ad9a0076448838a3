//! What a PodMigration does next, decided without I/O.
//!
//! [`decide`] reads the migration's [`State`] (its spec and status, each phase with
//! the facts it needs) and what the shell has [`Observed`] in this pass, and names
//! the [`Step`] to take. A `Look` or one of the steps that gather an answer (a
//! release, a creation, a deletion) feeds the answer back into `Observed` and the
//! shell asks again; every other step ends the pass. So the order of requests, and
//! every branch of the migration, is decided here, and the table in the tests below
//! shows it.

use std::collections::BTreeMap;
use std::time::Duration;

use cryopod_crds::common::{CONDITION_READY, NodeTarget};
use cryopod_crds::v1alpha1::{
    CheckpointPhase, MigrationFailurePolicy, MigrationPhase, PodCheckpoint, PodMigration, PodMigrationStatus,
    PodRestore, RestorePhase, migration_reasons as reasons,
};
use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::context::SourcePod;
use crate::workload::{FENCE_POLICY, WITHHOLD_LABELS_ANNOTATION, Workload, labels_to_restore, parse_withheld, selects};

/// How long a new fence may take to be enforced before the migration gives up.
pub const FENCE_DEADLINE: Duration = Duration::from_secs(15);

/// A node as a target choice sees it: name, whether the pod could run there now, labels.
pub type NodeFacts = (String, bool, BTreeMap<String, String>);

/// A PodMigration as its spec and status say.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    /// The migration's name: its checkpoint, restore and fence are named after it.
    pub name: String,
    /// `spec.sourcePodName`.
    pub pod: String,
    /// `spec.failurePolicy` is `Retain`: a failed migration leaves the source as it is.
    pub retain: bool,
    /// Where it is, with what that phase knows.
    pub phase: Phase,
}

/// The phases of a migration, each with the facts it needs.
#[derive(Clone, Debug, PartialEq)]
pub enum Phase {
    /// Not started (no phase, or `Pending`).
    New {
        /// `spec.target`.
        target: Option<NodeTarget>,
        /// `spec.timeoutSeconds` from the migration's creation: how long a start may
        /// wait for an agent to answer.
        deadline: Option<Deadline>,
    },
    /// The source is checkpointed and then held frozen.
    Checkpointing(Moving),
    /// The target is being restored; the source is held (or, a StatefulSet's, gone).
    Restoring {
        moving: Moving,
        /// The PodRestore's name.
        restore: String,
    },
    /// The target runs; the source is being handed over.
    Finalizing {
        moving: Moving,
        restore: String,
        /// The restored pod.
        target_pod: String,
    },
    /// `Succeeded`, `RolledBack` or `Failed`.
    Ended,
    /// The status lacks a fact its phase needs (it was edited, or written by a bug):
    /// the migration cannot go on, and says so.
    Unreadable {
        phase: MigrationPhase,
        /// The missing status field.
        missing: &'static str,
    },
}

/// What the start recorded, which every later phase needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Moving {
    /// The source pod's UID: a pod of its name with another UID is not it.
    pub source_uid: String,
    /// What controls the source, which decides how the target takes its place.
    pub workload: Workload,
    /// Where the source is held: the agent that releases it.
    pub source_node: String,
    pub target_node: String,
    /// The PodCheckpoint's name.
    pub checkpoint: String,
    /// `spec.timeoutSeconds` from the start.
    pub deadline: Deadline,
}

/// A migration's deadline: enforced until its target runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Deadline {
    pub started: Time,
    pub seconds: i32,
}

impl Deadline {
    /// Whether more than `seconds` have passed since the start at `now`.
    pub fn passed(&self, now: &Time) -> bool {
        now.0.as_millisecond() - self.started.0.as_millisecond() > i64::from(self.seconds) * 1000
    }
}

impl State {
    /// Reads a PodMigration.
    pub fn of(migration: &PodMigration) -> Self {
        let spec = &migration.spec;
        let status = migration.status.clone().unwrap_or_default();
        let phase = match status.phase {
            None | Some(MigrationPhase::Pending) => Phase::New {
                target: spec.target.clone(),
                deadline: migration.metadata.creation_timestamp.clone().map(|started| Deadline {
                    started,
                    seconds: spec.timeout_seconds,
                }),
            },
            Some(MigrationPhase::Succeeded | MigrationPhase::RolledBack | MigrationPhase::Failed) => Phase::Ended,
            Some(phase) => on_the_move(phase, &status, spec.timeout_seconds)
                .unwrap_or_else(|missing| Phase::Unreadable { phase, missing }),
        };
        Self {
            name: migration.name_any(),
            pod: spec.source_pod_name.clone(),
            retain: spec.failure_policy == MigrationFailurePolicy::Retain,
            phase,
        }
    }
}

/// A started migration's phase, or the status field it lacks.
fn on_the_move(phase: MigrationPhase, status: &PodMigrationStatus, seconds: i32) -> Result<Phase, &'static str> {
    fn need(value: &Option<String>, field: &'static str) -> Result<String, &'static str> {
        value.clone().ok_or(field)
    }
    let moving = Moving {
        source_uid: need(&status.source_pod_uid, "sourcePodUID")?,
        workload: Workload::from_recorded(status.source_controller.as_deref()),
        source_node: need(&status.source_node_name, "sourceNodeName")?,
        target_node: need(&status.target_node_name, "targetNodeName")?,
        checkpoint: need(&status.checkpoint_name, "checkpointName")?,
        deadline: Deadline {
            started: status.start_time.clone().ok_or("startTime")?,
            seconds,
        },
    };
    Ok(match phase {
        MigrationPhase::Restoring => Phase::Restoring {
            restore: need(&status.restore_name, "restoreName")?,
            moving,
        },
        MigrationPhase::Finalizing => Phase::Finalizing {
            restore: need(&status.restore_name, "restoreName")?,
            target_pod: need(&status.target_pod_name, "targetPodName")?,
            moving,
        },
        _ => Phase::Checkpointing(moving),
    })
}

/// What the shell has read (or learnt from what it did) in this pass. `None`: not
/// looked at yet; an `Option` inside: whether the object exists.
#[derive(Clone, Debug)]
pub struct Observed {
    /// The instant the pass began: every deadline is measured against it.
    pub now: Time,
    /// `spec.sourcePodName`, checked against `spec.sourcePodUID`.
    pub source: Option<SourcePod>,
    /// A ReplicaSet source's labels that its restored pod would be created without,
    /// or why it cannot be kept apart from its ReplicaSet.
    pub withheld: Option<Result<Vec<String>, String>>,
    /// The namespace's PodDisruptionBudgets.
    pub budgets: Option<Vec<PodDisruptionBudget>>,
    /// The nodes, as a pod with the source's tolerations sees them.
    pub nodes: Option<Vec<NodeFacts>>,
    /// The first fitting node whose agent says it can restore what the source's
    /// dumps (or, when no agent could be asked, a node taken unchecked), or why none
    /// can (`crate::compat`).
    pub compatible: Option<Result<Choice, String>>,
    /// The fence of a StatefulSet pod's name, once put up.
    pub fence: Option<Fence>,
    /// The migration's PodCheckpoint.
    pub checkpoint: Option<Option<PodCheckpoint>>,
    /// The held source pod, by name and recorded UID.
    pub held_source: Option<HeldSource>,
    /// How the source's hold ended, by the agent's answer to this pass's release.
    pub released: Option<Released>,
    /// This pass asked the API server to delete the source pod.
    pub source_deleted: bool,
    /// The migration's PodRestore.
    pub restore: Option<Option<PodRestore>>,
    /// Whether the restored pod of a late restore still exists.
    pub restored_pod: Option<bool>,
    /// Whether the source's set controls the restored pod (a set that is gone has
    /// nothing left to adopt it, which counts as done).
    pub adopted: Option<bool>,
}

impl Observed {
    /// Nothing seen yet, at `now`.
    pub fn at(now: Time) -> Self {
        Self {
            now,
            source: None,
            withheld: None,
            budgets: None,
            nodes: None,
            compatible: None,
            fence: None,
            checkpoint: None,
            held_source: None,
            released: None,
            source_deleted: false,
            restore: None,
            restored_pod: None,
            adopted: None,
        }
    }
}

/// The target a compatibility check chose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Its agent and the source's said it can restore what the source dumps.
    Checked(String),
    /// No node is known to fit, and this one's agent (or the source's) did not
    /// answer, for the reason given. Its agent checks again before it restores, and a
    /// refusal there rolls back a migration whose source is still held.
    Unchecked { node: String, why: String },
}

/// Whether the fence of a StatefulSet pod's name is enforced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fence {
    /// The API server refuses a pod of that name without the restore annotation.
    Enforced,
    /// Not enforced yet; the fence was created at `since`.
    Waiting { since: Option<Time> },
}

/// A held source pod, looked up by name and recorded UID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeldSource {
    /// No pod of that name and UID.
    Gone,
    /// It is being deleted.
    Terminating,
    /// It exists and is not being deleted.
    Present,
}

/// How the hold of the source ended, as its agent recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Released {
    /// Its containers were killed by a release (this one or an earlier one).
    Stopped,
    /// It was thawed by a release (a rollback).
    Thawed,
    /// It was thawed without a release, or its agent has no record of the hold: it
    /// ran on past its checkpoint. The text says why.
    RanOn(String),
}

/// What the shell reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Look {
    /// The source pod named by the spec.
    Source,
    /// The source's ReplicaSet, to find the labels its restored pod goes without.
    ReplicaSet {
        name: String,
        labels: BTreeMap<String, String>,
    },
    /// The namespace's PodDisruptionBudgets.
    Budgets,
    /// The nodes, for a pod with these tolerations.
    Nodes { tolerations: Vec<Toleration> },
    /// Which of these nodes (in order) can restore what CRIU dumps on `source`, as
    /// their agents tell.
    Compatible { source: String, candidates: Vec<String> },
    /// The PodCheckpoint of this name.
    Checkpoint(String),
    /// The source pod by name and this UID.
    HeldSource { uid: String },
    /// The PodRestore of this name.
    Restore(String),
    /// Whether this restored pod exists.
    RestoredPod(String),
    /// Whether the source's set (a ReplicaSet or StatefulSet) controls this pod.
    Adoption { set: Workload, pod: String },
}

/// What the shell does next.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Read this, then decide again.
    Look(Look),
    /// Put up the fence of the source pod's name (once) and see whether the API
    /// server enforces it, then decide again.
    RaiseFence,
    /// Record the start (phase `Checkpointing` with these facts, an event), create
    /// the PodCheckpoint unless it exists, and look again in 1 s.
    Begin {
        source_uid: String,
        workload: Workload,
        source_node: String,
        target_node: String,
        checkpoint: String,
        message: String,
    },
    /// Create the PodCheckpoint that holds the source, then decide again with it.
    CreateCheckpoint { name: String, source_uid: String },
    /// Show the checkpoint's stage, bytes and freeze in the status (written only if
    /// that changes it), and look again in 1 s.
    ShowProgress,
    /// Show the restore's stage (`Transferring` while the target fetches) and bytes
    /// in the status (written only if that changes it), and look again in 1 s.
    ShowRestoreProgress,
    /// Ask the agent on `node` to end the hold `operation_id`, stopping the source
    /// for good or thawing it, then decide again with its answer.
    Release {
        node: String,
        operation_id: String,
        stop: bool,
    },
    /// Delete the source pod, by its UID (a pod of its name may be another now), with
    /// this grace; a failure is ignored (it may be gone already). Then decide again.
    DeleteSource { uid: String, grace_seconds: Option<u32> },
    /// Record `Restoring` (with the checkpoint's progress, and the source stopped
    /// when it was), create the PodRestore unless it exists, and look again in 1 s.
    StartRestore { restore: RestoreOf, source_stopped: bool },
    /// Create the PodRestore, then decide again with it.
    CreateRestore(RestoreOf),
    /// Let the target pod's processes run (the source is stopped for good): the target
    /// agent on `node` continues `pod`, then the PodRestore `restore` is marked
    /// continued; look again in 1 s.
    ContinueTarget { node: String, pod: String, restore: String },
    /// Delete a late restore's pod at once, and look again in 1 s.
    DeleteRestoredPod(String),
    /// Delete a late PodRestore, and look again in 1 s.
    DeleteRestore(String),
    /// Record `Finalizing`: the target runs (and the source was stopped, when it
    /// was); then decide again.
    Finalize { target_pod: String, source_stopped: bool },
    /// Hand a ReplicaSet's place to the restored pod: the source marked cheapest to
    /// delete, the withheld labels back on the target, the source deleted. Then
    /// decide again.
    HandOver {
        target_pod: String,
        source_uid: String,
        /// The labels the restored pod was created without, with the source's values.
        labels: BTreeMap<String, String>,
    },
    /// Look again after this long.
    Requeue(Duration),
    /// End `Succeeded`, lifting the fence.
    Succeed {
        downtime_millis: Option<i64>,
        message: String,
    },
    /// End `Failed`, lifting the fence.
    Fail { reason: &'static str, message: String },
    /// The source ran on past its checkpoint: delete the restored pod, if any, and end
    /// `Failed` with reason `SourceResumed` (the shell adds to `message` that it
    /// deleted the pod).
    SourceResumed {
        restored_pod: Option<String>,
        message: String,
    },
    /// End `RolledBack`, lifting the fence.
    RollBack { reason: &'static str, message: String },
    /// Nothing to do until the migration changes.
    Rest,
}

/// The PodRestore a migration creates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreOf {
    pub name: String,
    pub checkpoint: String,
    pub target_node: String,
    pub workload: Workload,
    /// The source's labels as the checkpoint recorded them: a ReplicaSet's restored
    /// pod is created without those its ReplicaSet selects on.
    pub labels: BTreeMap<String, String>,
    /// Its processes are restored stopped, to run only once the source is stopped for
    /// good (all but a StatefulSet's, whose source is gone before its restore).
    pub start_stopped: bool,
}

/// What the migration in `state` does next, given what was `seen` in this pass.
pub fn decide(state: &State, seen: &Observed) -> Step {
    match &state.phase {
        Phase::New { target, deadline } => start(state, target.as_ref(), deadline.as_ref(), seen),
        Phase::Checkpointing(moving) => checkpointing(state, moving, seen),
        Phase::Restoring { moving, restore } => restoring(state, moving, restore, None, seen),
        Phase::Finalizing {
            moving,
            restore,
            target_pod,
        } => restoring(state, moving, restore, Some(target_pod), seen),
        Phase::Ended => Step::Rest,
        Phase::Unreadable { phase, missing } => fail(
            reasons::MIGRATION_FAILED,
            format!(
                "status.{missing} is not set, and phase {phase:?} needs it: the migration cannot go on (the agent \
                 thaws a held source at its freeze deadline)"
            ),
        ),
    }
}

fn fail(reason: &'static str, message: String) -> Step {
    Step::Fail { reason, message }
}

const SOON: Duration = Duration::from_secs(1);

/// Checks the source pod, its controller, budgets and a target node, fences a
/// StatefulSet pod's name, then begins.
fn start(state: &State, target: Option<&NodeTarget>, deadline: Option<&Deadline>, seen: &Observed) -> Step {
    let pod = match &seen.source {
        None => return Step::Look(Look::Source),
        Some(SourcePod::Found(pod)) => pod,
        Some(SourcePod::Missing(message)) => return fail(reasons::SOURCE_POD_NOT_FOUND, message.clone()),
        Some(SourcePod::Replaced(message)) => return fail(reasons::SOURCE_POD_REPLACED, message.clone()),
    };
    let workload = match Workload::of(pod) {
        Ok(workload) => workload,
        Err(message) => return fail(reasons::MIGRATION_FAILED, message),
    };
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    if let Workload::ReplicaSet(set) = &workload {
        match &seen.withheld {
            None => {
                return Step::Look(Look::ReplicaSet {
                    name: set.clone(),
                    labels,
                });
            }
            Some(Err(message)) => return fail(reasons::MIGRATION_FAILED, message.clone()),
            Some(Ok(_)) => {}
        }
    }
    // A migration takes the pod down for its downtime: its budgets must allow it.
    let Some(budgets) = &seen.budgets else {
        return Step::Look(Look::Budgets);
    };
    if let Some(message) = blocking_budget(budgets, &labels) {
        return fail(reasons::DISRUPTION_NOT_ALLOWED, message);
    }
    let spec = pod.spec.as_ref();
    // Not scheduled yet: nothing to move from.
    let Some(source_node) = spec.and_then(|s| s.node_name.clone()) else {
        return Step::Requeue(Duration::from_secs(3));
    };
    let Some(nodes) = &seen.nodes else {
        return Step::Look(Look::Nodes {
            tolerations: spec.and_then(|s| s.tolerations.clone()).unwrap_or_default(),
        });
    };
    let candidates = match target_nodes(target, &source_node, nodes) {
        Ok(candidates) => candidates,
        Err(message) => return fail(reasons::NO_COMPATIBLE_NODE, message),
    };
    // A StatefulSet pod's name must be kept free for the restore before anything
    // is frozen.
    if let Workload::StatefulSet(_) = &workload {
        match &seen.fence {
            None => return Step::RaiseFence,
            Some(Fence::Enforced) => {}
            Some(Fence::Waiting { since }) => {
                let age = since
                    .as_ref()
                    .map_or(0, |t| seen.now.0.as_millisecond() - t.0.as_millisecond());
                if age < FENCE_DEADLINE.as_millis() as i64 {
                    return Step::Requeue(Duration::from_millis(500));
                }
                return fail(
                    reasons::MIGRATION_FAILED,
                    format!(
                        "the API server does not enforce the fence {} on pod name {} after {} s: is the \
                         ValidatingAdmissionPolicy {FENCE_POLICY} and its binding installed (the Helm chart installs \
                         them)?",
                        fence_name(&state.name),
                        state.pod,
                        FENCE_DEADLINE.as_secs(),
                    ),
                );
            }
        }
    }
    // Only a target that can restore what CRIU dumps here is worth a freeze.
    let target_node = match &seen.compatible {
        None => {
            return Step::Look(Look::Compatible {
                source: source_node,
                candidates,
            });
        }
        Some(Err(message)) => return fail(reasons::NO_COMPATIBLE_NODE, message.clone()),
        Some(Ok(Choice::Checked(target))) => target.clone(),
        // A StatefulSet's source is deleted before its target restores, so a refusal
        // there would leave nothing to roll back to: it is never moved unchecked. The
        // agents are waited for (a rollout) until the migration's deadline (none
        // known: no wait); its fence stays up meanwhile (it only keeps the name).
        Some(Ok(Choice::Unchecked { node, why })) if matches!(workload, Workload::StatefulSet(_)) => {
            if deadline.is_none_or(|d| d.passed(&seen.now)) {
                return fail(
                    reasons::NO_COMPATIBLE_NODE,
                    format!(
                        "no node is known to restore what {source_node} dumps within spec.timeoutSeconds: {why}; a \
                         StatefulSet pod's source is deleted before its target restores, so it is not moved to {node} \
                         unchecked, and nothing was frozen"
                    ),
                );
            }
            return Step::Requeue(Duration::from_secs(5));
        }
        Some(Ok(Choice::Unchecked { node, .. })) => node.clone(),
    };
    let Some(source_uid) = pod.metadata.uid.clone() else {
        return fail(
            reasons::MIGRATION_FAILED,
            format!("pod {} has no UID to hold it by", state.pod),
        );
    };
    Step::Begin {
        message: format!("moving pod {} from {source_node} to {target_node}", state.pod),
        source_uid,
        workload,
        source_node,
        target_node,
        checkpoint: format!("{}-checkpoint", state.name),
    }
}

/// Waits for the checkpoint; once it is Ready, retires a StatefulSet's source (its
/// name is reused) and starts the restore.
fn checkpointing(state: &State, moving: &Moving, seen: &Observed) -> Step {
    let checkpoint = match &seen.checkpoint {
        None => return Step::Look(Look::Checkpoint(moving.checkpoint.clone())),
        // Recorded, not yet created: an operator stopped in between takes the step now.
        Some(None) => {
            return Step::CreateCheckpoint {
                name: moving.checkpoint.clone(),
                source_uid: moving.source_uid.clone(),
            };
        }
        Some(Some(checkpoint)) => checkpoint,
    };
    let status = checkpoint.status.as_ref();
    match status.and_then(|s| s.phase) {
        Some(CheckpointPhase::Ready) => {}
        // Its agent thawed the source: nothing was touched.
        Some(CheckpointPhase::Failed) => {
            let cause = status
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION_READY))
                .map(|c| c.message.clone())
                .unwrap_or_default();
            return fail(
                reasons::MIGRATION_FAILED,
                format!("the checkpoint failed, and the source pod runs on: {cause}"),
            );
        }
        // The checkpoint has as long from its own start; its agent thaws the source then.
        _ if moving.deadline.passed(&seen.now) => {
            return fail(
                reasons::TIMED_OUT,
                format!(
                    "the checkpoint did not finish within spec.timeoutSeconds ({} s); the checkpoint has as long from \
                     its own start, after which its agent thaws the source",
                    moving.deadline.seconds
                ),
            );
        }
        _ => return Step::ShowProgress,
    }
    let restore = restore_of(format!("{}-restore", state.name), moving, checkpoint);
    let Workload::StatefulSet(_) = &moving.workload else {
        return Step::StartRestore {
            restore,
            source_stopped: false,
        };
    };
    // A StatefulSet's pod comes back under its own name: the source is stopped and
    // deleted first, and waited for.
    let held = match seen.held_source {
        None => {
            return Step::Look(Look::HeldSource {
                uid: moving.source_uid.clone(),
            });
        }
        Some(held) => held,
    };
    match (held, &seen.released) {
        (HeldSource::Gone, _) => Step::StartRestore {
            restore,
            source_stopped: true,
        },
        (HeldSource::Terminating, _) => Step::Requeue(SOON),
        (HeldSource::Present, None) => release(moving, checkpoint, true),
        // Killed already: a short grace ends whatever the kubelet restarted since.
        (HeldSource::Present, Some(Released::Stopped)) if !seen.source_deleted => Step::DeleteSource {
            uid: moving.source_uid.clone(),
            grace_seconds: Some(1),
        },
        (HeldSource::Present, Some(Released::Stopped)) => Step::Requeue(SOON),
        (HeldSource::Present, Some(Released::Thawed)) => source_resumed(state, None, "an earlier release thawed it"),
        (HeldSource::Present, Some(Released::RanOn(why))) => source_resumed(state, None, why),
    }
}

fn restore_of(name: String, moving: &Moving, checkpoint: &PodCheckpoint) -> RestoreOf {
    RestoreOf {
        name,
        checkpoint: moving.checkpoint.clone(),
        target_node: moving.target_node.clone(),
        workload: moving.workload.clone(),
        labels: checkpointed_labels(checkpoint),
        start_stopped: !matches!(moving.workload, Workload::StatefulSet(_)),
    }
}

/// The source pod's labels as the checkpoint recorded them.
fn checkpointed_labels(checkpoint: &PodCheckpoint) -> BTreeMap<String, String> {
    checkpoint
        .status
        .as_ref()
        .and_then(|s| s.checkpointed_pod_template.as_ref())
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

/// Ends the source's hold, named by the PodCheckpoint's UID (its operation id),
/// stopping the source or thawing it.
fn release(moving: &Moving, checkpoint: &PodCheckpoint, stop: bool) -> Step {
    match &checkpoint.metadata.uid {
        Some(operation_id) => Step::Release {
            node: moving.source_node.clone(),
            operation_id: operation_id.clone(),
            stop,
        },
        None => fail(
            reasons::MIGRATION_FAILED,
            format!(
                "the migration's PodCheckpoint {} has no UID to name its hold by",
                checkpoint.name_any()
            ),
        ),
    }
}

/// Ends a migration whose source ran on past its checkpoint: the source has the
/// newer state and stays; the restored pod, if any, goes so the pod never runs twice.
fn source_resumed(state: &State, restored_pod: Option<&String>, why: &str) -> Step {
    Step::SourceResumed {
        restored_pod: restored_pod.cloned(),
        message: format!(
            "the source pod {} ran on past its checkpoint ({why}), so it stays where it is with its newer state",
            state.pod
        ),
    }
}

/// Waits for the restore (`Restoring`), or hands over to it (`Finalizing`, with the
/// target pod): once it is Ready the source is released for good and the target
/// takes its place; when it fails, or does not run by the deadline, the migration
/// rolls back.
fn restoring(state: &State, moving: &Moving, restore: &str, target_pod: Option<&String>, seen: &Observed) -> Step {
    let checkpoint = match &seen.checkpoint {
        None => return Step::Look(Look::Checkpoint(moving.checkpoint.clone())),
        Some(None) => {
            // Finalizing, the source is stopped for good: a held target is let run
            // before the migration ends, or the pod would be lost.
            if let Some(target_pod) = target_pod {
                match &seen.restore {
                    None => return Step::Look(Look::Restore(restore.to_owned())),
                    Some(Some(held)) if held_stopped(held) => return let_target_run(moving, target_pod, held, seen),
                    _ => {}
                }
            }
            return fail(
                reasons::MIGRATION_FAILED,
                "the migration's PodCheckpoint was deleted while it ran".to_owned(),
            );
        }
        Some(Some(checkpoint)) => checkpoint,
    };
    // Only until the target runs: once it does, the migration finishes.
    let late = target_pod.is_none() && moving.deadline.passed(&seen.now);
    let restore = match &seen.restore {
        None => return Step::Look(Look::Restore(restore.to_owned())),
        // Late: never created again.
        Some(None) if late => {
            return roll_back(state, moving, checkpoint, seen, reasons::TIMED_OUT, &late_cause(moving));
        }
        Some(None) => {
            return Step::CreateRestore(restore_of(restore.to_owned(), moving, checkpoint));
        }
        Some(Some(restore)) => restore,
    };
    let status = restore.status.as_ref();
    let restored_pod = status.and_then(|s| s.restored_pod_name.as_ref());
    match status.and_then(|s| s.phase) {
        Some(RestorePhase::Ready) => match target_pod {
            None => target_runs(state, moving, checkpoint, restore, seen),
            Some(target_pod) => hand_over(state, moving, target_pod, checkpoint, restore, seen),
        },
        // Late, the target held stopped: the source is thawed first. A source that an
        // earlier release stopped for good (an operator stopped between that release
        // and recording it) cannot come back: the target goes on instead.
        _ if late
            && !state.retain
            && held_stopped(restore)
            && matches!(seen.released, None | Some(Released::Stopped)) =>
        {
            match (&seen.released, restored_pod) {
                (None, _) | (_, None) => release(moving, checkpoint, false),
                (_, Some(pod)) => Step::Finalize {
                    target_pod: pod.clone(),
                    source_stopped: true,
                },
            }
        }
        // Late and not running: what exists of the target goes (the pod first, each
        // waited for), so nothing of it can start once the source thaws.
        _ if late => match (restored_pod, seen.restored_pod) {
            (Some(pod), None) => Step::Look(Look::RestoredPod(pod.clone())),
            (Some(pod), Some(true)) => Step::DeleteRestoredPod(pod.clone()),
            _ => Step::DeleteRestore(restore.name_any()),
        },
        // Restored, its processes stopped: the source is stopped for good first (its
        // release says whether it ran on), then the target is let run. It never runs
        // while the source might.
        _ if held_stopped(restore) => {
            let Some(pod) = restored_pod else {
                return Step::Requeue(SOON);
            };
            match target_pod {
                None => match &seen.released {
                    None => release(moving, checkpoint, true),
                    Some(Released::Stopped) => Step::Finalize {
                        target_pod: pod.clone(),
                        source_stopped: true,
                    },
                    Some(Released::Thawed) => source_resumed(state, Some(pod), "an earlier release thawed it"),
                    Some(Released::RanOn(why)) => source_resumed(state, Some(pod), why),
                },
                Some(target_pod) => let_target_run(moving, target_pod, restore, seen),
            }
        }
        // Continued, the target is the only copy (the source was stopped for good):
        // nothing to roll back to, and the restore kept its pod.
        Some(RestorePhase::Failed) if crate::restore::committed(restore) => {
            let cause = restore_failure(restore);
            fail(
                reasons::MIGRATION_FAILED,
                format!(
                    "the source pod {} was stopped for good and its target was let run, but the restore then failed \
                     ({cause})",
                    state.pod
                ),
            )
        }
        Some(RestorePhase::Failed) => {
            let cause = restore_failure(restore);
            roll_back(
                state,
                moving,
                checkpoint,
                seen,
                reasons::ROLLED_BACK,
                &format!("the restore failed ({cause})"),
            )
        }
        // Still fetching or restoring: its stage and bytes where SREs look.
        _ => Step::ShowRestoreProgress,
    }
}

/// The source is stopped for good: a bare one is deleted (its kubelet would restart
/// its killed containers, fresh, beside the target), then the held target is let run.
fn let_target_run(moving: &Moving, target_pod: &str, restore: &PodRestore, seen: &Observed) -> Step {
    if moving.workload == Workload::Bare && !seen.source_deleted {
        return Step::DeleteSource {
            uid: moving.source_uid.clone(),
            grace_seconds: Some(1),
        };
    }
    Step::ContinueTarget {
        node: moving.target_node.clone(),
        pod: target_pod.to_owned(),
        restore: restore.name_any(),
    }
}

/// Why the restore failed, as its Ready condition says.
fn restore_failure(restore: &PodRestore) -> String {
    restore
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION_READY))
        .map(|c| c.message.clone())
        .unwrap_or_else(|| format!("PodRestore {} failed", restore.name_any()))
}

/// Whether the restore's pod is restored and waits, stopped, to be continued.
fn held_stopped(restore: &PodRestore) -> bool {
    crate::restore::waits_to_continue(restore)
        && restore.status.as_ref().and_then(|s| s.stage.as_deref()) == Some(crate::restore::HELD_STAGE)
}

fn late_cause(moving: &Moving) -> String {
    format!(
        "the restore did not finish within spec.timeoutSeconds ({} s); its PodRestore and pod were deleted",
        moving.deadline.seconds
    )
}

/// The target runs: the source stops for good (a StatefulSet's was stopped before
/// its restore), then `Finalizing` is recorded.
fn target_runs(
    state: &State,
    moving: &Moving,
    checkpoint: &PodCheckpoint,
    restore: &PodRestore,
    seen: &Observed,
) -> Step {
    let Some(target_pod) = restore.status.as_ref().and_then(|s| s.restored_pod_name.clone()) else {
        return fail(
            reasons::MIGRATION_FAILED,
            format!("PodRestore {} is Ready but names no restored pod", restore.name_any()),
        );
    };
    if let Workload::StatefulSet(_) = &moving.workload {
        return Step::Finalize {
            target_pod,
            source_stopped: false,
        };
    }
    match &seen.released {
        None => release(moving, checkpoint, true),
        Some(Released::Stopped) => Step::Finalize {
            target_pod,
            source_stopped: true,
        },
        // Both ran: the source, newer, stays; the target goes.
        Some(Released::Thawed) => source_resumed(state, Some(&target_pod), "an earlier release thawed it"),
        Some(Released::RanOn(why)) => source_resumed(state, Some(&target_pod), why),
    }
}

/// The source is stopped: the target takes its place, by the source's deletion (a
/// bare pod) or its set's adoption; then the migration succeeds.
fn hand_over(
    state: &State,
    moving: &Moving,
    target_pod: &str,
    checkpoint: &PodCheckpoint,
    restore: &PodRestore,
    seen: &Observed,
) -> Step {
    let set = match &moving.workload {
        Workload::Bare if !seen.source_deleted => {
            return Step::DeleteSource {
                uid: moving.source_uid.clone(),
                grace_seconds: None,
            };
        }
        Workload::Bare => None,
        Workload::ReplicaSet(_) if !seen.source_deleted => {
            let withheld = parse_withheld(
                restore
                    .annotations()
                    .get(WITHHOLD_LABELS_ANNOTATION)
                    .map(String::as_str),
            );
            return Step::HandOver {
                target_pod: target_pod.to_owned(),
                source_uid: moving.source_uid.clone(),
                labels: labels_to_restore(&withheld, &checkpointed_labels(checkpoint)),
            };
        }
        // A StatefulSet's restored pod has the source's name.
        set @ Workload::ReplicaSet(_) => Some((set, target_pod)),
        set @ Workload::StatefulSet(_) => Some((set, state.pod.as_str())),
    };
    if let Some((set, pod)) = set {
        match seen.adopted {
            None => {
                return Step::Look(Look::Adoption {
                    set: set.clone(),
                    pod: pod.to_owned(),
                });
            }
            Some(false) => return Step::Requeue(SOON),
            Some(true) => {}
        }
    }
    // From the freeze to the target Running and Ready, to the millisecond where the
    // agent and the restore recorded the instants (whole seconds before).
    let frozen = checkpoint.status.as_ref();
    let frozen_at = frozen
        .and_then(|s| s.frozen_time.as_ref().map(|t| t.0))
        .or(frozen.and_then(|s| s.start_time.as_ref().map(|t| t.0)));
    let ready = restore.status.as_ref();
    let ready_at = ready
        .and_then(|s| s.ready_time.as_ref().map(|t| t.0))
        .or(ready.and_then(|s| s.completion_time.as_ref().map(|t| t.0)))
        .unwrap_or(seen.now.0);
    let downtime_millis = frozen_at.map(|f| (ready_at.as_millisecond() - f.as_millisecond()).max(0));
    let owner_note = moving
        .workload
        .recorded()
        .map(|c| format!(" under {c}"))
        .unwrap_or_default();
    Step::Succeed {
        downtime_millis,
        message: format!(
            "pod {} runs on {} as {target_pod}{owner_note}; the source is gone; downtime {} ms",
            state.pod,
            moving.target_node,
            downtime_millis.unwrap_or_default()
        ),
    }
}

/// Ends a migration whose target will not run: the source is thawed (a
/// StatefulSet's, stopped before its restore, comes back from its template), and
/// the migration ends `RolledBack` with `reason`, or `Failed` when its policy
/// retains the source.
fn roll_back(
    state: &State,
    moving: &Moving,
    checkpoint: &PodCheckpoint,
    seen: &Observed,
    reason: &'static str,
    cause: &str,
) -> Step {
    let message = match (&moving.workload, &seen.released) {
        // The source was stopped and deleted before the restore: the StatefulSet
        // brings the pod back once the fence is lifted.
        (Workload::StatefulSet(set), _) => format!(
            "{cause}; StatefulSet {set} recreates pod {} from its template, with its volumes and without its \
             in-memory state",
            state.pod
        ),
        _ if state.retain => {
            return fail(
                reason,
                format!("{cause}; the source stays frozen until its deadline for inspection"),
            );
        }
        // Roll back: the source thaws and carries on where it was frozen.
        (_, None) => return release(moving, checkpoint, false),
        (_, Some(Released::Thawed)) => format!("{cause}; the source pod was thawed and runs on"),
        (_, Some(Released::RanOn(why))) => format!("{cause}; the source pod runs on ({why})"),
        (_, Some(Released::Stopped)) => {
            format!("{cause}; the source pod had been stopped by an earlier release and does not run")
        }
    };
    Step::RollBack { reason, message }
}

/// The name of a migration's fence.
pub fn fence_name(migration: &str) -> String {
    format!("{migration}-fence")
}

/// The PodDisruptionBudget that forbids taking the pod down now, if one does.
pub fn blocking_budget(budgets: &[PodDisruptionBudget], labels: &BTreeMap<String, String>) -> Option<String> {
    budgets.iter().find_map(|b| {
        let selector = b.spec.as_ref()?.selector.as_ref()?;
        let allowed = b.status.as_ref().and_then(|s| s.disruptions_allowed).unwrap_or(0);
        (selects(selector, labels) && allowed < 1).then(|| {
            format!(
                "PodDisruptionBudget {} allows no disruption of the pod now (disruptionsAllowed {allowed})",
                b.metadata.name.clone().unwrap_or_default()
            )
        })
    })
}

/// The target node: the named one, else a ready node other than the source that
/// matches the selector (name order).
pub fn target_node(target: Option<&NodeTarget>, source: &str, nodes: &[NodeFacts]) -> Result<String, String> {
    target_nodes(target, source, nodes).map(|mut fits| fits.remove(0))
}

/// Every node that fits `spec.target`, in the order they are tried (never empty).
pub fn target_nodes(target: Option<&NodeTarget>, source: &str, nodes: &[NodeFacts]) -> Result<Vec<String>, String> {
    let target = target.cloned().unwrap_or_default();
    let mut fits: Vec<&String> = nodes
        .iter()
        .filter(|(name, ready, labels)| {
            *ready
                && name != source
                && target.node_name.as_ref().is_none_or(|n| n == name)
                && target
                    .node_selector
                    .as_ref()
                    .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
        })
        .map(|(name, _, _)| name)
        .collect();
    fits.sort();
    if !fits.is_empty() {
        return Ok(fits.into_iter().cloned().collect());
    }
    Err(match &target.node_name {
        Some(n) if n == source => format!("spec.target.nodeName {n} is the source pod's own node"),
        Some(n) => format!("spec.target.nodeName {n} is not a ready node whose taints the pod tolerates"),
        None => format!("no ready node other than {source} whose taints the pod tolerates matches spec.target"),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use serde_json::{Value, json};

    use super::*;

    /// 2023-11-14T22:13:20Z, when every migration here started.
    const START: i64 = 1_700_000_000;
    const BARE: Option<&str> = None;
    const RS: Option<&str> = Some("ReplicaSet/web-rs");
    const STS: Option<&str> = Some("StatefulSet/db");

    fn at_ms(ms: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_millisecond(ms).unwrap())
    }

    /// Nothing seen yet, `secs` after the start.
    fn after(secs: i64) -> Observed {
        Observed::at(at_ms((START + secs) * 1000))
    }

    /// Migration `move` of pod `web`, `timeoutSeconds: 60`, with this status.
    fn migration(status: Value, policy: &str) -> State {
        State::of(
            &serde_json::from_value(json!({
                "apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration",
                "metadata": {"name": "move", "namespace": "ns", "uid": "m-1",
                             "creationTimestamp": "2023-11-14T22:13:20Z"},
                "spec": {"sourcePodName": "web", "timeoutSeconds": 60, "failurePolicy": policy},
                "status": status
            }))
            .unwrap(),
        )
    }

    /// The status `start` writes, then what the later phases add.
    fn status(phase: &str, controller: Option<&str>) -> Value {
        let mut status = json!({
            "phase": phase, "sourcePodUID": "uid-1", "sourceNodeName": "node-1", "targetNodeName": "node-2",
            "checkpointName": "move-checkpoint", "startTime": "2023-11-14T22:13:20Z"
        });
        if let Some(controller) = controller {
            status["sourceController"] = controller.into();
        }
        if phase != "Checkpointing" {
            status["restoreName"] = "move-restore".into();
        }
        if phase == "Finalizing" {
            status["targetPodName"] = "web-restored".into();
        }
        status
    }

    fn new() -> State {
        migration(Value::Null, "Rollback")
    }
    fn unchecked() -> Choice {
        Choice::Unchecked {
            node: "node-2".into(),
            why: "the agent on node-2 does not answer: connection refused".into(),
        }
    }
    fn checkpointing(controller: Option<&str>) -> State {
        migration(status("Checkpointing", controller), "Rollback")
    }
    fn restoring(controller: Option<&str>) -> State {
        migration(status("Restoring", controller), "Rollback")
    }
    fn retained(controller: Option<&str>) -> State {
        migration(status("Restoring", controller), "Retain")
    }
    fn finalizing(controller: Option<&str>) -> State {
        migration(status("Finalizing", controller), "Rollback")
    }
    /// `phase`'s status without `field`.
    fn lacking(phase: &str, field: &str) -> State {
        let mut status = status(phase, BARE);
        status.as_object_mut().unwrap().remove(field);
        migration(status, "Rollback")
    }

    fn ready_condition(message: &str) -> Value {
        json!([{"type": "Ready", "status": "False", "reason": "Failed", "message": message,
                "lastTransitionTime": "2023-11-14T22:13:30Z"}])
    }

    /// The migration's PodCheckpoint in `phase` (Failed ones with `message`), frozen
    /// 5 s after the start.
    fn checkpoint(phase: &str, message: &str) -> PodCheckpoint {
        let conditions = if message.is_empty() {
            json!([])
        } else {
            ready_condition(message)
        };
        serde_json::from_value(json!({
            "apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint",
            "metadata": {"name": "move-checkpoint", "namespace": "ns", "uid": "cp-uid"},
            "spec": {"sourcePodName": "web"},
            "status": {"phase": phase, "frozenTime": "2023-11-14T22:13:25.000000Z", "conditions": conditions,
                       "checkpointedPodTemplate": {"metadata": {"labels": {"app": "web", "tier": "front"}}}}
        }))
        .unwrap()
    }

    /// The migration's PodRestore in `phase`, its pod Ready 5.75 s after the freeze.
    fn restore(phase: &str, pod: Option<&str>, message: &str) -> PodRestore {
        let conditions = if message.is_empty() {
            json!([])
        } else {
            ready_condition(message)
        };
        serde_json::from_value(json!({
            "apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore",
            "metadata": {"name": "move-restore", "namespace": "ns", "uid": "r-uid",
                         "annotations": {WITHHOLD_LABELS_ANNOTATION: "app"}},
            "spec": {"checkpointName": "move-checkpoint"},
            "status": {"phase": phase, "restoredPodName": pod, "readyTime": "2023-11-14T22:13:30.750000Z",
                       "conditions": conditions}
        }))
        .unwrap()
    }
    fn target(phase: &str) -> PodRestore {
        restore(phase, Some("web-restored"), "")
    }
    /// The target restored with its processes stopped (`HeldStopped`), or continued.
    fn held_target(continued: bool) -> PodRestore {
        let mut held = target("Restoring");
        let annotations = held.metadata.annotations.get_or_insert_with(Default::default);
        annotations.insert(crate::restore::START_STOPPED_ANNOTATION.into(), "true".into());
        if continued {
            annotations.insert(crate::restore::CONTINUED_ANNOTATION.into(), "true".into());
        }
        held.status.as_mut().unwrap().stage = Some(crate::restore::HELD_STAGE.into());
        held
    }

    /// The source pod, controlled by `owner` (kind, name), on `node`.
    fn source(owner: Option<(&str, &str)>, node: Option<&str>) -> SourcePod {
        let owners: Vec<Value> = owner
            .into_iter()
            .map(|(kind, name)| {
                json!({"apiVersion": if kind == "Job" { "batch/v1" } else { "apps/v1" }, "kind": kind,
                       "name": name, "uid": "o-1", "controller": true})
            })
            .collect();
        SourcePod::Found(Box::new(
            serde_json::from_value(json!({
                "metadata": {"name": "web", "namespace": "ns", "uid": "uid-1", "labels": {"app": "web"},
                             "ownerReferences": owners},
                "spec": {"nodeName": node, "containers": [{"name": "web", "image": "busybox"}],
                         "tolerations": [{"key": "dedicated", "operator": "Exists"}]}
            }))
            .unwrap(),
        ))
    }

    fn budget(allowed: i32) -> PodDisruptionBudget {
        serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}},
            "status": {"disruptionsAllowed": allowed, "currentHealthy": 1, "desiredHealthy": 1, "expectedPods": 1}
        }))
        .unwrap()
    }

    fn nodes() -> Vec<NodeFacts> {
        vec![
            ("node-1".to_owned(), true, BTreeMap::new()),
            ("node-2".to_owned(), true, BTreeMap::new()),
        ]
    }

    /// What a pass has seen so far, built up a fact at a time.
    impl Observed {
        fn source(mut self, source: SourcePod) -> Self {
            self.source = Some(source);
            self
        }
        /// Everything `start` reads, for a pod of `owner`, up to the fence.
        fn checked(self, owner: Option<(&str, &str)>) -> Self {
            let mut seen = self.source(source(owner, Some("node-1")));
            seen.withheld = Some(Ok(vec!["app".to_owned()]));
            seen.budgets = Some(vec![budget(1)]);
            seen.nodes = Some(nodes());
            seen.compatible = Some(Ok(Choice::Checked("node-2".to_owned())));
            seen
        }
        fn fence(mut self, fence: Fence) -> Self {
            self.fence = Some(fence);
            self
        }
        fn checkpoint(mut self, checkpoint: Option<PodCheckpoint>) -> Self {
            self.checkpoint = Some(checkpoint);
            self
        }
        fn ready(self) -> Self {
            self.checkpoint(Some(checkpoint("Ready", "")))
        }
        fn held(mut self, held: HeldSource) -> Self {
            self.held_source = Some(held);
            self
        }
        fn released(mut self, released: Released) -> Self {
            self.released = Some(released);
            self
        }
        fn deleted(mut self) -> Self {
            self.source_deleted = true;
            self
        }
        fn restore(mut self, restore: Option<PodRestore>) -> Self {
            self.restore = Some(restore);
            self
        }
        fn restored_pod(mut self, exists: bool) -> Self {
            self.restored_pod = Some(exists);
            self
        }
        fn adopted(mut self, adopted: bool) -> Self {
            self.adopted = Some(adopted);
            self
        }
    }

    fn failed(reason: &'static str, message: &str) -> Step {
        Step::Fail {
            reason,
            message: message.to_owned(),
        }
    }
    fn rolled_back(reason: &'static str, message: &str) -> Step {
        Step::RollBack {
            reason,
            message: message.to_owned(),
        }
    }
    /// A StatefulSet's rollback: its source was deleted before the restore.
    fn recreated(reason: &'static str, cause: &str) -> Step {
        rolled_back(
            reason,
            &format!(
                "{cause}; StatefulSet db recreates pod web from its template, with its volumes and without its \
                 in-memory state"
            ),
        )
    }
    fn release(stop: bool) -> Step {
        Step::Release {
            node: "node-1".into(),
            operation_id: "cp-uid".into(),
            stop,
        }
    }
    fn resumed(restored_pod: Option<&str>, why: &str) -> Step {
        Step::SourceResumed {
            restored_pod: restored_pod.map(str::to_owned),
            message: format!(
                "the source pod web ran on past its checkpoint ({why}), so it stays where it is with its newer state"
            ),
        }
    }
    fn begin(workload: Workload) -> Step {
        Step::Begin {
            source_uid: "uid-1".into(),
            workload,
            source_node: "node-1".into(),
            target_node: "node-2".into(),
            checkpoint: "move-checkpoint".into(),
            message: "moving pod web from node-1 to node-2".into(),
        }
    }
    fn restore_of(workload: Option<&str>) -> RestoreOf {
        RestoreOf {
            name: "move-restore".into(),
            checkpoint: "move-checkpoint".into(),
            target_node: "node-2".into(),
            workload: Workload::from_recorded(workload),
            labels: [("app", "web"), ("tier", "front")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .into(),
            start_stopped: workload != STS,
        }
    }
    fn start_restore(workload: Option<&str>, source_stopped: bool) -> Step {
        Step::StartRestore {
            restore: restore_of(workload),
            source_stopped,
        }
    }
    fn finalize(source_stopped: bool) -> Step {
        Step::Finalize {
            target_pod: "web-restored".into(),
            source_stopped,
        }
    }
    fn succeed(owner_note: &str) -> Step {
        Step::Succeed {
            downtime_millis: Some(5750),
            message: format!(
                "pod web runs on node-2 as web-restored{owner_note}; the source is gone; downtime 5750 ms"
            ),
        }
    }
    const SOON: Step = Step::Requeue(Duration::from_secs(1));

    const DEADLINE_PASSED: &str = "its freeze deadline (30 s) passed";
    const AGENT_RESTARTED: &str = "the agent restarted and its recovery thawed the pod";
    const EARLIER: &str = "an earlier release thawed it";
    const CHECKPOINT_LATE: &str = "the checkpoint did not finish within spec.timeoutSeconds (60 s); the checkpoint \
                                   has as long from its own start, after which its agent thaws the source";
    const RESTORE_LATE: &str =
        "the restore did not finish within spec.timeoutSeconds (60 s); its PodRestore and pod were deleted";
    const ABORTED: &str = "this checkpoint was interrupted: the agent restarted while it ran, and it ended without \
                           a result (the pod was thawed); it is not run again under the same id";

    fn thawed_without_release(why: &str) -> Released {
        Released::RanOn(format!("it was thawed without a release: {why}"))
    }
    fn unknown_hold() -> Released {
        Released::RanOn("its agent does not know the hold: operation cp-uid holds no pod".into())
    }

    struct Row {
        name: &'static str,
        state: State,
        seen: Observed,
        step: Step,
    }

    fn row(name: &'static str, state: State, seen: Observed, step: Step) -> Row {
        Row {
            name,
            state,
            seen,
            step,
        }
    }

    fn check(rows: Vec<Row>) {
        let mut names = std::collections::BTreeSet::new();
        for Row {
            name,
            state,
            seen,
            step,
        } in rows
        {
            assert!(names.insert(name), "two rows named {name:?}");
            assert_eq!(decide(&state, &seen), step, "row {name:?}");
        }
    }

    #[test]
    fn a_new_migration_checks_the_source_and_the_target_then_begins() {
        let sts = Some(("StatefulSet", "db"));
        let rs = Some(("ReplicaSet", "web-rs"));
        check(vec![
            row("first the source pod", new(), after(0), Step::Look(Look::Source)),
            row(
                "a Pending status starts the same",
                migration(json!({"phase": "Pending"}), "Rollback"),
                after(0),
                Step::Look(Look::Source),
            ),
            row(
                "source missing",
                new(),
                after(0).source(SourcePod::Missing("gone".into())),
                failed(reasons::SOURCE_POD_NOT_FOUND, "gone"),
            ),
            row(
                "source replaced",
                new(),
                after(0).source(SourcePod::Replaced("other uid".into())),
                failed(reasons::SOURCE_POD_REPLACED, "other uid"),
            ),
            row(
                "a Job's pod is refused",
                new(),
                after(0).source(source(Some(("Job", "nightly")), Some("node-1"))),
                failed(
                    reasons::MIGRATION_FAILED,
                    "pod web is managed by Job nightly; cryopod migrates bare pods and pods of ReplicaSets, \
                     Deployments and StatefulSets",
                ),
            ),
            row(
                "a ReplicaSet's selector is read with the pod's labels",
                new(),
                after(0).source(source(rs, Some("node-1"))),
                Step::Look(Look::ReplicaSet {
                    name: "web-rs".into(),
                    labels: [("app".to_owned(), "web".to_owned())].into(),
                }),
            ),
            row(
                "a ReplicaSet that would select the pod without its labels",
                new(),
                Observed {
                    withheld: Some(Err("ReplicaSet web-rs: no".into())),
                    ..after(0).source(source(rs, Some("node-1")))
                },
                failed(reasons::MIGRATION_FAILED, "ReplicaSet web-rs: no"),
            ),
            row(
                "then the budgets",
                new(),
                after(0).source(source(None, Some("node-1"))),
                Step::Look(Look::Budgets),
            ),
            row(
                "a budget that allows no disruption",
                new(),
                Observed {
                    budgets: Some(vec![budget(0)]),
                    ..after(0).source(source(None, Some("node-1")))
                },
                failed(
                    reasons::DISRUPTION_NOT_ALLOWED,
                    "PodDisruptionBudget web allows no disruption of the pod now (disruptionsAllowed 0)",
                ),
            ),
            row(
                "an unscheduled pod is waited for",
                new(),
                Observed {
                    budgets: Some(vec![]),
                    ..after(0).source(source(None, None))
                },
                Step::Requeue(Duration::from_secs(3)),
            ),
            row(
                "then the nodes, as the pod's tolerations see them",
                new(),
                Observed {
                    budgets: Some(vec![budget(1)]),
                    ..after(0).source(source(None, Some("node-1")))
                },
                Step::Look(Look::Nodes {
                    tolerations: vec![Toleration {
                        key: Some("dedicated".into()),
                        operator: Some("Exists".into()),
                        ..Toleration::default()
                    }],
                }),
            ),
            row(
                "no other node fits",
                new(),
                Observed {
                    nodes: Some(vec![("node-1".to_owned(), true, BTreeMap::new())]),
                    ..after(0).checked(None)
                },
                failed(
                    reasons::NO_COMPATIBLE_NODE,
                    "no ready node other than node-1 whose taints the pod tolerates matches spec.target",
                ),
            ),
            row(
                "then the agents: which fitting node can restore what the source dumps",
                new(),
                Observed {
                    compatible: None,
                    ..after(0).checked(None)
                },
                Step::Look(Look::Compatible {
                    source: "node-1".into(),
                    candidates: vec!["node-2".into()],
                }),
            ),
            row(
                "no node can restore what the source dumps: failed before anything is frozen",
                new(),
                Observed {
                    compatible: Some(Err("node-2 runs cgroup V2".into())),
                    ..after(0).checked(None)
                },
                failed(reasons::NO_COMPATIBLE_NODE, "node-2 runs cgroup V2"),
            ),
            row(
                "a bare pod begins",
                new(),
                after(0).checked(None),
                begin(Workload::Bare),
            ),
            row(
                "a ReplicaSet's pod begins",
                new(),
                after(0).checked(rs),
                begin(Workload::ReplicaSet("web-rs".into())),
            ),
            row(
                "a StatefulSet pod's name is fenced first",
                new(),
                after(0).checked(sts),
                Step::RaiseFence,
            ),
            row(
                "a fence not yet enforced is waited for",
                new(),
                after(0).checked(sts).fence(Fence::Waiting {
                    since: Some(at_ms((START - 14) * 1000)),
                }),
                Step::Requeue(Duration::from_millis(500)),
            ),
            row(
                "a fence not enforced within 15 s fails naming the policy",
                new(),
                after(0).checked(sts).fence(Fence::Waiting {
                    since: Some(at_ms((START - 15) * 1000)),
                }),
                failed(
                    reasons::MIGRATION_FAILED,
                    "the API server does not enforce the fence move-fence on pod name web after 15 s: is the \
                     ValidatingAdmissionPolicy cryopod-restore-fence and its binding installed (the Helm chart \
                     installs them)?",
                ),
            ),
            row(
                "an enforced fence begins",
                new(),
                after(0).checked(sts).fence(Fence::Enforced),
                begin(Workload::StatefulSet("db".into())),
            ),
            row(
                "a bare pod goes to a target whose agent did not answer: it checks before it restores, and the held \
                 source is thawed if it refuses",
                new(),
                Observed {
                    compatible: Some(Ok(unchecked())),
                    ..after(0).checked(None)
                },
                begin(Workload::Bare),
            ),
            row(
                "a StatefulSet pod is never moved unchecked (its source is deleted before the restore): the agents \
                 are waited for",
                new(),
                Observed {
                    compatible: Some(Ok(unchecked())),
                    ..after(60).checked(sts).fence(Fence::Enforced)
                },
                Step::Requeue(Duration::from_secs(5)),
            ),
            row(
                "until spec.timeoutSeconds from the migration's creation, before anything is frozen",
                new(),
                Observed {
                    compatible: Some(Ok(unchecked())),
                    ..after(61).checked(sts).fence(Fence::Enforced)
                },
                failed(
                    reasons::NO_COMPATIBLE_NODE,
                    "no node is known to restore what node-1 dumps within spec.timeoutSeconds: the agent on node-2 \
                     does not answer: connection refused; a StatefulSet pod's source is deleted before its target \
                     restores, so it is not moved to node-2 unchecked, and nothing was frozen",
                ),
            ),
        ]);
    }

    #[test]
    fn a_checkpointing_migration_waits_for_its_checkpoint_then_restores() {
        check(vec![
            row(
                "the checkpoint is read",
                checkpointing(BARE),
                after(10),
                Step::Look(Look::Checkpoint("move-checkpoint".into())),
            ),
            row(
                "operator restarted between recording the start and creating the checkpoint",
                checkpointing(BARE),
                after(10).checkpoint(None),
                Step::CreateCheckpoint {
                    name: "move-checkpoint".into(),
                    source_uid: "uid-1".into(),
                },
            ),
            row(
                "under way: its progress is shown",
                checkpointing(BARE),
                after(10).checkpoint(Some(checkpoint("Uploading", ""))),
                Step::ShowProgress,
            ),
            row(
                "just created, no status yet",
                checkpointing(BARE),
                after(10).checkpoint(Some(PodCheckpoint::new(
                    "move-checkpoint",
                    checkpoint("Ready", "").spec,
                ))),
                Step::ShowProgress,
            ),
            row(
                "59 s in is on time",
                checkpointing(BARE),
                after(59).checkpoint(Some(checkpoint("Checkpointing", ""))),
                Step::ShowProgress,
            ),
            row(
                "timed out while checkpointing",
                checkpointing(BARE),
                after(61).checkpoint(Some(checkpoint("Checkpointing", ""))),
                failed(reasons::TIMED_OUT, CHECKPOINT_LATE),
            ),
            row(
                "checkpoint failed: the source runs on",
                checkpointing(BARE),
                after(10).checkpoint(Some(checkpoint("Failed", "dump failed: container web"))),
                failed(
                    reasons::MIGRATION_FAILED,
                    "the checkpoint failed, and the source pod runs on: dump failed: container web",
                ),
            ),
            row(
                "agent restarted mid-checkpoint (ABORTED)",
                checkpointing(BARE),
                after(10).checkpoint(Some(checkpoint("Failed", ABORTED))),
                failed(
                    reasons::MIGRATION_FAILED,
                    &format!("the checkpoint failed, and the source pod runs on: {ABORTED}"),
                ),
            ),
            row(
                "a failure is a failure, also past the deadline",
                checkpointing(BARE),
                after(61).checkpoint(Some(checkpoint("Failed", "boom"))),
                failed(
                    reasons::MIGRATION_FAILED,
                    "the checkpoint failed, and the source pod runs on: boom",
                ),
            ),
            row(
                "a bare pod's checkpoint Ready: the restore starts",
                checkpointing(BARE),
                after(10).ready(),
                start_restore(BARE, false),
            ),
            row(
                "a Ready checkpoint restores, also past the deadline",
                checkpointing(BARE),
                after(61).ready(),
                start_restore(BARE, false),
            ),
            row(
                "a ReplicaSet's: the restore carries the checkpointed labels",
                checkpointing(RS),
                after(10).ready(),
                start_restore(RS, false),
            ),
        ]);
    }

    #[test]
    fn a_statefulset_source_is_stopped_and_gone_before_its_name_is_restored() {
        check(vec![
            row(
                "the held source is read by name and UID",
                checkpointing(STS),
                after(10).ready(),
                Step::Look(Look::HeldSource { uid: "uid-1".into() }),
            ),
            row(
                "held: released for good",
                checkpointing(STS),
                after(10).ready().held(HeldSource::Present),
                release(true),
            ),
            row(
                "stopped: deleted with a short grace",
                checkpointing(STS),
                after(10).ready().held(HeldSource::Present).released(Released::Stopped),
                Step::DeleteSource {
                    uid: "uid-1".into(),
                    grace_seconds: Some(1),
                },
            ),
            row(
                "deleted: waited for",
                checkpointing(STS),
                after(10)
                    .ready()
                    .held(HeldSource::Present)
                    .released(Released::Stopped)
                    .deleted(),
                SOON,
            ),
            row(
                "operator restarted while the source terminates",
                checkpointing(STS),
                after(10).ready().held(HeldSource::Terminating),
                SOON,
            ),
            row(
                "gone: the restore starts, the source recorded stopped",
                checkpointing(STS),
                after(10).ready().held(HeldSource::Gone),
                start_restore(STS, true),
            ),
            row(
                "hold lost: the freeze deadline thawed it",
                checkpointing(STS),
                after(10)
                    .ready()
                    .held(HeldSource::Present)
                    .released(thawed_without_release(DEADLINE_PASSED)),
                resumed(None, &format!("it was thawed without a release: {DEADLINE_PASSED}")),
            ),
            row(
                "agent restarted: it knows no hold",
                checkpointing(STS),
                after(10).ready().held(HeldSource::Present).released(unknown_hold()),
                resumed(None, "its agent does not know the hold: operation cp-uid holds no pod"),
            ),
            row(
                "an earlier release thawed it",
                checkpointing(STS),
                after(10).ready().held(HeldSource::Present).released(Released::Thawed),
                resumed(None, EARLIER),
            ),
        ]);
    }

    #[test]
    fn a_target_restored_stopped_runs_only_once_its_source_is_stopped_for_good() {
        let held = || after(20).ready().restore(Some(held_target(false)));
        let continue_target = Step::ContinueTarget {
            node: "node-2".into(),
            pod: "web-restored".into(),
            restore: "move-restore".into(),
        };
        check(vec![
            row(
                "the target is restored, stopped: the source is released for good first",
                restoring(BARE),
                held(),
                release(true),
            ),
            row(
                "stopped: Finalizing is recorded (the source will never run again)",
                restoring(BARE),
                held().released(Released::Stopped),
                finalize(true),
            ),
            row(
                "then a bare source goes (its kubelet would restart its killed containers, fresh)",
                finalizing(BARE),
                held(),
                Step::DeleteSource {
                    uid: "uid-1".into(),
                    grace_seconds: Some(1),
                },
            ),
            row(
                "then the target is let run",
                finalizing(BARE),
                Observed {
                    source_deleted: true,
                    ..held()
                },
                continue_target.clone(),
            ),
            row(
                "an operator restarted after continuing it waits for it to be Ready",
                finalizing(BARE),
                after(20).ready().restore(Some(held_target(true))),
                Step::ShowRestoreProgress,
            ),
            row(
                "a ReplicaSet's target the same",
                finalizing(RS),
                held(),
                continue_target,
            ),
            row(
                "the source ran on (its agent restarted): the target, which never ran, is deleted",
                restoring(BARE),
                held().released(thawed_without_release(AGENT_RESTARTED)),
                resumed(
                    Some("web-restored"),
                    &format!("it was thawed without a release: {AGENT_RESTARTED}"),
                ),
            ),
            row(
                "late while held: the source is thawed first",
                restoring(BARE),
                after(61).ready().restore(Some(held_target(false))),
                release(false),
            ),
            row(
                "late, thawed: the target, which never ran, goes",
                restoring(BARE),
                after(61)
                    .ready()
                    .restore(Some(held_target(false)))
                    .released(Released::Thawed),
                Step::Look(Look::RestoredPod("web-restored".into())),
            ),
            row(
                "finalizing and its PodCheckpoint deleted: the held target is let run before the migration fails",
                finalizing(RS),
                after(20).checkpoint(None).restore(Some(held_target(false))),
                Step::ContinueTarget {
                    node: "node-2".into(),
                    pod: "web-restored".into(),
                    restore: "move-restore".into(),
                },
            ),
            row(
                "continued, the target then failed: the source is gone for good, so the migration fails keeping \
                 the target (never rolled back)",
                finalizing(BARE),
                after(20).ready().restore(Some({
                    let mut failed = held_target(true);
                    let status = failed.status.as_mut().unwrap();
                    status.phase = Some(RestorePhase::Failed);
                    status.conditions = serde_json::from_value(ready_condition("the pod was not Ready")).unwrap();
                    failed
                })),
                failed(
                    reasons::MIGRATION_FAILED,
                    "the source pod web was stopped for good and its target was let run, but the restore then failed \
                     (the pod was not Ready)",
                ),
            ),
            row(
                "late, but an earlier release (its record lost to an operator restart) stopped the source: the \
                 target goes on",
                restoring(BARE),
                after(61)
                    .ready()
                    .restore(Some(held_target(false)))
                    .released(Released::Stopped),
                finalize(true),
            ),
        ]);
    }

    #[test]
    fn a_restoring_migration_releases_its_source_once_the_target_runs() {
        let runs = || after(20).ready().restore(Some(target("Ready")));
        check(vec![
            row(
                "the checkpoint is read",
                restoring(BARE),
                after(20),
                Step::Look(Look::Checkpoint("move-checkpoint".into())),
            ),
            row(
                "checkpoint deleted while it ran",
                restoring(BARE),
                after(20).checkpoint(None),
                failed(
                    reasons::MIGRATION_FAILED,
                    "the migration's PodCheckpoint was deleted while it ran",
                ),
            ),
            row(
                "then the restore",
                restoring(BARE),
                after(20).ready(),
                Step::Look(Look::Restore("move-restore".into())),
            ),
            row(
                "operator restarted between recording Restoring and creating the restore",
                restoring(BARE),
                after(20).ready().restore(None),
                Step::CreateRestore(restore_of(BARE)),
            ),
            row(
                "restore under way",
                restoring(BARE),
                after(20).ready().restore(Some(target("Restoring"))),
                Step::ShowRestoreProgress,
            ),
            row(
                "target Ready: the source is released for good",
                restoring(BARE),
                runs(),
                release(true),
            ),
            row(
                "stopped: Finalizing is recorded",
                restoring(BARE),
                runs().released(Released::Stopped),
                finalize(true),
            ),
            row(
                "a ReplicaSet's source is released the same",
                restoring(RS),
                runs(),
                release(true),
            ),
            row(
                "a StatefulSet's source was stopped before: no release",
                restoring(STS),
                runs(),
                finalize(false),
            ),
            row(
                "hold lost: thawed at its deadline during the restore, target deleted",
                restoring(BARE),
                runs().released(thawed_without_release(DEADLINE_PASSED)),
                resumed(
                    Some("web-restored"),
                    &format!("it was thawed without a release: {DEADLINE_PASSED}"),
                ),
            ),
            row(
                "source agent restarted and thawed it: target deleted",
                restoring(RS),
                runs().released(thawed_without_release(AGENT_RESTARTED)),
                resumed(
                    Some("web-restored"),
                    &format!("it was thawed without a release: {AGENT_RESTARTED}"),
                ),
            ),
            row(
                "the agent knows no hold: target deleted",
                restoring(BARE),
                runs().released(unknown_hold()),
                resumed(
                    Some("web-restored"),
                    "its agent does not know the hold: operation cp-uid holds no pod",
                ),
            ),
            row(
                "an earlier release thawed it: target deleted",
                restoring(BARE),
                runs().released(Released::Thawed),
                resumed(Some("web-restored"), EARLIER),
            ),
            row(
                "a Ready restore that names no pod fails before any release",
                restoring(BARE),
                after(20).ready().restore(Some(restore("Ready", None, ""))),
                failed(
                    reasons::MIGRATION_FAILED,
                    "PodRestore move-restore is Ready but names no restored pod",
                ),
            ),
        ]);
    }

    #[test]
    fn a_failed_target_rolls_back() {
        let cause = "the restore failed (kubelet rejected the pod)";
        let failed_target = || Some(restore("Failed", Some("web-restored"), "kubelet rejected the pod"));
        let fails = || after(20).ready().restore(failed_target());
        check(vec![
            row(
                "target failed: the source is thawed",
                restoring(BARE),
                fails(),
                release(false),
            ),
            row(
                "thawed: rolled back",
                restoring(BARE),
                fails().released(Released::Thawed),
                rolled_back(
                    reasons::ROLLED_BACK,
                    &format!("{cause}; the source pod was thawed and runs on"),
                ),
            ),
            row(
                "hold lost before the rollback: it runs on anyway",
                restoring(BARE),
                fails().released(thawed_without_release(DEADLINE_PASSED)),
                rolled_back(
                    reasons::ROLLED_BACK,
                    &format!("{cause}; the source pod runs on (it was thawed without a release: {DEADLINE_PASSED})"),
                ),
            ),
            row(
                "stopped by an earlier release",
                restoring(BARE),
                fails().released(Released::Stopped),
                rolled_back(
                    reasons::ROLLED_BACK,
                    &format!("{cause}; the source pod had been stopped by an earlier release and does not run"),
                ),
            ),
            row(
                "failurePolicy Retain: Failed, the source left held",
                retained(BARE),
                fails(),
                failed(
                    reasons::ROLLED_BACK,
                    &format!("{cause}; the source stays frozen until its deadline for inspection"),
                ),
            ),
            row(
                "a StatefulSet's source comes back from its template",
                restoring(STS),
                fails(),
                recreated(reasons::ROLLED_BACK, cause),
            ),
            row(
                "a StatefulSet's rollback ignores Retain: its source is gone",
                retained(STS),
                fails(),
                recreated(reasons::ROLLED_BACK, cause),
            ),
            row(
                "a failure without a message names the PodRestore",
                restoring(BARE),
                after(20)
                    .ready()
                    .restore(Some(restore("Failed", None, "")))
                    .released(Released::Thawed),
                rolled_back(
                    reasons::ROLLED_BACK,
                    "the restore failed (PodRestore move-restore failed); the source pod was thawed and runs on",
                ),
            ),
            row(
                "a target that fails after Finalizing still rolls back",
                finalizing(BARE),
                fails().released(Released::Stopped),
                rolled_back(
                    reasons::ROLLED_BACK,
                    &format!("{cause}; the source pod had been stopped by an earlier release and does not run"),
                ),
            ),
        ]);
    }

    #[test]
    fn a_late_restore_is_removed_then_the_source_thaws() {
        let late_target = || Some(target("Restoring"));
        check(vec![
            row(
                "59 s in is on time",
                restoring(BARE),
                after(59).ready().restore(late_target()),
                Step::ShowRestoreProgress,
            ),
            row(
                "late: the restored pod is looked for",
                restoring(BARE),
                after(61).ready().restore(late_target()),
                Step::Look(Look::RestoredPod("web-restored".into())),
            ),
            row(
                "late: the restored pod is deleted at once",
                restoring(BARE),
                after(61).ready().restore(late_target()).restored_pod(true),
                Step::DeleteRestoredPod("web-restored".into()),
            ),
            row(
                "late: its pod gone, the PodRestore goes",
                restoring(BARE),
                after(61).ready().restore(late_target()).restored_pod(false),
                Step::DeleteRestore("move-restore".into()),
            ),
            row(
                "late: a PodRestore without a pod goes",
                restoring(BARE),
                after(61).ready().restore(Some(restore("Fetching", None, ""))),
                Step::DeleteRestore("move-restore".into()),
            ),
            row(
                "late and failed: removed like a late one",
                restoring(BARE),
                after(61)
                    .ready()
                    .restore(Some(restore("Failed", Some("web-restored"), "boom"))),
                Step::Look(Look::RestoredPod("web-restored".into())),
            ),
            row(
                "late: nothing left, never created again; the source thaws",
                restoring(BARE),
                after(61).ready().restore(None),
                release(false),
            ),
            row(
                "late: thawed, rolled back",
                restoring(BARE),
                after(61).ready().restore(None).released(Released::Thawed),
                rolled_back(
                    reasons::TIMED_OUT,
                    &format!("{RESTORE_LATE}; the source pod was thawed and runs on"),
                ),
            ),
            row(
                "late with Retain: Failed, the source left held",
                retained(BARE),
                after(61).ready().restore(None),
                failed(
                    reasons::TIMED_OUT,
                    &format!("{RESTORE_LATE}; the source stays frozen until its deadline for inspection"),
                ),
            ),
            row(
                "late StatefulSet: recreated from its template",
                restoring(STS),
                after(61).ready().restore(None),
                recreated(reasons::TIMED_OUT, RESTORE_LATE),
            ),
            row(
                "late but the target runs: it finishes",
                restoring(BARE),
                after(61).ready().restore(Some(target("Ready"))),
                release(true),
            ),
            row(
                "no deadline once Finalizing",
                finalizing(BARE),
                after(600).ready().restore(Some(target("Ready"))),
                Step::DeleteSource {
                    uid: "uid-1".into(),
                    grace_seconds: None,
                },
            ),
        ]);
    }

    #[test]
    fn a_finalizing_migration_hands_the_place_over_and_succeeds() {
        let done = || after(30).ready().restore(Some(target("Ready")));
        check(vec![
            row(
                "operator restarted after Finalizing: no second release, the bare source is deleted",
                finalizing(BARE),
                done(),
                Step::DeleteSource {
                    uid: "uid-1".into(),
                    grace_seconds: None,
                },
            ),
            row(
                "a bare source deleted: succeeded",
                finalizing(BARE),
                done().deleted(),
                succeed(""),
            ),
            row(
                "a ReplicaSet gets the restored pod with its labels back",
                finalizing(RS),
                done(),
                Step::HandOver {
                    target_pod: "web-restored".into(),
                    source_uid: "uid-1".into(),
                    labels: [("app".to_owned(), "web".to_owned())].into(),
                },
            ),
            row(
                "handed over: is it adopted?",
                finalizing(RS),
                done().deleted(),
                Step::Look(Look::Adoption {
                    set: Workload::ReplicaSet("web-rs".into()),
                    pod: "web-restored".into(),
                }),
            ),
            row("not adopted yet", finalizing(RS), done().deleted().adopted(false), SOON),
            row(
                "adopted by its ReplicaSet: succeeded",
                finalizing(RS),
                done().deleted().adopted(true),
                succeed(" under ReplicaSet/web-rs"),
            ),
            row(
                "a StatefulSet adopts the pod of the source's name",
                finalizing(STS),
                done(),
                Step::Look(Look::Adoption {
                    set: Workload::StatefulSet("db".into()),
                    pod: "web".into(),
                }),
            ),
            row(
                "adopted by its StatefulSet: succeeded",
                finalizing(STS),
                done().adopted(true),
                succeed(" under StatefulSet/db"),
            ),
            row(
                "checkpoint deleted while finalizing: the restore is read first (a held target must run)",
                finalizing(BARE),
                after(30).checkpoint(None),
                Step::Look(Look::Restore("move-restore".into())),
            ),
            row(
                "checkpoint deleted while finalizing, the target running",
                finalizing(BARE),
                after(30).checkpoint(None).restore(Some(target("Ready"))),
                failed(
                    reasons::MIGRATION_FAILED,
                    "the migration's PodCheckpoint was deleted while it ran",
                ),
            ),
            row(
                "no freeze instant: no downtime",
                finalizing(BARE),
                Observed {
                    checkpoint: Some(Some(PodCheckpoint {
                        status: None,
                        ..checkpoint("Ready", "")
                    })),
                    ..done().deleted()
                },
                Step::Succeed {
                    downtime_millis: None,
                    message: "pod web runs on node-2 as web-restored; the source is gone; downtime 0 ms".into(),
                },
            ),
        ]);
    }

    /// The API server, the source's agent and the other controllers, as passes of
    /// the shell see and change them: a stand-in for `super::take`.
    struct World {
        status: Value,
        restore: Option<&'static str>,
        source: HeldSource,
        /// How the hold ended; `None`: still held.
        hold: Option<Released>,
        /// The releases asked, by `stop`.
        releases: Vec<bool>,
        handed_over: bool,
        end: Option<Step>,
    }

    impl World {
        /// A migration of a source of `controller` whose checkpoint is Ready.
        fn new(controller: Option<&str>) -> Self {
            Self {
                status: status("Checkpointing", controller),
                restore: None,
                source: HeldSource::Present,
                hold: None,
                releases: vec![],
                handed_over: false,
                end: None,
            }
        }

        /// Takes `step` as the shell would; whether it ends the pass.
        fn take(&mut self, step: Step, seen: &mut Observed) -> bool {
            match step {
                Step::Look(Look::Checkpoint(_)) => seen.checkpoint = Some(Some(checkpoint("Ready", ""))),
                Step::Look(Look::HeldSource { .. }) => seen.held_source = Some(self.source),
                Step::Look(Look::Restore(_)) => seen.restore = Some(self.restore.map(target)),
                Step::Look(Look::Adoption { .. }) => {
                    seen.adopted = Some(self.handed_over || self.source == HeldSource::Gone)
                }
                Step::Release { stop, .. } => {
                    self.releases.push(stop);
                    let answer = self
                        .hold
                        .get_or_insert(if stop { Released::Stopped } else { Released::Thawed })
                        .clone();
                    seen.released = Some(answer);
                }
                Step::DeleteSource { grace_seconds, .. } => {
                    self.source = if grace_seconds.is_some() {
                        HeldSource::Terminating
                    } else {
                        HeldSource::Gone
                    };
                    seen.source_deleted = true;
                }
                Step::HandOver { .. } => {
                    self.handed_over = true;
                    self.source = HeldSource::Gone;
                    seen.source_deleted = true;
                }
                Step::StartRestore { restore, .. } => {
                    self.status["phase"] = "Restoring".into();
                    self.status["restoreName"] = restore.name.into();
                    self.restore = Some("Pending");
                    return true;
                }
                Step::Finalize { target_pod, .. } => {
                    self.status["phase"] = "Finalizing".into();
                    self.status["targetPodName"] = target_pod.into();
                }
                Step::Requeue(_) | Step::ShowRestoreProgress => return true,
                end @ (Step::Succeed { .. }
                | Step::Fail { .. }
                | Step::SourceResumed { .. }
                | Step::RollBack { .. }) => {
                    self.status["phase"] = "Ended".into();
                    self.end = Some(end);
                    return true;
                }
                other => panic!("{other:?} is not part of these migrations"),
            }
            false
        }

        /// Passes until the migration ends; the first stops (the operator is killed)
        /// after `crash_after` steps. The steps of every pass.
        fn run(&mut self, crash_after: usize) -> Vec<Vec<Step>> {
            let mut passes = vec![];
            while self.end.is_none() {
                assert!(passes.len() < 10, "no end after {passes:?}");
                // Between passes the restore controller and the kubelet go on.
                self.restore = self.restore.map(|_| "Ready");
                if self.source == HeldSource::Terminating {
                    self.source = HeldSource::Gone;
                }
                let mut seen = after(20);
                let mut steps = vec![];
                loop {
                    let step = decide(&migration(self.status.clone(), "Rollback"), &seen);
                    steps.push(step.clone());
                    if self.take(step, &mut seen) || (passes.is_empty() && steps.len() == crash_after) {
                        break;
                    }
                    assert!(steps.len() < 16, "a pass that does not end: {steps:?}");
                }
                passes.push(steps);
            }
            passes
        }
    }

    /// An operator killed after any step and started again finishes the same
    /// migration the same way, and never thaws a source it stopped.
    #[test]
    fn an_operator_restarted_after_any_step_finishes_the_same_migration() {
        let lost = || thawed_without_release(DEADLINE_PASSED);
        let scenarios: [(&str, Option<&str>, Option<Released>, Step); 5] = [
            ("bare", BARE, None, succeed("")),
            ("ReplicaSet", RS, None, succeed(" under ReplicaSet/web-rs")),
            ("StatefulSet", STS, None, succeed(" under StatefulSet/db")),
            (
                "bare, hold lost",
                BARE,
                Some(lost()),
                resumed(
                    Some("web-restored"),
                    &format!("it was thawed without a release: {DEADLINE_PASSED}"),
                ),
            ),
            (
                "StatefulSet, hold lost",
                STS,
                Some(lost()),
                resumed(None, &format!("it was thawed without a release: {DEADLINE_PASSED}")),
            ),
        ];
        for (name, controller, hold, end) in scenarios {
            let mut clean = World::new(controller);
            clean.hold = hold.clone();
            let steps: usize = clean.run(0).iter().map(Vec::len).sum();
            assert_eq!(clean.end.as_ref(), Some(&end), "{name}");
            for crash_after in 1..=steps {
                let mut world = World::new(controller);
                world.hold = hold.clone();
                let passes = world.run(crash_after);
                let context = format!("{name}, killed after step {crash_after}: {passes:#?}");
                assert_eq!(world.end.as_ref(), Some(&end), "{context}");
                assert!(world.releases.iter().all(|stop| *stop), "{context}");
            }
        }
    }

    #[test]
    fn an_ended_or_unreadable_migration() {
        let missing = |field: &str, phase: &str| {
            failed(
                reasons::MIGRATION_FAILED,
                &format!(
                    "status.{field} is not set, and phase {phase} needs it: the migration cannot go on (the agent \
                     thaws a held source at its freeze deadline)"
                ),
            )
        };
        check(vec![
            row(
                "succeeded",
                migration(json!({"phase": "Succeeded"}), "Rollback"),
                after(0),
                Step::Rest,
            ),
            row(
                "rolled back",
                migration(json!({"phase": "RolledBack"}), "Rollback"),
                after(0),
                Step::Rest,
            ),
            row(
                "failed",
                migration(json!({"phase": "Failed"}), "Rollback"),
                after(0),
                Step::Rest,
            ),
            row(
                "checkpointing without a start time has no deadline to keep",
                lacking("Checkpointing", "startTime"),
                after(0),
                missing("startTime", "Checkpointing"),
            ),
            row(
                "checkpointing without the source's node cannot release it",
                lacking("Checkpointing", "sourceNodeName"),
                after(0),
                missing("sourceNodeName", "Checkpointing"),
            ),
            row(
                "checkpointing without the source's UID",
                lacking("Checkpointing", "sourcePodUID"),
                after(0),
                missing("sourcePodUID", "Checkpointing"),
            ),
            row(
                "restoring without the target node",
                lacking("Restoring", "targetNodeName"),
                after(0),
                missing("targetNodeName", "Restoring"),
            ),
            row(
                "restoring without the checkpoint's name",
                lacking("Restoring", "checkpointName"),
                after(0),
                missing("checkpointName", "Restoring"),
            ),
            row(
                "restoring without the restore's name",
                lacking("Restoring", "restoreName"),
                after(0),
                missing("restoreName", "Restoring"),
            ),
            row(
                "finalizing without the target pod",
                lacking("Finalizing", "targetPodName"),
                after(0),
                missing("targetPodName", "Finalizing"),
            ),
        ]);
    }

    #[test]
    fn the_target_is_another_ready_node() {
        let nodes = vec![
            ("node-1".to_owned(), true, BTreeMap::new()),
            (
                "node-2".to_owned(),
                true,
                BTreeMap::from([("disk".to_owned(), "ssd".to_owned())]),
            ),
            ("node-3".to_owned(), false, BTreeMap::new()),
        ];
        assert_eq!(target_node(None, "node-1", &nodes).unwrap(), "node-2");
        let own = NodeTarget {
            node_name: Some("node-1".into()),
            node_selector: None,
        };
        assert_eq!(
            target_node(Some(&own), "node-1", &nodes).unwrap_err(),
            "spec.target.nodeName node-1 is the source pod's own node"
        );
        let down = NodeTarget {
            node_name: Some("node-3".into()),
            node_selector: None,
        };
        assert!(
            target_node(Some(&down), "node-1", &nodes)
                .unwrap_err()
                .contains("not a ready node")
        );
        let ssd = NodeTarget {
            node_name: None,
            node_selector: Some(BTreeMap::from([("disk".into(), "ssd".into())])),
        };
        assert_eq!(
            target_node(Some(&ssd), "node-2", &nodes).unwrap_err(),
            "no ready node other than node-2 whose taints the pod tolerates matches spec.target"
        );
    }

    #[test]
    fn budgets_that_select_the_pod_and_allow_nothing_block() {
        let budget = |name: &str,
                      selector: serde_json::Value,
                      allowed: i32|
         -> k8s_openapi::api::policy::v1::PodDisruptionBudget {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "spec": {"selector": selector},
                "status": {"disruptionsAllowed": allowed, "currentHealthy": 1, "desiredHealthy": 1, "expectedPods": 1}
            }))
            .unwrap()
        };
        let labels = BTreeMap::from([
            ("app".to_owned(), "db".to_owned()),
            ("tier".to_owned(), "data".to_owned()),
        ]);
        let budgets = [
            budget("other", serde_json::json!({"matchLabels": {"app": "web"}}), 0),
            budget("db-ok", serde_json::json!({"matchLabels": {"app": "db"}}), 1),
        ];
        assert_eq!(blocking_budget(&budgets, &labels), None);
        let budgets = [budget(
            "db",
            serde_json::json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["data"]},
                                                    {"key": "canary", "operator": "DoesNotExist"}]}),
            0,
        )];
        assert_eq!(
            blocking_budget(&budgets, &labels).unwrap(),
            "PodDisruptionBudget db allows no disruption of the pod now (disruptionsAllowed 0)"
        );
    }
}
