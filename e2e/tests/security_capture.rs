//! Attacks on the capture, as a tenant's pod makes them on the real cluster: what the
//! agent reads as host root must be the pod's own volume, whatever the pod did to the
//! paths above it after runc mounted it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod pods;

use std::time::Duration;

use cryopod_crds::v1alpha1::{CheckpointPhase, PodCheckpoint};
use cryopod_e2e::testbed::{TestNamespace, Testbed, wait_until};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use pods::control::*;
use pods::*;
use serde_json::json;

/// The pod's emptyDir is mounted at `/vol/data`. Once running, the pod moves `/vol`
/// away (the mount goes with it) and puts a symlink to `/etc` where the volume was.
/// Read through `/proc/<pid>/root` as the agent once did, the absolute link led to the
/// node's own `/etc`, which went into the tenant's checkpoint. Now the checkpoint fails
/// naming the mount, nothing of the node is read, and the pod runs on, thawed.
#[tokio::test]
async fn security_a_volume_swapped_for_a_symlink_is_not_captured() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-sec-swap").await.unwrap();
    let node = tb.nodes[0].clone();
    let script = "mv /vol /vol-moved && mkdir /vol && ln -s /etc /vol/data && i=0; \
                  while :; do i=$((i+1)); echo $i > /vol-moved/data/beat.tmp && mv /vol-moved/data/beat.tmp /vol-moved/data/beat; \
                  sleep 0.1; done";
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "swapper"},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                 "volumes": [{"name": "data", "emptyDir": {}}],
                 "containers": [{"name": "app", "image": BUSYBOX, "imagePullPolicy": "Never",
                                  "command": ["sh", "-c", script],
                                  "volumeMounts": [{"name": "data", "mountPath": "/vol/data"}]}]}
    }))
    .unwrap();
    ns.pods(&client).create(&Default::default(), &pod).await.unwrap();
    let running = ns
        .wait_ready(&client, "swapper", Duration::from_secs(90))
        .await
        .unwrap();
    let data = pod_data(&tb, &running);
    let beat = || number_in(&data.join("beat"));
    // The swap is done once the pod beats into the moved volume.
    wait_until("the pod to swap its volume's path", Duration::from_secs(30), || async {
        (beat() > 0).then_some(())
    })
    .await
    .unwrap();

    let OneNodeControl {
        state,
        log,
        _agent,
        _operator,
        _tls,
    } = start_one_node_control(&tb, &ns.name).await;
    let storage = s3_checkpoint_storage(&tb, &ns.name);
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "swap"},
                "spec": {"sourcePodName": "swapper", "storage": storage}}),
    );
    let api: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    let cp = ended(&api, "swap").await;
    let (_, reason, message) = ready_condition(&cp);
    println!("{reason}: {message}");
    assert_eq!(
        cp.status.as_ref().unwrap().phase,
        Some(CheckpointPhase::Failed),
        "{message}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        message.contains("mount /vol/data") && message.contains("not the volume the runtime mounted"),
        "{message}"
    );
    // Nothing was stored, and the pod was thawed: it beats on.
    let store = tb.s3_store(&tb.s3.endpoint, &tb.s3.secret_key).unwrap();
    let prefix = object_store::path::Path::from(stored_prefix(&cp));
    let stored: Vec<_> = store.list(Some(&prefix)).collect().await;
    assert!(stored.is_empty(), "stored under {prefix}: {stored:?}");
    let before = beat();
    wait_until("the pod to beat on", Duration::from_secs(20), || async {
        (beat() > before).then_some(())
    })
    .await
    .unwrap();
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&state);
}
