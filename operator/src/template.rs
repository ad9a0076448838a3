//! The `checkpointedPodTemplate`: the pod as checkpointed, minus what belongs to
//! the old pod's life (identity, node, status, bookkeeping) and what the new pod gets
//! afresh (its service account token volume).

use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Prefix of the token volume the service account admission plugin adds; a new pod
/// gets its own, so the old one is dropped with its mounts.
const TOKEN_VOLUME_PREFIX: &str = "kube-api-access-";

/// Annotations that describe the old pod, not the workload.
const DROPPED_ANNOTATIONS: [&str; 2] = [
    "kubectl.kubernetes.io/last-applied-configuration",
    "kubernetes.io/config.seen",
];

/// Builds the template a restore creates its pod from.
pub fn checkpointed_pod_template(pod: &Pod) -> PodTemplateSpec {
    let metadata = ObjectMeta {
        name: pod.metadata.name.clone(),
        labels: pod.metadata.labels.clone(),
        annotations: pod.metadata.annotations.clone().map(|mut a| {
            a.retain(|k, _| !DROPPED_ANNOTATIONS.contains(&k.as_str()));
            a
        }),
        ..ObjectMeta::default()
    };
    let spec = pod.spec.clone().map(|mut spec| {
        spec.node_name = None;
        // Ephemeral (debug) containers are never checkpointed.
        spec.ephemeral_containers = None;
        let is_token = |name: &str| name.starts_with(TOKEN_VOLUME_PREFIX);
        if let Some(volumes) = spec.volumes.as_mut() {
            volumes.retain(|v| !is_token(&v.name));
        }
        for container in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            if let Some(mounts) = container.volume_mounts.as_mut() {
                mounts.retain(|m| !is_token(&m.name));
            }
        }
        spec
    });
    PodTemplateSpec {
        metadata: Some(metadata),
        spec,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_old_pods_identity_node_status_and_token_are_dropped() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "db-0", "namespace": "prod", "uid": "0b6f", "resourceVersion": "42",
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"app": "db"},
                "annotations": {"team": "storage", "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "1"}],
                "managedFields": [{"manager": "kubectl"}]
            },
            "spec": {
                "nodeName": "node-1",
                "containers": [{"name": "db", "image": "postgres:18",
                    "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql"},
                                     {"name": "kube-api-access-x1", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"}]}],
                "ephemeralContainers": [{"name": "debug", "image": "busybox"}],
                "volumes": [{"name": "data", "emptyDir": {}},
                            {"name": "kube-api-access-x1", "projected": {"sources": []}}]
            },
            "status": {"phase": "Running", "podIP": "10.244.1.5"}
        }))
        .unwrap();
        let template = serde_json::to_value(checkpointed_pod_template(&pod)).unwrap();
        assert_eq!(
            template,
            serde_json::json!({
                "metadata": {"name": "db-0", "labels": {"app": "db"}, "annotations": {"team": "storage"}},
                "spec": {
                    "containers": [{"name": "db", "image": "postgres:18",
                        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql"}]}],
                    "volumes": [{"name": "data", "emptyDir": {}}]
                }
            })
        );
    }
}
