//! The PodMigration controller: a PodCheckpoint that leaves the source frozen, a
//! PodRestore on the target, then the source stopped and deleted only once the
//! target is Running and Ready. On failure the source is thawed (rollback) and a
//! half-restored target removed. Phases in `status.phase`:
//!
//! - none/`Pending`: check the source pod (UID, owner) and choose the target node;
//!   create the PodCheckpoint `<migration>-checkpoint` (owned by the migration,
//!   annotated to hold the source frozen).
//! - `Checkpointing`: when it is Ready, create the PodRestore `<migration>-restore`.
//! - `Restoring`: when it is Ready, release the source on its agent (stop) and
//!   delete it; when it fails, release it (thaw) and roll back.
//! - `Succeeded`, `RolledBack`, `Failed`: final.
//!
//! Every step is named and checked before it is taken, so an operator restarted at
//! any point continues the same migration exactly once.

use std::sync::Arc;
use std::time::Duration;

use cryopod_crds::common::{CONDITION_READY, ConditionStatus, NodeTarget, set_condition};
use cryopod_crds::v1alpha1::{
    CheckpointPhase, MigrationFailurePolicy, MigrationPhase, PodCheckpoint, PodCheckpointSpec, PodMigration,
    PodMigrationStatus, PodRestore, PodRestoreSpec, PostCheckpointState, RestorePhase, migration_reasons as reasons,
};
use cryopod_node_agent::server::pb;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use crate::checkpoint::HOLD_ANNOTATION;
use crate::context::{
    Context, Ending, Error, Operation, SourcePod, fail_with, finish, kube_err, node_ready, now, publish, source_pod,
    write_status,
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
    Action::requeue(Duration::from_secs(5))
}

async fn fail(migration: &PodMigration, ctx: &Context, reason: &str, message: String) -> Result<Action, Error> {
    fail_with(migration, ctx, reason, message).await?;
    Ok(Action::await_change())
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

/// Why a pod cannot be migrated yet, if it cannot.
pub fn unsupported_owner(pod: &Pod) -> Option<String> {
    let controller = pod
        .metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))?;
    Some(format!(
        "pod {} is managed by {} {}; migrating pods of controllers is not supported yet (bare pods are)",
        pod.name_any(),
        controller.kind,
        controller.name
    ))
}

/// Whether a label selector selects these labels (`matchLabels` and
/// `matchExpressions` with In, NotIn, Exists, DoesNotExist).
pub fn selects(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    let by_labels = selector
        .match_labels
        .as_ref()
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    by_labels && by_expressions
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
    fits.first()
        .map(|n| (*n).clone())
        .ok_or_else(|| match &target.node_name {
            Some(n) if n == source => format!("spec.target.nodeName {n} is the source pod's own node"),
            Some(n) => format!("spec.target.nodeName {n} is not a ready node"),
            None => format!("no ready node other than {source} matches spec.target"),
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
    if let Some(message) = unsupported_owner(&pod) {
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
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let facts: Vec<_> = nodes
        .list(&ListParams::default())
        .await
        .map_err(kube_err("list nodes"))?
        .items
        .into_iter()
        .map(|n| {
            let ready = node_ready(&n);
            (n.name_any(), ready, n.metadata.labels.clone().unwrap_or_default())
        })
        .collect();
    let target = match target_node(spec.target.as_ref(), &source, &facts) {
        Ok(target) => target,
        Err(message) => return fail(migration, ctx, reasons::NO_COMPATIBLE_NODE, message).await,
    };
    let checkpoint_name = format!("{}-checkpoint", migration.name_any());
    let mut status = migration.status.clone().unwrap_or_default();
    status.phase = Some(MigrationPhase::Checkpointing);
    status.source_pod_uid = Some(uid.clone());
    status.source_node_name = Some(source.clone());
    status.target_node_name = Some(target.clone());
    status.checkpoint_name = Some(checkpoint_name.clone());
    status.start_time = Some(now());
    status.observed_generation = migration.metadata.generation;
    let message = format!("moving pod {} from {source} to {target}", spec.source_pod_name);
    set_condition(
        &mut status.conditions,
        CONDITION_READY,
        ConditionStatus::False,
        reasons::MIGRATION_IN_PROGRESS,
        &message,
        migration.metadata.generation,
        now(),
    );
    write_status(migration, ctx, &status).await?;
    publish(
        ctx,
        migration,
        EventType::Normal,
        reasons::MIGRATION_IN_PROGRESS,
        "Migrate",
        message,
    )
    .await;
    ctx.metrics.started("PodMigration");

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
        annotations: Some([(HOLD_ANNOTATION.to_owned(), migration.name_any())].into()),
        ..ObjectMeta::default()
    };
    checkpoints
        .create(&PostParams::default(), &checkpoint)
        .await
        .map_err(kube_err("create the migration's PodCheckpoint"))
}

/// Creates the migration's PodRestore unless it exists.
async fn ensure_restore(migration: &PodMigration, ctx: &Context) -> Result<PodRestore, Error> {
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
    let mut restore = PodRestore::new(
        &restore_name,
        PodRestoreSpec {
            checkpoint_name: status.checkpoint_name.clone().unwrap_or_default(),
            target: Some(NodeTarget {
                node_name: status.target_node_name.clone(),
                node_selector: None,
            }),
            pod_name: None,
            labels: Default::default(),
            annotations: Default::default(),
            timeout_seconds: migration.spec.timeout_seconds.clamp(10, 3600),
        },
    );
    restore.metadata.namespace = Some(ns);
    restore.metadata.owner_references = Some(vec![owner(migration)]);
    restores
        .create(&PostParams::default(), &restore)
        .await
        .map_err(kube_err("create the migration's PodRestore"))
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
        _ => return Ok(Action::requeue(Duration::from_secs(1))),
    }
    let restore_name = format!("{}-restore", migration.name_any());
    status.phase = Some(MigrationPhase::Restoring);
    status.restore_name = Some(restore_name.clone());
    write_status(migration, ctx, &status).await?;
    let mut migration = migration.clone();
    migration.status = Some(status);
    ensure_restore(&migration, ctx).await?;
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// Ends the hold of the source on its agent: stop it for good, or thaw it.
async fn release(migration: &PodMigration, ctx: &Context, stop: bool) -> Result<Result<(), String>, Error> {
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
        Ok(_) => Ok(Ok(())),
        // Released before (an operator restarted after it), or thawed by the agent.
        Err(s) if s.code() == tonic::Code::NotFound || s.code() == tonic::Code::FailedPrecondition => {
            Ok(Err(s.message().to_owned()))
        }
        Err(source) => Err(Error::Grpc {
            action: "release the source pod",
            source,
        }),
    }
}

async fn after_restore(migration: &PodMigration, ctx: &Context) -> Result<Action, Error> {
    let ns = migration.namespace().unwrap_or_default();
    let mut status = migration.status.clone().unwrap_or_default();
    let restore = ensure_restore(migration, ctx).await?;
    let restore_status = restore.status.clone().unwrap_or_default();
    let restore_name = restore.name_any();
    let phase = restore_status.phase;
    match phase {
        Some(RestorePhase::Ready) => {
            // The target runs: the source stops for good and goes.
            if status.phase != Some(MigrationPhase::Finalizing) {
                if let Err(note) = release(migration, ctx, true).await? {
                    tracing::info!(%note, "the source was released before");
                }
                status.phase = Some(MigrationPhase::Finalizing);
                status.target_pod_name = restore_status.restored_pod_name.clone();
                write_status(migration, ctx, &status).await?;
            }
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            let _ = pods
                .delete(&migration.spec.source_pod_name, &DeleteParams::default())
                .await;
            let at = now();
            status.phase = Some(MigrationPhase::Succeeded);
            status.completion_time = Some(at.clone());
            status.observed_generation = migration.metadata.generation;
            // From the freeze (the checkpoint's start) to the target Running and Ready.
            let checkpoints: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &ns);
            let frozen_at = checkpoints
                .get_opt(&status.checkpoint_name.clone().unwrap_or_default())
                .await
                .map_err(kube_err("read the migration's PodCheckpoint"))?
                .and_then(|c| c.status?.start_time);
            let ready_at = restore_status.completion_time.clone().unwrap_or(at.clone());
            status.downtime_millis = frozen_at.map(|f| (ready_at.0.as_millisecond() - f.0.as_millisecond()).max(0));
            let message = format!(
                "pod {} runs on {} as {}; the source is gone; downtime {} ms",
                migration.spec.source_pod_name,
                status.target_node_name.clone().unwrap_or_default(),
                status.target_pod_name.clone().unwrap_or_default(),
                status.downtime_millis.unwrap_or_default()
            );
            finish(
                migration,
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
            if migration.spec.failure_policy == MigrationFailurePolicy::Retain {
                return fail(
                    migration,
                    ctx,
                    reasons::MIGRATION_FAILED,
                    format!("the restore failed ({cause}); the source stays frozen until its deadline for inspection"),
                )
                .await;
            }
            // Roll back: the source thaws and carries on where it was frozen.
            let note = release(migration, ctx, false).await?.err();
            let at = now();
            status.phase = Some(MigrationPhase::RolledBack);
            status.completion_time = Some(at.clone());
            let message = format!(
                "the restore failed ({cause}); the source pod was thawed and runs on{}",
                note.map(|n| format!(" ({n})")).unwrap_or_default()
            );
            finish(
                migration,
                ctx,
                status,
                Ending::RolledBack,
                reasons::ROLLED_BACK,
                message,
            )
            .await?;
            Ok(Action::await_change())
        }
        _ => Ok(Action::requeue(Duration::from_secs(1))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use super::*;

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
            "no ready node other than node-2 matches spec.target"
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

    #[test]
    fn pods_of_controllers_are_named_as_unsupported() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "1", "controller": true}]}
        }))
        .unwrap();
        assert!(unsupported_owner(&pod).unwrap().contains("managed by ReplicaSet web"));
        assert!(unsupported_owner(&Pod::default()).is_none());
    }
}
