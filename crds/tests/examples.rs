//! Every manifest in `examples/` is accepted by the generated schemas and parses
//! into the Rust types; every manifest in `examples/invalid/` is refused with a
//! message that names the field.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use cryopod_crds::v1alpha1::{
    CheckpointSchedule, CheckpointStorage, NodeEvacuation, PodCheckpoint, PodMigration, PodRestore,
};
use serde_json::Value;
use support::{check, manifests, repo_root, schema_for};

fn parses_into_rust_type(object: &Value) -> Result<(), String> {
    let kind = object["kind"].as_str().unwrap_or_default();
    let result = match kind {
        "PodCheckpoint" => serde_json::from_value::<PodCheckpoint>(object.clone()).map(drop),
        "PodRestore" => serde_json::from_value::<PodRestore>(object.clone()).map(drop),
        "PodMigration" => serde_json::from_value::<PodMigration>(object.clone()).map(drop),
        "CheckpointStorage" => serde_json::from_value::<CheckpointStorage>(object.clone()).map(drop),
        "NodeEvacuation" => serde_json::from_value::<NodeEvacuation>(object.clone()).map(drop),
        "CheckpointSchedule" => serde_json::from_value::<CheckpointSchedule>(object.clone()).map(drop),
        other => return Err(format!("unexpected kind {other}")),
    };
    result.map_err(|e| e.to_string())
}

#[test]
fn valid_examples_are_accepted() {
    let crds = cryopod_crds::crdgen::all();
    let examples = manifests(&repo_root().join("examples"));
    let mut kinds = std::collections::BTreeSet::new();
    for example in &examples {
        assert!(
            example.expect.is_none(),
            "{} has an expect line but is meant to be valid",
            example.path.display()
        );
        for doc in &example.documents {
            let schema =
                schema_for(&crds, doc).unwrap_or_else(|| panic!("{}: no CRD serves it", example.path.display()));
            let findings = check(&schema, doc, None);
            assert!(
                findings.is_empty(),
                "{} was refused: {findings:#?}",
                example.path.display()
            );
            parses_into_rust_type(doc).unwrap_or_else(|e| panic!("{}: {e}", example.path.display()));
            kinds.insert(doc["kind"].as_str().unwrap().to_owned());
        }
    }
    let expected: std::collections::BTreeSet<String> = crds.iter().map(|c| c.spec.names.kind.clone()).collect();
    assert_eq!(kinds, expected, "examples/ needs one valid manifest per kind");
}

#[test]
fn invalid_examples_are_refused_naming_the_field() {
    let crds = cryopod_crds::crdgen::all();
    let examples = manifests(&repo_root().join("examples/invalid"));
    assert!(examples.len() >= 4, "examples/invalid/ lost cases");
    for example in &examples {
        let name = example.path.display();
        let expect = example
            .expect
            .as_ref()
            .unwrap_or_else(|| panic!("{name} has no `# expect:` line"));
        let (object, old) = match example.documents.as_slice() {
            [object] => (object, None),
            // An update: the first document must be accepted on create.
            [old, object] => {
                let schema = schema_for(&crds, old).unwrap();
                assert!(
                    check(&schema, old, None).is_empty(),
                    "{name}: the original object must be valid"
                );
                (object, Some(old))
            }
            _ => panic!("{name}: one document, or two for an update"),
        };
        let schema = schema_for(&crds, object).unwrap_or_else(|| panic!("{name}: no CRD serves it"));
        let findings = check(&schema, object, old);
        assert!(!findings.is_empty(), "{name} was accepted but must be refused");
        for finding in &findings {
            assert!(
                expect.matches(finding),
                "{name}: finding {finding:?} does not name {:?} with {:?}; each invalid example must break one thing",
                expect.field,
                expect.message
            );
        }
    }
}

#[test]
fn defaults_in_schema_and_rust_agree() {
    // The API server fills schema defaults; the operator fills serde defaults when it
    // reads an object. Both must give the same spec.
    let crds = cryopod_crds::crdgen::all();
    let minimal = serde_json::json!({
        "apiVersion": "cryopod.io/v1alpha1",
        "kind": "PodCheckpoint",
        "metadata": {"name": "m", "namespace": "default"},
        "spec": {"sourcePodName": "p", "hooks": {"preCheckpoint": [{"container": "c", "httpGet": {"port": 8080}}]}}
    });
    let schema = schema_for(&crds, &minimal).unwrap();
    let defaulted = kube_cel::apply_defaults(&schema, &minimal);
    assert_ne!(defaulted, minimal, "the schema should default some fields");
    let from_server: PodCheckpoint = serde_json::from_value(defaulted).unwrap();
    let from_rust: PodCheckpoint = serde_json::from_value(minimal).unwrap();
    assert_eq!(from_server.spec, from_rust.spec);

    for (kind, spec) in [
        ("PodRestore", serde_json::json!({"checkpointName": "c"})),
        ("PodMigration", serde_json::json!({"sourcePodName": "p"})),
    ] {
        let object = serde_json::json!({"apiVersion": "cryopod.io/v1alpha1", "kind": kind, "metadata": {"name": "m"}, "spec": spec});
        let schema = schema_for(&crds, &object).unwrap();
        let defaulted = kube_cel::apply_defaults(&schema, &object);
        match kind {
            "PodRestore" => assert_eq!(
                serde_json::from_value::<PodRestore>(defaulted).unwrap().spec,
                serde_json::from_value::<PodRestore>(object).unwrap().spec
            ),
            _ => assert_eq!(
                serde_json::from_value::<PodMigration>(defaulted).unwrap().spec,
                serde_json::from_value::<PodMigration>(object).unwrap().spec
            ),
        }
    }
}

#[test]
fn a_schedules_template_defaults_agree_and_its_name_fits_a_label() {
    let crds = cryopod_crds::crdgen::all();
    let object = |name: &str| {
        serde_json::json!({
            "apiVersion": "cryopod.io/v1alpha1", "kind": "CheckpointSchedule",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"schedule": "@hourly", "selector": {"matchLabels": {"app": "a"}}, "keepLast": 2}
        })
    };
    let minimal = object("s");
    let schema = schema_for(&crds, &minimal).unwrap();
    let defaulted = kube_cel::apply_defaults(&schema, &minimal);
    assert_eq!(
        serde_json::from_value::<CheckpointSchedule>(defaulted).unwrap().spec,
        serde_json::from_value::<CheckpointSchedule>(minimal.clone())
            .unwrap()
            .spec
    );
    assert!(check(&schema, &minimal, None).is_empty());
    // Its name is the label value on its checkpoints: 63 characters at most.
    let findings = check(&schema, &object(&"s".repeat(64)), None);
    assert!(
        findings.iter().any(|f| f.contains("at most 63 characters")),
        "{findings:?}"
    );
}
