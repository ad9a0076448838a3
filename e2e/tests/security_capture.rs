//! Attacks on the capture, as a tenant's pod makes them on the real cluster: what the
//! agent reads as host root must be the pod's own volume, whatever the pod did to the
//! paths above it after runc mounted it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod pods;

use std::time::Duration;

use cryopod_crds::v1alpha1::{CheckpointPhase, PodCheckpoint};
use cryopod_e2e::testbed::{TestNamespace, Testbed, wait_until};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use pods::control::*;
use pods::*;
use serde_json::json;

/// The pod's emptyDir is mounted at `/vol/data`. Once running, the pod moves `/vol`
/// away (the mount goes with it) and puts a symlink to `/etc` where the volume was.
/// Read through `/proc/<pid>/root` as the agent once did, the absolute link led to the
/// node's own `/etc`, which went into the tenant's checkpoint. Now the checkpoint fails
/// naming the mount, nothing of the node is read, and the pod runs on, thawed.
#[tokio::test]
async fn security_a_volume_swapped_for_a_symlink_is_not_captured() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-sec-swap").await.unwrap();
    let node = tb.nodes[0].clone();
    let script = "mv /vol /vol-moved && mkdir /vol && ln -s /etc /vol/data && i=0; \
                  while :; do i=$((i+1)); echo $i > /vol-moved/data/beat.tmp && mv /vol-moved/data/beat.tmp /vol-moved/data/beat; \
                  sleep 0.1; done";
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "swapper"},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                 "volumes": [{"name": "data", "emptyDir": {}}],
                 "containers": [{"name": "app", "image": BUSYBOX, "imagePullPolicy": "Never",
                                  "command": ["sh", "-c", script],
                                  "volumeMounts": [{"name": "data", "mountPath": "/vol/data"}]}]}
    }))
    .unwrap();
    ns.pods(&client).create(&Default::default(), &pod).await.unwrap();
    let running = ns
        .wait_ready(&client, "swapper", Duration::from_secs(90))
        .await
        .unwrap();
    let data = pod_data(&tb, &running);
    let beat = || number_in(&data.join("beat"));
    // The swap is done once the pod beats into the moved volume.
    wait_until("the pod to swap its volume's path", Duration::from_secs(30), || async {
        (beat() > 0).then_some(())
    })
    .await
    .unwrap();

    let OneNodeControl {
        state,
        log,
        _agent,
        _operator,
        _tls,
    } = start_one_node_control(&tb, &ns.name).await;
    let storage = s3_checkpoint_storage(&tb, &ns.name);
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "swap"},
                "spec": {"sourcePodName": "swapper", "storage": storage}}),
    );
    let api: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    let cp = ended(&api, "swap").await;
    let (_, reason, message) = ready_condition(&cp);
    println!("{reason}: {message}");
    assert_eq!(
        cp.status.as_ref().unwrap().phase,
        Some(CheckpointPhase::Failed),
        "{message}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        message.contains("mount /vol/data") && message.contains("not the volume the runtime mounted"),
        "{message}"
    );
    // Nothing was stored, and the pod was thawed: it beats on.
    let store = tb.s3_store(&tb.s3.endpoint, &tb.s3.secret_key).unwrap();
    let prefix = object_store::path::Path::from(stored_prefix(&cp));
    let stored: Vec<_> = store.list(Some(&prefix)).collect().await;
    assert!(stored.is_empty(), "stored under {prefix}: {stored:?}");
    let before = beat();
    wait_until("the pod to beat on", Duration::from_secs(20), || async {
        (beat() > before).then_some(())
    })
    .await
    .unwrap();
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&state);
}

/// The attack: the tenant's image links `/escape -> /`, and the pod mounts its
/// emptyDir at `/escape` + the agent's own TLS directory. runc resolved that path
/// inside the container, so the volume is at `<rootfs>/<tls dir>`; an agent that read
/// `/proc/<pid>/root/escape/...` followed the absolute link to its own root and put its
/// key into the tenant's checkpoint. Now the path is resolved as the container sees it:
/// the checkpoint holds the pod's own file, and nothing of the agent's directory.
#[tokio::test]
async fn security_an_images_link_to_root_does_not_lead_the_capture_out() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-sec-link").await.unwrap();
    let node = tb.nodes[0].clone();
    let OneNodeControl {
        state,
        log,
        _agent,
        _operator,
        _tls,
    } = start_one_node_control(&tb, &ns.name).await;
    let tls_dir = _tls.dir.path().to_path_buf();
    let agent_files: Vec<String> = std::fs::read_dir(&tls_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!agent_files.is_empty(), "the agent's TLS directory holds its key");
    let mount = format!("/escape{}", tls_dir.display());
    let script = format!("echo tenant > {mount}/own.tmp && mv {mount}/own.tmp {mount}/own; while :; do sleep 1; done");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "linker"},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                 "volumes": [{"name": "data", "emptyDir": {}}],
                 "containers": [{"name": "app", "image": BUSYBOX, "imagePullPolicy": "Never",
                                  "command": ["sh", "-c", script],
                                  "volumeMounts": [{"name": "data", "mountPath": mount}]}]}
    }))
    .unwrap();
    ns.pods(&client).create(&Default::default(), &pod).await.unwrap();
    let running = ns.wait_ready(&client, "linker", Duration::from_secs(90)).await.unwrap();
    let data = pod_data(&tb, &running);
    wait_until("the pod to write its own file", Duration::from_secs(30), || async {
        data.join("own").exists().then_some(())
    })
    .await
    .unwrap();

    let storage = s3_checkpoint_storage(&tb, &ns.name);
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "link"},
                "spec": {"sourcePodName": "linker", "storage": storage}}),
    );
    let api: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    let cp = ended(&api, "link").await;
    let (_, reason, message) = ready_condition(&cp);
    assert_eq!(
        cp.status.as_ref().unwrap().phase,
        Some(CheckpointPhase::Ready),
        "{reason}: {message}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let volume = opened(&tb, &cp, stored_object(&tb, &cp, "pod/volume/data.tar.zst").await).await;
    let inner = &tar_members(&unzstd(&volume))[0].1;
    let names: Vec<String> = tar_members(inner).into_iter().map(|(name, _)| name).collect();
    println!("captured volume: {names:?}; the agent's directory holds {agent_files:?}");
    assert!(
        names.iter().any(|n| n.rsplit('/').next() == Some("own")),
        "the pod's own file: {names:?}"
    );
    for file in &agent_files {
        assert!(
            !names.iter().any(|n| n.rsplit('/').next() == Some(file.as_str())),
            "the agent's {file} was captured: {names:?}"
        );
    }
    api.delete("link", &Default::default()).await.unwrap();
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&state);
}

/// The pod makes a user namespace, mounts an overlay whose upper directory it names
/// like the node agent's state (`/var/lib/cryopod/restores`, on a tmpfs of its own)
/// and pivots into it, so that its own mount table shows that overlay at `/`. The
/// agent once took the upper directory from that table and read the node's directory
/// of that name (other pods' prepared restores) into the tenant's checkpoint. Now it
/// takes the one the runtime mounted for the container: the container's own changes,
/// and nothing of the node.
#[tokio::test]
async fn security_a_tenants_own_overlay_root_does_not_choose_what_is_captured() {
    use cryopod_node_agent::cri::CriClient;
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-sec-ovl").await.unwrap();
    let node = tb.nodes[0].clone();
    // A file of the node's where the tenant points.
    let node_dir = tb.dir.join(&node).join("cryopod/restores");
    std::fs::create_dir_all(&node_dir).unwrap();
    let canary = node_dir.join(format!("canary-{}", ns.name));
    std::fs::write(&canary, "the node's, not the tenant's").unwrap();
    // The new root is an overlay on a tmpfs of the pod's own: busybox in its lower
    // layer, the upper layer named like the node's directory.
    let script = "mkdir -p /marker /var/lib/cryopod /tmp/new && echo tenant > /marker/own && \
        exec busybox unshare -Urm sh -c 'set -e; \
          busybox mount -t tmpfs t /var/lib/cryopod; cd /var/lib/cryopod; \
          mkdir -p restores work lower/bin lower/data lower/old; \
          cp /bin/busybox lower/bin/busybox; ln -s busybox lower/bin/sh; ln -s busybox lower/bin/sleep; \
          busybox mount -t overlay overlay -o lowerdir=/var/lib/cryopod/lower,upperdir=/var/lib/cryopod/restores,workdir=/var/lib/cryopod/work,userxattr /tmp/new; \
          busybox mount --bind /data /tmp/new/data; \
          cd /tmp/new; busybox pivot_root . old; \
          echo 1 > /data/ready; exec /bin/busybox sh -c \"while :; do sleep 1; done\"'";
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pivoter"},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                 "volumes": [{"name": "data", "emptyDir": {}}],
                 "containers": [{"name": "app", "image": BUSYBOX, "imagePullPolicy": "Never",
                                  "command": ["sh", "-c", script],
                                  "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}
    }))
    .unwrap();
    ns.pods(&client).create(&Default::default(), &pod).await.unwrap();
    let running = ns
        .wait_ready(&client, "pivoter", Duration::from_secs(90))
        .await
        .unwrap();
    let data = pod_data(&tb, &running);
    wait_until(
        "the pod to pivot into its own overlay",
        Duration::from_secs(30),
        || async { (number_in(&data.join("ready")) == 1).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", kubectl(&tb, &["logs", "-n", &ns.name, "pivoter"])));
    let uid = running.metadata.uid.clone().unwrap();
    let pod =
        cryopod_node_agent::discovery::discover(&CriClient::connect(&cri_socket(&tb, &node)).await.unwrap(), &uid)
            .await
            .unwrap();
    let container = &pod.containers[0];
    // The attack is in place: the container's own table names the node's path at `/`.
    let own = std::fs::read_to_string(format!("/proc/{}/mountinfo", container.pid)).unwrap();
    assert!(
        own.lines()
            .any(|l| l.split_whitespace().nth(4) == Some("/") && l.contains("upperdir=/var/lib/cryopod/restores")),
        "{own}"
    );

    let exec = node_exec(&tb, &node);
    let runtime_mounts = std::fs::read_to_string(exec.node_mountinfo()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let tar = out.path().join("rootfs-diff.tar");
    cryopod_node_agent::capture::rootfs_diff(container, &exec.node_root(), &runtime_mounts, &tar).unwrap();
    let names: Vec<String> = tar_members(&std::fs::read(&tar).unwrap())
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    println!("captured rootfs changes: {names:?}");
    assert!(
        names.iter().any(|n| n == "marker/own"),
        "the container's own changes: {names:?}"
    );
    assert!(
        !names.iter().any(|n| n.contains("canary")),
        "nothing of the node's directory: {names:?}"
    );
    let _ = std::fs::remove_file(&canary);
}

fn kubectl(tb: &Testbed, args: &[&str]) -> String {
    let out = tb.kubectl().args(args).output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
