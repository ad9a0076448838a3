//! The controllers against a mocked API server (tower-test): every request a
//! reconcile makes is checked, in order, and answered; nothing else may happen. A
//! missing request fails within a deadline, and so does an extra one
//! ([`ApiServer::finish`]).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::pin::pin;
use std::sync::Arc;

use cryopod_crds::v1alpha1::{PodCheckpoint, PodMigration};
use cryopod_operator::agents::{Agents, StaticAgents};
use cryopod_operator::context::Context;
use cryopod_operator::metrics::OperatorMetrics;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// The mocked API server's side: takes the next request, checks it, answers it.
struct ApiServer(Handle);

impl ApiServer {
    async fn expect(&mut self, method: Method, path: &str, status: StatusCode, answer: Value) -> Value {
        let mut handle = pin!(&mut self.0);
        let (request, send) = tokio::time::timeout(DEADLINE, handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("the reconcile did not ask for {method} {path} within {DEADLINE:?}"))
            .expect("the reconcile made no further request");
        assert_eq!(
            (request.method(), request.uri().path()),
            (&method, path),
            "unexpected request {} {}",
            request.method(),
            request.uri()
        );
        let body = request.into_body().collect_bytes().await.unwrap();
        let sent = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let response = Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&answer).unwrap()))
            .unwrap();
        send.send_response(response);
        sent
    }
}

impl ApiServer {
    /// The reconcile's result, once it ends without another request: one more
    /// request, or no end within the deadline, fails the test.
    async fn finish<T>(&mut self, reconcile: tokio::task::JoinHandle<T>) -> T {
        let mut handle = pin!(&mut self.0);
        let ended = async {
            tokio::select! {
                biased;
                done = reconcile => done.unwrap(),
                extra = handle.next_request() => match extra {
                    Some((request, _)) => panic!("unexpected extra request {} {}", request.method(), request.uri()),
                    None => panic!("the client went away before the reconcile ended"),
                },
            }
        };
        tokio::time::timeout(DEADLINE, ended)
            .await
            .unwrap_or_else(|_| panic!("the reconcile did not end within {DEADLINE:?}"))
    }
}

/// How long a reconcile may take to make its next request or to end.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

fn not_found(what: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
           "message": format!("{what} not found")})
}

/// A context over the mocked client; no agent is reachable.
fn context() -> (Arc<Context>, ApiServer, tempfile::TempDir) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let tls = tempfile::tempdir().unwrap();
    for file in ["ca.crt", "tls.crt", "tls.key"] {
        std::fs::write(tls.path().join(file), b"unused").unwrap();
    }
    let agents = Agents::new(Arc::new(StaticAgents::default()), tls.path(), "cryopod-node-agent").unwrap();
    let reporter = Reporter {
        controller: "cryopod-operator".into(),
        instance: None,
    };
    let context = Context {
        client: client.clone(),
        agents,
        recorder: Recorder::new(client, reporter),
        metrics: Arc::new(OperatorMetrics::new()),
        max_per_node: 2,
        encrypt_by_default: false,
        namespace: "cryopod-system".into(),
        watch_namespace: None,
        checkpoints: kube::runtime::reflector::store().0,
        starts: Arc::default(),
        written: Arc::default(),
    };
    (Arc::new(context), ApiServer(handle), tls)
}

fn checkpoint(finalizers: &[&str]) -> PodCheckpoint {
    serde_json::from_value(json!({
        "apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint",
        "metadata": {"name": "cp", "namespace": "ns", "uid": "u-1", "generation": 1, "resourceVersion": "1",
                     "finalizers": finalizers},
        "spec": {"sourcePodName": "nope"}
    }))
    .unwrap()
}

const CHECKPOINTS: &str = "/apis/cryopod.io/v1alpha1/namespaces/ns/podcheckpoints/cp";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";

#[tokio::test]
async fn a_new_podcheckpoint_first_gets_its_finalizer_and_nothing_else() {
    let (ctx, mut api, _tls) = context();
    let cp = checkpoint(&[]);
    let reconcile = tokio::spawn(cryopod_operator::checkpoint::reconcile(Arc::new(cp.clone()), ctx));
    let patch = api
        .expect(
            Method::PATCH,
            CHECKPOINTS,
            StatusCode::OK,
            serde_json::to_value(checkpoint(&["cryopod.io/checkpoint-objects"])).unwrap(),
        )
        .await;
    assert!(patch.to_string().contains("cryopod.io/checkpoint-objects"), "{patch}");
    assert_eq!(api.finish(reconcile).await.unwrap(), Action::await_change());
}

/// A finalized PodCheckpoint of a pod that does not exist, reconciled up to the
/// status write: the checkpoint, the API server, the reconcile.
async fn checkpoint_of_a_missing_pod() -> (
    PodCheckpoint,
    ApiServer,
    tokio::task::JoinHandle<Result<Action, cryopod_operator::context::Error>>,
    tempfile::TempDir,
) {
    let (ctx, mut api, tls) = context();
    let cp = checkpoint(&["cryopod.io/checkpoint-objects"]);
    let reconcile = tokio::spawn(cryopod_operator::checkpoint::reconcile(Arc::new(cp.clone()), ctx));
    api.expect(
        Method::GET,
        "/api/v1/namespaces/ns/pods/nope",
        StatusCode::NOT_FOUND,
        not_found("pods \"nope\""),
    )
    .await;
    (cp, api, reconcile, tls)
}

#[tokio::test]
async fn a_podcheckpoint_of_a_missing_pod_fails_naming_it_with_an_event() {
    let (cp, mut api, reconcile, _tls) = checkpoint_of_a_missing_pod().await;
    let status = api
        .expect(
            Method::PATCH,
            &format!("{CHECKPOINTS}/status"),
            StatusCode::OK,
            serde_json::to_value(&cp).unwrap(),
        )
        .await;
    assert_eq!(status["status"]["phase"], "Failed", "{status}");
    // Written only over what was read: the version read is the precondition.
    assert_eq!(status["metadata"]["resourceVersion"], "1", "{status}");
    let ready = &status["status"]["conditions"][0];
    assert_eq!(
        (ready["type"].as_str(), ready["status"].as_str()),
        (Some("Ready"), Some("False"))
    );
    assert_eq!(ready["reason"], "SourcePodNotFound");
    assert_eq!(
        ready["message"],
        "spec.sourcePodName: pod nope does not exist in namespace ns"
    );
    let event = api.expect(Method::POST, EVENTS, StatusCode::CREATED, json!({})).await;
    assert_eq!(
        (event["type"].as_str(), event["reason"].as_str()),
        (Some("Warning"), Some("SourcePodNotFound"))
    );
    assert_eq!(api.finish(reconcile).await.unwrap(), Action::await_change());
}

/// Another writer changed the PodCheckpoint after it was read: the status computed
/// from the stale read is refused (409), nothing else is done (no event), and the
/// reconcile fails so that it runs again on what is there now.
#[tokio::test]
async fn a_status_write_over_someone_elses_change_is_refused_and_retried() {
    let (_, mut api, reconcile, _tls) = checkpoint_of_a_missing_pod().await;
    let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict",
                          "code": 409, "message": "the object has been modified"});
    let sent = api
        .expect(
            Method::PATCH,
            &format!("{CHECKPOINTS}/status"),
            StatusCode::CONFLICT,
            conflict,
        )
        .await;
    assert_eq!(sent["metadata"]["resourceVersion"], "1");
    let err = api.finish(reconcile).await.unwrap_err();
    assert!(err.to_string().contains("changed since it was read"), "{err}");
}

#[tokio::test]
async fn a_migration_of_a_job_pod_is_refused_naming_the_controller() {
    let (ctx, mut api, _tls) = context();
    let migration: PodMigration = serde_json::from_value(json!({
        "apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration",
        "metadata": {"name": "move", "namespace": "ns", "uid": "m-1", "generation": 1},
        "spec": {"sourcePodName": "nightly-x"}
    }))
    .unwrap();
    let reconcile = tokio::spawn(cryopod_operator::migration::reconcile(Arc::new(migration.clone()), ctx));
    api.expect(
        Method::GET,
        "/api/v1/namespaces/ns/pods/nightly-x",
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "nightly-x", "namespace": "ns", "uid": "p-1", "ownerReferences": [
                   {"apiVersion": "batch/v1", "kind": "Job", "name": "nightly", "uid": "j-1", "controller": true}]},
               "spec": {"nodeName": "node-1", "containers": [{"name": "job", "image": "busybox"}]}}),
    )
    .await;
    // Every failure lifts the migration's fence, whether it put one up or not.
    api.expect(
        Method::DELETE,
        "/api/v1/namespaces/ns/configmaps/move-fence",
        StatusCode::NOT_FOUND,
        not_found("configmaps \"move-fence\""),
    )
    .await;
    let status = api
        .expect(
            Method::PATCH,
            "/apis/cryopod.io/v1alpha1/namespaces/ns/podmigrations/move/status",
            StatusCode::OK,
            serde_json::to_value(&migration).unwrap(),
        )
        .await;
    assert_eq!(status["status"]["phase"], "Failed");
    let message = status["status"]["conditions"][0]["message"].as_str().unwrap();
    assert!(message.contains("managed by Job nightly"), "{message}");
    api.expect(Method::POST, EVENTS, StatusCode::CREATED, json!({})).await;
    assert_eq!(api.finish(reconcile).await.unwrap(), Action::await_change());
}

/// A StatefulSet pod's migration puts up its fence before anything is frozen; when
/// the API server does not enforce it (no policy installed), the migration fails
/// naming the policy and takes the fence down again. Nothing was frozen.
#[tokio::test]
async fn a_statefulset_migration_without_the_fence_policy_fails_and_lifts_the_fence() {
    let (ctx, mut api, _tls) = context();
    let migration: PodMigration = serde_json::from_value(json!({
        "apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration",
        "metadata": {"name": "move", "namespace": "ns", "uid": "m-1", "generation": 1},
        "spec": {"sourcePodName": "db-0"}
    }))
    .unwrap();
    let reconcile = tokio::spawn(cryopod_operator::migration::reconcile(Arc::new(migration.clone()), ctx));
    api.expect(
        Method::GET,
        "/api/v1/namespaces/ns/pods/db-0",
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "db-0", "namespace": "ns", "uid": "p-1", "labels": {"app": "db"}, "ownerReferences": [
                   {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "s-1", "controller": true}]},
               "spec": {"nodeName": "node-1", "containers": [{"name": "db", "image": "busybox"}]}}),
    )
    .await;
    api.expect(
        Method::GET,
        "/apis/policy/v1/namespaces/ns/poddisruptionbudgets",
        StatusCode::OK,
        json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudgetList", "metadata": {}, "items": []}),
    )
    .await;
    api.expect(
        Method::GET,
        "/api/v1/nodes",
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": [
            {"metadata": {"name": "node-1"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}},
            {"metadata": {"name": "node-2"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}]}),
    )
    .await;
    api.expect(
        Method::GET,
        "/api/v1/namespaces/ns/configmaps/move-fence",
        StatusCode::NOT_FOUND,
        not_found("configmaps \"move-fence\""),
    )
    .await;
    // Created long ago as far as the deadline goes: enforcement is overdue.
    let fence = api
        .expect(
            Method::POST,
            "/api/v1/namespaces/ns/configmaps",
            StatusCode::CREATED,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "move-fence", "namespace": "ns", "creationTimestamp": "2026-01-01T00:00:00Z",
                                "labels": {"cryopod.io/fence": "true"}},
                   "data": {"pod": "db-0"}}),
        )
        .await;
    assert_eq!(fence["data"]["pod"], "db-0");
    assert_eq!(fence["metadata"]["labels"]["cryopod.io/fence"], "true");
    assert_eq!(fence["metadata"]["ownerReferences"][0]["kind"], "PodMigration");
    // The dry-run creation of a pod of that name is refused as a duplicate, not by
    // the policy.
    api.expect(
        Method::POST,
        "/api/v1/namespaces/ns/pods",
        StatusCode::CONFLICT,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists", "code": 409,
               "message": "pods \"db-0\" already exists"}),
    )
    .await;
    api.expect(
        Method::DELETE,
        "/api/v1/namespaces/ns/configmaps/move-fence",
        StatusCode::OK,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
    )
    .await;
    let status = api
        .expect(
            Method::PATCH,
            "/apis/cryopod.io/v1alpha1/namespaces/ns/podmigrations/move/status",
            StatusCode::OK,
            serde_json::to_value(&migration).unwrap(),
        )
        .await;
    assert_eq!(status["status"]["phase"], "Failed");
    let message = status["status"]["conditions"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("does not enforce the fence move-fence")
            && message.contains("ValidatingAdmissionPolicy cryopod-restore-fence"),
        "{message}"
    );
    api.expect(Method::POST, EVENTS, StatusCode::CREATED, json!({})).await;
    assert_eq!(api.finish(reconcile).await.unwrap(), Action::await_change());
}
