//! Migration downtime: cryopod's PodMigration, through the chart as users install it,
//! against the per-container path users have today: the kubelet's checkpoint API,
//! one container after the other, and a plain upload of each archive.
//!
//! The per-container path cannot restore here: containerd 2.1 does not recognise a
//! checkpoint image (its CreateContainer fails with "no command specified"). Its
//! restore is credited with cryopod's own restore time from the same repeat, so the
//! baseline is a lower bound and the ratio errs in its favour.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryopod_crds::v1alpha1::{MigrationPhase, PodCheckpoint, PodMigration, PodRestore};
use cryopod_e2e::testbed::{TestNamespace, Testbed, wait_until};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, LogParams, PostParams};
use object_store::ObjectStore;
use serde_json::json;

use crate::measure::{Failure, memory_pod, ms, plain_upload_file, settle_disk, wait_filled};

/// The release the bench installs.
const RELEASE: &str = "cryopod";
const RELEASE_NS: &str = "cryopod-system";

/// One repeat's figures, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MigrationSample {
    /// cryopod through the object store (`transfer: ViaStore`): from the freeze on the
    /// source to the restored pod Ready on the target.
    pub downtime_ms: f64,
    /// Its restore part: the downtime after the checkpoint was stored.
    pub restore_ms: f64,
    /// cryopod agent to agent (`transfer: Direct`): the same span.
    pub direct_downtime_ms: f64,
    /// Its restore part.
    pub direct_restore_ms: f64,
    /// The kubelet's checkpoints of the containers, one after the other.
    pub kubelet_checkpoints_ms: f64,
    /// The second container's checkpoint began this long after the first's.
    pub capture_skew_ms: f64,
    /// Uploading the kubelet's archives, one after the other.
    pub archive_upload_ms: f64,
}

impl MigrationSample {
    /// The per-container path's downtime: its checkpoints and uploads, then a restore
    /// credited with cryopod's.
    pub fn per_container_ms(&self) -> f64 {
        self.kubelet_checkpoints_ms + self.archive_upload_ms + self.restore_ms
    }
}

/// Runs `helm`, naming the command on failure.
fn helm(tb: &Testbed, helm_bin: &Path, args: &[&str]) -> Result<String, Failure> {
    let out = std::process::Command::new(helm_bin)
        .env("KUBECONFIG", &tb.kubeconfig)
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", helm_bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "helm {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies one object with kubectl.
fn apply(tb: &Testbed, ns: &str, doc: &serde_json::Value) -> Result<(), Failure> {
    tb.kubectl_apply(Some(ns), &doc.to_string())
}

/// The chart installed, and a namespace with S3 storage; removed by [`Installed::remove`].
struct Installed {
    ns: TestNamespace,
    storage: String,
    helm_bin: PathBuf,
}

/// `helm uninstall` of the bench's release, if there is one.
fn uninstall(tb: &Testbed, helm_bin: &Path) {
    let _ = helm(
        tb,
        helm_bin,
        &[
            "uninstall",
            RELEASE,
            "--namespace",
            RELEASE_NS,
            "--ignore-not-found",
            "--wait",
            "--timeout",
            "2m",
        ],
    );
}

/// Deletes every object of kind `K` in `ns`, and after `patience` strips the
/// finalizers of those left (their controller may be gone).
async fn delete_all<K>(client: &kube::Client, ns: &str, patience: Duration)
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let _ = api
        .delete_collection(&DeleteParams::default(), &Default::default())
        .await;
    let gone = wait_until("the bench's objects deleted", patience, || async {
        api.list(&Default::default()).await.ok().filter(|l| l.items.is_empty())
    })
    .await;
    if gone.is_err()
        && let Ok(left) = api.list(&Default::default()).await
    {
        for object in left.items {
            let name = object.meta().name.clone().unwrap_or_default();
            let _ = api
                .patch(
                    &name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(json!({"metadata": {"finalizers": null}})),
                )
                .await;
        }
    }
}

impl Installed {
    async fn install(tb: &Testbed, client: &kube::Client, helm_bin: &Path) -> Result<Self, Failure> {
        tb.install_crds()?;
        // A release left by an interrupted run goes first. The chart owns these
        // objects; a run of the e2e tests may have applied them bare.
        uninstall(tb, helm_bin);
        let _ = tb
            .kubectl()
            .args([
                "delete",
                "runtimeclass/cryopod",
                "validatingadmissionpolicy/cryopod-restore-fence",
                "validatingadmissionpolicybinding/cryopod-restore-fence",
                "--ignore-not-found",
            ])
            .output();
        let install = cryopod_e2e::chart::testbed_install_args(tb, RELEASE, RELEASE_NS);
        let installed = async {
            helm(tb, helm_bin, &install.iter().map(String::as_str).collect::<Vec<_>>())?;
            let ns = TestNamespace::create(tb, client, "bench-migrate")
                .await
                .map_err(|e| e.to_string())?;
            let storage = format!("s3-{}", ns.name);
            let name = ns.name.clone();
            apply(
                tb,
                &name,
                &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
                        "stringData": {"accessKeyId": tb.s3.access_key, "secretAccessKey": tb.s3.secret_key}}),
            )?;
            apply(
                tb,
                &name,
                &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "CheckpointStorage",
                        "metadata": {"name": storage},
                        "spec": {"type": "S3", "prefix": "bench-migrate",
                                 "s3": {"endpoint": tb.s3.cluster_endpoint, "bucket": tb.s3.bucket,
                                        "forcePathStyle": true,
                                        "credentialsSecretRef": {"name": "s3-creds", "namespace": name}}}}),
            )?;
            Ok::<_, Failure>(Self {
                ns,
                storage,
                helm_bin: helm_bin.to_owned(),
            })
        }
        .await;
        if installed.is_err() {
            uninstall(tb, helm_bin);
        }
        installed
    }

    /// Deletes the bench's objects while the operator still runs (its finalizers
    /// delete the stored checkpoints), then the namespace, then the release.
    async fn remove(self, tb: &Testbed, client: &kube::Client) {
        let name = self.ns.name.clone();
        delete_all::<PodMigration>(client, &name, Duration::from_secs(60)).await;
        delete_all::<PodRestore>(client, &name, Duration::from_secs(60)).await;
        delete_all::<PodCheckpoint>(client, &name, Duration::from_secs(120)).await;
        drop(self.ns);
        uninstall(tb, &self.helm_bin);
    }
}

/// Measures migrations of a pod with `mib` MiB over two containers, `repeats` times,
/// from `source` to `target`.
pub async fn migrations(
    tb: &Testbed,
    client: &kube::Client,
    store: &Arc<dyn ObjectStore>,
    helm_bin: &Path,
    sizes: &[u64],
    repeats: usize,
) -> Result<Vec<(u64, Vec<MigrationSample>)>, Failure> {
    let (source, target) = match tb.nodes.as_slice() {
        [a, b, ..] => (a.as_str(), b.as_str()),
        _ => return Err("the bench needs two nodes".into()),
    };
    let installed = Installed::install(tb, client, helm_bin).await?;
    let mut result = Ok(Vec::new());
    'sizes: for &mib in sizes {
        println!("migration of a pod with {mib} MiB over 2 containers, {repeats} repeats");
        let mut samples = Vec::new();
        for repeat in 1..=repeats {
            let run = Run {
                tb,
                client,
                store,
                ns: &installed.ns,
                storage: &installed.storage,
                source,
                target,
            };
            match run.one(mib, repeat).await {
                Ok(sample) => {
                    println!(
                        "  downtime ViaStore {:.0} ms (restore part {:.0} ms), Direct {:.0} ms (restore part {:.0} ms); \
                         per-container path: kubelet checkpoints {:.0} ms ({:.0} ms apart), uploads {:.0} ms",
                        sample.downtime_ms,
                        sample.restore_ms,
                        sample.direct_downtime_ms,
                        sample.direct_restore_ms,
                        sample.kubelet_checkpoints_ms,
                        sample.capture_skew_ms,
                        sample.archive_upload_ms
                    );
                    samples.push(sample);
                }
                Err(e) => {
                    result = Err(e);
                    break 'sizes;
                }
            }
        }
        if let Ok(all) = result.as_mut() {
            all.push((mib, samples));
        }
    }
    installed.remove(tb, client).await;
    result
}

/// One repeat's surroundings.
struct Run<'a> {
    tb: &'a Testbed,
    client: &'a kube::Client,
    store: &'a Arc<dyn ObjectStore>,
    ns: &'a TestNamespace,
    storage: &'a str,
    source: &'a str,
    target: &'a str,
}

impl Run<'_> {
    async fn one(&self, mib: u64, repeat: usize) -> Result<MigrationSample, Failure> {
        let (downtime_ms, restore_ms) = self.migrate(&format!("m{mib}-{repeat}"), mib, "ViaStore").await?;
        let (direct_downtime_ms, direct_restore_ms) = self.migrate(&format!("d{mib}-{repeat}"), mib, "Direct").await?;
        let (kubelet_checkpoints_ms, capture_skew_ms, archive_upload_ms) =
            self.per_container(&format!("k{mib}-{repeat}"), mib).await?;
        Ok(MigrationSample {
            downtime_ms,
            restore_ms,
            direct_downtime_ms,
            direct_restore_ms,
            kubelet_checkpoints_ms,
            capture_skew_ms,
            archive_upload_ms,
        })
    }

    async fn start(&self, name: &str, mib: u64) -> Result<Api<Pod>, Failure> {
        let pods = self.ns.pods(self.client);
        let pod = memory_pod(name, self.source, mib / 2)?;
        pods.create(&PostParams::default(), &pod)
            .await
            .map_err(|e| format!("create pod {name}: {e}"))?;
        self.ns
            .wait_ready(self.client, name, Duration::from_secs(120))
            .await
            .map_err(|e| e.to_string())?;
        wait_filled(&pods, name).await?;
        Ok(pods)
    }

    /// cryopod's migration with `transfer`: its downtime and its restore part, in ms.
    /// Checks that the restored processes went on (each filled its memory once, no
    /// restart).
    async fn migrate(&self, name: &str, mib: u64, transfer: &str) -> Result<(f64, f64), Failure> {
        let pods = self.start(name, mib).await?;
        let ns = self.ns.name.as_str();
        let migration = format!("{name}-move");
        settle_disk();
        let spec = if transfer == "Direct" {
            json!({"sourcePodName": name, "transfer": transfer, "target": {"nodeName": self.target}})
        } else {
            json!({"sourcePodName": name, "storage": self.storage, "transfer": transfer,
                   "target": {"nodeName": self.target}})
        };
        apply(
            self.tb,
            ns,
            &json!({"apiVersion": "cryopod.io/v1alpha1", "kind": "PodMigration", "metadata": {"name": migration},
                    "spec": spec}),
        )?;
        let migrations: Api<PodMigration> = Api::namespaced(self.client.clone(), ns);
        let checkpoints: Api<PodCheckpoint> = Api::namespaced(self.client.clone(), ns);
        // A Direct migration deletes its checkpoint as it ends: its freeze window is
        // read while it runs.
        let frozen_ms = std::sync::Mutex::new(None::<i64>);
        let parts = std::sync::Mutex::new(String::new());
        let restores: Api<PodRestore> = Api::namespaced(self.client.clone(), ns);
        let ended = wait_until(
            &format!("PodMigration {migration} to end"),
            Duration::from_secs(600),
            || async {
                let m = migrations.get(&migration).await.ok()?;
                if let Some(name) = m.status.as_ref().and_then(|s| s.checkpoint_name.as_deref())
                    && let Ok(cp) = checkpoints.get(name).await
                    && let Some(t) = cp.status.and_then(|s| s.timings)
                    && let Some(window) = t.freeze_window_millis
                {
                    let r = match m.status.as_ref().and_then(|s| s.restore_name.as_deref()) {
                        Some(name) => restores.get(name).await.ok().and_then(|r| r.status?.timings),
                        None => None,
                    };
                    if let Ok(mut seen) = frozen_ms.lock() {
                        *seen = Some(window);
                    }
                    if let Ok(mut parts) = parts.lock() {
                        *parts = format!(
                            "dump {:?} ms, package and store {:?} ms; restore: fetch {:?} ms, restore {:?} ms",
                            t.dump_millis,
                            t.upload_millis,
                            r.as_ref().and_then(|r| r.fetch_millis),
                            r.as_ref().and_then(|r| r.restore_millis)
                        );
                    }
                }
                m.status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(|p| {
                        matches!(
                            p,
                            MigrationPhase::Succeeded | MigrationPhase::RolledBack | MigrationPhase::Failed
                        )
                    })
                    .then_some(m)
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        let status = ended.status.unwrap_or_default();
        if status.phase != Some(MigrationPhase::Succeeded) {
            let why = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| format!("{}: {}", c.reason, c.message))
                .unwrap_or_default();
            return Err(format!("PodMigration {ns}/{migration} did not succeed: {why}"));
        }
        let downtime = status
            .downtime_millis
            .ok_or_else(|| format!("PodMigration {migration} has no downtimeMillis"))? as f64;
        // The migration's checkpoint holds the pod frozen until it is stored.
        let frozen = frozen_ms
            .lock()
            .ok()
            .and_then(|seen| *seen)
            .ok_or_else(|| format!("the PodCheckpoint of {migration} showed no freeze window"))?
            as f64;
        println!(
            "    {transfer}: downtime {downtime} ms: {}",
            parts.lock().map(|p| p.clone()).unwrap_or_default()
        );
        let restored = status.target_pod_name.unwrap_or_default();
        let pod = pods
            .get(&restored)
            .await
            .map_err(|e| format!("read restored pod {restored}: {e}"))?;
        let restarts: i32 = pod
            .status
            .and_then(|s| s.container_statuses)
            .unwrap_or_default()
            .iter()
            .map(|c| c.restart_count)
            .sum();
        for container in ["a", "b"] {
            let log = pods
                .logs(
                    &restored,
                    &LogParams {
                        container: Some(container.to_owned()),
                        ..LogParams::default()
                    },
                )
                .await
                .unwrap_or_default();
            if restarts != 0 || log.contains("filled") {
                return Err(format!(
                    "restored pod {restored}: container {container} started afresh ({restarts} restarts, log {log:?})"
                ));
            }
        }
        let _ = pods.delete(&restored, &DeleteParams::default()).await;
        Ok((downtime, downtime - frozen))
    }

    /// The per-container path: the kubelet's checkpoint of each container, one after
    /// the other, then a plain upload of each archive. Returns the checkpoints' time,
    /// how far apart the two began and the uploads' time, in ms.
    async fn per_container(&self, name: &str, mib: u64) -> Result<(f64, f64, f64), Failure> {
        let pods = self.start(name, mib).await?;
        let ns = self.ns.name.as_str();
        let prefix = format!("bench-per-container/{ns}/{name}/");
        let mut archives = Vec::new();
        let measured = async {
            settle_disk();
            let started = Instant::now();
            let mut began = Vec::new();
            for container in ["a", "b"] {
                began.push(started.elapsed());
                archives.push(self.kubelet_checkpoint(ns, name, container).await?);
            }
            let checkpoints = ms(started.elapsed());
            let skew = ms(began[1] - began[0]);
            let started = Instant::now();
            for archive in &archives {
                plain_upload_file(self.store, archive, &prefix).await?;
            }
            Ok::<_, Failure>((checkpoints, skew, ms(started.elapsed())))
        }
        .await;
        // Whatever happened: the archives are as large as the containers' memory.
        let _ = cryopod_node_agent::store::delete_prefix(self.store, &prefix).await;
        for archive in &archives {
            let _ = std::fs::remove_file(archive);
        }
        let _ = pods
            .delete(
                name,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                },
            )
            .await;
        measured
    }

    /// `POST /checkpoint/{ns}/{pod}/{container}` on the source's kubelet, through the
    /// API server's node proxy; the archive's path on this machine.
    async fn kubelet_checkpoint(&self, ns: &str, pod: &str, container: &str) -> Result<PathBuf, Failure> {
        let uri = format!("/api/v1/nodes/{}/proxy/checkpoint/{ns}/{pod}/{container}", self.source);
        let request = http::Request::post(&uri)
            .body(Vec::new())
            .map_err(|e| format!("{uri}: {e}"))?;
        let answer: serde_json::Value = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("the kubelet's checkpoint of {pod}/{container}: {e}"))?;
        let path = answer["items"][0]
            .as_str()
            .ok_or_else(|| format!("the kubelet's checkpoint of {pod}/{container} answered {answer}"))?;
        // The testbed's kubelets share this machine's mount namespace.
        Ok(PathBuf::from(path))
    }
}
