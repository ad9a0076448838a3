//! A NodeEvacuation empties node-1 on the real cluster: a bare pod, a Deployment's
//! two pods under a PodDisruptionBudget that allows one disruption, and a
//! StatefulSet's pod move to node-2 with their memory (each counter goes on in the
//! same process); a Job's pod is evicted and a DaemonSet's pod stays. The budget is
//! watched while it runs: never two of the Deployment's pods in motion at once.
//!
//! It cordons a node of the shared cluster, so `e2e/run.sh` runs it alone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod pods;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cryopod_crds::v1alpha1::{
    EvacuationAction, EvacuationPhase, MigrationPhase, NodeEvacuation, PodMigration, PodOutcome,
};
use cryopod_e2e::testbed::{TestNamespace, Testbed, pod_ready, wait_until};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use pods::control::*;
use pods::*;
use serde_json::json;

/// Counts in memory into `/data/n`; `/data/started` names the process's start.
const COUNTER: &str = "cat /proc/sys/kernel/random/uuid > /data/started; i=0; \
    while :; do i=$((i+1)); echo $i > /data/n.tmp && mv /data/n.tmp /data/n; sleep 0.05; done";

fn counting_spec() -> serde_json::Value {
    json!({"terminationGracePeriodSeconds": 1, "volumes": [{"name": "data", "emptyDir": {}}],
           "containers": [{"name": "app", "image": BUSYBOX, "imagePullPolicy": "Never", "command": ["sh", "-c", COUNTER],
                           "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]})
}

fn sleeping_spec() -> serde_json::Value {
    json!({"terminationGracePeriodSeconds": 1,
           "containers": [{"name": "app", "image": BUSYBOX, "imagePullPolicy": "Never", "command": ["sleep", "3600"]}]})
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default().trim().to_owned()
}

fn node_of(pod: &Pod) -> String {
    pod.spec.as_ref().unwrap().node_name.clone().unwrap_or_default()
}

/// Leaves both nodes schedulable and the evacuation gone, whatever happens.
struct Restore {
    tb: Testbed,
    evacuation: String,
}

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = self
            .tb
            .kubectl()
            .args([
                "delete",
                "nodeevacuation",
                &self.evacuation,
                "--ignore-not-found",
                "--wait=false",
            ])
            .output();
        for node in &self.tb.nodes {
            let _ = self.tb.kubectl().args(["uncordon", node]).output();
        }
    }
}

#[tokio::test]
async fn a_node_evacuation_moves_every_pod_it_can_within_its_budget() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-evac").await.unwrap();
    let (source, target) = (tb.nodes[0].clone(), tb.nodes[1].clone());
    let evacuation_name = format!("{}-{source}", ns.name);
    let _restore = Restore {
        tb: tb.clone(),
        evacuation: evacuation_name.clone(),
    };
    let kubectl = |args: &[&str]| {
        let out = tb.kubectl().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // Everything starts on the source: the target takes no pod until it is uncordoned.
    kubectl(&["cordon", &target]);
    let labelled = |app: &str| json!({"labels": {"app": app, "cryopod.io/e2e-pod": app}});
    let mut solo = counting_spec();
    solo["nodeName"] = json!(source);
    for doc in [
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "solo", "labels": {"app": "solo"}}, "spec": solo}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
               "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": labelled("web"), "spec": counting_spec()}}}),
        json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "web"},
               "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}}}),
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
               "spec": {"replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                        "template": {"metadata": labelled("db"), "spec": counting_spec()}}}),
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "everywhere"},
               "spec": {"selector": {"matchLabels": {"app": "everywhere"}},
                        "template": {"metadata": labelled("everywhere"), "spec": sleeping_spec()}}}),
        json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "batch"},
               "spec": {"backoffLimit": 0, "template": {"metadata": labelled("batch"),
                        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                                 "containers": [{"name": "app", "image": BUSYBOX, "imagePullPolicy": "Never",
                                                 "command": ["sleep", "3600"]}]}}}}),
    ] {
        kubectl_apply(&tb, &ns.name, &doc);
    }
    let pods = ns.pods(&client);
    let on_source = |items: &[Pod], app: &str| {
        items
            .iter()
            .filter(|p| p.labels().get("app").map(String::as_str) == Some(app) && node_of(p) == source)
            .filter(|p| pod_ready(p))
            .count()
    };
    use kube::ResourceExt;
    let before = wait_until("every pod Ready on the source", Duration::from_secs(120), || async {
        let items = pods.list(&ListParams::default()).await.ok()?.items;
        let counts = [("solo", 1), ("web", 2), ("db", 1), ("everywhere", 1), ("batch", 1)];
        counts
            .iter()
            .all(|(app, n)| on_source(&items, app) == *n)
            .then_some(items)
    })
    .await
    .unwrap();
    kubectl(&["uncordon", &target]);
    // Which process each counting pod runs, read from its emptyDir on the source.
    let counting: Vec<&Pod> = before
        .iter()
        .filter(|p| node_of(p) == source)
        .filter(|p| matches!(p.labels().get("app").map(String::as_str), Some("solo" | "web" | "db")))
        .collect();
    let mut started: BTreeMap<String, String> = BTreeMap::new();
    for pod in &counting {
        let data = pod_data(&tb, pod);
        let uuid = wait_until("the counter to start", Duration::from_secs(20), || async {
            let uuid = read(&data.join("started"));
            (!uuid.is_empty() && read(&data.join("n")).parse::<u64>().unwrap_or(0) > 5).then_some(uuid)
        })
        .await
        .unwrap();
        started.insert(uuid, pod.name_any());
    }

    let Control {
        state,
        log,
        agents: _agents,
        _operator,
        tls: _tls,
    } = start_control_on(&tb, &ns.name, &source, &target).await;
    let storage = s3_checkpoint_storage(&tb, &ns.name);

    // Watched while it runs: how many of the budget's pods, and how many pods in all,
    // are in motion at once.
    let migrations: Api<PodMigration> = Api::namespaced(client.clone(), &ns.name);
    let (most_web, most_all) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let watch = {
        let (migrations, most_web, most_all) = (migrations.clone(), most_web.clone(), most_all.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(list) = migrations.list(&ListParams::default()).await {
                    let running: Vec<&PodMigration> = list
                        .items
                        .iter()
                        .filter(|m| {
                            !matches!(
                                m.status.as_ref().and_then(|s| s.phase),
                                Some(MigrationPhase::Succeeded | MigrationPhase::Failed | MigrationPhase::RolledBack)
                            )
                        })
                        .collect();
                    let web = running
                        .iter()
                        .filter(|m| m.spec.source_pod_name.starts_with("web-"))
                        .count();
                    most_web.fetch_max(web, Ordering::SeqCst);
                    most_all.fetch_max(running.len(), Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "NodeEvacuation", "metadata": {"name": evacuation_name},
                "spec": {"nodeName": source, "maxConcurrent": 2, "storage": storage,
                         "target": {"nodeName": target}}}),
    );
    let evacuations: Api<NodeEvacuation> = Api::all(client.clone());
    let evacuation = wait_until("the evacuation to end", Duration::from_secs(300), || async {
        evacuations.get(&evacuation_name).await.ok().filter(|e| {
            matches!(
                e.status.as_ref().and_then(|s| s.phase),
                Some(EvacuationPhase::Succeeded | EvacuationPhase::Failed)
            )
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
    watch.abort();
    let status = evacuation.status.unwrap();
    println!("evacuation: {}", serde_json::to_string_pretty(&status.pods).unwrap());
    assert_eq!(
        status.phase,
        Some(EvacuationPhase::Succeeded),
        "{:?}\n{}",
        status.conditions,
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    // Every pod of the node has its outcome, by what it is.
    let ours: Vec<_> = status.pods.iter().filter(|p| p.namespace == ns.name).collect();
    let outcome_of = |prefix: &str| {
        ours.iter()
            .filter(|p| p.name.starts_with(prefix))
            .map(|p| (p.action, p.outcome, p.reason.clone().unwrap_or_default()))
            .collect::<Vec<_>>()
    };
    let migrated = (
        EvacuationAction::Migrate,
        PodOutcome::Migrated,
        "MigrationCompleted".to_owned(),
    );
    assert_eq!(outcome_of("solo"), vec![migrated.clone()]);
    assert_eq!(outcome_of("web-"), vec![migrated.clone(), migrated.clone()]);
    assert_eq!(outcome_of("db-"), vec![migrated.clone()]);
    assert_eq!(
        outcome_of("everywhere-"),
        vec![(EvacuationAction::Skip, PodOutcome::Skipped, "DaemonSetPod".to_owned())]
    );
    assert_eq!(
        outcome_of("batch-"),
        vec![(EvacuationAction::Evict, PodOutcome::Evicted, "JobPod".to_owned())]
    );
    assert_eq!(
        (status.total, status.done, status.failed),
        (status.pods.len() as i32, status.pods.len() as i32, 0)
    );

    // The budget allowed one disruption: never two of its pods in motion; never more
    // than maxConcurrent in all.
    let (most_web, most_all) = (most_web.load(Ordering::SeqCst), most_all.load(Ordering::SeqCst));
    println!("in motion at once: {most_web} of the budget's pods, {most_all} in all");
    assert_eq!(most_web, 1, "the PodDisruptionBudget allows one disruption at a time");
    assert!((1..=2).contains(&most_all), "maxConcurrent 2, saw {most_all}");

    // The source stays cordoned; each counting process goes on on the target.
    let nodes: Api<Node> = Api::all(client.clone());
    let cordoned = nodes.get(&source).await.unwrap().spec.unwrap().unschedulable;
    assert_eq!(cordoned, Some(true));
    let after = pods.list(&ListParams::default()).await.unwrap().items;
    let mut went_on = 0;
    for pod in after.iter().filter(|p| node_of(p) == target) {
        let data = pod_data(&tb, pod);
        let uuid = read(&data.join("started"));
        let Some(was) = started.get(&uuid) else { continue };
        let first = read(&data.join("n")).parse::<u64>().unwrap_or(0);
        wait_until(
            &format!("{} to count on", pod.name_any()),
            Duration::from_secs(20),
            || async { (read(&data.join("n")).parse::<u64>().unwrap_or(0) > first).then_some(()) },
        )
        .await
        .unwrap();
        assert!(ns.ready_without_restarts(&client, &pod.name_any()).await.unwrap());
        println!(
            "{was} -> {} on {target}: the same process counts on from {first}",
            pod.name_any()
        );
        went_on += 1;
    }
    assert_eq!(
        went_on,
        started.len(),
        "every counting process went on on {target}: {started:?}"
    );
    // Sources deleted or evicted may take their grace period to go.
    wait_until(
        &format!("only the DaemonSet's pod to be left on {source}"),
        Duration::from_secs(60),
        || async {
            let items = pods.list(&ListParams::default()).await.ok()?.items;
            items
                .iter()
                .all(|p| node_of(p) != source || p.labels().get("app").map(String::as_str) == Some("everywhere"))
                .then_some(())
        },
    )
    .await
    .unwrap();
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&state);
}
