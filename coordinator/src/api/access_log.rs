//! One log line per HTTP request, at info, written when the response body has been sent (or dropped,
//! if the client went away): request id, method, path, status, bytes, time to first byte and total time.
//! The id comes from the client's `x-request-id` or is generated, and is echoed in the response.
//! Prompt text is never logged.

use std::{
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::Instant,
};

use axum::{
    body::Body,
    extract::Request,
    http::{HeaderValue, Method, StatusCode},
    middleware::Next,
    response::Response,
};
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};

static NEXT: AtomicU64 = AtomicU64::new(1);

pub async fn log_requests(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let id = request_id(req.headers().get("x-request-id").and_then(|v| v.to_str().ok()));
    let span = tracing::info_span!(target: "tessera::http", "http.request", request_id = %id, method = %method, path = %path, status = tracing::field::Empty);
    tessera_telemetry::adopt_parent(&span, req.headers());
    let mut resp = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    span.record("status", resp.status().as_u16());
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let status = resp.status();
    let first_byte_ms = start.elapsed().as_secs_f64() * 1e3;
    let (parts, body) = resp.into_parts();
    let logged = Logged { inner: body, id, method, path, status, start, first_byte_ms, bytes: 0, done: false, span };
    Response::from_parts(parts, Body::new(logged))
}

/// The client's `x-request-id` when it is a plain token (letters, digits and `-_.:/+=@`, at most 128), else
/// a generated one: the id goes into every log line unquoted, and a client must not be able to forge
/// fields there (`a" status=500 fake=1`) or break a line.
fn request_id(client: Option<&str>) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_.:/+=@".contains(c);
    match client {
        Some(v) if !v.is_empty() && v.len() <= 128 && v.chars().all(safe) => v.to_string(),
        _ => format!("req-{:x}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)),
    }
}

struct Logged {
    inner: Body,
    id: String,
    method: Method,
    path: String,
    status: StatusCode,
    start: Instant,
    first_byte_ms: f64,
    bytes: u64,
    done: bool,
    /// Open until the body is done: the request's span covers streaming too.
    span: tracing::Span,
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => self.done = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let done = self.done || self.inner.is_end_stream();
        let _in_span = self.span.enter();
        tracing::info!(
            request_id = %self.id,
            method = %self.method,
            path = %self.path,
            status = self.status.as_u16(),
            bytes = self.bytes,
            first_byte_ms = round1(self.first_byte_ms),
            duration_ms = round1(self.start.elapsed().as_secs_f64() * 1e3),
            completed = done,
            "request"
        );
    }
}

fn round1(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_id_that_could_forge_log_fields_is_replaced() {
        for good in ["trace-me-42", "0af7651916cd43dd8448eb211c80319c", "a.b:c/d+e=f@g_h"] {
            assert_eq!(request_id(Some(good)), good);
        }
        let long = "x".repeat(129);
        for bad in ["a\" status=500 fake=1", "a b", "a\nb", "", long.as_str(), "caf\u{e9}"] {
            let id = request_id(Some(bad));
            assert!(
                id.starts_with("req-") && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
                "{bad:?}: {id}"
            );
        }
        assert!(request_id(None).starts_with("req-"));
    }
}
