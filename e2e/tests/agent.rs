//! The node agent's pieces on real pods of the local cluster: discovery through the
//! node's CRI socket, and the freeze protocol on the kubelet's own cgroups (v1): every
//! container of a pod stops at once, stays stopped with the pod cgroup thawed, and
//! counts on after the thaw, with the pod never leaving Ready.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cryopod_e2e::testbed::{TestNamespace, Testbed, wait_until};
use cryopod_node_agent::cgroup::{Freezer, FreezerState, V1Freezer};
use cryopod_node_agent::cri::CriClient;
use cryopod_node_agent::discovery::{DiscoveryError, discover};
use cryopod_node_agent::freeze::{FreezeLimits, freeze_pod};
use cryopod_node_agent::journal::Journal;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use serde_json::json;

const BUSYBOX: &str = "cryopod.local/busybox:e2e";
const NAMES: [&str; 3] = ["a", "b", "c"];

fn cri_socket(tb: &Testbed, node: &str) -> PathBuf {
    tb.dir.join(node).join("containerd/containerd.sock")
}

fn counting_pod(node: &str) -> Pod {
    let containers: Vec<serde_json::Value> = NAMES
        .iter()
        .map(|n| {
            json!({"name": n, "image": BUSYBOX, "imagePullPolicy": "Never",
                   "command": ["sh", "-c", format!("i=0; while :; do i=$((i+1)); echo $i > /data/{n}.tmp && mv /data/{n}.tmp /data/{n}; sleep 0.05; done")],
                   "volumeMounts": [{"name": "data", "mountPath": "/data"}]})
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "trio", "labels": {"cryopod.io/e2e-pod": "trio"}},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1, "containers": containers,
                 "volumes": [{"name": "data", "emptyDir": {}}]}
    }))
    .unwrap()
}

/// The counters, read from the emptyDir on the node's disk.
fn counts(dir: &std::path::Path) -> Vec<u64> {
    NAMES
        .iter()
        .map(|n| {
            std::fs::read_to_string(dir.join(n))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

/// A running "trio" pod: its UID, its emptyDir on the node's disk and its runtime facts.
struct Trio {
    data: PathBuf,
    runtime: cryopod_node_agent::discovery::PodRuntime,
}

/// Starts the counting pod on `node`, waits until every counter counts, discovers it.
async fn start_trio(tb: &Testbed, client: &kube::Client, ns: &TestNamespace, node: &str) -> Trio {
    ns.pods(client)
        .create(&PostParams::default(), &counting_pod(node))
        .await
        .unwrap();
    let pod = ns.wait_ready(client, "trio", Duration::from_secs(90)).await.unwrap();
    let uid = pod.metadata.uid.clone().unwrap();
    let data = tb
        .dir
        .join(node)
        .join(format!("kubelet/pods/{uid}/volumes/kubernetes.io~empty-dir/data"));
    wait_until("all counters to count", Duration::from_secs(30), || async {
        counts(&data).iter().all(|&c| c > 2).then_some(())
    })
    .await
    .unwrap();
    let runtime = discover(&CriClient::connect(&cri_socket(tb, node)).await.unwrap(), &uid)
        .await
        .unwrap();
    Trio { data, runtime }
}

/// The kubelet's v1 freezer hierarchy and a journal in a fresh directory.
fn freeze_tools() -> (Arc<dyn Freezer>, tempfile::TempDir, Journal) {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path()).unwrap();
    (Arc::new(V1Freezer::new("/sys/fs/cgroup/freezer")), dir, journal)
}

const LIMITS: FreezeLimits = FreezeLimits {
    max_freeze: Duration::from_secs(60),
    settle: Duration::from_secs(5),
};

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

/// Every counter moves past `then`, and the pod stayed Ready without restarts.
async fn assert_counting_on(ns: &TestNamespace, client: &kube::Client, data: &std::path::Path, then: &[u64]) {
    wait_until(
        "every counter to move on after the thaw",
        Duration::from_secs(20),
        || async {
            counts(data)
                .iter()
                .zip(then)
                .all(|(now, then)| now > then)
                .then_some(())
        },
    )
    .await
    .unwrap();
    assert!(
        ns.ready_without_restarts(client, "trio").await.unwrap(),
        "the pod stayed Ready without restarts"
    );
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

/// Runs node programs as the agent would on that node: in its mount namespace.
fn node_exec(tb: &Testbed, node: &str) -> cryopod_node_agent::dump::NodeExec {
    let launcher = std::fs::read_to_string(tb.dir.join(format!("pids/{node}.pid"))).unwrap();
    cryopod_node_agent::dump::NodeExec {
        prefix: ["nsenter", "-t", launcher.trim(), "-m", "--"]
            .iter()
            .map(Into::into)
            .collect(),
        path_dirs: vec![tb.node_packages.join("bin")],
    }
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
