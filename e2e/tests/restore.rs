//! Restore through Kubernetes on the real local cluster: a pod checkpointed on one
//! node comes back as a new pod on the other, created by the kubelet with the
//! `cryopod` RuntimeClass, whose handler restores each container instead of starting
//! it. And what must never start: tampered, truncated or foreign checkpoints.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod pods;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cryopod_e2e::testbed::{TestNamespace, Testbed, wait_until};
use cryopod_node_agent::checkpoint::{AfterDump, CheckpointOutcome};
use cryopod_node_agent::restore::{RestoreError, RestoreRequest, prepare_restore};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use kube::api::{DeleteParams, PostParams};
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;
use pods::*;

/// The numbers container `a` of the stateful pod logged (`counted N`), in order.
fn logged_counts(tb: &Testbed, ns: &str, pod: &str, container: &str) -> Vec<u64> {
    let out = tb
        .kubectl()
        .args(["logs", "-n", ns, pod, "-c", container])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("counted ")?.parse().ok())
        .collect()
}

fn number(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The restored pod, as the operator creates it.
fn restored_pod(manifest: &cryopod_node_agent::package::Manifest, name: &str, node: &str, restore_id: &str) -> Pod {
    use cryopod_operator::restore_pod::{CheckpointedImage, restore_pod};
    let template: PodTemplateSpec =
        serde_json::from_value(manifest.checkpointed_pod_template.clone().unwrap()).unwrap();
    let images: Vec<CheckpointedImage> = manifest
        .containers
        .iter()
        .map(|c| CheckpointedImage {
            container: c.name.clone(),
            image_ref: c.image_ref.clone(),
        })
        .collect();
    restore_pod(&template, name, node, restore_id, &images)
}

/// Checkpoints the running stateful pod on the first node, stopped after storing.
/// Returns the outcome, the prefix and when the checkpoint began (an upper bound of
/// the freeze's start).
async fn checkpoint_stateful(
    tb: &Testbed,
    client: &kube::Client,
    ns: &TestNamespace,
) -> (CheckpointOutcome, String, Instant) {
    let node = tb.nodes[0].clone();
    let pods = ns.pods(client);
    pods.create(&PostParams::default(), &stateful_pod(&node)).await.unwrap();
    let live = ns
        .wait_ready(client, "stateful", Duration::from_secs(90))
        .await
        .unwrap();
    let uid = live.metadata.uid.clone().unwrap();
    let data = empty_dir(tb, &node, &uid, "data");
    wait_until("the source to count", Duration::from_secs(30), || async {
        (number(&data.join("a")) > 5 && number(&data.join("d")) > 5).then_some(())
    })
    .await
    .unwrap();
    let (agent, _journal_dir) = library_agent(tb, &node).await;
    let prefix = format!("e2e/{}/stateful/{uid}/", ns.name);
    let mut request = pod_request(ns, "stateful", &uid, format!("mig-{}", &uid[..8]), prefix.clone());
    request.after = AfterDump::Stopped;
    request.pod_template =
        Some(serde_json::to_value(cryopod_operator::template::checkpointed_pod_template(&live)).unwrap());
    let store = tb.s3_store(&tb.s3.endpoint, &tb.s3.secret_key).unwrap();
    let started = Instant::now();
    let outcome = agent.checkpoint(&request, store, &|_| {}).await.unwrap();
    (outcome, prefix, started)
}

/// The facts of the target node as its agent reports them.
async fn target_facts(tb: &Testbed, node: &str) -> cryopod_node_agent::package::NodeFacts {
    library_agent(tb, node).await.0.node
}

fn restores_dir(tb: &Testbed, node: &str) -> std::path::PathBuf {
    tb.dir.join(node).join("cryopod/restores")
}

/// The migration of a stateful pod from node 1 to node 2 as a new pod, and its
/// figures: counters, the loopback conversation, `/dev/shm` and the emptyDir carry on;
/// the kubelet shows every container Running and Ready; logs and exec work.
#[tokio::test]
async fn a_pod_checkpointed_on_node_1_restores_as_a_new_pod_on_node_2() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-restore-k8s").await.unwrap();
    let (source, target) = (tb.nodes[0].clone(), tb.nodes[1].clone());
    let (outcome, prefix, frozen_at) = checkpoint_stateful(&tb, &client, &ns).await;
    ns.pods(&client)
        .delete("stateful", &DeleteParams::default())
        .await
        .unwrap();

    let store = tb.s3_store(&tb.s3.endpoint, &tb.s3.secret_key).unwrap();
    let restore_id = format!("r-{}", &outcome.manifest.pod.uid[..8]);
    // The target's agent binary prepares the restore, asked over mutual TLS.
    let tls = agent_tls();
    let (_agent_process, mut agent) = start_agent(&tb, &target, &tls, &tb.dir.join(&target).join("cryopod")).await;
    let prepare_started = Instant::now();
    let mut stream = agent
        .prepare_restore(cryopod_node_agent::server::pb::PrepareRestoreRequest {
            operation_id: restore_id.clone(),
            storage: Some(s3_storage(&tb)),
            prefix: prefix.clone(),
            manifest_digest: outcome.manifest_digest.clone(),
            age_identities: vec![],
            restored_pod: Some(cryopod_node_agent::server::pb::PodRef {
                namespace: ns.name.clone(),
                name: "stateful-restored".into(),
                uid: String::new(),
            }),
            start_stopped: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(op) = futures::StreamExt::next(&mut stream).await {
        last = Some(op.unwrap());
    }
    let last = last.unwrap();
    assert_eq!(
        last.state,
        cryopod_node_agent::server::pb::State::Succeeded as i32,
        "{}",
        last.error_message
    );
    let result = last.restore.unwrap();
    let prepare = prepare_started.elapsed();
    let prepared_dir = std::path::PathBuf::from(&result.directory);
    assert_eq!(prepared_dir, restores_dir(&tb, &target).join(&restore_id));
    // The emptyDir as the checkpoint captured it.
    let captured = tempfile::tempdir().unwrap();
    tar::Archive::new(std::fs::File::open(prepared_dir.join("pod/volume/data.tar")).unwrap())
        .unpack(captured.path())
        .unwrap();
    let (a_then, d_then) = (number(&captured.path().join("a")), number(&captured.path().join("d")));

    let pod = restored_pod(&outcome.manifest, "stateful-restored", &target, &restore_id);
    let created = Instant::now();
    ns.pods(&client).create(&PostParams::default(), &pod).await.unwrap();
    let ready = ns
        .wait_ready(&client, "stateful-restored", Duration::from_secs(90))
        .await
        .unwrap();
    let (restore_time, downtime) = (created.elapsed(), frozen_at.elapsed());
    let uid = ready.metadata.uid.clone().unwrap();
    // Each restored container's CRIU images are gone from the node; the pod's own
    // files stay for the handler's bookkeeping.
    for container in &outcome.manifest.containers {
        let dir = prepared_dir.join("containers").join(&container.name);
        assert!(dir.join(".restored").exists(), "{} was restored", container.name);
        assert!(
            !dir.join("checkpoint").exists(),
            "the images of {} are removed",
            container.name
        );
    }
    let data = empty_dir(&tb, &target, &uid, "data");

    // The in-memory counter and the shm mirror go on from their checkpointed values.
    let (a_now, d_now) = wait_until("the restored counters to move", Duration::from_secs(20), || async {
        let (a, d) = (number(&data.join("a")), number(&data.join("d")));
        (a > a_then && d > d_then).then_some((a, d))
    })
    .await
    .unwrap();
    assert!(a_now < a_then + 200, "a continued from {a_then}, not afresh: {a_now}");
    assert!(
        d_now < d_then + 200 && d_now > a_then / 2,
        "d follows a through /dev/shm: {d_now}"
    );
    // The loopback conversation goes on, in order, without a new connection.
    let heard = |path: &std::path::Path| -> Vec<u64> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let after = wait_until("the conversation to go on", Duration::from_secs(20), || async {
        let all = heard(&data.join("heard"));
        (all.len() > 5 && all.windows(2).all(|w| w[1] == w[0] + 1) && *all.last().unwrap() > 10).then_some(all)
    })
    .await
    .unwrap();
    assert_eq!(
        after[0],
        1,
        "one conversation from its start, no reconnect: {:?}",
        &after[..5]
    );

    // The file lock came back with its holder: a second attempt is still refused.
    let lock_state = |path: &std::path::Path| -> (String, u64) {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut words = text.split_whitespace();
        (
            words.next().unwrap_or_default().to_owned(),
            words.next().and_then(|n| n.parse().ok()).unwrap_or(0),
        )
    };
    let locker_then = lock_state(&captured.path().join("locker"));
    assert_eq!(locker_then.0, "held", "the lock was held at the checkpoint");
    let locker_now = wait_until(
        "the restored lock holder to report",
        Duration::from_secs(20),
        || async {
            let now = lock_state(&data.join("locker"));
            (now.1 > locker_then.1).then_some(now)
        },
    )
    .await
    .unwrap();
    assert_eq!(
        locker_now.0, "held",
        "the lock is still held after the restore: {locker_now:?}"
    );
    assert!(
        locker_now.1 < locker_then.1 + 200,
        "the holder continued: {locker_then:?} -> {locker_now:?}"
    );

    // The kubelet's view, logs and exec.
    let statuses = ready.status.unwrap().container_statuses.unwrap();
    assert_eq!(statuses.len(), 5);
    for status in &statuses {
        assert!(
            status.ready && status.restart_count == 0 && status.state.as_ref().unwrap().running.is_some(),
            "{status:?}"
        );
    }
    let exec = tb
        .kubectl()
        .args([
            "exec",
            "-n",
            &ns.name,
            "stateful-restored",
            "-c",
            "d",
            "--",
            "cat",
            "/dev/shm/token",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&exec.stdout).trim(), SHM_TOKEN, "{exec:?}");
    let logs = wait_until("the restored counter to log", Duration::from_secs(20), || async {
        logged_counts(&tb, &ns.name, "stateful-restored", "a")
            .into_iter()
            .find(|n| *n > a_then)
    })
    .await
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(data.join("init-ran")).unwrap(),
        "ran\n",
        "the init container ran once, on the source, and not again"
    );

    // A restored container that dies restarts fresh: the checkpoint is not replayed.
    let a = statuses.iter().find(|s| s.name == "a").unwrap();
    let id = a.container_id.as_deref().unwrap().trim_start_matches("containerd://");
    let runc_state = std::process::Command::new("runc")
        .arg("--root")
        .arg(tb.dir.join(&target).join("runc/k8s.io"))
        .args(["state", id])
        .output()
        .unwrap();
    let pid = serde_json::from_slice::<serde_json::Value>(&runc_state.stdout).unwrap()["pid"]
        .as_i64()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("container a to restart", Duration::from_secs(60), || async {
        let pod = ns.pods(&client).get("stateful-restored").await.ok()?;
        pod.status?
            .container_statuses?
            .iter()
            .any(|s| s.name == "a" && s.restart_count == 1 && s.state.as_ref().is_some_and(|st| st.running.is_some()))
            .then_some(())
    })
    .await
    .unwrap();
    // The new instance's log starts at its own beginning: 20, as a fresh counter logs first.
    let fresh = wait_until("the restarted counter to log", Duration::from_secs(20), || async {
        logged_counts(&tb, &ns.name, "stateful-restored", "a").first().copied()
    })
    .await
    .unwrap();
    assert_eq!(fresh, 20, "the restarted container counts from the start");
    println!("container a restarted afresh and counts {fresh}");

    println!(
        "restore {source} -> {target}: counter a {a_then} -> {a_now}, logged {}; prepare {} ms (fetched {} bytes), \
         pod created to Ready {} ms, downtime from freeze {} ms, freeze window {} ms",
        logs,
        prepare.as_millis(),
        result.fetched_bytes,
        restore_time.as_millis(),
        downtime.as_millis(),
        outcome.manifest.freeze_window_millis
    );
    for object in &outcome.manifest.objects {
        let _ = store.delete(&ObjectPath::from(format!("{prefix}{}", object.key))).await;
    }
    let _ = store.delete(&ObjectPath::from(format!("{prefix}manifest.json"))).await;
    let _ = std::fs::remove_dir_all(&prepared_dir);
}

/// A tampered or truncated object, or a node that cannot run the checkpoint, is
/// refused before anything is unpacked; a pod created for a restore that is not
/// prepared never runs a process; a restore that fails half-way stops the containers
/// it had restored and runs none again.
#[tokio::test]
async fn bad_checkpoints_are_refused_before_anything_runs() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-restore-bad").await.unwrap();
    let target = tb.nodes[1].clone();
    let (outcome, prefix, _) = checkpoint_stateful(&tb, &client, &ns).await;
    let store: Arc<dyn object_store::ObjectStore> = tb.s3_store(&tb.s3.endpoint, &tb.s3.secret_key).unwrap();
    let restores = restores_dir(&tb, &target);
    let facts = target_facts(&tb, &target).await;
    // Every restore here is bound to the pod "half", the one pod this test creates.
    let request = |id: &str| RestoreRequest {
        restore_id: id.to_owned(),
        prefix: prefix.clone(),
        manifest_digest: Some(outcome.manifest_digest.clone()),
        identities: vec![],
        restored_pod: cryopod_node_agent::handler::RestoredPod {
            namespace: ns.name.clone(),
            name: "half".into(),
            start_stopped: false,
        },
    };
    let archive = &outcome.manifest.containers[0].archive;
    let key = ObjectPath::from(format!("{prefix}{archive}"));
    let original = store.get(&key).await.unwrap().bytes().await.unwrap();

    // One byte changed.
    let mut tampered = original.to_vec();
    tampered[original.len() / 2] ^= 0x01;
    store.put(&key, tampered.into()).await.unwrap();
    let err = prepare_restore(&store, &request("bad-1"), &facts, &restores, &manifest_key())
        .await
        .unwrap_err();
    println!("tampered: {err}");
    assert!(matches!(err, RestoreError::Digest { .. }), "{err}");
    // Truncated.
    store
        .put(&key, original.slice(..original.len() - 100).into())
        .await
        .unwrap();
    let err = prepare_restore(&store, &request("bad-2"), &facts, &restores, &manifest_key())
        .await
        .unwrap_err();
    println!("truncated: {err}");
    assert!(matches!(err, RestoreError::Size { .. }), "{err}");
    store.put(&key, original.clone().into()).await.unwrap();
    // A node with an older CRIU.
    let mut old = facts.clone();
    old.criu_version = "4.1".into();
    let err = prepare_restore(&store, &request("bad-3"), &old, &restores, &manifest_key())
        .await
        .unwrap_err();
    println!("incompatible: {err}");
    assert!(matches!(err, RestoreError::Incompatible { .. }), "{err}");
    assert!(
        err.to_string().contains("has CRIU 4.1, older than") && err.to_string().contains("CRIU 4.2.1"),
        "{err}"
    );
    for id in ["bad-1", "bad-2", "bad-3"] {
        assert!(!restores.join(id).exists() && !restores.join(format!(".{id}.partial")).exists());
    }

    // The pod of a restore that was never prepared: the handler refuses every
    // container, so none runs, and the kubelet says why.
    let pod = restored_pod(&outcome.manifest, "never-prepared", &target, "bad-1");
    ns.pods(&client).create(&PostParams::default(), &pod).await.unwrap();
    let message = wait_until("the kubelet to report the refusal", Duration::from_secs(60), || async {
        let pod = ns.pods(&client).get("never-prepared").await.ok()?;
        let statuses = pod.status?.container_statuses?;
        statuses.iter().find_map(|s| {
            let waiting = s.state.as_ref()?.waiting.as_ref()?;
            waiting
                .message
                .as_ref()
                .filter(|m| m.contains("restore bad-1 is not prepared on this node"))
                .cloned()
        })
    })
    .await
    .unwrap();
    println!("kubelet: {message}");
    let pod = ns.pods(&client).get("never-prepared").await.unwrap();
    for status in pod.status.unwrap().container_statuses.unwrap() {
        // The kubelet records each refused attempt as a StartError: never started.
        let never_started = status.state.as_ref().unwrap().running.is_none()
            && status
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .is_none_or(|t| t.reason.as_deref() == Some("StartError"));
        assert!(never_started, "no container of the pod ever ran: {status:?}");
    }

    // A restore that fails half-way (container d's memory pages are gone): the
    // containers already restored are stopped and none runs again.
    let prepared = prepare_restore(&store, &request("half-1"), &facts, &restores, &manifest_key())
        .await
        .unwrap();
    let images = prepared.dir.join("containers/d/checkpoint");
    for file in std::fs::read_dir(&images).unwrap().flatten() {
        if file.file_name().to_string_lossy().starts_with("pages-") {
            std::fs::remove_file(file.path()).unwrap();
        }
    }
    let pod = restored_pod(&outcome.manifest, "half", &target, "half-1");
    ns.pods(&client).create(&PostParams::default(), &pod).await.unwrap();
    let statuses = wait_until(
        "the half restore to stop everything",
        Duration::from_secs(90),
        || async {
            let pod = ns.pods(&client).get("half").await.ok()?;
            let statuses = pod.status?.container_statuses?;
            let refused = statuses.iter().any(|s| {
                s.state
                    .as_ref()
                    .and_then(|st| st.waiting.as_ref())
                    .and_then(|w| w.message.as_ref())
                    .is_some_and(|m| m.contains("restore half-1 failed"))
            });
            let a_stopped = statuses.iter().any(|s| {
                s.name == "a" && s.restart_count > 0 && s.state.as_ref().is_some_and(|st| st.running.is_none())
            });
            let none_running = statuses
                .iter()
                .all(|s| s.state.as_ref().is_some_and(|st| st.running.is_none()));
            (refused && a_stopped && none_running).then_some(statuses)
        },
    )
    .await
    .unwrap();
    let d = statuses.iter().find(|s| s.name == "d").unwrap();
    println!(
        "half restore: d {:?}",
        d.state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.message.as_ref())
    );
    let _ = std::fs::remove_dir_all(&prepared.dir);
    for object in &outcome.manifest.objects {
        let _ = store.delete(&ObjectPath::from(format!("{prefix}{}", object.key))).await;
    }
    let _ = store.delete(&ObjectPath::from(format!("{prefix}manifest.json"))).await;
}
