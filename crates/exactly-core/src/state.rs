//! The job table: the replicated state machine's state and its apply function.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::command::{
    Assignment, Command, Completion, DrainNode, Effect, LeaveReason, NewJob, NodeLease,
    NodeRegistration, Outcome, Rejection, Request, Response, StartAttempt,
};
use crate::job::{Attempt, AttemptEnd, Job, JobStatus, StateCounts};
use crate::limits::{
    ABANDONED_ATTEMPTS_MAX, ASSIGN_BATCH_MAX, COMPLETE_BATCH_MAX, ERROR_BYTES_MAX,
    KIND_NAME_BYTES_MAX, MAX_ATTEMPTS_MAX, NODES_LEAVING_MAX, NODE_SLOTS_MAX,
    PAYLOAD_BYTES_CEILING, QUEUE_NAME_BYTES_MAX, RESULT_BYTES_MAX, RETRY_BACKOFF_BASE_MS,
    RETRY_BACKOFF_MAX_MS, SUBMIT_BATCH_JOBS_MAX, TIMEOUT_MS_MAX,
};
use crate::{JobId, NodeId};

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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTable {
    next_job_id: JobId,
    /// The largest leader timestamp applied so far.
    now_ms: u64,
    jobs: BTreeMap<JobId, Job>,
    /// Pending jobs due now, by (negated priority, id): highest priority first, then FIFO.
    ready: BTreeSet<(i64, JobId)>,
    /// Pending jobs not due yet, by (run_at, id).
    delayed: BTreeSet<(u64, JobId)>,
    /// Running jobs per node.
    running: BTreeMap<NodeId, BTreeSet<JobId>>,
    nodes: BTreeMap<NodeId, NodeEntry>,
    counts: StateCounts,
    /// Nodes asked to leave that have not left yet: no new attempts go to them.
    #[serde(default)]
    leaving: BTreeMap<NodeId, Leave>,
    /// Nodes taken out of the membership, with the leader time of their removal. Never shrinks:
    /// a removed node that comes back with its old data must stay out (a node that wants to
    /// rejoin starts with an empty data directory, which gives it a new id).
    #[serde(default)]
    removed: BTreeMap<NodeId, u64>,
}

fn truncate_bytes(mut bytes: Vec<u8>, max: usize) -> Vec<u8> {
    bytes.truncate(max);
    bytes
}

fn truncate_str(s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The delay before retry number `failures + 1`: exponential from
/// [`RETRY_BACKOFF_BASE_MS`], capped at [`RETRY_BACKOFF_MAX_MS`].
pub fn retry_backoff_ms(failures: u32) -> u64 {
    let shift = failures.saturating_sub(1).min(20);
    RETRY_BACKOFF_BASE_MS
        .saturating_mul(1u64 << shift)
        .min(RETRY_BACKOFF_MAX_MS)
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
    if job.kind.is_empty() || job.kind.len() > KIND_NAME_BYTES_MAX {
        return Err(format!(
            "kind must be 1..={KIND_NAME_BYTES_MAX} bytes, got {}",
            job.kind.len()
        ));
    }
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
    Ok(())
}

impl Default for JobTable {
    /// The empty table, the same as [`JobTable::new`]. Written by hand because a derived
    /// `Default` started job ids at 0: a store whose own state derives `Default` would then number
    /// jobs differently from one that calls `new()`, and issue the id 0 that [`crate::JobId`]
    /// promises never exists.
    fn default() -> Self {
        Self {
            next_job_id: 1,
            now_ms: 0,
            jobs: BTreeMap::new(),
            ready: BTreeSet::new(),
            delayed: BTreeSet::new(),
            running: BTreeMap::new(),
            nodes: BTreeMap::new(),
            counts: StateCounts::default(),
            leaving: BTreeMap::new(),
            removed: BTreeMap::new(),
        }
    }
}

impl JobTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one committed command. `log_index` is the entry's Raft log index: it becomes the
    /// fencing token of every attempt the entry starts, so tokens strictly increase per job.
    ///
    /// Never panics on bad input: a malformed job or a stale completion becomes a [`Rejection`]
    /// in the response, and the rest of the batch is applied.
    pub fn apply(&mut self, log_index: u64, request: Request) -> (Response, Vec<Effect>) {
        self.now_ms = self.now_ms.max(request.now_ms);
        self.promote_due();
        let mut effects = Vec::new();
        let response = match request.command {
            Command::Submit(jobs) => Response::Submitted(self.submit(jobs, &mut effects)),
            Command::Assign(assignments) => self.assign(log_index, assignments, &mut effects),
            Command::Complete(completions) => self.complete(completions, &mut effects),
            Command::Renew(lease) => Response::Renewed(self.renew(lease, &mut effects)),
            Command::Expire(lease) => Response::Expired(self.expire(lease, &mut effects)),
            Command::RegisterNode(registration) => {
                Response::NodeRegistered(self.register_node(registration, &mut effects))
            }
            Command::Drain(drain) => Response::Draining(self.drain(drain)),
            Command::NodeLeft(node) => Response::NodeLeft(self.node_left(node)),
        };
        (response, effects)
    }

    /// Moves delayed jobs whose run_at has come into `ready`, so that `ready` holds every due
    /// pending job in priority order and `delayed` only jobs not due yet, as their docs say.
    /// Without this a due delayed job stayed in `delayed`, ordered by time rather than priority,
    /// and the scheduler had to scan every such job to keep priority order.
    fn promote_due(&mut self) {
        while let Some(&(at, id)) = self.delayed.first() {
            if at > self.now_ms {
                break;
            }
            self.delayed.pop_first();
            if let Some(job) = self.jobs.get(&id) {
                self.ready.insert((-(job.priority as i64), id));
            }
        }
    }

    fn submit(
        &mut self,
        jobs: Vec<NewJob>,
        effects: &mut Vec<Effect>,
    ) -> Vec<Result<JobId, Rejection>> {
        if jobs.len() > SUBMIT_BATCH_JOBS_MAX {
            let err = Rejection::BatchTooLarge {
                got: jobs.len(),
                max: SUBMIT_BATCH_JOBS_MAX,
            };
            return jobs.iter().map(|_| Err(err.clone())).collect();
        }
        let mut results = Vec::with_capacity(jobs.len());
        for new in jobs {
            if let Err(reason) = validate_new_job(&new) {
                results.push(Err(Rejection::Invalid(reason)));
                continue;
            }
            let id = self.next_job_id;
            self.next_job_id += 1;
            let job = Job {
                id,
                queue: new.queue,
                kind: new.kind,
                priority: new.priority,
                payload_len: new.payload.len() as u32,
                max_attempts: new.max_attempts,
                timeout_ms: new.timeout_ms,
                status: JobStatus::Pending,
                created_at_ms: self.now_ms,
                updated_at_ms: self.now_ms,
                run_at_ms: new.run_at_ms,
                failures: 0,
                abandoned: 0,
                attempts: Vec::new(),
                result: None,
                last_error: None,
            };
            self.index_pending(&job);
            self.counts.pending += 1;
            self.jobs.insert(id, job);
            effects.push(Effect::StorePayload {
                job: id,
                payload: new.payload,
            });
            results.push(Ok(id));
        }
        results
    }

    fn index_pending(&mut self, job: &Job) {
        if job.run_at_ms > self.now_ms {
            self.delayed.insert((job.run_at_ms, job.id));
        } else {
            self.ready.insert((-(job.priority as i64), job.id));
        }
    }

    fn unindex_pending(&mut self, job: &Job) {
        self.delayed.remove(&(job.run_at_ms, job.id));
        self.ready.remove(&(-(job.priority as i64), job.id));
    }

    fn set_status(&mut self, job: &mut Job, status: JobStatus) {
        *self.counts.slot(job.status) -= 1;
        *self.counts.slot(status) += 1;
        job.status = status;
        job.updated_at_ms = self.now_ms;
    }

    fn assign(
        &mut self,
        log_index: u64,
        assignments: Vec<Assignment>,
        effects: &mut Vec<Effect>,
    ) -> Response {
        if assignments.len() > ASSIGN_BATCH_MAX {
            let err = Rejection::BatchTooLarge {
                got: assignments.len(),
                max: ASSIGN_BATCH_MAX,
            };
            return Response::Assigned {
                started: 0,
                rejected: assignments.iter().map(|a| (a.job, err.clone())).collect(),
            };
        }
        let mut started = 0;
        let mut rejected = Vec::new();
        for a in assignments {
            match self.assign_one(log_index, &a) {
                Ok(start) => {
                    started += 1;
                    effects.push(Effect::Start(start));
                }
                Err(why) => rejected.push((a.job, why)),
            }
        }
        Response::Assigned { started, rejected }
    }

    fn assign_one(&mut self, token: u64, a: &Assignment) -> Result<StartAttempt, Rejection> {
        if self.leaving.contains_key(&a.node) {
            return Err(Rejection::Draining(a.node));
        }
        let node = self.current_node(NodeLease {
            node: a.node,
            incarnation: a.incarnation,
        })?;
        if node.expired {
            return Err(Rejection::Expired {
                node: a.node,
                incarnation: a.incarnation,
            });
        }
        let slots = node.slots as usize;
        if self.running_on(a.node) >= slots {
            return Err(Rejection::NoSlot(a.node));
        }
        let mut job = self
            .jobs
            .remove(&a.job)
            .ok_or(Rejection::UnknownJob(a.job))?;
        let checked = if job.status != JobStatus::Pending {
            Err(Rejection::NotPending(job.status.as_str().to_string()))
        } else if job.run_at_ms > self.now_ms {
            Err(Rejection::NotDue(job.run_at_ms))
        } else if job.attempts.last().is_some_and(|last| last.token >= token) {
            // Tokens come from log indexes, so this cannot happen for a well-formed log; refusing
            // keeps the token order an invariant even for a malformed one.
            Err(Rejection::StaleAttempt {
                got: token,
                current: job.attempts.last().map(|l| l.token),
            })
        } else {
            Ok(())
        };
        if let Err(why) = checked {
            self.jobs.insert(job.id, job);
            return Err(why);
        }
        self.unindex_pending(&job);
        self.set_status(&mut job, JobStatus::Running);
        let number = job.attempts.len() as u32 + 1;
        job.attempts.push(Attempt {
            number,
            token,
            node: a.node,
            incarnation: a.incarnation,
            started_at_ms: self.now_ms,
            ended_at_ms: None,
            end: None,
        });
        self.running.entry(a.node).or_default().insert(job.id);
        let start = StartAttempt {
            job: job.id,
            token,
            attempt: number,
            node: a.node,
            incarnation: a.incarnation,
            queue: job.queue.clone(),
            kind: job.kind.clone(),
            timeout_ms: job.timeout_ms,
        };
        self.jobs.insert(job.id, job);
        Ok(start)
    }

    fn complete(&mut self, completions: Vec<Completion>, effects: &mut Vec<Effect>) -> Response {
        if completions.len() > COMPLETE_BATCH_MAX {
            let err = Rejection::BatchTooLarge {
                got: completions.len(),
                max: COMPLETE_BATCH_MAX,
            };
            return Response::Completed {
                accepted: 0,
                rejected: completions.iter().map(|c| (c.job, err.clone())).collect(),
            };
        }
        let mut accepted = 0;
        let mut rejected = Vec::new();
        for c in completions {
            let job_id = c.job;
            match self.complete_one(c, effects) {
                Ok(()) => accepted += 1,
                Err(why) => {
                    if matches!(why, Rejection::StaleAttempt { .. }) {
                        self.counts.stale_completions += 1;
                    }
                    rejected.push((job_id, why));
                }
            }
        }
        Response::Completed { accepted, rejected }
    }

    fn complete_one(&mut self, c: Completion, effects: &mut Vec<Effect>) -> Result<(), Rejection> {
        let mut job = self
            .jobs
            .remove(&c.job)
            .ok_or(Rejection::UnknownJob(c.job))?;
        let current = job.current_attempt().map(|a| a.token);
        if current != Some(c.token) {
            self.jobs.insert(job.id, job);
            return Err(Rejection::StaleAttempt {
                got: c.token,
                current,
            });
        }
        let end = match c.outcome {
            Outcome::Succeeded { result } => {
                job.result = Some(truncate_bytes(result, RESULT_BYTES_MAX));
                AttemptEnd::Succeeded
            }
            Outcome::Failed { error, retryable } => AttemptEnd::Failed {
                error: truncate_str(error, ERROR_BYTES_MAX),
                retryable,
            },
            Outcome::Abandoned { reason } => AttemptEnd::Abandoned {
                reason: truncate_str(reason, ERROR_BYTES_MAX),
            },
        };
        self.end_current_attempt(&mut job, end, effects);
        self.jobs.insert(job.id, job);
        Ok(())
    }

    /// Ends a running job's current attempt and moves the job on: to success, to a retry, or to
    /// failure.
    fn end_current_attempt(&mut self, job: &mut Job, end: AttemptEnd, effects: &mut Vec<Effect>) {
        let now = self.now_ms;
        let Some(attempt) = job.attempts.last_mut() else {
            return;
        };
        attempt.ended_at_ms = Some(now);
        attempt.end = Some(end.clone());
        let node = attempt.node;
        if let Some(set) = self.running.get_mut(&node) {
            set.remove(&job.id);
            if set.is_empty() {
                self.running.remove(&node);
            }
        }
        let next = match end {
            AttemptEnd::Succeeded => JobStatus::Succeeded,
            AttemptEnd::Failed { error, retryable } => {
                job.failures += 1;
                job.last_error = Some(error);
                if retryable && job.failures < job.max_attempts {
                    job.run_at_ms = now.saturating_add(retry_backoff_ms(job.failures));
                    JobStatus::Pending
                } else {
                    JobStatus::Failed
                }
            }
            AttemptEnd::Abandoned { reason } => {
                job.abandoned += 1;
                job.last_error = Some(reason);
                if job.abandoned < ABANDONED_ATTEMPTS_MAX {
                    job.run_at_ms = now;
                    JobStatus::Pending
                } else {
                    JobStatus::Failed
                }
            }
        };
        self.set_status(job, next);
        if next == JobStatus::Pending {
            self.index_pending(job);
        } else {
            effects.push(Effect::DropPayload { job: job.id });
        }
    }

    fn register_node(
        &mut self,
        r: NodeRegistration,
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
        let previous = self.nodes.get(&r.node).map(|n| n.incarnation);
        if let Some(current) = previous {
            if r.incarnation < current {
                return Err(Rejection::StaleIncarnation {
                    node: r.node,
                    got: r.incarnation,
                    current,
                });
            }
        }
        // A node that drained itself to stop and has started again stays.
        let restarted = previous.is_some_and(|current| r.incarnation > current);
        if restarted
            && self
                .leaving
                .get(&r.node)
                .is_some_and(|l| l.reason == LeaveReason::Stopping)
        {
            self.leaving.remove(&r.node);
        }
        let same = self
            .nodes
            .get(&r.node)
            .filter(|n| n.incarnation == r.incarnation);
        let expired = same.is_some_and(|n| n.expired);
        let renewed_at_ms = same.map_or(0, |n| n.renewed_at_ms);
        self.nodes.insert(
            r.node,
            NodeEntry {
                incarnation: r.incarnation,
                slots: r.slots,
                addr: r.addr,
                registered_at_ms: self.now_ms,
                renewed_at_ms,
                expired,
            },
        );
        // Attempts of an older incarnation can never report: that process is gone (its data
        // directory is locked by the new one). Requeue them now instead of waiting for a lease.
        let held: Vec<JobId> = self
            .running
            .get(&r.node)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let mut requeued = 0;
        for id in held {
            let Some(mut job) = self.jobs.remove(&id) else {
                continue;
            };
            let stale = job
                .current_attempt()
                .is_some_and(|a| a.incarnation < r.incarnation);
            if stale {
                let reason = format!("node {} restarted (incarnation {})", r.node, r.incarnation);
                // The effects go to the caller: a job abandoned ABANDONED_ATTEMPTS_MAX times fails
                // here, and its DropPayload used to be discarded, leaking the payload in storage.
                self.end_current_attempt(&mut job, AttemptEnd::Abandoned { reason }, effects);
                requeued += 1;
            }
            self.jobs.insert(id, job);
        }
        Ok(requeued)
    }

    /// The entry of `lease.node`, if `lease.incarnation` is its current incarnation (shared by
    /// assign, renew and expire).
    fn current_node(&mut self, lease: NodeLease) -> Result<&mut NodeEntry, Rejection> {
        if self.removed.contains_key(&lease.node) {
            return Err(Rejection::Removed(lease.node));
        }
        let node = self
            .nodes
            .get_mut(&lease.node)
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

    /// A committed lease renewal: counts only for the node's current, unexpired incarnation.
    fn renew(&mut self, lease: NodeLease, effects: &mut Vec<Effect>) -> Result<(), Rejection> {
        let now = self.now_ms;
        let node = self.current_node(lease)?;
        if node.expired {
            return Err(Rejection::Expired {
                node: lease.node,
                incarnation: lease.incarnation,
            });
        }
        node.renewed_at_ms = now;
        effects.push(Effect::Renewed(lease));
        Ok(())
    }

    /// The leader decided this incarnation's lease lapsed: abandon its attempts (their jobs are
    /// requeued and will be reassigned with larger tokens) and refuse it further work.
    fn expire(&mut self, lease: NodeLease, effects: &mut Vec<Effect>) -> Result<u32, Rejection> {
        let node = self.current_node(lease)?;
        if node.expired {
            return Ok(0);
        }
        node.expired = true;
        let held: Vec<JobId> = self
            .running
            .get(&lease.node)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let mut requeued = 0;
        for id in held {
            let Some(mut job) = self.jobs.remove(&id) else {
                continue;
            };
            let reason = format!(
                "lease of node {} (incarnation {}) expired",
                lease.node, lease.incarnation
            );
            self.end_current_attempt(&mut job, AttemptEnd::Abandoned { reason }, effects);
            requeued += 1;
            self.jobs.insert(id, job);
        }
        Ok(requeued)
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

    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
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

    /// The jobs running on `node` now.
    pub fn jobs_running_on(&self, node: NodeId) -> impl Iterator<Item = &Job> + '_ {
        self.running
            .get(&node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.jobs.get(id))
    }

    /// How many jobs are running on `node` now.
    pub fn running_on(&self, node: NodeId) -> usize {
        self.running.get(&node).map_or(0, |s| s.len())
    }

    /// Pending jobs due now, highest priority first, then in submission order.
    pub fn ready_jobs(&self) -> impl Iterator<Item = JobId> + '_ {
        self.ready.iter().map(|&(_, id)| id)
    }

    /// Pending jobs due by `now_ms` that were delayed, earliest first.
    pub fn due_delayed_jobs(&self, now_ms: u64) -> impl Iterator<Item = JobId> + '_ {
        self.delayed
            .iter()
            .take_while(move |&&(at, _)| at <= now_ms)
            .map(|&(_, id)| id)
    }

    /// Checks that the indexes agree with the job records. A broken index is a bug in this
    /// module, never bad input; tests call this after every command.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut counts = StateCounts {
            stale_completions: self.counts.stale_completions,
            ..StateCounts::default()
        };
        for job in self.jobs.values() {
            *counts.slot(job.status) += 1;
            let pending_indexed = self.ready.contains(&(-(job.priority as i64), job.id))
                || self.delayed.contains(&(job.run_at_ms, job.id));
            if (job.status == JobStatus::Pending) != pending_indexed {
                return Err(format!("job {} pending index disagrees", job.id));
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
        }
        if let Some(&(at, id)) = self.delayed.first() {
            if at <= self.now_ms {
                return Err(format!("job {id} is due at {at} but not ready"));
            }
        }
        if counts != self.counts {
            return Err(format!("counts {:?} != {:?}", self.counts, counts));
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
