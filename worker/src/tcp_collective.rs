//! The TCP implementation of [`Collective`] for CPU worker processes: a ring, each rank sending to
//! `rank + 1` and receiving from `rank - 1`.
//!
//! Connections are made once, when the group loads its model ([`rendezvous`]), and checked with a
//! handshake naming the group and the sender's rank and proving the cluster token, so a stray, stale or
//! stranger's connection is refused. Every
//! message carries a sequence number and length: ranks that fall out of step get an error, not garbage.
//! Every read and write has a timeout, and a peer that dies closes its socket: either way the collective
//! returns an error within the timeout and never hangs.

use std::{
    io::{self, Read, Write},
    net::TcpStream,
    sync::Mutex,
    time::{Duration, Instant},
};

use tessera_proto::auth::ClusterToken;

use crate::collective::{Collective, CollectiveError};

/// Version 2 of the handshake carries a proof of the cluster token; a version-1 peer is refused.
const MAGIC: &[u8; 4] = b"TSR2";
/// Most time a connection to the collective port may take to send its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages up to this size are written before reading: the sockets' buffers absorb them, so two ranks
/// writing to each other at once cannot deadlock. Larger ones are written from a second thread while this
/// one reads.
const INLINE_SEND: usize = 64 * 1024;
/// All-reduces up to this many bytes gather whole buffers (fewer round trips) instead of running the ring.
const SMALL_ALL_REDUCE: usize = 64 * 1024;

struct Ring {
    right: TcpStream,
    left: TcpStream,
    /// Sequence number of the next message, identical on every rank.
    seq: u64,
}

pub struct TcpCollective {
    rank: usize,
    world: usize,
    ring: Mutex<Ring>,
    /// Nanoseconds spent in exchanges since `take_seconds` last ran.
    busy_ns: std::sync::atomic::AtomicU64,
}

impl TcpCollective {
    fn err(&self, op: &'static str, message: impl Into<String>) -> CollectiveError {
        CollectiveError { op, rank: self.rank, world: self.world, message: message.into() }
    }

    fn left_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn io_err(&self, op: &'static str, e: io::Error, sending: bool) -> CollectiveError {
        let peer = if sending { (self.rank + 1) % self.world } else { self.left_rank() };
        let what = match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "timed out waiting for".to_string(),
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                "lost the connection to".to_string()
            }
            _ => format!("I/O error ({e}) with"),
        };
        self.err(op, format!("{what} rank {peer}"))
    }

    /// Sends `payload` to the right neighbour while receiving the left neighbour's message of the same
    /// sequence number. `expect_len` checks the received length when the caller knows it.
    fn exchange(
        &self,
        op: &'static str,
        payload: &[u8],
        expect_len: Option<usize>,
    ) -> Result<Vec<u8>, CollectiveError> {
        let _span = tracing::info_span!(target: "tessera::worker", "collective", op, bytes = payload.len()).entered();
        let started = Instant::now();
        let result = self.exchange_inner(op, payload, expect_len);
        self.busy_ns.fetch_add(started.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
        result
    }

    fn exchange_inner(
        &self,
        op: &'static str,
        payload: &[u8],
        expect_len: Option<usize>,
    ) -> Result<Vec<u8>, CollectiveError> {
        let mut guard = self.ring.lock().map_err(|_| self.err(op, "a previous collective panicked"))?;
        let ring = &mut *guard;
        let seq = ring.seq;
        ring.seq += 1;
        let mut header = [0u8; 16];
        header[..8].copy_from_slice(&seq.to_le_bytes());
        header[8..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        let right = &mut ring.right;
        let left = &mut ring.left;
        let recv = |left: &mut TcpStream| -> Result<Vec<u8>, CollectiveError> {
            let mut h = [0u8; 16];
            left.read_exact(&mut h).map_err(|e| self.io_err(op, e, false))?;
            let (got_seq, len) = (
                u64::from_le_bytes(h[..8].try_into().unwrap()),
                u64::from_le_bytes(h[8..].try_into().unwrap()) as usize,
            );
            if got_seq != seq {
                return Err(self.err(
                    op,
                    format!("out of step: expected message {seq} from rank {}, got {got_seq}", self.left_rank()),
                ));
            }
            if expect_len.is_some_and(|n| n != len) {
                return Err(self
                    .err(op, format!("rank {} sent {len} bytes, expected {}", self.left_rank(), expect_len.unwrap())));
            }
            let mut buf = vec![0u8; len];
            left.read_exact(&mut buf).map_err(|e| self.io_err(op, e, false))?;
            Ok(buf)
        };
        let send = |right: &mut TcpStream| -> io::Result<()> {
            right.write_all(&header)?;
            right.write_all(payload)
        };
        if payload.len() <= INLINE_SEND {
            send(right).map_err(|e| self.io_err(op, e, true))?;
            recv(left)
        } else {
            std::thread::scope(|s| {
                let sender = s.spawn(|| send(right));
                let received = recv(left);
                let sent = sender.join().map_err(|_| self.err(op, "sender thread panicked"))?;
                sent.map_err(|e| self.io_err(op, e, true))?;
                received
            })
        }
    }
}

fn chunk(len: usize, n: usize, i: usize) -> std::ops::Range<usize> {
    len * i / n..len * (i + 1) / n
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    /// Ring all-reduce: a reduce-scatter (after `n - 1` steps rank `r` holds the full sum of chunk
    /// `r + 1`) followed by an all-gather of the reduced chunks. Every rank ends with identical values.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let (n, r) = (self.world, self.rank);
        if n == 1 {
            return Ok(());
        }
        // Small buffers (decode activations) are latency-bound: gather everyone's buffer in n - 1 exchanges
        // instead of the ring's 2(n - 1), and sum in rank order so every rank gets identical bits.
        if buf.len() * 4 <= SMALL_ALL_REDUCE {
            let parts = self.all_gather(buf)?;
            if parts.iter().any(|p| p.len() != buf.len()) {
                return Err(self.err("all_reduce", "ranks reduced buffers of different lengths"));
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = parts.iter().fold(0.0, |acc, p| acc + p[i]);
            }
            return Ok(());
        }
        let len = buf.len();
        for s in 0..n - 1 {
            let send = chunk(len, n, (r + n - s) % n);
            let recv = chunk(len, n, (r + 2 * n - s - 1) % n);
            let got = self.exchange("all_reduce", bytemuck::cast_slice(&buf[send]), Some(recv.len() * 4))?;
            for (b, x) in buf[recv].iter_mut().zip(got.chunks_exact(4)) {
                *b += f32::from_le_bytes(x.try_into().unwrap());
            }
        }
        for s in 0..n - 1 {
            let send = chunk(len, n, (r + 1 + n - s) % n);
            let recv = chunk(len, n, (r + n - s) % n);
            let got = self.exchange("all_reduce", bytemuck::cast_slice(&buf[send]), Some(recv.len() * 4))?;
            for (b, x) in buf[recv].iter_mut().zip(got.chunks_exact(4)) {
                *b = f32::from_le_bytes(x.try_into().unwrap());
            }
        }
        Ok(())
    }

    fn take_seconds(&self) -> f64 {
        self.busy_ns.swap(0, std::sync::atomic::Ordering::Relaxed) as f64 * 1e-9
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<Vec<f32>>, CollectiveError> {
        let (n, r) = (self.world, self.rank);
        let mut parts: Vec<Vec<f32>> = vec![Vec::new(); n];
        parts[r] = local.to_vec();
        for s in 0..n - 1 {
            let send = (r + n - s) % n;
            let recv = (r + 2 * n - s - 1) % n;
            let got = self.exchange("all_gather", bytemuck::cast_slice(&parts[send]), None)?;
            if got.len() % 4 != 0 {
                return Err(
                    self.err("all_gather", format!("rank {} sent {} bytes, not f32s", self.left_rank(), got.len()))
                );
            }
            parts[recv] = got.chunks_exact(4).map(|x| f32::from_le_bytes(x.try_into().unwrap())).collect();
        }
        Ok(parts)
    }
}

/// What a handshake's proof of the cluster token is bound to: a proof made for one group and rank is no
/// use for another.
fn proof_context(group_id: &str, rank: usize) -> Vec<u8> {
    format!("tessera collective handshake: group {group_id}, rank {rank}").into_bytes()
}

fn handshake(group_id: &str, rank: usize, token: &ClusterToken) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&(rank as u32).to_le_bytes());
    h.extend_from_slice(&(group_id.len() as u32).to_le_bytes());
    h.extend_from_slice(group_id.as_bytes());
    h.extend_from_slice(&token.proof(&proof_context(group_id, rank)));
    h
}

/// Why a handshake was refused.
#[derive(Debug)]
enum Refusal {
    NotAHandshake,
    OtherGroup,
    BadToken,
}

/// Reads a handshake; returns the sender's rank if it is for `group_id` and proves `token`.
async fn read_handshake(
    s: &mut tokio::net::TcpStream,
    group_id: &str,
    token: &ClusterToken,
) -> io::Result<Result<usize, Refusal>> {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; 12];
    s.read_exact(&mut h).await?;
    if &h[..4] != MAGIC {
        return Ok(Err(Refusal::NotAHandshake));
    }
    let rank = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
    let len = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    if len > 1024 {
        return Ok(Err(Refusal::NotAHandshake));
    }
    let mut g = vec![0u8; len + 32];
    s.read_exact(&mut g).await?;
    let (g, proof) = g.split_at(len);
    if g != group_id.as_bytes() {
        return Ok(Err(Refusal::OtherGroup));
    }
    if !token.accepts_proof(&proof_context(group_id, rank), proof) {
        return Ok(Err(Refusal::BadToken));
    }
    Ok(Ok(rank))
}

/// Connects rank `rank` of the group `group_id` to its ring neighbours. `listener` is this worker's
/// collective listener (its address is `peers[rank]`); `timeout` bounds the rendezvous and, afterwards,
/// every read and write of a collective.
pub async fn rendezvous(
    listener: &tokio::net::TcpListener,
    rank: usize,
    peers: &[String],
    group_id: &str,
    timeout: Duration,
    token: &ClusterToken,
) -> Result<TcpCollective, CollectiveError> {
    use tokio::io::AsyncWriteExt;
    let world = peers.len();
    let fail = |m: String| CollectiveError { op: "rendezvous", rank, world, message: m };
    if rank >= world {
        return Err(fail(format!("rank {rank} outside a group of {world}")));
    }
    let deadline = Instant::now() + timeout;
    let right_addr = &peers[(rank + 1) % world];
    let left_rank = (rank + world - 1) % world;
    let connect = async {
        // The right neighbour's listener exists from its start, but it may still be starting: retry.
        loop {
            match tokio::net::TcpStream::connect(right_addr).await {
                Ok(mut s) => {
                    s.write_all(&handshake(group_id, rank, token)).await?;
                    return Ok::<_, io::Error>(s);
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("connecting to rank {} at {right_addr}: {e}; retrying", (rank + 1) % world);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        }
    };
    let accept = async {
        loop {
            let (mut s, from) = listener.accept().await?;
            // A stranger that connects and sends nothing must not hold up the peer behind it.
            let read = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_handshake(&mut s, group_id, token)).await;
            match read {
                Ok(Ok(Ok(r))) if r == left_rank => return Ok::<_, io::Error>(s),
                other => tracing::warn!(
                    "refusing collective connection from {from}: {other:?} (want rank {left_rank} of group {group_id})"
                ),
            }
        }
    };
    let joined = tokio::time::timeout(timeout, async { tokio::try_join!(connect, accept) }).await;
    let (right, left) = match joined {
        Err(_) => return Err(fail(format!("peers did not connect within {timeout:?} (right: {right_addr})"))),
        Ok(Err(e)) => return Err(fail(format!("connecting the ring: {e} (right: {right_addr})"))),
        Ok(Ok(pair)) => pair,
    };
    let to_std = |s: tokio::net::TcpStream| -> io::Result<TcpStream> {
        let s = s.into_std()?;
        s.set_nonblocking(false)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(s)
    };
    let right = to_std(right).map_err(|e| fail(e.to_string()))?;
    let left = to_std(left).map_err(|e| fail(e.to_string()))?;
    Ok(TcpCollective { rank, world, ring: Mutex::new(Ring { right, left, seq: 0 }), busy_ns: Default::default() })
}

/// A ring of `n` ranks on loopback inside this process (one collective per rank, to be driven from one
/// thread each): for benchmarks and tests of the collective itself.
pub fn loopback_ring(n: usize, timeout: Duration) -> Result<Vec<TcpCollective>, CollectiveError> {
    let fail = |m: String| CollectiveError { op: "rendezvous", rank: 0, world: n, message: m };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| fail(e.to_string()))?;
    rt.block_on(async {
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| fail(e.to_string()))?);
        }
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.to_string()))
            .collect::<Result<_, _>>()
            .map_err(|e| fail(e.to_string()))?;
        let tasks: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let peers = peers.clone();
                tokio::spawn(async move { rendezvous(&l, r, &peers, "loopback", timeout, &ClusterToken::none()).await })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.map_err(|e| fail(e.to_string()))??);
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(n: usize, timeout: Duration) -> Vec<TcpCollective> {
        loopback_ring(n, timeout).unwrap()
    }

    fn run_all<T: Send>(ranks: &[TcpCollective], f: impl Fn(&TcpCollective) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let hs: Vec<_> = ranks.iter().map(|c| s.spawn(|| f(c))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn data(rank: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 31 + rank * 17) % 101) as f32 * 0.25 - 12.0).collect()
    }

    #[test]
    fn all_reduce_and_all_gather_match_the_sum_for_every_size() {
        for n in [2, 3, 4] {
            let ranks = ring(n, Duration::from_secs(10));
            // Sizes below and above the inline-send threshold, and smaller than the world.
            for len in [1, 3, 1000, 40_000] {
                let inputs: Vec<Vec<f32>> = (0..n).map(|r| data(r, len)).collect();
                let want: Vec<f32> = (0..len).map(|i| inputs.iter().map(|d| d[i]).sum()).collect();
                let outs = run_all(&ranks, |c| {
                    let mut b = data(c.rank(), len);
                    c.all_reduce_sum(&mut b).unwrap();
                    b
                });
                for (r, o) in outs.iter().enumerate() {
                    for (i, (a, b)) in o.iter().zip(&want).enumerate() {
                        assert!((a - b).abs() < 1e-3, "n={n} len={len} rank {r} [{i}]: {a} vs {b}");
                    }
                    assert_eq!(o, &outs[0], "ranks must agree exactly");
                }
            }
            let outs = run_all(&ranks, |c| c.all_gather(&data(c.rank(), 5 + c.rank())).unwrap());
            for o in outs {
                for (r, part) in o.iter().enumerate() {
                    assert_eq!(part, &data(r, 5 + r));
                }
            }
        }
    }

    #[test]
    fn a_dead_peer_is_an_error_not_a_hang() {
        let mut ranks = ring(3, Duration::from_secs(2));
        drop(ranks.pop()); // rank 2 "dies": its sockets close
        let t = Instant::now();
        let errs = run_all(&ranks, |c| c.all_reduce_sum(&mut data(c.rank(), 100)).unwrap_err().to_string());
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(errs.iter().any(|e| e.contains("rank 2")), "{errs:?}");
    }

    #[test]
    fn a_silent_peer_times_out() {
        let ranks = ring(2, Duration::from_millis(300));
        let t = Instant::now();
        // Only rank 0 takes part: rank 1 is alive but never answers.
        let e = ranks[0].all_reduce_sum(&mut data(0, 10)).unwrap_err().to_string();
        assert!(e.contains("timed out waiting for rank 1"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    /// Rank `r` of a 2-rank ring whose ranks hold `tokens[r]`: each rank's rendezvous result.
    fn rendezvous_with(tokens: [ClusterToken; 2]) -> Vec<Result<TcpCollective, CollectiveError>> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let listeners = [
                tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
                tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            ];
            let peers: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
            let tasks: Vec<_> = listeners
                .into_iter()
                .zip(tokens)
                .enumerate()
                .map(|(r, (l, t))| {
                    let peers = peers.clone();
                    tokio::spawn(async move { rendezvous(&l, r, &peers, "g", Duration::from_millis(500), &t).await })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        })
    }

    #[test]
    fn peers_meet_only_with_the_same_cluster_token() {
        let token = ClusterToken::generate();
        assert!(rendezvous_with([token.clone(), token.clone()]).iter().all(|r| r.is_ok()));
        // A peer with another token, or none, is refused: neither rank completes its ring.
        for other in [ClusterToken::generate(), ClusterToken::none()] {
            let results = rendezvous_with([token.clone(), other]);
            let e = results[0].as_ref().err().expect("rank 0 accepted a peer without the token").to_string();
            assert!(e.contains("did not connect"), "{e}");
        }
    }
}
