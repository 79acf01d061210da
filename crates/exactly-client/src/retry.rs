//! Which failures may be retried, and how long to wait. Pure functions, so the rules are tested
//! without a network.
//!
//! The central question for a write is whether the failed request *provably was not applied*.
//! Only two signals prove it:
//! - the connection to the endpoint was never established (tonic reports a `ConnectError`), or
//!   the server reset the stream with HTTP/2 `REFUSED_STREAM`, which by RFC 9113 §8.7 means it did
//!   no processing; and
//! - the server itself answered `UNAVAILABLE`. The server's contract is that it returns
//!   `UNAVAILABLE` for a Submit only when it did not propose the batch (no leader or quorum
//!   reachable, shutting down); once a batch is proposed, a failure must be reported with another
//!   code (`DEADLINE_EXCEEDED`, `UNKNOWN`, ...);
//! - the server answered `RESOURCE_EXHAUSTED` with a `retry-after-ms` hint: it was overloaded
//!   and refused the request before proposing anything. The next try waits at least the hint
//!   (plus jitter, so refused clients do not come back together). A `RESOURCE_EXHAUSTED`
//!   without the hint is a limit of the request itself (too large, a full queue) and final.
//!
//! Everything else that is not a final answer (the connection broke mid-call, the deadline
//! passed, a client-side `UNAVAILABLE` from a failed keep-alive) leaves the outcome unknown.
//! Reads and idempotent writes (a Submit, whose jobs all carry idempotency keys, a queue
//! Configure, a schedule SetPaused) are retried anyway; other writes stop and say so.

use std::error::Error as StdError;

use tonic::{Code, ConnectError, Status, TimeoutExpired};

use crate::ClientOptions;

/// What a failed try tells about the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// The server gave a final answer that another try cannot change.
    Final,
    /// The request provably was not applied: any call may be retried elsewhere.
    NotApplied,
    /// The request may or may not have been applied.
    MaybeApplied,
}

/// Whether a call may be repeated without changing its effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CallKind {
    /// Get, List, Status, Watch, and the membership calls (drain, remove, join): repeating is
    /// harmless.
    Read,
    /// A write whose repeat has the same effect as one try: a Submit whose every job carries an
    /// idempotency key (a repeat returns the original jobs), a queue Configure or a schedule
    /// SetPaused (they set absolute values). Retried even when a try may have been applied.
    IdempotentWrite,
    /// A write whose repeat could act twice or answer misleadingly (Cancel, Redrive, Purge,
    /// schedule Add and Remove): retried only when a try provably was not applied.
    Write,
}

/// What the retry loop does after a failed try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Return the failure to the caller as it is.
    Return,
    /// Try again, on the next endpoint, if the budget allows.
    Retry,
    /// Stop and report that the outcome is unknown.
    UnknownOutcome,
}

/// One failed try, reduced to what the retry loop and the caller need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    pub class: Class,
    pub code: Code,
    pub message: String,
    /// The server's `retry-after-ms` hint on an overload refusal.
    pub retry_after_ms: Option<u64>,
}

/// Response metadata of an overload refusal: how long to wait before trying again.
pub const RETRY_AFTER_HEADER: &str = "retry-after-ms";
/// The longest server retry hint the client honours, in milliseconds (a larger one is capped).
pub const RETRY_AFTER_MS_MAX: u64 = 10_000;

impl Failure {
    /// Classifies a status returned by tonic: see the module documentation for the rules.
    pub fn from_status(status: &Status) -> Failure {
        let message = describe(status);
        // A status tonic made from a local error keeps that error as its source; a status decoded
        // from the server's trailers has none.
        let Some(source) = StdError::source(status) else {
            let retry_after_ms = (status.code() == Code::ResourceExhausted)
                .then(|| status.metadata().get(RETRY_AFTER_HEADER))
                .flatten()
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .map(|ms| ms.min(RETRY_AFTER_MS_MAX));
            let class = match status.code() {
                Code::Unavailable => Class::NotApplied,
                Code::ResourceExhausted if retry_after_ms.is_some() => Class::NotApplied,
                // The server gave up waiting (or failed) after it may have proposed the request.
                Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => Class::MaybeApplied,
                _ => Class::Final,
            };
            return Failure {
                class,
                code: status.code(),
                message,
                retry_after_ms,
            };
        };
        let mut code = status.code();
        let mut class = Class::MaybeApplied;
        for err in chain(source) {
            if err.downcast_ref::<ConnectError>().is_some() {
                class = Class::NotApplied;
                code = Code::Unavailable;
                break;
            }
            if let Some(h2) = err.downcast_ref::<h2::Error>() {
                if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                    class = Class::NotApplied;
                    code = Code::Unavailable;
                    break;
                }
            }
            if err.downcast_ref::<TimeoutExpired>().is_some() {
                // tonic reports its own deadline as CANCELLED; it is a deadline.
                code = Code::DeadlineExceeded;
                break;
            }
        }
        Failure {
            class,
            code,
            message,
            retry_after_ms: None,
        }
    }

    /// Our own backstop timeout fired: nothing is known about the request.
    pub fn timed_out(after_ms: u64) -> Failure {
        Failure {
            class: Class::MaybeApplied,
            code: Code::DeadlineExceeded,
            message: format!("no answer within {after_ms} ms"),
            retry_after_ms: None,
        }
    }
}

/// What to do with a failure of a call of the given kind.
pub(crate) fn decide(class: Class, kind: CallKind) -> Decision {
    match (class, kind) {
        (Class::Final, _) => Decision::Return,
        (Class::NotApplied, _) => Decision::Retry,
        (Class::MaybeApplied, CallKind::Read | CallKind::IdempotentWrite) => Decision::Retry,
        (Class::MaybeApplied, CallKind::Write) => Decision::UnknownOutcome,
    }
}

/// The delay before retry number `retry` (0 for the first retry), in milliseconds.
///
/// Exponential from `retry_backoff_initial_ms`, capped at `retry_backoff_max_ms`, with "equal
/// jitter": half the delay is fixed and half scales with `jitter` in `[0, 1]`, so clients that
/// failed together spread out without ever retrying immediately.
pub(crate) fn backoff_delay_ms(options: &ClientOptions, retry: u32, jitter: f64) -> u64 {
    let jitter = jitter.clamp(0.0, 1.0);
    let exponential = options
        .retry_backoff_initial_ms
        .saturating_mul(1u64 << retry.min(32))
        .min(options.retry_backoff_max_ms);
    let fixed = exponential / 2;
    let varying = exponential - fixed;
    // The product is at most `varying`, so the cast back cannot overflow.
    fixed + (varying as f64 * jitter) as u64
}

/// The delay before retry number `retry` after `failure`: the backoff, or the server's retry
/// hint plus up to as much again of jitter when that is longer.
pub(crate) fn retry_delay_ms(
    options: &ClientOptions,
    retry: u32,
    failure: &Failure,
    jitter: f64,
) -> u64 {
    let backoff = backoff_delay_ms(options, retry, jitter);
    match failure.retry_after_ms {
        Some(hint) => backoff.max(hint + (hint as f64 * jitter.clamp(0.0, 1.0)) as u64),
        None => backoff,
    }
}

/// Whether another try may start: `attempts` tries have been made, `elapsed_ms` have passed since
/// the call began and the next try would start after a further `delay_ms`.
pub(crate) fn may_retry(
    options: &ClientOptions,
    attempts: u32,
    elapsed_ms: u64,
    delay_ms: u64,
) -> bool {
    attempts < options.retry_attempts_max
        && elapsed_ms.saturating_add(delay_ms) <= options.retry_total_ms_max
}

/// The status message followed by the messages of its causes, without repeats, so
/// "transport error" becomes "transport error: tcp connect error: Connection refused".
fn describe(status: &Status) -> String {
    let mut text = status.message().to_string();
    if text.is_empty() && status.code() == Code::Unimplemented {
        // tonic answers calls a server does not serve with an empty message.
        text = "the server does not implement this call (is it an older version?)".into();
    }
    if let Some(source) = StdError::source(status) {
        for err in chain(source) {
            let part = err.to_string();
            if !part.is_empty() && !text.contains(&part) {
                if !text.is_empty() {
                    text.push_str(": ");
                }
                text.push_str(&part);
            }
        }
    }
    text
}

/// An error followed by its sources, outermost first.
fn chain<'a>(
    err: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    std::iter::successors(Some(err), |&err| err.source())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> Status {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        Status::from_error(Box::new(ConnectError(Box::new(io))))
    }

    /// A refused connection is classified as not applied, so even a Submit is retried.
    #[test]
    fn connect_error_is_not_applied() {
        let failure = Failure::from_status(&refused());
        assert_eq!(failure.class, Class::NotApplied);
        assert_eq!(failure.code, Code::Unavailable);
        assert!(failure.message.contains("refused"), "{}", failure.message);
        assert_eq!(decide(failure.class, CallKind::Write), Decision::Retry);
    }

    /// A local error that wraps another one, as hyper and tower wrap transport errors.
    #[derive(Debug)]
    struct Wrapper<E>(E);
    impl<E> std::fmt::Display for Wrapper<E> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapped")
        }
    }
    impl<E: StdError + 'static> StdError for Wrapper<E> {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&self.0)
        }
    }

    /// A connect error buried under other errors is still found in the source chain.
    #[test]
    fn nested_connect_error_is_not_applied() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let status = Status::from_error(Box::new(Wrapper(ConnectError(Box::new(io)))));
        assert_eq!(Failure::from_status(&status).class, Class::NotApplied);
    }

    /// HTTP/2 REFUSED_STREAM proves the server did not process the request.
    #[test]
    fn refused_stream_is_not_applied() {
        let status = Status::from_error(Box::new(h2::Error::from(h2::Reason::REFUSED_STREAM)));
        let failure = Failure::from_status(&status);
        assert_eq!(failure.class, Class::NotApplied);
        assert_eq!(failure.code, Code::Unavailable);
    }

    /// Any other HTTP/2 reset (here CANCEL) leaves the outcome unknown.
    #[test]
    fn other_stream_reset_is_maybe_applied() {
        let status = Status::from_error(Box::new(h2::Error::from(h2::Reason::CANCEL)));
        assert_eq!(Failure::from_status(&status).class, Class::MaybeApplied);
    }

    /// A server-sent UNAVAILABLE (no source) means "not proposed": retried even for Submit.
    #[test]
    fn server_unavailable_is_not_applied() {
        let failure = Failure::from_status(&Status::unavailable("no leader"));
        assert_eq!(failure.class, Class::NotApplied);
        assert_eq!(decide(failure.class, CallKind::Write), Decision::Retry);
    }

    /// A client-made UNAVAILABLE (e.g. failed keep-alive) is no proof: Submit is unknown, reads retry.
    #[test]
    fn client_side_unavailable_is_maybe_applied() {
        let status = Status::from_error(Box::new(Wrapper(Status::unavailable(
            "keep-alive timed out",
        ))));
        assert_eq!(status.code(), Code::Unavailable);
        let failure = Failure::from_status(&status);
        assert_eq!(failure.class, Class::MaybeApplied);
        assert_eq!(
            decide(failure.class, CallKind::Write),
            Decision::UnknownOutcome
        );
        assert_eq!(decide(failure.class, CallKind::Read), Decision::Retry);
    }

    /// A connection reset mid-call (an I/O error tonic cannot map) leaves the outcome unknown.
    #[test]
    fn connection_reset_is_maybe_applied() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let status = Status::from_error(Box::new(io));
        assert_eq!(Failure::from_status(&status).class, Class::MaybeApplied);
    }

    /// tonic's own deadline is reported as DEADLINE_EXCEEDED with an unknown outcome.
    #[test]
    fn client_deadline_is_deadline_exceeded() {
        let status = Status::from_error(Box::new(TimeoutExpired(())));
        assert_eq!(status.code(), Code::Cancelled);
        let failure = Failure::from_status(&status);
        assert_eq!(failure.code, Code::DeadlineExceeded);
        assert_eq!(failure.class, Class::MaybeApplied);
    }

    /// Server-side DEADLINE_EXCEEDED and UNKNOWN leave a Submit's outcome unknown; reads retry.
    #[test]
    fn server_deadline_and_unknown_are_maybe_applied() {
        for status in [
            Status::deadline_exceeded("commit timed out"),
            Status::unknown("panic"),
        ] {
            let failure = Failure::from_status(&status);
            assert_eq!(failure.class, Class::MaybeApplied, "{status:?}");
            assert_eq!(
                decide(failure.class, CallKind::Write),
                Decision::UnknownOutcome
            );
            assert_eq!(decide(failure.class, CallKind::Read), Decision::Retry);
            assert_eq!(
                decide(failure.class, CallKind::IdempotentWrite),
                Decision::Retry
            );
        }
    }

    /// An overload refusal (RESOURCE_EXHAUSTED with a retry hint) proposed nothing: every call
    /// retries it, after at least the hint; without the hint the code is a final limit.
    #[test]
    fn overload_refusal_with_a_hint_is_not_applied() {
        let mut status = Status::resource_exhausted("node 1 is overloaded");
        status
            .metadata_mut()
            .insert(RETRY_AFTER_HEADER, "100".parse().unwrap());
        let failure = Failure::from_status(&status);
        assert_eq!(failure.class, Class::NotApplied);
        assert_eq!(failure.retry_after_ms, Some(100));
        assert_eq!(decide(failure.class, CallKind::Write), Decision::Retry);
        let options = ClientOptions::default();
        assert_eq!(retry_delay_ms(&options, 0, &failure, 0.0), 100);
        assert_eq!(retry_delay_ms(&options, 0, &failure, 1.0), 200);
        // A backoff already longer than the hint wins.
        assert_eq!(retry_delay_ms(&options, 10, &failure, 0.0), 500);
        // An absurd hint is capped.
        status
            .metadata_mut()
            .insert(RETRY_AFTER_HEADER, "999999999".parse().unwrap());
        assert_eq!(
            Failure::from_status(&status).retry_after_ms,
            Some(RETRY_AFTER_MS_MAX)
        );
        // A garbled hint is no hint.
        status
            .metadata_mut()
            .insert(RETRY_AFTER_HEADER, "soon".parse().unwrap());
        assert_eq!(Failure::from_status(&status).class, Class::Final);
    }

    /// Bad input, limits and missing jobs are final answers, returned at once for every call.
    #[test]
    fn final_codes_are_returned_at_once() {
        for status in [
            Status::invalid_argument("unknown kind"),
            Status::resource_exhausted("payload too large"),
            Status::not_found("job 7"),
            Status::failed_precondition("draining"),
            Status::internal("bug"),
        ] {
            let failure = Failure::from_status(&status);
            assert_eq!(failure.class, Class::Final, "{status:?}");
            assert_eq!(failure.code, status.code());
            assert_eq!(failure.message, status.message());
            assert_eq!(decide(failure.class, CallKind::Read), Decision::Return);
            assert_eq!(decide(failure.class, CallKind::Write), Decision::Return);
            assert_eq!(
                decide(failure.class, CallKind::IdempotentWrite),
                Decision::Return
            );
        }
    }

    /// An UNIMPLEMENTED without a message (what tonic sends for an unknown method) says what it
    /// means instead of printing nothing.
    #[test]
    fn empty_unimplemented_is_explained() {
        let failure = Failure::from_status(&Status::unimplemented(""));
        assert_eq!(failure.class, Class::Final);
        assert!(
            failure.message.contains("does not implement"),
            "{}",
            failure.message
        );
        let failure = Failure::from_status(&Status::unimplemented("no lists here"));
        assert_eq!(failure.message, "no lists here");
    }

    /// Backoff doubles from the initial delay, is capped, and jitter moves it within [d/2, d].
    #[test]
    fn backoff_doubles_and_caps() {
        let options = ClientOptions {
            retry_backoff_initial_ms: 20,
            retry_backoff_max_ms: 300,
            ..ClientOptions::default()
        };
        let full: Vec<u64> = (0..6).map(|r| backoff_delay_ms(&options, r, 1.0)).collect();
        assert_eq!(full, vec![20, 40, 80, 160, 300, 300]);
        let half: Vec<u64> = (0..6).map(|r| backoff_delay_ms(&options, r, 0.0)).collect();
        assert_eq!(half, vec![10, 20, 40, 80, 150, 150]);
        assert_eq!(backoff_delay_ms(&options, u32::MAX, 1.0), 300);
    }

    /// The retry budget stops on the attempt count or on the total time, whichever comes first.
    #[test]
    fn retry_budget_is_bounded() {
        let options = ClientOptions {
            retry_attempts_max: 3,
            retry_total_ms_max: 1_000,
            ..ClientOptions::default()
        };
        assert!(may_retry(&options, 1, 0, 10));
        assert!(may_retry(&options, 2, 900, 100));
        assert!(!may_retry(&options, 3, 0, 0));
        assert!(!may_retry(&options, 1, 950, 100));
        assert!(!may_retry(&options, 1, u64::MAX, u64::MAX));
    }
}
