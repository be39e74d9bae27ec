//! The answers for requests that no endpoint runs: a body declared over the size limit, a path that does
//! not exist, a method the path does not take. Each is OpenAI-shaped like every other error.

use axum::{
    extract::State,
    http::{Method, Uri, header},
    response::{IntoResponse, Response},
};

use super::error::ApiError;

/// Bodies declared larger than this are refused without being read: past it, reading to be polite costs
/// more than a client that cannot take an early answer deserves.
const DRAIN_AT_MOST: u64 = 64 << 20;

/// A body declared larger than the limit gets its 413 at once, but only after what the client is sending
/// has been read and discarded (up to 64 MiB, 10 s), as a web server's lingering close does: a response
/// written while the client is still sending, followed by closing the connection, resets it, and the
/// client sees a broken pipe instead of the 413.
pub(super) async fn refuse_oversized(
    State(limit): State<usize>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => {
            if n <= DRAIN_AT_MOST {
                let mut body = req.into_body().into_data_stream();
                let drain = async { while let Some(Ok(_)) = futures_util::StreamExt::next(&mut body).await {} };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(10), drain).await;
            }
            ApiError::too_large(limit).into_response()
        }
        _ => next.run(req).await,
    }
}

pub(super) async fn fallback(uri: Uri) -> Response {
    ApiError::not_found(uri.path()).into_response()
}

pub(super) async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::method_not_allowed(method.as_str(), uri.path()).into_response()
}
