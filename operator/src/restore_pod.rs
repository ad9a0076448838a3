//! The pod a restore creates: the checkpointed template on the target node, run by
//! cryopod's RuntimeClass, annotated with the prepared restore its handler reads.
//! Init containers are left out: they completed before the checkpoint and what they
//! left behind (emptyDirs, shared memory) is in it, so running them again would
//! repeat their effects. Images are pinned by digest where the checkpoint knows one.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};

/// The RuntimeClass whose handler restores containers.
pub const RUNTIME_CLASS: &str = "cryopod";
/// The annotation naming the prepared restore (read by the runtime handler).
pub const RESTORE_ANNOTATION: &str = "cryopod.io/restore";
/// Set on every restored pod: the operator watches these pods.
pub const RESTORED_LABEL: &str = "cryopod.io/restored";
/// The PodRestore that made a pod, by name (in the pod's namespace).
pub const PODRESTORE_ANNOTATION: &str = "cryopod.io/podrestore";
/// The annotation listing the init containers left out, comma-separated.
pub const SKIPPED_INIT_ANNOTATION: &str = "cryopod.io/skipped-init-containers";

/// A container's image as the checkpoint recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointedImage {
    /// Container name.
    pub container: String,
    /// The image reference the runtime resolved (`repo@sha256:…` when it has a
    /// repository digest, else an image id).
    pub image_ref: String,
}

/// Builds the restored pod named `name` on `node` for restore `restore_id`.
pub fn restore_pod(
    template: &PodTemplateSpec,
    name: &str,
    node: &str,
    restore_id: &str,
    images: &[CheckpointedImage],
) -> Pod {
    let mut metadata = template.metadata.clone().unwrap_or_default();
    metadata.name = Some(name.to_owned());
    let annotations = metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(RESTORE_ANNOTATION.to_owned(), restore_id.to_owned());
    let mut spec = template.spec.clone().unwrap_or_default();
    if let Some(init) = spec.init_containers.take().filter(|i| !i.is_empty()) {
        let names: Vec<String> = init.into_iter().map(|c| c.name).collect();
        annotations.insert(SKIPPED_INIT_ANNOTATION.to_owned(), names.join(","));
    }
    spec.node_name = Some(node.to_owned());
    spec.runtime_class_name = Some(RUNTIME_CLASS.to_owned());
    for container in &mut spec.containers {
        let pinned = images
            .iter()
            .find(|i| i.container == container.name)
            .filter(|i| i.image_ref.contains("@sha256:"));
        if let Some(image) = pinned {
            container.image = Some(image.image_ref.clone());
        }
    }
    Pod {
        metadata,
        spec: Some(spec),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_restored_pod_runs_on_the_target_through_the_handler_without_init_containers() {
        let template: PodTemplateSpec = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "db-0", "labels": {"app": "db"}},
            "spec": {
                "initContainers": [{"name": "migrate", "image": "db-tools:1"}],
                "containers": [{"name": "db", "image": "postgres:18"}, {"name": "exporter", "image": "exporter:2"}]
            }
        }))
        .unwrap();
        let images = [
            CheckpointedImage {
                container: "db".into(),
                image_ref: "docker.io/library/postgres@sha256:abc".into(),
            },
            // An image id, not a repository digest: the tag stays.
            CheckpointedImage {
                container: "exporter".into(),
                image_ref: "sha256:def".into(),
            },
        ];
        let pod = restore_pod(&template, "db-0", "node-2", "r-1", &images);
        let json = serde_json::to_value(&pod).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "db-0", "labels": {"app": "db"},
                             "annotations": {"cryopod.io/restore": "r-1", "cryopod.io/skipped-init-containers": "migrate"}},
                "spec": {
                    "nodeName": "node-2", "runtimeClassName": "cryopod",
                    "containers": [{"name": "db", "image": "docker.io/library/postgres@sha256:abc"},
                                   {"name": "exporter", "image": "exporter:2"}]
                }
            })
        );
    }
}
