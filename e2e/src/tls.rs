//! Throw-away TLS material for an agent and its operator: the CA, the agent's serving
//! pair and the operator's client pair, in the directories each reads.

/// The cryopod CA, the agent's serving pair (in `dir`, as the agent reads it) and the
/// operator's client identity (in `operator_dir`).
#[derive(Debug)]
pub struct AgentTls {
    /// The agent's TLS directory: `tls.crt`, `tls.key`, `ca.crt`, and the manifest
    /// signing key [`MANIFEST_KEY_FILE`].
    pub dir: tempfile::TempDir,
    /// The operator's TLS directory (`CRYOPOD_TLS_DIR`).
    pub operator_dir: tempfile::TempDir,
    /// The CA certificate, PEM.
    pub ca: String,
    /// The operator's client identity.
    pub client: tonic::transport::Identity,
    /// The agent's serving identity, for `localhost`.
    pub server: tonic::transport::Identity,
}

/// The manifest signing key's file in [`AgentTls::dir`].
pub const MANIFEST_KEY_FILE: &str = "manifest.key";

/// The manifest signing key of every agent the tests run.
pub const MANIFEST_KEY: &[u8] = b"the e2e agents' manifest signing key, not a secret";

/// Generates fresh material; the agent's certificate names `localhost`.
pub fn agent_tls() -> Result<AgentTls, String> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let failed = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| failed("CA parameters", &e))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().map_err(|e| failed("CA key", &e))?;
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(|e| failed("CA certificate", &e))?;
    let leaf = |name: &str| -> Result<(String, String), String> {
        let key = KeyPair::generate().map_err(|e| failed("key", &e))?;
        let cert = CertificateParams::new(vec![name.to_owned()])
            .and_then(|params| params.signed_by(&key, &ca))
            .map_err(|e| failed(name, &e))?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_cert, server_key) = leaf("localhost")?;
    let (client_cert, client_key) = leaf("cryopod-operator")?;
    let write_dir = |files: [(&str, &str); 3]| -> Result<tempfile::TempDir, String> {
        let dir = tempfile::tempdir().map_err(|e| failed("temporary directory", &e))?;
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).map_err(|e| failed(name, &e))?;
        }
        Ok(dir)
    };
    let dir = write_dir([
        ("ca.crt", &ca.pem()),
        ("tls.crt", &server_cert),
        ("tls.key", &server_key),
    ])?;
    // The agents' shared manifest signing key, beside their TLS pair: one for every
    // test, so agent processes and in-process agents read each other's checkpoints.
    std::fs::write(dir.path().join(MANIFEST_KEY_FILE), MANIFEST_KEY).map_err(|e| failed(MANIFEST_KEY_FILE, &e))?;
    // The operator's side: its client pair and the CA that signed the agents'.
    let operator_dir = write_dir([
        ("ca.crt", &ca.pem()),
        ("tls.crt", &client_cert),
        ("tls.key", &client_key),
    ])?;
    Ok(AgentTls {
        dir,
        operator_dir,
        ca: ca.pem(),
        client: tonic::transport::Identity::from_pem(client_cert, client_key),
        server: tonic::transport::Identity::from_pem(server_cert, server_key),
    })
}
