//! The answers for requests that no endpoint runs: a body declared over the size limit or not sent in time,
//! a path that does not exist, a method the path does not take. Each is OpenAI-shaped like every other
//! error.

use std::time::Duration;

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
///
/// A body within the limit is read here, before any handler, under one deadline: a client that declares a
/// body and sends it slowly or never gets a 408 instead of holding its connection and a task for ever.
pub(super) async fn read_body(
    State((limit, deadline)): State<(usize, Duration)>,
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
        _ => {
            let (parts, body) = req.into_parts();
            match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
                Ok(Ok(bytes)) => next.run(axum::extract::Request::from_parts(parts, bytes.into())).await,
                // Over the limit without declaring it (chunked), or the connection failed while sending.
                Ok(Err(e)) => {
                    let over =
                        std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
                    if over {
                        ApiError::too_large(limit).into_response()
                    } else {
                        ApiError::invalid(None, format!("The request body could not be read: {e}")).into_response()
                    }
                }
                Err(_) => {
                    tracing::info!(
                        path = %parts.uri.path(),
                        timeout_s = deadline.as_secs_f64(),
                        "refused a request whose body did not arrive in time"
                    );
                    ApiError::body_timeout(deadline.as_secs_f64()).into_response()
                }
            }
        }
    }
}

pub(super) async fn fallback(uri: Uri) -> Response {
    ApiError::not_found(uri.path()).into_response()
}

pub(super) async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::method_not_allowed(method.as_str(), uri.path()).into_response()
}
