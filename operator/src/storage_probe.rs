//! The CheckpointStorage controller: it asks an agent to write, read back and delete
//! one small object in each storage, with the storage's own credentials, and writes
//! `Ready` with the reason. The agents are asked because they do the I/O: a bucket
//! reachable from the operator but not from the nodes is not ready.

use std::sync::Arc;
use std::time::Duration;

use cryopod_agent_api::pb;
use cryopod_crds::common::{CONDITION_READY, ConditionStatus, set_condition};
use cryopod_crds::v1alpha1::{CheckpointStorage, StorageType};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use crate::checkpoint::secret_data;
use crate::context::{Context, Error, now};
use crate::storage::{StorageProblem, credentials_secret, resolve};

/// How often a storage is probed again.
pub const PROBE_EVERY: Duration = Duration::from_secs(300);

/// Reasons of a storage's `Ready` condition.
pub mod reasons {
    /// An agent wrote, read back and deleted an object.
    pub const REACHABLE: &str = "Reachable";
    /// The credentials Secret is missing or incomplete, or the spec cannot be used.
    pub const MISCONFIGURED: &str = "Misconfigured";
    /// No agent serves any node, so nothing can be probed.
    pub const NO_AGENT: &str = "NodeAgentUnavailable";
}

/// The `Ready` condition an agent's answer makes: status, reason, message.
pub fn condition_of(answer: &pb::ProbeStorageResponse, node: &str) -> (ConditionStatus, String, String) {
    if answer.ok {
        (
            ConditionStatus::True,
            reasons::REACHABLE.to_owned(),
            format!(
                "the agent on {node} wrote, read back and deleted an object in {} ms",
                answer.round_trip_millis
            ),
        )
    } else {
        let reason = if answer.reason.is_empty() {
            "Unreachable"
        } else {
            &answer.reason
        };
        (
            ConditionStatus::False,
            reason.to_owned(),
            format!("from the agent on {node}: {}", answer.message),
        )
    }
}

/// The key prefix a storage's probe object goes under: its own prefix.
pub fn probe_prefix(storage: &CheckpointStorage) -> String {
    match storage.spec.prefix.as_deref().map(|p| p.trim_matches('/')) {
        None | Some("") => String::new(),
        Some(p) => format!("{p}/"),
    }
}

async fn probe(storage: &CheckpointStorage, ctx: &Context) -> Result<(ConditionStatus, String, String), Error> {
    let misconfigured = |message: String| Ok((ConditionStatus::False, reasons::MISCONFIGURED.to_owned(), message));
    let secret = match credentials_secret(storage) {
        Some((ns, name)) => match secret_data(ctx, &ns, &name).await? {
            Some(data) => Some((format!("{ns}/{name}"), data)),
            None => return misconfigured(format!("the credentials Secret {ns}/{name} does not exist")),
        },
        None => None,
    };
    let resolved = match resolve(
        Some(storage),
        secret.as_ref().map(|(n, d)| (n.as_str(), d)),
        "",
        ("", "", ""),
    ) {
        Ok(resolved) => resolved,
        Err(StorageProblem(message)) => return misconfigured(message),
    };
    // The first agent that answers probes; one unreachable agent does not leave the
    // last condition standing.
    let nodes = ctx.agents.nodes().await.map_err(|source| Error::Agent { source })?;
    let mut answered = None;
    let mut unreachable = Vec::new();
    for node in nodes {
        let asked = async {
            let mut client = ctx.agents.client(&node).await.map_err(|e| e.to_string())?;
            client
                .probe_storage(pb::ProbeStorageRequest {
                    storage: Some(resolved.storage.clone()),
                    prefix: probe_prefix(storage),
                })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|e| e.message().to_owned())
        };
        match asked.await {
            Ok(answer) => {
                answered = Some((node, answer));
                break;
            }
            Err(why) => unreachable.push(format!("{node}: {why}")),
        }
    }
    let Some((node, answer)) = answered else {
        let message = if unreachable.is_empty() {
            "no node agent is ready to probe the storage".to_owned()
        } else {
            format!("no node agent could probe the storage: {}", unreachable.join("; "))
        };
        return Ok((ConditionStatus::Unknown, reasons::NO_AGENT.to_owned(), message));
    };
    let (status, reason, mut message) = condition_of(&answer, &node);
    if storage.spec.type_ == StorageType::Local {
        message.push_str(" (a Local storage is a directory on each node; only that node's was probed)");
    }
    Ok((status, reason, message))
}

/// How long until a storage is due for its next probe; `None` when it is due now:
/// never probed, its spec changed since, or the last probe is `PROBE_EVERY` old.
/// (Each probe writes the status, which wakes the controller again: without this,
/// it would probe without pause.)
pub fn not_due_for(storage: &CheckpointStorage, now: &Time) -> Option<Duration> {
    let status = storage.status.as_ref()?;
    if status.observed_generation != storage.meta().generation {
        return None;
    }
    let checked = status.last_checked_time.as_ref()?;
    let since = now.0.duration_since(checked.0).as_secs_f64().max(0.0);
    let left = PROBE_EVERY.as_secs_f64() - since;
    (left > 0.0).then(|| Duration::from_secs_f64(left))
}

async fn reconcile(storage: Arc<CheckpointStorage>, ctx: Arc<Context>) -> Result<Action, Error> {
    if let Some(left) = not_due_for(&storage, &now()) {
        return Ok(Action::requeue(left));
    }
    let (status, reason, message) = probe(&storage, &ctx).await?;
    let name = storage.name_any();
    if status != ConditionStatus::True {
        tracing::warn!(storage = %name, %reason, %message, "checkpoint storage not ready");
    }
    let mut current = storage.status.clone().unwrap_or_default();
    let generation = storage.meta().generation;
    set_condition(
        &mut current.conditions,
        CONDITION_READY,
        status,
        &reason,
        &message,
        generation,
        now(),
    );
    current.last_checked_time = Some(now());
    current.observed_generation = generation;
    let api: Api<CheckpointStorage> = Api::all(ctx.client.clone());
    // On the version read: a status another writer changed since is read again (409).
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({
            "metadata": {"resourceVersion": storage.resource_version()},
            "status": current,
        })),
    )
    .await
    .map_err(crate::context::kube_err("write a CheckpointStorage's status"))?;
    Ok(Action::requeue(PROBE_EVERY))
}

fn retry(storage: Arc<CheckpointStorage>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(storage = %storage.name_any(), %error, "cannot probe a checkpoint storage; retrying");
    Action::requeue(Duration::from_secs(30))
}

/// Probes every CheckpointStorage until the stream ends.
pub async fn run(ctx: Arc<Context>) {
    let api: Api<CheckpointStorage> = Api::all(ctx.client.clone());
    Controller::new(api, watcher::Config::default())
        .shutdown_on_signal()
        .run(reconcile, retry, ctx)
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_agents_answer_becomes_the_ready_condition() {
        let ok = pb::ProbeStorageResponse {
            ok: true,
            round_trip_millis: 12,
            ..Default::default()
        };
        let (status, reason, message) = condition_of(&ok, "node-1");
        assert_eq!((status, reason.as_str()), (ConditionStatus::True, "Reachable"));
        assert!(message.contains("node-1") && message.contains("12 ms"), "{message}");
        let denied = pb::ProbeStorageResponse {
            ok: false,
            reason: "AccessDenied".into(),
            message: "cannot write x: 403".into(),
            round_trip_millis: 0,
        };
        let (status, reason, message) = condition_of(&denied, "node-2");
        assert_eq!((status, reason.as_str()), (ConditionStatus::False, "AccessDenied"));
        assert_eq!(message, "from the agent on node-2: cannot write x: 403");
    }

    #[test]
    fn the_probe_goes_under_the_storages_own_prefix() {
        let storage = |prefix: serde_json::Value| -> CheckpointStorage {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "cryopod.io/v1alpha1", "kind": "CheckpointStorage", "metadata": {"name": "s"},
                "spec": {"type": "S3", "prefix": prefix, "s3": {"bucket": "b"}}
            }))
            .unwrap()
        };
        assert_eq!(probe_prefix(&storage(serde_json::json!("/team-a/"))), "team-a/");
        assert_eq!(probe_prefix(&storage(serde_json::json!(null))), "");
    }

    #[test]
    fn a_storage_is_probed_again_only_when_due_or_changed() {
        let at = |secs: i64| Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap());
        let storage = |generation: i64, observed: Option<i64>, checked: Option<i64>| -> CheckpointStorage {
            let mut s: CheckpointStorage = serde_json::from_value(serde_json::json!({
                "apiVersion": "cryopod.io/v1alpha1", "kind": "CheckpointStorage",
                "metadata": {"name": "s", "generation": generation},
                "spec": {"type": "S3", "s3": {"bucket": "b"}}
            }))
            .unwrap();
            s.status = Some(cryopod_crds::v1alpha1::CheckpointStorageStatus {
                last_checked_time: checked.map(at),
                observed_generation: observed,
                ..Default::default()
            });
            s
        };
        // Probed 100 s ago, unchanged: 200 s to go.
        let left = not_due_for(&storage(1, Some(1), Some(1_000)), &at(1_100)).unwrap();
        assert_eq!(left.as_secs(), 200);
        // Due, changed, or never probed.
        assert_eq!(not_due_for(&storage(1, Some(1), Some(1_000)), &at(1_300)), None);
        assert_eq!(not_due_for(&storage(2, Some(1), Some(1_000)), &at(1_100)), None);
        assert_eq!(not_due_for(&storage(1, Some(1), None), &at(1_100)), None);
    }
}
