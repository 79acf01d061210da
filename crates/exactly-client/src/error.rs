//! The client's one error type. Every variant carries a gRPC code so callers (and the CLI) can
//! branch on, and print, the same vocabulary the server speaks.

use tonic::Code;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client was given something it cannot use: no endpoints, an unparsable endpoint URI or an
    /// out-of-range option. Nothing was sent.
    #[error("invalid client configuration: {0}")]
    Config(String),

    /// The cluster answered with a final status that retrying cannot change, such as
    /// `INVALID_ARGUMENT`, `RESOURCE_EXHAUSTED` or `NOT_FOUND`.
    #[error("{}: {message}", code_name(*code))]
    Status {
        /// The status code the server returned.
        code: Code,
        /// The server's message.
        message: String,
        /// The endpoint that answered.
        endpoint: String,
    },

    /// Every try failed with a retryable error (`UNAVAILABLE`, a refused connection, a timeout on a
    /// read) until the retry budget ran out. For a write this is only returned when every try
    /// provably was not applied, so nothing was written.
    #[error(
        "{}: {message} (last tried {endpoint}; gave up after {attempts} attempts in {elapsed_ms} ms)",
        code_name(*code)
    )]
    RetriesExhausted {
        /// The code of the last failure.
        code: Code,
        /// The message of the last failure.
        message: String,
        /// The endpoint tried last.
        endpoint: String,
        /// How many requests were sent or attempted.
        attempts: u32,
        /// Time from the start of the call to giving up.
        elapsed_ms: u64,
    },

    /// A write failed in a way that does not tell whether the cluster applied it: the connection
    /// broke or the deadline passed after the request may have been sent.
    ///
    /// For Cancel, Redrive, Purge and schedule Add/Remove this is returned at once, because
    /// repeating them blindly could act twice; check the state (Get, List) before repeating. For a
    /// Submit it is returned only when the retry budget ran out after such a failure: every job
    /// carried an idempotency key, so submitting the same jobs again with the same keys is safe
    /// and tells which exist (see [`crate::assign_idempotency_keys`] to keep the keys the client
    /// would otherwise choose for you).
    #[error(
        "{}: outcome unknown, the request may or may not have been applied: {message} (endpoint {endpoint})",
        code_name(*code)
    )]
    UnknownOutcome {
        /// The code of the failure (typically `UNAVAILABLE`, `DEADLINE_EXCEEDED` or `UNKNOWN`).
        code: Code,
        /// What went wrong.
        message: String,
        /// The endpoint the request was sent to.
        endpoint: String,
    },

    /// A Watch could not resume: every endpoint answered `OUT_OF_RANGE`, because the events after
    /// the resume position are no longer retained (each node keeps a bounded window of recent
    /// events) or the stream fell too far behind. Events may have been missed: re-read the state
    /// you care about (Get, List) and watch again from now.
    #[error(
        "OUT_OF_RANGE: cannot resume the watch after position {index}:{seq}: {message} (endpoint {endpoint})"
    )]
    WatchPositionLost {
        /// The log index of the resume position.
        index: u64,
        /// The place within that entry of the resume position.
        seq: u32,
        /// The server's message.
        message: String,
        /// The endpoint that answered last.
        endpoint: String,
    },

    /// The server's answer broke the API contract (for example a Get without a job, or fewer job
    /// ids than jobs submitted).
    #[error(
        "INTERNAL: the server's answer broke the API contract: {message} (endpoint {endpoint})"
    )]
    Protocol {
        /// What was wrong with the answer.
        message: String,
        /// The endpoint that answered.
        endpoint: String,
    },
}

impl Error {
    /// The gRPC code that best describes this error.
    pub fn code(&self) -> Code {
        match self {
            Error::Config(_) => Code::InvalidArgument,
            Error::Status { code, .. }
            | Error::RetriesExhausted { code, .. }
            | Error::UnknownOutcome { code, .. } => *code,
            Error::WatchPositionLost { .. } => Code::OutOfRange,
            Error::Protocol { .. } => Code::Internal,
        }
    }

    /// The error's message without the code prefix.
    pub fn message(&self) -> String {
        match self {
            Error::Config(message) => message.clone(),
            Error::Status { message, .. }
            | Error::RetriesExhausted { message, .. }
            | Error::UnknownOutcome { message, .. }
            | Error::WatchPositionLost { message, .. }
            | Error::Protocol { message, .. } => message.clone(),
        }
    }

    /// True when a write failed without telling whether the cluster applied it.
    pub fn is_unknown_outcome(&self) -> bool {
        matches!(self, Error::UnknownOutcome { .. })
    }

    /// True when no endpoint gave an answer within the retry budget: the cluster (or the network
    /// to it) is unavailable. Nothing was applied unless [`Error::is_unknown_outcome`] says so.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::RetriesExhausted { .. })
            || matches!(
                self,
                Error::Status {
                    code: Code::Unavailable,
                    ..
                }
            )
    }
}

/// The canonical upper-case name of a gRPC code, as in the gRPC spec (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server status prints as its canonical code name followed by the server's message.
    #[test]
    fn status_display_names_the_code() {
        let err = Error::Status {
            code: Code::NotFound,
            message: "job 42 does not exist".into(),
            endpoint: "http://127.0.0.1:7101".into(),
        };
        assert_eq!(err.to_string(), "NOT_FOUND: job 42 does not exist");
        assert_eq!(err.code(), Code::NotFound);
    }

    /// An unknown outcome says plainly that the jobs may or may not exist.
    #[test]
    fn unknown_outcome_display_is_explicit() {
        let err = Error::UnknownOutcome {
            code: Code::Unavailable,
            message: "connection reset".into(),
            endpoint: "http://a".into(),
        };
        let text = err.to_string();
        assert!(text.starts_with("UNAVAILABLE: outcome unknown"), "{text}");
        assert!(err.is_unknown_outcome());
        assert!(!err.is_unavailable());
    }

    /// A lost watch position carries OUT_OF_RANGE and names the position it could not resume at.
    #[test]
    fn watch_position_lost_names_the_position() {
        let err = Error::WatchPositionLost {
            index: 12,
            seq: 3,
            message: "no longer retained".into(),
            endpoint: "http://a".into(),
        };
        assert_eq!(err.code(), Code::OutOfRange);
        let text = err.to_string();
        assert!(text.starts_with("OUT_OF_RANGE: "), "{text}");
        assert!(text.contains("12:3"), "{text}");
    }
}
