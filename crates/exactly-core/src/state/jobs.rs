//! Creating jobs (with idempotency keys and ordering keys), cancelling them, queue settings, and
//! the dead-letter operations.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

use super::{JobTable, KeyRecord};
use crate::command::{DeadFilter, Effect, NewJob, QueuePatch, Rejection, Submitted};
use crate::job::{AttemptEnd, Job, JobStatus};
use crate::limits::{
    CANCEL_BATCH_MAX, DEAD_BATCH_MAX, QUEUES_MAX, SUBMIT_BATCH_JOBS_MAX, SUBMIT_GROUPS_MAX,
    SUBMIT_GROUP_JOBS_MAX,
};
use crate::queue::QueueConfig;
use crate::records::{layout, Records, Space};
use crate::JobId;

/// What an idempotency key is bound to: the parts of a submission a client chose (node defaults
/// such as max_attempts are left out, since nodes may be configured differently).
fn fingerprint(job: &NewJob) -> [u8; 16] {
    let mut hasher = Sha256::new();
    for part in [job.queue.as_bytes(), job.kind.as_bytes(), &job.payload] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

impl<R: Records> JobTable<R> {
    pub(super) fn submit(
        &mut self,
        jobs: Vec<NewJob>,
        effects: &mut Vec<Effect>,
    ) -> Vec<Result<Submitted, Rejection>> {
        if jobs.len() > SUBMIT_BATCH_JOBS_MAX {
            let err = Rejection::BatchTooLarge {
                got: jobs.len(),
                max: SUBMIT_BATCH_JOBS_MAX,
            };
            return jobs.iter().map(|_| Err(err.clone())).collect();
        }
        // All or nothing: a batch with one bad job creates none, so a client never has to work
        // out which half of its batch committed.
        if let Some(refusals) = self.check_batch(&jobs) {
            return refusals;
        }
        jobs.into_iter()
            .map(|new| self.submit_one(new, None, effects))
            .collect()
    }

    /// Several Submits in one entry: each group all or nothing on its own, in order. A command
    /// over the limits refuses every job of it (`BatchTooLarge`), creating nothing.
    pub(super) fn submit_groups(
        &mut self,
        groups: Vec<Vec<NewJob>>,
        effects: &mut Vec<Effect>,
    ) -> Vec<Vec<Result<Submitted, Rejection>>> {
        let total: usize = groups.iter().map(Vec::len).sum();
        if total > SUBMIT_GROUP_JOBS_MAX || groups.len() > SUBMIT_GROUPS_MAX {
            let err = Rejection::BatchTooLarge {
                got: total,
                max: SUBMIT_GROUP_JOBS_MAX,
            };
            return groups
                .iter()
                .map(|g| g.iter().map(|_| Err(err.clone())).collect())
                .collect();
        }
        groups
            .into_iter()
            .map(|group| self.submit(group, effects))
            .collect()
    }

    /// Finds every refusal a batch would meet, without changing anything: `None` if the whole
    /// batch is acceptable, else one result per job (`BatchRejected` for the acceptable ones).
    fn check_batch(&self, jobs: &[NewJob]) -> Option<Vec<Result<Submitted, Rejection>>> {
        let mut seen_keys: BTreeMap<&str, [u8; 16]> = BTreeMap::new();
        let mut new_queues: BTreeSet<&str> = BTreeSet::new();
        let mut results = Vec::with_capacity(jobs.len());
        let mut refused = false;
        for new in jobs {
            let outcome = (|| {
                super::validate_new_job(new).map_err(Rejection::Invalid)?;
                super::validate_run_at(new.run_at_ms, self.now_ms).map_err(Rejection::Invalid)?;
                if let Some(key) = &new.idempotency_key {
                    let print = fingerprint(new);
                    if let Some(record) = self.idempotency_key(key) {
                        if record.fingerprint != print {
                            return Err(Rejection::IdempotencyConflict {
                                key: key.clone(),
                                job: record.job,
                            });
                        }
                        return Ok(());
                    }
                    match seen_keys.get(key.as_str()) {
                        Some(p) if *p != print => {
                            return Err(Rejection::KeyConflictInBatch(key.clone()))
                        }
                        Some(_) => return Ok(()),
                        None => {
                            seen_keys.insert(key, print);
                        }
                    }
                }
                if !self.queues.contains_key(&new.queue) {
                    new_queues.insert(&new.queue);
                    if self.queues.len() + new_queues.len() > QUEUES_MAX {
                        return Err(Rejection::TooManyQueues(QUEUES_MAX));
                    }
                }
                Ok(())
            })();
            refused |= outcome.is_err();
            results.push(outcome);
        }
        refused.then(|| {
            results
                .into_iter()
                .map(|r| match r {
                    Ok(()) => Err(Rejection::BatchRejected),
                    Err(why) => Err(why),
                })
                .collect()
        })
    }

    /// Creates one job (or finds the original of a repeated idempotency key). `schedule` names
    /// the cron schedule that fired it, if one did.
    pub(super) fn submit_one(
        &mut self,
        new: NewJob,
        schedule: Option<String>,
        effects: &mut Vec<Effect>,
    ) -> Result<Submitted, Rejection> {
        super::validate_new_job(&new).map_err(Rejection::Invalid)?;
        super::validate_run_at(new.run_at_ms, self.now_ms).map_err(Rejection::Invalid)?;
        let print = new.idempotency_key.as_ref().map(|_| fingerprint(&new));
        if let (Some(key), Some(print)) = (&new.idempotency_key, print) {
            if let Some(record) = self.idempotency_key(key) {
                return if record.fingerprint == print {
                    Ok(Submitted {
                        id: record.job,
                        existing: true,
                    })
                } else {
                    Err(Rejection::IdempotencyConflict {
                        key: key.clone(),
                        job: record.job,
                    })
                };
            }
        }
        if !self.queues.contains_key(&new.queue) && self.queues.len() >= QUEUES_MAX {
            return Err(Rejection::TooManyQueues(QUEUES_MAX));
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
            backoff: new.backoff,
            idempotency_key: new.idempotency_key,
            ordering_key: new.ordering_key,
            labels: new.labels,
            schedule,
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
        if let (Some(key), Some(fingerprint)) = (&job.idempotency_key, print) {
            let record = KeyRecord {
                job: id,
                fingerprint,
                created_at_ms: self.now_ms,
            };
            Self::write_key(&mut self.records, key, &record);
        }
        self.enqueue(&job);
        self.counts.pending += 1;
        effects.push(Effect::StorePayload {
            job: id,
            payload: new.payload,
        });
        effects.push(self.event(&job));
        self.insert_job(&job);
        Ok(Submitted::new(id))
    }

    /// Adds a (new or redriven) pending job to its queue and ordering line and indexes it.
    fn enqueue(&mut self, job: &Job) {
        self.queues.entry(job.queue.clone()).or_default().live += 1;
        if let Some(key) = &job.ordering_key {
            let mut line = self.line(&job.queue, key);
            line.push_back(job.id);
            self.set_line(&job.queue, key, &line);
        }
        self.index_pending(job);
    }

    fn event(&self, job: &Job) -> Effect {
        let attempt = job.attempts.last();
        Effect::Event(crate::command::JobEvent {
            job: job.id,
            queue: job.queue.clone(),
            status: job.status,
            attempt: attempt.map_or(0, |a| a.number),
            token: attempt.map_or(0, |a| a.token),
            node: attempt.map(|a| a.node),
            at_ms: self.now_ms,
        })
    }

    pub(super) fn cancel(
        &mut self,
        ids: Vec<JobId>,
        effects: &mut Vec<Effect>,
    ) -> Vec<(JobId, Result<JobStatus, Rejection>)> {
        if ids.len() > CANCEL_BATCH_MAX {
            let err = Rejection::BatchTooLarge {
                got: ids.len(),
                max: CANCEL_BATCH_MAX,
            };
            return ids.into_iter().map(|id| (id, Err(err.clone()))).collect();
        }
        ids.into_iter()
            .map(|id| (id, self.cancel_one(id, effects)))
            .collect()
    }

    fn cancel_one(&mut self, id: JobId, effects: &mut Vec<Effect>) -> Result<JobStatus, Rejection> {
        if let Some(f) = self.finished_job(id) {
            return Err(Rejection::Finished(f.status.as_str().to_string()));
        }
        let mut job = self.job(id).ok_or(Rejection::UnknownJob(id))?;
        let was = job.status;
        match was {
            JobStatus::Pending => {
                self.unindex_pending(&job);
                self.transition(&mut job, JobStatus::Cancelled, effects);
            }
            JobStatus::Running => {
                if let Some(attempt) = job.attempts.last() {
                    effects.push(Effect::Cancel {
                        job: id,
                        token: attempt.token,
                        node: attempt.node,
                    });
                }
                self.end_current_attempt(
                    &mut job,
                    AttemptEnd::Cancelled {
                        reason: "cancelled by a client".to_string(),
                    },
                    false,
                    0,
                    effects,
                );
            }
            terminal => {
                return Err(Rejection::Finished(terminal.as_str().to_string()));
            }
        }
        self.put_job(job, effects);
        Ok(was)
    }

    /// The dead letters a filter selects, oldest death first, at most its max.
    fn select_dead(&self, filter: &DeadFilter) -> Vec<JobId> {
        let max = (filter.max as usize).clamp(1, DEAD_BATCH_MAX);
        let matches = |job: &Job| {
            job.status == JobStatus::Dead
                && filter.queue.as_ref().is_none_or(|q| *q == job.queue)
                && filter.kind.as_ref().is_none_or(|k| *k == job.kind)
        };
        if filter.ids.is_empty() {
            self.dead_jobs()
                .filter(|job| matches(job))
                .map(|job| job.id)
                .take(max)
                .collect()
        } else {
            // A repeated id counts once: redriving one job twice in an entry would count and
            // enqueue it twice (an arithmetic overflow in apply on every replica).
            let mut seen = BTreeSet::new();
            filter
                .ids
                .iter()
                .filter(|&&id| self.job(id).is_some_and(|job| matches(&job)) && seen.insert(id))
                .copied()
                .take(max)
                .collect()
        }
    }

    /// Dead letters run again: failures and abandons reset, the attempt history kept (attempt
    /// numbers continue), placed at the back of their ordering line if they have a key.
    pub(super) fn redrive(&mut self, filter: &DeadFilter, effects: &mut Vec<Effect>) -> Vec<JobId> {
        let mut redriven = Vec::new();
        for id in self.select_dead(filter) {
            let Some(mut job) = self.job(id) else {
                continue;
            };
            if !self.queues.contains_key(&job.queue) && self.queues.len() >= QUEUES_MAX {
                continue;
            }
            let dead = layout::time_id(job.updated_at_ms, id);
            self.records.delete(Space::Dead, &dead);
            self.unretain(&job.queue, JobStatus::Dead);
            job.failures = 0;
            job.abandoned = 0;
            job.run_at_ms = self.now_ms;
            *self.counts.slot(JobStatus::Dead) -= 1;
            *self.counts.slot(JobStatus::Pending) += 1;
            job.status = JobStatus::Pending;
            job.updated_at_ms = self.now_ms;
            self.enqueue(&job);
            effects.push(self.event(&job));
            self.insert_job(&job);
            redriven.push(id);
        }
        redriven
    }

    /// Dead letters deleted, with their payloads.
    pub(super) fn purge_dead(
        &mut self,
        filter: &DeadFilter,
        effects: &mut Vec<Effect>,
    ) -> Vec<JobId> {
        let ids = self.select_dead(filter);
        for &id in &ids {
            self.delete_job(id, effects);
        }
        ids
    }

    /// Removes a terminal job from the table and its retention index.
    pub(super) fn delete_job(&mut self, id: JobId, effects: &mut Vec<Effect>) {
        if let Some(f) = self.finished_job(id) {
            self.records.delete(Space::Archived, &layout::u64_key(id));
            let finished = layout::time_id(f.finished_at_ms, id);
            self.records.delete(Space::Finished, &finished);
            self.unretain(&f.queue, f.status);
            *self.counts.slot(f.status) -= 1;
            effects.push(Effect::Unarchive { job: id });
            return;
        }
        let Some(job) = self.take_job(id) else {
            return;
        };
        let at = layout::time_id(job.updated_at_ms, id);
        self.records.delete(Space::Finished, &at);
        self.records.delete(Space::Dead, &at);
        self.unretain(&job.queue, job.status);
        *self.counts.slot(job.status) -= 1;
        // Succeeded and cancelled jobs dropped their payload when they finished.
        if job.status == JobStatus::Dead {
            effects.push(Effect::DropPayload { job: id });
        }
    }

    pub(super) fn configure_queue(
        &mut self,
        queue: String,
        patch: QueuePatch,
    ) -> Result<QueueConfig, Rejection> {
        if queue.is_empty() || queue.len() > crate::limits::QUEUE_NAME_BYTES_MAX {
            return Err(Rejection::Invalid(format!(
                "queue name must be 1..={} bytes, got {}",
                crate::limits::QUEUE_NAME_BYTES_MAX,
                queue.len()
            )));
        }
        super::check_no_control("queue name", &queue).map_err(Rejection::Invalid)?;
        let mut config = self
            .queues
            .get(&queue)
            .map(|q| q.config.clone())
            .unwrap_or_default();
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
        if !self.queues.contains_key(&queue) && self.queues.len() >= QUEUES_MAX {
            return Err(Rejection::TooManyQueues(QUEUES_MAX));
        }
        let state = self.queues.entry(queue.clone()).or_default();
        // A changed rate limit starts from a clean state rather than inheriting a debt computed
        // for another rate.
        if state.config.rate != config.rate {
            state.rate_tat_us = 0;
        }
        state.config = config.clone();
        self.forget_queue_if_idle(&queue);
        Ok(config)
    }
}
