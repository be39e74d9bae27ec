//! Claims: which coordinator a worker belongs to, so that several coordinators can share one cluster
//! (a Deployment scaled out, or the overlap of a rolling update) without two of them loading the same
//! worker.
//!
//! A claim is `/tessera/<cluster>/claims/<worker-id>` → the coordinator's instance id, created only if
//! absent (an etcd transaction), on the coordinator's lease. A coordinator that dies loses its claims when
//! its lease expires; one that stops cleanly revokes the lease, so its workers are free for the others at
//! once. If the lease is lost (etcd away for longer than the TTL), the session takes a new one and claims
//! again what it held; a worker that another coordinator took meanwhile is reported lost.

use std::{collections::BTreeSet, time::Duration};

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp};
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc::UnboundedReceiver, oneshot, watch};

use tessera_proto::etcd::{self, Backoff, Lease};

/// What a claims session tells the manager.
#[derive(Debug)]
pub enum Answer {
    /// The answer to a claim for a forming group: all its workers are ours, or none (`conflict`: another
    /// coordinator holds one; otherwise etcd could not be asked).
    Claimed { group: String, ok: bool, conflict: bool },
    /// A claim could not be renewed after the lease was lost: another coordinator has the worker now.
    ClaimLost { worker: String },
}

/// Where a session's answers go (the manager's mailbox, wrapped by whoever wires the two together).
pub type Report = Box<dyn Fn(Answer) + Send + Sync>;

/// The claims prefix of `cluster` (with a trailing slash).
pub fn prefix(cluster: &str) -> String {
    format!("/tessera/{cluster}/claims/")
}

pub enum Request {
    /// Claim every one of `workers` for `group`, or none: the answer is `Answer::Claimed`.
    Claim { group: String, workers: Vec<String> },
    /// Give these up (their group is gone).
    Release(Vec<String>),
}

pub struct Session {
    pub endpoints: Vec<String>,
    pub cluster: String,
    /// This coordinator's instance id (the claims' value).
    pub me: String,
    pub ttl: Duration,
}

enum Outcome {
    Stopped,
    Lost(etcd_client::Error),
}

/// Serves claim requests until `stop` turns true, then revokes the lease and says so on `done`.
/// Boxed so that its body is compiled once, in this crate, rather than again in every crate that awaits it.
pub fn run(
    s: Session,
    rx: UnboundedReceiver<Request>,
    tx: Report,
    stop: watch::Receiver<bool>,
    done: oneshot::Sender<()>,
) -> BoxFuture<'static, ()> {
    Box::pin(serve(s, rx, tx, stop, done))
}

async fn serve(
    s: Session,
    mut rx: UnboundedReceiver<Request>,
    tx: Report,
    mut stop: watch::Receiver<bool>,
    done: oneshot::Sender<()>,
) {
    let mut held = BTreeSet::new();
    let mut backoff = Backoff::default();
    let mut warned = false;
    loop {
        match session(&s, &mut rx, &tx, &mut stop, &mut held, &mut backoff).await {
            Outcome::Stopped => break,
            Outcome::Lost(e) => {
                if !warned {
                    tracing::warn!(error = %e, "etcd unreachable for worker claims: new groups wait until it is back");
                    warned = true;
                }
            }
        }
        // Requests that arrive while etcd is away are refused at once, so the manager can retry later.
        let delay = tokio::time::sleep(backoff.next_delay());
        tokio::pin!(delay);
        loop {
            tokio::select! {
                _ = &mut delay => break,
                _ = stop.wait_for(|s| *s) => {
                    let _ = done.send(());
                    return;
                }
                r = rx.recv() => match r {
                    Some(Request::Claim { group, .. }) => {
                        tx(Answer::Claimed { group, ok: false, conflict: false });
                    }
                    Some(Request::Release(ws)) => {
                        for w in ws {
                            held.remove(&w);
                        }
                    }
                    None => return,
                },
            }
        }
    }
    let _ = done.send(());
}

async fn session(
    s: &Session,
    rx: &mut UnboundedReceiver<Request>,
    tx: &Report,
    stop: &mut watch::Receiver<bool>,
    held: &mut BTreeSet<String>,
    backoff: &mut Backoff,
) -> Outcome {
    let mut client = match etcd::connect(&s.endpoints).await {
        Ok(c) => c,
        Err(e) => return Outcome::Lost(e),
    };
    let mut granted = match Lease::grant(&mut client, s.ttl).await {
        Ok(l) => l,
        Err(e) => return Outcome::Lost(e),
    };
    let lease = granted.id;
    // Claims held under an earlier lease: take them again (ours if nobody else took them meanwhile).
    for w in held.clone() {
        match claim(&mut client, s, lease, &w).await {
            Ok(true) => {}
            Ok(false) => {
                held.remove(&w);
                tx(Answer::ClaimLost { worker: w });
            }
            Err(e) => return Outcome::Lost(e),
        }
    }
    backoff.reset();
    let mut tick = tokio::time::interval(granted.every());
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = granted.renew().await {
                    return Outcome::Lost(e);
                }
            }
            _ = stopped(stop) => {
                etcd::revoke(&mut client, lease).await;
                tracing::info!("worker claims released");
                return Outcome::Stopped;
            }
            r = rx.recv() => match r {
                None => return Outcome::Stopped,
                Some(Request::Claim { group, workers }) => {
                    if let Err(e) = claim_group(&mut client, s, lease, &group, &workers, held, tx).await {
                        return Outcome::Lost(e);
                    }
                }
                Some(Request::Release(ws)) => {
                    for w in &ws {
                        held.remove(w);
                    }
                    release(&mut client, s, &ws).await;
                }
            },
        }
    }
}

/// Claims every one of `workers` for `group`, or none (a claim another coordinator holds gives back the
/// ones already made), and answers `Answer::Claimed`. An etcd error gives them back too and ends the session.
async fn claim_group(
    client: &mut Client,
    s: &Session,
    lease: i64,
    group: &str,
    workers: &[String],
    held: &mut BTreeSet<String>,
    tx: &Report,
) -> Result<(), etcd_client::Error> {
    let mut got = Vec::new();
    let mut conflict = false;
    for w in workers {
        match claim(client, s, lease, w).await {
            Ok(true) => got.push(w.clone()),
            Ok(false) => {
                conflict = true;
                break;
            }
            Err(e) => {
                release(client, s, &got).await;
                tx(Answer::Claimed { group: group.to_string(), ok: false, conflict: false });
                return Err(e);
            }
        }
    }
    if conflict {
        release(client, s, &got).await;
    } else {
        held.extend(got);
    }
    tx(Answer::Claimed { group: group.to_string(), ok: !conflict, conflict });
    Ok(())
}

/// Resolves when `stop` turns true (holding no borrow of it afterwards).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Claims `worker` on `lease` unless another coordinator holds it; true if it is ours now.
async fn claim(client: &mut Client, s: &Session, lease: i64, worker: &str) -> Result<bool, etcd_client::Error> {
    let key = format!("{}{worker}", prefix(&s.cluster));
    let put = TxnOp::put(key.as_str(), s.me.as_str(), Some(PutOptions::new().with_lease(lease)));
    // Free (never created), or already ours (re-claimed on a new lease).
    let free = Txn::new().when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)]).and_then([put.clone()]);
    if client.txn(free).await?.succeeded() {
        return Ok(true);
    }
    let ours = Txn::new().when([Compare::value(key.as_str(), CompareOp::Equal, s.me.as_str())]).and_then([put]);
    Ok(client.txn(ours).await?.succeeded())
}

/// Deletes the claims on `workers` that are still ours.
async fn release(client: &mut Client, s: &Session, workers: &[String]) {
    for w in workers {
        let key = format!("{}{w}", prefix(&s.cluster));
        let txn = Txn::new()
            .when([Compare::value(key.as_str(), CompareOp::Equal, s.me.as_str())])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        if let Err(e) = client.txn(txn).await {
            tracing::warn!(worker = %w, error = %e, "could not release a claim; it expires with the lease");
        }
    }
}
