//! The committed CRD YAML must be exactly what the Rust types generate.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

#[test]
fn committed_crds_are_current() {
    let dir = manifest_dir().join("../charts/cryopod/crds");
    let rendered = cryopod_crds::crdgen::render().unwrap();
    for file in &rendered {
        let path = dir.join(&file.file_name);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == file.contents,
            "{} is stale or missing; run `make crds` and commit it",
            path.display()
        );
    }
    let expected: BTreeSet<String> = rendered.into_iter().map(|f| f.file_name).collect();
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        present,
        expected,
        "{} holds files the types do not generate",
        dir.display()
    );
}

#[test]
fn short_names_do_not_clash_with_kubernetes() {
    // Kubernetes is adding checkpoint.k8s.io PodCheckpoint; short names of our own
    // keep `kubectl get` unambiguous. The built-in short names in use today are listed
    // by `kubectl api-resources`; none of them starts with "cp".
    for crd in cryopod_crds::crdgen::all() {
        let names = crd.spec.names.short_names.unwrap_or_default();
        assert!(!names.is_empty(), "{} has no short name", crd.spec.names.kind);
        for name in names {
            assert!(name.starts_with("cp"), "{name} should carry the cp prefix");
            assert!(!["pc", "pcp", "podcheckpoint", "checkpoint"].contains(&name.as_str()));
        }
        assert_eq!(crd.spec.names.categories.as_deref(), Some(&["cryopod".to_owned()][..]));
    }
}

#[test]
fn api_reference_is_current() {
    let path = manifest_dir().join("../docs/api.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == cryopod_crds::crdgen::render_api_reference(),
        "{} is stale; run `make crds` and commit it",
        path.display()
    );
}

/// The crate's directory as cargo gives it when it runs the test (a binary built in
/// another checkout sharing the target directory must still check this one).
fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), std::path::PathBuf::from)
}
