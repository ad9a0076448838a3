//! cryopod as users install it: `helm install` of the chart with the images built
//! from static binaries (e2e/cluster/images.sh), on the local cluster. The operator
//! runs in the cluster with leader election, the agents as the DaemonSet. Then, on a
//! four-container pod that counts in memory, through `/dev/shm` and into an emptyDir:
//! an encrypted PodCheckpoint, a PodRestore on the other node, a PodMigration from
//! node-1 to node-2, each counting on; deleting the checkpoints removes their objects
//! from the bucket; `helm upgrade` keeps the certificates and serves on; `helm
//! uninstall` leaves nothing of the release behind (CRDs stay, as Helm does).
//!
//! It takes the whole cluster: `e2e/run.sh` runs it alone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod pods;

use std::time::Duration;

use cryopod_crds::v1alpha1::{PodCheckpoint, PodMigration, PodRestore};
use cryopod_e2e::testbed::{TestNamespace, Testbed, wait_until};
use futures::StreamExt;
use kube::ResourceExt;
use kube::api::Api;
use object_store::path::Path as ObjectPath;
use pods::control::*;
use pods::*;
use serde_json::json;

const RELEASE: &str = "cryopod";
const RELEASE_NS: &str = "cryopod-system";
/// What the release labels its objects with.
const INSTANCE: &str = "app.kubernetes.io/instance=cryopod";
/// Every kind the chart installs, for `kubectl get`.
const CHART_KINDS: &str = "deployments,daemonsets,pods,services,secrets,serviceaccounts,configmaps,roles,\
rolebindings,clusterroles,clusterrolebindings,runtimeclasses,validatingadmissionpolicies,\
validatingadmissionpolicybindings,mutatingadmissionpolicies,mutatingadmissionpolicybindings,leases";

fn helm(tb: &Testbed, args: &[&str]) -> String {
    let bin = std::env::var("CRYOPOD_HELM").expect("CRYOPOD_HELM is set by e2e/run.sh");
    let out = std::process::Command::new(bin)
        .env("KUBECONFIG", &tb.kubeconfig)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm {args:?}: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        release_logs(tb)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubectl(tb: &Testbed, args: &[&str]) -> String {
    let out = tb.kubectl().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl create --dry-run=server` of `pod` in `ns` as `user`: what the API server said.
fn create_as(tb: &Testbed, ns: &str, user: &str, pod: &serde_json::Value) -> Result<String, String> {
    create_as_for_real(tb, ns, user, pod, "--dry-run=server")
}

/// `kubectl create` of `doc` as `user`, `dry_run` one of kubectl's `--dry-run=` flags.
fn create_as_for_real(
    tb: &Testbed,
    ns: &str,
    user: &str,
    doc: &serde_json::Value,
    dry_run: &str,
) -> Result<String, String> {
    use std::io::Write;
    let mut child = tb
        .kubectl()
        .args(["create", dry_run, "-n", ns, "--as", user, "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(doc.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The attack of a tenant who may create pods in its namespace: a pod run by
/// cryopod's runtime handler, or naming another pod's prepared restore, so the handler
/// restores someone else's memory into it. The chart's admission policy refuses both
/// to anyone but the operator; an ordinary pod still goes through.
fn security_only_the_operator_creates_pods_that_restore(tb: &Testbed, ns: &str) {
    let tenant = format!("system:serviceaccount:{ns}:default");
    kubectl(
        tb,
        &[
            "create",
            "rolebinding",
            "tenant-edit",
            "-n",
            ns,
            "--clusterrole=edit",
            &format!("--serviceaccount={ns}:default"),
        ],
    );
    let pod = |annotations: serde_json::Value, runtime_class: Option<&str>| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "thief", "annotations": annotations},
               "spec": {"runtimeClassName": runtime_class, "containers": [{"name": "app", "image": "busybox"}]}})
    };
    // RBAC lets the tenant create pods: an ordinary one passes.
    create_as(tb, ns, &tenant, &pod(json!({}), None)).unwrap();
    let attacks = [
        pod(json!({}), Some("cryopod")),
        pod(json!({"cryopod.io/restore": "someone-elses-restore"}), None),
    ];
    for attack in attacks {
        let refused = create_as(tb, ns, &tenant, &attack).unwrap_err();
        assert!(
            refused.contains("only the cryopod operator creates pods with runtimeClassName cryopod"),
            "{attack}: {refused}"
        );
        println!("refused: {}", refused.trim());
    }
}

/// Each agent serves a certificate naming its own node, which the operator signed for
/// the agent pod on that node; a tenant who may create certificate requests asks the
/// operator's signer for a node's certificate and is denied, with nothing issued.
async fn security_only_an_agent_pod_gets_its_nodes_certificate(tb: &Testbed, ns: &str) {
    use base64::Engine;
    let requests = || -> Vec<serde_json::Value> {
        let list: serde_json::Value = serde_json::from_str(&kubectl(tb, &["get", "csr", "-o", "json"])).unwrap();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["spec"]["signerName"] == "cryopod.io/node-agent")
            .cloned()
            .collect()
    };
    for node in &tb.nodes {
        let issued = requests()
            .into_iter()
            .find(|c| {
                c["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(&format!("cryopod-agent-{node}-")))
                    && c["status"]["certificate"].is_string()
            })
            .unwrap_or_else(|| panic!("no certificate was issued for {node}'s agent"));
        let pem = base64::engine::general_purpose::STANDARD
            .decode(issued["status"]["certificate"].as_str().unwrap())
            .unwrap();
        let names = cryopod_node_agent::certs::certificate_names(&String::from_utf8(pem).unwrap()).unwrap();
        assert_eq!(names, (vec![node.clone()], false), "{node}'s agent certificate");
        assert_eq!(issued["status"]["conditions"][0]["reason"], "AgentOnItsNode");
    }
    // A tenant allowed to create certificate requests (the bootstrapper role).
    let tenant = format!("system:serviceaccount:{ns}:default");
    let binding = format!("e2e-csr-{ns}");
    kubectl(
        tb,
        &[
            "create",
            "clusterrolebinding",
            &binding,
            "--clusterrole=system:node-bootstrapper",
            &format!("--serviceaccount={ns}:default"),
        ],
    );
    let victim = &tb.nodes[0];
    let request = cryopod_node_agent::certs::node_request(victim).unwrap();
    let name = format!("e2e-thief-{ns}");
    let csr = json!({"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
                     "metadata": {"name": name},
                     "spec": {"signerName": "cryopod.io/node-agent",
                              "request": base64::engine::general_purpose::STANDARD.encode(&request.csr_pem),
                              "usages": ["digital signature", "key encipherment", "server auth"]}});
    create_as_for_real(tb, ns, &tenant, &csr, "--dry-run=none").unwrap();
    let answered = wait_until(
        "the tenant's request to be answered",
        Duration::from_secs(30),
        || async {
            let csr: serde_json::Value =
                serde_json::from_str(&kubectl(tb, &["get", "csr", &name, "-o", "json"])).ok()?;
            csr["status"]["conditions"].is_array().then_some(csr)
        },
    )
    .await
    .unwrap();
    println!("tenant's request for {victim}: {}", answered["status"]["conditions"]);
    assert_eq!(answered["status"]["conditions"][0]["type"], "Denied");
    assert_eq!(answered["status"]["conditions"][0]["reason"], "NotTheAgent");
    assert!(answered["status"]["certificate"].is_null(), "nothing issued");
    kubectl(tb, &["delete", "csr", &name]);
    kubectl(tb, &["delete", "clusterrolebinding", &binding]);
}

/// The API server records who created a request (`cryopod.io/requested-by`), and
/// no one but the operator changes the operator's annotations afterwards: not the
/// requester, and not to slip in the migration hold.
fn security_who_asked_is_recorded_and_kept(tb: &Testbed, ns: &str, checkpoint: &PodCheckpoint) {
    let who = checkpoint
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("cryopod.io/requested-by"))
        .cloned()
        .expect("the requester is recorded");
    println!("podcheckpoint/sealed was requested by {who}");
    assert!(!who.is_empty() && !who.contains("cryopod-operator"), "{who}");
    let name = checkpoint.metadata.name.clone().unwrap();
    for change in [
        "cryopod.io/requested-by=someone-else",
        "cryopod.io/hold-for-migration=forged",
    ] {
        let out = tb
            .kubectl()
            .args(["annotate", "--overwrite", "-n", ns, "podcheckpoint", &name, change])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{change} was accepted");
        assert!(
            said.contains("annotations under cryopod.io/ are the operator's"),
            "{change}: {said}"
        );
    }
}

/// A tenant allowed to create PodRestores but not pods, or a PodCheckpoint with an
/// exec hook without pods/exec, gets nothing done by the operator's rights: the
/// chart's policy checks the requester's own. Someone with the built-in edit role
/// (which the chart extends with the cryopod kinds) may.
fn security_requests_need_the_requesters_own_rights(tb: &Testbed, ns: &str) {
    let narrow = format!("system:serviceaccount:{ns}:restorer");
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "restorer"},
                      "rules": [{"apiGroups": ["cryopod.io"], "resources": ["podrestores", "podcheckpoints"],
                                 "verbs": ["create", "get"]}]});
    tb.kubectl_apply(Some(ns), &role.to_string()).unwrap();
    kubectl(
        tb,
        &[
            "create",
            "rolebinding",
            "restorer",
            "-n",
            ns,
            "--role=restorer",
            &format!("--serviceaccount={ns}:restorer"),
        ],
    );
    let restore = json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore", "metadata": {"name": "r"},
                         "spec": {"checkpointName": "any"}});
    let hooked = json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "c"},
                        "spec": {"sourcePodName": "any", "storage": "any",
                                 "hooks": {"preCheckpoint": [{"container": "app", "exec": {"command": ["id"]}}]}}});
    let refused = create_as(tb, ns, &narrow, &restore).unwrap_err();
    assert!(
        refused.contains(&format!(
            "creating a PodRestore needs the right to create pods in namespace {ns}"
        )),
        "{refused}"
    );
    let refused = create_as(tb, ns, &narrow, &hooked).unwrap_err();
    assert!(
        refused.contains("spec.hooks: an exec hook needs the right to create pods/exec"),
        "{refused}"
    );
    let post_hooked = json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "c"},
                             "spec": {"sourcePodName": "any", "storage": "any",
                                      "hooks": {"postRestore": [{"container": "app", "exec": {"command": ["id"]}}]}}});
    let refused = create_as(tb, ns, &narrow, &post_hooked).unwrap_err();
    assert!(
        refused.contains("spec.hooks: an exec hook needs the right to create pods/exec"),
        "postRestore: {refused}"
    );
    println!("refused: {}", refused.trim());
    let editor = format!("system:serviceaccount:{ns}:default");
    create_as(tb, ns, &editor, &restore).unwrap();
    create_as(tb, ns, &editor, &hooked).unwrap();
}

/// A tenant who may create pods and every cryopod kind in its namespace, but not
/// delete pods, read another namespace's checkpoints or drain a node, cannot have the
/// operator do any of these: a PodMigration (it deletes the source), a PodRestore of
/// another namespace's checkpoint, a NodeEvacuation.
fn security_moves_across_namespaces_and_evacuations_need_their_own_rights(tb: &Testbed, ns: &str) {
    let mover = format!("system:serviceaccount:{ns}:mover");
    let role = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "mover"},
                      "rules": [{"apiGroups": ["cryopod.io"], "resources": ["*"], "verbs": ["create", "get"]},
                                {"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get"]}]});
    tb.kubectl_apply(Some(ns), &role.to_string()).unwrap();
    kubectl(
        tb,
        &[
            "create",
            "rolebinding",
            "mover",
            "-n",
            ns,
            "--role=mover",
            &format!("--serviceaccount={ns}:mover"),
        ],
    );
    // RBAC lets the request through; only the chart's policy stands in its way.
    let cluster_role = format!("{ns}-evacuator");
    kubectl(
        tb,
        &[
            "create",
            "clusterrole",
            &cluster_role,
            "--verb=create",
            "--resource=nodeevacuations.cryopod.io",
        ],
    );
    kubectl(
        tb,
        &[
            "create",
            "clusterrolebinding",
            &cluster_role,
            &format!("--clusterrole={cluster_role}"),
            &format!("--serviceaccount={ns}:mover"),
        ],
    );
    let attempts = [
        (
            json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration", "metadata": {"name": "m"},
                   "spec": {"sourcePodName": "any"}}),
            format!("creating a PodMigration needs the right to delete pods in namespace {ns}"),
        ),
        (
            json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore", "metadata": {"name": "r"},
                   "spec": {"checkpointName": "any", "checkpointNamespace": "kube-system"}}),
            format!(
                "spec.checkpointNamespace: reading PodCheckpoints in namespace kube-system is not allowed to {mover}"
            ),
        ),
        (
            json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "NodeEvacuation", "metadata": {"name": format!("{ns}-e")},
                   "spec": {"nodeName": tb.nodes[0]}}),
            format!(
                "creating a NodeEvacuation needs the rights of a drain: patch node {}",
                tb.nodes[0]
            ),
        ),
    ];
    for (doc, expected) in attempts {
        let refused = create_as(tb, ns, &mover, &doc).unwrap_err();
        println!("refused: {}", refused.trim());
        assert!(refused.contains(&expected), "{doc}: {refused}");
    }
    // The same PodRestore within the namespace passes: the refusal was the other namespace.
    let own = json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore", "metadata": {"name": "r"},
                     "spec": {"checkpointName": "any"}});
    create_as(tb, ns, &mover, &own).unwrap();
    kubectl(tb, &["delete", "clusterrolebinding", &cluster_role]);
    kubectl(tb, &["delete", "clusterrole", &cluster_role]);
}

/// Whoever may edit a PodCheckpoint grants it to restores in other namespaces
/// (`cryopod.io/restore-namespaces`) and withdraws the grant; every other
/// `cryopod.io/` annotation stays the operator's.
fn security_a_checkpoints_owners_grant_it_and_nothing_else(tb: &Testbed, ns: &str) {
    let editor = format!("system:serviceaccount:{ns}:default");
    let checkpoint = json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "granted"},
                            "spec": {"sourcePodName": "nobody", "storage": "any"}});
    create_as_for_real(tb, ns, &editor, &checkpoint, "--dry-run=none").unwrap();
    let annotate = |annotation: &str| {
        let out = tb
            .kubectl()
            .args(["annotate", "--overwrite", "-n", ns, "--as", &editor])
            .args(["podcheckpoint/granted", annotation])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() { Ok(text) } else { Err(text) }
    };
    annotate("cryopod.io/restore-namespaces=elsewhere").unwrap();
    annotate("cryopod.io/restore-namespaces-").unwrap();
    let refused = annotate("cryopod.io/hold-for-migration=x").unwrap_err();
    assert!(
        refused.contains("annotations under cryopod.io/ are the operator's"),
        "{refused}"
    );
    kubectl(tb, &["delete", "-n", ns, "podcheckpoint/granted", "--wait=false"]);
}

/// `helm uninstall`, waiting until the release's resources are gone.
fn uninstall(tb: &Testbed, extra: &[&str]) {
    let mut args = vec![
        "uninstall",
        RELEASE,
        "--namespace",
        RELEASE_NS,
        "--wait",
        "--timeout",
        "2m",
    ];
    args.extend(extra);
    helm(tb, &args);
}

/// The release's CA certificate.
fn release_ca(tb: &Testbed) -> String {
    release_secret(tb, "cryopod-tls", "ca\\.crt")
}

/// One key of one of the release's Secrets, base64.
fn release_secret(tb: &Testbed, name: &str, key: &str) -> String {
    kubectl(
        tb,
        &[
            "get",
            "secret",
            name,
            "-n",
            RELEASE_NS,
            "-o",
            &format!("jsonpath={{.data.{key}}}"),
        ],
    )
}

/// What is left of the release, one `kind/name` a line.
fn release_objects(tb: &Testbed) -> String {
    kubectl(
        tb,
        &[
            "get",
            CHART_KINDS,
            "-A",
            "-l",
            INSTANCE,
            "-o",
            "name",
            "--ignore-not-found",
        ],
    )
}

/// The release's operator and agents, for diagnostics on failure.
fn release_logs(tb: &Testbed) -> String {
    let out = tb
        .kubectl()
        .args([
            "logs",
            "-n",
            RELEASE_NS,
            "-l",
            INSTANCE,
            "--all-containers",
            "--prefix",
            "--tail=40",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until a cryopod resource has ended, and checks that it is Ready; the
/// release's logs show why not.
async fn wait_ready(tb: &Testbed, ns: &str, resource: &str) {
    let ready = "{.status.conditions[?(@.type=='Ready')].status} {.status.phase}";
    let seen = wait_until(&format!("{resource} to end"), Duration::from_secs(180), || async {
        let out = tb
            .kubectl()
            .args(["get", "-n", ns, resource, "-o", &format!("jsonpath={ready}")])
            .output()
            .ok()?;
        let seen = String::from_utf8_lossy(&out.stdout).into_owned();
        let ended = ["Ready", "Succeeded", "Failed", "RolledBack"]
            .iter()
            .any(|p| seen.ends_with(&format!(" {p}")));
        ended.then_some(seen)
    })
    .await;
    assert!(
        seen.as_ref().is_ok_and(|s| s.starts_with("True ")),
        "{resource}: {seen:?}\n{}\n{}",
        kubectl(tb, &["describe", "-n", ns, resource]),
        release_logs(tb)
    );
}

/// The objects under a prefix of the testbed's bucket.
async fn stored_under(tb: &Testbed, prefix: &str) -> Vec<String> {
    let store = tb.s3_store(&tb.s3.endpoint, &tb.s3.secret_key).unwrap();
    store
        .list(Some(&ObjectPath::from(prefix)))
        .map(|o| o.unwrap().location.to_string())
        .collect()
        .await
}

/// Waits until every counter of a restored pod is past `floor` and returns them; a
/// pod that started afresh would count from 1.
async fn counting_on(data: &std::path::Path, floor: &[u64]) -> Vec<u64> {
    wait_until(
        "the restored counters to pass the source's",
        Duration::from_secs(30),
        || async {
            let now = counts(data);
            (now.len() == floor.len() && now.iter().zip(floor).all(|(n, f)| n > f)).then_some(now)
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn helm_install_checkpoint_restore_migrate_upgrade_uninstall() {
    let tb = Testbed::from_env().unwrap();
    let client = tb.client().await.unwrap();
    tb.install_crds().unwrap();
    // A release left by an interrupted run goes first. The other tests apply the
    // RuntimeClass and the fence policy without Helm; the release owns them here.
    uninstall(&tb, &["--ignore-not-found"]);
    kubectl(
        &tb,
        &[
            "delete",
            "runtimeclass/cryopod",
            "validatingadmissionpolicy/cryopod-restore-fence",
            "validatingadmissionpolicybinding/cryopod-restore-fence",
            "--ignore-not-found",
        ],
    );
    let install = cryopod_e2e::chart::testbed_install_args(&tb, RELEASE, RELEASE_NS);
    let chart = cryopod_e2e::chart::chart_dir();
    let chart = chart.to_str().unwrap();
    let installed = helm(&tb, &install.iter().map(String::as_str).collect::<Vec<_>>());
    println!("{installed}");
    let ca_before = release_ca(&tb);
    let signing_before = release_secret(&tb, "cryopod-signing", "key");
    assert!(signing_before.len() >= 64, "a signing key was made: {signing_before:?}");

    let ns = TestNamespace::create(&tb, &client, "e2e-helm").await.unwrap();
    security_only_the_operator_creates_pods_that_restore(&tb, &ns.name);
    security_requests_need_the_requesters_own_rights(&tb, &ns.name);
    security_moves_across_namespaces_and_evacuations_need_their_own_rights(&tb, &ns.name);
    security_a_checkpoints_owners_grant_it_and_nothing_else(&tb, &ns.name);
    security_only_an_agent_pod_gets_its_nodes_certificate(&tb, &ns.name).await;
    // The agents reach the S3 server from the nodes' network, at the hub's address.
    let storage = format!("s3-{}", ns.name);
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
                "stringData": {"accessKeyId": tb.s3.access_key, "secretAccessKey": tb.s3.secret_key}}),
    );
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "CheckpointStorage", "metadata": {"name": storage},
                "spec": {"type": "S3", "prefix": "helm-e2e",
                         "s3": {"endpoint": tb.s3.cluster_endpoint, "bucket": tb.s3.bucket, "forcePathStyle": true,
                                "credentialsSecretRef": {"name": "s3-creds", "namespace": ns.name}}}}),
    );
    // An age key pair for the encrypted checkpoint.
    let keys = age_keys();
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "age"},
                "stringData": {"recipients": keys.public, "identity": std::fs::read_to_string(&keys.identity).unwrap()}}),
    );

    // The stateful app: four containers on node-1.
    let (source, target) = (tb.nodes[0].clone(), tb.nodes[1].clone());
    let trio = start_trio(&tb, &client, &ns, &source).await;
    let before = counts(&trio.data);
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "sealed"},
                "spec": {"sourcePodName": "trio", "storage": storage, "encryption": {"secretRef": {"name": "age"}}}}),
    );
    wait_ready(&tb, &ns.name, "podcheckpoint/sealed").await;
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(client.clone(), &ns.name);
    let sealed = checkpoints.get("sealed").await.unwrap();
    let prefix = stored_prefix(&sealed);
    security_who_asked_is_recorded_and_kept(&tb, &ns.name, &sealed);
    let volume = stored_object(&tb, &sealed, "pod/volume/data.tar.zst").await;
    assert!(volume.starts_with(b"age-encryption.org/v1"), "the emptyDir is sealed");
    let timings = sealed.status.as_ref().unwrap().timings.unwrap();
    println!(
        "encrypted checkpoint by the installed operator: freeze window {:?} ms, total {:?} ms",
        timings.freeze_window_millis, timings.total_millis
    );

    // Restored on node-2, counting on from the checkpoint.
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore", "metadata": {"name": "back"},
                "spec": {"checkpointName": "sealed", "target": {"nodeName": target}}}),
    );
    wait_ready(&tb, &ns.name, "podrestore/back").await;
    let restores: Api<PodRestore> = Api::namespaced(client.clone(), &ns.name);
    let restored_name = restored_pod_name(&restores, "back").await;
    let restored = ns.pods(&client).get(&restored_name).await.unwrap();
    assert_eq!(
        restored.spec.as_ref().unwrap().node_name.as_deref(),
        Some(target.as_str())
    );
    let now = counting_on(&pod_data(&tb, &restored), &before).await;
    println!("restored {restored_name}: before the checkpoint {before:?}, restored {now:?}");
    assert!(ns.ready_without_restarts(&client, &restored_name).await.unwrap());

    // The source moves to node-2.
    let before_move = counts(&trio.data);
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration", "metadata": {"name": "move"},
                "spec": {"sourcePodName": "trio", "storage": storage, "target": {"nodeName": target}}}),
    );
    wait_ready(&tb, &ns.name, "podmigration/move").await;
    let migrations: Api<PodMigration> = Api::namespaced(client.clone(), &ns.name);
    let migration = migrations.get("move").await.unwrap();
    // What the operator made for the migration carries the migration's requester.
    let child = checkpoints.get("move-checkpoint").await.unwrap();
    assert_eq!(
        child.annotations().get("cryopod.io/requested-by"),
        migration.annotations().get("cryopod.io/requested-by")
    );
    let moved = migration.status.unwrap();
    let moved_name = moved.target_pod_name.clone().unwrap();
    let moved_pod = ns.pods(&client).get(&moved_name).await.unwrap();
    assert_eq!(
        moved_pod.spec.as_ref().unwrap().node_name.as_deref(),
        Some(target.as_str())
    );
    let now = counting_on(&pod_data(&tb, &moved_pod), &before_move).await;
    println!(
        "migrated trio -> {moved_name}: downtime {:?} ms; before {before_move:?}, now {now:?}",
        moved.downtime_millis
    );
    wait_until("the source to go", Duration::from_secs(30), || async {
        ns.pods(&client).get_opt("trio").await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap();

    // Deleting a checkpoint deletes its objects.
    kubectl(
        &tb,
        &["delete", "podcheckpoint", "sealed", "-n", &ns.name, "--timeout=60s"],
    );
    assert!(stored_under(&tb, &prefix).await.is_empty(), "objects of {prefix} left");

    // An upgrade keeps the certificates; the agents and operator serve on.
    helm(
        &tb,
        &[
            "upgrade",
            RELEASE,
            chart,
            "--namespace",
            RELEASE_NS,
            "--reuse-values",
            "--set",
            "operator.logLevel=debug",
            "--wait",
            "--timeout",
            "3m",
        ],
    );
    // Helm's --wait lets a DaemonSet's maxUnavailable (one agent) be down; every
    // agent is needed below, with its node's certificate asked for again.
    kubectl(
        &tb,
        &[
            "rollout",
            "status",
            "daemonset/cryopod-node-agent",
            "-n",
            RELEASE_NS,
            "--timeout=180s",
        ],
    );
    let ca_after = release_ca(&tb);
    assert_eq!(ca_before, ca_after, "the upgrade kept the CA");
    assert_eq!(
        signing_before,
        release_secret(&tb, "cryopod-signing", "key"),
        "the upgrade kept the signing key"
    );
    let before_default = counts(&pod_data(&tb, &moved_pod));
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodCheckpoint", "metadata": {"name": "after-upgrade"},
                "spec": {"sourcePodName": moved_name, "storage": storage}}),
    );
    wait_ready(&tb, &ns.name, "podcheckpoint/after-upgrade").await;
    // Sealed by default (the chart's encryption.byDefault) with a key of its own,
    // which its restore finds: back on node-1, counting on.
    let unsealed_spec = checkpoints.get("after-upgrade").await.unwrap();
    let volume = stored_object(&tb, &unsealed_spec, "pod/volume/data.tar.zst").await;
    assert!(volume.starts_with(b"age-encryption.org/v1"), "sealed by default");
    // Its key is in the operator's namespace, where no tenant creates Secrets.
    let key = format!("cryopod-key-{}", unsealed_spec.metadata.uid.as_deref().unwrap());
    let owner = kubectl(
        &tb,
        &[
            "get",
            "secret",
            &key,
            "-n",
            RELEASE_NS,
            "-o",
            "jsonpath={.metadata.labels.cryopod\\.io/checkpoint-name}",
        ],
    );
    assert_eq!(owner.trim(), "after-upgrade", "the key names its checkpoint");
    kubectl_apply(
        &tb,
        &ns.name,
        &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodRestore", "metadata": {"name": "by-default"},
                "spec": {"checkpointName": "after-upgrade", "target": {"nodeName": source}}}),
    );
    wait_ready(&tb, &ns.name, "podrestore/by-default").await;
    let restored_name = restored_pod_name(&restores, "by-default").await;
    let restored = ns.pods(&client).get(&restored_name).await.unwrap();
    let now = counting_on(&pod_data(&tb, &restored), &before_default).await;
    println!("restored the default-sealed checkpoint as {restored_name}: {now:?}");

    // Everything of ours goes while the operator still runs its finalizers.
    kubectl(
        &tb,
        &[
            "delete",
            "podmigrations,podrestores,podcheckpoints",
            "--all",
            "-n",
            &ns.name,
            "--timeout=90s",
        ],
    );
    let namespace_prefix = format!("helm-e2e/{}/", ns.name);
    assert!(
        stored_under(&tb, &namespace_prefix).await.is_empty(),
        "objects under {namespace_prefix} left"
    );
    // And so do the keys the operator sealed them with.
    let keys_left = kubectl(
        &tb,
        &[
            "get",
            "secrets",
            "-n",
            RELEASE_NS,
            "-l",
            &format!("cryopod.io/checkpoint-namespace={}", ns.name),
            "-o",
            "name",
        ],
    );
    assert!(keys_left.trim().is_empty(), "sealing keys left: {keys_left}");
    delete_storage(&tb, &storage);

    uninstall(&tb, &[]);
    // Only the signing key stays, on purpose: a reinstall must still verify the
    // checkpoints stored before.
    let kept = format!("secret/{RELEASE}-signing");
    let left = wait_until("the release's objects to go", Duration::from_secs(60), || async {
        let left = release_objects(&tb);
        (left.trim() == kept).then_some(left)
    })
    .await;
    assert!(left.is_ok(), "left behind: {}", release_objects(&tb));
    let crds = kubectl(&tb, &["get", "crds", "-o", "name"]);
    assert!(crds.contains("podcheckpoints.cryopod.io"), "Helm keeps CRDs: {crds}");
    kubectl(&tb, &["delete", "namespace", RELEASE_NS, "--wait=false"]);
    // For the tests that run without Helm.
    tb.install_crds().unwrap();
}
