//! What every controller works with, and how they fail, record events and read time.

use std::sync::Arc;

use cryopod_crds::common::{CONDITION_READY, CONDITION_SOURCE_FROZEN, ConditionStatus, set_condition};
use cryopod_crds::v1alpha1::PodCheckpoint;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};

use crate::agents::{AgentError, Agents};
use crate::metrics::OperatorMetrics;
use crate::starts::Starts;

/// What the controller works with.
#[derive(Clone)]
pub struct Context {
    /// The API server.
    pub client: kube::Client,
    /// The node agents.
    pub agents: Agents,
    /// Events.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<OperatorMetrics>,
    /// At most this many checkpoints run at once on one node.
    pub max_per_node: usize,
    /// Checkpoints without `spec.encryption` are sealed with a key made for them.
    pub encrypt_by_default: bool,
    /// The operator's own namespace: its sealing keys are kept there.
    pub namespace: String,
    /// Only this namespace's resources are reconciled, when set.
    pub watch_namespace: Option<String>,
    /// The watched PodCheckpoints, as the checkpoint controller's watch last saw them.
    pub checkpoints: Store<PodCheckpoint>,
    /// The resource version each object had after this operator last wrote its
    /// status in the reconcile under way, by UID: the precondition of that
    /// reconcile's next write. Forgotten when a reconcile starts ([`Context::new_pass`]):
    /// a later reconcile working from an older view must fail its write (409) and
    /// look again, not write over what an earlier one wrote (it once took a finished
    /// migration from Succeeded back to Finalizing).
    pub written: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
    /// Checkpoints started here that the watch may not show yet; held while a
    /// checkpoint decides to start, so two cannot both see room.
    pub starts: Arc<tokio::sync::Mutex<Starts>>,
}

impl Context {
    /// A reconcile of the object with `uid` starts: its writes are preconditioned on
    /// the version it read, then on its own last write.
    pub fn new_pass(&self, uid: Option<String>) {
        if let (Ok(mut written), Some(uid)) = (self.written.lock(), uid) {
            written.remove(&uid);
        }
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}

/// A reconcile failed; it is retried with backoff.
#[derive(Debug)]
pub enum Error {
    /// The API server refused or failed a request.
    Kube { action: &'static str, source: kube::Error },
    /// The node agent could not be reached.
    Agent { source: AgentError },
    /// The node agent's answer broke off.
    Grpc {
        action: &'static str,
        source: tonic::Status,
    },
    /// The finalizer machinery failed.
    Finalizer { detail: String },
    /// Someone else wrote the object since it was read; the reconcile runs again.
    Conflict { name: String },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The API server's answer (a 403 names the missing right, a 409 the
            // conflict) is what an SRE needs from the log line.
            Self::Kube {
                action,
                source: kube::Error::Api(status),
            } => write!(
                f,
                "cannot {action}: {} {}: {}",
                status.code, status.reason, status.message
            ),
            Self::Kube { action, source } => write!(f, "cannot {action}: {source}"),
            Self::Agent { source } => write!(f, "{source}"),
            Self::Grpc { action, source } => write!(f, "{action}: {}", source.message()),
            Self::Finalizer { detail } => write!(f, "finalizer: {detail}"),
            Self::Conflict { name } => write!(f, "{name} was changed since it was read; its status is computed again"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Kube { source, .. } => Some(source),
            Self::Agent { source } => Some(source),
            Self::Grpc { source, .. } => Some(source),
            Self::Finalizer { .. } | Self::Conflict { .. } => None,
        }
    }
}

/// How soon a failed reconcile runs again: at once for a write that lost a race
/// (there is news to read), after a pause otherwise.
pub fn retry_after(error: &Error) -> std::time::Duration {
    match error {
        Error::Conflict { .. } => std::time::Duration::from_millis(200),
        _ => std::time::Duration::from_secs(5),
    }
}

pub fn kube_err(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { action, source }
}

/// A hash of `text` that stays the same across releases and processes (FNV-1a),
/// unlike the standard hasher: for names derived from other names.
pub fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The current time, as the API writes it.
pub fn now() -> Time {
    Time(Timestamp::now())
}

/// Records an event on `object`; a failure to record is logged, never fatal.
pub async fn publish<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    object: &K,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(error = %e, "cannot publish an event");
    }
}

/// A resource whose status records one operation (PodCheckpoint, PodRestore, ...).
pub trait Operation:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
    /// Its status type.
    type Status: serde::Serialize + Clone + Default;
    /// The kind, for logs and metrics.
    const KIND: &'static str;
    /// Its status, if any.
    fn status(&self) -> Option<&Self::Status>;
    /// The status's conditions.
    fn conditions(status: &mut Self::Status) -> &mut Vec<Condition>;
    /// Marks the status failed at `at`.
    fn set_failed(status: &mut Self::Status, at: Time, generation: Option<i64>);
}

/// The resource version a status write must find: the one the reconcile read, or the
/// one this operator's own last write of the object produced, if newer (a reconcile
/// may write twice). Versions are compared as the numbers etcd makes them; one that
/// is not a number is taken as read.
pub fn expected_version(read: Option<&str>, written: Option<u64>) -> Option<String> {
    match (read, written) {
        (Some(read), Some(written)) => match read.parse::<u64>() {
            Ok(read) => Some(read.max(written).to_string()),
            Err(_) => Some(read.to_owned()),
        },
        (Some(read), None) => Some(read.to_owned()),
        (None, written) => written.map(|w| w.to_string()),
    }
}

/// The merge patch that makes the stored status `new`: a merge patch keeps what it
/// does not name, so a field `new` no longer has (an optional one cleared, such as a
/// schedule's next run while it is suspended) is named with `null`.
pub fn status_patch<S: serde::Serialize>(old: Option<&S>, new: &S) -> serde_json::Value {
    let mut patch = serde_json::to_value(new).unwrap_or(serde_json::Value::Null);
    let old = old.and_then(|o| serde_json::to_value(o).ok());
    if let (Some(serde_json::Value::Object(old)), serde_json::Value::Object(fields)) = (old, &mut patch) {
        for key in old.keys() {
            fields.entry(key.clone()).or_insert(serde_json::Value::Null);
        }
    }
    patch
}

/// Writes the whole status of `object`, on the condition that nobody else wrote the
/// object since it was read (or since this operator last wrote it): a status
/// computed from a stale read is refused by the API server (409) rather than
/// overwriting what another writer did, and the reconcile runs again on what is
/// there now.
pub async fn write_status<K: Operation>(object: &K, ctx: &Context, status: &K::Status) -> Result<(), Error> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default());
    patch_status(&api, object, object.status(), status, ctx).await
}

/// [`write_status`] through `api`, for any kind (cluster-scoped ones too): the
/// status as a merge patch from `old`, preconditioned on the version this reconcile
/// read or last wrote.
pub async fn patch_status<K, S>(
    api: &Api<K>,
    object: &K,
    old: Option<&S>,
    status: &S,
    ctx: &Context,
) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: serde::Serialize,
{
    let uid = object.uid().unwrap_or_default();
    let written = ctx.written.lock().ok().and_then(|w| w.get(&uid).copied());
    let mut patch = serde_json::json!({ "status": status_patch(old, status) });
    if let Some(version) = expected_version(object.resource_version().as_deref(), written) {
        patch["metadata"] = serde_json::json!({ "resourceVersion": version });
    }
    match api
        .patch_status(&object.name_any(), &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        Ok(now) => {
            if let (Ok(mut w), Some(version)) = (
                ctx.written.lock(),
                now.resource_version().and_then(|v| v.parse::<u64>().ok()),
            ) {
                // Bounded: a long-running operator forgets the oldest half at once.
                if w.len() > 10_000 {
                    w.clear();
                }
                w.insert(uid, version);
            }
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            if let Ok(mut w) = ctx.written.lock() {
                w.remove(&uid);
            }
            Err(Error::Conflict {
                name: object.name_any(),
            })
        }
        Err(source) => Err(Error::Kube {
            action: "write a status",
            source,
        }),
    }
}

/// Records the start of an operation whose `status` is otherwise filled: the `Ready`
/// condition False with `reason` and `message`, the status, an event (`action`) and
/// the in-flight metric. Returns the status as written.
pub async fn begin<K: Operation>(
    object: &K,
    ctx: &Context,
    mut status: K::Status,
    reason: &str,
    action: &str,
    message: String,
) -> Result<K::Status, Error> {
    // Who asked, as the API server recorded it (the chart's admission policy).
    let message = match requested_by(object.meta()) {
        Some(who) => format!("{message}; requested by {who}"),
        None => message,
    };
    set_condition(
        K::conditions(&mut status),
        CONDITION_READY,
        ConditionStatus::False,
        reason,
        &message,
        object.meta().generation,
        now(),
    );
    write_status(object, ctx, &status).await?;
    publish(ctx, object, EventType::Normal, reason, action, message).await;
    ctx.metrics.started(K::KIND);
    Ok(status)
}

/// The annotation in which the API server records who created a cryopod resource
/// (the chart's MutatingAdmissionPolicy; only the operator may change it).
pub const REQUESTED_BY: &str = "cryopod.io/requested-by";

/// Who asked for a resource, if that was recorded.
pub fn requested_by(meta: &ObjectMeta) -> Option<&str> {
    meta.annotations.as_ref()?.get(REQUESTED_BY).map(String::as_str)
}

/// How an operation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// It did what was asked (`Ready` is True).
    Succeeded,
    /// It did not, and what it touched was put back (`Ready` is False).
    RolledBack,
    /// It failed (`Ready` is False).
    Failed,
}

/// Records the end of an operation whose final `status` is otherwise filled: the
/// `Ready` condition with `reason` and `message`, the status, an event, the log and
/// the metrics. `reason` is one of the API's constants (`'static`), which is what
/// keeps the metric's `reason` label a bounded set.
pub async fn finish<K: Operation>(
    object: &K,
    ctx: &Context,
    mut status: K::Status,
    ending: Ending,
    reason: &'static str,
    message: String,
) -> Result<(), Error> {
    let generation = object.meta().generation;
    // An operation that did not succeed no longer holds the pod, but no agent
    // confirmed a thaw here (a timeout, say): Unknown, not False. The agent thaws it
    // on every path, at its freeze deadline at the latest.
    let conditions = K::conditions(&mut status);
    if ending != Ending::Succeeded
        && conditions
            .iter()
            .any(|c| c.type_ == CONDITION_SOURCE_FROZEN && c.status == "True")
    {
        set_condition(
            conditions,
            CONDITION_SOURCE_FROZEN,
            ConditionStatus::Unknown,
            "NotHeld",
            "the operation ended without its agent confirming the thaw; the agent thaws the pod at its freeze \
             deadline at the latest (cryopod_agent_frozen_pods shows what is frozen now)",
            generation,
            now(),
        );
    }
    let (ready, type_, result) = match ending {
        Ending::Succeeded => (ConditionStatus::True, EventType::Normal, "succeeded"),
        Ending::RolledBack => (ConditionStatus::False, EventType::Warning, "rolled back"),
        Ending::Failed => (ConditionStatus::False, EventType::Warning, "failed"),
    };
    set_condition(
        K::conditions(&mut status),
        CONDITION_READY,
        ready,
        reason,
        &message,
        generation,
        now(),
    );
    write_status(object, ctx, &status).await?;
    tracing::info!(kind = K::KIND, name = %object.name_any(), namespace = ?object.namespace(), result, reason, %message, "operation ended");
    publish(ctx, object, type_, reason, K::KIND, message).await;
    ctx.metrics.finished(K::KIND, result, reason);
    Ok(())
}

/// Ends the operation as Failed with `reason` and a message naming the cause: in
/// the `Ready` condition, an event and the log.
pub async fn fail_with<K: Operation>(
    object: &K,
    ctx: &Context,
    reason: &'static str,
    message: String,
) -> Result<(), Error> {
    let mut status = object.status().cloned().unwrap_or_default();
    K::set_failed(&mut status, now(), object.meta().generation);
    finish(object, ctx, status, Ending::Failed, reason, message).await
}

/// The source pod of an operation, as found.
#[derive(Clone, Debug)]
pub enum SourcePod {
    /// It exists with the expected UID.
    Found(Box<k8s_openapi::api::core::v1::Pod>),
    /// It does not exist; the message says so.
    Missing(String),
    /// It exists with another UID; the message says so.
    Replaced(String),
}

/// Looks up `spec.sourcePodName` in `namespace`, checking `spec.sourcePodUID`.
pub async fn source_pod(ctx: &Context, namespace: &str, name: &str, uid: Option<&str>) -> Result<SourcePod, Error> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let Some(pod) = pods.get_opt(name).await.map_err(kube_err("read the source pod"))? else {
        return Ok(SourcePod::Missing(format!(
            "spec.sourcePodName: pod {name} does not exist in namespace {namespace}"
        )));
    };
    let live = pod.metadata.uid.clone().unwrap_or_default();
    match uid {
        Some(wanted) if wanted != live => Ok(SourcePod::Replaced(format!(
            "spec.sourcePodUID: pod {name} now has UID {live}, not {wanted}; it was replaced"
        ))),
        _ => Ok(SourcePod::Found(Box::new(pod))),
    }
}

/// Every node of the cluster as (name, Ready, labels), what node choices read.
pub async fn node_facts(
    ctx: &Context,
    tolerations: &[k8s_openapi::api::core::v1::Toleration],
) -> Result<Vec<(String, bool, std::collections::BTreeMap<String, String>)>, Error> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(ctx.client.clone());
    Ok(nodes
        .list(&kube::api::ListParams::default())
        .await
        .map_err(kube_err("list nodes"))?
        .items
        .into_iter()
        .map(|node| {
            // A node the pod could not be scheduled on is no target, named or not.
            let ready = node_ready(&node) && untolerated_taint(&node, tolerations).is_none();
            (node.name_any(), ready, node.metadata.labels.unwrap_or_default())
        })
        .collect())
}

/// The first taint of `node` that keeps a pod with `tolerations` off it (`NoSchedule`
/// or `NoExecute`), as `key=value:effect`.
pub fn untolerated_taint(
    node: &k8s_openapi::api::core::v1::Node,
    tolerations: &[k8s_openapi::api::core::v1::Toleration],
) -> Option<String> {
    let tolerated = |taint: &k8s_openapi::api::core::v1::Taint| {
        tolerations.iter().any(|t| {
            let effect = t.effect.as_deref().is_none_or(|e| e.is_empty() || e == taint.effect);
            let key = match t.operator.as_deref() {
                Some("Exists") => t.key.as_deref().is_none_or(|k| k.is_empty() || k == taint.key),
                _ => {
                    t.key.as_deref() == Some(taint.key.as_str())
                        && t.value.as_deref().unwrap_or_default() == taint.value.as_deref().unwrap_or_default()
                }
            };
            effect && key
        })
    };
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .find(|t| !tolerated(t))
        .map(|t| format!("{}={}:{}", t.key, t.value.as_deref().unwrap_or_default(), t.effect))
}

/// Whether a node reports itself Ready.
pub fn node_ready(node: &k8s_openapi::api::core::v1::Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether a pod reports itself Ready.
pub fn pod_ready(pod: &k8s_openapi::api::core::v1::Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_api_servers_refusal_shows_its_code_and_message() {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "code": 403, "reason": "Forbidden",
            "message": "pods is forbidden: User \"x\" cannot create resource \"pods\""
        }))
        .unwrap();
        let err = Error::Kube {
            action: "create the restored pod",
            source: kube::Error::Api(Box::new(status)),
        };
        assert_eq!(
            err.to_string(),
            "cannot create the restored pod: 403 Forbidden: pods is forbidden: User \"x\" cannot create resource \"pods\""
        );
    }

    #[test]
    fn a_status_patch_clears_what_the_new_status_no_longer_has() {
        use cryopod_crds::v1alpha1::CheckpointScheduleStatus;
        let old: CheckpointScheduleStatus = serde_json::from_value(serde_json::json!({
            "lastScheduleTime": "2026-12-04T00:00:00Z", "nextScheduleTime": "2026-12-04T00:01:00Z"}))
        .unwrap();
        let mut new = old.clone();
        new.next_schedule_time = None;
        let patch = status_patch(Some(&old), &new);
        assert_eq!(patch["nextScheduleTime"], serde_json::Value::Null);
        assert!(patch.as_object().unwrap().contains_key("nextScheduleTime"));
        assert_eq!(patch["lastScheduleTime"], "2026-12-04T00:00:00Z");
        // Nothing to clear without an old status.
        let first = status_patch(None, &new);
        assert!(!first.as_object().unwrap().contains_key("nextScheduleTime"));
    }

    #[test]
    fn a_node_tainted_against_the_pod_is_no_target() {
        let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n"},
            "spec": {"taints": [
                {"key": "soft", "effect": "PreferNoSchedule"},
                {"key": "dedicated", "value": "db", "effect": "NoSchedule"},
            ]}
        }))
        .unwrap();
        let tolerations = |t: serde_json::Value| -> Vec<k8s_openapi::api::core::v1::Toleration> {
            serde_json::from_value(t).unwrap()
        };
        let table = [
            (serde_json::json!([]), Some("dedicated=db:NoSchedule")),
            (
                serde_json::json!([{"key": "dedicated", "value": "web"}]),
                Some("dedicated=db:NoSchedule"),
            ),
            (
                serde_json::json!([{"key": "dedicated", "value": "db", "effect": "NoExecute"}]),
                Some("dedicated=db:NoSchedule"),
            ),
            (serde_json::json!([{"key": "dedicated", "value": "db"}]), None),
            (
                serde_json::json!([{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}]),
                None,
            ),
            (serde_json::json!([{"operator": "Exists"}]), None),
        ];
        for (given, expected) in table {
            assert_eq!(
                untolerated_taint(&node, &tolerations(given.clone())).as_deref(),
                expected,
                "{given}"
            );
        }
    }

    #[test]
    fn a_status_write_expects_the_newest_version_it_knows() {
        assert_eq!(expected_version(Some("7"), None).as_deref(), Some("7"));
        // Its own write came after the read: that version.
        assert_eq!(expected_version(Some("7"), Some(9)).as_deref(), Some("9"));
        // Someone wrote after its own write, and the reconcile read that: the read.
        assert_eq!(expected_version(Some("12"), Some(9)).as_deref(), Some("12"));
        assert_eq!(expected_version(Some("opaque"), Some(9)).as_deref(), Some("opaque"));
        assert_eq!(expected_version(None, None), None);
    }
}
