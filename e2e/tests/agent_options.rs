//! The checkpoint's options on real pods of the local cluster: hooks before the
//! freeze, a pod stopped once its checkpoint is stored, connections on the pod IP,
//! and encryption that the stock `age` tool opens.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod pods;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cryopod_e2e::testbed::{TestNamespace, Testbed, wait_until};
use cryopod_node_agent::checkpoint::{AfterDump, CheckpointError, CheckpointRequest, PodIpPolicy};
use cryopod_node_agent::cri::CriClient;
use cryopod_node_agent::hooks::{Hook, HookAction};
use cryopod_node_agent::package::{Manifest, Seal};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use object_store::ObjectStoreExt;
use object_store::path::Path as ObjectPath;
use pods::*;
use serde_json::json;

/// A checkpoint request for pod `name` with the defaults of the other tests.
fn request(ns: &TestNamespace, name: &str, uid: &str, op: &str) -> CheckpointRequest {
    pod_request(
        ns,
        name,
        uid,
        format!("{op}-{}", &uid[..8]),
        format!("e2e/{}/{name}/{op}/", ns.name),
    )
}

/// Runs a checkpoint by the agent library from inside the node's network namespace
/// (where the DaemonSet's agent lives, and pod IPs are reachable), into a local
/// directory store.
fn checkpoint_in_node(
    tb: &Testbed,
    node: &str,
    request: CheckpointRequest,
    store_dir: &std::path::Path,
) -> Result<Manifest, CheckpointError> {
    let (tb_dir, netns, node, store_dir) = (
        tb.dir.clone(),
        format!("/run/netns/cryopod-{node}"),
        node.to_owned(),
        store_dir.to_path_buf(),
    );
    let tb = Testbed::from_env().unwrap();
    std::thread::spawn(move || {
        // setns moves only this thread; the test's runtime stays where it is.
        let ns = std::fs::File::open(&netns).unwrap();
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let (freezer, _journal_dir, journal) = freeze_tools();
                let cri = CriClient::connect(&tb_dir.join(&node).join("containerd/containerd.sock"))
                    .await
                    .unwrap();
                let agent = node_agent(&tb, &node, cri, journal.clone(), freezer);
                std::fs::create_dir_all(&store_dir).unwrap();
                let store: Arc<dyn object_store::ObjectStore> =
                    Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&store_dir).unwrap());
                let result = agent.checkpoint(&request, store, &|_| {}).await;
                assert!(journal.entries().unwrap().is_empty(), "nothing is left frozen");
                result.map(|o| o.manifest)
            })
    })
    .join()
    .unwrap()
}

/// The files of the captured emptyDir `data`, by name.
fn captured_volume(object: &[u8]) -> HashMap<String, String> {
    let outer = tar_members(&unzstd(object));
    tar_members(&outer[0].1)
        .into_iter()
        .map(|(path, body)| {
            (
                path.rsplit('/').next().unwrap().to_owned(),
                String::from_utf8_lossy(&body).trim().to_owned(),
            )
        })
        .collect()
}

/// Exec, HTTP and signal hooks run in order before the freeze: what the exec and HTTP
/// hooks wrote is in the checkpoint's emptyDir; a failure marked Ignore becomes a
/// warning; a failing hook fails the checkpoint before anything is frozen.
#[tokio::test]
async fn hooks_run_in_order_before_the_freeze() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-hooks").await.unwrap();
    let node = tb.nodes[0].clone();
    let cgi = r#"mkdir -p /www/cgi-bin && echo -e '#!/bin/sh\necho Content-Type: text/plain\necho\necho quiet\necho http > /data/http-hook' > /www/cgi-bin/quiesce && chmod +x /www/cgi-bin/quiesce && exec httpd -f -p 8080 -h /www"#;
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "hooked"},
        "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
            "volumes": [{"name": "data", "emptyDir": {}}],
            "containers": [
                {"name": "app", "image": BUSYBOX, "imagePullPolicy": "Never",
                 "command": ["sh", "-c", cgi],
                 // Ready once httpd listens, seen in /proc (port 8080 is 1F90, LISTEN is
                 // 0A; IPv4 or IPv6), not by connecting: a probe's connection still in
                 // the listen queue at the freeze makes CRIU refuse the dump
                 // ("In-flight connection"), which failed a CI run.
                 "readinessProbe": {"exec": {"command": ["sh", "-c", "grep -qs ':1F90 0*:0000 0A' /proc/net/tcp /proc/net/tcp6"]},
                                    "periodSeconds": 1},
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                {"name": "sig", "image": BUSYBOX, "imagePullPolicy": "Never",
                 "command": ["sh", "-c", "trap 'echo usr1 > /data/signal-hook' USR1; while :; do sleep 0.05; done"],
                 "volumeMounts": [{"name": "data", "mountPath": "/data"}]}
            ]}
    }))
    .unwrap();
    ns.pods(&client).create(&PostParams::default(), &pod).await.unwrap();
    let pod = ns.wait_ready(&client, "hooked", Duration::from_secs(90)).await.unwrap();
    let uid = pod.metadata.uid.unwrap();
    let data = empty_dir(&tb, &node, &uid, "data");
    let store_dir = tb.dir.join(format!("e2e-store-{}", ns.name));
    let hook = |container: &str, action: HookAction, ignore_failure: bool| Hook {
        container: container.into(),
        action,
        timeout: Duration::from_secs(10),
        ignore_failure,
    };
    let exec = |words: &[&str]| HookAction::Exec {
        command: words.iter().map(|w| (*w).to_owned()).collect(),
    };

    let mut req = request(&ns, "hooked", &uid, "hooks");
    req.hooks = vec![
        hook("app", exec(&["sh", "-c", "echo exec > /data/exec-hook"]), false),
        hook(
            "app",
            HookAction::HttpGet {
                port: 8080,
                path: "/cgi-bin/quiesce".into(),
                https: false,
            },
            false,
        ),
        hook(
            "sig",
            HookAction::Signal {
                signal: nix::sys::signal::Signal::SIGUSR1,
            },
            false,
        ),
        hook("app", exec(&["false"]), true),
    ];
    let manifest = checkpoint_in_node(&tb, &node, req.clone(), &store_dir).unwrap();
    assert_eq!(manifest.warnings.len(), 1, "{:?}", manifest.warnings);
    assert!(
        manifest.warnings[0].starts_with(r#"hook 3 (exec "false" in container app) failed (ignored): exit code 1"#),
        "{:?}",
        manifest.warnings
    );
    let volume = captured_volume(&std::fs::read(store_dir.join(&req.prefix).join("pod/volume/data.tar.zst")).unwrap());
    assert_eq!(volume.get("exec-hook").map(String::as_str), Some("exec"), "{volume:?}");
    assert_eq!(volume.get("http-hook").map(String::as_str), Some("http"), "{volume:?}");
    // The signal is delivered before the freeze; the shell's trap runs when it can.
    wait_until("the signal hook's trap to run", Duration::from_secs(10), || async {
        std::fs::read_to_string(data.join("signal-hook"))
            .ok()
            .filter(|s| s.trim() == "usr1")
    })
    .await
    .unwrap();

    // A failing hook stops the checkpoint before the freeze; nothing is stored.
    let mut req = request(&ns, "hooked", &uid, "hookfail");
    req.hooks = vec![hook("app", exec(&["sh", "-c", "echo flush failed >&2; exit 3"]), false)];
    let err = checkpoint_in_node(&tb, &node, req.clone(), &store_dir).unwrap_err();
    assert!(matches!(err, CheckpointError::Hook { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        r#"hook 0 (exec "sh" in container app) failed: exit code 3: flush failed"#
    );
    assert!(!store_dir.join(&req.prefix).exists(), "nothing stored");
    assert!(ns.ready_without_restarts(&client, "hooked").await.unwrap());
    let _ = std::fs::remove_dir_all(&store_dir);
}

/// `Stopped`: the pod stays frozen until its checkpoint is stored, then its
/// containers are killed. Nothing ran past the checkpoint: the counters on disk are
/// the ones in the checkpoint.
#[tokio::test]
async fn a_stopped_pod_is_killed_once_its_checkpoint_is_stored() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-stopped").await.unwrap();
    let node = tb.nodes[0].clone();
    let mut pod = counting_pod(&node);
    pod.spec.as_mut().unwrap().restart_policy = Some("Never".into());
    let trio = start_counting(&tb, &client, &ns, pod).await;
    let uid = ns.pods(&client).get("trio").await.unwrap().metadata.uid.unwrap();
    let store_dir = tb.dir.join(format!("e2e-store-{}", ns.name));
    let mut req = request(&ns, "trio", &uid, "stop");
    req.after = AfterDump::Stopped;
    let manifest = checkpoint_in_node(&tb, &node, req.clone(), &store_dir).unwrap();
    assert_eq!(manifest.post_checkpoint_state, "Stopped");

    let pod = wait_until("every container to end", Duration::from_secs(30), || async {
        let pod = ns.pods(&client).get("trio").await.ok()?;
        let statuses = pod.status.as_ref()?.container_statuses.clone()?;
        statuses
            .iter()
            .all(|s| s.state.as_ref().and_then(|st| st.terminated.as_ref()).is_some())
            .then_some(statuses)
    })
    .await
    .unwrap();
    for status in &pod {
        let terminated = status.state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(terminated.exit_code, 137, "{} was killed", status.name);
    }
    let volume = captured_volume(&std::fs::read(store_dir.join(&req.prefix).join("pod/volume/data.tar.zst")).unwrap());
    let captured: Vec<u64> = NAMES.iter().map(|n| volume[*n].parse().unwrap()).collect();
    assert_eq!(counts(&trio.data), captured, "no counter moved after the checkpoint");
    println!(
        "stopped at {captured:?}, freeze window {} ms",
        manifest.freeze_window_millis
    );
    let _ = std::fs::remove_dir_all(&store_dir);
}

/// An established connection on the pod IP (to another pod) is named: `Refuse` fails
/// the checkpoint and thaws the pod; `Close` records it in the manifest, and the
/// restore on another node brings it back closed.
#[tokio::test]
async fn connections_on_the_pod_ip_are_refused_or_recorded() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-podip").await.unwrap();
    let node = tb.nodes[0].clone();
    let pod = |name: &str, command: String, probe: &str| -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                "containers": [{"name": name, "image": BUSYBOX, "imagePullPolicy": "Never",
                    "command": ["sh", "-c", command],
                    "readinessProbe": {"exec": {"command": ["sh", "-c", probe]}, "periodSeconds": 1}}]}
        }))
        .unwrap()
    };
    let pods = ns.pods(&client);
    pods.create(
        &PostParams::default(),
        &pod(
            "listener",
            "sleep 1000000 | nc -l -p 9000 > /tmp/heard".into(),
            "test -s /tmp/heard",
        ),
    )
    .await
    .unwrap();
    let listener_ip = wait_until("the listener's pod IP", Duration::from_secs(60), || async {
        pods.get("listener").await.ok()?.status?.pod_ip
    })
    .await
    .unwrap();
    pods.create(
        &PostParams::default(),
        &pod(
            "caller",
            format!("while :; do (while :; do echo x; sleep 0.2; done | nc {listener_ip} 9000); sleep 0.2; done"),
            "true",
        ),
    )
    .await
    .unwrap();
    ns.wait_ready(&client, "listener", Duration::from_secs(90))
        .await
        .unwrap();
    let caller = ns.wait_ready(&client, "caller", Duration::from_secs(90)).await.unwrap();
    let (uid, caller_ip) = (caller.metadata.uid.unwrap(), caller.status.unwrap().pod_ip.unwrap());
    let store_dir = tb.dir.join(format!("e2e-store-{}", ns.name));

    let mut req = request(&ns, "caller", &uid, "refuse");
    req.pod_ip_connections = PodIpPolicy::Refuse;
    let err = checkpoint_in_node(&tb, &node, req.clone(), &store_dir).unwrap_err();
    let message = err.to_string();
    println!("refused: {message}");
    assert!(matches!(err, CheckpointError::Unsupported { .. }), "{message}");
    assert!(
        message.contains("tcp.podIPConnections is Refuse")
            && message.contains(&format!("{caller_ip}:"))
            && message.contains(&format!("-> {listener_ip}:9000")),
        "{message}"
    );
    assert!(!store_dir.join(&req.prefix).exists(), "nothing stored");
    assert!(ns.ready_without_restarts(&client, "caller").await.unwrap());

    let mut req = request(&ns, "caller", &uid, "close");
    let live = ns.pods(&client).get("caller").await.unwrap();
    req.pod_template =
        Some(serde_json::to_value(cryopod_operator::template::checkpointed_pod_template(&live)).unwrap());
    let manifest = checkpoint_in_node(&tb, &node, req.clone(), &store_dir).unwrap();
    assert_eq!(
        manifest.pod_ip_connections.len(),
        1,
        "{:?}",
        manifest.pod_ip_connections
    );
    assert!(manifest.pod_ip_connections[0].ends_with(&format!("-> {listener_ip}:9000")));
    assert!(
        manifest.warnings.iter().any(|w| w.contains("restored closed")),
        "{:?}",
        manifest.warnings
    );
    assert!(ns.ready_without_restarts(&client, "caller").await.unwrap());

    // Restored on the other node, where the old pod IP does not exist: the connection
    // comes back closed and the restore goes through.
    let target = tb.nodes[1].clone();
    let store: Arc<dyn object_store::ObjectStore> =
        Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&store_dir).unwrap());
    let (agent, _journal) = library_agent(&tb, &target).await;
    let restore_id = format!("podip-{}", &uid[..8]);
    let prepared = cryopod_node_agent::restore::prepare_restore(
        &store,
        &cryopod_node_agent::restore::RestoreRequest {
            restore_id: restore_id.clone(),
            prefix: req.prefix.clone(),
            manifest_digest: None,
            identities: vec![],
            restored_pod: cryopod_node_agent::handler::RestoredPod {
                namespace: ns.name.clone(),
                name: "caller-restored".into(),
                start_stopped: false,
            },
        },
        &agent.node,
        &agent.restores,
        &agent.manifest_key,
    )
    .await
    .unwrap();
    let template = serde_json::from_value(manifest.checkpointed_pod_template.clone().unwrap()).unwrap();
    let pod = cryopod_operator::restore_pod::restore_pod(&template, "caller-restored", &target, &restore_id, &[]);
    ns.pods(&client).create(&PostParams::default(), &pod).await.unwrap();
    ns.wait_ready(&client, "caller-restored", Duration::from_secs(60))
        .await
        .unwrap();
    assert!(ns.ready_without_restarts(&client, "caller-restored").await.unwrap());
    let _ = std::fs::remove_dir_all(&prepared.dir);
    let _ = std::fs::remove_dir_all(&store_dir);
}

/// Sealed with age: every stored object is an age file whose digest the manifest
/// holds; the stock `age` tool opens it with the identity, and checkpointctl reads
/// the container archives inside.
#[tokio::test]
async fn an_encrypted_checkpoint_opens_with_the_stock_age_tool() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-age").await.unwrap();
    let node = tb.nodes[0].clone();
    let trio = start_trio(&tb, &client, &ns, &node).await;
    let uid = ns.pods(&client).get("trio").await.unwrap().metadata.uid.unwrap();
    let AgeKeys {
        dir: keys,
        identity,
        public,
    } = age_keys();

    let (freezer, _journal_dir, journal) = freeze_tools();
    let agent = node_agent(
        &tb,
        &node,
        CriClient::connect(&cri_socket(&tb, &node)).await.unwrap(),
        journal,
        freezer,
    );
    let store = tb.s3_store(&tb.s3.endpoint, &tb.s3.secret_key).unwrap();
    let mut req = request(&ns, "trio", &uid, "age");
    req.seal = Seal::age_from_lines(&public).unwrap();
    let at_start = counts(&trio.data);
    let outcome = agent.checkpoint(&req, store.clone(), &|_| {}).await.unwrap();
    let encryption = outcome.manifest.encryption.clone().unwrap();
    assert_eq!(
        (encryption.scheme.as_str(), encryption.recipients.clone()),
        ("age-x25519", vec![public])
    );

    for object in &outcome.manifest.objects {
        let key = ObjectPath::from(format!("{}{}", req.prefix, object.key));
        let bytes = store.get(&key).await.unwrap().bytes().await.unwrap();
        assert_eq!(cryopod_e2e::oci::sha256_digest(&bytes), object.sha256);
        assert!(bytes.starts_with(b"age-encryption.org/v1"), "{} is sealed", object.key);
        let sealed = keys.path().join("object.age");
        std::fs::write(&sealed, &bytes).unwrap();
        let opened = std::process::Command::new("age")
            .arg("-d")
            .arg("-i")
            .arg(&identity)
            .arg(&sealed)
            .output()
            .unwrap();
        assert!(opened.status.success(), "age -d {}: {opened:?}", object.key);
        let raw = unzstd(&opened.stdout);
        assert_eq!(raw.len() as u64, object.raw_size);
        if let Some(container) = object.key.strip_prefix("containers/") {
            let tar = keys.path().join("archive.tar");
            std::fs::write(&tar, &raw).unwrap();
            let shown = tb.checkpointctl_show(&tar).unwrap();
            assert!(shown.contains(container.trim_end_matches(".tar.zst")), "{shown}");
        }
        store.delete(&key).await.unwrap();
    }
    store
        .delete(&ObjectPath::from(format!("{}manifest.json", req.prefix)))
        .await
        .unwrap();
    assert_counting_on(&ns, &client, &trio.data, &at_start).await;
}
