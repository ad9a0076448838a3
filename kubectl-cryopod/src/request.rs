//! Arguments to the objects the subcommands create: pure, so each is tested as data.

use cryopod_crds::v1alpha1::{NodeEvacuation, PodCheckpoint, PodMigration, PodRestore};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::cli::{Transfer, Unmigratable};

/// The longest base of a generated name: the API server adds 5 characters, and the
/// operator derives names of its own from a migration's.
const GENERATED_BASE_MAX: usize = 40;

/// `metadata` naming the object `name`, or letting the API server generate a name
/// from `base` as kubectl's `generateName` does (`<base>-xxxxx`).
pub fn metadata(name: Option<&str>, base: &str, namespace: Option<&str>) -> Value {
    let mut meta = Map::new();
    match name {
        Some(name) => meta.insert("name".into(), json!(name)),
        None => meta.insert("generateName".into(), json!(generated_prefix(base))),
    };
    if let Some(namespace) = namespace {
        meta.insert("namespace".into(), json!(namespace));
    }
    Value::Object(meta)
}

/// `<base>-`, the base cut to a length that leaves room for what is added to it.
pub fn generated_prefix(base: &str) -> String {
    let cut: String = base.chars().take(GENERATED_BASE_MAX).collect();
    format!("{}-", cut.trim_end_matches(['-', '.']))
}

fn object<K: DeserializeOwned>(kind: &str, metadata: Value, spec: Value) -> Result<K, serde_json::Error> {
    // Through serde, so every field the caller leaves out takes the API's default.
    serde_json::from_value(json!({
        "apiVersion": "cryopod.io/v1alpha1",
        "kind": kind,
        "metadata": metadata,
        "spec": without_nulls(spec),
    }))
}

fn without_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        other => other,
    }
}

/// `checkpoint POD`.
pub fn checkpoint(
    namespace: &str,
    pod: &str,
    storage: Option<&str>,
    name: Option<&str>,
) -> Result<PodCheckpoint, serde_json::Error> {
    object(
        "PodCheckpoint",
        metadata(name, pod, Some(namespace)),
        json!({"sourcePodName": pod, "storage": storage}),
    )
}

/// `restore CHECKPOINT [--to NODE]`.
pub fn restore(
    namespace: &str,
    checkpoint: &str,
    to: Option<&str>,
    pod_name: Option<&str>,
    name: Option<&str>,
) -> Result<PodRestore, serde_json::Error> {
    object(
        "PodRestore",
        metadata(name, checkpoint, Some(namespace)),
        json!({
            "checkpointName": checkpoint,
            "target": to.map(|node| json!({"nodeName": node})),
            "podName": pod_name,
        }),
    )
}

/// `migrate POD --to NODE`.
pub fn migration(
    namespace: &str,
    pod: &str,
    to: &str,
    (storage, transfer): (Option<&str>, Option<Transfer>),
    name: Option<&str>,
) -> Result<PodMigration, serde_json::Error> {
    object(
        "PodMigration",
        metadata(name, pod, Some(namespace)),
        json!({"sourcePodName": pod, "target": {"nodeName": to}, "storage": storage,
               "transfer": transfer.map(Transfer::as_str)}),
    )
}

/// `evacuate NODE` (cluster-scoped).
pub fn evacuation(
    node: &str,
    (max_concurrent, unmigratable, transfer): (Option<i32>, Option<Unmigratable>, Option<Transfer>),
    name: Option<&str>,
) -> Result<NodeEvacuation, serde_json::Error> {
    object(
        "NodeEvacuation",
        metadata(name, node, None),
        json!({
            "nodeName": node,
            "maxConcurrent": max_concurrent,
            "unmigratable": unmigratable.map(|u| match u {
                Unmigratable::Evict => "Evict",
                Unmigratable::Skip => "Skip",
            }),
            "transfer": transfer.map(Transfer::as_str),
        }),
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use cryopod_crds::v1alpha1::UnmigratablePolicy;

    use super::*;

    #[test]
    fn a_migration_names_its_pod_and_target_and_lets_the_server_name_it() {
        let m = migration("shop", "web-0", "node-2", (None, None), None).unwrap();
        assert_eq!(m.metadata.generate_name.as_deref(), Some("web-0-"));
        assert_eq!(m.metadata.name, None);
        assert_eq!(m.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(m.spec.source_pod_name, "web-0");
        assert_eq!(m.spec.target.unwrap().node_name.as_deref(), Some("node-2"));
        assert_eq!(m.spec.storage, None);
        assert_eq!(m.spec.transfer, None);
        // The API's defaults, not the plugin's.
        assert_eq!(m.spec.timeout_seconds, 600);
        let named = migration("shop", "web-0", "node-2", (Some("s3"), None), Some("move")).unwrap();
        assert_eq!(named.metadata.name.as_deref(), Some("move"));
        assert_eq!(named.metadata.generate_name, None);
        assert_eq!(named.spec.storage.as_deref(), Some("s3"));
        let direct = migration("shop", "web-0", "node-2", (None, Some(Transfer::Direct)), None).unwrap();
        assert_eq!(
            direct.spec.transfer,
            Some(cryopod_crds::v1alpha1::MigrationTransfer::Direct)
        );
    }

    #[test]
    fn checkpoints_restores_and_evacuations_carry_their_arguments() {
        let c = checkpoint("ns", "counter", Some("s3"), None).unwrap();
        assert_eq!(c.spec.source_pod_name, "counter");
        assert_eq!(c.spec.storage.as_deref(), Some("s3"));
        assert_eq!(c.spec.max_freeze_seconds, 30);
        let r = restore("ns", "counter-1", Some("node-2"), Some("back"), None).unwrap();
        assert_eq!(r.spec.checkpoint_name, "counter-1");
        assert_eq!(r.spec.target.unwrap().node_name.as_deref(), Some("node-2"));
        assert_eq!(r.spec.pod_name.as_deref(), Some("back"));
        let anywhere = restore("ns", "counter-1", None, None, None).unwrap();
        assert_eq!(anywhere.spec.target, None);
        let e = evacuation(
            "node-1",
            (Some(2), Some(Unmigratable::Skip), Some(Transfer::Direct)),
            None,
        )
        .unwrap();
        assert_eq!(e.metadata.namespace, None, "cluster-scoped");
        assert_eq!(e.spec.node_name, "node-1");
        assert_eq!(e.spec.max_concurrent, 2);
        assert_eq!(e.spec.unmigratable, UnmigratablePolicy::Skip);
        assert_eq!(e.spec.transfer, Some(cryopod_crds::v1alpha1::MigrationTransfer::Direct));
        let defaults = evacuation("node-1", (None, None, None), None).unwrap();
        assert_eq!(defaults.spec.max_concurrent, 1);
        assert_eq!(defaults.spec.unmigratable, UnmigratablePolicy::Evict);
    }

    #[test]
    fn generated_names_stay_short_and_valid() {
        assert_eq!(generated_prefix("web-0"), "web-0-");
        let long = "a".repeat(100);
        assert_eq!(generated_prefix(&long).len(), GENERATED_BASE_MAX + 1);
        assert_eq!(
            generated_prefix(&format!("{}-b", "x".repeat(39))),
            format!("{}-", "x".repeat(39))
        );
    }
}
