//! What an operation's status says, read from the object as JSON so fields the
//! operator adds later (`status.stage`, `status.progress`, the `SourceFrozen`
//! condition) are shown when present and never required.

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

/// The kinds the plugin creates and follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// PodCheckpoint.
    Checkpoint,
    /// PodRestore.
    Restore,
    /// PodMigration.
    Migration,
    /// NodeEvacuation (cluster-scoped).
    Evacuation,
}

impl Kind {
    /// Every kind, in the order `status` lists them.
    pub const ALL: [Kind; 4] = [Kind::Evacuation, Kind::Migration, Kind::Checkpoint, Kind::Restore];

    /// As kubectl names a resource: `podmigration.cryopod.io`.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Checkpoint => "podcheckpoint.cryopod.io",
            Kind::Restore => "podrestore.cryopod.io",
            Kind::Migration => "podmigration.cryopod.io",
            Kind::Evacuation => "nodeevacuation.cryopod.io",
        }
    }

    /// The short form for tables: `podmigration/move`.
    pub fn short(self) -> &'static str {
        match self {
            Kind::Checkpoint => "podcheckpoint",
            Kind::Restore => "podrestore",
            Kind::Migration => "podmigration",
            Kind::Evacuation => "nodeevacuation",
        }
    }

    /// Whether `phase` is the kind's success.
    fn succeeded(self, phase: &str) -> bool {
        match self {
            Kind::Checkpoint | Kind::Restore => phase == "Ready",
            Kind::Migration | Kind::Evacuation => phase == "Succeeded",
        }
    }

    /// Whether `phase` is one of the kind's failures.
    fn failed(self, phase: &str) -> bool {
        match self {
            Kind::Migration => matches!(phase, "Failed" | "RolledBack"),
            Kind::Checkpoint | Kind::Restore | Kind::Evacuation => phase == "Failed",
        }
    }
}

/// An operation as observed once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// `status.phase`.
    pub phase: Option<String>,
    /// `status.stage`: the agent's stage, when the operator reports it.
    pub stage: Option<String>,
    /// `status.progress.bytesDone`.
    pub bytes_done: Option<u64>,
    /// `status.progress.bytesTotal`.
    pub bytes_total: Option<u64>,
    /// When the source was frozen, while the `SourceFrozen` condition is True.
    pub frozen_since: Option<Timestamp>,
    /// The `Ready` condition's reason and message.
    pub reason: Option<String>,
    /// See `reason`.
    pub message: Option<String>,
    /// NodeEvacuation: pods with a final outcome, and all of them.
    pub done_of: Option<(i64, i64)>,
}

fn text(value: &Value, pointer: &str) -> Option<String> {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn condition<'a>(value: &'a Value, type_: &str) -> Option<&'a Value> {
    value
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(type_))
}

/// Reads what the plugin shows from an object serialized as JSON.
pub fn observe(value: &Value) -> Observed {
    let ready = condition(value, "Ready");
    let frozen = condition(value, "SourceFrozen")
        .filter(|c| c.get("status").and_then(Value::as_str) == Some("True"))
        .and_then(|c| c.get("lastTransitionTime")?.as_str()?.parse::<Timestamp>().ok());
    let count = |p: &str| value.pointer(p).and_then(Value::as_i64);
    Observed {
        phase: text(value, "/status/phase"),
        stage: text(value, "/status/stage"),
        bytes_done: value.pointer("/status/progress/bytesDone").and_then(Value::as_u64),
        bytes_total: value.pointer("/status/progress/bytesTotal").and_then(Value::as_u64),
        frozen_since: frozen,
        reason: ready.and_then(|c| text(c, "/reason")),
        message: ready.and_then(|c| text(c, "/message")),
        done_of: value
            .pointer("/status/total")
            .and_then(Value::as_i64)
            .map(|total| (count("/status/done").unwrap_or(0), total)),
    }
}

/// How an operation stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not over yet.
    Running,
    /// Over and done.
    Succeeded,
    /// Over, failed: the `Ready` condition's reason and message (or the phase).
    Failed {
        /// The reason, machine-readable (`SourceResumed`).
        reason: String,
        /// What happened.
        message: String,
    },
}

/// The outcome of `kind` as observed.
pub fn outcome(kind: Kind, observed: &Observed) -> Outcome {
    let Some(phase) = observed.phase.as_deref() else {
        return Outcome::Running;
    };
    if kind.succeeded(phase) {
        Outcome::Succeeded
    } else if kind.failed(phase) {
        Outcome::Failed {
            reason: observed.reason.clone().unwrap_or_else(|| phase.to_owned()),
            message: observed.message.clone().unwrap_or_else(|| format!("it ended {phase}")),
        }
    } else {
        Outcome::Running
    }
}

/// The error line of a failed operation, as kubectl would say it (after `error: `).
pub fn failure_message(kind: Kind, name: &str, reason: &str, message: &str) -> String {
    format!("{}/{name} failed: {reason}: {message}", kind.short())
}

/// Bytes in binary units, as kubectl shows quantities.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A duration as kubectl's ages read: `850ms`, `12.3s`, `4m05s`.
pub fn human_duration(millis: i64) -> String {
    let millis = millis.max(0);
    if millis < 1000 {
        format!("{millis}ms")
    } else if millis < 60_000 {
        format!("{:.1}s", millis as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", millis / 60_000, (millis % 60_000) / 1000)
    }
}

/// The parts of a progress line that change only with the operation (not the clock):
/// a plain output prints a line each time this changes.
pub fn progress_key(observed: &Observed) -> String {
    progress_parts(observed, None).join(", ")
}

fn progress_parts(observed: &Observed, now: Option<Timestamp>) -> Vec<String> {
    let mut parts = vec![observed.phase.clone().unwrap_or_else(|| "Pending".to_owned())];
    if let Some(stage) = &observed.stage {
        parts.push(format!("stage {stage}"));
    }
    match (observed.bytes_done, observed.bytes_total) {
        (Some(done), Some(total)) if total > 0 => parts.push(format!(
            "{} / {} ({}%)",
            human_bytes(done),
            human_bytes(total),
            done.saturating_mul(100) / total
        )),
        (Some(done), _) => parts.push(human_bytes(done)),
        _ => {}
    }
    if let Some((done, total)) = observed.done_of {
        parts.push(format!("{done}/{total} pods done"));
    }
    match (observed.frozen_since, now) {
        (Some(since), Some(now)) => parts.push(format!(
            "frozen {}",
            human_duration(now.duration_since(since).as_millis() as i64)
        )),
        (Some(_), None) => parts.push("frozen".to_owned()),
        _ => {}
    }
    parts
}

/// The progress line of an operation at `now`: phase, stage, bytes, freeze time.
pub fn progress_line(observed: &Observed, now: Timestamp) -> String {
    progress_parts(observed, Some(now)).join(", ")
}

/// One pod of an evacuation, as its progress shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodLine {
    /// `namespace/name`.
    pub pod: String,
    /// The line shown when it changes.
    pub line: String,
}

/// Each pod of a NodeEvacuation with its outcome, as lines.
pub fn evacuation_pods(value: &Value) -> Vec<PodLine> {
    let Some(pods) = value.pointer("/status/pods").and_then(Value::as_array) else {
        return vec![];
    };
    pods.iter()
        .map(|p| {
            let field = |name: &str| text(p, &format!("/{name}"));
            let pod = format!(
                "{}/{}",
                field("namespace").unwrap_or_default(),
                field("name").unwrap_or_default()
            );
            let mut line = format!("{pod}: {}", field("outcome").unwrap_or_else(|| "Waiting".into()));
            if let Some(node) = field("targetNodeName") {
                line.push_str(&format!(" to {node}"));
            }
            if let Some(reason) = field("reason") {
                line.push_str(&format!(" ({reason}"));
                if let Some(message) = field("message") {
                    line.push_str(&format!(": {message}"));
                }
                line.push(')');
            }
            if let Some(migration) = field("migrationName") {
                line.push_str(&format!(" [podmigration/{migration}]"));
            }
            PodLine { pod, line }
        })
        .collect()
}

/// The pod lines of `now` that are new or changed since `before`.
pub fn changed_pods(before: &[PodLine], now: &[PodLine]) -> Vec<String> {
    now.iter()
        .filter(|p| !before.contains(p))
        .map(|p| p.line.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_running_migration_shows_stage_bytes_and_freeze_time_when_reported() {
        let migration = json!({"status": {
            "phase": "Checkpointing", "stage": "Storing",
            "progress": {"bytesDone": 3_145_728, "bytesTotal": 12_582_912},
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "MigrationInProgress", "message": "checkpointing"},
                {"type": "SourceFrozen", "status": "True", "reason": "Frozen", "message": "",
                 "lastTransitionTime": "2026-01-02T03:04:05Z"}]}});
        let observed = observe(&migration);
        assert_eq!(outcome(Kind::Migration, &observed), Outcome::Running);
        assert_eq!(
            progress_line(&observed, at("2026-01-02T03:04:07.5Z")),
            "Checkpointing, stage Storing, 3.0 MiB / 12.0 MiB (25%), frozen 2.5s"
        );
        // The clock alone does not make a new plain line.
        assert_eq!(
            progress_key(&observed),
            "Checkpointing, stage Storing, 3.0 MiB / 12.0 MiB (25%), frozen"
        );
    }

    #[test]
    fn without_the_new_status_fields_the_phase_alone_shows() {
        let observed = observe(&json!({"status": {"phase": "Restoring"}}));
        assert_eq!(progress_line(&observed, at("2026-01-02T03:04:05Z")), "Restoring");
        let thawed = observe(&json!({"status": {"phase": "Restoring", "conditions": [
            {"type": "SourceFrozen", "status": "False", "lastTransitionTime": "2026-01-02T03:04:05Z"}]}}));
        assert_eq!(thawed.frozen_since, None, "a thawed source shows no freeze time");
        assert_eq!(
            progress_line(&observe(&json!({})), at("2026-01-02T03:04:05Z")),
            "Pending"
        );
    }

    #[test]
    fn outcomes_follow_each_kinds_phases_and_failures_name_the_ready_reason() {
        let ok = |kind, phase: &str| outcome(kind, &observe(&json!({"status": {"phase": phase}})));
        assert_eq!(ok(Kind::Migration, "Succeeded"), Outcome::Succeeded);
        assert_eq!(ok(Kind::Checkpoint, "Ready"), Outcome::Succeeded);
        assert_eq!(ok(Kind::Restore, "Ready"), Outcome::Succeeded);
        assert_eq!(ok(Kind::Evacuation, "Succeeded"), Outcome::Succeeded);
        assert_eq!(ok(Kind::Migration, "Finalizing"), Outcome::Running);
        let failed = observe(&json!({"status": {"phase": "Failed", "conditions": [
            {"type": "Ready", "status": "False", "reason": "SourceResumed",
             "message": "the source was thawed before the target took over"}]}}));
        let Outcome::Failed { reason, message } = outcome(Kind::Migration, &failed) else {
            unreachable!()
        };
        assert_eq!(
            failure_message(Kind::Migration, "move", &reason, &message),
            "podmigration/move failed: SourceResumed: the source was thawed before the target took over"
        );
        assert_eq!(
            ok(Kind::Migration, "RolledBack"),
            Outcome::Failed {
                reason: "RolledBack".into(),
                message: "it ended RolledBack".into()
            }
        );
    }

    #[test]
    fn an_evacuation_shows_done_of_total_and_each_pods_change() {
        let before = json!({"status": {"phase": "Evacuating", "total": 3, "done": 1, "pods": [
            {"namespace": "a", "name": "web-0", "uid": "1", "action": "Migrate", "outcome": "Migrating",
             "migrationName": "web-0-x"},
            {"namespace": "a", "name": "ds-1", "uid": "2", "action": "Skip", "outcome": "Skipped",
             "reason": "DaemonSetPod"}]}});
        let after = json!({"status": {"phase": "Evacuating", "total": 3, "done": 2, "pods": [
            {"namespace": "a", "name": "web-0", "uid": "1", "action": "Migrate", "outcome": "Migrated",
             "migrationName": "web-0-x", "targetNodeName": "node-2"},
            {"namespace": "a", "name": "ds-1", "uid": "2", "action": "Skip", "outcome": "Skipped",
             "reason": "DaemonSetPod"}]}});
        assert_eq!(
            progress_line(&observe(&after), at("2026-01-02T03:04:05Z")),
            "Evacuating, 2/3 pods done"
        );
        let first = evacuation_pods(&before);
        assert_eq!(
            changed_pods(&[], &first),
            [
                "a/web-0: Migrating [podmigration/web-0-x]",
                "a/ds-1: Skipped (DaemonSetPod)"
            ]
        );
        assert_eq!(
            changed_pods(&first, &evacuation_pods(&after)),
            ["a/web-0: Migrated to node-2 [podmigration/web-0-x]"]
        );
    }

    #[test]
    fn sizes_and_durations_read_like_kubectl() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
        assert_eq!(human_duration(850), "850ms");
        assert_eq!(human_duration(12_340), "12.3s");
        assert_eq!(human_duration(245_000), "4m05s");
    }
}
