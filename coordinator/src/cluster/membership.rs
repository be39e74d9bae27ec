//! The coordinator's view of the registered workers: a snapshot of the prefix, then a watch from the
//! snapshot's revision, so no change falls between the two.
//!
//! Any error (etcd down, the watch cancelled or compacted) ends the watch; after a backoff the view is
//! rebuilt from a fresh snapshot, which the manager reconciles against what it knew. Until then nothing
//! changes: serving goes on with the last known membership.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use etcd_client::{EventType, GetOptions, WatchOptions};
use futures_util::future::BoxFuture;
use tokio::sync::mpsc::UnboundedSender;

use tessera_proto::etcd::{self, Backoff};

/// A change to the registered workers, as raw keys and values (the manager parses them).
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Everything under the prefix now: replaces what was known.
    Snapshot(Vec<(Vec<u8>, Vec<u8>)>),
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

/// Watches `prefix` forever, sending changes to `tx`; `connected` tells whether etcd is reachable now.
/// Boxed so that its body is compiled once, in this crate, rather than again in every crate that awaits it.
pub fn watch(
    endpoints: Vec<String>,
    prefix: String,
    tx: UnboundedSender<Change>,
    connected: Arc<AtomicBool>,
) -> BoxFuture<'static, ()> {
    Box::pin(watch_forever(endpoints, prefix, tx, connected))
}

async fn watch_forever(
    endpoints: Vec<String>,
    prefix: String,
    tx: UnboundedSender<Change>,
    connected: Arc<AtomicBool>,
) {
    let mut backoff = Backoff::default();
    let mut outage = false;
    loop {
        let result = follow(&endpoints, &prefix, &tx, &connected, &mut backoff, &mut outage).await;
        connected.store(false, Ordering::Relaxed);
        if tx.is_closed() {
            return;
        }
        if let Err(e) = result
            && !outage
        {
            tracing::warn!(error = %e, "etcd unreachable: serving on the last known membership, reconnecting");
            outage = true;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn follow(
    endpoints: &[String],
    prefix: &str,
    tx: &UnboundedSender<Change>,
    connected: &AtomicBool,
    backoff: &mut Backoff,
    outage: &mut bool,
) -> Result<(), etcd_client::Error> {
    let mut client = etcd::connect(endpoints).await?;
    let snap = client.get(prefix, Some(GetOptions::new().with_prefix())).await?;
    let revision = snap.header().map_or(0, |h| h.revision());
    let kvs = snap.kvs().iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec())).collect();
    let mut stream =
        client.watch(prefix, Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1))).await?;
    if tx.send(Change::Snapshot(kvs)).is_err() {
        return Ok(());
    }
    connected.store(true, Ordering::Relaxed);
    if std::mem::take(outage) {
        tracing::info!("etcd reachable again: membership resynchronised");
    }
    backoff.reset();
    while let Some(resp) = stream.message().await? {
        if resp.canceled() {
            return Err(etcd_client::Error::WatchError(format!(
                "watch cancelled (compacted at {}): {}",
                resp.compact_revision(),
                resp.cancel_reason()
            )));
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let change = match ev.event_type() {
                EventType::Put => Change::Put(kv.key().to_vec(), kv.value().to_vec()),
                EventType::Delete => Change::Delete(kv.key().to_vec()),
            };
            if tx.send(change).is_err() {
                return Ok(());
            }
        }
    }
    Err(etcd_client::Error::WatchError("the watch stream ended".into()))
}
