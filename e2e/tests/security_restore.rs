//! Attacks on a prepared restore, as a tenant would make them on the real cluster:
//! a pod of another namespace, or of the same namespace under another name, that
//! carries a restore's id in `cryopod.io/restore` must get nothing of its memory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod pods;

use std::time::Duration;

use cryopod_e2e::testbed::{TestNamespace, Testbed, wait_until};
use cryopod_node_agent::handler::RestoredPod;
use cryopod_node_agent::restore::{RestoreRequest, prepare_restore};
use cryopod_operator::restore_pod::restore_pod;
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use kube::Api;
use kube::api::PostParams;
use pods::*;

/// The waiting message of a pod's containers, once every one has one.
async fn refusals(api: &Api<Pod>, name: &str) -> Option<Vec<String>> {
    let pod = api.get(name).await.ok()?;
    let statuses = pod.status?.container_statuses?;
    let ever_ran = statuses.iter().any(|s| {
        s.state.as_ref().is_some_and(|st| st.running.is_some())
            || s.last_state
                .as_ref()
                .and_then(|l| l.terminated.as_ref())
                .is_some_and(|t| t.exit_code != 128)
    });
    assert!(!ever_ran, "no container of {name} may run: {statuses:?}");
    statuses
        .iter()
        .map(|s| s.state.as_ref()?.waiting.as_ref()?.message.clone())
        .collect()
}

#[tokio::test]
async fn security_a_prepared_restore_serves_only_the_pod_it_was_prepared_for() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-sec-owner").await.unwrap();
    let tenant = TestNamespace::create(&tb, &client, "e2e-sec-thief").await.unwrap();
    let cp = checkpoint_trio(&tb, &client, &ns, "sec-owner").await;
    let target = tb.nodes[1].clone();
    let (agent, _journal) = library_agent(&tb, &target).await;
    let restore_id = format!("owner-{}", &cp.outcome.manifest.pod.uid[..8]);
    let prepared = prepare_restore(
        &cp.store,
        &RestoreRequest {
            restore_id: restore_id.clone(),
            prefix: cp.prefix.clone(),
            manifest_digest: Some(cp.outcome.manifest_digest.clone()),
            identities: vec![],
            restored_pod: RestoredPod {
                namespace: ns.name.clone(),
                name: "trio-restored".into(),
            },
        },
        &agent.node,
        &agent.restores,
    )
    .await
    .unwrap();
    let source = counting_pod(&target);
    let template = PodTemplateSpec {
        metadata: Some(source.metadata.clone()),
        spec: source.spec.clone(),
    };

    // The attacks: the right name in another namespace, another name in the right one.
    let thieves = [(tenant.pods(&client), "trio-restored"), (ns.pods(&client), "thief")];
    for (api, name) in &thieves {
        let pod = restore_pod(&template, name, &target, &restore_id, &[]);
        api.create(&PostParams::default(), &pod).await.unwrap();
    }
    for (api, name) in &thieves {
        let messages = wait_until("the handler to refuse the pod", Duration::from_secs(90), || async {
            refusals(api, name).await.filter(|m| {
                m.iter()
                    .all(|m| m.contains(&format!("restore {restore_id} belongs to pod")))
            })
        })
        .await
        .unwrap();
        println!("{name}: {}", messages[0]);
    }
    // Nothing of the checkpoint was used or removed by the attempts.
    for container in &cp.outcome.manifest.containers {
        let dir = prepared.dir.join("containers").join(&container.name);
        assert!(dir.join("checkpoint").is_dir(), "{} is still prepared", container.name);
        assert!(!dir.join(".restored").exists(), "{} was not restored", container.name);
    }
    assert!(prepared.dir.join("pod").is_dir());

    // The pod it was prepared for gets it, and its counters go on from the checkpoint.
    let pod = restore_pod(&template, "trio-restored", &target, &restore_id, &[]);
    ns.pods(&client).create(&PostParams::default(), &pod).await.unwrap();
    let ready = ns
        .wait_ready(&client, "trio-restored", Duration::from_secs(90))
        .await
        .unwrap();
    let data = empty_dir(&tb, &target, &ready.metadata.uid.unwrap(), "data");
    let now = wait_until("the restored counters to move", Duration::from_secs(30), || async {
        let now = counts(&data);
        now.iter().zip(&cp.at_start).all(|(n, then)| n > then).then_some(now)
    })
    .await
    .unwrap();
    println!("counted from {:?} on to {now:?}", cp.at_start);
    // Once every container is back, the pod's memory and shared state leave the node.
    assert!(!prepared.dir.join("pod").exists(), "the shared state is removed");
    for container in &cp.outcome.manifest.containers {
        assert!(
            !prepared
                .dir
                .join("containers")
                .join(&container.name)
                .join("checkpoint")
                .exists()
        );
    }
    let _ = std::fs::remove_dir_all(&prepared.dir);
}
