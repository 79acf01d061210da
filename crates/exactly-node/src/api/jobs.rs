//! The Jobs service: Submit, Get, List, Cancel and Watch.

use std::pin::Pin;

use exactly_core::limits::{CANCEL_BATCH_MAX, SUBMIT_BATCH_JOBS_MAX};
use exactly_core::{Listed, Proposal, Rejection};
use exactly_proto::v1 as pb;
use exactly_proto::v1::jobs_server::Jobs;
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use super::consistency::{before_read, stamped};
use super::convert::{event_to_pb, job_to_pb, new_job, state_from_pb, state_to_pb};
use super::status_of;
use crate::events::Positioned;
use crate::node::Node;

/// Jobs one List call returns, at most.
pub const LIST_LIMIT_MAX: u32 = 1000;
/// Jobs one List call looks at, at most, however selective its filter: past it the call returns
/// what it found with a `next_after_id` to continue from, so a list never scans without bound.
pub const LIST_SCAN_MAX: usize = 100_000;
/// Archived records (of succeeded and cancelled jobs, read from disk) one List call reads, at
/// most: a filter by kind reads each finished job it looks at. Past it the call returns what
/// it found with a `next_after_id`, as for [`LIST_SCAN_MAX`].
pub const LIST_ARCHIVE_READS_MAX: usize = 2 * LIST_LIMIT_MAX as usize;
/// Events buffered per watch stream between the hub and the client's connection.
const WATCH_STREAM_EVENTS_MAX: usize = 1024;

pub struct JobsService {
    pub node: Node,
    /// The public port's credentials: a Watch stream ends once its token is no longer admitted.
    pub tokens: std::sync::Arc<crate::auth::TokenSet>,
}

/// How often a Watch stream checks that its token is still admitted (revoked, expired, or gone
/// from the tokens file: the stream ends with `UNAUTHENTICATED` within this).
pub const WATCH_CREDENTIAL_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::JobEventMessage, Status>> + Send>>;

impl JobsService {
    /// Job `id`'s record on this replica: from the table, or from the archive if it finished.
    fn job_pb(&self, id: u64) -> Result<Option<pb::Job>, Status> {
        self.node
            .state
            .job(id)
            .map(|job| job.as_ref().map(job_to_pb))
            .map_err(|e| Status::internal(format!("reading job {id}: {e}")))
    }

    /// Job `id`'s payload from this replica's payloads tree, if `wanted` and still held (a
    /// pending, running or dead job's; a sled read, off the async workers).
    async fn payload_of(&self, id: u64, wanted: bool) -> Result<Option<Vec<u8>>, Status> {
        if !wanted {
            return Ok(None);
        }
        let store = self.node.store.clone();
        tokio::task::spawn_blocking(move || store.payload(id))
            .await
            .map_err(|e| Status::internal(format!("reading job {id}'s payload: {e}")))?
            .map_err(|e| Status::internal(format!("reading job {id}'s payload: {e}")))
    }
}

#[tonic::async_trait]
impl Jobs for JobsService {
    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let received = std::time::Instant::now();
        let credential = crate::auth::credential_of(&request).cloned();
        let specs = request.into_inner().jobs;
        if specs.is_empty() {
            return Err(Status::invalid_argument("submit needs at least one job"));
        }
        if specs.len() > SUBMIT_BATCH_JOBS_MAX {
            return Err(Status::resource_exhausted(format!(
                "{} jobs in one submit exceeds the limit of {SUBMIT_BATCH_JOBS_MAX}",
                specs.len()
            )));
        }
        let jobs = specs
            .into_iter()
            .enumerate()
            .map(|(i, spec)| new_job(&self.node, &format!("jobs[{i}]"), spec))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(credential) = credential {
            if let Some((i, job)) = jobs
                .iter()
                .enumerate()
                .find(|(_, job)| !credential.may_submit_to(&job.queue))
            {
                return Err(Status::permission_denied(format!(
                    "jobs[{i}]: token {:?} may not submit to queue {:?}; nothing was submitted",
                    credential.name, job.queue
                )));
            }
        }
        let live = self.node.read(|t| t.counts().live());
        let max = self.node.config.limits.jobs_live_max;
        if live + jobs.len() as u64 > max {
            return Err(Status::resource_exhausted(format!(
                "{live} jobs are pending or running; limits.jobs-live-max is {max}"
            )));
        }
        let submitter = self
            .node
            .submitter
            .get()
            .ok_or_else(|| Status::unavailable("node is starting; nothing was proposed"))?;
        let (results, index) = match submitter.submit(jobs).await {
            Ok(outcome) => outcome?,
            Err(
                refused @ (crate::group::Refused::Full { .. }
                | crate::group::Refused::Overloaded { .. }),
            ) => return Err(super::overloaded(refused.to_string())),
            Err(refused @ crate::group::Refused::Closed) => {
                return Err(Status::unavailable(refused.to_string()))
            }
        };
        // The batch is all or nothing: report the refusal that caused it.
        let refused = results.iter().enumerate().find_map(|(i, r)| match r {
            Err(Rejection::BatchRejected) | Ok(_) => None,
            Err(why) => Some((i, why.clone())),
        });
        if let Some((i, why)) = refused {
            return Err(status_of(&format!("jobs[{i}]"), &why));
        }
        let mut reply = pb::SubmitResponse::default();
        for (i, r) in results.into_iter().enumerate() {
            let submitted = r.map_err(|why| status_of(&format!("jobs[{i}]"), &why))?;
            reply.job_ids.push(submitted.id);
            reply.existing.push(submitted.existing);
        }
        if let Some(&job) = reply.job_ids.first() {
            tracing::trace!(
                target: exactly_store::TIMELINE,
                job,
                index,
                took_us = received.elapsed().as_micros() as u64,
                "submitted"
            );
        }
        Ok(stamped(Response::new(reply), index))
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let at = before_read(&self.node, &request).await?;
        let pb::GetRequest {
            job_id: id,
            include_payload,
        } = request.into_inner();
        if let Some(job) = self.job_pb(id)? {
            let payload = self.payload_of(id, include_payload).await?;
            return Ok(stamped(
                Response::new(pb::GetResponse {
                    job: Some(job),
                    payload,
                }),
                at,
            ));
        }
        // This replica may lag the leader by a few milliseconds: catch up to the leader's read
        // index (over the peer port) before saying the job does not exist.
        if self
            .node
            .leader()
            .is_some_and(|(leader, _)| leader != self.node.id)
        {
            let index = self.node.read_index().await.map_err(|why| {
                Status::unavailable(format!(
                    "job {id} is not on this node yet and the leader's read index is unknown \
                     ({why}); retry"
                ))
            })?;
            if !self
                .node
                .await_applied(index, super::consistency::READ_WAIT_MAX)
                .await
            {
                return Err(Status::unavailable(format!(
                    "job {id} is not on this node yet and it is behind the leader; retry"
                )));
            }
            if let Some(job) = self.job_pb(id)? {
                let payload = self.payload_of(id, include_payload).await?;
                return Ok(stamped(
                    Response::new(pb::GetResponse {
                        job: Some(job),
                        payload,
                    }),
                    super::consistency::applied(&self.node),
                ));
            }
        }
        Err(Status::not_found(format!("job {id} does not exist")))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let at = before_read(&self.node, &request).await?;
        let r = request.into_inner();
        let state = state_from_pb(r.state)?;
        let limit = match r.limit {
            0 => 100,
            n if n > LIST_LIMIT_MAX => {
                return Err(Status::invalid_argument(format!(
                    "limit {n} exceeds the maximum of {LIST_LIMIT_MAX}"
                )))
            }
            n => n,
        } as usize;
        let reply = self.node.state.read_jobs(|t, archive| {
            let mut jobs = Vec::new();
            let mut last_seen = None;
            let mut reads = 0;
            for (scanned, listed) in t.all_jobs_after(r.after_id).enumerate() {
                if jobs.len() == limit
                    || scanned == LIST_SCAN_MAX
                    || reads == LIST_ARCHIVE_READS_MAX
                {
                    break;
                }
                last_seen = Some(listed.id());
                let job = match listed {
                    Listed::Record(job) => *job,
                    Listed::Archived(id, f) => {
                        // What the table keeps of a finished job decides queue and state
                        // without reading its record.
                        if !(r.queue.is_empty() || *f.queue == r.queue)
                            || state.is_some_and(|s| f.status != s)
                        {
                            continue;
                        }
                        reads += 1;
                        let archived = archive
                            .finished(t, id)
                            .map_err(|e| Status::internal(format!("reading job {id}: {e}")))?;
                        match archived {
                            Some(job) => job,
                            None => continue,
                        }
                    }
                };
                let keep = (r.queue.is_empty() || job.queue == r.queue)
                    && (r.kind.is_empty() || job.kind == r.kind)
                    && state.is_none_or(|s| job.status == s);
                if keep {
                    jobs.push(job_to_pb(&job));
                }
            }
            // More may follow if the page or a budget filled up.
            let more = last_seen.is_some_and(|id| t.all_jobs_after(id).next().is_some());
            Ok::<_, Status>(pb::ListResponse {
                jobs,
                next_after_id: if more { last_seen.unwrap_or(0) } else { 0 },
            })
        })?;
        Ok(stamped(Response::new(reply), at))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let by = crate::auth::actor(&request);
        let ids = request.into_inner().job_ids;
        if ids.is_empty() {
            return Err(Status::invalid_argument("cancel needs at least one job id"));
        }
        if ids.len() > CANCEL_BATCH_MAX {
            return Err(Status::resource_exhausted(format!(
                "{} jobs in one cancel exceeds the limit of {CANCEL_BATCH_MAX}",
                ids.len()
            )));
        }
        let (results, index) = self.node.ask_as(by, Proposal::cancel(ids)).await?;
        Ok(stamped(
            Response::new(pb::CancelResponse {
                results: results
                    .into_iter()
                    .map(|(job_id, r)| match r {
                        Ok(was) => pb::CancelResult {
                            job_id,
                            previous_state: state_to_pb(was) as i32,
                            error: String::new(),
                            code: tonic::Code::Ok as i32,
                        },
                        // The same code a whole call refused for this reason would get.
                        Err(why) => pb::CancelResult {
                            job_id,
                            previous_state: pb::JobState::Unspecified as i32,
                            error: why.to_string(),
                            code: status_of(&format!("job {job_id}"), &why).code() as i32,
                        },
                    })
                    .collect(),
            }),
            index,
        ))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        // A watch "from now" starts no earlier than what the caller has seen.
        before_read(&self.node, &request).await?;
        let credential = crate::auth::credential_of(&request).cloned();
        let token = credential.as_ref().map(|c| c.name.clone());
        let tokens = self.tokens.clone();
        let r = request.into_inner();
        if r.job_id != 0 && !r.queue.is_empty() {
            return Err(Status::invalid_argument(
                "watch one job or one queue, not both",
            ));
        }
        let hub = self.node.events.clone();
        let per_token = self.node.config.limits.watch_streams_per_token_max as usize;
        let slot = hub
            .admit_watcher(token.as_deref(), per_token)
            .map_err(|refused| Status::resource_exhausted(refused.to_string()))?;
        let after = r.after.map(|p| (p.index, p.seq));
        let (backlog, mut live) = hub
            .subscribe(after)
            .map_err(|too_old| Status::out_of_range(too_old.to_string()))?;
        let wanted = move |e: &Positioned| {
            (r.job_id == 0 || e.event.job == r.job_id)
                && (r.queue.is_empty() || e.event.queue == r.queue)
        };
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_STREAM_EVENTS_MAX);
        let shutdown = self.node.shutdown.clone();
        tokio::spawn(async move {
            // Releases the watcher slot however the stream ends.
            let _slot = slot;
            let mut last = after;
            let mut recheck = tokio::time::interval(WATCH_CREDENTIAL_CHECK);
            recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for e in backlog {
                last = Some(e.position);
                if wanted(&e)
                    && tx
                        .send(Ok(event_to_pb(e.position, &e.event)))
                        .await
                        .is_err()
                {
                    return;
                }
            }
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    _ = recheck.tick() => {
                        if let Some(c) = &credential {
                            if !tokens.still_admits(c, crate::auth::Need::Read) {
                                let _ = tx
                                    .send(Err(Status::unauthenticated(format!(
                                        "token {:?} is no longer admitted (revoked, expired or \
                                         removed): the stream ends",
                                        c.name
                                    ))))
                                    .await;
                                return;
                            }
                        }
                        continue;
                    }
                    next = live.recv() => next,
                };
                match next {
                    Ok(e) => {
                        // Events already sent from the backlog come again live: skip them.
                        if last.is_some_and(|l| e.position <= l) {
                            continue;
                        }
                        last = Some(e.position);
                        tracing::trace!(target: exactly_store::TIMELINE, job = e.event.job, status = ?e.event.status, "watched");
                        if wanted(&e)
                            && tx
                                .send(Ok(event_to_pb(e.position, &e.event)))
                                .await
                                .is_err()
                        {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        // Too slow for the live feed: catch up from the ring if it still holds
                        // everything after the last event sent, else tell the client.
                        match hub.subscribe(last) {
                            Ok((backlog, fresh)) => {
                                live = fresh;
                                for e in backlog {
                                    last = Some(e.position);
                                    if wanted(&e)
                                        && tx
                                            .send(Ok(event_to_pb(e.position, &e.event)))
                                            .await
                                            .is_err()
                                    {
                                        return;
                                    }
                                }
                            }
                            Err(too_old) => {
                                let _ = tx
                                    .send(Err(Status::out_of_range(too_old.to_string())))
                                    .await;
                                return;
                            }
                        }
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
