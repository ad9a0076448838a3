//! What every controller works with, and how they fail, record events and read time.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};

use crate::agents::{AgentError, Agents};
use crate::metrics::OperatorMetrics;

/// What the controller works with.
#[derive(Clone)]
pub struct Context {
    /// The API server.
    pub client: kube::Client,
    /// The node agents.
    pub agents: Agents,
    /// Events.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<OperatorMetrics>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}

/// A reconcile failed; it is retried with backoff.
#[derive(Debug)]
pub enum Error {
    /// The API server refused or failed a request.
    Kube { action: &'static str, source: kube::Error },
    /// The node agent could not be reached.
    Agent { source: AgentError },
    /// The node agent's answer broke off.
    Grpc {
        action: &'static str,
        source: tonic::Status,
    },
    /// The finalizer machinery failed.
    Finalizer { detail: String },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kube { action, .. } => write!(f, "cannot {action}"),
            Self::Agent { source } => write!(f, "{source}"),
            Self::Grpc { action, source } => write!(f, "{action}: {}", source.message()),
            Self::Finalizer { detail } => write!(f, "finalizer: {detail}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Kube { source, .. } => Some(source),
            Self::Agent { source } => Some(source),
            Self::Grpc { source, .. } => Some(source),
            Self::Finalizer { .. } => None,
        }
    }
}

pub fn kube_err(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Kube { action, source }
}

/// The current time, as the API writes it.
pub fn now() -> Time {
    Time(Timestamp::now())
}

/// Records an event on `object`; a failure to record is logged, never fatal.
pub async fn publish<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    object: &K,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(error = %e, "cannot publish an event");
    }
}
