//! `status`: operations in flight and recent ones, as a `kubectl get` table.

use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use crate::progress::{Kind, Outcome, human_duration, observe, outcome, progress_line};

/// Finished operations older than this are left out: `status` is about now.
pub const RECENT_SECONDS: i64 = 24 * 3600;

/// One row of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The object's namespace ("" for a NodeEvacuation).
    pub namespace: String,
    /// `kind/name`.
    pub name: String,
    /// What it acts on: `pod web-0 -> node-2`, `node node-1`.
    pub subject: String,
    /// Phase, stage, bytes, freeze time.
    pub progress: String,
    /// Since its creation.
    pub age: String,
    running: bool,
    created: Timestamp,
}

fn text<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str).filter(|s| !s.is_empty())
}

fn time(value: &Value, pointer: &str) -> Option<Timestamp> {
    text(value, pointer)?.parse().ok()
}

fn subject(kind: Kind, value: &Value) -> String {
    let pod = text(value, "/spec/sourcePodName").unwrap_or("?");
    match kind {
        Kind::Checkpoint => format!("pod {pod}"),
        Kind::Migration => match text(value, "/status/targetNodeName").or(text(value, "/spec/target/nodeName")) {
            Some(node) => format!("pod {pod} -> {node}"),
            None => format!("pod {pod}"),
        },
        Kind::Restore => {
            let checkpoint = text(value, "/spec/checkpointName").unwrap_or("?");
            match text(value, "/status/nodeName").or(text(value, "/spec/target/nodeName")) {
                Some(node) => format!("checkpoint {checkpoint} -> {node}"),
                None => format!("checkpoint {checkpoint}"),
            }
        }
        Kind::Evacuation => format!("node {}", text(value, "/spec/nodeName").unwrap_or("?")),
    }
}

/// The rows of the operations that are running, or ended within [`RECENT_SECONDS`]:
/// running ones first, then the newest first.
pub fn rows(objects: &[(Kind, Value)], now: Timestamp) -> Vec<Row> {
    let mut rows: Vec<Row> = objects
        .iter()
        .filter_map(|(kind, value)| {
            let observed = observe(value);
            let running = outcome(*kind, &observed) == Outcome::Running;
            let created = time(value, "/metadata/creationTimestamp").unwrap_or(now);
            let ended = time(value, "/status/completionTime").unwrap_or(created);
            if !running && now.duration_since(ended).as_secs() > RECENT_SECONDS {
                return None;
            }
            Some(Row {
                namespace: text(value, "/metadata/namespace").unwrap_or("").to_owned(),
                name: format!("{}/{}", kind.short(), text(value, "/metadata/name").unwrap_or("?")),
                subject: subject(*kind, value),
                progress: progress_line(&observed, now),
                age: human_age(now.duration_since(created).as_secs()),
                running,
                created,
            })
        })
        .collect();
    rows.sort_by(|a, b| b.running.cmp(&a.running).then(b.created.cmp(&a.created)));
    rows
}

/// An age as kubectl prints it: `45s`, `12m`, `5h`, `3d`.
pub fn human_age(seconds: i64) -> String {
    match seconds.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// The table, columns padded as `kubectl get` pads them; with the namespace column
/// when listing every namespace.
pub fn render(rows: &[Row], all_namespaces: bool) -> String {
    if rows.is_empty() {
        return "No cryopod operations in flight or recent.\n".to_owned();
    }
    let mut table: Vec<Vec<&str>> = vec![];
    let header = ["NAMESPACE", "NAME", "SUBJECT", "PROGRESS", "AGE"];
    let skip = usize::from(!all_namespaces);
    table.push(header[skip..].to_vec());
    for row in rows {
        let cells = [
            row.namespace.as_str(),
            row.name.as_str(),
            row.subject.as_str(),
            row.progress.as_str(),
            row.age.as_str(),
        ];
        table.push(cells[skip..].to_vec());
    }
    let widths: Vec<usize> = (0..table[0].len())
        .map(|i| table.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in table {
        let last = row.len() - 1;
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}   ", width = widths[i]));
            }
        }
        out.push('\n');
    }
    out
}

/// `Downtime 850ms` and the like for a finished migration, when known.
pub fn downtime(value: &Value) -> Option<String> {
    let millis = value.pointer("/status/downtimeMillis")?.as_i64()?;
    Some(format!("downtime {}", human_duration(millis)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    #[test]
    fn the_table_lists_running_operations_first_and_leaves_old_ones_out() {
        let now: Timestamp = "2026-01-10T12:00:00Z".parse().unwrap();
        let objects = vec![
            (
                Kind::Checkpoint,
                json!({"metadata": {"name": "old", "namespace": "a", "creationTimestamp": "2026-01-01T00:00:00Z"},
                       "spec": {"sourcePodName": "web-0"},
                       "status": {"phase": "Ready", "completionTime": "2026-01-01T00:01:00Z"}}),
            ),
            (
                Kind::Checkpoint,
                json!({"metadata": {"name": "done", "namespace": "a", "creationTimestamp": "2026-01-10T11:00:00Z"},
                       "spec": {"sourcePodName": "web-0"},
                       "status": {"phase": "Ready", "completionTime": "2026-01-10T11:01:00Z"}}),
            ),
            (
                Kind::Migration,
                json!({"metadata": {"name": "move", "namespace": "b", "creationTimestamp": "2026-01-10T11:59:15Z"},
                       "spec": {"sourcePodName": "db-0", "target": {"nodeName": "node-2"}},
                       "status": {"phase": "Restoring", "stage": "Fetching"}}),
            ),
            (
                Kind::Evacuation,
                json!({"metadata": {"name": "maint", "creationTimestamp": "2026-01-10T10:00:00Z"},
                       "spec": {"nodeName": "node-1"}, "status": {"phase": "Evacuating", "total": 4, "done": 1}}),
            ),
        ];
        let rows = rows(&objects, now);
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["podmigration/move", "nodeevacuation/maint", "podcheckpoint/done"]
        );
        assert_eq!(rows[0].subject, "pod db-0 -> node-2");
        assert_eq!(rows[0].progress, "Restoring, stage Fetching");
        assert_eq!(rows[0].age, "45s");
        assert_eq!(rows[1].progress, "Evacuating, 1/4 pods done");
        let table = render(&rows, true);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE   NAME"), "{table}");
        assert!(lines[1].starts_with("b           podmigration/move"), "{table}");
        assert!(!render(&rows, false).contains("NAMESPACE"));
        assert!(render(&[], false).starts_with("No cryopod operations"));
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_age(45), "45s");
        assert_eq!(human_age(600), "10m");
        assert_eq!(human_age(5 * 3600), "5h");
        assert_eq!(human_age(3 * 86400), "3d");
    }
}
