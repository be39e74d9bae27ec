//! Opening a gRPC channel to a worker.
//!
//! Boxed, like [`crate::etcd::connect`]: the connection's HTTP/2 client is compiled once, here, for every
//! crate that opens one, rather than again in each.

use futures_util::future::BoxFuture;
use tonic::transport::{Channel, Endpoint, Error};

/// Connects to `endpoint` as it is configured (timeouts, `TCP_NODELAY`).
pub fn connect(endpoint: Endpoint) -> BoxFuture<'static, Result<Channel, Error>> {
    Box::pin(async move { endpoint.connect().await })
}
