//! A small HTTP/1.1 client for Tessera's own API: JSON requests, raw bodies (for tests of malformed
//! input), and Server-Sent Event streams read event by event with their arrival times. Used by the load
//! generator (`tessera bench serve`) and the tests.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, header};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::Value;

#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
    /// Sent as `Authorization: Bearer ...` with every request.
    bearer: Option<String>,
}

pub struct HttpResponse {
    pub status: StatusCode,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl HttpResponse {
    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("response is not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// One `data:` payload of an event stream, and when it arrived.
pub struct SseEvent {
    pub data: String,
    pub at: Instant,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    pub fn new() -> Self {
        Self::with_pool(256)
    }

    /// A client that opens a new connection per request: after a response the server ends early (a 413
    /// for a body it did not read), a pooled connection may be closing just as it is reused.
    pub fn unpooled() -> Self {
        Self::with_pool(0)
    }

    fn with_pool(idle_per_host: usize) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        HttpClient {
            client: Client::builder(TokioExecutor::new()).pool_max_idle_per_host(idle_per_host).build(http),
            bearer: None,
        }
    }

    /// The same client, sending `key` as its API key.
    pub fn with_key(&self, key: &str) -> Self {
        HttpClient { client: self.client.clone(), bearer: Some(key.to_string()) }
    }

    fn request(&self, method: &str, url: &str) -> hyper::http::request::Builder {
        let b = Request::builder().method(method).uri(url).header(header::CONTENT_TYPE, "application/json");
        match &self.bearer {
            Some(k) => b.header(header::AUTHORIZATION, format!("Bearer {k}")),
            None => b,
        }
    }

    /// Sends a request with a raw body.
    pub async fn send(&self, method: &str, url: &str, body: impl Into<Bytes>) -> Result<HttpResponse> {
        let req = self.request(method, url).body(Full::new(body.into()))?;
        let resp = self.client.request(req).await.with_context(|| format!("{method} {url}"))?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(HttpResponse { status: parts.status, headers: parts.headers, body })
    }

    pub async fn get(&self, url: &str) -> Result<HttpResponse> {
        self.send("GET", url, Bytes::new()).await
    }

    pub async fn post_json(&self, url: &str, body: &Value) -> Result<HttpResponse> {
        self.send("POST", url, serde_json::to_vec(body)?).await
    }

    /// POSTs and reads the response as an event stream, calling `on_event` for each `data:` payload as it
    /// arrives; `on_event` returns false to hang up early (the connection is dropped).
    pub async fn post_stream(
        &self,
        url: &str,
        body: &Value,
        mut on_event: impl FnMut(SseEvent) -> bool,
    ) -> Result<StatusCode> {
        let req = self.request("POST", url).body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
        let resp = self.client.request(req).await.with_context(|| format!("POST {url}"))?;
        let status = resp.status();
        if !status.is_success() {
            return Ok(status);
        }
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            let Some(data) = frame.data_ref() else { continue };
            let at = Instant::now();
            buf.extend_from_slice(data);
            while let Some(end) = find(&buf, b"\n\n") {
                let event: Vec<u8> = buf.drain(..end + 2).collect();
                let text = String::from_utf8(event).context("event stream is not UTF-8")?;
                for line in text.lines() {
                    if let Some(d) = line.strip_prefix("data:") {
                        if !on_event(SseEvent { data: d.trim_start().to_string(), at }) {
                            return Ok(status);
                        }
                    } else if !line.is_empty() && !line.starts_with(':') {
                        bail!("unexpected event stream line {line:?}");
                    }
                }
            }
        }
        Ok(status)
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}
