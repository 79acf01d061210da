//! Property tests of the state machine: random command sequences (submits, scheduler plans,
//! arbitrary and bogus assignments, current and stale completions, node restarts, clocks that
//! sometimes go backwards) are applied at increasing log indexes to two tables and to a small
//! model. After every step we check invariants 2 (at most one current attempt, strictly
//! increasing fencing tokens) and 3 (a completion is accepted only for the current attempt),
//! that terminal jobs never change, that payloads are stored once and dropped once, that drained
//! nodes get no work and removed ones never come back, and that both tables agree exactly
//! (determinism).

use std::collections::{BTreeMap, BTreeSet};

use exactly_core::limits::{
    ABANDONED_ATTEMPTS_MAX, ASSIGN_BATCH_MAX, COMPLETE_BATCH_MAX, MAX_ATTEMPTS_MAX, NODE_SLOTS_MAX,
    RESULT_BYTES_MAX, SUBMIT_BATCH_JOBS_MAX,
};
use exactly_core::state::{retry_backoff_ms, validate_new_job};
use exactly_core::{
    plan_assignments, Assignment, Command, Completion, DrainNode, Effect, Job, JobId, JobStatus,
    JobTable, LeaveReason, NewJob, NodeId, NodeLease, NodeRegistration, Outcome, Rejection,
    Request, Response, StartAttempt, StateCounts,
};
use proptest::prelude::*;
use proptest::sample::Index;

/// Nodes 1..=REGISTRABLE register; node 0 and REGISTRABLE + 1 never do.
const REGISTRABLE: u64 = 3;
const START_MS: u64 = 1_000_000;

// ----- generated operations, resolved against the model when they run -----

#[derive(Clone, Debug)]
struct JobSpec {
    priority: i32,
    max_attempts: u32,
    /// 0: due at once; otherwise run_at = the request's stamp + delay.
    delay_ms: u64,
    payload_len: usize,
    empty_queue: bool,
}

/// Which job an operation names, chosen among the model's jobs when the step runs.
#[derive(Clone, Debug)]
enum JobPick {
    Pending(Index),
    Running(Index),
    Any(Index),
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
    Succeed {
        result_len: usize,
    },
    Fail {
        retryable: bool,
    },
    /// The node gives the attempt back (drained past its deadline).
    Abandon,
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
    /// A lease expiry for the node's current incarnation plus a delta.
    Expire {
        node: NodeId,
        incarnation_delta: i64,
    },
    Drain {
        node: NodeId,
        deadline_after_ms: u64,
        reason: LeaveReason,
    },
    /// The leader records that a node left the membership.
    Left {
        node: NodeId,
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
    )
        .prop_map(
            |(priority, max_attempts, delay_ms, payload_len, empty_queue)| JobSpec {
                priority,
                max_attempts,
                delay_ms,
                payload_len,
                empty_queue,
            },
        )
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
            1 => Just(OutcomeSpec::Abandon),
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
        1 => (1..=REGISTRABLE, prop_oneof![6 => Just(0i64), 1 => Just(-1i64), 1 => Just(1i64)])
            .prop_map(|(node, incarnation_delta)| Op::Expire { node, incarnation_delta }),
        1 => (0..=REGISTRABLE + 1, prop_oneof![1 => Just(0u64), 2 => 1u64..5_000], reason())
            .prop_map(|(node, deadline_after_ms, reason)| Op::Drain {
                node,
                deadline_after_ms,
                reason,
            }),
        1 => (0..=REGISTRABLE + 1).prop_map(|node| Op::Left { node }),
    ]
}

fn reason() -> impl Strategy<Value = LeaveReason> {
    prop_oneof![
        Just(LeaveReason::Stopping),
        Just(LeaveReason::Drained),
        Just(LeaveReason::Removed),
    ]
}

/// Mostly scheduler plans and node restarts, so that jobs are abandoned again and again and
/// reach ABANDONED_ATTEMPTS_MAX.
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
    /// Every token this job was ever started with, in order.
    tokens: Vec<u64>,
    current: Option<ModelAttempt>,
}

#[derive(Clone, Copy, Debug)]
struct ModelNode {
    incarnation: u64,
    slots: u32,
    expired: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ModelLeave {
    since_ms: u64,
    deadline_ms: u64,
    reason: LeaveReason,
}

/// What the state machine should do, written as plainly as possible.
#[derive(Clone, Debug)]
struct Model {
    now_ms: u64,
    next_id: JobId,
    jobs: BTreeMap<JobId, ModelJob>,
    nodes: BTreeMap<NodeId, ModelNode>,
    stale_completions: u64,
    leaving: BTreeMap<NodeId, ModelLeave>,
    removed: BTreeMap<NodeId, u64>,
}

enum End {
    Succeeded,
    Failed { retryable: bool },
    Abandoned,
}

impl Model {
    fn new() -> Self {
        Self {
            now_ms: 0,
            next_id: 1,
            jobs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            stale_completions: 0,
            leaving: BTreeMap::new(),
            removed: BTreeMap::new(),
        }
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
                JobStatus::Failed => counts.failed += 1,
            }
        }
        counts
    }

    /// The exact response and effects applying `request` at `index` must produce.
    fn apply(&mut self, index: u64, request: &Request) -> (Response, Vec<Effect>) {
        self.now_ms = self.now_ms.max(request.now_ms);
        let mut effects = Vec::new();
        let response = match &request.command {
            Command::Submit(jobs) => {
                assert!(jobs.len() <= SUBMIT_BATCH_JOBS_MAX, "generator limit");
                Response::Submitted(jobs.iter().map(|j| self.submit(j, &mut effects)).collect())
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
            Command::RegisterNode(r) => Response::NodeRegistered(self.register(r, &mut effects)),
            Command::Renew(lease) => Response::Renewed(self.renew(lease, &mut effects)),
            Command::Expire(lease) => Response::Expired(self.expire(lease, &mut effects)),
            Command::Drain(d) => Response::Draining(self.drain(d)),
            Command::NodeLeft(node) => Response::NodeLeft(self.left(*node)),
        };
        (response, effects)
    }

    fn submit(&mut self, new: &NewJob, effects: &mut Vec<Effect>) -> Result<JobId, Rejection> {
        // The validation rules themselves are pinned by the table-driven tests.
        validate_new_job(new).map_err(Rejection::Invalid)?;
        let id = self.next_id;
        self.next_id += 1;
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
                tokens: Vec::new(),
                current: None,
            },
        );
        effects.push(Effect::StorePayload {
            job: id,
            payload: new.payload.clone(),
        });
        Ok(id)
    }

    fn assign(
        &mut self,
        token: u64,
        a: &Assignment,
        effects: &mut Vec<Effect>,
    ) -> Result<(), Rejection> {
        if self.leaving.contains_key(&a.node) {
            return Err(Rejection::Draining(a.node));
        }
        if self.removed.contains_key(&a.node) {
            return Err(Rejection::Removed(a.node));
        }
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
        let job = self
            .jobs
            .get_mut(&a.job)
            .ok_or(Rejection::UnknownJob(a.job))?;
        if job.status != JobStatus::Pending {
            return Err(Rejection::NotPending(job.status.as_str().to_string()));
        }
        if job.run_at_ms > now_ms {
            return Err(Rejection::NotDue(job.run_at_ms));
        }
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
        }));
        Ok(())
    }

    /// Invariant 3, stated directly: accepted if and only if the token is the current
    /// attempt's.
    fn complete(&mut self, c: &Completion, effects: &mut Vec<Effect>) -> Result<(), Rejection> {
        let job = self.jobs.get(&c.job).ok_or(Rejection::UnknownJob(c.job))?;
        let current = job.current.as_ref().map(|a| a.token);
        if current != Some(c.token) {
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
            Outcome::Abandoned { .. } => End::Abandoned,
        };
        self.end(c.job, end, effects);
        Ok(())
    }

    fn end(&mut self, id: JobId, end: End, effects: &mut Vec<Effect>) {
        let now_ms = self.now_ms;
        let job = self.jobs.get_mut(&id).expect("running job");
        job.current = None;
        job.status = match end {
            End::Succeeded => JobStatus::Succeeded,
            End::Failed { retryable } => {
                job.failures += 1;
                if retryable && job.failures < job.max_attempts {
                    job.run_at_ms = now_ms + retry_backoff_ms(job.failures);
                    JobStatus::Pending
                } else {
                    JobStatus::Failed
                }
            }
            End::Abandoned => {
                job.abandoned += 1;
                if job.abandoned < ABANDONED_ATTEMPTS_MAX {
                    job.run_at_ms = now_ms;
                    JobStatus::Pending
                } else {
                    JobStatus::Failed
                }
            }
        };
        if job.status.is_terminal() {
            effects.push(Effect::DropPayload { job: id });
        }
    }

    fn register(
        &mut self,
        r: &NodeRegistration,
        effects: &mut Vec<Effect>,
    ) -> Result<u32, Rejection> {
        if self.removed.contains_key(&r.node) {
            return Err(Rejection::Removed(r.node));
        }
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
        // A node that drained itself to stop and started again stays.
        let restarted = self
            .nodes
            .get(&r.node)
            .is_some_and(|n| r.incarnation > n.incarnation);
        if restarted
            && self
                .leaving
                .get(&r.node)
                .is_some_and(|l| l.reason == LeaveReason::Stopping)
        {
            self.leaving.remove(&r.node);
        }
        let expired = self
            .nodes
            .get(&r.node)
            .is_some_and(|n| n.incarnation == r.incarnation && n.expired);
        self.nodes.insert(
            r.node,
            ModelNode {
                incarnation: r.incarnation,
                slots: r.slots,
                expired,
            },
        );
        let lost = self.ids_where(|j| {
            j.current
                .as_ref()
                .is_some_and(|a| a.node == r.node && a.incarnation < r.incarnation)
        });
        for &id in &lost {
            self.end(id, End::Abandoned, effects);
        }
        Ok(lost.len() as u32)
    }

    /// The incarnation must be the node's current one (shared by renew and expire).
    fn current(&self, lease: &NodeLease) -> Result<ModelNode, Rejection> {
        if self.removed.contains_key(&lease.node) {
            return Err(Rejection::Removed(lease.node));
        }
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

    fn renew(&mut self, lease: &NodeLease, effects: &mut Vec<Effect>) -> Result<(), Rejection> {
        if self.current(lease)?.expired {
            return Err(Rejection::Expired {
                node: lease.node,
                incarnation: lease.incarnation,
            });
        }
        effects.push(Effect::Renewed(*lease));
        Ok(())
    }

    /// Expiry abandons every attempt running on the node, whatever its incarnation.
    fn expire(&mut self, lease: &NodeLease, effects: &mut Vec<Effect>) -> Result<u32, Rejection> {
        if self.current(lease)?.expired {
            return Ok(0);
        }
        if let Some(n) = self.nodes.get_mut(&lease.node) {
            n.expired = true;
        }
        let lost = self.ids_where(|j| j.current.as_ref().is_some_and(|a| a.node == lease.node));
        for &id in &lost {
            self.end(id, End::Abandoned, effects);
        }
        Ok(lost.len() as u32)
    }

    /// A drain moves the deadline and keeps the strongest reason; removed nodes are refused.
    fn drain(&mut self, d: &DrainNode) -> Result<u32, Rejection> {
        use exactly_core::limits::NODES_LEAVING_MAX;
        if self.removed.contains_key(&d.node) {
            return Err(Rejection::Removed(d.node));
        }
        if !self.leaving.contains_key(&d.node) && self.leaving.len() >= NODES_LEAVING_MAX {
            return Err(Rejection::TooManyLeaving {
                got: self.leaving.len(),
                max: NODES_LEAVING_MAX,
            });
        }
        let previous = self.leaving.get(&d.node).copied();
        self.leaving.insert(
            d.node,
            ModelLeave {
                since_ms: previous.map_or(self.now_ms, |l| l.since_ms),
                deadline_ms: self.now_ms + d.deadline_after_ms,
                reason: previous.map_or(d.reason, |l| l.reason.max(d.reason)),
            },
        );
        Ok(self.running_on(d.node) as u32)
    }

    /// A node leaves only once it runs nothing; a removed one is remembered.
    fn left(&mut self, node: NodeId) -> Result<(), Rejection> {
        let Some(leave) = self.leaving.get(&node).copied() else {
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
                        "q".into()
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
                        OutcomeSpec::Abandon => Outcome::Abandoned {
                            reason: "drained".into(),
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
        Op::Renew {
            node,
            incarnation_delta,
        } => {
            let current = model.nodes.get(node).map_or(0, |n| n.incarnation) as i64;
            Command::Renew(NodeLease {
                node: *node,
                incarnation: (current + incarnation_delta).max(0) as u64,
            })
        }
        Op::Expire {
            node,
            incarnation_delta,
        } => {
            let current = model.nodes.get(node).map_or(0, |n| n.incarnation) as i64;
            Command::Expire(NodeLease {
                node: *node,
                incarnation: (current + incarnation_delta).max(0) as u64,
            })
        }
        Op::Drain {
            node,
            deadline_after_ms,
            reason,
        } => Command::Drain(DrainNode {
            node: *node,
            deadline_after_ms: *deadline_after_ms,
            reason: *reason,
        }),
        Op::Left { node } => Command::NodeLeft(*node),
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
            })
        }
    };
    Request {
        now_ms: stamp,
        command,
    }
}

/// Checks a plan against the policy before it is applied: only registered, non-excluded nodes
/// at their current incarnation, within their free slots and batch_max, and exactly the
/// highest-priority (then oldest) due pending jobs.
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
        prop_assert!(
            !model.leaving.contains_key(&a.node),
            "leaving node {}",
            a.node
        );
        let node = model.nodes.get(&a.node);
        prop_assert!(!node.is_some_and(|n| n.expired), "expired node {}", a.node);
        prop_assert_eq!(node.map(|n| n.incarnation), Some(a.incarnation));
        *per_node.entry(a.node).or_default() += 1;
    }
    let mut free_total = 0;
    for (&id, node) in &model.nodes {
        let free = (node.slots as usize).saturating_sub(model.running_on(id));
        prop_assert!(per_node.get(&id).copied().unwrap_or(0) <= free);
        if !excluded.contains(&id) && !node.expired && !model.leaving.contains_key(&id) {
            free_total += free;
        }
    }
    // Due by the table's clock (which never goes back) or by the plan's stamp.
    let due_by = model.now_ms.max(stamp);
    let mut due: Vec<(i64, JobId)> = model
        .jobs
        .iter()
        .filter(|(_, j)| j.status == JobStatus::Pending && j.run_at_ms <= due_by)
        .map(|(&id, j)| (-i64::from(j.priority), id))
        .collect();
    due.sort_unstable();
    let want = batch_max.min(free_total).min(due.len());
    let expected: Vec<JobId> = due.iter().take(want).map(|&(_, id)| id).collect();
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

        let (response, effects) = a.apply(index, request.clone());
        let (response_b, effects_b) = b.apply(index, request.clone());
        let (expected_response, expected_effects) = model.apply(index, &request);

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
                        .and_then(|j| j.current_attempt())
                        .map(|at| at.token)
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
                    prop_assert!(a.job(*job).is_some_and(|j| j.status.is_terminal()));
                }
                Effect::Start(start) => {
                    prop_assert_eq!(start.token, index, "token is the log index");
                }
                Effect::Renewed(_) => {}
            }
        }

        prop_assert_eq!(a.counts(), &model.counts());
        prop_assert_eq!(a.jobs().count(), model.jobs.len());
        for job in a.jobs() {
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
            if let Some(old) = before.job(job.id) {
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
                job.status.is_terminal(),
                "job {}: payload dropped iff terminal",
                job.id
            );
            prop_assert!(stored.contains(&job.id));

            // Terminal jobs never change again.
            if job.status.is_terminal() {
                match terminal.get(&job.id) {
                    Some(then) => prop_assert_eq!(then, job, "terminal job {} changed", job.id),
                    None => {
                        terminal.insert(job.id, job.clone());
                    }
                }
            }
        }
        for (id, node) in &model.nodes {
            let entry = a.nodes().get(id);
            prop_assert_eq!(
                entry.map(|e| (e.incarnation, e.slots)),
                Some((node.incarnation, node.slots))
            );
        }
        prop_assert_eq!(a.nodes().len(), model.nodes.len());
        let leaving: BTreeMap<NodeId, ModelLeave> = a
            .leaving_nodes()
            .iter()
            .map(|(&id, l)| {
                (
                    id,
                    ModelLeave {
                        since_ms: l.since_ms,
                        deadline_ms: l.deadline_ms,
                        reason: l.reason,
                    },
                )
            })
            .collect();
        prop_assert_eq!(&leaving, &model.leaving);
        prop_assert_eq!(a.removed_nodes(), &model.removed);
        for id in model.removed.keys() {
            prop_assert_eq!(a.running_on(*id), 0, "removed node {} runs attempts", id);
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
        // Most steps then assign and complete real work.
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
                };
                6
            ]),
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
