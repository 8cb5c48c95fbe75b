//! Generates the **server** side of containerd's Snapshots and Diff services.
//!
//! containerd-client already has every message type (and the clients) but no server
//! stubs, so only the service traits are generated here and every message resolves to
//! containerd-client's types through `extern_path`: one set of types, so a request the
//! tests build with containerd-client's client is the very type the server receives.
//! The .proto files are copied into `proto/` (same layout as upstream) so the build
//! does not depend on the registry's layout, and are compiled with protox (pure Rust)
//! so no `protoc` is needed.

use std::path::PathBuf;

const PROTO_FILES: &[&str] = &[
    "github.com/containerd/containerd/api/services/snapshots/v1/snapshots.proto",
    "github.com/containerd/containerd/api/services/diff/v1/diff.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed={}", root.display());
    // protox carries the google/protobuf well-known types itself, and prost maps them
    // to `::prost_types` (as containerd-client does) without being told.
    let fds = protox::compile(PROTO_FILES, [&root])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        // The paths are where containerd-client 0.9's lib.rs includes each package.
        .extern_path(
            ".containerd.services.snapshots.v1",
            "::containerd_client::services::v1::snapshots",
        )
        .extern_path(".containerd.services.diff.v1", "::containerd_client::services::v1")
        .extern_path(".containerd.types", "::containerd_client::types")
        .compile_fds(fds)?;
    Ok(())
}
