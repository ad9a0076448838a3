//! `kubectl cryopod`, the plugin, run by kubectl itself (found on PATH, as SREs run
//! it) against the local cluster with a real operator and agents: a migration with
//! `--wait` exits 0 and the pod goes on counting on node-2; a migration that fails
//! exits 1 naming its reason; `checkpoint -o json`, `inspect` and `status` show what
//! the API holds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod pods;

use std::process::Output;
use std::time::Duration;

use cryopod_crds::v1alpha1::{MigrationPhase, PodCheckpoint, PodMigration};
use cryopod_e2e::testbed::{TestNamespace, Testbed, wait_until};
use kube::api::Api;
use pods::control::*;
use pods::*;

/// `kubectl cryopod ARGS` in `ns`, the plugin found on PATH.
fn plugin(tb: &Testbed, ns: &str, args: &[&str]) -> Output {
    let bin = std::env::var("CRYOPOD_PLUGIN_BIN").expect("CRYOPOD_PLUGIN_BIN is set by e2e/run.sh");
    let dir = std::path::Path::new(&bin).parent().unwrap().to_path_buf();
    assert!(
        dir.join("kubectl-cryopod").exists(),
        "{bin} is not named kubectl-cryopod"
    );
    let path = std::env::join_paths(
        std::iter::once(dir).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .unwrap();
    let output = tb
        .kubectl()
        .env("PATH", path)
        .arg("cryopod")
        .args(["-n", ns])
        .args(args)
        .output()
        .unwrap();
    println!(
        "kubectl cryopod {}: {}\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test]
async fn kubectl_cryopod_migrates_with_progress_and_exits_as_kubectl_does() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-plugin").await.unwrap();
    let (source, target) = (tb.nodes[0].clone(), tb.nodes[1].clone());
    let pods = ns.pods(&client);
    pods.create(&Default::default(), &stateful_pod(&source)).await.unwrap();
    ns.wait_ready(&client, "stateful", Duration::from_secs(90))
        .await
        .unwrap();
    let control = start_control(&tb, &ns.name).await;
    let storage = s3_checkpoint_storage(&tb, &ns.name);

    // A checkpoint, printed as JSON as it was created, then inspected once Ready.
    let created = plugin(
        &tb,
        &ns.name,
        &["checkpoint", "stateful", "--storage", &storage, "-o", "json"],
    );
    assert!(created.status.success(), "{}", stderr(&created));
    let checkpoint: PodCheckpoint = serde_json::from_slice(&created.stdout).unwrap();
    let checkpoint_name = checkpoint.metadata.name.clone().unwrap();
    assert!(checkpoint_name.starts_with("stateful-"), "{checkpoint_name}");
    assert_eq!(checkpoint.spec.source_pod_name, "stateful");
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    let ready = ended(&checkpoints, &checkpoint_name).await;
    let digest = ready.status.as_ref().unwrap().manifest_digest.clone().unwrap();
    let inspected = plugin(&tb, &ns.name, &["inspect", &checkpoint_name]);
    assert!(inspected.status.success(), "{}", stderr(&inspected));
    let text = stdout(&inspected);
    for expected in [
        "Phase:              Ready",
        &format!("Node:               {source}"),
        &format!("Manifest digest:    {digest}"),
        &format!("Location:           CheckpointStorage {storage} at "),
        "Containers:",
        // The manifest's own facts, read from status: the store is not touched.
        "Node facts:         kernel ",
        "Objects:",
        "  containers/",
    ] {
        assert!(text.contains(expected), "{expected:?} in\n{text}");
    }

    // The migration, followed to its end: it exits 0 and says so; progress lines were
    // printed (stdout is not a terminal here: a line per change).
    let counted = number_in(&pod_data(&tb, &pods.get("stateful").await.unwrap()).join("a"));
    let migrated = plugin(
        &tb,
        &ns.name,
        &[
            "migrate",
            "stateful",
            "--to",
            &target,
            "--storage",
            &storage,
            "--wait",
            "--timeout",
            "5m",
        ],
    );
    let out = stdout(&migrated);
    assert!(migrated.status.success(), "{out}{}", stderr(&migrated));
    assert!(out.contains("podmigration.cryopod.io/stateful-"), "{out}");
    assert!(out.contains(" created"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("podmigration/stateful-") && l.contains(": ")),
        "{out}"
    );
    assert!(out.contains("succeeded"), "{out}");
    let migrations: Api<PodMigration> = Api::namespaced(client.clone(), &ns.name);
    let migration = migrations
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .next()
        .unwrap();
    let status = migration.status.clone().unwrap();
    assert_eq!(status.phase, Some(MigrationPhase::Succeeded));
    // The pod goes on on node-2: the same counter, counting past where it was.
    let target_pod = pods.get(&status.target_pod_name.clone().unwrap()).await.unwrap();
    assert_eq!(
        target_pod.spec.as_ref().unwrap().node_name.as_deref(),
        Some(target.as_str())
    );
    let data = pod_data(&tb, &target_pod);
    wait_until("the moved counter to go on", Duration::from_secs(30), || async {
        (number_in(&data.join("a")) > counted).then_some(())
    })
    .await
    .unwrap();
    assert!(
        ns.ready_without_restarts(&client, &status.target_pod_name.clone().unwrap())
            .await
            .unwrap()
    );

    // A migration that cannot happen fails, exits 1, and names its reason.
    let failed = plugin(
        &tb,
        &ns.name,
        &["migrate", "ghost", "--to", &target, "--wait", "--timeout", "3m"],
    );
    assert_eq!(failed.status.code(), Some(1), "{}", stderr(&failed));
    let err = stderr(&failed);
    assert!(err.starts_with("error: podmigration/ghost-"), "{err}");
    assert!(err.contains("failed: SourcePodNotFound: "), "{err}");

    // status: both migrations and the checkpoints, as a table and as JSON.
    let table = plugin(&tb, &ns.name, &["status"]);
    assert!(table.status.success());
    let table = stdout(&table);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains(&format!("podcheckpoint/{checkpoint_name}")), "{table}");
    assert!(
        table.contains(&format!("podmigration/{}", migration.metadata.name.clone().unwrap())),
        "{table}"
    );
    assert!(table.contains("podmigration/ghost-"), "{table}");
    let listed = plugin(&tb, &ns.name, &["status", "-o", "json"]);
    assert!(listed.status.success());
    let list: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let kinds: Vec<&str> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"PodMigration") && kinds.contains(&"PodCheckpoint"),
        "{kinds:?}"
    );

    // A missing object: kubectl's exit code and an error naming it.
    let missing = plugin(&tb, &ns.name, &["inspect", "no-such-checkpoint"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).starts_with("error: cannot get podcheckpoint.cryopod.io/no-such-checkpoint"),
        "{}",
        stderr(&missing)
    );
    // thaw refuses without a terminal and without --yes, before touching anything.
    let refused = plugin(&tb, &ns.name, &["thaw", &status.target_pod_name.clone().unwrap()]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("thaw needs a confirmation"),
        "{}",
        stderr(&refused)
    );

    drop(control);
    delete_storage(&tb, &storage);
}

/// The emergency thaw: a migration holds its source frozen while its target's agent
/// is away; `kubectl cryopod thaw --yes` (with the operator's client pair from the
/// release's Secret, as an admin has it) thaws it at once. The source counts on, and
/// once the target is back the migration ends `SourceResumed` naming the thaw, never
/// `Succeeded`: the pod never runs twice.
#[tokio::test]
async fn kubectl_cryopod_thaw_ends_a_hold_and_the_migration_keeps_the_source() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    let ns = TestNamespace::create(&tb, &client, "e2e-thaw").await.unwrap();
    let (source, target) = (tb.nodes[0].clone(), tb.nodes[1].clone());
    let pods = ns.pods(&client);
    let source_pod = pods.create(&Default::default(), &stateful_pod(&source)).await.unwrap();
    ns.wait_ready(&client, "stateful", Duration::from_secs(90))
        .await
        .unwrap();
    let Control {
        state,
        log,
        agents: [agent_1, agent_2],
        _operator,
        tls,
    } = start_control(&tb, &ns.name).await;
    // The target's agent away: the restore waits, the source stays held.
    let target_port = agent_2.port;
    drop(agent_2);
    let storage = s3_checkpoint_storage(&tb, &ns.name);
    // The release's Secret, as the chart makes it: the operator's pair and the CA.
    let read = |file: &str| std::fs::read_to_string(tls.operator_dir.path().join(file)).unwrap();
    kubectl_apply(
        &tb,
        &ns.name,
        &serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "e2e-tls"},
            "stringData": {"operator.crt": read("tls.crt"), "operator.key": read("tls.key"), "ca.crt": read("ca.crt")}}),
    );
    kubectl_apply(
        &tb,
        &ns.name,
        &serde_json::json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration", "metadata": {"name": "held"},
            "spec": {"sourcePodName": "stateful", "storage": storage, "target": {"nodeName": target}}}),
    );
    let migrations: Api<PodMigration> = Api::namespaced(client.clone(), &ns.name);
    // Held: its checkpoint stored, the migration shows the source frozen for it.
    wait_until("the source to be held frozen", Duration::from_secs(90), || async {
        let status = migrations.get("held").await.ok()?.status?;
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "SourceFrozen" && c.status == "True" && c.reason == "Held")
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
    let data = pod_data(&tb, &source_pod);
    let frozen_at = number_in(&data.join("a"));

    let thawed = plugin(
        &tb,
        &ns.name,
        &[
            "thaw",
            "stateful",
            "--yes",
            "--reason",
            "e2e",
            "--release",
            "e2e",
            "--release-namespace",
            &ns.name,
            "--agent-endpoint",
            &format!("https://localhost:{}", agent_1.port),
            "--agent-tls-name",
            "localhost",
        ],
    );
    assert!(thawed.status.success(), "{}", stderr(&thawed));
    // At once, not at the hold's deadline: the counter moves within seconds.
    wait_until("the thawed source to count on", Duration::from_secs(10), || async {
        (number_in(&data.join("a")) > frozen_at + 5).then_some(())
    })
    .await
    .unwrap();

    // The target back: the migration ends SourceResumed, naming the thaw.
    let (_agent_2, _) = start_agent_at(
        &tb,
        &target,
        &tls,
        &tb.dir.join(&target).join("cryopod"),
        &[],
        target_port,
    )
    .await;
    let status = migration_ended(&migrations, "held").await;
    let (_, reason, message) = ready_of(&status.conditions);
    assert_eq!(
        (status.phase, reason.as_str()),
        (Some(MigrationPhase::Failed), "SourceResumed"),
        "{message}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(message.contains("kubectl cryopod thaw"), "{message}");
    // One pod: the source, never restarted, still counting.
    let left = wait_until("the restored pod to go", Duration::from_secs(60), || async {
        let all = pods.list(&Default::default()).await.ok()?.items;
        (all.len() == 1).then_some(all)
    })
    .await
    .unwrap();
    assert_eq!(left[0].metadata.uid, source_pod.metadata.uid);
    assert!(ns.ready_without_restarts(&client, "stateful").await.unwrap());
    drop(agent_1);
    delete_storage(&tb, &storage);
    let _ = std::fs::remove_dir_all(&state);
}
