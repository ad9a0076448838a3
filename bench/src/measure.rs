//! The measurements, on the local cluster, through the node agent's library as the
//! agent binary runs it. Each repeat takes cryopod's figure and its baseline from the
//! same pod, one right after the other.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryopod_e2e::testbed::{TestNamespace, Testbed, wait_until};
use cryopod_node_agent::cgroup::V1Freezer;
use cryopod_node_agent::checkpoint::{AfterDump, CheckpointRequest, NodeAgent, PodIpPolicy};
use cryopod_node_agent::cri::CriClient;
use cryopod_node_agent::discovery::{PodRuntime, discover};
use cryopod_node_agent::dump::{DumpOptions, NodeExec, dump_containers};
use cryopod_node_agent::freeze::FreezeLimits;
use cryopod_node_agent::journal::Journal;
use cryopod_node_agent::package::{NodeFacts, PodRef, Seal};
use cryopod_node_agent::restore::{RestoreRequest, prepare_restore};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams, PostParams};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

/// The test image with the workload binaries (e2e/cluster/images.sh).
const IMAGE: &str = "cryopod.local/busybox:e2e";

/// One repeat's figures, in milliseconds and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// Raw CRIU dumps of the pod's containers through runc, in parallel.
    pub raw_dump_ms: f64,
    /// Bytes of those raw images.
    pub raw_bytes: f64,
    /// A plain upload of the raw images to the S3 server.
    pub upload_ms: f64,
    /// cryopod's freeze window.
    pub freeze_ms: f64,
    /// cryopod's whole checkpoint, stored and verified.
    pub checkpoint_ms: f64,
    /// Bytes cryopod stored.
    pub stored_bytes: f64,
    /// Preparing the restore on the other node: fetch, verify, unpack.
    pub prepare_ms: f64,
    /// Fetching the same objects, nothing else.
    pub fetch_ms: f64,
}

/// What went wrong, as a sentence.
pub type Failure = String;

/// The node agent library on a node of the testbed, as the agent binary configures it.
#[allow(missing_debug_implementations)]
pub struct Agent {
    pub node: String,
    pub agent: NodeAgent<CriClient>,
    pub facts: NodeFacts,
    pub restores: PathBuf,
}

/// CRIU's version from the testbed's packages.
/// The signing key the benchmark's agents share.
pub fn manifest_key() -> Result<cryopod_node_agent::signing::ManifestKey, Failure> {
    cryopod_node_agent::signing::ManifestKey::new(cryopod_e2e::tls::MANIFEST_KEY)
        .ok_or_else(|| "the e2e manifest key is too short".to_owned())
}

pub fn criu_version(tb: &Testbed) -> String {
    std::process::Command::new(tb.node_packages.join("bin/criu"))
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("Version:").map(|v| v.trim().to_owned()))
        })
        .unwrap_or_default()
}

impl Agent {
    /// The agent library on `node`, its work space under `work`.
    pub async fn on(tb: &Testbed, node: &str, work: &Path) -> Result<Self, Failure> {
        let socket = tb.cri_socket(node);
        let runtime = CriClient::connect(&socket)
            .await
            .map_err(|e| format!("containerd of {node}: {e}"))?;
        let journal = Journal::open(work.join("journal")).map_err(|e| format!("journal: {e}"))?;
        let facts = NodeFacts {
            name: node.to_owned(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            criu_version: criu_version(tb),
            cgroup_version: "V1".to_owned(),
            cpu_flags: vec![],
        };
        let restores = tb.dir.join(node).join("cryopod/restores");
        Ok(Self {
            node: node.to_owned(),
            agent: NodeAgent {
                runtime,
                freezer: Arc::new(V1Freezer::new("/sys/fs/cgroup/freezer")),
                journal,
                exec: NodeExec::in_runtime_mount_ns(socket, vec![tb.node_packages.join("bin")]),
                work_dir: work.join("agent"),
                restores: restores.clone(),
                node: facts.clone(),
                manifest_key: manifest_key()?,
            },
            facts,
            restores,
        })
    }
}

/// A pod of two containers on `node`, each keeping `mib_each` MiB dirty.
pub fn memory_pod(name: &str, node: &str, mib_each: u64) -> Result<Pod, Failure> {
    let container = |n: &str| {
        serde_json::json!({"name": n, "image": IMAGE, "imagePullPolicy": "Never",
                           "command": ["/bin/memory-dirtier", mib_each.to_string()]})
    };
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"cryopod.io/e2e-pod": name}},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                 "containers": [container("a"), container("b")]}
    }))
    .map_err(|e| format!("pod {name}: {e}"))
}

/// Starts the pod and waits until both containers have filled their memory.
async fn start_pod(
    client: &kube::Client,
    ns: &TestNamespace,
    pod: &Pod,
    runtime: &CriClient,
) -> Result<PodRuntime, Failure> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let pods: Api<Pod> = ns.pods(client);
    pods.create(&PostParams::default(), pod)
        .await
        .map_err(|e| format!("create pod {name}: {e}"))?;
    let ready = ns
        .wait_ready(client, &name, Duration::from_secs(120))
        .await
        .map_err(|e| e.to_string())?;
    wait_filled(&pods, &name).await?;
    discover(runtime, &ready.metadata.uid.unwrap_or_default())
        .await
        .map_err(|e| format!("discover {name}: {e}"))
}

/// Waits until both containers of the pod have filled their memory.
pub async fn wait_filled(pods: &Api<Pod>, name: &str) -> Result<(), Failure> {
    for container in ["a", "b"] {
        let params = LogParams {
            container: Some(container.to_owned()),
            ..LogParams::default()
        };
        wait_until(
            &format!("{name}/{container} to fill its memory"),
            Duration::from_secs(300),
            || async { pods.logs(name, &params).await.ok()?.contains("filled").then_some(()) },
        )
        .await
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(t) if t.is_file() => files.push(path),
                _ => {}
            }
        }
    }
    files
}

fn bytes_under(dir: &Path) -> u64 {
    files_under(dir)
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum()
}

/// Uploads every file under `dir` as it is, one after the other (as cryopod stores
/// its objects), with multipart uploads.
async fn plain_upload(store: &Arc<dyn ObjectStore>, dir: &Path, prefix: &str) -> Result<(), Failure> {
    for file in files_under(dir) {
        let key = format!("{prefix}{}", file.strip_prefix(dir).unwrap_or(&file).display());
        upload(store, &file, key).await?;
    }
    Ok(())
}

/// Uploads one file as it is, to `prefix` and its file name.
pub async fn plain_upload_file(store: &Arc<dyn ObjectStore>, file: &Path, prefix: &str) -> Result<(), Failure> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    upload(store, file, format!("{prefix}{name}")).await
}

async fn upload(store: &Arc<dyn ObjectStore>, file: &Path, key: String) -> Result<(), Failure> {
    let mut writer = object_store::buffered::BufWriter::new(store.clone(), ObjectPath::from(key));
    let mut reader = tokio::fs::File::open(file)
        .await
        .map_err(|e| format!("{}: {e}", file.display()))?;
    tokio::io::copy(&mut reader, &mut writer)
        .await
        .map_err(|e| format!("plain upload: {e}"))?;
    tokio::io::AsyncWriteExt::shutdown(&mut writer)
        .await
        .map_err(|e| format!("plain upload: {e}"))
}

/// Reads every object under `prefix`, one after the other.
async fn plain_fetch(store: &Arc<dyn ObjectStore>, prefix: &str) -> Result<u64, Failure> {
    let objects: Vec<_> = store
        .list(Some(&ObjectPath::from(prefix)))
        .try_collect()
        .await
        .map_err(|e| format!("list {prefix}: {e}"))?;
    let mut total = 0;
    for object in objects {
        let mut body = store
            .get(&object.location)
            .await
            .map_err(|e| format!("get {}: {e}", object.location))?
            .into_stream();
        while let Some(chunk) = body.next().await {
            total += chunk.map_err(|e| format!("read {}: {e}", object.location))?.len() as u64;
        }
    }
    Ok(total)
}

async fn delete_under(store: &Arc<dyn ObjectStore>, prefix: &str) {
    let _ = cryopod_node_agent::store::delete_prefix(store, prefix).await;
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Where the bench runs: the cluster, the agents of the source and target nodes, the
/// S3 server, a work directory.
#[allow(missing_debug_implementations)]
pub struct Bench {
    pub tb: Testbed,
    pub client: kube::Client,
    pub source: Agent,
    pub target: Agent,
    pub store: Arc<dyn ObjectStore>,
    pub work: PathBuf,
}

/// Measures one pod size: `mib` MiB of dirty memory over two containers, `repeats` times.
pub async fn pod_size(bench: &Bench, mib: u64, repeats: usize) -> Result<Vec<Sample>, Failure> {
    let Bench {
        tb,
        client,
        source,
        target,
        store,
        work,
    } = bench;
    let ns = TestNamespace::create(tb, client, &format!("bench-{mib}"))
        .await
        .map_err(|e| e.to_string())?;
    let pod = memory_pod(&format!("mem-{mib}"), &source.node, mib / 2)?;
    let runtime = start_pod(client, &ns, &pod, &source.agent.runtime).await?;
    let pod_ref = PodRef {
        namespace: ns.name.clone(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod_uid(client, &ns, &pod.metadata.name.clone().unwrap_or_default()).await?,
    };
    // A first dump of a process is slower than the next ones (seen here: about 3× at
    // 2 GiB, whichever of the two came first): one unmeasured dump warms up both.
    let warm = work.join(format!("warm-{mib}"));
    raw_dump(source, &runtime, &warm).await?;
    let _ = std::fs::remove_dir_all(&warm);
    let mut samples = Vec::new();
    for repeat in 0..repeats {
        let mut sample = Sample::default();

        // Baseline and cryopod one right after the other, in turns, so that neither
        // always runs first (page cache, allocator state).
        let prefix = format!("bench/{}/checkpoint-{repeat}/", ns.name);
        let request = CheckpointRequest {
            operation_id: format!("bench-{mib}-{repeat}-{}", ns.name),
            pod: pod_ref.clone(),
            prefix: prefix.clone(),
            tcp_established: true,
            limits: FreezeLimits {
                max_freeze: Duration::from_secs(600),
                settle: Duration::from_secs(5),
            },
            hooks: vec![],
            after: AfterDump::Running,
            pod_ip_connections: PodIpPolicy::Close,
            seal: Seal::Clear,
            zstd_level: cryopod_node_agent::package::DEFAULT_ZSTD_LEVEL,
            local_root: None,
            pod_template: None,
        };
        let raw = work.join(format!("raw-{mib}-{repeat}"));
        let raw_prefix = format!("bench/{}/raw-{repeat}/", ns.name);
        let outcome = if repeat % 2 == 0 {
            settle_disk();
            baseline(source, &runtime, store, &raw, &raw_prefix, &mut sample).await?;
            settle_disk();
            ours(source, store, &request, &mut sample).await?
        } else {
            settle_disk();
            let outcome = ours(source, store, &request, &mut sample).await?;
            settle_disk();
            baseline(source, &runtime, store, &raw, &raw_prefix, &mut sample).await?;
            outcome
        };

        // The restore's preparation on the other node, against a plain fetch.
        settle_disk();
        let started = Instant::now();
        plain_fetch(store, &prefix).await?;
        sample.fetch_ms = ms(started.elapsed());
        let restore = RestoreRequest {
            restore_id: format!("bench-{mib}-{repeat}-{}", ns.name),
            prefix: prefix.clone(),
            manifest_digest: Some(outcome.manifest_digest.clone()),
            identities: vec![],
            // Prepared and removed again: no pod uses it.
            restored_pod: cryopod_node_agent::handler::RestoredPod {
                namespace: ns.name.clone(),
                name: "bench-restored".into(),
                start_stopped: false,
            },
        };
        settle_disk();
        let started = Instant::now();
        let prepared = prepare_restore(
            store,
            &restore,
            &target.facts,
            &target.restores,
            &target.agent.manifest_key,
        )
        .await
        .map_err(|e| format!("prepare the restore: {e}"))?;
        sample.prepare_ms = ms(started.elapsed());
        let _ = std::fs::remove_dir_all(&prepared.dir);
        delete_under(store, &prefix).await;
        println!(
            "  {mib} MiB #{}: raw dump {:.0} ms, freeze {:.0} ms, upload {:.0} ms, checkpoint {:.0} ms, \
             {:.0} MiB raw -> {:.0} MiB stored, fetch {:.0} ms, prepare {:.0} ms",
            repeat + 1,
            sample.raw_dump_ms,
            sample.freeze_ms,
            sample.upload_ms,
            sample.checkpoint_ms,
            sample.raw_bytes / 1048576.0,
            sample.stored_bytes / 1048576.0,
            sample.fetch_ms,
            sample.prepare_ms
        );
        samples.push(sample);
    }
    Ok(samples)
}

/// Writes back every dirty page (`sync`), so that no measured step pays for the disk
/// writes of the one before (gigabytes of dumps and stored objects).
pub fn settle_disk() {
    let _ = std::process::Command::new("sync").status();
}

/// The baselines: raw CRIU dumps of the containers through runc, in parallel,
/// leaving them running; then a plain upload of their images.
async fn baseline(
    source: &Agent,
    runtime: &PodRuntime,
    store: &Arc<dyn ObjectStore>,
    raw: &Path,
    raw_prefix: &str,
    sample: &mut Sample,
) -> Result<(), Failure> {
    sample.raw_dump_ms = raw_dump(source, runtime, raw).await?;
    sample.raw_bytes = bytes_under(raw) as f64;
    let started = Instant::now();
    plain_upload(store, raw, raw_prefix).await?;
    sample.upload_ms = ms(started.elapsed());
    delete_under(store, raw_prefix).await;
    let _ = std::fs::remove_dir_all(raw);
    Ok(())
}

/// Raw CRIU dumps of the pod's containers into `dir`, through runc, in parallel,
/// leaving them running; how long they took, in milliseconds.
async fn raw_dump(source: &Agent, runtime: &PodRuntime, dir: &Path) -> Result<f64, Failure> {
    let options = DumpOptions {
        leave_running: true,
        tcp_established: true,
        file_locks: true,
    };
    let started = Instant::now();
    dump_containers(
        &source.agent.exec,
        &runtime.runc_binary,
        &runtime.runc_root,
        &runtime.containers,
        dir,
        options,
        Duration::from_secs(900),
    )
    .await
    .map_err(|e| format!("raw dump: {e}"))?;
    Ok(ms(started.elapsed()))
}

/// cryopod: the pod frozen at one instant, dumped, thawed, stored and verified.
async fn ours(
    source: &Agent,
    store: &Arc<dyn ObjectStore>,
    request: &CheckpointRequest,
    sample: &mut Sample,
) -> Result<cryopod_node_agent::checkpoint::CheckpointOutcome, Failure> {
    let started = Instant::now();
    let outcome = source
        .agent
        .checkpoint(request, store.clone(), &|_| {})
        .await
        .map_err(|e| format!("checkpoint: {e}"))?;
    sample.checkpoint_ms = ms(started.elapsed());
    sample.freeze_ms = ms(outcome.freeze.window);
    sample.stored_bytes = outcome.stored_bytes() as f64;
    Ok(outcome)
}

async fn pod_uid(client: &kube::Client, ns: &TestNamespace, name: &str) -> Result<String, Failure> {
    ns.pods(client)
        .get(name)
        .await
        .map_err(|e| format!("read pod {name}: {e}"))?
        .metadata
        .uid
        .ok_or_else(|| format!("pod {name} has no UID"))
}
