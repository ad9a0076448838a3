//! The agent's gRPC service over mutual TLS, with a stand-in checkpointer: progress
//! streams to the final state, a repeated call re-attaches instead of running again,
//! errors carry the right code and a message naming the cause, cancel stops the
//! operation, and clients without a certificate from the cluster's CA are refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use cryopod_node_agent::checkpoint::{CheckpointError, CheckpointOutcome, CheckpointRequest, Stage};
use cryopod_node_agent::discovery::DiscoveryError;
use cryopod_node_agent::freeze::FreezeReport;
use cryopod_node_agent::journal::FreezeEnd;
use cryopod_node_agent::metrics::AgentMetrics;
use cryopod_node_agent::package::{MANIFEST_API_VERSION, MANIFEST_KIND, Manifest, NodeFacts};
use cryopod_node_agent::restore::{PreparedRestore, RestoreError, RestoreRequest};
use cryopod_node_agent::server::pb::node_agent_client::NodeAgentClient;
use cryopod_node_agent::server::pb::node_agent_server::NodeAgentServer;
use cryopod_node_agent::server::{AgentBackend, AgentService, Drain, Drained, pb};
use futures::StreamExt;
use object_store::ObjectStore;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, Server, ServerTlsConfig};

/// Behaves as told: succeed, fail as the pod is missing, or wait until cancelled.
struct Stand {
    calls: AtomicUsize,
    mode: &'static str,
    dropped_while_running: Arc<AtomicBool>,
    /// How each freeze ended; a succeeded checkpoint's is held until thawed.
    ends: std::sync::Mutex<std::collections::HashMap<String, FreezeEnd>>,
    /// The journal of outcomes, and how long each read of it takes.
    outcomes: std::sync::Mutex<std::collections::HashMap<String, pb::Operation>>,
    journal_read: Duration,
    /// The prepared restores held, and those discarded.
    prepared: std::sync::Mutex<Vec<String>>,
}

struct DropFlag(Arc<AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

impl AgentBackend for Stand {
    async fn prepare_restore(
        &self,
        req: RestoreRequest,
        _store: Arc<dyn ObjectStore>,
        _progress: Box<dyn Fn(u64, u64) + Send + Sync>,
    ) -> Result<PreparedRestore, RestoreError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Err(RestoreError::Incompatible {
            reason: format!("stand-in refuses {}", req.restore_id),
        })
    }

    async fn checkpoint(
        &self,
        req: CheckpointRequest,
        _store: Arc<dyn ObjectStore>,
        progress: Box<dyn Fn(Stage) + Send + Sync>,
    ) -> Result<CheckpointOutcome, CheckpointError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        progress(Stage::Discovering);
        match self.mode {
            "missing" => Err(CheckpointError::Discovery {
                source: DiscoveryError::PodNotRunning { pod_uid: req.pod.uid },
            }),
            "hang" => {
                let _guard = DropFlag(self.dropped_while_running.clone());
                progress(Stage::Freezing);
                futures::future::pending::<()>().await;
                unreachable!()
            }
            _ => {
                for stage in [Stage::Freezing, Stage::Dumping, Stage::Thawed, Stage::Storing] {
                    progress(stage);
                }
                Ok(CheckpointOutcome {
                    manifest: Manifest {
                        api_version: MANIFEST_API_VERSION.into(),
                        kind: MANIFEST_KIND.into(),
                        pod: req.pod,
                        node: self.node_facts(),
                        checkpointed_at: "2026-01-01T00:00:00Z".into(),
                        freeze_window_millis: 42,
                        containers: vec![],
                        shared: vec![],
                        objects: vec![],
                        encryption: None,
                        post_checkpoint_state: "Running".into(),
                        pod_ip_connections: vec![],
                        warnings: vec![],
                        checkpointed_pod_template: None,
                    },
                    manifest_digest: "sha256:abc".into(),
                    freeze: FreezeReport {
                        began: std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
                        window: Duration::from_millis(42),
                        settle: Duration::ZERO,
                        expired: false,
                    },
                    dump: Duration::from_millis(30),
                    upload: Duration::from_millis(20),
                    held: None,
                })
            }
        }
    }

    fn thaw_now(&self, operation_id: &str, why: &str) -> bool {
        let mut ends = self.ends.lock().unwrap();
        if ends.contains_key(operation_id) {
            return false;
        }
        ends.insert(operation_id.to_owned(), FreezeEnd::thawed_without_release(why));
        true
    }

    fn discard_restore(&self, restore_id: &str) -> Result<bool, String> {
        let mut prepared = self.prepared.lock().unwrap();
        let held = prepared.iter().any(|id| id == restore_id);
        prepared.retain(|id| id != restore_id);
        Ok(held)
    }

    fn record_outcome(&self, op: &pb::Operation) -> Result<(), String> {
        self.outcomes
            .lock()
            .unwrap()
            .insert(op.operation_id.clone(), op.clone());
        Ok(())
    }

    fn outcome_of(&self, operation_id: &str) -> Result<Option<pb::Operation>, String> {
        // A slow disk: the window in which a second call with the same id arrives.
        std::thread::sleep(self.journal_read);
        Ok(self.outcomes.lock().unwrap().get(operation_id).cloned())
    }

    fn freeze_end(&self, operation_id: &str) -> Result<Option<FreezeEnd>, String> {
        Ok(self.ends.lock().unwrap().get(operation_id).cloned())
    }

    fn node_facts(&self) -> NodeFacts {
        NodeFacts {
            name: "node-1".into(),
            kernel: "6.18".into(),
            criu_version: "4.2.1".into(),
            ..Default::default()
        }
    }
}

struct Pki {
    ca: String,
    server: Identity,
    client: Identity,
    stranger: Identity,
}

fn pki() -> Pki {
    let issuer = |name: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    };
    let (ca, other_ca) = (issuer("cryopod-ca"), issuer("someone-else"));
    let leaf = |issuer: &CertifiedIssuer<'_, KeyPair>, names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, issuer).unwrap();
        Identity::from_pem(cert.pem(), key.serialize_pem())
    };
    Pki {
        ca: ca.pem(),
        server: leaf(&ca, vec!["localhost".into()]),
        client: leaf(&ca, vec!["cryopod-operator".into()]),
        stranger: leaf(&other_ca, vec!["cryopod-operator".into()]),
    }
}

async fn serve(stand: Stand, pki: &Pki) -> (String, Arc<Stand>, Arc<AgentMetrics>) {
    let (url, stand, metrics, _) = serve_with_drain(stand, pki).await;
    (url, stand, metrics)
}

/// [`serve`], with the handle that drains the service as SIGTERM does.
async fn serve_with_drain(stand: Stand, pki: &Pki) -> (String, Arc<Stand>, Arc<AgentMetrics>, Drain) {
    serve_with_roots(stand, pki, vec!["/var/lib/cryopod/checkpoints".into()]).await
}

/// [`serve_with_drain`] with local storage under `roots`.
async fn serve_with_roots(
    stand: Stand,
    pki: &Pki,
    roots: Vec<std::path::PathBuf>,
) -> (String, Arc<Stand>, Arc<AgentMetrics>, Drain) {
    let stand = Arc::new(stand);
    struct Shared(Arc<Stand>);
    impl AgentBackend for Shared {
        fn checkpoint(
            &self,
            req: CheckpointRequest,
            store: Arc<dyn ObjectStore>,
            progress: Box<dyn Fn(Stage) + Send + Sync>,
        ) -> impl std::future::Future<Output = Result<CheckpointOutcome, CheckpointError>> + Send {
            let inner = self.0.clone();
            async move { inner.checkpoint(req, store, progress).await }
        }
        fn prepare_restore(
            &self,
            req: RestoreRequest,
            store: Arc<dyn ObjectStore>,
            progress: Box<dyn Fn(u64, u64) + Send + Sync>,
        ) -> impl std::future::Future<Output = Result<PreparedRestore, RestoreError>> + Send {
            let inner = self.0.clone();
            async move { inner.prepare_restore(req, store, progress).await }
        }
        fn node_facts(&self) -> NodeFacts {
            self.0.node_facts()
        }
        fn thaw_now(&self, operation_id: &str, why: &str) -> bool {
            self.0.thaw_now(operation_id, why)
        }
        fn freeze_end(&self, operation_id: &str) -> Result<Option<FreezeEnd>, String> {
            self.0.freeze_end(operation_id)
        }
        fn record_outcome(&self, op: &pb::Operation) -> Result<(), String> {
            self.0.record_outcome(op)
        }
        fn discard_restore(&self, restore_id: &str) -> Result<bool, String> {
            self.0.discard_restore(restore_id)
        }
        fn outcome_of(&self, operation_id: &str) -> Result<Option<pb::Operation>, String> {
            self.0.outcome_of(operation_id)
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // As the agent binary serves: a client certificate is optional at the TLS layer
    // (another agent reads granted checkpoints without one).
    let tls = ServerTlsConfig::new()
        .identity(pki.server.clone())
        .client_ca_root(Certificate::from_pem(&pki.ca))
        .client_auth_optional(true);
    let metrics = Arc::new(AgentMetrics::new());
    let service = AgentService::new(Shared(stand.clone()), metrics.clone())
        .with_local_roots(roots)
        .with_peer_ca(pki.ca.clone().into_bytes());
    let peer = service.peer_service();
    let drain = service.drain_handle();
    // As the agent binary serves: only the operator's certificate gets through.
    let service = NodeAgentServer::with_interceptor(
        service,
        cryopod_node_agent::server::only_client("cryopod-operator".into()),
    );
    tokio::spawn(
        Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(service)
            .add_service(pb::peer_transfer_server::PeerTransferServer::new(peer))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (format!("https://localhost:{}", addr.port()), stand, metrics, drain)
}

async fn client(
    url: &str,
    pki: &Pki,
    identity: Option<&Identity>,
) -> Result<NodeAgentClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    if let Some(identity) = identity {
        tls = tls.identity(identity.clone());
    }
    let channel = Channel::from_shared(url.to_owned())
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(NodeAgentClient::new(channel))
}

fn request(id: &str) -> pb::CheckpointRequest {
    pb::CheckpointRequest {
        operation_id: id.into(),
        pod: Some(pb::PodRef {
            namespace: "ns".into(),
            name: "p".into(),
            uid: "uid-1".into(),
        }),
        storage: Some(pb::Storage {
            backend: Some(pb::storage::Backend::S3(pb::S3Storage {
                bucket: "b".into(),
                endpoint: "http://127.0.0.1:1".into(),
                ..Default::default()
            })),
        }),
        prefix: "ns/p/".into(),
        tcp_established: true,
        max_freeze_seconds: 30,
        ..Default::default()
    }
}

fn stand(mode: &'static str) -> Stand {
    Stand {
        calls: AtomicUsize::new(0),
        mode,
        dropped_while_running: Arc::new(AtomicBool::new(false)),
        ends: Default::default(),
        outcomes: Default::default(),
        journal_read: Duration::ZERO,
        prepared: Default::default(),
    }
}

/// Every state a Checkpoint call streams, to the end.
async fn run_to_end(agent: &mut NodeAgentClient<Channel>, id: &str) -> Vec<pb::Operation> {
    agent
        .checkpoint(request(id))
        .await
        .unwrap()
        .into_inner()
        .map(|o| o.unwrap())
        .collect()
        .await
}

#[tokio::test]
async fn progress_streams_to_the_end_and_a_repeat_reattaches() {
    let pki = pki();
    let (url, stand, metrics) = serve(stand("ok"), &pki).await;
    let mut agent = client(&url, &pki, Some(&pki.client)).await.unwrap();
    let ops: Vec<pb::Operation> = run_to_end(&mut agent, "op-1").await;
    let last = ops.last().unwrap();
    assert_eq!(last.state, pb::State::Succeeded as i32);
    assert_eq!(last.stage, pb::Stage::Done as i32);
    assert_eq!(last.result.as_ref().unwrap().manifest_digest, "sha256:abc");
    assert_eq!(last.result.as_ref().unwrap().freeze_window_millis, 42);

    let again: Vec<pb::Operation> = run_to_end(&mut agent, "op-1").await;
    assert_eq!(
        again,
        vec![last.clone()],
        "the same id re-attaches to the finished operation"
    );
    assert_eq!(stand.calls.load(Ordering::SeqCst), 1, "and does not run it again");
    let got = agent
        .get_operation(pb::GetOperationRequest {
            operation_id: "op-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(&got, last);
    let facts = agent.node_info(pb::NodeInfoRequest {}).await.unwrap().into_inner();
    assert_eq!((facts.name.as_str(), facts.criu_version.as_str()), ("node-1", "4.2.1"));
    let text = metrics.encode();
    assert!(
        text.contains(r#"cryopod_agent_operations_total{kind="checkpoint",result="succeeded"} 1"#),
        "{text}"
    );
    assert!(text.contains("cryopod_agent_freeze_window_seconds_count 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_calls_with_one_id_at_once_start_one_checkpoint() {
    let pki = pki();
    let slow = Stand {
        journal_read: Duration::from_millis(200),
        ..stand("ok")
    };
    let (url, stand, _) = serve(slow, &pki).await;
    let (mut a, mut b) = (
        client(&url, &pki, Some(&pki.client)).await.unwrap(),
        client(&url, &pki, Some(&pki.client)).await.unwrap(),
    );
    let (first, second) = tokio::join!(run_to_end(&mut a, "op-twice"), run_to_end(&mut b, "op-twice"));
    assert_eq!(stand.calls.load(Ordering::SeqCst), 1, "one checkpoint ran");
    assert_eq!(first.last(), second.last(), "and both callers saw its end");
    assert_eq!(first.last().unwrap().state, pb::State::Succeeded as i32);
}

#[tokio::test]
async fn a_cancelled_checkpoint_is_recorded_cancelled_for_a_later_reattach() {
    let pki = pki();
    let (url, stand, _) = serve(stand("hang"), &pki).await;
    let mut agent = client(&url, &pki, Some(&pki.client)).await.unwrap();
    let mut stream = agent.checkpoint(request("op-cancel")).await.unwrap().into_inner();
    // Wait until it runs (its first progress), then cancel it.
    stream.next().await.unwrap().unwrap();
    let cancelled = agent
        .cancel(pb::CancelRequest {
            operation_id: "op-cancel".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, pb::State::Cancelled as i32);
    // What a restarted agent would answer from its journal.
    let recorded = stand.outcomes.lock().unwrap().get("op-cancel").cloned().unwrap();
    assert_eq!(recorded.state, pb::State::Cancelled as i32, "{recorded:?}");
    assert_eq!(recorded.failure, pb::Failure::Cancelled as i32);
    let answer = cryopod_node_agent::server::earlier_checkpoint("op-cancel", Some(recorded), None).unwrap();
    assert_eq!(answer.error_code, tonic::Code::Cancelled as i32);
}

#[tokio::test]
async fn a_failed_restores_prepared_data_is_discarded_once() {
    let pki = pki();
    let (url, stand, _) = serve(stand("ok"), &pki).await;
    stand.prepared.lock().unwrap().push("restore-1".into());
    let mut agent = client(&url, &pki, Some(&pki.client)).await.unwrap();
    let discard = |id: &str| pb::DiscardRestoreRequest {
        operation_id: id.into(),
    };
    let first = agent.discard_restore(discard("restore-1")).await.unwrap().into_inner();
    assert!(first.discarded);
    assert!(stand.prepared.lock().unwrap().is_empty());
    let again = agent.discard_restore(discard("restore-1")).await.unwrap().into_inner();
    assert!(!again.discarded, "idempotent: nothing left the second time");
    let bad = agent.discard_restore(discard("../journal")).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().starts_with("operation_id:"), "{}", bad.message());
}

#[tokio::test]
async fn failures_carry_a_code_and_the_cause() {
    let pki = pki();
    let (url, _, _) = serve(stand("missing"), &pki).await;
    let mut agent = client(&url, &pki, Some(&pki.client)).await.unwrap();
    let ops: Vec<pb::Operation> = run_to_end(&mut agent, "op-2").await;
    let last = ops.last().unwrap();
    assert_eq!(last.state, pb::State::Failed as i32);
    assert_eq!(last.error_code, tonic::Code::NotFound as i32);
    assert_eq!(last.failure, pb::Failure::PodNotFound as i32, "what failed, typed");
    assert!(last.error_message.contains("uid-1"), "{}", last.error_message);

    let mut bad = request("op-3");
    bad.storage = None;
    let status = agent.checkpoint(bad).await.err().unwrap();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("storage"), "{}", status.message());
    let status = agent.checkpoint(request("../escape")).await.err().unwrap();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // Bad hooks and keys are refused up front, naming the field.
    let mut bad = request("op-4");
    bad.hooks = vec![pb::Hook {
        container: "app".into(),
        action: Some(pb::hook::Action::Signal("SIGKILL".into())),
        ..Default::default()
    }];
    let status = agent.checkpoint(bad).await.err().unwrap();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        status.message(),
        r#"hooks[0].signal: "SIGKILL" is not one of SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH"#
    );
    let mut bad = request("op-5");
    bad.age_recipients = vec!["ssh-ed25519 AAAA".into()];
    let status = agent.checkpoint(bad).await.err().unwrap();
    assert!(
        status
            .message()
            .starts_with("age_recipients: line 1 is not an age X25519 public key"),
        "{}",
        status.message()
    );
    let status = agent
        .get_operation(pb::GetOperationRequest {
            operation_id: "nope".into(),
        })
        .await
        .err()
        .unwrap();
    assert_eq!(status.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn cancel_stops_a_running_operation() {
    let pki = pki();
    let (url, stand, _) = serve(stand("hang"), &pki).await;
    let mut agent = client(&url, &pki, Some(&pki.client)).await.unwrap();
    let mut stream = agent.checkpoint(request("op-4")).await.unwrap().into_inner();
    // Wait until it reports freezing, then cancel.
    while let Some(op) = stream.next().await {
        if op.unwrap().stage == pb::Stage::Freezing as i32 {
            break;
        }
    }
    let cancelled = agent
        .cancel(pb::CancelRequest {
            operation_id: "op-4".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, pb::State::Cancelled as i32);
    let last = stream.map(|o| o.unwrap()).collect::<Vec<_>>().await.pop().unwrap();
    assert_eq!(
        last.state,
        pb::State::Cancelled as i32,
        "the stream ends with the cancellation"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !stand.dropped_while_running.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the running checkpoint was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn clients_need_a_certificate_from_the_cluster_ca() {
    let pki = pki();
    let (url, _, _) = serve(stand("ok"), &pki).await;
    for identity in [None, Some(&pki.stranger)] {
        let refused = match client(&url, &pki, identity).await {
            Err(_) => true,
            Ok(mut agent) => agent.node_info(pb::NodeInfoRequest {}).await.is_err(),
        };
        assert!(
            refused,
            "a client {} was served",
            if identity.is_some() {
                "with a foreign certificate"
            } else {
                "without a certificate"
            }
        );
    }
}

/// A certificate of the cluster's CA that is not the operator's (an agent's own, from
/// a node someone took over) drives no agent.
#[tokio::test]
async fn security_only_the_operators_certificate_drives_an_agent() {
    let pki = pki();
    let (url, stand, _) = serve(stand("ok"), &pki).await;
    let mut agent = client(&url, &pki, Some(&pki.server)).await.unwrap();
    let refused = agent.node_info(pb::NodeInfoRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("only the operator may call the agent"),
        "{}",
        refused.message()
    );
    let refused = agent.checkpoint(request("op-x")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert_eq!(stand.calls.load(Ordering::SeqCst), 0, "nothing ran");
    let mut operator = client(&url, &pki, Some(&pki.client)).await.unwrap();
    operator.node_info(pb::NodeInfoRequest {}).await.unwrap();
}

/// A `Direct` migration's read: the operator asks the source's agent for a grant, and
/// another agent (no operator certificate) reads that checkpoint's objects with it,
/// and nothing else.
#[tokio::test]
async fn security_a_peer_reads_only_what_the_operator_granted() {
    use cryopod_node_agent::server::pb::peer_transfer_client::PeerTransferClient;
    use object_store::ObjectStoreExt;
    let pki = pki();
    let root = tempfile::tempdir().unwrap();
    for (key, body) in [
        ("ns/p/u1/manifest.json", "granted"),
        ("ns/p/u2/manifest.json", "another's"),
    ] {
        let path = root.path().join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, body).unwrap();
    }
    std::os::unix::fs::symlink("/etc/hostname", root.path().join("ns/p/u1/link")).unwrap();
    let (url, _, _, _) = serve_with_roots(stand("ok"), &pki, vec![root.path().to_owned()]).await;
    let local = pb::LocalStorage {
        path: root.path().display().to_string(),
    };
    let grant = |prefix: &str| pb::GrantReadRequest {
        local: Some(local.clone()),
        prefix: prefix.into(),
        ttl_seconds: 60,
    };
    // Only the operator grants, and only under a root.
    let mut as_agent = client(&url, &pki, Some(&pki.server)).await.unwrap();
    let refused = as_agent.grant_read(grant("ns/p/u1/")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let mut operator = client(&url, &pki, Some(&pki.client)).await.unwrap();
    let mut outside = grant("ns/p/u1/");
    outside.local = Some(pb::LocalStorage { path: "/etc".into() });
    assert_eq!(
        operator.grant_read(outside).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let token = operator.grant_read(grant("ns/p/u1/")).await.unwrap().into_inner().token;

    // The reading agent has no certificate to show, only the token.
    let peer = pb::PeerStorage {
        endpoint: url.clone(),
        server_name: "localhost".into(),
        token: token.clone(),
    };
    let store = cryopod_node_agent::peer::peer_store(&peer, pki.ca.as_bytes()).unwrap();
    let read = store
        .get(&object_store::path::Path::from("ns/p/u1/manifest.json"))
        .await
        .unwrap();
    assert_eq!(read.meta.size, 7);
    assert_eq!(read.bytes().await.unwrap().as_ref(), b"granted");
    let channel = Channel::from_shared(url.clone())
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&pki.ca))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reader = PeerTransferClient::new(channel.clone());
    let read = |token: &str, key: &str| pb::ReadObjectRequest {
        token: token.into(),
        key: key.into(),
    };
    for (token, key, code) in [
        (token.as_str(), "ns/p/u2/manifest.json", tonic::Code::PermissionDenied),
        (
            token.as_str(),
            "ns/p/u1/../u2/manifest.json",
            tonic::Code::InvalidArgument,
        ),
        (token.as_str(), "ns/p/u1/link", tonic::Code::NotFound),
        ("0000", "ns/p/u1/manifest.json", tonic::Code::Unauthenticated),
    ] {
        let refused = match reader.read_object(read(token, key)).await {
            Err(status) => status,
            Ok(stream) => stream.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(refused.code(), code, "{key}: {}", refused.message());
    }
    // And the operator API stays shut to it.
    let mut no_cert = NodeAgentClient::new(channel);
    assert_eq!(
        no_cert.node_info(pb::NodeInfoRequest {}).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
}

#[tokio::test]
async fn restores_are_prepared_as_operations_and_bad_requests_name_the_field() {
    let pki = pki();
    let (url, stand, metrics) = serve(stand("ok"), &pki).await;
    let mut agent = client(&url, &pki, Some(&pki.client)).await.unwrap();
    let request = |id: &str, prefix: &str| pb::PrepareRestoreRequest {
        operation_id: id.into(),
        storage: request("x").storage,
        prefix: prefix.into(),
        restored_pod: Some(pb::PodRef {
            namespace: "ns".into(),
            name: "p".into(),
            uid: String::new(),
        }),
        manifest_digest: "sha256:abc".into(),
        ..Default::default()
    };
    let status = agent.prepare_restore(request("r-1", "no-slash")).await.err().unwrap();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "prefix: must be a key prefix ending in /");
    // Nothing unpacks as root without the digest that anchors it.
    let mut undigested = request("r-1", "ns/p/");
    undigested.manifest_digest.clear();
    let status = agent.prepare_restore(undigested).await.err().unwrap();
    assert_eq!(
        status.message(),
        "manifest_digest: required (the digest of the checkpoint's manifest)"
    );
    let mut bad = request("r-1", "ns/p/");
    bad.age_identities = vec!["AGE-SECRET-KEY-NOPE".into()];
    let status = agent.prepare_restore(bad).await.err().unwrap();
    assert!(
        status.message().starts_with("age_identities: line 1"),
        "{}",
        status.message()
    );

    let mut stream = agent
        .prepare_restore(request("r-1", "ns/p/"))
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(op) = stream.next().await {
        last = Some(op.unwrap());
    }
    let last = last.unwrap();
    assert_eq!(last.state, pb::State::Failed as i32);
    assert_eq!(last.error_code, tonic::Code::FailedPrecondition as i32);
    assert_eq!(last.failure, pb::Failure::Incompatible as i32);
    assert!(
        last.error_message.contains("stand-in refuses r-1"),
        "{}",
        last.error_message
    );
    assert_eq!(stand.calls.load(Ordering::SeqCst), 1);
    assert!(
        metrics
            .encode()
            .contains(r#"cryopod_agent_operations_total{kind="restore",result="failed"} 1"#)
    );
}

#[tokio::test]
async fn a_draining_agent_starts_nothing_new_and_reports_what_still_runs() {
    let pki = pki();
    let (url, _stand, _, drain) = serve_with_drain(stand("hang"), &pki).await;
    let mut agent = client(&url, &pki, Some(&pki.client)).await.unwrap();
    let mut running = agent.checkpoint(request("op-running")).await.unwrap().into_inner();
    while let Some(op) = running.next().await {
        if op.unwrap().stage == pb::Stage::Freezing as i32 {
            break;
        }
    }
    let drained = drain.drain(Duration::from_millis(300)).await;
    assert_eq!(
        drained,
        Drained {
            thawed: vec![],
            running: vec!["op-running".into()]
        }
    );
    let refused = agent.checkpoint(request("op-new")).await.err().unwrap();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(
        refused.message(),
        "the agent is shutting down: it starts no new operation"
    );
    // What runs can still be followed.
    let mut again = agent.checkpoint(request("op-running")).await.unwrap().into_inner();
    assert!(again.next().await.unwrap().is_ok());
}

#[tokio::test]
async fn an_idle_agent_drains_at_once() {
    let pki = pki();
    let (_, _, _, drain) = serve_with_drain(stand("ok"), &pki).await;
    let started = std::time::Instant::now();
    assert_eq!(drain.drain(Duration::from_secs(60)).await, Drained::default());
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// The emergency thaw ends every freeze of the pod the agent holds, once: asked
/// again it reports the same end as past; another pod's freezes are left alone; only
/// the operator's certificate may ask.
#[tokio::test]
async fn thaw_ends_the_pods_freezes_once_and_says_how() {
    let pki = pki();
    let (url, _stand, _) = serve(stand("ok"), &pki).await;
    let mut agent = client(&url, &pki, Some(&pki.client)).await.unwrap();
    run_to_end(&mut agent, "held-1").await;
    let thaw = |uid: &str| pb::ThawRequest {
        pod_uid: uid.into(),
        reason: "kubectl cryopod thaw by alice".into(),
    };
    let first = agent.thaw(thaw("uid-1")).await.unwrap().into_inner();
    assert_eq!(first.freezes.len(), 1, "{first:?}");
    let freeze = &first.freezes[0];
    assert_eq!(freeze.operation_id, "held-1");
    assert!(freeze.thawed_now);
    assert!(freeze.why.contains("kubectl cryopod thaw by alice"), "{}", freeze.why);
    let again = agent.thaw(thaw("uid-1")).await.unwrap().into_inner();
    assert_eq!(again.freezes.len(), 1);
    assert!(!again.freezes[0].thawed_now, "idempotent: {again:?}");
    assert_eq!(again.freezes[0].why, freeze.why);
    assert!(
        agent
            .thaw(thaw("uid-other"))
            .await
            .unwrap()
            .into_inner()
            .freezes
            .is_empty()
    );
    let err = agent.thaw(thaw("")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let mut stranger = client(&url, &pki, Some(&pki.stranger)).await;
    if let Ok(stranger) = stranger.as_mut() {
        assert!(stranger.thaw(thaw("uid-1")).await.is_err());
    }
}
