//! The gRPC face of the agent: Checkpoint (streamed progress, idempotent by
//! operation id, so an operator that restarts re-attaches), GetOperation, Cancel
//! and NodeInfo. Errors map to gRPC codes by an exhaustive match.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::ObjectStore;
use tokio::sync::watch;
use tonic::{Code, Request, Response, Status};

use tracing::Instrument;

use crate::checkpoint::{
    AfterDump, CheckpointError, CheckpointOutcome, CheckpointRequest, HeldPod, NodeAgent, PodIpPolicy, Stage,
};
use crate::cri::ContainerRuntime;
use crate::discovery::DiscoveryError;
use crate::dump::DumpError;
use crate::freeze::{FreezeError, FreezeLimits};
use crate::hooks::{Hook, HookAction};
use crate::metrics::AgentMetrics;
use crate::package::{NodeFacts, PodRef, Seal};
use crate::restore::{PreparedRestore, RestoreError, RestoreRequest};
use crate::store::StoreError;

/// The agent API (`cryopod-agent-api`): messages, client and server.
pub use cryopod_agent_api::pb;

/// The names a client certificate (DER) carries: its subject's common names and its
/// DNS subject alternative names.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return vec![];
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push((*dns).to_owned());
            }
        }
    }
    names
}

/// An interceptor that lets through only a client whose certificate names `operator`:
/// every certificate of the cluster's CA chains, an agent's own among them, but only
/// the operator may drive an agent.
pub fn only_client(operator: String) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let named = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| certificate_names(c.as_ref())))
            .unwrap_or_default();
        if named.contains(&operator) {
            Ok(request)
        } else {
            Err(Status::permission_denied(format!(
                "the client certificate names {named:?}, not {operator}: only the operator may call the agent"
            )))
        }
    }
}

/// How long the kernel may take to stop a pod's tasks.
const SETTLE: Duration = Duration::from_secs(5);

/// What the service needs of the agent; a trait so the service is tested without a node.
pub trait AgentBackend: Send + Sync + 'static {
    /// Takes a checkpoint, reporting each stage.
    fn checkpoint(
        &self,
        req: CheckpointRequest,
        store: Arc<dyn ObjectStore>,
        progress: Box<dyn Fn(Stage) + Send + Sync>,
    ) -> impl Future<Output = Result<CheckpointOutcome, CheckpointError>> + Send;
    /// Prepares a restore on this node, reporting the bytes fetched of the whole.
    fn prepare_restore(
        &self,
        req: RestoreRequest,
        store: Arc<dyn ObjectStore>,
        progress: Box<dyn Fn(u64, u64) + Send + Sync>,
    ) -> impl Future<Output = Result<PreparedRestore, RestoreError>> + Send;
    /// Facts of this node.
    fn node_facts(&self) -> NodeFacts;
    /// How the freeze of `operation_id` ended, if this node recorded it (it survives
    /// a restart of the agent); an error when the record cannot be read.
    fn freeze_end(&self, operation_id: &str) -> Result<Option<crate::journal::FreezeEnd>, String> {
        let _ = operation_id;
        Ok(None)
    }
    /// Asks the freeze of `operation_id`, if one is under way here, to thaw now as its
    /// deadline would, recording `why`; `false` when none is.
    fn thaw_now(&self, operation_id: &str, why: &str) -> bool {
        let _ = (operation_id, why);
        false
    }
    /// Runs `hooks` in the running pod of UID `pod_uid`; the ignored failures, or why
    /// the hooks failed.
    fn run_hooks(&self, pod_uid: &str, hooks: Vec<Hook>) -> impl Future<Output = Result<Vec<String>, Status>> + Send {
        let _ = (pod_uid, hooks);
        async { Err(Status::unimplemented("this agent runs no hooks")) }
    }
    /// Lets the stopped processes of the restored pod of UID `pod_uid` run; how many
    /// were sent SIGCONT.
    fn continue_restored(&self, pod_uid: &str, restore_id: &str) -> impl Future<Output = Result<u32, Status>> + Send {
        let _ = (pod_uid, restore_id);
        async { Err(Status::unimplemented("this agent continues no pod")) }
    }
    /// Removes the pod data of prepared restore `restore_id`; `true` when there was some.
    fn discard_restore(&self, restore_id: &str) -> Result<bool, String> {
        let _ = restore_id;
        Ok(false)
    }
    /// Keeps how an operation ended, durably, for a re-attach after a restart.
    fn record_outcome(&self, op: &pb::Operation) -> Result<(), String> {
        let _ = op;
        Ok(())
    }
    /// How an operation ended, as recorded by [`AgentBackend::record_outcome`].
    fn outcome_of(&self, operation_id: &str) -> Result<Option<pb::Operation>, String> {
        let _ = operation_id;
        Ok(None)
    }
}

/// `err` with each cause its message does not already quote (`cannot write X: No
/// space left on device`): the caller sees why, not only what.
pub fn with_causes(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut cause = err.source();
    while let Some(source) = cause {
        let text = source.to_string();
        if !message.contains(&text) {
            message = format!("{message}: {text}");
        }
        cause = source.source();
    }
    message
}

/// What a checkpoint asked for again, when this agent no longer runs it, answers:
/// the outcome it recorded; or, when it was recorded as started and never ended (the
/// agent died mid-way; its recovery thawed what it had frozen), or its freeze ended
/// with no outcome, a failure saying so. `None`: it never started here, so it starts.
pub fn earlier_checkpoint(
    operation_id: &str,
    outcome: Option<pb::Operation>,
    end: Option<&crate::journal::FreezeEnd>,
) -> Option<pb::Operation> {
    let started = match outcome {
        Some(outcome) if outcome.state != pb::State::Running as i32 => return Some(outcome),
        Some(_) => true,
        None => false,
    };
    let why = match end {
        Some(crate::journal::FreezeEnd::ThawedWithoutRelease { why, .. }) => why.clone(),
        Some(crate::journal::FreezeEnd::Released { stopped: true, .. }) => "the pod was stopped".to_owned(),
        Some(crate::journal::FreezeEnd::Released { stopped: false, .. }) => "the pod was thawed".to_owned(),
        None if started => "it had frozen nothing yet".to_owned(),
        None => return None,
    };
    Some(pb::Operation {
        operation_id: operation_id.to_owned(),
        state: pb::State::Failed as i32,
        error_code: Code::Aborted as i32,
        failure: pb::Failure::Interrupted as i32,
        error_message: format!(
            "this checkpoint was interrupted: the agent restarted while it ran, and it ended without a result \
             ({why}); it is not run again under the same id"
        ),
        ..pb::Operation::default()
    })
}

/// The answer to a release whose hold ended with `end`; `now`: this call ended it.
pub fn release_response(end: &crate::journal::FreezeEnd, now: bool, window_millis: u64) -> pb::ReleaseResponse {
    use crate::journal::FreezeEnd;
    match end {
        FreezeEnd::Released {
            stopped,
            at_unix_millis,
        } => pb::ReleaseResponse {
            freeze_window_millis: window_millis,
            outcome: if now {
                pb::ReleaseOutcome::Released
            } else {
                pb::ReleaseOutcome::AlreadyReleased
            } as i32,
            stopped: *stopped,
            ended_unix_millis: *at_unix_millis,
            why: String::new(),
        },
        FreezeEnd::ThawedWithoutRelease { at_unix_millis, why } => pb::ReleaseResponse {
            freeze_window_millis: window_millis,
            outcome: pb::ReleaseOutcome::ThawedWithoutRelease as i32,
            stopped: false,
            ended_unix_millis: *at_unix_millis,
            why: why.clone(),
        },
    }
}

/// The longest reason an emergency thaw records.
const THAW_REASON_MAX: usize = 200;

/// How an emergency thaw asked for `reason` is recorded as a freeze's end: it names
/// the action, so a migration that ends `SourceResumed` says who thawed its source.
pub fn thaw_why(reason: &str) -> String {
    let reason: String = reason
        .chars()
        .filter(|c| !c.is_control())
        .take(THAW_REASON_MAX)
        .collect();
    let reason = reason.trim();
    if reason.is_empty() {
        "an emergency thaw (Thaw) ended its freeze".to_owned()
    } else {
        format!("an emergency thaw (Thaw) ended its freeze: {reason}")
    }
}

/// What a Thaw answers for operation `operation_id`, whose freeze ended as `end`;
/// `asked`: the end this call asked for, if it woke the freeze's watchdog (it ended
/// the freeze when that is the end recorded: a release may have come first).
pub fn thawed_freeze(operation_id: &str, asked: Option<&str>, end: &crate::journal::FreezeEnd) -> pb::ThawedFreeze {
    use crate::journal::FreezeEnd;
    let (thawed_now, how, at) = match end {
        FreezeEnd::ThawedWithoutRelease { at_unix_millis, why } => {
            (asked == Some(why.as_str()), why.clone(), *at_unix_millis)
        }
        FreezeEnd::Released {
            stopped,
            at_unix_millis,
        } => (
            false,
            if *stopped { "stopped" } else { "released" }.to_owned(),
            *at_unix_millis,
        ),
    };
    pb::ThawedFreeze {
        operation_id: operation_id.to_owned(),
        thawed_now,
        why: how,
        ended_unix_millis: at,
    }
}

/// How long a Thaw waits for the watchdogs it woke to thaw and record it.
const THAW_WAIT: Duration = Duration::from_secs(10);

impl<R: ContainerRuntime> NodeAgent<R> {
    /// The pod of UID `pod_uid` running on this node, as the runtime reports it.
    async fn running_pod(&self, pod_uid: &str) -> Result<crate::discovery::PodRuntime, Status> {
        crate::discovery::discover(&self.runtime, pod_uid)
            .await
            .map_err(|e| match e {
                DiscoveryError::PodNotRunning { .. } => Status::not_found(e.to_string()),
                _ => Status::unavailable(with_causes(&e)),
            })
    }
}

impl<R: ContainerRuntime + 'static> AgentBackend for NodeAgent<R> {
    async fn checkpoint(
        &self,
        req: CheckpointRequest,
        store: Arc<dyn ObjectStore>,
        progress: Box<dyn Fn(Stage) + Send + Sync>,
    ) -> Result<CheckpointOutcome, CheckpointError> {
        NodeAgent::checkpoint(self, &req, store, progress.as_ref()).await
    }

    async fn prepare_restore(
        &self,
        req: RestoreRequest,
        store: Arc<dyn ObjectStore>,
        progress: Box<dyn Fn(u64, u64) + Send + Sync>,
    ) -> Result<PreparedRestore, RestoreError> {
        let at = crate::restore::RestorePlace {
            node: &self.node,
            restores: &self.restores,
            key: &self.manifest_key,
        };
        crate::restore::prepare_restore_with(&store, &req, &at, progress.as_ref()).await
    }

    fn node_facts(&self) -> NodeFacts {
        self.node.clone()
    }

    fn freeze_end(&self, operation_id: &str) -> Result<Option<crate::journal::FreezeEnd>, String> {
        self.journal.end_of(operation_id).map_err(|e| e.to_string())
    }

    fn thaw_now(&self, operation_id: &str, why: &str) -> bool {
        self.journal.live().thaw_now(operation_id, why)
    }

    fn discard_restore(&self, restore_id: &str) -> Result<bool, String> {
        crate::sweep::discard(&self.restores, restore_id).map_err(|e| e.to_string())
    }

    async fn continue_restored(&self, pod_uid: &str, restore_id: &str) -> Result<u32, Status> {
        // Recorded first: once continued, a restarted container may start afresh.
        let dir = self.restores.join(restore_id);
        if dir.is_dir() {
            std::fs::write(dir.join(crate::handler::CONTINUED_FILE), b"")
                .map_err(|e| Status::internal(format!("cannot mark restore {restore_id} continued: {e}")))?;
        }
        let pod = self.running_pod(pod_uid).await?;
        let mut namespaces = std::collections::BTreeSet::new();
        let mut total = 0;
        for container in &pod.containers {
            let link = PathBuf::from(format!("/proc/{}/ns/pid", container.pid));
            let target = std::fs::read_link(&link)
                .map_err(|e| Status::unavailable(format!("container {}: {}: {e}", container.name, link.display())))?;
            if namespaces.insert(target) {
                let continued = crate::handler::continue_pid_namespace(&link)
                    .map_err(|e| Status::internal(format!("container {}: cannot continue: {e}", container.name)))?;
                tracing::info!(container = %container.name, continued, "restored processes continued");
                total += continued;
            }
        }
        Ok(u32::try_from(total).unwrap_or(u32::MAX))
    }

    async fn run_hooks(&self, pod_uid: &str, hooks: Vec<Hook>) -> Result<Vec<String>, Status> {
        let pod = self.running_pod(pod_uid).await?;
        crate::hooks::run_hooks(&hooks, &pod, &self.runtime)
            .await
            .map_err(|e| Status::failed_precondition(e.to_string()))
    }

    fn record_outcome(&self, op: &pb::Operation) -> Result<(), String> {
        use prost::Message;
        self.journal
            .record_outcome(&op.operation_id, &op.encode_to_vec())
            .map_err(|e| e.to_string())
    }

    fn outcome_of(&self, operation_id: &str) -> Result<Option<pb::Operation>, String> {
        use prost::Message;
        self.journal
            .outcome_of(operation_id)
            .map_err(|e| e.to_string())?
            .map(|bytes| pb::Operation::decode(bytes.as_slice()).map_err(|e| e.to_string()))
            .transpose()
    }
}

/// The gRPC code of each restore failure.
pub fn restore_code_of(err: &RestoreError) -> Code {
    match err {
        RestoreError::BadRestoreId { .. } => Code::InvalidArgument,
        RestoreError::AlreadyPrepared { .. } => Code::AlreadyExists,
        RestoreError::Fetch { source, .. } => match source {
            object_store::Error::NotFound { .. } => Code::NotFound,
            _ => Code::Unavailable,
        },
        // The checkpoint is not what it claims to be: never retry it as is.
        RestoreError::ManifestDigest { .. }
        | RestoreError::Signature { .. }
        | RestoreError::Size { .. }
        | RestoreError::Digest { .. } => Code::DataLoss,
        RestoreError::Manifest { .. } | RestoreError::Incompatible { .. } | RestoreError::Decrypt { .. } => {
            Code::FailedPrecondition
        }
        RestoreError::Local { .. } => Code::Internal,
    }
}

/// Turns the wire request into the agent's, naming the field of any error.
pub fn restore_request(
    req: pb::PrepareRestoreRequest,
    roots: &[PathBuf],
    peer_ca: Option<&[u8]>,
) -> Result<(RestoreRequest, Arc<dyn ObjectStore>), Status> {
    crate::journal::Journal::check_operation_id(&req.operation_id)
        .map_err(|e| Status::invalid_argument(format!("operation_id: {e}")))?;
    let storage = req
        .storage
        .ok_or_else(|| Status::invalid_argument("storage is required"))?;
    // Another node's local storage is read through its agent, for a restore only.
    let store: Arc<dyn ObjectStore> = match (&storage.backend, peer_ca) {
        (Some(pb::storage::Backend::Peer(peer)), Some(ca)) => Arc::new(crate::peer::peer_store(peer, ca)?),
        (Some(pb::storage::Backend::Peer(_)), None) => {
            return Err(Status::failed_precondition(
                "storage.peer: this agent has no CA to check another agent's certificate with",
            ));
        }
        _ => store_for(&storage, roots)?,
    };
    if req.prefix.is_empty() || !req.prefix.ends_with('/') {
        return Err(Status::invalid_argument("prefix: must be a key prefix ending in /"));
    }
    // The digest anchors everything unpacked as root: no digest, no restore.
    if req.manifest_digest.is_empty() {
        return Err(Status::invalid_argument(
            "manifest_digest: required (the digest of the checkpoint's manifest)",
        ));
    }
    // A prepared restore is bound to the one pod the operator will create for it.
    let restored_pod = req
        .restored_pod
        .as_ref()
        .map(|p| crate::handler::RestoredPod {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            start_stopped: req.start_stopped,
        })
        .filter(|p| !p.namespace.is_empty() && !p.name.is_empty())
        .ok_or_else(|| {
            Status::invalid_argument("restored_pod: the namespace and name of the restored pod are required")
        })?;
    let identities = if req.age_identities.is_empty() {
        vec![]
    } else {
        crate::restore::identities_from_lines(&req.age_identities.join("\n"))
            .map_err(|e| Status::invalid_argument(format!("age_identities: {e}")))?
    };
    Ok((
        RestoreRequest {
            restore_id: req.operation_id,
            prefix: req.prefix,
            manifest_digest: Some(req.manifest_digest),
            identities,
            restored_pod,
        },
        store,
    ))
}

/// The gRPC code of each failure: what the caller can do about it.
pub fn code_of(err: &CheckpointError) -> Code {
    match err {
        CheckpointError::Discovery { source } => match source {
            DiscoveryError::PodNotRunning { .. } => Code::NotFound,
            DiscoveryError::Unsupported { .. } | DiscoveryError::AmbiguousSandbox { .. } => Code::FailedPrecondition,
            DiscoveryError::Runtime { .. } => Code::Unavailable,
            DiscoveryError::RuntimeInfo { .. } => Code::Internal,
        },
        CheckpointError::BadOperationId { .. } => Code::InvalidArgument,
        CheckpointError::AlreadyRunning { .. } => Code::AlreadyExists,
        CheckpointError::FreezeExpired { .. } => Code::DeadlineExceeded,
        CheckpointError::ThawedEarly { .. } => Code::Aborted,
        CheckpointError::Freeze { source } => match source {
            FreezeError::NotSettled { .. } | FreezeError::Expired { .. } => Code::DeadlineExceeded,
            FreezeError::Journal { .. }
            | FreezeError::JournalClear { .. }
            | FreezeError::Freeze { .. }
            | FreezeError::Thaw { .. }
            | FreezeError::State { .. }
            | FreezeError::NotSelfFrozen { .. }
            | FreezeError::Watchdog { .. }
            | FreezeError::Kill { .. } => Code::Internal,
        },
        CheckpointError::Dump { source } => match source {
            // CRIU refused something the pod does: not retryable as is.
            DumpError::Criu { .. } => Code::FailedPrecondition,
            DumpError::Timeout { .. } => Code::DeadlineExceeded,
            DumpError::Prepare { .. } | DumpError::Spawn { .. } | DumpError::Wait { .. } => Code::Internal,
        },
        CheckpointError::Store { source } => match source {
            StoreError::Upload { .. } | StoreError::ReadBack { .. } | StoreError::PlaceLocal { .. } => {
                Code::Unavailable
            }
            StoreError::DigestMismatch { .. } => Code::DataLoss,
            StoreError::ReadLocal { .. } | StoreError::Manifest { .. } => Code::Internal,
            StoreError::Delete { .. } => Code::Unavailable,
        },
        CheckpointError::Hook { .. } | CheckpointError::Unsupported { .. } => Code::FailedPrecondition,
        CheckpointError::Capture { .. }
        | CheckpointError::Workspace { .. }
        | CheckpointError::Package { .. }
        | CheckpointError::Task { .. } => Code::Internal,
    }
}

/// What failed, as the caller acts on it, of each checkpoint failure.
pub fn failure_of(err: &CheckpointError) -> pb::Failure {
    use pb::Failure as F;
    match err {
        CheckpointError::Discovery { source } => match source {
            DiscoveryError::PodNotRunning { .. } => F::PodNotFound,
            DiscoveryError::Unsupported { .. } | DiscoveryError::AmbiguousSandbox { .. } => F::UnsupportedPod,
            DiscoveryError::Runtime { .. } | DiscoveryError::RuntimeInfo { .. } => F::Internal,
        },
        CheckpointError::Unsupported { .. } => F::UnsupportedPod,
        CheckpointError::FreezeExpired { .. } => F::TimedOut,
        CheckpointError::ThawedEarly { .. } => F::ThawedEarly,
        CheckpointError::Freeze { source } => match source {
            FreezeError::NotSettled { .. } | FreezeError::Expired { .. } => F::TimedOut,
            _ => F::Internal,
        },
        CheckpointError::Dump { source } => match source {
            DumpError::Criu { .. } => F::Criu,
            DumpError::Timeout { .. } => F::TimedOut,
            DumpError::Prepare { .. } | DumpError::Spawn { .. } | DumpError::Wait { .. } => F::Internal,
        },
        CheckpointError::Store { source } => match source {
            StoreError::DigestMismatch { .. } => F::Corrupt,
            StoreError::ReadLocal { .. } | StoreError::Manifest { .. } => F::Internal,
            StoreError::Upload { .. }
            | StoreError::ReadBack { .. }
            | StoreError::PlaceLocal { .. }
            | StoreError::Delete { .. } => F::Storage,
        },
        CheckpointError::Hook { .. } => F::Hook,
        CheckpointError::BadOperationId { .. }
        | CheckpointError::AlreadyRunning { .. }
        | CheckpointError::Capture { .. }
        | CheckpointError::Workspace { .. }
        | CheckpointError::Package { .. }
        | CheckpointError::Task { .. } => F::Internal,
    }
}

/// What failed, as the caller acts on it, of each restore failure.
pub fn restore_failure_of(err: &RestoreError) -> pb::Failure {
    use pb::Failure as F;
    match err {
        RestoreError::Fetch { .. } => F::Storage,
        RestoreError::ManifestDigest { .. }
        | RestoreError::Signature { .. }
        | RestoreError::Size { .. }
        | RestoreError::Digest { .. }
        | RestoreError::Manifest { .. } => F::Corrupt,
        RestoreError::Incompatible { .. } => F::Incompatible,
        RestoreError::Decrypt { .. } => F::Decrypt,
        RestoreError::BadRestoreId { .. } | RestoreError::AlreadyPrepared { .. } | RestoreError::Local { .. } => {
            F::Internal
        }
    }
}

/// What a step of a checkpoint changes in the operation its caller follows.
pub fn advance(op: &mut pb::Operation, stage: Stage) {
    match stage {
        Stage::Discovering => op.stage = pb::Stage::Discovering as i32,
        Stage::Freezing => op.stage = pb::Stage::Freezing as i32,
        Stage::Dumping => op.stage = pb::Stage::Dumping as i32,
        Stage::Thawed => op.stage = pb::Stage::Thawed as i32,
        Stage::Storing => op.stage = pb::Stage::Storing as i32,
        Stage::Frozen { at_unix_micros } => op.frozen_at_unix_micros = at_unix_micros,
        Stage::Stored { done, total } => {
            op.bytes_done = done;
            op.bytes_total = total;
        }
    }
}

/// The embedded store's directory (the CRD's default `local.path`): the local root
/// an agent allows when its admin names none.
pub const EMBEDDED_LOCAL_ROOT: &str = "/var/lib/cryopod/checkpoints";

/// Whether `path` is absolute, climbs nowhere, and is one of `roots` or under one.
pub fn under_a_root(path: &str, roots: &[PathBuf]) -> bool {
    use std::path::Component;
    let path = Path::new(path);
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
        && roots.iter().any(|root| path.starts_with(root))
}

/// Whether `prefix` is a plain relative key prefix ending in `/` (no empty, `.` or
/// `..` segment, no leading `/`): a local store joins it to its root as it is.
pub fn plain_prefix(prefix: &str) -> bool {
    prefix.strip_suffix('/').is_some_and(crate::peer::plain_key)
}

/// The store `storage` names. A local path must lie under one of `roots`, the
/// directories this node's admin gave the agent for checkpoints: the agent writes and
/// deletes there as root.
pub fn store_for(storage: &pb::Storage, roots: &[PathBuf]) -> Result<Arc<dyn ObjectStore>, Status> {
    match &storage.backend {
        Some(pb::storage::Backend::S3(s3)) => {
            let mut builder = object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(&s3.bucket)
                .with_region(if s3.region.is_empty() { "us-east-1" } else { &s3.region })
                .with_virtual_hosted_style_request(!s3.force_path_style);
            if !s3.endpoint.is_empty() {
                builder = builder
                    .with_endpoint(&s3.endpoint)
                    .with_allow_http(s3.endpoint.starts_with("http://"));
            }
            if !s3.access_key_id.is_empty() {
                builder = builder
                    .with_access_key_id(&s3.access_key_id)
                    .with_secret_access_key(&s3.secret_access_key);
            }
            let store = builder
                .build()
                .map_err(|e| Status::invalid_argument(format!("storage.s3: {e}")))?;
            Ok(Arc::new(store))
        }
        Some(pb::storage::Backend::Local(local)) => {
            if !under_a_root(&local.path, roots) {
                return Err(Status::invalid_argument(format!(
                    "storage.local.path {}: not under a local checkpoint root of this agent ({}): refused",
                    local.path,
                    roots
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            std::fs::create_dir_all(&local.path)
                .map_err(|e| Status::failed_precondition(format!("storage.local.path {}: {e}", local.path)))?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(&local.path)
                .map_err(|e| Status::invalid_argument(format!("storage.local.path: {e}")))?;
            Ok(Arc::new(store))
        }
        Some(pb::storage::Backend::Gcs(gcs)) => {
            let store = object_store::gcp::GoogleCloudStorageBuilder::new()
                .with_bucket_name(&gcs.bucket)
                .with_service_account_key(&gcs.service_account_key)
                .build()
                .map_err(|e| Status::invalid_argument(format!("storage.gcs: {e}")))?;
            Ok(Arc::new(store))
        }
        Some(pb::storage::Backend::Azure(azure)) => {
            let mut builder = object_store::azure::MicrosoftAzureBuilder::new()
                .with_account(&azure.account)
                .with_container_name(&azure.container)
                .with_access_key(&azure.access_key);
            if !azure.endpoint.is_empty() {
                builder = builder
                    .with_endpoint(azure.endpoint.clone())
                    .with_allow_http(azure.endpoint.starts_with("http://"));
            }
            let store = builder
                .build()
                .map_err(|e| Status::invalid_argument(format!("storage.azure: {e}")))?;
            Ok(Arc::new(store))
        }
        Some(pb::storage::Backend::Peer(_)) => Err(Status::invalid_argument(
            "storage.peer: another node's storage can only be read, by PrepareRestore",
        )),
        None => Err(Status::invalid_argument("storage: one backend is required")),
    }
}

/// The hooks of a request, each error naming the field.
pub fn hooks_of(hooks: &[pb::Hook]) -> Result<Vec<Hook>, Status> {
    use nix::sys::signal::Signal;
    hooks
        .iter()
        .enumerate()
        .map(|(i, hook)| {
            let field = |name: &str| format!("hooks[{i}].{name}");
            if hook.container.is_empty() {
                return Err(Status::invalid_argument(format!("{} is required", field("container"))));
            }
            let action = match &hook.action {
                Some(pb::hook::Action::Exec(exec)) if !exec.command.is_empty() => HookAction::Exec {
                    command: exec.command.clone(),
                },
                Some(pb::hook::Action::Exec(_)) => {
                    return Err(Status::invalid_argument(format!("{} is empty", field("exec.command"))));
                }
                Some(pb::hook::Action::HttpGet(http)) => HookAction::HttpGet {
                    port: u16::try_from(http.port).ok().filter(|p| *p > 0).ok_or_else(|| {
                        Status::invalid_argument(format!("{} must be 1-65535", field("httpGet.port")))
                    })?,
                    path: if http.path.is_empty() {
                        "/".to_owned()
                    } else {
                        http.path.clone()
                    },
                    https: http.https,
                },
                Some(pb::hook::Action::Signal(name)) => HookAction::Signal {
                    signal: match name.as_str() {
                        "SIGHUP" => Signal::SIGHUP,
                        "SIGUSR1" => Signal::SIGUSR1,
                        "SIGUSR2" => Signal::SIGUSR2,
                        "SIGWINCH" => Signal::SIGWINCH,
                        other => {
                            return Err(Status::invalid_argument(format!(
                                "{}: {other:?} is not one of SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH",
                                field("signal")
                            )));
                        }
                    },
                },
                None => {
                    return Err(Status::invalid_argument(format!(
                        "hooks[{i}] needs one of exec, httpGet and signal"
                    )));
                }
            };
            Ok(Hook {
                container: hook.container.clone(),
                action,
                timeout: Duration::from_secs(u64::from(hook.timeout_seconds.clamp(1, 300))),
                ignore_failure: hook.ignore_failure,
            })
        })
        .collect()
}

/// Turns the wire request into the agent's, naming the field of any error.
pub fn checkpoint_request(
    req: pb::CheckpointRequest,
    roots: &[PathBuf],
) -> Result<(CheckpointRequest, Arc<dyn ObjectStore>), Status> {
    let pod = req.pod.ok_or_else(|| Status::invalid_argument("pod is required"))?;
    if pod.uid.is_empty() {
        return Err(Status::invalid_argument("pod.uid is required"));
    }
    let storage = req
        .storage
        .ok_or_else(|| Status::invalid_argument("storage is required"))?;
    let store = store_for(&storage, roots)?;
    if !plain_prefix(&req.prefix) {
        return Err(Status::invalid_argument(format!(
            "prefix {:?}: must be a relative key prefix ending in / with no empty, . or .. segment",
            req.prefix
        )));
    }
    // store_for checked it lies under a root.
    let local_root = match &storage.backend {
        Some(pb::storage::Backend::Local(local)) => Some(PathBuf::from(&local.path)),
        _ => None,
    };
    let zstd_level = match req.zstd_level {
        0 => crate::package::DEFAULT_ZSTD_LEVEL,
        level @ 1..=19 => level,
        other => return Err(Status::invalid_argument(format!("zstd_level {other}: 0 or 1 to 19"))),
    };
    let seal = if req.age_recipients.is_empty() {
        Seal::Clear
    } else {
        Seal::age_from_lines(&req.age_recipients.join("\n"))
            .map_err(|e| Status::invalid_argument(format!("age_recipients: {e}")))?
    };
    let after = match pb::PostCheckpointState::try_from(req.post_checkpoint_state) {
        Ok(pb::PostCheckpointState::Running) => AfterDump::Running,
        Ok(pb::PostCheckpointState::Stopped) => AfterDump::Stopped,
        Ok(pb::PostCheckpointState::Held) => AfterDump::Held,
        Err(_) => return Err(Status::invalid_argument("post_checkpoint_state: unknown value")),
    };
    let pod_ip_connections = match pb::PodIpConnections::try_from(req.pod_ip_connections) {
        Ok(pb::PodIpConnections::Close) => PodIpPolicy::Close,
        Ok(pb::PodIpConnections::Refuse) => PodIpPolicy::Refuse,
        Err(_) => return Err(Status::invalid_argument("pod_ip_connections: unknown value")),
    };
    let pod_template = if req.pod_template_json.is_empty() {
        None
    } else {
        match serde_json::from_slice::<serde_json::Value>(&req.pod_template_json) {
            Ok(value @ serde_json::Value::Object(_)) => Some(value),
            Ok(_) => return Err(Status::invalid_argument("pod_template_json: not a JSON object")),
            Err(e) => return Err(Status::invalid_argument(format!("pod_template_json: {e}"))),
        }
    };
    let request = CheckpointRequest {
        operation_id: req.operation_id,
        pod: PodRef {
            namespace: pod.namespace,
            name: pod.name,
            uid: pod.uid,
        },
        prefix: req.prefix,
        tcp_established: req.tcp_established,
        limits: FreezeLimits {
            max_freeze: Duration::from_secs(u64::from(req.max_freeze_seconds.clamp(1, 3600))),
            settle: SETTLE,
        },
        hooks: hooks_of(&req.hooks)?,
        after,
        pod_ip_connections,
        seal,
        zstd_level,
        local_root,
        pod_template,
    };
    Ok((request, store))
}

struct Tracked {
    state: watch::Sender<pb::Operation>,
    task: Option<tokio::task::AbortHandle>,
    /// Claimed by whoever ends the operation: its task, or a Cancel. The loser
    /// neither records nor publishes an end (a cancel that came as the task finished
    /// must not journal "cancelled" over a success).
    ended: Arc<std::sync::atomic::AtomicBool>,
    /// The pod a checkpoint freezes ("" for a restore): what Thaw looks for.
    pod_uid: String,
}

impl Tracked {
    /// Ends a running operation as cancelled, `why`, if its task has not claimed its
    /// end first: aborts the task and publishes the end. Whether it did.
    fn cancel(&mut self, why: &str) -> bool {
        if terminal(&self.state.borrow()) || self.ended.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.state.send_modify(|op| {
            op.state = pb::State::Cancelled as i32;
            op.error_code = Code::Cancelled as i32;
            op.failure = pb::Failure::Cancelled as i32;
            op.error_message = why.to_owned();
        });
        true
    }
}

/// The service. Operations are kept in memory for the agent's lifetime so callers can
/// re-attach; the crash journal, not this table, is what survives a restart.
pub struct AgentService<C> {
    agent: Arc<C>,
    operations: Arc<Mutex<HashMap<String, Tracked>>>,
    metrics: Arc<AgentMetrics>,
    held: Arc<Mutex<HashMap<String, HeldPod>>>,
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// Held from the lookup of an operation id to its start: two calls with the same
    /// id never both find it unknown and both start it. An async lock: callers that
    /// wait for it park no worker thread.
    admit: Arc<tokio::sync::Mutex<()>>,
    /// The directories local checkpoint storage may use.
    local_roots: Arc<Vec<PathBuf>>,
    /// What other agents may read of the local storage (shared with the PeerTransfer
    /// service).
    grants: crate::peer::Grants,
    /// The cluster CA, to check another agent's certificate with when reading from it.
    peer_ca: Option<Arc<Vec<u8>>>,
}

/// The shutdown side of a service: once draining, it starts no new operation, while
/// operations under way finish and held pods wait for their release.
#[derive(Clone)]
pub struct Drain {
    operations: Arc<Mutex<HashMap<String, Tracked>>>,
    held: Arc<Mutex<HashMap<String, HeldPod>>>,
    draining: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Drain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain").finish_non_exhaustive()
    }
}

/// What a drain left to do when its time ran out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Held pods thawed without their release, by operation id.
    pub thawed: Vec<String>,
    /// Operations still running, by id (their pods thaw as the agent exits, or from
    /// the journal at the next start).
    pub running: Vec<String>,
}

impl Drain {
    fn busy(&self) -> (Vec<String>, Vec<String>) {
        let running = self
            .operations
            .lock()
            .map(|ops| {
                ops.iter()
                    .filter(|(_, t)| t.state.borrow().state == pb::State::Running as i32)
                    .map(|(id, _)| id.clone())
                    .collect()
            })
            .unwrap_or_default();
        let held = self
            .held
            .lock()
            .map(|held| {
                held.iter()
                    .filter(|(_, pod)| !pod.frozen.expired())
                    .map(|(id, _)| id.clone())
                    .collect()
            })
            .unwrap_or_default();
        (running, held)
    }

    /// Refuses new operations from now on, then waits up to `limit` for running ones
    /// to end and held pods to be released (or thawed by their deadline). Whatever is
    /// still held then is thawed here, so no pod outlives the agent frozen.
    pub async fn drain(&self, limit: Duration) -> Drained {
        self.draining.store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + limit;
        let mut every = tokio::time::interval(Duration::from_millis(100));
        let running = loop {
            let (running, held) = self.busy();
            if (running.is_empty() && held.is_empty()) || tokio::time::Instant::now() >= deadline {
                break running;
            }
            tracing::info!(running = ?running, held = ?held, "draining: waiting for operations and releases");
            every.tick().await;
        };
        let left: Vec<(String, HeldPod)> = self.held.lock().map(|mut h| h.drain().collect()).unwrap_or_default();
        let mut thawed = Vec::new();
        for (id, pod) in left {
            // Dropping a held pod thaws it and records that it ran on without a release.
            drop(pod);
            thawed.push(id);
        }
        Drained { thawed, running }
    }
}

impl<C> std::fmt::Debug for AgentService<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentService").finish_non_exhaustive()
    }
}

impl<C: AgentBackend> AgentService<C> {
    /// Serves `agent`, counting into `metrics`.
    pub fn new(agent: C, metrics: Arc<AgentMetrics>) -> Self {
        Self {
            agent: Arc::new(agent),
            operations: Arc::default(),
            metrics,
            held: Arc::default(),
            draining: Arc::default(),
            admit: Arc::default(),
            local_roots: Arc::new(vec![PathBuf::from(EMBEDDED_LOCAL_ROOT)]),
            grants: crate::peer::Grants::default(),
            peer_ca: None,
        }
    }

    /// Reads other agents' local storage with `ca_pem` as the CA their certificates
    /// must chain to.
    #[must_use]
    pub fn with_peer_ca(mut self, ca_pem: Vec<u8>) -> Self {
        self.peer_ca = Some(Arc::new(ca_pem));
        self
    }

    /// The service other agents read granted checkpoints through.
    pub fn peer_service(&self) -> crate::peer::PeerService {
        crate::peer::PeerService {
            grants: self.grants.clone(),
        }
    }

    /// Allows local checkpoint storage under `roots` only (by default, the embedded
    /// store's directory).
    #[must_use]
    pub fn with_local_roots(mut self, roots: Vec<PathBuf>) -> Self {
        self.local_roots = Arc::new(roots);
        self
    }

    /// The handle that drains this service at shutdown.
    pub fn drain_handle(&self) -> Drain {
        Drain {
            operations: self.operations.clone(),
            held: self.held.clone(),
            draining: self.draining.clone(),
        }
    }

    fn refuse_when_draining(&self) -> Result<(), Status> {
        if self.draining.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Status::unavailable(
                "the agent is shutting down: it starts no new operation",
            ));
        }
        Ok(())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Tracked>>, Status> {
        self.operations
            .lock()
            .map_err(|_| Status::internal("operation table poisoned"))
    }

    /// Runs `work` as operation `operation_id` in its own task, under `span`, and
    /// tracks it so callers can follow, re-attach and cancel. `work` publishes its
    /// progress and final state through the sender it is given.
    fn track<F>(
        &self,
        operation_id: String,
        pod_uid: String,
        span: tracing::Span,
        work: impl FnOnce(watch::Sender<pb::Operation>, Arc<std::sync::atomic::AtomicBool>) -> F,
    ) -> Result<watch::Receiver<pb::Operation>, Status>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let initial = pb::Operation {
            operation_id: operation_id.clone(),
            state: pb::State::Running as i32,
            stage: pb::Stage::Discovering as i32,
            ..Default::default()
        };
        let (tx, rx) = watch::channel(initial);
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let handle = tokio::spawn(work(tx.clone(), ended.clone()).instrument(span));
        self.lock()?.insert(
            operation_id,
            Tracked {
                state: tx,
                task: Some(handle.abort_handle()),
                ended,
                pod_uid,
            },
        );
        Ok(rx)
    }

    fn start(&self, req: pb::CheckpointRequest) -> Result<watch::Receiver<pb::Operation>, Status> {
        self.refuse_when_draining()?;
        let (request, store) = checkpoint_request(req, &self.local_roots)?;
        // Recorded before anything is done: asked again after a restart of this
        // agent, it is answered as interrupted, never run a second time.
        self.agent
            .record_outcome(&pb::Operation {
                operation_id: request.operation_id.clone(),
                state: pb::State::Running as i32,
                ..pb::Operation::default()
            })
            .map_err(|e| Status::unavailable(format!("cannot record the checkpoint's start: {e}")))?;
        let span = tracing::info_span!(
            "checkpoint",
            operation_id = %request.operation_id,
            pod = %format!("{}/{}", request.pod.namespace, request.pod.name),
            pod_uid = %request.pod.uid,
        );
        let (agent, metrics, held) = (self.agent.clone(), self.metrics.clone(), self.held.clone());
        let operation_id = request.operation_id.clone();
        self.track(request.operation_id.clone(), request.pod.uid.clone(), span, move |tx, ended| async move {
            tracing::info!("checkpoint started");
            let progress_tx = tx.clone();
            let progress: Box<dyn Fn(Stage) + Send + Sync> =
                Box::new(move |stage| progress_tx.send_modify(|op| advance(op, stage)));
            let mut result = agent.checkpoint(request, store, progress).await;
            let held_pod = result.as_mut().ok().and_then(|o| o.held.take());
            // A Cancel that came as it ended won: the pod is thawed (dropped), and the
            // cancellation is what was recorded and told.
            if ended.swap(true, std::sync::atomic::Ordering::SeqCst) {
                drop(held_pod);
                tracing::info!("checkpoint cancelled as it ended; the pod is thawed");
                return;
            }
            if let Some(pod) = held_pod
                && let Ok(mut table) = held.lock()
            {
                table.insert(operation_id, pod);
            }
            match &result {
                Ok(outcome) => {
                    metrics.checkpoint_stored(outcome);
                    metrics.finished("checkpoint", "succeeded");
                    tracing::info!(
                        freeze_window_ms = outcome.manifest.freeze_window_millis,
                        stored_bytes = outcome.stored_bytes(),
                        "checkpoint succeeded"
                    );
                }
                Err(err) => {
                    metrics.finished("checkpoint", "failed");
                    tracing::warn!(error = %err, cause = ?std::error::Error::source(err).map(ToString::to_string), "checkpoint failed");
                }
            }
            let mut finished = tx.borrow().clone();
            let op = &mut finished;
            match result {
                Ok(outcome) => {
                    op.state = pb::State::Succeeded as i32;
                    op.stage = pb::Stage::Done as i32;
                    op.result = Some(pb::CheckpointResult {
                        manifest_digest: outcome.manifest_digest,
                        freeze_window_millis: outcome.freeze.window.as_millis() as u64,
                        frozen_at_unix_micros: outcome
                            .freeze
                            .began
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_micros() as u64),
                        dump_millis: outcome.dump.as_millis() as u64,
                        upload_millis: outcome.upload.as_millis() as u64,
                        stored_bytes: outcome.manifest.objects.iter().map(|o| o.size).sum(),
                        captured_bytes: outcome.manifest.objects.iter().map(|o| o.raw_size).sum(),
                        objects: outcome.manifest.objects.len() as u32 + 1,
                        containers: outcome.manifest.containers.iter().map(|c| c.name.clone()).collect(),
                        warnings: outcome.manifest.warnings.clone(),
                        pod_ip_connections: outcome.manifest.pod_ip_connections.clone(),
                        stored_objects: outcome
                            .manifest
                            .objects
                            .iter()
                            .map(|o| pb::StoredObject {
                                key: o.key.clone(),
                                size: o.size,
                                raw_size: o.raw_size,
                                sha256: o.sha256.clone(),
                            })
                            .collect(),
                        node: Some(pb::NodeFacts {
                            name: outcome.manifest.node.name.clone(),
                            kernel: outcome.manifest.node.kernel.clone(),
                            criu_version: outcome.manifest.node.criu_version.clone(),
                            cgroup_version: outcome.manifest.node.cgroup_version.clone(),
                            cpu_flags: outcome.manifest.node.cpu_flags.clone(),
                        }),
                        encryption_scheme: outcome
                            .manifest
                            .encryption
                            .as_ref()
                            .map(|e| e.scheme.clone())
                            .unwrap_or_default(),
                        encryption_recipients: outcome
                            .manifest
                            .encryption
                            .as_ref()
                            .map(|e| e.recipients.clone())
                            .unwrap_or_default(),
                    });
                }
                Err(err) => {
                    op.state = pb::State::Failed as i32;
                    op.error_code = code_of(&err) as i32;
                    op.failure = failure_of(&err) as i32;
                    op.error_message = with_causes(&err);
                }
            }
            // Kept before it is told: a caller that saw the end and re-attaches after
            // a restart of this agent gets the same end.
            if let Err(e) = agent.record_outcome(&finished) {
                tracing::warn!(error = %e, "cannot record how the checkpoint ended");
            }
            tx.send_replace(finished);
        })
    }

    fn start_restore(&self, req: pb::PrepareRestoreRequest) -> Result<watch::Receiver<pb::Operation>, Status> {
        self.refuse_when_draining()?;
        let (request, store) = restore_request(req, &self.local_roots, self.peer_ca.as_deref().map(Vec::as_slice))?;
        let span = tracing::info_span!("restore", operation_id = %request.restore_id, prefix = %request.prefix);
        let (agent, metrics) = (self.agent.clone(), self.metrics.clone());
        let restore_id = request.restore_id.clone();
        self.track(request.restore_id.clone(), String::new(), span, move |tx, ended| async move {
            tracing::info!("restore preparation started");
            tx.send_modify(|op| op.stage = pb::Stage::Fetching as i32);
            let progress_tx = tx.clone();
            let progress: Box<dyn Fn(u64, u64) + Send + Sync> = Box::new(move |done, total| {
                progress_tx.send_modify(|op| {
                    op.bytes_done = done;
                    op.bytes_total = total.max(done);
                })
            });
            let result = agent.prepare_restore(request, store, progress).await;
            // Discarded or cancelled as it ended: what it just prepared goes too.
            if ended.swap(true, std::sync::atomic::Ordering::SeqCst) {
                if result.is_ok()
                    && let Err(e) = agent.discard_restore(&restore_id)
                {
                    tracing::warn!(error = %e, "cannot discard a restore cancelled as it was prepared");
                }
                return;
            }
            match &result {
                Ok(prepared) => {
                    metrics.restore_prepared(prepared);
                    metrics.finished("restore", "succeeded");
                    tracing::info!(fetched_bytes = prepared.fetched_bytes, dir = %prepared.dir.display(), "restore prepared");
                }
                Err(err) => {
                    metrics.finished("restore", "failed");
                    tracing::warn!(error = %err, "restore preparation failed");
                }
            }
            tx.send_modify(|op| match result {
                Ok(prepared) => {
                    op.state = pb::State::Succeeded as i32;
                    op.stage = pb::Stage::Done as i32;
                    op.restore = Some(pb::RestoreResult {
                        directory: prepared.dir.display().to_string(),
                        fetched_bytes: prepared.fetched_bytes,
                        fetch_millis: prepared.fetch.as_millis() as u64,
                        unpack_millis: prepared.unpack.as_millis() as u64,
                        containers: prepared.manifest.containers.iter().map(|c| c.name.clone()).collect(),
                        pod_template_json: prepared
                            .manifest
                            .checkpointed_pod_template
                            .as_ref()
                            .and_then(|t| serde_json::to_string(t).ok())
                            .unwrap_or_default(),
                    });
                }
                Err(err) => {
                    op.state = pb::State::Failed as i32;
                    op.error_code = restore_code_of(&err) as i32;
                    op.failure = restore_failure_of(&err) as i32;
                    op.error_message = with_causes(&err);
                }
            });
        })
    }
}

fn terminal(op: &pb::Operation) -> bool {
    op.state != pb::State::Running as i32
}

type OperationStream = Pin<Box<dyn futures::Stream<Item = Result<pb::Operation, Status>> + Send>>;

/// Streams every change of the operation, ending after its final state.
fn follow(rx: watch::Receiver<pb::Operation>) -> OperationStream {
    Box::pin(futures::stream::unfold(Some((rx, true)), |state| async move {
        let (mut rx, first) = state?;
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let op = rx.borrow_and_update().clone();
        let next = if terminal(&op) { None } else { Some((rx, false)) };
        Some((Ok(op), next))
    }))
}

#[tonic::async_trait]
impl<C: AgentBackend> pb::node_agent_server::NodeAgent for AgentService<C> {
    type CheckpointStream = OperationStream;

    async fn checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<Self::CheckpointStream>, Status> {
        let req = request.into_inner();
        crate::journal::Journal::check_operation_id(&req.operation_id)
            .map_err(|e| Status::invalid_argument(format!("operation_id: {e}")))?;
        // The same id re-attaches to the operation instead of starting it again,
        // also after a restart of this agent (from the journal).
        let _admitted = self.admit.lock().await;
        let existing = self.lock()?.get(&req.operation_id).map(|t| t.state.subscribe());
        let rx = match existing {
            Some(rx) => rx,
            None => {
                let unknown = |e: String| Status::unavailable(format!("cannot read this operation's record: {e}"));
                let outcome = self.agent.outcome_of(&req.operation_id).map_err(unknown)?;
                let end = self.agent.freeze_end(&req.operation_id).map_err(unknown)?;
                match earlier_checkpoint(&req.operation_id, outcome, end.as_ref()) {
                    Some(op) => watch::channel(op).1,
                    None => self.start(req)?,
                }
            }
        };
        Ok(Response::new(follow(rx)))
    }

    async fn release(&self, request: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        let req = request.into_inner();
        let held = self
            .held
            .lock()
            .map_err(|_| Status::internal("held table poisoned"))?
            .remove(&req.operation_id);
        let Some(pod) = held else {
            // Not held now: say how its hold ended, as recorded then.
            return match self.agent.freeze_end(&req.operation_id) {
                Ok(Some(end)) => Ok(Response::new(release_response(&end, false, 0))),
                Ok(None) => Err(Status::not_found(format!(
                    "operation {} holds no pod, and this agent has no record of its hold ending",
                    req.operation_id
                ))),
                // Not knowing is not "it ran on": the caller asks again.
                Err(e) => Err(Status::unavailable(format!("cannot read how the hold ended: {e}"))),
            };
        };
        let stop = req.stop;
        let journal = pod.frozen.journal().clone();
        let report = tokio::task::spawn_blocking(move || {
            if stop {
                pod.frozen.stop(&pod.containers)
            } else {
                pod.frozen.thaw()
            }
        })
        .await
        .map_err(|_| Status::internal("the release task died"))?
        .map_err(|e| Status::internal(e.to_string()))?;
        // The end recorded first is the truth: the watchdog may have thawed it before.
        let end = journal.end_of(&req.operation_id).ok().flatten().unwrap_or_else(|| {
            if report.expired {
                crate::journal::FreezeEnd::thawed_without_release("its freeze deadline passed")
            } else {
                crate::journal::FreezeEnd::released(stop)
            }
        });
        tracing::info!(operation_id = %req.operation_id, stop, ?end, window_ms = report.window.as_millis() as u64, "held pod released");
        Ok(Response::new(release_response(
            &end,
            true,
            report.window.as_millis() as u64,
        )))
    }

    async fn delete_checkpoint(
        &self,
        request: Request<pb::DeleteCheckpointRequest>,
    ) -> Result<Response<pb::DeleteCheckpointResponse>, Status> {
        let req = request.into_inner();
        if req.prefix.is_empty() || !req.prefix.ends_with('/') {
            return Err(Status::invalid_argument("prefix: must be a key prefix ending in /"));
        }
        let storage = req
            .storage
            .ok_or_else(|| Status::invalid_argument("storage is required"))?;
        let store = store_for(&storage, &self.local_roots)?;
        let deleted = crate::store::delete_prefix(&store, &req.prefix).await.map_err(|e| {
            Status::unavailable(format!(
                "{e}: {}",
                std::error::Error::source(&e).map_or(String::new(), |s| s.to_string())
            ))
        })?;
        tracing::info!(prefix = %req.prefix, deleted, "checkpoint deleted");
        Ok(Response::new(pb::DeleteCheckpointResponse { deleted }))
    }

    type PrepareRestoreStream = OperationStream;

    async fn prepare_restore(
        &self,
        request: Request<pb::PrepareRestoreRequest>,
    ) -> Result<Response<Self::PrepareRestoreStream>, Status> {
        let req = request.into_inner();
        let _admitted = self.admit.lock().await;
        let existing = self.lock()?.get(&req.operation_id).map(|t| t.state.subscribe());
        let rx = match existing {
            Some(rx) => rx,
            None => self.start_restore(req)?,
        };
        Ok(Response::new(follow(rx)))
    }

    async fn get_operation(
        &self,
        request: Request<pb::GetOperationRequest>,
    ) -> Result<Response<pb::Operation>, Status> {
        let id = request.into_inner().operation_id;
        let op = self.lock()?.get(&id).map(|t| t.state.borrow().clone());
        op.map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no operation {id} on this agent")))
    }

    async fn cancel(&self, request: Request<pb::CancelRequest>) -> Result<Response<pb::Operation>, Status> {
        let id = request.into_inner().operation_id;
        let mut ops = self.lock()?;
        let tracked = ops
            .get_mut(&id)
            .ok_or_else(|| Status::not_found(format!("no operation {id} on this agent")))?;
        // Dropping the checkpoint's future drops its frozen pod, which thaws it.
        if tracked.cancel("cancelled by the caller") {
            self.metrics.finished("operation", "cancelled");
            tracing::info!(operation_id = %id, "checkpoint cancelled; the pod is thawed");
            // Replaces its start record: asked again after a restart, it is cancelled,
            // not interrupted.
            if let Err(e) = self.agent.record_outcome(&tracked.state.borrow()) {
                tracing::warn!(operation_id = %id, error = %e, "cannot record the cancellation");
            }
        }
        Ok(Response::new(tracked.state.borrow().clone()))
    }

    async fn probe_storage(
        &self,
        request: Request<pb::ProbeStorageRequest>,
    ) -> Result<Response<pb::ProbeStorageResponse>, Status> {
        let req = request.into_inner();
        let storage = req
            .storage
            .ok_or_else(|| Status::invalid_argument("storage is required"))?;
        if !(req.prefix.is_empty() || req.prefix.ends_with('/')) || req.prefix.split('/').any(|c| c == "..") {
            return Err(Status::invalid_argument(
                "prefix: must be empty or a key prefix ending in /",
            ));
        }
        let store = store_for(&storage, &self.local_roots)?;
        // Unique per probe: probes of storages sharing a bucket and prefix run at once.
        static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let name = format!(
            "{}-{}-{}",
            self.agent.node_facts().name,
            std::process::id(),
            PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let probed =
            tokio::time::timeout(Duration::from_secs(20), crate::store::probe(&store, &req.prefix, &name)).await;
        Ok(Response::new(match probed {
            Ok(Ok(took)) => pb::ProbeStorageResponse {
                ok: true,
                round_trip_millis: took.as_millis() as u64,
                ..Default::default()
            },
            Ok(Err(failure)) => pb::ProbeStorageResponse {
                ok: false,
                reason: failure.reason.to_owned(),
                message: failure.message,
                round_trip_millis: 0,
            },
            Err(_) => pb::ProbeStorageResponse {
                ok: false,
                reason: "Unreachable".to_owned(),
                message: "no answer within 20 s".to_owned(),
                round_trip_millis: 0,
            },
        }))
    }

    async fn thaw(&self, request: Request<pb::ThawRequest>) -> Result<Response<pb::ThawResponse>, Status> {
        let req = request.into_inner();
        if req.pod_uid.is_empty() {
            return Err(Status::invalid_argument("pod_uid is required"));
        }
        let why = thaw_why(&req.reason);
        // Every operation of the pod: a held source's checkpoint has succeeded, and
        // still holds the pod frozen. Only what this process froze can be frozen:
        // a restarted agent thawed everything its predecessor froze.
        let operations: Vec<String> = self
            .lock()?
            .iter()
            .filter(|(_, t)| t.pod_uid == req.pod_uid)
            .map(|(id, _)| id.clone())
            .collect();
        let asked: Vec<(String, bool)> = operations
            .into_iter()
            .map(|id| {
                let asked = self.agent.thaw_now(&id, &why);
                (id, asked)
            })
            .collect();
        let deadline = tokio::time::Instant::now() + THAW_WAIT;
        let mut freezes = Vec::new();
        for (id, asked) in asked {
            // A woken watchdog thaws, then records: wait for the record.
            let end = loop {
                let end = self
                    .agent
                    .freeze_end(&id)
                    .map_err(|e| Status::unavailable(format!("cannot read how the freeze of {id} ended: {e}")))?;
                if end.is_some() || !asked || tokio::time::Instant::now() >= deadline {
                    break end;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            match end {
                Some(end) => freezes.push(thawed_freeze(&id, asked.then_some(why.as_str()), &end)),
                // It never froze the pod (it failed before, or is a restore).
                None if !asked => {}
                None => {
                    return Err(Status::deadline_exceeded(format!(
                        "the freeze of {id} was asked to thaw, but its end was not recorded within {THAW_WAIT:?}"
                    )));
                }
            }
        }
        tracing::warn!(pod_uid = %req.pod_uid, %why, ?freezes, "emergency thaw");
        Ok(Response::new(pb::ThawResponse { freezes }))
    }

    async fn discard_restore(
        &self,
        request: Request<pb::DiscardRestoreRequest>,
    ) -> Result<Response<pb::DiscardRestoreResponse>, Status> {
        let id = request.into_inner().operation_id;
        crate::journal::Journal::check_operation_id(&id)
            .map_err(|e| Status::invalid_argument(format!("operation_id: {e}")))?;
        // A preparation still under way stops first; its partial directory is swept.
        if let Some(tracked) = self.lock()?.get_mut(&id) {
            tracked.cancel("discarded by the caller");
        }
        let discarded = self
            .agent
            .discard_restore(&id)
            .map_err(|e| Status::internal(format!("cannot discard restore {id}: {e}")))?;
        tracing::info!(operation_id = %id, discarded, "prepared restore discarded");
        Ok(Response::new(pb::DiscardRestoreResponse { discarded }))
    }

    async fn continue_restored(
        &self,
        request: Request<pb::ContinueRestoredRequest>,
    ) -> Result<Response<pb::ContinueRestoredResponse>, Status> {
        let req = request.into_inner();
        let pod = req.pod.ok_or_else(|| Status::invalid_argument("pod is required"))?;
        if pod.uid.is_empty() {
            return Err(Status::invalid_argument("pod.uid is required"));
        }
        crate::journal::Journal::check_operation_id(&req.restore_id)
            .map_err(|e| Status::invalid_argument(format!("restore_id: {e}")))?;
        let continued = self.agent.continue_restored(&pod.uid, &req.restore_id).await?;
        tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), pod_uid = %pod.uid, continued, "restored pod continued");
        Ok(Response::new(pb::ContinueRestoredResponse { continued }))
    }

    async fn grant_read(
        &self,
        request: Request<pb::GrantReadRequest>,
    ) -> Result<Response<pb::GrantReadResponse>, Status> {
        let req = request.into_inner();
        let local = req.local.ok_or_else(|| Status::invalid_argument("local is required"))?;
        if !under_a_root(&local.path, &self.local_roots) {
            return Err(Status::invalid_argument(format!(
                "local.path {}: not under a local checkpoint root of this agent: refused",
                local.path
            )));
        }
        if !plain_prefix(&req.prefix) {
            return Err(Status::invalid_argument("prefix: must be a key prefix ending in /"));
        }
        if req.ttl_seconds == 0 {
            return Err(Status::invalid_argument("ttl_seconds: must be positive"));
        }
        // Only a whole checkpoint is lent, so grants cannot be asked for anything else.
        let (root, prefix) = (PathBuf::from(&local.path), req.prefix.clone());
        let whole = tokio::task::spawn_blocking(move || crate::peer::holds_checkpoint(&root, &prefix))
            .await
            .unwrap_or(false);
        if !whole {
            return Err(Status::not_found(format!(
                "{}{}: no whole checkpoint (its manifest) is stored there",
                local.path, req.prefix
            )));
        }
        let token = self.grants.grant(
            PathBuf::from(&local.path),
            req.prefix.clone(),
            Duration::from_secs(u64::from(req.ttl_seconds)),
        )?;
        tracing::info!(path = %local.path, prefix = %req.prefix, ttl_seconds = req.ttl_seconds, "read of a local checkpoint granted");
        Ok(Response::new(pb::GrantReadResponse { token }))
    }

    async fn run_hooks(&self, request: Request<pb::RunHooksRequest>) -> Result<Response<pb::RunHooksResponse>, Status> {
        let req = request.into_inner();
        let pod = req.pod.ok_or_else(|| Status::invalid_argument("pod is required"))?;
        if pod.uid.is_empty() {
            return Err(Status::invalid_argument("pod.uid is required"));
        }
        let hooks = hooks_of(&req.hooks)?;
        let span = tracing::info_span!("post-restore hooks", pod = %format!("{}/{}", pod.namespace, pod.name), pod_uid = %pod.uid);
        let ignored = self.agent.run_hooks(&pod.uid, hooks).instrument(span).await?;
        Ok(Response::new(pb::RunHooksResponse { ignored }))
    }

    async fn node_info(&self, _: Request<pb::NodeInfoRequest>) -> Result<Response<pb::NodeFacts>, Status> {
        let facts = self.agent.node_facts();
        Ok(Response::new(pb::NodeFacts {
            name: facts.name,
            kernel: facts.kernel,
            criu_version: facts.criu_version,
            cgroup_version: facts.cgroup_version,
            cpu_flags: facts.cpu_flags,
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::journal::FreezeEnd;

    #[test]
    fn security_local_storage_stays_under_the_agents_roots() {
        let roots = [PathBuf::from(EMBEDDED_LOCAL_ROOT), PathBuf::from("/srv/ckpt")];
        for inside in [
            "/var/lib/cryopod/checkpoints",
            "/var/lib/cryopod/checkpoints/ns/cp",
            "/srv/ckpt/x",
        ] {
            assert!(under_a_root(inside, &roots), "{inside}");
        }
        for outside in [
            "/var/lib/cryopod/restores",
            "/var/lib/cryopod/checkpoints/../journal",
            "/var/lib/cryopod/checkpoints-evil",
            "var/lib/cryopod/checkpoints",
            "/",
            "",
        ] {
            assert!(!under_a_root(outside, &roots), "{outside}");
        }
        let local = |path: &str| pb::Storage {
            backend: Some(pb::storage::Backend::Local(pb::LocalStorage { path: path.into() })),
        };
        let refused = store_for(&local("/etc"), &roots).err().unwrap();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(
            refused
                .message()
                .contains("storage.local.path /etc: not under a local checkpoint root"),
            "{}",
            refused.message()
        );
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        assert!(store_for(&local(&root.join("ns").display().to_string()), &[root]).is_ok());
    }

    #[test]
    fn each_step_of_a_checkpoint_shows_in_its_operation() {
        let mut op = pb::Operation::default();
        advance(&mut op, Stage::Freezing);
        assert_eq!(op.stage, pb::Stage::Freezing as i32);
        advance(&mut op, Stage::Frozen { at_unix_micros: 7 });
        advance(&mut op, Stage::Stored { done: 3, total: 10 });
        // Progress keeps the stage it happens in.
        assert_eq!(
            (op.stage, op.frozen_at_unix_micros, op.bytes_done, op.bytes_total),
            (pb::Stage::Freezing as i32, 7, 3, 10)
        );
    }

    #[test]
    fn an_emergency_thaw_says_which_freezes_it_ended_and_how_the_others_had() {
        let why = thaw_why("kubectl cryopod thaw by alice\n\u{1b}[31m");
        assert_eq!(
            why,
            "an emergency thaw (Thaw) ended its freeze: kubectl cryopod thaw by alice[31m"
        );
        assert_eq!(thaw_why("  "), "an emergency thaw (Thaw) ended its freeze");
        assert!(thaw_why(&"x".repeat(1000)).len() < 300, "the reason is bounded");
        let ours = FreezeEnd::thawed_without_release(why.clone());
        let now = thawed_freeze("op", Some(&why), &ours);
        assert!(now.thawed_now);
        assert_eq!(now.why, why);
        // Asked again: the same end, reported as having been.
        assert!(!thawed_freeze("op", None, &ours).thawed_now);
        let deadline = thawed_freeze(
            "op",
            Some(&why),
            &FreezeEnd::thawed_without_release("its freeze deadline (30 s) passed"),
        );
        assert!(!deadline.thawed_now);
        assert_eq!(deadline.why, "its freeze deadline (30 s) passed");
        let released = thawed_freeze("op", Some(&why), &FreezeEnd::released(true));
        assert!(!released.thawed_now);
        assert_eq!(released.why, "stopped");
        assert!(released.ended_unix_millis > 0);
    }

    #[test]
    fn failures_quote_their_causes_once() {
        let err = RestoreError::Local {
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        assert_eq!(
            with_causes(&err),
            "cannot write /x: No space left on device (os error 28)"
        );
        let quoted = std::io::Error::other(std::io::Error::from_raw_os_error(28).to_string());
        assert_eq!(with_causes(&quoted), "No space left on device (os error 28)");
    }

    #[test]
    fn a_checkpoint_asked_for_again_is_answered_from_its_record_never_run_twice() {
        // Nothing froze under this id here: it starts.
        assert_eq!(earlier_checkpoint("op", None, None), None);
        // It ended and said so: the same answer.
        let done = pb::Operation {
            operation_id: "op".into(),
            state: pb::State::Succeeded as i32,
            ..Default::default()
        };
        assert_eq!(earlier_checkpoint("op", Some(done.clone()), None), Some(done));
        // It froze, and the agent died before it ended: a failure, never a new run.
        let end = FreezeEnd::thawed_without_release("the agent restarted and thawed it");
        let interrupted = earlier_checkpoint("op", None, Some(&end)).unwrap();
        assert_eq!(interrupted.state, pb::State::Failed as i32);
        assert_eq!(interrupted.error_code, Code::Aborted as i32);
        assert_eq!(interrupted.failure, pb::Failure::Interrupted as i32);
        assert!(
            interrupted
                .error_message
                .contains("interrupted: the agent restarted while it ran"),
            "{}",
            interrupted.error_message
        );
        assert!(interrupted.error_message.contains("the agent restarted and thawed it"));
        // Recorded as started, never ended, nothing frozen: a failure too.
        let started = pb::Operation {
            operation_id: "op".into(),
            state: pb::State::Running as i32,
            ..Default::default()
        };
        let interrupted = earlier_checkpoint("op", Some(started.clone()), None).unwrap();
        assert_eq!(interrupted.error_code, Code::Aborted as i32);
        assert!(
            interrupted.error_message.contains("it had frozen nothing yet"),
            "{}",
            interrupted.error_message
        );
        let interrupted = earlier_checkpoint("op", Some(started), Some(&end)).unwrap();
        assert!(interrupted.error_message.contains("the agent restarted and thawed it"));
    }
}
