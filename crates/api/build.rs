//! Compiles the repository's top-level `proto/csi.proto` (CSI spec v1.12.0) and
//! `proto/pluginregistration.proto` (kubelet's plugin registration, v1) with protox, so
//! no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["csi.proto", "pluginregistration.proto"].map(|f| dir.join(f));
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [&dir])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .generate_default_stubs(true)
        .compile_fds(descriptors)?;
    Ok(())
}
