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
        // The image each container ran, pinned by its repository digest where the
        // kubelet reports one: a restore needs the very same root filesystem, and
        // the template is signed into the manifest with the pin.
        let ran = pod.status.as_ref().and_then(|s| s.container_statuses.as_ref());
        for container in &mut spec.containers {
            let digest = ran
                .into_iter()
                .flatten()
                .find(|s| s.name == container.name)
                .map(|s| s.image_id.as_str())
                .filter(|id| id.contains("@sha256:"));
            if let Some(digest) = digest {
                container.image = Some(digest.to_owned());
            }
        }
        spec
    });
    PodTemplateSpec {
        metadata: Some(metadata),
        spec,
    }
}

/// The capabilities the baseline Pod Security profile lets a container add.
const BASELINE_CAPABILITIES: [&str; 13] = [
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// Why a pod spec may not be checkpointed nor come back from a checkpoint, naming
/// the field: a restored pod is created with the operator's rights, so it gets none of
/// what the baseline Pod Security profile forbids among privileged containers,
/// capabilities beyond its set, the node's namespaces and its files, whatever a
/// checkpoint's recorded template says.
pub fn refused_spec(spec: &k8s_openapi::api::core::v1::PodSpec) -> Option<String> {
    let host = [
        ("hostNetwork", spec.host_network),
        ("hostPID", spec.host_pid),
        ("hostIPC", spec.host_ipc),
    ];
    if let Some((field, _)) = host.iter().find(|(_, on)| *on == Some(true)) {
        return Some(format!("spec.{field}: the pod shares the node's namespaces"));
    }
    if let Some(volume) = spec.volumes.iter().flatten().find(|v| v.host_path.is_some()) {
        return Some(format!(
            "spec.volumes[{}].hostPath: the pod mounts the node's files",
            volume.name
        ));
    }
    let containers = spec
        .containers
        .iter()
        .map(|c| ("containers", c))
        .chain(spec.init_containers.iter().flatten().map(|c| ("initContainers", c)));
    for (kind, container) in containers {
        let Some(security) = &container.security_context else {
            continue;
        };
        let field = format!("spec.{kind}[{}].securityContext", container.name);
        if security.privileged == Some(true) {
            return Some(format!("{field}.privileged: the container is privileged"));
        }
        let added = security.capabilities.as_ref().and_then(|c| c.add.as_ref());
        if let Some(cap) = added
            .into_iter()
            .flatten()
            .find(|c| !BASELINE_CAPABILITIES.contains(&c.as_str()))
        {
            return Some(format!(
                "{field}.capabilities.add: {cap} is beyond the baseline Pod Security profile's capabilities"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn pods_that_reach_the_node_are_refused_naming_the_field() {
        let spec = |v: serde_json::Value| -> k8s_openapi::api::core::v1::PodSpec { serde_json::from_value(v).unwrap() };
        let app = serde_json::json!({"name": "app", "image": "x"});
        assert_eq!(refused_spec(&spec(serde_json::json!({"containers": [app]}))), None);
        let binds = serde_json::json!({"name": "web", "image": "x",
            "securityContext": {"capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}}});
        assert_eq!(refused_spec(&spec(serde_json::json!({"containers": [binds]}))), None);
        let table = [
            (
                serde_json::json!({"hostPID": true, "containers": [app]}),
                "spec.hostPID: the pod shares the node's namespaces",
            ),
            (
                serde_json::json!({"containers": [app], "volumes": [{"name": "root", "hostPath": {"path": "/"}}]}),
                "spec.volumes[root].hostPath: the pod mounts the node's files",
            ),
            (
                serde_json::json!({"containers": [{"name": "app", "image": "x", "securityContext": {"privileged": true}}]}),
                "spec.containers[app].securityContext.privileged: the container is privileged",
            ),
            (
                serde_json::json!({"containers": [app], "initContainers": [{"name": "init", "image": "x",
                    "securityContext": {"capabilities": {"add": ["NET_BIND_SERVICE", "SYS_ADMIN"]}}}]}),
                "spec.initContainers[init].securityContext.capabilities.add: SYS_ADMIN is beyond the baseline Pod \
                 Security profile's capabilities",
            ),
        ];
        for (given, expected) in table {
            assert_eq!(refused_spec(&spec(given.clone())).as_deref(), Some(expected), "{given}");
        }
    }

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

    #[test]
    fn each_image_is_pinned_by_the_digest_the_kubelet_reported() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "a", "image": "postgres:18"}, {"name": "b", "image": "local:1"}]},
            "status": {"containerStatuses": [
                {"name": "a", "image": "postgres:18", "imageID": "docker.io/library/postgres@sha256:abc",
                 "ready": true, "restartCount": 0},
                {"name": "b", "image": "local:1", "imageID": "sha256:def", "ready": true, "restartCount": 0}]}
        }))
        .unwrap();
        let template = checkpointed_pod_template(&pod);
        let images: Vec<_> = template
            .spec
            .unwrap()
            .containers
            .into_iter()
            .map(|c| c.image.unwrap())
            .collect();
        // An image id is no repository digest: the tag stays.
        assert_eq!(images, ["docker.io/library/postgres@sha256:abc", "local:1"]);
    }
}
