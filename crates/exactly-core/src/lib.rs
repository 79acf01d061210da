//! The pure, deterministic heart of exactly: the job state machine and the scheduling policy.
//!
//! Everything here is a function of its inputs. Time arrives only as the timestamp the leader
//! stamps on each [`Request`]; nothing here reads a clock, draws a random number, spawns a task or
//! touches a disk or a socket. The node crate feeds committed log entries into
//! [`JobTable::apply`] and carries out the [`Effect`]s it returns.
//!
//! **Boundary:** this crate knows nothing about openraft, sled, tonic, tokio or ractor.

pub mod access;
pub mod command;
pub mod cron;
pub mod job;
pub mod limits;
pub mod queue;
pub mod records;
pub mod retry;
pub mod schedule;
pub mod scheduler;
pub mod state;
pub mod typed;

pub use command::{
    Assignment, Audited, Command, Completion, DeadFilter, DrainNode, Effect, Expiry, JobEvent,
    JoinNote, LeaveReason, NewJob, NodeLease, NodeRegistration, Outcome, QueuePatch, Rejection,
    Renewal, Request, Response, Retention, StartAttempt, Submitted,
};
pub use job::{Attempt, AttemptEnd, Backoff, Job, JobStatus, StateCounts};
pub use limits::Limits;
pub use queue::{QueueConfig, RateLimit};
pub use scheduler::plan_assignments;
pub use state::{
    AuditRecord, FinishedJob, JobTable, KeyRecord, Leave, Listed, NodeEntry, QueueState, Retained,
    TableHead,
};
pub use typed::{Accepted, Deleted, Proposal, Reply};

/// A node's identity in the cluster: stable across restarts (kept in the data directory).
pub type NodeId = u64;

/// A job's identity: assigned by the state machine in log order, starting at 1.
pub type JobId = u64;
