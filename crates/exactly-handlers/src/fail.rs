//! `fail`: fails every time, as its payload says.
//!
//! It lets tests and demonstrations exercise the failure paths (retries with backoff, a new
//! fencing token per attempt, the dead-letter queue) without writing a handler. The payload
//! `permanent` asks for a permanent failure; anything else, including nothing, a retryable one.

use futures::future::{self, BoxFuture, FutureExt};
use tokio_util::sync::CancellationToken;

use crate::{Handler, HandlerOutcome, JobContext};

/// The job kind this handler is registered under by [`crate::Registry::with_builtins`].
pub const KIND: &str = "fail";

/// Bytes of the payload quoted in the error message, at most.
pub const FAIL_QUOTE_BYTES_MAX: usize = 256;

/// Always fails: permanently when the payload is `permanent` (surrounding whitespace ignored),
/// retryably otherwise.
#[derive(Clone, Copy, Debug, Default)]
pub struct FailHandler;

impl Handler for FailHandler {
    fn run(
        &self,
        ctx: JobContext,
        _cancel: CancellationToken,
    ) -> BoxFuture<'static, HandlerOutcome> {
        future::ready(outcome(&ctx.payload)).boxed()
    }
}

fn outcome(payload: &[u8]) -> HandlerOutcome {
    let permanent = payload.trim_ascii() == b"permanent";
    let quoted = &payload[..payload.len().min(FAIL_QUOTE_BYTES_MAX)];
    let ellipsis = if quoted.len() < payload.len() {
        "…"
    } else {
        ""
    };
    HandlerOutcome::Failed {
        error: format!(
            "failed on purpose; payload: {:?}{ellipsis}",
            String::from_utf8_lossy(quoted)
        ),
        retryable: !permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::context;

    async fn run(payload: &[u8]) -> (String, bool) {
        match FailHandler
            .run(context(KIND, payload), CancellationToken::new())
            .await
        {
            HandlerOutcome::Failed { error, retryable } => (error, retryable),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    /// An empty or arbitrary payload gives a retryable failure quoting the payload.
    #[tokio::test]
    async fn other_payloads_fail_retryably() {
        let (error, retryable) = run(b"").await;
        assert!(retryable);
        assert!(error.contains("\"\""), "error: {error}");

        let (error, retryable) = run(b"flaky downstream").await;
        assert!(retryable);
        assert!(error.contains("flaky downstream"), "error: {error}");
    }

    /// The payload "permanent" gives a permanent failure.
    #[tokio::test]
    async fn permanent_payload_fails_permanently() {
        let (error, retryable) = run(b"permanent").await;
        assert!(!retryable);
        assert!(error.contains("permanent"), "error: {error}");
        assert!(!run(b"permanent\n").await.1);
    }

    /// A huge payload is quoted only up to the limit.
    #[tokio::test]
    async fn quoted_payload_is_bounded() {
        let payload = vec![b'x'; 1024 * 1024];
        let (error, _) = run(&payload).await;
        assert!(
            error.len() < FAIL_QUOTE_BYTES_MAX + 64,
            "error is {} bytes",
            error.len()
        );
        assert!(error.ends_with('…'));
    }
}
