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

    build_info();
    Ok(())
}

/// What `<package>_build_info` reports beside the version: the commit (`BUILD_REVISION` when the build
/// sets it, as a container build without `.git` does, else `git rev-parse`) and the compiler's version.
/// Either is "unknown" rather than a failed build when it cannot be found.
fn build_info() {
    println!("cargo:rerun-if-env-changed=BUILD_REVISION");
    // A new commit changes the branch's ref file, not HEAD; watch both, and only files that exist (a
    // missing one would rerun this script on every build).
    if let Ok(head) = fs::read_to_string(".git/HEAD") {
        println!("cargo:rerun-if-changed=.git/HEAD");
        if let Some(reference) = head.trim().strip_prefix("ref: ")
            && Path::new(".git").join(reference).exists()
        {
            println!("cargo:rerun-if-changed=.git/{reference}");
        }
    }
    let revision = env::var("BUILD_REVISION")
        .ok()
        .filter(|revision| !revision.is_empty())
        .or_else(|| command_output("git", &["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    // "rustc 1.95.0 (59807616e 2026-04-14)" -> "1.95.0"
    let rustc_version = command_output(&rustc, &["--version"])
        .and_then(|line| line.split_whitespace().nth(1).map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=BUILD_REVISION={revision}");
    println!("cargo:rustc-env=BUILD_RUSTC_VERSION={rustc_version}");
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (output.status.success() && !text.is_empty()).then(|| text.to_owned())
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
