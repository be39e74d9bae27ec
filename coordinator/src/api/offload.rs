//! Where a request's CPU-heavy preparation runs: parsing its body, rendering the chat template and
//! tokenizing, each of which can take a long time on a large or hostile input. Done on an async runtime
//! thread, two such requests would leave nothing to answer `/health` or stream tokens; so preparation runs
//! on the blocking pool, and a request whose preparation outlasts [`DEADLINE`] is answered with a 400
//! while the work finishes on its own budget (the chat template's fuel bounds it).
//!
//! Each kind of preparation has its own [`Pool`] of slots, half the cores each: a burst of expensive chat
//! templates waits for its own slots without holding up completions, and neither kind can take every core
//! from the engine.

use std::{sync::LazyLock, time::Duration};

use tokio::sync::Semaphore;

use super::error::ApiError;

/// Longest a request's preparation may take before its client gets an answer anyway.
pub const DEADLINE: Duration = Duration::from_secs(5);

/// Slots for one kind of preparation.
pub struct Pool(LazyLock<std::sync::Arc<Semaphore>>);

impl Pool {
    const fn new() -> Self {
        Pool(LazyLock::new(|| {
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
            std::sync::Arc::new(Semaphore::new((cores / 2).max(1)))
        }))
    }
}

/// Chat requests: the model's template, then the tokenizer.
pub static CHAT: Pool = Pool::new();
/// Completions: the tokenizer.
pub static PROMPTS: Pool = Pool::new();

/// Runs `prepare` off the async runtime; `what` and `param` name it in the error when it runs too long.
pub(super) async fn run<T: Send + 'static>(
    pool: &'static Pool,
    what: &'static str,
    param: &'static str,
    prepare: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    run_within(pool, DEADLINE, what, param, prepare).await
}

async fn run_within<T: Send + 'static>(
    pool: &'static Pool,
    deadline: Duration,
    what: &'static str,
    param: &'static str,
    prepare: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let slot = pool.0.clone().acquire_owned().await.map_err(|_| ApiError::internal("preparation pool closed"))?;
    // The slot goes with the work, not the request: work that outlives its deadline still holds its core.
    let task = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        prepare()
    });
    match tokio::time::timeout(deadline, task).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(ApiError::internal(format!("{what} failed: {e}"))),
        Err(_) => {
            tracing::warn!(deadline_s = deadline.as_secs_f64(), "{what} ran past its deadline");
            Err(ApiError::param(param, format!("{what} took more than {} s.", deadline.as_secs_f64())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn work_past_its_deadline_is_answered_while_the_runtime_stays_free() {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let deadline = Duration::from_millis(200);
        let started = tokio::time::Instant::now();
        // On a single-threaded runtime, blocking work run inline would also block this timer.
        static TEST: Pool = Pool::new();
        let slow = run_within(&TEST, deadline, "rendering the test", "messages", move || {
            let _ = released.recv_timeout(Duration::from_secs(30));
            Ok(())
        });
        let e = slow.await.unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(e.message.contains("rendering the test took more than 0.2 s"), "{}", e.message);
        assert!(started.elapsed() < deadline * 10);
        release.send(()).unwrap();
        assert_eq!(run(&TEST, "x", "p", || Ok(7)).await.unwrap(), 7);
    }
}
