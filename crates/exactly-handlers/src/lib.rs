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

/// Everything a handler is told about the attempt it runs.
#[derive(Clone, Debug)]
pub struct JobContext {
    pub job_id: u64,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Strictly increasing per job: a downstream that remembers the largest token it has seen per
    /// job and refuses smaller ones applies each effect once.
    pub fencing_token: u64,
    pub node_id: u64,
    pub queue: String,
    pub kind: String,
    pub payload: Vec<u8>,
    /// The attempt's execution timeout (the executor cancels at this point).
    pub timeout: Duration,
}

/// What a handler reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandlerOutcome {
    /// Done; the bytes are kept with the job as its result (truncated by the state machine).
    Succeeded(Vec<u8>),
    /// Not done. `retryable` failures are retried while attempts remain.
    Failed { error: String, retryable: bool },
}

/// A job handler. Implement this to run your own job kinds in your own node binary.
///
/// The future must finish soon after `cancel` fires (the executor kills nothing for you; the
/// `exec` handler kills its whole process group).
pub trait Handler: Send + Sync + 'static {
    fn run(&self, ctx: JobContext, cancel: CancellationToken) -> BoxFuture<'static, HandlerOutcome>;
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
