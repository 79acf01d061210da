//! Durable storage for an exactly node: sled behind the project's own small layer, and the
//! openraft log-storage and state-machine adapters built on it.
//!
//! **Boundary:** this crate knows openraft, sled and exactly-core, and nothing about tonic,
//! ractor or handlers. Effects of apply that concern the node (attempt starts) leave through
//! the [`ApplyObserver`] the node passes in.

use std::io::Cursor;
use std::sync::Arc;

use exactly_core::{Request, Response, StartAttempt};

mod codec;
mod error;
mod log_store;
mod snapshot;
mod state_machine;
mod store;

pub use error::{Error, Result};
pub use log_store::{LogStore, LOG_READ_BYTES_MAX, LOG_READ_ENTRIES_MAX};
pub use state_machine::{SnapshotBuilder, StateMachine};
pub use store::{
    Store, OPEN_LOCK_RETRY_MS, OPEN_LOCK_WAIT_MS_MAX, PAYLOAD_BATCH_KEYS_MAX, PURGE_BATCH_KEYS_MAX,
    SLED_CACHE_BYTES,
};

openraft::declare_raft_types!(
    /// openraft's type configuration for exactly: log entries carry an [`exactly_core::Request`].
    pub TypeConfig:
        D = Request,
        R = Response,
);

/// The Raft node type of exactly.
pub type Raft = openraft::Raft<TypeConfig>;

/// Receives what applying committed entries means for the node hosting this store. Called on the
/// apply path: implementations must be cheap and must not block (cast to an actor and return).
pub trait ApplyObserver: Send + Sync + 'static {
    /// An attempt was started by an applied Assign. Called on every replica for every node's
    /// attempts, and again for the same entries when apply re-runs after a restart: the
    /// implementation filters by node id and incarnation.
    fn on_start(&self, start: StartAttempt);
    /// Entries up to `index` were applied (wakes the scheduler and watchers).
    fn on_applied(&self, index: u64);
}

/// An observer that ignores everything (storage tests).
pub struct NoopObserver;

impl ApplyObserver for NoopObserver {
    fn on_start(&self, _start: StartAttempt) {}
    fn on_applied(&self, _index: u64) {}
}

/// Shared handle to an observer.
pub type Observer = Arc<dyn ApplyObserver>;
