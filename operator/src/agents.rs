//! Reaching the node agents: which address serves a node (the DaemonSet's pod on
//! it, or a fixed table for development), and a mutual-TLS gRPC client to it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use cryopod_agent_api::pb::node_agent_client::NodeAgentClient;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Finding or reaching an agent failed.
#[derive(Debug)]
pub enum AgentError {
    /// No agent serves this node.
    NoAgent { node: String },
    /// The agent pods could not be listed.
    Lookup { source: kube::Error },
    /// The agent did not answer.
    Connect {
        node: String,
        source: tonic::transport::Error,
    },
    /// The TLS material could not be read.
    Tls { path: String, source: std::io::Error },
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoAgent { node } => write!(f, "no cryopod node agent runs on node {node}"),
            Self::Lookup { .. } => write!(f, "cannot list the cryopod node agents"),
            Self::Connect { node, .. } => write!(f, "cannot reach the cryopod node agent of node {node}"),
            Self::Tls { path, .. } => write!(f, "cannot read {path}"),
        }
    }
}

impl std::error::Error for AgentError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::NoAgent { .. } => None,
            Self::Lookup { source } => Some(source),
            Self::Connect { source, .. } => Some(source),
            Self::Tls { source, .. } => Some(source),
        }
    }
}

/// Where the agent of a node listens.
#[tonic::async_trait]
pub trait AgentLocator: Send + Sync + std::fmt::Debug {
    /// The agent's `https://` URL on `node`, if one runs there.
    async fn endpoint(&self, node: &str) -> Result<Option<String>, AgentError>;
    /// Every node an agent serves, in one lookup.
    async fn nodes(&self) -> Result<std::collections::BTreeSet<String>, AgentError>;
}

/// A fixed table, from `CRYOPOD_AGENT_ENDPOINTS` (`node-1=https://10.0.0.1:9443,...`):
/// for development and the local cluster, where agents run outside Kubernetes.
#[derive(Clone, Debug, Default)]
pub struct StaticAgents(pub HashMap<String, String>);

impl StaticAgents {
    /// Parses `node=url` pairs separated by commas.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut map = HashMap::new();
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (node, url) = pair
                .split_once('=')
                .ok_or_else(|| format!("{pair:?} is not node=https://host:port"))?;
            if !url.starts_with("https://") {
                return Err(format!("{url:?} for node {node} is not an https:// URL"));
            }
            map.insert(node.to_owned(), url.to_owned());
        }
        Ok(Self(map))
    }
}

#[tonic::async_trait]
impl AgentLocator for StaticAgents {
    async fn endpoint(&self, node: &str) -> Result<Option<String>, AgentError> {
        Ok(self.0.get(node).cloned())
    }

    async fn nodes(&self) -> Result<std::collections::BTreeSet<String>, AgentError> {
        Ok(self.0.keys().cloned().collect())
    }
}

/// The agent DaemonSet's ready pod on the node, at its pod IP (the agents run with
/// host networking, so that is the node's address).
#[derive(Clone)]
pub struct DaemonSetAgents {
    /// Pods of the operator's namespace.
    pub pods: Api<Pod>,
    /// Label selector of the agent pods.
    pub selector: String,
    /// The agents' gRPC port.
    pub port: u16,
}

impl std::fmt::Debug for DaemonSetAgents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonSetAgents")
            .field("selector", &self.selector)
            .field("port", &self.port)
            .finish()
    }
}

#[tonic::async_trait]
impl AgentLocator for DaemonSetAgents {
    async fn endpoint(&self, node: &str) -> Result<Option<String>, AgentError> {
        let url = self.ready_agents(Some(node)).await?.into_iter().next().map(|(_, ip)| {
            if ip.contains(':') {
                format!("https://[{ip}]:{}", self.port)
            } else {
                format!("https://{ip}:{}", self.port)
            }
        });
        Ok(url)
    }

    async fn nodes(&self) -> Result<std::collections::BTreeSet<String>, AgentError> {
        Ok(self
            .ready_agents(None)
            .await?
            .into_iter()
            .map(|(node, _)| node)
            .collect())
    }
}

impl DaemonSetAgents {
    /// The ready agent pods (on `node`, or everywhere): their node and IP.
    async fn ready_agents(&self, node: Option<&str>) -> Result<Vec<(String, String)>, AgentError> {
        let mut params = ListParams::default().labels(&self.selector);
        if let Some(node) = node {
            params = params.fields(&format!("spec.nodeName={node}"));
        }
        let pods = self
            .pods
            .list(&params)
            .await
            .map_err(|source| AgentError::Lookup { source })?;
        Ok(pods
            .items
            .iter()
            .filter_map(|pod| {
                let ready = crate::context::pod_ready(pod);
                let node = pod.spec.as_ref()?.node_name.clone()?;
                let ip = pod.status.as_ref()?.pod_ip.clone()?;
                ready.then_some((node, ip))
            })
            .collect())
    }
}

/// The server name that stands for the node an agent serves: each agent's
/// certificate names its own node, and no other agent's is accepted for it.
pub const NODE_NAME: &str = "{node}";

/// Connects to agents with the operator's client certificate.
#[derive(Clone, Debug)]
pub struct Agents {
    locator: Arc<dyn AgentLocator>,
    tls: ClientTlsConfig,
    server_name: String,
}

impl Agents {
    /// Reads `tls.crt`, `tls.key` and `ca.crt` from `dir`; `server_name` is the name in
    /// the agents' certificates, [`NODE_NAME`] for the node's own name.
    pub fn new(locator: Arc<dyn AgentLocator>, dir: &Path, server_name: &str) -> Result<Self, AgentError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| AgentError::Tls {
                path: path.display().to_string(),
                source,
            })
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.crt")?))
            .identity(Identity::from_pem(read("tls.crt")?, read("tls.key")?));
        Ok(Self {
            locator,
            tls,
            server_name: server_name.to_owned(),
        })
    }

    /// The name `node`'s agent must have in its certificate.
    pub fn server_name_of(&self, node: &str) -> String {
        if self.server_name == NODE_NAME {
            node.to_owned()
        } else {
            self.server_name.clone()
        }
    }

    /// Whether an agent serves the node.
    pub async fn serves(&self, node: &str) -> Result<bool, AgentError> {
        Ok(self.locator.endpoint(node).await?.is_some())
    }

    /// Every node an agent serves.
    pub async fn nodes(&self) -> Result<std::collections::BTreeSet<String>, AgentError> {
        self.locator.nodes().await
    }

    /// How another node's agent reaches `node`'s: its URL and the name its
    /// certificate must have.
    pub async fn peer_of(&self, node: &str) -> Result<(String, String), AgentError> {
        let url = self
            .locator
            .endpoint(node)
            .await?
            .ok_or_else(|| AgentError::NoAgent { node: node.to_owned() })?;
        Ok((url, self.server_name_of(node)))
    }

    /// A client of the node's agent.
    pub async fn client(&self, node: &str) -> Result<NodeAgentClient<Channel>, AgentError> {
        let url = self
            .locator
            .endpoint(node)
            .await?
            .ok_or_else(|| AgentError::NoAgent { node: node.to_owned() })?;
        let connect = |source| AgentError::Connect {
            node: node.to_owned(),
            source,
        };
        let channel = Channel::from_shared(url)
            .map_err(|e| AgentError::NoAgent {
                node: format!("{node} (bad URL: {e})"),
            })?
            .tls_config(self.tls.clone().domain_name(self.server_name_of(node)))
            .map_err(connect)?
            .connect()
            .await
            .map_err(connect)?;
        Ok(NodeAgentClient::new(channel))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn static_tables_parse_and_answer() {
        let agents = StaticAgents::parse("node-1=https://127.0.0.1:9443, node-2=https://127.0.0.1:9444").unwrap();
        assert_eq!(
            agents.endpoint("node-2").await.unwrap().as_deref(),
            Some("https://127.0.0.1:9444")
        );
        assert_eq!(agents.endpoint("node-3").await.unwrap(), None);
        assert_eq!(
            agents.nodes().await.unwrap().into_iter().collect::<Vec<_>>(),
            ["node-1", "node-2"]
        );
        assert!(StaticAgents::parse("node-1").unwrap_err().contains("node=https://"));
        assert!(
            StaticAgents::parse("node-1=http://x")
                .unwrap_err()
                .contains("not an https://")
        );
    }
}
