//! Access to the running local cluster (`make cluster-up`) for end-to-end tests: its
//! kubeconfig, binaries and S3 server, a namespace per test with diagnostics on
//! failure, and waiting on conditions with deadlines.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;

/// A harness step failed.
#[derive(Debug)]
pub enum HarnessError {
    /// A variable that `e2e/run.sh` sets is missing: the test runs outside the tier.
    MissingEnv { name: &'static str },
    /// The cluster's kubeconfig could not be read.
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    /// A client could not be built from it.
    Client { source: kube::Error },
    /// An API call failed.
    Api { action: String, source: kube::Error },
    /// An object store client could not be built.
    Store { source: object_store::Error },
    /// A condition did not hold before its deadline.
    Timeout { what: String, after: Duration },
}

impl std::fmt::Display for HarnessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::MissingEnv { name } => write!(
                f,
                "{name} is not set: end-to-end tests run on the local cluster through `make e2e` (e2e/run.sh)"
            ),
            Self::Kubeconfig { path, .. } => write!(f, "cannot read the kubeconfig {}", path.display()),
            Self::Client { .. } => write!(f, "cannot build a Kubernetes client"),
            Self::Api { action, .. } => write!(f, "cannot {action}"),
            Self::Store { .. } => write!(f, "cannot build the S3 client"),
            Self::Timeout { what, after } => write!(f, "{what} did not happen within {after:?}"),
        }
    }
}

impl std::error::Error for HarnessError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Kubeconfig { source, .. } => Some(source),
            Self::Client { source } | Self::Api { source, .. } => Some(source),
            Self::Store { source } => Some(source),
            Self::MissingEnv { .. } | Self::Timeout { .. } => None,
        }
    }
}

fn env(name: &'static str) -> Result<String, HarnessError> {
    std::env::var(name).map_err(|_| HarnessError::MissingEnv { name })
}

/// Settings of the cluster's S3 server, as seen from the host.
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// `http://127.0.0.1:<port>`: the S3 server as the host reaches it.
    pub endpoint: String,
    /// The S3 server as the nodes and pods reach it (the hub's address).
    pub cluster_endpoint: String,
    /// The bucket cluster-up creates.
    pub bucket: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: String,
}

/// The running local cluster.
#[derive(Debug, Clone)]
pub struct Testbed {
    /// State directory of the cluster.
    pub dir: PathBuf,
    /// Admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// Directory of kubectl and the other Kubernetes binaries.
    pub kube_bin: PathBuf,
    /// Prefix with containerd, CRIU and checkpointctl.
    pub node_packages: PathBuf,
    /// The S3 server.
    pub s3: S3Settings,
    /// Node names.
    pub nodes: Vec<String>,
}

impl Testbed {
    /// Reads what `e2e/run.sh` exports. Missing variables are an error, never a skip.
    pub fn from_env() -> Result<Self, HarnessError> {
        let dir = PathBuf::from(env("CRYOPOD_TESTBED")?);
        Ok(Self {
            kubeconfig: dir.join("admin.kubeconfig"),
            dir,
            kube_bin: PathBuf::from(env("CRYOPOD_KUBE_BIN")?),
            node_packages: PathBuf::from(env("CRYOPOD_NODE_PACKAGES")?),
            s3: S3Settings {
                endpoint: env("CRYOPOD_S3_ENDPOINT")?,
                cluster_endpoint: env("CRYOPOD_S3_CLUSTER_ENDPOINT")?,
                bucket: env("CRYOPOD_S3_BUCKET")?,
                access_key: env("CRYOPOD_S3_ACCESS_KEY")?,
                secret_key: env("CRYOPOD_S3_SECRET_KEY")?,
            },
            nodes: env("CRYOPOD_NODES")?.split_whitespace().map(str::to_owned).collect(),
        })
    }

    /// A client with the admin credentials.
    pub async fn client(&self) -> Result<kube::Client, HarnessError> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).map_err(|source| HarnessError::Kubeconfig {
            path: self.kubeconfig.clone(),
            source,
        })?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|source| HarnessError::Kubeconfig {
                path: self.kubeconfig.clone(),
                source,
            })?;
        kube::Client::try_from(config).map_err(|source| HarnessError::Client { source })
    }

    /// The CRI socket of `node`'s containerd.
    pub fn cri_socket(&self, node: &str) -> PathBuf {
        self.dir.join(node).join("containerd/containerd.sock")
    }

    /// `kubectl` against the cluster.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.kube_bin.join("kubectl"));
        cmd.env("KUBECONFIG", &self.kubeconfig);
        cmd
    }

    /// `kubectl apply` of one document (JSON or YAML), in namespace `ns` if given; the
    /// error carries kubectl's.
    pub fn kubectl_apply(&self, ns: Option<&str>, doc: &str) -> Result<(), String> {
        let mut cmd = self.kubectl();
        cmd.arg("apply");
        if let Some(ns) = ns {
            cmd.args(["-n", ns]);
        }
        let mut apply = cmd
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("kubectl: {e}"))?;
        if let Some(mut stdin) = apply.stdin.take() {
            std::io::Write::write_all(&mut stdin, doc.as_bytes()).map_err(|e| format!("kubectl: {e}"))?;
        }
        let out = apply.wait_with_output().map_err(|e| format!("kubectl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("kubectl apply: {}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Installs the generated CRDs, the restore fence policy and the RuntimeClass (as
    /// the chart does) and waits until the CRDs serve.
    pub fn install_crds(&self) -> Result<(), String> {
        let runtime_class = r#"{"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                                "metadata": {"name": "cryopod"}, "handler": "cryopod"}"#;
        self.kubectl_apply(None, runtime_class)?;
        let dir = repo_root().join("charts/cryopod/crds");
        let dir = dir.to_string_lossy();
        let fence = repo_root().join("charts/cryopod/files/restore-fence.yaml");
        let fence = fence.to_string_lossy();
        for args in [
            vec!["apply", "--server-side", "--force-conflicts", "-f", &dir],
            vec!["apply", "--server-side", "--force-conflicts", "-f", &fence],
            vec!["wait", "--for=condition=Established", "--timeout=60s", "-f", &dir],
        ] {
            let out = self.kubectl().args(&args).output().map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!(
                    "kubectl {}: {}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        Ok(())
    }

    /// A client of the S3 server at `endpoint` (the testbed's own, or another to
    /// simulate an outage) with the given secret. It retries once, so a store that
    /// is down fails fast.
    pub fn s3_store(&self, endpoint: &str, secret: &str) -> Result<Arc<dyn ObjectStore>, HarnessError> {
        let store = AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_bucket_name(&self.s3.bucket)
            .with_access_key_id(&self.s3.access_key)
            .with_secret_access_key(secret)
            .with_region("us-east-1")
            .with_retry(object_store::RetryConfig {
                max_retries: 1,
                ..Default::default()
            })
            .build()
            .map_err(|source| HarnessError::Store { source })?;
        Ok(Arc::new(store))
    }

    /// `checkpointctl show <archive>`: its output, or why it failed.
    pub fn checkpointctl_show(&self, archive: &Path) -> Result<String, String> {
        let out = Command::new(self.node_packages.join("bin/checkpointctl"))
            .arg("show")
            .arg(archive)
            .output()
            .map_err(|e| format!("cannot run checkpointctl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

/// Polls `probe` until it yields a value or `timeout` passes.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T, HarnessError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(HarnessError::Timeout {
                what: what.to_owned(),
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Whether a pod's `Ready` condition is true.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A namespace of one test. On a failing test it prints the pods, their events and
/// logs; it is deleted in every case.
#[derive(Debug)]
pub struct TestNamespace {
    /// Namespace name.
    pub name: String,
    testbed: Testbed,
}

impl TestNamespace {
    /// Creates `<prefix>-<random suffix>`.
    pub async fn create(testbed: &Testbed, client: &kube::Client, prefix: &str) -> Result<Self, HarnessError> {
        let api: Api<Namespace> = Api::all(client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}-")),
                labels: Some([("cryopod.io/e2e".to_owned(), "true".to_owned())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let created = api
            .create(&PostParams::default(), &ns)
            .await
            .map_err(|source| HarnessError::Api {
                action: format!("create a namespace for {prefix}"),
                source,
            })?;
        let name = created.metadata.name.unwrap_or_default();
        // Pods need the namespace's default service account before they are admitted.
        let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &name);
        wait_until("the default service account", Duration::from_secs(30), || async {
            sa.get_opt("default").await.ok().flatten()
        })
        .await?;
        Ok(Self {
            name,
            testbed: testbed.clone(),
        })
    }

    /// Pods of this namespace.
    pub fn pods(&self, client: &kube::Client) -> Api<Pod> {
        Api::namespaced(client.clone(), &self.name)
    }

    /// Waits until the pod is Ready and returns it.
    pub async fn wait_ready(&self, client: &kube::Client, pod: &str, timeout: Duration) -> Result<Pod, HarnessError> {
        let api = self.pods(client);
        wait_until(&format!("pod {}/{pod} Ready", self.name), timeout, || async {
            api.get_opt(pod).await.ok().flatten().filter(pod_ready)
        })
        .await
    }

    /// Whether every container of the pod is ready and has never restarted.
    pub async fn ready_without_restarts(&self, client: &kube::Client, pod: &str) -> Result<bool, HarnessError> {
        let pod = self.pods(client).get(pod).await.map_err(|source| HarnessError::Api {
            action: format!("read pod {pod}"),
            source,
        })?;
        let statuses = pod.status.and_then(|s| s.container_statuses).unwrap_or_default();
        Ok(!statuses.is_empty() && statuses.iter().all(|s| s.ready && s.restart_count == 0))
    }

    fn dump(&self) {
        eprintln!("---- diagnostics of namespace {} ----", self.name);
        let ns = self.name.as_str();
        for args in [
            vec!["get", "pods", "-o", "wide", "-n", ns],
            vec!["describe", "pods", "-n", ns],
            vec![
                "logs",
                "--all-containers",
                "--prefix",
                "--tail=50",
                "-n",
                ns,
                "-l",
                "cryopod.io/e2e-pod",
            ],
        ] {
            if let Ok(out) = self.testbed.kubectl().args(&args).output() {
                eprintln!(
                    "$ kubectl {}\n{}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        eprintln!("node logs: {}", self.testbed.dir.join("logs").display());
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        let _ = self
            .testbed
            .kubectl()
            .args(["delete", "namespace", &self.name, "--wait=false", "--ignore-not-found"])
            .output();
    }
}

/// Deletes a pod immediately.
pub async fn delete_pod_now(api: &Api<Pod>, name: &str) -> Result<(), HarnessError> {
    api.delete(
        name,
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .map(drop)
    .map_err(|source| HarnessError::Api {
        action: format!("delete pod {name}"),
        source,
    })
}

/// The repository root, for reading examples and manifests.
pub fn repo_root() -> PathBuf {
    // Cargo's run-time value: a binary reused from a build in another checkout (one
    // target directory for several) still reads this checkout's files.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("..")
}
