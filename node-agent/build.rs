//! Compiles the vendored CRI API into a tonic client in OUT_DIR, with protox (pure
//! Rust, so no `protoc` is needed on the machine).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/cri-api/api.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto/cri-api"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_fds(descriptors)?;
    Ok(())
}
