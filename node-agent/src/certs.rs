//! Each agent's own server certificate, naming its node. One key shared by every
//! node would let whoever takes it from one node pose as any agent to the operator,
//! which sends agents storage credentials and decryption keys. So an agent makes a
//! key pair at start, asks for a certificate through a Kubernetes
//! CertificateSigningRequest (signer `cryopod.io/node-agent`), and the operator signs
//! only a request from an agent pod for the node that pod runs on (see the
//! operator's `signer`). The key never leaves the process.

use std::future::Future;
use std::time::Duration;

/// The signer the operator serves.
pub const AGENT_SIGNER: &str = "cryopod.io/node-agent";
/// The usages an agent asks for: a TLS server's.
pub const AGENT_USAGES: [&str; 3] = ["digital signature", "key encipherment", "server auth"];

/// A private key (PEM) and the certificate request (PEM) for its public half.
#[derive(Clone)]
pub struct NodeRequest {
    /// The private key, PEM; it stays in this process.
    pub key_pem: String,
    /// The PKCS#10 request, PEM.
    pub csr_pem: String,
}

impl std::fmt::Debug for NodeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRequest")
            .field("csr_pem", &self.csr_pem)
            .finish_non_exhaustive()
    }
}

/// A fresh key pair and a request for a server certificate naming `node` (its only
/// subject alternative name).
pub fn node_request(node: &str) -> Result<NodeRequest, String> {
    use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair};
    let key = KeyPair::generate().map_err(|e| format!("cannot make a key pair: {e}"))?;
    let mut params = CertificateParams::new(vec![node.to_owned()])
        .map_err(|e| format!("{node:?} cannot be named in a certificate: {e}"))?;
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, format!("cryopod-node-agent {node}"));
    params.distinguished_name = subject;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| format!("cannot make the certificate request: {e}"))?;
    Ok(NodeRequest {
        key_pem: key.serialize_pem(),
        csr_pem: csr,
    })
}

/// The DNS names the first certificate of a PEM chain is for (its subject
/// alternative names), and whether it may act as a CA.
pub fn certificate_names(pem: &str) -> Result<(Vec<String>, bool), String> {
    let der = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| format!("not a PEM certificate: {e}"))?
        .1
        .contents;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| format!("not a certificate: {e}"))?;
    let names = cert
        .subject_alternative_name()
        .map_err(|e| format!("its subject alternative names: {e}"))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(name) => (*name).to_owned(),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((names, cert.is_ca()))
}

/// Who signs an agent's request; a trait so the start-up is tested without a cluster.
pub trait CertificateIssuer: Send + Sync {
    /// The certificate chain (PEM) issued for `csr_pem`, naming `node`.
    fn issue(&self, csr_pem: &str, node: &str) -> impl Future<Output = Result<String, String>> + Send;
}

/// Asks through the Kubernetes CertificateSigningRequest API, as the agent's own
/// service account, and waits for the operator's answer.
#[derive(Clone)]
pub struct KubeCsr {
    /// The API server, as the agent's service account.
    pub client: kube::Client,
    /// The signer name (`CRYOPOD_CERT_SIGNER`).
    pub signer: String,
    /// How long the certificate is asked to last.
    pub validity: Duration,
    /// How long to wait for the answer.
    pub wait: Duration,
}

impl std::fmt::Debug for KubeCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCsr")
            .field("signer", &self.signer)
            .field("validity", &self.validity)
            .finish_non_exhaustive()
    }
}

/// What a CertificateSigningRequest's status says: issued, refused, or not yet.
pub fn answer_of(
    status: Option<&k8s_openapi::api::certificates::v1::CertificateSigningRequestStatus>,
) -> Option<Result<String, String>> {
    let status = status?;
    if let Some(refused) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True")
    {
        return Some(Err(format!(
            "the certificate request was {}: {}: {}",
            refused.type_.to_lowercase(),
            refused.reason.as_deref().unwrap_or("no reason"),
            refused.message.as_deref().unwrap_or("")
        )));
    }
    let issued = status.certificate.as_ref().filter(|c| !c.0.is_empty())?;
    Some(Ok(String::from_utf8_lossy(&issued.0).into_owned()))
}

impl CertificateIssuer for KubeCsr {
    async fn issue(&self, csr_pem: &str, node: &str) -> Result<String, String> {
        use k8s_openapi::api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec};
        use kube::api::{Api, ObjectMeta, PostParams};
        let api: Api<CertificateSigningRequest> = Api::all(self.client.clone());
        let request = CertificateSigningRequest {
            metadata: ObjectMeta {
                generate_name: Some(format!("cryopod-agent-{node}-")),
                ..ObjectMeta::default()
            },
            spec: CertificateSigningRequestSpec {
                request: k8s_openapi::ByteString(csr_pem.as_bytes().to_vec()),
                signer_name: self.signer.clone(),
                usages: Some(AGENT_USAGES.iter().map(|u| (*u).to_owned()).collect()),
                expiration_seconds: Some(i32::try_from(self.validity.as_secs()).unwrap_or(i32::MAX)),
                ..CertificateSigningRequestSpec::default()
            },
            status: None,
        };
        let created = api
            .create(&PostParams::default(), &request)
            .await
            .map_err(|e| format!("cannot create a CertificateSigningRequest: {e}"))?;
        let name = created.metadata.name.unwrap_or_default();
        tracing::info!(csr = %name, signer = %self.signer, "asked for this node's certificate");
        let deadline = tokio::time::Instant::now() + self.wait;
        let mut every = tokio::time::interval(Duration::from_millis(500));
        loop {
            every.tick().await;
            match api.get(&name).await {
                Ok(csr) => {
                    if let Some(answer) = answer_of(csr.status.as_ref()) {
                        let chain = answer.map_err(|why| format!("{why} (CertificateSigningRequest {name})"))?;
                        // Served only if it is this node's and no more.
                        return match certificate_names(&chain)? {
                            (names, false) if names == [node] => Ok(chain),
                            (names, is_ca) => Err(format!(
                                "CertificateSigningRequest {name} was answered with a certificate for {names:?} \
                                 (CA: {is_ca}), not for {node} alone: refused"
                            )),
                        };
                    }
                }
                Err(e) => tracing::warn!(csr = %name, error = %e, "cannot read the certificate request"),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "CertificateSigningRequest {name} was not answered within {} s: is the operator running?",
                    self.wait.as_secs()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use k8s_openapi::api::certificates::v1::{CertificateSigningRequestCondition, CertificateSigningRequestStatus};

    use super::*;

    #[test]
    fn a_request_names_only_its_node_and_keeps_its_key_out_of_debug() {
        let request = node_request("node-1").unwrap();
        assert!(request.csr_pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert!(!format!("{request:?}").contains("PRIVATE KEY"));
        let der = pem_der(&request.csr_pem);
        let (_, csr) =
            <x509_parser::certification_request::X509CertificationRequest as x509_parser::prelude::FromDer<
                '_,
                x509_parser::error::X509Error,
            >>::from_der(&der)
            .unwrap();
        let names: Vec<String> = csr
            .requested_extensions()
            .into_iter()
            .flatten()
            .filter_map(|e| match e {
                x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) => {
                    Some(san.general_names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                }
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(names, ["DNSName(node-1)"]);
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1.contents
    }

    #[test]
    fn an_answer_is_a_certificate_or_the_reason_it_was_refused() {
        assert_eq!(answer_of(None), None);
        let pending = CertificateSigningRequestStatus::default();
        assert_eq!(answer_of(Some(&pending)), None);
        let issued = CertificateSigningRequestStatus {
            certificate: Some(k8s_openapi::ByteString(b"-----BEGIN CERTIFICATE-----".to_vec())),
            ..Default::default()
        };
        assert_eq!(
            answer_of(Some(&issued)),
            Some(Ok("-----BEGIN CERTIFICATE-----".to_owned()))
        );
        let denied = CertificateSigningRequestStatus {
            conditions: Some(vec![CertificateSigningRequestCondition {
                type_: "Denied".into(),
                status: "True".into(),
                reason: Some("NotItsNode".into()),
                message: Some("the pod runs on node-2".into()),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let refused = answer_of(Some(&denied)).unwrap().unwrap_err();
        assert!(
            refused.contains("denied: NotItsNode: the pod runs on node-2"),
            "{refused}"
        );
    }
}
