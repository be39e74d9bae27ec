//! Cluster mode, the coordinator's side: workers register in etcd (`tessera_worker::registration`), the
//! coordinator forms tensor-parallel groups from them.
//!
//! - [`membership`]: the coordinator's view of the prefix, a snapshot then a watch, re-snapshotted after
//!   every reconnection; while etcd is away the last membership stands.
//! - [`claims`]: which coordinator owns which worker, so that several can share a cluster.
//! - [`manager`]: turns membership into replicas (groups of `tp` free workers, loaded and added to
//!   routing) and failed replicas back into free workers.
//!
//! The record a worker registers and its key layout are part of the protocol: `tessera_proto::record`.

pub mod claims;
pub mod manager;
pub mod membership;
