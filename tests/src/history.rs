//! A history of one cluster run and a checker over it, in the vocabulary of Jepsen's queue
//! checker.
//!
//! **Recording.** A [`Recorder`] collects, on one process-wide monotonic clock ([`now_us`]):
//! every submit with its outcome (ok with the job ids, failed = definitely not applied, or
//! unknown), every handler execution's start and end (job, fencing token, node) from the
//! [`RecordingHandler`] registered on every node, every fencing (the handler saw its cancellation
//! token fire), every fault the nemesis injected, and every power cut (what the node's disk had
//! made durable, what it had acknowledged, and what losing the unsynced writes dropped). After the run, the harness adds each node's
//! final job table as [`NodeFinal`].
//!
//! **Identity.** Job ids are assigned by the state machine, so a submit whose outcome is unknown
//! cannot say which ids it created. Each submit therefore names its jobs itself: the queue is
//! [`queue_of`]`(op)` and the payload carries `(op, index)` (see [`payload`]), so the final state
//! and every execution can be traced to the submit that created it.
//!
//! **Checking.** [`check`] is a pure function of a [`History`]; its unit tests feed it hand-made
//! histories, one per anomaly.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use exactly_core::{AttemptEnd, Job, JobStatus};
use exactly_handlers::{Handler, HandlerOutcome, JobContext};
use exactly_store::LostWrites;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::disk::PowerCut;

/// Microseconds on the process-wide monotonic clock.
pub type Micros = u64;

/// Microseconds since the first call in this process. Every thread (every node's runtime, the
/// test's runtime) reads the same `CLOCK_MONOTONIC`, so timestamps from different nodes compare.
pub fn now_us() -> Micros {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as Micros
}

fn ms(t: Micros) -> String {
    format!("{:.3}s", t as f64 / 1e6)
}

/// Which submit created a job, and its position in that submit's batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobKey {
    pub op: u64,
    pub index: u32,
}

const QUEUE_PREFIX: &str = "chaos-op-";

/// The queue name that marks every job of submit `op`.
pub fn queue_of(op: u64) -> String {
    format!("{QUEUE_PREFIX}{op}")
}

/// The submit named by a queue from [`queue_of`].
pub fn parse_queue(queue: &str) -> Option<u64> {
    queue.strip_prefix(QUEUE_PREFIX)?.parse().ok()
}

/// How the [`RecordingHandler`] runs one job: `first` for attempt 1, `then` for later attempts.
/// A `first` longer than the job's timeout makes attempt 1 time out (the executor cancels it:
/// a fencing event) and a later attempt succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunPlan {
    pub first: Duration,
    pub then: Duration,
}

impl RunPlan {
    /// The same run time for every attempt.
    pub fn fixed(d: Duration) -> Self {
        Self { first: d, then: d }
    }

    fn for_attempt(&self, attempt: u32) -> Duration {
        if attempt <= 1 {
            self.first
        } else {
            self.then
        }
    }
}

/// The payload of one job: its key and how the [`RecordingHandler`] runs it.
pub fn payload(key: JobKey, plan: RunPlan) -> Vec<u8> {
    format!(
        "op={};i={};first={};then={}",
        key.op,
        key.index,
        plan.first.as_millis(),
        plan.then.as_millis()
    )
    .into_bytes()
}

/// The key and run plan from a [`payload`].
pub fn parse_payload(bytes: &[u8]) -> Option<(JobKey, RunPlan)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (mut op, mut index, mut first, mut then) = (None, None, None, None);
    for part in text.split(';') {
        let (k, v) = part.split_once('=')?;
        let v: u64 = v.parse().ok()?;
        match k {
            "op" => op = Some(v),
            "i" => index = Some(u32::try_from(v).ok()?),
            "first" => first = Some(Duration::from_millis(v)),
            "then" => then = Some(Duration::from_millis(v)),
            _ => return None,
        }
    }
    Some((
        JobKey {
            op: op?,
            index: index?,
        },
        RunPlan {
            first: first?,
            then: then?,
        },
    ))
}

/// What a client learned from one submit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Acknowledged: these ids, in request order.
    Ok(Vec<u64>),
    /// Definitely not applied (the node said so: UNAVAILABLE, INVALID_ARGUMENT, ...; or the
    /// connection was refused before anything was sent).
    Failed(String),
    /// May or may not have been applied: a timeout, DEADLINE_EXCEEDED, UNKNOWN, a transport
    /// error after the request left.
    Unknown(String),
}

/// One submit operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubmitOp {
    pub op: u64,
    /// The node the client sent it to.
    pub node: u64,
    /// How many jobs it carried.
    pub jobs: u32,
    pub invoked_at: Micros,
    pub completed_at: Micros,
    pub outcome: SubmitOutcome,
}

/// How a handler execution ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecEnd {
    /// The handler returned success.
    Succeeded,
    /// The handler saw its cancellation token fire and stopped (fenced, timed out or shut down).
    Fenced,
    /// The handler's future was dropped before it returned (its node crashed).
    Dropped,
}

/// One recorded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Submit(SubmitOp),
    ExecStart {
        /// Unique per execution; its [`Event::ExecEnd`] names it.
        exec: u64,
        job: u64,
        token: u64,
        node: u64,
        key: Option<JobKey>,
        at: Micros,
    },
    ExecEnd {
        exec: u64,
        at: Micros,
        how: ExecEnd,
    },
    /// A fault injected or healed, in words.
    Nemesis {
        at: Micros,
        what: String,
    },
    /// A node's runtime stopped (SIGSTOP-like) at `at`.
    Paused {
        node: u64,
        at: Micros,
    },
    /// A paused node's runtime runs again from `at`.
    Resumed {
        node: u64,
        at: Micros,
    },
    /// A node's power was cut (a crash that loses unsynced writes). Boxed: it is large and rare.
    PowerLoss(Box<PowerLoss>),
}

/// A node whose power was cut: what its disk held at that instant, and what losing the
/// unsynced writes then removed from its data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PowerLoss {
    pub node: u64,
    pub cut: PowerCut,
    pub lost: LostWrites,
}

/// Collects events from every node and the workload. Cheap to share behind an `Arc`.
#[derive(Default)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
    next_op: AtomicU64,
    next_exec: AtomicU64,
}

impl Recorder {
    /// A new recorder; the process-wide clock starts no later than this.
    pub fn new() -> Arc<Self> {
        now_us();
        Arc::new(Self::default())
    }

    /// A fresh submit id (ids start at 1).
    pub fn next_op(&self) -> u64 {
        self.next_op.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn record(&self, event: Event) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }

    /// Records a nemesis action now.
    pub fn nemesis(&self, what: impl Into<String>) {
        self.record(Event::Nemesis {
            at: now_us(),
            what: what.into(),
        });
    }

    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn start_exec(&self, job: u64, token: u64, node: u64, key: Option<JobKey>) -> u64 {
        let exec = self.next_exec.fetch_add(1, Ordering::Relaxed) + 1;
        self.record(Event::ExecStart {
            exec,
            job,
            token,
            node,
            key,
            at: now_us(),
        });
        exec
    }
}

/// The kind under which [`RecordingHandler`] is registered.
pub const RECORD_KIND: &str = "record";

/// A handler that records its start and end in a [`Recorder`] and runs for the time its
/// [`payload`] names (so executions overlap in time with faults), or until cancelled.
pub struct RecordingHandler {
    pub recorder: Arc<Recorder>,
    /// Run time for a payload that names none.
    pub default_run: Duration,
}

/// Records the end of an execution exactly once; if the handler's future is dropped before it
/// finished (its node's runtime was dropped: a crash), records [`ExecEnd::Dropped`].
struct EndGuard {
    recorder: Arc<Recorder>,
    exec: u64,
    done: bool,
}

impl EndGuard {
    fn finish(mut self, how: ExecEnd) {
        self.done = true;
        self.recorder.record(Event::ExecEnd {
            exec: self.exec,
            at: now_us(),
            how,
        });
    }
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        if !self.done {
            self.recorder.record(Event::ExecEnd {
                exec: self.exec,
                at: now_us(),
                how: ExecEnd::Dropped,
            });
        }
    }
}

impl Handler for RecordingHandler {
    fn run(
        &self,
        ctx: JobContext,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, HandlerOutcome> {
        let parsed = parse_payload(&ctx.payload);
        let run_for = parsed.map_or(self.default_run, |(_, plan)| plan.for_attempt(ctx.attempt));
        let exec = self.recorder.start_exec(
            ctx.job_id,
            ctx.fencing_token,
            ctx.node_id,
            parsed.map(|(k, _)| k),
        );
        let guard = EndGuard {
            recorder: self.recorder.clone(),
            exec,
            done: false,
        };
        Box::pin(async move {
            tokio::select! {
                _ = tokio::time::sleep(run_for) => {
                    guard.finish(ExecEnd::Succeeded);
                    HandlerOutcome::Succeeded(Vec::new())
                }
                _ = cancel.cancelled() => {
                    guard.finish(ExecEnd::Fenced);
                    HandlerOutcome::cancelled()
                }
            }
        })
    }
}

/// How an attempt stands in a final state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptState {
    Open,
    Succeeded,
    Failed,
    /// Ended otherwise (abandoned because its node restarted, expired, ...), in words.
    Ended(String),
}

/// One attempt in a final state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinalAttempt {
    pub token: u64,
    pub node: u64,
    pub state: AttemptState,
}

/// One job in a node's final state: what the checker needs of [`Job`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FinalJob {
    pub id: u64,
    pub queue: String,
    pub status: JobStatus,
    pub attempts: Vec<FinalAttempt>,
}

impl FinalJob {
    pub fn from_job(job: &Job) -> Self {
        Self {
            id: job.id,
            queue: job.queue.clone(),
            status: job.status,
            attempts: job
                .attempts
                .iter()
                .map(|a| FinalAttempt {
                    token: a.token,
                    node: a.node,
                    state: match &a.end {
                        None => AttemptState::Open,
                        Some(AttemptEnd::Succeeded) => AttemptState::Succeeded,
                        Some(AttemptEnd::Failed { .. }) => AttemptState::Failed,
                        Some(other) => AttemptState::Ended(format!("{other:?}")),
                    },
                })
                .collect(),
        }
    }
}

/// One node's final state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFinal {
    pub node: u64,
    /// The log index the jobs were read at, if known. Replicas at the same index must hold the
    /// same jobs; replicas at different indexes may differ because one lags.
    pub applied: Option<u64>,
    pub jobs: Vec<FinalJob>,
    /// Completions its state machine refused as stale (informational).
    pub stale_completions: u64,
}

impl NodeFinal {
    /// The final state of a node's replica: every retained job, finished ones from its archive.
    pub fn from_table(node: u64, applied: Option<u64>, table: &exactly_store::JobView<'_>) -> Self {
        Self {
            node,
            applied,
            jobs: table.all_jobs().iter().map(FinalJob::from_job).collect(),
            stale_completions: table.counts().stale_completions,
        }
    }
}

/// Everything the checker looks at.
#[derive(Clone, Debug, Default)]
pub struct History {
    pub events: Vec<Event>,
    pub finals: Vec<NodeFinal>,
    /// When the last fault was healed (every node running, every link healthy).
    pub healed_at: Option<Micros>,
    /// When the harness captured the final states (everything terminal, or the bound passed).
    pub settled_at: Option<Micros>,
    /// How long after its node resumed from a pause an execution may still run. A paused node
    /// cannot fence itself: its lease may lapse and its attempt move elsewhere while it is
    /// stopped, and on waking its handler runs on until the executor sees the lapsed lease
    /// (within `LEASE_CHECK_INTERVAL`) and cancels it (then `lease.kill-grace` at most). That is
    /// outside invariant 4's assumption (a stopped process is not a slow clock) and what fencing
    /// tokens are for, so such an overlap is counted as excused, not as an anomaly, provided the
    /// stale attempt's completion is refused.
    pub resume_grace: Duration,
}

/// The anomalies the checker reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AnomalyKind {
    /// Acknowledged, but absent from the final state or failed there.
    Lost,
    /// Completed more than once, created more than once, run twice under one token, or
    /// replicas disagree about it.
    Duplicated,
    /// Executed or present in the final state but never submitted (or its submit was refused as
    /// not applied, or the execution names an attempt that was never assigned to that node).
    Unexpected,
    /// Two executions of one job overlapped in time.
    Overlapping,
    /// An accepted completion that is not the job's newest executed attempt.
    StaleAccepted,
    /// Acknowledged (or recovered) but not terminal when the history ended: liveness.
    Unfinished,
    /// A node's store told openraft that log entries (or a vote) were on disk before any
    /// durability point covered them, and a power loss then dropped them (breaks invariant 1).
    NotDurable,
}

/// What an anomaly is about: each subject counts once per kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    Job(u64),
    Op(u64),
    Node(u64),
}

/// One anomaly, with the evidence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anomaly {
    pub kind: AnomalyKind,
    pub subject: Subject,
    pub detail: String,
}

/// The checker's result: counts in Jepsen's queue vocabulary plus the evidence.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub submits_ok: usize,
    pub submits_failed: usize,
    pub submits_unknown: usize,
    /// Jobs acknowledged to clients.
    pub acknowledged: usize,
    /// Jobs of unknown-outcome submits found in the final state (not an anomaly).
    pub recovered: usize,
    pub executions: usize,
    pub fenced: usize,
    /// Executions cut short by a crash.
    pub killed: usize,
    /// Overlaps whose older execution's node was paused while the newer one started, and that
    /// ended within [`History::resume_grace`] of waking (see there): not anomalies.
    pub excused_overlaps: usize,
    /// Jobs whose handler ran to success more than once (allowed: a re-run after its node was
    /// lost, under a new token; only one completion may be accepted).
    pub reexecuted: usize,
    /// The most stale completions any replica refused.
    pub stale_rejected: u64,
    /// Attempts in the final state that ended without a report from their node: abandoned
    /// because the node restarted, or because the leader expired its lease (counted apart).
    pub abandoned: usize,
    pub expired: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub unexpected: usize,
    pub overlapping: usize,
    pub stale_accepted: usize,
    pub unfinished: usize,
    /// Nodes whose power was cut (crashes that lose unsynced writes; a cluster-wide power loss
    /// counts each node), how many of those cuts dropped log entries, and how many entries in all.
    pub power_losses: usize,
    pub power_losses_dropping: usize,
    pub entries_dropped: u64,
    pub not_durable: usize,
    /// From heal to the captured final state, if both are known.
    pub settle: Option<Duration>,
    /// Why submits failed or ended unknown: `"failed: <status>"` / `"unknown: <status>"` (the
    /// message cut at its first digit, so alike errors group) → how many.
    pub submit_errors: BTreeMap<String, usize>,
    pub anomalies: Vec<Anomaly>,
    /// The nemesis timeline, printed with anomalies as evidence.
    pub timeline: Vec<(Micros, String)>,
}

impl Report {
    /// No anomaly of any kind.
    pub fn is_clean(&self) -> bool {
        self.anomalies.is_empty()
    }

    /// One line of counts.
    pub fn summary(&self) -> String {
        format!(
            "submits ok/failed/unknown {}/{}/{}, acknowledged {}, recovered {}, executions {} \
             (fenced {}, killed {}, re-executed jobs {}), attempts abandoned {} (lease expired \
             {}), stale completions rejected {}, overlaps excused by a pause {}, power losses {} \
             ({} dropped {} log entries); lost {}, duplicated {}, unexpected {}, \
             overlapping {}, stale accepted {}, unfinished {}, not durable {}{}",
            self.submits_ok,
            self.submits_failed,
            self.submits_unknown,
            self.acknowledged,
            self.recovered,
            self.executions,
            self.fenced,
            self.killed,
            self.reexecuted,
            self.abandoned,
            self.expired,
            self.stale_rejected,
            self.excused_overlaps,
            self.power_losses,
            self.power_losses_dropping,
            self.entries_dropped,
            self.lost,
            self.duplicated,
            self.unexpected,
            self.overlapping,
            self.stale_accepted,
            self.unfinished,
            self.not_durable,
            self.settle
                .map(|d| format!("; settled {}ms after healing", d.as_millis()))
                .unwrap_or_default(),
        )
    }
}

/// Anomalies printed at most, per report.
const ANOMALIES_SHOWN_MAX: usize = 30;

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.summary())?;
        if f.alternate() {
            for (why, n) in &self.submit_errors {
                writeln!(f, "  {n:>4} × {why}")?;
            }
        }
        for a in self.anomalies.iter().take(ANOMALIES_SHOWN_MAX) {
            writeln!(f, "  {:?} {:?}: {}", a.kind, a.subject, a.detail)?;
        }
        if self.anomalies.len() > ANOMALIES_SHOWN_MAX {
            writeln!(
                f,
                "  ... and {} more",
                self.anomalies.len() - ANOMALIES_SHOWN_MAX
            )?;
        }
        if !self.anomalies.is_empty() && !self.timeline.is_empty() {
            writeln!(f, "  nemesis timeline:")?;
            for (at, what) in &self.timeline {
                writeln!(f, "    {} {what}", ms(*at))?;
            }
        }
        Ok(())
    }
}

/// One handler execution, start and end joined.
#[derive(Clone, Debug)]
struct Execution {
    exec: u64,
    job: u64,
    token: u64,
    node: u64,
    key: Option<JobKey>,
    start: Micros,
    /// `None`: no end recorded (still running when the history was taken).
    end: Option<(Micros, ExecEnd)>,
}

impl Execution {
    fn end_at(&self) -> Micros {
        self.end.map_or(Micros::MAX, |(t, _)| t)
    }

    fn describe(&self) -> String {
        let end = match self.end {
            Some((t, how)) => format!("{} ({how:?})", ms(t)),
            None => "never ended".into(),
        };
        format!(
            "token {} on node {} from {} to {end}",
            self.token,
            self.node,
            ms(self.start)
        )
    }
}

struct Findings {
    anomalies: Vec<Anomaly>,
    subjects: BTreeSet<(AnomalyKind, Subject)>,
}

impl Findings {
    fn flag(&mut self, kind: AnomalyKind, subject: Subject, detail: String) {
        self.subjects.insert((kind, subject));
        self.anomalies.push(Anomaly {
            kind,
            subject,
            detail,
        });
    }

    fn count(&self, kind: AnomalyKind) -> usize {
        self.subjects.iter().filter(|(k, _)| *k == kind).count()
    }
}

/// An error message up to its first digit (ids, addresses and durations differ between alike
/// errors), at most 100 bytes.
fn error_class(why: &str) -> String {
    let end = why
        .char_indices()
        .find(|(_, c)| c.is_ascii_digit())
        .map_or(why.len(), |(i, _)| i)
        .min(100);
    let mut end = end;
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    why[..end].trim_end().to_string()
}

fn describe_job(job: &FinalJob) -> String {
    let attempts: Vec<String> = job
        .attempts
        .iter()
        .map(|a| format!("{}@{}:{:?}", a.token, a.node, a.state))
        .collect();
    format!(
        "{:?} in queue {} with attempts [{}]",
        job.status,
        job.queue,
        attempts.join(", ")
    )
}

/// Counts a power loss and flags acknowledgements that it dropped.
fn check_power_loss(loss: &PowerLoss, report: &mut Report, found: &mut Findings) {
    report.power_losses += 1;
    if loss.lost.log_entries > 0 {
        report.power_losses_dropping += 1;
        report.entries_dropped += loss.lost.log_entries;
    }
    let durable = loss
        .cut
        .durable
        .as_ref()
        .map_or("nothing".to_string(), |(image, at)| {
            format!("{image} (durable at {})", ms(*at))
        });
    if let Some(acked) = loss.cut.acknowledged_not_durable {
        found.flag(
            AnomalyKind::NotDurable,
            Subject::Node(loss.node),
            format!(
                "node {} reported log entries up to {acked} to openraft as on disk, but when \
                 its power went off at {} the newest durable point held {durable}; lost: {}",
                loss.node,
                ms(loss.cut.at),
                loss.lost
            ),
        );
    }
    if let Some(vote) = loss.cut.vote_not_durable {
        found.flag(
            AnomalyKind::NotDurable,
            Subject::Node(loss.node),
            format!(
                "node {} returned from save_vote({vote}), but when its power went off at {} \
                 the newest durable point held {durable}",
                loss.node,
                ms(loss.cut.at)
            ),
        );
    }
}

/// Checks a history. Pure: the same history always gives the same report.
pub fn check(history: &History) -> Report {
    use AnomalyKind::*;
    let mut report = Report::default();
    let mut found = Findings {
        anomalies: Vec::new(),
        subjects: BTreeSet::new(),
    };

    // Submits, and what each acknowledged id should be.
    let mut ops: BTreeMap<u64, &SubmitOp> = BTreeMap::new();
    let mut acked: BTreeMap<u64, JobKey> = BTreeMap::new();
    // Earlier acknowledgements of an id that a later submit was acknowledged with again.
    let mut superseded: Vec<(u64, JobKey)> = Vec::new();
    let mut starts = Vec::new();
    let mut ends: BTreeMap<u64, (Micros, ExecEnd)> = BTreeMap::new();
    // Per node: (paused at, resumed at; `None`: never resumed).
    let mut pauses: BTreeMap<u64, Vec<(Micros, Option<Micros>)>> = BTreeMap::new();
    for event in &history.events {
        match event {
            Event::Submit(op) => {
                ops.insert(op.op, op);
                match &op.outcome {
                    SubmitOutcome::Ok(ids) => {
                        report.submits_ok += 1;
                        if ids.len() != op.jobs as usize {
                            found.flag(
                                Unexpected,
                                Subject::Op(op.op),
                                format!(
                                    "submit {} of {} jobs was acknowledged with {} ids",
                                    op.op,
                                    op.jobs,
                                    ids.len()
                                ),
                            );
                        }
                        for (index, id) in ids.iter().enumerate() {
                            let key = JobKey {
                                op: op.op,
                                index: index as u32,
                            };
                            if let Some(other) = acked.insert(*id, key) {
                                superseded.push((*id, other));
                                found.flag(
                                    Duplicated,
                                    Subject::Job(*id),
                                    format!(
                                        "job id {id} acknowledged twice: to submit {} and to \
                                         submit {}",
                                        other.op, op.op
                                    ),
                                );
                            }
                        }
                    }
                    SubmitOutcome::Failed(why) => {
                        report.submits_failed += 1;
                        *report
                            .submit_errors
                            .entry(format!("failed: {}", error_class(why)))
                            .or_default() += 1;
                    }
                    SubmitOutcome::Unknown(why) => {
                        report.submits_unknown += 1;
                        *report
                            .submit_errors
                            .entry(format!("unknown: {}", error_class(why)))
                            .or_default() += 1;
                    }
                }
            }
            Event::ExecStart {
                exec,
                job,
                token,
                node,
                key,
                at,
            } => starts.push(Execution {
                exec: *exec,
                job: *job,
                token: *token,
                node: *node,
                key: *key,
                start: *at,
                end: None,
            }),
            Event::ExecEnd { exec, at, how } => {
                ends.insert(*exec, (*at, *how));
            }
            Event::Nemesis { at, what } => report.timeline.push((*at, what.clone())),
            Event::Paused { node, at } => pauses.entry(*node).or_default().push((*at, None)),
            Event::Resumed { node, at } => {
                if let Some(last) = pauses.get_mut(node).and_then(|p| p.last_mut()) {
                    if last.1.is_none() {
                        last.1 = Some(*at);
                    }
                }
            }
            Event::PowerLoss(loss) => check_power_loss(loss, &mut report, &mut found),
        }
    }
    report.acknowledged = acked.len();
    let executions: Vec<Execution> = starts
        .into_iter()
        .map(|mut e| {
            e.end = ends.get(&e.exec).copied();
            e
        })
        .collect();
    report.executions = executions.len();
    report.fenced = executions
        .iter()
        .filter(|e| matches!(e.end, Some((_, ExecEnd::Fenced))))
        .count();
    report.killed = executions
        .iter()
        .filter(|e| matches!(e.end, Some((_, ExecEnd::Dropped))))
        .count();
    report.stale_rejected = history
        .finals
        .iter()
        .map(|n| n.stale_completions)
        .max()
        .unwrap_or(0);

    // The final state: every replica must hold the same record of every job.
    let mut reference: BTreeMap<u64, &FinalJob> = BTreeMap::new();
    let mut by_node: Vec<BTreeMap<u64, &FinalJob>> = Vec::new();
    for n in &history.finals {
        let map: BTreeMap<u64, &FinalJob> = n.jobs.iter().map(|j| (j.id, j)).collect();
        for (&id, &job) in &map {
            reference.entry(id).or_insert(job);
        }
        by_node.push(map);
    }
    // Replicas read at one log index that differ have diverged (a duplicate or worse);
    // replicas read at different indexes may differ only because one lags: they did not
    // converge in time, which is a liveness failure.
    let indexes: BTreeSet<Option<u64>> = history.finals.iter().map(|n| n.applied).collect();
    let same_index = indexes.len() == 1 && indexes.iter().all(Option::is_some);
    let disagreement = if same_index { Duplicated } else { Unfinished };
    for (&id, &job) in &reference {
        for (n, map) in history.finals.iter().zip(&by_node) {
            match map.get(&id) {
                Some(&theirs) if theirs == job => {}
                other => found.flag(
                    disagreement,
                    Subject::Job(id),
                    format!(
                        "replicas disagree on job {id} (applied indexes {:?}): {} here, node {} \
                         has {}",
                        history
                            .finals
                            .iter()
                            .map(|n| (n.node, n.applied))
                            .collect::<Vec<_>>(),
                        describe_job(job),
                        n.node,
                        other.map_or("nothing".to_string(), |j| describe_job(j))
                    ),
                ),
            }
        }
    }

    // Attribute every job in the final state to its submit.
    let mut recovered: BTreeSet<u64> = BTreeSet::new();
    let mut per_op: BTreeMap<u64, usize> = BTreeMap::new();
    for (&id, job) in &reference {
        let op_id = parse_queue(&job.queue);
        if let Some(op) = op_id {
            *per_op.entry(op).or_default() += 1;
        }
        // An acknowledged id holding another submit's job is checked below (the acknowledged
        // job is lost); the job it holds is attributed like any other.
        if acked.get(&id).is_some_and(|key| op_id == Some(key.op)) {
            continue;
        }
        let Some(op) = op_id.and_then(|o| ops.get(&o)) else {
            found.flag(
                Unexpected,
                Subject::Job(id),
                format!(
                    "job {id} is in the final state but no submit created it: {}",
                    describe_job(job)
                ),
            );
            continue;
        };
        match &op.outcome {
            SubmitOutcome::Ok(ids) => found.flag(
                Duplicated,
                Subject::Job(id),
                format!(
                    "submit {} was applied more than once: it was acknowledged with ids {ids:?}, \
                     and job {id} also carries its queue",
                    op.op
                ),
            ),
            SubmitOutcome::Failed(why) => found.flag(
                Unexpected,
                Subject::Job(id),
                format!(
                    "submit {} (to node {}, {}..{}) was refused as not applied ({why}), yet job \
                     {id} exists: {}",
                    op.op,
                    op.node,
                    ms(op.invoked_at),
                    ms(op.completed_at),
                    describe_job(job)
                ),
            ),
            SubmitOutcome::Unknown(_) => {
                recovered.insert(id);
            }
        }
    }
    for (&op_id, &count) in &per_op {
        if let Some(op) = ops.get(&op_id) {
            if count > op.jobs as usize {
                found.flag(
                    Duplicated,
                    Subject::Op(op_id),
                    format!(
                        "submit {op_id} carried {} jobs but {count} jobs carry its queue",
                        op.jobs
                    ),
                );
            }
        }
    }
    report.recovered = recovered.len();

    // Acknowledged jobs must have succeeded; acknowledged and recovered ones must be terminal.
    // An id that holds another submit's job lost the acknowledged one: its entry was lost and
    // the id given out again.
    for (id, key) in acked.iter().map(|(id, key)| (*id, *key)).chain(superseded) {
        match reference.get(&id) {
            None => found.flag(
                Lost,
                Subject::Job(id),
                format!(
                    "job {id} (submit {}, index {}) was acknowledged but is in no final state",
                    key.op, key.index
                ),
            ),
            Some(job) if parse_queue(&job.queue) != Some(key.op) => found.flag(
                Lost,
                Subject::Job(id),
                format!(
                    "job {id} (submit {}, index {}) was acknowledged, but id {id} now holds \
                     another job: {}",
                    key.op,
                    key.index,
                    describe_job(job)
                ),
            ),
            Some(job) if job.status == JobStatus::Dead => found.flag(
                Lost,
                Subject::Job(id),
                format!(
                    "job {id} was acknowledged but is a dead letter: {}",
                    describe_job(job)
                ),
            ),
            Some(_) => {}
        }
    }
    for &id in acked.keys().chain(recovered.iter()) {
        if let Some(job) = reference.get(&id) {
            if !job.status.is_terminal() {
                found.flag(
                    Unfinished,
                    Subject::Job(id),
                    format!(
                        "job {id} is not terminal when the history ends: {}",
                        describe_job(job)
                    ),
                );
            }
        }
    }

    // A job completes once, and only through its newest attempt.
    for (&id, job) in &reference {
        for a in &job.attempts {
            if let AttemptState::Ended(how) = &a.state {
                report.abandoned += 1;
                if how.contains("expired") {
                    report.expired += 1;
                }
            }
        }
        let succeeded: Vec<&FinalAttempt> = job
            .attempts
            .iter()
            .filter(|a| a.state == AttemptState::Succeeded)
            .collect();
        if succeeded.len() > 1 {
            found.flag(
                Duplicated,
                Subject::Job(id),
                format!(
                    "job {id} completed successfully {} times: {}",
                    succeeded.len(),
                    describe_job(job)
                ),
            );
        }
        if let Some(first) = succeeded.first() {
            if job.attempts.last().map(|a| a.token) != Some(first.token) {
                found.flag(
                    StaleAccepted,
                    Subject::Job(id),
                    format!(
                        "job {id}: the completion of token {} was accepted, but a later attempt \
                         exists: {}",
                        first.token,
                        describe_job(job)
                    ),
                );
            }
        }
        if job.status == JobStatus::Succeeded && succeeded.is_empty() {
            found.flag(
                Lost,
                Subject::Job(id),
                format!(
                    "job {id} is succeeded but no attempt succeeded: {}",
                    describe_job(job)
                ),
            );
        }
    }

    // Executions: each must belong to an assigned attempt on its node, run once, never overlap
    // another execution of its job, and never be newer than the accepted completion.
    let mut per_job: BTreeMap<u64, Vec<&Execution>> = BTreeMap::new();
    for e in &executions {
        per_job.entry(e.job).or_default().push(e);
    }
    for (&id, runs) in &mut per_job {
        runs.sort_by_key(|e| (e.start, e.exec));
        let successes = runs
            .iter()
            .filter(|e| matches!(e.end, Some((_, ExecEnd::Succeeded))))
            .count();
        if successes > 1 {
            report.reexecuted += 1;
        }
        let Some(job) = reference.get(&id) else {
            for e in runs.iter() {
                found.flag(
                    Unexpected,
                    Subject::Job(id),
                    format!(
                        "job {id} was executed ({}) but is in no final state",
                        e.describe()
                    ),
                );
            }
            continue;
        };
        let accepted = job
            .attempts
            .iter()
            .find(|a| a.state == AttemptState::Succeeded)
            .map(|a| a.token);
        let mut seen_tokens: BTreeMap<u64, &Execution> = BTreeMap::new();
        for e in runs.iter() {
            if let Some(key) = e.key {
                if parse_queue(&job.queue) != Some(key.op)
                    || acked.get(&id).is_some_and(|k| *k != key)
                {
                    found.flag(
                        Unexpected,
                        Subject::Job(id),
                        format!(
                            "job {id} executed with the payload of submit {} index {}, but it is \
                             {}",
                            key.op,
                            key.index,
                            describe_job(job)
                        ),
                    );
                }
            }
            match job.attempts.iter().find(|a| a.token == e.token) {
                None => found.flag(
                    Unexpected,
                    Subject::Job(id),
                    format!(
                        "job {id} executed an attempt that was never assigned ({}): {}",
                        e.describe(),
                        describe_job(job)
                    ),
                ),
                Some(a) if a.node != e.node => found.flag(
                    Unexpected,
                    Subject::Job(id),
                    format!(
                        "job {id}: token {} was assigned to node {} but executed on node {} ({})",
                        e.token,
                        a.node,
                        e.node,
                        e.describe()
                    ),
                ),
                Some(_) => {}
            }
            if let Some(first) = seen_tokens.insert(e.token, e) {
                found.flag(
                    Duplicated,
                    Subject::Job(id),
                    format!(
                        "job {id}: one attempt executed twice: {} and {}",
                        first.describe(),
                        e.describe()
                    ),
                );
            }
            if let Some(token) = accepted {
                if e.token > token {
                    found.flag(
                        StaleAccepted,
                        Subject::Job(id),
                        format!(
                            "job {id}: the completion of token {token} was accepted, but a newer \
                             attempt executed ({})",
                            e.describe()
                        ),
                    );
                }
            }
        }
        let grace = history.resume_grace.as_micros() as Micros;
        for (i, a) in runs.iter().enumerate() {
            for b in &runs[i + 1..] {
                // Sorted by start: `b` starts no earlier than `a`.
                if b.start < a.end_at() {
                    let (old, new) = if a.token <= b.token { (a, b) } else { (b, a) };
                    let excused = old.token < new.token
                        && pauses.get(&old.node).is_some_and(|ps| {
                            ps.iter().any(|&(from, to)| {
                                from < new.start
                                    && to.is_some_and(|to| old.end_at() <= to.saturating_add(grace))
                            })
                        });
                    if excused {
                        report.excused_overlaps += 1;
                        continue;
                    }
                    found.flag(
                        Overlapping,
                        Subject::Job(id),
                        format!(
                            "job {id}: two executions overlap: {} and {}",
                            a.describe(),
                            b.describe()
                        ),
                    );
                }
            }
        }
    }

    report.lost = found.count(Lost);
    report.duplicated = found.count(Duplicated);
    report.unexpected = found.count(Unexpected);
    report.overlapping = found.count(Overlapping);
    report.stale_accepted = found.count(StaleAccepted);
    report.unfinished = found.count(Unfinished);
    report.not_durable = found.count(NotDurable);
    report.settle = match (history.healed_at, history.settled_at) {
        (Some(h), Some(s)) if s >= h => Some(Duration::from_micros(s - h)),
        _ => None,
    };
    report.anomalies = found.anomalies;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_submit(op: u64, ids: &[u64]) -> Event {
        Event::Submit(SubmitOp {
            op,
            node: 1,
            jobs: ids.len() as u32,
            invoked_at: op * 1000,
            completed_at: op * 1000 + 500,
            outcome: SubmitOutcome::Ok(ids.to_vec()),
        })
    }

    fn submit(op: u64, jobs: u32, outcome: SubmitOutcome) -> Event {
        Event::Submit(SubmitOp {
            op,
            node: 2,
            jobs,
            invoked_at: op * 1000,
            completed_at: op * 1000 + 500,
            outcome,
        })
    }

    fn attempt(token: u64, node: u64, state: AttemptState) -> FinalAttempt {
        FinalAttempt { token, node, state }
    }

    fn job(id: u64, op: u64, status: JobStatus, attempts: Vec<FinalAttempt>) -> FinalJob {
        FinalJob {
            id,
            queue: queue_of(op),
            status,
            attempts,
        }
    }

    fn succeeded(id: u64, op: u64, token: u64, node: u64) -> FinalJob {
        job(
            id,
            op,
            JobStatus::Succeeded,
            vec![attempt(token, node, AttemptState::Succeeded)],
        )
    }

    /// Start and end events of one execution.
    #[allow(clippy::too_many_arguments)]
    fn run(
        exec: u64,
        id: u64,
        key: JobKey,
        token: u64,
        node: u64,
        start: Micros,
        end: Micros,
        how: ExecEnd,
    ) -> [Event; 2] {
        [
            Event::ExecStart {
                exec,
                job: id,
                token,
                node,
                key: Some(key),
                at: start,
            },
            Event::ExecEnd { exec, at: end, how },
        ]
    }

    fn key(op: u64, index: u32) -> JobKey {
        JobKey { op, index }
    }

    /// Every node holds the same `jobs`.
    fn finals(nodes: &[u64], jobs: Vec<FinalJob>) -> Vec<NodeFinal> {
        nodes
            .iter()
            .map(|&node| NodeFinal {
                node,
                applied: Some(100),
                jobs: jobs.clone(),
                stale_completions: 0,
            })
            .collect()
    }

    /// Two jobs acknowledged, each executed once and succeeded on every replica.
    fn clean_history() -> History {
        let mut events = vec![ok_submit(1, &[10, 11])];
        events.extend(run(
            1,
            10,
            key(1, 0),
            100,
            1,
            5_000,
            6_000,
            ExecEnd::Succeeded,
        ));
        events.extend(run(
            2,
            11,
            key(1, 1),
            100,
            2,
            5_100,
            6_100,
            ExecEnd::Succeeded,
        ));
        History {
            events,
            finals: finals(
                &[1, 2, 3],
                vec![succeeded(10, 1, 100, 1), succeeded(11, 1, 100, 2)],
            ),
            healed_at: Some(7_000),
            settled_at: Some(9_000),
            resume_grace: Duration::ZERO,
        }
    }

    fn only(report: &Report, kind: AnomalyKind) -> usize {
        assert!(
            report.anomalies.iter().all(|a| a.kind == kind),
            "expected only {kind:?}: {report}"
        );
        report.anomalies.len()
    }

    /// A clean history has no anomalies and counts what happened.
    #[test]
    fn clean_history_is_clean() {
        let report = check(&clean_history());
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.submits_ok, 1);
        assert_eq!(report.acknowledged, 2);
        assert_eq!(report.executions, 2);
        assert_eq!(report.settle, Some(Duration::from_millis(2)));
    }

    /// A job re-run after its node crashed, under a newer token, with one accepted completion and
    /// no overlap, is clean (re-execution is reported, not an anomaly).
    #[test]
    fn rerun_after_crash_is_clean() {
        let mut h = clean_history();
        h.events.extend(run(
            3,
            12,
            key(2, 0),
            200,
            1,
            10_000,
            11_000,
            ExecEnd::Dropped,
        ));
        h.events.extend(run(
            4,
            12,
            key(2, 0),
            300,
            2,
            12_000,
            13_000,
            ExecEnd::Succeeded,
        ));
        h.events.push(ok_submit(2, &[12]));
        let j = job(
            12,
            2,
            JobStatus::Succeeded,
            vec![
                attempt(200, 1, AttemptState::Ended("Abandoned".into())),
                attempt(300, 2, AttemptState::Succeeded),
            ],
        );
        for n in &mut h.finals {
            n.jobs.push(j.clone());
        }
        let report = check(&h);
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.killed, 1);
    }

    /// An acknowledged job missing from the final state, or failed there, is lost.
    #[test]
    fn lost_is_detected() {
        let mut h = clean_history();
        for n in &mut h.finals {
            n.jobs.retain(|j| j.id != 11);
        }
        h.events
            .retain(|e| !matches!(e, Event::ExecStart { job: 11, .. }));
        let report = check(&h);
        assert_eq!(report.lost, 1, "{report}");
        assert_eq!(only(&report, AnomalyKind::Lost), 1);

        let mut h = clean_history();
        for n in &mut h.finals {
            n.jobs[1] = job(
                11,
                1,
                JobStatus::Dead,
                vec![attempt(100, 2, AttemptState::Failed)],
            );
        }
        h.events
            .retain(|e| !matches!(e, Event::ExecStart { job: 11, .. }));
        let report = check(&h);
        assert_eq!(report.lost, 1, "{report}");
    }

    /// A power cut is counted with what it dropped; one that finds acknowledged log entries or
    /// a returned vote that no durable point covered is a durability anomaly, one that finds
    /// only unacknowledged entries to drop is not.
    #[test]
    fn acknowledged_but_not_durable_is_detected() {
        use exactly_store::raft_types::log_id;
        use exactly_store::DurableImage;
        let image = DurableImage {
            seq: 4,
            log_last: Some(log_id(1, 1, 20)),
            vote: Some(openraft::Vote::new(1, 1)),
            committed: Some(log_id(1, 1, 18)),
        };
        let loss = |acked: Option<u64>, vote_term: Option<u64>| {
            Event::PowerLoss(Box::new(PowerLoss {
                node: 2,
                cut: PowerCut {
                    at: 7_000,
                    durable: Some((image.clone(), 6_900)),
                    acknowledged_not_durable: acked.map(|i| log_id(1, 1, i)),
                    vote_not_durable: vote_term.map(|t| openraft::Vote::new(t, 2)),
                    acknowledgements: 30,
                },
                lost: LostWrites {
                    log_last_found: Some(log_id(1, 1, 24)),
                    log_entries: 4,
                    ..LostWrites::default()
                },
            }))
        };
        let mut h = clean_history();
        h.events.push(loss(None, None));
        let report = check(&h);
        assert!(report.is_clean(), "{report}");
        assert_eq!((report.power_losses, report.power_losses_dropping), (1, 1));
        assert_eq!(report.entries_dropped, 4);

        let mut h = clean_history();
        h.events.push(loss(Some(23), None));
        let report = check(&h);
        assert_eq!(report.not_durable, 1, "{report}");
        assert_eq!(only(&report, AnomalyKind::NotDurable), 1);

        let mut h = clean_history();
        h.events.push(loss(None, Some(2)));
        let report = check(&h);
        assert_eq!(only(&report, AnomalyKind::NotDurable), 1, "{report}");
    }

    /// An acknowledged job whose id now holds another submit's job (its entry was lost and the
    /// id given out again) is lost, whether or not the other submit was acknowledged too.
    #[test]
    fn acknowledged_id_reused_by_another_submit_is_lost() {
        let mut h = clean_history();
        // Submit 1 was acknowledged with ids 10 and 11; id 11 now holds submit 9's job.
        h.events.push(submit(
            9,
            1,
            SubmitOutcome::Unknown("transport error".into()),
        ));
        for n in &mut h.finals {
            n.jobs[1] = succeeded(11, 9, 110, 2);
        }
        h.events
            .retain(|e| !matches!(e, Event::ExecStart { job: 11, .. }));
        let report = check(&h);
        assert_eq!(report.lost, 1, "{report}");
        assert_eq!(only(&report, AnomalyKind::Lost), 1);
        assert_eq!(report.recovered, 1, "{report}");

        let mut h = clean_history();
        h.events.push(ok_submit(9, &[11]));
        for n in &mut h.finals {
            n.jobs[1] = succeeded(11, 9, 110, 2);
        }
        h.events
            .retain(|e| !matches!(e, Event::ExecStart { job: 11, .. }));
        let report = check(&h);
        assert_eq!(report.lost, 1, "{report}");
        assert_eq!(report.duplicated, 1, "acknowledged twice: {report}");
    }

    /// Two accepted successes of one job are a duplicate.
    #[test]
    fn double_completion_is_duplicated() {
        let mut h = clean_history();
        for n in &mut h.finals {
            n.jobs[0].attempts = vec![
                attempt(100, 1, AttemptState::Succeeded),
                attempt(150, 2, AttemptState::Succeeded),
            ];
        }
        h.events.extend(run(
            3,
            10,
            key(1, 0),
            150,
            2,
            7_000,
            8_000,
            ExecEnd::Succeeded,
        ));
        let report = check(&h);
        assert_eq!(report.duplicated, 1, "{report}");
        // Also stale: the success of 100 is not from the last attempt.
        assert_eq!(report.stale_accepted, 1, "{report}");
    }

    /// Replicas at one log index that disagree about a job report it as duplicated; at
    /// different indexes, as unfinished (one lags: they did not converge).
    #[test]
    fn disagreeing_replicas_are_duplicated() {
        let mut h = clean_history();
        h.finals[2].jobs[1] = job(
            11,
            1,
            JobStatus::Running,
            vec![attempt(100, 2, AttemptState::Open)],
        );
        let report = check(&h);
        assert_eq!(report.duplicated, 1, "{report}");
        assert_eq!(only(&report, AnomalyKind::Duplicated), 1);

        h.finals[2].applied = Some(90);
        let report = check(&h);
        assert_eq!(report.unfinished, 1, "{report}");
        assert_eq!(only(&report, AnomalyKind::Unfinished), 1);
    }

    /// A submit applied twice (its queue on more jobs than it carried) is duplicated.
    #[test]
    fn submit_applied_twice_is_duplicated() {
        let mut h = clean_history();
        for n in &mut h.finals {
            n.jobs.push(succeeded(12, 1, 120, 3));
        }
        let report = check(&h);
        assert_eq!(report.duplicated, 2, "{report}");
        assert_eq!(only(&report, AnomalyKind::Duplicated), 2);
    }

    /// A job nobody submitted, an execution of a job in no final state, and a job of a submit
    /// refused as not applied are unexpected; a job of an unknown-outcome submit is recovered.
    #[test]
    fn unexpected_and_recovered() {
        let mut h = clean_history();
        for n in &mut h.finals {
            n.jobs.push(succeeded(20, 99, 200, 1));
        }
        let report = check(&h);
        assert_eq!(report.unexpected, 1, "{report}");

        let mut h = clean_history();
        h.events
            .extend(run(3, 30, key(7, 0), 300, 1, 1, 2, ExecEnd::Succeeded));
        let report = check(&h);
        assert_eq!(report.unexpected, 1, "{report}");
        assert_eq!(only(&report, AnomalyKind::Unexpected), 1);

        let mut h = clean_history();
        h.events
            .push(submit(2, 1, SubmitOutcome::Failed("UNAVAILABLE".into())));
        for n in &mut h.finals {
            n.jobs.push(succeeded(12, 2, 120, 3));
        }
        let report = check(&h);
        assert_eq!(report.unexpected, 1, "{report}");

        let mut h = clean_history();
        h.events.push(submit(
            2,
            1,
            SubmitOutcome::Unknown("DEADLINE_EXCEEDED".into()),
        ));
        h.events.extend(run(
            3,
            12,
            key(2, 0),
            120,
            3,
            9_000,
            9_500,
            ExecEnd::Succeeded,
        ));
        for n in &mut h.finals {
            n.jobs.push(succeeded(12, 2, 120, 3));
        }
        let report = check(&h);
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.recovered, 1);
        assert_eq!(report.submits_unknown, 1);
    }

    /// An execution of an attempt that was never assigned (or assigned to another node) is
    /// unexpected.
    #[test]
    fn unassigned_execution_is_unexpected() {
        let mut h = clean_history();
        h.events
            .extend(run(3, 10, key(1, 0), 100, 3, 6_500, 6_600, ExecEnd::Fenced));
        let report = check(&h);
        assert!(report.unexpected >= 1, "{report}");
        assert!(report
            .anomalies
            .iter()
            .any(|a| a.detail.contains("executed on node 3")));
    }

    /// Two executions of one job that overlap in time are overlapping.
    #[test]
    fn overlapping_is_detected() {
        let mut h = clean_history();
        for n in &mut h.finals {
            n.jobs[0] = job(
                10,
                1,
                JobStatus::Succeeded,
                vec![
                    attempt(100, 1, AttemptState::Ended("Expired".into())),
                    attempt(140, 3, AttemptState::Succeeded),
                ],
            );
        }
        // Token 100 runs 5.000..6.000 on node 1; token 140 starts on node 3 at 5.900.
        h.events.extend(run(
            3,
            10,
            key(1, 0),
            140,
            3,
            5_900,
            6_900,
            ExecEnd::Succeeded,
        ));
        let report = check(&h);
        assert_eq!(report.overlapping, 1, "{report}");
        assert_eq!(only(&report, AnomalyKind::Overlapping), 1);
        assert_eq!(report.reexecuted, 1);
    }

    /// An overlap whose older execution's node was paused when the newer one started, and that
    /// ended soon after the node woke, is excused; one that ran on long after waking is not.
    #[test]
    fn overlap_behind_a_pause_is_excused_only_briefly() {
        let mut h = clean_history();
        h.resume_grace = Duration::from_micros(500);
        for n in &mut h.finals {
            n.jobs[0] = job(
                10,
                1,
                JobStatus::Succeeded,
                vec![
                    attempt(100, 1, AttemptState::Ended("Abandoned".into())),
                    attempt(140, 3, AttemptState::Succeeded),
                ],
            );
        }
        // Token 100 runs 5.000..6.000 on node 1, paused 5.200..5.800; token 140 starts at 5.500.
        h.events
            .retain(|e| !matches!(e, Event::ExecEnd { exec: 1, .. }));
        h.events.push(Event::Paused { node: 1, at: 5_200 });
        h.events.push(Event::Resumed { node: 1, at: 5_800 });
        h.events.extend(run(
            3,
            10,
            key(1, 0),
            140,
            3,
            5_500,
            6_900,
            ExecEnd::Succeeded,
        ));
        let mut excused = h.clone();
        excused.events.push(Event::ExecEnd {
            exec: 1,
            at: 6_000,
            how: ExecEnd::Fenced,
        });
        let report = check(&excused);
        assert!(report.is_clean(), "{report}");
        assert_eq!(report.excused_overlaps, 1);

        let mut late = h;
        late.events.push(Event::ExecEnd {
            exec: 1,
            at: 6_500,
            how: ExecEnd::Succeeded,
        });
        let report = check(&late);
        assert_eq!(report.overlapping, 1, "{report}");
    }

    /// An execution that never ended overlaps any later execution of its job.
    #[test]
    fn unended_execution_overlaps_later_ones() {
        let mut h = clean_history();
        h.events
            .retain(|e| !matches!(e, Event::ExecEnd { exec: 1, .. }));
        for n in &mut h.finals {
            n.jobs[0] = job(
                10,
                1,
                JobStatus::Succeeded,
                vec![
                    attempt(100, 1, AttemptState::Ended("Abandoned".into())),
                    attempt(140, 2, AttemptState::Succeeded),
                ],
            );
        }
        h.events.extend(run(
            3,
            10,
            key(1, 0),
            140,
            2,
            60_000,
            61_000,
            ExecEnd::Succeeded,
        ));
        let report = check(&h);
        assert_eq!(report.overlapping, 1, "{report}");
    }

    /// A success accepted from an older token while a newer attempt executed is stale accepted.
    #[test]
    fn stale_accepted_is_detected() {
        let mut h = clean_history();
        for n in &mut h.finals {
            n.jobs[0] = job(
                10,
                1,
                JobStatus::Succeeded,
                vec![attempt(100, 1, AttemptState::Succeeded)],
            );
        }
        // Token 180 ran after token 100's success was accepted, but the state never shows it:
        // it is stale accepted (and unexpected: never assigned).
        h.events.extend(run(
            3,
            10,
            key(1, 0),
            180,
            2,
            7_000,
            8_000,
            ExecEnd::Succeeded,
        ));
        let report = check(&h);
        assert_eq!(report.stale_accepted, 1, "{report}");

        let mut h = clean_history();
        for n in &mut h.finals {
            n.jobs[0] = job(
                10,
                1,
                JobStatus::Succeeded,
                vec![
                    attempt(100, 1, AttemptState::Succeeded),
                    attempt(180, 2, AttemptState::Ended("Abandoned".into())),
                ],
            );
        }
        let report = check(&h);
        assert_eq!(report.stale_accepted, 1, "{report}");
        assert_eq!(only(&report, AnomalyKind::StaleAccepted), 1);
    }

    /// An acknowledged job still pending or running at the end is unfinished (liveness).
    #[test]
    fn unfinished_is_detected() {
        let mut h = clean_history();
        for n in &mut h.finals {
            n.jobs[1] = job(
                11,
                1,
                JobStatus::Running,
                vec![attempt(100, 2, AttemptState::Open)],
            );
        }
        h.events
            .retain(|e| !matches!(e, Event::ExecEnd { exec: 2, .. }));
        let report = check(&h);
        assert_eq!(report.unfinished, 1, "{report}");
        assert_eq!(only(&report, AnomalyKind::Unfinished), 1);
    }

    /// One attempt executed twice (same token) is duplicated even without overlap.
    #[test]
    fn attempt_executed_twice_is_duplicated() {
        let mut h = clean_history();
        h.events.extend(run(
            3,
            10,
            key(1, 0),
            100,
            1,
            6_500,
            6_700,
            ExecEnd::Succeeded,
        ));
        let report = check(&h);
        assert_eq!(report.duplicated, 1, "{report}");
        assert_eq!(only(&report, AnomalyKind::Duplicated), 1);
    }

    /// Payloads and queue names round-trip.
    #[test]
    fn keys_round_trip() {
        let k = key(42, 7);
        let plan = RunPlan {
            first: Duration::from_millis(900),
            then: Duration::from_millis(20),
        };
        assert_eq!(parse_payload(&payload(k, plan)), Some((k, plan)));
        assert_eq!(plan.for_attempt(1), Duration::from_millis(900));
        assert_eq!(plan.for_attempt(2), Duration::from_millis(20));
        assert_eq!(parse_queue(&queue_of(42)), Some(42));
        assert_eq!(parse_queue("default"), None);
        assert_eq!(parse_payload(b"garbage"), None);
    }
}
