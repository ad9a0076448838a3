//! Compiles cryopod's agent API (client and server) into OUT_DIR with protox, which is
//! pure Rust: no `protoc` is needed on the machine.

/// Messages of the agent API whose derived Debug would print a secret.
const SECRET_MESSAGES: [&str; 9] = [
    "S3Storage",
    "PeerStorage",
    "GrantReadResponse",
    "ReadObjectRequest",
    "GcsStorage",
    "AzureStorage",
    "CheckpointRequest",
    "PrepareRestoreRequest",
    "RestoreResult",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/cryopod/agent.proto");
    let agent = protox::compile(["proto/cryopod/agent.proto"], ["proto/cryopod"])?;
    tonic_prost_build::configure()
        .build_transport(false)
        // These carry credentials, keys or a pod's spec: their Debug, written by
        // hand in `redacted`, leaves them out.
        .skip_debug(SECRET_MESSAGES.iter().map(|m| format!(".cryopod.agent.v1alpha1.{m}")))
        .compile_fds(agent)?;
    Ok(())
}
