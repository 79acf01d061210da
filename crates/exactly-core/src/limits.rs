//! Named limits enforced by the state machine and checked again at the API edge.
//!
//! The API edge refuses oversize input with a precise status before anything is proposed; the
//! state machine checks the same limits again because a log entry is input too, and a bad entry
//! must become a rejection for that job, never a panic on every replica.

use serde::{Deserialize, Serialize};

/// Bytes of a queue name, at most.
pub const QUEUE_NAME_BYTES_MAX: usize = 128;
/// Bytes of a handler kind name, at most.
pub const KIND_NAME_BYTES_MAX: usize = 128;
/// Bytes of a handler result kept with a finished job; longer results are truncated.
pub const RESULT_BYTES_MAX: usize = 4096;
/// Bytes of an error message kept with an attempt; longer messages are truncated.
pub const ERROR_BYTES_MAX: usize = 1024;
/// Attempts a job may be configured to make.
pub const MAX_ATTEMPTS_MAX: u32 = 100;
/// Abandoned attempts (ends the job did not cause: its node fenced itself, refused to start it
/// without a lease, was drained past its deadline, restarted or lost its lease) never consume
/// `max_attempts` and never make a dead letter, and a job its node gives back runs again at once.
/// But when its node was *lost* under it (restarted, or its lease expired) after this many
/// abandons in a row, the job waits its retry backoff (capped at [`ABANDON_DELAY_MAX_MS`]): a
/// job that keeps taking its node down with it slows down instead of crash-looping the cluster.
pub const ABANDONS_RERUN_AT_ONCE: u32 = 3;
/// The longest wait before a job whose nodes keep being lost under it runs again.
pub const ABANDON_DELAY_MAX_MS: u64 = 10_000;
/// Jobs in one Submit command.
pub const SUBMIT_BATCH_JOBS_MAX: usize = 1000;
/// Jobs in one SubmitGroups command (all its groups together; each group at most
/// [`SUBMIT_BATCH_JOBS_MAX`]).
pub const SUBMIT_GROUP_JOBS_MAX: usize = 4096;
/// Groups in one SubmitGroups command.
pub const SUBMIT_GROUPS_MAX: usize = 1024;
/// Assignments in one Assign command.
pub const ASSIGN_BATCH_MAX: usize = 1024;
/// Excluded node ids a `SubmitAssign` command may name.
pub const ASSIGN_EXCLUDED_MAX: usize = 1024;
/// Commands in one `Batch` entry.
pub const BATCH_COMMANDS_MAX: usize = 256;
/// Completions in one Complete command.
pub const COMPLETE_BATCH_MAX: usize = 1024;
/// Execution timeout of one attempt, at most (one day).
pub const TIMEOUT_MS_MAX: u64 = 24 * 60 * 60 * 1000;
/// Nodes draining (or being removed) at once: bounds the table's leaving map, which apply fills
/// from log entries (input).
pub const NODES_LEAVING_MAX: usize = 64;
/// A lease renewal counts only from a node that has applied what was committed this long before
/// it (see [`crate::command::Renewal`]).
pub const RENEW_APPLY_LAG_MAX_MS: u64 = 2_000;
/// Renewal marks (log index, time) kept per node to find what a renewal must have applied.
pub const RENEW_MARKS_MAX: usize = 64;
/// Slots one node may advertise.
pub const NODE_SLOTS_MAX: u32 = 10_000;
/// Base delay of the exponential retry backoff, when a job sets none.
pub const RETRY_BACKOFF_BASE_MS: u64 = 1_000;
/// Cap of the exponential retry backoff, when a job sets none.
pub const RETRY_BACKOFF_MAX_MS: u64 = 5 * 60 * 1000;
/// A job's own backoff base or cap, at most (one day).
pub const BACKOFF_MS_MAX: u64 = 24 * 60 * 60 * 1000;
/// How far after now (the leader's time in apply, the answering node's clock at the API edge) a
/// job's `run_at` may lie: about ten years (3,650 days). Without a bound, a `run_at` or `delay`
/// of 2^64-1 made a job that never runs yet counts as live (against `limits.jobs-live-max`) and
/// holds its payload for ever.
pub const RUN_AT_AHEAD_MS_MAX: u64 = 3_650 * 24 * 60 * 60 * 1000;
/// Bytes of an idempotency key.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 256;
/// Bytes of a node's registered or joining address (`host:port`; a DNS name is at most 253).
pub const NODE_ADDR_BYTES_MAX: usize = 255;
/// Bytes of an ordering key.
pub const ORDERING_KEY_BYTES_MAX: usize = 256;
/// Labels on one job.
pub const LABELS_MAX: usize = 16;
/// Bytes of a label name.
pub const LABEL_KEY_BYTES_MAX: usize = 64;
/// Bytes of a label value.
pub const LABEL_VALUE_BYTES_MAX: usize = 256;
/// Queues the state machine tracks at once (queues with jobs or with non-default settings).
pub const QUEUES_MAX: usize = 10_000;
/// Jobs a rate limit may allow per period.
pub const RATE_JOBS_MAX: u32 = 1_000_000;
/// A rate limit's period, at most (one day).
pub const RATE_PERIOD_MS_MAX: u64 = 24 * 60 * 60 * 1000;
/// Jobs in one Cancel command.
pub const CANCEL_BATCH_MAX: usize = 1000;
/// Dead letters one Redrive or PurgeDead command moves.
pub const DEAD_BATCH_MAX: usize = 1000;
/// Jobs (and, separately, idempotency records) one retention pass deletes.
pub const RETAIN_BATCH_MAX: usize = 1000;
/// Cron schedules in the cluster.
pub const SCHEDULES_MAX: usize = 1000;
/// Bytes of a schedule name.
pub const SCHEDULE_NAME_BYTES_MAX: usize = 128;
/// Bytes of the payload a schedule's job template carries (kept in the state machine itself).
pub const SCHEDULE_PAYLOAD_BYTES_MAX: usize = 64 * 1024;
/// Schedules one FireSchedules command fires.
pub const FIRE_BATCH_MAX: usize = 100;
/// A cron tick fired later than this after its time counts as missed (see
/// [`crate::cron::MissedTickPolicy`]); within it, a tick delayed by a leader failover still fires
/// (each such tick its own job: see [`CRON_CATCH_UP_FIRES_MAX`]).
pub const CRON_LATE_GRACE_MS: u64 = 60_000;
/// Jobs one schedule fires in one FireSchedules entry, at most. Ticks that came due while no
/// leader could fire them (a failover) and are still within [`CRON_LATE_GRACE_MS`] each fire
/// their own job, oldest first; past this many, the schedule's next tick stays at the first
/// unfired one (already due), and the leader's next entry goes on from there. An every-second
/// schedule has at most 61 ticks within the grace, so a catch-up takes at most 7 entries.
pub const CRON_CATCH_UP_FIRES_MAX: usize = 10;

// One FireSchedules entry creates no more jobs than the largest Submit.
const _: () = assert!(FIRE_BATCH_MAX * CRON_CATCH_UP_FIRES_MAX <= SUBMIT_BATCH_JOBS_MAX);
// The ordering line a `skip` schedule's jobs share, `schedule/<name>`, is a valid ordering key.
const _: () = assert!(SCHEDULE_NAME_BYTES_MAX + "schedule/".len() <= ORDERING_KEY_BYTES_MAX);
// The key of a fired job, `schedule/<name>/<tick ms>`, is a valid idempotency key.
const _: () =
    assert!(SCHEDULE_NAME_BYTES_MAX + "schedule//".len() + 20 <= IDEMPOTENCY_KEY_BYTES_MAX);

/// Bytes of one job's payload that the state machine accepts from the log, whatever a node is
/// configured to take. Apply must not depend on per-node configuration (replicas could diverge),
/// so it enforces only constants; the configurable [`Limits`] are enforced at the API edge.
pub const PAYLOAD_BYTES_CEILING: usize = 16 * 1024 * 1024;

/// Limits that an operator configures per node and that the API edge enforces before anything is
/// proposed. They may differ between nodes without harm because apply never reads them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Bytes of one job's payload, at most (never above [`PAYLOAD_BYTES_CEILING`]).
    pub payload_bytes_max: usize,
    /// Jobs that are pending or running at once, cluster-wide. Past it, submits are refused.
    pub jobs_live_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            payload_bytes_max: 1024 * 1024,
            jobs_live_max: 1_000_000,
        }
    }
}

/// Records the audit trail keeps (the newest; older ones are dropped as new ones come).
pub const AUDIT_RECORDS_MAX: usize = 10_000;
/// Bytes of the credential name an audited command carries, at most.
pub const AUDIT_BY_BYTES_MAX: usize = 64;
/// Bytes of an audit record's action and outcome texts, at most each.
pub const AUDIT_TEXT_BYTES_MAX: usize = 512;

/// Bytes of a token's name, at most (the same bound as an audited command's name, which it
/// becomes).
pub const TOKEN_NAME_BYTES_MAX: usize = AUDIT_BY_BYTES_MAX;
/// Scopes one token may list, at most.
pub const TOKEN_SCOPES_MAX: usize = 16;
/// Tokens issued through the API that the cluster keeps at once (revoke to make room).
pub const ISSUED_TOKENS_MAX: usize = 1_000;
