//! Durable storage for an exactly node: sled behind the project's own small layer, and the
//! openraft log-storage and state-machine adapters built on it.
//!
//! **Boundary:** this crate knows openraft, sled and exactly-core, and nothing about tonic,
//! ractor or handlers. Effects of apply that concern the node (attempt starts) leave through
//! the [`ApplyObserver`] the node passes in.
//!
//! - [`Store`] (`store.rs`): the data directory, sled's trees, the durability point (a real
//!   fsync, not sled's `sync_file_range`), start-up recovery, node id and incarnation. Its
//!   module documentation states exactly what survives a crash or a power loss.
//! - [`LogStore`] (`log_store.rs`): openraft's `RaftLogStorage` (log entries and vote).
//! - [`StateMachine`] (`state_machine.rs`): openraft's `RaftStateMachine`: the
//!   [`exactly_core::JobTable`] with its records on disk ([`Table`]), its head in memory and
//!   written with every apply call, payloads in sled, snapshots from a consistent view.
//! - [`SledRecords`] (`records.rs`): the job table's [`exactly_core::records::Records`] in a
//!   sled tree, every change of an apply call written as one atomic batch (tested against the
//!   in-memory model), the records packed into chunks of a few KiB (`chunks.rs`: the layout,
//!   pure).
//! - `snapshot.rs`: the snapshot data and file formats; `codec.rs`: versioned value encoding.
//! - `durability.rs`: the test-only seam at the durability points ([`StoreOptions`],
//!   [`DurabilityHook`]) and [`lose_unsynced_writes`], which leaves a data directory as a power
//!   loss would. Production opens stores with the default options: real fsyncs, nothing else.
//!
//! **Invariant:** `save_vote` returns, and `append` calls its flushed-callback, only after the
//! vote or entries are fsynced (invariant 1 of the design).

use std::sync::Arc;

use exactly_core::{Request, Response, StartAttempt};

mod chunked;
mod chunks;
mod codec;
mod durability;
mod error;
mod log_store;
mod records;
mod snapshot;
mod state_machine;
mod store;

pub use chunks::CHUNK_BYTES_MAX;
pub use durability::{
    lose_unsynced_writes, DurabilityHook, DurabilityHookHandle, DurableImage, LostWrites,
    StoreOptions,
};
pub use error::{Error, Result};
pub use log_store::{LogStore, LOG_READ_BYTES_MAX, LOG_READ_ENTRIES_MAX, TIMELINE};
pub use records::{NodeRecords, SledRecords, TableStorage, COMMIT_BATCH_KEYS_MAX};
pub use snapshot::{check as check_snapshot, check_file as check_snapshot_file};
pub use state_machine::{
    in_memory, Archive, JobCopy, JobView, SnapshotBuilder, StateMachine, Table,
};
pub use store::{
    Store, OPEN_LOCK_RETRY_MS, OPEN_LOCK_WAIT_MS_MAX, PAYLOAD_BATCH_KEYS_MAX, PURGE_BATCH_KEYS_MAX,
    SLED_CACHE_BYTES,
};

openraft::declare_raft_types!(
    /// openraft's type configuration for exactly: log entries carry an [`exactly_core::Request`],
    /// node ids are `u64` and nodes [`openraft::BasicNode`] (their address). Snapshot data is a
    /// file (built into one, sent from one, received into one), never one buffer in memory: see
    /// [`StateMachine`]'s `SnapshotData`.
    pub TypeConfig:
        D = Request,
        R = Response,
);

/// openraft's types as exactly uses them (openraft 0.10 makes them generic over the type
/// configuration; these are the instances).
pub mod raft_types {
    use super::TypeConfig;

    /// A log entry's id: the leader that proposed it (term, node) and its index.
    pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
    /// A leader's id as log ids carry it (term and node id).
    pub type LeaderId = openraft::alias::CommittedLeaderIdOf<TypeConfig>;
    /// A vote (term, node id, committed).
    pub type Vote = openraft::alias::VoteOf<TypeConfig>;
    /// A log entry.
    pub type Entry = openraft::alias::EntryOf<TypeConfig>;
    /// A log entry's payload.
    pub type EntryPayload = openraft::alias::EntryPayloadOf<TypeConfig>;
    /// A membership configuration.
    pub type Membership = openraft::Membership<u64, openraft::BasicNode>;
    /// A membership configuration with the log id that set it.
    pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
    /// A snapshot's metadata.
    pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
    /// A snapshot whose data is a file.
    pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, tokio::fs::File>;
    /// openraft's storage error.
    pub type StorageError = openraft::StorageError<TypeConfig>;

    /// The log id of the entry at `index` proposed by `node`'s leadership in `term`.
    pub fn log_id(term: u64, node: u64, index: u64) -> LogId {
        openraft::testing::log_id::<TypeConfig>(term, node, index)
    }

    /// A blank entry (what a new leader appends first) at `index`.
    pub fn blank_entry(term: u64, node: u64, index: u64) -> Entry {
        openraft::testing::blank_ent::<TypeConfig>(term, node, index)
    }
}

/// The tokens issued through the API, by name.
pub type IssuedTokens = std::collections::BTreeMap<String, exactly_core::access::IssuedToken>;

/// The Raft node type of exactly.
pub type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// Receives what applying committed entries means for the node hosting this store. Called on the
/// apply path: implementations must be cheap and must not block (cast to an actor and return).
pub trait ApplyObserver: Send + Sync + 'static {
    /// An attempt was started by an applied Assign. Called on every replica for every node's
    /// attempts, and again for the same entries when apply re-runs after a restart: the
    /// implementation filters by node id and incarnation. Called after the entry's payload
    /// writes, so [`Store::payload`] finds the job's payload. Attempts that a later entry of
    /// the same apply call already ended or replaced are not reported. Attempts inside a
    /// snapshot (loaded at open or installed from the leader) are never reported: after
    /// [`ApplyObserver::on_applied`] the node can reconcile from [`StateMachine::read`].
    fn on_start(&self, start: StartAttempt);
    /// Entries up to `index` were applied, or a snapshot up to `index` was installed (wakes
    /// the scheduler and watchers).
    fn on_applied(&self, index: u64);
    /// A lease renewal (or registration) of `lease` at log `index` was applied. The leader
    /// restarts that node's expiry clock here (on its own monotonic clock) and names `index` in
    /// the expiry it may propose later; other replicas ignore it.
    fn on_renewed(&self, _lease: exactly_core::NodeLease, _index: u64) {}
    /// A client cancelled the running attempt `token` of `job` on `node`: that node stops it.
    /// Like `on_start`, called on every replica and again when apply re-runs after a restart.
    fn on_cancel(&self, _job: u64, _token: u64, _node: u64) {}
    /// Job state changes of the applied entries, each with its entry's log index, in log order
    /// (for Watch streams). Re-sent for re-applied entries after a restart: consumers dedupe by
    /// (log index, position within the entry).
    fn on_events(&self, _events: Vec<(u64, exactly_core::JobEvent)>) {}
    /// The tokens issued through the API changed (an applied issue or revocation, or an
    /// installed snapshot): `tokens` is all of them now. The tokens of the snapshot loaded at
    /// open are not reported: read them from [`StateMachine::read`] at start.
    fn on_tokens(&self, _tokens: &IssuedTokens) {}
    /// A snapshot from the leader replaced the state up to `index` (no events, starts or
    /// cancels are reported for what it contains).
    fn on_snapshot_installed(&self, index: u64) {
        self.on_applied(index);
    }
}

/// An observer that ignores everything (storage tests).
pub struct NoopObserver;

impl ApplyObserver for NoopObserver {
    fn on_start(&self, _start: StartAttempt) {}
    fn on_applied(&self, _index: u64) {}
}

/// Shared handle to an observer.
pub type Observer = Arc<dyn ApplyObserver>;
