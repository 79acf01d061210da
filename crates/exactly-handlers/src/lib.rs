//! Handlers run jobs. One trait, a registry keyed by job kind, and the built-in handlers.
//!
//! **Boundary:** handlers know nothing about Raft, storage or actors. The executor gives a
//! handler a [`JobContext`] and a cancellation token and gets back a [`HandlerOutcome`]; the
//! executor enforces the timeout by cancelling the token, then waiting a bounded grace.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

pub mod exec;
pub mod fail;
pub mod http;
pub mod lease;
pub mod noop;
pub mod sleep;
mod tail;

pub use exec::{locate_guard, ExecHandler, ExecSpec, ExecSpecError, GuardNotFound};
pub use fail::FailHandler;
pub use http::{HttpHandler, HttpSpec};
pub use lease::{monotonic_ms, LeaseDeadline};
pub use noop::NoopHandler;
pub use sleep::SleepHandler;

/// The error of every attempt that stopped because its cancellation token fired. The executor
/// cancels on timeout, on self-fencing and on drain, and retries the job with a new fencing token.
pub const CANCELLED: &str = "cancelled";

/// A value in a handler spec ([`ExecSpec`], [`HttpSpec`]) that cannot work, naming its key
/// (relative to the spec's table, e.g. `output-bytes-max`; the node prefixes `exec.KIND.`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid value for `{key}`: {value} ({why})")]
pub struct SpecError {
    /// The offending key, e.g. `output-bytes-max` or `env.EXACTLY_QUEUE`.
    pub key: String,
    /// The offending value, quoted.
    pub value: String,
    /// What a valid value looks like.
    pub why: String,
}

impl SpecError {
    pub(crate) fn new(
        key: impl Into<String>,
        value: impl std::fmt::Debug,
        why: impl Into<String>,
    ) -> Self {
        Self {
            key: key.into(),
            value: format!("{value:?}"),
            why: why.into(),
        }
    }
}

/// Everything a handler is told about the attempt it runs.
#[derive(Clone, Debug)]
pub struct JobContext {
    pub job_id: u64,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Strictly increasing per job: a downstream that remembers the largest token it has seen per
    /// job and refuses smaller ones applies each effect once.
    pub fencing_token: u64,
    /// The same for every attempt of the job: a downstream that remembers the keys it has
    /// applied applies each job's effect once (`EXACTLY_IDEMPOTENCY_KEY` for `exec`, the
    /// `Idempotency-Key` header for `http`).
    pub idempotency_key: String,
    pub node_id: u64,
    pub queue: String,
    pub kind: String,
    pub payload: Vec<u8>,
    /// The attempt's execution timeout (the executor cancels at this point).
    pub timeout: Duration,
    /// The running node's lease deadline (see [`lease`]): work a handler runs outside the node
    /// process must stop by then even if the node cannot tell it to (killed or frozen).
    pub lease: LeaseDeadline,
}

/// What a handler reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandlerOutcome {
    /// Done; the bytes are kept with the job as its result (truncated by the state machine).
    Succeeded(Vec<u8>),
    /// Not done. `retryable` failures are retried while attempts remain.
    Failed { error: String, retryable: bool },
}

impl HandlerOutcome {
    /// A failure worth another attempt.
    pub fn retryable(error: impl Into<String>) -> Self {
        Self::Failed {
            error: error.into(),
            retryable: true,
        }
    }

    /// A failure that another attempt would repeat (bad input, a missing program).
    pub fn permanent(error: impl Into<String>) -> Self {
        Self::Failed {
            error: error.into(),
            retryable: false,
        }
    }

    /// The outcome of an attempt stopped by its cancellation token: retryable, because the job
    /// itself did nothing wrong.
    pub fn cancelled() -> Self {
        Self::retryable(CANCELLED)
    }
}

/// A job handler. Implement this to run your own job kinds in your own node binary.
///
/// The future must finish soon after `cancel` fires (the executor kills nothing for you; the
/// `exec` handler's guard kills the command's whole process tree).
pub trait Handler: Send + Sync + 'static {
    fn run(&self, ctx: JobContext, cancel: CancellationToken)
        -> BoxFuture<'static, HandlerOutcome>;
}

/// Handlers by job kind.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, Arc<dyn Handler>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry holding the handlers every node has: `noop`, `sleep` and `fail`.
    ///
    /// `exec` and `http` kinds are not built in: each one names a command or a URL configured on
    /// the node, added with [`Registry::register_exec`] and [`Registry::register_http`].
    pub fn with_builtins() -> Self {
        let mut registry = Self::new();
        registry.register(noop::KIND, Arc::new(NoopHandler));
        registry.register(sleep::KIND, Arc::new(SleepHandler));
        registry.register(fail::KIND, Arc::new(FailHandler));
        registry
    }

    /// Registers `kind` to run the command `spec` describes under the exec guard binary `guard`
    /// (see [`locate_guard`]), after checking the spec. Like [`Registry::register`], this
    /// replaces any handler already registered for `kind`.
    pub fn register_exec(
        &mut self,
        kind: impl Into<String>,
        spec: ExecSpec,
        guard: std::path::PathBuf,
    ) -> Result<(), ExecSpecError> {
        spec.validate()?;
        self.register(kind, Arc::new(ExecHandler::new(spec, guard)));
        Ok(())
    }

    /// Like [`Registry::register_exec`], recording running process groups in `group_dir` so a
    /// restarted node can kill its previous life's commands ([`exec::kill_leftover_groups`]).
    pub fn register_exec_in(
        &mut self,
        kind: impl Into<String>,
        spec: ExecSpec,
        guard: std::path::PathBuf,
        group_dir: std::path::PathBuf,
    ) -> Result<(), ExecSpecError> {
        spec.validate()?;
        self.register(
            kind,
            Arc::new(ExecHandler::new(spec, guard).with_group_dir(group_dir)),
        );
        Ok(())
    }

    /// Registers `kind` to POST each job's payload to the URL `spec` describes, after checking
    /// the spec. Like [`Registry::register`], this replaces any handler already registered for
    /// `kind`.
    pub fn register_http(
        &mut self,
        kind: impl Into<String>,
        spec: HttpSpec,
    ) -> Result<(), SpecError> {
        let handler = HttpHandler::new(spec)?;
        self.register(kind, Arc::new(handler));
        Ok(())
    }

    pub fn register(&mut self, kind: impl Into<String>, handler: Arc<dyn Handler>) {
        self.handlers.insert(kind.into(), handler);
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(kind).cloned()
    }

    pub fn contains(&self, kind: &str) -> bool {
        self.handlers.contains_key(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.handlers.keys()).finish()
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    /// A context for attempt 1 of job 7 with fencing token 42 on node 3, with the idempotency key
    /// the node derives from the job id.
    pub(crate) fn context(kind: &str, payload: &[u8]) -> JobContext {
        JobContext {
            job_id: 7,
            attempt: 1,
            fencing_token: 42,
            idempotency_key: "exactly-job-7".to_string(),
            node_id: 3,
            queue: "default".to_string(),
            kind: kind.to_string(),
            payload: payload.to_vec(),
            timeout: Duration::from_secs(30),
            lease: LeaseDeadline::unbounded(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `with_builtins` registers exactly noop, sleep and fail.
    #[test]
    fn builtins_are_registered() {
        let registry = Registry::with_builtins();
        assert_eq!(
            registry.kinds().collect::<Vec<_>>(),
            ["fail", "noop", "sleep"]
        );
    }

    /// `register_exec` adds a valid spec under its kind and refuses an invalid one.
    #[test]
    fn register_exec_validates_the_spec() {
        let mut registry = Registry::with_builtins();
        let guard = std::path::PathBuf::from("exactly-exec-guard");
        registry
            .register_exec("resize", ExecSpec::new("/bin/true"), guard.clone())
            .expect("valid spec");
        assert!(registry.contains("resize"));

        let err = registry
            .register_exec("broken", ExecSpec::new(""), guard)
            .expect_err("empty command");
        assert_eq!(err.key, "command");
        assert!(!registry.contains("broken"));
    }
}
