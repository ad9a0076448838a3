//! The operator binary on the real cluster, calling the agent binary over mutual TLS:
//! `kubectl apply` of a PodCheckpoint reaches Ready and `kubectl wait` sees it, the
//! objects are in S3 under the recorded prefix, deleting it deletes them; and
//! impossible requests end Failed with a message naming the cause.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod pods;

use std::time::Duration;

use cryopod_crds::v1alpha1::{CheckpointPhase, PodCheckpoint};
use cryopod_e2e::testbed::{TestNamespace, Testbed, wait_until};
use futures::StreamExt;
use kube::api::Api;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;
use pods::control::*;
use pods::*;
use serde_json::json;

/// `kubectl apply` of a PodCheckpoint → Ready, `kubectl wait` agrees, the objects are in
/// S3 under the recorded prefix with the recorded manifest digest; deleting the
/// PodCheckpoint deletes them through the finalizer.
#[tokio::test]
async fn a_pod_checkpoint_becomes_ready_and_its_deletion_removes_the_objects() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-operator").await.unwrap();
    let trio = start_trio(&tb, &client, &ns, &tb.nodes[0]).await;
    let OneNodeControl {
        state,
        log,
        _agent,
        _operator,
        _tls,
    } = start_one_node_control(&tb, &ns.name).await;
    let storage = s3_checkpoint_storage(&tb, &ns.name);
    storage_is_probed(&tb, &client, &ns.name, &storage).await;

    let at_start = counts(&trio.data);
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "trio-1"},
                "spec": {"sourcePodName": "trio", "storage": storage}}),
    );
    kubectl_wait_ready(&tb, &ns.name, "podcheckpoint/trio-1", &log);
    let api: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    let cp = api.get("trio-1").await.unwrap();
    let status = cp.status.clone().unwrap();
    assert_eq!(status.phase, Some(CheckpointPhase::Ready));
    assert_eq!(status.node_name.as_deref(), Some(tb.nodes[0].as_str()));
    assert_eq!(status.checkpointed_containers.len(), NAMES.len());
    assert!(status.checkpointed_pod_template.is_some());
    assert!(status.timings.unwrap().freeze_window_millis.unwrap() > 0);
    // What an SRE watching it saw: the stages, every byte stored, and the freeze with
    // its instant, over once the pod was thawed.
    let progress = status.progress.unwrap();
    assert!(
        progress.bytes_done > 0 && progress.bytes_done == progress.bytes_total,
        "{progress:?}"
    );
    assert!(
        matches!(status.stage.as_deref(), Some("Storing" | "Thawed")),
        "{:?}",
        status.stage
    );
    let frozen = status.conditions.iter().find(|c| c.type_ == "SourceFrozen").unwrap();
    assert_eq!((frozen.status.as_str(), frozen.reason.as_str()), ("False", "Thawed"));
    // (A condition's time is to the second.)
    assert!(frozen.last_transition_time.0.as_second() >= status.frozen_time.clone().unwrap().0.as_second());
    let prefix = status.checkpoint_location.unwrap().object_store.unwrap().prefix;
    assert_eq!(
        prefix,
        format!("operator-e2e/{}/trio/{}/", ns.name, cp.metadata.uid.clone().unwrap())
    );
    let store = tb.s3_store(&tb.s3.endpoint, &tb.s3.secret_key).unwrap();
    let manifest = store
        .get(&ObjectPath::from(format!("{prefix}manifest.json")))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(Some(cryopod_e2e::oci::sha256_digest(&manifest)), status.manifest_digest);
    let events = event_reasons(&tb, &ns.name, "trio-1");
    assert!(
        events.contains("CheckpointInProgress") && events.contains("CheckpointCompleted"),
        "{events}"
    );
    let printed = tb
        .kubectl()
        .args(["get", "cpck", "-n", &ns.name, "trio-1", "--no-headers"])
        .output()
        .unwrap();
    println!("kubectl get cpck: {}", String::from_utf8_lossy(&printed.stdout).trim());
    assert_counting_on(&ns, &client, &trio.data, &at_start).await;

    // The finalizer deletes the objects before the PodCheckpoint goes.
    api.delete("trio-1", &Default::default()).await.unwrap();
    wait_until("the PodCheckpoint to go", Duration::from_secs(60), || async {
        api.get_opt("trio-1").await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap();
    let left: Vec<_> = store
        .list(Some(&ObjectPath::from(prefix.as_str())))
        .collect::<Vec<_>>()
        .await;
    assert!(left.is_empty(), "objects left behind: {left:?}");
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&state);
}

/// The operator has an agent probe each CheckpointStorage and writes `Ready`: the
/// test bed's bucket is reachable; the same bucket with a wrong secret key is not,
/// and the reason says why.
async fn storage_is_probed(tb: &Testbed, client: &kube::Client, ns: &str, storage: &str) {
    use cryopod_crds::v1alpha1::CheckpointStorage;
    let api: Api<CheckpointStorage> = Api::all(client.clone());
    let ready_of = |name: String| {
        let api = api.clone();
        async move {
            let storage = api.get(&name).await.ok()?;
            let ready = storage.status?.conditions.into_iter().find(|c| c.type_ == "Ready")?;
            Some((ready.status, ready.reason, ready.message))
        }
    };
    let (status, reason, message) = wait_until("the storage to be probed", Duration::from_secs(60), || {
        ready_of(storage.to_owned())
    })
    .await
    .unwrap();
    println!("{storage}: {status} {reason}: {message}");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Reachable"), "{message}");
    let wrong = format!("wrong-key-{ns}");
    s3_storage_with_key(tb, ns, &wrong, "wrong-creds", "not-the-key");
    let (status, reason, message) = wait_until("the wrong storage to be probed", Duration::from_secs(60), || {
        ready_of(wrong.clone())
    })
    .await
    .unwrap();
    println!("{wrong}: {status} {reason}: {message}");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "AccessDenied"),
        "{message}"
    );
    assert!(message.contains("cannot write"), "{message}");
    delete_storage(tb, &wrong);
}

/// Two PodCheckpoints of one pod, applied together: the operator runs them one after
/// the other (never both in flight, as the watch sees every status write), the second
/// saying it waits for the first, and both end Ready with the pod still counting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_of_one_pod_take_turns() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-turns").await.unwrap();
    let trio = start_trio(&tb, &client, &ns, &tb.nodes[0]).await;
    let OneNodeControl {
        state,
        log,
        _agent,
        _operator,
        _tls,
    } = start_one_node_control(&tb, &ns.name).await;
    let storage = s3_checkpoint_storage(&tb, &ns.name);

    // Every status the watch shows, in order: (name, phase, Ready message).
    let api: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (listening, listened) = tokio::sync::oneshot::channel();
    let recorder = {
        let (api, seen) = (api.clone(), seen.clone());
        tokio::spawn(async move {
            let mut events = kube::runtime::watcher(api, Default::default()).boxed();
            let mut listening = Some(listening);
            while let Some(Ok(event)) = events.next().await {
                if let kube::runtime::watcher::Event::InitDone = event
                    && let Some(listening) = listening.take()
                {
                    let _ = listening.send(());
                }
                if let kube::runtime::watcher::Event::Apply(cp) = event {
                    let status = cp.status.clone().unwrap_or_default();
                    let message = status
                        .conditions
                        .iter()
                        .find(|c| c.type_ == "Ready")
                        .map(|c| c.message.clone())
                        .unwrap_or_default();
                    seen.lock()
                        .unwrap()
                        .push((cp.metadata.name.clone().unwrap(), status.phase, message));
                }
            }
        })
    };
    listened.await.unwrap();
    let at_start = counts(&trio.data);
    let checkpoint = |name: &str| {
        json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": name},
               "spec": {"sourcePodName": "trio", "storage": storage}})
    };
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "v1", "kind": "List", "items": [checkpoint("first"), checkpoint("second")]}),
    );
    kubectl_wait_ready(&tb, &ns.name, "podcheckpoint/first", &log);
    kubectl_wait_ready(&tb, &ns.name, "podcheckpoint/second", &log);
    recorder.abort();

    let seen = seen.lock().unwrap().clone();
    let mut current = std::collections::HashMap::new();
    for (name, phase, _) in &seen {
        current.insert(name.clone(), *phase);
        let in_flight = current
            .values()
            .filter(|p| matches!(p, Some(CheckpointPhase::Checkpointing | CheckpointPhase::Uploading)))
            .count();
        assert!(in_flight <= 1, "both checkpoints of the pod ran at once: {seen:#?}");
    }
    assert!(
        seen.iter()
            .any(|(_, _, message)| message.contains("of the same pod to finish")),
        "neither checkpoint said it waited for the other: {seen:#?}"
    );
    assert_counting_on(&ns, &client, &trio.data, &at_start).await;
    for name in ["first", "second"] {
        api.delete(name, &Default::default()).await.unwrap();
    }
    wait_until("the PodCheckpoints to go", Duration::from_secs(60), || async {
        api.list(&Default::default()).await.ok()?.items.is_empty().then_some(())
    })
    .await
    .unwrap();
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&state);
}

/// Impossible requests end Failed with a reason and a message naming the cause, an
/// event, and nothing else changes; a migration its pod's disruption budget forbids
/// is refused before anything is touched.
#[tokio::test]
async fn impossible_checkpoints_fail_naming_the_cause() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-operator-bad").await.unwrap();
    let OneNodeControl {
        state,
        log: _,
        _agent,
        _operator,
        _tls,
    } = start_one_node_control(&tb, &ns.name).await;
    // A pod on node-2, where this operator knows no agent.
    let elsewhere = start_trio(&tb, &client, &ns, &tb.nodes[1]).await;
    let _ = elsewhere;

    let cases = [
        (
            "no-pod",
            json!({"sourcePodName": "nope"}),
            "SourcePodNotFound",
            "pod nope does not exist",
        ),
        (
            "no-storage",
            json!({"sourcePodName": "trio", "storage": "missing-storage"}),
            "StorageNotFound",
            r#"CheckpointStorage "missing-storage" does not exist"#,
        ),
        (
            "replaced",
            json!({"sourcePodName": "trio", "sourcePodUID": "00000000-0000-0000-0000-000000000000"}),
            "SourcePodReplaced",
            "not 00000000-0000-0000-0000-000000000000",
        ),
        (
            // Waits for an agent to become ready, then fails at its deadline.
            "no-agent",
            json!({"sourcePodName": "trio", "timeoutSeconds": 10}),
            "NodeAgentUnavailable",
            &format!("runs on node {}, where no cryopod node agent runs", tb.nodes[1]),
        ),
    ];
    let api: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    for (name, spec, _, _) in &cases {
        kubectl_apply(
            &tb,
            &ns.name,
            &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": name}, "spec": spec}),
        );
    }
    for (name, _, reason, needle) in &cases {
        let cp = ended(&api, name).await;
        let (status, got_reason, message) = ready_condition(&cp);
        println!("{name}: {got_reason}: {message}");
        assert_eq!(
            cp.status.as_ref().unwrap().phase,
            Some(CheckpointPhase::Failed),
            "{name}"
        );
        assert_eq!(
            (status.as_str(), got_reason.as_str()),
            ("False", *reason),
            "{name}: {message}"
        );
        assert!(message.contains(needle), "{name}: {message}");
        let events = event_reasons(&tb, &ns.name, name);
        assert!(events.contains(reason), "{name}: {events}");
    }
    // A migration that its pod's disruption budget forbids.
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "keep-trio"},
                "spec": {"minAvailable": 1, "selector": {"matchLabels": {"cryopod.io/e2e-pod": "trio"}}}}),
    );
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration", "metadata": {"name": "blocked"},
                "spec": {"sourcePodName": "trio"}}),
    );
    let migrations: Api<cryopod_crds::v1alpha1::PodMigration> = Api::namespaced(client.clone(), &ns.name);
    let condition = wait_until("the migration to be refused", Duration::from_secs(60), || async {
        let status = migrations.get("blocked").await.ok()?.status?;
        status.conditions.into_iter().find(|c| {
            c.type_ == "Ready" && c.status == "False" && c.reason != "MigrationInProgress" && c.reason != "Pending"
        })
    })
    .await
    .unwrap();
    println!("blocked: {}: {}", condition.reason, condition.message);
    assert_eq!(condition.reason, "DisruptionNotAllowed");
    assert!(
        condition.message.contains("PodDisruptionBudget keep-trio"),
        "{}",
        condition.message
    );
    assert!(
        ns.ready_without_restarts(&client, "trio").await.unwrap(),
        "the pod was left alone"
    );
    let _ = std::fs::remove_dir_all(&state);
}

/// A PodRestore of a Ready PodCheckpoint brings the pod back on node-2 as a new pod,
/// Running and Ready, its counters going on from the checkpoint.
#[tokio::test]
async fn a_pod_restore_brings_the_pod_back_on_the_other_node() {
    restore_on_the_other_node("e2e-operator-restore", false).await;
}

/// The same with `shareProcessNamespace`: the runtime handler restores the containers
/// stopped and continues them together once the last is back, so no restored process
/// takes a PID a later container needs.
#[tokio::test]
async fn a_pod_sharing_its_pid_namespace_restores_on_the_other_node() {
    restore_on_the_other_node("e2e-operator-sharedpid", true).await;
}

async fn restore_on_the_other_node(prefix: &str, shared_pids: bool) {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, prefix).await.unwrap();
    let (source, target) = (tb.nodes[0].clone(), tb.nodes[1].clone());
    let mut pod = counting_pod(&source);
    pod.spec.as_mut().unwrap().share_process_namespace = Some(shared_pids);
    let trio = start_counting(&tb, &client, &ns, pod).await;
    let Control {
        state,
        log,
        agents: _agents,
        _operator,
        tls: _tls,
    } = start_control(&tb, &ns.name).await;
    let storage = s3_checkpoint_storage(&tb, &ns.name);
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "trio-cp"},
                "spec": {"sourcePodName": "trio", "storage": storage}}),
    );
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    let cp = ended(&checkpoints, "trio-cp").await;
    assert_eq!(
        cp.status.as_ref().unwrap().phase,
        Some(CheckpointPhase::Ready),
        "{:?}",
        ready_condition(&cp)
    );
    let _ = &trio;
    // What the checkpoint captured of the counters, from its emptyDir object in S3.
    let captured = captured_numbers(&tb, &cp, &NAMES).await;
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore", "metadata": {"name": "trio-back"},
                "spec": {"checkpointName": "trio-cp", "target": {"nodeName": target}}}),
    );
    kubectl_wait_ready(&tb, &ns.name, "podrestore/trio-back", &log);
    let restores: Api<cryopod_crds::v1alpha1::PodRestore> = Api::namespaced(client.clone(), &ns.name);
    let status = restores.get("trio-back").await.unwrap().status.unwrap();
    assert_eq!(status.node_name.as_deref(), Some(target.as_str()));
    // Every byte fetched, shown while it was.
    let fetched = status.progress.unwrap();
    assert!(
        fetched.bytes_done > 0 && fetched.bytes_done == fetched.bytes_total,
        "{fetched:?}"
    );
    // The source still runs under its name, so the restored pod gets another.
    let restored = status.restored_pod_name.clone().unwrap();
    assert!(restored.starts_with("trio-restored-"), "{restored}");
    let timings = status.timings.unwrap();
    println!(
        "PodRestore: fetch {:?} ms, pod created to Ready {:?} ms, total {:?} ms",
        timings.fetch_millis, timings.restore_millis, timings.total_millis
    );
    let pod = ns.pods(&client).get(&restored).await.unwrap();
    assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some(target.as_str()));
    let data = pod_data(&tb, &pod);
    // Counters go on from where the checkpoint took them, not from 1.
    let now = wait_until("the restored counters to move", Duration::from_secs(20), || async {
        let now = counts(&data);
        now.iter().zip(&captured).all(|(now, then)| now > then).then_some(now)
    })
    .await
    .unwrap();
    println!("restored by the operator: captured {captured:?}, restored {now:?}");
    for ((name, now), then) in NAMES.iter().zip(&now).zip(&captured) {
        assert!(*now < then + 200, "counter {name} continued from {then}: {now}");
    }
    assert!(ns.ready_without_restarts(&client, &restored).await.unwrap());
    let events = event_reasons(&tb, &ns.name, "trio-back");
    assert!(events.contains("RestoreCompleted"), "{events}");
    let test = if shared_pids {
        "operator::a_pod_sharing_its_pid_namespace_restores_on_the_other_node"
    } else {
        "operator::a_pod_restore_brings_the_pod_back_on_the_other_node"
    };
    let v1 = cryopod_e2e::compat::V1_CGROUPFS;
    record_compat(&tb, "checkpoint", (v1, ""), "", test);
    record_compat(&tb, "restore", (v1, v1), "", test);
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&state);
}

/// `kubectl apply` of a PodMigration moves a stateful pod from node-1 to node-2: the
/// operator is killed and started again in the middle and the migration still
/// happens exactly once; the source is gone only once the target runs; the in-memory
/// counter, the shared-memory mirror and the loopback conversation carry on.
#[tokio::test]
async fn a_pod_migration_moves_a_stateful_pod_once_across_an_operator_restart() {
    use cryopod_crds::v1alpha1::{MigrationPhase, PodMigration, PodRestore};
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-migrate").await.unwrap();
    let (source, target) = (tb.nodes[0].clone(), tb.nodes[1].clone());
    let pods = ns.pods(&client);
    pods.create(&Default::default(), &stateful_pod(&source)).await.unwrap();
    ns.wait_ready(&client, "stateful", Duration::from_secs(90))
        .await
        .unwrap();
    let Control {
        state,
        log: _,
        agents: [agent_1, agent_2],
        _operator: operator,
        tls,
    } = start_control(&tb, &ns.name).await;
    let agents = [(source.as_str(), agent_1.port), (target.as_str(), agent_2.port)];
    let storage = s3_checkpoint_storage(&tb, &ns.name);
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration", "metadata": {"name": "move"},
                "spec": {"sourcePodName": "stateful", "storage": storage, "target": {"nodeName": target}}}),
    );

    // The operator dies in the middle of the migration and comes back.
    let migrations: Api<PodMigration> = Api::namespaced(client.clone(), &ns.name);
    let phase_at_kill = wait_until("the migration to start", Duration::from_secs(60), || async {
        let phase = migrations.get("move").await.ok()?.status?.phase?;
        (phase != MigrationPhase::Pending).then_some(phase)
    })
    .await
    .unwrap();
    drop(operator);
    let killed = std::time::Instant::now();
    println!("operator killed while the migration was {phase_at_kill:?}");
    let _operator = start_operator(&tb, &ns.name, &tls, &agents, &state.join("operator-2.log"));

    kubectl_wait_ready(&tb, &ns.name, "podmigration/move", &state.join("operator-2.log"));
    let recovered = killed.elapsed();
    let status = migrations.get("move").await.unwrap().status.unwrap();
    assert_eq!(status.phase, Some(MigrationPhase::Succeeded));
    let target_pod = status.target_pod_name.clone().unwrap();
    println!(
        "migration {source} -> {target}: target pod {target_pod}, downtime {:?} ms",
        status.downtime_millis
    );
    // Exactly once: one checkpoint, one restore, one target pod, and the source gone.
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    let restores: Api<PodRestore> = Api::namespaced(client.clone(), &ns.name);
    assert_eq!(checkpoints.list(&Default::default()).await.unwrap().items.len(), 1);
    assert_eq!(restores.list(&Default::default()).await.unwrap().items.len(), 1);
    wait_until("the source pod to go", Duration::from_secs(30), || async {
        pods.get_opt("stateful").await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap();
    let all = pods.list(&Default::default()).await.unwrap().items;
    assert_eq!(all.len(), 1, "one pod: the target");
    let moved = &all[0];
    assert_eq!(moved.spec.as_ref().unwrap().node_name.as_deref(), Some(target.as_str()));
    assert!(ns.ready_without_restarts(&client, &target_pod).await.unwrap());
    for agent in [&agent_1, &agent_2] {
        let metrics = scrape(agent.metrics_port);
        assert!(
            !metrics.contains(r#"result="failed"} "#),
            "no agent operation failed: {metrics}"
        );
    }
    assert!(
        scrape(agent_1.metrics_port)
            .contains(r#"cryopod_agent_operations_total{kind="checkpoint",result="succeeded"} 1"#)
    );
    assert!(
        scrape(agent_2.metrics_port).contains(r#"cryopod_agent_operations_total{kind="restore",result="succeeded"} 1"#)
    );

    // State continuity on the target.
    let checkpoint = checkpoints.list(&Default::default()).await.unwrap().items.remove(0);
    let captured = captured_numbers(&tb, &checkpoint, &["a", "d"]).await;
    let data = pod_data(&tb, moved);
    let number = |name: &str| -> u64 {
        std::fs::read_to_string(data.join(name))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let now = wait_until("the moved counters to go on", Duration::from_secs(20), || async {
        let now = [number("a"), number("d")];
        now.iter().zip(&captured).all(|(n, c)| n > c).then_some(now)
    })
    .await
    .unwrap();
    println!("moved counters: captured {captured:?}, now {now:?}");
    assert!(
        now[0] < captured[0] + 200,
        "a continued from {}: {}",
        captured[0],
        now[0]
    );
    assert_the_conversation_goes_on(&data).await;
    let events = event_reasons(&tb, &ns.name, "move");
    assert!(events.contains("MigrationCompleted"), "{events}");
    let v1 = cryopod_e2e::compat::V1_CGROUPFS;
    let test = "operator::a_pod_migration_moves_a_stateful_pod_once_across_an_operator_restart";
    record_compat(&tb, "migrate", (v1, v1), "", test);
    let phase = match phase_at_kill {
        MigrationPhase::Checkpointing => "checkpointing",
        MigrationPhase::Restoring => "restoring",
        _ => "releasing",
    };
    record_fault(
        &tb,
        ("migration", phase, "SIGKILL of the operator (restarted)"),
        &format!(
            "Succeeded exactly once (killed while {phase_at_kill:?}): one checkpoint, one restore, one pod on the target, the source gone; its counters and loopback conversation went on"
        ),
        recovered,
        test,
    );
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&state);
}

/// `transfer: Direct`: the checkpoint is staged on the source node and read by the
/// target's agent from the source's over TLS, with no object store at all. The
/// stateful pod (counters, /dev/shm, emptyDir, a loopback conversation, a flock) goes
/// on on the target, once, and the staged copy is gone when the migration ends.
#[tokio::test]
async fn a_direct_migration_moves_a_stateful_pod_agent_to_agent() {
    use cryopod_crds::v1alpha1::{MigrationPhase, PodMigration};
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-direct").await.unwrap();
    let (source, target) = (tb.nodes[0].clone(), tb.nodes[1].clone());
    let pods = ns.pods(&client);
    let source_pod = pods.create(&Default::default(), &stateful_pod(&source)).await.unwrap();
    ns.wait_ready(&client, "stateful", Duration::from_secs(90))
        .await
        .unwrap();
    let Control {
        state,
        log,
        agents: [agent_1, agent_2],
        _operator,
        tls: _tls,
    } = start_control(&tb, &ns.name).await;
    // The source's counter, well under way: a target that started afresh would count
    // from 1 again.
    let source_data = pod_data(&tb, &source_pod);
    let number = |dir: &std::path::Path, name: &str| -> u64 {
        std::fs::read_to_string(dir.join(name))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let before = wait_until("the source to count past 40", Duration::from_secs(30), || async {
        let n = number(&source_data, "a");
        (n > 40).then_some(n)
    })
    .await
    .unwrap();
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration", "metadata": {"name": "move"},
                "spec": {"sourcePodName": "stateful", "transfer": "Direct", "target": {"nodeName": target}}}),
    );
    kubectl_wait_ready(&tb, &ns.name, "podmigration/move", &log);
    let migrations: Api<PodMigration> = Api::namespaced(client.clone(), &ns.name);
    let status = migrations.get("move").await.unwrap().status.unwrap();
    assert_eq!(status.phase, Some(MigrationPhase::Succeeded));
    let target_pod = status.target_pod_name.clone().unwrap();
    println!(
        "direct migration {source} -> {target}: target pod {target_pod}, downtime {:?} ms",
        status.downtime_millis
    );
    // The target's agent read the checkpoint from the source's, by a grant.
    let source_log = std::fs::read_to_string(&agent_1.log).unwrap();
    assert!(
        source_log.contains("read of a local checkpoint granted"),
        "the source agent lent the checkpoint:\n{source_log}"
    );
    assert!(
        scrape(agent_2.metrics_port).contains(r#"cryopod_agent_operations_total{kind="restore",result="succeeded"} 1"#)
    );

    // One pod, on the target, counting on from where the source was.
    wait_until("the source pod to go", Duration::from_secs(30), || async {
        pods.get_opt("stateful").await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap();
    let all = pods.list(&Default::default()).await.unwrap().items;
    assert_eq!(all.len(), 1, "one pod: the target");
    let moved = &all[0];
    assert_eq!(moved.spec.as_ref().unwrap().node_name.as_deref(), Some(target.as_str()));
    assert!(ns.ready_without_restarts(&client, &target_pod).await.unwrap());
    let data = pod_data(&tb, moved);
    let now = wait_until("the moved counter to go on", Duration::from_secs(20), || async {
        let now = number(&data, "a");
        (now > before).then_some(now)
    })
    .await
    .unwrap();
    println!("moved counter: {before} before the migration, now {now}");
    assert_the_conversation_goes_on(&data).await;

    // Its staged copy went with its checkpoint: nothing of the pod stays on the source.
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    wait_until(
        "the staged checkpoint to be deleted",
        Duration::from_secs(30),
        || async {
            checkpoints
                .list(&Default::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        },
    )
    .await
    .unwrap();
    let v1 = cryopod_e2e::compat::V1_CGROUPFS;
    record_compat(
        &tb,
        "migrate (Direct)",
        (v1, v1),
        "",
        "operator::a_direct_migration_moves_a_stateful_pod_agent_to_agent",
    );
    let _ = std::fs::remove_dir_all(&state);
}

/// The stateful pod's loopback conversation, heard in `data`, goes on unbroken from
/// its first line: the same connection, not a new one.
async fn assert_the_conversation_goes_on(data: &std::path::Path) {
    let heard: Vec<u64> = wait_until("the conversation to go on", Duration::from_secs(20), || async {
        let all: Vec<u64> = std::fs::read_to_string(data.join("heard"))
            .ok()?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        (all.len() > 5 && all.windows(2).all(|w| w[1] == w[0] + 1)).then_some(all)
    })
    .await
    .unwrap();
    assert_eq!(heard[0], 1, "the same conversation from its start");
}

/// The stage of the migration tests below: a stateful pod on node-1, both agents and
/// an operator, and then the target's agent taken away, so a migration's restore
/// waits while its source is held. The source's agent may be started with `env`.
struct TargetAway {
    tb: Testbed,
    client: kube::Client,
    ns: TestNamespace,
    source: String,
    target: String,
    source_pod: k8s_openapi::api::core::v1::Pod,
    state: std::path::PathBuf,
    log: std::path::PathBuf,
    agent_1: AgentProcess,
    target_port: u16,
    _operator: Operator,
    tls: AgentTls,
    storage: String,
}

async fn target_away(prefix: &str, env: &[(&str, &str)]) -> TargetAway {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, prefix).await.unwrap();
    let (source, target) = (tb.nodes[0].clone(), tb.nodes[1].clone());
    ns.pods(&client)
        .create(&Default::default(), &stateful_pod(&source))
        .await
        .unwrap();
    let source_pod = ns
        .wait_ready(&client, "stateful", Duration::from_secs(90))
        .await
        .unwrap();
    let Control {
        state,
        log,
        agents: [agent_1, agent_2],
        _operator,
        tls,
    } = start_control(&tb, &ns.name).await;
    let (source_port, target_port) = (agent_1.port, agent_2.port);
    drop((agent_1, agent_2));
    let (agent_1, _) = start_agent_at(&tb, &source, &tls, &state, env, source_port).await;
    let storage = s3_checkpoint_storage(&tb, &ns.name);
    TargetAway {
        tb,
        client,
        ns,
        source,
        target,
        source_pod,
        state,
        log,
        agent_1,
        target_port,
        _operator,
        tls,
        storage,
    }
}

impl TargetAway {
    /// Applies PodMigration `name` to node-2.
    fn migrate(&self, name: &str, extra: serde_json::Value) {
        let mut spec =
            json!({"sourcePodName": "stateful", "storage": self.storage, "target": {"nodeName": self.target}});
        for (k, v) in extra.as_object().into_iter().flatten() {
            spec[k] = v.clone();
        }
        kubectl_apply(
            &self.tb,
            &self.ns.name,
            &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration", "metadata": {"name": name}, "spec": spec}),
        );
    }

    /// The migration's checkpoint once it is Ready (the source held).
    async fn held(&self) -> PodCheckpoint {
        let checkpoints: Api<PodCheckpoint> = Api::namespaced(self.client.clone(), &self.ns.name);
        wait_until(
            "the source to be checkpointed and held",
            Duration::from_secs(90),
            || async {
                let cp = checkpoints.list(&Default::default()).await.ok()?.items.pop()?;
                (cp.status.as_ref()?.phase? == CheckpointPhase::Ready).then_some(cp)
            },
        )
        .await
        .unwrap()
    }

    /// The source's agent started again (without `env`), where it was.
    async fn restart_source_agent(&mut self) {
        let port = self.agent_1.port;
        let _ = self.agent_1.child.kill();
        let _ = self.agent_1.child.wait();
        self.agent_1 = start_agent_at(&self.tb, &self.source, &self.tls, &self.state, &[], port)
            .await
            .0;
    }

    /// The target's agent back, then the migration's end.
    async fn target_back_and_ended(&self, name: &str) -> (AgentProcess, cryopod_crds::v1alpha1::PodMigrationStatus) {
        let target_state = self.tb.dir.join(&self.target).join("cryopod");
        let (agent_2, _) =
            start_agent_at(&self.tb, &self.target, &self.tls, &target_state, &[], self.target_port).await;
        let migrations: Api<cryopod_crds::v1alpha1::PodMigration> = Api::namespaced(self.client.clone(), &self.ns.name);
        (agent_2, migration_ended(&migrations, name).await)
    }

    /// Waits for the source's counter to move past `floor`.
    async fn source_counts_past(&self, floor: u64) {
        let data = pod_data(&self.tb, &self.source_pod);
        wait_until("the source to count on", Duration::from_secs(30), || async {
            (number_in(&data.join("a")) > floor).then_some(())
        })
        .await
        .unwrap();
    }

    /// Asserts how a migration ended (with the operator's log when not) and returns
    /// its message.
    fn ended_as(
        &self,
        status: &cryopod_crds::v1alpha1::PodMigrationStatus,
        phase: cryopod_crds::v1alpha1::MigrationPhase,
        reason: &str,
    ) -> String {
        let (_, got, message) = ready_of(&status.conditions);
        println!("{:?} {got}: {message}", status.phase);
        assert_eq!(
            (status.phase, got.as_str()),
            (Some(phase), reason),
            "{message}\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
        message
    }

    /// The source is Ready, never restarted, and its counter moves.
    async fn source_runs_on(&self) {
        assert!(self.ns.ready_without_restarts(&self.client, "stateful").await.unwrap());
        self.source_counts_past(self.source_count()).await;
    }

    fn source_count(&self) -> u64 {
        number_in(&pod_data(&self.tb, &self.source_pod).join("a"))
    }

    fn done(self) {
        delete_storage(&self.tb, &self.storage);
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// The double run: a migration whose source was thawed while held (here its agent
/// restarted, and its journal recovery thawed it) must not delete the source and say
/// Succeeded. The source ran on past the checkpoint, so it stays with its newer
/// state, the restored pod is deleted, and the migration fails naming why.
#[tokio::test]
async fn a_migration_whose_source_ran_on_keeps_the_source_and_fails() {
    use cryopod_crds::v1alpha1::MigrationPhase;
    let mut stage = target_away("e2e-ran-on", &[]).await;
    stage.migrate("twice", json!({}));
    let checkpoint = stage.held().await;
    let captured = captured_numbers(&stage.tb, &checkpoint, &["a"]).await[0];
    // The source's agent is killed and started again: its recovery thaws the held
    // source, which runs on.
    let killed = std::time::Instant::now();
    stage.restart_source_agent().await;
    stage.source_counts_past(captured + 5).await;
    // While the target exists it is watched: its PodRestore shows it held, and then
    // every one of its containers' processes is stopped (state T), and its counter
    // never passes the checkpoint's value. The watch lasts until its PodRestore ended,
    // so a target made again after the deletion would be seen too.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (tb, client, ns, target, source_uid, watching) = (
            stage.tb.clone(),
            stage.client.clone(),
            stage.ns.name.clone(),
            stage.target.clone(),
            stage.source_pod.metadata.uid.clone(),
            watching.clone(),
        );
        tokio::spawn(async move {
            let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
            let restores: Api<cryopod_crds::v1alpha1::PodRestore> = Api::namespaced(client, &ns);
            let cri = cryopod_node_agent::cri::CriClient::connect(&cri_socket(&tb, &target))
                .await
                .unwrap();
            let (mut highest, mut held_seen, mut running_while_held) = (None, 0, Vec::new());
            while watching.load(std::sync::atomic::Ordering::SeqCst) {
                let held = restores
                    .get_opt("twice-restore")
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.status.and_then(|s| s.stage).as_deref() == Some("HeldStopped"));
                for pod in pods
                    .list(&Default::default())
                    .await
                    .map(|l| l.items)
                    .unwrap_or_default()
                {
                    let on_a_node = pod.spec.as_ref().is_some_and(|s| s.node_name.is_some());
                    if pod.metadata.uid == source_uid || !on_a_node {
                        continue;
                    }
                    if let Ok(text) = std::fs::read_to_string(pod_data(&tb, &pod).join("a"))
                        && let Ok(n) = text.trim().parse::<u64>()
                    {
                        highest = highest.max(Some(n));
                    }
                    let uid = pod.metadata.uid.clone().unwrap_or_default();
                    // Until its deletion begins (the runtime's stop may wake it to die).
                    let deleting = pod.metadata.deletion_timestamp.is_some();
                    if held
                        && !deleting
                        && let Ok(found) = cryopod_node_agent::discovery::discover(&cri, &uid).await
                    {
                        held_seen += 1;
                        for c in &found.containers {
                            let state = std::fs::read_to_string(format!("/proc/{}/status", c.pid))
                                .ok()
                                .and_then(|st| st.lines().find(|l| l.starts_with("State:")).map(str::to_owned));
                            // Stopped (T), or dying as the pod is deleted (Z, X): never running.
                            let ran = |st: &String| ["R (", "S (", "D ("].iter().any(|r| st.contains(r));
                            if let Some(state) = state.filter(ran) {
                                running_while_held.push(format!("{}: {state}", c.name));
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (highest, held_seen, running_while_held)
        })
    };
    let (_agent_2, status) = stage.target_back_and_ended("twice").await;
    let restores: Api<cryopod_crds::v1alpha1::PodRestore> = Api::namespaced(stage.client.clone(), &stage.ns.name);
    let restore = restore_ended(&restores, "twice-restore").await;
    let (_, _, restore_message) = ready_of(&restore.status.clone().unwrap().conditions);
    println!("the target's PodRestore: {restore_message}");
    watching.store(false, std::sync::atomic::Ordering::SeqCst);
    let (target_highest, held_seen, running_while_held) = watcher.await.unwrap();
    println!(
        "the target: counter captured {captured}, highest seen {target_highest:?}; seen held {held_seen} times, \
         running while held: {running_while_held:?}"
    );
    // Held: its PodRestore recorded it (the window before the release found the source
    // ran on can be too short for the watch to catch).
    let held_stage = restore.status.as_ref().and_then(|s| s.stage.clone());
    assert_eq!(
        held_stage.as_deref(),
        Some("HeldStopped"),
        "the target was held stopped"
    );
    assert!(
        running_while_held.is_empty(),
        "processes ran while held: {running_while_held:?}"
    );
    assert!(
        target_highest.is_some_and(|n| n == captured),
        "the target was restored (its counter seen) and never counted ({captured}): {target_highest:?}"
    );
    let message = stage.ended_as(&status, MigrationPhase::Failed, "SourceResumed");
    assert!(message.contains("the agent restarted and thawed it"), "{message}");
    // One pod runs: the source, the same process, still counting; the restored pod is gone.
    let pods = stage.ns.pods(&stage.client);
    let left = wait_until("the restored pod to go", Duration::from_secs(60), || async {
        let all = pods.list(&Default::default()).await.ok()?.items;
        (all.len() == 1).then_some(all)
    })
    .await
    .unwrap();
    assert_eq!(left[0].metadata.uid, stage.source_pod.metadata.uid, "the source stays");
    stage.source_runs_on().await;
    let events = event_reasons(&stage.tb, &stage.ns.name, "twice");
    assert!(events.contains("SourceResumed"), "{events}");
    record_fault(
        &stage.tb,
        ("migration", "holding", "SIGKILL of the source's agent (restarted)"),
        "Failed, SourceResumed: the restarted agent thawed the held source, which runs on with its newer state; the target, restored stopped, never ran and was deleted",
        killed.elapsed(),
        "operator::a_migration_whose_source_ran_on_keeps_the_source_and_fails",
    );
    stage.done();
}

/// A rollout never leaves a pod frozen: the agent that holds a migration's source gets
/// SIGTERM (as its DaemonSet rolls) and no release comes. It drains for
/// `CRYOPOD_DRAIN_SECONDS`, thaws the source, records that it ran on, and exits; the
/// migration then keeps the source (`SourceResumed`).
#[tokio::test]
async fn an_agent_stopped_while_it_holds_a_pod_thaws_it_before_it_exits() {
    use cryopod_crds::v1alpha1::MigrationPhase;
    // The source's agent drains for 3 s at the most.
    let mut stage = target_away("e2e-drain", &[("CRYOPOD_DRAIN_SECONDS", "3")]).await;
    stage.migrate("rolled", json!({}));
    stage.held().await;
    let signalled = std::time::Instant::now();
    let agent = &mut stage.agent_1;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(agent.child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exit = wait_until("the agent to drain and exit", Duration::from_secs(30), || {
        std::future::ready(agent.child.try_wait().ok().flatten())
    })
    .await
    .unwrap();
    let agent_log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    assert!(exit.success(), "{exit}: {agent_log}");
    assert!(agent_log.contains("drain limit reached"), "{agent_log}");
    stage.source_counts_past(stage.source_count()).await;
    stage.restart_source_agent().await;
    let (_agent_2, status) = stage.target_back_and_ended("rolled").await;
    let message = stage.ended_as(&status, MigrationPhase::Failed, "SourceResumed");
    assert!(
        message.contains("its operation ended without releasing it"),
        "{message}"
    );
    stage.source_runs_on().await;
    record_fault(
        &stage.tb,
        ("migration", "holding", "SIGTERM of the source's agent (a rollout)"),
        "the agent drained for its 3 s, thawed the held source and exited 0; Failed, SourceResumed; the source runs on, the restored pod deleted",
        signalled.elapsed(),
        "operator::an_agent_stopped_while_it_holds_a_pod_thaws_it_before_it_exits",
    );
    stage.done();
}

/// `spec.timeoutSeconds` holds: a migration whose restore cannot finish in time (the
/// target's agent is away) is rolled back at its deadline, its PodRestore deleted
/// before the source thaws, and the source counts on.
#[tokio::test]
async fn a_migration_that_outlives_its_timeout_rolls_back() {
    use cryopod_crds::v1alpha1::{MigrationPhase, PodMigration, PodRestore};
    let stage = target_away("e2e-mig-timeout", &[]).await;
    stage.migrate("late", json!({"timeoutSeconds": 30}));
    stage.held().await;
    let held = std::time::Instant::now();
    let migrations: Api<PodMigration> = Api::namespaced(stage.client.clone(), &stage.ns.name);
    let status = migration_ended(&migrations, "late").await;
    let message = stage.ended_as(&status, MigrationPhase::RolledBack, "TimedOut");
    assert!(
        message.contains("did not finish within spec.timeoutSeconds (30 s)"),
        "{message}"
    );
    // Thawed by the rollback, or by its own freeze deadline (as long as the
    // migration's, from a little later) if that came first: either way it runs on.
    assert!(
        message.contains("the source pod was thawed and runs on") || message.contains("the source pod runs on ("),
        "{message}"
    );
    let restores: Api<PodRestore> = Api::namespaced(stage.client.clone(), &stage.ns.name);
    wait_until("the PodRestore to go", Duration::from_secs(30), || async {
        restores
            .list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await
    .unwrap();
    let left = stage
        .ns
        .pods(&stage.client)
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    assert_eq!(left.len(), 1, "only the source");
    assert_eq!(left[0].metadata.uid, stage.source_pod.metadata.uid);
    stage.source_runs_on().await;
    record_fault(
        &stage.tb,
        ("migration", "restoring", "the target's agent unreachable"),
        "RolledBack, TimedOut at spec.timeoutSeconds (30 s): the PodRestore deleted before the source thawed; the source runs on, no restart",
        held.elapsed(),
        "operator::a_migration_that_outlives_its_timeout_rolls_back",
    );
    stage.done();
}

/// Every example in `examples/` applied as it is (pod "counter" on node-1, node-2
/// labelled as the migration target, the example's default storage pointed at the
/// testbed's S3 server): the PodCheckpoint, the PodRestore and the PodMigration each
/// reach Ready.
#[tokio::test]
async fn every_example_reaches_ready() {
    use cryopod_e2e::testbed::repo_root;
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-examples").await.unwrap();
    let (source, target) = (tb.nodes[0].clone(), tb.nodes[1].clone());
    let counter: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "counter"},
        "spec": {"nodeName": source, "terminationGracePeriodSeconds": 1,
            "volumes": [{"name": "data", "emptyDir": {}}],
            "containers": [{"name": "app", "image": BUSYBOX, "imagePullPolicy": "Never",
                "command": ["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /data/n.tmp && mv /data/n.tmp /data/n; sleep 0.05; done"],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}
    }))
    .unwrap();
    ns.pods(&client).create(&Default::default(), &counter).await.unwrap();
    ns.wait_ready(&client, "counter", Duration::from_secs(90))
        .await
        .unwrap();
    let label = "cryopod.io/migration-target";
    let run = |args: &[&str]| {
        let out = tb.kubectl().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["label", "node", &target, &format!("{label}=true"), "--overwrite"]);

    // The example's default storage and its Secret, pointed at the testbed's S3 server.
    let path = repo_root().join("examples/checkpointstorage.yaml");
    let mut storage = cryopod_crds::examples::parse(&path, &std::fs::read_to_string(&path).unwrap())
        .unwrap()
        .documents
        .remove(0);
    storage["spec"]["s3"]["endpoint"] = json!(tb.s3.endpoint);
    let secret_ns = storage["spec"]["s3"]["credentialsSecretRef"]["namespace"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret_name = storage["spec"]["s3"]["credentialsSecretRef"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let _ = tb.kubectl().args(["create", "namespace", &secret_ns]).output();
    kubectl_apply(
        &tb,
        &secret_ns,
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret_name},
                "stringData": {"accessKeyId": tb.s3.access_key, "secretAccessKey": tb.s3.secret_key}}),
    );
    kubectl_apply(&tb, &ns.name, &storage);
    let storage_name = storage["metadata"]["name"].as_str().unwrap().to_owned();

    let Control {
        state,
        log,
        agents: _agents,
        _operator,
        tls: _tls,
    } = start_control(&tb, &ns.name).await;
    for (file, resource) in [
        ("podcheckpoint.yaml", "podcheckpoint/counter-1"),
        ("podrestore.yaml", "podrestore/counter-1-restore"),
        ("podmigration.yaml", "podmigration/counter-move"),
    ] {
        let path = repo_root().join("examples").join(file);
        run(&["apply", "-n", &ns.name, "-f", path.to_str().unwrap()]);
        kubectl_wait_ready(&tb, &ns.name, resource, &log);
        println!("{file}: Ready");
        if file == "podrestore.yaml" {
            post_restore_hooks_run_in_the_restored_pod_and_a_failing_one_fails_it(&tb, &client, &ns, &storage_name)
                .await;
        }
    }
    let restored = ns.pods(&client).get("counter-restored").await.unwrap();
    assert_eq!(restored.spec.unwrap().node_name.as_deref(), Some(target.as_str()));
    assert_eq!(
        restored
            .metadata
            .labels
            .unwrap()
            .get("restored-from")
            .map(String::as_str),
        Some("counter-1")
    );
    wait_until("the migrated source to go", Duration::from_secs(30), || async {
        ns.pods(&client).get_opt("counter").await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap();

    delete_storage(&tb, &storage_name);
    let _ = tb
        .kubectl()
        .args(["delete", "namespace", &secret_ns, "--wait=false"])
        .output();
    let _ = tb
        .kubectl()
        .args(["label", "node", &target, &format!("{label}-")])
        .output();
    let _ = std::fs::remove_dir_all(&state);
}

/// The example checkpoint's postRestore hook wrote its file in the restored pod
/// before the PodRestore was Ready. A checkpoint whose postRestore hook fails gives a
/// restore that fails naming the hook, and its pod is deleted.
async fn post_restore_hooks_run_in_the_restored_pod_and_a_failing_one_fails_it(
    tb: &Testbed,
    client: &kube::Client,
    ns: &TestNamespace,
    storage: &str,
) {
    let out = tb
        .kubectl()
        .args([
            "exec",
            "-n",
            &ns.name,
            "counter-restored",
            "-c",
            "app",
            "--",
            "cat",
            "/tmp/restored-at",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success() && !out.stdout.is_empty(),
        "the postRestore hook's file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    kubectl_apply(
        tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "failing-hook"},
                "spec": {"sourcePodName": "counter", "storage": storage,
                         "hooks": {"postRestore": [{"container": "app",
                             "exec": {"command": ["sh", "-c", "echo no database >&2; exit 3"]}}]}}}),
    );
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    let cp = ended(&checkpoints, "failing-hook").await;
    assert_eq!(
        cp.status.as_ref().unwrap().phase,
        Some(CheckpointPhase::Ready),
        "{:?}",
        ready_condition(&cp)
    );
    kubectl_apply(
        tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore", "metadata": {"name": "failing-hook"},
                "spec": {"checkpointName": "failing-hook", "podName": "failing-hook-pod"}}),
    );
    let restores: Api<cryopod_crds::v1alpha1::PodRestore> = Api::namespaced(client.clone(), &ns.name);
    let ended = restore_ended(&restores, "failing-hook").await;
    let status = ended.status.unwrap();
    let (_, reason, message) = ready_of(&status.conditions);
    println!("failing postRestore hook: {reason}: {message}");
    assert_eq!(
        status.phase,
        Some(cryopod_crds::v1alpha1::RestorePhase::Failed),
        "{message}"
    );
    assert!(
        message.contains("a postRestore hook failed")
            && message.contains("exit code 3")
            && message.contains("no database"),
        "{message}"
    );
    wait_until("the failed restore's pod to go", Duration::from_secs(30), || async {
        ns.pods(client)
            .get_opt("failing-hook-pod")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .unwrap();
    checkpoints.delete("failing-hook", &Default::default()).await.unwrap();
}
