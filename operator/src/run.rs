//! The operator process: settings from the environment, the controllers, metrics.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cryopod_crds::v1alpha1::{
    CheckpointSchedule, NodeEvacuation, PodCheckpoint, PodMigration, PodRestore, SCHEDULE_LABEL,
};
use futures::StreamExt;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, controller, watcher};

use crate::agents::{AgentLocator, Agents, DaemonSetAgents, StaticAgents};
use crate::context::Context;
use crate::leader::Election;
use crate::metrics::OperatorMetrics;

/// Settings of the operator process.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// `CRYOPOD_TLS_DIR` (required): the client certificate for the agents (`tls.crt`,
    /// `tls.key`) and the CA that signed theirs (`ca.crt`).
    pub tls_dir: PathBuf,
    /// `CRYOPOD_AGENT_TLS_NAME`, default `cryopod-node-agent`: the name in the agents'
    /// certificates; `{node}` (the chart's): each agent's names its own node.
    pub agent_tls_name: String,
    /// `CRYOPOD_AGENT_ENDPOINTS`: `node=https://host:port,...`, for agents outside
    /// Kubernetes; otherwise the DaemonSet's pods are looked up.
    pub agent_endpoints: Option<StaticAgents>,
    /// `CRYOPOD_NAMESPACE`, default `cryopod-system`: where the agent pods run.
    pub namespace: String,
    /// `CRYOPOD_AGENT_SELECTOR`, default `app.kubernetes.io/component=node-agent`.
    pub agent_selector: String,
    /// `CRYOPOD_AGENT_PORT`, default 9443.
    pub agent_port: u16,
    /// `CRYOPOD_METRICS_LISTEN`, default `0.0.0.0:8080`.
    pub metrics_listen: SocketAddr,
    /// `CRYOPOD_WATCH_NAMESPACE`: only this namespace's resources; all when unset.
    pub watch_namespace: Option<String>,
    /// `CRYOPOD_MAX_PER_NODE`, default 2: checkpoints running at once on one node.
    pub max_per_node: usize,
    /// `CRYOPOD_MAX_RECONCILES` (default 32): reconciles each controller runs at once.
    /// A checkpoint holds one for as long as its agent works; the limit bounds the
    /// operator's memory and its connections to the API server.
    pub max_reconciles: u16,
    /// `CRYOPOD_LEASE_NAME`, default `cryopod-operator`: the leader-election Lease in
    /// `namespace`.
    pub lease_name: String,
    /// `CRYOPOD_ENCRYPT_BY_DEFAULT` (`true`/`false`, default false; the chart sets
    /// true): a PodCheckpoint without `spec.encryption` is sealed with a key the
    /// operator makes for it.
    pub encrypt_by_default: bool,
    /// `CRYOPOD_SIGNER_DIR`: when set, the CA (`ca.crt`, `ca.key`) with which the
    /// operator signs each agent's certificate for its node (`signer`), and
    /// `CRYOPOD_AGENT_SERVICE_ACCOUNT` (required then) names the agents' account.
    pub signer: Option<(PathBuf, String)>,
}

/// Starting or running the operator failed.
#[derive(Debug)]
pub enum RunError {
    /// A setting is missing or malformed.
    Config { variable: &'static str, problem: String },
    /// The API server cannot be reached.
    Kube { source: kube::Error },
    /// The TLS material cannot be read.
    Agents { source: crate::agents::AgentError },
    /// The metrics port cannot be opened.
    Metrics { source: std::io::Error },
    /// Leadership was lost; another replica takes over.
    LeaseLost { detail: String },
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Config { variable, problem } => write!(f, "{variable}: {problem}"),
            Self::Kube { .. } => write!(f, "cannot reach the Kubernetes API"),
            Self::Agents { source } => write!(f, "{source}"),
            Self::Metrics { .. } => write!(f, "cannot listen on CRYOPOD_METRICS_LISTEN"),
            Self::LeaseLost { detail } => write!(f, "lost the leader Lease: {detail}"),
        }
    }
}

impl std::error::Error for RunError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Config { .. } | Self::LeaseLost { .. } => None,
            Self::Kube { source } => Some(source),
            Self::Agents { source } => Some(source),
            Self::Metrics { source } => Some(source),
        }
    }
}

impl OperatorConfig {
    /// Reads the settings from a lookup (the environment in production).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, RunError> {
        let get = |k: &str| get(k).filter(|v| !v.is_empty());
        let tls_dir = get("CRYOPOD_TLS_DIR").map(PathBuf::from).ok_or(RunError::Config {
            variable: "CRYOPOD_TLS_DIR",
            problem: "is required".into(),
        })?;
        let agent_endpoints = get("CRYOPOD_AGENT_ENDPOINTS")
            .map(|text| StaticAgents::parse(&text))
            .transpose()
            .map_err(|problem| RunError::Config {
                variable: "CRYOPOD_AGENT_ENDPOINTS",
                problem,
            })?;
        let parse = |variable: &'static str, default: &str| {
            let text = get(variable).unwrap_or_else(|| default.to_owned());
            (variable, text)
        };
        let (variable, port) = parse("CRYOPOD_AGENT_PORT", "9443");
        let agent_port = port.parse().map_err(|e| RunError::Config {
            variable,
            problem: format!("{port:?}: {e}"),
        })?;
        // A limit: a whole number from 1 up to what its type holds.
        let limit = |variable: &'static str, default: &str| {
            let (variable, text) = parse(variable, default);
            text.parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| RunError::Config {
                    variable,
                    problem: format!("{text:?} is not a positive number"),
                })
        };
        let max_per_node = usize::try_from(limit("CRYOPOD_MAX_PER_NODE", "2")?).unwrap_or(usize::MAX);
        let max_reconciles = u16::try_from(limit("CRYOPOD_MAX_RECONCILES", "32")?).unwrap_or(u16::MAX);
        let (variable, listen) = parse("CRYOPOD_METRICS_LISTEN", "0.0.0.0:8080");
        let metrics_listen = listen.parse().map_err(|e| RunError::Config {
            variable,
            problem: format!("{listen:?}: {e}"),
        })?;
        let encrypt_by_default = match get("CRYOPOD_ENCRYPT_BY_DEFAULT").as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(RunError::Config {
                    variable: "CRYOPOD_ENCRYPT_BY_DEFAULT",
                    problem: format!("{other:?} is not true or false"),
                });
            }
        };
        let signer = match get("CRYOPOD_SIGNER_DIR") {
            None => None,
            Some(dir) => Some((
                PathBuf::from(dir),
                get("CRYOPOD_AGENT_SERVICE_ACCOUNT").ok_or(RunError::Config {
                    variable: "CRYOPOD_AGENT_SERVICE_ACCOUNT",
                    problem: "is required with CRYOPOD_SIGNER_DIR".into(),
                })?,
            )),
        };
        Ok(Self {
            tls_dir,
            encrypt_by_default,
            signer,
            agent_tls_name: get("CRYOPOD_AGENT_TLS_NAME").unwrap_or_else(|| "cryopod-node-agent".into()),
            agent_endpoints,
            namespace: get("CRYOPOD_NAMESPACE").unwrap_or_else(|| "cryopod-system".into()),
            agent_selector: get("CRYOPOD_AGENT_SELECTOR")
                .unwrap_or_else(|| "app.kubernetes.io/component=node-agent".into()),
            agent_port,
            metrics_listen,
            watch_namespace: get("CRYOPOD_WATCH_NAMESPACE"),
            max_per_node,
            max_reconciles,
            lease_name: get("CRYOPOD_LEASE_NAME").unwrap_or_else(|| "cryopod-operator".into()),
        })
    }
}

/// Runs the controllers until the process is told to stop.
pub async fn run(config: OperatorConfig) -> Result<(), RunError> {
    let client = kube::Client::try_default()
        .await
        .map_err(|source| RunError::Kube { source })?;
    // The API server answers before anything listens: the readiness probe (on the
    // metrics port) then means the operator can work.
    client
        .apiserver_version()
        .await
        .map_err(|source| RunError::Kube { source })?;
    let locator: Arc<dyn AgentLocator> = match config.agent_endpoints.clone() {
        Some(table) => Arc::new(table),
        None => Arc::new(DaemonSetAgents {
            pods: Api::namespaced(client.clone(), &config.namespace),
            selector: config.agent_selector.clone(),
            port: config.agent_port,
        }),
    };
    let agents =
        Agents::new(locator, &config.tls_dir, &config.agent_tls_name).map_err(|source| RunError::Agents { source })?;
    let mut metrics = OperatorMetrics::new();
    // The client pair was read (and accepted) above; only its expiry could go unwatched.
    match std::fs::read(config.tls_dir.join("tls.crt")) {
        Ok(pem) => {
            if let Err(problem) = metrics.certificate(&pem) {
                tracing::warn!(%problem, "cannot read the client certificate's validity for the metrics");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the client certificate for the metrics"),
    }
    let metrics = Arc::new(metrics);
    let listener = tokio::net::TcpListener::bind(config.metrics_listen)
        .await
        .map_err(|source| RunError::Metrics { source })?;
    let metrics_server = tokio::spawn(crate::metrics::serve(listener, metrics.clone()));
    let reporter = Reporter {
        controller: "cryopod-operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    // The checkpoint controller's cache also serves the start decision.
    let (checkpoints, restores, migrations): (Api<PodCheckpoint>, Api<PodRestore>, Api<PodMigration>) =
        match &config.watch_namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };
    let limits = controller::Config::default().concurrency(config.max_reconciles);
    let checkpoint_controller = Controller::new(checkpoints, watcher::Config::default()).with_config(limits.clone());
    let context = Arc::new(Context {
        client: client.clone(),
        agents,
        recorder: Recorder::new(client.clone(), reporter),
        metrics,
        max_per_node: config.max_per_node,
        encrypt_by_default: config.encrypt_by_default,
        namespace: config.namespace.clone(),
        watch_namespace: config.watch_namespace.clone(),
        checkpoints: checkpoint_controller.store(),
        starts: Arc::default(),
        written: Arc::default(),
    });
    let identity = std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let election = Election {
        leases: Api::namespaced(context.client.clone(), &config.namespace),
        name: config.lease_name.clone(),
        identity,
        duration: Duration::from_secs(15),
    };
    // Read before leading, so a bad CA fails the start, not the first request.
    let signer = match &config.signer {
        None => None,
        Some((dir, service_account)) => {
            let read = |name: &str| {
                std::fs::read_to_string(dir.join(name)).map_err(|e| RunError::Config {
                    variable: "CRYOPOD_SIGNER_DIR",
                    problem: format!("cannot read {}: {e}", dir.join(name).display()),
                })
            };
            let ca = crate::signer::AgentCa::new(&read("ca.crt")?, &read("ca.key")?).map_err(|problem| {
                RunError::Config {
                    variable: "CRYOPOD_SIGNER_DIR",
                    problem,
                }
            })?;
            let labels = config
                .agent_selector
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .collect();
            Some(crate::signer::Signer {
                client: client.clone(),
                agents: crate::signer::AgentIdentity {
                    namespace: config.namespace.clone(),
                    service_account: service_account.clone(),
                    labels,
                },
                ca,
            })
        }
    };
    let leading_since = election.acquire().await.map_err(|source| RunError::Kube { source })?;
    tracing::info!(metrics = %config.metrics_listen, namespace = ?config.watch_namespace, "reconciling");
    let checkpoint_controller = checkpoint_controller
        .shutdown_on_signal()
        .run(
            crate::checkpoint::reconcile,
            crate::checkpoint::error_policy,
            context.clone(),
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(kind = "PodCheckpoint", error = %e, "reconcile ended in error");
            }
        });
    let restored_pods: Api<k8s_openapi::api::core::v1::Pod> = match &config.watch_namespace {
        Some(ns) => Api::namespaced(context.client.clone(), ns),
        None => Api::all(context.client.clone()),
    };
    let restore_controller = Controller::new(restores, watcher::Config::default())
        .with_config(limits.clone())
        // Restored pods only, by label: their readiness ends a restore (and a
        // migration's downtime) the moment it changes.
        .watches(
            restored_pods,
            watcher::Config::default().labels(&format!("{}=true", crate::restore_pod::RESTORED_LABEL)),
            |pod| crate::restore::restore_of_pod(&pod),
        )
        .shutdown_on_signal()
        .run(crate::restore::reconcile, crate::restore::error_policy, context.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(kind = "PodRestore", error = %e, "reconcile ended in error");
            }
        });
    // The checkpoints and restores a migration made wake it the moment their status
    // moves, rather than on its next look.
    let (owned_checkpoints, owned_restores): (Api<PodCheckpoint>, Api<PodRestore>) = match &config.watch_namespace {
        Some(ns) => (
            Api::namespaced(context.client.clone(), ns),
            Api::namespaced(context.client.clone(), ns),
        ),
        None => (Api::all(context.client.clone()), Api::all(context.client.clone())),
    };
    let migration_controller = Controller::new(migrations, watcher::Config::default())
        .owns(owned_checkpoints, watcher::Config::default())
        .owns(owned_restores, watcher::Config::default())
        .with_config(limits)
        .shutdown_on_signal()
        .run(
            crate::migration::reconcile,
            crate::migration::error_policy,
            context.clone(),
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(kind = "PodMigration", error = %e, "reconcile ended in error");
            }
        });
    // Evacuations are cluster-scoped; the migrations they start wake them by label.
    let evacuation_migrations: Api<PodMigration> = match &config.watch_namespace {
        Some(ns) => Api::namespaced(context.client.clone(), ns),
        None => Api::all(context.client.clone()),
    };
    let evacuation_controller = Controller::new(
        Api::<NodeEvacuation>::all(context.client.clone()),
        watcher::Config::default(),
    )
    .watches(
        evacuation_migrations,
        watcher::Config::default().labels(crate::evacuation::EVACUATION_LABEL),
        |migration| {
            migration
                .labels()
                .get(crate::evacuation::EVACUATION_LABEL)
                .map(|name| kube::runtime::reflector::ObjectRef::new(name))
        },
    )
    .shutdown_on_signal()
    .run(
        crate::evacuation::reconcile,
        crate::evacuation::error_policy,
        context.clone(),
    )
    .for_each(|result| async move {
        if let Err(e) = result {
            tracing::debug!(kind = "NodeEvacuation", error = %e, "reconcile ended in error");
        }
    });
    // Schedules sleep until their next run; the checkpoints they made (by label) wake
    // them when their phase moves, for the counts in their status.
    let (schedules, scheduled): (Api<CheckpointSchedule>, Api<PodCheckpoint>) = match &config.watch_namespace {
        Some(ns) => (
            Api::namespaced(context.client.clone(), ns),
            Api::namespaced(context.client.clone(), ns),
        ),
        None => (Api::all(context.client.clone()), Api::all(context.client.clone())),
    };
    let schedule_controller = Controller::new(schedules, watcher::Config::default())
        .owns(scheduled, watcher::Config::default().labels(SCHEDULE_LABEL))
        .shutdown_on_signal()
        .run(
            crate::schedule::reconcile,
            crate::schedule::error_policy,
            context.clone(),
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(kind = "CheckpointSchedule", error = %e, "reconcile ended in error");
            }
        });
    let storages = crate::storage_probe::run(context);
    let signer = async {
        match signer {
            Some(signer) => crate::signer::run(signer).await,
            None => std::future::pending::<()>().await,
        }
    };
    // Only the Lease holder acts; losing it ends the process (it is restarted and
    // waits its turn), so two operators never act on the same resource.
    tokio::select! {
        _ = futures::future::join(
            futures::future::join5(checkpoint_controller, restore_controller, migration_controller, evacuation_controller, storages),
            schedule_controller,
        ) => {
            metrics_server.abort();
            Ok(())
        }
        lost = election.hold(leading_since) => {
            metrics_server.abort();
            Err(RunError::LeaseLost { detail: lost })
        }
        () = signer => {
            metrics_server.abort();
            Ok(())
        }
    }
}
