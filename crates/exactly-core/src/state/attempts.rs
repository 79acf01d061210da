//! Starting attempts (Assign) and ending them (Complete, and the shared end-of-attempt logic
//! that retries, dead-letters or finishes a job).

use super::{truncate_bytes, truncate_str, JobTable};
use crate::command::{
    Assignment, Completion, Effect, NodeLease, Outcome, Rejection, Response, StartAttempt,
};
use crate::job::{Attempt, AttemptEnd, Job, JobStatus};
use crate::limits::{
    ABANDONS_RERUN_AT_ONCE, ABANDON_DELAY_MAX_MS, ASSIGN_BATCH_MAX, COMPLETE_BATCH_MAX,
    ERROR_BYTES_MAX, RESULT_BYTES_MAX,
};
use crate::records::Records;
use crate::retry::retry_delay_ms;

impl<R: Records> JobTable<R> {
    pub(super) fn assign(
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
            match self.assign_one(log_index, &a, effects) {
                Ok(start) => {
                    started += 1;
                    effects.push(Effect::Start(start));
                }
                Err(why) => rejected.push((a.job, why)),
            }
        }
        Response::Assigned { started, rejected }
    }

    /// Checks that the assignment's node can take an attempt now.
    fn check_node(&mut self, a: &Assignment) -> Result<(), Rejection> {
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
        Ok(())
    }

    /// Checks that the job can start now with `token` (state, due time, ordering key, token
    /// order, queue limits), without changing anything.
    fn check_job(&self, token: u64, job: &Job) -> Result<(), Rejection> {
        if job.status != JobStatus::Pending {
            return Err(Rejection::NotPending(job.status.as_str().to_string()));
        }
        if job.run_at_ms > self.now_ms {
            return Err(Rejection::NotDue(job.run_at_ms));
        }
        if !self.eligible(job) {
            return Err(Rejection::OrderingBlocked(
                job.ordering_key.clone().unwrap_or_default(),
            ));
        }
        if job.attempts.last().is_some_and(|last| last.token >= token) {
            // Tokens come from log indexes, so this cannot happen for a well-formed log; refusing
            // keeps the token order an invariant even for a malformed one.
            return Err(Rejection::StaleAttempt {
                got: token,
                current: job.attempts.last().map(|l| l.token),
            });
        }
        let Some(queue) = self.queues.get(&job.queue) else {
            // A live job always has its queue's state; a missing one is our bug, refused here
            // rather than panicking on every replica.
            return Err(Rejection::Invalid(format!(
                "queue {} has no state",
                job.queue
            )));
        };
        if queue.config.paused {
            return Err(Rejection::QueuePaused(job.queue.clone()));
        }
        let max = queue.config.concurrency_max;
        if max > 0 && queue.running >= max {
            return Err(Rejection::QueueBusy {
                queue: job.queue.clone(),
                max,
            });
        }
        if let Some(rate) = &queue.config.rate {
            if rate.take(queue.rate_tat_us, self.now_ms).is_none() {
                return Err(Rejection::RateLimited(job.queue.clone()));
            }
        }
        Ok(())
    }

    fn assign_one(
        &mut self,
        token: u64,
        a: &Assignment,
        effects: &mut Vec<Effect>,
    ) -> Result<StartAttempt, Rejection> {
        self.check_node(a)?;
        if let Some(f) = self.finished_job(a.job) {
            return Err(Rejection::NotPending(f.status.as_str().to_string()));
        }
        let mut job = self.job(a.job).ok_or(Rejection::UnknownJob(a.job))?;
        self.check_job(token, &job)?;
        let now = self.now_ms;
        if let Some(queue) = self.queues.get_mut(&job.queue) {
            if let Some(rate) = queue.config.rate {
                if let Some(tat) = rate.take(queue.rate_tat_us, now) {
                    queue.rate_tat_us = tat;
                }
            }
        }
        self.unindex_pending(&job);
        let number = job.attempts.len() as u32 + 1;
        job.attempts.push(Attempt {
            number,
            token,
            node: a.node,
            incarnation: a.incarnation,
            started_at_ms: now,
            ended_at_ms: None,
            end: None,
        });
        self.transition(&mut job, JobStatus::Running, effects);
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
            idempotency_key: job.effective_idempotency_key(),
        };
        self.insert_job(&job);
        Ok(start)
    }

    pub(super) fn complete(
        &mut self,
        completions: Vec<Completion>,
        entropy: u64,
        effects: &mut Vec<Effect>,
    ) -> Response {
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
            match self.complete_one(c, entropy, effects) {
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

    fn complete_one(
        &mut self,
        c: Completion,
        entropy: u64,
        effects: &mut Vec<Effect>,
    ) -> Result<(), Rejection> {
        if let Some(f) = self.finished_job(c.job) {
            // As for a record in the table: no attempt is current; the report of the attempt a
            // client cancelled is expected.
            return Err(if f.cancelled_token == c.token && c.token != 0 {
                Rejection::Finished(JobStatus::Cancelled.as_str().to_string())
            } else {
                Rejection::StaleAttempt {
                    got: c.token,
                    current: None,
                }
            });
        }
        let mut job = self.job(c.job).ok_or(Rejection::UnknownJob(c.job))?;
        let current = job.current_attempt().map(|a| a.token);
        if current != Some(c.token) {
            // The late report of an attempt a client cancelled is expected, not a fencing event.
            let cancelled = job
                .attempts
                .iter()
                .any(|a| a.token == c.token && matches!(a.end, Some(AttemptEnd::Cancelled { .. })));
            return Err(if cancelled {
                Rejection::Finished(JobStatus::Cancelled.as_str().to_string())
            } else {
                Rejection::StaleAttempt {
                    got: c.token,
                    current,
                }
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
        self.end_current_attempt(&mut job, end, false, entropy, effects);
        self.put_job(job, effects);
        Ok(())
    }

    /// Ends a running job's current attempt and moves the job on: to success, to a retry after
    /// a jittered backoff (drawn from the leader's `entropy`), to the dead letters, or to
    /// cancelled. An abandoned attempt requeues the job at once, unless its node was lost under
    /// it (`node_lost`: restarted or expired, which the job itself may have caused) after
    /// [`ABANDONS_RERUN_AT_ONCE`] abandons in a row.
    pub(super) fn end_current_attempt(
        &mut self,
        job: &mut Job,
        end: AttemptEnd,
        node_lost: bool,
        entropy: u64,
        effects: &mut Vec<Effect>,
    ) {
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
                    let delay = retry_delay_ms(job.failures, job.backoff, entropy, job.id);
                    job.run_at_ms = now.saturating_add(delay);
                    JobStatus::Pending
                } else {
                    JobStatus::Dead
                }
            }
            // Not the job's doing: no attempt is consumed and the job never dies of it.
            AttemptEnd::Abandoned { reason } => {
                job.abandoned += 1;
                job.last_error = Some(reason);
                let delay = if node_lost {
                    abandon_delay_ms(job, entropy)
                } else {
                    0
                };
                job.run_at_ms = now.saturating_add(delay);
                JobStatus::Pending
            }
            AttemptEnd::Cancelled { reason } => {
                job.last_error = Some(reason);
                JobStatus::Cancelled
            }
        };
        self.transition(job, next, effects);
        if next == JobStatus::Pending {
            self.index_pending(job);
        }
    }
}

/// How long a job whose node was just lost under it (its `abandoned` count already raised) waits
/// before it may run again: nothing while it has been abandoned at most
/// [`ABANDONS_RERUN_AT_ONCE`] times in a row (since its last other end or redrive), then its retry
/// backoff, capped at [`ABANDON_DELAY_MAX_MS`]. A job that keeps taking its node down with it
/// thus slows down instead of crash-looping the cluster.
fn abandon_delay_ms(job: &Job, entropy: u64) -> u64 {
    let beyond = job
        .abandoned_in_a_row()
        .saturating_sub(ABANDONS_RERUN_AT_ONCE);
    if beyond == 0 {
        return 0;
    }
    retry_delay_ms(beyond, job.backoff, entropy, job.id).min(ABANDON_DELAY_MAX_MS)
}
