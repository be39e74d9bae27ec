//! What crosses between Tessera's processes, and nothing else: the contract between the coordinator and its
//! workers.
//!
//! - [`v1`]: the `tessera.v1` gRPC protocol. The `.proto` source in `proto/tessera/v1/worker.proto` is the
//!   documentation of every message and field; this crate re-exports what tonic/prost generate from it.
//!   Breaking changes get a new package (`tessera.v2`), never an edit in place: workers and coordinators
//!   of different builds meet in a cluster.
//! - [`step`]: a step's sequences, sampling parameters and sampled tokens as both sides handle them (the
//!   coordinator's scheduler builds them, a worker's engine runs them).
//! - [`record`]: the record a worker registers in etcd and the key layout under `/tessera/<cluster>/`.
//! - [`etcd`]: how both sides connect to etcd (endpoints, timeouts, backoff, a lease kept alive).
//! - [`channel`]: opening a gRPC channel to a worker.
//! - [`auth`]: the cluster token every call to a worker and every collective handshake carries.

pub mod auth;
pub mod channel;
pub mod etcd;
pub mod record;
pub mod step;

/// Generated types and the `Worker` service client/server for `tessera.v1`.
pub mod v1 {
    tonic::include_proto!("tessera.v1");
}

/// The protocol version string a worker reports in `InfoReply.protocol`.
pub const PROTOCOL_VERSION: &str = "tessera.v1";
