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

/// What container `a` leaves in the shared `/dev/shm` before it starts counting.
const SHM_TOKEN: &str = "shared-memory-token";

/// Three containers counting into a shared emptyDir. Container `a` also writes a
/// token into `/dev/shm`, creates `/tmp/marker` and deletes `/bin/true` in its rootfs.
fn counting_pod(node: &str) -> Pod {
    let containers: Vec<serde_json::Value> = NAMES
        .iter()
        .map(|n| {
            let setup = if *n == "a" {
                format!("echo {SHM_TOKEN} > /dev/shm/token && echo marker > /tmp/marker && rm /bin/true && ")
            } else {
                String::new()
            };
            json!({"name": n, "image": BUSYBOX, "imagePullPolicy": "Never",
                   "command": ["sh", "-c", format!("{setup}i=0; while :; do i=$((i+1)); echo $i > /data/{n}.tmp && mv /data/{n}.tmp /data/{n}; sleep 0.05; done")],
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

fn node_agent(
    tb: &Testbed,
    node: &str,
    cri: CriClient,
    journal: Journal,
    freezer: Arc<dyn Freezer>,
) -> cryopod_node_agent::checkpoint::NodeAgent<CriClient> {
    cryopod_node_agent::checkpoint::NodeAgent {
        runtime: cri,
        freezer,
        journal,
        exec: node_exec(tb, node),
        work_dir: tb.dir.join("e2e-agent-work"),
        node: cryopod_node_agent::package::NodeFacts {
            name: node.to_owned(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap()
                .trim()
                .to_owned(),
            criu_version: "4.2.1".to_owned(),
            cgroup_version: "V1".to_owned(),
            cpu_flags: vec![],
        },
    }
}

/// A running-after checkpoint of the trio pod, keeping TCP connections.
fn trio_request(
    ns: &TestNamespace,
    pod_uid: &str,
    operation_id: String,
    prefix: String,
) -> cryopod_node_agent::checkpoint::CheckpointRequest {
    cryopod_node_agent::checkpoint::CheckpointRequest {
        operation_id,
        pod: cryopod_node_agent::package::PodRef {
            namespace: ns.name.clone(),
            name: "trio".into(),
            uid: pod_uid.to_owned(),
        },
        prefix,
        tcp_established: true,
        limits: LIMITS,
        hooks: vec![],
        after: cryopod_node_agent::checkpoint::AfterDump::Running,
        pod_ip_connections: cryopod_node_agent::checkpoint::PodIpPolicy::Close,
        seal: cryopod_node_agent::package::Seal::Clear,
    }
}

fn unzstd(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut zstd::Decoder::new(bytes).unwrap(), &mut out).unwrap();
    out
}

/// The members of a tar: path and contents.
fn tar_members(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = tar::Archive::new(bytes);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let path = e.path().unwrap().display().to_string();
            let mut body = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut body).unwrap();
            (path, body)
        })
        .collect()
}

/// A checkpoint of the trio pod into the testbed's S3 server, by the agent library.
struct TrioCheckpoint {
    trio: Trio,
    outcome: cryopod_node_agent::checkpoint::CheckpointOutcome,
    stages: Vec<cryopod_node_agent::checkpoint::Stage>,
    prefix: String,
    store: Arc<dyn object_store::ObjectStore>,
    at_start: Vec<u64>,
}

/// Starts the trio pod in `ns` on the first node and checkpoints it.
async fn checkpoint_trio(tb: &Testbed, client: &kube::Client, ns: &TestNamespace, op: &str) -> TrioCheckpoint {
    let node = tb.nodes[0].clone();
    let trio = start_trio(tb, client, ns, &node).await;
    let (freezer, _journal_dir, journal) = freeze_tools();
    let store = tb.s3_store(&tb.s3.endpoint, &tb.s3.secret_key).unwrap();
    let agent = node_agent(
        tb,
        &node,
        CriClient::connect(&cri_socket(tb, &node)).await.unwrap(),
        journal,
        freezer,
    );
    let pod_uid = ns.pods(client).get("trio").await.unwrap().metadata.uid.unwrap();
    let prefix = format!("e2e/{}/trio/{pod_uid}/", ns.name);
    let request = trio_request(
        ns,
        &pod_uid,
        format!("{op}-{}", &trio.runtime.sandbox_id[..12]),
        prefix.clone(),
    );
    let at_start = counts(&trio.data);
    let stages = std::sync::Mutex::new(Vec::new());
    let outcome = agent
        .checkpoint(&request, store.clone(), &|stage| stages.lock().unwrap().push(stage))
        .await
        .unwrap();
    let stages = stages.into_inner().unwrap();
    TrioCheckpoint {
        trio,
        outcome,
        stages,
        prefix,
        store,
        at_start,
    }
}

/// The whole checkpoint of a three-container pod into the testbed's S3 server: the
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
        let expected = [
            Stage::Discovering,
            Stage::Freezing,
            Stage::Dumping,
            Stage::Thawed,
            Stage::Storing,
        ];
        assert_eq!(stages, expected, "progress is reported stage by stage");
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
        assert_eq!(
            cryopod_node_agent::package::sha256_hex(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
            object.sha256,
            "{}",
            object.key
        );
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
        diff_paths.contains(&"tmp/marker") && diff_paths.contains(&"bin/.wh.true"),
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
    use cryopod_node_agent::checkpoint::CheckpointError;

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
    let request = trio_request(
        &ns,
        &pod_uid,
        format!("e2e-down-{}", &trio.runtime.sandbox_id[..12]),
        format!("e2e/{}/trio/", ns.name),
    );
    let at_start = counts(&trio.data);
    let err = agent.checkpoint(&request, store, &|_| {}).await.unwrap_err();
    println!("store down: {err}");
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
    let real = tb.s3_store(&tb.s3.endpoint, &tb.s3.secret_key).unwrap();
    let left: Vec<_> = futures::StreamExt::collect::<Vec<_>>(
        real.list(Some(&object_store::path::Path::from(request.prefix.as_str()))),
    )
    .await;
    assert!(left.is_empty(), "nothing was stored: {left:?}");
}

/// The agent binary, killed when the test ends.
struct AgentProcess(std::process::Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// TLS material of one test: the cryopod CA, the agent's serving pair (in `dir`, as
/// the agent reads it) and the operator's client identity.
struct AgentTls {
    dir: tempfile::TempDir,
    ca: String,
    client: tonic::transport::Identity,
}

fn agent_tls() -> AgentTls {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("localhost");
    let (client_cert, client_key) = leaf("cryopod-operator");
    std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
    std::fs::write(dir.path().join("tls.crt"), server_cert).unwrap();
    std::fs::write(dir.path().join("tls.key"), server_key).unwrap();
    AgentTls {
        dir,
        ca: ca.pem(),
        client: tonic::transport::Identity::from_pem(client_cert, client_key),
    }
}

/// Starts the agent binary for `node` on a loopback port and connects to it over mTLS.
async fn start_agent(
    tb: &Testbed,
    node: &str,
    tls: &AgentTls,
    state: &std::path::Path,
) -> (
    AgentProcess,
    cryopod_node_agent::server::pb::node_agent_client::NodeAgentClient<tonic::transport::Channel>,
) {
    use cryopod_node_agent::server::pb::node_agent_client::NodeAgentClient;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    let agent_bin = std::env::var("CRYOPOD_AGENT_BIN").expect("CRYOPOD_AGENT_BIN is set by e2e/run.sh");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let launcher = std::fs::read_to_string(tb.dir.join(format!("pids/{node}.pid"))).unwrap();
    let process = AgentProcess(
        std::process::Command::new(agent_bin)
            .env("CRYOPOD_NODE_NAME", node)
            .env("CRYOPOD_LISTEN", format!("127.0.0.1:{port}"))
            .env("CRYOPOD_TLS_DIR", tls.dir.path())
            .env("CRYOPOD_CRI_SOCKET", cri_socket(tb, node))
            .env("CRYOPOD_CGROUP", "v1:/sys/fs/cgroup/freezer")
            .env("CRYOPOD_STATE_DIR", state)
            .env("CRYOPOD_NODE_EXEC", format!("nsenter -t {} -m --", launcher.trim()))
            .env("CRYOPOD_CRIU_DIR", tb.node_packages.join("bin"))
            .spawn()
            .unwrap(),
    );
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&tls.ca))
        .identity(tls.client.clone())
        .domain_name("localhost");
    let url = format!("https://localhost:{port}");
    let client = wait_until("the agent to serve", Duration::from_secs(30), || async {
        let channel = Channel::from_shared(url.clone())
            .ok()?
            .tls_config(config.clone())
            .ok()?
            .connect()
            .await
            .ok()?;
        Some(NodeAgentClient::new(channel))
    })
    .await
    .unwrap();
    (process, client)
}

/// What the operator would send for the trio pod, storing into the testbed's S3 server.
fn grpc_request(
    tb: &Testbed,
    ns: &TestNamespace,
    trio: &Trio,
    pod_uid: &str,
    prefix: &str,
) -> cryopod_node_agent::server::pb::CheckpointRequest {
    use cryopod_node_agent::server::pb;
    pb::CheckpointRequest {
        operation_id: format!("grpc-{}", &trio.runtime.sandbox_id[..12]),
        pod: Some(pb::PodRef {
            namespace: ns.name.clone(),
            name: "trio".into(),
            uid: pod_uid.to_owned(),
        }),
        storage: Some(pb::Storage {
            backend: Some(pb::storage::Backend::S3(pb::S3Storage {
                endpoint: tb.s3.endpoint.clone(),
                bucket: tb.s3.bucket.clone(),
                region: "us-east-1".into(),
                force_path_style: true,
                access_key_id: tb.s3.access_key.clone(),
                secret_access_key: tb.s3.secret_key.clone(),
            })),
        }),
        prefix: prefix.to_owned(),
        tcp_established: true,
        max_freeze_seconds: 30,
        ..Default::default()
    }
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
    let (_process, mut agent) = start_agent(&tb, &node, &tls, &state).await;

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
    let mut stream = agent
        .checkpoint(grpc_request(&tb, &ns, &trio, &pod_uid, &prefix))
        .await
        .unwrap()
        .into_inner();
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
    let digest = cryopod_node_agent::package::sha256_hex(<sha2::Sha256 as sha2::Digest>::digest(&manifest));
    assert_eq!(
        digest, result.manifest_digest,
        "the stored manifest is the one reported"
    );
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
    process.0.kill().unwrap(); // SIGKILL while the pod is frozen
    process.0.wait().unwrap();
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

    let (_restarted, _) = start_agent(&tb, &node, &tls, &state).await;
    for c in &trio.runtime.containers {
        assert_eq!(
            freezer.state(&c.cgroup).unwrap(),
            FreezerState::Thawed,
            "{} thawed by the restarted agent",
            c.name
        );
    }
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "thawed within the 30 s freeze deadline"
    );
    assert_counting_on(&ns, &client, &trio.data, &at_kill).await;
    let journal = Journal::open(state.join("journal")).unwrap();
    assert!(journal.entries().unwrap().is_empty(), "the journal is clean");
    let _ = std::fs::remove_dir_all(&state);
}

/// Restored containers and their sandbox, run by runc outside Kubernetes; removed
/// (processes, runc state, cgroups, files) when dropped.
struct PlainRestore {
    runc_root: PathBuf,
    ids: Vec<String>,
    cgroup: String,
    dir: PathBuf,
}

impl Drop for PlainRestore {
    fn drop(&mut self) {
        for id in self.ids.iter().rev() {
            let runc = |args: &[&str]| {
                std::process::Command::new("runc")
                    .arg("--root")
                    .arg(&self.runc_root)
                    .args(args)
                    .output()
            };
            let _ = runc(&["kill", id, "KILL"]);
            let _ = runc(&["delete", "-f", id]);
        }
        for hierarchy in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
            let root = hierarchy.path().join(self.cgroup.trim_start_matches('/'));
            let mut dirs: Vec<PathBuf> = std::iter::once(root.clone())
                .chain(
                    std::fs::read_dir(&root)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|e| e.path())
                        .filter(|p| p.is_dir()),
                )
                .collect();
            dirs.reverse();
            for dir in dirs {
                let _ = std::fs::remove_dir(dir);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a command that leaves a detached process behind: its output goes to `log`
/// (a pipe would be held open by the detached process forever).
fn run_detached(cmd: &mut std::process::Command, log: &std::path::Path) {
    let file = std::fs::File::create(log).unwrap();
    let status = cmd
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "{cmd:?} failed: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Unpacks the single layer of an OCI archive built by `oci-image` into `rootfs`.
fn unpack_image(archive: &std::path::Path, rootfs: &std::path::Path) {
    let members: std::collections::HashMap<String, Vec<u8>> =
        tar_members(&std::fs::read(archive).unwrap()).into_iter().collect();
    let index: serde_json::Value = serde_json::from_slice(&members["index.json"]).unwrap();
    let blob = |digest: &serde_json::Value| {
        &members[&format!(
            "blobs/sha256/{}",
            digest.as_str().unwrap().trim_start_matches("sha256:")
        )]
    };
    let manifest: serde_json::Value = serde_json::from_slice(blob(&index["manifests"][0]["digest"])).unwrap();
    tar::Archive::new(blob(&manifest["layers"][0]["digest"]).as_slice())
        .unpack(rootfs)
        .unwrap();
}

/// A new sandbox beside the cluster (a pause process owning fresh net, IPC and UTS
/// namespaces) with the checkpoint's shared state restored into `dir`.
struct NewSandbox {
    restore: PlainRestore,
    pid: u64,
    shm: PathBuf,
}

fn new_sandbox(
    tb: &Testbed,
    ns_name: &str,
    node: &str,
    manifest: &cryopod_node_agent::package::Manifest,
    objects: &std::collections::HashMap<String, Vec<u8>>,
) -> NewSandbox {
    // The new sandbox: a pause process owning fresh net, IPC and UTS namespaces.
    let dir = tb.dir.join(format!("e2e-restore-{}", ns_name));
    let runc_root = dir.join("runc");
    let cgroup = format!("/cryopod-{node}/e2e-restore-{}", ns_name);
    let mut restore = PlainRestore {
        runc_root: runc_root.clone(),
        ids: vec![],
        cgroup: cgroup.clone(),
        dir: dir.clone(),
    };
    let sandbox = dir.join("sandbox");
    std::fs::create_dir_all(sandbox.join("rootfs")).unwrap();
    std::fs::copy("/usr/bin/catatonit", sandbox.join("rootfs/pause")).unwrap();
    run_ok(
        std::process::Command::new("runc")
            .args(["spec", "--bundle"])
            .arg(&sandbox),
    );
    let spec_path = sandbox.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&spec_path).unwrap()).unwrap();
    spec["process"]["args"] = json!(["/pause", "-P"]);
    spec["process"]["terminal"] = json!(false);
    spec["root"] = json!({"path": "rootfs", "readonly": false});
    spec["linux"]["namespaces"] =
        json!([{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]);
    spec["linux"]["cgroupsPath"] = json!(format!("{cgroup}/sandbox"));
    std::fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
    let sandbox_id = format!("{}-sandbox", ns_name);
    run_detached(
        std::process::Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["run", "--detach", "--bundle"])
            .arg(&sandbox)
            .arg(&sandbox_id),
        &dir.join("sandbox.log"),
    );
    restore.ids.push(sandbox_id.clone());
    let state: serde_json::Value = serde_json::from_str(&run_ok(
        std::process::Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["state", &sandbox_id]),
    ))
    .unwrap();
    let sandbox_pid = state["pid"].as_u64().unwrap();
    run_ok(std::process::Command::new("nsenter").args([
        "-t",
        &sandbox_pid.to_string(),
        "-n",
        "ip",
        "link",
        "set",
        "lo",
        "up",
    ]));

    // Pod-level state first: /dev/shm and the emptyDirs, from their captures.
    let shm = dir.join("shm");
    for key in &manifest.shared {
        let target = match key.strip_prefix("pod/volume/").and_then(|k| k.strip_suffix(".tar.zst")) {
            Some(volume) => dir.join("volumes").join(volume),
            None => shm.clone(),
        };
        std::fs::create_dir_all(&target).unwrap();
        let inner = &tar_members(&objects[key])[0].1;
        tar::Archive::new(inner.as_slice()).unpack(&target).unwrap();
    }
    NewSandbox {
        restore,
        pid: sandbox_pid,
        shm,
    }
}

/// Restores every container of the checkpoint into the sandbox. With `hold_network`,
/// the sandbox's loopback drops every packet until the last container is back, so
/// TCP peers inside the pod never see the other end missing.
fn restore_containers(
    tb: &Testbed,
    sandbox: &mut NewSandbox,
    ns_name: &str,
    manifest: &cryopod_node_agent::package::Manifest,
    objects: &std::collections::HashMap<String, Vec<u8>>,
    hold_network: bool,
) {
    let (dir, runc_root, cgroup, sandbox_pid, shm) = (
        sandbox.restore.dir.clone(),
        sandbox.restore.runc_root.clone(),
        sandbox.restore.cgroup.clone(),
        sandbox.pid,
        sandbox.shm.clone(),
    );
    let restore = &mut sandbox.restore;
    let iptables = |op: &str, chain: &str, dev: &str| {
        run_ok(std::process::Command::new("nsenter").args([
            "-t",
            &sandbox_pid.to_string(),
            "-n",
            "iptables",
            op,
            chain,
            dev,
            "lo",
            "-j",
            "DROP",
        ]));
    };
    if hold_network {
        iptables("-I", "INPUT", "-i");
        iptables("-I", "OUTPUT", "-o");
    }
    // Stock CRIU 4.2's mount engine cannot restore the host's named cgroup hierarchy
    // (mount-v2 "Failed to copy sharing"); its compatibility mode can.
    let criu_conf = dir.join("criu.conf");
    std::fs::write(&criu_conf, "mntns-compat-mode\n").unwrap();
    for c in &manifest.containers {
        let members = tar_members(&objects[&c.archive]);
        let bundle = dir.join(&c.name);
        let (rootfs, images) = (bundle.join("rootfs"), bundle.join("images"));
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::create_dir_all(&images).unwrap();
        unpack_image(&tb.dir.join("images/busybox.tar"), &rootfs);
        let mut spec: serde_json::Value = serde_json::Value::Null;
        for (path, body) in &members {
            if let Some(name) = path.strip_prefix("checkpoint/").filter(|n| !n.is_empty()) {
                std::fs::write(images.join(name), body).unwrap();
            } else if path == "spec.dump" {
                spec = serde_json::from_slice(body).unwrap();
            } else if path == "rootfs-diff.tar" {
                // Changes over the image: entries as they are, `.wh.` markers as deletions.
                let mut diff = tar::Archive::new(body.as_slice());
                diff.set_overwrite(true);
                for entry in diff.entries().unwrap() {
                    let mut entry = entry.unwrap();
                    let entry_path = entry.path().unwrap().into_owned();
                    match entry_path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_prefix(".wh."))
                    {
                        Some(deleted) => {
                            let _ = std::fs::remove_file(rootfs.join(&entry_path).with_file_name(deleted));
                        }
                        None => {
                            entry.unpack_in(&rootfs).unwrap();
                        }
                    }
                }
            }
        }

        // The container joins the new sandbox; its mounts point at the restored state.
        spec["root"] = json!({"path": rootfs, "readonly": false});
        spec["process"]["terminal"] = json!(false);
        for namespace in spec["linux"]["namespaces"].as_array_mut().unwrap() {
            if namespace.get("path").is_some() {
                let kind = match namespace["type"].as_str().unwrap() {
                    "network" => "net",
                    other => other,
                }
                .to_owned();
                namespace["path"] = json!(format!("/proc/{sandbox_pid}/ns/{kind}"));
            }
        }
        spec["linux"]["cgroupsPath"] = json!(format!("{cgroup}/{}", c.name));
        let scratch = bundle.join("mounts");
        for (i, mount) in spec["mounts"].as_array_mut().unwrap().iter_mut().enumerate() {
            if mount["type"] != "bind" {
                continue;
            }
            let (destination, source) = (
                mount["destination"].as_str().unwrap().to_owned(),
                mount["source"].as_str().unwrap().to_owned(),
            );
            let replacement = if destination == "/dev/shm" {
                shm.clone()
            } else if let Some((_, volume)) = source.split_once("kubernetes.io~empty-dir/") {
                dir.join("volumes").join(volume.trim_end_matches('/'))
            } else {
                let path = scratch.join(i.to_string());
                if std::path::Path::new(&source).is_dir() {
                    std::fs::create_dir_all(&path).unwrap();
                } else {
                    std::fs::create_dir_all(&scratch).unwrap();
                    std::fs::write(&path, b"").unwrap();
                }
                path
            };
            mount["source"] = json!(replacement);
        }
        spec["annotations"]["org.criu.config"] = json!(criu_conf);
        std::fs::write(bundle.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
        let id = format!("{}-{}", ns_name, c.name);
        let path = format!(
            "{}:{}",
            tb.node_packages.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = bundle.join("runc.log");
        let status = std::process::Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["restore", "--detach", "--tcp-established", "--image-path"])
            .arg(&images)
            .arg("--work-path")
            .arg(bundle.join("work"))
            .arg("--bundle")
            .arg(&bundle)
            .arg(&id)
            .env("PATH", path)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(bundle.join("runc.err")).unwrap())
            .status()
            .unwrap();
        let criu_log = std::fs::read_to_string(bundle.join("work/restore.log")).unwrap_or_default();
        assert!(
            status.success(),
            "restoring {} failed: {}\n{}",
            c.name,
            std::fs::read_to_string(bundle.join("runc.err")).unwrap_or_default(),
            cryopod_node_agent::dump::criu_log_excerpt(&criu_log)
        );
        restore.ids.push(id);
    }

    if hold_network {
        iptables("-D", "INPUT", "-i");
        iptables("-D", "OUTPUT", "-o");
    }
}

/// Checkpoint → plain runc restore into a new sandbox: the pod's containers continue
/// from where they were frozen, with /dev/shm, the emptyDir and their rootfs changes.
#[tokio::test]
async fn a_checkpoint_restores_with_runc_into_a_new_sandbox_and_continues() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-restore").await.unwrap();
    let node = tb.nodes[0].clone();
    let TrioCheckpoint {
        outcome, prefix, store, ..
    } = checkpoint_trio(&tb, &client, &ns, "restore").await;
    let objects = fetch_and_remove(&store, &prefix, &outcome.manifest).await;
    let mut sandbox = new_sandbox(&tb, &ns.name, &node, &outcome.manifest, &objects);
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
    restore_containers(&tb, &mut sandbox, &ns.name, &outcome.manifest, &objects, false);
    let rootfs_a = dir.join("a/rootfs");
    assert!(
        rootfs_a.join("tmp/marker").exists() && !rootfs_a.join("bin/true").exists(),
        "a's rootfs changes are applied"
    );

    // Every restored counter goes on from its checkpointed value: its first writes are
    // just above it (a counter started afresh would write 1, 2, ...).
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
    drop(sandbox);
}

/// Downloads every object of a checkpoint (decompressed) and removes them from the store.
async fn fetch_and_remove(
    store: &Arc<dyn object_store::ObjectStore>,
    prefix: &str,
    manifest: &cryopod_node_agent::package::Manifest,
) -> std::collections::HashMap<String, Vec<u8>> {
    use object_store::ObjectStoreExt;
    use object_store::path::Path as ObjectPath;
    let mut objects = std::collections::HashMap::new();
    for object in &manifest.objects {
        let key = ObjectPath::from(format!("{prefix}{}", object.key));
        objects.insert(
            object.key.clone(),
            unzstd(&store.get(&key).await.unwrap().bytes().await.unwrap()),
        );
        store.delete(&key).await.unwrap();
    }
    store
        .delete(&ObjectPath::from(format!("{prefix}manifest.json")))
        .await
        .unwrap();
    objects
}

/// The numbers the server heard, in order.
fn heard(path: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Two containers talking TCP over 127.0.0.1: after checkpoint and restore into a new
/// sandbox (its loopback held until both are back), the conversation goes on where it
/// was, without a reset or a new connection.
#[tokio::test]
async fn a_loopback_tcp_conversation_survives_checkpoint_and_restore() {
    use cryopod_node_agent::checkpoint::CheckpointRequest;
    use cryopod_node_agent::package::PodRef;

    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-tcp").await.unwrap();
    let node = tb.nodes[0].clone();
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "talkers", "labels": {"cryopod.io/e2e-pod": "talkers"}},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1, "restartPolicy": "Never",
            "volumes": [{"name": "data", "emptyDir": {}}],
            "containers": [
                {"name": "server", "image": BUSYBOX, "imagePullPolicy": "Never",
                 "command": ["sh", "-c", "sleep 1000000 | nc -l -p 9000 > /data/heard"],
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                {"name": "client", "image": BUSYBOX, "imagePullPolicy": "Never",
                 "command": ["sh", "-c", "until (i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done | nc 127.0.0.1 9000); do sleep 0.2; done"],
                 "readinessProbe": {"exec": {"command": ["sh", "-c", "test -s /data/heard"]}, "periodSeconds": 1},
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]}
            ]}
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
    let request = CheckpointRequest {
        operation_id: format!("tcp-{}", &pod_uid[..8]),
        pod: PodRef {
            namespace: ns.name.clone(),
            name: "talkers".into(),
            uid: pod_uid,
        },
        prefix: prefix.clone(),
        tcp_established: true,
        limits: LIMITS,
        hooks: vec![],
        after: cryopod_node_agent::checkpoint::AfterDump::Running,
        pod_ip_connections: cryopod_node_agent::checkpoint::PodIpPolicy::Close,
        seal: cryopod_node_agent::package::Seal::Clear,
    };
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
