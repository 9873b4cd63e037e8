//! Generates the workload identity service's gRPC server and client
//! (`proto/identity.proto`, package `skep.mesh.v1`) with tonic-build.
//! Needs `protoc` (Debian's protobuf-compiler; `cargo xtask setup`
//! installs it), or the path of one in `PROTOC`.

fn main() {
    println!("cargo:rerun-if-changed=proto/identity.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    if std::env::var_os("PROTOC").is_none()
        && !std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .any(|d| d.join("protoc").is_file())
    {
        eprintln!(
            "protoc was not found (needed for proto/identity.proto): run `cargo xtask setup` \
             (installs protobuf-compiler) or set PROTOC to a protoc binary"
        );
        std::process::exit(1);
    }
    if let Err(e) = tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/identity.proto"], &["proto"])
    {
        eprintln!("generating the identity service from proto/identity.proto failed: {e}");
        std::process::exit(1);
    }
}
