//! What every controller works with, and how they fail, record events and read time.

use std::sync::Arc;

use cryopod_crds::common::{CONDITION_READY, ConditionStatus, set_condition};
use cryopod_crds::v1alpha1::PodCheckpoint;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};

use crate::agents::{AgentError, Agents};
use crate::checkpoint::Starts;
use crate::metrics::OperatorMetrics;

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
    /// The watched PodCheckpoints, as the checkpoint controller's watch last saw them.
    pub checkpoints: Store<PodCheckpoint>,
    /// Checkpoints started here that the watch may not show yet; held while a
    /// checkpoint decides to start, so two cannot both see room.
    pub starts: Arc<tokio::sync::Mutex<Starts>>,
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
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kube { action, .. } => write!(f, "cannot {action}"),
            Self::Agent { source } => write!(f, "{source}"),
            Self::Grpc { action, source } => write!(f, "{action}: {}", source.message()),
            Self::Finalizer { detail } => write!(f, "finalizer: {detail}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Kube { source, .. } => Some(source),
            Self::Agent { source } => Some(source),
            Self::Grpc { source, .. } => Some(source),
            Self::Finalizer { .. } => None,
        }
    }
}

pub fn kube_err(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { action, source }
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

/// Writes the whole status of `object`.
pub async fn write_status<K: Operation>(object: &K, ctx: &Context, status: &K::Status) -> Result<(), Error> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default());
    api.patch_status(
        &object.name_any(),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await
    .map_err(kube_err("write a status"))?;
    Ok(())
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
/// the metrics.
pub async fn finish<K: Operation>(
    object: &K,
    ctx: &Context,
    mut status: K::Status,
    ending: Ending,
    reason: &str,
    message: String,
) -> Result<(), Error> {
    let generation = object.meta().generation;
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
    ctx.metrics.finished(K::KIND, result);
    Ok(())
}

/// Ends the operation as Failed with `reason` and a message naming the cause: in
/// the `Ready` condition, an event and the log.
pub async fn fail_with<K: Operation>(object: &K, ctx: &Context, reason: &str, message: String) -> Result<(), Error> {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

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
}
