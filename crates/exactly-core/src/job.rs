//! A job and its attempts, as the state machine records them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{JobId, NodeId};

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum JobStatus {
    /// Waiting to be assigned (possibly not before `run_at_ms`, or behind an earlier job with the
    /// same ordering key).
    Pending,
    /// Assigned to one node's executor; its current attempt is the last in `attempts`.
    Running,
    /// Finished successfully. Terminal.
    Succeeded,
    /// Out of attempts, or failed permanently: a dead letter. Terminal until redriven.
    Dead,
    /// Cancelled by a client. Terminal.
    Cancelled,
}

impl JobStatus {
    /// Whether the job will never run again (a dead letter runs again only if redriven).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Dead | JobStatus::Cancelled
        )
    }

    /// A lower-case name for tables, metrics and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Dead => "dead",
            JobStatus::Cancelled => "cancelled",
        }
    }
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptEnd {
    /// The handler reported success.
    Succeeded,
    /// The handler reported a failure.
    Failed { error: String, retryable: bool },
    /// The node running it was lost (restarted, expired or removed) before it reported.
    Abandoned { reason: String },
    /// A client cancelled the job while this attempt ran; the node was told to stop it.
    Cancelled { reason: String },
}

/// One assignment of a job to one node's executor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1 for the first attempt.
    pub number: u32,
    /// The fencing token: the log index of the Assign entry. Strictly increasing per job.
    pub token: u64,
    pub node: NodeId,
    /// The incarnation of `node` the attempt was given to.
    pub incarnation: u64,
    pub started_at_ms: u64,
    pub ended_at_ms: Option<u64>,
    pub end: Option<AttemptEnd>,
}

/// The retry backoff of one job: exponential from `base_ms`, doubling per failure, capped at
/// `max_ms`, with "equal jitter" (a delay `d` becomes a value in `[d/2, d]`) drawn by the leader.
/// Zero fields mean the built-in defaults ([`Backoff::or_defaults`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    pub base_ms: u64,
    pub max_ms: u64,
}

/// A job's compact record. The payload is not here: it is handed to the storage layer as an
/// [`crate::Effect::StorePayload`] so that memory holds only what scheduling needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub queue: String,
    pub kind: String,
    pub priority: i32,
    pub payload_len: u32,
    pub max_attempts: u32,
    /// Execution timeout of one attempt; 0 means the node's default.
    pub timeout_ms: u64,
    pub backoff: Backoff,
    /// The client's idempotency key, if it gave one.
    pub idempotency_key: Option<String>,
    /// Jobs of one queue that share an ordering key run one at a time, in submission order.
    pub ordering_key: Option<String>,
    /// Free-form labels for filtering and display.
    pub labels: BTreeMap<String, String>,
    /// The cron schedule that fired this job, if one did.
    pub schedule: Option<String>,
    pub status: JobStatus,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Not to be assigned before this time (leader's clock, Unix milliseconds).
    pub run_at_ms: u64,
    /// Failures that consumed `max_attempts` (reset by a redrive).
    pub failures: u32,
    /// Attempts that ended without the job's doing (its node fenced itself, restarted, was
    /// drained past its deadline or lost its lease). They cost no attempt (reset by a redrive).
    pub abandoned: u32,
    pub attempts: Vec<Attempt>,
    /// The handler's output on success, truncated to [`crate::limits::RESULT_BYTES_MAX`].
    pub result: Option<Vec<u8>>,
    /// The last error, truncated to [`crate::limits::ERROR_BYTES_MAX`].
    pub last_error: Option<String>,
}

impl Job {
    /// The attempt that is running now, if any.
    pub fn current_attempt(&self) -> Option<&Attempt> {
        if self.status == JobStatus::Running {
            self.attempts.last()
        } else {
            None
        }
    }

    /// Abandoned attempts at the end of the attempt history, since the last attempt that ended
    /// otherwise (or since the last redrive, which resets `abandoned`).
    pub fn abandoned_in_a_row(&self) -> u32 {
        let tail = self
            .attempts
            .iter()
            .rev()
            .take_while(|a| matches!(a.end, Some(AttemptEnd::Abandoned { .. })))
            .count() as u32;
        tail.min(self.abandoned)
    }

    /// The key handlers receive: the client's idempotency key, or one derived from the job id.
    /// Either way it is the same for every attempt of the job.
    pub fn effective_idempotency_key(&self) -> String {
        match &self.idempotency_key {
            Some(key) => key.clone(),
            None => format!("exactly-job-{}", self.id),
        }
    }
}

/// How many jobs are in each state, and how many completions were refused as stale.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCounts {
    pub pending: u64,
    pub running: u64,
    pub succeeded: u64,
    pub dead: u64,
    pub cancelled: u64,
    /// Completions refused because they named an attempt that was no longer current (excluding
    /// the expected late report of an attempt a client cancelled).
    pub stale_completions: u64,
}

impl StateCounts {
    pub(crate) fn slot(&mut self, status: JobStatus) -> &mut u64 {
        match status {
            JobStatus::Pending => &mut self.pending,
            JobStatus::Running => &mut self.running,
            JobStatus::Succeeded => &mut self.succeeded,
            JobStatus::Dead => &mut self.dead,
            JobStatus::Cancelled => &mut self.cancelled,
        }
    }

    /// Jobs that are pending or running.
    pub fn live(&self) -> u64 {
        self.pending + self.running
    }
}
