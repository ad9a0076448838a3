//! The node's container runtime over CRI (`runtime.v1`), reached on its unix socket.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// Generated CRI messages and client.
#[allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod api {
    tonic::include_proto!("runtime.v1");
}

use api::runtime_service_client::RuntimeServiceClient;

/// A CRI call failed.
#[derive(Debug)]
pub enum CriError {
    /// The socket could not be reached.
    Connect {
        socket: PathBuf,
        source: tonic::transport::Error,
    },
    /// A call was refused or failed.
    Call {
        call: &'static str,
        source: Box<tonic::Status>,
    },
}

impl std::fmt::Display for CriError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect { socket, .. } => write!(f, "cannot reach the container runtime at {}", socket.display()),
            Self::Call { call, source } => write!(f, "the container runtime refused {call}: {}", source.message()),
        }
    }
}

impl std::error::Error for CriError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Connect { source, .. } => Some(source),
            Self::Call { source, .. } => Some(source.as_ref()),
        }
    }
}

/// A sandbox with its verbose status.
#[derive(Clone, Debug)]
pub struct SandboxView {
    /// The sandbox's status.
    pub status: api::PodSandboxStatus,
    /// The runtime's verbose info (JSON strings by key; containerd uses `info`).
    pub info: HashMap<String, String>,
}

/// A container with its verbose status.
#[derive(Clone, Debug)]
pub struct ContainerView {
    /// The container's status.
    pub status: api::ContainerStatus,
    /// The runtime's verbose info (JSON strings by key; containerd uses `info`).
    pub info: HashMap<String, String>,
}

/// What the agent asks of the container runtime; a trait so discovery is tested
/// without one.
pub trait ContainerRuntime: Send + Sync {
    /// The ready sandboxes of the pod with this UID.
    fn sandboxes_of_pod(
        &self,
        pod_uid: &str,
    ) -> impl std::future::Future<Output = Result<Vec<SandboxView>, CriError>> + Send;
    /// The containers of a sandbox, with verbose status.
    fn containers_of_sandbox(
        &self,
        sandbox_id: &str,
    ) -> impl std::future::Future<Output = Result<Vec<ContainerView>, CriError>> + Send;
    /// Runs a command in a container and waits for it (at most `timeout`).
    fn exec_sync(
        &self,
        container_id: &str,
        command: &[String],
        timeout: std::time::Duration,
    ) -> impl std::future::Future<Output = Result<ExecOutput, CriError>> + Send;
}

/// What a command run in a container returned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code; 0 is success.
    pub exit_code: i32,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error.
    pub stderr: Vec<u8>,
}

/// A CRI client on a unix socket.
#[derive(Debug, Clone)]
pub struct CriClient {
    client: RuntimeServiceClient<Channel>,
}

impl CriClient {
    /// Connects to the runtime's unix socket (e.g. `/run/containerd/containerd.sock`).
    pub async fn connect(socket: &Path) -> Result<Self, CriError> {
        let path = socket.to_path_buf();
        // The URI is required by the API but unused: the connector dials the socket.
        let channel = Endpoint::from_static("http://cri.invalid")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
            }))
            .await
            .map_err(|source| CriError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        Ok(Self {
            client: RuntimeServiceClient::new(channel),
        })
    }
}

fn call_error(call: &'static str) -> impl FnOnce(tonic::Status) -> CriError {
    move |status| CriError::Call {
        call,
        source: Box::new(status),
    }
}

impl ContainerRuntime for CriClient {
    async fn sandboxes_of_pod(&self, pod_uid: &str) -> Result<Vec<SandboxView>, CriError> {
        let mut client = self.client.clone();
        let filter = api::PodSandboxFilter {
            state: Some(api::PodSandboxStateValue {
                state: api::PodSandboxState::SandboxReady as i32,
            }),
            label_selector: [("io.kubernetes.pod.uid".to_owned(), pod_uid.to_owned())].into(),
            ..Default::default()
        };
        let list = client
            .list_pod_sandbox(api::ListPodSandboxRequest { filter: Some(filter) })
            .await
            .map_err(call_error("ListPodSandbox"))?
            .into_inner();
        let mut views = Vec::new();
        for sandbox in list.items {
            let status = client
                .pod_sandbox_status(api::PodSandboxStatusRequest {
                    pod_sandbox_id: sandbox.id,
                    verbose: true,
                })
                .await
                .map_err(call_error("PodSandboxStatus"))?
                .into_inner();
            if let Some(s) = status.status {
                views.push(SandboxView {
                    status: s,
                    info: status.info,
                });
            }
        }
        Ok(views)
    }

    async fn containers_of_sandbox(&self, sandbox_id: &str) -> Result<Vec<ContainerView>, CriError> {
        let mut client = self.client.clone();
        let filter = api::ContainerFilter {
            pod_sandbox_id: sandbox_id.to_owned(),
            ..Default::default()
        };
        let list = client
            .list_containers(api::ListContainersRequest { filter: Some(filter) })
            .await
            .map_err(call_error("ListContainers"))?
            .into_inner();
        let mut views = Vec::new();
        for container in list.containers {
            let status = client
                .container_status(api::ContainerStatusRequest {
                    container_id: container.id,
                    verbose: true,
                })
                .await
                .map_err(call_error("ContainerStatus"))?
                .into_inner();
            if let Some(s) = status.status {
                views.push(ContainerView {
                    status: s,
                    info: status.info,
                });
            }
        }
        Ok(views)
    }

    async fn exec_sync(
        &self,
        container_id: &str,
        command: &[String],
        timeout: std::time::Duration,
    ) -> Result<ExecOutput, CriError> {
        let mut client = self.client.clone();
        let reply = client
            .exec_sync(api::ExecSyncRequest {
                container_id: container_id.to_owned(),
                cmd: command.to_vec(),
                // The runtime counts whole seconds; round up so a short deadline is not 0 (none).
                timeout: timeout.as_secs().max(1) as i64,
            })
            .await
            .map_err(call_error("ExecSync"))?
            .into_inner();
        Ok(ExecOutput {
            exit_code: reply.exit_code,
            stdout: reply.stdout,
            stderr: reply.stderr,
        })
    }
}
