//! The worker's side of membership: its record on a lease, kept alive for as long as the worker serves.
//!
//! The lease is refreshed every third of its TTL. If etcd goes away the worker keeps serving (the
//! coordinator keeps routing on what it knew) and retries with backoff; when etcd answers again it puts
//! its record on a fresh lease, whether or not the old one survived. On a clean shutdown the lease is
//! revoked, which deletes the record at once instead of a TTL later.

use std::time::Duration;

use etcd_client::{Client, PutOptions};
use tokio::sync::watch;

use tessera_proto::etcd::{self, Backoff, Lease};

pub struct Registration {
    pub endpoints: Vec<String>,
    pub key: String,
    pub value: String,
    pub ttl: Duration,
}

/// Keeps the record registered until `stop` turns true, then revokes it.
pub async fn run(reg: Registration, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::default();
    let mut outage = false;
    // The latest lease granted: revoked at shutdown.
    let mut lease = None;
    loop {
        let outcome = tokio::select! {
            r = hold(&reg, &mut lease, &mut backoff, &mut outage) => r,
            _ = stop.wait_for(|s| *s) => Ok(()),
        };
        if *stop.borrow() {
            if let Some((mut client, id)) = lease {
                if etcd::revoke(&mut client, id).await {
                    tracing::info!(key = %reg.key, "deregistered from etcd");
                } else {
                    tracing::warn!(key = %reg.key, "could not deregister; the record expires with its lease");
                }
            }
            return;
        }
        if let Err(e) = outcome
            && !outage
        {
            tracing::warn!(error = %e, "not registered in etcd (unreachable or refused); serving on, retrying with backoff");
            outage = true;
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }
}

/// Connects, puts the record on a new lease and keeps it alive; returns on the first error.
async fn hold(
    reg: &Registration,
    lease: &mut Option<(Client, i64)>,
    backoff: &mut Backoff,
    outage: &mut bool,
) -> Result<(), etcd_client::Error> {
    let mut client = etcd::connect(&reg.endpoints).await?;
    let mut granted = Lease::grant(&mut client, reg.ttl).await?;
    *lease = Some((client.clone(), granted.id));
    client.put(reg.key.as_str(), reg.value.as_str(), Some(PutOptions::new().with_lease(granted.id))).await?;
    tracing::info!(key = %reg.key, ttl_s = reg.ttl.as_secs().max(1), "registered in etcd");
    backoff.reset();
    *outage = false;
    loop {
        tokio::time::sleep(granted.every()).await;
        granted.renew().await?;
    }
}
