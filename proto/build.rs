//! Generates the chaos.v1 code and the descriptor set that server reflection serves.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc: a fresh machine needs no apt package to build.
    if env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing reads the environment concurrently.
        unsafe { env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let protos = ["chaos/v1/faults.proto", "chaos/v1/metrics.proto", "chaos/v1/agent.proto", "chaos/v1/coordinator.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // Type names let the edge codec find each request's descriptor; the
    // codec checks every request at the edge (src/edge.rs).
    let mut config = prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("chaos_v1_descriptor.bin"))
        .codec_path("crate::edge::EdgeCodec")
        .compile_with_config(config, &protos, &["."])?;
    Ok(())
}
