//! The VM tier (#16): node-3 is a virtual machine with its own kernel, systemd as PID 1,
//! pure cgroup v2 and the systemd cgroup driver, whose root holds `CAP_SYS_RESOURCE`:
//! a node like production's. Its agent runs in the guest (a transient systemd unit);
//! the operator reaches it over mutual TLS through the hub. Without the VM node these
//! tests fail: the tier never passes by skipping.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod pods;

use std::time::Duration;

use cryopod_crds::v1alpha1::{CheckpointPhase, PodCheckpoint, PodRestore};
use cryopod_e2e::testbed::{TestNamespace, Testbed, delete_pod_now, wait_until};
use cryopod_e2e::vm::VmNode;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use pods::control::*;
use pods::*;
use serde_json::json;

const UID: u32 = 1000;
const GID: u32 = 1000;
const FS_GROUP: u32 = 2000;

/// A pod of three non-root containers on `node`: `counter` keeps its count and a
/// random token drawn at its start in memory, and writes them to the emptyDir and
/// `/dev/shm` (a process started afresh draws another token); `client` sends numbers over
/// 127.0.0.1 to `server`, which writes what it hears to the emptyDir.
fn non_root_pod(node: &str) -> Pod {
    let [server, client] = talkers();
    let counter = json!({"name": "counter", "image": BUSYBOX, "imagePullPolicy": "Never",
        "command": ["sh", "-c", "busybox id -u > /data/owner; for f in /tmp/suid /data/suid; do echo x > $f; chmod 4755 $f; done; \
                     t=$RANDOM$RANDOM$RANDOM; i=0; while :; do i=$((i+1)); \
                     echo $t > /data/token.tmp && mv /data/token.tmp /data/token; \
                     echo $i > /data/count.tmp && mv /data/count.tmp /data/count; \
                     echo $i > /dev/shm/count.tmp && mv /dev/shm/count.tmp /dev/shm/count; sleep 0.2; done"],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}]});
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "nonroot"},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                 "tolerations": [{"key": "cryopod.io/vm-node", "operator": "Exists"}],
                 "securityContext": {"runAsUser": UID, "runAsGroup": GID, "fsGroup": FS_GROUP, "runAsNonRoot": true},
                 "containers": [counter, server, client],
                 "volumes": [{"name": "data", "emptyDir": {}}]}
    }))
    .unwrap()
}

/// The pod's user made setuid files of its own, in its rootfs and in its emptyDir. A
/// restore that lost owners but kept modes would hand back root-owned setuid files;
/// they come back owned by the user, with their modes.
fn security_a_users_setuid_file_comes_back_the_users(tb: &Testbed, ns: &str, restored: &str) {
    assert_eq!(
        exec(
            tb,
            ns,
            restored,
            "counter",
            "busybox stat -c %u:%a /tmp/suid /data/suid"
        ),
        format!("{UID}:4755\n{UID}:4755")
    );
}

/// `sh -c script` in a container of a pod, through the API server and the kubelet.
fn exec(tb: &Testbed, ns: &str, pod: &str, container: &str, script: &str) -> String {
    let out = tb
        .kubectl()
        .args(["exec", "-n", ns, pod, "-c", container, "--", "sh", "-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl exec {pod}/{container} {script:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn number(text: &str) -> u64 {
    text.trim().parse().unwrap_or_else(|_| panic!("not a number: {text:?}"))
}

/// The numbers the server heard, in order.
fn heard(tb: &Testbed, ns: &str, pod: &str) -> Vec<u64> {
    exec(tb, ns, pod, "server", "cat /data/heard")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// A pod whose containers run as uid 1000 is checkpointed on the cgroup v2 node and
/// restored there: its in-memory counter goes on, its files keep their owners, and its
/// loopback connection carries on where it was. On the other nodes CRIU cannot dump a
/// non-root process (this machine withholds `CAP_SYS_RESOURCE` from root).
#[tokio::test]
async fn a_non_root_pod_on_the_cgroup_v2_node_checkpoints_and_restores_with_its_state() {
    let tb = Testbed::from_env().unwrap();
    let vm = VmNode::all(&tb).unwrap().remove(0);
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-vm-nonroot").await.unwrap();
    ns.pods(&client)
        .create(&PostParams::default(), &non_root_pod(&vm.name))
        .await
        .unwrap();
    ns.wait_ready(&client, "nonroot", Duration::from_secs(180))
        .await
        .unwrap();
    assert_eq!(
        exec(&tb, &ns.name, "nonroot", "counter", "busybox id -u"),
        UID.to_string()
    );

    let tls = agent_tls();
    let agent = start_vm_agent(&vm, &tls, &[]).await;
    let state = tb.dir.join(format!("e2e-agent-state-{}", ns.name));
    std::fs::create_dir_all(&state).unwrap();
    let log = state.join("operator.log");
    let _operator = start_operator(&tb, &ns.name, &tls, &[(&vm.name, agent.port)], &log);
    let storage = s3_cluster_checkpoint_storage(&tb, &ns.name);
    kubectl_apply(
        &tb,
        &ns.name,
        // Under TCG, with the other tiers loading the host's two cores, one dump of
        // this small pod took over the default 30 s of freeze: it gets 120 s.
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "nonroot-cp"},
                "spec": {"sourcePodName": "nonroot", "storage": storage, "maxFreezeSeconds": 120}}),
    );
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    let cp = ended(&checkpoints, "nonroot-cp").await;
    assert_eq!(
        cp.status.as_ref().unwrap().phase,
        Some(CheckpointPhase::Ready),
        "{:?}; agent log: {}",
        ready_condition(&cp),
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
    let facts = cp.status.as_ref().unwrap().manifest.clone().unwrap();
    println!("checkpoint on {}: {facts:?}", vm.name);
    let captured = captured_numbers(&tb, &cp, &["count"]).await[0];
    let [token, heard_then] = <[String; 2]>::try_from(captured_texts(&tb, &cp, &["token", "heard"]).await).unwrap();
    let heard_then = heard_then.lines().count();
    assert!(
        token.trim().len() > 3 && heard_then > 0,
        "token {token:?}, {heard_then} heard"
    );
    // The source goes, so the restored pod has the node and the loopback port alone.
    delete_pod_now(&ns.pods(&client), "nonroot").await.unwrap();

    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore", "metadata": {"name": "nonroot-back"},
                "spec": {"checkpointName": "nonroot-cp", "target": {"nodeName": vm.name}}}),
    );
    kubectl_wait_ready_within(&tb, &ns.name, "podrestore/nonroot-back", &log, 300);
    let restores: Api<PodRestore> = Api::namespaced(client.clone(), &ns.name);
    let status = restores.get("nonroot-back").await.unwrap().status.unwrap();
    assert_eq!(status.node_name.as_deref(), Some(vm.name.as_str()));
    let restored = status.restored_pod_name.clone().unwrap();

    // The counter goes on from the checkpoint (a fresh start would count from 1).
    let now = wait_until("the restored counter to move", Duration::from_secs(60), || async {
        let now = number(&exec(&tb, &ns.name, &restored, "counter", "cat /data/count"));
        (now > captured).then_some(now)
    })
    .await
    .unwrap();
    println!("non-root counter: captured {captured}, restored {now}");
    // The same process memory: the token drawn at the source's start.
    assert_eq!(
        exec(&tb, &ns.name, &restored, "counter", "cat /data/token"),
        token.trim()
    );
    let shm = number(&exec(&tb, &ns.name, &restored, "counter", "cat /dev/shm/count"));
    assert!(shm > captured, "/dev/shm went on from {captured}: {shm}");
    // The processes and their files keep their owners.
    assert_eq!(
        exec(&tb, &ns.name, &restored, "counter", "busybox id -u"),
        UID.to_string()
    );
    assert_eq!(
        exec(&tb, &ns.name, &restored, "counter", "cat /data/owner"),
        UID.to_string()
    );
    assert_eq!(
        exec(
            &tb,
            &ns.name,
            &restored,
            "counter",
            "busybox stat -c %u:%g /data/count /data/owner"
        ),
        format!("{UID}:{FS_GROUP}\n{UID}:{FS_GROUP}")
    );
    security_a_users_setuid_file_comes_back_the_users(&tb, &ns.name, &restored);
    // The loopback connection survived: the server's file was not truncated by a
    // fresh start, and the numbers heard after the restore follow on without a gap.
    let first = heard(&tb, &ns.name, &restored).len();
    assert!(
        first >= heard_then,
        "the server's file was truncated: {first} < {heard_then} lines"
    );
    let numbers = wait_until("the restored server to hear more", Duration::from_secs(60), || async {
        let numbers = heard(&tb, &ns.name, &restored);
        (numbers.len() > first).then_some(numbers)
    })
    .await
    .unwrap();
    println!(
        "heard {heard_then} numbers before the checkpoint, {} after the restore",
        numbers.len()
    );
    assert_eq!(numbers[0], 1);
    for pair in numbers.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "the conversation broke: {numbers:?}");
    }
    assert!(ns.ready_without_restarts(&client, &restored).await.unwrap());
    let test = "vm_node::a_non_root_pod_on_the_cgroup_v2_node_checkpoints_and_restores_with_its_state";
    let v2 = cryopod_e2e::compat::V2_SYSTEMD;
    record_compat(&tb, "checkpoint (non-root pod)", (v2, ""), "", test);
    record_compat(&tb, "restore (non-root pod)", (v2, v2), "", test);
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&state);
}

/// A pod that can migrate only where CRIU can restore it: between the cgroup v1 nodes
/// and the cgroup v2 node, either way, the migration fails `NoCompatibleNode` before
/// anything is frozen, naming both nodes' cgroup versions. No checkpoint is made, and
/// the source counts on without a restart.
#[tokio::test]
async fn migrations_between_cgroup_versions_are_refused_before_anything_is_frozen() {
    use cryopod_crds::v1alpha1::{MigrationPhase, PodMigration};
    let tb = Testbed::from_env().unwrap();
    let vm = VmNode::all(&tb).unwrap().remove(0);
    let host = tb.nodes[0].clone();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-vm-across").await.unwrap();
    let pod = |name: &str, node: &str| -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                     "tolerations": [{"key": "cryopod.io/vm-node", "operator": "Exists"}],
                     "containers": [{"name": "counter", "image": BUSYBOX, "imagePullPolicy": "Never",
                         "command": ["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /tmp/count.new && mv /tmp/count.new /tmp/count; sleep 0.2; done"]}]}
        }))
        .unwrap()
    };
    for (name, node) in [("on-v1", host.as_str()), ("on-v2", vm.name.as_str())] {
        ns.pods(&client)
            .create(&PostParams::default(), &pod(name, node))
            .await
            .unwrap();
    }
    for name in ["on-v1", "on-v2"] {
        ns.wait_ready(&client, name, Duration::from_secs(180)).await.unwrap();
    }
    let tls = agent_tls();
    let state = tb.dir.join(format!("e2e-agent-state-{}", ns.name));
    let (host_agent, _) = start_agent(&tb, &host, &tls, &state).await;
    let vm_agent = start_vm_agent(&vm, &tls, &[]).await;
    let log = state.join("operator.log");
    let _operator = start_operator(
        &tb,
        &ns.name,
        &tls,
        &[(&host, host_agent.port), (&vm.name, vm_agent.port)],
        &log,
    );
    let storage = s3_cluster_checkpoint_storage(&tb, &ns.name);
    let v1 = cryopod_e2e::compat::V1_CGROUPFS;
    let v2 = cryopod_e2e::compat::V2_SYSTEMD;
    let cases = [
        (
            "v1-to-v2",
            "on-v1",
            &vm.name,
            (v1, v2),
            format!("{host} runs cgroup V1 and {} runs cgroup V2", vm.name),
        ),
        (
            "v2-to-v1",
            "on-v2",
            &host,
            (v2, v1),
            format!("{} runs cgroup V2 and {host} runs cgroup V1", vm.name),
        ),
    ];
    for (name, source, target, _, _) in &cases {
        kubectl_apply(
            &tb,
            &ns.name,
            &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration", "metadata": {"name": name},
                    "spec": {"sourcePodName": source, "target": {"nodeName": target}, "storage": storage}}),
        );
    }
    let migrations: Api<PodMigration> = Api::namespaced(client.clone(), &ns.name);
    for (name, source, _, kinds, why) in &cases {
        let status = migration_ended(&migrations, name).await;
        let (_, reason, message) = ready_of(&status.conditions);
        println!("{name}: {reason}: {message}");
        assert_eq!(status.phase, Some(MigrationPhase::Failed), "{name}: {message}");
        assert_eq!(reason, "NoCompatibleNode", "{name}: {message}");
        assert!(
            message.contains(why.as_str()) && message.contains("nothing was frozen"),
            "{name}: {message}"
        );
        // Nothing was frozen: no checkpoint was asked for, and the source was never held.
        assert_eq!(status.checkpoint_name, None, "{name}");
        assert!(
            !status.conditions.iter().any(|c| c.type_ == "SourceFrozen"),
            "{name}: {:?}",
            status.conditions
        );
        let before = number(&exec(&tb, &ns.name, source, "counter", "cat /tmp/count"));
        wait_until("the source to count on", Duration::from_secs(30), || async {
            (number(&exec(&tb, &ns.name, source, "counter", "cat /tmp/count")) > before).then_some(())
        })
        .await
        .unwrap();
        assert!(ns.ready_without_restarts(&client, source).await.unwrap(), "{name}");
        record_compat(
            &tb,
            "migrate",
            *kinds,
            &format!(
                "refused before the freeze: `NoCompatibleNode`: {why}: CRIU restores a process only under the cgroup version it was dumped on"
            ),
            "vm_node::migrations_between_cgroup_versions_are_refused_before_anything_is_frozen",
        );
    }
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    assert!(checkpoints.list(&Default::default()).await.unwrap().items.is_empty());
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&state);
}
