//! The job table: the replicated state machine's state and its apply function.
//!
//! The table is split by concern: `state/jobs.rs` (submit, idempotency, cancel, dead letters),
//! `state/attempts.rs` (assign and complete), `state/nodes.rs` (registrations and leases) and
//! `state/retention.rs` (purging what is past its retention). This file holds the table itself,
//! its indexes, the read API and the invariant check that ties the indexes to the records.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::command::{
    Command, DrainNode, Effect, JobEvent, LeaveReason, NewJob, Rejection, Request, Response,
};
use crate::job::{Job, JobStatus, StateCounts};
use crate::limits::{
    ASSIGN_BATCH_MAX, ASSIGN_EXCLUDED_MAX, BACKOFF_MS_MAX, BATCH_COMMANDS_MAX,
    IDEMPOTENCY_KEY_BYTES_MAX, KIND_NAME_BYTES_MAX, LABELS_MAX, LABEL_KEY_BYTES_MAX,
    LABEL_VALUE_BYTES_MAX, MAX_ATTEMPTS_MAX, NODES_LEAVING_MAX, ORDERING_KEY_BYTES_MAX,
    PAYLOAD_BYTES_CEILING, QUEUE_NAME_BYTES_MAX, RUN_AT_AHEAD_MS_MAX, TIMEOUT_MS_MAX,
};
use crate::queue::QueueConfig;
use crate::records::{layout, MemRecords, Records, Space};
use crate::schedule::Schedule;
use crate::{JobId, NodeId};

mod attempts;
pub mod audit;
mod encoding;
mod jobs;
mod nodes;
mod retention;
mod schedules;
mod tokens;

pub use audit::AuditRecord;
pub use schedules::validate_schedule;

pub use crate::retry::{backoff_ceiling_ms, retry_delay_ms};

/// A node as the state machine knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub incarnation: u64,
    pub slots: u32,
    pub addr: String,
    pub registered_at_ms: u64,
    /// Leader timestamp of the last committed lease renewal of this incarnation (display only:
    /// expiry is decided on the leader's monotonic clock, never from these wall-clock stamps).
    pub renewed_at_ms: u64,
    /// The leader expired this incarnation's lease: its attempts were abandoned and it gets no
    /// assignments and no renewals. The node must register a newer incarnation to work again.
    pub expired: bool,
    /// (log index, leader time) of this incarnation's registration and accepted renewals, oldest
    /// first, at most [`crate::limits::RENEW_MARKS_MAX`]: what a renewal must have applied
    /// (see [`crate::Renewal`]).
    #[serde(default)]
    pub renewal_marks: std::collections::VecDeque<(u64, u64)>,
    /// Log index of this incarnation's registration or newest accepted renewal. An
    /// [`crate::Expiry`] names the one its leader counted from and is refused if a later one was
    /// accepted since (the leader decided on a stale view).
    pub renewed_index: u64,
}

/// One queue's settings and scheduling indexes. A queue exists while it has live jobs or
/// non-default settings.
/// (Its pending jobs that are due and eligible are in the table's records, [`Space::Ready`].)
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub config: QueueConfig,
    /// Jobs of this queue running now, on any node.
    running: u32,
    /// Jobs of this queue that are pending or running.
    live: u64,
    /// The rate limit's GCRA state (theoretical arrival time, microseconds).
    rate_tat_us: u64,
}

impl QueueState {
    /// Jobs of this queue running now, cluster-wide.
    pub fn running(&self) -> u32 {
        self.running
    }

    /// Jobs of this queue that are pending or running.
    pub fn live(&self) -> u64 {
        self.live
    }

    /// How many more attempts this queue may start at `now_ms` (paused, concurrency and rate
    /// limits), at most `cap`.
    pub fn allowance(&self, now_ms: u64, cap: usize) -> usize {
        if self.config.paused {
            return 0;
        }
        let mut n = cap;
        if self.config.concurrency_max > 0 {
            n = n.min(self.config.concurrency_max.saturating_sub(self.running) as usize);
        }
        if let Some(rate) = &self.config.rate {
            n = n.min(rate.allowance(self.rate_tat_us, now_ms) as usize);
        }
        n
    }
}

/// What the table remembers about an idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub job: JobId,
    /// SHA-256 (first 16 bytes) of the queue, kind and payload the key was first used with.
    pub fingerprint: [u8; 16],
    pub created_at_ms: u64,
}

/// A node that is to leave the cluster (drained, removed, or stopping), in leader time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leave {
    /// When the drain was first requested.
    pub since_ms: u64,
    /// From this leader time on, the node cancels its running attempts and gives them back.
    pub deadline_ms: u64,
    pub reason: LeaveReason,
}

/// The whole replicated job state. Every field is derived only from applied commands, so two
/// replicas that applied the same log are equal (`==`), which the cluster tests check.
///
/// What grows with the number of jobs is in the records store `R` (see [`crate::records`]);
/// the other fields are bounded by limits (queues, nodes, slots, schedules, tokens, the audit
/// trail) and make up the table's [`TableHead`]. With [`MemRecords`] (a persistent `imbl` map)
/// a clone shares the records and costs O(1): the snapshot builder clones the table under the
/// read lock, which stops apply (with `BTreeMap`s, that clone of 47k and 99k jobs held the lock
/// for 65–132 ms and 155–282 ms on every node; README, "A snapshot no longer stops writes").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobTable<R = MemRecords> {
    next_job_id: JobId,
    /// The largest leader timestamp applied so far.
    now_ms: u64,
    queues: BTreeMap<String, QueueState>,
    /// Running jobs per node.
    running: BTreeMap<NodeId, BTreeSet<JobId>>,
    nodes: BTreeMap<NodeId, NodeEntry>,
    /// The records moved out of the table's own fields into the storage boundary (see
    /// [`crate::records`]): the records of pending, running and dead jobs ([`Space::Jobs`]),
    /// the idempotency keys ([`Space::Keys`]) and their age index ([`Space::KeysByAge`], for
    /// retention), the scheduling indexes of pending jobs ([`Space::Ready`] per queue,
    /// [`Space::Delayed`]), the retention indexes of finished jobs and dead letters
    /// ([`Space::Finished`], [`Space::Dead`]), and what apply keeps of a succeeded or cancelled
    /// job whose record went to the shell's archive ([`Effect::Archive`]) instead of the record
    /// ([`Space::Archived`]: not encoded with the table, a snapshot carries them next to it with
    /// the archived records, and [`JobTable::restore_finished`] puts them back). Encoded where
    /// the fields they replace were.
    records: R,
    schedules: BTreeMap<String, Schedule>,
    counts: StateCounts,
    /// Nodes asked to leave that have not left yet: no new attempts go to them.
    leaving: BTreeMap<NodeId, Leave>,
    /// Nodes taken out of the membership, with the leader time of their removal. Never shrinks:
    /// a removed node that comes back with its old data must stay out (a node that wants to
    /// rejoin starts with an empty data directory, which gives it a new id).
    removed: BTreeMap<NodeId, u64>,
    /// Operators' and administrators' writes, oldest first (see `audit.rs`).
    audit: VecDeque<AuditRecord>,
    /// Bearer tokens issued through the API, by name (see `tokens.rs`).
    tokens: BTreeMap<String, crate::access::IssuedToken>,
    /// Finished jobs and dead letters still retained, per queue, so that a queue whose jobs have
    /// all finished is still listed. Derived from the job records: not encoded in snapshots
    /// (older snapshots do not have it) but rebuilt by [`JobTable::rebuild_derived`] after
    /// decoding, and checked by [`JobTable::check_invariants`].
    retained: BTreeMap<String, Retained>,
}

/// A table's fields outside its records store: all bounded by limits, so a shell that keeps
/// the records on disk can write the head whole with each durable step and read it back at
/// start ([`JobTable::head`], [`JobTable::from_parts`]). The per-queue retained counts are
/// here too, so that a start does not count them from the records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableHead {
    pub next_job_id: JobId,
    pub now_ms: u64,
    pub queues: BTreeMap<String, QueueState>,
    pub running: BTreeMap<NodeId, BTreeSet<JobId>>,
    pub nodes: BTreeMap<NodeId, NodeEntry>,
    pub schedules: BTreeMap<String, Schedule>,
    pub counts: StateCounts,
    pub leaving: BTreeMap<NodeId, Leave>,
    pub removed: BTreeMap<NodeId, u64>,
    pub audit: VecDeque<AuditRecord>,
    pub tokens: BTreeMap<String, crate::access::IssuedToken>,
    pub retained: BTreeMap<String, Retained>,
}

/// A succeeded or cancelled job whose record left the table (see [`Effect::Archive`]): what
/// apply still needs of it (its retention, its queue's counts, and the answers to a late report
/// or a cancel), in about 40 bytes instead of the record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishedJob {
    /// When it finished (leader time): its place in the retention index.
    pub finished_at_ms: u64,
    /// `Succeeded` or `Cancelled`.
    pub status: JobStatus,
    pub queue: String,
    /// The token of the attempt a client cancelled (0: none), whose late report is answered
    /// "finished: cancelled" rather than counted as stale.
    pub cancelled_token: u64,
}

/// One retained job as [`JobTable::all_jobs_after`] lists it.
#[derive(Clone, Debug)]
pub enum Listed {
    /// Pending, running or dead: its record.
    Record(Box<Job>),
    /// Succeeded or cancelled: its record is in the shell's archive.
    Archived(JobId, FinishedJob),
}

impl Listed {
    pub fn id(&self) -> JobId {
        match self {
            Listed::Record(job) => job.id,
            Listed::Archived(id, _) => *id,
        }
    }
}

/// Merges the table's records and the archived jobs by id.
struct Merge<T, A>
where
    T: Iterator<Item = Job>,
    A: Iterator<Item = (JobId, FinishedJob)>,
{
    table: std::iter::Peekable<T>,
    archived: std::iter::Peekable<A>,
    reverse: bool,
}

impl<T, A> Iterator for Merge<T, A>
where
    T: Iterator<Item = Job>,
    A: Iterator<Item = (JobId, FinishedJob)>,
{
    type Item = Listed;

    fn next(&mut self) -> Option<Listed> {
        let take_table = match (self.table.peek(), self.archived.peek()) {
            (None, None) => return None,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(job), Some((id, _))) => (job.id < *id) != self.reverse,
        };
        if take_table {
            self.table.next().map(|job| Listed::Record(Box::new(job)))
        } else {
            self.archived.next().map(|(id, f)| Listed::Archived(id, f))
        }
    }
}

/// One queue's terminal jobs still in the table (until retention or a purge deletes them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retained {
    /// Succeeded and cancelled jobs.
    pub finished: u64,
    /// Dead letters.
    pub dead: u64,
}

impl Retained {
    fn slot(&mut self, status: JobStatus) -> Option<&mut u64> {
        match status {
            JobStatus::Succeeded | JobStatus::Cancelled => Some(&mut self.finished),
            JobStatus::Dead => Some(&mut self.dead),
            JobStatus::Pending | JobStatus::Running => None,
        }
    }

    fn is_empty(&self) -> bool {
        self.finished == 0 && self.dead == 0
    }
}

pub(crate) fn truncate_bytes(mut bytes: Vec<u8>, max: usize) -> Vec<u8> {
    bytes.truncate(max);
    bytes
}

pub(crate) fn truncate_str(s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Checks that `value` is printable ASCII (0x20-0x7E) with no space at either end: what an
/// idempotency key must be, because the `http` handler sends it as the `Idempotency-Key` header
/// (a control character cannot be in a header at all, and non-ASCII bytes are not portable in
/// one) and `exec` as an environment variable. Found from outside: a key with `\n` was accepted
/// and every http attempt of its job then failed.
pub fn check_header_value(what: &str, value: &str) -> Result<(), String> {
    if let Some((at, byte)) = value
        .bytes()
        .enumerate()
        .find(|&(_, b)| !(0x20..=0x7e).contains(&b))
    {
        return Err(format!(
            "{what} must be printable ASCII (0x20-0x7E), as it is sent as an HTTP header; byte \
             {at} is {byte:#04x}"
        ));
    }
    if value.starts_with(' ') || value.ends_with(' ') {
        return Err(format!(
            "{what} must not start or end with a space (an HTTP header value is trimmed)"
        ));
    }
    Ok(())
}

/// Checks that `value` holds no control character (Unicode category Cc: C0, DEL and C1).
pub fn check_no_control(what: &str, value: &str) -> Result<(), String> {
    match value.char_indices().find(|(_, c)| c.is_control()) {
        Some((at, c)) => Err(format!(
            "{what} must not contain control characters; byte {at} is U+{:04X}",
            u32::from(c)
        )),
        None => Ok(()),
    }
}

/// Checks a node's address as it registers or joins: 1..=[`NODE_ADDR_BYTES_MAX`] bytes of
/// printable ASCII without spaces (`host:port`, a DNS name or an IP literal). Every replica keeps
/// it and every client may be redirected to it, so it is bounded and inert.
///
/// [`NODE_ADDR_BYTES_MAX`]: crate::limits::NODE_ADDR_BYTES_MAX
pub fn validate_node_addr(addr: &str) -> Result<(), String> {
    use crate::limits::NODE_ADDR_BYTES_MAX;
    if addr.is_empty() || addr.len() > NODE_ADDR_BYTES_MAX {
        return Err(format!(
            "node address must be 1..={NODE_ADDR_BYTES_MAX} bytes, got {}",
            addr.len()
        ));
    }
    if let Some((at, byte)) = addr
        .bytes()
        .enumerate()
        .find(|&(_, b)| !(0x21..=0x7e).contains(&b))
    {
        return Err(format!(
            "node address must be printable ASCII without spaces; byte {at} is {byte:#04x}"
        ));
    }
    Ok(())
}

/// Checks that a job's `run_at_ms` lies at most [`RUN_AT_AHEAD_MS_MAX`] after `now_ms`: apply
/// checks it against the entry's leader time, the API edge against its own clock first.
pub fn validate_run_at(run_at_ms: u64, now_ms: u64) -> Result<(), String> {
    let latest = now_ms.saturating_add(RUN_AT_AHEAD_MS_MAX);
    if run_at_ms > latest {
        return Err(format!(
            "run_at {run_at_ms} ms is more than {} days after now ({now_ms} ms); the latest \
             accepted is {latest} ms",
            RUN_AT_AHEAD_MS_MAX / (24 * 60 * 60 * 1000)
        ));
    }
    Ok(())
}

/// Checks a job against the limits the state machine enforces. The API edge calls this too
/// (with its stricter, configured payload limit checked separately) so that bad input is refused
/// before it is proposed.
pub fn validate_new_job(job: &NewJob) -> Result<(), String> {
    if job.queue.is_empty() || job.queue.len() > QUEUE_NAME_BYTES_MAX {
        return Err(format!(
            "queue name must be 1..={QUEUE_NAME_BYTES_MAX} bytes, got {}",
            job.queue.len()
        ));
    }
    check_no_control("queue name", &job.queue)?;
    if job.kind.is_empty() || job.kind.len() > KIND_NAME_BYTES_MAX {
        return Err(format!(
            "kind must be 1..={KIND_NAME_BYTES_MAX} bytes, got {}",
            job.kind.len()
        ));
    }
    check_no_control("kind", &job.kind)?;
    if job.payload.len() > PAYLOAD_BYTES_CEILING {
        return Err(format!(
            "payload of {} bytes exceeds the ceiling of {PAYLOAD_BYTES_CEILING}",
            job.payload.len()
        ));
    }
    if job.max_attempts == 0 || job.max_attempts > MAX_ATTEMPTS_MAX {
        return Err(format!(
            "max_attempts must be 1..={MAX_ATTEMPTS_MAX}, got {}",
            job.max_attempts
        ));
    }
    if job.timeout_ms > TIMEOUT_MS_MAX {
        return Err(format!(
            "timeout of {} ms exceeds the limit of {TIMEOUT_MS_MAX} ms",
            job.timeout_ms
        ));
    }
    if let Some(key) = &job.idempotency_key {
        if key.is_empty() || key.len() > IDEMPOTENCY_KEY_BYTES_MAX {
            return Err(format!(
                "idempotency key must be 1..={IDEMPOTENCY_KEY_BYTES_MAX} bytes, got {}",
                key.len()
            ));
        }
        check_header_value("idempotency key", key)?;
    }
    if let Some(key) = &job.ordering_key {
        if key.is_empty() || key.len() > ORDERING_KEY_BYTES_MAX {
            return Err(format!(
                "ordering key must be 1..={ORDERING_KEY_BYTES_MAX} bytes, got {}",
                key.len()
            ));
        }
        check_no_control("ordering key", key)?;
    }
    if job.labels.len() > LABELS_MAX {
        return Err(format!(
            "{} labels exceed the limit of {LABELS_MAX}",
            job.labels.len()
        ));
    }
    for (name, value) in &job.labels {
        if name.is_empty() || name.len() > LABEL_KEY_BYTES_MAX {
            return Err(format!(
                "label name must be 1..={LABEL_KEY_BYTES_MAX} bytes, got {}",
                name.len()
            ));
        }
        check_no_control("label name", name)?;
        if value.len() > LABEL_VALUE_BYTES_MAX {
            return Err(format!(
                "label {name:?} value of {} bytes exceeds the limit of {LABEL_VALUE_BYTES_MAX}",
                value.len()
            ));
        }
        check_no_control(&format!("label {name:?} value"), value)?;
    }
    let b = job.backoff;
    if b.base_ms > BACKOFF_MS_MAX || b.max_ms > BACKOFF_MS_MAX {
        return Err(format!(
            "backoff must be at most {BACKOFF_MS_MAX} ms, got base {} max {}",
            b.base_ms, b.max_ms
        ));
    }
    if b.max_ms != 0 && b.base_ms > b.max_ms {
        return Err(format!(
            "backoff base {} ms exceeds its max {} ms",
            b.base_ms, b.max_ms
        ));
    }
    Ok(())
}

impl Default for JobTable {
    /// The empty table, the same as [`JobTable::new`]. Written by hand because a derived
    /// `Default` started job ids at 0: a store whose own state derives `Default` would then number
    /// jobs differently from one that calls `new()`, and issue the id 0 that [`crate::JobId`]
    /// promises never exists.
    fn default() -> Self {
        Self::with_records(MemRecords::default())
    }
}

impl<R: Records> JobTable<R> {
    /// An empty table over an empty records store (the records it holds are not read: a table
    /// starts from nothing, and a store with records is loaded with its table's state).
    pub fn with_records(records: R) -> Self {
        Self {
            next_job_id: 1,
            now_ms: 0,
            queues: BTreeMap::new(),
            running: BTreeMap::new(),
            nodes: BTreeMap::new(),
            records,
            retained: BTreeMap::new(),
            schedules: BTreeMap::new(),
            counts: StateCounts::default(),
            leaving: BTreeMap::new(),
            removed: BTreeMap::new(),
            audit: VecDeque::new(),
            tokens: BTreeMap::new(),
        }
    }
}

impl JobTable {
    /// An empty table whose records are kept in memory.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<R: Records> JobTable<R> {
    /// Applies one committed command. `log_index` is the entry's Raft log index: it becomes the
    /// fencing token of every attempt the entry starts, so tokens strictly increase per job.
    ///
    /// Never panics on bad input: a malformed job or a stale completion becomes a
    /// [`crate::Rejection`] in the response, and the rest of the batch is applied.
    pub fn apply(&mut self, log_index: u64, request: Request) -> (Response, Vec<Effect>) {
        self.now_ms = self.now_ms.max(request.now_ms);
        // Whatever the command, even one that applies nothing (an empty or refused batch): the
        // clock moved, so jobs it made due are ready now (found by the `apply` fuzz target).
        self.promote_due();
        let mut effects = Vec::new();
        let response = match request.command {
            Command::Batch(commands) => Response::Batch(self.apply_batch(
                log_index,
                request.entropy,
                commands,
                &mut effects,
            )),
            command => self.apply_command(log_index, request.entropy, command, &mut effects),
        };
        (response, effects)
    }

    /// A `Batch`: every command in order, as its own entry at the same index, clock and
    /// entropy; or nothing, if the batch is malformed.
    fn apply_batch(
        &mut self,
        log_index: u64,
        entropy: u64,
        commands: Vec<Command>,
        effects: &mut Vec<Effect>,
    ) -> Result<Vec<Response>, Rejection> {
        if commands.len() > BATCH_COMMANDS_MAX {
            return Err(Rejection::BatchTooLarge {
                got: commands.len(),
                max: BATCH_COMMANDS_MAX,
            });
        }
        if commands.iter().any(|c| matches!(c, Command::Batch(_))) {
            return Err(Rejection::Invalid("a batch cannot hold a batch".into()));
        }
        Ok(commands
            .into_iter()
            .map(|command| self.apply_command(log_index, entropy, command, effects))
            .collect())
    }

    /// One command (not a `Batch`) at `log_index`, after the clock was advanced.
    fn apply_command(
        &mut self,
        log_index: u64,
        entropy: u64,
        command: Command,
        effects: &mut Vec<Effect>,
    ) -> Response {
        // Due jobs were made ready by `apply`, once per entry: within an entry the clock stands.
        match command {
            Command::Submit(jobs) => Response::Submitted(self.submit(jobs, effects)),
            Command::Assign(assignments) => self.assign(log_index, assignments, effects),
            Command::Complete(completions) => self.complete(completions, entropy, effects),
            Command::Renew(renewal) => Response::Renewed(self.renew(log_index, renewal, effects)),
            Command::Expire(expiry) => Response::Expired(self.expire(expiry, entropy, effects)),
            Command::RegisterNode(registration) => Response::NodeRegistered(self.register_node(
                log_index,
                registration,
                entropy,
                effects,
            )),
            Command::Cancel(ids) => Response::Cancelled(self.cancel(ids, effects)),
            Command::Redrive(filter) => Response::Redriven(
                filter
                    .check()
                    .map_err(Rejection::Invalid)
                    .map(|()| self.redrive(&filter, effects)),
            ),
            Command::PurgeDead(filter) => Response::PurgedDead(
                filter
                    .check()
                    .map_err(Rejection::Invalid)
                    .map(|()| self.purge_dead(&filter, effects)),
            ),
            Command::ConfigureQueue { queue, patch } => {
                Response::QueueConfigured(self.configure_queue(queue, patch))
            }
            Command::Retain(retention) => self.retain(&retention, effects),
            Command::AddSchedule(spec) => Response::ScheduleChanged(self.add_schedule(spec)),
            Command::RemoveSchedule(name) => Response::ScheduleChanged(self.remove_schedule(&name)),
            Command::PauseSchedule { name, paused } => {
                Response::ScheduleChanged(self.pause_schedule(&name, paused))
            }
            Command::FireSchedules(fires) => Response::Fired(self.fire_schedules(fires, effects)),
            Command::Drain(drain) => Response::Draining(self.drain(drain)),
            Command::NodeLeft(node) => Response::NodeLeft(self.node_left(node)),
            Command::SubmitGroups(groups) => {
                Response::SubmittedGroups(self.submit_groups(groups, effects))
            }
            Command::SubmitAssign { groups, excluded } => {
                let submitted = self.submit_groups(groups, effects);
                if excluded.len() <= ASSIGN_EXCLUDED_MAX {
                    let plan =
                        crate::plan_assignments(self, self.now_ms, ASSIGN_BATCH_MAX, &excluded);
                    if !plan.is_empty() {
                        // The plan is made from this very state, so apply takes all of it.
                        self.assign(log_index, plan, effects);
                    }
                }
                Response::SubmittedGroups(submitted)
            }
            // Handled by `apply`; a nested one is refused by `apply_batch` before this.
            Command::Batch(_) => Response::Batch(Err(Rejection::Invalid(
                "a batch cannot hold a batch".into(),
            ))),
            Command::Audited(audited) => self.apply_audited(log_index, entropy, *audited, effects),
            // Applied by `apply_audited`, which knows who asked; bare, they are refused.
            command @ (Command::IssueToken(_) | Command::RevokeToken(_) | Command::Joined(_)) => {
                Response::Refused(Rejection::Invalid(format!(
                    "a {} command is applied only inside Audited",
                    audit::command_name(&command)
                )))
            }
        }
    }

    /// Moves delayed jobs whose run_at has come into their queue's `ready` set, so that `ready`
    /// holds every due eligible pending job in priority order and `delayed` only jobs not due yet.
    fn promote_due(&mut self) {
        loop {
            let Some((at, id)) = self.time_index(Space::Delayed).next() else {
                break;
            };
            if at > self.now_ms {
                break;
            }
            self.records
                .delete(Space::Delayed, &layout::time_id(at, id));
            if let Some(job) = self.job(id) {
                self.make_ready(&job);
            }
        }
    }

    /// The live jobs of an ordering line, first first (empty if none).
    fn line(&self, queue: &str, key: &str) -> VecDeque<JobId> {
        self.records
            .get(Space::Lines, &layout::line_key(queue, key))
            .map_or_else(VecDeque::new, |value| layout::decode(Space::Lines, &value))
    }

    /// Writes an ordering line back (an empty one is dropped).
    fn set_line(&mut self, queue: &str, key: &str, line: &VecDeque<JobId>) {
        let k = layout::line_key(queue, key);
        if line.is_empty() {
            self.records.delete(Space::Lines, &k);
        } else {
            self.records.put(Space::Lines, &k, &layout::encode(line));
        }
    }

    /// Every ordering line: ((queue, ordering key), its live jobs in order).
    fn lines(&self) -> impl Iterator<Item = ((String, String), VecDeque<JobId>)> + '_ {
        self.records
            .scan_from(Space::Lines, &[])
            .map(|(key, value)| {
                let line: VecDeque<JobId> = layout::decode(Space::Lines, &value);
                (layout::read_line_key(&key), line)
            })
    }

    /// Puts a pending job into its queue's ready index (if the queue is known).
    fn make_ready(&mut self, job: &Job) {
        if self.queues.contains_key(&job.queue) {
            let key = layout::ready_key(&job.queue, -(job.priority as i64), job.id);
            self.records.put(Space::Ready, &key, &[]);
        }
    }

    /// Whether a pending job may be scheduled: it has no ordering key, or is its key's first.
    fn eligible(&self, job: &Job) -> bool {
        match &job.ordering_key {
            None => true,
            Some(key) => self.line(&job.queue, key).front() == Some(&job.id),
        }
    }

    /// Puts an eligible pending job into the scheduling indexes (ready or delayed).
    fn index_pending(&mut self, job: &Job) {
        if !self.eligible(job) {
            return;
        }
        if job.run_at_ms > self.now_ms {
            let key = layout::time_id(job.run_at_ms, job.id);
            self.records.put(Space::Delayed, &key, &[]);
        } else {
            self.make_ready(job);
        }
    }

    fn unindex_pending(&mut self, job: &Job) {
        let delayed = layout::time_id(job.run_at_ms, job.id);
        self.records.delete(Space::Delayed, &delayed);
        let ready = layout::ready_key(&job.queue, -(job.priority as i64), job.id);
        self.records.delete(Space::Ready, &ready);
    }

    /// A queue's due, eligible pending jobs in the order they should start, each with its
    /// scheduling key (negated priority, id).
    pub fn ready_entries(&self, queue: &str) -> impl Iterator<Item = (i64, JobId)> + '_ {
        let prefix = layout::ready_prefix(queue);
        let skip = prefix.len();
        self.records
            .scan_from(Space::Ready, &prefix)
            .take_while(move |(key, _)| key.starts_with(&prefix))
            .map(move |(key, _)| layout::read_ready(&key[skip..]))
    }

    /// A queue's due, eligible pending jobs in the order they should start.
    pub fn queue_ready(&self, queue: &str) -> impl Iterator<Item = JobId> + '_ {
        self.ready_entries(queue).map(|(_, id)| id)
    }

    /// Moves `job` to `status`: counts, per-queue live and running counts, the retention indexes,
    /// ordering keys, payload lifetime and a Watch event, all in one place.
    fn transition(&mut self, job: &mut Job, status: JobStatus, effects: &mut Vec<Effect>) {
        let old = job.status;
        *self.counts.slot(old) -= 1;
        *self.counts.slot(status) += 1;
        job.status = status;
        job.updated_at_ms = self.now_ms;
        if let Some(q) = self.queues.get_mut(&job.queue) {
            if old == JobStatus::Running {
                q.running = q.running.saturating_sub(1);
            }
            if status == JobStatus::Running {
                q.running += 1;
            }
            if !old.is_terminal() && status.is_terminal() {
                q.live = q.live.saturating_sub(1);
            }
        }
        match status {
            JobStatus::Succeeded | JobStatus::Cancelled => {
                let key = layout::time_id(self.now_ms, job.id);
                self.records.put(Space::Finished, &key, &[]);
                effects.push(Effect::DropPayload { job: job.id });
            }
            // A dead letter keeps its payload: it may be redriven.
            JobStatus::Dead => {
                let key = layout::time_id(self.now_ms, job.id);
                self.records.put(Space::Dead, &key, &[]);
            }
            JobStatus::Pending | JobStatus::Running => {}
        }
        self.unretain(&job.queue, old);
        self.retain_terminal(&job.queue, status);
        if status.is_terminal() {
            self.release_ordering_key(job);
            self.forget_queue_if_idle(&job.queue.clone());
        }
        let attempt = job.attempts.last();
        effects.push(Effect::Event(JobEvent {
            job: job.id,
            queue: job.queue.clone(),
            status,
            attempt: attempt.map_or(0, |a| a.number),
            token: attempt.map_or(0, |a| a.token),
            node: attempt.map(|a| a.node),
            at_ms: self.now_ms,
        }));
    }

    /// Puts a record taken out for a change back: into the table, or, if it succeeded or was
    /// cancelled, out to the shell's archive ([`Effect::Archive`]) with a [`FinishedJob`] left
    /// in its place. Every record a command may have finished comes back through here.
    fn put_job(&mut self, job: Job, effects: &mut Vec<Effect>) {
        if !matches!(job.status, JobStatus::Succeeded | JobStatus::Cancelled) {
            self.insert_job(&job);
            return;
        }
        let cancelled_token = job
            .attempts
            .last()
            .filter(|a| matches!(a.end, Some(crate::job::AttemptEnd::Cancelled { .. })))
            .map_or(0, |a| a.token);
        self.records.delete(Space::Jobs, &layout::u64_key(job.id));
        let stub = FinishedJob {
            finished_at_ms: job.updated_at_ms,
            status: job.status,
            queue: job.queue.clone(),
            cancelled_token,
        };
        self.put_finished(job.id, &stub);
        effects.push(Effect::Archive(Box::new(job)));
    }

    /// Counts a job of `queue` that is now in the terminal `status` (nothing for a live one).
    fn retain_terminal(&mut self, queue: &str, status: JobStatus) {
        if status.is_terminal() {
            let retained = self.retained.entry(queue.to_string()).or_default();
            if let Some(n) = retained.slot(status) {
                *n += 1;
            }
        }
    }

    /// Uncounts a job of `queue` that leaves the terminal `status` (redriven or deleted).
    fn unretain(&mut self, queue: &str, status: JobStatus) {
        let Some(retained) = self.retained.get_mut(queue) else {
            return;
        };
        if let Some(n) = retained.slot(status) {
            *n = n.saturating_sub(1);
        }
        if retained.is_empty() {
            self.retained.remove(queue);
        }
    }

    /// Recomputes what is derived from the job records and not encoded (the per-queue counts of
    /// retained jobs). Called after a table is decoded from a snapshot.
    pub fn rebuild_derived(&mut self) {
        self.retained = self.count_retained();
    }

    fn count_retained(&self) -> BTreeMap<String, Retained> {
        let mut retained: BTreeMap<String, Retained> = BTreeMap::new();
        let terminal = self
            .jobs()
            .filter(|j| j.status.is_terminal())
            .map(|j| (j.queue, j.status))
            .chain(self.finished_jobs().map(|(_, f)| (f.queue, f.status)));
        for (queue, status) in terminal {
            if let Some(n) = retained.entry(queue).or_default().slot(status) {
                *n += 1;
            }
        }
        retained
    }

    /// Puts back a finished job a snapshot carries next to the table (see
    /// [`JobTable::archived`]). Call [`JobTable::rebuild_derived`] and
    /// [`JobTable::check_invariants`] once all are back: the table's retention index must name
    /// exactly these.
    pub fn restore_finished(
        &mut self,
        id: JobId,
        finished_at_ms: u64,
        status: JobStatus,
        queue: &str,
        cancelled_token: u64,
    ) -> Result<(), String> {
        if !matches!(status, JobStatus::Succeeded | JobStatus::Cancelled) {
            return Err(format!("archived job {id} is {}", status.as_str()));
        }
        if self.has_job(id) {
            return Err(format!("job {id} is both archived and in the table"));
        }
        if self.finished_job(id).is_some() {
            return Err(format!("archived job {id} twice"));
        }
        let stub = FinishedJob {
            finished_at_ms,
            status,
            queue: queue.to_string(),
            cancelled_token,
        };
        self.put_finished(id, &stub);
        Ok(())
    }

    /// Moves the succeeded and cancelled records a table decoded from an earlier format still
    /// holds out of it, as [`JobTable::put_job`] would have when they finished, and returns them
    /// for the shell's archive.
    pub fn archive_finished_records(&mut self) -> Vec<Job> {
        let ids: Vec<JobId> = self
            .jobs()
            .filter(|j| matches!(j.status, JobStatus::Succeeded | JobStatus::Cancelled))
            .map(|j| j.id)
            .collect();
        let mut effects = Vec::new();
        for id in ids {
            if let Some(job) = self.job(id) {
                self.put_job(job, &mut effects);
            }
        }
        effects
            .into_iter()
            .filter_map(|e| match e {
                Effect::Archive(job) => Some(*job),
                _ => None,
            })
            .collect()
    }

    /// A job with an ordering key finished for good: it leaves its key's line, and the next job
    /// of the line becomes eligible.
    fn release_ordering_key(&mut self, job: &Job) {
        let Some(key) = &job.ordering_key else {
            return;
        };
        let mut line = self.line(&job.queue, key);
        if line.is_empty() {
            return;
        }
        let was_first = line.front() == Some(&job.id);
        line.retain(|&id| id != job.id);
        let next = line.front().copied();
        self.set_line(&job.queue, key, &line);
        if was_first {
            if let Some(next) = next.and_then(|id| self.job(id)) {
                if next.status == JobStatus::Pending {
                    self.index_pending(&next);
                }
            }
        }
    }

    /// Drops a queue's state once it has no live jobs and default settings, so the queue map
    /// stays bounded by the queues in use.
    fn forget_queue_if_idle(&mut self, queue: &str) {
        if self
            .queues
            .get(queue)
            .is_some_and(|q| q.live == 0 && q.running == 0 && q.config.is_default())
        {
            self.queues.remove(queue);
        }
    }

    /// Marks a node as leaving. A later request moves the deadline (so an operator can turn a
    /// drain into an immediate removal) and never weakens the reason. Any node id that is not
    /// removed is accepted: a node that joined the membership but died before it registered must
    /// be removable too.
    fn drain(&mut self, d: DrainNode) -> Result<u32, Rejection> {
        if self.removed.contains_key(&d.node) {
            return Err(Rejection::Removed(d.node));
        }
        if !self.leaving.contains_key(&d.node) && self.leaving.len() >= NODES_LEAVING_MAX {
            return Err(Rejection::TooManyLeaving {
                got: self.leaving.len(),
                max: NODES_LEAVING_MAX,
            });
        }
        let now = self.now_ms;
        let previous = self.leaving.get(&d.node);
        let leave = Leave {
            since_ms: previous.map_or(now, |l| l.since_ms),
            deadline_ms: now.saturating_add(d.deadline_after_ms),
            reason: previous.map_or(d.reason, |l| l.reason.max(d.reason)),
        };
        self.leaving.insert(d.node, leave);
        Ok(self.running_on(d.node) as u32)
    }

    /// Records that the leader took the leaving `node` out of the Raft membership: its lease
    /// entry and drain are dropped, and a removed node's id is remembered for good. Refused while
    /// the node still runs attempts: only the node itself (by finishing or giving them back) or
    /// its lease expiry may end them, or a job could run on two nodes at once.
    fn node_left(&mut self, node: NodeId) -> Result<(), Rejection> {
        let Some(leave) = self.leaving.get(&node) else {
            return Err(if self.removed.contains_key(&node) {
                Rejection::Removed(node)
            } else {
                Rejection::NotLeaving(node)
            });
        };
        let running = self.running_on(node);
        if running > 0 {
            return Err(Rejection::Busy {
                node,
                running: running as u32,
            });
        }
        if leave.reason == LeaveReason::Removed {
            self.removed.insert(node, self.now_ms);
        }
        self.leaving.remove(&node);
        self.nodes.remove(&node);
        Ok(())
    }

    /// The drain of `node`, if it is leaving.
    pub fn leaving(&self, node: NodeId) -> Option<&Leave> {
        self.leaving.get(&node)
    }

    /// Every node that is leaving.
    pub fn leaving_nodes(&self) -> &BTreeMap<NodeId, Leave> {
        &self.leaving
    }

    /// Whether `node` is leaving and its drain deadline has passed (by the last applied leader
    /// timestamp): it must cancel and give back what it still runs.
    pub fn drain_deadline_passed(&self, node: NodeId) -> bool {
        self.leaving
            .get(&node)
            .is_some_and(|l| self.now_ms >= l.deadline_ms)
    }

    /// Nodes removed from the cluster, with the leader time of their removal.
    pub fn removed_nodes(&self) -> &BTreeMap<NodeId, u64> {
        &self.removed
    }

    pub fn is_removed(&self, node: NodeId) -> bool {
        self.removed.contains_key(&node)
    }

    // ----- read access for the scheduler, the API and tests -----

    /// A pending, running or dead job's record. A succeeded or cancelled job's record is in the
    /// shell's archive: see [`JobTable::finished_job`].
    pub fn job(&self, id: JobId) -> Option<Job> {
        self.records
            .get(Space::Jobs, &layout::u64_key(id))
            .map(|value| layout::decode(Space::Jobs, &value))
    }

    /// Whether the table holds `id`'s record (pending, running or dead), without decoding it.
    fn has_job(&self, id: JobId) -> bool {
        self.records
            .get(Space::Jobs, &layout::u64_key(id))
            .is_some()
    }

    /// Writes a pending, running or dead job's record.
    fn insert_job(&mut self, job: &Job) {
        self.records
            .put(Space::Jobs, &layout::u64_key(job.id), &layout::encode(job));
    }

    /// Takes a record out of the table for good. (A record read to be changed is read with
    /// [`JobTable::job`] and written back with [`JobTable::put_job`], which replaces it, or
    /// moves it to the archive if it finished.)
    fn take_job(&mut self, id: JobId) -> Option<Job> {
        let job = self.job(id)?;
        self.records.delete(Space::Jobs, &layout::u64_key(id));
        Some(job)
    }

    /// A copy of the table's fields outside its records (see [`TableHead`]).
    pub fn head(&self) -> TableHead {
        TableHead {
            next_job_id: self.next_job_id,
            now_ms: self.now_ms,
            queues: self.queues.clone(),
            running: self.running.clone(),
            nodes: self.nodes.clone(),
            schedules: self.schedules.clone(),
            counts: self.counts.clone(),
            leaving: self.leaving.clone(),
            removed: self.removed.clone(),
            audit: self.audit.clone(),
            tokens: self.tokens.clone(),
            retained: self.retained.clone(),
        }
    }

    /// The table whose head is `head` and whose records are in `records`, as
    /// [`JobTable::head`] and [`JobTable::records`] gave them (a node's own, written together).
    /// Not checked, since a check is a full scan of the records: parts from anywhere else go
    /// through [`JobTable::check_invariants`] before they are used.
    pub fn from_parts(head: TableHead, records: R) -> Self {
        Self {
            next_job_id: head.next_job_id,
            now_ms: head.now_ms,
            queues: head.queues,
            running: head.running,
            nodes: head.nodes,
            records,
            schedules: head.schedules,
            counts: head.counts,
            leaving: head.leaving,
            removed: head.removed,
            audit: head.audit,
            tokens: head.tokens,
            retained: head.retained,
        }
    }

    /// The records store, for the shell that keeps it (an on-disk engine's commit).
    pub fn records(&self) -> &R {
        &self.records
    }

    /// The records store, mutably: for the shell to commit an on-disk engine's writes after an
    /// apply call. Writing records through it would break the table's invariants.
    pub fn records_mut(&mut self) -> &mut R {
        &mut self.records
    }

    /// The records the table holds: pending, running and dead jobs, in id order.
    pub fn jobs(&self) -> impl Iterator<Item = Job> + '_ {
        self.jobs_from(0)
    }

    /// The records from `from` on, in id order.
    fn jobs_from(&self, from: JobId) -> impl Iterator<Item = Job> + '_ {
        self.records
            .scan_from(Space::Jobs, &layout::u64_key(from))
            .map(|(_, value)| layout::decode(Space::Jobs, &value))
    }

    /// A succeeded or cancelled job still retained, whose record is in the shell's archive.
    pub fn finished_job(&self, id: JobId) -> Option<FinishedJob> {
        self.records
            .get(Space::Archived, &layout::u64_key(id))
            .map(|value| layout::decode(Space::Archived, &value))
    }

    /// Keeps what apply needs of a finished job whose record left for the archive.
    fn put_finished(&mut self, id: JobId, f: &FinishedJob) {
        self.records
            .put(Space::Archived, &layout::u64_key(id), &layout::encode(f));
    }

    /// The finished jobs from `from` on, in id order.
    fn finished_jobs_from(&self, from: JobId) -> impl Iterator<Item = (JobId, FinishedJob)> + '_ {
        self.records
            .scan_from(Space::Archived, &layout::u64_key(from))
            .map(|(key, value)| {
                (
                    layout::read_u64(&key),
                    layout::decode(Space::Archived, &value),
                )
            })
    }

    /// The entries of a (time, job id) index (`Finished`, `Dead`), oldest first.
    fn time_index(&self, space: Space) -> impl Iterator<Item = (u64, JobId)> + '_ {
        self.records
            .scan_from(space, &[])
            .map(|(key, _)| layout::read_time_id(&key))
    }

    /// Whether a (time, job id) index holds the entry.
    fn in_time_index(&self, space: Space, at_ms: u64, id: JobId) -> bool {
        self.records
            .get(space, &layout::time_id(at_ms, id))
            .is_some()
    }

    /// The succeeded and cancelled jobs still retained, in id order.
    pub fn finished_jobs(&self) -> impl Iterator<Item = (JobId, FinishedJob)> + '_ {
        self.finished_jobs_from(0)
    }

    /// Every retained job, in id order: `Ok` a record in the table, `Err` a finished one whose
    /// record is archived.
    pub fn all_jobs_after(&self, after: JobId) -> impl Iterator<Item = Listed> + '_ {
        let from = after.saturating_add(1);
        Merge {
            table: self.jobs_from(from).peekable(),
            archived: self.finished_jobs_from(from).peekable(),
            reverse: false,
        }
    }

    /// Every retained job, highest id first (see [`JobTable::all_jobs_after`]).
    pub fn all_jobs_newest(&self) -> impl Iterator<Item = Listed> + '_ {
        Merge {
            table: self
                .records
                .scan_back(Space::Jobs)
                .map(|(_, value)| layout::decode(Space::Jobs, &value))
                .peekable(),
            archived: self
                .records
                .scan_back(Space::Archived)
                .map(|(key, value)| {
                    let f = layout::decode(Space::Archived, &value);
                    (layout::read_u64(&key), f)
                })
                .peekable(),
            reverse: true,
        }
    }

    pub fn counts(&self) -> &StateCounts {
        &self.counts
    }

    pub fn nodes(&self) -> &BTreeMap<NodeId, NodeEntry> {
        &self.nodes
    }

    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    pub fn queues(&self) -> &BTreeMap<String, QueueState> {
        &self.queues
    }

    pub fn queue(&self, name: &str) -> Option<&QueueState> {
        self.queues.get(name)
    }

    /// Finished jobs and dead letters still retained, by queue (queues with none are absent).
    pub fn retained(&self) -> &BTreeMap<String, Retained> {
        &self.retained
    }

    pub fn schedules(&self) -> &BTreeMap<String, Schedule> {
        &self.schedules
    }

    pub fn schedule(&self, name: &str) -> Option<&Schedule> {
        self.schedules.get(name)
    }

    /// When the oldest succeeded or cancelled job finished (for the leader's retention pass).
    pub fn oldest_finished_ms(&self) -> Option<u64> {
        self.time_index(Space::Finished).next().map(|(at, _)| at)
    }

    /// When the oldest dead letter died.
    pub fn oldest_dead_ms(&self) -> Option<u64> {
        self.time_index(Space::Dead).next().map(|(at, _)| at)
    }

    /// When the oldest retained idempotency key was first used.
    pub fn oldest_key_ms(&self) -> Option<u64> {
        self.records
            .scan_from(Space::KeysByAge, &[])
            .next()
            .map(|(key, _)| layout::read_u64(&key))
    }

    /// The record of an idempotency key, while it is retained.
    pub fn idempotency_key(&self, key: &str) -> Option<KeyRecord> {
        self.records
            .get(Space::Keys, key.as_bytes())
            .map(|value| layout::decode(Space::Keys, &value))
    }

    /// The retained idempotency keys by first use, oldest first: (first use, key).
    pub fn keys_by_age(&self) -> impl Iterator<Item = (u64, String)> + '_ {
        self.records
            .scan_from(Space::KeysByAge, &[])
            .map(|(key, _)| layout::read_key_age(&key))
    }

    /// Records an idempotency key and its entry in the age index.
    fn write_key(records: &mut R, key: &str, record: &KeyRecord) {
        records.put(Space::Keys, key.as_bytes(), &layout::encode(record));
        let age = layout::key_age(record.created_at_ms, key);
        records.put(Space::KeysByAge, &age, &[]);
    }

    /// Forgets an idempotency key first used at `at_ms`.
    fn forget_key(&mut self, at_ms: u64, key: &str) {
        self.records.delete(Space::Keys, key.as_bytes());
        let age = layout::key_age(at_ms, key);
        self.records.delete(Space::KeysByAge, &age);
    }

    /// Dead letters, oldest death first.
    pub fn dead_jobs(&self) -> impl Iterator<Item = Job> + '_ {
        self.time_index(Space::Dead)
            .filter_map(|(_, id)| self.job(id))
    }

    /// The jobs running on `node` now.
    pub fn jobs_running_on(&self, node: NodeId) -> impl Iterator<Item = Job> + '_ {
        self.running
            .get(&node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.job(*id))
    }

    /// How many jobs are running on `node` now.
    pub fn running_on(&self, node: NodeId) -> usize {
        self.running.get(&node).map_or(0, |s| s.len())
    }

    /// Pending jobs due now across all queues, highest priority first, then in submission order.
    /// (Allocates: for tests and inspection; the scheduler merges queues itself.)
    pub fn ready_jobs(&self) -> impl Iterator<Item = JobId> + '_ {
        let mut all: Vec<(i64, JobId)> = self
            .queues
            .keys()
            .flat_map(|name| self.ready_entries(name))
            .collect();
        all.sort_unstable();
        all.into_iter().map(|(_, id)| id)
    }

    /// Eligible pending jobs due by `now_ms` that were delayed, earliest first.
    pub fn due_delayed_jobs(&self, now_ms: u64) -> impl Iterator<Item = JobId> + '_ {
        self.time_index(Space::Delayed)
            .take_while(move |&(at, _)| at <= now_ms)
            .map(|(_, id)| id)
    }

    /// Checks that the indexes agree with the job records. A broken index is a bug in this
    /// module, never bad input; tests call this after every command.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check_audit()?;
        self.check_tokens()?;
        let mut counts = StateCounts {
            stale_completions: self.counts.stale_completions,
            ..StateCounts::default()
        };
        let mut queue_live: BTreeMap<String, u64> = BTreeMap::new();
        let mut queue_running: BTreeMap<String, u32> = BTreeMap::new();
        let mut indexed = 0;
        for job in self.jobs() {
            *counts.slot(job.status) += 1;
            if matches!(job.status, JobStatus::Succeeded | JobStatus::Cancelled) {
                return Err(format!("finished job {} was not archived", job.id));
            }
            if !job.status.is_terminal() {
                *queue_live.entry(job.queue.clone()).or_default() += 1;
                if !self.queues.contains_key(&job.queue) {
                    return Err(format!("live job {} has no queue state", job.id));
                }
            }
            if job.status == JobStatus::Running {
                *queue_running.entry(job.queue.clone()).or_default() += 1;
            }
            let ready = layout::ready_key(&job.queue, -(job.priority as i64), job.id);
            let in_ready = self.queues.contains_key(&job.queue)
                && self.records.get(Space::Ready, &ready).is_some();
            let in_delayed = self.in_time_index(Space::Delayed, job.run_at_ms, job.id);
            if job.status == JobStatus::Pending {
                indexed += usize::from(in_ready) + usize::from(in_delayed);
            }
            let should_index = job.status == JobStatus::Pending && self.eligible(&job);
            if should_index != (in_ready || in_delayed) || (in_ready && in_delayed) {
                return Err(format!("job {} pending index disagrees", job.id));
            }
            if let Some(key) = &job.ordering_key {
                let in_line = self.line(&job.queue, key).contains(&job.id);
                if in_line == job.status.is_terminal() {
                    return Err(format!("job {} ordering line disagrees", job.id));
                }
            }
            let running_on = job
                .current_attempt()
                .map(|a| a.node)
                .filter(|_| job.status == JobStatus::Running);
            for (node, set) in &self.running {
                if set.contains(&job.id) != (running_on == Some(*node)) {
                    return Err(format!("job {} running index disagrees", job.id));
                }
            }
            if job.status == JobStatus::Running && running_on.is_none() {
                return Err(format!("running job {} has no attempt", job.id));
            }
            let open = job.attempts.iter().filter(|a| a.end.is_none()).count();
            let expected_open = usize::from(job.status == JobStatus::Running);
            if open != expected_open {
                return Err(format!("job {} has {open} open attempts", job.id));
            }
            if job.attempts.windows(2).any(|w| w[0].token >= w[1].token) {
                return Err(format!("job {} tokens do not increase", job.id));
            }
            let in_finished = self.in_time_index(Space::Finished, job.updated_at_ms, job.id);
            let in_dead = self.in_time_index(Space::Dead, job.updated_at_ms, job.id);
            let finished = matches!(job.status, JobStatus::Succeeded | JobStatus::Cancelled);
            if in_finished != finished || in_dead != (job.status == JobStatus::Dead) {
                return Err(format!("job {} retention index disagrees", job.id));
            }
        }
        for ((queue, key), line) in self.lines() {
            if line.is_empty() {
                return Err(format!("the empty ordering line {queue}/{key} was kept"));
            }
            for id in line {
                let job = self.job(id);
                if job.as_ref().is_none_or(|j| j.status.is_terminal()) {
                    return Err(format!("ordering line holds finished or gone job {id}"));
                }
                if job.is_some_and(|j| j.queue != queue || j.ordering_key.as_ref() != Some(&key)) {
                    return Err(format!("job {id} is in another's ordering line"));
                }
            }
        }
        for (name, q) in &self.queues {
            let live = queue_live.get(name.as_str()).copied().unwrap_or(0);
            let running = queue_running.get(name.as_str()).copied().unwrap_or(0);
            if q.live != live || q.running != running {
                return Err(format!(
                    "queue {name} counts live {} running {} but has {live} and {running}",
                    q.live, q.running
                ));
            }
            if live == 0 && q.config.is_default() {
                return Err(format!("idle default queue {name} was kept"));
            }
        }
        let mut archived = 0;
        for (id, f) in self.finished_jobs() {
            if !matches!(f.status, JobStatus::Succeeded | JobStatus::Cancelled) {
                return Err(format!("archived job {id} is {}", f.status.as_str()));
            }
            if self.has_job(id) {
                return Err(format!("job {id} is both archived and in the table"));
            }
            if !self.in_time_index(Space::Finished, f.finished_at_ms, id) {
                return Err(format!("archived job {id} is not in the retention index"));
            }
            *counts.slot(f.status) += 1;
            archived += 1;
        }
        let finished = self.records.count(Space::Finished);
        if finished != archived {
            return Err(format!(
                "retention index holds {finished} finished jobs, the archive {archived}"
            ));
        }
        if finished + self.records.count(Space::Dead)
            != (counts.succeeded + counts.cancelled + counts.dead) as usize
        {
            return Err("retention index holds jobs that are gone".to_string());
        }
        let mut keys = 0;
        for (key, value) in self.records.scan_from(Space::Keys, &[]) {
            let record: KeyRecord = layout::decode(Space::Keys, &value);
            let key = String::from_utf8_lossy(&key);
            let age = layout::key_age(record.created_at_ms, &key);
            if self.records.get(Space::KeysByAge, &age).is_none() {
                return Err(format!("key {key} is not in the age index"));
            }
            keys += 1;
        }
        if keys != self.records.count(Space::KeysByAge) {
            return Err("key age index disagrees".to_string());
        }
        if indexed != self.records.count(Space::Ready) + self.records.count(Space::Delayed) {
            return Err("the ready or delayed index holds jobs that are not pending".to_string());
        }
        if let Some((at, id)) = self.time_index(Space::Delayed).next() {
            if at <= self.now_ms {
                return Err(format!("job {id} is due at {at} but not ready"));
            }
        }
        if counts != self.counts {
            return Err(format!("counts {:?} != {:?}", self.counts, counts));
        }
        if self.retained != self.count_retained() {
            return Err("per-queue retained counts disagree with the jobs".to_string());
        }
        for node in self.removed.keys() {
            if self.nodes.contains_key(node) || self.leaving.contains_key(node) {
                return Err(format!(
                    "removed node {node} is still registered or leaving"
                ));
            }
            if self.running_on(*node) > 0 {
                return Err(format!("removed node {node} still runs attempts"));
            }
        }
        if self.leaving.len() > NODES_LEAVING_MAX {
            return Err(format!("{} nodes leaving", self.leaving.len()));
        }
        Ok(())
    }
}
