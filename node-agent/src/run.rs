//! The agent process: configuration from the environment (the DaemonSet sets it,
//! the node name from the downward API), crash recovery before serving, then the gRPC
//! service over mutual TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::cgroup::{CgroupVersion, Freezer, freezer_for};
use crate::checkpoint::NodeAgent;
use crate::cri::CriClient;
use crate::dump::NodeExec;
use crate::journal::{Journal, recover};
use crate::metrics::AgentMetrics;
use crate::package::NodeFacts;
use crate::server::AgentService;
use crate::server::pb::node_agent_server::NodeAgentServer;

/// Settings of the agent process.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `CRYOPOD_NODE_NAME` (required; the downward API's `spec.nodeName`).
    pub node_name: String,
    /// `CRYOPOD_LISTEN`, default `0.0.0.0:9443`.
    pub listen: SocketAddr,
    /// `CRYOPOD_METRICS_LISTEN`, default `0.0.0.0:9090`: Prometheus `/metrics`, plain HTTP.
    pub metrics_listen: SocketAddr,
    /// `CRYOPOD_TLS_DIR` (required): `tls.crt`, `tls.key` and the client CA `ca.crt`.
    pub tls_dir: PathBuf,
    /// `CRYOPOD_CRI_SOCKET`, default `/run/containerd/containerd.sock`.
    pub cri_socket: PathBuf,
    /// `CRYOPOD_CGROUP`: `v1:<freezer mount>` or `v2:<unified mount>`; detected if unset.
    pub cgroup: (CgroupVersion, PathBuf),
    /// `CRYOPOD_STATE_DIR`, default `/var/lib/cryopod`: `journal/`, `work/` and `restores/` (read by the runtime handler).
    pub state_dir: PathBuf,
    /// `CRYOPOD_NODE_EXEC`: words put before node commands, e.g. `nsenter -t {runtime-pid} -m --`
    /// ([`crate::dump::RUNTIME_PID`]: the container runtime's PID).
    pub node_exec: Vec<String>,
    /// `CRYOPOD_CRIU_DIR`: a directory put first in PATH for runc to find `criu`.
    pub criu_dir: Option<PathBuf>,
    /// `CRYOPOD_CLIENT_NAME`, default `cryopod-operator`: the name (common name or DNS
    /// name) the one client allowed, the operator, has in its certificate.
    pub client_name: String,
    /// `CRYOPOD_MANIFEST_KEY_FILE` (required): the key, shared by every agent of the
    /// cluster and no one else, that signs and verifies checkpoint manifests.
    pub manifest_key_file: PathBuf,
    /// `CRYOPOD_CERT_SIGNER`: when set (the chart sets `cryopod.io/node-agent`), the
    /// agent makes its own key at start and asks this signer, through a Kubernetes
    /// CertificateSigningRequest, for a certificate naming its node; `tls.crt` and
    /// `tls.key` are then not read. Unset: the pair in `CRYOPOD_TLS_DIR` is served.
    pub cert_signer: Option<String>,
    /// `CRYOPOD_CERT_VALIDITY_SECONDS`, default 365 days: how long the certificate
    /// asked for lasts; the agent drains and exits (to be restarted with a new one)
    /// after two thirds of it.
    pub cert_validity: std::time::Duration,
    /// `CRYOPOD_LOCAL_ROOTS`, default `/var/lib/cryopod/checkpoints`: colon-separated
    /// absolute directories under which Local checkpoint storage may read and write.
    pub local_roots: Vec<PathBuf>,
    /// `CRYOPOD_DRAIN_SECONDS`, default 120: after SIGTERM, how long operations may
    /// finish and held pods wait for their release before they are thawed.
    pub drain: std::time::Duration,
}

/// Starting or running the agent failed.
#[derive(Debug)]
pub enum RunError {
    /// A setting is missing or malformed.
    Config { variable: &'static str, problem: String },
    /// A TLS file could not be read.
    Tls { path: PathBuf, source: std::io::Error },
    /// The crash journal could not be read.
    Journal { source: crate::journal::JournalError },
    /// The container runtime could not be reached.
    Runtime { source: crate::cri::CriError },
    /// The server failed.
    Serve { source: tonic::transport::Error },
    /// This node's certificate could not be had.
    Certificate { problem: String },
    /// The metrics port could not be opened.
    Metrics { source: std::io::Error },
    /// Installing the runtime handler failed.
    Install { source: std::io::Error },
    /// The process of the container runtime, named in `CRYOPOD_NODE_EXEC`, was not found.
    NodeExec { source: std::io::Error },
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Config { variable, problem } => write!(f, "{variable}: {problem}"),
            Self::Tls { path, .. } => write!(f, "cannot read {}", path.display()),
            Self::Journal { .. } => write!(f, "cannot recover from the crash journal"),
            Self::Runtime { .. } => write!(f, "cannot reach the container runtime"),
            Self::Serve { .. } => write!(f, "the gRPC server failed"),
            Self::Certificate { problem } => write!(f, "cannot get this node's certificate: {problem}"),
            Self::Metrics { .. } => write!(f, "cannot listen on CRYOPOD_METRICS_LISTEN"),
            Self::Install { .. } => write!(f, "cannot install the runtime handler"),
            Self::NodeExec { .. } => write!(
                f,
                "CRYOPOD_NODE_EXEC names {}, but the process serving CRYOPOD_CRI_SOCKET cannot be found",
                crate::dump::RUNTIME_PID
            ),
        }
    }
}

impl std::error::Error for RunError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Config { .. } | Self::Certificate { .. } => None,
            Self::Tls { source, .. } => Some(source),
            Self::Journal { source } => Some(source),
            Self::Runtime { source } => Some(source),
            Self::Serve { source } => Some(source),
            Self::Metrics { source } | Self::Install { source } | Self::NodeExec { source } => Some(source),
        }
    }
}

impl AgentConfig {
    /// Reads the settings from a lookup (the environment in production).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, RunError> {
        let required = |variable: &'static str| {
            get(variable).filter(|v| !v.is_empty()).ok_or(RunError::Config {
                variable,
                problem: "is required".into(),
            })
        };
        let listen = get("CRYOPOD_LISTEN").unwrap_or_else(|| "0.0.0.0:9443".into());
        let listen = listen.parse().map_err(|e| RunError::Config {
            variable: "CRYOPOD_LISTEN",
            problem: format!("{listen:?}: {e}"),
        })?;
        let metrics_listen = get("CRYOPOD_METRICS_LISTEN").unwrap_or_else(|| "0.0.0.0:9090".into());
        let metrics_listen = metrics_listen.parse().map_err(|e| RunError::Config {
            variable: "CRYOPOD_METRICS_LISTEN",
            problem: format!("{metrics_listen:?}: {e}"),
        })?;
        let drain = match get("CRYOPOD_DRAIN_SECONDS") {
            None => 120,
            Some(v) => v.parse::<u64>().map_err(|e| RunError::Config {
                variable: "CRYOPOD_DRAIN_SECONDS",
                problem: format!("{v:?}: {e}"),
            })?,
        };
        let cert_validity = match get("CRYOPOD_CERT_VALIDITY_SECONDS") {
            None => 365 * 24 * 3600,
            Some(v) => v
                .parse::<u64>()
                .ok()
                .filter(|s| *s >= 600)
                .ok_or_else(|| RunError::Config {
                    variable: "CRYOPOD_CERT_VALIDITY_SECONDS",
                    problem: format!("{v:?} is not a number of seconds, 600 or more"),
                })?,
        };
        let cgroup = match get("CRYOPOD_CGROUP") {
            Some(spec) => match spec.split_once(':') {
                Some(("v1", root)) => (CgroupVersion::V1, PathBuf::from(root)),
                Some(("v2", root)) => (CgroupVersion::V2, PathBuf::from(root)),
                _ => {
                    return Err(RunError::Config {
                        variable: "CRYOPOD_CGROUP",
                        problem: format!("{spec:?} is not v1:<path> or v2:<path>"),
                    });
                }
            },
            None if Path::new("/sys/fs/cgroup/freezer/freezer.state").exists()
                || Path::new("/sys/fs/cgroup/freezer/cgroup.procs").exists() =>
            {
                (CgroupVersion::V1, PathBuf::from("/sys/fs/cgroup/freezer"))
            }
            None => (CgroupVersion::V2, PathBuf::from("/sys/fs/cgroup")),
        };
        let state_dir = PathBuf::from(get("CRYOPOD_STATE_DIR").unwrap_or_else(|| "/var/lib/cryopod".into()));
        let tls_dir = PathBuf::from(required("CRYOPOD_TLS_DIR")?);
        Ok(Self {
            node_name: required("CRYOPOD_NODE_NAME")?,
            listen,
            metrics_listen,
            tls_dir: tls_dir.clone(),
            manifest_key_file: PathBuf::from(required("CRYOPOD_MANIFEST_KEY_FILE")?),
            cri_socket: PathBuf::from(
                get("CRYOPOD_CRI_SOCKET").unwrap_or_else(|| "/run/containerd/containerd.sock".into()),
            ),
            cgroup,
            state_dir: state_dir.clone(),
            node_exec: get("CRYOPOD_NODE_EXEC")
                .map(|v| v.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default(),
            criu_dir: get("CRYOPOD_CRIU_DIR").filter(|v| !v.is_empty()).map(PathBuf::from),
            drain: std::time::Duration::from_secs(drain),
            local_roots: local_roots(get("CRYOPOD_LOCAL_ROOTS"), &state_dir, &tls_dir)?,
            cert_signer: get("CRYOPOD_CERT_SIGNER").filter(|v| !v.is_empty()),
            cert_validity: std::time::Duration::from_secs(cert_validity),
            client_name: get("CRYOPOD_CLIENT_NAME")
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "cryopod-operator".into()),
        })
    }
}

/// The local checkpoint roots `CRYOPOD_LOCAL_ROOTS` names: absolute, climbing
/// nowhere, not `/`, and holding none of the agent's own files (`state` and `tls`):
/// under `state`, only its `checkpoints` directory may be one. Unset: the embedded
/// store's directory.
fn local_roots(
    value: Option<String>,
    state: &std::path::Path,
    tls: &std::path::Path,
) -> Result<Vec<PathBuf>, RunError> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(vec![PathBuf::from(crate::server::EMBEDDED_LOCAL_ROOT)]);
    };
    let refused = |root: &str, why: &str| RunError::Config {
        variable: "CRYOPOD_LOCAL_ROOTS",
        problem: format!("{root:?} {why}"),
    };
    value
        .split(':')
        .map(|text| {
            let root = PathBuf::from(text);
            if !crate::server::under_a_root(text, &[PathBuf::from("/")]) || root.parent().is_none() {
                return Err(refused(text, "is not an absolute directory other than / without .."));
            }
            let holds_own = state.starts_with(&root) || tls.starts_with(&root) || root.starts_with(tls);
            let in_state = root.starts_with(state) && !root.starts_with(state.join("checkpoints"));
            if holds_own || in_state {
                return Err(refused(
                    text,
                    &format!(
                        "would hold the agent's own files ({} or {}); under the state directory only its checkpoints/ may be a root",
                        state.display(),
                        tls.display()
                    ),
                ));
            }
            Ok(root)
        })
        .collect()
}

/// This node's own certificate chain and key (PEM), asked of `signer` with a key made
/// now; and when to renew it.
async fn node_certificate(
    config: &AgentConfig,
    signer: &str,
) -> Result<(String, String, std::time::Duration), RunError> {
    use crate::certs::CertificateIssuer;
    let failed = |problem: String| RunError::Certificate { problem };
    let request = crate::certs::node_request(&config.node_name).map_err(failed)?;
    let client = kube::Client::try_default().await.map_err(|e| {
        failed(format!(
            "cannot reach the Kubernetes API as the agent's service account: {e}"
        ))
    })?;
    let issuer = crate::certs::KubeCsr {
        client,
        signer: signer.to_owned(),
        validity: config.cert_validity,
        wait: std::time::Duration::from_secs(120),
    };
    let chain = issuer
        .issue(&request.csr_pem, &config.node_name)
        .await
        .map_err(failed)?;
    tracing::info!(node = %config.node_name, "serving with this node's own certificate");
    Ok((chain, request.key_pem, config.cert_validity * 2 / 3))
}

/// `install-handler`: the runtime handler's install from the environment.
/// `CRYOPOD_HOST_ROOT` (default `/`), `CRYOPOD_HANDLER_DIR` (`/opt/cryopod/bin`),
/// `CRYOPOD_CONTAINERD_DROPIN` (`/etc/containerd/conf.d/cryopod.toml`), `CRYOPOD_RUNC`
/// (`/usr/sbin/runc`), `CRYOPOD_RUNC_ROOT`, `CRYOPOD_SYSTEMD_CGROUP` (`true`/`false`),
/// `CRYOPOD_STATE_DIR` (`/var/lib/cryopod`) and `CRYOPOD_CRIU_DIR`. The binary
/// installed is `cryopod-runc` beside this one.
pub fn handler_install_from_lookup(
    get: impl Fn(&str) -> Option<String>,
    this_binary: &Path,
) -> Result<crate::install::HandlerInstall, RunError> {
    let path = |variable: &str, default: &str| {
        PathBuf::from(
            get(variable)
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| default.to_owned()),
        )
    };
    let systemd_cgroup = match get("CRYOPOD_SYSTEMD_CGROUP").as_deref() {
        None | Some("") | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(RunError::Config {
                variable: "CRYOPOD_SYSTEMD_CGROUP",
                problem: format!("{other:?} is not true or false"),
            });
        }
    };
    Ok(crate::install::HandlerInstall {
        source: this_binary.with_file_name("cryopod-runc"),
        host_root: path("CRYOPOD_HOST_ROOT", "/"),
        bin_dir: path("CRYOPOD_HANDLER_DIR", "/opt/cryopod/bin"),
        dropin: path("CRYOPOD_CONTAINERD_DROPIN", "/etc/containerd/conf.d/cryopod.toml"),
        config: crate::handler::HandlerConfig {
            runc: path("CRYOPOD_RUNC", "/usr/sbin/runc"),
            restores: path("CRYOPOD_STATE_DIR", "/var/lib/cryopod").join("restores"),
            criu_dir: get("CRYOPOD_CRIU_DIR").filter(|v| !v.is_empty()).map(PathBuf::from),
            iptables: path("CRYOPOD_IPTABLES", "iptables"),
            nsenter: path("CRYOPOD_NSENTER", "nsenter"),
        },
        runc_root: get("CRYOPOD_RUNC_ROOT").filter(|v| !v.is_empty()).map(PathBuf::from),
        systemd_cgroup,
    })
}

/// Facts of this node: kernel, CRIU version, cgroup interface, CPU flags.
pub async fn node_facts(config: &AgentConfig, exec: &NodeExec) -> NodeFacts {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let criu_version = match exec.command(Path::new("criu")).arg("--version").output().await {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Version:").map(|v| v.trim().to_owned()))
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    let cpu_flags = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("flags")
                .and_then(|r| r.split_once(':'))
                .map(|(_, f)| f.to_owned())
        })
        .map(|f| f.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    NodeFacts {
        name: config.node_name.clone(),
        kernel,
        criu_version,
        cgroup_version: format!("{:?}", config.cgroup.0),
        cpu_flags,
    }
}

/// How long a prepared restore may wait for its pod before its data is removed.
const PREPARED_RESTORE_TTL: std::time::Duration = std::time::Duration::from_secs(3600);
/// How long the record of how a freeze ended is kept: well past any hold (at most an
/// hour), for a release that comes late.
const FREEZE_END_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// At start, a partial restore older than this is a dead predecessor's; a younger one
/// may be another agent's that shares the directory (on the test bed). Checkpoint work
/// directories all go at start: a retried checkpoint reuses its id.
const DEAD_AT_START: std::time::Duration = std::time::Duration::from_secs(600);
/// How often the state directory is swept.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(300);

fn log_sweep(swept: &crate::sweep::Swept) {
    if !swept.scrubbed.is_empty() || !swept.removed.is_empty() {
        tracing::info!(scrubbed = ?swept.scrubbed, removed = ?swept.removed, "removed data no operation will use");
    }
    if !swept.failures.is_empty() {
        tracing::error!(failures = ?swept.failures, "cannot remove data no operation will use");
    }
}

/// Recovers from the journal, then serves until the server fails.
pub async fn run(config: AgentConfig) -> Result<(), RunError> {
    let journal = Journal::open(config.state_dir.join("journal")).map_err(|source| RunError::Journal { source })?;
    // Before serving anything: thaw whatever a crashed predecessor left frozen.
    for recovered in recover(&journal).map_err(|source| RunError::Journal { source })? {
        let id = recovered
            .entry
            .as_ref()
            .map_or("unreadable entry", |e| e.operation_id.as_str());
        if recovered.failures.is_empty() {
            tracing::info!(operation_id = id, entry = %recovered.path.display(), "recovered: thawed the pod a crashed agent left frozen");
        } else {
            tracing::error!(operation_id = id, failures = ?recovered.failures, "recovery incomplete");
        }
    }
    // Then remove what a predecessor left that no operation will use (decrypted
    // memory of prepared restores, raw dumps), now and every few minutes.
    let (restores, work) = (config.state_dir.join("restores"), config.state_dir.join("work"));
    log_sweep(&crate::sweep::sweep(
        &restores,
        &work,
        DEAD_AT_START,
        std::time::Duration::ZERO,
        PREPARED_RESTORE_TTL,
    ));
    let ends = journal.clone();
    let sweeper = tokio::spawn(async move {
        let mut every = tokio::time::interval(SWEEP_INTERVAL);
        every.tick().await;
        loop {
            every.tick().await;
            for path in ends.forget_ends_before(FREEZE_END_TTL) {
                tracing::warn!(path = %path.display(), "cannot remove an old freeze end");
            }
            let (restores, work) = (restores.clone(), work.clone());
            if let Ok(swept) = tokio::task::spawn_blocking(move || {
                crate::sweep::sweep(
                    &restores,
                    &work,
                    PREPARED_RESTORE_TTL,
                    PREPARED_RESTORE_TTL,
                    PREPARED_RESTORE_TTL,
                )
            })
            .await
            {
                log_sweep(&swept);
            }
        }
    });
    let read = |name: &str| {
        let path = config.tls_dir.join(name);
        std::fs::read(&path).map_err(|source| RunError::Tls { path, source })
    };
    // After the journal's recovery: a pod left frozen is thawed before anything
    // waits on the operator.
    let (cert_pem, key_pem, renew_after) = match &config.cert_signer {
        None => (read("tls.crt")?, read("tls.key")?, None),
        Some(signer) => {
            let (chain, key, renew_after) = node_certificate(&config, signer).await?;
            (chain.into_bytes(), key.into_bytes(), Some(renew_after))
        }
    };
    let mut metrics = AgentMetrics::new();
    if let Err(problem) = metrics.certificate(&cert_pem) {
        // Served all the same (TLS has accepted it); only its expiry goes unwatched.
        tracing::warn!(%problem, "cannot read the served certificate's validity for the metrics");
    }
    let ca_pem = read("ca.crt")?;
    // Optional at the TLS layer so another agent (whose certificate is a server's) can
    // read a granted checkpoint; the operator API still requires the operator's
    // certificate (`only_client`).
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(cert_pem, key_pem))
        .client_ca_root(Certificate::from_pem(ca_pem.clone()))
        .client_auth_optional(true);
    let manifest_key =
        crate::signing::ManifestKey::from_file(&config.manifest_key_file).map_err(|problem| RunError::Config {
            variable: "CRYOPOD_MANIFEST_KEY_FILE",
            problem,
        })?;
    let exec = NodeExec {
        prefix: config.node_exec.iter().map(Into::into).collect(),
        path_dirs: config.criu_dir.iter().cloned().collect(),
        runtime_socket: Some(config.cri_socket.clone()),
    };
    // Fail at start, not at the first checkpoint, when the runtime cannot be found.
    exec.resolved_prefix().map_err(|source| RunError::NodeExec { source })?;
    let node = node_facts(&config, &exec).await;
    let freezer: Arc<dyn Freezer> = Arc::from(freezer_for(config.cgroup.0, &config.cgroup.1));
    let runtime = CriClient::connect(&config.cri_socket)
        .await
        .map_err(|source| RunError::Runtime { source })?;
    let (exit_journal, metrics_journal) = (journal.clone(), journal.clone());
    let agent = NodeAgent {
        runtime,
        freezer,
        journal,
        exec,
        work_dir: config.state_dir.join("work"),
        restores: config.state_dir.join("restores"),
        node,
        manifest_key,
    };
    let metrics = Arc::new(metrics);
    let metrics_listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| RunError::Metrics { source })?;
    let metrics_server = tokio::spawn(crate::metrics::serve(
        metrics_listener,
        metrics.clone(),
        metrics_journal,
    ));
    tracing::info!(listen = %config.listen, metrics = %config.metrics_listen, node = %config.node_name, "serving");
    let service = AgentService::new(agent, metrics)
        .with_local_roots(config.local_roots.clone())
        .with_peer_ca(ca_pem);
    let peer = service.peer_service();
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let drain = service.drain_handle();
    let drain_limit = config.drain;
    // On SIGTERM (a rollout, an uninstall, a node drain) the agent keeps serving, so
    // the operator can still release what it holds, but starts nothing new; it stops
    // once nothing runs or is held, or at the limit, thawing what is left.
    let shutdown = async move {
        let sigterm = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    term.recv().await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch for SIGTERM; stopping only when killed");
                    std::future::pending::<()>().await;
                }
            }
        };
        // A certificate is served until it is two thirds through its life; then the
        // agent drains and exits, and its restart asks for a new one.
        let renewal = async {
            match renew_after {
                Some(after) => tokio::time::sleep(after).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = sigterm => tracing::info!(limit_s = drain_limit.as_secs(), "SIGTERM: draining"),
            () = renewal => tracing::info!(limit_s = drain_limit.as_secs(), "certificate due for renewal: draining to restart"),
        }
        let drained = drain.drain(drain_limit).await;
        if drained.thawed.is_empty() && drained.running.is_empty() {
            tracing::info!("drained: nothing runs or is held");
        } else {
            tracing::warn!(thawed = ?drained.thawed, running = ?drained.running, "drain limit reached: held pods thawed without their release");
        }
        // Operations still running may hold a pod frozen inside a blocking step, and
        // their watchdogs die with this process; after an uninstall no successor
        // recovers them. So everything the journal names is thawed now.
        match recover(&exit_journal) {
            Ok(recovered) => {
                for r in recovered.iter().filter(|r| r.entry.is_some()) {
                    tracing::warn!(entry = %r.path.display(), failures = ?r.failures, "thawed at exit");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot thaw what the journal names at exit"),
        }
        let _ = stopped_tx.send(());
    };
    let serve = Server::builder()
        .tls_config(tls)
        .map_err(|source| RunError::Serve { source })?
        .add_service(NodeAgentServer::with_interceptor(
            service,
            crate::server::only_client(config.client_name.clone()),
        ))
        .add_service(cryopod_agent_api::pb::peer_transfer_server::PeerTransferServer::new(
            peer,
        ))
        .serve_with_shutdown(config.listen, shutdown);
    // Graceful shutdown waits for open streams; a few seconds after the drain, the
    // agent stops whatever still streams.
    let served = tokio::select! {
        served = serve => served.map_err(|source| RunError::Serve { source }),
        () = async {
            let _ = stopped_rx.await;
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        } => Ok(()),
    };
    metrics_server.abort();
    sweeper.abort();
    served
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn security_local_roots_hold_none_of_the_agents_own_files() {
        let (state, tls) = (Path::new("/var/lib/cryopod"), Path::new("/tls"));
        let roots = |v: &str| local_roots(Some(v.into()), state, tls);
        assert_eq!(roots("").unwrap(), [PathBuf::from("/var/lib/cryopod/checkpoints")]);
        assert_eq!(
            roots("/var/lib/cryopod/checkpoints:/srv/ckpt").unwrap(),
            [
                PathBuf::from("/var/lib/cryopod/checkpoints"),
                PathBuf::from("/srv/ckpt")
            ]
        );
        for bad in [
            "/",
            "//",
            "/.",
            "srv",
            "/srv/../etc",
            "/var/lib",
            "/var/lib/cryopod",
            "/var/lib/cryopod/restores",
            "/tls/x",
        ] {
            let err = roots(bad).unwrap_err().to_string();
            assert!(err.contains("CRYOPOD_LOCAL_ROOTS"), "{bad}: {err}");
        }
    }

    #[test]
    fn settings_name_the_variable_at_fault() {
        let env: HashMap<&str, &str> = HashMap::from([("CRYOPOD_TLS_DIR", "/tls")]);
        let err = AgentConfig::from_lookup(|k| env.get(k).map(|v| (*v).to_owned())).unwrap_err();
        assert_eq!(err.to_string(), "CRYOPOD_NODE_NAME: is required");
        let env: HashMap<&str, &str> = HashMap::from([
            ("CRYOPOD_NODE_NAME", "node-1"),
            ("CRYOPOD_TLS_DIR", "/tls"),
            ("CRYOPOD_MANIFEST_KEY_FILE", "/key/manifest"),
            ("CRYOPOD_CGROUP", "v3:/x"),
        ]);
        let err = AgentConfig::from_lookup(|k| env.get(k).map(|v| (*v).to_owned())).unwrap_err();
        assert!(err.to_string().starts_with("CRYOPOD_CGROUP:"), "{err}");
        let env: HashMap<&str, &str> = HashMap::from([
            ("CRYOPOD_NODE_NAME", "node-1"),
            ("CRYOPOD_TLS_DIR", "/tls"),
            ("CRYOPOD_MANIFEST_KEY_FILE", "/key/manifest"),
            ("CRYOPOD_CGROUP", "v1:/sys/fs/cgroup/freezer"),
            ("CRYOPOD_NODE_EXEC", "nsenter -t 1 -m --"),
        ]);
        let config = AgentConfig::from_lookup(|k| env.get(k).map(|v| (*v).to_owned())).unwrap();
        assert_eq!(config.node_exec, ["nsenter", "-t", "1", "-m", "--"]);
        assert_eq!(config.listen.port(), 9443);
    }
}
