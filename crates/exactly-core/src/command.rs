//! Commands carried in the Raft log, the responses apply returns, and the effects it asks the
//! shell to carry out.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::job::{Backoff, JobStatus};
use crate::queue::{QueueConfig, RateLimit};
use crate::schedule::{Fire, Fired, ScheduleSpec};
use crate::{JobId, NodeId};

/// One log entry's payload: a command stamped with the leader's clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The proposing leader's wall clock in Unix milliseconds. Apply never reads a clock; it uses
    /// the largest stamp seen so far, so time never goes backwards across a leader change.
    pub now_ms: u64,
    /// Randomness drawn by the proposing leader (retry jitter is derived from it), so that apply
    /// stays deterministic: every replica reads the same value from the log.
    pub entropy: u64,
    pub command: Command,
}

/// A short description for logs (openraft prints entries): the command's name and the
/// leader's clock, never payloads.
impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}@{}",
            crate::state::audit::command_name(&self.command),
            self.now_ms
        )
    }
}

impl Request {
    /// A request stamped at `now_ms` with no entropy (tests and tools).
    pub fn at(now_ms: u64, command: Command) -> Self {
        Self {
            now_ms,
            entropy: 0,
            command,
        }
    }
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
    /// leader that still leads can make a renewal count (invariant 5); and it counts only from a
    /// node that applies the log (see [`Renewal`]).
    Renew(Renewal),
    /// The leader found a node's lease lapsed (on its own monotonic clock, after waiting a full
    /// lease period since it became leader): abandon that incarnation's attempts.
    Expire(Expiry),
    /// A node announces its current incarnation and capacity. A newer incarnation proves the
    /// older one's process is gone, so its attempts are abandoned and their jobs requeued.
    RegisterNode(NodeRegistration),
    /// A client cancels jobs: pending ones end at once, running ones end now and their node is
    /// told to stop the handler (its late completion is then refused).
    Cancel(Vec<JobId>),
    /// Dead letters matching the filter run again: attempts are reset, history is kept.
    Redrive(DeadFilter),
    /// Dead letters matching the filter are deleted with their payloads.
    PurgeDead(DeadFilter),
    /// Changes a queue's settings: the fields the patch sets, leaving the others as they are.
    ConfigureQueue {
        queue: String,
        patch: QueuePatch,
    },
    /// The leader's retention pass: delete finished jobs and idempotency records older than the
    /// cut-offs it computed from its configuration (at most `max` of each per entry).
    Retain(Retention),
    /// Adds (or, with `replace`, replaces) a cron schedule.
    AddSchedule(ScheduleSpec),
    RemoveSchedule(String),
    /// Pauses or resumes a schedule; a resumed schedule's next tick is the first after now.
    PauseSchedule {
        name: String,
        paused: bool,
    },
    /// The leader fires due ticks (each only if it is still its schedule's next tick).
    FireSchedules(Vec<Fire>),
    /// A node is to leave the cluster (an operator's drain or remove, or the node itself on
    /// SIGTERM): it gets no new attempts; its running attempts may finish until the deadline,
    /// after which the node cancels them and gives them back; once it runs nothing, the leader
    /// takes it out of the Raft membership. Replicated, so a new leader carries the drain on.
    Drain(DrainNode),
    /// The leader took a drained node out of the Raft membership: its lease entry and drain are
    /// dropped, and a removed node's id is remembered so that it can never register again.
    NodeLeft(NodeId),
    /// Several clients' Submits in one entry (group commit): each group is applied as its own
    /// all-or-nothing Submit, in order, so one bad request never refuses its neighbours'. At most
    /// [`crate::limits::SUBMIT_GROUP_JOBS_MAX`] jobs in all.
    SubmitGroups(Vec<Vec<NewJob>>),
    /// A `SubmitGroups` that also starts attempts in the same entry (the leader's group commit):
    /// the groups are applied exactly as `SubmitGroups`, then the scheduling policy
    /// ([`crate::plan_assignments`]) runs on the resulting state, over every pending job, not
    /// only the new ones, and its plan is applied as an `Assign` at this entry's index. A job
    /// submitted to an idle cluster so starts one commit after its submit instead of two.
    /// `excluded` is the leader's view of members that get no new work (silent, quiet, or not in
    /// the membership), as the scheduler would use it; expired and leaving nodes are skipped by
    /// the policy anyway. More than [`crate::limits::ASSIGN_EXCLUDED_MAX`] ids: nothing is
    /// assigned (the groups are still applied; the scheduler assigns later).
    SubmitAssign {
        groups: Vec<Vec<NewJob>>,
        excluded: BTreeSet<NodeId>,
    },
    /// Several proposals in one entry (the leader's proposal batching: what queued while the
    /// previous entries were appended shares one append and one fsync on a quorum). Applied in
    /// order, each exactly as if it were its own entry at this index with this entry's clock and
    /// entropy; each gets its own response. At most [`crate::limits::BATCH_COMMANDS_MAX`]
    /// commands and no nested `Batch`, else nothing is applied. Two attempts of one job can
    /// never start in one entry: the second would not have a larger token, and apply refuses it.
    Batch(Vec<Command>),
    /// An operator's or administrator's write from the public API, with the name of the
    /// credential that asked for it: applied exactly as its command, and recorded with its
    /// outcome in the audit trail ([`crate::state::AuditRecord`]). Only the commands
    /// [`Audited::check`] accepts; anything else is refused whole (`Response::Refused`).
    Audited(Box<Audited>),
    /// An administrator issues a bearer token (only inside [`Command::Audited`]): every node
    /// admits it once it applied this entry. Carries the token's digest, never the token.
    IssueToken(crate::access::TokenGrant),
    /// An administrator revokes a token issued through the API (only inside
    /// [`Command::Audited`]): every node refuses it once it applied this entry.
    RevokeToken(String),
    /// The leader admitted a node into the Raft membership (only inside [`Command::Audited`], to
    /// record who let it in): changes nothing but the audit trail.
    Joined(JoinNote),
}

/// A node the leader admitted (see [`Command::Joined`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinNote {
    pub node: NodeId,
    pub addr: String,
    /// Whether it is a voter now (else a learner).
    pub voter: bool,
    /// It was not a member before (else it came back at a new address or was promoted).
    pub new_member: bool,
}

/// A command and who asked for it (see [`Command::Audited`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audited {
    /// The name of the token (`anonymous` on a cluster without tokens).
    pub by: String,
    pub command: Command,
}

impl Audited {
    /// Whether this may be applied: a bounded, printable name and an operator's command.
    pub fn check(&self) -> Result<(), String> {
        use crate::limits::AUDIT_BY_BYTES_MAX;
        let printable = self.by.bytes().all(|b| b.is_ascii_graphic());
        if self.by.is_empty() || self.by.len() > AUDIT_BY_BYTES_MAX || !printable {
            return Err(format!(
                "an audited command's name must be 1..={AUDIT_BY_BYTES_MAX} printable ASCII \
                 characters without spaces"
            ));
        }
        match &self.command {
            Command::Cancel(_)
            | Command::Redrive(_)
            | Command::PurgeDead(_)
            | Command::ConfigureQueue { .. }
            | Command::AddSchedule(_)
            | Command::RemoveSchedule(_)
            | Command::PauseSchedule { .. }
            | Command::Drain(_)
            | Command::IssueToken(_)
            | Command::RevokeToken(_)
            | Command::Joined(_) => Ok(()),
            other => Err(format!(
                "only an operator's command is audited, not {}",
                crate::state::audit::command_name(other)
            )),
        }
    }
}

/// A request to drain a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainNode {
    pub node: NodeId,
    /// How long running attempts may go on, counted from the entry's leader timestamp. 0: cancel
    /// them at once (what `remove` does).
    pub deadline_after_ms: u64,
    pub reason: LeaveReason,
}

/// Why a node leaves, which decides whether it may come back. Ordered: a later request never
/// weakens an earlier one (a removal stays a removal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LeaveReason {
    /// The node drains itself because it is stopping (SIGTERM: a container stop, a pod
    /// deletion, a rolling restart). If it starts again before it has left (a newer incarnation
    /// registers), the drain is over; if it has left, it joins again as a learner.
    Stopping,
    /// An operator drained it. Once it has left, it takes no part until it is started again,
    /// when it joins again like a new learner.
    Drained,
    /// An operator removed it (typically a dead node). Once it has left, its id is refused for
    /// good: the node, coming back with its old data, never registers, votes or runs jobs again.
    Removed,
}

/// A change to a queue's settings; `None` fields keep their current value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePatch {
    pub concurrency_max: Option<u32>,
    /// `Some(None)` removes the rate limit.
    pub rate: Option<Option<RateLimit>>,
    pub paused: Option<bool>,
}

/// Which dead letters a redrive or purge applies to: the ones matching every filter that is set
/// (`ids`, `queue`, `kind`), or, with `all` and no filter, every dead letter. A filter with
/// nothing set and no `all` is refused ([`DeadFilter::check`]), so that a request whose fields
/// were all left unset (an empty message) can never purge every dead letter by accident.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadFilter {
    /// Only these jobs (empty: any).
    pub ids: Vec<JobId>,
    pub queue: Option<String>,
    pub kind: Option<String>,
    /// At most this many jobs per command (capped at [`crate::limits::DEAD_BATCH_MAX`]).
    pub max: u32,
    /// Every dead letter: the explicit consent an empty filter needs. Refused together with a
    /// filter, where it would be ambiguous (does it widen the filter or not?).
    pub all: bool,
}

impl DeadFilter {
    /// Whether no filter is set (`ids`, `queue` and `kind` all empty).
    pub fn is_unfiltered(&self) -> bool {
        self.ids.is_empty() && self.queue.is_none() && self.kind.is_none()
    }

    /// The one rule for a filter, checked by the API edge and again by apply: a filter, or
    /// `all`, never both and never neither.
    pub fn check(&self) -> Result<(), String> {
        match (self.is_unfiltered(), self.all) {
            (true, false) => Err("an empty dead-letter filter selects nothing: set job_ids, \
                 queue or kind, or set all = true to select every dead letter"
                .into()),
            (false, true) => Err(
                "all = true selects every dead letter and takes no job_ids, \
                 queue or kind: set one or the other"
                    .into(),
            ),
            _ => Ok(()),
        }
    }
}

/// Cut-offs of one retention pass, in leader Unix milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// Succeeded and cancelled jobs that finished before this are deleted.
    pub finished_before_ms: u64,
    /// Dead letters that died before this are deleted.
    pub dead_before_ms: u64,
    /// Idempotency records created before this are forgotten (unless their job is still live).
    pub keys_before_ms: u64,
    /// At most this many jobs, and this many keys, per entry.
    pub max: u32,
}

/// A job as a client submits it (after the API edge filled in the node's defaults).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewJob {
    pub queue: String,
    pub kind: String,
    pub payload: Vec<u8>,
    pub priority: i32,
    pub max_attempts: u32,
    pub timeout_ms: u64,
    /// Not before this time (Unix milliseconds); 0 means now.
    pub run_at_ms: u64,
    /// A repeat of this key (while its record is retained) returns the original job.
    pub idempotency_key: Option<String>,
    /// Jobs of one queue sharing this key run one at a time, in submission order.
    pub ordering_key: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Retry backoff; zero fields mean the built-in defaults.
    pub backoff: Backoff,
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
    Succeeded {
        result: Vec<u8>,
    },
    Failed {
        error: String,
        retryable: bool,
    },
    /// The node gave the attempt back without a verdict from the handler, after the handler had
    /// stopped, for a reason the job did not cause: the node fenced itself (its lease lapsed),
    /// refused to start it without a lease, was drained past its deadline, or is stopping. The
    /// job runs again (see [`crate::limits::ABANDONS_RERUN_AT_ONCE`]); this never counts against
    /// `max_attempts` and never makes a dead letter.
    Abandoned {
        reason: String,
    },
}

/// One incarnation of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeLease {
    pub node: NodeId,
    pub incarnation: u64,
}

/// The leader's decision that a lease lapsed, with the registration or renewal its clock counted
/// from. Applied only if that is still the incarnation's newest one (else
/// [`Rejection::RenewedSince`]): a renewal committed after the leader last looked but applied
/// before this entry restarted the node's lease, and the node may be running attempts under it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expiry {
    pub lease: NodeLease,
    /// Log index of the registration or renewal the silence was measured from
    /// ([`crate::NodeEntry::renewed_index`] when the leader decided).
    pub renewed_index: u64,
}

/// A lease renewal, with how far the renewing node has applied the log.
///
/// A node whose renewals reach the leader (they are forwarded) but which receives no log (the
/// leader dials an old address, a one-way partition) would otherwise keep its lease while never
/// learning its assignments. So a renewal counts only if `applied` reaches what was committed
/// [`RENEW_APPLY_LAG_MAX_MS`](crate::limits::RENEW_APPLY_LAG_MAX_MS) before it (the index of an
/// earlier renewal or registration of the same incarnation); otherwise it is refused with
/// [`Rejection::Lagging`], the node's lease runs out and its work moves on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    pub lease: NodeLease,
    /// The renewing node's last applied log index.
    pub applied: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    pub node: NodeId,
    pub incarnation: u64,
    /// Attempts the node runs at once.
    pub slots: u32,
    /// The node's gRPC address, for display.
    pub addr: String,
    /// The node's last applied log index: a registration is refused like a renewal
    /// ([`Renewal`]) while the node is behind what its previous incarnation had renewed at.
    #[serde(default)]
    pub applied: u64,
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
    #[error("node {node} has applied the log only to index {applied}, behind index {needed} committed over {} ms ago: it does not receive the log", crate::limits::RENEW_APPLY_LAG_MAX_MS)]
    Lagging {
        node: NodeId,
        applied: u64,
        needed: u64,
    },
    #[error("node {0} has no free slot")]
    NoSlot(NodeId),
    #[error("attempt with token {got} is not the job's current attempt (current: {current:?})")]
    StaleAttempt { got: u64, current: Option<u64> },
    #[error("too many live jobs ({0})")]
    Full(u64),
    #[error("batch of {got} exceeds the limit of {max}")]
    BatchTooLarge { got: usize, max: usize },
    #[error(
        "idempotency key {key:?} was used for job {job} with a different queue, kind or payload"
    )]
    IdempotencyConflict { key: String, job: JobId },
    #[error("job is already {0}")]
    Finished(String),
    #[error("queue {0:?} is paused")]
    QueuePaused(String),
    #[error("queue {queue:?} already runs {max} jobs, its concurrency limit")]
    QueueBusy { queue: String, max: u32 },
    #[error("queue {0:?} is over its rate limit")]
    RateLimited(String),
    #[error("job waits behind an earlier job with ordering key {0:?}")]
    OrderingBlocked(String),
    #[error("too many queues (limit {0})")]
    TooManyQueues(usize),
    #[error("another job of the same batch was refused, so none was created")]
    BatchRejected,
    #[error(
        "idempotency key {0:?} is used twice in one batch with a different queue, kind or payload"
    )]
    KeyConflictInBatch(String),
    #[error("schedule {0:?} already exists")]
    ScheduleExists(String),
    #[error("schedule {0:?} does not exist")]
    UnknownSchedule(String),
    #[error("too many schedules (limit {0})")]
    TooManySchedules(usize),
    #[error("schedule {0:?} is paused")]
    SchedulePaused(String),
    #[error("tick {got} of schedule {name:?} is not its next tick ({next:?})")]
    StaleTick {
        name: String,
        got: u64,
        next: Option<u64>,
    },
    #[error("node {0} was removed from the cluster")]
    Removed(NodeId),
    #[error("node {0} is draining: it takes no new attempts")]
    Draining(NodeId),
    #[error("node {node} still runs {running} attempts")]
    Busy { node: NodeId, running: u32 },
    #[error("{got} nodes are leaving already; at most {max} may leave at once")]
    TooManyLeaving { got: usize, max: usize },
    #[error("node {0} is not leaving")]
    NotLeaving(NodeId),
    #[error("a token named {0:?} exists already (revoke it first)")]
    TokenExists(String),
    #[error("another token has the same secret")]
    TokenDigestInUse,
    #[error("no token named {0:?} was issued through the API")]
    UnknownToken(String),
    #[error("too many issued tokens (limit {0}): revoke some first")]
    TooManyTokens(usize),
    #[error("node {node} incarnation {incarnation} renewed at index {renewed}, after the renewal at index {counted_from} this expiry counted from")]
    RenewedSince {
        node: NodeId,
        incarnation: u64,
        counted_from: u64,
        renewed: u64,
    },
}

/// What applying one entry returns to the proposer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Per submitted job, in order: its new id, or why it was refused.
    Submitted(Vec<Result<Submitted, Rejection>>),
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
    /// Per cancelled job: its status before the cancel, or why it was refused.
    Cancelled(Vec<(JobId, Result<JobStatus, Rejection>)>),
    /// Dead letters redriven, or why the filter was refused (then nothing changed).
    Redriven(Result<Vec<JobId>, Rejection>),
    /// Dead letters purged, or why the filter was refused (then nothing changed).
    PurgedDead(Result<Vec<JobId>, Rejection>),
    /// The queue's settings after the change.
    QueueConfigured(Result<QueueConfig, Rejection>),
    /// Jobs and idempotency records the retention pass deleted.
    Retained {
        jobs: u32,
        keys: u32,
    },
    /// A schedule was added, replaced, removed, paused or resumed.
    ScheduleChanged(Result<(), Rejection>),
    /// Per fire, in order.
    Fired(Vec<Result<Fired, Rejection>>),
    /// For entries without application data (blank and membership entries).
    Empty,
    /// The node is draining; how many attempts it runs now.
    Draining(Result<u32, Rejection>),
    /// The node's departure was recorded.
    NodeLeft(Result<(), Rejection>),
    /// Per group of a `SubmitGroups`, in order: what `Submitted` would have answered for it.
    SubmittedGroups(Vec<Vec<Result<Submitted, Rejection>>>),
    /// Per command of a `Batch`, in order; or why the batch was refused whole.
    Batch(Result<Vec<Response>, Rejection>),
    /// A token was issued or revoked, or why not (then nothing changed).
    TokenChanged(Result<(), Rejection>),
    /// The command was malformed as a whole and nothing was applied (an `Audited` whose name or
    /// command is not allowed).
    Refused(Rejection),
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
    /// A lease renewal or registration committed (the leader restarts that incarnation's expiry
    /// clock).
    Renewed(NodeLease),
    /// Stop a running attempt on `node` (a client cancelled its job).
    Cancel {
        job: JobId,
        token: u64,
        node: NodeId,
    },
    /// A job changed state (for Watch streams).
    Event(JobEvent),
    /// The issued tokens changed (every node's authorization reloads them).
    TokensChanged,
    /// A job succeeded or was cancelled: this is its final record, which the shell keeps on disk
    /// (readable by id) until [`Effect::Unarchive`]; the table keeps only a
    /// [`crate::state::FinishedJob`] of it. Seen again when apply runs again after a restart:
    /// the same record under the same id.
    Archive(Box<crate::job::Job>),
    /// Retention deleted an archived job: the shell drops its record.
    Unarchive { job: JobId },
}

/// One accepted submission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submitted {
    pub id: JobId,
    /// The idempotency key was seen before: `id` is the original job and nothing was created.
    pub existing: bool,
}

impl Submitted {
    pub fn new(id: JobId) -> Self {
        Self {
            id,
            existing: false,
        }
    }
}

/// A job's state change, as Watch streams report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    pub job: JobId,
    pub queue: String,
    pub status: JobStatus,
    /// The attempt number (0 before the first attempt).
    pub attempt: u32,
    /// The fencing token of that attempt (0 before the first attempt).
    pub token: u64,
    pub node: Option<NodeId>,
    /// The leader timestamp of the change.
    pub at_ms: u64,
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
    /// The job's idempotency key, or one derived from its id: the same for every attempt.
    pub idempotency_key: String,
}
