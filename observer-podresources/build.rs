//! Generates the PodResources v1 client (and, with the `server` feature, the
//! server) from proto/…/api.proto: protox parses it in Rust, tonic-prost-build
//! writes the code. Neither needs protoc or the network.
use std::env;

const PROTO: &str = "proto/k8s.io/kubelet/pkg/apis/podresources/v1/api.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    let fds = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(env::var_os("CARGO_FEATURE_SERVER").is_some())
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
