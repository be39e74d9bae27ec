//! How both sides talk to etcd: the endpoints from `--etcd`, the connection options (short timeouts, so an
//! outage is noticed and retried rather than waited on), the backoff between reconnection attempts, and a
//! lease kept alive. The worker's registration and the coordinator's membership watch and claims all use
//! these.
//!
//! The calls that open a connection or hold a lease return boxed futures: an async body is compiled into
//! every crate that awaits it, and etcd's client brings the whole gRPC/HTTP2 client stack with it. Boxed
//! here, the worker and the coordinator share one copy of it in the binary rather than one each.

use std::time::Duration;

use etcd_client::{Client, Error, LeaseKeepAliveStream, LeaseKeeper};
use futures_util::future::BoxFuture;

/// Waits between reconnection attempts to etcd: doubling from 250 ms up to 5 s.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Duration::from_millis(250) }
    }
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        d
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

/// Options for every etcd connection: short timeouts, so an outage is noticed and retried, not waited on.
pub fn connect_options() -> etcd_client::ConnectOptions {
    etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
}

/// Connects to the first of `endpoints` that answers, with [`connect_options`].
pub fn connect(endpoints: &[String]) -> BoxFuture<'static, Result<Client, Error>> {
    let endpoints = endpoints.to_vec();
    Box::pin(async move { Client::connect(&endpoints, Some(connect_options())).await })
}

/// A lease granted to this process and the stream that keeps it alive.
pub struct Lease {
    pub id: i64,
    keeper: LeaseKeeper,
    answers: LeaseKeepAliveStream,
    every: Duration,
}

impl Lease {
    /// Grants a lease of `ttl` (at least a second) and opens its keep-alive stream.
    pub fn grant(client: &mut Client, ttl: Duration) -> BoxFuture<'_, Result<Lease, Error>> {
        Box::pin(async move {
            let ttl = ttl.as_secs().max(1) as i64;
            let id = client.lease_grant(ttl, None).await?.id();
            let (keeper, answers) = client.lease_keep_alive(id).await?;
            // A third of the TTL: two renewals may be lost before the lease expires.
            Ok(Lease { id, keeper, answers, every: Duration::from_millis((ttl as u64 * 1000 / 3).max(200)) })
        })
    }

    /// How often to [`renew`](Lease::renew) it.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// Renews the lease and waits for etcd's answer; an error if it expired or etcd did not answer.
    pub fn renew(&mut self) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            self.keeper.keep_alive().await?;
            let lost = |why: &str| Err(Error::LeaseKeepAliveError(why.into()));
            match tokio::time::timeout(self.every.max(Duration::from_secs(2)), self.answers.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => Ok(()),
                Ok(Ok(Some(_))) => lost("the lease expired"),
                Ok(Ok(None)) => lost("keep-alive stream ended"),
                Ok(Err(e)) => Err(e),
                Err(_) => lost("no keep-alive answer"),
            }
        })
    }
}

/// Revokes lease `id`, which deletes every key on it at once; false if etcd did not confirm within 2 s.
pub fn revoke(client: &mut Client, id: i64) -> BoxFuture<'_, bool> {
    Box::pin(
        async move { matches!(tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(id)).await, Ok(Ok(_))) },
    )
}

/// `--etcd` values: comma-separated endpoints, `http://` added where missing.
pub fn endpoints(arg: &str) -> Vec<String> {
    arg.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| if e.contains("://") { e.to_string() } else { format!("http://{e}") })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_ceiling_and_resets() {
        let mut b = Backoff::default();
        let d: Vec<u64> = (0..7).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(d, [250, 500, 1000, 2000, 4000, 5000, 5000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(250));
    }

    #[test]
    fn endpoints_split_and_get_a_scheme() {
        assert_eq!(endpoints("a:2379, http://b:2379,"), ["http://a:2379", "http://b:2379"]);
    }
}
