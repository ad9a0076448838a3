//! The NodeEvacuation controller: it cordons the node, lists its pods once (and
//! any that arrive later), and moves them off a few at a time. A pod that can keep
//! its memory gets a PodMigration; the rest are evicted through the Eviction API or
//! left, as the spec says. Every start waits until each PodDisruptionBudget of the
//! pod allows one more disruption, counting the pods in motion (the evacuation's own
//! and every unfinished PodMigration of the namespace: the API server's count sees
//! none of them, a frozen source still looks Ready), so a budget is honoured for the
//! whole evacuation, not only at its start.
//!
//! Migrated sources are deleted by their PodMigration right after it kills them, not
//! evicted: the disruption began at the freeze, when this controller counted it
//! against the budget, and a refused eviction at that point would leave a killed pod
//! for the kubelet to restart (the pod would run twice).
//!
//! The evacuation has no finalizer: deleting it stops new moves, and the PodMigrations
//! it started (labelled, not owned, so they are not garbage-collected) finish.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use cryopod_crds::common::{CONDITION_READY, ConditionStatus, find_condition, set_condition};
use cryopod_crds::v1alpha1::{
    EvacuatedPod, EvacuationAction, EvacuationPhase, MigrationFailurePolicy, MigrationPhase, NodeEvacuation,
    NodeEvacuationStatus, PodMigration, PodMigrationSpec, PodOutcome, TcpSpec, UnmigratablePolicy,
    evacuation_reasons as reasons, migration_reasons,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use crate::context::{Context, Error, kube_err, now, patch_status, publish};
use crate::workload::{Workload, controller_of, selects};

/// The label on each PodMigration an evacuation starts: the evacuation's name.
pub const EVACUATION_LABEL: &str = "cryopod.io/evacuation";
/// The kubelet's annotation on the API's copy of a static pod.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
const KIND: &str = "NodeEvacuation";
/// The chart's label on cryopod's own pods.
const NAME_LABEL: &str = "app.kubernetes.io/name";

/// What the evacuation does with a pod, decided once when it is first seen.
pub fn classify(
    pod: &Pod,
    policy: UnmigratablePolicy,
    operator_namespace: &str,
    watched: Option<&str>,
) -> EvacuatedPod {
    let namespace = pod.namespace().unwrap_or_default();
    let mut entry = EvacuatedPod {
        namespace: namespace.clone(),
        name: pod.name_any(),
        uid: pod.uid().unwrap_or_default(),
        ..EvacuatedPod::default()
    };
    let left = |mut entry: EvacuatedPod, reason: &str, message: String| {
        entry.action = EvacuationAction::Skip;
        entry.outcome = PodOutcome::Skipped;
        entry.reason = Some(reason.to_owned());
        entry.message = Some(message);
        entry
    };
    let controller = controller_of(pod);
    if pod.annotations().contains_key(MIRROR_ANNOTATION) {
        return left(
            entry,
            reasons::STATIC_POD,
            "a static pod belongs to the node's kubelet".into(),
        );
    }
    if controller.is_some_and(|o| o.kind == "DaemonSet") {
        return left(
            entry,
            reasons::DAEMON_SET_POD,
            "a DaemonSet runs a pod on every node".into(),
        );
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return left(
            entry,
            reasons::FINISHED_POD,
            format!("the pod has {}", phase.unwrap_or_default()),
        );
    }
    // An operator watching one namespace neither migrates nor evicts another's pods.
    if let Some(watched) = watched.filter(|w| *w != namespace) {
        let message = format!("the operator watches only namespace {watched}");
        return left(entry, reasons::NAMESPACE_NOT_WATCHED, message);
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let unmigratable = if spec.host_network == Some(true) {
        Some((
            reasons::HOST_NETWORK,
            "the pod uses the node's network namespace".to_owned(),
        ))
    } else if controller.is_some_and(|o| o.kind == "Job") {
        Some((reasons::JOB_POD, "a Job's pod is run again by its Job".to_owned()))
    } else if namespace == operator_namespace && pod.labels().get(NAME_LABEL).map(String::as_str) == Some("cryopod") {
        Some((
            reasons::CRYOPOD_COMPONENT,
            "cryopod does not migrate its own components".to_owned(),
        ))
    } else {
        Workload::of(pod)
            .err()
            .map(|why| (reasons::UNSUPPORTED_CONTROLLER, why))
    };
    match (unmigratable, policy) {
        (None, _) => entry,
        (Some((reason, message)), UnmigratablePolicy::Skip) => left(entry, reason, message),
        (Some((reason, message)), UnmigratablePolicy::Evict) => {
            entry.action = EvacuationAction::Evict;
            entry.reason = Some(reason.to_owned());
            entry.message = Some(message);
            entry
        }
    }
}

/// Whether a PodDisruptionBudget lets one more of its pods go now. `live_healthy` is
/// how many of its pods are Ready and not terminating right now (the budget's own
/// count can lag behind a migration that just ended); `in_flight` how many of its
/// pods this evacuation is moving.
pub fn budget_allows(budget: &PodDisruptionBudget, live_healthy: i32, in_flight: i32) -> Result<(), String> {
    let name = budget.name_any();
    let Some(status) = budget.status.as_ref() else {
        return Err(format!("PodDisruptionBudget {name} has no status yet"));
    };
    if status
        .observed_generation
        .is_some_and(|o| Some(o) < budget.metadata.generation)
    {
        return Err(format!(
            "PodDisruptionBudget {name} has not observed its latest spec yet"
        ));
    }
    let (allowed, desired) = (
        status.disruptions_allowed.unwrap_or(0),
        status.desired_healthy.unwrap_or(0),
    );
    if allowed.min(live_healthy - desired) - in_flight >= 1 {
        Ok(())
    } else {
        Err(format!(
            "PodDisruptionBudget {name} allows no more disruption now (disruptionsAllowed {allowed}, {live_healthy} healthy of {desired} desired, {in_flight} moving)"
        ))
    }
}

/// The most pods an evacuation records (the schema's bound on `status.pods`).
pub const MAX_PODS: usize = 1000;

/// An entry nothing was done to yet: still waiting its first turn, or left alone.
pub fn untouched(entry: &EvacuatedPod) -> bool {
    (entry.outcome == PodOutcome::Waiting && entry.attempts == 0) || entry.outcome == PodOutcome::Skipped
}

/// An evicted pod whose containers all stopped, though a finalizer keeps its object.
pub fn stopped(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_none_or(|c| c.iter().all(|c| c.state.as_ref().is_none_or(|s| s.running.is_none())))
}

/// A pod that is Ready and not being deleted.
pub fn healthy(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none() && crate::context::pod_ready(pod)
}

/// What a pod's PodMigration says of it: its final outcome (with reason and message)
/// once the migration ended, `Waiting` again when it was refused for its budget
/// before it touched the pod, `None` while it runs.
pub fn outcome_of_migration(migration: &PodMigration) -> Option<(PodOutcome, String, String)> {
    let status = migration.status.as_ref()?;
    let ready = find_condition(&status.conditions, CONDITION_READY);
    let (reason, message) = ready.map_or_else(
        || (String::new(), String::new()),
        |c| (c.reason.clone(), c.message.clone()),
    );
    match status.phase? {
        MigrationPhase::Succeeded => Some((PodOutcome::Migrated, reason, message)),
        MigrationPhase::Failed if reason == migration_reasons::DISRUPTION_NOT_ALLOWED => {
            Some((PodOutcome::Waiting, reasons::DISRUPTION_NOT_ALLOWED.to_owned(), message))
        }
        MigrationPhase::RolledBack | MigrationPhase::Failed => Some((PodOutcome::Failed, reason, message)),
        _ => None,
    }
}

/// The evacuation's counts of its pods' outcomes.
pub fn tally(status: &mut NodeEvacuationStatus) {
    let count = |o: PodOutcome| status.pods.iter().filter(|p| p.outcome == o).count() as i32;
    status.total = status.pods.len() as i32;
    status.migrated = count(PodOutcome::Migrated);
    status.evicted = count(PodOutcome::Evicted);
    status.skipped = count(PodOutcome::Skipped);
    status.failed = count(PodOutcome::Failed);
    status.done = status.migrated + status.evicted + status.skipped + status.failed;
}

/// How many more pods may start moving now, and the waiting ones in the order they
/// were found. Each is tried in turn until that many started: one its budget holds
/// back does not keep the others waiting.
pub fn slots_and_waiting(pods: &[EvacuatedPod], max_concurrent: i32) -> (usize, Vec<usize>) {
    let moving = pods
        .iter()
        .filter(|p| matches!(p.outcome, PodOutcome::Migrating | PodOutcome::Evicting))
        .count();
    let free = usize::try_from(max_concurrent).unwrap_or(1).saturating_sub(moving);
    let waiting = pods
        .iter()
        .enumerate()
        .filter(|(_, p)| p.outcome == PodOutcome::Waiting)
        .map(|(i, _)| i)
        .collect();
    (free, waiting)
}

/// How the evacuation ends once every pod has its outcome.
pub fn ending(status: &NodeEvacuationStatus) -> Option<(EvacuationPhase, &'static str, String)> {
    if status.pods.iter().any(|p| !p.outcome.is_final()) {
        return None;
    }
    let summary = format!(
        "{} migrated, {} evicted, {} left, {} failed",
        status.migrated, status.evicted, status.skipped, status.failed
    );
    Some(if status.failed == 0 {
        (EvacuationPhase::Succeeded, reasons::EVACUATED, summary)
    } else {
        let failed: Vec<String> = status
            .pods
            .iter()
            .filter(|p| p.outcome == PodOutcome::Failed)
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        (
            EvacuationPhase::Failed,
            reasons::PODS_FAILED,
            format!("{summary}: {}", failed.join(", ")),
        )
    })
}

/// The name of the PodMigration that moves `pod`: unique per evacuation, pod and
/// attempt, and short enough for any pod name.
pub fn migration_name(pod: &str, evacuation_uid: &str, attempt: u32) -> String {
    let hash = crate::context::stable_hash(&format!("{evacuation_uid}/{pod}/{attempt}"));
    let stem: String = pod.chars().take(40).collect();
    format!("{}-evac-{:08x}", stem.trim_end_matches(['-', '.']), hash as u32)
}

async fn write(evacuation: &NodeEvacuation, ctx: &Context, status: &NodeEvacuationStatus) -> Result<(), Error> {
    let api: Api<NodeEvacuation> = Api::all(ctx.client.clone());
    patch_status(&api, evacuation, evacuation.status.as_ref(), status, ctx).await
}

/// Reconciles one NodeEvacuation.
pub async fn reconcile(evacuation: Arc<NodeEvacuation>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.new_pass(evacuation.uid());
    let mut status = evacuation.status.clone().unwrap_or_default();
    if matches!(status.phase, Some(EvacuationPhase::Succeeded | EvacuationPhase::Failed))
        || evacuation.meta().deletion_timestamp.is_some()
    {
        return Ok(Action::await_change());
    }
    let node_name = evacuation.spec.node_name.clone();
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let Some(node) = nodes.get_opt(&node_name).await.map_err(kube_err("read the node"))? else {
        let message = format!("spec.nodeName: node {node_name} does not exist");
        status.phase = Some(EvacuationPhase::Failed);
        status.completion_time = Some(now());
        return end(&evacuation, &ctx, status, reasons::NODE_NOT_FOUND, message, false).await;
    };
    if status.phase.is_none() {
        status.phase = Some(EvacuationPhase::Evacuating);
        status.start_time = Some(now());
        ctx.metrics.started(KIND);
        let message = format!("cordoning {node_name} and moving its pods");
        set_condition(
            &mut status.conditions,
            CONDITION_READY,
            ConditionStatus::False,
            reasons::EVACUATING,
            &message,
            evacuation.metadata.generation,
            now(),
        );
        publish(
            &ctx,
            evacuation.as_ref(),
            EventType::Normal,
            reasons::EVACUATING,
            "Evacuate",
            message,
        )
        .await;
    }
    // Cordoned on every pass: someone uncordoning it mid-way would let pods back in.
    if node.spec.as_ref().and_then(|s| s.unschedulable) != Some(true) {
        let cordon = serde_json::json!({"spec": {"unschedulable": true}});
        nodes
            .patch(&node_name, &PatchParams::default(), &Patch::Merge(&cordon))
            .await
            .map_err(kube_err("cordon the node"))?;
        tracing::info!(node = %node_name, evacuation = %evacuation.name_any(), "node cordoned");
    }

    let all_pods: Api<Pod> = Api::all(ctx.client.clone());
    let on_node = all_pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node_name}")))
        .await
        .map_err(kube_err("list the node's pods"))?
        .items;
    // Pods that arrived after the start (created with a nodeName, past the cordon).
    let watched = ctx.watch_namespace.as_deref();
    for pod in &on_node {
        let uid = pod.uid().unwrap_or_default();
        // Bounded by the schema's list size; a node holds far fewer pods at once.
        if !status.pods.iter().any(|p| p.uid == uid) && status.pods.len() < MAX_PODS {
            status
                .pods
                .push(classify(pod, evacuation.spec.unmigratable, &ctx.namespace, watched));
        }
    }
    let live: HashMap<String, &Pod> = on_node.iter().map(|p| (p.uid().unwrap_or_default(), p)).collect();
    // Pods that went before anything was done to them leave no record: pods created
    // and deleted on the node over and over cannot grow the status without bound.
    status.pods.retain(|e| live.contains_key(&e.uid) || !untouched(e));

    // What happened to the pods in motion.
    for entry in status.pods.iter_mut() {
        match entry.outcome {
            PodOutcome::Migrating => follow_migration(entry, &ctx).await?,
            PodOutcome::Evicting if live.get(&entry.uid).is_none_or(|p| stopped(p)) => {
                entry.outcome = PodOutcome::Evicted;
            }
            PodOutcome::Waiting if !live.contains_key(&entry.uid) => {
                entry.outcome = PodOutcome::Skipped;
                entry.reason = Some(reasons::POD_GONE.to_owned());
                entry.message = Some("the pod was deleted or replaced before its turn".to_owned());
            }
            _ => {}
        }
    }

    // New starts, each within its budgets.
    let mut seen: BTreeMap<String, Namespaced> = BTreeMap::new();
    let (free, waiting) = slots_and_waiting(&status.pods, evacuation.spec.max_concurrent);
    let mut started = 0;
    for index in waiting {
        if started >= free {
            break;
        }
        let entry = status.pods[index].clone();
        let Some(pod) = live.get(&entry.uid) else { continue };
        if !seen.contains_key(&entry.namespace) {
            seen.insert(entry.namespace.clone(), Namespaced::read(&ctx, &entry.namespace).await?);
        }
        let around = &seen[&entry.namespace];
        let moving = moving_in(&entry.namespace, &status.pods, &around.migrations);
        if let Err(why) = within_budgets(pod, &around.budgets, &around.pods, &moving) {
            let slot = &mut status.pods[index];
            slot.reason = Some(reasons::DISRUPTION_NOT_ALLOWED.to_owned());
            slot.message = Some(why);
            continue;
        }
        let slot = &mut status.pods[index];
        match entry.action {
            EvacuationAction::Migrate => start_migration(&evacuation, slot, &ctx).await?,
            EvacuationAction::Evict => evict(slot, &ctx).await?,
            EvacuationAction::Skip => {}
        }
        if matches!(slot.outcome, PodOutcome::Migrating | PodOutcome::Evicting) {
            started += 1;
        }
    }

    tally(&mut status);
    status.observed_generation = evacuation.metadata.generation;
    if let Some((phase, reason, message)) = ending(&status) {
        status.phase = Some(phase);
        status.completion_time = Some(now());
        return end(&evacuation, &ctx, status, reason, message, true).await;
    }
    if evacuation.status.as_ref() != Some(&status) {
        write(&evacuation, &ctx, &status).await?;
    }
    Ok(Action::requeue(Duration::from_secs(2)))
}

/// What a budget decision needs of a namespace, read once a pass.
struct Namespaced {
    budgets: Vec<PodDisruptionBudget>,
    pods: Vec<Pod>,
    migrations: Vec<PodMigration>,
}

impl Namespaced {
    async fn read(ctx: &Context, namespace: &str) -> Result<Self, Error> {
        let budgets: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), namespace);
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
        let migrations: Api<PodMigration> = Api::namespaced(ctx.client.clone(), namespace);
        let all = ListParams::default();
        Ok(Self {
            budgets: budgets
                .list(&all)
                .await
                .map_err(kube_err("list PodDisruptionBudgets"))?
                .items,
            pods: pods
                .list(&all)
                .await
                .map_err(kube_err("list the namespace's pods"))?
                .items,
            migrations: migrations
                .list(&all)
                .await
                .map_err(kube_err("list the namespace's PodMigrations"))?
                .items,
        })
    }
}

/// The pods of `namespace` in motion, by name: this evacuation's moves, and every
/// PodMigration not ended yet, whoever made it (another evacuation, a user). The API
/// server's budget counts none of them: a frozen source still looks Ready.
pub fn moving_in(
    namespace: &str,
    evacuated: &[EvacuatedPod],
    migrations: &[PodMigration],
) -> std::collections::BTreeSet<String> {
    let ours = evacuated
        .iter()
        .filter(|e| e.namespace == namespace && matches!(e.outcome, PodOutcome::Migrating | PodOutcome::Evicting))
        .map(|e| e.name.clone());
    let others = migrations
        .iter()
        .filter(|m| {
            !matches!(
                m.status.as_ref().and_then(|s| s.phase),
                Some(MigrationPhase::Succeeded | MigrationPhase::Failed | MigrationPhase::RolledBack)
            )
        })
        .map(|m| m.spec.source_pod_name.clone());
    ours.chain(others).collect()
}

/// Whether every budget that selects `pod` lets it go now, counting the pods in
/// motion it selects (one no longer listed counts for every budget).
pub fn within_budgets(
    pod: &Pod,
    pdbs: &[PodDisruptionBudget],
    pods: &[Pod],
    moving: &std::collections::BTreeSet<String>,
) -> Result<(), String> {
    let labels = pod.labels().clone();
    for pdb in pdbs {
        let Some(selector) = pdb.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
            continue;
        };
        if !selects(selector, &labels) {
            continue;
        }
        let selected = |p: &Pod| selects(selector, p.labels());
        let live_healthy = pods.iter().filter(|p| selected(p) && healthy(p)).count() as i32;
        let in_flight = moving
            .iter()
            .filter(|name| {
                pods.iter()
                    .find(|p| p.metadata.name.as_deref() == Some(name.as_str()))
                    .is_none_or(selected)
            })
            .count() as i32;
        budget_allows(pdb, live_healthy, in_flight)?;
    }
    Ok(())
}

async fn follow_migration(entry: &mut EvacuatedPod, ctx: &Context) -> Result<(), Error> {
    let name = entry.migration_name.clone().unwrap_or_default();
    let migrations: Api<PodMigration> = Api::namespaced(ctx.client.clone(), &entry.namespace);
    let Some(migration) = migrations
        .get_opt(&name)
        .await
        .map_err(kube_err("read an evacuation's PodMigration"))?
    else {
        entry.outcome = PodOutcome::Failed;
        entry.reason = Some(migration_reasons::MIGRATION_FAILED.to_owned());
        entry.message = Some(format!("its PodMigration {name} was deleted"));
        return Ok(());
    };
    if let Some((outcome, reason, message)) = outcome_of_migration(&migration) {
        entry.outcome = outcome;
        entry.reason = (!reason.is_empty()).then_some(reason);
        entry.target_node_name = migration.status.as_ref().and_then(|s| s.target_node_name.clone());
        entry.message = Some(message);
        // Tried again later under a new name; the refused one stays as a record.
        if outcome == PodOutcome::Waiting {
            entry.migration_name = None;
        }
    }
    Ok(())
}

async fn start_migration(evacuation: &NodeEvacuation, entry: &mut EvacuatedPod, ctx: &Context) -> Result<(), Error> {
    let attempt = u32::try_from(entry.attempts).unwrap_or(0);
    let name = migration_name(&entry.name, &evacuation.uid().unwrap_or_default(), attempt);
    let spec = &evacuation.spec;
    let mut migration = PodMigration::new(
        &name,
        PodMigrationSpec {
            source_pod_name: entry.name.clone(),
            source_pod_uid: Some(entry.uid.clone()),
            target: spec.target.clone(),
            timeout_seconds: spec.migration_timeout_seconds,
            failure_policy: MigrationFailurePolicy::Rollback,
            storage: spec.storage.clone(),
            tcp: TcpSpec::default(),
            transfer: spec.transfer,
        },
    );
    let mut annotations = BTreeMap::new();
    if let Some(who) = crate::context::requested_by(&evacuation.metadata) {
        annotations.insert(crate::context::REQUESTED_BY.to_owned(), who.to_owned());
    }
    migration.metadata = ObjectMeta {
        name: Some(name.clone()),
        namespace: Some(entry.namespace.clone()),
        labels: Some([(EVACUATION_LABEL.to_owned(), evacuation.name_any())].into()),
        annotations: Some(annotations),
        ..ObjectMeta::default()
    };
    let migrations: Api<PodMigration> = Api::namespaced(ctx.client.clone(), &entry.namespace);
    match migrations.create(&PostParams::default(), &migration).await {
        // Already there: an operator restarted between creating it and recording it.
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(source) => {
            return Err(Error::Kube {
                action: "create an evacuation's PodMigration",
                source,
            });
        }
    }
    tracing::info!(pod = %entry.name, namespace = %entry.namespace, migration = %name, "evacuation migrates a pod");
    entry.outcome = PodOutcome::Migrating;
    entry.attempts += 1;
    entry.migration_name = Some(name);
    entry.reason = None;
    Ok(())
}

async fn evict(entry: &mut EvacuatedPod, ctx: &Context) -> Result<(), Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &entry.namespace);
    let params = EvictParams {
        delete_options: Some(DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(entry.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        }),
        ..EvictParams::default()
    };
    match pods.evict(&entry.name, &params).await {
        Ok(_) => entry.outcome = PodOutcome::Evicting,
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => entry.outcome = PodOutcome::Evicted,
        // The API server's own budget check: try again on a later pass.
        Err(kube::Error::Api(e)) if e.code == 429 => {
            entry.reason = Some(reasons::DISRUPTION_NOT_ALLOWED.to_owned());
            entry.message = Some(e.message);
        }
        Err(kube::Error::Api(e)) => {
            entry.outcome = PodOutcome::Failed;
            entry.reason = Some(reasons::EVICTION_REFUSED.to_owned());
            entry.message = Some(format!("the eviction was refused ({}): {}", e.code, e.message));
        }
        Err(source) => {
            return Err(Error::Kube {
                action: "evict a pod",
                source,
            });
        }
    }
    Ok(())
}

async fn end(
    evacuation: &NodeEvacuation,
    ctx: &Context,
    mut status: NodeEvacuationStatus,
    reason: &'static str,
    message: String,
    started: bool,
) -> Result<Action, Error> {
    let succeeded = status.phase == Some(EvacuationPhase::Succeeded);
    set_condition(
        &mut status.conditions,
        CONDITION_READY,
        if succeeded {
            ConditionStatus::True
        } else {
            ConditionStatus::False
        },
        reason,
        &message,
        evacuation.metadata.generation,
        now(),
    );
    write(evacuation, ctx, &status).await?;
    let type_ = if succeeded {
        EventType::Normal
    } else {
        EventType::Warning
    };
    tracing::info!(evacuation = %evacuation.name_any(), node = %evacuation.spec.node_name, reason, %message, "evacuation ended");
    publish(ctx, evacuation, type_, reason, KIND, message).await;
    if started {
        ctx.metrics
            .finished(KIND, if succeeded { "succeeded" } else { "failed" }, reason);
    }
    Ok(Action::await_change())
}

/// Tries again after an error; a conflict soon.
pub fn error_policy(evacuation: Arc<NodeEvacuation>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(evacuation = %evacuation.name_any(), error = %error, "NodeEvacuation reconcile failed");
    Action::requeue(crate::context::retry_after(error))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        let mut base =
            json!({"metadata": {"name": "p", "namespace": "team", "uid": "u-1"}, "spec": {"containers": []}});
        merge(&mut base, value);
        serde_json::from_value(base).unwrap()
    }

    fn merge(base: &mut serde_json::Value, patch: serde_json::Value) {
        match (base, patch) {
            (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    merge(b.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (b, p) => *b = p,
        }
    }

    fn owned_by(kind: &str) -> serde_json::Value {
        json!({"metadata": {"ownerReferences": [{"apiVersion": if kind == "Job" { "batch/v1" } else { "apps/v1" }, "kind": kind, "name": "o", "uid": "o-1", "controller": true}]}})
    }

    #[test]
    fn pods_are_migrated_evicted_or_left_by_what_they_are() {
        let classify = |p: &Pod, policy| classify(p, policy, "cryopod-system", None);
        let evict = UnmigratablePolicy::Evict;
        let cases = [
            (
                pod(json!({})),
                evict,
                EvacuationAction::Migrate,
                PodOutcome::Waiting,
                None,
            ),
            (
                pod(owned_by("ReplicaSet")),
                evict,
                EvacuationAction::Migrate,
                PodOutcome::Waiting,
                None,
            ),
            (
                pod(owned_by("StatefulSet")),
                evict,
                EvacuationAction::Migrate,
                PodOutcome::Waiting,
                None,
            ),
            (
                pod(owned_by("DaemonSet")),
                evict,
                EvacuationAction::Skip,
                PodOutcome::Skipped,
                Some(reasons::DAEMON_SET_POD),
            ),
            (
                pod(json!({"metadata": {"annotations": {MIRROR_ANNOTATION: "x"}}})),
                evict,
                EvacuationAction::Skip,
                PodOutcome::Skipped,
                Some(reasons::STATIC_POD),
            ),
            (
                pod(json!({"status": {"phase": "Succeeded"}})),
                evict,
                EvacuationAction::Skip,
                PodOutcome::Skipped,
                Some(reasons::FINISHED_POD),
            ),
            (
                pod(owned_by("Job")),
                evict,
                EvacuationAction::Evict,
                PodOutcome::Waiting,
                Some(reasons::JOB_POD),
            ),
            (
                pod(json!({"spec": {"hostNetwork": true}})),
                evict,
                EvacuationAction::Evict,
                PodOutcome::Waiting,
                Some(reasons::HOST_NETWORK),
            ),
            (
                pod(json!({"spec": {"hostNetwork": true}})),
                UnmigratablePolicy::Skip,
                EvacuationAction::Skip,
                PodOutcome::Skipped,
                Some(reasons::HOST_NETWORK),
            ),
            (
                pod(owned_by("CronThing")),
                evict,
                EvacuationAction::Evict,
                PodOutcome::Waiting,
                Some(reasons::UNSUPPORTED_CONTROLLER),
            ),
            (
                pod(json!({"metadata": {"namespace": "cryopod-system", "labels": {NAME_LABEL: "cryopod"}}})),
                evict,
                EvacuationAction::Evict,
                PodOutcome::Waiting,
                Some(reasons::CRYOPOD_COMPONENT),
            ),
        ];
        for (i, (p, policy, action, outcome, reason)) in cases.into_iter().enumerate() {
            let got = classify(&p, policy);
            assert_eq!(
                (got.action, got.outcome, got.reason.as_deref()),
                (action, outcome, reason),
                "case {i}"
            );
            assert_eq!(
                (got.namespace.as_str(), got.uid.as_str()),
                (p.namespace().unwrap().as_str(), "u-1")
            );
        }
        let watched = classify_watched();
        assert_eq!(
            (watched.action, watched.reason.as_deref()),
            (EvacuationAction::Skip, Some(reasons::NAMESPACE_NOT_WATCHED))
        );
        // The operator's namespace holds tenants' pods too (a test's, here): only
        // cryopod's own are kept from migrating.
        let neighbour = classify(&pod(json!({"metadata": {"namespace": "cryopod-system"}})), evict);
        assert_eq!(neighbour.action, EvacuationAction::Migrate);
    }

    fn classify_watched() -> EvacuatedPod {
        classify(
            &pod(json!({})),
            UnmigratablePolicy::Evict,
            "cryopod-system",
            Some("other"),
        )
    }

    fn budget(allowed: i32, desired: i32, generation: i64, observed: i64) -> PodDisruptionBudget {
        serde_json::from_value(json!({
            "metadata": {"name": "db", "generation": generation},
            "spec": {"selector": {"matchLabels": {"app": "db"}}},
            "status": {"disruptionsAllowed": allowed, "desiredHealthy": desired, "currentHealthy": desired + allowed,
                       "expectedPods": 3, "observedGeneration": observed}
        }))
        .unwrap()
    }

    #[test]
    fn a_budget_counts_the_moves_in_flight_and_the_pods_ready_now() {
        // One disruption allowed, nothing moving: go.
        assert!(budget_allows(&budget(1, 2, 1, 1), 3, 0).is_ok());
        // One allowed but one of ours already moving: wait.
        let why = budget_allows(&budget(1, 2, 1, 1), 3, 1).unwrap_err();
        assert!(
            why.contains("PodDisruptionBudget db") && why.contains("1 moving"),
            "{why}"
        );
        // The budget's count lags: a pod is not Ready now although it says one may go.
        assert!(budget_allows(&budget(1, 2, 1, 1), 2, 0).is_err());
        // Nothing allowed.
        assert!(budget_allows(&budget(0, 3, 1, 1), 3, 0).is_err());
        // A spec change not yet observed.
        assert!(
            budget_allows(&budget(1, 2, 2, 1), 3, 0)
                .unwrap_err()
                .contains("not observed")
        );
        let mut none = budget(1, 2, 1, 1);
        none.status = None;
        assert!(budget_allows(&none, 3, 0).unwrap_err().contains("no status"));
    }

    fn entry(name: &str, outcome: PodOutcome) -> EvacuatedPod {
        EvacuatedPod {
            namespace: "team".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            outcome,
            ..EvacuatedPod::default()
        }
    }

    #[test]
    fn every_unfinished_migration_of_the_namespace_counts_against_a_budget() {
        let web = |name: &str| {
            pod(json!({"metadata": {"name": name, "labels": {"app": "db"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}}))
        };
        let pods = [web("db-0"), web("db-1"), web("db-2")];
        // Another actor's migration of db-1 is under way; ours of nothing.
        let theirs: PodMigration = serde_json::from_value(json!({
            "apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration",
            "metadata": {"name": "by-hand", "namespace": "team"}, "spec": {"sourcePodName": "db-1"},
            "status": {"phase": "Restoring"}}))
        .unwrap();
        let mut done = theirs.clone();
        done.spec.source_pod_name = "db-2".into();
        done.status.as_mut().unwrap().phase = Some(MigrationPhase::Succeeded);
        let moving = moving_in("team", &[], &[theirs, done]);
        assert_eq!(moving.iter().collect::<Vec<_>>(), ["db-1"]);
        // One disruption allowed, already taken by the other migration: db-0 waits.
        let why = within_budgets(&pods[0], &[budget(1, 2, 1, 1)], &pods, &moving).unwrap_err();
        assert!(why.contains("1 moving"), "{why}");
        assert!(within_budgets(&pods[0], &[budget(1, 2, 1, 1)], &pods, &Default::default()).is_ok());
    }

    #[test]
    fn entries_nothing_was_done_to_leave_no_record_once_their_pod_is_gone() {
        let mut tried = entry("b", PodOutcome::Waiting);
        tried.attempts = 1;
        assert!(untouched(&entry("a", PodOutcome::Waiting)));
        assert!(untouched(&entry("s", PodOutcome::Skipped)));
        assert!(!untouched(&tried));
        assert!(!untouched(&entry("m", PodOutcome::Migrating)));
        // An evicted pod held by a finalizer counts as evicted once nothing runs.
        let terminating = |running: bool| {
            pod(json!({"metadata": {"deletionTimestamp": "2026-12-04T00:00:00Z"},
                "status": {"containerStatuses": [{"name": "app", "image": "i", "imageID": "", "ready": false,
                    "restartCount": 0, "state": if running { json!({"running": {}}) } else { json!({"terminated": {"exitCode": 0}}) }}]}}))
        };
        assert!(stopped(&terminating(false)));
        assert!(!stopped(&terminating(true)));
        assert!(!stopped(&pod(json!({}))));
    }

    #[test]
    fn starts_fill_the_free_slots_in_order() {
        let pods = [
            entry("a", PodOutcome::Migrated),
            entry("b", PodOutcome::Migrating),
            entry("c", PodOutcome::Waiting),
            entry("d", PodOutcome::Waiting),
            entry("e", PodOutcome::Waiting),
        ];
        // Every waiting pod is a candidate: one its budget holds back leaves its
        // slot to the next.
        assert_eq!(slots_and_waiting(&pods, 1), (0, vec![2, 3, 4]));
        assert_eq!(slots_and_waiting(&pods, 3), (2, vec![2, 3, 4]));
        assert_eq!(slots_and_waiting(&pods, 16).0, 15);
    }

    #[test]
    fn an_evacuation_ends_when_every_pod_has_its_outcome() {
        let mut status = NodeEvacuationStatus {
            pods: vec![entry("a", PodOutcome::Migrated), entry("b", PodOutcome::Evicting)],
            ..Default::default()
        };
        tally(&mut status);
        assert_eq!((status.total, status.done), (2, 1));
        assert!(ending(&status).is_none());
        status.pods[1].outcome = PodOutcome::Skipped;
        tally(&mut status);
        let (phase, reason, message) = ending(&status).unwrap();
        assert_eq!((phase, reason), (EvacuationPhase::Succeeded, reasons::EVACUATED));
        assert_eq!(message, "1 migrated, 0 evicted, 1 left, 0 failed");
        status.pods[1].outcome = PodOutcome::Failed;
        tally(&mut status);
        let (phase, reason, message) = ending(&status).unwrap();
        assert_eq!((phase, reason), (EvacuationPhase::Failed, reasons::PODS_FAILED));
        assert!(message.ends_with("1 failed: team/b"), "{message}");
    }

    fn migration(phase: MigrationPhase, reason: &str) -> PodMigration {
        serde_json::from_value(json!({
            "apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration",
            "metadata": {"name": "m", "namespace": "team"},
            "spec": {"sourcePodName": "p"},
            "status": {"phase": phase, "targetNodeName": "node-2", "conditions": [{
                "type": "Ready", "status": "False", "reason": reason, "message": "why",
                "lastTransitionTime": "2026-12-04T00:00:00Z"}]}
        }))
        .unwrap()
    }

    #[test]
    fn a_migrations_end_is_the_pods_outcome() {
        assert!(outcome_of_migration(&migration(MigrationPhase::Restoring, "MigrationInProgress")).is_none());
        let (o, r, _) = outcome_of_migration(&migration(MigrationPhase::Succeeded, "MigrationCompleted")).unwrap();
        assert_eq!((o, r.as_str()), (PodOutcome::Migrated, "MigrationCompleted"));
        let (o, r, _) = outcome_of_migration(&migration(MigrationPhase::RolledBack, "RolledBack")).unwrap();
        assert_eq!((o, r.as_str()), (PodOutcome::Failed, "RolledBack"));
        let (o, r, _) = outcome_of_migration(&migration(MigrationPhase::Failed, "SourceResumed")).unwrap();
        assert_eq!((o, r.as_str()), (PodOutcome::Failed, "SourceResumed"));
        // Refused for its budget before it touched the pod: the pod waits its turn again.
        let (o, r, _) = outcome_of_migration(&migration(MigrationPhase::Failed, "DisruptionNotAllowed")).unwrap();
        assert_eq!((o, r.as_str()), (PodOutcome::Waiting, reasons::DISRUPTION_NOT_ALLOWED));
    }

    #[test]
    fn migration_names_are_unique_per_attempt_and_valid() {
        let long = "a".repeat(200);
        let a = migration_name(&long, "evac-uid", 0);
        assert!(a.len() <= 63 && a.starts_with("aaaa") && a.contains("-evac-"), "{a}");
        assert_ne!(a, migration_name(&long, "evac-uid", 1));
        assert_ne!(a, migration_name(&long, "other-uid", 0));
        assert_eq!(a, migration_name(&long, "evac-uid", 0));
    }
}
