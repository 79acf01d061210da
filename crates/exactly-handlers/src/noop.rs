//! `noop`: succeeds at once with an empty result.
//!
//! It exists to measure the cluster rather than the work: with a handler that costs nothing,
//! benchmarks see the price of submission, replication, assignment and completion alone, and
//! tests can drive many jobs through the whole path quickly.

use futures::future::{self, BoxFuture, FutureExt};
use tokio_util::sync::CancellationToken;

use crate::{Handler, HandlerOutcome, JobContext};

/// The job kind this handler is registered under by [`crate::Registry::with_builtins`].
pub const KIND: &str = "noop";

/// Succeeds immediately with an empty result, whatever the payload.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoopHandler;

impl Handler for NoopHandler {
    fn run(
        &self,
        _ctx: JobContext,
        _cancel: CancellationToken,
    ) -> BoxFuture<'static, HandlerOutcome> {
        future::ready(HandlerOutcome::Succeeded(Vec::new())).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::context;

    /// A noop job succeeds with an empty result, ignoring its payload.
    #[tokio::test]
    async fn noop_succeeds_with_an_empty_result() {
        let outcome = NoopHandler
            .run(context(KIND, b"ignored"), CancellationToken::new())
            .await;
        assert_eq!(outcome, HandlerOutcome::Succeeded(Vec::new()));
    }
}
