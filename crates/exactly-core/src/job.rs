//! A job and its attempts, as the state machine records them.

use serde::{Deserialize, Serialize};

use crate::{JobId, NodeId};

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum JobStatus {
    /// Waiting to be assigned (possibly not before `run_at_ms`).
    Pending,
    /// Assigned to one node's executor; its current attempt is the last in `attempts`.
    Running,
    /// Finished successfully. Terminal.
    Succeeded,
    /// Out of attempts, or failed permanently. Terminal.
    Failed,
}

impl JobStatus {
    /// Whether the job will never run again.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed)
    }

    /// A lower-case name for tables, metrics and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
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
    /// The node running it was lost (restarted with a new incarnation) before it reported.
    Abandoned { reason: String },
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
    pub status: JobStatus,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Not to be assigned before this time (leader's clock, Unix milliseconds).
    pub run_at_ms: u64,
    /// Failures that consumed `max_attempts`.
    pub failures: u32,
    /// Attempts abandoned because their node was lost.
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
}

/// How many jobs are in each state, and how many completions were refused as stale.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCounts {
    pub pending: u64,
    pub running: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Completions refused because they named an attempt that was no longer current.
    pub stale_completions: u64,
}

impl StateCounts {
    pub(crate) fn slot(&mut self, status: JobStatus) -> &mut u64 {
        match status {
            JobStatus::Pending => &mut self.pending,
            JobStatus::Running => &mut self.running,
            JobStatus::Succeeded => &mut self.succeeded,
            JobStatus::Failed => &mut self.failed,
        }
    }

    /// Jobs that are pending or running.
    pub fn live(&self) -> u64 {
        self.pending + self.running
    }
}
