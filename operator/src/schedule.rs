//! The CheckpointSchedule controller. At each time its cron expression names (UTC),
//! it creates a PodCheckpoint of every Running pod its selector picks, then sleeps
//! (requeues) until the next one.
//!
//! - Idempotent runs: a checkpoint's name is derived from the schedule's UID, the
//!   pod and the scheduled minute, and `status.lastScheduleTime` is written (with a
//!   resourceVersion precondition) only after every create; an operator that stops
//!   in between creates the same names again, which the API server refuses (409).
//! - Missed runs: when several times passed unseen (the operator was down, the
//!   schedule suspended), only the latest runs, and only within
//!   `startingDeadlineSeconds` when that is set, as a CronJob does.
//! - keepLast: each checkpoint carries `retention.keepLast`, and the checkpoint
//!   controller counts a schedule's checkpoints only among that schedule's (see
//!   `checkpoint::retention_group`). Failed ones are never Ready, so this controller
//!   keeps the newest `keepLast` failed ones per pod and deletes the rest.
//!
//! The checkpoints are owned by the schedule (garbage-collected with it) and carry
//! its `cryopod.io/requested-by`, so they are asked for by the schedule's user.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cryopod_crds::common::{CONDITION_READY, ConditionStatus, find_condition, set_condition};
use cryopod_crds::v1alpha1::{
    CheckpointPhase, CheckpointSchedule, CheckpointScheduleSpec, CheckpointScheduleStatus, PodCheckpoint,
    PodCheckpointSpec, PostCheckpointState, RetentionSpec, SCHEDULE_LABEL, ScheduledPod, schedule_reasons as reasons,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use crate::context::{Context, Error, Operation, kube_err, publish, stable_hash, write_status};
use crate::cron::Cron;
use crate::workload::selects;

const KIND: &str = "CheckpointSchedule";

/// The longest a schedule sleeps between looks, whatever its next time: a safety
/// net, and within what the runtime's timers accept.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

impl Operation for CheckpointSchedule {
    type Status = CheckpointScheduleStatus;
    const KIND: &'static str = KIND;
    fn status(&self) -> Option<&CheckpointScheduleStatus> {
        self.status.as_ref()
    }
    fn conditions(status: &mut CheckpointScheduleStatus) -> &mut Vec<Condition> {
        &mut status.conditions
    }
    // A schedule has no failed phase: its Ready condition says why it does not run.
    fn set_failed(status: &mut CheckpointScheduleStatus, _: Time, generation: Option<i64>) {
        status.observed_generation = generation;
    }
}

/// What a schedule does now, decided from its spec, its last run and the clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Create the checkpoints of this scheduled time now.
    pub run: Option<Timestamp>,
    /// `status.lastScheduleTime` after this pass.
    pub last: Option<Timestamp>,
    /// `status.nextScheduleTime`: when to look again.
    pub next: Option<Timestamp>,
    /// The `Ready` condition: whether it holds, its reason and message.
    pub ready: (ConditionStatus, &'static str, String),
}

/// Decides a pass of the schedule at `now`. `last` is the last time it ran (or
/// skipped), `created` when the schedule was created: times before it are not runs.
pub fn plan(spec: &CheckpointScheduleSpec, last: Option<Timestamp>, created: Timestamp, now: Timestamp) -> Plan {
    let idle = |reason, message: String| Plan {
        run: None,
        last,
        next: None,
        ready: (ConditionStatus::False, reason, message),
    };
    let cron: Cron = match spec.schedule.parse() {
        Ok(cron) => cron,
        Err(e) => return idle(reasons::INVALID_SCHEDULE, format!("spec.schedule: {e}")),
    };
    let Some(next) = cron.next_after(now) else {
        return idle(
            reasons::INVALID_SCHEDULE,
            format!(
                "spec.schedule: {:?} names no time in the next nine years",
                spec.schedule
            ),
        );
    };
    if spec.suspend {
        return idle(
            reasons::SUSPENDED,
            "spec.suspend is true: no checkpoints are created".to_owned(),
        );
    }
    let since = last.map_or(created, |l| l.max(created));
    let due = cron.latest_at_or_before(now).filter(|due| *due > since);
    let late = |due: Timestamp| {
        spec.starting_deadline_seconds
            .is_some_and(|deadline| now.as_second() - due.as_second() > deadline)
    };
    let (run, last, note) = match due {
        None => (None, last, String::new()),
        Some(due) if late(due) => (
            None,
            Some(due),
            format!("; the run at {due} was missed by more than startingDeadlineSeconds and skipped"),
        ),
        Some(due) => (Some(due), Some(due), String::new()),
    };
    Plan {
        run,
        last,
        next: Some(next),
        ready: (
            ConditionStatus::True,
            reasons::SCHEDULED,
            format!("next run at {next}{note}"),
        ),
    }
}

/// How long to sleep from `now` until `next`, within one second and `MAX_SLEEP`.
pub fn sleep_until(next: Option<Timestamp>, now: Timestamp) -> Duration {
    next.map_or(MAX_SLEEP, |next| {
        let millis = next.as_millisecond().saturating_sub(now.as_millisecond());
        Duration::from_millis(u64::try_from(millis).unwrap_or(0)).clamp(Duration::from_secs(1), MAX_SLEEP)
    })
}

/// The name of the checkpoint of `pod` for the run at `at`: the same on every try
/// (so a run is created once), unique per schedule (by UID), pod and minute, and a
/// valid label value (63 characters) for any names.
pub fn checkpoint_name(schedule: &str, schedule_uid: &str, pod: &str, at: Timestamp) -> String {
    let hash = stable_hash(&format!("{schedule_uid}/{pod}/{}", at.as_second()));
    let stem: String = format!("{schedule}-{pod}").chars().take(40).collect();
    format!(
        "{}-{}-{:08x}",
        stem.trim_end_matches(['-', '.']),
        at.strftime("%Y%m%d%H%M"),
        hash as u32
    )
}

/// Whether a pod is one to checkpoint: picked by the selector, Running, not going.
pub fn eligible(spec: &CheckpointScheduleSpec, pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        && selects(&spec.selector, pod.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()))
}

/// One of the schedule's checkpoints, as the summary reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Made {
    /// Its name.
    pub name: String,
    /// Its pod.
    pub pod: String,
    /// When it was created, in seconds.
    pub created: i64,
    /// Its phase.
    pub phase: Option<CheckpointPhase>,
}

/// The pods with a checkpoint of the schedule that has not ended (neither Ready nor
/// Failed).
pub fn busy_pods(made: &[Made]) -> std::collections::BTreeSet<String> {
    made.iter()
        .filter(|m| !matches!(m.phase, Some(CheckpointPhase::Ready | CheckpointPhase::Failed)))
        .map(|m| m.pod.clone())
        .collect()
}

/// Each pod's checkpoints of the schedule, by pod name, and the failed ones beyond
/// the newest `keep` of each pod, to delete.
pub fn summarize(mut made: Vec<Made>, keep: usize) -> (Vec<ScheduledPod>, Vec<String>) {
    // Newest first; names carry the minute, so they order runs of the same second.
    made.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| b.name.cmp(&a.name)));
    let mut pods: BTreeMap<String, ScheduledPod> = BTreeMap::new();
    let mut extra = Vec::new();
    for m in made {
        let entry = pods.entry(m.pod.clone()).or_insert_with(|| ScheduledPod {
            pod_name: m.pod.clone(),
            last_checkpoint_name: Some(m.name.clone()),
            ..ScheduledPod::default()
        });
        match m.phase {
            Some(CheckpointPhase::Ready) => entry.ready += 1,
            Some(CheckpointPhase::Failed) if (entry.failed as usize) < keep => entry.failed += 1,
            Some(CheckpointPhase::Failed) => extra.push(m.name),
            _ => {}
        }
    }
    (pods.into_values().collect(), extra)
}

/// The checkpoint a run makes of `pod`.
pub fn checkpoint_for(schedule: &CheckpointSchedule, pod: &Pod, at: Timestamp) -> PodCheckpoint {
    let pod_name = pod.name_any();
    let name = checkpoint_name(&schedule.name_any(), &schedule.uid().unwrap_or_default(), &pod_name, at);
    let template = &schedule.spec.checkpoint_template;
    let mut checkpoint = PodCheckpoint::new(
        &name,
        PodCheckpointSpec {
            source_pod_name: pod_name,
            // The pod seen now: a replacement before the agent acts is refused.
            source_pod_uid: pod.uid(),
            timeout_seconds: template.timeout_seconds,
            max_freeze_seconds: template.max_freeze_seconds,
            storage: template.storage.clone(),
            post_checkpoint_state: PostCheckpointState::Running,
            tcp: template.tcp,
            hooks: None,
            encryption: template.encryption.clone(),
            retention: Some(RetentionSpec {
                ttl_seconds: None,
                keep_last: Some(schedule.spec.keep_last),
            }),
        },
    );
    // Asked for by whoever asked for the schedule.
    let annotations: BTreeMap<String, String> = crate::context::requested_by(&schedule.metadata)
        .map(|who| (crate::context::REQUESTED_BY.to_owned(), who.to_owned()))
        .into_iter()
        .collect();
    checkpoint.metadata = ObjectMeta {
        name: Some(name),
        namespace: schedule.namespace(),
        labels: Some([(SCHEDULE_LABEL.to_owned(), schedule.name_any())].into()),
        annotations: Some(annotations).filter(|a| !a.is_empty()),
        owner_references: Some(vec![OwnerReference {
            api_version: "cryopod.io/v1alpha1".into(),
            kind: KIND.into(),
            name: schedule.name_any(),
            uid: schedule.uid().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]),
        ..ObjectMeta::default()
    };
    checkpoint
}

/// Reconciles one CheckpointSchedule.
pub async fn reconcile(schedule: Arc<CheckpointSchedule>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.new_pass(schedule.uid());
    if schedule.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = schedule.namespace().unwrap_or_default();
    let name = schedule.name_any();
    let old = schedule.status.clone().unwrap_or_default();
    let now = Timestamp::now();
    let created = schedule.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0);
    let plan = plan(
        &schedule.spec,
        old.last_schedule_time.as_ref().map(|t| t.0),
        created,
        now,
    );

    if let Some(at) = plan.run {
        let made = run(&schedule, &ctx, at).await?;
        tracing::info!(checkpointschedule = %name, namespace = %ns, %at, made, "scheduled run");
        publish(
            &ctx,
            schedule.as_ref(),
            EventType::Normal,
            reasons::SCHEDULED,
            "Checkpoint",
            format!("created {made} PodCheckpoints for the run at {at}"),
        )
        .await;
    }

    let checkpoints: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &ns);
    let made = made_by(&schedule, ctx.as_ref()).await?;
    let keep = usize::try_from(schedule.spec.keep_last).unwrap_or(1).max(1);
    let (pods, extra) = summarize(made, keep);
    for failed in extra {
        tracing::info!(podcheckpoint = %failed, namespace = %ns, keep, "deleting a failed checkpoint beyond keepLast");
        match checkpoints.delete(&failed, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(Error::Kube {
                    action: "delete a schedule's failed PodCheckpoint",
                    source,
                });
            }
        }
    }

    let mut status = CheckpointScheduleStatus {
        last_schedule_time: plan.last.map(Time),
        next_schedule_time: plan.next.map(Time),
        pods,
        conditions: old.conditions.clone(),
        observed_generation: schedule.metadata.generation,
    };
    let (ready, reason, message) = plan.ready;
    let changed_reason = find_condition(&old.conditions, CONDITION_READY).is_none_or(|c| c.reason != reason);
    set_condition(
        &mut status.conditions,
        CONDITION_READY,
        ready,
        reason,
        &message,
        schedule.metadata.generation,
        Time(now),
    );
    if status != old {
        write_status(schedule.as_ref(), &ctx, &status).await?;
    }
    // Once per change of state, not once per look.
    if changed_reason && reason != reasons::SCHEDULED {
        tracing::info!(checkpointschedule = %name, namespace = %ns, reason, %message, "schedule not running");
        publish(&ctx, schedule.as_ref(), EventType::Warning, reason, KIND, message).await;
    }
    Ok(match plan.next {
        Some(_) => Action::requeue(sleep_until(plan.next, now)),
        None => Action::await_change(),
    })
}

/// The schedule's checkpoints: labelled with its name and controlled by it (the
/// label alone could be anyone's).
async fn made_by(schedule: &CheckpointSchedule, ctx: &Context) -> Result<Vec<Made>, Error> {
    let checkpoints: Api<PodCheckpoint> =
        Api::namespaced(ctx.client.clone(), &schedule.namespace().unwrap_or_default());
    let uid = schedule.uid().unwrap_or_default();
    Ok(checkpoints
        .list(&ListParams::default().labels(&format!("{SCHEDULE_LABEL}={}", schedule.name_any())))
        .await
        .map_err(kube_err("list a schedule's PodCheckpoints"))?
        .items
        .into_iter()
        .filter(|c| crate::checkpoint::retention_group(c).as_deref() == Some(uid.as_str()))
        .map(|c| Made {
            name: c.name_any(),
            pod: c.spec.source_pod_name.clone(),
            created: c.metadata.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second()),
            phase: c.status.as_ref().and_then(|s| s.phase),
        })
        .collect())
}

/// Creates the run's checkpoint of each eligible pod; returns how many it created
/// (ones already there, from an earlier try of the same run, are not counted).
async fn run(schedule: &CheckpointSchedule, ctx: &Context, at: Timestamp) -> Result<usize, Error> {
    let ns = schedule.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &ns);
    // A pod whose checkpoint of an earlier run has not ended is skipped this run, as
    // a CronJob's Forbid policy does: runs never pile up behind a slow one.
    let busy = busy_pods(&made_by(schedule, ctx).await?);
    let mut made = 0;
    for pod in pods
        .list(&ListParams::default())
        .await
        .map_err(kube_err("list the pods of a schedule's namespace"))?
        .items
        .iter()
        .filter(|p| eligible(&schedule.spec, p))
    {
        if busy.contains(&pod.name_any()) {
            tracing::info!(pod = %pod.name_any(), namespace = %ns, "skipped: its checkpoint of an earlier run has not ended");
            continue;
        }
        let checkpoint = checkpoint_for(schedule, pod, at);
        match checkpoints.create(&PostParams::default(), &checkpoint).await {
            Ok(_) => made += 1,
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            // Refused for this pod alone (a quota, a policy): the others still run.
            Err(kube::Error::Api(e)) if (400..500).contains(&e.code) && e.code != 429 => {
                publish(
                    ctx,
                    schedule,
                    EventType::Warning,
                    reasons::SCHEDULED,
                    "Checkpoint",
                    format!(
                        "PodCheckpoint {} of pod {} was refused ({}): {}",
                        checkpoint.name_any(),
                        pod.name_any(),
                        e.code,
                        e.message
                    ),
                )
                .await;
            }
            Err(source) => {
                return Err(Error::Kube {
                    action: "create a schedule's PodCheckpoint",
                    source,
                });
            }
        }
    }
    Ok(made)
}

/// Tries again after an error; a conflict soon.
pub fn error_policy(schedule: Arc<CheckpointSchedule>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(checkpointschedule = %schedule.name_any(), namespace = ?schedule.namespace(), %error, "CheckpointSchedule reconcile failed");
    Action::requeue(crate::context::retry_after(error))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn spec(schedule: &str, suspend: bool, deadline: Option<i64>) -> CheckpointScheduleSpec {
        serde_json::from_value(json!({
            "schedule": schedule, "suspend": suspend, "startingDeadlineSeconds": deadline,
            "selector": {"matchLabels": {"app": "db"}}, "keepLast": 2
        }))
        .unwrap()
    }

    #[test]
    fn a_pass_runs_the_latest_due_time_once() {
        let created = at("2026-03-01T09:00:30Z");
        let hourly = spec("0 * * * *", false, None);
        // Nothing due yet since the creation: sleep until the next hour.
        let p = plan(&hourly, None, created, at("2026-03-01T09:30:00Z"));
        assert_eq!((p.run, p.last), (None, None));
        assert_eq!(p.next, Some(at("2026-03-01T10:00:00Z")));
        assert_eq!((p.ready.0, p.ready.1), (ConditionStatus::True, reasons::SCHEDULED));
        // Due: run it, and record it.
        let p = plan(&hourly, None, created, at("2026-03-01T10:00:02Z"));
        assert_eq!(p.run, Some(at("2026-03-01T10:00:00Z")));
        assert_eq!(p.last, p.run);
        assert_eq!(p.next, Some(at("2026-03-01T11:00:00Z")));
        // Recorded: not again.
        let p = plan(&hourly, p.last, created, at("2026-03-01T10:20:00Z"));
        assert_eq!(p.run, None);
        assert_eq!(p.last, Some(at("2026-03-01T10:00:00Z")));
    }

    #[test]
    fn of_several_missed_runs_only_the_latest_runs_within_the_deadline() {
        let created = at("2026-03-01T00:00:00Z");
        let last = Some(at("2026-03-01T10:00:00Z"));
        let now = at("2026-03-01T14:10:00Z");
        // Four runs missed (11:00 to 14:00): only 14:00.
        let p = plan(&spec("0 * * * *", false, None), last, created, now);
        assert_eq!(p.run, Some(at("2026-03-01T14:00:00Z")));
        // 14:00 is 600 s late: within a deadline of 600 s, not one of 300 s.
        let p = plan(&spec("0 * * * *", false, Some(600)), last, created, now);
        assert_eq!(p.run, Some(at("2026-03-01T14:00:00Z")));
        let p = plan(&spec("0 * * * *", false, Some(300)), last, created, now);
        assert_eq!(p.run, None);
        // Skipped, but recorded, so it is not looked at again.
        assert_eq!(p.last, Some(at("2026-03-01T14:00:00Z")));
        assert!(p.ready.2.contains("skipped"), "{}", p.ready.2);
    }

    #[test]
    fn suspended_and_invalid_schedules_do_not_run() {
        let created = at("2026-03-01T00:00:00Z");
        let now = at("2026-03-01T10:00:10Z");
        let table = [
            (spec("0 * * * *", true, None), reasons::SUSPENDED, "spec.suspend"),
            (
                spec("61 * * * *", false, None),
                reasons::INVALID_SCHEDULE,
                "spec.schedule: minute: 61 is out of range 0-59",
            ),
            (
                spec("0 0 30 2 *", false, None),
                reasons::INVALID_SCHEDULE,
                "spec.schedule: \"0 0 30 2 *\" names no time",
            ),
        ];
        for (spec, reason, message) in table {
            let p = plan(&spec, None, created, now);
            assert_eq!((p.run, p.next), (None, None), "{}", spec.schedule);
            assert_eq!((p.ready.0, p.ready.1), (ConditionStatus::False, reason));
            assert!(p.ready.2.starts_with(message), "{}", p.ready.2);
        }
    }

    #[test]
    fn the_sleep_lasts_until_the_next_run_within_bounds() {
        let now = at("2026-03-01T10:00:00Z");
        assert_eq!(
            sleep_until(Some(at("2026-03-01T10:00:30Z")), now),
            Duration::from_secs(30)
        );
        assert_eq!(sleep_until(Some(now), now), Duration::from_secs(1));
        assert_eq!(sleep_until(Some(at("2027-01-01T00:00:00Z")), now), MAX_SLEEP);
        assert_eq!(sleep_until(None, now), MAX_SLEEP);
    }

    #[test]
    fn checkpoint_names_are_stable_unique_and_valid_labels() {
        let t = at("2026-03-01T10:05:00Z");
        let a = checkpoint_name("nightly", "uid-1", "db-0", t);
        assert!(a.starts_with("nightly-db-0-202603011005-"), "{a}");
        assert_eq!(a, checkpoint_name("nightly", "uid-1", "db-0", t));
        assert_ne!(a, checkpoint_name("nightly", "uid-2", "db-0", t));
        assert_ne!(a, checkpoint_name("nightly", "uid-1", "db-1", t));
        assert_ne!(
            a,
            checkpoint_name("nightly", "uid-1", "db-0", at("2026-03-01T10:06:00Z"))
        );
        let long = checkpoint_name(&"s".repeat(63), "uid-1", &"p".repeat(200), t);
        assert!(long.len() <= 63, "{long}");
        // Two long pod names that share the first 40 characters still differ.
        let other = checkpoint_name(&"s".repeat(63), "uid-1", &format!("{}x", "p".repeat(199)), t);
        assert_ne!(long, other);
    }

    fn pod(labels: serde_json::Value, phase: &str, deleting: bool) -> Pod {
        let mut value = json!({"metadata": {"name": "p", "labels": labels}, "status": {"phase": phase}});
        if deleting {
            value["metadata"]["deletionTimestamp"] = json!("2026-03-01T00:00:00Z");
        }
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn only_running_pods_the_selector_picks_are_checkpointed() {
        let s = spec("* * * * *", false, None);
        assert!(eligible(&s, &pod(json!({"app": "db"}), "Running", false)));
        assert!(!eligible(&s, &pod(json!({"app": "web"}), "Running", false)));
        assert!(!eligible(&s, &pod(json!({}), "Running", false)));
        assert!(!eligible(&s, &pod(json!({"app": "db"}), "Pending", false)));
        assert!(!eligible(&s, &pod(json!({"app": "db"}), "Running", true)));
    }

    fn made(name: &str, pod: &str, created: i64, phase: Option<CheckpointPhase>) -> Made {
        Made {
            name: name.into(),
            pod: pod.into(),
            created,
            phase,
        }
    }

    #[test]
    fn a_pod_whose_last_run_has_not_ended_is_skipped() {
        use CheckpointPhase::{Checkpointing, Failed, Pending, Ready};
        let busy = busy_pods(&[
            made("a-1", "a", 1, Some(Ready)),
            made("b-1", "b", 1, Some(Pending)),
            made("c-1", "c", 1, Some(Failed)),
            made("d-1", "d", 1, Some(Checkpointing)),
            made("e-1", "e", 1, None),
        ]);
        assert_eq!(busy.iter().collect::<Vec<_>>(), ["b", "d", "e"]);
    }

    #[test]
    fn the_summary_counts_each_pod_and_drops_failures_beyond_keep_last() {
        use CheckpointPhase::{Checkpointing, Failed, Ready};
        let (pods, extra) = summarize(
            vec![
                made("a-1", "a", 1, Some(Ready)),
                made("a-2", "a", 2, Some(Failed)),
                made("a-3", "a", 3, Some(Failed)),
                made("a-4", "a", 4, Some(Failed)),
                made("a-5", "a", 5, Some(Checkpointing)),
                made("b-1", "b", 1, Some(Ready)),
            ],
            2,
        );
        assert_eq!(
            pods,
            [
                ScheduledPod {
                    pod_name: "a".into(),
                    last_checkpoint_name: Some("a-5".into()),
                    ready: 1,
                    failed: 2,
                },
                ScheduledPod {
                    pod_name: "b".into(),
                    last_checkpoint_name: Some("b-1".into()),
                    ready: 1,
                    failed: 0,
                },
            ]
        );
        assert_eq!(extra, ["a-2"]);
    }

    #[test]
    fn a_runs_checkpoint_is_the_schedules_on_behalf_of_its_requester() {
        let schedule: CheckpointSchedule = serde_json::from_value(json!({
            "apiVersion": "cryopod.io/v1alpha1", "kind": "CheckpointSchedule",
            "metadata": {"name": "nightly", "namespace": "team", "uid": "s-uid",
                         "annotations": {"cryopod.io/requested-by": "alice", "other": "x"}},
            "spec": {"schedule": "@daily", "selector": {}, "keepLast": 3,
                     "checkpointTemplate": {"storage": "s3", "timeoutSeconds": 60}}
        }))
        .unwrap();
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "db-0", "uid": "p-uid"}})).unwrap();
        let cp = checkpoint_for(&schedule, &pod, at("2026-03-01T00:00:00Z"));
        assert_eq!(cp.namespace().as_deref(), Some("team"));
        assert_eq!(cp.labels().get(SCHEDULE_LABEL).map(String::as_str), Some("nightly"));
        assert_eq!(
            cp.annotations(),
            &BTreeMap::from([("cryopod.io/requested-by".to_owned(), "alice".to_owned())])
        );
        assert_eq!(crate::checkpoint::retention_group(&cp).as_deref(), Some("s-uid"));
        assert_eq!(
            (cp.spec.source_pod_name.as_str(), cp.spec.source_pod_uid.as_deref()),
            ("db-0", Some("p-uid"))
        );
        assert_eq!((cp.spec.storage.as_deref(), cp.spec.timeout_seconds), (Some("s3"), 60));
        assert_eq!(cp.spec.retention.and_then(|r| r.keep_last), Some(3));
        assert_eq!(cp.spec.post_checkpoint_state, PostCheckpointState::Running);
    }
}
