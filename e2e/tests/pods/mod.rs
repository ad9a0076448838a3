//! Shared by the agent tests: the counting pods, the agent as a library and as a
//! process, and a plain runc restore into a new sandbox beside the cluster.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use cryopod_e2e::testbed::{TestNamespace, Testbed, wait_until};
pub use cryopod_e2e::tls::AgentTls;
use cryopod_node_agent::cgroup::{Freezer, V1Freezer};
use cryopod_node_agent::cri::CriClient;
use cryopod_node_agent::discovery::discover;
use cryopod_node_agent::freeze::FreezeLimits;
use cryopod_node_agent::journal::Journal;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
pub mod control;

pub const BUSYBOX: &str = "cryopod.local/busybox:e2e";
/// The trio pod's containers: `a`, `b` and `c` count; `d` mirrors the counter that
/// `a` keeps in the shared `/dev/shm`.
pub const NAMES: [&str; 4] = ["a", "b", "c", "d"];

/// The emptyDir `volume` of pod `uid` on `node`'s disk.
pub fn empty_dir(tb: &Testbed, node: &str, uid: &str, volume: &str) -> PathBuf {
    tb.dir
        .join(node)
        .join(format!("kubelet/pods/{uid}/volumes/kubernetes.io~empty-dir/{volume}"))
}

/// The emptyDir `data` of a scheduled pod, on its node's disk.
pub fn pod_data(tb: &Testbed, pod: &Pod) -> PathBuf {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap();
    empty_dir(tb, &node, &pod.metadata.uid.clone().unwrap(), "data")
}

pub fn cri_socket(tb: &Testbed, node: &str) -> PathBuf {
    tb.cri_socket(node)
}

/// What container `a` leaves in the shared `/dev/shm` before it starts counting.
pub const SHM_TOKEN: &str = "shared-memory-token";

/// Four containers sharing an emptyDir and `/dev/shm`. `a`, `b` and `c` count into the
/// emptyDir; `a` also keeps its count in `/dev/shm/a`, which `d` copies into the
/// emptyDir, so `d` counts only through the shared memory. Container `a` writes a
/// token into `/dev/shm`, replaces the image's `/tmp` (an opaque directory in its
/// rootfs diff) with one holding `/tmp/marker`, and deletes `/bin/true`.
pub fn counting_pod(node: &str) -> Pod {
    let containers: Vec<serde_json::Value> = NAMES
        .iter()
        .map(|n| {
            let script = match *n {
                "a" => format!(
                    "echo {SHM_TOKEN} > /dev/shm/token && rm -rf /tmp && mkdir /tmp && echo marker > /tmp/marker && rm /bin/true && \
                     i=0; while :; do i=$((i+1)); echo $i > /data/a.tmp && mv /data/a.tmp /data/a; echo $i > /dev/shm/a.tmp && mv /dev/shm/a.tmp /dev/shm/a; sleep 0.05; done"
                ),
                "d" => "while :; do cat /dev/shm/a > /data/d.tmp 2>/dev/null && mv /data/d.tmp /data/d; sleep 0.05; done".to_owned(),
                n => format!("i=0; while :; do i=$((i+1)); echo $i > /data/{n}.tmp && mv /data/{n}.tmp /data/{n}; sleep 0.05; done"),
            };
            json!({"name": n, "image": BUSYBOX, "imagePullPolicy": "Never",
                   "command": ["sh", "-c", script],
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
pub fn counts(dir: &std::path::Path) -> Vec<u64> {
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
pub struct Trio {
    pub data: PathBuf,
    pub runtime: cryopod_node_agent::discovery::PodRuntime,
}

/// Starts the counting pod on `node`, waits until every counter counts, discovers it.
pub async fn start_trio(tb: &Testbed, client: &kube::Client, ns: &TestNamespace, node: &str) -> Trio {
    start_counting(tb, client, ns, counting_pod(node)).await
}

/// Starts a variant of the counting pod (named `trio`), waits until every counter
/// counts, discovers it.
pub async fn start_counting(tb: &Testbed, client: &kube::Client, ns: &TestNamespace, pod: Pod) -> Trio {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap();
    let node = node.as_str();
    ns.pods(client).create(&PostParams::default(), &pod).await.unwrap();
    let pod = ns.wait_ready(client, "trio", Duration::from_secs(90)).await.unwrap();
    let uid = pod.metadata.uid.clone().unwrap();
    let data = empty_dir(tb, node, &uid, "data");
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
pub fn freeze_tools() -> (Arc<dyn Freezer>, tempfile::TempDir, Journal) {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path()).unwrap();
    (Arc::new(V1Freezer::new("/sys/fs/cgroup/freezer")), dir, journal)
}

pub const LIMITS: FreezeLimits = FreezeLimits {
    max_freeze: Duration::from_secs(60),
    settle: Duration::from_secs(5),
};

/// Every counter moves past `then`, and the pod stayed Ready without restarts.
pub async fn assert_counting_on(ns: &TestNamespace, client: &kube::Client, data: &std::path::Path, then: &[u64]) {
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

/// Node commands run in the mount namespace of the node's containerd, as the chart
/// configures the agent.
pub fn node_exec(tb: &Testbed, node: &str) -> cryopod_node_agent::dump::NodeExec {
    cryopod_node_agent::dump::NodeExec::in_runtime_mount_ns(tb.cri_socket(node), vec![tb.node_packages.join("bin")])
}

/// The chart's default `agent.nodeExec`.
pub const NODE_EXEC: &str = cryopod_node_agent::dump::RUNTIME_NODE_EXEC;

/// The agent library on `node`, talking to its containerd, with a fresh journal (kept
/// in the returned directory).
pub async fn library_agent(
    tb: &Testbed,
    node: &str,
) -> (cryopod_node_agent::checkpoint::NodeAgent<CriClient>, tempfile::TempDir) {
    let (freezer, journal_dir, journal) = freeze_tools();
    let cri = CriClient::connect(&cri_socket(tb, node)).await.unwrap();
    (node_agent(tb, node, cri, journal, freezer), journal_dir)
}

/// The two containers of a loopback TCP conversation: `client` sends 1, 2, 3, ... over
/// 127.0.0.1 to `server`, which writes what it hears to `/data/heard`.
pub fn talkers() -> [serde_json::Value; 2] {
    [
        json!({"name": "server", "image": BUSYBOX, "imagePullPolicy": "Never",
               "command": ["sh", "-c", "sleep 1000000 | nc -l -p 9000 > /data/heard"],
               "volumeMounts": [{"name": "data", "mountPath": "/data"}]}),
        json!({"name": "client", "image": BUSYBOX, "imagePullPolicy": "Never",
               "command": ["sh", "-c", "until (i=0; while :; do i=$((i+1)); echo $i; sleep 0.1; done | nc 127.0.0.1 9000); do sleep 0.2; done"],
               "readinessProbe": {"exec": {"command": ["sh", "-c", "test -s /data/heard"]}, "periodSeconds": 1},
               "volumeMounts": [{"name": "data", "mountPath": "/data"}]}),
    ]
}

/// The signing key of every agent of the tests, in process or not ([`AgentTls`]).
pub fn manifest_key() -> cryopod_node_agent::signing::ManifestKey {
    cryopod_node_agent::signing::ManifestKey::new(cryopod_e2e::tls::MANIFEST_KEY).unwrap()
}

pub fn node_agent(
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
        restores: tb.dir.join(node).join("cryopod/restores"),
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
        manifest_key: manifest_key(),
    }
}

/// A running-after checkpoint of the trio pod, keeping TCP connections.
pub fn trio_request(
    ns: &TestNamespace,
    pod_uid: &str,
    operation_id: String,
    prefix: String,
) -> cryopod_node_agent::checkpoint::CheckpointRequest {
    pod_request(ns, "trio", pod_uid, operation_id, prefix)
}

/// A running-after checkpoint of pod `name`, keeping TCP connections, no hooks, in
/// the clear.
pub fn pod_request(
    ns: &TestNamespace,
    name: &str,
    pod_uid: &str,
    operation_id: String,
    prefix: String,
) -> cryopod_node_agent::checkpoint::CheckpointRequest {
    cryopod_node_agent::checkpoint::CheckpointRequest {
        operation_id,
        pod: cryopod_node_agent::package::PodRef {
            namespace: ns.name.clone(),
            name: name.into(),
            uid: pod_uid.to_owned(),
        },
        prefix,
        tcp_established: true,
        limits: LIMITS,
        hooks: vec![],
        after: cryopod_node_agent::checkpoint::AfterDump::Running,
        pod_ip_connections: cryopod_node_agent::checkpoint::PodIpPolicy::Close,
        seal: cryopod_node_agent::package::Seal::Clear,
        zstd_level: cryopod_node_agent::package::DEFAULT_ZSTD_LEVEL,
        local_root: None,
        pod_template: None,
    }
}

pub fn unzstd(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut zstd::Decoder::new(bytes).unwrap(), &mut out).unwrap();
    out
}

/// The members of a tar: path and contents.
pub fn tar_members(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
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
pub struct TrioCheckpoint {
    pub trio: Trio,
    pub outcome: cryopod_node_agent::checkpoint::CheckpointOutcome,
    pub stages: Vec<cryopod_node_agent::checkpoint::Stage>,
    pub prefix: String,
    pub store: Arc<dyn object_store::ObjectStore>,
    pub at_start: Vec<u64>,
}

/// Starts the trio pod in `ns` on the first node and checkpoints it.
pub async fn checkpoint_trio(tb: &Testbed, client: &kube::Client, ns: &TestNamespace, op: &str) -> TrioCheckpoint {
    checkpoint_counting(tb, client, ns, op, counting_pod(&tb.nodes[0])).await
}

/// Starts a variant of the counting pod on its node and checkpoints it.
pub async fn checkpoint_counting(
    tb: &Testbed,
    client: &kube::Client,
    ns: &TestNamespace,
    op: &str,
    pod: Pod,
) -> TrioCheckpoint {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap();
    let trio = start_counting(tb, client, ns, pod).await;
    let store = tb.s3_store(&tb.s3.endpoint, &tb.s3.secret_key).unwrap();
    let (agent, _journal_dir) = library_agent(tb, &node).await;
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

/// A gRPC client of an agent.
pub type AgentClient = cryopod_node_agent::server::pb::node_agent_client::NodeAgentClient<tonic::transport::Channel>;

/// The agent binary, killed when the test ends.
pub struct AgentProcess {
    /// The process.
    pub child: std::process::Child,
    /// Its metrics port on the loopback.
    pub metrics_port: u16,
    /// Its log (stderr: JSON lines).
    pub log: PathBuf,
    /// Its gRPC port on the loopback.
    pub port: u16,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// TLS material of one test.
pub fn agent_tls() -> AgentTls {
    cryopod_e2e::tls::agent_tls().unwrap()
}

/// Starts the agent binary for `node` on a loopback port and connects to it over mTLS.
pub async fn start_agent(
    tb: &Testbed,
    node: &str,
    tls: &AgentTls,
    state: &std::path::Path,
) -> (AgentProcess, AgentClient) {
    start_agent_with(tb, node, tls, state, &[]).await
}

/// [`start_agent`] with these environment variables set over the usual ones.
pub async fn start_agent_with(
    tb: &Testbed,
    node: &str,
    tls: &AgentTls,
    state: &std::path::Path,
    env: &[(&str, &str)],
) -> (AgentProcess, AgentClient) {
    start_agent_at(tb, node, tls, state, env, free_port()).await
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// [`start_agent_with`] on this gRPC port: an agent started again where the
/// operator knows it.
pub async fn start_agent_at(
    tb: &Testbed,
    node: &str,
    tls: &AgentTls,
    state: &std::path::Path,
    env: &[(&str, &str)],
    port: u16,
) -> (AgentProcess, AgentClient) {
    start_agent_wrapped(tb, node, tls, state, env, port, &[]).await
}

/// [`start_agent_at`], run under the words of `wrap` (e.g. `nsenter` into the node's
/// mount namespace; they exec the agent, so its PID is the child's).
pub async fn start_agent_wrapped(
    tb: &Testbed,
    node: &str,
    tls: &AgentTls,
    state: &std::path::Path,
    env: &[(&str, &str)],
    port: u16,
    wrap: &[String],
) -> (AgentProcess, AgentClient) {
    let agent_bin = std::env::var("CRYOPOD_AGENT_BIN").expect("CRYOPOD_AGENT_BIN is set by e2e/run.sh");
    let mut command = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = std::process::Command::new(first);
            c.args(rest).arg(&agent_bin);
            c
        }
        None => std::process::Command::new(&agent_bin),
    };
    // A port freed a moment ago can come back at once: never the gRPC port.
    let metrics_port = std::iter::repeat_with(free_port).find(|p| *p != port).unwrap();
    std::fs::create_dir_all(state).unwrap();
    let log = state.join(format!("agent-{port}.log"));
    let process = AgentProcess {
        child: command
            .env("CRYOPOD_NODE_NAME", node)
            .env("CRYOPOD_LISTEN", format!("127.0.0.1:{port}"))
            .env("CRYOPOD_TLS_DIR", tls.dir.path())
            .env(
                "CRYOPOD_MANIFEST_KEY_FILE",
                tls.dir.path().join(cryopod_e2e::tls::MANIFEST_KEY_FILE),
            )
            .env("CRYOPOD_CRI_SOCKET", cri_socket(tb, node))
            .env("CRYOPOD_CGROUP", "v1:/sys/fs/cgroup/freezer")
            .env("CRYOPOD_STATE_DIR", state)
            .env("CRYOPOD_NODE_EXEC", NODE_EXEC)
            .env("CRYOPOD_CRIU_DIR", tb.node_packages.join("bin"))
            .env("CRYOPOD_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
            .envs(env.iter().copied())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
        metrics_port,
        log,
        port,
    };
    let client = connect_agent(tls, port, Duration::from_secs(30)).await.unwrap();
    (process, client)
}

/// A client of the agent at the loopback's `port`, once it serves mutual TLS.
pub async fn connect_agent(
    tls: &AgentTls,
    port: u16,
    within: Duration,
) -> Result<
    cryopod_node_agent::server::pb::node_agent_client::NodeAgentClient<tonic::transport::Channel>,
    cryopod_e2e::testbed::HarnessError,
> {
    use cryopod_node_agent::server::pb::node_agent_client::NodeAgentClient;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&tls.ca))
        .identity(tls.client.clone())
        .domain_name("localhost");
    let url = format!("https://localhost:{port}");
    wait_until("the agent to serve", within, || async {
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
}

/// What the operator would send for the trio pod, storing into the testbed's S3 server.
/// The testbed's S3 server, as the operator would send it to an agent.
pub fn s3_storage(tb: &Testbed) -> cryopod_node_agent::server::pb::Storage {
    use cryopod_node_agent::server::pb;
    pb::Storage {
        backend: Some(pb::storage::Backend::S3(pb::S3Storage {
            endpoint: tb.s3.endpoint.clone(),
            bucket: tb.s3.bucket.clone(),
            region: "us-east-1".into(),
            force_path_style: true,
            access_key_id: tb.s3.access_key.clone(),
            secret_access_key: tb.s3.secret_key.clone(),
        })),
    }
}

pub fn grpc_request(
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
        storage: Some(s3_storage(tb)),
        prefix: prefix.to_owned(),
        tcp_established: true,
        max_freeze_seconds: 30,
        ..Default::default()
    }
}

/// Restored containers and their sandbox, run by runc outside Kubernetes; removed
/// (processes, runc state, cgroups, files) when dropped.
pub struct PlainRestore {
    pub runc_root: PathBuf,
    pub ids: Vec<String>,
    pub cgroup: String,
    pub dir: PathBuf,
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
pub fn run_detached(cmd: &mut std::process::Command, log: &std::path::Path) {
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

pub fn run_ok(cmd: &mut std::process::Command) -> String {
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
pub fn unpack_image(archive: &std::path::Path, rootfs: &std::path::Path) {
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
pub struct NewSandbox {
    pub restore: PlainRestore,
    pub pid: u64,
    pub shm: PathBuf,
}

pub fn new_sandbox(
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
pub fn restore_containers(
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
    let mut shared_pids = None;
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
                    let name = entry_path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                    if name == cryopod_node_agent::capture::OPAQUE_MARKER {
                        // The directory holds only what the diff brings: empty it.
                        let dir = rootfs.join(entry_path.parent().unwrap());
                        for old in std::fs::read_dir(&dir).unwrap().flatten() {
                            let _ = std::fs::remove_dir_all(old.path()).or_else(|_| std::fs::remove_file(old.path()));
                        }
                        continue;
                    }
                    match name.strip_prefix(".wh.") {
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
        // Sharing the sandbox's PID namespace, the containers are restored stopped and
        // continued together, as the runtime handler does.
        shared_pids = cryopod_node_agent::handler::joined_pid_namespace(&spec);
        if shared_pids.is_some() {
            std::fs::write(&criu_conf, "mntns-compat-mode\nleave-stopped\n").unwrap();
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
    if let Some(pid_ns) = shared_pids {
        // Until then every restored process is stopped: none could take a PID that a
        // later container's process needed.
        let target = std::fs::read_link(&pid_ns).unwrap();
        let running: Vec<String> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|p| p != sandbox_pid)
            })
            .filter(|e| std::fs::read_link(e.path().join("ns/pid")).is_ok_and(|l| l == target))
            .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
            .filter(|stat| {
                let state = stat
                    .rsplit_once(") ")
                    .map(|(_, rest)| rest.chars().next())
                    .unwrap_or_default();
                !matches!(state, Some('T' | 't' | 'Z'))
            })
            .collect();
        assert!(
            running.is_empty(),
            "restored processes ran before the last container was back: {running:?}"
        );
        assert!(cryopod_node_agent::handler::continue_pid_namespace(&pid_ns).unwrap() > 0);
    }

    if hold_network {
        iptables("-D", "INPUT", "-i");
        iptables("-D", "OUTPUT", "-o");
    }
}

/// Downloads every object of a checkpoint (decompressed) and removes them from the store.
pub async fn fetch_and_remove(
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
/// GET /metrics from an agent on the loopback.
pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    socket.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    reply
}

pub fn heard(path: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// An init container that leaves a line in the emptyDir, then five containers
/// (`locker` holds a flock on `/data/lock` and says so in `/data/locker`): `a` counts in memory into the emptyDir and `/dev/shm`; `d` copies
/// a's count from `/dev/shm`; `client` sends numbers over 127.0.0.1 to `server`,
/// which writes what it hears into the emptyDir. `a` also says what it counts on stdout.
pub fn stateful_pod(node: &str) -> Pod {
    let counter = format!(
        "echo {SHM_TOKEN} > /dev/shm/token; i=0; while :; do i=$((i+1)); echo $i > /data/a.tmp && mv /data/a.tmp /data/a; \
         echo $i > /dev/shm/a.tmp && mv /dev/shm/a.tmp /dev/shm/a; [ $((i % 20)) = 0 ] && echo counted $i; sleep 0.05; done"
    );
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "stateful", "labels": {"cryopod.io/e2e-pod": "stateful"}},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
            "volumes": [{"name": "data", "emptyDir": {}}],
            "initContainers": [
                {"name": "init", "image": BUSYBOX, "imagePullPolicy": "Never",
                 "command": ["sh", "-c", "echo ran >> /data/init-ran"],
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]}
            ],
            "containers": [
                {"name": "a", "image": BUSYBOX, "imagePullPolicy": "Never", "command": ["sh", "-c", counter],
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                {"name": "d", "image": BUSYBOX, "imagePullPolicy": "Never",
                 "command": ["sh", "-c", "while :; do cat /dev/shm/a > /data/d.tmp 2>/dev/null && mv /data/d.tmp /data/d; sleep 0.05; done"],
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                talkers()[0], talkers()[1],
                {"name": "locker", "image": BUSYBOX, "imagePullPolicy": "Never",
                 "command": ["/bin/lock-holder", "/data/lock", "/data/locker"],
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]}
            ]}
    }))
    .unwrap()
}

/// An age key pair made by the stock `age-keygen`, in a directory of its own.
pub struct AgeKeys {
    /// Holds the identity file; the tests put more files here.
    pub dir: tempfile::TempDir,
    /// The identity (private key) file.
    pub identity: PathBuf,
    /// The recipient (public key).
    pub public: String,
}

pub fn age_keys() -> AgeKeys {
    let dir = tempfile::tempdir().unwrap();
    let identity = dir.path().join("identity.txt");
    let keygen = std::process::Command::new("age-keygen")
        .arg("-o")
        .arg(&identity)
        .output()
        .expect("age-keygen (installed by hack/ensure-node-packages.sh)");
    assert!(keygen.status.success(), "{keygen:?}");
    let public = String::from_utf8_lossy(&keygen.stderr)
        .trim()
        .trim_start_matches("Public key: ")
        .to_owned();
    AgeKeys { dir, identity, public }
}

/// An agent binary running in a VM node (a transient systemd unit there), reached from
/// the host's loopback through a forwarder; stopped when dropped.
pub struct VmAgent {
    /// The forwarded port on the host's loopback: what the operator is told.
    pub port: u16,
    /// Its log (stderr, JSON lines), on the host side of the share.
    pub log: PathBuf,
    unit: String,
    vm: cryopod_e2e::vm::VmNode,
    _forward: cryopod_e2e::vm::Forward,
}

impl Drop for VmAgent {
    fn drop(&mut self) {
        // Queued for the guest; a test's end need not wait for it.
        let script = format!(
            "systemctl stop {0}; systemctl reset-failed {0} 2>/dev/null; true",
            self.unit
        );
        let _ = std::fs::write(self.vm.share.join("req").join(format!("stop-{}.sh", self.unit)), script);
    }
}

/// Starts the agent (the static build that up.sh put in the guest) on `vm` with this
/// test's TLS material, its state in the guest's /var/lib/cryopod (where the node's
/// runtime handler reads restores), and waits until it serves.
pub async fn start_vm_agent(vm: &cryopod_e2e::vm::VmNode, tls: &AgentTls, env: &[(&str, &str)]) -> VmAgent {
    let port = free_port();
    let guest_port = port;
    let unit = format!("cryopod-agent-{port}");
    let (host_dir, guest_dir) = vm.share_dir(&unit).unwrap();
    for name in ["ca.crt", "tls.crt", "tls.key", cryopod_e2e::tls::MANIFEST_KEY_FILE] {
        std::fs::copy(tls.dir.path().join(name), host_dir.join(name)).unwrap();
    }
    let mut setenv = vec![
        ("CRYOPOD_NODE_NAME".to_owned(), vm.name.clone()),
        ("CRYOPOD_LISTEN".to_owned(), format!("{}:{guest_port}", vm.ip)),
        ("CRYOPOD_TLS_DIR".to_owned(), guest_dir.display().to_string()),
        (
            "CRYOPOD_MANIFEST_KEY_FILE".to_owned(),
            guest_dir
                .join(cryopod_e2e::tls::MANIFEST_KEY_FILE)
                .display()
                .to_string(),
        ),
        ("CRYOPOD_CRIU_DIR".to_owned(), "/usr/sbin".to_owned()),
        ("CRYOPOD_METRICS_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("RUST_LOG".to_owned(), "info".to_owned()),
    ];
    setenv.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let setenv: String = setenv.iter().map(|(k, v)| format!(" --setenv={k}={v}")).collect();
    vm.run(&format!(
        "systemd-run --unit={unit} --property=StandardError=file:{guest}/agent.log{setenv} /opt/cryopod/bin/cryopod-node-agent",
        guest = guest_dir.display()
    ))
    .await
    .unwrap();
    let forward = cryopod_e2e::vm::Forward::start(port, &vm.ip, guest_port).unwrap();
    let agent = VmAgent {
        port,
        log: host_dir.join("agent.log"),
        unit,
        vm: vm.clone(),
        _forward: forward,
    };
    connect_agent(tls, port, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{e}; log: {}", std::fs::read_to_string(&agent.log).unwrap_or_default()));
    agent
}
