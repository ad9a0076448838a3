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

/// The sysctls the baseline Pod Security profile allows a pod to set.
const SAFE_SYSCTLS: [&str; 10] = [
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

/// The SELinux types the baseline Pod Security profile allows.
const BASELINE_SELINUX_TYPES: [&str; 4] = [
    "container_t",
    "container_init_t",
    "container_kvm_t",
    "container_engine_t",
];

/// Annotation prefix of the legacy AppArmor profile of a container.
const APPARMOR_ANNOTATION: &str = "container.apparmor.security.beta.kubernetes.io/";

/// The legacy seccomp annotations: the pod's, and each container's by prefix.
const SECCOMP_POD_ANNOTATION: &str = "seccomp.security.alpha.kubernetes.io/pod";
const SECCOMP_CONTAINER_ANNOTATION: &str = "container.seccomp.security.alpha.kubernetes.io/";

/// Why a security option breaks the baseline profile: a seccomp or AppArmor profile
/// that confines nothing, an SELinux user, role or type of the node's own.
fn refused_options(
    field: &str,
    seccomp: Option<&k8s_openapi::api::core::v1::SeccompProfile>,
    apparmor: Option<&k8s_openapi::api::core::v1::AppArmorProfile>,
    selinux: Option<&k8s_openapi::api::core::v1::SELinuxOptions>,
) -> Option<String> {
    if seccomp.is_some_and(|p| p.type_ == "Unconfined") {
        return Some(format!(
            "{field}.seccompProfile.type: Unconfined lifts the runtime's syscall filter"
        ));
    }
    if apparmor.is_some_and(|p| p.type_ == "Unconfined") {
        return Some(format!(
            "{field}.appArmorProfile.type: Unconfined lifts the node's AppArmor profile"
        ));
    }
    if let Some(selinux) = selinux {
        if let Some(user) = &selinux.user {
            return Some(format!("{field}.seLinuxOptions.user: {user} is not the runtime's"));
        }
        if let Some(role) = &selinux.role {
            return Some(format!("{field}.seLinuxOptions.role: {role} is not the runtime's"));
        }
        if let Some(type_) = selinux
            .type_
            .as_ref()
            .filter(|t| !BASELINE_SELINUX_TYPES.contains(&t.as_str()))
        {
            return Some(format!(
                "{field}.seLinuxOptions.type: {type_} is not one the baseline Pod Security profile allows"
            ));
        }
    }
    None
}

/// Why a pod spec may not be checkpointed nor come back from a checkpoint, naming
/// the field: a restored pod is created with the operator's rights, so it gets none of
/// what the baseline Pod Security profile forbids (privileged or host-process
/// containers, capabilities beyond its set, the node's namespaces, files and ports, an
/// unmasked /proc, unsafe sysctls, seccomp or AppArmor lifted, SELinux options of the
/// node's own), whatever a checkpoint's recorded template says. Its service account is
/// one of the namespace's, which any pod its requester may create can name.
pub fn refused_spec(spec: &k8s_openapi::api::core::v1::PodSpec) -> Option<String> {
    refused_spec_with(spec, None)
}

/// [`refused_spec`], also checking the annotations the pod is created with.
pub fn refused_spec_with(
    spec: &k8s_openapi::api::core::v1::PodSpec,
    annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> Option<String> {
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
    if let Some(pod) = &spec.security_context {
        if let Some(sysctl) = pod
            .sysctls
            .iter()
            .flatten()
            .find(|s| !SAFE_SYSCTLS.contains(&s.name.as_str()))
        {
            return Some(format!(
                "spec.securityContext.sysctls: {} is not a sysctl the baseline Pod Security profile allows",
                sysctl.name
            ));
        }
        if pod.windows_options.as_ref().and_then(|w| w.host_process) == Some(true) {
            return Some("spec.securityContext.windowsOptions.hostProcess: the pod runs on the node".to_owned());
        }
        if let Some(why) = refused_options(
            "spec.securityContext",
            pod.seccomp_profile.as_ref(),
            pod.app_armor_profile.as_ref(),
            pod.se_linux_options.as_ref(),
        ) {
            return Some(why);
        }
    }
    for (key, value) in annotations.into_iter().flatten() {
        if key.starts_with(APPARMOR_ANNOTATION) && value == "unconfined" {
            return Some(format!(
                "metadata.annotations[{key}]: unconfined lifts the node's AppArmor profile"
            ));
        }
        if (key == SECCOMP_POD_ANNOTATION || key.starts_with(SECCOMP_CONTAINER_ANNOTATION)) && value == "unconfined" {
            return Some(format!(
                "metadata.annotations[{key}]: unconfined lifts the runtime's syscall filter"
            ));
        }
    }
    // Ephemeral containers are never checkpointed (the template drops them), and the
    // API server refuses them at creation; they are held to the profile all the same.
    let ephemeral: Vec<k8s_openapi::api::core::v1::Container> = spec
        .ephemeral_containers
        .iter()
        .flatten()
        .map(|e| k8s_openapi::api::core::v1::Container {
            name: e.name.clone(),
            ports: e.ports.clone(),
            security_context: e.security_context.clone(),
            ..Default::default()
        })
        .collect();
    let containers = spec
        .containers
        .iter()
        .map(|c| ("containers", c))
        .chain(spec.init_containers.iter().flatten().map(|c| ("initContainers", c)))
        .chain(ephemeral.iter().map(|c| ("ephemeralContainers", c)));
    for (kind, container) in containers {
        if let Some(port) = container
            .ports
            .iter()
            .flatten()
            .find(|p| p.host_port.is_some_and(|h| h != 0))
        {
            return Some(format!(
                "spec.{kind}[{}].ports[{}].hostPort: the container takes a port of the node",
                container.name, port.container_port
            ));
        }
        let Some(security) = &container.security_context else {
            continue;
        };
        let field = format!("spec.{kind}[{}].securityContext", container.name);
        if security.privileged == Some(true) {
            return Some(format!("{field}.privileged: the container is privileged"));
        }
        if security.windows_options.as_ref().and_then(|w| w.host_process) == Some(true) {
            return Some(format!(
                "{field}.windowsOptions.hostProcess: the container runs on the node"
            ));
        }
        if let Some(mount) = security.proc_mount.as_ref().filter(|m| m.as_str() != "Default") {
            return Some(format!("{field}.procMount: {mount} unmasks the node's /proc"));
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
        if let Some(why) = refused_options(
            &field,
            security.seccomp_profile.as_ref(),
            security.app_armor_profile.as_ref(),
            security.se_linux_options.as_ref(),
        ) {
            return Some(why);
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
            (
                serde_json::json!({"containers": [{"name": "app", "image": "x",
                    "ports": [{"containerPort": 80, "hostPort": 80}]}]}),
                "spec.containers[app].ports[80].hostPort: the container takes a port of the node",
            ),
            (
                serde_json::json!({"containers": [{"name": "app", "image": "x",
                    "securityContext": {"procMount": "Unmasked"}}]}),
                "spec.containers[app].securityContext.procMount: Unmasked unmasks the node's /proc",
            ),
            (
                serde_json::json!({"containers": [app], "securityContext": {"seccompProfile": {"type": "Unconfined"}}}),
                "spec.securityContext.seccompProfile.type: Unconfined lifts the runtime's syscall filter",
            ),
            (
                serde_json::json!({"containers": [{"name": "app", "image": "x",
                    "securityContext": {"appArmorProfile": {"type": "Unconfined"}}}]}),
                "spec.containers[app].securityContext.appArmorProfile.type: Unconfined lifts the node's AppArmor \
                 profile",
            ),
            (
                serde_json::json!({"containers": [{"name": "app", "image": "x",
                    "securityContext": {"seLinuxOptions": {"type": "spc_t"}}}]}),
                "spec.containers[app].securityContext.seLinuxOptions.type: spc_t is not one the baseline Pod \
                 Security profile allows",
            ),
            (
                serde_json::json!({"containers": [app], "securityContext": {"seLinuxOptions": {"user": "system_u"}}}),
                "spec.securityContext.seLinuxOptions.user: system_u is not the runtime's",
            ),
            (
                serde_json::json!({"containers": [app], "securityContext": {"sysctls": [
                    {"name": "net.ipv4.tcp_syncookies", "value": "1"}, {"name": "kernel.msgmax", "value": "1"}]}}),
                "spec.securityContext.sysctls: kernel.msgmax is not a sysctl the baseline Pod Security profile allows",
            ),
        ];
        for (given, expected) in table {
            assert_eq!(refused_spec(&spec(given.clone())).as_deref(), Some(expected), "{given}");
        }
        let legacy = std::collections::BTreeMap::from([(format!("{APPARMOR_ANNOTATION}app"), "unconfined".to_owned())]);
        assert_eq!(
            refused_spec_with(&spec(serde_json::json!({"containers": [app]})), Some(&legacy)).as_deref(),
            Some(
                "metadata.annotations[container.apparmor.security.beta.kubernetes.io/app]: unconfined lifts the \
                  node's AppArmor profile"
            )
        );
        let legacy_seccomp =
            std::collections::BTreeMap::from([(format!("{SECCOMP_CONTAINER_ANNOTATION}app"), "unconfined".to_owned())]);
        assert_eq!(
            refused_spec_with(&spec(serde_json::json!({"containers": [app]})), Some(&legacy_seccomp)).as_deref(),
            Some(
                "metadata.annotations[container.seccomp.security.alpha.kubernetes.io/app]: unconfined lifts the \
                 runtime's syscall filter"
            )
        );
        assert_eq!(
            refused_spec(&spec(serde_json::json!({"containers": [app], "ephemeralContainers": [
                {"name": "debug", "image": "x", "securityContext": {"privileged": true}}]})))
            .as_deref(),
            Some("spec.ephemeralContainers[debug].securityContext.privileged: the container is privileged")
        );
        // The confined defaults pass.
        let confined = serde_json::json!({"containers": [{"name": "app", "image": "x",
            "securityContext": {"procMount": "Default", "seccompProfile": {"type": "RuntimeDefault"},
                                "seLinuxOptions": {"type": "container_t", "level": "s0:c1,c2"}}}],
            "securityContext": {"sysctls": [{"name": "net.ipv4.ip_local_port_range", "value": "1024 65000"}]}});
        assert_eq!(refused_spec(&spec(confined)), None);
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
