//! Compiles the API contract under `proto/` into Rust with protox, a pure-Rust protobuf compiler, so the
//! build needs no `protoc` on the machine. The encoded descriptor set is written beside the generated
//! code for server reflection.
//!
//! Every `.proto` file under `proto/` is compiled, and the proto package they declare is handed to
//! `src/api.rs` as `API_PROTO_PACKAGE`: renaming the package (as `cargo generate` does) needs no change
//! to Rust code.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

use prost::Message;

const PROTO_ROOT: &str = "proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO_ROOT}");

    let mut files = Vec::new();
    find_protos(Path::new(PROTO_ROOT), &mut files)?;
    files.sort();
    let relative: Vec<PathBuf> = files
        .iter()
        .map(|file| file.strip_prefix(PROTO_ROOT).map(Path::to_path_buf))
        .collect::<Result<_, _>>()?;

    let descriptors = protox::Compiler::new([PROTO_ROOT])?
        .include_source_info(true)
        .include_imports(true)
        .open_files(&relative)?
        .file_descriptor_set();

    // The API's package: the one package the files under proto/ declare (imports come from elsewhere).
    let mut packages: Vec<&str> = descriptors
        .file
        .iter()
        .filter(|file| relative.iter().any(|path| Path::new(file.name()) == path))
        .map(|file| file.package())
        .collect();
    packages.dedup();
    let [package] = packages[..] else {
        return Err(
            format!("expected one proto package under {PROTO_ROOT}/, found {packages:?}").into(),
        );
    };
    println!("cargo:rustc-env=API_PROTO_PACKAGE={package}");

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("api_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}

fn find_protos(dir: &Path, found: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            find_protos(&path, found)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            found.push(path);
        }
    }
    Ok(())
}
