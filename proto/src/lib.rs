//! The coordinator ↔ worker protocol, `tessera.v1`.
//!
//! The `.proto` source in `proto/tessera/v1/worker.proto` is the documentation of every message and field;
//! this crate only re-exports what tonic/prost generate from it. Breaking changes get a new package
//! (`tessera.v2`), never an edit in place: workers and coordinators of different builds meet in a cluster.

/// Generated types and the `Worker` service client/server for `tessera.v1`.
pub mod v1 {
    tonic::include_proto!("tessera.v1");
}

/// The protocol version string a worker reports in `InfoReply.protocol`.
pub const PROTOCOL_VERSION: &str = "tessera.v1";
