//! Compiles the platform's test services (`proto/platform/testing/v1`) with protox, a pure-Rust
//! protobuf compiler: the platform's tests run a real server over them, naming no real service.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO_ROOT: &str = "proto";
const TESTING_PROTO: &str = "platform/testing/v1/testing.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");
    let descriptors = protox::Compiler::new([PROTO_ROOT])?
        .include_imports(true)
        .open_files([TESTING_PROTO])?
        .file_descriptor_set();
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("testing_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
