//! Commands carried in the Raft log, the responses apply returns, and the effects it asks the
//! shell to carry out.

use serde::{Deserialize, Serialize};

use crate::{JobId, NodeId};

/// One log entry's payload: a command stamped with the leader's clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The proposing leader's wall clock in Unix milliseconds. Apply never reads a clock; it uses
    /// the largest stamp seen so far, so time never goes backwards across a leader change.
    pub now_ms: u64,
    pub command: Command,
}

/// What a log entry asks the state machine to do. Each variant carries a batch, so one Raft
/// commit (one fsync on a quorum) moves many jobs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create jobs.
    Submit(Vec<NewJob>),
    /// Start attempts of pending jobs on nodes (proposed by the leader's scheduler).
    Assign(Vec<Assignment>),
    /// Record attempt outcomes (proposed by executors).
    Complete(Vec<Completion>),
    /// A node renews the lease of its current incarnation. Committed through the log, so only a
    /// leader that still leads can make a renewal count (invariant 5).
    Renew(NodeLease),
    /// The leader found a node's lease lapsed (on its own monotonic clock, after waiting a full
    /// lease period since it became leader): abandon that incarnation's attempts.
    Expire(NodeLease),
    /// A node announces its current incarnation and capacity. A newer incarnation proves the
    /// older one's process is gone, so its attempts are abandoned and their jobs requeued.
    RegisterNode(NodeRegistration),
}

/// A job as a client submits it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewJob {
    pub queue: String,
    pub kind: String,
    pub payload: Vec<u8>,
    pub priority: i32,
    pub max_attempts: u32,
    pub timeout_ms: u64,
    /// Not before this time (Unix milliseconds); 0 means now.
    pub run_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub job: JobId,
    pub node: NodeId,
    pub incarnation: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Completion {
    pub job: JobId,
    /// The fencing token of the attempt this completion is for.
    pub token: u64,
    pub outcome: Outcome,
}

/// What a handler reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Succeeded { result: Vec<u8> },
    Failed { error: String, retryable: bool },
}

/// One incarnation of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeLease {
    pub node: NodeId,
    pub incarnation: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    pub node: NodeId,
    pub incarnation: u64,
    /// Attempts the node runs at once.
    pub slots: u32,
    /// The node's gRPC address, for display.
    pub addr: String,
}

/// Why the state machine refused part of a command. Refusals are normal results, not errors:
/// the rest of the batch is applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Rejection {
    #[error("invalid job: {0}")]
    Invalid(String),
    #[error("job {0} does not exist")]
    UnknownJob(JobId),
    #[error("job is {0}, not pending")]
    NotPending(String),
    #[error("job is not due before {0} ms")]
    NotDue(u64),
    #[error("node {0} is not registered")]
    UnknownNode(NodeId),
    #[error("node {node} incarnation {got} is not its current incarnation {current}")]
    StaleIncarnation {
        node: NodeId,
        got: u64,
        current: u64,
    },
    #[error("the lease of node {node} incarnation {incarnation} expired")]
    Expired { node: NodeId, incarnation: u64 },
    #[error("node {0} has no free slot")]
    NoSlot(NodeId),
    #[error("attempt with token {got} is not the job's current attempt (current: {current:?})")]
    StaleAttempt { got: u64, current: Option<u64> },
    #[error("too many live jobs ({0})")]
    Full(u64),
    #[error("batch of {got} exceeds the limit of {max}")]
    BatchTooLarge { got: usize, max: usize },
}

/// What applying one entry returns to the proposer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Per submitted job, in order: its new id, or why it was refused.
    Submitted(Vec<Result<JobId, Rejection>>),
    Assigned {
        started: u32,
        rejected: Vec<(JobId, Rejection)>,
    },
    Completed {
        accepted: u32,
        rejected: Vec<(JobId, Rejection)>,
    },
    NodeRegistered(Result<u32, Rejection>),
    Renewed(Result<(), Rejection>),
    /// How many attempts the expiry abandoned.
    Expired(Result<u32, Rejection>),
    /// For entries without application data (blank and membership entries).
    Empty,
}

/// Work the shell carries out after applying an entry. Apply may run again for the same entry
/// after a restart, so effects are keyed (job id, fencing token) and safe to see twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Keep this job's payload in storage, next to (not inside) the state machine.
    StorePayload { job: JobId, payload: Vec<u8> },
    /// Drop a payload the state machine no longer needs.
    DropPayload { job: JobId },
    /// Start an attempt on `node` (only that node acts on it).
    Start(StartAttempt),
    /// A lease renewal committed (the leader restarts that node's expiry clock).
    Renewed(NodeLease),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartAttempt {
    pub job: JobId,
    pub token: u64,
    pub attempt: u32,
    pub node: NodeId,
    pub incarnation: u64,
    pub queue: String,
    pub kind: String,
    pub timeout_ms: u64,
}
