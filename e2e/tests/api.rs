//! The cryopod.io CRDs on the real API server: every example is accepted, every
//! invalid one is refused with a message naming the field, `kubectl explain` shows the
//! field docs, and the printer columns, short names and category work.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Output;
use std::time::Duration;

use cryopod_crds::examples::load_dir;
use cryopod_e2e::testbed::{TestNamespace, Testbed, repo_root, wait_until};
use serde_json::Value;

fn run(tb: &Testbed, args: &[&str]) -> Output {
    tb.kubectl().args(args).output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Installs the generated CRDs (as the chart does) and waits until they serve.
fn install_crds(tb: &Testbed) {
    tb.install_crds().unwrap();
}

fn write_doc(dir: &std::path::Path, name: &str, doc: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec(doc).unwrap()).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test]
async fn examples_are_accepted_and_invalid_ones_refused_naming_the_field() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    install_crds(&tb);
    let ns = TestNamespace::create(&tb, &client, "e2e-api").await.unwrap();
    let scratch = tempfile::tempdir().unwrap();

    for example in load_dir(&repo_root().join("examples")).unwrap() {
        let path = example.path.to_str().unwrap();
        let out = run(&tb, &["create", "--dry-run=server", "-n", &ns.name, "-f", path]);
        assert!(
            out.status.success(),
            "{path} was refused by the API server: {}",
            text(&out)
        );
    }

    let invalid = load_dir(&repo_root().join("examples/invalid")).unwrap();
    assert!(invalid.len() >= 4);
    for example in invalid {
        let path = example.path.display().to_string();
        let expect = example
            .expect
            .clone()
            .unwrap_or_else(|| panic!("{path} has no expect line"));
        let out = match example.documents.as_slice() {
            [_] => run(&tb, &["create", "--dry-run=server", "-n", &ns.name, "-f", &path]),
            [original, changed] => {
                let first = write_doc(scratch.path(), "original.json", original);
                let out = run(&tb, &["create", "-n", &ns.name, "-f", &first]);
                assert!(
                    out.status.success(),
                    "{path}: the original must be created: {}",
                    text(&out)
                );
                let second = write_doc(scratch.path(), "changed.json", changed);
                run(&tb, &["replace", "--dry-run=server", "-n", &ns.name, "-f", &second])
            }
            _ => panic!("{path}: one document, or two for an update"),
        };
        let message = text(&out);
        assert!(
            !out.status.success(),
            "{path} was accepted by the API server but must be refused"
        );
        assert!(
            expect.matches(&message),
            "{path}: the API server's refusal does not name {:?} with {:?}:\n{message}",
            expect.field,
            expect.message
        );
    }
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_docs() {
    let tb = Testbed::from_env().unwrap();
    install_crds(&tb);
    // The API server publishes a new CRD's OpenAPI a moment after it is Established.
    let explained = wait_until(
        "kubectl explain to know PodCheckpoint",
        Duration::from_secs(60),
        || async {
            let out = run(
                &tb,
                &[
                    "explain",
                    "podcheckpoints.spec.sourcePodName",
                    "--api-version=cryopod.io/v1alpha1",
                ],
            );
            out.status.success().then(|| text(&out))
        },
    )
    .await
    .unwrap();
    assert!(explained.contains("Name of the pod to checkpoint"), "{explained}");
    let out = run(
        &tb,
        &[
            "explain",
            "podmigrations.spec.failurePolicy",
            "--api-version=cryopod.io/v1alpha1",
        ],
    );
    assert!(
        text(&out).contains("What happens when the migration fails"),
        "{}",
        text(&out)
    );
}

#[tokio::test]
async fn printer_columns_short_names_category_and_status_work() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    install_crds(&tb);
    let ns = TestNamespace::create(&tb, &client, "e2e-columns").await.unwrap();

    let example = repo_root().join("examples/podcheckpoint.yaml");
    let out = run(&tb, &["create", "-n", &ns.name, "-f", example.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let status = r#"{"status":{"phase":"Ready","nodeName":"node-1","sizes":{"storedBytes":4096},"timings":{"freezeWindowMillis":42}}}"#;
    let out = run(
        &tb,
        &[
            "patch",
            "-n",
            &ns.name,
            "cpck",
            "counter-1",
            "--subresource=status",
            "--type=merge",
            "-p",
            status,
        ],
    );
    assert!(out.status.success(), "status subresource: {}", text(&out));

    let out = run(&tb, &["get", "cpck", "-n", &ns.name]);
    let table = text(&out);
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "PHASE", "POD", "NODE", "SIZE", "FREEZE(MS)", "AGE"],
        "{table}"
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert_eq!(
        &row[..6],
        ["counter-1", "Ready", "counter", "node-1", "4096", "42"],
        "{table}"
    );

    let out = run(&tb, &["get", "cryopod", "-n", &ns.name, "-o", "name"]);
    assert!(
        text(&out).contains("podcheckpoint.cryopod.io/counter-1"),
        "category cryopod: {}",
        text(&out)
    );

    // A spec update is refused, a label change is not.
    let out = run(
        &tb,
        &[
            "patch",
            "-n",
            &ns.name,
            "cpck",
            "counter-1",
            "--type=merge",
            "-p",
            r#"{"spec":{"timeoutSeconds":99}}"#,
        ],
    );
    assert!(
        !out.status.success() && text(&out).contains("spec is immutable"),
        "{}",
        text(&out)
    );
    let out = run(&tb, &["label", "-n", &ns.name, "cpck", "counter-1", "team=sre"]);
    assert!(out.status.success(), "{}", text(&out));

    // The cluster-scoped storage shows which one is the default.
    let name = format!("{}-s3", ns.name);
    let path = repo_root().join("examples/checkpointstorage.yaml");
    let text_of_example = std::fs::read_to_string(&path).unwrap();
    let mut storage = cryopod_crds::examples::parse(&path, &text_of_example)
        .unwrap()
        .documents
        .remove(0);
    storage["metadata"]["name"] = Value::String(name.clone());
    let scratch = tempfile::tempdir().unwrap();
    let file = write_doc(scratch.path(), "storage.json", &storage);
    let out = run(&tb, &["create", "-f", &file]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(&tb, &["get", "cpstor", &name, "--no-headers"]);
    let row: Vec<String> = text(&out).split_whitespace().map(str::to_owned).collect();
    let _ = run(&tb, &["delete", "cpstor", &name, "--wait=false"]);
    assert_eq!(&row[..3], [name.as_str(), "S3", "true"], "NAME TYPE DEFAULT: {row:?}");
}

/// A tenant's PodRestore that puts the operator's keys on its pod (the restore
/// binding `cryopod.io/restore`, or any other `cryopod.io/` key) in its labels or
/// annotations is refused by the API server, naming the field.
#[tokio::test]
async fn security_a_restores_labels_and_annotations_cannot_name_a_prepared_restore() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    install_crds(&tb);
    let ns = TestNamespace::create(&tb, &client, "e2e-api-sec").await.unwrap();
    let scratch = tempfile::tempdir().unwrap();
    for (field, key) in [
        ("annotations", "cryopod.io/restore"),
        ("labels", "cryopod.io/restore"),
        ("annotations", "cryopod.io/podrestore"),
    ] {
        let doc = serde_json::json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore",
            "metadata": {"name": "thief"},
            "spec": {"checkpointName": "victim", field: {key: "someone-elses-restore"}}});
        let path = write_doc(scratch.path(), "thief.json", &doc);
        let out = run(&tb, &["create", "--dry-run=server", "-n", &ns.name, "-f", &path]);
        let message = text(&out);
        assert!(!out.status.success(), "spec.{field}[{key}] was accepted");
        assert!(
            message.contains(&format!("spec.{field}")) && message.contains("reserved for the operator"),
            "{message}"
        );
    }
}
