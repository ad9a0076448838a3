//! `inspect CHECKPOINT`: what a checkpoint holds, from its status. No object of the
//! checkpoint is read from its storage: memory images stay where they are.

use cryopod_crds::v1alpha1::{CheckpointLocationType, PodCheckpoint};

use crate::progress::{human_bytes, human_duration};

/// The report, one fact a line, like `kubectl describe`.
pub fn describe(checkpoint: &PodCheckpoint) -> String {
    let mut out = Vec::<String>::new();
    let mut line = |key: &str, value: String| out.push(format!("{key:<20}{value}"));
    let name = checkpoint.metadata.name.clone().unwrap_or_default();
    let namespace = checkpoint.metadata.namespace.clone().unwrap_or_default();
    let status = checkpoint.status.clone().unwrap_or_default();
    let unknown = || "<unknown>".to_owned();
    line("Name:", name);
    line("Namespace:", namespace);
    line("Phase:", status.phase.map_or_else(unknown, |p| format!("{p:?}")));
    line(
        "Pod:",
        format!(
            "{} (uid {})",
            checkpoint.spec.source_pod_name,
            status.source_pod_uid.clone().unwrap_or_else(unknown)
        ),
    );
    line("Node:", status.node_name.clone().unwrap_or_else(unknown));
    if let Some(at) = &status.frozen_time {
        line("Frozen at:", at.0.to_string());
    }
    line(
        "Post-checkpoint:",
        format!("{:?}", checkpoint.spec.post_checkpoint_state),
    );
    let location = match &status.checkpoint_location {
        Some(l) => match (l.type_, &l.object_store, &l.node_local) {
            (CheckpointLocationType::ObjectStore, Some(s), _) => {
                format!("CheckpointStorage {} at {}manifest.json", s.storage, s.prefix)
            }
            (CheckpointLocationType::NodeLocal, _, Some(n)) => format!("node {} directory {}", n.node_name, n.path),
            (t, _, _) => format!("{t:?}"),
        },
        None => unknown(),
    };
    line("Location:", location);
    line(
        "Manifest digest:",
        status.manifest_digest.clone().unwrap_or_else(unknown),
    );
    let manifest = status.manifest.clone();
    line(
        "Encryption:",
        match (&manifest, &checkpoint.spec.encryption) {
            // What the agent stored, as its manifest says.
            (Some(m), _) if m.encryption.is_empty() => "none".to_owned(),
            (Some(m), _) => format!(
                "{}, to {} recipient(s): {}",
                m.encryption,
                m.recipients.len(),
                m.recipients.join(", ")
            ),
            (None, Some(e)) => format!("age, to the recipients of Secret {}", e.secret_ref.name),
            (None, None) => "not recorded".to_owned(),
        },
    );
    if let Some(m) = &manifest {
        line(
            "Node facts:",
            format!(
                "kernel {}, CRIU {}, cgroup {}, {} CPU flags",
                m.kernel, m.criu_version, m.cgroup_version, m.cpu_flags
            ),
        );
    }
    if let Some(sizes) = status.sizes {
        let size = |b: Option<i64>| b.map_or_else(unknown, |b| human_bytes(u64::try_from(b).unwrap_or(0)));
        line(
            "Size:",
            format!(
                "{} captured, {} stored, {} objects",
                size(sizes.captured_bytes),
                size(sizes.stored_bytes),
                sizes.objects.map_or_else(unknown, |n| n.to_string())
            ),
        );
    }
    if let Some(t) = status.timings {
        let ms = |m: Option<i64>| m.map_or_else(unknown, human_duration);
        line(
            "Timings:",
            format!(
                "frozen {}, dump {}, upload {}, total {}",
                ms(t.freeze_window_millis),
                ms(t.dump_millis),
                ms(t.upload_millis),
                ms(t.total_millis)
            ),
        );
    }
    if let Some(ready) = status.conditions.iter().find(|c| c.type_ == "Ready") {
        line(
            "Ready:",
            format!("{} {}: {}", ready.status, ready.reason, ready.message),
        );
    }
    out.push("Containers:".to_owned());
    if status.checkpointed_containers.is_empty() {
        out.push("  <none recorded>".to_owned());
    }
    for c in &status.checkpointed_containers {
        out.push(format!("  {}:", c.name));
        out.push(format!("    Image:      {}", c.image));
        out.push(format!(
            "    Image ID:   {}",
            c.image_id.clone().unwrap_or_else(unknown)
        ));
        out.push(format!("    Archive:    {}", c.archive.clone().unwrap_or_else(unknown)));
    }
    if let Some(m) = &manifest {
        out.push("Objects:".to_owned());
        for o in &m.objects {
            out.push(format!(
                "  {}  {} stored, {} raw  sha256:{}",
                o.key,
                human_bytes(u64::try_from(o.size).unwrap_or(0)),
                human_bytes(u64::try_from(o.raw_size).unwrap_or(0)),
                o.sha256
            ));
        }
    }
    let mut text = out.join("\n");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use serde_json::json;

    use super::*;

    #[test]
    fn a_ready_checkpoint_shows_where_it_is_what_it_holds_and_its_digests() {
        let checkpoint: PodCheckpoint = serde_json::from_value(json!({
            "apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint",
            "metadata": {"name": "counter-1", "namespace": "demo"},
            "spec": {"sourcePodName": "counter", "encryption": {"secretRef": {"name": "keys"}}},
            "status": {
                "phase": "Ready", "nodeName": "node-1",
                "sourcePodUID": "0f8d1c2e-1111-2222-3333-444455556666",
                "checkpointLocation": {"type": "ObjectStore",
                                       "objectStore": {"storage": "s3", "prefix": "demo/counter-1/"}},
                "manifestDigest": "sha256:abcd",
                "checkpointedContainers": [{"name": "app", "image": "busybox", "imageID": "sha256:feed",
                                            "archive": "containers/app.tar.zst"}],
                "sizes": {"capturedBytes": 10_485_760, "storedBytes": 2_097_152, "objects": 4},
                "timings": {"freezeWindowMillis": 420, "dumpMillis": 300, "uploadMillis": 900, "totalMillis": 1500},
                "conditions": [{"type": "Ready", "status": "True", "reason": "CheckpointCompleted",
                                "message": "stored", "lastTransitionTime": "2026-01-02T03:04:05Z"}]}
        }))
        .unwrap();
        let text = describe(&checkpoint);
        for expected in [
            "Name:               counter-1",
            "Phase:              Ready",
            "Pod:                counter (uid 0f8d1c2e-1111-2222-3333-444455556666)",
            "Node:               node-1",
            "Location:           CheckpointStorage s3 at demo/counter-1/manifest.json",
            "Manifest digest:    sha256:abcd",
            "Encryption:         age, to the recipients of Secret keys",
            "Size:               10.0 MiB captured, 2.0 MiB stored, 4 objects",
            "Timings:            frozen 420ms, dump 300ms, upload 900ms, total 1.5s",
            "Ready:              True CheckpointCompleted: stored",
            "  app:",
            "    Image ID:   sha256:feed",
            "    Archive:    containers/app.tar.zst",
        ] {
            assert!(text.contains(expected), "{expected:?} in\n{text}");
        }
    }

    #[test]
    fn a_pending_checkpoint_says_what_is_not_known_yet() {
        let checkpoint: PodCheckpoint = serde_json::from_value(json!({
            "apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint",
            "metadata": {"name": "c", "namespace": "demo"}, "spec": {"sourcePodName": "counter"}}))
        .unwrap();
        let text = describe(&checkpoint);
        assert!(text.contains("Phase:              <unknown>"), "{text}");
        assert!(text.contains("<none recorded>"), "{text}");
    }

    #[test]
    fn the_manifests_objects_node_and_encryption_show_from_status() {
        let checkpoint: PodCheckpoint = serde_json::from_value(json!({
            "apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint",
            "metadata": {"name": "c", "namespace": "demo"}, "spec": {"sourcePodName": "counter"},
            "status": {"phase": "Ready", "manifest": {
                "objects": [{"key": "containers/app.tar.zst", "size": 2048, "rawSize": 10240, "sha256": "beef"}],
                "kernel": "6.12.0", "criuVersion": "4.2", "cgroupVersion": "V2", "cpuFlags": 97,
                "encryption": "age", "recipients": ["age1xyz"]}}}))
        .unwrap();
        let text = describe(&checkpoint);
        for expected in [
            "Encryption:         age, to 1 recipient(s): age1xyz",
            "Node facts:         kernel 6.12.0, CRIU 4.2, cgroup V2, 97 CPU flags",
            "Objects:",
            "  containers/app.tar.zst  2.0 KiB stored, 10.0 KiB raw  sha256:beef",
        ] {
            assert!(text.contains(expected), "{expected:?} in\n{text}");
        }
    }
}
