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
//!
//! What to do is decided by [`machine::decide`], without I/O; this module reads what
//! it asks for and takes the steps it names.

pub mod machine;

use std::sync::Arc;
use std::time::Duration;

use cryopod_agent_api::pb;
use cryopod_crds::common::{CONDITION_SOURCE_FROZEN, ConditionStatus, NodeTarget, find_condition, set_condition};
use cryopod_crds::v1alpha1::{
    MigrationFailurePolicy, MigrationPhase, PodCheckpoint, PodCheckpointSpec, PodCheckpointStatus, PodMigration,
    PodMigrationStatus, PodRestore, PodRestoreSpec, PostCheckpointState, migration_reasons as reasons,
};
use k8s_openapi::api::apps::v1::{ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;

use self::machine::{Fence, HeldSource, Look, Observed, Released, RestoreOf, State, Step, decide, fence_name};
use crate::checkpoint::HOLD_ANNOTATION;
use crate::context::{
    Context, Ending, Error, Operation, begin, fail_with, finish, kube_err, node_facts, now, source_pod, write_status,
};
use crate::workload::{
    DELETION_COST_ANNOTATION, WITHHOLD_LABELS_ANNOTATION, Workload, controlled_by, fence, refused_by_fence,
    withheld_labels,
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

/// The most steps one pass takes; the longest (a ReplicaSet's hand-over) takes
/// seven. More means a step that does not record what it learnt.
const MAX_STEPS: usize = 16;

/// After how long a step that waits looks again.
const SOON: Duration = Duration::from_secs(1);

/// Reconciles one PodMigration: asks [`decide`] what to do, does it, and asks
/// again with what it learnt, until a step ends the pass.
pub async fn reconcile(migration: Arc<PodMigration>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.new_pass(migration.uid());
    let mut migration = (*migration).clone();
    let mut seen = Observed::at(now());
    for _ in 0..MAX_STEPS {
        let step = decide(&State::of(&migration), &seen);
        if let Some(action) = take(step, &mut migration, &mut seen, &ctx).await? {
            return Ok(action);
        }
    }
    tracing::error!(podmigration = %migration.name_any(), namespace = ?migration.namespace(), "a pass took {MAX_STEPS} steps without ending; looking again later");
    Ok(Action::requeue(Duration::from_secs(5)))
}

/// Retries a failed reconcile after a pause.
pub fn error_policy(migration: Arc<PodMigration>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(podmigration = %migration.name_any(), namespace = ?migration.namespace(), %error, "reconcile failed; retrying");
    Action::requeue(crate::context::retry_after(error))
}

/// Takes `step`: what it learns goes into `seen`, what it writes into `migration`'s
/// status. `Some` ends the pass.
async fn take(
    step: Step,
    migration: &mut PodMigration,
    seen: &mut Observed,
    ctx: &Context,
) -> Result<Option<Action>, Error> {
    let ns = migration.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    match step {
        Step::Look(look) => look_at(look, migration, seen, ctx).await?,
        Step::RaiseFence => seen.fence = Some(raise_fence(migration, ctx).await?),
        Step::Begin {
            source_uid,
            workload,
            source_node,
            target_node,
            checkpoint,
            message,
        } => {
            let mut status = migration.status.clone().unwrap_or_default();
            status.phase = Some(MigrationPhase::Checkpointing);
            status.source_pod_uid = Some(source_uid.clone());
            status.source_controller = workload.recorded();
            status.source_node_name = Some(source_node);
            status.target_node_name = Some(target_node);
            status.checkpoint_name = Some(checkpoint.clone());
            status.start_time = Some(now());
            status.observed_generation = migration.metadata.generation;
            let status = begin(
                migration,
                ctx,
                status,
                reasons::MIGRATION_IN_PROGRESS,
                "Migrate",
                message,
            )
            .await?;
            migration.status = Some(status);
            if get_checkpoint(ctx, &ns, &checkpoint).await?.is_none() {
                create_checkpoint(migration, ctx, &checkpoint, &source_uid).await?;
            }
            return Ok(Some(Action::requeue(SOON)));
        }
        Step::CreateCheckpoint { name, source_uid } => {
            seen.checkpoint = Some(Some(create_checkpoint(migration, ctx, &name, &source_uid).await?));
        }
        Step::ShowProgress => {
            let mut status = migration.status.clone().unwrap_or_default();
            if mirrored(&mut status, checkpoint_status(seen)) {
                write_status(migration, ctx, &status).await?;
            }
            return Ok(Some(Action::requeue(SOON)));
        }
        Step::ShowRestoreProgress => {
            let mut status = migration.status.clone().unwrap_or_default();
            let restore = seen
                .restore
                .as_ref()
                .and_then(|r| r.as_ref())
                .and_then(|r| r.status.as_ref());
            if restore_mirrored(&mut status, restore) {
                write_status(migration, ctx, &status).await?;
            }
            return Ok(Some(Action::requeue(SOON)));
        }
        Step::Release {
            node,
            operation_id,
            stop,
        } => seen.released = Some(release(ctx, &node, operation_id, stop).await?),
        Step::DeleteSource { uid, grace_seconds } => {
            let delete = DeleteParams {
                grace_period_seconds: grace_seconds,
                preconditions: Some(Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            // Gone already is fine; one that stays is seen next time.
            let _ = pods.delete(&migration.spec.source_pod_name, &delete).await;
            seen.source_deleted = true;
        }
        Step::StartRestore {
            restore,
            source_stopped: stopped,
        } => {
            let mut status = migration.status.clone().unwrap_or_default();
            mirrored(&mut status, checkpoint_status(seen));
            if stopped {
                source_stopped(&mut status, migration.metadata.generation);
            }
            status.stage = Some("Restoring".to_owned());
            status.phase = Some(MigrationPhase::Restoring);
            status.restore_name = Some(restore.name.clone());
            write_status(migration, ctx, &status).await?;
            migration.status = Some(status);
            if get_restore(ctx, &ns, &restore.name).await?.is_none() {
                create_restore(migration, ctx, &restore).await?;
            }
            return Ok(Some(Action::requeue(SOON)));
        }
        Step::CreateRestore(restore) => seen.restore = Some(Some(create_restore(migration, ctx, &restore).await?)),
        Step::ContinueTarget { node, pod, restore } => {
            continue_target(ctx, &ns, &node, &pod, &restore).await?;
            return Ok(Some(Action::requeue(SOON)));
        }
        Step::DeleteRestoredPod(pod) => {
            let now = DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            };
            let _ = pods.delete(&pod, &now).await;
            return Ok(Some(Action::requeue(SOON)));
        }
        Step::DeleteRestore(name) => {
            let restores: Api<PodRestore> = Api::namespaced(ctx.client.clone(), &ns);
            delete_if_there(&restores, &name, "delete the migration's PodRestore").await?;
            return Ok(Some(Action::requeue(SOON)));
        }
        Step::Finalize {
            target_pod,
            source_stopped: stopped,
        } => {
            let mut status = migration.status.clone().unwrap_or_default();
            if stopped {
                source_stopped(&mut status, migration.metadata.generation);
            }
            status.phase = Some(MigrationPhase::Finalizing);
            status.stage = Some("Releasing".to_owned());
            status.target_pod_name = Some(target_pod);
            write_status(migration, ctx, &status).await?;
            migration.status = Some(status);
        }
        Step::HandOver {
            target_pod,
            source_uid,
            labels,
        } => {
            let source = &migration.spec.source_pod_name;
            let cost =
                serde_json::json!({"metadata": {"annotations": {DELETION_COST_ANNOTATION: i32::MIN.to_string()}}});
            // The source may be gone already (the ReplicaSet scaled it down).
            let _ = pods.patch(source, &PatchParams::default(), &Patch::Merge(&cost)).await;
            let relabel = serde_json::json!({"metadata": {"labels": labels}});
            pods.patch(&target_pod, &PatchParams::default(), &Patch::Merge(&relabel))
                .await
                .map_err(kube_err("put the labels back on the restored pod"))?;
            let delete = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(source_uid),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            let _ = pods.delete(source, &delete).await;
            seen.source_deleted = true;
        }
        Step::Requeue(after) => return Ok(Some(Action::requeue(after))),
        Step::Succeed {
            downtime_millis,
            message,
        } => {
            lift_fence(migration, ctx).await?;
            let mut status = migration.status.clone().unwrap_or_default();
            status.phase = Some(MigrationPhase::Succeeded);
            status.completion_time = Some(now());
            status.observed_generation = migration.metadata.generation;
            status.downtime_millis = downtime_millis;
            finish(
                migration,
                ctx,
                status,
                Ending::Succeeded,
                reasons::MIGRATION_COMPLETED,
                message,
            )
            .await?;
            return Ok(Some(Action::await_change()));
        }
        Step::Fail { reason, message } => return fail(migration, ctx, reason, message).await.map(Some),
        Step::SourceResumed { restored_pod, message } => {
            let deleted = match restored_pod {
                Some(name) => match pods.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => format!("; the restored pod {name} was deleted"),
                    Err(kube::Error::Api(e)) if e.code == 404 => String::new(),
                    Err(source) => {
                        return Err(Error::Kube {
                            action: "delete the restored pod of a source that ran on",
                            source,
                        });
                    }
                },
                None => String::new(),
            };
            let message = format!("{message}{deleted}");
            return fail(migration, ctx, reasons::SOURCE_RESUMED, message).await.map(Some);
        }
        Step::RollBack { reason, message } => {
            lift_fence(migration, ctx).await?;
            let mut status = migration.status.clone().unwrap_or_default();
            status.phase = Some(MigrationPhase::RolledBack);
            status.completion_time = Some(now());
            finish(migration, ctx, status, Ending::RolledBack, reason, message).await?;
            return Ok(Some(Action::await_change()));
        }
        Step::Rest => {
            drop_staged_checkpoint(migration, ctx).await?;
            return Ok(Some(Action::await_change()));
        }
    }
    Ok(None)
}

/// Deletes an ended `Direct` migration's checkpoint: its copy staged on the source
/// node (the pod's memory, unsealed, on that node's disk) has no use once the target
/// runs or the source is back. Only once the end is recorded (the next pass, on the
/// ended migration): deleted before, a pass that must decide again (its status write
/// lost a race) would find the checkpoint gone and fail a migration that succeeded.
/// A failure or rollback under `Retain` keeps it with everything else (it may be the
/// only copy of a stopped source's memory). Its finalizer deletes the staged objects.
async fn drop_staged_checkpoint(migration: &PodMigration, ctx: &Context) -> Result<(), Error> {
    if !staged_copy_dropped(migration) {
        return Ok(());
    }
    let Some(name) = migration.status.as_ref().and_then(|s| s.checkpoint_name.clone()) else {
        return Ok(());
    };
    let checkpoints: Api<PodCheckpoint> =
        Api::namespaced(ctx.client.clone(), &migration.namespace().unwrap_or_default());
    // status.checkpointName is status, which others may write: only the checkpoint
    // this migration made and controls goes, by its UID.
    let Some(checkpoint) = checkpoints
        .get_opt(&name)
        .await
        .map_err(kube_err("read the checkpoint a Direct migration staged"))?
    else {
        return Ok(());
    };
    if !staged_by(&checkpoint, migration) {
        return Ok(());
    }
    let delete = DeleteParams {
        preconditions: Some(Preconditions {
            uid: checkpoint.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match checkpoints.delete(&name, &delete).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(source) => Err(Error::Kube {
            action: "delete the checkpoint a Direct migration staged on its source node",
            source,
        }),
    }
}

/// Whether the migration's staged copy goes now: a Direct migration's, once its end
/// is recorded, but for a failure or a rollback under `Retain`.
pub fn staged_copy_dropped(migration: &PodMigration) -> bool {
    let direct = migration.spec.transfer == Some(cryopod_crds::v1alpha1::MigrationTransfer::Direct);
    direct
        && match migration.status.as_ref().and_then(|s| s.phase) {
            Some(MigrationPhase::Succeeded) => true,
            // A StatefulSet's source, stopped before its restore, ends RolledBack even
            // under Retain: the staged copy may be its memory's only one.
            Some(MigrationPhase::RolledBack | MigrationPhase::Failed) => {
                migration.spec.failure_policy != MigrationFailurePolicy::Retain
            }
            _ => false,
        }
}

/// Whether `checkpoint` is the one `migration` made: held for it, and controlled by
/// it (its UID, not only its name).
pub fn staged_by(checkpoint: &PodCheckpoint, migration: &PodMigration) -> bool {
    crate::checkpoint::held_for_migration(checkpoint)
        && checkpoint
            .owner_references()
            .iter()
            .any(|o| o.controller == Some(true) && o.kind == "PodMigration" && Some(&o.uid) == migration.uid().as_ref())
}

/// Reads what `look` names into `seen`.
async fn look_at(look: Look, migration: &PodMigration, seen: &mut Observed, ctx: &Context) -> Result<(), Error> {
    let ns = migration.namespace().unwrap_or_default();
    let spec = &migration.spec;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    match look {
        Look::Source => {
            seen.source = Some(source_pod(ctx, &ns, &spec.source_pod_name, spec.source_pod_uid.as_deref()).await?);
        }
        Look::ReplicaSet { name, labels } => {
            seen.withheld = Some(replica_set_withheld(ctx, &ns, &name, &labels).await?)
        }
        Look::Budgets => {
            let budgets: Api<k8s_openapi::api::policy::v1::PodDisruptionBudget> =
                Api::namespaced(ctx.client.clone(), &ns);
            let budgets = budgets
                .list(&ListParams::default())
                .await
                .map_err(kube_err("list PodDisruptionBudgets"))?;
            seen.budgets = Some(budgets.items);
        }
        Look::Nodes { tolerations } => seen.nodes = Some(node_facts(ctx, &tolerations).await?),
        Look::Compatible { source, candidates } => {
            seen.compatible = Some(crate::compat::choose_target(ctx, &source, &candidates).await);
        }
        Look::Checkpoint(name) => seen.checkpoint = Some(get_checkpoint(ctx, &ns, &name).await?),
        Look::HeldSource { uid } => {
            let source = pods
                .get_opt(&spec.source_pod_name)
                .await
                .map_err(kube_err("read the source pod"))?
                .filter(|p| p.metadata.uid.as_deref() == Some(uid.as_str()));
            seen.held_source = Some(match source {
                None => HeldSource::Gone,
                Some(pod) if pod.metadata.deletion_timestamp.is_some() => HeldSource::Terminating,
                Some(_) => HeldSource::Present,
            });
        }
        Look::Restore(name) => seen.restore = Some(get_restore(ctx, &ns, &name).await?),
        Look::RestoredPod(name) => {
            let pod = pods.get_opt(&name).await.map_err(kube_err("read the restored pod"))?;
            seen.restored_pod = Some(pod.is_some());
        }
        Look::Adoption { set, pod } => {
            let set_uid = match &set {
                Workload::ReplicaSet(name) => uid_of::<ReplicaSet>(ctx, &ns, name, "read the pod's ReplicaSet").await?,
                Workload::StatefulSet(name) => {
                    uid_of::<StatefulSet>(ctx, &ns, name, "read the pod's StatefulSet").await?
                }
                Workload::Bare => None,
            };
            // A set that is gone has nobody left to adopt the pod.
            seen.adopted = Some(match set_uid {
                None => true,
                Some(uid) => pods
                    .get_opt(&pod)
                    .await
                    .map_err(kube_err("read the restored pod"))?
                    .is_some_and(|p| controlled_by(&p, &uid)),
            });
        }
    }
    Ok(())
}

/// The UID of the `K` named `name`, if it exists.
async fn uid_of<K>(ctx: &Context, ns: &str, name: &str, action: &'static str) -> Result<Option<String>, Error>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api
        .get_opt(name)
        .await
        .map_err(kube_err(action))?
        .and_then(|o| o.meta().uid.clone()))
}

async fn fail(migration: &PodMigration, ctx: &Context, reason: &'static str, message: String) -> Result<Action, Error> {
    lift_fence(migration, ctx).await?;
    fail_with(migration, ctx, reason, message).await?;
    Ok(Action::await_change())
}

/// Puts up the fence of the source pod's name (once) and checks that the API
/// server enforces it, by a dry-run creation of a pod of that name.
async fn raise_fence(migration: &PodMigration, ctx: &Context) -> Result<Fence, Error> {
    let ns = migration.namespace().unwrap_or_default();
    let pod = &migration.spec.source_pod_name;
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let name = fence_name(&migration.name_any());
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
        Err(kube::Error::Api(e)) if refused_by_fence(e.code, &e.message) => Ok(Fence::Enforced),
        _ => Ok(Fence::Waiting {
            since: existing.metadata.creation_timestamp,
        }),
    }
}

/// Removes the migration's fence, if it has one.
async fn lift_fence(migration: &PodMigration, ctx: &Context) -> Result<(), Error> {
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &migration.namespace().unwrap_or_default());
    delete_if_there(&maps, &fence_name(&migration.name_any()), "delete the fence").await
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
    labels: &std::collections::BTreeMap<String, String>,
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

async fn get_checkpoint(ctx: &Context, ns: &str, name: &str) -> Result<Option<PodCheckpoint>, Error> {
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), ns);
    checkpoints
        .get_opt(name)
        .await
        .map_err(kube_err("read the migration's PodCheckpoint"))
}

/// The status of the checkpoint seen in this pass, if any.
fn checkpoint_status(seen: &Observed) -> Option<&PodCheckpointStatus> {
    seen.checkpoint.as_ref()?.as_ref()?.status.as_ref()
}

/// Creates the migration's PodCheckpoint, which holds the source pod `source_uid`
/// frozen once it is stored.
async fn create_checkpoint(
    migration: &PodMigration,
    ctx: &Context,
    name: &str,
    source_uid: &str,
) -> Result<PodCheckpoint, Error> {
    let ns = migration.namespace().unwrap_or_default();
    let spec = &migration.spec;
    // No key named: the operator seals a migration's checkpoint with its own (`keys`).
    let mut checkpoint = PodCheckpoint::new(
        name,
        PodCheckpointSpec {
            source_pod_name: spec.source_pod_name.clone(),
            source_pod_uid: Some(source_uid.to_owned()),
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
        name: Some(name.to_owned()),
        namespace: Some(ns.clone()),
        owner_references: Some(vec![owner(migration)]),
        annotations: Some(on_behalf(
            migration,
            [
                (HOLD_ANNOTATION.to_owned(), migration.name_any()),
                (
                    crate::checkpoint::TRANSFER_ANNOTATION.to_owned(),
                    format!("{:?}", spec.transfer.unwrap_or_default()),
                ),
            ]
            .into(),
        )),
        ..ObjectMeta::default()
    };
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &ns);
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

async fn get_restore(ctx: &Context, ns: &str, name: &str) -> Result<Option<PodRestore>, Error> {
    let restores: Api<PodRestore> = Api::namespaced(ctx.client.clone(), ns);
    restores
        .get_opt(name)
        .await
        .map_err(kube_err("read the migration's PodRestore"))
}

/// Creates the migration's PodRestore: a StatefulSet pod comes back under its name,
/// a ReplicaSet's pod without the labels its ReplicaSet selects on (until it is
/// adopted).
async fn create_restore(migration: &PodMigration, ctx: &Context, of: &RestoreOf) -> Result<PodRestore, Error> {
    let ns = migration.namespace().unwrap_or_default();
    let (pod_name, withheld) = match &of.workload {
        Workload::Bare => (None, vec![]),
        Workload::StatefulSet(_) => (Some(migration.spec.source_pod_name.clone()), vec![]),
        // A ReplicaSet gone since the start has nobody left to adopt the pod.
        Workload::ReplicaSet(set) => (
            None,
            replica_set_withheld(ctx, &ns, set, &of.labels)
                .await?
                .unwrap_or_default(),
        ),
    };
    let mut restore = PodRestore::new(
        &of.name,
        PodRestoreSpec {
            checkpoint_name: of.checkpoint.clone(),
            checkpoint_namespace: None,
            target: Some(NodeTarget {
                node_name: Some(of.target_node.clone()),
                node_selector: None,
            }),
            pod_name,
            labels: Default::default(),
            annotations: Default::default(),
            timeout_seconds: migration.spec.timeout_seconds.clamp(10, 3600),
        },
    );
    restore.metadata.namespace = Some(ns.clone());
    restore.metadata.owner_references = Some(vec![owner(migration)]);
    let mut annotations = std::collections::BTreeMap::new();
    if !withheld.is_empty() {
        annotations.insert(WITHHOLD_LABELS_ANNOTATION.to_owned(), withheld.join(","));
    }
    if of.start_stopped {
        annotations.insert(crate::restore::START_STOPPED_ANNOTATION.to_owned(), "true".to_owned());
    }
    restore.metadata.annotations = Some(on_behalf(migration, annotations)).filter(|a| !a.is_empty());
    let restores: Api<PodRestore> = Api::namespaced(ctx.client.clone(), &ns);
    restores
        .create(&PostParams::default(), &restore)
        .await
        .map_err(kube_err("create the migration's PodRestore"))
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

/// Takes the restore's stage (`Transferring` while the target fetches the checkpoint)
/// and byte counts into the migration's status; whether anything changed.
pub fn restore_mirrored(
    status: &mut PodMigrationStatus,
    restore: Option<&cryopod_crds::v1alpha1::PodRestoreStatus>,
) -> bool {
    let Some(restore) = restore else { return false };
    let before = status.clone();
    match restore.stage.as_deref() {
        Some("Fetching") => {
            status.stage = Some("Transferring".to_owned());
            if restore.progress.is_some() {
                status.progress = restore.progress;
            }
        }
        Some(stage) => status.stage = Some(stage.to_owned()),
        None => {}
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

/// Lets the restored target's processes run through its node's agent, then marks its
/// PodRestore continued (which then waits for it to be Ready). Both idempotent.
async fn continue_target(ctx: &Context, ns: &str, node: &str, pod: &str, restore: &str) -> Result<(), Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let uid = pods
        .get(pod)
        .await
        .map_err(kube_err("read the restored pod"))?
        .uid()
        .unwrap_or_default();
    let restores: Api<PodRestore> = Api::namespaced(ctx.client.clone(), ns);
    let restore_id = restores
        .get(restore)
        .await
        .map_err(kube_err("read the migration's PodRestore"))?
        .uid()
        .unwrap_or_default();
    let mut client = ctx
        .agents
        .client(node)
        .await
        .map_err(|source| Error::Agent { source })?;
    let continued = client
        .continue_restored(pb::ContinueRestoredRequest {
            pod: Some(pb::PodRef {
                namespace: ns.to_owned(),
                name: pod.to_owned(),
                uid,
            }),
            restore_id,
        })
        .await
        .map_err(|source| Error::Grpc {
            action: "continue the restored pod on the target's agent",
            source,
        })?
        .into_inner()
        .continued;
    tracing::info!(%node, %pod, continued, "the target runs: its processes were continued");
    let mark = serde_json::json!({"metadata": {"annotations": {crate::restore::CONTINUED_ANNOTATION: "true"}}});
    restores
        .patch(restore, &PatchParams::default(), &Patch::Merge(&mark))
        .await
        .map_err(kube_err("mark the migration's PodRestore continued"))?;
    Ok(())
}

/// Ends the hold `operation_id` on the agent of `node`: stop the source for good, or
/// thaw it, and says how the hold really ended.
async fn release(ctx: &Context, node: &str, operation_id: String, stop: bool) -> Result<Released, Error> {
    let mut client = ctx
        .agents
        .client(node)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn security_only_the_checkpoint_a_migration_made_is_dropped_as_its_staged_copy() {
        let migration: PodMigration = serde_json::from_value(serde_json::json!({
            "apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration",
            "metadata": {"name": "m", "uid": "mig-uid"}, "spec": {"sourcePodName": "p", "transfer": "Direct"}
        }))
        .unwrap();
        let checkpoint = |annotations: serde_json::Value, owner_uid: &str| -> PodCheckpoint {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint",
                "metadata": {"name": "m-checkpoint", "annotations": annotations,
                             "ownerReferences": [{"apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration",
                                                  "name": "m", "uid": owner_uid, "controller": true}]},
                "spec": {"sourcePodName": "p"}
            }))
            .unwrap()
        };
        let held = serde_json::json!({"cryopod.io/hold-for-migration": "m"});
        assert!(staged_by(&checkpoint(held.clone(), "mig-uid"), &migration));
        // Another migration's of the same name, or a tenant's own checkpoint.
        assert!(!staged_by(&checkpoint(held, "other-uid"), &migration));
        assert!(!staged_by(&checkpoint(serde_json::json!({}), "mig-uid"), &migration));
    }

    #[test]
    fn a_direct_migrations_staged_copy_goes_only_once_its_end_is_recorded() {
        let migration = |spec: serde_json::Value, phase: Option<&str>| -> PodMigration {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration", "metadata": {"name": "m"},
                "spec": spec, "status": {"phase": phase}
            }))
            .unwrap()
        };
        let direct = serde_json::json!({"sourcePodName": "p", "transfer": "Direct"});
        let retain = serde_json::json!({"sourcePodName": "p", "transfer": "Direct", "failurePolicy": "Retain"});
        let via_store = serde_json::json!({"sourcePodName": "p"});
        // Still running (Finalizing: a pass that lost a status race decides again).
        for phase in [None, Some("Checkpointing"), Some("Restoring"), Some("Finalizing")] {
            assert!(!staged_copy_dropped(&migration(direct.clone(), phase)), "{phase:?}");
        }
        for phase in ["Succeeded", "RolledBack", "Failed"] {
            assert!(staged_copy_dropped(&migration(direct.clone(), Some(phase))), "{phase}");
        }
        assert!(!staged_copy_dropped(&migration(retain.clone(), Some("Failed"))));
        assert!(!staged_copy_dropped(&migration(retain.clone(), Some("RolledBack"))));
        assert!(staged_copy_dropped(&migration(retain, Some("Succeeded"))));
        assert!(!staged_copy_dropped(&migration(via_store, Some("Succeeded"))));
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
        // Then the target's fetch, as the transfer.
        let fetching: cryopod_crds::v1alpha1::PodRestoreStatus = serde_json::from_value(serde_json::json!({
            "stage": "Fetching", "progress": {"bytesDone": 7, "bytesTotal": 9}
        }))
        .unwrap();
        assert!(restore_mirrored(&mut status, Some(&fetching)));
        assert_eq!(status.stage.as_deref(), Some("Transferring"));
        assert_eq!(status.progress.unwrap().bytes_done, 7);
        assert!(!restore_mirrored(&mut status, Some(&fetching)), "nothing new");
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
}
