//! The operator and its agents as processes, for the tests that drive cryopod
//! through its resources with `kubectl`.

use std::time::Duration;

use cryopod_crds::v1alpha1::{CheckpointPhase, PodCheckpoint, PodRestore, RestorePhase};
use cryopod_e2e::testbed::{Testbed, wait_until};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::Api;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;
use serde_json::json;

use super::*;

/// The operator binary, killed when the test ends.
pub struct Operator(pub std::process::Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the operator for namespace `ns`, knowing the agents at these ports.
pub fn start_operator(
    tb: &Testbed,
    ns: &str,
    tls: &AgentTls,
    agents: &[(&str, u16)],
    log: &std::path::Path,
) -> Operator {
    let bin = std::env::var("CRYOPOD_OPERATOR_BIN").expect("CRYOPOD_OPERATOR_BIN is set by e2e/run.sh");
    let metrics = free_port();
    Operator(
        std::process::Command::new(bin)
            .env("KUBECONFIG", &tb.kubeconfig)
            .env("CRYOPOD_TLS_DIR", tls.operator_dir.path())
            .env("CRYOPOD_AGENT_TLS_NAME", "localhost")
            .env(
                "CRYOPOD_AGENT_ENDPOINTS",
                agents
                    .iter()
                    .map(|(node, port)| format!("{node}=https://localhost:{port}"))
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .env("CRYOPOD_WATCH_NAMESPACE", ns)
            // Each test's operator leads on its own Lease, in its namespace.
            .env("CRYOPOD_NAMESPACE", ns)
            .env("CRYOPOD_METRICS_LISTEN", format!("127.0.0.1:{metrics}"))
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

pub fn kubectl_apply(tb: &Testbed, ns: &str, doc: &serde_json::Value) {
    tb.kubectl_apply(Some(ns), &doc.to_string()).unwrap();
}

/// A CheckpointStorage on the testbed's S3 server, credentials in a Secret of `ns`.
pub fn s3_checkpoint_storage(tb: &Testbed, ns: &str) -> String {
    let name = format!("s3-{ns}");
    s3_storage_with_key(tb, ns, &name, "s3-creds", &tb.s3.secret_key);
    name
}

/// [`s3_checkpoint_storage`] at the S3 server's address on the cluster's network, for
/// agents that run on a VM node (the host's loopback forwarder is not theirs).
pub fn s3_cluster_checkpoint_storage(tb: &Testbed, ns: &str) -> String {
    let name = format!("s3-{ns}");
    s3_storage_at(tb, ns, &name, ("s3-creds", &tb.s3.secret_key), &tb.s3.cluster_endpoint);
    name
}

/// CheckpointStorage `name` on the testbed's bucket (prefix `operator-e2e`), its
/// credentials in Secret `secret` of `ns` with `secret_key`.
pub fn s3_storage_with_key(tb: &Testbed, ns: &str, name: &str, secret: &str, secret_key: &str) {
    s3_storage_at(tb, ns, name, (secret, secret_key), &tb.s3.endpoint);
}

fn s3_storage_at(tb: &Testbed, ns: &str, name: &str, (secret, secret_key): (&str, &str), endpoint: &str) {
    kubectl_apply(
        tb,
        ns,
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret},
                "stringData": {"accessKeyId": tb.s3.access_key, "secretAccessKey": secret_key}}),
    );
    kubectl_apply(
        tb,
        ns,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "CheckpointStorage", "metadata": {"name": name},
                "spec": {"type": "S3", "prefix": "operator-e2e",
                         "s3": {"endpoint": endpoint, "bucket": tb.s3.bucket, "forcePathStyle": true,
                                "credentialsSecretRef": {"name": secret, "namespace": ns}}}}),
    );
}

/// Agents on both nodes and an operator that knows them.
pub struct Control {
    pub state: std::path::PathBuf,
    pub log: std::path::PathBuf,
    pub agents: [AgentProcess; 2],
    pub _operator: Operator,
    pub tls: AgentTls,
}

/// The agent of node-1 and an operator for namespace `ns` that knows only it.
pub struct OneNodeControl {
    pub state: std::path::PathBuf,
    pub log: std::path::PathBuf,
    pub _agent: AgentProcess,
    pub _operator: Operator,
    pub _tls: AgentTls,
}

/// Starts [`OneNodeControl`]; the agent keeps its state apart, in this test's own directory.
pub async fn start_one_node_control(tb: &Testbed, ns: &str) -> OneNodeControl {
    let tls = agent_tls();
    let state = tb.dir.join(format!("e2e-agent-state-{ns}"));
    let (agent, _) = start_agent(tb, &tb.nodes[0], &tls, &state).await;
    let log = state.join("operator.log");
    let operator = start_operator(tb, ns, &tls, &[(&tb.nodes[0], agent.port)], &log);
    OneNodeControl {
        state,
        log,
        _agent: agent,
        _operator: operator,
        _tls: tls,
    }
}

/// Starts the agent binaries of node-1 and node-2 (node-2's preparing restores where
/// its runtime handler reads them) and an operator for namespace `ns`.
pub async fn start_control(tb: &Testbed, ns: &str) -> Control {
    start_control_on(tb, ns, &tb.nodes[0].clone(), &tb.nodes[1].clone()).await
}

/// [`start_control`] with the source and target nodes named: the source's agent
/// keeps its state apart (its journal is this test's alone), the target's prepares
/// restores where the node's runtime handler reads them.
pub async fn start_control_on(tb: &Testbed, ns: &str, source: &str, target: &str) -> Control {
    let tls = agent_tls();
    let state = tb.dir.join(format!("e2e-agent-state-{ns}"));
    let (agent_1, _) = start_agent(tb, source, &tls, &state).await;
    let (agent_2, _) = start_agent(tb, target, &tls, &tb.dir.join(target).join("cryopod")).await;
    let log = state.join("operator.log");
    let operator = start_operator(tb, ns, &tls, &[(source, agent_1.port), (target, agent_2.port)], &log);
    Control {
        state,
        log,
        agents: [agent_1, agent_2],
        _operator: operator,
        tls,
    }
}

/// `kubectl wait --for=condition=Ready` on `resource`; on failure, says why with the
/// operator's log and the resource's events.
pub fn kubectl_wait_ready(tb: &Testbed, ns: &str, resource: &str, operator_log: &std::path::Path) {
    kubectl_wait_ready_within(tb, ns, resource, operator_log, 120);
}

/// [`kubectl_wait_ready`] with its own deadline, in seconds: for the emulated VM node,
/// whose CRIU runs many times slower than on the host.
pub fn kubectl_wait_ready_within(tb: &Testbed, ns: &str, resource: &str, operator_log: &std::path::Path, seconds: u32) {
    let timeout = format!("--timeout={seconds}s");
    let wait = tb
        .kubectl()
        .args(["wait", "-n", ns, "--for=condition=Ready", &timeout, resource])
        .output()
        .unwrap();
    let name = resource.rsplit('/').next().unwrap_or(resource);
    assert!(
        wait.status.success(),
        "kubectl wait {resource}: {}{}\n{}",
        String::from_utf8_lossy(&wait.stderr),
        std::fs::read_to_string(operator_log).unwrap_or_default(),
        event_reasons(tb, ns, name)
    );
}

/// Waits until a resource has ended (`done` says so) and returns it.
async fn ended_when<K>(api: &Api<K>, name: &str, done: impl Fn(&K) -> bool) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_until(&format!("{name} to end"), Duration::from_secs(120), || async {
        api.get(name).await.ok().filter(&done)
    })
    .await
    .unwrap()
}

/// Waits for a PodCheckpoint to end (Ready or Failed) and returns it.
pub async fn ended(api: &Api<PodCheckpoint>, name: &str) -> PodCheckpoint {
    ended_when(api, name, |cp| {
        cp.status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(|p| matches!(p, CheckpointPhase::Ready | CheckpointPhase::Failed))
    })
    .await
}

/// Waits for a PodRestore to end (Ready or Failed) and returns it.
pub async fn restore_ended(api: &Api<PodRestore>, name: &str) -> PodRestore {
    ended_when(api, name, |r| {
        r.status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(|p| matches!(p, RestorePhase::Ready | RestorePhase::Failed))
    })
    .await
}

/// The pod a Ready PodRestore made.
pub async fn restored_pod_name(api: &Api<PodRestore>, name: &str) -> String {
    let restore = api.get(name).await.unwrap();
    restore
        .status
        .and_then(|s| s.restored_pod_name)
        .unwrap_or_else(|| panic!("PodRestore {name} names no restored pod"))
}

/// Waits for a PodMigration to end (Succeeded, Failed or RolledBack) and returns its status.
pub async fn migration_ended(
    api: &Api<cryopod_crds::v1alpha1::PodMigration>,
    name: &str,
) -> cryopod_crds::v1alpha1::PodMigrationStatus {
    use cryopod_crds::v1alpha1::MigrationPhase;
    ended_when(api, name, |m| {
        m.status.as_ref().and_then(|s| s.phase).is_some_and(|p| {
            matches!(
                p,
                MigrationPhase::Succeeded | MigrationPhase::Failed | MigrationPhase::RolledBack
            )
        })
    })
    .await
    .status
    .unwrap()
}

/// The number a counter keeps in `path`, 0 while it has none.
pub fn number_in(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The `Ready` condition's status, reason and message.
pub fn ready_of(conditions: &[Condition]) -> (String, String, String) {
    let c = conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

pub fn ready_condition(cp: &PodCheckpoint) -> (String, String, String) {
    ready_of(&cp.status.as_ref().unwrap().conditions)
}

/// The event reasons recorded for a PodCheckpoint.
pub fn event_reasons(tb: &Testbed, ns: &str, name: &str) -> String {
    let out = tb
        .kubectl()
        .args([
            "get",
            "events",
            "-n",
            ns,
            "--field-selector",
            &format!("involvedObject.name={name}"),
            "-o",
            "custom-columns=REASON:.reason,NOTE:.note,MESSAGE:.message",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The numbers a checkpoint's emptyDir object holds, file by file; every one must be
/// there.
pub async fn captured_numbers(tb: &Testbed, checkpoint: &PodCheckpoint, names: &[&str]) -> Vec<u64> {
    captured_texts(tb, checkpoint, names)
        .await
        .iter()
        .map(|text| text.trim().parse().unwrap())
        .collect()
}

/// The files of a checkpoint's emptyDir object `data`, by name; every one must be there.
pub async fn captured_texts(tb: &Testbed, checkpoint: &PodCheckpoint, names: &[&str]) -> Vec<String> {
    let volume = opened(
        tb,
        checkpoint,
        stored_object(tb, checkpoint, "pod/volume/data.tar.zst").await,
    )
    .await;
    let inner = &tar_members(&unzstd(&volume))[0].1;
    names
        .iter()
        .map(|n| {
            tar_members(inner)
                .iter()
                .find(|(p, _)| p.rsplit('/').next() == Some(*n))
                .map(|(_, body)| String::from_utf8_lossy(body).into_owned())
                .unwrap_or_else(|| panic!("the checkpoint's emptyDir has no {n}"))
        })
        .collect()
}

/// A stored object in the clear: decrypted with the checkpoint's age identity when it
/// is sealed: with the key `spec.encryption` names, or with the operator's sealing
/// key (a migration's checkpoints always are), which the tests' operators keep in
/// their test's namespace.
pub async fn opened(tb: &Testbed, checkpoint: &PodCheckpoint, stored: Vec<u8>) -> Vec<u8> {
    use std::io::Read;
    let client = tb.client().await.unwrap();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client, &checkpoint.metadata.namespace.clone().unwrap());
    let secret = match &checkpoint.spec.encryption {
        Some(encryption) => secrets.get(&encryption.secret_ref.name).await.unwrap(),
        None => {
            let sealing = format!("cryopod-key-{}", checkpoint.metadata.uid.clone().unwrap());
            match secrets.get_opt(&sealing).await.unwrap() {
                Some(secret) => secret,
                None => return stored,
            }
        }
    };
    let identity = String::from_utf8(secret.data.unwrap()["identity"].0.clone()).unwrap();
    let identity: age::x25519::Identity = identity.trim().parse().unwrap();
    let decryptor = age::Decryptor::new(stored.as_slice()).unwrap();
    let mut plain = Vec::new();
    decryptor
        .decrypt(std::iter::once(&identity as &dyn age::Identity))
        .unwrap()
        .read_to_end(&mut plain)
        .unwrap();
    plain
}

/// One stored object of a Ready PodCheckpoint, as stored.
pub async fn stored_object(tb: &Testbed, checkpoint: &PodCheckpoint, key: &str) -> Vec<u8> {
    let store = tb.s3_store(&tb.s3.endpoint, &tb.s3.secret_key).unwrap();
    let path = ObjectPath::from(format!("{}{key}", stored_prefix(checkpoint)));
    store.get(&path).await.unwrap().bytes().await.unwrap().to_vec()
}

/// Where a Ready PodCheckpoint's objects are in S3.
pub fn stored_prefix(checkpoint: &PodCheckpoint) -> String {
    checkpoint
        .status
        .clone()
        .and_then(|s| s.checkpoint_location)
        .and_then(|l| l.object_store)
        .map(|o| o.prefix)
        .expect("the checkpoint is stored in S3")
}

/// Deletes a test's CheckpointStorage (cluster-scoped, so the namespace does not).
pub fn delete_storage(tb: &Testbed, name: &str) {
    let _ = tb.kubectl().args(["delete", "cpstor", name, "--wait=false"]).output();
}

/// Records an outcome this test asserted for the compatibility matrix
/// (`cryopod_e2e::compat`); call it after the assertions, so only what held is kept.
pub fn record_compat(tb: &Testbed, operation: &str, (from, to): (&str, &str), error: &str, test: &str) {
    cryopod_e2e::compat::record(
        &tb.dir,
        &cryopod_e2e::compat::Row {
            operation: operation.into(),
            from: from.into(),
            to: to.into(),
            works: error.is_empty(),
            error: error.into(),
            test: test.into(),
        },
    )
    .unwrap();
}

/// Records a fault this test injected and the outcome it asserted, for the fault
/// matrix (`cryopod_e2e::reliability`); call it after the assertions.
pub fn record_fault(
    tb: &Testbed,
    (operation, phase, fault): (&str, &str, &str),
    outcome: &str,
    recovered: std::time::Duration,
    test: &str,
) {
    cryopod_e2e::reliability::record(
        &tb.dir,
        &cryopod_e2e::reliability::Row {
            operation: operation.into(),
            phase: phase.into(),
            fault: fault.into(),
            outcome: outcome.into(),
            recovered_ms: u64::try_from(recovered.as_millis()).unwrap_or(u64::MAX),
            test: test.into(),
        },
    )
    .unwrap();
}
