//! Generates the tonic code from `proto/` with a vendored `protoc`, so the
//! build never depends on one installed on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    unsafe_env(&protoc);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let file = root.join("chat/v1/chat.proto");
    println!("cargo:rerun-if-changed={}", file.display());
    tonic_prost_build::configure().compile_protos(&[file], &[root])?;
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_env(protoc: &std::path::Path) {
    // `set_var` is unsafe in edition 2024 because of other threads; a build
    // script has none.
    unsafe { std::env::set_var("PROTOC", protoc) };
}
