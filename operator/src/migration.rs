//! The PodMigration controller: a PodCheckpoint that leaves the source frozen, a
//! PodRestore on the target, then the source stopped and deleted only once the
//! target is Running and Ready. On failure the source is thawed (rollback) and a
//! half-restored target removed. Phases in `status.phase`:
//!
//! - none/`Pending`: check the source pod (UID, controller, budgets) and choose the
//!   target node; a StatefulSet pod's name is fenced first (see [`crate::workload`]);
//!   create the PodCheckpoint `<migration>-checkpoint` (owned by the migration,
//!   annotated to hold the source frozen).
//! - `Checkpointing`: when it is Ready, create the PodRestore `<migration>-restore`.
//!   A StatefulSet pod is stopped and deleted before, since its name is reused.
//! - `Restoring`: when it is Ready, release the source on its agent (stop) and
//!   delete it; a ReplicaSet adopts the restored pod in its place. When it fails,
//!   release the source (thaw) and roll back.
//! - `Succeeded`, `RolledBack`, `Failed`: final. Every end lifts the fence.
//!
//! Every step is named and checked before it is taken, so an operator restarted at
//! any point continues the same migration exactly once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cryopod_agent_api::pb;
use cryopod_crds::common::{
    CONDITION_READY, CONDITION_SOURCE_FROZEN, ConditionStatus, NodeTarget, find_condition, set_condition,
};
use cryopod_crds::v1alpha1::{
    CheckpointPhase, MigrationFailurePolicy, MigrationPhase, PodCheckpoint, PodCheckpointSpec, PodCheckpointStatus,
    PodMigration, PodMigrationStatus, PodRestore, PodRestoreSpec, PostCheckpointState, RestorePhase,
    migration_reasons as reasons,
};
use k8s_openapi::api::apps::v1::{ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;

use crate::checkpoint::HOLD_ANNOTATION;
use crate::context::{
    Context, Ending, Error, Operation, SourcePod, begin, fail_with, finish, kube_err, node_facts, now, source_pod,
    write_status,
};
use crate::workload::{
    DELETION_COST_ANNOTATION, WITHHOLD_LABELS_ANNOTATION, Workload, controlled_by, fence, labels_to_restore,
    parse_withheld, refused_by_fence, selects, withheld_labels,
};

impl Operation for PodMigration {
    type Status = PodMigrationStatus;
    const KIND: &'static str = "PodMigration";
    fn status(&self) -> Option<&PodMigrationStatus> {
        self.status.as_ref()
    }
    fn conditions(status: &mut PodMigrationStatus) -> &mut Vec<Condition> {
        &mut status.conditions
    }
    fn set_failed(status: &mut PodMigrationStatus, at: Time, generation: Option<i64>) {
        status.phase = Some(MigrationPhase::Failed);
        status.completion_time = Some(at);
        status.observed_generation = generation;
    }
}

/// Reconciles one PodMigration.
pub async fn reconcile(migration: Arc<PodMigration>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.new_pass(migration.uid());
    match migration.status.as_ref().and_then(|s| s.phase) {
        None | Some(MigrationPhase::Pending) => start(&migration, &ctx).await,
        Some(MigrationPhase::Checkpointing) => after_checkpoint(&migration, &ctx).await,
        Some(MigrationPhase::Restoring | MigrationPhase::Finalizing) => after_restore(&migration, &ctx).await,
        Some(MigrationPhase::Succeeded | MigrationPhase::RolledBack | MigrationPhase::Failed) => {
            Ok(Action::await_change())
        }
    }
}

/// Retries a failed reconcile after a pause.
pub fn error_policy(migration: Arc<PodMigration>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(podmigration = %migration.name_any(), namespace = ?migration.namespace(), %error, "reconcile failed; retrying");
    Action::requeue(crate::context::retry_after(error))
}

async fn fail(migration: &PodMigration, ctx: &Context, reason: &'static str, message: String) -> Result<Action, Error> {
    lift_fence(migration, ctx).await?;
    fail_with(migration, ctx, reason, message).await?;
    Ok(Action::await_change())
}

/// How long a new fence may take to be enforced before the migration gives up.
const FENCE_DEADLINE: Duration = Duration::from_secs(15);

fn fence_name(migration: &PodMigration) -> String {
    format!("{}-fence", migration.name_any())
}

/// Whether the fence of a StatefulSet pod's name is up and enforced.
enum Fence {
    Enforced,
    /// Created; the API server has not started enforcing it yet.
    Pending,
    /// Not enforced in time: the policy is missing.
    NotEnforced(String),
}

/// Puts up the fence of `pod`'s name (once) and checks that the API server
/// enforces it, by a dry-run creation of a pod of that name.
async fn raise_fence(migration: &PodMigration, ctx: &Context, pod: &str) -> Result<Fence, Error> {
    let ns = migration.namespace().unwrap_or_default();
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let name = fence_name(migration);
    let existing = match maps.get_opt(&name).await.map_err(kube_err("read the fence"))? {
        Some(existing) => existing,
        None => maps
            .create(&PostParams::default(), &fence(&name, &ns, pod, owner(migration)))
            .await
            .map_err(kube_err("create the fence"))?,
    };
    let probe: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": pod},
        "spec": {"containers": [{"name": "fence-probe", "image": "fence-probe"}]}
    }))
    .unwrap_or_default();
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    match pods.create(&dry_run, &probe).await {
        Err(kube::Error::Api(e)) if refused_by_fence(e.code, &e.message) => return Ok(Fence::Enforced),
        _ => {}
    }
    let age = existing
        .metadata
        .creation_timestamp
        .map_or(0, |t| now().0.as_millisecond() - t.0.as_millisecond());
    if age < FENCE_DEADLINE.as_millis() as i64 {
        return Ok(Fence::Pending);
    }
    Ok(Fence::NotEnforced(format!(
        "the API server does not enforce the fence {name} on pod name {pod} after {} s: is the \
         ValidatingAdmissionPolicy {} and its binding installed (the Helm chart installs them)?",
        FENCE_DEADLINE.as_secs(),
        crate::workload::FENCE_POLICY
    )))
}

/// Removes the migration's fence, if it has one.
async fn lift_fence(migration: &PodMigration, ctx: &Context) -> Result<(), Error> {
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &migration.namespace().unwrap_or_default());
    delete_if_there(&maps, &fence_name(migration), "delete the fence").await
}

/// Deletes `name`; one that is gone already is fine.
async fn delete_if_there<K>(api: &Api<K>, name: &str, action: &'static str) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(source) => Err(Error::Kube { action, source }),
    }
}

/// The labels a ReplicaSet's restored pod is created without, or why there are none.
async fn replica_set_withheld(
    ctx: &Context,
    ns: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Result<Vec<String>, String>, Error> {
    let sets: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), ns);
    let Some(set) = sets
        .get_opt(name)
        .await
        .map_err(kube_err("read the pod's ReplicaSet"))?
    else {
        return Ok(Err(format!("the pod's ReplicaSet {name} does not exist")));
    };
    let selector = set.spec.map(|s| s.selector).unwrap_or_default();
    Ok(withheld_labels(&selector, labels).map_err(|m| format!("ReplicaSet {name}: {m}")))
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

fn owner(migration: &PodMigration) -> OwnerReference {
    OwnerReference {
        api_version: "cryopod.io/v1alpha1".into(),
        kind: "PodMigration".into(),
        name: migration.name_any(),
        uid: migration.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The PodDisruptionBudget that forbids taking the pod down now, if one does.
pub fn blocking_budget(
    budgets: &[k8s_openapi::api::policy::v1::PodDisruptionBudget],
    labels: &std::collections::BTreeMap<String, String>,
) -> Option<String> {
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
/// matches the selector (name order). `nodes` are (name, ready, labels).
pub fn target_node(
    target: Option<&NodeTarget>,
    source: &str,
    nodes: &[(String, bool, std::collections::BTreeMap<String, String>)],
) -> Result<String, String> {
    target_nodes(target, source, nodes).map(|mut fits| fits.remove(0))
}

/// Every node that fits `spec.target`, in the order they are tried (never empty).
pub fn target_nodes(
    target: Option<&NodeTarget>,
    source: &str,
    nodes: &[(String, bool, std::collections::BTreeMap<String, String>)],
) -> Result<Vec<String>, String> {
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

async fn start(migration: &PodMigration, ctx: &Context) -> Result<Action, Error> {
    let ns = migration.namespace().unwrap_or_default();
    let spec = &migration.spec;
    let pod = match source_pod(ctx, &ns, &spec.source_pod_name, spec.source_pod_uid.as_deref()).await? {
        SourcePod::Found(pod) => *pod,
        SourcePod::Missing(message) => return fail(migration, ctx, reasons::SOURCE_POD_NOT_FOUND, message).await,
        SourcePod::Replaced(message) => return fail(migration, ctx, reasons::SOURCE_POD_REPLACED, message).await,
    };
    let uid = pod.uid().unwrap_or_default();
    let workload = match Workload::of(&pod) {
        Ok(workload) => workload,
        Err(message) => return fail(migration, ctx, reasons::MIGRATION_FAILED, message).await,
    };
    if let Workload::ReplicaSet(set) = &workload
        && let Err(message) =
            replica_set_withheld(ctx, &ns, set, &pod.metadata.labels.clone().unwrap_or_default()).await?
    {
        return fail(migration, ctx, reasons::MIGRATION_FAILED, message).await;
    }
    // A migration takes the pod down for its downtime: its budgets must allow it.
    let budgets: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &ns);
    let budgets = budgets
        .list(&ListParams::default())
        .await
        .map_err(kube_err("list PodDisruptionBudgets"))?
        .items;
    if let Some(message) = blocking_budget(&budgets, &pod.metadata.labels.clone().unwrap_or_default()) {
        return fail(migration, ctx, reasons::DISRUPTION_NOT_ALLOWED, message).await;
    }
    let Some(source) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        return Ok(Action::requeue(Duration::from_secs(3)));
    };
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let facts = node_facts(ctx, &tolerations).await?;
    // Only a target that can restore what CRIU dumps here is worth a freeze.
    let target = match target_nodes(spec.target.as_ref(), &source, &facts) {
        Ok(fits) => crate::compat::choose_target(ctx, &source, &fits).await,
        Err(message) => Err(message),
    };
    let target = match target {
        Ok(target) => target,
        Err(message) => return fail(migration, ctx, reasons::NO_COMPATIBLE_NODE, message).await,
    };
    // A StatefulSet pod's name must be kept free for the restore before anything
    // is frozen.
    if let Workload::StatefulSet(_) = &workload {
        match raise_fence(migration, ctx, &spec.source_pod_name).await? {
            Fence::Enforced => {}
            Fence::Pending => return Ok(Action::requeue(Duration::from_millis(500))),
            Fence::NotEnforced(message) => return fail(migration, ctx, reasons::MIGRATION_FAILED, message).await,
        }
    }
    // The memory image is sealed with a key the operator makes for the migration's
    // checkpoint (`keys`): whoever reads the bucket gets nothing.
    let checkpoint_name = format!("{}-checkpoint", migration.name_any());
    let mut status = migration.status.clone().unwrap_or_default();
    status.phase = Some(MigrationPhase::Checkpointing);
    status.source_pod_uid = Some(uid.clone());
    status.source_controller = workload.recorded();
    status.source_node_name = Some(source.clone());
    status.target_node_name = Some(target.clone());
    status.checkpoint_name = Some(checkpoint_name.clone());
    status.start_time = Some(now());
    status.observed_generation = migration.metadata.generation;
    let message = format!("moving pod {} from {source} to {target}", spec.source_pod_name);
    let status = begin(
        migration,
        ctx,
        status,
        reasons::MIGRATION_IN_PROGRESS,
        "Migrate",
        message,
    )
    .await?;

    let mut migration = migration.clone();
    migration.status = Some(status);
    ensure_checkpoint(&migration, ctx).await?;
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// Creates the migration's PodCheckpoint unless it exists (an operator stopped
/// between recording the step and taking it takes it on restart).
async fn ensure_checkpoint(migration: &PodMigration, ctx: &Context) -> Result<PodCheckpoint, Error> {
    let ns = migration.namespace().unwrap_or_default();
    let spec = &migration.spec;
    let status = migration.status.clone().unwrap_or_default();
    let checkpoint_name = status.checkpoint_name.clone().unwrap_or_default();
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(existing) = checkpoints
        .get_opt(&checkpoint_name)
        .await
        .map_err(kube_err("read the migration's PodCheckpoint"))?
    {
        return Ok(existing);
    }
    // No key named: the operator seals a migration's checkpoint with its own (`keys`).
    let mut checkpoint = PodCheckpoint::new(
        &checkpoint_name,
        PodCheckpointSpec {
            source_pod_name: spec.source_pod_name.clone(),
            source_pod_uid: status.source_pod_uid.clone(),
            timeout_seconds: spec.timeout_seconds.min(3600),
            max_freeze_seconds: 30,
            storage: spec.storage.clone(),
            post_checkpoint_state: PostCheckpointState::Stopped,
            tcp: spec.tcp,
            hooks: None,
            encryption: None,
            retention: None,
        },
    );
    checkpoint.metadata = ObjectMeta {
        name: Some(checkpoint_name),
        namespace: Some(ns),
        owner_references: Some(vec![owner(migration)]),
        annotations: Some(on_behalf(
            migration,
            [(HOLD_ANNOTATION.to_owned(), migration.name_any())].into(),
        )),
        ..ObjectMeta::default()
    };
    checkpoints
        .create(&PostParams::default(), &checkpoint)
        .await
        .map_err(kube_err("create the migration's PodCheckpoint"))
}

/// `annotations` and, when the migration records who asked for it, that requester:
/// what the operator creates for a migration is asked for by the migration's user.
fn on_behalf(
    migration: &PodMigration,
    mut annotations: std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    if let Some(who) = crate::context::requested_by(&migration.metadata) {
        annotations.insert(crate::context::REQUESTED_BY.to_owned(), who.to_owned());
    }
    annotations
}

/// Creates the migration's PodRestore unless it exists: a StatefulSet pod comes
/// back under its name, a ReplicaSet's pod without the labels its ReplicaSet
/// selects on (until it is adopted).
async fn ensure_restore(
    migration: &PodMigration,
    ctx: &Context,
    checkpoint: &PodCheckpoint,
) -> Result<PodRestore, Error> {
    let ns = migration.namespace().unwrap_or_default();
    let status = migration.status.clone().unwrap_or_default();
    let restore_name = status.restore_name.clone().unwrap_or_default();
    let restores: Api<PodRestore> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(existing) = restores
        .get_opt(&restore_name)
        .await
        .map_err(kube_err("read the migration's PodRestore"))?
    {
        return Ok(existing);
    }
    let (pod_name, withheld) = match Workload::from_recorded(status.source_controller.as_deref()) {
        Workload::Bare => (None, vec![]),
        Workload::StatefulSet(_) => (Some(migration.spec.source_pod_name.clone()), vec![]),
        // A ReplicaSet gone since the start has nobody left to adopt the pod.
        Workload::ReplicaSet(set) => (
            None,
            replica_set_withheld(ctx, &ns, &set, &checkpointed_labels(checkpoint))
                .await?
                .unwrap_or_default(),
        ),
    };
    let mut restore = PodRestore::new(
        &restore_name,
        PodRestoreSpec {
            checkpoint_name: status.checkpoint_name.clone().unwrap_or_default(),
            checkpoint_namespace: None,
            target: Some(NodeTarget {
                node_name: status.target_node_name.clone(),
                node_selector: None,
            }),
            pod_name,
            labels: Default::default(),
            annotations: Default::default(),
            timeout_seconds: migration.spec.timeout_seconds.clamp(10, 3600),
        },
    );
    restore.metadata.namespace = Some(ns);
    restore.metadata.owner_references = Some(vec![owner(migration)]);
    let mut annotations = std::collections::BTreeMap::new();
    if !withheld.is_empty() {
        annotations.insert(WITHHOLD_LABELS_ANNOTATION.to_owned(), withheld.join(","));
    }
    restore.metadata.annotations = Some(on_behalf(migration, annotations)).filter(|a| !a.is_empty());
    restores
        .create(&PostParams::default(), &restore)
        .await
        .map_err(kube_err("create the migration's PodRestore"))
}

/// Where retiring a StatefulSet's source stands.
enum Retired {
    Gone,
    Going,
    /// Its hold had ended without a release: it ran on and must stay.
    RanOn(String),
}

/// Stops a StatefulSet's source pod and deletes it, so that its name is free for
/// the restore.
async fn retire_statefulset_source(migration: &PodMigration, ctx: &Context) -> Result<Retired, Error> {
    let ns = migration.namespace().unwrap_or_default();
    let uid = migration
        .status
        .as_ref()
        .and_then(|s| s.source_pod_uid.clone())
        .unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let source = pods
        .get_opt(&migration.spec.source_pod_name)
        .await
        .map_err(kube_err("read the source pod"))?
        .filter(|p| p.metadata.uid.as_deref() == Some(uid.as_str()));
    let Some(source) = source else { return Ok(Retired::Gone) };
    if source.metadata.deletion_timestamp.is_none() {
        match release(migration, ctx, true).await? {
            Released::Stopped => {}
            Released::Thawed => return Ok(Retired::RanOn("an earlier release thawed it".to_owned())),
            Released::RanOn(why) => return Ok(Retired::RanOn(why)),
        }
        // Killed already: a short grace ends whatever the kubelet restarted since.
        let delete = DeleteParams {
            grace_period_seconds: Some(1),
            preconditions: Some(Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let _ = pods.delete(&migration.spec.source_pod_name, &delete).await;
    }
    Ok(Retired::Going)
}

async fn after_checkpoint(migration: &PodMigration, ctx: &Context) -> Result<Action, Error> {
    let mut status = migration.status.clone().unwrap_or_default();
    let checkpoint = ensure_checkpoint(migration, ctx).await?;
    match checkpoint.status.as_ref().and_then(|s| s.phase) {
        Some(CheckpointPhase::Ready) => {}
        Some(CheckpointPhase::Failed) => {
            // The agent thawed the source: nothing was touched.
            let cause = checkpoint
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION_READY))
                .map(|c| c.message.clone())
                .unwrap_or_default();
            return fail(
                migration,
                ctx,
                reasons::MIGRATION_FAILED,
                format!("the checkpoint failed, and the source pod runs on: {cause}"),
            )
            .await;
        }
        _ if past_deadline(migration) => {
            // The checkpoint has as long from its own start; its agent thaws the source then.
            return fail(
                migration,
                ctx,
                reasons::TIMED_OUT,
                format!(
                    "the checkpoint did not finish within spec.timeoutSeconds ({} s); the checkpoint has as long from \
                     its own start, after which its agent thaws the source",
                    migration.spec.timeout_seconds
                ),
            )
            .await;
        }
        _ => {
            if mirrored(&mut status, checkpoint.status.as_ref()) {
                write_status(migration, ctx, &status).await?;
            }
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
    }
    mirrored(&mut status, checkpoint.status.as_ref());
    if let Workload::StatefulSet(_) = Workload::from_recorded(status.source_controller.as_deref()) {
        match retire_statefulset_source(migration, ctx).await? {
            Retired::Gone => source_stopped(&mut status, migration.metadata.generation),
            Retired::Going => return Ok(Action::requeue(Duration::from_secs(1))),
            Retired::RanOn(why) => return source_resumed(migration, ctx, None, &why).await,
        }
    }
    let restore_name = format!("{}-restore", migration.name_any());
    status.stage = Some("Restoring".to_owned());
    status.phase = Some(MigrationPhase::Restoring);
    status.restore_name = Some(restore_name.clone());
    write_status(migration, ctx, &status).await?;
    let mut migration = migration.clone();
    migration.status = Some(status);
    ensure_restore(&migration, ctx, &checkpoint).await?;
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// Takes the checkpoint's stage, byte counts and `SourceFrozen` condition into the
/// migration's status, where SREs watch it; whether anything changed.
pub fn mirrored(status: &mut PodMigrationStatus, checkpoint: Option<&PodCheckpointStatus>) -> bool {
    let Some(checkpoint) = checkpoint else { return false };
    let before = status.clone();
    if checkpoint.stage.is_some() {
        status.stage = checkpoint.stage.clone();
    }
    if checkpoint.progress.is_some() {
        status.progress = checkpoint.progress;
    }
    if let Some(frozen) = find_condition(&checkpoint.conditions, CONDITION_SOURCE_FROZEN) {
        match status
            .conditions
            .iter_mut()
            .find(|c| c.type_ == CONDITION_SOURCE_FROZEN)
        {
            Some(mine) => *mine = frozen.clone(),
            None => status.conditions.push(frozen.clone()),
        }
    }
    *status != before
}

/// The source was killed by its release: no longer frozen.
fn source_stopped(status: &mut PodMigrationStatus, generation: Option<i64>) {
    set_condition(
        &mut status.conditions,
        CONDITION_SOURCE_FROZEN,
        ConditionStatus::False,
        "Stopped",
        "the source pod was stopped for good",
        generation,
        now(),
    );
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

/// Reads the agent's answer to a release that asked to `stop` (or to thaw).
pub fn released_as(answer: Result<&pb::ReleaseResponse, &tonic::Status>, stop: bool) -> Released {
    let response = match answer {
        Ok(response) => response,
        Err(status) => return Released::RanOn(format!("its agent does not know the hold: {}", status.message())),
    };
    match pb::ReleaseOutcome::try_from(response.outcome) {
        Ok(pb::ReleaseOutcome::ThawedWithoutRelease) => Released::RanOn(format!(
            "it was thawed without a release: {}",
            if response.why.is_empty() {
                "no reason given"
            } else {
                &response.why
            }
        )),
        Ok(pb::ReleaseOutcome::Released | pb::ReleaseOutcome::AlreadyReleased) if response.stopped => Released::Stopped,
        Ok(pb::ReleaseOutcome::Released | pb::ReleaseOutcome::AlreadyReleased) => Released::Thawed,
        // An agent older than the outcome released it as asked, or it would have failed.
        _ if stop => Released::Stopped,
        _ => Released::Thawed,
    }
}

/// Ends the hold of the source on its agent: stop it for good, or thaw it, and says
/// how the hold really ended.
async fn release(migration: &PodMigration, ctx: &Context, stop: bool) -> Result<Released, Error> {
    let status = migration.status.clone().unwrap_or_default();
    let node = status.source_node_name.unwrap_or_default();
    let ns = migration.namespace().unwrap_or_default();
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &ns);
    let operation_id = checkpoints
        .get_opt(&status.checkpoint_name.unwrap_or_default())
        .await
        .map_err(kube_err("read the migration's PodCheckpoint"))?
        .and_then(|c| c.uid())
        .unwrap_or_default();
    let mut client = ctx
        .agents
        .client(&node)
        .await
        .map_err(|source| Error::Agent { source })?;
    match client.release(pb::ReleaseRequest { operation_id, stop }).await {
        Ok(response) => Ok(released_as(Ok(response.get_ref()), stop)),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(released_as(Err(&s), stop)),
        Err(source) => Err(Error::Grpc {
            action: "release the source pod",
            source,
        }),
    }
}

/// Ends a migration whose source ran on past its checkpoint: the source has the
/// newer state and stays; the restored pod, if any, is deleted so the pod never runs
/// twice.
async fn source_resumed(
    migration: &PodMigration,
    ctx: &Context,
    restored_pod: Option<&str>,
    why: &str,
) -> Result<Action, Error> {
    let ns = migration.namespace().unwrap_or_default();
    let deleted = match restored_pod {
        Some(name) => {
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            match pods.delete(name, &DeleteParams::default()).await {
                Ok(_) => format!("; the restored pod {name} was deleted"),
                Err(kube::Error::Api(e)) if e.code == 404 => String::new(),
                Err(source) => {
                    return Err(Error::Kube {
                        action: "delete the restored pod of a source that ran on",
                        source,
                    });
                }
            }
        }
        None => String::new(),
    };
    fail(
        migration,
        ctx,
        reasons::SOURCE_RESUMED,
        format!(
            "the source pod {} ran on past its checkpoint ({why}), so it stays where it is with its newer state{deleted}",
            migration.spec.source_pod_name
        ),
    )
    .await
}

/// Hands a ReplicaSet's place over to the restored pod: the source is marked
/// cheapest to delete, the restored pod gets the withheld labels back (the
/// ReplicaSet adopts it and scales the source down), and the source is deleted.
/// `true` once the ReplicaSet controls the restored pod.
async fn adopt_into_replica_set(
    migration: &PodMigration,
    ctx: &Context,
    set: &str,
    restore: &PodRestore,
    checkpoint: &PodCheckpoint,
) -> Result<bool, Error> {
    let ns = migration.namespace().unwrap_or_default();
    let status = migration.status.clone().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let source = &migration.spec.source_pod_name;
    let cost = serde_json::json!({"metadata": {"annotations": {DELETION_COST_ANNOTATION: i32::MIN.to_string()}}});
    // The source may be gone already (the ReplicaSet scaled it down).
    let _ = pods.patch(source, &PatchParams::default(), &Patch::Merge(&cost)).await;
    let target = status.target_pod_name.clone().unwrap_or_default();
    let withheld = parse_withheld(
        restore
            .annotations()
            .get(WITHHOLD_LABELS_ANNOTATION)
            .map(String::as_str),
    );
    let labels = labels_to_restore(&withheld, &checkpointed_labels(checkpoint));
    let relabel = serde_json::json!({"metadata": {"labels": labels}});
    pods.patch(&target, &PatchParams::default(), &Patch::Merge(&relabel))
        .await
        .map_err(kube_err("put the labels back on the restored pod"))?;
    let delete = DeleteParams {
        preconditions: Some(Preconditions {
            uid: status.source_pod_uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    let _ = pods.delete(source, &delete).await;
    let sets: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(set_uid) = sets
        .get_opt(set)
        .await
        .map_err(kube_err("read the pod's ReplicaSet"))?
        .and_then(|s| s.metadata.uid)
    else {
        return Ok(true);
    };
    let adopted = pods
        .get_opt(&target)
        .await
        .map_err(kube_err("read the restored pod"))?
        .is_some_and(|p| controlled_by(&p, &set_uid));
    Ok(adopted)
}

/// `true` once the StatefulSet controls its restored pod.
async fn adopted_by_statefulset(migration: &PodMigration, ctx: &Context, set: &str) -> Result<bool, Error> {
    let ns = migration.namespace().unwrap_or_default();
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(set_uid) = sets
        .get_opt(set)
        .await
        .map_err(kube_err("read the pod's StatefulSet"))?
        .and_then(|s| s.metadata.uid)
    else {
        return Ok(true);
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    Ok(pods
        .get_opt(&migration.spec.source_pod_name)
        .await
        .map_err(kube_err("read the restored pod"))?
        .is_some_and(|p| controlled_by(&p, &set_uid)))
}

async fn after_restore(migration: &PodMigration, ctx: &Context) -> Result<Action, Error> {
    let ns = migration.namespace().unwrap_or_default();
    let mut status = migration.status.clone().unwrap_or_default();
    let workload = Workload::from_recorded(status.source_controller.as_deref());
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(checkpoint) = checkpoints
        .get_opt(&status.checkpoint_name.clone().unwrap_or_default())
        .await
        .map_err(kube_err("read the migration's PodCheckpoint"))?
    else {
        return fail(
            migration,
            ctx,
            reasons::MIGRATION_FAILED,
            "the migration's PodCheckpoint was deleted while it ran".to_owned(),
        )
        .await;
    };
    let restore = if past_deadline(migration) {
        // Late: never recreated; what exists goes unless it made it.
        let restores: Api<PodRestore> = Api::namespaced(ctx.client.clone(), &ns);
        let name = status.restore_name.clone().unwrap_or_default();
        match restores
            .get_opt(&name)
            .await
            .map_err(kube_err("read the migration's PodRestore"))?
        {
            Some(r) if r.status.as_ref().and_then(|s| s.phase) == Some(RestorePhase::Ready) => r,
            existing => return abandon_restore(migration, ctx, status, &workload, existing).await,
        }
    } else {
        ensure_restore(migration, ctx, &checkpoint).await?
    };
    let restore_status = restore.status.clone().unwrap_or_default();
    let restore_name = restore.name_any();
    match restore_status.phase {
        Some(RestorePhase::Ready) => {
            // The target runs: the source stops for good and goes.
            if status.phase != Some(MigrationPhase::Finalizing) {
                // A StatefulSet's source was stopped before its restore.
                if !matches!(workload, Workload::StatefulSet(_)) {
                    match release(migration, ctx, true).await? {
                        Released::Stopped => source_stopped(&mut status, migration.metadata.generation),
                        // Both ran: the source, newer, stays; the target goes.
                        Released::Thawed => {
                            let why = "an earlier release thawed it";
                            return source_resumed(migration, ctx, restore_status.restored_pod_name.as_deref(), why)
                                .await;
                        }
                        Released::RanOn(why) => {
                            return source_resumed(migration, ctx, restore_status.restored_pod_name.as_deref(), &why)
                                .await;
                        }
                    }
                }
                status.phase = Some(MigrationPhase::Finalizing);
                status.stage = Some("Releasing".to_owned());
                status.target_pod_name = restore_status.restored_pod_name.clone();
                write_status(migration, ctx, &status).await?;
            }
            let mut migration = migration.clone();
            migration.status = Some(status.clone());
            let handed_over = match &workload {
                Workload::Bare => {
                    // The source by its UID: a pod of that name may be another now.
                    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
                    let delete = DeleteParams {
                        preconditions: Some(Preconditions {
                            uid: status.source_pod_uid.clone(),
                            resource_version: None,
                        }),
                        ..DeleteParams::default()
                    };
                    let _ = pods.delete(&migration.spec.source_pod_name, &delete).await;
                    true
                }
                Workload::ReplicaSet(set) => {
                    adopt_into_replica_set(&migration, ctx, set, &restore, &checkpoint).await?
                }
                Workload::StatefulSet(set) => adopted_by_statefulset(&migration, ctx, set).await?,
            };
            if !handed_over {
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            lift_fence(&migration, ctx).await?;
            let at = now();
            status.phase = Some(MigrationPhase::Succeeded);
            status.completion_time = Some(at.clone());
            status.observed_generation = migration.metadata.generation;
            // From the freeze to the target Running and Ready, to the millisecond where
            // the agent and the restore recorded the instants (whole seconds before).
            let cp_status = checkpoint.status.clone().unwrap_or_default();
            let frozen_at = cp_status.frozen_time.map(|t| t.0).or(cp_status.start_time.map(|t| t.0));
            let ready_at = restore_status
                .ready_time
                .clone()
                .map(|t| t.0)
                .or(restore_status.completion_time.clone().map(|t| t.0))
                .unwrap_or(at.0);
            status.downtime_millis = frozen_at.map(|f| (ready_at.as_millisecond() - f.as_millisecond()).max(0));
            let owner_note = status
                .source_controller
                .as_ref()
                .map(|c| format!(" under {c}"))
                .unwrap_or_default();
            let message = format!(
                "pod {} runs on {} as {}{owner_note}; the source is gone; downtime {} ms",
                migration.spec.source_pod_name,
                status.target_node_name.clone().unwrap_or_default(),
                status.target_pod_name.clone().unwrap_or_default(),
                status.downtime_millis.unwrap_or_default()
            );
            finish(
                &migration,
                ctx,
                status,
                Ending::Succeeded,
                reasons::MIGRATION_COMPLETED,
                message,
            )
            .await?;
            Ok(Action::await_change())
        }
        Some(RestorePhase::Failed) => {
            let cause = restore_status
                .conditions
                .iter()
                .find(|c| c.type_ == CONDITION_READY)
                .map(|c| c.message.clone())
                .unwrap_or_else(|| format!("PodRestore {restore_name} failed"));
            roll_back(
                migration,
                ctx,
                status,
                &workload,
                reasons::ROLLED_BACK,
                &format!("the restore failed ({cause})"),
            )
            .await
        }
        _ => Ok(Action::requeue(Duration::from_secs(1))),
    }
}

/// Whether a migration that started at `started` has outlived `timeout_seconds` at
/// `at`. Only before the target runs: once it does, the migration finishes.
pub fn timed_out(phase: Option<MigrationPhase>, started: Option<&Time>, timeout_seconds: i32, at: Time) -> bool {
    let before_target = matches!(phase, Some(MigrationPhase::Checkpointing | MigrationPhase::Restoring));
    let Some(started) = started else { return false };
    before_target && at.0.as_millisecond() - started.0.as_millisecond() > i64::from(timeout_seconds) * 1000
}

/// Ends a migration past its deadline whose target does not run: its restored pod
/// goes (at once), then its PodRestore, each waited for, so that nothing of the
/// target can start once the source thaws.
async fn abandon_restore(
    migration: &PodMigration,
    ctx: &Context,
    status: PodMigrationStatus,
    workload: &Workload,
    restore: Option<PodRestore>,
) -> Result<Action, Error> {
    let ns = migration.namespace().unwrap_or_default();
    if let Some(restore) = restore {
        let pod = restore.status.as_ref().and_then(|s| s.restored_pod_name.clone());
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        let now = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        if let Some(pod) = pod
            && pods
                .get_opt(&pod)
                .await
                .map_err(kube_err("read the restored pod"))?
                .is_some()
        {
            let _ = pods.delete(&pod, &now).await;
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        let restores: Api<PodRestore> = Api::namespaced(ctx.client.clone(), &ns);
        delete_if_there(&restores, &restore.name_any(), "delete the migration's PodRestore").await?;
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let cause = format!(
        "the restore did not finish within spec.timeoutSeconds ({} s); its PodRestore and pod were deleted",
        migration.spec.timeout_seconds
    );
    roll_back(migration, ctx, status, workload, reasons::TIMED_OUT, &cause).await
}

/// [`timed_out`] for `migration` now.
fn past_deadline(migration: &PodMigration) -> bool {
    let status = migration.status.as_ref();
    timed_out(
        status.and_then(|s| s.phase),
        status.and_then(|s| s.start_time.as_ref()),
        migration.spec.timeout_seconds,
        now(),
    )
}

/// Ends a migration whose target will not run: the source is thawed (a StatefulSet's,
/// stopped before its restore, comes back from its template), and the migration
/// ends `RolledBack` with `reason`, or `Failed` when its policy retains the source.
async fn roll_back(
    migration: &PodMigration,
    ctx: &Context,
    mut status: PodMigrationStatus,
    workload: &Workload,
    reason: &'static str,
    cause: &str,
) -> Result<Action, Error> {
    let message = match workload {
        // The source was stopped and deleted before the restore: the StatefulSet
        // brings the pod back once the fence is lifted.
        Workload::StatefulSet(set) => format!(
            "{cause}; StatefulSet {set} recreates pod {} from its template, with its volumes and without its \
             in-memory state",
            migration.spec.source_pod_name
        ),
        _ if migration.spec.failure_policy == MigrationFailurePolicy::Retain => {
            return fail(
                migration,
                ctx,
                reason,
                format!("{cause}; the source stays frozen until its deadline for inspection"),
            )
            .await;
        }
        // Roll back: the source thaws and carries on where it was frozen.
        _ => match release(migration, ctx, false).await? {
            Released::Thawed => format!("{cause}; the source pod was thawed and runs on"),
            Released::RanOn(why) => format!("{cause}; the source pod runs on ({why})"),
            Released::Stopped => {
                format!("{cause}; the source pod had been stopped by an earlier release and does not run")
            }
        },
    };
    lift_fence(migration, ctx).await?;
    status.phase = Some(MigrationPhase::RolledBack);
    status.completion_time = Some(now());
    finish(migration, ctx, status, Ending::RolledBack, reason, message).await?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_migration_times_out_only_before_its_target_runs() {
        let at = |ms: i64| Time(k8s_openapi::jiff::Timestamp::from_millisecond(ms).unwrap());
        let start = at(1_000_000);
        let table = [
            (Some(MigrationPhase::Checkpointing), 61_000, true),
            (Some(MigrationPhase::Restoring), 61_000, true),
            (Some(MigrationPhase::Restoring), 59_000, false),
            (Some(MigrationPhase::Finalizing), 600_000, false),
            (Some(MigrationPhase::Succeeded), 600_000, false),
            (None, 600_000, false),
        ];
        for (phase, after, expected) in table {
            assert_eq!(
                timed_out(phase, Some(&start), 60, at(1_000_000 + after)),
                expected,
                "{phase:?} {after}"
            );
        }
        assert!(!timed_out(Some(MigrationPhase::Restoring), None, 60, at(0)));
    }

    #[test]
    fn a_migration_shows_its_checkpoints_progress_and_freeze() {
        let mut checkpoint = PodCheckpointStatus {
            stage: Some("Storing".into()),
            progress: Some(cryopod_crds::common::OperationProgress {
                bytes_done: 5,
                bytes_total: 9,
            }),
            ..Default::default()
        };
        set_condition(
            &mut checkpoint.conditions,
            CONDITION_SOURCE_FROZEN,
            ConditionStatus::True,
            "Held",
            "held",
            Some(1),
            now(),
        );
        let mut status = PodMigrationStatus::default();
        assert!(mirrored(&mut status, Some(&checkpoint)));
        assert_eq!(status.stage.as_deref(), Some("Storing"));
        assert_eq!(status.progress.unwrap().bytes_done, 5);
        assert_eq!(
            find_condition(&status.conditions, CONDITION_SOURCE_FROZEN)
                .unwrap()
                .reason,
            "Held"
        );
        assert!(!mirrored(&mut status, Some(&checkpoint)), "nothing new");
        assert!(!mirrored(&mut status, None));
        source_stopped(&mut status, Some(1));
        assert_eq!(
            find_condition(&status.conditions, CONDITION_SOURCE_FROZEN)
                .unwrap()
                .status,
            "False"
        );
    }

    #[test]
    fn a_release_tells_a_stopped_source_from_one_that_ran_on() {
        let answer = |outcome: pb::ReleaseOutcome, stopped: bool, why: &str| pb::ReleaseResponse {
            outcome: outcome as i32,
            stopped,
            why: why.into(),
            ..Default::default()
        };
        let deadline = "its freeze deadline (30 s) passed";
        let table = [
            (answer(pb::ReleaseOutcome::Released, true, ""), true, Released::Stopped),
            // An operator restarted after its release asks again.
            (
                answer(pb::ReleaseOutcome::AlreadyReleased, true, ""),
                true,
                Released::Stopped,
            ),
            (answer(pb::ReleaseOutcome::Released, false, ""), false, Released::Thawed),
            (
                answer(pb::ReleaseOutcome::AlreadyReleased, false, ""),
                true,
                Released::Thawed,
            ),
            (
                answer(pb::ReleaseOutcome::ThawedWithoutRelease, false, deadline),
                true,
                Released::RanOn(format!("it was thawed without a release: {deadline}")),
            ),
            (
                answer(pb::ReleaseOutcome::Unspecified, false, ""),
                true,
                Released::Stopped,
            ),
        ];
        for (response, stop, expected) in table {
            assert_eq!(released_as(Ok(&response), stop), expected, "{response:?}");
        }
        let unknown = tonic::Status::not_found("operation x holds no pod");
        assert!(matches!(released_as(Err(&unknown), true), Released::RanOn(why) if why.contains("holds no pod")));
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
