//! Migrations of controllers' pods and restores across namespaces and nodes, through
//! the operator binary on the real cluster:
//!
//! - a Deployment's pod moves and its ReplicaSet adopts the restored pod, never
//!   creating a replica of its own;
//! - a StatefulSet's pod moves under its own name, with its PersistentVolumeClaim,
//!   while the fence keeps the StatefulSet from recreating it;
//! - a PodRestore reads a PodCheckpoint of another namespace only once granted;
//! - a restore onto a node whose CRIU is too old fails naming it, and nothing runs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod pods;

use std::collections::BTreeMap;
use std::time::Duration;

use cryopod_crds::v1alpha1::{MigrationPhase, PodCheckpoint, PodMigration, PodRestore};
use cryopod_e2e::testbed::{TestNamespace, Testbed, pod_ready, wait_until};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use pods::control::*;
use pods::*;
use serde_json::json;

/// Counts in memory, writing each number to `/data/n`; `/data/started` names the
/// process's start, so a fresh start is told apart from one that went on.
const COUNTER: &str = "cat /proc/sys/kernel/random/uuid > /data/started; i=0; \
    while :; do i=$((i+1)); echo $i > /data/n.tmp && mv /data/n.tmp /data/n; sleep 0.05; done";

fn counter_container() -> serde_json::Value {
    json!({"name": "app", "image": BUSYBOX, "imagePullPolicy": "Never", "command": ["sh", "-c", COUNTER],
           "volumeMounts": [{"name": "data", "mountPath": "/data"}]})
}

fn read_number(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The other node of the testbed.
fn other_node(tb: &Testbed, node: &str) -> String {
    tb.nodes.iter().find(|n| *n != node).unwrap().clone()
}

fn node_of(pod: &Pod) -> String {
    pod.spec.as_ref().unwrap().node_name.clone().unwrap()
}

fn controller_uid(pod: &Pod) -> Option<String> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.clone())
}

/// How many events of `reason` on `object` mention `needle`.
fn events_mentioning(tb: &Testbed, ns: &str, object: &str, reason: &str, needle: &str) -> usize {
    event_reasons(tb, ns, object)
        .lines()
        .filter(|l| l.starts_with(reason) && l.contains(needle))
        .count()
}

/// Waits for a PodMigration to end and returns its status.
async fn migrated(
    tb: &Testbed,
    client: &kube::Client,
    ns: &str,
    name: &str,
    log: &std::path::Path,
) -> cryopod_crds::v1alpha1::PodMigrationStatus {
    kubectl_wait_ready(tb, ns, &format!("podmigration/{name}"), log);
    let migrations: Api<PodMigration> = Api::namespaced(client.clone(), ns);
    let status = migrations.get(name).await.unwrap().status.unwrap();
    assert_eq!(status.phase, Some(MigrationPhase::Succeeded));
    status
}

/// A one-replica Deployment's pod moves to the other node. The restored pod is
/// adopted by the ReplicaSet in the source's place: the ReplicaSet never creates a
/// pod (one SuccessfulCreate, at the start), ends with one pod, and that pod counts
/// on from the checkpoint.
#[tokio::test]
async fn a_deployment_pod_moves_and_its_replicaset_adopts_the_restored_pod() {
    deployment_pod_moves("e2e-deploy", "ViaStore").await;
}

/// The same agent to agent (`transfer: Direct`).
#[tokio::test]
async fn a_deployment_pod_moves_agent_to_agent() {
    deployment_pod_moves("e2e-deploy-direct", "Direct").await;
}

async fn deployment_pod_moves(prefix: &str, transfer: &str) {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, prefix).await.unwrap();
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web", "cryopod.io/e2e-pod": "web"}},
                    "spec": {"terminationGracePeriodSeconds": 1, "volumes": [{"name": "data", "emptyDir": {}}],
                             "containers": [counter_container()]}}}}),
    );
    let pods = ns.pods(&client);
    let selector = ListParams::default().labels("app=web");
    let source_pod = wait_until("the Deployment's pod to be Ready", Duration::from_secs(90), || async {
        pods.list(&selector).await.ok()?.items.into_iter().find(pod_ready)
    })
    .await
    .unwrap();
    let source_name = source_pod.metadata.name.clone().unwrap();
    let set_uid = controller_uid(&source_pod).unwrap();
    let set_name = source_pod.metadata.owner_references.as_ref().unwrap()[0].name.clone();
    let source = node_of(&source_pod);
    let target = other_node(&tb, &source);
    let before = wait_until("the counter to count", Duration::from_secs(20), || async {
        let n = read_number(&pod_data(&tb, &source_pod).join("n"));
        (n > 20).then_some(n)
    })
    .await
    .unwrap();
    let started = std::fs::read_to_string(pod_data(&tb, &source_pod).join("started")).unwrap();
    let Control {
        state,
        log,
        agents: _agents,
        _operator,
        tls: _tls,
    } = start_control_on(&tb, &ns.name, &source, &target).await;
    let storage = s3_checkpoint_storage(&tb, &ns.name);
    let spec = if transfer == "Direct" {
        json!({"sourcePodName": source_name, "transfer": transfer, "target": {"nodeName": target}})
    } else {
        json!({"sourcePodName": source_name, "storage": storage, "transfer": transfer,
               "target": {"nodeName": target}})
    };
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration", "metadata": {"name": "move"},
                "spec": spec}),
    );
    let status = migrated(&tb, &client, &ns.name, "move", &log).await;
    assert_eq!(
        status.source_controller.as_deref(),
        Some(format!("ReplicaSet/{set_name}").as_str())
    );
    let target_pod = status.target_pod_name.clone().unwrap();
    println!(
        "Deployment pod {source_name} on {source} -> {target_pod} on {target}, downtime {:?} ms",
        status.downtime_millis
    );

    // One pod, the restored one, owned by the ReplicaSet; the source is gone.
    let only = wait_until(
        "the ReplicaSet to hold only the restored pod",
        Duration::from_secs(30),
        || async {
            let items = pods.list(&selector).await.ok()?.items;
            (items.len() == 1 && items[0].metadata.name.as_deref() == Some(target_pod.as_str()))
                .then(|| items[0].clone())
        },
    )
    .await
    .unwrap();
    assert_eq!(node_of(&only), target);
    assert_eq!(controller_uid(&only).as_deref(), Some(set_uid.as_str()));
    assert!(ns.ready_without_restarts(&client, &target_pod).await.unwrap());
    assert_eq!(
        events_mentioning(&tb, &ns.name, &set_name, "SuccessfulCreate", "Created pod"),
        1,
        "the ReplicaSet created no pod of its own:\n{}",
        event_reasons(&tb, &ns.name, &set_name)
    );

    // The counter goes on from where the checkpoint took it (a Direct migration's
    // checkpoint is gone with it: from where it was before the move, then).
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    let captured = match checkpoints
        .get_opt(&status.checkpoint_name.clone().unwrap())
        .await
        .unwrap()
    {
        Some(checkpoint) => Some(captured_numbers(&tb, &checkpoint, &["n"]).await[0]),
        None => None,
    };
    let data = pod_data(&tb, &only);
    let now = wait_until("the counter to go on", Duration::from_secs(20), || async {
        let now = read_number(&data.join("n"));
        (now > captured.unwrap_or(before)).then_some(now)
    })
    .await
    .unwrap();
    println!("Deployment counter: {before} before the move, captured {captured:?}, now {now}");
    if let Some(captured) = captured {
        assert!(now < captured + 400, "the counter went on from {captured}: {now}");
    }
    assert_eq!(
        std::fs::read_to_string(data.join("started")).unwrap(),
        started,
        "the counting process is the one that started before the move"
    );
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&state);
}

/// A cluster-scoped PersistentVolume on a host directory, deleted when the test ends.
struct HostVolume {
    tb: Testbed,
    name: String,
    path: std::path::PathBuf,
}

impl HostVolume {
    /// A volume pre-bound to claim `claim` of namespace `ns`.
    fn create(tb: &Testbed, ns: &str, claim: &str) -> Self {
        let name = format!("{ns}-{claim}");
        let path = tb.dir.join(format!("pv-{name}"));
        kubectl_apply(
            tb,
            ns,
            &json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
                "spec": {"capacity": {"storage": "10Mi"}, "accessModes": ["ReadWriteOnce"],
                         "storageClassName": "cryopod-e2e", "persistentVolumeReclaimPolicy": "Retain",
                         "hostPath": {"path": path, "type": "DirectoryOrCreate"},
                         "claimRef": {"namespace": ns, "name": claim}}}),
        );
        Self {
            tb: tb.clone(),
            name,
            path,
        }
    }
}

impl Drop for HostVolume {
    fn drop(&mut self) {
        let _ = self
            .tb
            .kubectl()
            .args(["delete", "pv", &self.name, "--wait=false"])
            .output();
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A StatefulSet's pod `db-0` moves to the other node under its own name, with its
/// PersistentVolumeClaim: the same process goes on counting into the volume, the
/// StatefulSet adopts the restored pod and never created one of its own after the
/// first, and the fence is gone afterwards.
#[tokio::test]
async fn a_statefulset_pod_moves_under_its_name_with_its_volume() {
    statefulset_pod_moves("e2e-sts", "ViaStore").await;
}

/// The same agent to agent (`transfer: Direct`): the source is stopped before the
/// target may take its name, and the target's agent still reads the checkpoint from
/// the source node's agent.
#[tokio::test]
async fn a_statefulset_pod_moves_agent_to_agent() {
    statefulset_pod_moves("e2e-sts-direct", "Direct").await;
}

async fn statefulset_pod_moves(prefix: &str, transfer: &str) {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, prefix).await.unwrap();
    let volume = HostVolume::create(&tb, &ns.name, "data-db-0");
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
            "spec": {"replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                "template": {"metadata": {"labels": {"app": "db", "cryopod.io/e2e-pod": "db"}},
                    "spec": {"terminationGracePeriodSeconds": 1, "containers": [counter_container()]}},
                "volumeClaimTemplates": [{"metadata": {"name": "data"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "cryopod-e2e",
                             "resources": {"requests": {"storage": "10Mi"}}}}]}}),
    );
    let pods = ns.pods(&client);
    let source_pod = ns.wait_ready(&client, "db-0", Duration::from_secs(90)).await.unwrap();
    let set_uid = controller_uid(&source_pod).unwrap();
    let source = node_of(&source_pod);
    let target = other_node(&tb, &source);
    let before = wait_until("the counter to count", Duration::from_secs(20), || async {
        let n = read_number(&volume.path.join("n"));
        (n > 20).then_some(n)
    })
    .await
    .unwrap();
    // Written before the first count: read once counting is under way.
    let started = std::fs::read_to_string(volume.path.join("started")).unwrap();
    let Control {
        state,
        log,
        agents: _agents,
        _operator,
        tls: _tls,
    } = start_control_on(&tb, &ns.name, &source, &target).await;
    let storage = s3_checkpoint_storage(&tb, &ns.name);
    let spec = if transfer == "Direct" {
        json!({"sourcePodName": "db-0", "transfer": transfer})
    } else {
        json!({"sourcePodName": "db-0", "storage": storage, "transfer": transfer})
    };
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration", "metadata": {"name": "move"},
                "spec": spec}),
    );
    let status = migrated(&tb, &client, &ns.name, "move", &log).await;
    assert_eq!(status.source_controller.as_deref(), Some("StatefulSet/db"));
    assert_eq!(status.target_pod_name.as_deref(), Some("db-0"));
    println!(
        "StatefulSet pod db-0 {source} -> {target} ({transfer}), downtime {:?} ms",
        status.downtime_millis
    );

    let moved = pods.get("db-0").await.unwrap();
    assert_ne!(moved.metadata.uid, source_pod.metadata.uid, "a new pod");
    assert_eq!(node_of(&moved), target);
    assert_eq!(controller_uid(&moved).as_deref(), Some(set_uid.as_str()));
    let claims: Vec<String> = moved
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.persistent_volume_claim.as_ref().map(|c| c.claim_name.clone()))
        .collect();
    assert_eq!(claims, ["data-db-0"]);
    assert!(ns.ready_without_restarts(&client, "db-0").await.unwrap());
    // The same process: it did not start again, and its count went on.
    let now = wait_until("the counter to go on", Duration::from_secs(20), || async {
        let n = read_number(&volume.path.join("n"));
        (n > before + 20).then_some(n)
    })
    .await
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(volume.path.join("started")).unwrap(),
        started,
        "the counting process is the one that started before the move"
    );
    println!("StatefulSet counter: {before} before the move, {now} after");
    assert_eq!(
        events_mentioning(
            &tb,
            &ns.name,
            "db",
            "SuccessfulCreate",
            "Create Pod db-0 in StatefulSet db successful"
        ),
        1,
        "the StatefulSet created db-0 once:\n{}",
        event_reasons(&tb, &ns.name, "db")
    );
    let fences = tb
        .kubectl()
        .args([
            "get",
            "configmaps",
            "-n",
            &ns.name,
            "-l",
            "cryopod.io/fence",
            "-o",
            "name",
        ])
        .output()
        .unwrap();
    assert!(fences.stdout.is_empty(), "the fence is lifted");
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&state);
    // The pod goes before its volume.
    let _ = tb
        .kubectl()
        .args([
            "delete",
            "statefulset",
            "db",
            "-n",
            &ns.name,
            "--wait=true",
            "--timeout=60s",
        ])
        .output();
}

/// A counting pod on `node`, its numbers in the emptyDir `data`.
fn counter_pod(node: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "counter", "labels": {"cryopod.io/e2e-pod": "counter"}},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                 "volumes": [{"name": "data", "emptyDir": {}}], "containers": [counter_container()]}
    }))
    .unwrap()
}

/// A PodRestore in one namespace naming a PodCheckpoint of another fails with
/// `NotPermitted` and creates nothing; once the checkpoint grants that namespace
/// (annotation `cryopod.io/restore-namespaces`), the pod comes back there, counting
/// on. One operator watches each namespace, as two tenants would see it.
#[tokio::test]
async fn a_restore_from_another_namespace_needs_its_grant() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let home = TestNamespace::create(&tb, &client, "e2e-grant-home").await.unwrap();
    let away = TestNamespace::create(&tb, &client, "e2e-grant-away").await.unwrap();
    let (source, target) = (tb.nodes[0].clone(), tb.nodes[1].clone());
    home.pods(&client)
        .create(&Default::default(), &counter_pod(&source))
        .await
        .unwrap();
    home.wait_ready(&client, "counter", Duration::from_secs(90))
        .await
        .unwrap();
    let Control {
        state,
        log,
        agents,
        _operator,
        tls,
    } = start_control_on(&tb, &home.name, &source, &target).await;
    let away_log = state.join("operator-away.log");
    let _away_operator = start_operator(
        &tb,
        &away.name,
        &tls,
        &[(&source, agents[0].port), (&target, agents[1].port)],
        &away_log,
    );
    let storage = s3_checkpoint_storage(&tb, &home.name);
    kubectl_apply(
        &tb,
        &home.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "cp"},
                "spec": {"sourcePodName": "counter", "storage": storage}}),
    );
    kubectl_wait_ready(&tb, &home.name, "podcheckpoint/cp", &log);

    let restores: Api<PodRestore> = Api::namespaced(client.clone(), &away.name);
    let request = |name: &str| {
        json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore", "metadata": {"name": name},
               "spec": {"checkpointName": "cp", "checkpointNamespace": home.name, "target": {"nodeName": target}}})
    };
    kubectl_apply(&tb, &away.name, &request("ungranted"));
    let refused = restore_ended(&restores, "ungranted").await;
    let (_, reason, message) = ready_of(&refused.status.unwrap().conditions);
    println!("ungranted: {reason}: {message}");
    assert_eq!(reason, "NotPermitted");
    assert!(
        message.contains(&format!("does not grant restores to namespace {}", away.name)),
        "{message}"
    );
    assert!(event_reasons(&tb, &away.name, "ungranted").contains("NotPermitted"));
    assert!(
        away.pods(&client)
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    let grant = format!("cryopod.io/restore-namespaces={}", away.name);
    let out = tb
        .kubectl()
        .args(["annotate", "podcheckpoint", "cp", "-n", &home.name, &grant])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    kubectl_apply(&tb, &away.name, &request("granted"));
    kubectl_wait_ready(&tb, &away.name, "podrestore/granted", &away_log);
    let pod_name = restored_pod_name(&restores, "granted").await;
    assert_eq!(pod_name, "counter", "the name is free in this namespace");
    let restored = away.pods(&client).get(&pod_name).await.unwrap();
    assert_eq!(node_of(&restored), target);
    let data = pod_data(&tb, &restored);
    let captured = {
        let checkpoints: Api<PodCheckpoint> = Api::namespaced(client.clone(), &home.name);
        captured_numbers(&tb, &checkpoints.get("cp").await.unwrap(), &["n"]).await[0]
    };
    let now = wait_until("the restored counter to go on", Duration::from_secs(20), || async {
        let now = read_number(&data.join("n"));
        (now > captured).then_some(now)
    })
    .await
    .unwrap();
    assert!(now < captured + 400, "went on from {captured}: {now}");
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&state);
}

/// A node whose CRIU is older than the checkpoint's (node-2's agent finds a `criu`
/// that says 3.19) fails the restore's compatibility check: the PodRestore ends
/// `NoCompatibleNode` naming CRIU, no pod is created, and the source counts on.
#[tokio::test]
async fn a_restore_onto_an_incompatible_node_fails_naming_the_cause() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-incompatible").await.unwrap();
    let (source, target) = (tb.nodes[0].clone(), tb.nodes[1].clone());
    let pods = ns.pods(&client);
    pods.create(&Default::default(), &counter_pod(&source)).await.unwrap();
    let counter = ns
        .wait_ready(&client, "counter", Duration::from_secs(90))
        .await
        .unwrap();

    let tls = agent_tls();
    let state = tb.dir.join(format!("e2e-agent-state-{}", ns.name));
    let old_criu = state.join("old-criu");
    std::fs::create_dir_all(&old_criu).unwrap();
    let fake = old_criu.join("criu");
    std::fs::write(&fake, "#!/bin/sh\necho 'Version: 3.19'\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (agent_1, _) = start_agent(&tb, &source, &tls, &state.join("source")).await;
    let (agent_2, _) = start_agent_with(
        &tb,
        &target,
        &tls,
        &state.join("target"),
        &[("CRYOPOD_CRIU_DIR", old_criu.to_str().unwrap())],
    )
    .await;
    let log = state.join("operator.log");
    let _operator = start_operator(
        &tb,
        &ns.name,
        &tls,
        &[(&source, agent_1.port), (&target, agent_2.port)],
        &log,
    );
    let storage = s3_checkpoint_storage(&tb, &ns.name);
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "cp"},
                "spec": {"sourcePodName": "counter", "storage": storage}}),
    );
    kubectl_wait_ready(&tb, &ns.name, "podcheckpoint/cp", &log);
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore", "metadata": {"name": "old-criu"},
                "spec": {"checkpointName": "cp", "target": {"nodeName": target}}}),
    );
    let restores: Api<PodRestore> = Api::namespaced(client.clone(), &ns.name);
    let refused = restore_ended(&restores, "old-criu").await;
    let (_, reason, message) = ready_of(&refused.status.unwrap().conditions);
    println!("incompatible: {reason}: {message}");
    assert_eq!(reason, "NoCompatibleNode");
    assert!(message.contains("CRIU") && message.contains("3.19"), "{message}");
    assert!(event_reasons(&tb, &ns.name, "old-criu").contains("NoCompatibleNode"));
    let names: BTreeMap<String, String> = pods
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| (p.metadata.name.clone().unwrap(), node_of(&p)))
        .collect();
    assert_eq!(names, BTreeMap::from([("counter".to_owned(), source.clone())]));
    let data = pod_data(&tb, &counter);
    let then = read_number(&data.join("n"));
    wait_until("the source to count on", Duration::from_secs(10), || async {
        (read_number(&data.join("n")) > then + 5).then_some(())
    })
    .await
    .unwrap();
    assert!(ns.ready_without_restarts(&client, "counter").await.unwrap());
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&state);
}
