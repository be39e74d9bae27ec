//! Generates the tonic/prost code for `tessera.v1`.
//!
//! `protoc` comes from the `protoc-bin-vendored` crate so that a machine with only the Rust toolchain can
//! build the workspace; an explicit `PROTOC` in the environment still wins.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    tonic_prost_build::configure().compile_protos(&["proto/tessera/v1/worker.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
