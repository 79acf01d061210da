//! Property tests of the state machine: random command sequences (submits with idempotency and
//! ordering keys into two queues, scheduler plans, arbitrary and bogus assignments, current and
//! stale completions, cancels, redrives, queue settings (concurrency limit, rate limit, pause),
//! node restarts, clocks that sometimes go backwards) are applied at increasing log indexes to
//! two tables and to a small model. After every step we check invariants 2 (at most one current
//! attempt, strictly increasing fencing tokens), 3 (a completion is accepted only for the
//! current attempt) and 7 (a repeated idempotency key returns the original job, a conflicting
//! one is refused), that no queue runs more than its concurrency limit after a start and no
//! ordering key ever has two running jobs, that terminal jobs never change (except a dead
//! letter by a redrive), that payloads are stored once and dropped once, and that both tables
//! agree exactly (determinism). At every submit step, the leader's group commit
//! (`SubmitAssign`) is checked to equal a `SubmitGroups` plus the policy's `Assign` at one index.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use exactly_core::limits::{
    ABANDONS_RERUN_AT_ONCE, ABANDON_DELAY_MAX_MS, ASSIGN_BATCH_MAX, COMPLETE_BATCH_MAX,
    DEAD_BATCH_MAX, MAX_ATTEMPTS_MAX, NODE_SLOTS_MAX, RESULT_BYTES_MAX, SUBMIT_BATCH_JOBS_MAX,
};
use exactly_core::state::{retry_delay_ms, validate_new_job};
use exactly_core::{
    plan_assignments, Assignment, Backoff, Command, Completion, DeadFilter, Effect, Expiry, Job,
    JobId, JobStatus, JobTable, NewJob, NodeId, NodeLease, NodeRegistration, Outcome, QueueConfig,
    QueuePatch, RateLimit, Rejection, Renewal, Request, Response, StartAttempt, StateCounts,
    Submitted,
};
use proptest::prelude::*;
use proptest::sample::Index;

/// Nodes 1..=REGISTRABLE register; node 0 and REGISTRABLE + 1 never do.
const REGISTRABLE: u64 = 3;
const START_MS: u64 = 1_000_000;
/// The valid queues jobs are submitted to (an invalid empty name is generated separately).
const QUEUES: [&str; 2] = ["q", "r"];

// ----- generated operations, resolved against the model when they run -----

#[derive(Clone, Debug)]
struct JobSpec {
    priority: i32,
    max_attempts: u32,
    /// 0: due at once; otherwise run_at = the request's stamp + delay.
    delay_ms: u64,
    payload_len: usize,
    empty_queue: bool,
    /// An idempotency key from a small set, so repeats and conflicts are frequent.
    key: Option<u8>,
    /// Index into QUEUES.
    queue: usize,
    /// An ordering key from a small set, so that lines of several jobs form.
    ordering_key: Option<u8>,
}

/// Which job an operation names, chosen among the model's jobs when the step runs.
#[derive(Clone, Debug)]
enum JobPick {
    Pending(Index),
    Running(Index),
    Any(Index),
    Dead(Index),
    /// A raw id, possibly of no job at all.
    Raw(u64),
}

#[derive(Clone, Debug)]
enum IncarnationPick {
    Current,
    Raw(u64),
}

#[derive(Clone, Debug)]
enum TokenPick {
    /// The job's current attempt's token (or its last token if it has none).
    Current,
    /// One of the job's earlier tokens.
    Past(Index),
    Raw(u64),
}

#[derive(Clone, Debug)]
struct AssignSpec {
    job: JobPick,
    node: NodeId,
    incarnation: IncarnationPick,
}

#[derive(Clone, Debug)]
enum OutcomeSpec {
    Succeed { result_len: usize },
    Fail { retryable: bool },
}

#[derive(Clone, Debug)]
struct CompleteSpec {
    job: JobPick,
    token: TokenPick,
    outcome: OutcomeSpec,
}

#[derive(Clone, Debug)]
enum Op {
    Submit(Vec<JobSpec>),
    /// Ask the scheduler for a plan and propose it.
    Plan {
        batch_max: usize,
        excluded: BTreeSet<NodeId>,
    },
    Assign(Vec<AssignSpec>),
    Complete(Vec<CompleteSpec>),
    /// A client cancels jobs (any state, or no job at all).
    Cancel(Vec<JobPick>),
    Register {
        node: NodeId,
        incarnation_delta: i64,
        slots: u32,
    },
    /// A lease renewal for the node's current incarnation plus a delta (0 is the valid case).
    Renew {
        node: NodeId,
        incarnation_delta: i64,
    },
    /// A lease expiry for the node's current incarnation plus a delta, counted from its newest
    /// renewal or (`stale`) from an earlier index, as a leader that had not yet applied the
    /// newest one would.
    Expire {
        node: NodeId,
        incarnation_delta: i64,
        stale: bool,
    },
    /// Change a queue's settings (a rate period of 0 is invalid and refused).
    Configure {
        queue: usize,
        concurrency_max: Option<u32>,
        rate: Option<Option<(u32, u64)>>,
        paused: Option<bool>,
    },
    /// Redrive dead letters: the picked ids (possibly repeated, possibly not dead), or all of
    /// them if none is picked, at most `max`.
    Redrive {
        picks: Vec<JobPick>,
        max: u32,
    },
}

#[derive(Clone, Debug)]
struct Step {
    /// How far the proposing leader's clock moved since the previous stamp (may be negative).
    clock_delta_ms: i64,
    op: Op,
}

fn job_spec() -> impl Strategy<Value = JobSpec> {
    (
        -2i32..=2,
        prop_oneof![
            1 => Just(0u32),
            12 => 1u32..=3,
            1 => Just(MAX_ATTEMPTS_MAX + 1),
        ],
        prop_oneof![3 => Just(0u64), 1 => 1u64..6_000],
        0usize..4,
        proptest::bool::weighted(0.03),
        prop_oneof![3 => Just(None), 1 => (0u8..3).prop_map(Some)],
        0..QUEUES.len(),
        prop_oneof![2 => Just(None), 1 => (0u8..2).prop_map(Some)],
    )
        .prop_map(
            |(
                priority,
                max_attempts,
                delay_ms,
                payload_len,
                empty_queue,
                key,
                queue,
                ordering_key,
            )| {
                JobSpec {
                    priority,
                    max_attempts,
                    delay_ms,
                    payload_len,
                    empty_queue,
                    key,
                    queue,
                    ordering_key,
                }
            },
        )
}

fn configure_op() -> impl Strategy<Value = Op> {
    (
        0..QUEUES.len(),
        prop_oneof![2 => Just(None), 1 => Just(Some(0)), 3 => (1u32..3).prop_map(Some)],
        prop_oneof![
            4 => Just(None),
            1 => Just(Some(None)),
            2 => (1u32..4, prop_oneof![8 => 200u64..3_000, 1 => Just(0u64)])
                .prop_map(|rate| Some(Some(rate))),
        ],
        prop_oneof![3 => Just(None), 1 => any::<bool>().prop_map(Some)],
    )
        .prop_map(|(queue, concurrency_max, rate, paused)| Op::Configure {
            queue,
            concurrency_max,
            rate,
            paused,
        })
}

fn job_pick(prefer: fn(Index) -> JobPick) -> impl Strategy<Value = JobPick> {
    prop_oneof![
        8 => any::<Index>().prop_map(prefer),
        2 => any::<Index>().prop_map(JobPick::Any),
        1 => (0u64..40).prop_map(JobPick::Raw),
    ]
}

fn assign_spec() -> impl Strategy<Value = AssignSpec> {
    (
        job_pick(JobPick::Pending),
        0..=REGISTRABLE + 1,
        prop_oneof![
            8 => Just(IncarnationPick::Current),
            1 => (0u64..6).prop_map(IncarnationPick::Raw),
        ],
    )
        .prop_map(|(job, node, incarnation)| AssignSpec {
            job,
            node,
            incarnation,
        })
}

fn complete_spec() -> impl Strategy<Value = CompleteSpec> {
    (
        job_pick(JobPick::Running),
        prop_oneof![
            6 => Just(TokenPick::Current),
            2 => any::<Index>().prop_map(TokenPick::Past),
            1 => (0u64..200).prop_map(TokenPick::Raw),
        ],
        prop_oneof![
            3 => (0usize..4).prop_map(|result_len| OutcomeSpec::Succeed { result_len }),
            1 => Just(OutcomeSpec::Succeed { result_len: RESULT_BYTES_MAX + 3 }),
            4 => any::<bool>().prop_map(|retryable| OutcomeSpec::Fail { retryable }),
        ],
    )
        .prop_map(|(job, token, outcome)| CompleteSpec {
            job,
            token,
            outcome,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => proptest::collection::vec(job_spec(), 0..4).prop_map(Op::Submit),
        4 => (
            0usize..8,
            proptest::collection::btree_set(1..=REGISTRABLE, 0..2),
        )
            .prop_map(|(batch_max, excluded)| Op::Plan { batch_max, excluded }),
        2 => proptest::collection::vec(assign_spec(), 1..4).prop_map(Op::Assign),
        4 => proptest::collection::vec(complete_spec(), 1..4).prop_map(Op::Complete),
        1 => proptest::collection::vec(job_pick(JobPick::Running), 1..3).prop_map(Op::Cancel),
        2 => (
            1..=REGISTRABLE,
            prop_oneof![4 => Just(1i64), 2 => Just(0i64), 1 => Just(-1i64), 1 => Just(3i64)],
            prop_oneof![12 => 0u32..4, 1 => Just(NODE_SLOTS_MAX + 1)],
        )
            .prop_map(|(node, incarnation_delta, slots)| Op::Register {
                node,
                incarnation_delta,
                slots,
            }),
        1 => (1..=REGISTRABLE, prop_oneof![6 => Just(0i64), 1 => Just(-1i64), 1 => Just(1i64)])
            .prop_map(|(node, incarnation_delta)| Op::Renew { node, incarnation_delta }),
        1 => (
            1..=REGISTRABLE,
            prop_oneof![6 => Just(0i64), 1 => Just(-1i64), 1 => Just(1i64)],
            prop_oneof![3 => Just(false), 1 => Just(true)],
        )
            .prop_map(|(node, incarnation_delta, stale)| Op::Expire {
                node,
                incarnation_delta,
                stale,
            }),
        2 => configure_op(),
        1 => (proptest::collection::vec(job_pick(JobPick::Dead), 0..3), 0u32..3)
            .prop_map(|(picks, max)| Op::Redrive { picks, max }),
    ]
}

/// Mostly scheduler plans and node restarts, so that jobs are abandoned again and again, past
/// ABANDONS_RERUN_AT_ONCE (where their backoff starts).
fn churn_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => proptest::collection::vec(job_spec(), 0..2).prop_map(Op::Submit),
        5 => (1usize..4).prop_map(|batch_max| Op::Plan {
            batch_max,
            excluded: BTreeSet::new(),
        }),
        1 => proptest::collection::vec(complete_spec(), 1..2).prop_map(Op::Complete),
        4 => (1..=2u64, prop_oneof![6 => Just(1i64), 1 => Just(-1i64)])
            .prop_map(|(node, incarnation_delta)| Op::Register {
                node,
                incarnation_delta,
                slots: 2,
            }),
    ]
}

fn step_with(op: impl Strategy<Value = Op>) -> impl Strategy<Value = Step> {
    (prop_oneof![8 => 0i64..3_000, 2 => -2_000i64..0], op)
        .prop_map(|(clock_delta_ms, op)| Step { clock_delta_ms, op })
}

fn step() -> impl Strategy<Value = Step> {
    step_with(op())
}

// ----- the model -----

#[derive(Clone, Debug)]
struct ModelAttempt {
    token: u64,
    node: NodeId,
    incarnation: u64,
}

#[derive(Clone, Debug)]
struct ModelJob {
    queue: String,
    kind: String,
    priority: i32,
    max_attempts: u32,
    timeout_ms: u64,
    status: JobStatus,
    run_at_ms: u64,
    failures: u32,
    abandoned: u32,
    /// Abandons since the last attempt that ended otherwise (or the last redrive).
    abandoned_in_a_row: u32,
    /// Every token this job was ever started with, in order.
    tokens: Vec<u64>,
    current: Option<ModelAttempt>,
    idempotency_key: Option<String>,
    ordering_key: Option<String>,
    /// The token of the attempt a cancel stopped, if the job was cancelled while running.
    cancelled_token: Option<u64>,
    /// When the job last became a dead letter (redrive "all" takes the oldest first).
    died_at_ms: u64,
}

/// A queue's settings and rate-limit state. Kept for every queue ever named; whether the table
/// must hold the queue is derived (live jobs or non-default settings).
#[derive(Clone, Debug, Default)]
struct ModelQueue {
    config: QueueConfig,
    tat_us: u64,
}

#[derive(Clone, Copy, Debug)]
struct ModelNode {
    incarnation: u64,
    slots: u32,
    expired: bool,
    /// Log index of the registration or newest accepted renewal.
    renewed_index: u64,
}

/// What an idempotency key is bound to: (queue, kind, payload).
type Fingerprint = (String, String, Vec<u8>);

/// What the state machine should do, written as plainly as possible.
#[derive(Clone, Debug)]
struct Model {
    now_ms: u64,
    next_id: JobId,
    jobs: BTreeMap<JobId, ModelJob>,
    nodes: BTreeMap<NodeId, ModelNode>,
    stale_completions: u64,
    /// The entropy of the entry being applied.
    entropy: u64,
    /// Invariant 7: each idempotency key and the (queue, kind, payload) it was first used with.
    keys: BTreeMap<String, (JobId, Fingerprint)>,
    queues: BTreeMap<String, ModelQueue>,
    /// Live jobs per (queue, ordering key), in line order; only the first may run.
    lines: BTreeMap<(String, String), Vec<JobId>>,
}

enum End {
    Succeeded,
    Failed {
        retryable: bool,
    },
    /// `node_lost`: the node restarted or its lease expired (else it gave the attempt back).
    Abandoned {
        node_lost: bool,
    },
    Cancelled,
}

impl Model {
    fn new() -> Self {
        Self {
            now_ms: 0,
            next_id: 1,
            jobs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            stale_completions: 0,
            entropy: 0,
            keys: BTreeMap::new(),
            queues: BTreeMap::new(),
            lines: BTreeMap::new(),
        }
    }

    fn line_of(job: &ModelJob) -> Option<(String, String)> {
        job.ordering_key
            .as_ref()
            .map(|key| (job.queue.clone(), key.clone()))
    }

    /// A job may run if it has no ordering key or is the first of its line.
    fn eligible(&self, id: JobId) -> bool {
        match Self::line_of(&self.jobs[&id]) {
            None => true,
            Some(line) => self.lines.get(&line).and_then(|l| l.first()) == Some(&id),
        }
    }

    /// A job that ended for good leaves its line.
    fn leave_line(&mut self, id: JobId) {
        if let Some(line) = Self::line_of(&self.jobs[&id]) {
            let now_empty = self.lines.get_mut(&line).is_some_and(|l| {
                l.retain(|&j| j != id);
                l.is_empty()
            });
            if now_empty {
                self.lines.remove(&line);
            }
        }
    }

    fn join_line(&mut self, id: JobId) {
        if let Some(line) = Self::line_of(&self.jobs[&id]) {
            self.lines.entry(line).or_default().push(id);
        }
    }

    fn running_in(&self, queue: &str) -> u32 {
        self.jobs
            .values()
            .filter(|j| j.queue == queue && j.status == JobStatus::Running)
            .count() as u32
    }

    fn live_in(&self, queue: &str) -> u64 {
        self.jobs
            .values()
            .filter(|j| j.queue == queue && !j.status.is_terminal())
            .count() as u64
    }

    fn queue(&self, name: &str) -> ModelQueue {
        self.queues.get(name).cloned().unwrap_or_default()
    }

    /// How many starts a queue allows at `now_ms`, at most `cap` (paused, concurrency, rate).
    fn allowance(&self, name: &str, now_ms: u64, cap: usize) -> usize {
        let q = self.queue(name);
        if q.config.paused {
            return 0;
        }
        let mut n = cap;
        if q.config.concurrency_max > 0 {
            n = n.min(
                q.config
                    .concurrency_max
                    .saturating_sub(self.running_in(name)) as usize,
            );
        }
        if let Some(rate) = &q.config.rate {
            n = n.min(rate.allowance(q.tat_us, now_ms) as usize);
        }
        n
    }

    fn configure(&mut self, queue: &str, patch: &QueuePatch) -> Result<QueueConfig, Rejection> {
        let mut config = self.queue(queue).config;
        if let Some(max) = patch.concurrency_max {
            config.concurrency_max = max;
        }
        if let Some(rate) = patch.rate {
            config.rate = rate;
        }
        if let Some(paused) = patch.paused {
            config.paused = paused;
        }
        config.validate().map_err(Rejection::Invalid)?;
        let q = self.queues.entry(queue.to_string()).or_default();
        // A new rate limit starts with a full burst.
        if q.config.rate != config.rate {
            q.tat_us = 0;
        }
        q.config = config.clone();
        Ok(config)
    }

    /// Dead letters run again from the back of their line: failures and abandons reset, due now.
    fn redrive(&mut self, filter: &DeadFilter) -> Vec<JobId> {
        let max = (filter.max as usize).clamp(1, DEAD_BATCH_MAX);
        let is_dead = |id: &JobId| {
            self.jobs
                .get(id)
                .is_some_and(|j| j.status == JobStatus::Dead)
        };
        let ids: Vec<JobId> = if filter.ids.is_empty() {
            let mut dead: Vec<(u64, JobId)> = self
                .jobs
                .iter()
                .filter(|(_, j)| j.status == JobStatus::Dead)
                .map(|(&id, j)| (j.died_at_ms, id))
                .collect();
            dead.sort_unstable();
            dead.into_iter().map(|(_, id)| id).take(max).collect()
        } else {
            let mut picked: Vec<JobId> = Vec::new();
            for id in &filter.ids {
                if is_dead(id) && !picked.contains(id) && picked.len() < max {
                    picked.push(*id);
                }
            }
            picked
        };
        for &id in &ids {
            let now_ms = self.now_ms;
            let job = self.jobs.get_mut(&id).expect("dead job exists");
            job.status = JobStatus::Pending;
            job.failures = 0;
            job.abandoned = 0;
            job.abandoned_in_a_row = 0;
            job.run_at_ms = now_ms;
            self.join_line(id);
        }
        ids
    }

    fn running_on(&self, node: NodeId) -> usize {
        self.jobs
            .values()
            .filter(|j| j.current.as_ref().is_some_and(|a| a.node == node))
            .count()
    }

    fn ids_where(&self, keep: impl Fn(&ModelJob) -> bool) -> Vec<JobId> {
        self.jobs
            .iter()
            .filter(|(_, j)| keep(j))
            .map(|(&id, _)| id)
            .collect()
    }

    fn pick(&self, pick: &JobPick) -> JobId {
        let from = |ids: Vec<JobId>, index: &Index| -> Option<JobId> {
            (!ids.is_empty()).then(|| ids[index.index(ids.len())])
        };
        let all = || self.ids_where(|_| true);
        match pick {
            JobPick::Pending(i) => from(self.ids_where(|j| j.status == JobStatus::Pending), i)
                .or_else(|| from(all(), i))
                .unwrap_or(1),
            JobPick::Running(i) => from(self.ids_where(|j| j.status == JobStatus::Running), i)
                .or_else(|| from(all(), i))
                .unwrap_or(1),
            JobPick::Any(i) => from(all(), i).unwrap_or(1),
            JobPick::Dead(i) => from(self.ids_where(|j| j.status == JobStatus::Dead), i)
                .or_else(|| from(all(), i))
                .unwrap_or(1),
            JobPick::Raw(id) => *id,
        }
    }

    fn counts(&self) -> StateCounts {
        let mut counts = StateCounts {
            stale_completions: self.stale_completions,
            ..StateCounts::default()
        };
        for job in self.jobs.values() {
            match job.status {
                JobStatus::Pending => counts.pending += 1,
                JobStatus::Running => counts.running += 1,
                JobStatus::Succeeded => counts.succeeded += 1,
                JobStatus::Dead => counts.dead += 1,
                JobStatus::Cancelled => counts.cancelled += 1,
            }
        }
        counts
    }

    /// The exact response and effects applying `request` at `index` must produce.
    fn apply(&mut self, index: u64, request: &Request) -> (Response, Vec<Effect>) {
        self.now_ms = self.now_ms.max(request.now_ms);
        self.entropy = request.entropy;
        let mut effects = Vec::new();
        let response = match &request.command {
            Command::Submit(jobs) => {
                assert!(jobs.len() <= SUBMIT_BATCH_JOBS_MAX, "generator limit");
                // All or nothing: try the batch on a copy; any refusal leaves the model as it was.
                let mut trial = self.clone();
                let mut trial_effects = Vec::new();
                let results: Vec<_> = jobs
                    .iter()
                    .map(|j| trial.submit(j, &mut trial_effects))
                    .collect();
                if results.iter().any(|r| r.is_err()) {
                    let first_new = self.next_id;
                    Response::Submitted(
                        results
                            .into_iter()
                            .map(|r| match r {
                                Ok(_) => Err(Rejection::BatchRejected),
                                // A conflict with a job of this very batch, which will not exist.
                                Err(Rejection::IdempotencyConflict { key, job })
                                    if job >= first_new =>
                                {
                                    Err(Rejection::KeyConflictInBatch(key))
                                }
                                Err(why) => Err(why),
                            })
                            .collect(),
                    )
                } else {
                    *self = trial;
                    effects = trial_effects;
                    Response::Submitted(results)
                }
            }
            Command::Assign(list) => {
                assert!(list.len() <= ASSIGN_BATCH_MAX, "generator limit");
                let mut started = 0;
                let mut rejected = Vec::new();
                for a in list {
                    match self.assign(index, a, &mut effects) {
                        Ok(()) => started += 1,
                        Err(why) => rejected.push((a.job, why)),
                    }
                }
                Response::Assigned { started, rejected }
            }
            Command::Complete(list) => {
                assert!(list.len() <= COMPLETE_BATCH_MAX, "generator limit");
                let mut accepted = 0;
                let mut rejected = Vec::new();
                for c in list {
                    match self.complete(c, &mut effects) {
                        Ok(()) => accepted += 1,
                        Err(why) => rejected.push((c.job, why)),
                    }
                }
                Response::Completed { accepted, rejected }
            }
            Command::Cancel(ids) => Response::Cancelled(
                ids.iter()
                    .map(|&id| (id, self.cancel(id, &mut effects)))
                    .collect(),
            ),
            Command::RegisterNode(r) => {
                Response::NodeRegistered(self.register(index, r, &mut effects))
            }
            Command::Renew(lease) => {
                Response::Renewed(self.renew(index, &lease.lease, &mut effects))
            }
            Command::Expire(expiry) => Response::Expired(self.expire(expiry, &mut effects)),
            Command::ConfigureQueue { queue, patch } => {
                Response::QueueConfigured(self.configure(queue, patch))
            }
            Command::Redrive(filter) => Response::Redriven(
                filter
                    .check()
                    .map_err(Rejection::Invalid)
                    .map(|()| self.redrive(filter)),
            ),
            // The generator makes only valid audited commands: applied as what they wrap (the
            // trail itself is checked by `check_invariants` and the table tests).
            Command::Audited(audited) => {
                let inner = Request {
                    command: audited.command.clone(),
                    ..request.clone()
                };
                return self.apply(index, &inner);
            }
            other => unreachable!("the generator makes no {other:?}"),
        };
        (response, effects)
    }

    fn submit(&mut self, new: &NewJob, effects: &mut Vec<Effect>) -> Result<Submitted, Rejection> {
        // The validation rules themselves are pinned by the table-driven tests.
        validate_new_job(new).map_err(Rejection::Invalid)?;
        let print = (new.queue.clone(), new.kind.clone(), new.payload.clone());
        if let Some(key) = &new.idempotency_key {
            if let Some((job, first)) = self.keys.get(key) {
                return if *first == print {
                    Ok(Submitted {
                        id: *job,
                        existing: true,
                    })
                } else {
                    Err(Rejection::IdempotencyConflict {
                        key: key.clone(),
                        job: *job,
                    })
                };
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        if let Some(key) = &new.idempotency_key {
            self.keys.insert(key.clone(), (id, print));
        }
        self.jobs.insert(
            id,
            ModelJob {
                queue: new.queue.clone(),
                kind: new.kind.clone(),
                priority: new.priority,
                max_attempts: new.max_attempts,
                timeout_ms: new.timeout_ms,
                status: JobStatus::Pending,
                run_at_ms: new.run_at_ms,
                failures: 0,
                abandoned: 0,
                abandoned_in_a_row: 0,
                tokens: Vec::new(),
                current: None,
                idempotency_key: new.idempotency_key.clone(),
                ordering_key: new.ordering_key.clone(),
                cancelled_token: None,
                died_at_ms: 0,
            },
        );
        self.join_line(id);
        effects.push(Effect::StorePayload {
            job: id,
            payload: new.payload.clone(),
        });
        Ok(Submitted::new(id))
    }

    /// Pending and running jobs end as cancelled (a running one's node is told to stop it);
    /// finished ones refuse.
    fn cancel(&mut self, id: JobId, effects: &mut Vec<Effect>) -> Result<JobStatus, Rejection> {
        let job = self.jobs.get(&id).ok_or(Rejection::UnknownJob(id))?;
        let was = job.status;
        match was {
            JobStatus::Pending => {
                let job = self.jobs.get_mut(&id).expect("exists");
                job.status = JobStatus::Cancelled;
                self.leave_line(id);
                effects.push(Effect::DropPayload { job: id });
            }
            JobStatus::Running => {
                let current = job.current.as_ref().expect("running job has an attempt");
                let token = current.token;
                effects.push(Effect::Cancel {
                    job: id,
                    token,
                    node: current.node,
                });
                self.jobs.get_mut(&id).expect("exists").cancelled_token = Some(token);
                self.end(id, End::Cancelled, effects);
            }
            other => return Err(Rejection::Finished(other.as_str().to_string())),
        }
        Ok(was)
    }

    fn assign(
        &mut self,
        token: u64,
        a: &Assignment,
        effects: &mut Vec<Effect>,
    ) -> Result<(), Rejection> {
        let node = *self
            .nodes
            .get(&a.node)
            .ok_or(Rejection::UnknownNode(a.node))?;
        if node.incarnation != a.incarnation {
            return Err(Rejection::StaleIncarnation {
                node: a.node,
                got: a.incarnation,
                current: node.incarnation,
            });
        }
        if node.expired {
            return Err(Rejection::Expired {
                node: a.node,
                incarnation: a.incarnation,
            });
        }
        if self.running_on(a.node) >= node.slots as usize {
            return Err(Rejection::NoSlot(a.node));
        }
        let now_ms = self.now_ms;
        let job = self.jobs.get(&a.job).ok_or(Rejection::UnknownJob(a.job))?;
        if job.status != JobStatus::Pending {
            return Err(Rejection::NotPending(job.status.as_str().to_string()));
        }
        if job.run_at_ms > now_ms {
            return Err(Rejection::NotDue(job.run_at_ms));
        }
        if !self.eligible(a.job) {
            return Err(Rejection::OrderingBlocked(
                job.ordering_key.clone().unwrap_or_default(),
            ));
        }
        let queue = job.queue.clone();
        let q = self.queue(&queue);
        if q.config.paused {
            return Err(Rejection::QueuePaused(queue));
        }
        let max = q.config.concurrency_max;
        if max > 0 && self.running_in(&queue) >= max {
            return Err(Rejection::QueueBusy { queue, max });
        }
        if let Some(rate) = &q.config.rate {
            let tat = rate
                .take(q.tat_us, now_ms)
                .ok_or_else(|| Rejection::RateLimited(queue.clone()))?;
            self.queues.entry(queue).or_default().tat_us = tat;
        }
        let job = self.jobs.get_mut(&a.job).expect("exists");
        assert!(
            job.tokens.last().is_none_or(|&last| last < token),
            "log indexes increase in this test"
        );
        job.status = JobStatus::Running;
        job.tokens.push(token);
        job.current = Some(ModelAttempt {
            token,
            node: a.node,
            incarnation: a.incarnation,
        });
        effects.push(Effect::Start(StartAttempt {
            job: a.job,
            token,
            attempt: job.tokens.len() as u32,
            node: a.node,
            incarnation: a.incarnation,
            queue: job.queue.clone(),
            kind: job.kind.clone(),
            timeout_ms: job.timeout_ms,
            idempotency_key: job
                .idempotency_key
                .clone()
                .unwrap_or_else(|| format!("exactly-job-{}", a.job)),
        }));
        Ok(())
    }

    /// Invariant 3, stated directly: accepted if and only if the token is the current
    /// attempt's.
    fn complete(&mut self, c: &Completion, effects: &mut Vec<Effect>) -> Result<(), Rejection> {
        let job = self.jobs.get(&c.job).ok_or(Rejection::UnknownJob(c.job))?;
        let current = job.current.as_ref().map(|a| a.token);
        if current != Some(c.token) {
            // The last attempt of a cancelled job reports late by design: refused, not counted.
            if job.cancelled_token == Some(c.token) {
                return Err(Rejection::Finished("cancelled".into()));
            }
            self.stale_completions += 1;
            return Err(Rejection::StaleAttempt {
                got: c.token,
                current,
            });
        }
        let end = match &c.outcome {
            Outcome::Succeeded { .. } => End::Succeeded,
            Outcome::Failed { retryable, .. } => End::Failed {
                retryable: *retryable,
            },
            // A node giving an attempt back (drain past its deadline) is an abandon.
            Outcome::Abandoned { .. } => End::Abandoned { node_lost: false },
        };
        self.end(c.job, end, effects);
        Ok(())
    }

    fn end(&mut self, id: JobId, end: End, effects: &mut Vec<Effect>) {
        let now_ms = self.now_ms;
        let entropy = self.entropy;
        let job = self.jobs.get_mut(&id).expect("running job");
        job.current = None;
        if !matches!(end, End::Abandoned { .. }) {
            job.abandoned_in_a_row = 0;
        }
        job.status = match end {
            End::Succeeded => JobStatus::Succeeded,
            End::Failed { retryable } => {
                job.failures += 1;
                if retryable && job.failures < job.max_attempts {
                    job.run_at_ms =
                        now_ms + retry_delay_ms(job.failures, Backoff::default(), entropy, id);
                    JobStatus::Pending
                } else {
                    JobStatus::Dead
                }
            }
            End::Cancelled => JobStatus::Cancelled,
            // Never dead of it; given back: at once; its node lost: free a few times in a row.
            End::Abandoned { node_lost } => {
                job.abandoned += 1;
                job.abandoned_in_a_row += 1;
                let beyond = job
                    .abandoned_in_a_row
                    .saturating_sub(ABANDONS_RERUN_AT_ONCE);
                let delay = if beyond == 0 || !node_lost {
                    0
                } else {
                    retry_delay_ms(beyond, Backoff::default(), entropy, id)
                        .min(ABANDON_DELAY_MAX_MS)
                };
                job.run_at_ms = now_ms + delay;
                JobStatus::Pending
            }
        };
        if job.status == JobStatus::Dead {
            job.died_at_ms = now_ms;
        }
        // A dead letter keeps its payload for a redrive.
        if job.status.is_terminal() && job.status != JobStatus::Dead {
            effects.push(Effect::DropPayload { job: id });
        }
        if job.status.is_terminal() {
            self.leave_line(id);
        }
    }

    fn register(
        &mut self,
        index: u64,
        r: &NodeRegistration,
        effects: &mut Vec<Effect>,
    ) -> Result<u32, Rejection> {
        if r.slots > NODE_SLOTS_MAX {
            return Err(Rejection::Invalid(format!(
                "slots must be at most {NODE_SLOTS_MAX}, got {}",
                r.slots
            )));
        }
        if let Some(node) = self.nodes.get(&r.node) {
            if r.incarnation < node.incarnation {
                return Err(Rejection::StaleIncarnation {
                    node: r.node,
                    got: r.incarnation,
                    current: node.incarnation,
                });
            }
        }
        let expired = self
            .nodes
            .get(&r.node)
            .is_some_and(|n| n.incarnation == r.incarnation && n.expired);
        effects.push(Effect::Renewed(NodeLease {
            node: r.node,
            incarnation: r.incarnation,
        }));
        self.nodes.insert(
            r.node,
            ModelNode {
                incarnation: r.incarnation,
                slots: r.slots,
                expired,
                renewed_index: index,
            },
        );
        let lost = self.ids_where(|j| {
            j.current
                .as_ref()
                .is_some_and(|a| a.node == r.node && a.incarnation < r.incarnation)
        });
        for &id in &lost {
            self.end(id, End::Abandoned { node_lost: true }, effects);
        }
        Ok(lost.len() as u32)
    }

    /// The incarnation must be the node's current one (shared by renew and expire).
    fn current(&self, lease: &NodeLease) -> Result<ModelNode, Rejection> {
        let node = *self
            .nodes
            .get(&lease.node)
            .ok_or(Rejection::UnknownNode(lease.node))?;
        if node.incarnation != lease.incarnation {
            return Err(Rejection::StaleIncarnation {
                node: lease.node,
                got: lease.incarnation,
                current: node.incarnation,
            });
        }
        Ok(node)
    }

    fn renew(
        &mut self,
        index: u64,
        lease: &NodeLease,
        effects: &mut Vec<Effect>,
    ) -> Result<(), Rejection> {
        if self.current(lease)?.expired {
            return Err(Rejection::Expired {
                node: lease.node,
                incarnation: lease.incarnation,
            });
        }
        if let Some(n) = self.nodes.get_mut(&lease.node) {
            n.renewed_index = index;
        }
        effects.push(Effect::Renewed(*lease));
        Ok(())
    }

    /// Expiry abandons every attempt running on the node, whatever its incarnation, unless the
    /// node renewed after the renewal the expiry counted from.
    fn expire(&mut self, expiry: &Expiry, effects: &mut Vec<Effect>) -> Result<u32, Rejection> {
        let lease = &expiry.lease;
        let node = self.current(lease)?;
        if node.expired {
            return Ok(0);
        }
        if node.renewed_index != expiry.renewed_index {
            return Err(Rejection::RenewedSince {
                node: lease.node,
                incarnation: lease.incarnation,
                counted_from: expiry.renewed_index,
                renewed: node.renewed_index,
            });
        }
        if let Some(n) = self.nodes.get_mut(&lease.node) {
            n.expired = true;
        }
        let lost = self.ids_where(|j| j.current.as_ref().is_some_and(|a| a.node == lease.node));
        for &id in &lost {
            self.end(id, End::Abandoned { node_lost: true }, effects);
        }
        Ok(lost.len() as u32)
    }
}

// ----- running a sequence -----

/// Turns a generated step into the request the proposer would make, given the model's state
/// (and, for a plan, the scheduler's view of table `a`).
fn resolve(step: &Step, stamp: u64, model: &Model, table: &JobTable) -> Request {
    let command = match &step.op {
        Op::Submit(specs) => Command::Submit(
            specs
                .iter()
                .map(|s| NewJob {
                    queue: if s.empty_queue {
                        String::new()
                    } else {
                        QUEUES[s.queue].into()
                    },
                    kind: "noop".into(),
                    payload: vec![s.payload_len as u8; s.payload_len],
                    priority: s.priority,
                    max_attempts: s.max_attempts,
                    timeout_ms: 1_000,
                    run_at_ms: if s.delay_ms == 0 {
                        0
                    } else {
                        stamp + s.delay_ms
                    },
                    idempotency_key: s.key.map(|k| format!("key-{k}")),
                    ordering_key: s.ordering_key.map(|k| format!("line-{k}")),
                    ..NewJob::default()
                })
                .collect(),
        ),
        Op::Plan {
            batch_max,
            excluded,
        } => Command::Assign(plan_assignments(table, stamp, *batch_max, excluded)),
        Op::Assign(specs) => Command::Assign(
            specs
                .iter()
                .map(|s| Assignment {
                    job: model.pick(&s.job),
                    node: s.node,
                    incarnation: match s.incarnation {
                        IncarnationPick::Current => {
                            model.nodes.get(&s.node).map_or(0, |n| n.incarnation)
                        }
                        IncarnationPick::Raw(i) => i,
                    },
                })
                .collect(),
        ),
        Op::Complete(specs) => Command::Complete(
            specs
                .iter()
                .map(|s| {
                    let job = model.pick(&s.job);
                    let known = model.jobs.get(&job);
                    let token = match &s.token {
                        TokenPick::Current => known.and_then(|j| {
                            j.current
                                .as_ref()
                                .map(|a| a.token)
                                .or(j.tokens.last().copied())
                        }),
                        TokenPick::Past(i) => known
                            .filter(|j| !j.tokens.is_empty())
                            .map(|j| j.tokens[i.index(j.tokens.len())]),
                        TokenPick::Raw(t) => Some(*t),
                    }
                    .unwrap_or(0);
                    let outcome = match s.outcome {
                        OutcomeSpec::Succeed { result_len } => Outcome::Succeeded {
                            result: vec![1; result_len],
                        },
                        OutcomeSpec::Fail { retryable } => Outcome::Failed {
                            error: "handler failed".into(),
                            retryable,
                        },
                    };
                    Completion {
                        job,
                        token,
                        outcome,
                    }
                })
                .collect(),
        ),
        // A client's cancel comes through the API, which proposes it audited.
        Op::Cancel(picks) => Command::Audited(Box::new(exactly_core::Audited {
            by: "ops".into(),
            command: Command::Cancel(picks.iter().map(|p| model.pick(p)).collect()),
        })),
        Op::Configure {
            queue,
            concurrency_max,
            rate,
            paused,
        } => Command::ConfigureQueue {
            queue: QUEUES[*queue].into(),
            patch: QueuePatch {
                concurrency_max: *concurrency_max,
                rate: rate.map(|r| r.map(|(jobs, period_ms)| RateLimit { jobs, period_ms })),
                paused: *paused,
            },
        },
        Op::Redrive { picks, max } => Command::Redrive(DeadFilter {
            ids: picks.iter().map(|p| model.pick(p)).collect(),
            queue: None,
            kind: None,
            max: *max,
            // No picks: every dead letter, which takes the explicit `all`.
            all: picks.is_empty(),
        }),
        Op::Renew {
            node,
            incarnation_delta,
        } => {
            let current = model.nodes.get(node).map_or(0, |n| n.incarnation) as i64;
            Command::Renew(Renewal {
                lease: NodeLease {
                    node: *node,
                    incarnation: (current + incarnation_delta).max(0) as u64,
                },
                applied: u64::MAX,
            })
        }
        Op::Expire {
            node,
            incarnation_delta,
            stale,
        } => {
            let current = model.nodes.get(node).map_or(0, |n| n.incarnation) as i64;
            let renewed = model.nodes.get(node).map_or(0, |n| n.renewed_index);
            Command::Expire(Expiry {
                lease: NodeLease {
                    node: *node,
                    incarnation: (current + incarnation_delta).max(0) as u64,
                },
                renewed_index: if *stale {
                    renewed.saturating_sub(1)
                } else {
                    renewed
                },
            })
        }
        Op::Register {
            node,
            incarnation_delta,
            slots,
        } => {
            let current = model.nodes.get(node).map_or(0, |n| n.incarnation) as i64;
            Command::RegisterNode(NodeRegistration {
                node: *node,
                incarnation: (current + incarnation_delta).max(0) as u64,
                slots: *slots,
                addr: format!("node-{node}"),
                applied: u64::MAX,
            })
        }
    };
    Request {
        now_ms: stamp,
        // Any value works (the model derives the same jitter from it); varying it exercises
        // the jitter bounds.
        entropy: stamp.wrapping_mul(0x2545_F491_4F6C_DD1D),
        command,
    }
}

/// Checks a plan against the policy before it is applied: only registered, non-excluded nodes
/// at their current incarnation, within their free slots and batch_max, and exactly the
/// highest-priority (then oldest) due pending jobs that are first of their ordering line, each
/// queue contributing no more than its settings allow at the plan's time.
fn check_plan(
    plan: &[Assignment],
    model: &Model,
    stamp: u64,
    batch_max: usize,
    excluded: &BTreeSet<NodeId>,
) -> Result<(), TestCaseError> {
    let mut per_node: BTreeMap<NodeId, usize> = BTreeMap::new();
    for a in plan {
        prop_assert!(!excluded.contains(&a.node), "excluded node {}", a.node);
        let node = model.nodes.get(&a.node);
        prop_assert!(!node.is_some_and(|n| n.expired), "expired node {}", a.node);
        prop_assert_eq!(node.map(|n| n.incarnation), Some(a.incarnation));
        *per_node.entry(a.node).or_default() += 1;
    }
    let mut free_total = 0;
    for (&id, node) in &model.nodes {
        let free = (node.slots as usize).saturating_sub(model.running_on(id));
        prop_assert!(per_node.get(&id).copied().unwrap_or(0) <= free);
        if !excluded.contains(&id) && !node.expired {
            free_total += free;
        }
    }
    // Due by the table's clock (which never goes back) or by the plan's stamp.
    let due_by = model.now_ms.max(stamp);
    let mut due: Vec<(i64, JobId)> = model
        .jobs
        .iter()
        .filter(|(&id, j)| {
            j.status == JobStatus::Pending && j.run_at_ms <= due_by && model.eligible(id)
        })
        .map(|(&id, j)| (-i64::from(j.priority), id))
        .collect();
    due.sort_unstable();
    let want = batch_max.min(free_total);
    let mut allowance: BTreeMap<&str, usize> = QUEUES
        .iter()
        .map(|&q| (q, model.allowance(q, stamp, want)))
        .collect();
    let mut expected: Vec<JobId> = Vec::new();
    for (_, id) in due {
        if expected.len() == want {
            break;
        }
        let left = allowance
            .get_mut(model.jobs[&id].queue.as_str())
            .expect("a known queue");
        if *left > 0 {
            *left -= 1;
            expected.push(id);
        }
    }
    let planned: Vec<JobId> = plan.iter().map(|a| a.job).collect();
    prop_assert_eq!(planned, expected, "plan order or size");
    Ok(())
}

/// Applies `steps` to two fresh tables and the model, checking everything after each step.
fn run(steps: &[Step]) -> Result<(), TestCaseError> {
    let mut a = JobTable::new();
    let mut b = JobTable::new();
    let mut model = Model::new();
    let mut clock = START_MS as i64;
    let mut max_stamp = 0;
    let mut index = 0u64;
    // Job -> its record when it became terminal.
    let mut terminal: BTreeMap<JobId, Job> = BTreeMap::new();
    let mut stored: BTreeSet<JobId> = BTreeSet::new();
    let mut dropped: BTreeSet<JobId> = BTreeSet::new();
    // The shell's archive of `a`: the records of its succeeded and cancelled jobs.
    let mut archive: BTreeMap<JobId, Job> = BTreeMap::new();

    for (n, step) in steps.iter().enumerate() {
        // Log indexes increase, sometimes with gaps (blank and membership entries).
        index += 1 + (n as u64 % 3 == 2) as u64;
        clock = (clock + step.clock_delta_ms).max(0);
        let stamp = clock as u64;
        max_stamp = max_stamp.max(stamp);
        let request = resolve(step, stamp, &model, &a);
        if let Op::Plan {
            batch_max,
            excluded,
        } = &step.op
        {
            let Command::Assign(plan) = &request.command else {
                unreachable!()
            };
            check_plan(plan, &model, stamp, *batch_max, excluded)?;
        }
        let before = a.clone();
        if let Command::Submit(jobs) = &request.command {
            check_submit_assign(&before, index, &request, jobs, n)?;
        }
        // The same command alone in a `Batch` entry: the same state, effects and response.
        let mut batched = before.clone();
        let (batch_response, batch_effects) = batched.apply(
            index,
            Request {
                now_ms: request.now_ms,
                entropy: request.entropy,
                command: Command::Batch(vec![request.command.clone()]),
            },
        );

        let (response, effects) = a.apply(index, request.clone());
        let (response_b, effects_b) = b.apply(index, request.clone());
        let (expected_response, expected_effects) = model.apply(index, &request);
        // Both replicas hand the shell the same records to archive, in the same order, and a
        // batch of one the same as the command alone.
        let archived = |effects: &[Effect]| -> Vec<Effect> {
            effects
                .iter()
                .filter(|e| matches!(e, Effect::Archive(_) | Effect::Unarchive { .. }))
                .cloned()
                .collect()
        };
        prop_assert_eq!(
            archived(&effects),
            archived(&effects_b),
            "step {}: archive",
            n
        );
        prop_assert_eq!(
            archived(&effects),
            archived(&batch_effects),
            "step {}: batched archive",
            n
        );
        for effect in &effects {
            match effect {
                Effect::Archive(job) => {
                    prop_assert!(
                        archive.insert(job.id, (**job).clone()).is_none(),
                        "job {} archived twice",
                        job.id
                    );
                }
                Effect::Unarchive { job } => {
                    prop_assert!(archive.remove(job).is_some(), "job {} not archived", job);
                }
                _ => {}
            }
        }
        if let Err(broken) = common::check_archive(&a, &archive) {
            return Err(TestCaseError::fail(format!("step {n}: {broken}")));
        }
        // Watch events are checked by the table-driven tests, the archive above; the model
        // tracks the rest of the shell's work.
        let shell = |e: &Effect| {
            !matches!(
                e,
                Effect::Event(_) | Effect::Archive(_) | Effect::Unarchive { .. }
            )
        };
        let effects: Vec<Effect> = effects.into_iter().filter(shell).collect();
        let effects_b: Vec<Effect> = effects_b.into_iter().filter(shell).collect();
        // Every retained record, from the table or the archive.
        let record = |id: JobId| a.job(id).or_else(|| archive.get(&id).cloned());
        let mut all: Vec<Job> = a.jobs().chain(archive.values().cloned()).collect();
        all.sort_by_key(|j| j.id);

        prop_assert_eq!(
            &batch_response,
            &Response::Batch(Ok(vec![response.clone()])),
            "step {}: batched response",
            n
        );
        let batch_effects: Vec<Effect> = batch_effects.into_iter().filter(shell).collect();
        prop_assert_eq!(&batch_effects, &effects, "step {}: batched effects", n);
        prop_assert!(batched == a, "step {}: a batch of one differs", n);

        // Determinism: a second replica fed the same entry agrees exactly.
        prop_assert_eq!(&response, &response_b, "step {}: responses differ", n);
        prop_assert_eq!(&effects, &effects_b, "step {}: effects differ", n);
        prop_assert!(a == b, "step {}: replicas diverged", n);

        // The table's own index checks.
        if let Err(broken) = a.check_invariants() {
            return Err(TestCaseError::fail(format!("step {n}: {broken}")));
        }

        // Invariant 3, independently of the model: walking the batch in order, a completion is
        // accepted exactly when its token is the job's current attempt's token at that moment.
        if let (Command::Complete(list), Response::Completed { accepted, rejected }) =
            (&request.command, &response)
        {
            let mut current: BTreeMap<JobId, Option<u64>> = BTreeMap::new();
            let mut expected_rejected = Vec::new();
            for c in list {
                let cur = current.entry(c.job).or_insert_with(|| {
                    before
                        .job(c.job)
                        .and_then(|j| j.current_attempt().map(|at| at.token))
                });
                if *cur == Some(c.token) {
                    *cur = None;
                } else {
                    expected_rejected.push(c.job);
                }
            }
            let got: Vec<JobId> = rejected.iter().map(|(id, _)| *id).collect();
            prop_assert_eq!(got, expected_rejected, "step {}: completion acceptance", n);
            prop_assert_eq!(*accepted as usize, list.len() - rejected.len());
        }

        // A plan from the scheduler is accepted whole.
        if matches!(step.op, Op::Plan { .. }) {
            let Command::Assign(plan) = &request.command else {
                unreachable!()
            };
            prop_assert_eq!(
                &response,
                &Response::Assigned {
                    started: plan.len() as u32,
                    rejected: vec![]
                },
                "step {}: plan refused",
                n
            );
        }

        // The model agrees on the exact response and effects.
        prop_assert_eq!(&response, &expected_response, "step {}: response", n);
        prop_assert_eq!(&effects, &expected_effects, "step {}: effects", n);

        // Time never goes backwards.
        prop_assert_eq!(a.now_ms(), max_stamp);

        // Payload bookkeeping: stored once when created, dropped once when terminal.
        for effect in &effects {
            match effect {
                Effect::StorePayload { job, .. } => {
                    prop_assert!(stored.insert(*job), "payload of {} stored twice", job)
                }
                Effect::DropPayload { job } => {
                    prop_assert!(dropped.insert(*job), "payload of {} dropped twice", job);
                    prop_assert!(record(*job).is_some_and(|j| j.status.is_terminal()));
                }
                Effect::Start(start) => {
                    prop_assert_eq!(start.token, index, "token is the log index");
                }
                Effect::Renewed(_)
                | Effect::Event(_)
                | Effect::Archive(_)
                | Effect::Unarchive { .. } => {}
                Effect::TokensChanged => {
                    prop_assert!(false, "no generated command changes tokens")
                }
                Effect::Cancel { job, token, .. } => {
                    // Only the attempt that was running is told to stop, and its job is over.
                    let j = record(*job).expect("cancelled job exists");
                    prop_assert_eq!(j.status, JobStatus::Cancelled);
                    prop_assert_eq!(j.attempts.last().map(|t| t.token), Some(*token));
                }
            }
        }

        prop_assert_eq!(a.counts(), &model.counts());
        prop_assert_eq!(all.len(), model.jobs.len());
        for job in &all {
            let m = &model.jobs[&job.id];
            // Invariant 2: at most one open attempt, exactly one while running, and fencing
            // tokens strictly increase per job.
            let open = job.attempts.iter().filter(|t| t.end.is_none()).count();
            prop_assert!(open <= 1, "job {} has {} open attempts", job.id, open);
            prop_assert_eq!(open == 1, job.status == JobStatus::Running);
            prop_assert!(
                job.attempts.windows(2).all(|w| w[0].token < w[1].token),
                "job {} tokens do not increase: {:?}",
                job.id,
                job.attempts
            );
            // Attempt history is append-only: earlier attempts never change once ended.
            if let Some(old) = before
                .job(job.id)
                .or_else(|| terminal.get(&job.id).cloned())
            {
                prop_assert!(job.attempts.len() >= old.attempts.len());
                for (then, now) in old.attempts.iter().zip(&job.attempts) {
                    if then.end.is_some() {
                        prop_assert_eq!(then, now, "job {}: an ended attempt changed", job.id);
                    } else {
                        prop_assert_eq!(then.token, now.token);
                    }
                }
            }
            let tokens: Vec<u64> = job.attempts.iter().map(|t| t.token).collect();
            prop_assert_eq!(&tokens, &m.tokens);
            prop_assert_eq!(
                job.current_attempt().map(|t| t.token),
                m.current.as_ref().map(|t| t.token)
            );
            prop_assert_eq!(job.status, m.status, "job {} status", job.id);
            prop_assert_eq!(job.run_at_ms, m.run_at_ms, "job {} run_at", job.id);
            prop_assert_eq!(job.failures, m.failures);
            prop_assert_eq!(job.abandoned, m.abandoned);
            prop_assert_eq!(job.priority, m.priority);
            prop_assert_eq!(job.max_attempts, m.max_attempts);
            prop_assert!(job
                .result
                .as_ref()
                .is_none_or(|r| r.len() <= RESULT_BYTES_MAX));
            prop_assert_eq!(
                dropped.contains(&job.id),
                job.status.is_terminal() && job.status != JobStatus::Dead,
                "job {}: payload dropped iff finished (dead letters keep theirs)",
                job.id
            );
            prop_assert!(stored.contains(&job.id));

            // Terminal jobs never change again, except a dead letter that a redrive revived.
            if job.status.is_terminal() {
                match terminal.get(&job.id) {
                    Some(then) => prop_assert_eq!(then, job, "terminal job {} changed", job.id),
                    None => {
                        terminal.insert(job.id, job.clone());
                    }
                }
            } else if let Some(then) = terminal.remove(&job.id) {
                prop_assert_eq!(
                    then.status,
                    JobStatus::Dead,
                    "job {} left {:?}",
                    job.id,
                    then.status
                );
                let redriven =
                    matches!(&response, Response::Redriven(Ok(ids)) if ids.contains(&job.id));
                prop_assert!(redriven, "dead job {} came back without a redrive", job.id);
            }
        }
        // Queues: no start past a concurrency limit; a queue's state exists exactly while it
        // has live jobs or settings, with the model's counts.
        let started: BTreeSet<&str> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Start(s) => Some(s.queue.as_str()),
                _ => None,
            })
            .collect();
        for name in started {
            let q = a.queue(name).expect("a queue that starts jobs exists");
            let max = q.config.concurrency_max;
            prop_assert!(
                max == 0 || q.running() <= max,
                "step {}: queue {} runs {} past its limit {}",
                n,
                name,
                q.running(),
                max
            );
        }
        for name in QUEUES {
            let live = model.live_in(name);
            let config = model.queue(name).config;
            let expected =
                (live > 0 || !config.is_default()).then(|| (config, model.running_in(name), live));
            let got = a
                .queue(name)
                .map(|q| (q.config.clone(), q.running(), q.live()));
            prop_assert_eq!(got, expected, "step {}: queue {}", n, name);
        }
        // Ordering keys: never two running jobs of one line.
        let mut running_lines = BTreeSet::new();
        for job in a.jobs().filter(|j| j.status == JobStatus::Running) {
            if let Some(key) = &job.ordering_key {
                prop_assert!(
                    running_lines.insert((job.queue.clone(), key.clone())),
                    "step {}: two jobs of line {}/{} run",
                    n,
                    job.queue,
                    key
                );
            }
        }

        for (id, node) in &model.nodes {
            let entry = a.nodes().get(id);
            prop_assert_eq!(
                entry.map(|e| (e.incarnation, e.slots, e.expired, e.renewed_index)),
                Some((
                    node.incarnation,
                    node.slots,
                    node.expired,
                    node.renewed_index
                ))
            );
        }
        prop_assert_eq!(a.nodes().len(), model.nodes.len());
    }
    Ok(())
}

/// The leader's group commit (`SubmitAssign`) is, by definition, a `SubmitGroups` followed by
/// an `Assign` of the scheduling policy's plan on the result, both at the same log index: the
/// same responses, effects and state, whatever state the sequence reached (ordering lines, rate
/// and concurrency limits, paused queues, delayed jobs, expired nodes). The submit is split in
/// two groups, and each node is excluded in turn, so every exclusion the scheduler can publish
/// is exercised; after it, the policy finds nothing more to start.
fn check_submit_assign(
    before: &JobTable,
    index: u64,
    request: &Request,
    jobs: &[NewJob],
    n: usize,
) -> Result<(), TestCaseError> {
    let half = jobs.len() / 2;
    let groups = vec![jobs[..half].to_vec(), jobs[half..].to_vec()];
    for skip in 0..=REGISTRABLE + 1 {
        let excluded: BTreeSet<NodeId> = [skip].into_iter().filter(|&id| id != 0).collect();
        let stamped = |command| Request {
            now_ms: request.now_ms,
            entropy: request.entropy,
            command,
        };
        let mut folded = before.clone();
        let (response, effects) = folded.apply(
            index,
            stamped(Command::SubmitAssign {
                groups: groups.clone(),
                excluded: excluded.clone(),
            }),
        );
        let mut split = before.clone();
        let (expected, mut expected_effects) =
            split.apply(index, stamped(Command::SubmitGroups(groups.clone())));
        let plan = plan_assignments(&split, split.now_ms(), ASSIGN_BATCH_MAX, &excluded);
        let planned = plan.len();
        if !plan.is_empty() {
            let (assigned, assign_effects) = split.apply(index, stamped(Command::Assign(plan)));
            prop_assert!(
                matches!(&assigned, Response::Assigned { rejected, .. } if rejected.is_empty()),
                "step {}: the policy's own plan was refused: {:?}",
                n,
                assigned
            );
            expected_effects.extend(assign_effects);
        }
        prop_assert_eq!(&response, &expected, "step {}: SubmitAssign response", n);
        prop_assert_eq!(
            &effects,
            &expected_effects,
            "step {}: SubmitAssign effects",
            n
        );
        prop_assert!(folded == split, "step {}: SubmitAssign state differs", n);
        if let Err(broken) = folded.check_invariants() {
            return Err(TestCaseError::fail(format!(
                "step {n}: SubmitAssign: {broken}"
            )));
        }
        if planned < ASSIGN_BATCH_MAX {
            let more = plan_assignments(&folded, folded.now_ms(), ASSIGN_BATCH_MAX, &excluded);
            prop_assert!(more.is_empty(), "step {}: left startable: {:?}", n, more);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 192,
        ..ProptestConfig::default()
    })]

    /// Random command sequences keep invariants 2 and 3, match the model, and replay identically.
    #[test]
    fn random_command_sequences_keep_the_invariants(
        steps in proptest::collection::vec(step(), 1..80)
    ) {
        run(&steps)?;
    }

    /// With every node registered up front, random sequences keep the same properties.
    #[test]
    fn busy_cluster_sequences_keep_the_invariants(
        slots in proptest::collection::vec(1u32..4, REGISTRABLE as usize),
        steps in proptest::collection::vec(step(), 1..80)
    ) {
        // Most steps then assign and complete real work, in a concurrency-limited queue (q)
        // and a rate-limited one (r), with ordering lines in both.
        let mut all = Vec::new();
        for (i, &s) in slots.iter().enumerate() {
            all.push(Step {
                clock_delta_ms: 0,
                op: Op::Register { node: i as u64 + 1, incarnation_delta: 1, slots: s },
            });
        }
        all.push(Step {
            clock_delta_ms: 0,
            op: Op::Submit(vec![
                JobSpec {
                    priority: 0,
                    max_attempts: 2,
                    delay_ms: 0,
                    payload_len: 1,
                    empty_queue: false,
                    key: None,
                    queue: 0,
                    ordering_key: None,
                };
                6
            ]),
        });
        for (queue, concurrency_max, rate) in [(0, Some(2), None), (1, None, Some(Some((2, 1_000))))] {
            all.push(Step {
                clock_delta_ms: 0,
                op: Op::Configure { queue, concurrency_max, rate, paused: None },
            });
        }
        all.push(Step {
            clock_delta_ms: 0,
            op: Op::Submit(
                (0..8)
                    .map(|i| JobSpec {
                        priority: 0,
                        max_attempts: 2,
                        delay_ms: 0,
                        payload_len: 1,
                        empty_queue: false,
                        key: None,
                        queue: i % 2,
                        ordering_key: Some((i / 2 % 2) as u8),
                    })
                    .collect(),
            ),
        });
        all.extend(steps);
        run(&all)?;
    }

    /// Restart-heavy sequences, where jobs hit ABANDONED_ATTEMPTS_MAX, keep the same properties.
    #[test]
    fn restart_heavy_sequences_keep_the_invariants(
        steps in proptest::collection::vec(step_with(churn_op()), 20..120)
    ) {
        // The model then also checks that such a failed job's payload is dropped exactly once.
        run(&steps)?;
    }
}
