//! What can go wrong, one variant per failed action, naming its object; the cause
//! is kept as the source and printed after it (`error: <what>: <cause>`).

use std::time::Duration;

/// A subcommand failed.
#[derive(Debug)]
pub enum Error {
    /// No usable kubeconfig or cluster.
    Config {
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The object could not be made from the arguments.
    Request {
        kind: &'static str,
        source: serde_json::Error,
    },
    /// The API server refused to create it.
    Create {
        resource: &'static str,
        source: kube::Error,
    },
    /// Reading an object failed.
    Get { resource: String, source: kube::Error },
    /// Listing failed.
    List {
        resource: &'static str,
        source: kube::Error,
    },
    /// The operation ended in failure.
    Failed { message: String },
    /// `--wait` gave up.
    TimedOut { resource: String, after: Duration },
    /// Printing `-o json|yaml` failed.
    Print {
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// `thaw` without a terminal to confirm on and without `--yes`.
    ThawUnconfirmable,
    /// `thaw` was not confirmed.
    ThawNotConfirmed,
    /// The pod to thaw is not on a node.
    NotScheduled { pod: String },
    /// The operator's client pair could not be read.
    ClientSecret { secret: String, problem: String },
    /// No agent pod runs on the node.
    NoAgent { node: String, namespace: String },
    /// The agent could not be reached.
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
    /// The agent refused or failed the thaw.
    Thaw { node: String, source: tonic::Status },
    /// Reading the terminal failed.
    Terminal { source: std::io::Error },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Config { .. } => write!(f, "cannot load the kubeconfig"),
            Self::Request { kind, .. } => write!(f, "cannot build the {kind}"),
            Self::Create { resource, .. } => write!(f, "cannot create the {resource}"),
            Self::Get { resource, .. } => write!(f, "cannot get {resource}"),
            Self::List { resource, .. } => write!(f, "cannot list {resource}"),
            Self::Failed { message } => write!(f, "{message}"),
            Self::TimedOut { resource, after } => {
                write!(f, "timed out waiting for {resource} to end after {}s", after.as_secs())
            }
            Self::Print { .. } => write!(f, "cannot print the object"),
            Self::ThawUnconfirmable => write!(
                f,
                "thaw needs a confirmation: run it on a terminal, or pass --yes if you are sure"
            ),
            Self::ThawNotConfirmed => write!(f, "thaw not confirmed; nothing was done"),
            Self::NotScheduled { pod } => write!(f, "pod {pod} is not on a node: nothing of it can be frozen"),
            Self::ClientSecret { secret, problem } => write!(
                f,
                "cannot read the operator's client certificate from Secret {secret} (cluster admins only): {problem}"
            ),
            Self::NoAgent { node, namespace } => write!(
                f,
                "no ready cryopod node agent on node {node} in namespace {namespace} (--release-namespace, or --agent-endpoint)"
            ),
            Self::Connect { url, .. } => write!(f, "cannot reach the node agent at {url}"),
            Self::Thaw { node, source } => {
                write!(
                    f,
                    "the agent of node {node} did not thaw: {:?}: {}",
                    source.code(),
                    source.message()
                )
            }
            Self::Terminal { .. } => write!(f, "cannot read the confirmation"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Config { source } | Self::Print { source } => Some(source.as_ref()),
            Self::Request { source, .. } => Some(source),
            Self::Create { source, .. } | Self::Get { source, .. } | Self::List { source, .. } => Some(source),
            Self::Connect { source, .. } => Some(source),
            Self::Terminal { source } => Some(source),
            Self::Failed { .. }
            | Self::TimedOut { .. }
            | Self::ThawUnconfirmable
            | Self::ThawNotConfirmed
            | Self::NotScheduled { .. }
            | Self::ClientSecret { .. }
            | Self::NoAgent { .. }
            | Self::Thaw { .. } => None,
        }
    }
}

/// The message kubectl would print for `err`, without its `error: ` prefix: the
/// error and each cause, most general first.
pub fn message(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let next = c.to_string();
        // Some sources repeat their own source in their message.
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_prints_with_its_causes() {
        let err = Error::Terminal {
            source: std::io::Error::other("stdin closed"),
        };
        assert_eq!(message(&err), "cannot read the confirmation: stdin closed");
        let failed = Error::Failed {
            message: "podmigration/move failed: SourceResumed: thawed".into(),
        };
        assert_eq!(message(&failed), "podmigration/move failed: SourceResumed: thawed");
    }
}
