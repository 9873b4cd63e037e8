//! Generates the flow observer's gRPC server and client
//! (`proto/flows.proto`, package `skep.flows.v1`) with tonic-build.
//! Needs `protoc` (Debian's protobuf-compiler; `cargo xtask setup`
//! installs it), or the path of one in `PROTOC`.

fn main() {
    println!("cargo:rerun-if-changed=proto/flows.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    if std::env::var_os("PROTOC").is_none()
        && !std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .any(|d| d.join("protoc").is_file())
    {
        eprintln!(
            "protoc was not found (needed for proto/flows.proto): run `cargo xtask setup` \
             (installs protobuf-compiler) or set PROTOC to a protoc binary"
        );
        std::process::exit(1);
    }
    if let Err(e) = tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/flows.proto"], &["proto"])
    {
        eprintln!("generating the flow observer from proto/flows.proto failed: {e}");
        std::process::exit(1);
    }
}
