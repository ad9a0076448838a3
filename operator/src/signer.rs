//! The signer of the agents' certificates (`cryopod.io/node-agent`). An agent asks,
//! through a CertificateSigningRequest made with its pod's service-account token,
//! for a server certificate naming its node. Anyone who may create CSRs can ask;
//! only this is signed: a request from the agents' service account, made from an
//! agent pod (the token binds the pod's name and UID, which the API server writes
//! into the request), naming exactly the node that pod runs on. Everything else is
//! denied with the reason. The certificate is made here, from the requested public
//! key alone: nothing else the request asks for (CA rights, other names, usages)
//! reaches it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestCondition};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

/// The signer name the agents ask.
pub const SIGNER_NAME: &str = "cryopod.io/node-agent";
/// The only usages an agent's certificate may carry.
const ALLOWED_USAGES: [&str; 3] = ["digital signature", "key encipherment", "server auth"];
/// The longest life a certificate gets, whatever was asked.
const MAX_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// User info the API server takes from a pod-bound service-account token.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// Who may have a certificate: the agents' service account, in their namespace,
/// from pods with their labels.
#[derive(Clone, Debug)]
pub struct AgentIdentity {
    /// The agents' namespace.
    pub namespace: String,
    /// The agents' service account.
    pub service_account: String,
    /// Labels every agent pod carries.
    pub labels: BTreeMap<String, String>,
}

impl AgentIdentity {
    fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.service_account)
    }
}

/// What to do with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not ours to answer now: another signer's, or already answered.
    Skip,
    /// Sign a server certificate naming `node` for the request's key.
    Issue { node: String, validity: Duration },
    /// Refuse it.
    Deny { reason: &'static str, message: String },
}

fn deny(reason: &'static str, message: impl Into<String>) -> Verdict {
    Verdict::Deny {
        reason,
        message: message.into(),
    }
}

fn extra_one<'a>(csr: &'a CertificateSigningRequest, key: &str) -> Option<&'a str> {
    match csr.spec.extra.as_ref()?.get(key)?.as_slice() {
        [one] => Some(one.as_str()),
        _ => None,
    }
}

/// The pod a request says it came from (from the token, not from the requester).
pub fn requesting_pod(csr: &CertificateSigningRequest) -> Option<&str> {
    extra_one(csr, EXTRA_POD_NAME)
}

/// Decides a request. `pod` is the pod [`requesting_pod`] names, as read now;
/// `names` are the DNS names the request's CSR asks for, `None` when the CSR does not
/// parse or its signature does not verify.
pub fn decide(
    csr: &CertificateSigningRequest,
    agents: &AgentIdentity,
    pod: Option<&Pod>,
    names: Option<&[String]>,
) -> Verdict {
    if csr.spec.signer_name != SIGNER_NAME {
        return Verdict::Skip;
    }
    let status = csr.status.as_ref();
    let answered = status.is_some_and(|s| {
        s.certificate.as_ref().is_some_and(|c| !c.0.is_empty())
            || s.conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Denied" || c.type_ == "Failed")
    });
    if answered {
        return Verdict::Skip;
    }
    let user = csr.spec.username.as_deref().unwrap_or_default();
    if user != agents.username() {
        return deny(
            "NotTheAgent",
            format!(
                "asked by {user:?}; only the agents' service account {} may have a node's certificate",
                agents.username()
            ),
        );
    }
    let (Some(pod_name), Some(pod_uid)) = (extra_one(csr, EXTRA_POD_NAME), extra_one(csr, EXTRA_POD_UID)) else {
        return deny(
            "NoPodBinding",
            "the request was not made with a pod-bound service-account token",
        );
    };
    let Some(pod) = pod.filter(|p| p.uid().as_deref() == Some(pod_uid)) else {
        return deny(
            "NoSuchAgentPod",
            format!("agent pod {pod_name} (uid {pod_uid}) does not exist"),
        );
    };
    let labels = pod.labels();
    if pod.namespace().as_deref() != Some(agents.namespace.as_str())
        || agents.labels.iter().any(|(k, v)| labels.get(k) != Some(v))
    {
        return deny("NotAnAgentPod", format!("pod {pod_name} is not an agent pod"));
    }
    let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        return deny("NotScheduled", format!("agent pod {pod_name} runs on no node yet"));
    };
    if extra_one(csr, EXTRA_NODE_NAME).is_some_and(|n| n != node) {
        return deny(
            "NotItsNode",
            format!("the token names another node than {node}, where pod {pod_name} runs"),
        );
    }
    let Some(names) = names else {
        return deny("BadRequest", "the request is not a PKCS#10 CSR with a valid signature");
    };
    if names != [node.clone()] {
        return deny(
            "NotItsNode",
            format!("the request names {names:?}; agent pod {pod_name} runs on {node} and may name only it"),
        );
    }
    let usages = csr.spec.usages.clone().unwrap_or_default();
    if let Some(extra) = usages.iter().find(|u| !ALLOWED_USAGES.contains(&u.as_str())) {
        return deny(
            "UsageNotAllowed",
            format!("usage {extra:?}: an agent's certificate serves TLS and nothing else"),
        );
    }
    let asked = csr
        .spec
        .expiration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(Duration::from_secs)
        .unwrap_or(MAX_VALIDITY);
    Verdict::Issue {
        node,
        validity: asked.min(MAX_VALIDITY),
    }
}

/// The DNS names a PEM CSR asks for, if it parses and its signature verifies; and
/// its public key, which is all of it that a certificate takes.
pub fn parse_request(pem: &[u8]) -> Option<(Vec<String>, rcgen::CertificateSigningRequestParams)> {
    let text = std::str::from_utf8(pem).ok()?;
    let parsed = rcgen::CertificateSigningRequestParams::from_pem(text).ok()?;
    if !matches!(parsed.params.is_ca, rcgen::IsCa::NoCa | rcgen::IsCa::ExplicitNoCa) {
        return Some((vec!["<a CA>".to_owned()], parsed));
    }
    let names = parsed
        .params
        .subject_alt_names
        .iter()
        .map(|n| match n {
            rcgen::SanType::DnsName(name) => name.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    Some((names, parsed))
}

/// The CA that signs agents' certificates.
pub struct AgentCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_pem: String,
}

impl std::fmt::Debug for AgentCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCa").finish_non_exhaustive()
    }
}

impl AgentCa {
    /// From the CA's certificate and key, PEM.
    pub fn new(ca_pem: &str, key_pem: &str) -> Result<Self, String> {
        let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| format!("the CA key: {e}"))?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(ca_pem, key).map_err(|e| format!("the CA certificate: {e}"))?;
        Ok(Self {
            issuer,
            ca_pem: ca_pem.to_owned(),
        })
    }

    /// A server certificate naming `node` for the request's public key, with the
    /// signing CA's certificate after it (PEM).
    pub fn issue(
        &self,
        request: &rcgen::CertificateSigningRequestParams,
        node: &str,
        validity: Duration,
    ) -> Result<String, String> {
        use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyUsagePurpose};
        let mut params = CertificateParams::new(vec![node.to_owned()]).map_err(|e| e.to_string())?;
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, format!("cryopod-node-agent {node}"));
        params.distinguished_name = subject;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = time_now();
        params.not_before = now - Duration::from_secs(300);
        params.not_after = now + validity;
        let leaf = params
            .signed_by(&request.public_key, &self.issuer)
            .map_err(|e| format!("cannot sign: {e}"))?;
        // The chain the agent serves: its certificate, then the signing CA's, which
        // a client needs when that CA is an intermediate (cert-manager's).
        Ok(format!("{}{}", leaf.pem(), self.ca_pem))
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// What the signer needs.
pub struct Signer {
    /// The API server.
    pub client: Client,
    /// Who may have a certificate.
    pub agents: AgentIdentity,
    /// The CA.
    pub ca: AgentCa,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("agents", &self.agents)
            .finish_non_exhaustive()
    }
}

/// Failing to answer a request; retried.
#[derive(Debug)]
pub struct SignerError(String);

impl std::fmt::Display for SignerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SignerError {}

fn condition(type_: &str, reason: &str, message: &str) -> CertificateSigningRequestCondition {
    CertificateSigningRequestCondition {
        type_: type_.to_owned(),
        status: "True".to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        last_update_time: Some(crate::context::now()),
        ..CertificateSigningRequestCondition::default()
    }
}

fn approved(csr: &CertificateSigningRequest) -> bool {
    csr.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| c.type_ == "Approved")
}

async fn reconcile(csr: Arc<CertificateSigningRequest>, signer: Arc<Signer>) -> Result<Action, SignerError> {
    let name = csr.name_any();
    let api: Api<CertificateSigningRequest> = Api::all(signer.client.clone());
    let pod = match requesting_pod(&csr) {
        Some(pod_name) => {
            let pods: Api<Pod> = Api::namespaced(signer.client.clone(), &signer.agents.namespace);
            pods.get_opt(pod_name)
                .await
                .map_err(|e| SignerError(format!("read agent pod {pod_name}: {e}")))?
        }
        None => None,
    };
    let parsed = parse_request(&csr.spec.request.0);
    let verdict = decide(
        &csr,
        &signer.agents,
        pod.as_ref(),
        parsed.as_ref().map(|(names, _)| names.as_slice()),
    );
    let write = |e: kube::Error| SignerError(format!("answer CertificateSigningRequest {name}: {e}"));
    match verdict {
        Verdict::Skip => {}
        Verdict::Deny { reason, message } if approved(&csr) => {
            // Someone else approved what this signer refuses: it signs nothing, and
            // a request cannot be both approved and denied.
            tracing::error!(csr = %name, %reason, %message, "an agent certificate request approved by someone else is refused: nothing is signed");
        }
        Verdict::Deny { reason, message } => {
            tracing::warn!(csr = %name, %reason, %message, "denied an agent certificate request");
            let patch = serde_json::json!({"metadata": {"resourceVersion": csr.resource_version()},
                                           "status": {"conditions": [condition("Denied", reason, &message)]}});
            api.patch_approval(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(write)?;
        }
        Verdict::Issue { node, validity } => {
            let Some((_, request)) = parsed else {
                return Ok(Action::await_change());
            };
            let certificate = signer.ca.issue(&request, &node, validity).map_err(SignerError)?;
            let approved = csr
                .status
                .iter()
                .flat_map(|s| s.conditions.iter().flatten())
                .any(|c| c.type_ == "Approved");
            // Each write on the version it was decided on: a request changed since
            // (denied by someone else, say) is read and decided again (409).
            let mut version = csr.resource_version();
            if !approved {
                let message = format!("an agent pod on {node} asks for {node}'s certificate");
                let patch = serde_json::json!({"metadata": {"resourceVersion": version},
                    "status": {"conditions": [condition("Approved", "AgentOnItsNode", &message)]}});
                version = api
                    .patch_approval(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(write)?
                    .resource_version();
            }
            let patch = serde_json::json!({"metadata": {"resourceVersion": version},
                "status": {"certificate": k8s_openapi::ByteString(certificate.into_bytes())}});
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(write)?;
            tracing::info!(csr = %name, %node, validity_s = validity.as_secs(), "issued an agent's certificate");
        }
    }
    Ok(Action::await_change())
}

fn retry(_: Arc<CertificateSigningRequest>, error: &SignerError, _: Arc<Signer>) -> Action {
    tracing::warn!(%error, "agent certificate request: retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Answers the agents' certificate requests until the stream ends.
pub async fn run(signer: Signer) {
    let api: Api<CertificateSigningRequest> = Api::all(signer.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.signerName={SIGNER_NAME}"));
    Controller::new(api, config)
        .run(reconcile, retry, Arc::new(signer))
        .for_each(|_| async {})
        .await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use serde_json::json;

    use super::*;

    fn agents() -> AgentIdentity {
        AgentIdentity {
            namespace: "cryopod-system".into(),
            service_account: "cryopod-node-agent".into(),
            labels: [("app.kubernetes.io/component".to_owned(), "node-agent".to_owned())].into(),
        }
    }

    fn csr(user: &str, extra: serde_json::Value, usages: &[&str]) -> CertificateSigningRequest {
        serde_json::from_value(json!({
            "metadata": {"name": "cryopod-agent-node-1-abcde"},
            "spec": {"signerName": SIGNER_NAME, "request": "", "username": user, "extra": extra,
                     "usages": usages, "expirationSeconds": 3600}
        }))
        .unwrap()
    }

    fn pod(node: &str, labels: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "agent-x", "namespace": "cryopod-system", "uid": "u-1", "labels": labels},
            "spec": {"nodeName": node, "containers": []}
        }))
        .unwrap()
    }

    const AGENT: &str = "system:serviceaccount:cryopod-system:cryopod-node-agent";

    fn bound(node: &str) -> serde_json::Value {
        json!({EXTRA_POD_NAME: ["agent-x"], EXTRA_POD_UID: ["u-1"], EXTRA_NODE_NAME: [node]})
    }

    #[test]
    fn an_agent_pod_gets_its_own_nodes_certificate_and_nothing_else() {
        let labels = json!({"app.kubernetes.io/component": "node-agent"});
        let agent_pod = pod("node-1", labels.clone());
        let names = |n: &[&str]| n.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let good = csr(AGENT, bound("node-1"), &ALLOWED_USAGES);
        assert_eq!(
            decide(&good, &agents(), Some(&agent_pod), Some(&names(&["node-1"]))),
            Verdict::Issue {
                node: "node-1".into(),
                validity: Duration::from_secs(3600)
            }
        );
        let reason = |v: Verdict| match v {
            Verdict::Deny { reason, .. } => reason,
            other => panic!("not denied: {other:?}"),
        };
        // Another node's name, or one more name.
        assert_eq!(
            reason(decide(&good, &agents(), Some(&agent_pod), Some(&names(&["node-2"])))),
            "NotItsNode"
        );
        assert_eq!(
            reason(decide(
                &good,
                &agents(),
                Some(&agent_pod),
                Some(&names(&["node-1", "node-2"]))
            )),
            "NotItsNode"
        );
        // A tenant, or an admin, asking for a node's certificate.
        let tenant = csr("system:serviceaccount:team-a:default", bound("node-1"), &ALLOWED_USAGES);
        assert_eq!(
            reason(decide(&tenant, &agents(), Some(&agent_pod), Some(&names(&["node-1"])))),
            "NotTheAgent"
        );
        // The agents' account, but not from a pod (a token made by hand).
        let unbound = csr(AGENT, json!({}), &ALLOWED_USAGES);
        assert_eq!(
            reason(decide(&unbound, &agents(), None, Some(&names(&["node-1"])))),
            "NoPodBinding"
        );
        // A pod that is gone, or replaced under its name.
        assert_eq!(
            reason(decide(&good, &agents(), None, Some(&names(&["node-1"])))),
            "NoSuchAgentPod"
        );
        let mut replaced = agent_pod.clone();
        replaced.metadata.uid = Some("u-2".into());
        assert_eq!(
            reason(decide(&good, &agents(), Some(&replaced), Some(&names(&["node-1"])))),
            "NoSuchAgentPod"
        );
        // A pod of that account without the agents' labels.
        let other = pod("node-1", json!({"app": "x"}));
        assert_eq!(
            reason(decide(&good, &agents(), Some(&other), Some(&names(&["node-1"])))),
            "NotAnAgentPod"
        );
        // The token says another node than the pod's.
        let moved = csr(AGENT, bound("node-2"), &ALLOWED_USAGES);
        assert_eq!(
            reason(decide(&moved, &agents(), Some(&agent_pod), Some(&names(&["node-1"])))),
            "NotItsNode"
        );
        // Client usage, or a request that does not parse.
        let client = csr(AGENT, bound("node-1"), &["client auth"]);
        assert_eq!(
            reason(decide(&client, &agents(), Some(&agent_pod), Some(&names(&["node-1"])))),
            "UsageNotAllowed"
        );
        assert_eq!(reason(decide(&good, &agents(), Some(&agent_pod), None)), "BadRequest");
    }

    #[test]
    fn answered_or_foreign_requests_are_left_alone() {
        let mut foreign = csr(AGENT, bound("node-1"), &ALLOWED_USAGES);
        foreign.spec.signer_name = "kubernetes.io/kubelet-serving".into();
        assert_eq!(decide(&foreign, &agents(), None, None), Verdict::Skip);
        let mut denied = csr(AGENT, bound("node-1"), &ALLOWED_USAGES);
        denied.status =
            Some(serde_json::from_value(json!({"conditions": [{"type": "Denied", "status": "True"}]})).unwrap());
        assert_eq!(decide(&denied, &agents(), None, None), Verdict::Skip);
    }

    #[test]
    fn the_certificate_takes_only_the_key_from_the_request() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca = AgentCa::new(&ca_cert.pem(), &ca_key.serialize_pem()).unwrap();
        // A request for a CA certificate naming two nodes.
        let key = KeyPair::generate().unwrap();
        let mut asked = CertificateParams::new(vec!["node-1".to_owned(), "node-2".to_owned()]).unwrap();
        asked.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = asked.serialize_request(&key).unwrap().pem().unwrap();
        let (names, request) = parse_request(pem.as_bytes()).unwrap();
        assert_eq!(names, ["<a CA>"]);
        let issued = ca.issue(&request, "node-1", Duration::from_secs(3600)).unwrap();
        // Its chain: the agent's certificate, then the signing CA's.
        assert_eq!(issued.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(issued.ends_with(&ca_cert.pem()));
        let der = x509_parser::pem::parse_x509_pem(issued.as_bytes()).unwrap().1.contents;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!cert.is_ca());
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert!(
            matches!(
                san.value.general_names.as_slice(),
                [x509_parser::extensions::GeneralName::DNSName("node-1")]
            ),
            "{:?}",
            san.value.general_names
        );
        assert!(cert.extended_key_usage().unwrap().unwrap().value.server_auth);
        assert!(!cert.extended_key_usage().unwrap().unwrap().value.client_auth);
        assert_eq!(cert.public_key().subject_public_key.data.as_ref(), key.public_key_raw());
        assert!(parse_request(b"not a request").is_none());
    }
}
