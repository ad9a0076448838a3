//! Compiles the vendored CRI API (client) into OUT_DIR with protox, which is pure
//! Rust: no `protoc` is needed on the machine. The agent's own API is the
//! `cryopod-agent-api` crate.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/cri-api/api.proto");
    let cri = protox::compile(["proto/cri-api/api.proto"], ["proto/cri-api"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_fds(cri)?;
    Ok(())
}
