//! The PodCheckpoint controller. Level-triggered: each reconcile reads the object and
//! the world, decides (pure functions below) and acts. The workflow lives in
//! `status.phase`:
//!
//! - none/`Pending`: resolve the pod (UID checked), the storage and its Secret, the
//!   encryption keys and the node's agent; any problem fails the checkpoint naming it.
//!   Then `Checkpointing`, with the operation id (the PodCheckpoint's UID) recorded
//!   before the agent is called.
//! - `Checkpointing`/`Uploading`: call the agent's `Checkpoint` with that id (which
//!   starts it, or re-attaches after an operator restart) and follow it to its end.
//! - `Ready`: retention (TTL, keep-last-N per pod, a schedule's apart from the rest).
//! - `Failed`: final.
//!
//! A finalizer deletes the stored objects when the PodCheckpoint is deleted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cryopod_agent_api::pb;
use cryopod_crds::common::{
    CONDITION_READY, CONDITION_SOURCE_FROZEN, ConditionStatus, OperationProgress, set_condition,
};
use cryopod_crds::v1alpha1::{
    CheckpointLocationType, CheckpointPhase, CheckpointSizes, CheckpointStorage, CheckpointTimings,
    CheckpointedContainer, HookFailurePolicy, HookSignal, HttpScheme, ManifestSummary, PodCheckpoint,
    PodCheckpointStatus, PodIpConnections, PostCheckpointState, StoredObject, checkpoint_reasons as reasons,
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};

use crate::context::{
    Context, Ending, Error, Operation, SourcePod, begin, fail_with, finish, kube_err, now, publish, source_pod,
    write_status,
};
use crate::starts::{InFlight, must_wait};
use crate::storage::{ResolvedStorage, StorageProblem, choose, credentials_secret, resolve};
use crate::template::checkpointed_pod_template;

/// The finalizer that deletes a checkpoint's stored objects.
pub const FINALIZER: &str = "cryopod.io/checkpoint-objects";

/// Set by a PodMigration on its PodCheckpoint: the agent keeps the source frozen
/// after storing, until the migration releases it (stopped or thawed).
pub const HOLD_ANNOTATION: &str = "cryopod.io/hold-for-migration";

/// Reconciles one PodCheckpoint.
pub async fn reconcile(cp: Arc<PodCheckpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.new_pass(cp.uid());
    let ns = cp.namespace().unwrap_or_default();
    let api: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, cp, |event| async {
        match event {
            FinalizerEvent::Apply(cp) => apply(&cp, &ctx).await,
            FinalizerEvent::Cleanup(cp) => cleanup(&cp, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer {
            detail: other.to_string(),
        },
    })
}

/// Retries a failed reconcile after a pause.
pub fn error_policy(cp: Arc<PodCheckpoint>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(podcheckpoint = %cp.name_any(), namespace = ?cp.namespace(), %error, "reconcile failed; retrying");
    Action::requeue(crate::context::retry_after(error))
}

async fn apply(cp: &PodCheckpoint, ctx: &Context) -> Result<Action, Error> {
    match cp.status.as_ref().and_then(|s| s.phase) {
        None | Some(CheckpointPhase::Pending) => start(cp, ctx).await,
        Some(CheckpointPhase::Checkpointing | CheckpointPhase::Uploading) => follow(cp, ctx).await,
        Some(CheckpointPhase::Ready) => retain(cp, ctx).await,
        Some(CheckpointPhase::Failed) => Ok(Action::await_change()),
    }
}

impl Operation for PodCheckpoint {
    type Status = PodCheckpointStatus;
    const KIND: &'static str = "PodCheckpoint";
    fn status(&self) -> Option<&PodCheckpointStatus> {
        self.status.as_ref()
    }
    fn conditions(
        status: &mut PodCheckpointStatus,
    ) -> &mut Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
        &mut status.conditions
    }
    fn set_failed(status: &mut PodCheckpointStatus, at: Time, generation: Option<i64>) {
        status.phase = Some(CheckpointPhase::Failed);
        status.completion_time = Some(at);
        status.observed_generation = generation;
    }
}

async fn event(ctx: &Context, cp: &PodCheckpoint, type_: EventType, reason: &str, note: String) {
    publish(ctx, cp, type_, reason, "Checkpoint", note).await;
}

/// Ends the checkpoint as Failed with `reason` and a message naming the cause.
async fn fail(cp: &PodCheckpoint, ctx: &Context, reason: &'static str, message: String) -> Result<Action, Error> {
    fail_with(cp, ctx, reason, message).await?;
    Ok(Action::await_change())
}

/// Leaves the checkpoint Pending, saying what it waits for, and looks again soon.
async fn pending(cp: &PodCheckpoint, ctx: &Context, why: String) -> Result<Action, Error> {
    let mut status = cp.status.clone().unwrap_or_default();
    status.phase = Some(CheckpointPhase::Pending);
    set_condition(
        &mut status.conditions,
        CONDITION_READY,
        ConditionStatus::False,
        reasons::PENDING,
        &why,
        cp.metadata.generation,
        now(),
    );
    write_status(cp, ctx, &status).await?;
    Ok(Action::requeue(Duration::from_secs(2)))
}

/// What a checkpoint needs, resolved from the API.
struct Resolved {
    pod: Option<Pod>,
    storage: ResolvedStorage,
    recipients: Vec<String>,
    /// The Secret whose key seals the checkpoint, when it is sealed.
    sealed_with: Option<String>,
}

/// A problem that ends the checkpoint: reason and message.
pub type Refusal = (&'static str, String);

pub async fn secret_data(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, k8s_openapi::ByteString>>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    Ok(secrets
        .get_opt(name)
        .await
        .map_err(kube_err("read a Secret"))?
        .map(|s| s.data.unwrap_or_default()))
}

/// Resolves the storage and keys for a pod on `node`.
async fn resolve_for(
    cp: &PodCheckpoint,
    ctx: &Context,
    node: &str,
    pod: Option<Pod>,
) -> Result<Result<Resolved, Refusal>, Error> {
    let ns = cp.namespace().unwrap_or_default();
    let storages: Api<CheckpointStorage> = Api::all(ctx.client.clone());
    let all = storages
        .list(&ListParams::default())
        .await
        .map_err(kube_err("list CheckpointStorages"))?
        .items;
    let chosen = match choose(cp.spec.storage.as_deref(), &all) {
        Ok(_) if staged_on_node(cp) => None,
        Ok(chosen) => chosen,
        Err(StorageProblem(message)) => return Ok(Err((reasons::STORAGE_NOT_FOUND, message))),
    };
    let secret = match chosen.and_then(credentials_secret) {
        Some((secret_ns, secret_name)) => match secret_data(ctx, &secret_ns, &secret_name).await? {
            Some(data) => Some((format!("{secret_ns}/{secret_name}"), data)),
            None => {
                return Ok(Err((
                    reasons::STORAGE_NOT_FOUND,
                    format!(
                        "Secret {secret_ns}/{secret_name}, the credentials of CheckpointStorage {}, does not exist",
                        chosen.map(ResourceExt::name_any).unwrap_or_default()
                    ),
                )));
            }
        },
        None => None,
    };
    let uid = cp.uid().unwrap_or_default();
    let storage = match resolve(
        chosen,
        secret.as_ref().map(|(name, data)| (name.as_str(), data)),
        node,
        (&ns, &cp.spec.source_pod_name, &uid),
    ) {
        Ok(storage) => storage,
        Err(StorageProblem(message)) => return Ok(Err((reasons::STORAGE_NOT_FOUND, message))),
    };
    // The key: the one spec.encryption names, or with encryption the default, one
    // made for this checkpoint alone and owned by it.
    let (name, field) = match &cp.spec.encryption {
        Some(encryption) => (encryption.secret_ref.name.clone(), "spec.encryption.secretRef"),
        None if crate::keys::sealed_by_operator(cp, ctx.encrypt_by_default) => (
            crate::keys::ensure_sealing_key(ctx, cp).await?,
            "the operator's sealing key",
        ),
        None => {
            return Ok(Ok(Resolved {
                pod,
                storage,
                recipients: vec![],
                sealed_with: None,
            }));
        }
    };
    let data = if cp.spec.encryption.is_some() {
        secret_data(ctx, &ns, &name).await?
    } else {
        crate::keys::sealing_key(ctx, &cp.uid().unwrap_or_default()).await?
    };
    let recipients = data
        .as_ref()
        .and_then(|d| d.get("recipients"))
        .map(|v| {
            String::from_utf8_lossy(&v.0)
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|r| r.iter().any(|l| !l.trim().is_empty() && !l.starts_with('#')));
    let Some(recipients) = recipients else {
        return Ok(Err((
            reasons::CHECKPOINT_FAILED,
            format!("{field}: Secret {name} has no age public keys under \"recipients\""),
        )));
    };
    Ok(Ok(Resolved {
        pod,
        storage,
        recipients,
        sealed_with: Some(name),
    }))
}

async fn start(cp: &PodCheckpoint, ctx: &Context) -> Result<Action, Error> {
    let ns = cp.namespace().unwrap_or_default();
    let spec = &cp.spec;
    let pod = match source_pod(ctx, &ns, &spec.source_pod_name, spec.source_pod_uid.as_deref()).await? {
        SourcePod::Found(pod) => *pod,
        SourcePod::Missing(message) => return fail(cp, ctx, reasons::SOURCE_POD_NOT_FOUND, message).await,
        SourcePod::Replaced(message) => return fail(cp, ctx, reasons::SOURCE_POD_REPLACED, message).await,
    };
    // Refused before anything is frozen: such a pod could never be restored.
    if let Some(why) = pod
        .spec
        .as_ref()
        .and_then(|spec| crate::template::refused_spec_with(spec, pod.metadata.annotations.as_ref()))
    {
        return fail(
            cp,
            ctx,
            reasons::UNSUPPORTED_POD,
            format!("the pod cannot be checkpointed: {why}"),
        )
        .await;
    }
    let live_uid = pod.metadata.uid.clone().unwrap_or_default();
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    let Some(node) = node.filter(|_| running) else {
        return pending(cp, ctx, format!("waiting for pod {} to run", spec.source_pod_name)).await;
    };
    let resolved = match resolve_for(cp, ctx, &node, Some(pod)).await? {
        Ok(resolved) => resolved,
        Err((reason, message)) => return fail(cp, ctx, reason, message).await,
    };
    if !ctx
        .agents
        .serves(&node)
        .await
        .map_err(|source| Error::Agent { source })?
    {
        // An agent may be starting or rolling out: wait for one, within the deadline.
        let age_ms = cp
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| Timestamp::now().as_millisecond() - t.0.as_millisecond());
        if age_ms < i64::from(spec.timeout_seconds) * 1000 {
            return pending(
                cp,
                ctx,
                format!("waiting for a ready cryopod node agent on node {node}"),
            )
            .await;
        }
        return fail(
            cp,
            ctx,
            reasons::NODE_AGENT_UNAVAILABLE,
            format!(
                "pod {} runs on node {node}, where no cryopod node agent runs (none was ready within \
                 spec.timeoutSeconds, {} s)",
                spec.source_pod_name, spec.timeout_seconds
            ),
        )
        .await;
    }
    // One operation per pod at a time, and a limit per node: decided on the watch's
    // view plus this operator's own starts the watch has not shown yet.
    let uid = cp.uid().unwrap_or_default();
    {
        let mut starts = ctx.starts.lock().await;
        let others = starts.in_flight(&ctx.checkpoints.state(), &uid);
        if let Some(why) = must_wait(&live_uid, &node, &others, ctx.max_per_node) {
            drop(starts);
            return pending(cp, ctx, why).await;
        }
        starts.claim(
            &uid,
            InFlight {
                name: format!("{ns}/{}", cp.name_any()),
                pod_uid: live_uid.clone(),
                node: node.clone(),
            },
        );
    }
    let mut status = cp.status.clone().unwrap_or_default();
    status.phase = Some(CheckpointPhase::Checkpointing);
    status.node_name = Some(node.clone());
    status.source_pod_uid = Some(live_uid);
    status.operation_id = cp.uid();
    status.start_time = Some(now());
    status.checkpoint_location = Some(resolved.storage.location.clone());
    status.observed_generation = cp.metadata.generation;
    let message = format!("checkpointing pod {} on node {node}", spec.source_pod_name);
    // A failed write keeps the claim: the write may have landed all the same. This
    // checkpoint's retry passes its own claim, others of the pod wait, and the claim
    // ends once the watch shows this one started, or gone.
    let status = begin(cp, ctx, status, reasons::CHECKPOINT_IN_PROGRESS, "Checkpoint", message).await?;
    let mut cp = cp.clone();
    cp.status = Some(status);
    run_on_agent(&cp, ctx, &node, resolved).await
}

async fn follow(cp: &PodCheckpoint, ctx: &Context) -> Result<Action, Error> {
    let status = cp.status.clone().unwrap_or_default();
    let Some(node) = status.node_name.clone() else {
        return fail(
            cp,
            ctx,
            reasons::CHECKPOINT_FAILED,
            "status.nodeName is lost".to_owned(),
        )
        .await;
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &cp.namespace().unwrap_or_default());
    let pod = pods
        .get_opt(&cp.spec.source_pod_name)
        .await
        .map_err(kube_err("read the source pod"))?;
    let resolved = match resolve_for(cp, ctx, &node, pod).await? {
        Ok(resolved) => resolved,
        Err((reason, message)) => return fail(cp, ctx, reason, message).await,
    };
    run_on_agent(cp, ctx, &node, resolved).await
}

/// The agent's request for this PodCheckpoint.
pub fn agent_request(
    cp: &PodCheckpoint,
    resolved_prefix: &str,
    storage: pb::Storage,
    recipients: Vec<String>,
    pod: Option<&Pod>,
) -> pb::CheckpointRequest {
    let spec = &cp.spec;
    let hooks = spec
        .hooks
        .as_ref()
        .map(|h| h.pre_checkpoint.iter().map(hook_to_pb).collect())
        .unwrap_or_default();
    pb::CheckpointRequest {
        operation_id: cp.uid().unwrap_or_default(),
        pod: Some(pb::PodRef {
            namespace: cp.namespace().unwrap_or_default(),
            name: spec.source_pod_name.clone(),
            uid: cp
                .status
                .as_ref()
                .and_then(|s| s.source_pod_uid.clone())
                .or_else(|| spec.source_pod_uid.clone())
                .unwrap_or_default(),
        }),
        storage: Some(storage),
        prefix: resolved_prefix.to_owned(),
        tcp_established: true,
        // A stopped pod stays frozen while it is stored, so its limit is the whole timeout.
        max_freeze_seconds: match spec.post_checkpoint_state {
            PostCheckpointState::Running => spec.max_freeze_seconds,
            PostCheckpointState::Stopped => spec.timeout_seconds,
        }
        .max(1) as u32,
        hooks,
        post_checkpoint_state: match spec.post_checkpoint_state {
            _ if held_for_migration(cp) => pb::PostCheckpointState::Held,
            PostCheckpointState::Running => pb::PostCheckpointState::Running,
            PostCheckpointState::Stopped => pb::PostCheckpointState::Stopped,
        } as i32,
        pod_ip_connections: match spec.tcp.pod_ip_connections {
            PodIpConnections::Close => pb::PodIpConnections::Close,
            PodIpConnections::Refuse => pb::PodIpConnections::Refuse,
        } as i32,
        age_recipients: recipients,
        pod_template_json: pod
            .map(|p| serde_json::to_vec(&checkpointed_pod_template(p)).unwrap_or_default())
            .unwrap_or_default(),
        // Staged for a Direct migration while the source is frozen: speed over size.
        zstd_level: if staged_on_node(cp) { 1 } else { 0 },
    }
}

pub fn hook_to_pb(hook: &cryopod_crds::v1alpha1::Hook) -> pb::Hook {
    let action = if let Some(exec) = &hook.exec {
        Some(pb::hook::Action::Exec(pb::ExecAction {
            command: exec.command.clone(),
        }))
    } else if let Some(http) = &hook.http_get {
        Some(pb::hook::Action::HttpGet(pb::HttpGetAction {
            port: http.port.max(0) as u32,
            path: http.path.clone(),
            https: http.scheme == HttpScheme::Https,
        }))
    } else {
        hook.signal.map(|s| {
            pb::hook::Action::Signal(
                match s.name {
                    HookSignal::Hup => "SIGHUP",
                    HookSignal::Usr1 => "SIGUSR1",
                    HookSignal::Usr2 => "SIGUSR2",
                    HookSignal::Winch => "SIGWINCH",
                }
                .to_owned(),
            )
        })
    };
    pb::Hook {
        container: hook.container.clone(),
        action,
        timeout_seconds: hook.timeout_seconds.max(1) as u32,
        ignore_failure: hook.failure_policy == HookFailurePolicy::Ignore,
    }
}

/// The reason a failed agent operation ends the PodCheckpoint with: from what the
/// agent says failed, or, from an agent that does not say, from its status code.
pub fn failure_reason(op: &pb::Operation) -> &'static str {
    use pb::Failure as F;
    match F::try_from(op.failure).unwrap_or(F::Unspecified) {
        F::PodNotFound => reasons::SOURCE_POD_NOT_FOUND,
        F::UnsupportedPod => reasons::UNSUPPORTED_POD,
        F::TimedOut => reasons::TIMED_OUT,
        F::Unspecified => match tonic::Code::from(op.error_code) {
            tonic::Code::NotFound => reasons::SOURCE_POD_NOT_FOUND,
            tonic::Code::DeadlineExceeded => reasons::TIMED_OUT,
            _ => reasons::CHECKPOINT_FAILED,
        },
        _ => reasons::CHECKPOINT_FAILED,
    }
}

/// A time from microseconds since the Unix epoch; none for 0 (an older agent).
pub fn micro_time(unix_micros: u64) -> Option<MicroTime> {
    let micros = i64::try_from(unix_micros).ok().filter(|m| *m > 0)?;
    k8s_openapi::jiff::Timestamp::from_microsecond(micros)
        .ok()
        .map(MicroTime)
}

/// The bytes an agent's operation has moved of its whole, once it knows the whole;
/// the total never below what is done.
pub fn progress_of(op: &pb::Operation) -> Option<OperationProgress> {
    (op.bytes_total > 0).then(|| OperationProgress {
        bytes_done: i64::try_from(op.bytes_done).unwrap_or(i64::MAX),
        bytes_total: i64::try_from(op.bytes_total.max(op.bytes_done)).unwrap_or(i64::MAX),
    })
}

/// What an update of the agent's operation changed in the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Followed {
    /// Nothing.
    Nothing,
    /// Only the byte counts.
    Bytes,
    /// The stage, the phase or the freeze.
    Step,
}

/// Takes an update of the agent's operation into the status: the stage, `Uploading`
/// once the pod is thawed or storing starts, `SourceFrozen` from the freeze's own
/// instant, and the bytes stored so far.
pub fn followed(status: &mut PodCheckpointStatus, op: &pb::Operation, generation: Option<i64>) -> Followed {
    let before = (status.stage.clone(), status.phase, status.conditions.clone());
    let stage = pb::Stage::try_from(op.stage).unwrap_or(pb::Stage::Unspecified);
    let name = match stage {
        pb::Stage::Discovering => Some("Discovering"),
        pb::Stage::Freezing => Some("Freezing"),
        pb::Stage::Dumping => Some("Dumping"),
        pb::Stage::Thawed => Some("Thawed"),
        pb::Stage::Storing => Some("Storing"),
        pb::Stage::Fetching | pb::Stage::Done | pb::Stage::Unspecified => None,
    };
    if let Some(name) = name {
        status.stage = Some(name.to_owned());
    }
    if matches!(stage, pb::Stage::Thawed | pb::Stage::Storing) {
        status.phase = Some(CheckpointPhase::Uploading);
    }
    let frozen = status.conditions.iter().any(|c| c.type_ == CONDITION_SOURCE_FROZEN);
    if !frozen && let Some(at) = micro_time(op.frozen_at_unix_micros) {
        status.frozen_time = Some(at.clone());
        set_condition(
            &mut status.conditions,
            CONDITION_SOURCE_FROZEN,
            ConditionStatus::True,
            "Frozen",
            "the pod is frozen for its checkpoint",
            generation,
            Time(at.0),
        );
    }
    if stage == pb::Stage::Thawed {
        set_condition(
            &mut status.conditions,
            CONDITION_SOURCE_FROZEN,
            ConditionStatus::False,
            "Thawed",
            "the pod runs again; its checkpoint is being stored",
            generation,
            now(),
        );
    }
    let bytes = progress_of(op);
    let moved = bytes.is_some() && bytes != status.progress;
    if bytes.is_some() {
        status.progress = bytes;
    }
    if before != (status.stage.clone(), status.phase, status.conditions.clone()) {
        Followed::Step
    } else if moved {
        Followed::Bytes
    } else {
        Followed::Nothing
    }
}

/// The `SourceFrozen` condition once a checkpoint is stored: a pod left running was
/// thawed, a stopped one was killed, and a held one stays frozen for its migration.
pub fn frozen_after(
    status: &mut PodCheckpointStatus,
    after: PostCheckpointState,
    held: bool,
    generation: Option<i64>,
    at: Time,
) {
    let (state, reason, message) = match after {
        _ if held => (
            ConditionStatus::True,
            "Held",
            "the pod stays frozen until its migration releases it",
        ),
        PostCheckpointState::Running => (ConditionStatus::False, "Thawed", "the pod runs on"),
        PostCheckpointState::Stopped => (
            ConditionStatus::False,
            "Stopped",
            "the pod was stopped after its checkpoint",
        ),
    };
    if status.conditions.iter().any(|c| c.type_ == CONDITION_SOURCE_FROZEN) {
        set_condition(
            &mut status.conditions,
            CONDITION_SOURCE_FROZEN,
            state,
            reason,
            message,
            generation,
            at,
        );
    }
}

/// The status of a checkpoint the agent finished.
pub fn succeeded_status(
    mut status: PodCheckpointStatus,
    result: &pb::CheckpointResult,
    pod: Option<&Pod>,
    sealed_with: Option<&str>,
    generation: Option<i64>,
    at: Time,
) -> PodCheckpointStatus {
    let total = status
        .start_time
        .as_ref()
        .map(|start| (at.0.as_millisecond() - start.0.as_millisecond()).max(0));
    status.phase = Some(CheckpointPhase::Ready);
    status.completion_time = Some(at.clone());
    status.observed_generation = generation;
    status.manifest_digest = Some(result.manifest_digest.clone());
    let bytes = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    let node = result.node.clone().unwrap_or_default();
    status.manifest = Some(ManifestSummary {
        objects: result
            .stored_objects
            .iter()
            .map(|o| StoredObject {
                key: o.key.clone(),
                size: bytes(o.size),
                raw_size: bytes(o.raw_size),
                sha256: o.sha256.clone(),
            })
            .collect(),
        kernel: node.kernel,
        criu_version: node.criu_version,
        cgroup_version: node.cgroup_version,
        cpu_flags: i32::try_from(node.cpu_flags.len()).unwrap_or(i32::MAX),
        encryption: result.encryption_scheme.clone(),
        recipients: result.encryption_recipients.clone(),
    });
    status.frozen_time = micro_time(result.frozen_at_unix_micros);
    status.timings = Some(CheckpointTimings {
        freeze_window_millis: Some(result.freeze_window_millis as i64),
        dump_millis: Some(result.dump_millis as i64),
        upload_millis: Some(result.upload_millis as i64),
        total_millis: total,
    });
    status.sizes = Some(CheckpointSizes {
        captured_bytes: Some(result.captured_bytes as i64),
        stored_bytes: Some(result.stored_bytes as i64),
        objects: Some(i64::from(result.objects)),
    });
    let images: BTreeMap<String, (String, Option<String>)> = pod
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.container_statuses.as_ref())
        .map(|statuses| {
            statuses
                .iter()
                .map(|s| {
                    (
                        s.name.clone(),
                        (s.image.clone(), Some(s.image_id.clone()).filter(|i| !i.is_empty())),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    status.checkpointed_containers = result
        .containers
        .iter()
        .map(|name| {
            let (image, image_id) = images.get(name).cloned().unwrap_or_default();
            CheckpointedContainer {
                name: name.clone(),
                image,
                image_id,
                archive: Some(format!("containers/{name}.tar.zst")),
            }
        })
        .collect();
    if status.checkpointed_pod_template.is_none() {
        status.checkpointed_pod_template = pod.map(checkpointed_pod_template);
    }
    let mut message = format!(
        "stored {} bytes in {} objects; the pod was frozen for {} ms",
        result.stored_bytes, result.objects, result.freeze_window_millis
    );
    if let Some(secret) = sealed_with {
        message.push_str(&format!("; sealed with the age key in Secret {secret}"));
    }
    if !result.warnings.is_empty() {
        message.push_str(&format!("; warnings: {}", result.warnings.join("; ")));
    }
    set_condition(
        &mut status.conditions,
        CONDITION_READY,
        ConditionStatus::True,
        reasons::CHECKPOINT_COMPLETED,
        &message,
        generation,
        at,
    );
    status
}

async fn run_on_agent(cp: &PodCheckpoint, ctx: &Context, node: &str, resolved: Resolved) -> Result<Action, Error> {
    let status = cp.status.clone().unwrap_or_default();
    let started = status.start_time.clone().unwrap_or_else(now);
    let deadline_ms = started.0.as_millisecond() + i64::from(cp.spec.timeout_seconds) * 1000;
    let remaining = Duration::from_millis((deadline_ms - Timestamp::now().as_millisecond()).max(0) as u64);
    let request = agent_request(
        cp,
        &resolved.storage.prefix,
        resolved.storage.storage.clone(),
        resolved.recipients,
        resolved.pod.as_ref(),
    );
    let operation_id = request.operation_id.clone();
    let mut client = ctx
        .agents
        .client(node)
        .await
        .map_err(|source| Error::Agent { source })?;
    let followed = tokio::time::timeout(remaining, async {
        let mut stream = client
            .checkpoint(request)
            .await
            .map_err(|source| Error::Grpc {
                action: "start the checkpoint on the agent",
                source,
            })?
            .into_inner();
        let mut current = status.clone();
        let mut written = std::time::Instant::now();
        let mut last = None;
        while let Some(op) = stream.message().await.map_err(|source| Error::Grpc {
            action: "follow the checkpoint on the agent",
            source,
        })? {
            // Steps are written at once, byte counts at most once a second.
            let change = followed(&mut current, &op, cp.metadata.generation);
            if change == Followed::Step || (change == Followed::Bytes && written.elapsed() >= Duration::from_secs(1)) {
                write_status(cp, ctx, &current).await?;
                written = std::time::Instant::now();
            }
            last = Some(op);
        }
        Ok::<_, Error>((last, current))
    })
    .await;
    let (op, current) = match followed {
        Err(_) => {
            // The deadline passed: the agent thaws the pod when its operation is cancelled.
            let _ = client
                .cancel(pb::CancelRequest {
                    operation_id: operation_id.clone(),
                })
                .await;
            return fail(
                cp,
                ctx,
                reasons::TIMED_OUT,
                format!(
                    "the checkpoint did not finish within spec.timeoutSeconds ({} s); the pod was thawed",
                    cp.spec.timeout_seconds
                ),
            )
            .await;
        }
        Ok(result) => result?,
    };
    // A stream that ends without a final state: the agent went away; re-attach later.
    let Some(op) = op.filter(|op| op.state != pb::State::Running as i32) else {
        return Ok(Action::requeue(Duration::from_secs(2)));
    };
    if op.state == pb::State::Succeeded as i32
        && let Some(result) = op.result.as_ref()
    {
        let mut current = current;
        current.phase = Some(CheckpointPhase::Uploading);
        let mut done = succeeded_status(
            current,
            result,
            resolved.pod.as_ref(),
            resolved.sealed_with.as_deref(),
            cp.metadata.generation,
            now(),
        );
        let held = cp.annotations().contains_key(HOLD_ANNOTATION);
        frozen_after(
            &mut done,
            cp.spec.post_checkpoint_state,
            held,
            cp.metadata.generation,
            now(),
        );
        let message = done
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_READY)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        if let Some(total) = done.timings.and_then(|t| t.total_millis) {
            ctx.metrics.duration("PodCheckpoint", total as f64 / 1000.0);
        }
        finish(cp, ctx, done, Ending::Succeeded, reasons::CHECKPOINT_COMPLETED, message).await?;
        return retain(cp, ctx).await;
    }
    let reason = failure_reason(&op);
    fail(cp, ctx, reason, op.error_message.clone()).await
}

/// What retention asks of a Ready checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Retention {
    /// Nothing to do, ever.
    Keep,
    /// Look again after this long.
    RecheckAfter(Duration),
    /// Delete it now (its TTL passed).
    Expired,
}

/// Decides TTL retention at `now_ms` (milliseconds since the epoch).
pub fn ttl_retention(ttl_seconds: Option<i64>, completed_ms: Option<i64>, now_ms: i64) -> Retention {
    match (ttl_seconds, completed_ms) {
        (Some(ttl), Some(done)) => {
            let expiry = done + ttl * 1000;
            if now_ms >= expiry {
                Retention::Expired
            } else {
                Retention::RecheckAfter(Duration::from_millis((expiry - now_ms) as u64))
            }
        }
        _ => Retention::Keep,
    }
}

/// Of the Ready checkpoints of one pod (name, completion in ms), the names beyond the
/// newest `keep`.
pub fn beyond_keep_last(mut checkpoints: Vec<(String, i64)>, keep: usize) -> Vec<String> {
    checkpoints.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    checkpoints.into_iter().skip(keep).map(|(name, _)| name).collect()
}

/// Which checkpoints count together for `keepLast` besides their pod: those a
/// CheckpointSchedule made, by the schedule's UID (its controlling owner), so a
/// schedule prunes only its own; `None` for the rest (a user's, a migration's).
pub fn retention_group(cp: &PodCheckpoint) -> Option<String> {
    cp.owner_references()
        .iter()
        .find(|o| o.kind == "CheckpointSchedule" && o.controller == Some(true))
        .map(|o| o.uid.clone())
}

async fn retain(cp: &PodCheckpoint, ctx: &Context) -> Result<Action, Error> {
    let Some(retention) = cp.spec.retention else {
        return Ok(Action::await_change());
    };
    let ns = cp.namespace().unwrap_or_default();
    let api: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &ns);
    let completed = |c: &PodCheckpoint| {
        c.status
            .as_ref()
            .and_then(|s| s.completion_time.as_ref())
            .map(|t| t.0.as_millisecond())
    };
    if let Some(keep) = retention.keep_last {
        let source = cp.status.as_ref().and_then(|s| s.source_pod_uid.clone());
        let group = retention_group(cp);
        let siblings: Vec<(String, i64)> = api
            .list(&ListParams::default())
            .await
            .map_err(kube_err("list PodCheckpoints"))?
            .items
            .iter()
            .filter(|c| c.spec.retention.is_some_and(|r| r.keep_last.is_some()))
            .filter(|c| c.status.as_ref().and_then(|s| s.phase) == Some(CheckpointPhase::Ready))
            .filter(|c| c.status.as_ref().and_then(|s| s.source_pod_uid.clone()) == source)
            .filter(|c| retention_group(c) == group)
            .filter_map(|c| Some((c.name_any(), completed(c)?)))
            .collect();
        for name in beyond_keep_last(siblings, keep.max(1) as usize) {
            tracing::info!(podcheckpoint = %name, keep, "deleting a checkpoint beyond keepLast");
            event(
                ctx,
                cp,
                EventType::Normal,
                reasons::EXPIRED,
                format!("deleting PodCheckpoint {name}: more than keepLast={keep} checkpoints of this pod"),
            )
            .await;
            let _ = api.delete(&name, &DeleteParams::default()).await;
        }
    }
    match ttl_retention(retention.ttl_seconds, completed(cp), Timestamp::now().as_millisecond()) {
        Retention::Keep => Ok(Action::await_change()),
        Retention::RecheckAfter(after) => Ok(Action::requeue(after)),
        Retention::Expired => {
            event(
                ctx,
                cp,
                EventType::Normal,
                reasons::EXPIRED,
                format!(
                    "retention.ttlSeconds ({} s) passed",
                    retention.ttl_seconds.unwrap_or_default()
                ),
            )
            .await;
            api.delete(&cp.name_any(), &DeleteParams::default())
                .await
                .map_err(kube_err("delete an expired PodCheckpoint"))?;
            Ok(Action::await_change())
        }
    }
}

/// A checkpoint's own keys, below any storage prefix or root: `<namespace>/<pod>/<uid>/`.
fn own_prefix(cp: &PodCheckpoint) -> String {
    crate::storage::checkpoint_prefix(
        None,
        &cp.namespace().unwrap_or_default(),
        &cp.spec.source_pod_name,
        &cp.uid().unwrap_or_default(),
    )
}

/// A checkpoint a migration made holds its pod frozen for the switch: it carries the
/// hold annotation and the migration controls it. The annotation alone (which only
/// the operator may set, by the chart's admission policies) is not enough.
pub fn held_for_migration(cp: &PodCheckpoint) -> bool {
    let holder = cp.annotations().get(HOLD_ANNOTATION);
    holder.is_some_and(|migration| {
        cp.owner_references()
            .iter()
            .any(|o| o.kind == "PodMigration" && o.controller == Some(true) && &o.name == migration)
    })
}

/// How a migration's checkpoint travels (`Direct` or `ViaStore`), set by the
/// migration controller on its PodCheckpoint.
pub const TRANSFER_ANNOTATION: &str = "cryopod.io/transfer";

/// A migration's checkpoint for a `Direct` transfer: staged in its node's local store
/// (the embedded one), whatever the default storage is, for the target's agent to read
/// from the source's. Only on a checkpoint held for a migration, which only the
/// operator makes.
pub fn staged_on_node(cp: &PodCheckpoint) -> bool {
    held_for_migration(cp) && cp.annotations().get(TRANSFER_ANNOTATION).map(String::as_str) == Some("Direct")
}

/// Why a recorded location is not this checkpoint's own, if it is not. The location is
/// status, which others than the operator may write: a restore must not read, nor the
/// finalizer delete, another checkpoint's objects. Its own keys end in
/// `<namespace>/<pod>/<checkpoint uid>/` (`storage::checkpoint_prefix`).
pub fn foreign_location(cp: &PodCheckpoint, location: &cryopod_crds::v1alpha1::CheckpointLocation) -> Option<String> {
    let own = own_prefix(cp);
    let (field, recorded) = match location.type_ {
        CheckpointLocationType::NodeLocal => (
            "nodeLocal.path",
            location
                .node_local
                .as_ref()
                .map(|l| format!("{}/", l.path.trim_end_matches('/'))),
        ),
        CheckpointLocationType::ObjectStore => (
            "objectStore.prefix",
            location.object_store.as_ref().map(|o| o.prefix.clone()),
        ),
    };
    // The storage the spec names, when it names one, is the only one the objects can be in.
    if let (Some(named), Some(at)) = (&cp.spec.storage, &location.object_store)
        && &at.storage != named
    {
        return Some(format!(
            "status.checkpointLocation.objectStore.storage {} is not spec.storage {named}: refused",
            at.storage
        ));
    }
    let recorded = recorded?;
    let climbs = recorded.split('/').any(|c| c == "..");
    let ours = recorded == own || recorded.ends_with(&format!("/{own}"));
    (climbs || !ours).then(|| {
        format!("status.checkpointLocation.{field} {recorded} is not this checkpoint's own (…/{own}): refused")
    })
}

/// Where a checkpoint's objects are, from its recorded location: what an agent is
/// sent to read or delete them, and their key prefix.
pub async fn stored_at(cp: &PodCheckpoint, ctx: &Context) -> Result<Result<(pb::Storage, String), Refusal>, Error> {
    let status = cp.status.clone().unwrap_or_default();
    let Some(location) = status.checkpoint_location else {
        return Ok(Err((
            reasons::CHECKPOINT_FAILED,
            "the checkpoint has no recorded location".to_owned(),
        )));
    };
    if let Some(why) = foreign_location(cp, &location) {
        return Ok(Err((reasons::CHECKPOINT_FAILED, why)));
    }
    match location.type_ {
        CheckpointLocationType::NodeLocal => {
            let path = location.node_local.map(|l| l.path).unwrap_or_default();
            // Under a root the cluster's admin chose (the embedded one, or a Local
            // CheckpointStorage's), as this checkpoint's own directory: never a path
            // that status alone names.
            let own = own_prefix(cp);
            let storages: Api<CheckpointStorage> = Api::all(ctx.client.clone());
            let listed = storages
                .list(&Default::default())
                .await
                .map_err(kube_err("list CheckpointStorages"))?
                .items;
            // A checkpoint whose spec names its storage is in that storage's root
            // alone; else in the embedded one or any Local storage's.
            let roots: Vec<String> = match &cp.spec.storage {
                Some(named) => listed
                    .into_iter()
                    .filter(|s| s.metadata.name.as_ref() == Some(named))
                    .filter_map(|s| s.spec.local.map(|l| l.path))
                    .collect(),
                None => std::iter::once(cryopod_crds::v1alpha1::EMBEDDED_LOCAL_PATH.to_owned())
                    .chain(listed.into_iter().filter_map(|s| s.spec.local.map(|l| l.path)))
                    .collect(),
            };
            let recorded = format!("{}/", path.trim_end_matches('/'));
            let Some(root) = roots
                .into_iter()
                .find(|root| format!("{}/{own}", root.trim_end_matches('/')) == recorded)
            else {
                return Ok(Err((
                    reasons::CHECKPOINT_FAILED,
                    format!(
                        "status.checkpointLocation.nodeLocal.path {path} is not this checkpoint's own directory under \
                         a local storage root: refused"
                    ),
                )));
            };
            Ok(Ok((
                pb::Storage {
                    backend: Some(pb::storage::Backend::Local(pb::LocalStorage { path: root })),
                },
                own,
            )))
        }
        CheckpointLocationType::ObjectStore => {
            let Some(at) = location.object_store else {
                return Ok(Err((
                    reasons::CHECKPOINT_FAILED,
                    "status.checkpointLocation.objectStore is missing".to_owned(),
                )));
            };
            let storages: Api<CheckpointStorage> = Api::all(ctx.client.clone());
            let Some(storage) = storages
                .get_opt(&at.storage)
                .await
                .map_err(kube_err("read a CheckpointStorage"))?
            else {
                return Ok(Err((
                    reasons::STORAGE_NOT_FOUND,
                    format!(
                        "CheckpointStorage {} holding the checkpoint does not exist any more",
                        at.storage
                    ),
                )));
            };
            let secret = match credentials_secret(&storage) {
                Some((ns, name)) => match secret_data(ctx, &ns, &name).await? {
                    Some(data) => Some((format!("{ns}/{name}"), data)),
                    None => {
                        return Ok(Err((
                            reasons::STORAGE_NOT_FOUND,
                            format!(
                                "Secret {ns}/{name}, the credentials of CheckpointStorage {}, does not exist",
                                at.storage
                            ),
                        )));
                    }
                },
                None => None,
            };
            let node = status.node_name.unwrap_or_default();
            match resolve(
                Some(&storage),
                secret.as_ref().map(|(n, d)| (n.as_str(), d)),
                &node,
                ("", "", ""),
            ) {
                Ok(resolved) => Ok(Ok((resolved.storage, at.prefix))),
                Err(StorageProblem(message)) => Ok(Err((reasons::STORAGE_NOT_FOUND, message))),
            }
        }
    }
}

/// The finalizer: delete the operator's sealing key (what it sealed can no longer be
/// opened, even if objects stay behind), cancel a running operation, delete the
/// stored objects.
async fn cleanup(cp: &PodCheckpoint, ctx: &Context) -> Result<Action, Error> {
    crate::keys::delete_sealing_key(ctx, cp).await?;
    let status = cp.status.clone().unwrap_or_default();
    let Some(node) = status.node_name.clone() else {
        return Ok(Action::await_change());
    };
    let mut client = match ctx.agents.client(&node).await {
        Ok(client) => client,
        Err(e) => {
            // The node or its agent is gone for good; do not hold the deletion hostage.
            event(
                ctx,
                cp,
                EventType::Warning,
                "ObjectsLeft",
                format!("{e}; the checkpoint's objects, if any, were not deleted"),
            )
            .await;
            return Ok(Action::await_change());
        }
    };
    if matches!(
        status.phase,
        Some(CheckpointPhase::Checkpointing | CheckpointPhase::Uploading)
    ) {
        let _ = client
            .cancel(pb::CancelRequest {
                operation_id: cp.uid().unwrap_or_default(),
            })
            .await;
    }
    if status.checkpoint_location.is_none() {
        return Ok(Action::await_change());
    }
    let (storage, prefix) = match stored_at(cp, ctx).await? {
        Ok(found) => found,
        Err((_, message)) => {
            event(
                ctx,
                cp,
                EventType::Warning,
                "ObjectsLeft",
                format!("{message}; objects not deleted"),
            )
            .await;
            return Ok(Action::await_change());
        }
    };
    let deleted = client
        .delete_checkpoint(pb::DeleteCheckpointRequest {
            storage: Some(storage),
            prefix: prefix.clone(),
        })
        .await
        .map_err(|source| Error::Grpc {
            action: "delete the checkpoint's objects",
            source,
        })?
        .into_inner()
        .deleted;
    event(
        ctx,
        cp,
        EventType::Normal,
        "Deleted",
        format!("deleted {deleted} stored objects under {prefix}"),
    )
    .await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn op(stage: pb::Stage, frozen_at: u64, done: u64, total: u64) -> pb::Operation {
        pb::Operation {
            stage: stage as i32,
            frozen_at_unix_micros: frozen_at,
            bytes_done: done,
            bytes_total: total,
            ..Default::default()
        }
    }

    fn frozen(status: &PodCheckpointStatus) -> Option<(String, String, String)> {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_SOURCE_FROZEN)
            .map(|c| (c.status.clone(), c.reason.clone(), c.last_transition_time.0.to_string()))
    }

    #[test]
    fn the_agents_steps_show_in_the_status_with_the_freeze_instant() {
        let mut status = PodCheckpointStatus::default();
        assert_eq!(
            followed(&mut status, &op(pb::Stage::Discovering, 0, 0, 0), Some(1)),
            Followed::Step
        );
        assert_eq!(status.stage.as_deref(), Some("Discovering"));
        assert_eq!(frozen(&status), None);
        // Frozen at 2026-12-04T00:00:00.25Z: the condition carries that instant.
        let at = 1_796_342_400_250_000;
        assert_eq!(
            followed(&mut status, &op(pb::Stage::Dumping, at, 0, 0), Some(1)),
            Followed::Step
        );
        assert_eq!(
            frozen(&status),
            Some(("True".into(), "Frozen".into(), "2026-12-04T00:00:00.25Z".into()))
        );
        assert!(status.frozen_time.is_some());
        // The same update again changes nothing.
        assert_eq!(
            followed(&mut status, &op(pb::Stage::Dumping, at, 0, 0), Some(1)),
            Followed::Nothing
        );
        // Thawed: Uploading, no longer frozen.
        assert_eq!(
            followed(&mut status, &op(pb::Stage::Thawed, at, 0, 0), Some(1)),
            Followed::Step
        );
        assert_eq!(status.phase, Some(CheckpointPhase::Uploading));
        assert_eq!(frozen(&status).unwrap().0, "False");
        // Bytes alone are progress, not a step; the total never falls below what is done.
        assert_eq!(
            followed(&mut status, &op(pb::Stage::Storing, at, 0, 0), Some(1)),
            Followed::Step
        );
        assert_eq!(
            followed(&mut status, &op(pb::Stage::Storing, at, 10, 100), Some(1)),
            Followed::Bytes
        );
        assert_eq!(
            followed(&mut status, &op(pb::Stage::Storing, at, 150, 100), Some(1)),
            Followed::Bytes
        );
        assert_eq!(
            status.progress,
            Some(OperationProgress {
                bytes_done: 150,
                bytes_total: 150
            })
        );
    }

    #[test]
    fn a_stored_checkpoint_says_whether_its_pod_is_still_frozen() {
        let at = Time(Timestamp::from_second(1_796_342_400).unwrap());
        let mut base = PodCheckpointStatus::default();
        followed(&mut base, &op(pb::Stage::Dumping, 1_796_342_400_000_000, 0, 0), Some(1));
        for (after, held, want) in [
            (PostCheckpointState::Running, false, ("False", "Thawed")),
            (PostCheckpointState::Stopped, false, ("False", "Stopped")),
            (PostCheckpointState::Stopped, true, ("True", "Held")),
        ] {
            let mut status = base.clone();
            frozen_after(&mut status, after, held, Some(1), at.clone());
            let (state, reason, _) = frozen(&status).unwrap();
            assert_eq!((state.as_str(), reason.as_str()), want, "{after:?} held {held}");
        }
        // Never frozen: no condition appears.
        let mut never = PodCheckpointStatus::default();
        frozen_after(&mut never, PostCheckpointState::Running, false, Some(1), now());
        assert_eq!(frozen(&never), None);
    }

    #[test]
    fn ttl_retention_keeps_waits_or_expires() {
        assert_eq!(ttl_retention(None, Some(0), 10), Retention::Keep);
        assert_eq!(ttl_retention(Some(60), None, 10), Retention::Keep);
        assert_eq!(
            ttl_retention(Some(60), Some(1_000), 31_000),
            Retention::RecheckAfter(Duration::from_secs(30))
        );
        assert_eq!(ttl_retention(Some(60), Some(1_000), 61_000), Retention::Expired);
    }

    #[test]
    fn a_location_pointing_at_another_checkpoint_is_refused() {
        let cp: PodCheckpoint = serde_json::from_value(serde_json::json!({
            "apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint",
            "metadata": {"name": "c", "namespace": "ns", "uid": "u1"},
            "spec": {"sourcePodName": "p"}
        }))
        .unwrap();
        let at = |prefix: &str| -> cryopod_crds::v1alpha1::CheckpointLocation {
            serde_json::from_value(serde_json::json!({"type": "ObjectStore",
                "objectStore": {"storage": "s3", "prefix": prefix}}))
            .unwrap()
        };
        assert_eq!(foreign_location(&cp, &at("ns/p/u1/")), None);
        assert_eq!(foreign_location(&cp, &at("base/ns/p/u1/")), None);
        for other in ["victim/db/u2/", "base/", "", "x/../ns/p/u1/", "evilns/p/u1/"] {
            assert!(foreign_location(&cp, &at(other)).is_some(), "{other}");
        }
        let local: cryopod_crds::v1alpha1::CheckpointLocation = serde_json::from_value(serde_json::json!({
            "type": "NodeLocal", "nodeLocal": {"nodeName": "n", "path": "/var/lib/cryopod/checkpoints/ns/p/u1"}
        }))
        .unwrap();
        assert_eq!(foreign_location(&cp, &local), None);
        // A checkpoint whose spec names its storage is read from that storage only.
        let mut named = cp.clone();
        named.spec.storage = Some("s3".into());
        assert_eq!(foreign_location(&named, &at("ns/p/u1/")), None);
        named.spec.storage = Some("tenant-s3".into());
        assert_eq!(
            foreign_location(&named, &at("ns/p/u1/")).unwrap(),
            "status.checkpointLocation.objectStore.storage s3 is not spec.storage tenant-s3: refused"
        );
    }

    #[test]
    fn only_a_checkpoint_its_migration_controls_holds_its_pod() {
        let cp = |meta: serde_json::Value| -> PodCheckpoint {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint",
                "metadata": meta, "spec": {"sourcePodName": "p"}
            }))
            .unwrap()
        };
        let owner = |kind: &str, name: &str| {
            serde_json::json!([{"apiVersion": "cryopod.io/v1alpha1", "kind": kind, "name": name,
                                "uid": "u", "controller": true}])
        };
        let hold = serde_json::json!({HOLD_ANNOTATION: "move"});
        assert!(held_for_migration(&cp(serde_json::json!({
            "name": "c", "annotations": hold, "ownerReferences": owner("PodMigration", "move")
        }))));
        for meta in [
            serde_json::json!({"name": "c", "annotations": hold}),
            serde_json::json!({"name": "c", "annotations": hold, "ownerReferences": owner("PodMigration", "other")}),
            serde_json::json!({"name": "c", "annotations": hold, "ownerReferences": owner("PodRestore", "move")}),
            serde_json::json!({"name": "c", "ownerReferences": owner("PodMigration", "move")}),
        ] {
            assert!(!held_for_migration(&cp(meta.clone())), "{meta}");
        }
    }

    #[test]
    fn a_schedules_checkpoints_count_apart_from_the_others() {
        let owned = |kind: &str, uid: &str, controller: bool| {
            let mut cp = checkpoint(serde_json::json!({"sourcePodName": "p"}));
            cp.metadata.owner_references =
                Some(vec![serde_json::from_value(serde_json::json!({
                "apiVersion": "cryopod.io/v1alpha1", "kind": kind, "name": "n", "uid": uid, "controller": controller
            })).unwrap()]);
            cp
        };
        let table = [
            (checkpoint(serde_json::json!({"sourcePodName": "p"})), None),
            (owned("CheckpointSchedule", "s-1", true), Some("s-1")),
            (owned("CheckpointSchedule", "s-2", true), Some("s-2")),
            // Named as an owner but not the controller: not the schedule's.
            (owned("CheckpointSchedule", "s-1", false), None),
            (owned("PodMigration", "m-1", true), None),
        ];
        for (i, (cp, group)) in table.into_iter().enumerate() {
            assert_eq!(retention_group(&cp).as_deref(), group, "case {i}");
        }
    }

    #[test]
    fn keep_last_removes_the_oldest() {
        let all = vec![("a".into(), 1), ("c".into(), 3), ("b".into(), 2), ("d".into(), 4)];
        assert_eq!(beyond_keep_last(all.clone(), 2), ["b", "a"]);
        assert!(beyond_keep_last(all, 9).is_empty());
    }

    #[test]
    fn agent_failures_map_to_reasons() {
        use pb::Failure as F;
        let failed = |failure: F, code: tonic::Code| pb::Operation {
            failure: failure as i32,
            error_code: code as i32,
            error_message: "the pod cannot be checkpointed (a message is never read)".into(),
            ..pb::Operation::default()
        };
        let table = [
            (F::PodNotFound, tonic::Code::NotFound, reasons::SOURCE_POD_NOT_FOUND),
            (
                F::UnsupportedPod,
                tonic::Code::FailedPrecondition,
                reasons::UNSUPPORTED_POD,
            ),
            (F::Hook, tonic::Code::FailedPrecondition, reasons::CHECKPOINT_FAILED),
            (F::Criu, tonic::Code::FailedPrecondition, reasons::CHECKPOINT_FAILED),
            (F::TimedOut, tonic::Code::DeadlineExceeded, reasons::TIMED_OUT),
            (F::Storage, tonic::Code::Unavailable, reasons::CHECKPOINT_FAILED),
            (F::ThawedEarly, tonic::Code::Aborted, reasons::CHECKPOINT_FAILED),
            // An agent that does not say: its status code.
            (F::Unspecified, tonic::Code::NotFound, reasons::SOURCE_POD_NOT_FOUND),
            (F::Unspecified, tonic::Code::DeadlineExceeded, reasons::TIMED_OUT),
            (
                F::Unspecified,
                tonic::Code::FailedPrecondition,
                reasons::CHECKPOINT_FAILED,
            ),
        ];
        for (failure, code, reason) in table {
            assert_eq!(failure_reason(&failed(failure, code)), reason, "{failure:?} {code:?}");
        }
    }

    fn checkpoint(spec: serde_json::Value) -> PodCheckpoint {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint",
            "metadata": {"name": "cp", "namespace": "ns", "uid": "u-1", "generation": 1},
            "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn the_agent_request_follows_the_spec() {
        let cp = checkpoint(serde_json::json!({
            "sourcePodName": "db-0", "sourcePodUID": "11111111-2222-3333-4444-555555555555",
            "postCheckpointState": "Stopped", "timeoutSeconds": 120, "maxFreezeSeconds": 5,
            "tcp": {"podIPConnections": "Refuse"},
            "hooks": {"preCheckpoint": [
                {"container": "db", "exec": {"command": ["flush"]}, "timeoutSeconds": 3},
                {"container": "db", "signal": {"name": "SIGUSR1"}, "failurePolicy": "Ignore"},
                {"container": "db", "httpGet": {"port": 8443, "path": "/q", "scheme": "HTTPS"}}
            ]}
        }));
        let req = agent_request(&cp, "p/", pb::Storage::default(), vec!["age1x".into()], None);
        assert_eq!(req.operation_id, "u-1");
        assert_eq!(req.pod.unwrap().uid, "11111111-2222-3333-4444-555555555555");
        assert_eq!(req.max_freeze_seconds, 120, "a stopped pod stays frozen while stored");
        assert_eq!(req.post_checkpoint_state, pb::PostCheckpointState::Stopped as i32);
        assert_eq!(req.pod_ip_connections, pb::PodIpConnections::Refuse as i32);
        assert_eq!(req.age_recipients, ["age1x"]);
        assert_eq!(req.hooks.len(), 3);
        assert_eq!(req.hooks[0].timeout_seconds, 3);
        assert!(req.hooks[1].ignore_failure);
        assert_eq!(req.hooks[1].action, Some(pb::hook::Action::Signal("SIGUSR1".into())));
        assert_eq!(
            req.hooks[2].action,
            Some(pb::hook::Action::HttpGet(pb::HttpGetAction {
                port: 8443,
                path: "/q".into(),
                https: true
            }))
        );
    }

    #[test]
    fn a_finished_operation_fills_the_status() {
        let start = Time(Timestamp::from_millisecond(1_000).unwrap());
        let status = PodCheckpointStatus {
            phase: Some(CheckpointPhase::Uploading),
            start_time: Some(start),
            ..Default::default()
        };
        let result = pb::CheckpointResult {
            manifest_digest: "sha256:ab".into(),
            freeze_window_millis: 420,
            dump_millis: 400,
            upload_millis: 700,
            stored_bytes: 1000,
            captured_bytes: 5000,
            objects: 4,
            containers: vec!["a".into(), "b".into()],
            warnings: vec!["hook 1 failed (ignored)".into()],
            pod_ip_connections: vec![],
            frozen_at_unix_micros: 1_234_567,
            stored_objects: vec![pb::StoredObject {
                key: "containers/a.tar.zst".into(),
                size: 600,
                raw_size: 3000,
                sha256: "aa".into(),
            }],
            node: Some(pb::NodeFacts {
                kernel: "6.12".into(),
                criu_version: "4.2".into(),
                cgroup_version: "V1".into(),
                cpu_flags: vec!["sse2".into(), "avx2".into()],
                ..Default::default()
            }),
            encryption_scheme: "age".into(),
            encryption_recipients: vec!["age1abc".into()],
        };
        let at = Time(Timestamp::from_millisecond(3_500).unwrap());
        let done = succeeded_status(status, &result, None, Some("cp-key"), Some(1), at);
        assert_eq!(done.phase, Some(CheckpointPhase::Ready));
        assert_eq!(
            done.frozen_time.as_ref().map(|t| t.0.as_microsecond()),
            Some(1_234_567),
            "the freeze instant to the microsecond"
        );
        assert_eq!(micro_time(0), None);
        // The manifest's facts, for people to read.
        let manifest = done.manifest.clone().unwrap();
        assert_eq!(
            (
                manifest.objects[0].raw_size,
                manifest.cpu_flags,
                manifest.encryption.as_str()
            ),
            (3000, 2, "age")
        );
        assert_eq!(manifest.recipients, ["age1abc"]);
        assert_eq!(done.timings.unwrap().total_millis, Some(2_500));
        assert_eq!(done.sizes.unwrap().stored_bytes, Some(1000));
        assert_eq!(
            done.checkpointed_containers[1].archive.as_deref(),
            Some("containers/b.tar.zst")
        );
        let ready = &done.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "CheckpointCompleted")
        );
        assert!(ready.message.contains("frozen for 420 ms") && ready.message.contains("hook 1 failed"));
        assert!(
            ready.message.contains("sealed with the age key in Secret cp-key"),
            "{}",
            ready.message
        );
    }
}
