//! The operator at scale: many PodCheckpoints against the real API server, reconciled
//! by the operator binary as it ships, with the node agents stubbed at the gRPC edge
//! (the real service and wire, a backend that answers at once). The baselines are a
//! plain client doing the least any controller must: one status write per object, and
//! deleting objects that carry no finalizer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use cryopod_crds::v1alpha1::{CheckpointPhase, CheckpointStorage, PodCheckpoint};
use cryopod_e2e::testbed::{TestNamespace, Testbed, wait_until};
use cryopod_e2e::tls::AgentTls;
use cryopod_node_agent::checkpoint::{CheckpointError, CheckpointOutcome, CheckpointRequest, Stage};
use cryopod_node_agent::freeze::FreezeReport;
use cryopod_node_agent::metrics::AgentMetrics;
use cryopod_node_agent::package::{MANIFEST_API_VERSION, MANIFEST_KIND, Manifest, NodeFacts};
use cryopod_node_agent::restore::{PreparedRestore, RestoreError, RestoreRequest};
use cryopod_node_agent::server::pb::node_agent_server::NodeAgentServer;
use cryopod_node_agent::server::{AgentBackend, AgentService};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use object_store::ObjectStore;
use serde_json::json;

use crate::measure::Failure;

/// Nodes the pods are spread over (Node objects without a kubelet).
const NODES: usize = 20;
/// Requests the plain client keeps in flight.
const CONCURRENCY: usize = 16;
/// Label of everything the scale run creates outside its namespaces.
const BENCH_LABEL: &str = "cryopod.io/bench-scale";

/// One repeat's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ScaleSample {
    /// From the operator's start to every PodCheckpoint Ready, seconds.
    pub reconcile_s: f64,
    /// The plain client writing one status per PodCheckpoint, seconds.
    pub status_writes_s: f64,
    /// Deleting them all through the operator's finalizer, seconds.
    pub delete_s: f64,
    /// Deleting as many without a finalizer, seconds.
    pub plain_delete_s: f64,
    /// The operator's peak resident memory, MiB.
    pub peak_rss_mib: f64,
}

/// An agent that checkpoints nothing and answers at once.
struct StubAgent(NodeFacts);

impl AgentBackend for StubAgent {
    async fn checkpoint(
        &self,
        req: CheckpointRequest,
        _store: Arc<dyn ObjectStore>,
        progress: Box<dyn Fn(Stage) + Send + Sync>,
    ) -> Result<CheckpointOutcome, CheckpointError> {
        for stage in [
            Stage::Discovering,
            Stage::Freezing,
            Stage::Dumping,
            Stage::Thawed,
            Stage::Storing,
        ] {
            progress(stage);
        }
        Ok(CheckpointOutcome {
            manifest: Manifest {
                api_version: MANIFEST_API_VERSION.to_owned(),
                kind: MANIFEST_KIND.to_owned(),
                pod: req.pod,
                node: self.0.clone(),
                checkpointed_at: String::new(),
                freeze_window_millis: 1,
                containers: vec![],
                shared: vec![],
                objects: vec![],
                encryption: None,
                post_checkpoint_state: "Running".to_owned(),
                pod_ip_connections: vec![],
                warnings: vec![],
                checkpointed_pod_template: None,
            },
            manifest_digest: format!("sha256:{}", "0".repeat(64)),
            freeze: FreezeReport {
                began: SystemTime::now(),
                window: Duration::from_millis(1),
                settle: Duration::ZERO,
                expired: false,
            },
            dump: Duration::ZERO,
            upload: Duration::ZERO,
            held: None,
        })
    }

    async fn prepare_restore(
        &self,
        _req: RestoreRequest,
        _store: Arc<dyn ObjectStore>,
        _progress: Box<dyn Fn(u64, u64) + Send + Sync>,
    ) -> Result<PreparedRestore, RestoreError> {
        Err(RestoreError::Local {
            path: PathBuf::from("stub"),
            source: std::io::Error::other("the scale bench's stub agent does not restore"),
        })
    }

    fn node_facts(&self) -> NodeFacts {
        self.0.clone()
    }
}

/// Serves the stub agent over mTLS on a loopback port; returns the port.
async fn serve_stub(tls: &AgentTls, store_dir: &Path) -> Result<(u16, tokio::task::JoinHandle<()>), Failure> {
    use tonic::transport::{Certificate, Server, ServerTlsConfig};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("stub agent: {e}"))?;
    let port = listener.local_addr().map_err(|e| format!("stub agent: {e}"))?.port();
    let config = ServerTlsConfig::new()
        .identity(tls.server.clone())
        .client_ca_root(Certificate::from_pem(&tls.ca));
    let service = AgentService::new(
        StubAgent(NodeFacts {
            name: "stub".to_owned(),
            ..NodeFacts::default()
        }),
        Arc::new(AgentMetrics::new()),
    )
    // The Local CheckpointStorage of the fixture.
    .with_local_roots(vec![store_dir.to_path_buf()]);
    let server = Server::builder()
        .tls_config(config)
        .map_err(|e| format!("stub agent TLS: {e}"))?
        .add_service(NodeAgentServer::new(service))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    let task = tokio::spawn(async move {
        if let Err(e) = server.await {
            eprintln!("stub agent: {e}");
        }
    });
    Ok((port, task))
}

/// The operator binary, killed when dropped.
struct Operator {
    child: std::process::Child,
}

impl Operator {
    /// Starts the operator for `ns`; `lease` is new each round, so a killed
    /// predecessor's unexpired Lease does not make it wait.
    fn start(
        tb: &Testbed,
        bin: &Path,
        (ns, lease): (&str, &str),
        tls: &AgentTls,
        port: u16,
        log: &Path,
    ) -> Result<Self, Failure> {
        let endpoints: Vec<String> = (1..=NODES)
            .map(|i| format!("{}=https://localhost:{port}", node_name(i)))
            .collect();
        let log = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = std::process::Command::new(bin)
            .env("KUBECONFIG", &tb.kubeconfig)
            .env("CRYOPOD_TLS_DIR", tls.operator_dir.path())
            .env("CRYOPOD_AGENT_TLS_NAME", "localhost")
            .env("CRYOPOD_AGENT_ENDPOINTS", endpoints.join(","))
            .env("CRYOPOD_WATCH_NAMESPACE", ns)
            .env("CRYOPOD_NAMESPACE", ns)
            .env("CRYOPOD_LEASE_NAME", lease)
            .env("CRYOPOD_METRICS_LISTEN", "127.0.0.1:0")
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        Ok(Self { child })
    }

    /// Peak resident memory so far (`VmHWM`), MiB.
    fn peak_rss_mib(&self) -> Result<f64, Failure> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .map_err(|e| format!("the operator's /proc status: {e}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .ok_or_else(|| "the operator's /proc status has no VmHWM".to_owned())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node_name(i: usize) -> String {
    format!("bench-node-{i}")
}

/// Deletes the Node objects a scale run makes.
async fn delete_bench_nodes(nodes: &Api<Node>) {
    let _ = nodes
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!("{BENCH_LABEL}=true")),
        )
        .await;
}

/// What the scale run made: two namespaces (the operator's and the baseline's), the
/// pods and Node objects.
struct Fixture {
    client: kube::Client,
    ours: TestNamespace,
    base: TestNamespace,
    /// A Local CheckpointStorage in the bench's work directory: the stub agent runs
    /// on this machine and opens what it is given.
    storage: String,
}

impl Fixture {
    async fn create(tb: &Testbed, client: &kube::Client, count: usize, work: &Path) -> Result<Self, Failure> {
        let ours = TestNamespace::create(tb, client, "bench-scale")
            .await
            .map_err(|e| e.to_string())?;
        let base = TestNamespace::create(tb, client, "bench-scale-base")
            .await
            .map_err(|e| e.to_string())?;
        let storage = format!("bench-{}", ours.name);
        let fixture = Self {
            client: client.clone(),
            ours,
            base,
            storage,
        };
        if let Err(e) = fixture.populate(count, &work.join("scale-store")).await {
            fixture.teardown().await;
            return Err(e);
        }
        Ok(fixture)
    }

    /// Node objects (so the pod garbage collector keeps their pods) and `count`
    /// pods bound to them and marked Running, as a kubelet would.
    async fn populate(&self, count: usize, store_dir: &Path) -> Result<(), Failure> {
        let storages: Api<CheckpointStorage> = Api::all(self.client.clone());
        let storage: CheckpointStorage = serde_json::from_value(json!({
            "apiVersion": "cryopod.io/v1alpha1", "kind": "CheckpointStorage",
            "metadata": {"name": self.storage, "labels": {BENCH_LABEL: "true"}},
            "spec": {"type": "Local", "local": {"path": store_dir}}
        }))
        .map_err(|e| e.to_string())?;
        storages
            .create(&PostParams::default(), &storage)
            .await
            .map_err(|e| format!("create CheckpointStorage {}: {e}", self.storage))?;
        let nodes: Api<Node> = Api::all(self.client.clone());
        // Left by an interrupted run, they would stop this one.
        delete_bench_nodes(&nodes).await;
        wait_until("no Node left by an earlier run", Duration::from_secs(60), || async {
            nodes
                .list(&ListParams::default().labels(&format!("{BENCH_LABEL}=true")))
                .await
                .ok()
                .filter(|l| l.items.is_empty())
        })
        .await
        .map_err(|e| e.to_string())?;
        for i in 1..=NODES {
            let node: Node = serde_json::from_value(json!({
                "metadata": {"name": node_name(i), "labels": {BENCH_LABEL: "true"}}
            }))
            .map_err(|e| e.to_string())?;
            nodes
                .create(&PostParams::default(), &node)
                .await
                .map_err(|e| format!("create Node {}: {e}", node_name(i)))?;
        }
        let pods = self.ours.pods(&self.client);
        futures::stream::iter(0..count)
            .map(|i| {
                let pods = pods.clone();
                async move {
                    let name = format!("app-{i}");
                    let pod: Pod = serde_json::from_value(json!({
                        "metadata": {"name": name},
                        "spec": {"nodeName": node_name(i % NODES + 1),
                                 "containers": [{"name": "app", "image": "cryopod.local/busybox:e2e"}]}
                    }))
                    .map_err(|e| e.to_string())?;
                    pods.create(&PostParams::default(), &pod)
                        .await
                        .map_err(|e| format!("create pod {name}: {e}"))?;
                    pods.patch_status(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"status": {"phase": "Running"}})),
                    )
                    .await
                    .map_err(|e| format!("mark pod {name} Running: {e}"))?;
                    Ok::<_, Failure>(())
                }
            })
            .buffer_unordered(CONCURRENCY)
            .try_collect::<()>()
            .await
    }

    /// Removes what the run made, whatever state it is in.
    async fn teardown(&self) {
        for ns in [&self.ours.name, &self.base.name] {
            let api: Api<PodCheckpoint> = Api::namespaced(self.client.clone(), ns);
            // Nothing will remove the finalizers once the operator is gone.
            if let Ok(left) = api.list(&ListParams::default()).await {
                futures::stream::iter(left.items)
                    .for_each_concurrent(CONCURRENCY, |cp| {
                        let api = api.clone();
                        async move {
                            let name = cp.metadata.name.unwrap_or_default();
                            let _ = api
                                .patch(
                                    &name,
                                    &PatchParams::default(),
                                    &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                                )
                                .await;
                        }
                    })
                    .await;
            }
            let _ = api
                .delete_collection(&DeleteParams::default(), &ListParams::default())
                .await;
            // No kubelet will confirm these pods' end.
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
            let _ = pods
                .delete_collection(
                    &DeleteParams {
                        grace_period_seconds: Some(0),
                        ..DeleteParams::default()
                    },
                    &ListParams::default(),
                )
                .await;
        }
        delete_bench_nodes(&Api::all(self.client.clone())).await;
        let storages: Api<CheckpointStorage> = Api::all(self.client.clone());
        let _ = storages.delete(&self.storage, &DeleteParams::default()).await;
    }
}

/// Creates `count` PodCheckpoints in `ns`, one per pod `app-<i>`.
async fn create_checkpoints(client: &kube::Client, ns: &str, storage: &str, count: usize) -> Result<(), Failure> {
    let api: Api<PodCheckpoint> = Api::namespaced(client.clone(), ns);
    futures::stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            async move {
                let cp: PodCheckpoint = serde_json::from_value(json!({
                    "apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint",
                    "metadata": {"name": format!("cp-{i}")},
                    "spec": {"sourcePodName": format!("app-{i}"), "storage": storage}
                }))
                .map_err(|e| e.to_string())?;
                api.create(&PostParams::default(), &cp)
                    .await
                    .map_err(|e| format!("create PodCheckpoint cp-{i} in {ns}: {e}"))?;
                Ok::<_, Failure>(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await
}

/// The baseline of reconciling: one status write per PodCheckpoint.
async fn write_statuses(client: &kube::Client, ns: &str, count: usize) -> Result<(), Failure> {
    let api: Api<PodCheckpoint> = Api::namespaced(client.clone(), ns);
    futures::stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            async move {
                let status = json!({"status": {"phase": "Ready", "conditions": [{
                    "type": "Ready", "status": "True", "reason": "CheckpointCompleted",
                    "message": "written by the bench's plain client",
                    "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
                api.patch_status(&format!("cp-{i}"), &PatchParams::default(), &Patch::Merge(status))
                    .await
                    .map_err(|e| format!("write the status of cp-{i}: {e}"))?;
                Ok::<_, Failure>(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await
}

/// Follows the namespace's PodCheckpoints until `count` are Ready; fails on the first
/// Failed one, naming it.
async fn all_ready(client: &kube::Client, ns: &str, count: usize, timeout: Duration) -> Result<(), Failure> {
    let api: Api<PodCheckpoint> = Api::namespaced(client.clone(), ns);
    let mut phases: HashMap<String, Option<CheckpointPhase>> = HashMap::new();
    let follow = async {
        let mut events = watcher::watcher(api, watcher::Config::default()).boxed();
        while let Some(event) = events
            .try_next()
            .await
            .map_err(|e| format!("watch PodCheckpoints: {e}"))?
        {
            let (watcher::Event::Apply(cp) | watcher::Event::InitApply(cp)) = event else {
                continue;
            };
            let phase = cp.status.as_ref().and_then(|s| s.phase);
            if phase == Some(CheckpointPhase::Failed) {
                let message = cp
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
                    .map(|c| c.message.clone())
                    .unwrap_or_default();
                return Err(format!(
                    "PodCheckpoint {ns}/{} failed: {message}",
                    cp.metadata.name.unwrap_or_default()
                ));
            }
            phases.insert(cp.metadata.name.unwrap_or_default(), phase);
            if phases.values().filter(|p| **p == Some(CheckpointPhase::Ready)).count() >= count {
                return Ok(());
            }
        }
        Err("the watch of PodCheckpoints ended".to_owned())
    };
    tokio::time::timeout(timeout, follow)
        .await
        .map_err(|_| format!("the PodCheckpoints of {ns} were not all Ready within {timeout:?}"))?
}

/// Deletes every PodCheckpoint of `ns` and waits until none is left.
async fn delete_all(client: &kube::Client, ns: &str, timeout: Duration) -> Result<(), Failure> {
    let api: Api<PodCheckpoint> = Api::namespaced(client.clone(), ns);
    api.delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .map_err(|e| format!("delete the PodCheckpoints of {ns}: {e}"))?;
    wait_until(&format!("no PodCheckpoint left in {ns}"), timeout, || async {
        api.list(&ListParams::default().limit(1))
            .await
            .ok()
            .filter(|l| l.items.is_empty())
    })
    .await
    .map(drop)
    .map_err(|e| e.to_string())
}

/// Runs `repeats` rounds of `count` PodCheckpoints.
pub async fn operator_at_scale(
    tb: &Testbed,
    client: &kube::Client,
    operator_bin: &Path,
    work: &Path,
    count: usize,
    repeats: usize,
) -> Result<Vec<ScaleSample>, Failure> {
    tb.install_crds()?;
    let tls = cryopod_e2e::tls::agent_tls()?;
    let (port, stub) = serve_stub(&tls, &work.join("scale-store")).await?;
    let fixture = Fixture::create(tb, client, count, work).await?;
    let mut samples = Vec::new();
    let mut result = Ok(());
    for repeat in 1..=repeats {
        match one_round(
            tb,
            &fixture,
            operator_bin,
            &tls,
            port,
            &work.join(format!("operator-{repeat}.log")),
            count,
        )
        .await
        {
            Ok(sample) => {
                println!(
                    "  {count} PodCheckpoints: Ready in {:.1} s (status writes {:.1} s), deleted in {:.1} s (plain {:.1} s), \
                     operator peak RSS {:.1} MiB",
                    sample.reconcile_s,
                    sample.status_writes_s,
                    sample.delete_s,
                    sample.plain_delete_s,
                    sample.peak_rss_mib
                );
                samples.push(sample);
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    fixture.teardown().await;
    stub.abort();
    result.map(|()| samples)
}

async fn one_round(
    tb: &Testbed,
    fixture: &Fixture,
    operator_bin: &Path,
    tls: &AgentTls,
    port: u16,
    log: &Path,
    count: usize,
) -> Result<ScaleSample, Failure> {
    let client = &fixture.client;
    let (ours, base) = (fixture.ours.name.as_str(), fixture.base.name.as_str());
    create_checkpoints(client, base, &fixture.storage, count).await?;
    create_checkpoints(client, ours, &fixture.storage, count).await?;
    let started = Instant::now();
    write_statuses(client, base, count).await?;
    let status_writes_s = started.elapsed().as_secs_f64();
    let limit = Duration::from_secs(600);
    let started = Instant::now();
    let lease = format!(
        "bench-{}",
        log.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let operator = Operator::start(tb, operator_bin, (ours, &lease), tls, port, log)?;
    all_ready(client, ours, count, limit)
        .await
        .map_err(|e| format!("{e} (operator log: {})", log.display()))?;
    let reconcile_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    delete_all(client, base, limit).await?;
    let plain_delete_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    delete_all(client, ours, limit)
        .await
        .map_err(|e| format!("{e} (operator log: {})", log.display()))?;
    let delete_s = started.elapsed().as_secs_f64();
    let peak_rss_mib = operator.peak_rss_mib()?;
    Ok(ScaleSample {
        reconcile_s,
        status_writes_s,
        delete_s,
        plain_delete_s,
        peak_rss_mib,
    })
}
