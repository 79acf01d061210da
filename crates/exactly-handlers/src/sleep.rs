//! `sleep`: waits for the duration its payload names, then succeeds.
//!
//! It stands in for work that takes time without using any, so tests and benchmarks can hold
//! slots busy, run into timeouts, and watch leases, cancellation and reassignment happen while a
//! job is running. The payload is text: `"250ms"`, `"2s"`, `"1m 30s"`, or a bare integer meaning
//! milliseconds.

use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use tokio_util::sync::CancellationToken;

use crate::{Handler, HandlerOutcome, JobContext};

/// The job kind this handler is registered under by [`crate::Registry::with_builtins`].
pub const KIND: &str = "sleep";

/// Bytes of a sleep payload, at most; a duration needs a few.
pub const SLEEP_PAYLOAD_BYTES_MAX: usize = 64;

/// The longest sleep a payload may ask for (one day, the longest execution timeout a job may have).
pub const SLEEP_DURATION_MAX: Duration = Duration::from_secs(24 * 60 * 60);

/// Sleeps for the payload's duration, then succeeds with an empty result. Cancellation ends the
/// sleep at once with a retryable failure.
#[derive(Clone, Copy, Debug, Default)]
pub struct SleepHandler;

impl Handler for SleepHandler {
    fn run(
        &self,
        ctx: JobContext,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, HandlerOutcome> {
        async move {
            let duration = match parse_duration(&ctx.payload) {
                Ok(duration) => duration,
                // The same payload would fail the same way on every attempt.
                Err(why) => return HandlerOutcome::permanent(why),
            };
            tokio::select! {
                // Biased so that a token cancelled before we start wins over a zero sleep.
                biased;
                () = cancel.cancelled() => HandlerOutcome::cancelled(),
                () = tokio::time::sleep(duration) => HandlerOutcome::Succeeded(Vec::new()),
            }
        }
        .boxed()
    }
}

/// Reads a sleep payload: a humane duration (`"250ms"`, `"2s"`) or a bare integer of
/// milliseconds. The error is a sentence for the job's record.
pub fn parse_duration(payload: &[u8]) -> Result<Duration, String> {
    if payload.len() > SLEEP_PAYLOAD_BYTES_MAX {
        return Err(format!(
            "sleep payload is {} bytes; at most {SLEEP_PAYLOAD_BYTES_MAX} expected (a duration such as \"250ms\")",
            payload.len()
        ));
    }
    let text = std::str::from_utf8(payload)
        .map_err(|_| {
            "sleep payload is not UTF-8 text; expected a duration such as \"250ms\"".to_string()
        })?
        .trim();
    if text.is_empty() {
        return Err(
            "sleep payload is empty; expected a duration such as \"250ms\", \"2s\" or \"100\" (milliseconds)"
                .to_string(),
        );
    }
    let duration = if text.bytes().all(|b| b.is_ascii_digit()) {
        let millis: u64 = text
            .parse()
            .map_err(|_| format!("sleep payload {text:?} is too many milliseconds"))?;
        Duration::from_millis(millis)
    } else {
        humantime::parse_duration(text).map_err(|err| {
            format!(
                "sleep payload {text:?} is not a duration ({err}); expected e.g. \"250ms\", \"2s\" or \"100\" (milliseconds)"
            )
        })?
    };
    if duration > SLEEP_DURATION_MAX {
        return Err(format!(
            "sleep payload {text:?} exceeds the longest sleep, {}",
            humantime::format_duration(SLEEP_DURATION_MAX)
        ));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::test_support::context;

    /// Humane durations and bare integers (milliseconds) parse; surrounding whitespace is allowed.
    #[test]
    fn parses_humane_and_bare_durations() {
        let table: &[(&[u8], Duration)] = &[
            (b"50ms", Duration::from_millis(50)),
            (b"2s", Duration::from_secs(2)),
            (b"100", Duration::from_millis(100)),
            (b"0", Duration::ZERO),
            (b"1m 30s", Duration::from_secs(90)),
            (b" 250ms\n", Duration::from_millis(250)),
        ];
        for (payload, expected) in table {
            assert_eq!(
                parse_duration(payload),
                Ok(*expected),
                "payload {payload:?}"
            );
        }
    }

    /// Empty, non-UTF-8, oversize, negative, nonsense and over-long payloads are refused.
    #[test]
    fn refuses_bad_payloads() {
        let oversize = vec![b'1'; SLEEP_PAYLOAD_BYTES_MAX + 1];
        let bad: &[&[u8]] = &[
            b"",
            b"  ",
            b"\xff\xfe",
            &oversize,
            b"-5",
            b"soon",
            b"2 parsecs",
            b"2d",
        ];
        for payload in bad {
            assert!(
                parse_duration(payload).is_err(),
                "payload {payload:?} accepted"
            );
        }
    }

    /// A short sleep succeeds with an empty result.
    #[tokio::test]
    async fn short_sleep_succeeds() {
        let outcome = SleepHandler
            .run(context(KIND, b"10ms"), CancellationToken::new())
            .await;
        assert_eq!(outcome, HandlerOutcome::Succeeded(Vec::new()));
    }

    /// A bad payload is a permanent failure whose message names the payload.
    #[tokio::test]
    async fn bad_payload_is_a_permanent_failure() {
        let outcome = SleepHandler
            .run(context(KIND, b"forever"), CancellationToken::new())
            .await;
        match outcome {
            HandlerOutcome::Failed { error, retryable } => {
                assert!(!retryable);
                assert!(error.contains("\"forever\""), "error: {error}");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    /// Cancelling a 30 s sleep ends it promptly with a retryable "cancelled".
    #[tokio::test]
    async fn cancellation_ends_the_sleep_promptly() {
        let cancel = CancellationToken::new();
        let run = SleepHandler.run(context(KIND, b"30s"), cancel.clone());
        let started = Instant::now();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            cancel.cancel();
        });
        let outcome = run.await;
        canceller.await.expect("canceller task");
        assert_eq!(outcome, HandlerOutcome::cancelled());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
    }
}
