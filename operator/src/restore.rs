//! The PodRestore controller. Phases in `status.phase`:
//!
//! - none/`Pending`: the PodCheckpoint must exist and be Ready; a node is chosen (the
//!   target, else a ready node with an agent, another than the source first; a
//!   node-local checkpoint only on its node); the operation id (the PodRestore's UID)
//!   is recorded.
//! - `Fetching`: the target's agent prepares the restore (`PrepareRestore`: digests
//!   verified, compatibility checked, decrypted) under that id, re-attaching after an
//!   operator restart.
//! - `Restoring`: the new pod is created (once; its name is recorded first) through
//!   the `cryopod` RuntimeClass and watched until Running and Ready. A pod whose
//!   restore fails is deleted: no half-restored pod stays.
//! - `Ready` / `Failed`: final.

use std::sync::Arc;
use std::time::Duration;

use cryopod_agent_api::pb;
use cryopod_crds::common::{CONDITION_READY, ConditionStatus, reserved_key, set_condition};
use cryopod_crds::v1alpha1::{
    CheckpointLocationType, CheckpointPhase, PodCheckpoint, PodRestore, PodRestoreStatus,
    RESTORE_NAMESPACES_ANNOTATION, RestorePhase, RestoreTimings, grants_restore_to, restore_reasons as reasons,
};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::Action;

use crate::checkpoint::{secret_data, stored_at};
use crate::context::{
    Context, Ending, Error, Operation, begin, fail_with, finish, kube_err, node_facts, now, write_status,
};
use crate::restore_pod::{PODRESTORE_ANNOTATION, RESTORED_LABEL, restore_pod};
use crate::workload::{WITHHOLD_LABELS_ANNOTATION, parse_withheld};

/// The PodRestore a restored pod belongs to: a change of the pod (its readiness)
/// wakes the restore at once.
pub fn restore_of_pod(pod: &Pod) -> Option<kube::runtime::reflector::ObjectRef<PodRestore>> {
    let name = pod.annotations().get(PODRESTORE_ANNOTATION)?;
    Some(kube::runtime::reflector::ObjectRef::new(name).within(&pod.namespace()?))
}

/// Takes the agent's fetch progress into the status; whether it changed.
pub fn fetching(status: &mut PodRestoreStatus, op: &pb::Operation) -> bool {
    let before = (status.stage.clone(), status.progress);
    if op.stage == pb::Stage::Fetching as i32 {
        status.stage = Some("Fetching".to_owned());
    }
    if let Some(bytes) = crate::checkpoint::progress_of(op) {
        status.progress = Some(bytes);
    }
    before != (status.stage.clone(), status.progress)
}

/// Reconciles one PodRestore.
pub async fn reconcile(restore: Arc<PodRestore>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.new_pass(restore.uid());
    match restore.status.as_ref().and_then(|s| s.phase) {
        None | Some(RestorePhase::Pending) => start(&restore, &ctx).await,
        Some(RestorePhase::Fetching) => fetch(&restore, &ctx).await,
        Some(RestorePhase::Restoring) => watch_pod(&restore, &ctx).await,
        Some(RestorePhase::Ready | RestorePhase::Failed) => Ok(Action::await_change()),
    }
}

/// Retries a failed reconcile after a pause.
pub fn error_policy(restore: Arc<PodRestore>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(podrestore = %restore.name_any(), namespace = ?restore.namespace(), %error, "reconcile failed; retrying");
    Action::requeue(crate::context::retry_after(error))
}

impl Operation for PodRestore {
    type Status = PodRestoreStatus;
    const KIND: &'static str = "PodRestore";
    fn status(&self) -> Option<&PodRestoreStatus> {
        self.status.as_ref()
    }
    fn conditions(
        status: &mut PodRestoreStatus,
    ) -> &mut Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
        &mut status.conditions
    }
    fn set_failed(
        status: &mut PodRestoreStatus,
        at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
        generation: Option<i64>,
    ) {
        status.phase = Some(RestorePhase::Failed);
        status.completion_time = Some(at);
        status.observed_generation = generation;
    }
}

/// Ends the restore as Failed, deleting the restored pod if it was created: no
/// half-restored pod stays behind.
async fn fail(restore: &PodRestore, ctx: &Context, reason: &'static str, message: String) -> Result<Action, Error> {
    let pod = restore.status.as_ref().and_then(|s| s.restored_pod_name.clone());
    // Continued by its migration, the pod is the only copy (the source was stopped
    // for good): it is kept, whatever failed.
    if committed(restore) {
        let kept = pod.map_or(String::new(), |pod| {
            format!("; pod {pod} is kept: its migration's source was stopped for good")
        });
        fail_with(restore, ctx, reason, format!("{message}{kept}")).await?;
        return Ok(Action::await_change());
    }
    if let Some(pod) = pod {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &restore.namespace().unwrap_or_default());
        let _ = pods.delete(&pod, &DeleteParams::default()).await;
    }
    discard_prepared(restore, ctx).await;
    fail_with(restore, ctx, reason, message).await?;
    Ok(Action::await_change())
}

/// Whether the restore's pod was continued by its migration: from then on it is the
/// only copy of the pod.
pub fn committed(restore: &PodRestore) -> bool {
    let annotations = restore.annotations();
    annotations.get(START_STOPPED_ANNOTATION).map(String::as_str) == Some("true")
        && annotations.contains_key(CONTINUED_ANNOTATION)
}

/// Asks the agent that prepared the restore, if one did, to remove its decrypted
/// data now rather than at its sweep. Best effort: the sweep still removes it, and a
/// restore that failed never waits on an unreachable agent.
async fn discard_prepared(restore: &PodRestore, ctx: &Context) {
    // The id is the restore's own UID, as it was prepared under: never one that
    // status (which others may write) names.
    let (Some(node), Some(id)) = (restore.status.as_ref().and_then(|s| s.node_name.clone()), restore.uid()) else {
        return;
    };
    let asked = tokio::time::timeout(Duration::from_secs(5), async {
        let mut client = ctx.agents.client(&node).await.map_err(|e| e.to_string())?;
        client
            .discard_restore(pb::DiscardRestoreRequest {
                operation_id: id.clone(),
            })
            .await
            .map(|r| r.into_inner().discarded)
            .map_err(|status| status.message().to_owned())
    })
    .await;
    match asked {
        Ok(Ok(discarded)) => tracing::info!(%node, operation_id = %id, discarded, "prepared restore discarded"),
        Ok(Err(why)) => {
            tracing::warn!(%node, operation_id = %id, %why, "cannot discard the prepared restore; its agent sweeps it")
        }
        Err(_) => {
            tracing::warn!(%node, operation_id = %id, "the agent did not discard the prepared restore within 5 s; it sweeps it")
        }
    }
}

/// Runs the checkpoint's postRestore hooks in the restored `pod`, through the agent
/// of its node: the failures ignored, or why a hook failed the restore. At least once:
/// an operator that stops after the hooks and before it records the restore Ready
/// runs them again.
async fn post_restore_hooks(
    restore: &PodRestore,
    ctx: &Context,
    pod: &Pod,
) -> Result<Result<Vec<String>, String>, Error> {
    let Some(checkpoint) = checkpoint_of(restore, ctx).await? else {
        return Ok(Ok(Vec::new()));
    };
    let hooks: Vec<pb::Hook> = checkpoint
        .spec
        .hooks
        .as_ref()
        .map(|h| h.post_restore.iter().map(crate::checkpoint::hook_to_pb).collect())
        .unwrap_or_default();
    if hooks.is_empty() {
        return Ok(Ok(Vec::new()));
    }
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
    let mut client = ctx
        .agents
        .client(&node)
        .await
        .map_err(|source| Error::Agent { source })?;
    let request = pb::RunHooksRequest {
        pod: Some(pb::PodRef {
            namespace: pod.namespace().unwrap_or_default(),
            name: pod.name_any(),
            uid: pod.uid().unwrap_or_default(),
        }),
        hooks,
    };
    match client.run_hooks(request).await {
        Ok(answer) => Ok(Ok(answer.into_inner().ignored)),
        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
            Ok(Err(format!("a postRestore hook failed: {}", status.message())))
        }
        Err(source) => Err(Error::Grpc {
            action: "run the postRestore hooks on the agent",
            source,
        }),
    }
}

/// Ends a restore whose PodCheckpoint was deleted while it ran.
async fn checkpoint_deleted(restore: &PodRestore, ctx: &Context) -> Result<Action, Error> {
    let message = format!(
        "PodCheckpoint {} was deleted during the restore",
        restore.spec.checkpoint_name
    );
    fail(restore, ctx, reasons::CHECKPOINT_NOT_FOUND, message).await
}

/// The namespace of the PodCheckpoint a restore names.
fn checkpoint_namespace(restore: &PodRestore) -> String {
    restore
        .spec
        .checkpoint_namespace
        .clone()
        .unwrap_or_else(|| restore.namespace().unwrap_or_default())
}

/// Why a restore may not read its checkpoint, if it may not: a checkpoint of another
/// namespace must grant it.
pub fn refused_grant(restore: &PodRestore, checkpoint: &PodCheckpoint) -> Option<String> {
    let own = restore.namespace().unwrap_or_default();
    let theirs = checkpoint.namespace().unwrap_or_default();
    let annotation = checkpoint
        .annotations()
        .get(RESTORE_NAMESPACES_ANNOTATION)
        .map(String::as_str);
    (own != theirs && !grants_restore_to(annotation, &own)).then(|| {
        format!(
            "spec.checkpointNamespace: PodCheckpoint {theirs}/{} does not grant restores to namespace {own} \
             (its annotation {RESTORE_NAMESPACES_ANNOTATION} must list it)",
            checkpoint.name_any()
        )
    })
}

/// The PodCheckpoint a restore names, if it exists.
async fn checkpoint_of(restore: &PodRestore, ctx: &Context) -> Result<Option<PodCheckpoint>, Error> {
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &checkpoint_namespace(restore));
    checkpoints
        .get_opt(&restore.spec.checkpoint_name)
        .await
        .map_err(kube_err("read the PodCheckpoint"))
}

/// The node a restore runs on, or why there is none. `nodes` are (name, ready,
/// labels, has an agent).
pub fn choose_node(
    restore: &PodRestore,
    checkpoint: &PodCheckpoint,
    nodes: &[(String, bool, std::collections::BTreeMap<String, String>, bool)],
) -> Result<String, String> {
    let status = checkpoint.status.clone().unwrap_or_default();
    let source = status.node_name.unwrap_or_default();
    let target = restore.spec.target.clone().unwrap_or_default();
    // A node-local checkpoint is read where it is, or from its node's agent by
    // another node's (a Direct transfer): its own node first, it needs no copy.
    let local = status
        .checkpoint_location
        .as_ref()
        .is_some_and(|l| l.type_ == CheckpointLocationType::NodeLocal);
    let fits = |(name, ready, labels, agent): &(String, bool, std::collections::BTreeMap<String, String>, bool)| {
        *ready
            && *agent
            && target.node_name.as_ref().is_none_or(|n| n == name)
            && target
                .node_selector
                .as_ref()
                .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
    };
    let mut candidates: Vec<&String> = nodes.iter().filter(|n| fits(n)).map(|n| &n.0).collect();
    // Else another node than the source first: a restore is most often a move.
    candidates.sort_by_key(|n| ((**n == source) != local, (*n).clone()));
    candidates.first().map(|n| (*n).clone()).ok_or_else(|| {
        let mut why = Vec::new();
        if let Some(n) = &target.node_name {
            why.push(format!(
                "spec.target.nodeName {n} is not a ready node with a cryopod agent whose taints the pod tolerates"
            ));
        }
        if target.node_selector.is_some() {
            why.push(
                "no ready node with a cryopod agent whose taints the pod tolerates matches spec.target.nodeSelector"
                    .to_owned(),
            );
        }
        if why.is_empty() {
            why.push("no ready node runs a cryopod agent".to_owned());
        }
        why.join("; ")
    })
}

/// When no node can take the restore now, but one could as soon as its agent serves
/// (it is restarting: a rollout, a drain, a renewal of its certificate), the wait
/// that says so; `None` when an agent would not help.
pub fn waiting_for_agent(
    restore: &PodRestore,
    checkpoint: &PodCheckpoint,
    nodes: &[(String, bool, std::collections::BTreeMap<String, String>, bool)],
) -> Option<String> {
    if choose_node(restore, checkpoint, nodes).is_ok() {
        return None;
    }
    let with_agents: Vec<_> = nodes
        .iter()
        .map(|(name, ready, labels, _)| (name.clone(), *ready, labels.clone(), true))
        .collect();
    let node = choose_node(restore, checkpoint, &with_agents).ok()?;
    Some(format!("waiting for the cryopod agent on node {node} to serve"))
}

/// Pending, saying what it waits for; looked at again `after`.
async fn pending(restore: &PodRestore, ctx: &Context, wait: &str, after: Duration) -> Result<Action, Error> {
    let mut status = restore.status.clone().unwrap_or_default();
    status.phase = Some(RestorePhase::Pending);
    set_condition(
        &mut status.conditions,
        CONDITION_READY,
        ConditionStatus::False,
        reasons::PENDING,
        wait,
        restore.metadata.generation,
        now(),
    );
    write_status(restore, ctx, &status).await?;
    Ok(Action::requeue(after))
}

async fn start(restore: &PodRestore, ctx: &Context) -> Result<Action, Error> {
    let ns = checkpoint_namespace(restore);
    let name = &restore.spec.checkpoint_name;
    let Some(checkpoint) = checkpoint_of(restore, ctx).await? else {
        return fail(
            restore,
            ctx,
            reasons::CHECKPOINT_NOT_FOUND,
            format!("spec.checkpointName: PodCheckpoint {name} does not exist in namespace {ns}"),
        )
        .await;
    };
    if let Some(message) = refused_grant(restore, &checkpoint) {
        return fail(restore, ctx, reasons::NOT_PERMITTED, message).await;
    }
    if let Some(message) = reserved_keys(&restore.spec) {
        return fail(restore, ctx, reasons::NOT_PERMITTED, message).await;
    }
    if let Some(why) = refused_template(&checkpoint) {
        return fail(restore, ctx, reasons::NOT_PERMITTED, why).await;
    }
    match checkpoint.status.as_ref().and_then(|s| s.phase) {
        Some(CheckpointPhase::Ready) => {}
        Some(CheckpointPhase::Failed) => {
            return fail(
                restore,
                ctx,
                reasons::CHECKPOINT_NOT_READY,
                format!("spec.checkpointName: PodCheckpoint {name} failed; there is nothing to restore"),
            )
            .await;
        }
        _ => {
            let wait = format!("waiting for PodCheckpoint {name} to be Ready");
            return pending(restore, ctx, &wait, Duration::from_secs(3)).await;
        }
    }
    // One lookup of the agents, not one per node.
    let served = ctx.agents.nodes().await.map_err(|source| Error::Agent { source })?;
    let tolerations = checkpoint
        .status
        .as_ref()
        .and_then(|s| s.checkpointed_pod_template.as_ref())
        .and_then(|t| t.spec.as_ref())
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let facts: Vec<_> = node_facts(ctx, &tolerations)
        .await?
        .into_iter()
        .map(|(name, ready, labels)| {
            let agent = served.contains(&name);
            (name, ready, labels, agent)
        })
        .collect();
    let node = match choose_node(restore, &checkpoint, &facts) {
        Ok(node) => node,
        Err(message) => {
            // An agent on its way back is waited for, within the restore's timeout.
            let created = restore.metadata.creation_timestamp.as_ref().map(|t| t.0);
            let waited = created.map_or(0, |t| (now().0.as_second() - t.as_second()).max(0));
            match waiting_for_agent(restore, &checkpoint, &facts) {
                Some(wait) if waited < i64::from(restore.spec.timeout_seconds) => {
                    return pending(restore, ctx, &wait, Duration::from_secs(2)).await;
                }
                Some(wait) => {
                    let message = format!(
                        "{message}: {wait} for spec.timeoutSeconds ({} s) in vain",
                        restore.spec.timeout_seconds
                    );
                    return fail(restore, ctx, reasons::NO_COMPATIBLE_NODE, message).await;
                }
                None => return fail(restore, ctx, reasons::NO_COMPATIBLE_NODE, message).await,
            }
        }
    };
    let mut status = restore.status.clone().unwrap_or_default();
    status.phase = Some(RestorePhase::Fetching);
    status.node_name = Some(node.clone());
    status.operation_id = restore.uid();
    status.start_time = Some(now());
    status.observed_generation = restore.metadata.generation;
    let message = format!("restoring PodCheckpoint {name} on node {node}");
    let status = begin(restore, ctx, status, reasons::RESTORE_IN_PROGRESS, "Restore", message).await?;
    let mut restore = restore.clone();
    restore.status = Some(status);
    fetch(&restore, ctx).await
}

/// Why a restore's labels or annotations are refused: keys under `cryopod.io/` are
/// the operator's (the schema refuses them too, where the CRD is current).
pub fn reserved_keys(spec: &cryopod_crds::v1alpha1::PodRestoreSpec) -> Option<String> {
    let found: Vec<String> = [("labels", &spec.labels), ("annotations", &spec.annotations)]
        .iter()
        .flat_map(|(field, map)| {
            map.keys()
                .filter(|k| reserved_key(k))
                .map(move |k| format!("spec.{field}[{k}]"))
        })
        .collect();
    (!found.is_empty()).then(|| {
        format!(
            "{}: keys under cryopod.io/ are reserved for the operator",
            found.join(", ")
        )
    })
}

/// Why the checkpoint's recorded template may not become a pod. It is status, which
/// others than the operator may write: it is checked before the restore starts and
/// again right before a pod is made of it with the operator's rights.
fn refused_template(checkpoint: &PodCheckpoint) -> Option<String> {
    let recorded = checkpoint
        .status
        .as_ref()
        .and_then(|s| s.checkpointed_pod_template.as_ref())?;
    let annotations = recorded.metadata.as_ref().and_then(|m| m.annotations.as_ref());
    let spec = recorded.spec.as_ref()?;
    crate::template::refused_spec_with(spec, annotations).map(|why| {
        format!(
            "PodCheckpoint {}: status.checkpointedPodTemplate.{why}",
            checkpoint.name_any()
        )
    })
}

/// A tenant's labels or annotations without the operator's own keys.
fn tenant_entries(map: &std::collections::BTreeMap<String, String>) -> impl Iterator<Item = (String, String)> + '_ {
    map.iter()
        .filter(|(k, _)| !reserved_key(k))
        .map(|(k, v)| (k.clone(), v.clone()))
}

/// The reason a failed PrepareRestore ends the PodRestore with: from what the agent
/// says failed, or, from an agent that does not say, from its status code.
pub fn prepare_failure_reason(op: &pb::Operation) -> &'static str {
    use pb::Failure as F;
    match F::try_from(op.failure).unwrap_or(F::Unspecified) {
        F::Corrupt => reasons::CHECKPOINT_CORRUPT,
        F::Incompatible => reasons::NO_COMPATIBLE_NODE,
        F::TimedOut => reasons::TIMED_OUT,
        F::Unspecified => match tonic::Code::from(op.error_code) {
            tonic::Code::DataLoss => reasons::CHECKPOINT_CORRUPT,
            tonic::Code::FailedPrecondition => reasons::NO_COMPATIBLE_NODE,
            tonic::Code::DeadlineExceeded => reasons::TIMED_OUT,
            _ => reasons::RESTORE_FAILED,
        },
        _ => reasons::RESTORE_FAILED,
    }
}

/// The node whose local storage holds the checkpoint, when that is not `node`: the
/// restore then reads it from that node's agent.
pub fn peer_node(checkpoint: &PodCheckpoint, node: &str) -> Option<String> {
    let location = checkpoint.status.as_ref()?.checkpoint_location.as_ref()?;
    let held_on = &location.node_local.as_ref()?.node_name;
    (location.type_ == CheckpointLocationType::NodeLocal && held_on != node).then(|| held_on.clone())
}

/// `storage` as the target reads it: a node-local checkpoint on another node through
/// that node's agent, with a read grant for this checkpoint alone.
async fn read_from_peer(
    restore: &PodRestore,
    checkpoint: &PodCheckpoint,
    ctx: &Context,
    node: &str,
    storage: pb::Storage,
    prefix: &str,
) -> Result<pb::Storage, String> {
    let (Some(source), Some(pb::storage::Backend::Local(local))) = (peer_node(checkpoint, node), &storage.backend)
    else {
        return Ok(storage);
    };
    let unreachable = |e: &dyn std::fmt::Display| {
        format!("the checkpoint is in node {source}'s local storage and its agent cannot lend it: {e}")
    };
    let (endpoint, server_name) = ctx.agents.peer_of(&source).await.map_err(|e| unreachable(&e))?;
    let mut client = ctx.agents.client(&source).await.map_err(|e| unreachable(&e))?;
    // As long as the restore may take, and a minute for the last object.
    let ttl = u32::try_from(remaining(restore).as_secs() + 60).unwrap_or(u32::MAX);
    let token = client
        .grant_read(pb::GrantReadRequest {
            local: Some(local.clone()),
            prefix: prefix.to_owned(),
            ttl_seconds: ttl.min(3600),
        })
        .await
        .map_err(|e| unreachable(&format!("{}: {}", e.code(), e.message())))?
        .into_inner()
        .token;
    tracing::info!(restore = %restore.name_any(), source = %source, "reading the checkpoint from its node's agent");
    Ok(pb::Storage {
        backend: Some(pb::storage::Backend::Peer(pb::PeerStorage {
            endpoint,
            server_name,
            token,
        })),
    })
}

fn remaining(restore: &PodRestore) -> Duration {
    let started = restore
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map_or(Timestamp::now().as_millisecond(), |t| t.0.as_millisecond());
    let deadline = started + i64::from(restore.spec.timeout_seconds) * 1000;
    Duration::from_millis((deadline - Timestamp::now().as_millisecond()).max(0) as u64)
}

async fn fetch(restore: &PodRestore, ctx: &Context) -> Result<Action, Error> {
    let ns = restore.namespace().unwrap_or_default();
    let status = restore.status.clone().unwrap_or_default();
    let node = status.node_name.clone().unwrap_or_default();
    let Some(checkpoint) = checkpoint_of(restore, ctx).await? else {
        return checkpoint_deleted(restore, ctx).await;
    };
    // The grant holds at each use, not only at the start: one withdrawn since ends it.
    if let Some(message) = refused_grant(restore, &checkpoint) {
        return fail(restore, ctx, reasons::NOT_PERMITTED, message).await;
    }
    let (storage, prefix) = match stored_at(&checkpoint, ctx).await? {
        Ok(found) => found,
        Err((_, message)) => return fail(restore, ctx, reasons::RESTORE_FAILED, message).await,
    };
    let storage = match read_from_peer(restore, &checkpoint, ctx, &node, storage, &prefix).await {
        Ok(storage) => storage,
        Err(message) => return fail(restore, ctx, reasons::RESTORE_FAILED, message).await,
    };
    let identities = match &checkpoint.spec.encryption {
        // Sealed by the operator, if it was, with a key in its own namespace; the
        // manifest says whether it is needed.
        None => crate::keys::sealing_key(ctx, &checkpoint.uid().unwrap_or_default())
            .await?
            .and_then(|data| data.get("identity").cloned())
            .map(|identity| vec![String::from_utf8_lossy(&identity.0).into_owned()])
            .unwrap_or_default(),
        Some(encryption) => {
            // The key belongs to the checkpoint, in its namespace.
            let data = secret_data(ctx, &checkpoint_namespace(restore), &encryption.secret_ref.name).await?;
            match data.as_ref().and_then(|d| d.get("identity")) {
                Some(identity) => vec![String::from_utf8_lossy(&identity.0).into_owned()],
                None => {
                    return fail(
                        restore,
                        ctx,
                        reasons::RESTORE_FAILED,
                        format!(
                            "the checkpoint is encrypted and Secret {} has no age private key under \"identity\"",
                            encryption.secret_ref.name
                        ),
                    )
                    .await;
                }
            }
        }
    };
    // The pod: its name is chosen before the restore is prepared, which is bound to
    // it (the runtime handler restores into no other pod), and recorded before the
    // pod is created, so it is created once.
    // By default the checkpointed pod's name when it is free.
    // The recorded name first: the restore may already be bound to it.
    let pod_name = match status
        .restored_pod_name
        .clone()
        .or_else(|| restore.spec.pod_name.clone())
    {
        Some(name) => name,
        None => {
            let original = checkpoint
                .status
                .as_ref()
                .and_then(|s| s.checkpointed_pod_template.as_ref())
                .and_then(|t| t.metadata.as_ref())
                .and_then(|m| m.name.clone())
                .unwrap_or_else(|| checkpoint.spec.source_pod_name.clone());
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            if pods.get_opt(&original).await.map_err(kube_err("read a pod"))?.is_none() {
                original
            } else {
                let uid = restore.uid().unwrap_or_default();
                format!("{original}-restored-{}", &uid[..uid.len().min(5)])
            }
        }
    };
    let mut status = status;
    if status.restored_pod_name.is_none() {
        // Recorded first: a restarted operator binds the restore to the same name.
        status.restored_pod_name = Some(pod_name.clone());
        write_status(restore, ctx, &status).await?;
    }
    let request = pb::PrepareRestoreRequest {
        operation_id: restore.uid().unwrap_or_default(),
        storage: Some(storage),
        prefix,
        manifest_digest: checkpoint
            .status
            .as_ref()
            .and_then(|s| s.manifest_digest.clone())
            .unwrap_or_default(),
        age_identities: identities,
        restored_pod: Some(pb::PodRef {
            namespace: ns.clone(),
            name: pod_name.clone(),
            uid: String::new(),
        }),
        start_stopped: restore.annotations().get(START_STOPPED_ANNOTATION).map(String::as_str) == Some("true"),
    };
    let mut client = ctx
        .agents
        .client(&node)
        .await
        .map_err(|source| Error::Agent { source })?;
    let followed = tokio::time::timeout(remaining(restore), async {
        let mut stream = client
            .prepare_restore(request)
            .await
            .map_err(|source| Error::Grpc {
                action: "prepare the restore on the agent",
                source,
            })?
            .into_inner();
        let mut last = None;
        let mut current = status.clone();
        let mut written: Option<std::time::Instant> = None;
        while let Some(op) = stream.message().await.map_err(|source| Error::Grpc {
            action: "follow the restore on the agent",
            source,
        })? {
            // The first answer at once, then byte counts at most once a second.
            if fetching(&mut current, &op) && written.is_none_or(|w| w.elapsed() >= Duration::from_secs(1)) {
                write_status(restore, ctx, &current).await?;
                written = Some(std::time::Instant::now());
            }
            last = Some(op);
        }
        Ok::<_, Error>((last, current))
    })
    .await;
    let (op, current) = match followed {
        Err(_) => {
            return fail(
                restore,
                ctx,
                reasons::TIMED_OUT,
                format!(
                    "the restore did not finish within spec.timeoutSeconds ({} s)",
                    restore.spec.timeout_seconds
                ),
            )
            .await;
        }
        Ok(followed) => followed?,
    };
    let Some(op) = op.filter(|op| op.state != pb::State::Running as i32) else {
        return Ok(Action::requeue(Duration::from_secs(2)));
    };
    if op.state != pb::State::Succeeded as i32 {
        return fail(restore, ctx, prepare_failure_reason(&op), op.error_message).await;
    }
    let fetch_millis = op.restore.as_ref().map(|r| (r.fetch_millis + r.unpack_millis) as i64);

    let mut next = current;
    next.phase = Some(RestorePhase::Restoring);
    next.stage = Some("Restoring".to_owned());
    next.restored_pod_name = Some(pod_name.clone());
    next.timings = Some(RestoreTimings {
        fetch_millis,
        ..Default::default()
    });
    write_status(restore, ctx, &next).await?;
    let mut restore = restore.clone();
    restore.status = Some(next);
    // The pod comes from the template in the manifest the agent verified, not from
    // status, which others than the operator may write.
    let verified = op
        .restore
        .as_ref()
        .map(|r| r.pod_template_json.as_str())
        .unwrap_or_default();
    if let Err(why) = create_pod(&restore, ctx, &checkpoint, &node, &pod_name, verified).await? {
        return fail(&restore, ctx, reasons::NOT_PERMITTED, why).await;
    }
    watch_pod(&restore, ctx).await
}

async fn create_pod(
    restore: &PodRestore,
    ctx: &Context,
    checkpoint: &PodCheckpoint,
    node: &str,
    pod_name: &str,
    verified_template: &str,
) -> Result<Result<(), String>, Error> {
    let ns = restore.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    if pods
        .get_opt(pod_name)
        .await
        .map_err(kube_err("read the restored pod"))?
        .is_some()
    {
        return Ok(Ok(()));
    }
    // On the template and grant as they are now, not as they were at the start.
    if let Some(why) = refused_grant(restore, checkpoint).or_else(|| refused_template(checkpoint)) {
        return Ok(Err(why));
    }
    let template = match verified_pod_template(verified_template) {
        Ok(template) => template,
        Err(why) => return Ok(Err(why)),
    };
    // Images are pinned in the template already (at checkpoint time, from the pod's
    // status as the kubelet reported it).
    let mut pod = restore_pod(&template, pod_name, node, &restore.uid().unwrap_or_default(), &[]);
    pod.metadata.namespace = Some(ns);
    let labels = pod.metadata.labels.get_or_insert_with(Default::default);
    labels.extend(tenant_entries(&restore.spec.labels));
    labels.insert(RESTORED_LABEL.to_owned(), "true".to_owned());
    // A migration keeps the pod out of its ReplicaSet until it is Ready.
    for key in parse_withheld(
        restore
            .annotations()
            .get(WITHHOLD_LABELS_ANNOTATION)
            .map(String::as_str),
    ) {
        labels.remove(&key);
    }
    let annotations = pod.metadata.annotations.get_or_insert_with(Default::default);
    // The operator's own keys stay as `restore_pod` set them (refused at start, and
    // left out here too).
    annotations.extend(tenant_entries(&restore.spec.annotations));
    annotations.insert(PODRESTORE_ANNOTATION.to_owned(), restore.name_any());
    // The pod as it will be created, with the tenant's annotations (a legacy AppArmor
    // one among them) checked too.
    if let Some(why) = pod
        .spec
        .as_ref()
        .and_then(|spec| crate::template::refused_spec_with(spec, pod.metadata.annotations.as_ref()))
    {
        return Ok(Err(format!("the restored pod cannot be created: {why}")));
    }
    pods.create(&PostParams::default(), &pod)
        .await
        .map_err(kube_err("create the restored pod"))?;
    Ok(Ok(()))
}

/// The pod template of a checkpoint's verified manifest, checked again: a manifest
/// without one restores no pod.
pub fn verified_pod_template(json: &str) -> Result<PodTemplateSpec, String> {
    if json.is_empty() {
        return Err(
            "the checkpoint's signed manifest holds no pod template: nothing to create the pod from".to_owned(),
        );
    }
    let template: PodTemplateSpec =
        serde_json::from_str(json).map_err(|e| format!("the signed manifest's pod template is unusable: {e}"))?;
    let annotations = template.metadata.as_ref().and_then(|m| m.annotations.as_ref());
    if let Some(why) = template
        .spec
        .as_ref()
        .and_then(|spec| crate::template::refused_spec_with(spec, annotations))
    {
        return Err(format!("the checkpointed pod cannot be restored: {why}"));
    }
    Ok(template)
}

/// On a PodRestore, set by the migration that creates it: its pod's processes are
/// restored stopped, and run only once the migration, having stopped the source for
/// good, continues them (so the pod never runs on two nodes at once).
pub const START_STOPPED_ANNOTATION: &str = "cryopod.io/start-stopped";
/// On such a PodRestore, set by its migration once it continued the pod.
pub const CONTINUED_ANNOTATION: &str = "cryopod.io/continued";
/// `status.stage` of a PodRestore whose pod is restored and held stopped.
pub const HELD_STAGE: &str = "HeldStopped";

/// Whether the restore's pod waits, stopped, for its migration to continue it.
pub fn waits_to_continue(restore: &PodRestore) -> bool {
    let annotations = restore.annotations();
    annotations.get(START_STOPPED_ANNOTATION).map(String::as_str) == Some("true")
        && !annotations.contains_key(CONTINUED_ANNOTATION)
}

/// Whether every container of the pod was created and runs (its processes may be
/// stopped: readiness does not count).
pub fn every_container_runs(pod: &Pod) -> bool {
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    let expected = pod.spec.as_ref().map_or(0, |s| s.containers.len());
    statuses.len() == expected
        && expected > 0
        && statuses
            .iter()
            .all(|s| s.state.as_ref().is_some_and(|st| st.running.is_some()))
}

/// A container of a held pod that the kubelet restarted (a probe failed on its
/// stopped processes): it started fresh, without the checkpoint's state.
pub fn restarted_while_held(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .find(|s| s.restart_count > 0)
        .map(|s| {
            format!(
                "container {} was restarted while it was held stopped (a liveness or startup probe?), so it \
                 lost the checkpoint's state",
                s.name
            )
        })
}

/// What the restored pod's state says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodProgress {
    /// Not there yet.
    Waiting,
    /// Every container Running and Ready.
    Ready,
    /// A container could not be restored; the message says why.
    Failed(String),
}

/// Reads the restored pod's container statuses.
pub fn pod_progress(pod: &Pod) -> PodProgress {
    let Some(status) = pod.status.as_ref() else {
        return PodProgress::Waiting;
    };
    // Rejected by the kubelet (node affinity, resources) or ended.
    if status.phase.as_deref() == Some("Failed") {
        let why: Vec<String> = [status.reason.clone(), status.message.clone()]
            .into_iter()
            .flatten()
            .filter(|s| !s.is_empty())
            .collect();
        return PodProgress::Failed(if why.is_empty() {
            "the restored pod failed (it was deleted, or its node ended it)".to_owned()
        } else {
            format!("the restored pod failed: {}", why.join(": "))
        });
    }
    let statuses = status.container_statuses.clone().unwrap_or_default();
    for s in &statuses {
        let waiting = s.state.as_ref().and_then(|st| st.waiting.as_ref());
        let refused = waiting.is_some_and(|w| {
            matches!(
                w.reason.as_deref(),
                Some("CreateContainerError" | "RunContainerError" | "StartError" | "CrashLoopBackOff")
            )
        });
        if refused {
            let message = waiting.and_then(|w| w.message.clone()).unwrap_or_default();
            return PodProgress::Failed(format!("container {} could not be restored: {message}", s.name));
        }
    }
    let ready = !statuses.is_empty()
        && statuses
            .iter()
            .all(|s| s.ready && s.state.as_ref().is_some_and(|st| st.running.is_some()));
    if ready {
        PodProgress::Ready
    } else {
        PodProgress::Waiting
    }
}

async fn watch_pod(restore: &PodRestore, ctx: &Context) -> Result<Action, Error> {
    let ns = restore.namespace().unwrap_or_default();
    let status = restore.status.clone().unwrap_or_default();
    let pod_name = status.restored_pod_name.clone().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(pod) = pods
        .get_opt(&pod_name)
        .await
        .map_err(kube_err("read the restored pod"))?
    else {
        // Held, it existed: deleted since (its migration found the source ran on, or
        // was late), it is never made again.
        if status.stage.as_deref() == Some(HELD_STAGE) {
            return fail(
                restore,
                ctx,
                reasons::RESTORE_FAILED,
                format!("the restored pod {pod_name} was deleted while it was held stopped"),
            )
            .await;
        }
        // Recorded but not created (an operator stopped in between): the agent is
        // asked again for the prepared restore (it answers the same request with
        // what it prepared, and its verified template), and the pod is created.
        return Box::pin(fetch(restore, ctx)).await;
    };
    // A pod of that name that this restore did not create is not its outcome.
    if pod.annotations().get(PODRESTORE_ANNOTATION) != Some(&restore.name_any()) {
        return fail(
            restore,
            ctx,
            reasons::RESTORE_FAILED,
            format!("pod {pod_name} exists and was not created by this PodRestore; choose another spec.podName"),
        )
        .await;
    }
    let mut progress = pod_progress(&pod);
    if waits_to_continue(restore)
        && let Some(why) = restarted_while_held(&pod)
    {
        progress = PodProgress::Failed(why);
    }
    // Restored stopped: held until its migration continues it (readiness cannot come
    // while its processes are stopped).
    if waits_to_continue(restore) && !matches!(progress, PodProgress::Failed(_)) && every_container_runs(&pod) {
        // A migration's target: its migration's deadline governs while it runs (its
        // source may be stopped for good already, and then only this pod can carry
        // on). A migration that ended, or is gone, leaves it to its own deadline: its
        // processes never ran, and none stays stopped for good.
        let governed = match restore.owner_references().iter().find(|o| o.kind == "PodMigration") {
            None => false,
            Some(owner) => {
                let migrations: Api<cryopod_crds::v1alpha1::PodMigration> =
                    Api::namespaced(ctx.client.clone(), &restore.namespace().unwrap_or_default());
                migrations
                    .get_opt(&owner.name)
                    .await
                    .map_err(kube_err("read the restore's PodMigration"))?
                    .filter(|m| m.metadata.uid.as_deref() == Some(owner.uid.as_str()))
                    .is_some_and(|m| {
                        !matches!(
                            m.status.and_then(|s| s.phase),
                            Some(
                                cryopod_crds::v1alpha1::MigrationPhase::Succeeded
                                    | cryopod_crds::v1alpha1::MigrationPhase::Failed
                                    | cryopod_crds::v1alpha1::MigrationPhase::RolledBack
                            )
                        )
                    })
            }
        };
        if !governed && remaining(restore).is_zero() {
            return fail(
                restore,
                ctx,
                reasons::TIMED_OUT,
                format!(
                    "the restored pod {pod_name} was not continued by its migration within spec.timeoutSeconds ({} s)",
                    restore.spec.timeout_seconds
                ),
            )
            .await;
        }
        if status.stage.as_deref() != Some(HELD_STAGE) {
            let mut held = status.clone();
            held.stage = Some(HELD_STAGE.to_owned());
            write_status(restore, ctx, &held).await?;
        }
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    match progress {
        PodProgress::Failed(message) => fail(restore, ctx, reasons::RESTORE_FAILED, message).await,
        PodProgress::Waiting if remaining(restore).is_zero() => {
            fail(
                restore,
                ctx,
                reasons::TIMED_OUT,
                format!(
                    "the restored pod {pod_name} was not Ready within spec.timeoutSeconds ({} s)",
                    restore.spec.timeout_seconds
                ),
            )
            .await
        }
        PodProgress::Waiting => Ok(Action::requeue(Duration::from_secs(1))),
        PodProgress::Ready => {
            // The checkpoint's postRestore hooks run before the restore is Ready (a
            // migration hands over only then); a failing one fails it.
            let ignored = match post_restore_hooks(restore, ctx, &pod).await? {
                Ok(ignored) => ignored,
                Err(why) => return fail(restore, ctx, reasons::RESTORE_FAILED, why).await,
            };
            let mut done = status.clone();
            let at = now();
            let total = status
                .start_time
                .as_ref()
                .map(|start| (at.0.as_millisecond() - start.0.as_millisecond()).max(0));
            let mut timings = status.timings.unwrap_or_default();
            timings.total_millis = total;
            // After the fetch: creating the pod and restoring it (creation timestamps
            // have whole seconds, too coarse for this).
            timings.restore_millis = total.map(|t| (t - timings.fetch_millis.unwrap_or(0)).max(0));
            done.timings = Some(timings);
            done.phase = Some(RestorePhase::Ready);
            done.ready_time = Some(MicroTime(Timestamp::now()));
            done.restored_pod_uid = pod.metadata.uid.clone();
            done.completion_time = Some(at.clone());
            let mut message = format!(
                "pod {pod_name} is Running and Ready on node {}",
                status.node_name.clone().unwrap_or_default()
            );
            if !ignored.is_empty() {
                message = format!("{message}; {}", ignored.join("; "));
            }
            if let Some(total) = total {
                ctx.metrics.duration("PodRestore", total as f64 / 1000.0);
            }
            finish(
                restore,
                ctx,
                done,
                Ending::Succeeded,
                reasons::RESTORE_COMPLETED,
                message,
            )
            .await?;
            Ok(Action::await_change())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use cryopod_crds::common::OperationProgress;

    use super::*;

    #[test]
    fn the_fetch_shows_its_bytes_in_the_status() {
        let mut status = PodRestoreStatus::default();
        let op = |done, total| pb::Operation {
            stage: pb::Stage::Fetching as i32,
            bytes_done: done,
            bytes_total: total,
            ..Default::default()
        };
        assert!(fetching(&mut status, &op(0, 0)));
        assert_eq!((status.stage.as_deref(), status.progress), (Some("Fetching"), None));
        assert!(fetching(&mut status, &op(10, 100)));
        assert!(!fetching(&mut status, &op(10, 100)), "nothing new");
        assert!(fetching(&mut status, &op(100, 100)));
        assert_eq!(
            status.progress,
            Some(OperationProgress {
                bytes_done: 100,
                bytes_total: 100
            })
        );
    }

    #[test]
    fn the_operators_keys_are_refused_naming_the_field() {
        let spec = |labels: serde_json::Value, annotations: serde_json::Value| {
            serde_json::from_value::<cryopod_crds::v1alpha1::PodRestoreSpec>(serde_json::json!({
                "checkpointName": "cp", "labels": labels, "annotations": annotations
            }))
            .unwrap()
        };
        assert_eq!(
            reserved_keys(&spec(
                serde_json::json!({"app": "db"}),
                serde_json::json!({"note": "x"})
            )),
            None
        );
        assert_eq!(
            reserved_keys(&spec(
                serde_json::json!({"cryopod.io/restored": "true"}),
                serde_json::json!({"cryopod.io/restore": "someone-elses", "team.cryopod.io/x": "y"})
            ))
            .unwrap(),
            "spec.labels[cryopod.io/restored], spec.annotations[cryopod.io/restore], \
             spec.annotations[team.cryopod.io/x]: keys under cryopod.io/ are reserved for the operator"
        );
    }

    fn restore(target: serde_json::Value) -> PodRestore {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore",
            "metadata": {"name": "r", "namespace": "ns"},
            "spec": {"checkpointName": "cp", "target": target}
        }))
        .unwrap()
    }

    fn checkpoint(location: &str) -> PodCheckpoint {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint",
            "metadata": {"name": "cp", "namespace": "ns"},
            "spec": {"sourcePodName": "p"},
            "status": {"phase": "Ready", "nodeName": "node-1",
                       "checkpointLocation": if location == "NodeLocal" {
                           serde_json::json!({"type": "NodeLocal", "nodeLocal": {"nodeName": "node-1", "path": "/x"}})
                       } else {
                           serde_json::json!({"type": "ObjectStore", "objectStore": {"storage": "s3", "prefix": "p/"}})
                       }}
        }))
        .unwrap()
    }

    fn nodes() -> Vec<(String, bool, BTreeMap<String, String>, bool)> {
        vec![
            (
                "node-1".into(),
                true,
                BTreeMap::from([("zone".into(), "a".into())]),
                true,
            ),
            (
                "node-2".into(),
                true,
                BTreeMap::from([("zone".into(), "b".into())]),
                true,
            ),
            ("node-3".into(), true, BTreeMap::new(), false),
            ("node-4".into(), false, BTreeMap::new(), true),
        ]
    }

    #[test]
    fn nodes_are_chosen_by_target_agent_readiness_and_location() {
        let s3 = checkpoint("ObjectStore");
        assert_eq!(
            choose_node(&restore(serde_json::json!({})), &s3, &nodes()).unwrap(),
            "node-2"
        );
        assert_eq!(
            choose_node(
                &restore(serde_json::json!({"nodeSelector": {"zone": "a"}})),
                &s3,
                &nodes()
            )
            .unwrap(),
            "node-1"
        );
        let err = choose_node(&restore(serde_json::json!({"nodeName": "node-3"})), &s3, &nodes()).unwrap_err();
        assert_eq!(
            err,
            "spec.target.nodeName node-3 is not a ready node with a cryopod agent whose taints the pod tolerates"
        );
        // node-3 is ready and its agent is away (restarting): worth a wait; node-4
        // is not ready, and an agent would not change that.
        assert_eq!(
            waiting_for_agent(&restore(serde_json::json!({"nodeName": "node-3"})), &s3, &nodes()).as_deref(),
            Some("waiting for the cryopod agent on node node-3 to serve")
        );
        assert_eq!(
            waiting_for_agent(&restore(serde_json::json!({"nodeName": "node-4"})), &s3, &nodes()),
            None
        );
        assert_eq!(waiting_for_agent(&restore(serde_json::json!({})), &s3, &nodes()), None);
        let local = checkpoint("NodeLocal");
        assert_eq!(
            choose_node(&restore(serde_json::json!({})), &local, &nodes()).unwrap(),
            "node-1"
        );
        // Elsewhere too: the target's agent reads it from node-1's.
        assert_eq!(
            choose_node(&restore(serde_json::json!({"nodeName": "node-2"})), &local, &nodes()).unwrap(),
            "node-2"
        );
    }

    #[test]
    fn restored_pods_lead_back_to_their_restore() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "annotations": {"cryopod.io/podrestore": "back"}}
        }))
        .unwrap();
        let found = restore_of_pod(&pod).unwrap();
        assert_eq!((found.name.as_str(), found.namespace.as_deref()), ("back", Some("ns")));
        assert!(restore_of_pod(&Pod::default()).is_none());
    }

    #[test]
    fn checkpoints_of_other_namespaces_need_their_grant() {
        let mut restore = restore(serde_json::json!({}));
        let mut cp = checkpoint("ObjectStore");
        assert_eq!(refused_grant(&restore, &cp), None, "same namespace");
        restore.metadata.namespace = Some("team-b".into());
        let refused = refused_grant(&restore, &cp).unwrap();
        assert!(
            refused.contains("PodCheckpoint ns/cp does not grant restores to namespace team-b"),
            "{refused}"
        );
        for (grant, granted) in [("team-a, team-b", true), ("*", true), ("team-a", false), ("", false)] {
            cp.metadata.annotations = Some([(RESTORE_NAMESPACES_ANNOTATION.to_owned(), grant.to_owned())].into());
            assert_eq!(refused_grant(&restore, &cp).is_none(), granted, "{grant:?}");
        }
    }

    #[test]
    fn the_restored_pods_state_is_read_from_its_containers() {
        let pod = |statuses: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({"status": {"containerStatuses": statuses}})).unwrap()
        };
        let running = serde_json::json!({"name": "a", "ready": true, "restartCount": 0, "image": "i", "imageID": "",
                                         "state": {"running": {}}});
        let starting = serde_json::json!({"name": "b", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
                                          "state": {"waiting": {"reason": "ContainerCreating"}}});
        let refused = serde_json::json!({"name": "b", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
                                         "state": {"waiting": {"reason": "RunContainerError", "message": "cryopod-runc: no"}}});
        assert_eq!(
            pod_progress(&pod(serde_json::json!([running.clone()]))),
            PodProgress::Ready
        );
        assert_eq!(
            pod_progress(&pod(serde_json::json!([running.clone(), starting]))),
            PodProgress::Waiting
        );
        assert_eq!(
            pod_progress(&pod(serde_json::json!([running, refused]))),
            PodProgress::Failed("container b could not be restored: cryopod-runc: no".into())
        );
        let rejected: Pod = serde_json::from_value(serde_json::json!({"status": {"phase": "Failed",
            "reason": "NodeAffinity", "message": "Pod Predicate NodeAffinity failed"}}))
        .unwrap();
        assert_eq!(
            pod_progress(&rejected),
            PodProgress::Failed("the restored pod failed: NodeAffinity: Pod Predicate NodeAffinity failed".into())
        );
        let failed = |failure: pb::Failure, code: tonic::Code| pb::Operation {
            failure: failure as i32,
            error_code: code as i32,
            ..pb::Operation::default()
        };
        for (failure, code, reason) in [
            (pb::Failure::Corrupt, tonic::Code::DataLoss, reasons::CHECKPOINT_CORRUPT),
            (
                pb::Failure::Incompatible,
                tonic::Code::FailedPrecondition,
                reasons::NO_COMPATIBLE_NODE,
            ),
            // A key that opens nothing is no fault of the node.
            (
                pb::Failure::Decrypt,
                tonic::Code::FailedPrecondition,
                reasons::RESTORE_FAILED,
            ),
            (pb::Failure::Storage, tonic::Code::Unavailable, reasons::RESTORE_FAILED),
            (
                pb::Failure::Unspecified,
                tonic::Code::DataLoss,
                reasons::CHECKPOINT_CORRUPT,
            ),
            (
                pb::Failure::Unspecified,
                tonic::Code::FailedPrecondition,
                reasons::NO_COMPATIBLE_NODE,
            ),
        ] {
            assert_eq!(prepare_failure_reason(&failed(failure, code)), reason, "{failure:?}");
        }
    }

    #[test]
    fn a_pod_restored_stopped_is_held_until_its_migration_continues_it() {
        let restore = |annotations: serde_json::Value| -> PodRestore {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore",
                "metadata": {"name": "r", "namespace": "ns", "annotations": annotations},
                "spec": {"checkpointName": "c"}
            }))
            .unwrap()
        };
        assert!(!waits_to_continue(&restore(serde_json::json!({}))));
        assert!(waits_to_continue(&restore(
            serde_json::json!({START_STOPPED_ANNOTATION: "true"})
        )));
        assert!(!waits_to_continue(&restore(
            serde_json::json!({START_STOPPED_ANNOTATION: "true", CONTINUED_ANNOTATION: "true"})
        )));
        // Its containers run (stopped, so not Ready): every one must have started.
        let pod = |states: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "spec": {"containers": [{"name": "a"}, {"name": "b"}]},
                "status": {"containerStatuses": states}
            }))
            .unwrap()
        };
        let running = serde_json::json!({"name": "a", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                                         "state": {"running": {}}});
        let waiting = serde_json::json!({"name": "b", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                                         "state": {"waiting": {"reason": "ContainerCreating"}}});
        let mut both = running.clone();
        both["name"] = "b".into();
        assert!(!every_container_runs(&pod(serde_json::json!([running.clone()]))));
        assert!(!every_container_runs(&pod(serde_json::json!([
            running.clone(),
            waiting
        ]))));
        assert!(every_container_runs(&pod(serde_json::json!([running, both]))));
    }

    #[test]
    fn the_pod_comes_only_from_a_verified_template_that_passes_again() {
        assert!(verified_pod_template("").unwrap_err().contains("holds no pod template"));
        assert!(verified_pod_template("{").unwrap_err().contains("unusable"));
        let privileged = serde_json::json!({"spec": {"hostPID": true, "containers": [{"name": "a", "image": "x"}]}});
        assert!(
            verified_pod_template(&privileged.to_string())
                .unwrap_err()
                .contains("cannot be restored")
        );
        let fine =
            serde_json::json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "image": "x"}]}});
        assert!(verified_pod_template(&fine.to_string()).is_ok());
    }
}
