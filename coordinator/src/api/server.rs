//! Accepting and serving the API's HTTP/1 connections, with the bounds a public listener needs: at most
//! `max_connections` open at once, a deadline for each request's head (which also closes a keep-alive
//! connection that sits idle), a deadline for a client to take a response's bytes,
//! and a graceful shutdown that lets requests in flight finish.
//!
//! `axum::serve` has none of these bounds: a few dozen clients that open connections and send nothing hold
//! them (and their file descriptors) for ever, and once descriptors run out nothing else is answered, not
//! even `/health`. The deadline for a request's body is the router's (`refusals::read_body`), since only a
//! request knows its length.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::Router;
use futures_util::future::BoxFuture;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    sync::{Semaphore, watch},
};

/// Descriptors kept for everything but client connections (model files, logs, the ledger, workers' channels,
/// etcd) when the connection bound is derived from the process's descriptor limit.
const RESERVED_FDS: u64 = 32;

/// How long requests in flight may take to finish once shutdown has begun.
const DRAIN: Duration = Duration::from_secs(30);

/// The bounds on client connections.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// Most connections open at once; more wait in the listen backlog until one closes.
    pub max_connections: usize,
    /// Most time from a connection's opening, or from the end of its previous response, to the end of the
    /// next request's head. A connection that sends nothing, half a request line, or sits idle between
    /// requests is closed when it runs out.
    pub header_timeout: Duration,
    /// Most time a response may wait for its client to take any of it (the socket's send buffer full). A
    /// client that reads nothing for this long has stopped: its connection, its slot and its buffers are
    /// freed.
    pub write_timeout: Duration,
}

impl ConnectionLimits {
    /// `max_connections` lowered to what the process's open-file limit leaves room for, with a warning when
    /// it had to be: past that limit `accept` fails and no one is answered.
    pub fn fitted_to_fd_limit(mut self) -> Self {
        if let Some(room) = fd_limit().map(|n| n.saturating_sub(RESERVED_FDS).max(1))
            && (self.max_connections as u64) > room
        {
            tracing::warn!(
                requested = self.max_connections,
                allowed = room,
                "--max-connections lowered to fit the open-file limit (ulimit -n)"
            );
            self.max_connections = room as usize;
        }
        self
    }
}

fn fd_limit() -> Option<u64> {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only into the struct it is given.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } == 0;
    (ok && l.rlim_cur != libc::RLIM_INFINITY).then_some(l.rlim_cur)
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting, asks every connection to
/// close after its current response, and waits for them (at most 30 s). Boxed, as is `shutdown`, so that the
/// whole HTTP stack is compiled once, in this crate, rather than again in every crate that awaits it.
pub fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: BoxFuture<'static, ()>,
) -> BoxFuture<'static, std::io::Result<()>> {
    Box::pin(accept_until(listener, router, limits, shutdown))
}

async fn accept_until(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: BoxFuture<'static, ()>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Connections hold a receiver; shutdown is sent to them all, and their being dropped says they closed.
    let (closing, closed) = watch::channel(false);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let http = Arc::new(http);
    let mut shutdown = shutdown;
    let mut full_since: Option<Instant> = None;
    let mut last_accept_error: Option<Instant> = None;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(s) => s,
            Err(_) => {
                if full_since.is_none() {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection limit reached: new connections wait until one closes"
                    );
                    full_since = Some(Instant::now());
                }
                tokio::select! {
                    _ = &mut shutdown => break,
                    s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
                }
            }
        };
        if let Some(t) = full_since.take() {
            tracing::info!(waited_ms = t.elapsed().as_millis() as u64, "below the connection limit again");
        }
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or memory: wait for connections to close rather than spin.
                    if last_accept_error.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::error!(error = %e, "accepting a connection failed");
                        last_accept_error = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let conn = Connection { stream, peer, slot, closing: closed.clone() };
        tokio::spawn(conn.serve(http.clone(), router.clone(), limits));
    }
    drop(listener);
    let _ = closing.send(true);
    drop(closed);
    if tokio::time::timeout(DRAIN, closing.closed()).await.is_err() {
        tracing::warn!(open = closing.receiver_count(), "connections still open 30 s after shutdown began");
    }
    Ok(())
}

/// How often an idle server gives freed memory back to the system.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// glibc keeps memory freed by a burst of requests in its per-thread arenas, resident for good (the HTTP
/// runtime's and the blocking pool's threads each have one). Once nothing is running or waiting, it is
/// given back (`malloc_trim`), once per idle spell, so the process's RSS after a burst returns to about
/// where it was. Boxed so that its body is compiled once, here.
pub fn give_back_memory_when_idle(engine: Arc<crate::replicas::Replicas>) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        let mut every = tokio::time::interval(TRIM_EVERY);
        let mut trimmed = false;
        loop {
            every.tick().await;
            let idle = engine.view().iter().all(|r| r.running == 0 && r.waiting == 0);
            if idle && !trimmed {
                super::whole::trim();
            }
            trimmed = idle;
        }
    })
}

/// An accepted connection, with its slot and its part in the shutdown.
struct Connection {
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    slot: tokio::sync::OwnedSemaphorePermit,
    closing: watch::Receiver<bool>,
}

impl Connection {
    /// Serves requests until the client closes, a deadline passes, or shutdown has let the current
    /// response finish.
    async fn serve(mut self, http: Arc<hyper::server::conn::http1::Builder>, router: Router, limits: ConnectionLimits) {
        let _slot = self.slot;
        // Tokens are small writes: without TCP_NODELAY, Nagle's algorithm holds them back for up to a
        // delayed-ACK period (40 ms), which shows up directly as inter-token latency.
        let _ = self.stream.set_nodelay(true);
        let stream = WriteDeadline { inner: self.stream, limit: limits.write_timeout, stalled: None };
        let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
        let mut conn = std::pin::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = async { drop(self.closing.wait_for(|c| *c).await) } => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            log_connection_error(&e, self.peer, &limits);
        }
    }
}

/// A connection whose writes fail once one has waited `limit` for the client to take bytes: hyper stops
/// polling a response body while the socket is full, so without a deadline a client that stops reading
/// holds its connection for ever.
struct WriteDeadline {
    inner: tokio::net::TcpStream,
    limit: Duration,
    /// Since when writes have been waiting.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl WriteDeadline {
    fn deadline<T>(&mut self, cx: &mut Context<'_>, written: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if written.is_ready() {
            self.stalled = None;
            return written;
        }
        let limit = self.limit;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client took nothing for {} s", limit.as_secs_f64()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for WriteDeadline {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteDeadline {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.deadline(cx, written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.deadline(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        self.deadline(cx, flushed)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn log_connection_error(e: &hyper::Error, peer: SocketAddr, limits: &ConnectionLimits) {
    let stalled = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
    if stalled {
        let timeout_s = limits.write_timeout.as_secs_f64();
        tracing::warn!(%peer, timeout_s, "closed a connection whose client stopped reading");
        return;
    }
    if e.is_timeout() {
        tracing::info!(
            %peer,
            timeout_s = limits.header_timeout.as_secs_f64(),
            "closed a connection that sent no complete request head in time (or sat idle)"
        );
    } else if !(e.is_incomplete_message() || e.is_canceled()) {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::{Router, routing::get};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn start(limits: ConnectionLimits) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/health", get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(
            listener,
            router,
            limits,
            Box::pin(async move {
                let _ = stopped.await;
            }),
        ));
        (addr, stop)
    }

    async fn get_health(addr: SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn idle_and_half_sent_connections_are_closed_and_the_server_answers_again() {
        let limits = ConnectionLimits {
            max_connections: 4,
            header_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_secs(5),
        };
        let (addr, _stop) = start(limits).await;
        let mut idle = Vec::new();
        for i in 0..8 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            if i % 2 == 1 {
                s.write_all(b"GET /hea").await.unwrap();
            }
            idle.push(s);
        }
        // Every slot is held by a connection that sends nothing more; the probe waits for their deadlines.
        let answered = tokio::time::timeout(Duration::from_secs(5), get_health(addr)).await;
        assert!(answered.expect("/health unanswered behind idle connections").ends_with("ok"));
        for mut s in idle {
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap_or(0);
            assert_eq!(n, 0, "an idle connection was not closed");
        }
    }

    #[tokio::test]
    async fn a_keep_alive_connection_that_sits_idle_is_closed() {
        let limits = ConnectionLimits {
            max_connections: 4,
            header_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_secs(5),
        };
        let (addr, _stop) = start(limits).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        let started = Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
        assert_eq!(n, 0);
        assert!(started.elapsed() >= Duration::from_millis(250), "closed before its idle deadline");
    }

    #[tokio::test]
    async fn shutdown_waits_for_a_response_in_flight_then_stops_accepting() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (release, released) = watch::channel(false);
        let (entered, mut in_handler) = tokio::sync::mpsc::unbounded_channel::<()>();
        let router = Router::new().route(
            "/slow",
            get(move || {
                let mut r = released.clone();
                let _ = entered.send(());
                async move {
                    let _ = r.wait_for(|v| *v).await;
                    "done"
                }
            }),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let limits = ConnectionLimits {
            max_connections: 4,
            header_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
        };
        let server = tokio::spawn(serve(
            listener,
            router,
            limits,
            Box::pin(async move {
                let _ = stopped.await;
            }),
        ));
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        in_handler.recv().await.unwrap();
        stop.send(()).unwrap();
        release.send(true).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200") && out.ends_with("done"), "{out}");
        tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap().unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "still accepting after shutdown");
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_loses_its_connection_and_frees_its_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Far more than the socket buffers of both ends hold.
        let big = axum::body::Bytes::from(vec![b'x'; 64 << 20]);
        let router = Router::new()
            .route("/big", get(move || std::future::ready(big.clone())))
            .route("/health", get(|| async { "ok" }));
        let limits = ConnectionLimits {
            max_connections: 1,
            header_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_millis(300),
        };
        tokio::spawn(serve(listener, router, limits, Box::pin(std::future::pending())));
        let mut stuck = tokio::net::TcpStream::connect(addr).await.unwrap();
        stuck.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        // The only slot is the stuck client's until its write deadline passes.
        let answered = tokio::time::timeout(Duration::from_secs(5), get_health(addr)).await;
        assert!(answered.expect("the stuck client kept its connection").ends_with("ok"));
        // It gets what the buffers held, then the end: not the whole body.
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stuck.read_to_end(&mut got)).await.unwrap();
        assert!(got.len() < 64 << 20, "the whole body was sent");
    }

    #[test]
    fn the_connection_bound_fits_the_descriptor_limit() {
        let limit = fd_limit().expect("a finite open-file limit");
        let l = ConnectionLimits {
            max_connections: usize::MAX,
            header_timeout: Duration::from_secs(1),
            write_timeout: Duration::from_secs(1),
        };
        assert_eq!(l.fitted_to_fd_limit().max_connections as u64, limit.saturating_sub(RESERVED_FDS).max(1));
        let small = ConnectionLimits { max_connections: 3, ..l };
        assert_eq!(small.fitted_to_fd_limit().max_connections, 3);
    }
}
