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
                start_stopped: false,
            },
        },
        &agent.node,
        &agent.restores,
        &agent.manifest_key,
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

/// A tenant who can write the bucket and the checkpoint's status rewrites a stored
/// checkpoint: one of its objects replaced by an archive of their own, the manifest
/// changed to list it with the right size and digest, and the new manifest's digest
/// written to `status.manifestDigest`, so every digest matches. The restore is refused
/// as not authentic (no agent signed that manifest), nothing is prepared on the node
/// and no pod is created.
#[tokio::test]
async fn security_a_rewritten_manifest_is_refused_though_every_digest_matches() {
    use cryopod_crds::v1alpha1::{PodCheckpoint, PodRestore, RestorePhase};
    use kube::api::{Patch, PatchParams};
    use object_store::ObjectStoreExt;
    use object_store::path::Path as ObjectPath;
    use pods::control::*;
    use serde_json::json;

    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-sec-forge").await.unwrap();
    let _trio = start_trio(&tb, &client, &ns, &tb.nodes[0]).await;
    let control = start_one_node_control(&tb, &ns.name).await;
    let storage = s3_checkpoint_storage(&tb, &ns.name);
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "genuine"},
                "spec": {"sourcePodName": "trio", "storage": storage}}),
    );
    kubectl_wait_ready(&tb, &ns.name, "podcheckpoint/genuine", &control.log);
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    let cp = checkpoints.get("genuine").await.unwrap();
    let prefix = stored_prefix(&cp);
    let store = tb.s3_store(&tb.s3.endpoint, &tb.s3.secret_key).unwrap();

    // The tenant's archive, in place of the first object.
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(7);
    header.set_mode(0o4755);
    tar.append_data(&mut header, "planted", &b"planted"[..]).unwrap();
    let planted = zstd::encode_all(&tar.into_inner().unwrap()[..], 3).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&stored_object(&tb, &cp, "manifest.json").await).unwrap();
    let object = &mut manifest["objects"][0];
    let key = object["key"].as_str().unwrap().to_owned();
    object["size"] = json!(planted.len());
    object["sha256"] = json!(cryopod_e2e::oci::sha256_digest(&planted));
    let forged = serde_json::to_vec_pretty(&manifest).unwrap();
    store
        .put(&ObjectPath::from(format!("{prefix}{key}")), planted.into())
        .await
        .unwrap();
    store
        .put(
            &ObjectPath::from(format!("{prefix}manifest.json")),
            forged.clone().into(),
        )
        .await
        .unwrap();
    let forged_digest = cryopod_e2e::oci::sha256_digest(&forged);
    checkpoints
        .patch_status(
            "genuine",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"manifestDigest": forged_digest}})),
        )
        .await
        .unwrap();

    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore", "metadata": {"name": "forged"},
                "spec": {"checkpointName": "genuine", "target": {"nodeName": tb.nodes[0]}}}),
    );
    let restores: Api<PodRestore> = Api::namespaced(client.clone(), &ns.name);
    let ended = restore_ended(&restores, "forged").await;
    let status = ended.status.clone().unwrap();
    let (_, reason, message) = ready_of(&status.conditions);
    println!("refused: {reason}: {message}");
    assert_eq!(status.phase, Some(RestorePhase::Failed), "{message}");
    assert!(message.contains("not authentic"), "{message}");
    assert!(
        event_reasons(&tb, &ns.name, "forged").contains(&reason),
        "the refusal is an event too"
    );
    // Nothing prepared on the node, no pod made.
    let restores_dir = control.state.join("restores");
    let prepared: Vec<_> = std::fs::read_dir(&restores_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(prepared.is_empty(), "prepared on the node: {prepared:?}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let names: Vec<String> = pods
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert_eq!(names, ["trio"], "no restored pod");
    assert!(status.restored_pod_name.is_none() || !names.contains(status.restored_pod_name.as_ref().unwrap()));

    checkpoints.delete("genuine", &Default::default()).await.unwrap();
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&control.state);
}

/// The tenant's image links `/escape -> /`. The pod makes `/escape` a directory of its
/// own and writes a file in it, so its rootfs changes hold `escape/tmp/<canary>`. On
/// restore the new container's rootfs has the image's link again: a handler that
/// unpacked through it, as host root, would write the file into the node's `/tmp`.
/// Now the change replaces the link: the file is in the pod's directory, and the
/// node has none.
#[tokio::test]
async fn security_a_restored_rootfs_change_never_writes_through_the_images_link() {
    use cryopod_crds::v1alpha1::{CheckpointPhase, PodCheckpoint, PodRestore};
    use pods::control::*;
    use serde_json::json;

    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-sec-unlink").await.unwrap();
    let canary = format!("cryopod-canary-{}", ns.name);
    let on_the_node = std::path::Path::new("/tmp").join(&canary);
    let _ = std::fs::remove_file(&on_the_node);
    let script = format!(
        "rm /escape && mkdir -p /escape/tmp && echo pwned > /escape/tmp/{canary} && echo 1 > /data/ready; \
         while :; do sleep 1; done"
    );
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "unlinker"},
        "spec": {"nodeName": tb.nodes[0], "terminationGracePeriodSeconds": 1,
                 "volumes": [{"name": "data", "emptyDir": {}}],
                 "containers": [{"name": "app", "image": BUSYBOX, "imagePullPolicy": "Never",
                                  "command": ["sh", "-c", script],
                                  "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}
    }))
    .unwrap();
    ns.pods(&client).create(&PostParams::default(), &pod).await.unwrap();
    let running = ns
        .wait_ready(&client, "unlinker", Duration::from_secs(90))
        .await
        .unwrap();
    let data = pod_data(&tb, &running);
    wait_until("the pod to replace the link", Duration::from_secs(30), || async {
        data.join("ready").exists().then_some(())
    })
    .await
    .unwrap();

    let control = start_control(&tb, &ns.name).await;
    let storage = s3_checkpoint_storage(&tb, &ns.name);
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "unlink"},
                "spec": {"sourcePodName": "unlinker", "storage": storage}}),
    );
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    let cp = ended(&checkpoints, "unlink").await;
    assert_eq!(
        cp.status.as_ref().unwrap().phase,
        Some(CheckpointPhase::Ready),
        "{:?}",
        ready_condition(&cp)
    );
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore", "metadata": {"name": "unlink-back"},
                "spec": {"checkpointName": "unlink", "target": {"nodeName": tb.nodes[1]}}}),
    );
    kubectl_wait_ready(&tb, &ns.name, "podrestore/unlink-back", &control.log);
    let restores: Api<PodRestore> = Api::namespaced(client.clone(), &ns.name);
    let restored = restores
        .get("unlink-back")
        .await
        .unwrap()
        .status
        .unwrap()
        .restored_pod_name
        .unwrap();
    assert!(
        !on_the_node.exists(),
        "the restore wrote the tenant's file into the node's {}",
        on_the_node.display()
    );
    let out = tb
        .kubectl()
        .args(["exec", "-n", &ns.name, &restored, "-c", "app", "--"])
        .args([
            "sh",
            "-c",
            &format!("test -d /escape && test ! -L /escape && cat /escape/tmp/{canary}"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "pwned",
        "the pod's own directory holds its file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    checkpoints.delete("unlink", &Default::default()).await.unwrap();
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&control.state);
}

/// A tenant who may write `podcheckpoints/status` points its own checkpoint at
/// another checkpoint's objects, or records a privileged pod in it; a tenant names a
/// node whose taints the pod does not tolerate as the target of a restore and of a
/// migration. Each is refused before anything is prepared or frozen, naming the field.
#[tokio::test]
async fn security_rewritten_status_and_tainted_targets_are_refused() {
    use cryopod_crds::v1alpha1::{MigrationPhase, PodCheckpoint, PodMigration, PodRestore, RestorePhase};
    use kube::api::{Patch, PatchParams};
    use pods::control::*;
    use serde_json::json;

    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-sec-status").await.unwrap();
    let trio = start_trio(&tb, &client, &ns, &tb.nodes[0]).await;
    let control = start_control(&tb, &ns.name).await;
    let storage = s3_checkpoint_storage(&tb, &ns.name);
    for name in ["victim", "attacker"] {
        kubectl_apply(
            &tb,
            &ns.name,
            &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": name},
                    "spec": {"sourcePodName": "trio", "storage": storage}}),
        );
        kubectl_wait_ready(&tb, &ns.name, &format!("podcheckpoint/{name}"), &control.log);
    }
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    let restores: Api<PodRestore> = Api::namespaced(client.clone(), &ns.name);
    let victim = checkpoints.get("victim").await.unwrap();
    let victim_status = victim.status.clone().unwrap();
    let attacker_status = checkpoints.get("attacker").await.unwrap().status.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let only_trio = || async {
        let names: Vec<String> = pods
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|p| p.metadata.name)
            .collect();
        assert_eq!(names, ["trio"], "no pod was made");
    };
    let refused = |name: &'static str| {
        let restores = restores.clone();
        async move {
            let ended = restore_ended(&restores, name).await;
            let status = ended.status.clone().unwrap();
            let (_, reason, message) = ready_of(&status.conditions);
            println!("{name} refused: {reason}: {message}");
            assert_eq!(status.phase, Some(RestorePhase::Failed), "{message}");
            message
        }
    };

    // 1. The attacker's status names the victim's objects and digest.
    checkpoints
        .patch_status(
            "attacker",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "checkpointLocation": victim_status.checkpoint_location,
                "manifestDigest": victim_status.manifest_digest,
            }})),
        )
        .await
        .unwrap();
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore", "metadata": {"name": "hijack"},
                "spec": {"checkpointName": "attacker", "target": {"nodeName": tb.nodes[1]}}}),
    );
    let message = refused("hijack").await;
    assert!(
        message.contains("status.checkpointLocation.objectStore.prefix")
            && message.contains("is not this checkpoint's own"),
        "{message}"
    );
    checkpoints
        .patch_status(
            "attacker",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "checkpointLocation": attacker_status.checkpoint_location,
                "manifestDigest": attacker_status.manifest_digest,
            }})),
        )
        .await
        .unwrap();

    // 2. The victim's status records a privileged pod.
    let mut template = victim_status.checkpointed_pod_template.clone().unwrap();
    let spec = template.spec.as_mut().unwrap();
    spec.host_pid = Some(true);
    checkpoints
        .patch_status(
            "victim",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"checkpointedPodTemplate": template}})),
        )
        .await
        .unwrap();
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore", "metadata": {"name": "escalate"},
                "spec": {"checkpointName": "victim", "target": {"nodeName": tb.nodes[1]}}}),
    );
    let message = refused("escalate").await;
    assert!(
        message.contains("status.checkpointedPodTemplate.spec.hostPID"),
        "{message}"
    );

    // 3. A target whose taint the pod does not tolerate, for a restore and a migration.
    let taint = format!("e2e.cryopod.io/{}", ns.name);
    let untaint = Untaint {
        tb: &tb,
        node: tb.nodes[1].clone(),
        taint: format!("{taint}-"),
    };
    let out = tb
        .kubectl()
        .args(["taint", "node", &tb.nodes[1], &format!("{taint}=x:NoSchedule")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore", "metadata": {"name": "tainted"},
                "spec": {"checkpointName": "attacker", "target": {"nodeName": tb.nodes[1]}}}),
    );
    let message = refused("tainted").await;
    assert!(
        message.contains(&format!("spec.target.nodeName {}", tb.nodes[1])) && message.contains("taints"),
        "{message}"
    );
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration", "metadata": {"name": "tainted"},
                "spec": {"sourcePodName": "trio", "target": {"nodeName": tb.nodes[1]}}}),
    );
    let migrations: Api<PodMigration> = Api::namespaced(client.clone(), &ns.name);
    let status = migration_ended(&migrations, "tainted").await;
    let (_, reason, message) = ready_of(&status.conditions);
    println!("migration refused: {reason}: {message}");
    assert_eq!(
        (status.phase, reason.as_str()),
        (Some(MigrationPhase::Failed), "NoCompatibleNode")
    );
    assert!(message.contains("taints the pod tolerates"), "{message}");
    assert!(status.checkpoint_name.is_none(), "nothing was frozen: {status:?}");
    drop(untaint);
    only_trio().await;
    // The source never stopped counting.
    let before = counts(&trio.data);
    wait_until("the source to count on", Duration::from_secs(20), || async {
        counts(&trio.data)
            .iter()
            .zip(&before)
            .all(|(now, then)| now > then)
            .then_some(())
    })
    .await
    .unwrap();
    for name in ["victim", "attacker"] {
        checkpoints.delete(name, &Default::default()).await.unwrap();
    }
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&control.state);
}

/// Removes a test's taint from its node, also when the test fails.
struct Untaint<'a> {
    tb: &'a Testbed,
    node: String,
    taint: String,
}

impl Drop for Untaint<'_> {
    fn drop(&mut self) {
        let _ = self
            .tb
            .kubectl()
            .args(["taint", "node", &self.node, &self.taint])
            .output();
    }
}
