//! From what the container runtime reports (CRI, verbose), the facts a pod
//! checkpoint needs: the pod cgroup, each container's id, init PID, cgroup and image,
//! the runc root; and a refusal, naming the reason, for pods that cannot be
//! checkpointed as a unit.

use std::path::PathBuf;

use serde::Deserialize;

use crate::cgroup::CgroupPath;
use crate::cri::api::{ContainerState, NamespaceMode};
use crate::cri::{ContainerRuntime, ContainerView, CriError, SandboxView};
use crate::freeze::PodCgroups;

/// A running container of the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningContainer {
    /// Name in the pod spec.
    pub name: String,
    /// Runtime id.
    pub id: String,
    /// PID of its init process, as seen from the node.
    pub pid: u32,
    /// Its cgroup.
    pub cgroup: CgroupPath,
    /// Image as written in the pod spec.
    pub image: String,
    /// Image digest reference the container runs.
    pub image_ref: String,
    /// When the runtime created it, in nanoseconds since the epoch.
    pub created_at: i64,
    /// Its mounts as the runtime set them up.
    pub mounts: Vec<Mount>,
    /// Its OCI runtime spec, as the runtime wrote it (kept as `spec.dump`).
    pub spec: serde_json::Value,
}

/// One mount of a container.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Mount {
    /// Where it appears in the container.
    pub destination: String,
    /// What is mounted (a node path for bind mounts).
    #[serde(default)]
    pub source: String,
    /// Filesystem type (`bind`, `tmpfs`, ...).
    #[serde(default, rename = "type")]
    pub kind: String,
}

/// What the runtime knows of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRuntime {
    /// Sandbox id.
    pub sandbox_id: String,
    /// PID of the sandbox (pause) process, owner of the pod's namespaces.
    pub sandbox_pid: u32,
    /// The pod's IP, empty when the runtime reports none.
    pub pod_ip: String,
    /// The pod cgroup, parent of the sandbox's and every container's cgroup.
    pub pod_cgroup: CgroupPath,
    /// The sandbox's own cgroup.
    pub sandbox_cgroup: CgroupPath,
    /// runc's state directory for these containers.
    pub runc_root: PathBuf,
    /// The runc binary the runtime uses.
    pub runc_binary: PathBuf,
    /// Running containers, in creation order.
    pub containers: Vec<RunningContainer>,
}

impl PodRuntime {
    /// The cgroups to freeze: the sandbox's and every container's.
    pub fn freeze_targets(&self) -> PodCgroups {
        let mut containers = vec![self.sandbox_cgroup.clone()];
        containers.extend(self.containers.iter().map(|c| c.cgroup.clone()));
        PodCgroups {
            pod: self.pod_cgroup.clone(),
            containers,
        }
    }
}

/// Discovery failed, or the pod cannot be checkpointed.
#[derive(Debug)]
pub enum DiscoveryError {
    /// The runtime could not be asked.
    Runtime { source: CriError },
    /// No ready sandbox has this pod UID on this node.
    PodNotRunning { pod_uid: String },
    /// More than one ready sandbox has this pod UID.
    AmbiguousSandbox { pod_uid: String, count: usize },
    /// The runtime's verbose info lacks something or is not the JSON expected.
    RuntimeInfo { object: String, detail: String },
    /// The pod uses something a checkpoint cannot capture or restore.
    Unsupported { reason: String },
}

impl std::fmt::Display for DiscoveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Runtime { .. } => write!(f, "cannot ask the container runtime about the pod"),
            Self::PodNotRunning { pod_uid } => write!(f, "no running sandbox of pod {pod_uid} on this node"),
            Self::AmbiguousSandbox { pod_uid, count } => write!(f, "{count} running sandboxes of pod {pod_uid}"),
            Self::RuntimeInfo { object, detail } => write!(f, "unexpected runtime info for {object}: {detail}"),
            Self::Unsupported { reason } => write!(f, "the pod cannot be checkpointed: {reason}"),
        }
    }
}

impl std::error::Error for DiscoveryError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Runtime { source } => Some(source),
            _ => None,
        }
    }
}

/// The part of containerd's verbose `info` JSON the agent reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Info {
    pid: u32,
    #[serde(default)]
    runtime_options: RuntimeOptions,
    runtime_spec: RuntimeSpec,
    #[serde(default)]
    config: serde_json::Value,
}

#[derive(Debug, Default, Deserialize)]
struct RuntimeOptions {
    #[serde(default)]
    binary_name: String,
    #[serde(default)]
    root: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuntimeSpec {
    linux: RuntimeLinux,
    #[serde(default)]
    mounts: Vec<Mount>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuntimeLinux {
    cgroups_path: String,
}

fn info_of(object: &str, info: &std::collections::HashMap<String, String>) -> Result<Info, DiscoveryError> {
    Ok(info_and_spec(object, info)?.0)
}

/// The parsed info and the raw runtime spec it carries.
fn info_and_spec(
    object: &str,
    info: &std::collections::HashMap<String, String>,
) -> Result<(Info, serde_json::Value), DiscoveryError> {
    let raw = info.get("info").ok_or_else(|| DiscoveryError::RuntimeInfo {
        object: object.to_owned(),
        detail: "no verbose `info` (is the runtime containerd?)".to_owned(),
    })?;
    let bad = |e: serde_json::Error| DiscoveryError::RuntimeInfo {
        object: object.to_owned(),
        detail: e.to_string(),
    };
    let value: serde_json::Value = serde_json::from_str(raw).map_err(bad)?;
    let spec = value.get("runtimeSpec").cloned().unwrap_or_default();
    Ok((serde_json::from_value(value).map_err(bad)?, spec))
}

fn unsupported(reason: impl Into<String>) -> DiscoveryError {
    DiscoveryError::Unsupported { reason: reason.into() }
}

/// Refuses sandboxes whose namespaces a checkpoint cannot own.
fn check_sandbox(sandbox: &SandboxView) -> Result<(), DiscoveryError> {
    let options = sandbox
        .status
        .linux
        .as_ref()
        .and_then(|l| l.namespaces.as_ref())
        .and_then(|n| n.options.as_ref());
    let Some(options) = options else { return Ok(()) };
    let node = NamespaceMode::Node as i32;
    if options.network == node {
        return Err(unsupported("hostNetwork: the pod uses the node's network namespace"));
    }
    if options.pid == node {
        return Err(unsupported("hostPID: the pod uses the node's PID namespace"));
    }
    if options.ipc == node {
        return Err(unsupported("hostIPC: the pod uses the node's IPC namespace"));
    }
    if options
        .userns_options
        .as_ref()
        .is_some_and(|u| u.mode == NamespaceMode::Pod as i32)
    {
        return Err(unsupported("hostUsers: false (user namespaces) is not supported yet"));
    }
    Ok(())
}

/// Refuses containers that a checkpoint cannot capture.
fn check_container(name: &str, info: &Info) -> Result<(), DiscoveryError> {
    let security = &info.config["linux"]["security_context"];
    if security["privileged"].as_bool() == Some(true) {
        return Err(unsupported(format!("container {name} is privileged")));
    }
    let devices = info.config["devices"].as_array().map_or(0, Vec::len);
    if devices > 0 {
        return Err(unsupported(format!("container {name} has host devices")));
    }
    Ok(())
}

/// containerd's runc shim keeps runc state in `<root>/<containerd namespace>`; CRI
/// containers live in the `k8s.io` namespace, and the root defaults to
/// `/run/containerd/runc`.
fn runc_root(configured: &str) -> PathBuf {
    let root = if configured.is_empty() {
        "/run/containerd/runc"
    } else {
        configured
    };
    PathBuf::from(root).join("k8s.io")
}

/// The runc binary the runtime runs: containerd's shim looks `runc` up in its PATH
/// when `BinaryName` is unset, as in containerd's default configuration.
fn runc_binary(configured: &str) -> PathBuf {
    PathBuf::from(if configured.is_empty() { "runc" } else { configured })
}

/// Builds the pod's runtime facts from the runtime's answers.
pub fn pod_runtime(
    pod_uid: &str,
    sandboxes: Vec<SandboxView>,
    containers: Vec<ContainerView>,
) -> Result<PodRuntime, DiscoveryError> {
    let sandbox = match <[SandboxView; 1]>::try_from(sandboxes) {
        Ok([sandbox]) => sandbox,
        Err(v) if v.is_empty() => {
            return Err(DiscoveryError::PodNotRunning {
                pod_uid: pod_uid.to_owned(),
            });
        }
        Err(v) => {
            return Err(DiscoveryError::AmbiguousSandbox {
                pod_uid: pod_uid.to_owned(),
                count: v.len(),
            });
        }
    };
    check_sandbox(&sandbox)?;
    let sandbox_info = info_of(&format!("sandbox {}", sandbox.status.id), &sandbox.info)?;
    let sandbox_object = format!("sandbox {}", sandbox.status.id);
    let cgroup_of = |object: &str, text: &str| {
        CgroupPath::from_runtime(text).map_err(|detail| DiscoveryError::RuntimeInfo {
            object: object.to_owned(),
            detail,
        })
    };
    let sandbox_cgroup = cgroup_of(&sandbox_object, &sandbox_info.runtime_spec.linux.cgroups_path)?;
    let pod_cgroup = sandbox_info.config["linux"]["cgroup_parent"]
        .as_str()
        .ok_or_else(|| DiscoveryError::RuntimeInfo {
            object: sandbox_object.clone(),
            detail: "no linux.cgroup_parent".to_owned(),
        })
        .and_then(|parent| cgroup_of(&sandbox_object, parent))?;
    // Containment below is by prefix: the pod's cgroup is never the root, and the
    // sandbox sits in it like every container.
    if pod_cgroup.as_str().trim_matches('/').is_empty()
        || !sandbox_cgroup
            .as_str()
            .starts_with(&format!("{}/", pod_cgroup.as_str()))
    {
        return Err(DiscoveryError::RuntimeInfo {
            object: sandbox_object,
            detail: format!("cgroup {sandbox_cgroup} is not under the pod cgroup {pod_cgroup}"),
        });
    }

    let mut running = Vec::new();
    for view in containers {
        let name = view
            .status
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        // Exited containers (completed init containers, earlier attempts) are not dumped.
        if view.status.state != ContainerState::ContainerRunning as i32 {
            continue;
        }
        let (info, spec) = info_and_spec(&format!("container {name}"), &view.info)?;
        check_container(&name, &info)?;
        let cgroup = cgroup_of(&format!("container {name}"), &info.runtime_spec.linux.cgroups_path)?;
        if !cgroup.as_str().starts_with(&format!("{}/", pod_cgroup.as_str())) {
            return Err(DiscoveryError::RuntimeInfo {
                object: format!("container {name}"),
                detail: format!("cgroup {cgroup} is not under the pod cgroup {pod_cgroup}"),
            });
        }
        running.push((
            view.status.created_at,
            RunningContainer {
                name,
                id: view.status.id.clone(),
                pid: info.pid,
                cgroup,
                image: view.status.image.as_ref().map(|i| i.image.clone()).unwrap_or_default(),
                image_ref: view.status.image_ref.clone(),
                created_at: view.status.created_at,
                mounts: info.runtime_spec.mounts.clone(),
                spec,
            },
        ));
    }
    if running.is_empty() {
        return Err(DiscoveryError::PodNotRunning {
            pod_uid: pod_uid.to_owned(),
        });
    }
    running.sort_by_key(|(created, _)| *created);
    Ok(PodRuntime {
        sandbox_id: sandbox.status.id.clone(),
        sandbox_pid: sandbox_info.pid,
        pod_ip: sandbox
            .status
            .network
            .as_ref()
            .map(|n| n.ip.clone())
            .unwrap_or_default(),
        pod_cgroup,
        sandbox_cgroup,
        runc_root: runc_root(&sandbox_info.runtime_options.root),
        runc_binary: runc_binary(&sandbox_info.runtime_options.binary_name),
        containers: running.into_iter().map(|(_, c)| c).collect(),
    })
}

/// Asks the runtime about the pod with this UID and builds its facts.
pub async fn discover(runtime: &impl ContainerRuntime, pod_uid: &str) -> Result<PodRuntime, DiscoveryError> {
    let sandboxes = runtime
        .sandboxes_of_pod(pod_uid)
        .await
        .map_err(|source| DiscoveryError::Runtime { source })?;
    let containers = match sandboxes.as_slice() {
        [only] => runtime
            .containers_of_sandbox(&only.status.id)
            .await
            .map_err(|source| DiscoveryError::Runtime { source })?,
        _ => Vec::new(),
    };
    pod_runtime(pod_uid, sandboxes, containers)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use std::collections::HashMap;

    use serde_json::json;

    use super::*;
    use crate::cri::api;

    pub(crate) const POD: &str = "/kubepods/besteffort/pod1";

    pub(crate) fn sandbox(network: NamespaceMode) -> SandboxView {
        sandbox_at(network, &format!("{POD}/sandbox"), POD)
    }

    fn sandbox_at(network: NamespaceMode, cgroups_path: &str, parent: &str) -> SandboxView {
        let options = api::NamespaceOption {
            network: network as i32,
            pid: NamespaceMode::Container as i32,
            ipc: NamespaceMode::Pod as i32,
            ..Default::default()
        };
        let info = json!({
            "pid": 100,
            "runtimeOptions": {"binary_name": "/usr/sbin/runc", "root": "/run/runc-k8s"},
            "runtimeSpec": {"linux": {"cgroupsPath": cgroups_path}},
            "config": {"linux": {"cgroup_parent": parent}},
        });
        SandboxView {
            status: api::PodSandboxStatus {
                id: "sandbox".into(),
                linux: Some(api::LinuxPodSandboxStatus {
                    namespaces: Some(api::Namespace { options: Some(options) }),
                }),
                ..Default::default()
            },
            info: HashMap::from([("info".to_owned(), info.to_string())]),
        }
    }

    pub(crate) fn container(
        name: &str,
        state: ContainerState,
        created_at: i64,
        cgroup: &str,
        config: serde_json::Value,
    ) -> ContainerView {
        let info = json!({"pid": created_at, "runtimeSpec": {"linux": {"cgroupsPath": cgroup}}, "config": config});
        ContainerView {
            status: api::ContainerStatus {
                id: format!("id-{name}-{created_at}"),
                metadata: Some(api::ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                state: state as i32,
                created_at,
                image: Some(api::ImageSpec {
                    image: "busybox".into(),
                    ..Default::default()
                }),
                image_ref: "sha256:abc".into(),
                ..Default::default()
            },
            info: HashMap::from([("info".to_owned(), info.to_string())]),
        }
    }

    #[test]
    fn collects_running_containers_in_creation_order() {
        let pod = pod_runtime(
            "uid",
            vec![sandbox(NamespaceMode::Pod)],
            vec![
                container(
                    "b",
                    ContainerState::ContainerRunning,
                    20,
                    &format!("{POD}/b"),
                    json!({}),
                ),
                container(
                    "init",
                    ContainerState::ContainerExited,
                    5,
                    &format!("{POD}/init"),
                    json!({}),
                ),
                container(
                    "a",
                    ContainerState::ContainerRunning,
                    10,
                    &format!("{POD}/a"),
                    json!({}),
                ),
            ],
        )
        .unwrap();
        let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["a", "b"], "running ones only, oldest first");
        assert_eq!(pod.pod_cgroup.as_str(), POD);
        assert_eq!(pod.runc_root, PathBuf::from("/run/runc-k8s/k8s.io"));
        assert_eq!(pod.sandbox_pid, 100);
        let targets = pod.freeze_targets();
        let cgroups: Vec<&str> = targets.containers.iter().map(CgroupPath::as_str).collect();
        assert_eq!(
            cgroups,
            [format!("{POD}/sandbox"), format!("{POD}/a"), format!("{POD}/b")]
        );
    }

    /// containerd with `SystemdCgroup = true` names cgroups as the systemd driver
    /// does (a slice for the pod, `<slice>:cri-containerd:<id>` for each container);
    /// hand-written after containerd's format until the VM node (issue #16) records
    /// real answers.
    #[test]
    fn a_pod_under_the_systemd_driver_is_found_in_its_slice() {
        let slice = "kubepods-besteffort-pod0f1e2d3c_4b5a_4968_8776_655443322110.slice";
        let under = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f1e2d3c_4b5a_4968_8776_655443322110.slice";
        let pod = pod_runtime(
            "uid",
            vec![sandbox_at(
                NamespaceMode::Pod,
                &format!("{slice}:cri-containerd:5ab0"),
                slice,
            )],
            vec![container(
                "app",
                ContainerState::ContainerRunning,
                10,
                &format!("{slice}:cri-containerd:77ef"),
                json!({}),
            )],
        )
        .unwrap();
        assert_eq!(pod.pod_cgroup.as_str(), under);
        let targets = pod.freeze_targets();
        let cgroups: Vec<&str> = targets.containers.iter().map(CgroupPath::as_str).collect();
        assert_eq!(
            cgroups,
            [
                format!("{under}/cri-containerd-5ab0.scope"),
                format!("{under}/cri-containerd-77ef.scope")
            ]
        );
        // A container outside the pod's slice is refused, naming both.
        let err = pod_runtime(
            "uid",
            vec![sandbox_at(
                NamespaceMode::Pod,
                &format!("{slice}:cri-containerd:5ab0"),
                slice,
            )],
            vec![container(
                "app",
                ContainerState::ContainerRunning,
                10,
                "kubepods-besteffort-podother.slice:cri-containerd:77ef",
                json!({}),
            )],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("container app"), "{err}");
    }

    /// The cgroups containerd named on the VM node (systemd driver, cgroup v2; see
    /// `tests/fixtures/vm-systemd-driver/`) are the ones its kernel put the tasks in.
    #[test]
    fn the_vm_nodes_recorded_cgroups_are_where_its_tasks_ran() {
        let json = |text: &str| serde_json::from_str::<serde_json::Value>(text).unwrap();
        let sandbox = json(include_str!(
            "../tests/fixtures/vm-systemd-driver/ctr-info-sandbox.json"
        ));
        let metadata = json(include_str!(
            "../tests/fixtures/vm-systemd-driver/ctr-info-sandbox.metadata.json"
        ));
        let recorded = json(include_str!(
            "../tests/fixtures/vm-systemd-driver/ctr-info-container.json"
        ));
        let summary = include_str!("../tests/fixtures/vm-systemd-driver/summary.txt");
        let cgroups_path =
            |record: &serde_json::Value| record["Spec"]["linux"]["cgroupsPath"].as_str().unwrap().to_owned();
        let parent = metadata["Metadata"]["Config"]["linux"]["cgroup_parent"]
            .as_str()
            .unwrap();
        let pod = pod_runtime(
            "uid",
            vec![sandbox_at(NamespaceMode::Pod, &cgroups_path(&sandbox), parent)],
            vec![container(
                "counter",
                ContainerState::ContainerRunning,
                10,
                &cgroups_path(&recorded),
                json!({}),
            )],
        )
        .unwrap();
        let kernel: Vec<&str> = summary
            .lines()
            .filter_map(|l| l.trim().strip_prefix("/proc/"))
            .filter_map(|l| l.split_once("0::").map(|(_, path)| path))
            .collect();
        let targets = pod.freeze_targets();
        let ours: Vec<&str> = targets.containers.iter().map(CgroupPath::as_str).collect();
        assert_eq!(ours, kernel, "the sandbox's scope, then the container's");
        assert!(kernel[0].starts_with(&format!("{}/", pod.pod_cgroup.as_str())));
    }

    #[test]
    fn refuses_host_network_naming_it() {
        let err = pod_runtime("uid", vec![sandbox(NamespaceMode::Node)], vec![]).unwrap_err();
        assert!(err.to_string().contains("hostNetwork"), "{err}");
    }

    #[test]
    fn refuses_privileged_containers_naming_them() {
        let privileged = json!({"linux": {"security_context": {"privileged": true}}});
        let err = pod_runtime(
            "uid",
            vec![sandbox(NamespaceMode::Pod)],
            vec![container(
                "tools",
                ContainerState::ContainerRunning,
                1,
                &format!("{POD}/t"),
                privileged,
            )],
        )
        .unwrap_err();
        assert!(err.to_string().contains("container tools is privileged"), "{err}");
    }

    #[test]
    fn a_missing_or_foreign_pod_is_an_error() {
        assert!(matches!(
            pod_runtime("uid", vec![], vec![]),
            Err(DiscoveryError::PodNotRunning { .. })
        ));
        let stray = container("x", ContainerState::ContainerRunning, 1, "/elsewhere/x", json!({}));
        let err = pod_runtime("uid", vec![sandbox(NamespaceMode::Pod)], vec![stray]).unwrap_err();
        assert!(matches!(err, DiscoveryError::RuntimeInfo { .. }), "{err}");
    }

    #[test]
    fn an_unset_runc_binary_is_the_one_in_the_runtimes_path() {
        // containerd's default configuration (the VM node's) names no BinaryName.
        assert_eq!(runc_binary(""), PathBuf::from("runc"));
        assert_eq!(runc_binary("/usr/local/bin/runc"), PathBuf::from("/usr/local/bin/runc"));
    }
}
