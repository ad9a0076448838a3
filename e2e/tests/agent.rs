//! The node agent's pieces on real pods of the local cluster: discovery through the
//! node's CRI socket, and the freeze protocol on the kubelet's own cgroups (v1): every
//! container of a pod stops at once, stays stopped with the pod cgroup thawed, and
//! counts on after the thaw, with the pod never leaving Ready.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod pods;

use std::path::PathBuf;
use std::time::Duration;

use cryopod_e2e::testbed::{TestNamespace, Testbed, wait_until};
use cryopod_node_agent::cgroup::{Freezer, FreezerState, V1Freezer};
use cryopod_node_agent::cri::CriClient;
use cryopod_node_agent::discovery::{DiscoveryError, discover};
use cryopod_node_agent::freeze::freeze_pod;
use cryopod_node_agent::journal::Journal;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use pods::*;
use serde_json::json;

#[tokio::test]
async fn a_real_pod_is_discovered_and_frozen_at_one_instant() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-freeze").await.unwrap();
    let trio = start_trio(&tb, &client, &ns, &tb.nodes[0]).await;
    let (runtime, data) = (&trio.runtime, &trio.data);

    let names: Vec<&str> = runtime.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, NAMES);
    let freezer_root = PathBuf::from("/sys/fs/cgroup/freezer");
    for c in &runtime.containers {
        let procs = std::fs::read_to_string(c.cgroup.under(&freezer_root).join("cgroup.procs")).unwrap();
        assert!(
            procs.split_whitespace().any(|p| p == c.pid.to_string()),
            "{} runs in {}",
            c.name,
            c.cgroup
        );
        assert_eq!(c.image, BUSYBOX);
    }
    assert!(
        runtime.runc_root.exists(),
        "runc root {} exists",
        runtime.runc_root.display()
    );

    let (freezer, _journal_dir, journal) = freeze_tools();
    let frozen = freeze_pod(
        freezer.clone(),
        &journal,
        "e2e-freeze",
        &runtime.freeze_targets(),
        LIMITS,
    )
    .unwrap();
    for cg in &frozen.cgroups().containers {
        assert_eq!(freezer.state(cg).unwrap(), FreezerState::Frozen, "{cg}");
    }
    assert_eq!(
        freezer.state(&runtime.pod_cgroup).unwrap(),
        FreezerState::Thawed,
        "the pod cgroup is thawed for CRIU"
    );
    let at_freeze = counts(data);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counts(data), at_freeze, "no container moved while the pod was frozen");
    let report = frozen.thaw().unwrap();
    assert!(!report.expired);
    println!("freeze settle {:?}, window {:?}", report.settle, report.window);
    assert_counting_on(&ns, &client, data, &at_freeze).await;
}

#[tokio::test]
async fn a_host_network_pod_is_refused_with_the_reason() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-hostnet").await.unwrap();
    let node = tb.nodes[0].clone();
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "hostnet", "labels": {"cryopod.io/e2e-pod": "hostnet"}},
        "spec": {"nodeName": node, "hostNetwork": true, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "main", "image": BUSYBOX, "imagePullPolicy": "Never", "command": ["sleep", "100000"]}]}
    }))
    .unwrap();
    let pods = ns.pods(&client);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let pod = ns
        .wait_ready(&client, "hostnet", Duration::from_secs(90))
        .await
        .unwrap();
    let cri = CriClient::connect(&cri_socket(&tb, &node)).await.unwrap();
    let err = discover(&cri, pod.metadata.uid.as_deref().unwrap()).await.unwrap_err();
    assert!(
        matches!(err, DiscoveryError::Unsupported { .. }) && err.to_string().contains("hostNetwork"),
        "{err}"
    );
}

#[tokio::test]
async fn a_frozen_pod_is_dumped_in_parallel_and_keeps_running() {
    use cryopod_node_agent::dump::{DumpOptions, dump_containers};
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-dump").await.unwrap();
    let node = tb.nodes[0].clone();
    let trio = start_trio(&tb, &client, &ns, &node).await;
    let (runtime, data) = (&trio.runtime, &trio.data);
    let (freezer, _journal_dir, journal) = freeze_tools();
    let limits = LIMITS;
    let out = tb.dir.join(format!("e2e-dump-{}", ns.name));
    let options = DumpOptions {
        leave_running: true,
        tcp_established: true,
        file_locks: true,
    };

    let frozen = freeze_pod(freezer.clone(), &journal, "e2e-dump", &runtime.freeze_targets(), limits).unwrap();
    let at_freeze = counts(data);
    let dumps = dump_containers(
        &node_exec(&tb, &node),
        &runtime.runc_binary,
        &runtime.runc_root,
        &runtime.containers,
        &out,
        options,
        limits.max_freeze,
    )
    .await
    .unwrap();
    // CRIU leaves cgroups it found frozen as they were: the pod stays at its instant.
    for c in &runtime.containers {
        assert_eq!(
            freezer.state(&c.cgroup).unwrap(),
            FreezerState::Frozen,
            "{} is still frozen after its dump",
            c.name
        );
    }
    assert_eq!(counts(data), at_freeze, "nothing moved during the dumps");
    let report = frozen.thaw().unwrap();
    assert!(!report.expired);
    println!(
        "freeze window {:?} (settle {:?}); dumps: {:?}",
        report.window,
        report.settle,
        dumps.iter().map(|d| (d.name.as_str(), d.took)).collect::<Vec<_>>()
    );

    assert_eq!(dumps.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), NAMES);
    for d in &dumps {
        let files: Vec<String> = std::fs::read_dir(&d.images)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        for wanted in ["inventory.img", "pstree.img"] {
            assert!(files.iter().any(|f| f == wanted), "{} has {wanted}: {files:?}", d.name);
        }
        assert!(
            files.iter().any(|f| f.starts_with("pages-")),
            "{} has memory pages: {files:?}",
            d.name
        );
    }
    assert_counting_on(&ns, &client, data, &at_freeze).await;
    std::fs::remove_dir_all(&out).unwrap();
}

/// CRIU refuses an established TCP connection unless asked to keep it. The error
/// names the container and quotes CRIU's log, and the pod runs on.
#[tokio::test]
async fn a_criu_failure_names_the_container_quotes_the_log_and_thaws() {
    use cryopod_node_agent::dump::{DumpError, DumpOptions, dump_containers};
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-criufail").await.unwrap();
    let node = tb.nodes[0].clone();
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "talker", "labels": {"cryopod.io/e2e-pod": "talker"}},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1, "containers": [{
            "name": "talk", "image": BUSYBOX, "imagePullPolicy": "Never",
            "command": ["sh", "-c", "sleep 100000 | nc -l -p 9000 > /tmp/heard & until (while :; do echo hello; sleep 0.1; done | nc 127.0.0.1 9000); do sleep 0.1; done"],
            "readinessProbe": {"exec": {"command": ["sh", "-c", "test -s /tmp/heard"]}, "periodSeconds": 1}
        }]}
    }))
    .unwrap();
    let pods = ns.pods(&client);
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let pod = ns.wait_ready(&client, "talker", Duration::from_secs(90)).await.unwrap();
    let runtime = discover(
        &CriClient::connect(&cri_socket(&tb, &node)).await.unwrap(),
        pod.metadata.uid.as_deref().unwrap(),
    )
    .await
    .unwrap();
    let (freezer, _journal_dir, journal) = freeze_tools();
    let limits = LIMITS;
    let out = tb.dir.join(format!("e2e-dump-{}", ns.name));
    let options = DumpOptions {
        leave_running: true,
        tcp_established: false,
        file_locks: true,
    };

    let frozen = freeze_pod(
        freezer.clone(),
        &journal,
        "e2e-criufail",
        &runtime.freeze_targets(),
        limits,
    )
    .unwrap();
    let err = dump_containers(
        &node_exec(&tb, &node),
        &runtime.runc_binary,
        &runtime.runc_root,
        &runtime.containers,
        &out,
        options,
        limits.max_freeze,
    )
    .await
    .unwrap_err();
    drop(frozen); // the error path: dropping the handle thaws
    let message = err.to_string();
    println!("refusal: {message}");
    assert!(
        matches!(&err, DumpError::Criu { container, .. } if container == "talk"),
        "{message}"
    );
    assert!(
        message.contains("container talk") && message.contains("TCP"),
        "names the container and quotes CRIU: {message}"
    );
    for c in &runtime.containers {
        assert_eq!(
            freezer.state(&c.cgroup).unwrap(),
            FreezerState::Thawed,
            "{} thawed",
            c.name
        );
    }
    assert!(journal.entries().unwrap().is_empty());
    assert!(
        ns.ready_without_restarts(&client, "talker").await.unwrap(),
        "the pod runs on"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// The whole checkpoint of a four-container pod into the testbed's S3 server: the
/// pod keeps counting, every object matches the manifest's digest, checkpointctl reads
/// every container archive, and /dev/shm, the emptyDir and the rootfs changes are in.
#[tokio::test]
async fn a_pod_checkpoint_lands_in_s3_with_a_verified_manifest() {
    use cryopod_node_agent::package::Manifest;
    use object_store::ObjectStoreExt;
    use object_store::path::Path as ObjectPath;

    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-ckpt").await.unwrap();
    let TrioCheckpoint {
        trio,
        outcome,
        stages,
        prefix,
        store,
        at_start,
    } = checkpoint_trio(&tb, &client, &ns, "e2e").await;
    {
        use cryopod_node_agent::checkpoint::Stage;
        let steps: Vec<&Stage> = stages
            .iter()
            .filter(|s| !matches!(s, Stage::Frozen { .. } | Stage::Stored { .. }))
            .collect();
        let expected = [
            Stage::Discovering,
            Stage::Freezing,
            Stage::Dumping,
            Stage::Thawed,
            Stage::Storing,
        ];
        assert_eq!(
            steps,
            expected.iter().collect::<Vec<_>>(),
            "progress is reported stage by stage"
        );
        // The freeze's instant once frozen, before the dump.
        let frozen = stages.iter().position(|s| matches!(s, Stage::Frozen { .. })).unwrap();
        assert_eq!(stages[frozen - 1], Stage::Freezing, "{stages:?}");
        assert_eq!(stages[frozen + 1], Stage::Dumping, "{stages:?}");
        // Bytes stored only grow, and end at the whole.
        let stored: Vec<(u64, u64)> = stages
            .iter()
            .filter_map(|s| match s {
                Stage::Stored { done, total } => Some((*done, *total)),
                _ => None,
            })
            .collect();
        assert!(
            stored.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{stored:?}"
        );
        let (done, total) = *stored.last().unwrap();
        assert_eq!(done, total, "{stored:?}");
        println!("storing progress: {stored:?}");
    }
    println!(
        "freeze window {:?} (settle {:?}), captures+dumps {:?}, package+upload+verify {:?}, manifest {}",
        outcome.freeze.window, outcome.freeze.settle, outcome.dump, outcome.upload, outcome.manifest_digest
    );
    assert!(!outcome.freeze.expired);
    assert_counting_on(&ns, &client, &trio.data, &at_start).await;

    // The manifest is in the store and every object it lists matches its digest.
    let manifest_bytes = store
        .get(&ObjectPath::from(format!("{prefix}manifest.json")))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(manifest, outcome.manifest);
    assert_eq!(
        manifest.containers.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        NAMES
    );
    let mut fetched = std::collections::HashMap::new();
    for object in &manifest.objects {
        let bytes = store
            .get(&ObjectPath::from(format!("{prefix}{}", object.key)))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(bytes.len() as u64, object.size, "{}", object.key);
        assert_eq!(cryopod_e2e::oci::sha256_digest(&bytes), object.sha256, "{}", object.key);
        fetched.insert(object.key.clone(), unzstd(&bytes));
    }

    // checkpointctl reads every container archive.
    let scratch = tempfile::tempdir().unwrap();
    for c in &manifest.containers {
        let tar = scratch.path().join(format!("{}.tar", c.name));
        std::fs::write(&tar, &fetched[&c.archive]).unwrap();
        let out = tb
            .checkpointctl_show(&tar)
            .unwrap_or_else(|e| panic!("checkpointctl show {}: {e}", c.name));
        assert!(out.contains(BUSYBOX) && out.contains(&c.name), "{out}");
    }

    // The shared state was captured once: /dev/shm and the emptyDir.
    let shm = tar_members(&fetched["pod/shm.tar.zst"]);
    let shm_inner = tar_members(&shm[0].1);
    assert!(
        shm_inner
            .iter()
            .any(|(p, body)| p.ends_with("token") && String::from_utf8_lossy(body).trim() == SHM_TOKEN),
        "{:?}",
        shm_inner.iter().map(|m| &m.0).collect::<Vec<_>>()
    );
    let volume = tar_members(&fetched["pod/volume/data.tar.zst"]);
    let volume_inner = tar_members(&volume[0].1);
    for n in NAMES {
        assert!(
            volume_inner
                .iter()
                .any(|(p, _)| p.ends_with(&format!("/{n}")) || p == n),
            "emptyDir holds counter {n}"
        );
    }
    let mut shared = manifest.shared.clone();
    shared.sort();
    assert_eq!(shared, ["pod/shm.tar.zst", "pod/volume/data.tar.zst"]);

    // Container a's rootfs changes: the new file, and the deleted one as a whiteout.
    let archive_a = tar_members(&fetched["containers/a.tar.zst"]);
    let diff = tar_members(&archive_a.iter().find(|(p, _)| p == "rootfs-diff.tar").unwrap().1);
    let diff_paths: Vec<&str> = diff.iter().map(|(p, _)| p.as_str()).collect();
    assert!(
        diff_paths.contains(&"tmp/marker")
            && diff_paths.contains(&"bin/.wh.true")
            && diff_paths.contains(&"tmp/.wh..wh..opq"),
        "{diff_paths:?}"
    );
    let deleted = &archive_a.iter().find(|(p, _)| p == "deleted.files").unwrap().1;
    assert!(String::from_utf8_lossy(deleted).contains("/bin/true"));

    for object in &manifest.objects {
        store
            .delete(&ObjectPath::from(format!("{prefix}{}", object.key)))
            .await
            .unwrap();
    }
    store
        .delete(&ObjectPath::from(format!("{prefix}manifest.json")))
        .await
        .unwrap();
}

/// With the store down the checkpoint fails after the thaw, says why, and the pod
/// runs on; no manifest exists.
#[tokio::test]
async fn with_the_store_down_the_checkpoint_fails_cleanly() {
    use cryopod_node_agent::checkpoint::{AfterDump, CheckpointError};

    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-storedown").await.unwrap();
    let node = tb.nodes[0].clone();
    let trio = start_trio(&tb, &client, &ns, &node).await;
    let (freezer, _journal_dir, journal) = freeze_tools();
    // Nothing listens on port 1 of the loopback.
    let store = tb.s3_store("http://127.0.0.1:1", &tb.s3.secret_key).unwrap();
    let agent = node_agent(
        &tb,
        &node,
        CriClient::connect(&cri_socket(&tb, &node)).await.unwrap(),
        journal.clone(),
        freezer.clone(),
    );
    let pod_uid = ns.pods(&client).get("trio").await.unwrap().metadata.uid.unwrap();
    // Stopped holds the pod frozen through the failed upload; it is thawed, not killed.
    for after in [AfterDump::Running, AfterDump::Stopped] {
        let mut request = trio_request(
            &ns,
            &pod_uid,
            format!("e2e-down-{after:?}-{}", &trio.runtime.sandbox_id[..12]).to_lowercase(),
            format!("e2e/{}/trio/", ns.name),
        );
        request.after = after;
        let at_start = counts(&trio.data);
        let err = agent.checkpoint(&request, store.clone(), &|_| {}).await.unwrap_err();
        println!("store down ({after:?}): {err}");
        assert!(matches!(err, CheckpointError::Store { .. }), "{err}");
        for c in &trio.runtime.containers {
            assert_eq!(freezer.state(&c.cgroup).unwrap(), FreezerState::Thawed);
        }
        assert!(journal.entries().unwrap().is_empty());
        assert!(
            !tb.dir.join("e2e-agent-work").join(&request.operation_id).exists(),
            "the work directory is gone"
        );
        assert_counting_on(&ns, &client, &trio.data, &at_start).await;
    }
    let prefix = format!("e2e/{}/trio/", ns.name);
    let real = tb.s3_store(&tb.s3.endpoint, &tb.s3.secret_key).unwrap();
    let left: Vec<_> =
        futures::StreamExt::collect::<Vec<_>>(real.list(Some(&object_store::path::Path::from(prefix.as_str())))).await;
    assert!(left.is_empty(), "nothing was stored: {left:?}");
}

/// The agent binary on node-1, serving mutual TLS on a loopback port; the operator's
/// side of the conversation over gRPC: NodeInfo, then a whole checkpoint into S3.
#[tokio::test]
async fn the_agent_binary_checkpoints_a_pod_over_mtls() {
    use cryopod_node_agent::server::pb;
    use object_store::ObjectStoreExt;

    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-grpc").await.unwrap();
    let node = tb.nodes[0].clone();
    let trio = start_trio(&tb, &client, &ns, &node).await;
    let tls = agent_tls();
    let state = tb.dir.join(format!("e2e-agent-state-{}", ns.name));
    let (process, mut agent) = start_agent(&tb, &node, &tls, &state).await;

    let facts = agent.node_info(pb::NodeInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (
            facts.name.as_str(),
            facts.criu_version.as_str(),
            facts.cgroup_version.as_str()
        ),
        (node.as_str(), "4.2.1", "V1")
    );
    assert!(!facts.kernel.is_empty() && !facts.cpu_flags.is_empty());

    let pod_uid = ns.pods(&client).get("trio").await.unwrap().metadata.uid.unwrap();
    let prefix = format!("e2e/{}/trio/{pod_uid}/", ns.name);
    let at_start = counts(&trio.data);
    let mut request = grpc_request(&tb, &ns, &trio, &pod_uid, &prefix);
    let live = ns.pods(&client).get("trio").await.unwrap();
    request.pod_template_json =
        serde_json::to_vec(&cryopod_operator::template::checkpointed_pod_template(&live)).unwrap();
    let mut stream = agent.checkpoint(request).await.unwrap().into_inner();
    let mut stages = Vec::new();
    let mut last = None;
    while let Some(op) = futures::StreamExt::next(&mut stream).await {
        let op = op.unwrap();
        stages.push(op.stage);
        last = Some(op);
    }
    let last = last.unwrap();
    assert_eq!(last.state, pb::State::Succeeded as i32, "{}", last.error_message);
    assert!(
        stages.contains(&(pb::Stage::Storing as i32)) && stages.last() == Some(&(pb::Stage::Done as i32)),
        "{stages:?}"
    );
    let result = last.result.unwrap();
    println!(
        "over gRPC: freeze window {} ms, dump {} ms, upload {} ms, {} bytes stored in {} objects",
        result.freeze_window_millis, result.dump_millis, result.upload_millis, result.stored_bytes, result.objects
    );
    assert_eq!(result.containers, NAMES);
    assert_counting_on(&ns, &client, &trio.data, &at_start).await;

    let store = tb.s3_store(&tb.s3.endpoint, &tb.s3.secret_key).unwrap();
    let manifest = store
        .get(&object_store::path::Path::from(format!("{prefix}manifest.json")))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let digest = cryopod_e2e::oci::sha256_digest(&manifest);
    assert_eq!(
        digest, result.manifest_digest,
        "the stored manifest is the one reported"
    );
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let template = &manifest["checkpointedPodTemplate"];
    assert_eq!(template["metadata"]["name"], "trio");
    assert_eq!(template["spec"]["containers"].as_array().unwrap().len(), NAMES.len());
    assert!(
        template["spec"].get("nodeName").is_none() && template["metadata"].get("uid").is_none(),
        "{template}"
    );

    // Prometheus figures of the operation, and JSON logs carrying its id.
    let metrics = scrape(process.metrics_port);
    assert!(
        metrics.contains(r#"cryopod_agent_operations_total{kind="checkpoint",result="succeeded"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("cryopod_agent_freeze_window_seconds_count 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("cryopod_agent_stored_bytes_total {}", result.stored_bytes)),
        "{metrics}"
    );
    let operation_id = format!("grpc-{}", &trio.runtime.sandbox_id[..12]);
    let log = std::fs::read_to_string(&process.log).unwrap();
    let done = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["message"] == "checkpoint succeeded")
        .unwrap_or_else(|| panic!("no JSON line for the success in {log}"));
    assert_eq!(done["span"]["operation_id"], operation_id.as_str(), "{done}");
    let _ = std::fs::remove_dir_all(&state);
}

/// The agent killed with SIGKILL while the pod is frozen: its restart thaws the pod
/// (from the crash journal) before it serves, well within the freeze deadline.
#[tokio::test]
async fn an_agent_killed_during_the_freeze_thaws_the_pod_on_restart() {
    use cryopod_node_agent::server::pb;

    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-crash").await.unwrap();
    let node = tb.nodes[0].clone();
    let trio = start_trio(&tb, &client, &ns, &node).await;
    let tls = agent_tls();
    let state = tb.dir.join(format!("e2e-agent-state-{}", ns.name));
    let (mut process, mut agent) = start_agent(&tb, &node, &tls, &state).await;
    let pod_uid = ns.pods(&client).get("trio").await.unwrap().metadata.uid.unwrap();
    let prefix = format!("e2e/{}/trio/{pod_uid}/", ns.name);

    let mut stream = agent
        .checkpoint(grpc_request(&tb, &ns, &trio, &pod_uid, &prefix))
        .await
        .unwrap()
        .into_inner();
    while let Some(op) = futures::StreamExt::next(&mut stream).await {
        if op.unwrap().stage == pb::Stage::Dumping as i32 {
            break;
        }
    }
    process.child.kill().unwrap(); // SIGKILL while the pod is frozen
    process.child.wait().unwrap();
    let killed = std::time::Instant::now();
    let freezer = V1Freezer::new("/sys/fs/cgroup/freezer");
    let frozen: Vec<_> = trio
        .runtime
        .containers
        .iter()
        .filter(|c| freezer.state(&c.cgroup).ok() == Some(FreezerState::Frozen))
        .collect();
    assert!(!frozen.is_empty(), "the pod is still frozen after the agent died");
    let at_kill = counts(&trio.data);

    let (_restarted, mut again) = start_agent(&tb, &node, &tls, &state).await;
    let all_thawed = |when: &str| {
        for c in &trio.runtime.containers {
            assert_eq!(
                freezer.state(&c.cgroup).unwrap(),
                FreezerState::Thawed,
                "{} {when}",
                c.name
            );
        }
    };
    all_thawed("thawed by the restarted agent");
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "thawed within the 30 s freeze deadline"
    );
    assert_counting_on(&ns, &client, &trio.data, &at_kill).await;
    // The caller re-attaches under the same id: the restarted agent says the
    // checkpoint was interrupted, and does not freeze the pod again.
    let mut stream = again
        .checkpoint(grpc_request(&tb, &ns, &trio, &pod_uid, &prefix))
        .await
        .unwrap()
        .into_inner();
    let last = futures::StreamExt::next(&mut stream).await.unwrap().unwrap();
    println!("re-attached after the restart: {}", last.error_message);
    assert_eq!(last.state, pb::State::Failed as i32, "{last:?}");
    assert_eq!(last.error_code, tonic::Code::Aborted as i32, "{last:?}");
    assert!(
        futures::StreamExt::next(&mut stream).await.is_none(),
        "the answer is final"
    );
    all_thawed("not frozen again");
    let journal = Journal::open(state.join("journal")).unwrap();
    assert!(journal.entries().unwrap().is_empty(), "the journal is clean");
    let _ = std::fs::remove_dir_all(&state);
}

/// Checkpoint → plain runc restore into a new sandbox: the pod's containers continue
/// from where they were frozen, with /dev/shm, the emptyDir and their rootfs changes.
#[tokio::test]
async fn a_checkpoint_restores_with_runc_into_a_new_sandbox_and_continues() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-restore").await.unwrap();
    restore_and_count_on(&tb, &client, &ns, counting_pod(&tb.nodes[0])).await;
}

/// The same with `shareProcessNamespace`: the containers' processes live in the
/// sandbox's PID namespace, and are restored into the new sandbox's.
#[tokio::test]
async fn a_pod_sharing_its_pid_namespace_restores_into_a_new_sandbox() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-sharedpid").await.unwrap();
    let mut pod = counting_pod(&tb.nodes[0]);
    pod.spec.as_mut().unwrap().share_process_namespace = Some(true);
    restore_and_count_on(&tb, &client, &ns, pod).await;
}

/// Checkpoints `pod`, restores it with runc into a new sandbox and checks that every
/// counter goes on from its checkpointed value, in the PID namespace the pod asked for.
async fn restore_and_count_on(tb: &Testbed, client: &kube::Client, ns: &TestNamespace, pod: Pod) {
    let shared_pid = pod.spec.as_ref().and_then(|s| s.share_process_namespace) == Some(true);
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap();
    let TrioCheckpoint {
        outcome, prefix, store, ..
    } = checkpoint_counting(tb, client, ns, "restore", pod).await;
    let objects = fetch_and_remove(&store, &prefix, &outcome.manifest).await;
    let mut sandbox = new_sandbox(tb, &ns.name, &node, &outcome.manifest, &objects);
    let dir = sandbox.restore.dir.clone();
    let volume = dir.join("volumes/data");
    assert_eq!(
        std::fs::read_to_string(sandbox.shm.join("token")).unwrap().trim(),
        SHM_TOKEN
    );
    let at_checkpoint = counts(&volume);
    assert!(
        at_checkpoint.iter().all(|&c| c > 2),
        "the emptyDir holds the counters at the checkpoint: {at_checkpoint:?}"
    );
    restore_containers(tb, &mut sandbox, &ns.name, &outcome.manifest, &objects, false);
    let rootfs_a = dir.join("a/rootfs");
    assert!(
        rootfs_a.join("tmp/marker").exists() && !rootfs_a.join("bin/true").exists(),
        "a's rootfs changes are applied"
    );

    // Every restored counter goes on from its checkpointed value: its first writes are
    // just above it (a counter started afresh would write 1, 2, ...). `d` counts only
    // through /dev/shm, so it shows the restored shared memory is shared.
    let moved = wait_until("the restored counters to write", Duration::from_secs(20), || async {
        let now = counts(&volume);
        now.iter()
            .zip(&at_checkpoint)
            .all(|(now, then)| now != then)
            .then_some(now)
    })
    .await
    .unwrap();
    println!("restored counters: at checkpoint {at_checkpoint:?}, first seen after restore {moved:?}");
    for ((name, now), then) in NAMES.iter().zip(&moved).zip(&at_checkpoint) {
        assert!(
            now > then && *now < then + 100,
            "counter {name} continued from {then}, saw {now}"
        );
    }
    let pid_ns = |pid: u64| std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap();
    for id in &sandbox.restore.ids[1..] {
        let state: serde_json::Value = serde_json::from_str(&run_ok(
            std::process::Command::new("runc")
                .arg("--root")
                .arg(&sandbox.restore.runc_root)
                .args(["state", id]),
        ))
        .unwrap();
        let pid = state["pid"].as_u64().unwrap();
        assert_eq!(
            pid_ns(pid) == pid_ns(sandbox.pid),
            shared_pid,
            "{id}: in the sandbox's PID namespace exactly when the pod shares it"
        );
    }
}

/// Two containers talking TCP over 127.0.0.1: after checkpoint and restore into a new
/// sandbox (its loopback held until both are back), the conversation goes on where it
/// was, without a reset or a new connection.
#[tokio::test]
async fn a_loopback_tcp_conversation_survives_checkpoint_and_restore() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-tcp").await.unwrap();
    let node = tb.nodes[0].clone();
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "talkers", "labels": {"cryopod.io/e2e-pod": "talkers"}},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1, "restartPolicy": "Never",
            "volumes": [{"name": "data", "emptyDir": {}}],
            "containers": talkers()}
    }))
    .unwrap();
    ns.pods(&client).create(&PostParams::default(), &pod).await.unwrap();
    let pod = ns
        .wait_ready(&client, "talkers", Duration::from_secs(90))
        .await
        .unwrap();
    let pod_uid = pod.metadata.uid.clone().unwrap();

    let (freezer, _journal_dir, journal) = freeze_tools();
    let store = tb.s3_store(&tb.s3.endpoint, &tb.s3.secret_key).unwrap();
    let agent = node_agent(
        &tb,
        &node,
        CriClient::connect(&cri_socket(&tb, &node)).await.unwrap(),
        journal,
        freezer,
    );
    let prefix = format!("e2e/{}/talkers/{pod_uid}/", ns.name);
    let request = pod_request(
        &ns,
        "talkers",
        &pod_uid,
        format!("tcp-{}", &pod_uid[..8]),
        prefix.clone(),
    );
    let outcome = agent.checkpoint(&request, store.clone(), &|_| {}).await.unwrap();
    let objects = fetch_and_remove(&store, &prefix, &outcome.manifest).await;

    let mut sandbox = new_sandbox(&tb, &ns.name, &node, &outcome.manifest, &objects);
    let heard_file = sandbox.restore.dir.join("volumes/data/heard");
    let at_checkpoint = heard(&heard_file);
    let last = *at_checkpoint
        .last()
        .expect("the server heard something before the checkpoint");
    restore_containers(&tb, &mut sandbox, &ns.name, &outcome.manifest, &objects, true);

    let after = wait_until(
        "the restored conversation to go on",
        Duration::from_secs(20),
        || async {
            let now = heard(&heard_file);
            (now.len() >= at_checkpoint.len() + 10).then_some(now)
        },
    )
    .await
    .unwrap();
    let continued = &after[at_checkpoint.len()..];
    println!(
        "tcp: last number before the checkpoint {last}, heard after the restore {:?}...",
        &continued[..5]
    );
    let expected: Vec<u64> = (last + 1..=last + continued.len() as u64).collect();
    assert_eq!(
        continued,
        expected.as_slice(),
        "the same connection carried on, number after number"
    );
    drop(sandbox);
}
