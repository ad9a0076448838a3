//! A CheckpointSchedule on the local cluster with the real operator and node-1's
//! agent: every minute (`* * * * *`) it checkpoints the two pods its selector picks,
//! and with `keepLast: 1` only the newest Ready checkpoint of each stays after the
//! next run; a pod without the label gets none, and a user's own checkpoint of a
//! selected pod (with its own `keepLast: 1`) is not the schedule's to delete.
//!
//! It waits for two runs, so up to about two minutes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod pods;

use std::collections::BTreeMap;
use std::time::Duration;

use cryopod_crds::v1alpha1::{CheckpointPhase, CheckpointSchedule, PodCheckpoint, SCHEDULE_LABEL};
use cryopod_e2e::testbed::{TestNamespace, Testbed, wait_until};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use pods::BUSYBOX;
use pods::control::*;
use serde_json::json;

const SCHEDULE: &str = "every-minute";
const SELECTED: [&str; 2] = ["sched-a", "sched-b"];
const LEFT_OUT: &str = "sched-other";

fn sleeper(name: &str, node: &str, labels: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "app", "image": BUSYBOX, "imagePullPolicy": "Never",
                                 "command": ["sh", "-c", "i=0; while :; do i=$((i+1)); sleep 0.2; done"]}]}
    }))
    .unwrap()
}

/// The schedule's checkpoints by pod: (name, phase), newest first.
async fn by_pod(api: &Api<PodCheckpoint>) -> Option<BTreeMap<String, Vec<(String, Option<CheckpointPhase>)>>> {
    let mut list = api
        .list(&ListParams::default().labels(&format!("{SCHEDULE_LABEL}={SCHEDULE}")))
        .await
        .ok()?
        .items;
    list.sort_by_key(|c| std::cmp::Reverse(c.metadata.creation_timestamp.clone().map(|t| t.0)));
    let mut pods: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for c in list.into_iter().filter(|c| c.metadata.deletion_timestamp.is_none()) {
        let phase = c.status.as_ref().and_then(|s| s.phase);
        pods.entry(c.spec.source_pod_name.clone())
            .or_default()
            .push((c.name_any(), phase));
    }
    Some(pods)
}

#[tokio::test]
async fn a_schedule_checkpoints_the_selected_pods_and_keeps_the_last_of_each() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-schedule").await.unwrap();
    let node = tb.nodes[0].clone();
    let pods = ns.pods(&client);
    for name in SELECTED {
        pods.create(
            &Default::default(),
            &sleeper(name, &node, json!({"backup": "minutely"})),
        )
        .await
        .unwrap();
    }
    pods.create(
        &Default::default(),
        &sleeper(LEFT_OUT, &node, json!({"backup": "never"})),
    )
    .await
    .unwrap();
    for name in SELECTED.iter().chain([&LEFT_OUT]) {
        ns.wait_ready(&client, name, Duration::from_secs(90)).await.unwrap();
    }
    let control = start_one_node_control(&tb, &ns.name).await;
    let log = control.log.clone();
    let storage = s3_checkpoint_storage(&tb, &ns.name);

    // A user's own checkpoint of a selected pod, with a keepLast of its own.
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "by-hand"},
                "spec": {"sourcePodName": SELECTED[0], "storage": storage, "retention": {"keepLast": 1}}}),
    );
    kubectl_wait_ready(&tb, &ns.name, "podcheckpoint/by-hand", &log);

    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "CheckpointSchedule", "metadata": {"name": SCHEDULE},
                "spec": {"schedule": "* * * * *", "selector": {"matchLabels": {"backup": "minutely"}},
                         "keepLast": 1, "checkpointTemplate": {"storage": storage, "timeoutSeconds": 50}}}),
    );
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    // What went wrong, with the operator's log and the schedule's events.
    let why = |what: String| {
        format!(
            "{what}\n{}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default(),
            event_reasons(&tb, &ns.name, SCHEDULE)
        )
    };

    // The first run: a Ready checkpoint of each selected pod.
    let first: BTreeMap<String, String> =
        wait_until("the first run's checkpoints", Duration::from_secs(150), || async {
            let pods = by_pod(&checkpoints).await?;
            SELECTED
                .iter()
                .map(|p| {
                    let newest = pods.get(*p)?.first()?;
                    (newest.1 == Some(CheckpointPhase::Ready)).then(|| (p.to_string(), newest.0.clone()))
                })
                .collect::<Option<BTreeMap<_, _>>>()
        })
        .await
        .unwrap_or_else(|e| panic!("{}", why(e.to_string())));
    println!("first run: {first:?}");

    // The next run: each pod's new checkpoint is Ready and the first one is gone.
    let second = wait_until(
        "only the newest checkpoint of each pod",
        Duration::from_secs(150),
        || async {
            let pods = by_pod(&checkpoints).await?;
            SELECTED
                .iter()
                .map(|p| match pods.get(*p)?.as_slice() {
                    [(name, Some(CheckpointPhase::Ready))] if *name != first[*p] => Some(name.clone()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
        },
    )
    .await;
    let second = second.unwrap_or_else(|e| panic!("{}", why(e.to_string())));
    println!("second run: {second:?}");
    for (pod, name) in &first {
        assert!(
            checkpoints
                .get_opt(name)
                .await
                .unwrap()
                .is_none_or(|c| c.metadata.deletion_timestamp.is_some()),
            "{pod}'s first checkpoint {name} is still there"
        );
    }

    // Not the left-out pod's; and the user's own checkpoint stays.
    let all = checkpoints.list(&ListParams::default()).await.unwrap().items;
    assert!(
        all.iter().all(|c| c.spec.source_pod_name != LEFT_OUT),
        "a pod without the label was checkpointed"
    );
    let by_hand = checkpoints.get("by-hand").await.unwrap();
    assert_eq!(by_hand.status.and_then(|s| s.phase), Some(CheckpointPhase::Ready));

    // The schedule says what it did.
    let schedules: Api<CheckpointSchedule> = Api::namespaced(client.clone(), &ns.name);
    let status = schedules.get(SCHEDULE).await.unwrap().status.unwrap();
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Scheduled"));
    let (last, next) = (
        status.last_schedule_time.unwrap().0,
        status.next_schedule_time.unwrap().0,
    );
    assert!(next > last, "next {next} after last {last}");
    let listed: Vec<&str> = status.pods.iter().map(|p| p.pod_name.as_str()).collect();
    assert_eq!(listed, SELECTED);
    let printed = tb
        .kubectl()
        .args(["get", "cpsched", "-n", &ns.name, SCHEDULE, "--no-headers"])
        .output()
        .unwrap();
    println!(
        "kubectl get cpsched: {}",
        String::from_utf8_lossy(&printed.stdout).trim()
    );

    // Suspended, then its checkpoints deleted while the operator runs their finalizers.
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "CheckpointSchedule", "metadata": {"name": SCHEDULE},
                "spec": {"schedule": "* * * * *", "selector": {"matchLabels": {"backup": "minutely"}},
                         "keepLast": 1, "suspend": true, "checkpointTemplate": {"storage": storage, "timeoutSeconds": 50}}}),
    );
    wait_until(
        "the schedule to say it is suspended",
        Duration::from_secs(30),
        || async {
            let status = schedules.get(SCHEDULE).await.ok()?.status?;
            let ready = status.conditions.into_iter().find(|c| c.type_ == "Ready")?;
            (ready.reason == "Suspended" && status.next_schedule_time.is_none()).then_some(())
        },
    )
    .await
    .unwrap();
    let _ = tb
        .kubectl()
        .args([
            "delete",
            "podcheckpoints",
            "--all",
            "-n",
            &ns.name,
            "--wait=true",
            "--timeout=120s",
        ])
        .output();
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&control.state);
}
