//! The public gRPC API (`exactly.v1`): validation at the edge, conversions between wire and
//! domain types, and the one place per service where errors become `tonic::Status`.

use exactly_core::limits::SUBMIT_BATCH_JOBS_MAX;
use exactly_core::state::validate_new_job;
use exactly_core::{
    AttemptEnd, Command, Job, JobStatus, LeaveReason, NewJob, Rejection, Response as CoreResponse,
};
use exactly_proto::v1 as pb;
use exactly_proto::v1::cluster_server::Cluster;
use exactly_proto::v1::jobs_server::Jobs;
use tonic::{Request, Response, Status};

use crate::config::DRAIN_DEADLINE_MAX;
use crate::internal::JoinReply;
use crate::membership::LeaveError;
use crate::node::{Node, ProposeError};

pub struct JobsService {
    pub node: Node,
}

pub struct ClusterService {
    pub node: Node,
}

impl From<ProposeError> for Status {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::NoLeader(_) | ProposeError::ShuttingDown(_) => {
                Status::unavailable(e.to_string())
            }
            // Proposed but not committed in time: it may still commit, so this must not be a
            // code that clients treat as "safe to retry" (UNAVAILABLE).
            ProposeError::Timeout(_) => Status::deadline_exceeded(e.to_string()),
            ProposeError::StoppedInFlight(_) => Status::unknown(e.to_string()),
            ProposeError::Departed(_) => Status::failed_precondition(e.to_string()),
        }
    }
}

/// Turns a wire job spec into a domain job, applying this node's defaults and limits.
fn new_job(node: &Node, index: usize, spec: pb::JobSpec) -> Result<NewJob, Status> {
    let limits = &node.config.limits;
    let defaults = &node.config.defaults;
    if spec.payload.len() > limits.payload_bytes_max {
        return Err(Status::resource_exhausted(format!(
            "jobs[{index}]: payload of {} bytes exceeds limits.payload-bytes-max ({} bytes)",
            spec.payload.len(),
            limits.payload_bytes_max
        )));
    }
    if !node.registry.contains(&spec.kind) {
        let kinds: Vec<&str> = node.registry.kinds().collect();
        return Err(Status::invalid_argument(format!(
            "jobs[{index}]: unknown job kind {:?}; this node runs: {}",
            spec.kind,
            kinds.join(", ")
        )));
    }
    let job = NewJob {
        queue: if spec.queue.is_empty() {
            defaults.queue.clone()
        } else {
            spec.queue
        },
        kind: spec.kind,
        payload: spec.payload,
        priority: spec.priority,
        max_attempts: if spec.max_attempts == 0 {
            defaults.max_attempts
        } else {
            spec.max_attempts
        },
        timeout_ms: spec.timeout_ms,
        run_at_ms: spec.run_at_ms,
    };
    validate_new_job(&job)
        .map_err(|why| Status::invalid_argument(format!("jobs[{index}]: {why}")))?;
    Ok(job)
}

fn state_to_pb(status: JobStatus) -> pb::JobState {
    match status {
        JobStatus::Pending => pb::JobState::Pending,
        JobStatus::Running => pb::JobState::Running,
        JobStatus::Succeeded => pb::JobState::Succeeded,
        JobStatus::Failed => pb::JobState::Failed,
    }
}

/// The wire form of a job record.
pub fn job_to_pb(job: &Job) -> pb::Job {
    pb::Job {
        id: job.id,
        queue: job.queue.clone(),
        kind: job.kind.clone(),
        priority: job.priority,
        state: state_to_pb(job.status) as i32,
        payload_bytes: job.payload_len,
        max_attempts: job.max_attempts,
        timeout_ms: job.timeout_ms,
        created_at_ms: job.created_at_ms,
        updated_at_ms: job.updated_at_ms,
        run_at_ms: job.run_at_ms,
        attempts: job
            .attempts
            .iter()
            .map(|a| {
                let (outcome, error) = match &a.end {
                    None => ("", String::new()),
                    Some(AttemptEnd::Succeeded) => ("succeeded", String::new()),
                    Some(AttemptEnd::Failed { error, retryable }) => (
                        if *retryable {
                            "failed-retryable"
                        } else {
                            "failed"
                        },
                        error.clone(),
                    ),
                    Some(AttemptEnd::Abandoned { reason }) => ("abandoned", reason.clone()),
                };
                pb::Attempt {
                    number: a.number,
                    token: a.token,
                    node_id: a.node,
                    started_at_ms: a.started_at_ms,
                    ended_at_ms: a.ended_at_ms.unwrap_or(0),
                    outcome: outcome.to_string(),
                    error,
                }
            })
            .collect(),
        result: job.result.clone().unwrap_or_default(),
        last_error: job.last_error.clone().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Jobs for JobsService {
    async fn submit(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
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
            .map(|(i, spec)| new_job(&self.node, i, spec))
            .collect::<Result<Vec<_>, _>>()?;
        let live = self.node.read(|t| t.counts().live());
        let max = self.node.config.limits.jobs_live_max;
        if live + jobs.len() as u64 > max {
            return Err(Status::resource_exhausted(format!(
                "{live} jobs are pending or running; limits.jobs-live-max is {max}"
            )));
        }
        match self.node.propose(Command::Submit(jobs)).await? {
            CoreResponse::Submitted(results) => {
                let mut ids = Vec::with_capacity(results.len());
                for (i, r) in results.into_iter().enumerate() {
                    // Apply checks what the edge checked, so a refusal here means the nodes
                    // disagree on limits or versions: report it rather than hide it.
                    ids.push(r.map_err(|why| {
                        Status::internal(format!("jobs[{i}] refused by the state machine: {why}"))
                    })?);
                }
                Ok(Response::new(pb::SubmitResponse { job_ids: ids }))
            }
            other => Err(Status::internal(format!("unexpected response {other:?}"))),
        }
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        let id = request.into_inner().job_id;
        if let Some(job) = self.node.read(|t| t.job(id).map(job_to_pb)) {
            return Ok(Response::new(pb::GetResponse { job: Some(job) }));
        }
        // This replica may lag the leader by a few milliseconds: ask the leader before saying
        // the job does not exist.
        if let Some((leader, addr)) = self.node.leader() {
            if leader != self.node.id {
                let channel = crate::network::channel(&addr)
                    .map_err(|e| Status::unavailable(e.to_string()))?;
                let mut client = pb::jobs_client::JobsClient::new(channel);
                return client.get(pb::GetRequest { job_id: id }).await;
            }
        }
        Err(Status::not_found(format!("job {id} does not exist")))
    }
}

/// The highest log index known committed: on the leader, the index a majority of voters has
/// matched; elsewhere, the applied index (a follower learns commits only as it applies them).
fn committed_index(
    metrics: &openraft::RaftMetrics<u64, openraft::BasicNode>,
    voters: &std::collections::BTreeSet<u64>,
) -> u64 {
    let applied = metrics.last_applied.map_or(0, |l| l.index);
    let Some(replication) = metrics.replication.as_ref() else {
        return applied;
    };
    let mut matched: Vec<u64> = voters
        .iter()
        .map(|id| {
            if *id == metrics.id {
                metrics.last_log_index.unwrap_or(0)
            } else {
                replication
                    .get(id)
                    .and_then(|l| l.map(|l| l.index))
                    .unwrap_or(0)
            }
        })
        .collect();
    if matched.is_empty() {
        return applied;
    }
    matched.sort_unstable_by(|a, b| b.cmp(a));
    matched[matched.len() / 2].max(applied)
}

/// Why a cluster (membership) call failed. Becomes a `tonic::Status` in exactly one place, the
/// `From` impl below, with a code a script can branch on.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0}")]
    BadRequest(String),
    #[error("node {0} is not a member of this cluster (see `exactly cluster status`)")]
    NotMember(u64),
    #[error("node {0} was removed from the cluster; a removed node never comes back (start it with an empty data directory to join as a new node)")]
    Removed(u64),
    #[error(transparent)]
    Leave(#[from] LeaveError),
    #[error("the leader did not admit node {node}: {why}")]
    JoinFailed { node: u64, why: String },
    #[error("no leader is known; nothing was changed (the cluster may be electing: retry)")]
    NoLeader,
}

impl From<ClusterError> for Status {
    fn from(e: ClusterError) -> Self {
        let text = e.to_string();
        match e {
            ClusterError::BadRequest(_) => Status::invalid_argument(text),
            ClusterError::NotMember(_) => Status::not_found(text),
            ClusterError::Removed(_)
            | ClusterError::Leave(LeaveError::Removed(_) | LeaveError::LastVoter(_)) => {
                Status::failed_precondition(text)
            }
            ClusterError::Leave(LeaveError::Propose(p)) => p.into(),
            ClusterError::Leave(LeaveError::Refused(Rejection::TooManyLeaving { .. })) => {
                Status::resource_exhausted(text)
            }
            ClusterError::Leave(LeaveError::Refused(_)) => Status::failed_precondition(text),
            ClusterError::Leave(LeaveError::TimedOut { .. }) => Status::deadline_exceeded(text),
            // Nothing changed (the learner may have been added; joining again is harmless).
            ClusterError::JoinFailed { .. } | ClusterError::NoLeader => Status::unavailable(text),
        }
    }
}

/// A member's health as a word, from the replicated lease state (`lease_age_ms` in leader time).
fn health(
    entry: Option<&exactly_core::NodeEntry>,
    lease_age_ms: u64,
    quiet_ms: u64,
) -> &'static str {
    match entry {
        None => "unregistered",
        Some(e) if e.expired => "expired",
        Some(_) if lease_age_ms > quiet_ms => "silent",
        Some(_) => "ok",
    }
}

impl ClusterService {
    /// Validates and proposes a drain of `id` with `deadline` (0 for a removal).
    async fn drain_node(
        &self,
        id: u64,
        deadline: std::time::Duration,
        reason: LeaveReason,
    ) -> Result<pb::DrainResponse, ClusterError> {
        let node = &self.node;
        if id == 0 {
            return Err(ClusterError::BadRequest("node_id is required".into()));
        }
        if deadline > DRAIN_DEADLINE_MAX {
            return Err(ClusterError::BadRequest(format!(
                "a drain deadline of {deadline:?} exceeds the limit of {DRAIN_DEADLINE_MAX:?}"
            )));
        }
        let (removed, known) = node.read(|t| {
            (
                t.is_removed(id),
                t.nodes().contains_key(&id) || t.leaving(id).is_some(),
            )
        });
        if removed {
            return Err(ClusterError::Removed(id));
        }
        if !known && !node.is_member(id) {
            return Err(ClusterError::NotMember(id));
        }
        if node.is_last_voter(id) {
            return Err(LeaveError::LastVoter(id).into());
        }
        let running = node.propose_drain(id, deadline, reason).await?;
        Ok(pb::DrainResponse {
            node_id: id,
            running,
        })
    }

    /// Admits a node, on the leader or through it.
    async fn join_node(&self, id: u64, addr: String) -> Result<pb::JoinResponse, ClusterError> {
        let node = &self.node;
        if id == 0 || addr.is_empty() {
            return Err(ClusterError::BadRequest(
                "join needs the node's id and address".into(),
            ));
        }
        if node.read(|t| t.is_removed(id)) {
            return Err(ClusterError::Removed(id));
        }
        let reply = match node.leader() {
            Some((leader, _)) if leader == node.id => crate::internal::admit(node, id, addr).await,
            Some((_, leader_addr)) => {
                let mut client = node
                    .peer(&leader_addr)
                    .map_err(|e| ClusterError::JoinFailed {
                        node: id,
                        why: e.to_string(),
                    })?;
                let blob = client
                    .join(exactly_proto::internal::JoinRequest { node_id: id, addr })
                    .await
                    .map_err(|status| ClusterError::JoinFailed {
                        node: id,
                        why: status.message().to_string(),
                    })?;
                crate::codec::decode::<JoinReply>(&blob.into_inner().data).map_err(|e| {
                    ClusterError::JoinFailed {
                        node: id,
                        why: e.to_string(),
                    }
                })?
            }
            None => return Err(ClusterError::NoLeader),
        };
        match reply {
            JoinReply::Joined { voter } => Ok(pb::JoinResponse { voter }),
            JoinReply::Removed => Err(ClusterError::Removed(id)),
            JoinReply::NotLeader => Err(ClusterError::NoLeader),
            JoinReply::Failed(why) => Err(ClusterError::JoinFailed { node: id, why }),
        }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let pb::DrainRequest {
            node_id,
            deadline_ms,
        } = request.into_inner();
        let deadline = std::time::Duration::from_millis(deadline_ms);
        Ok(Response::new(
            self.drain_node(node_id, deadline, LeaveReason::Drained)
                .await?,
        ))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let id = request.into_inner().node_id;
        Ok(Response::new(
            self.drain_node(id, std::time::Duration::ZERO, LeaveReason::Removed)
                .await?,
        ))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let pb::JoinRequest { node_id, addr } = request.into_inner();
        Ok(Response::new(self.join_node(node_id, addr).await?))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let node = &self.node;
        let metrics = node.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let replication = metrics.replication.clone().unwrap_or_default();
        let (counts, registered, running, leaving, removed, now_ms) = node.read(|t| {
            let registered = t.nodes().clone();
            let running: std::collections::BTreeMap<u64, usize> = registered
                .keys()
                .map(|&id| (id, t.running_on(id)))
                .collect();
            (
                t.counts().clone(),
                registered,
                running,
                t.leaving_nodes().clone(),
                t.removed_nodes().keys().copied().collect::<Vec<u64>>(),
                t.now_ms(),
            )
        });
        let leading = metrics.current_leader == Some(node.id);
        let last_log = metrics.last_log_index.unwrap_or(0);
        let quiet_ms = (node.config.lease.renew_interval * crate::lease::QUIET_AFTER_RENEWALS)
            .as_millis() as u64;
        let members = membership
            .nodes()
            .map(|(&id, n)| {
                let reg = registered.get(&id);
                let lease_age_ms = reg
                    .filter(|r| r.renewed_at_ms > 0)
                    .map_or(0, |r| now_ms.saturating_sub(r.renewed_at_ms));
                let matched = if id == node.id {
                    Some(last_log)
                } else {
                    replication.get(&id).map(|l| l.map_or(0, |l| l.index))
                };
                let drain = leaving.get(&id);
                pb::Member {
                    node_id: id,
                    addr: n.addr.clone(),
                    role: if voters.contains(&id) {
                        "voter"
                    } else {
                        "learner"
                    }
                    .to_string(),
                    leader: metrics.current_leader == Some(id),
                    matched_index: replication
                        .get(&id)
                        .and_then(|l| l.map(|l| l.index))
                        .unwrap_or(0),
                    slots: reg.map_or(0, |r| r.slots),
                    running: running.get(&id).copied().unwrap_or(0) as u32,
                    incarnation: reg.map_or(0, |r| r.incarnation),
                    health: health(reg, lease_age_ms, quiet_ms).to_string(),
                    lease_age_ms,
                    lag: matched
                        .filter(|_| leading)
                        .map(|m| last_log.saturating_sub(m)),
                    draining: drain.is_some(),
                    drain_deadline_ms: drain.map_or(0, |d| d.deadline_ms),
                }
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            node_id: node.id,
            leader_id: metrics.current_leader.unwrap_or(0),
            term: metrics.current_term,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            committed_index: committed_index(&metrics, &voters),
            applied_index: metrics.last_applied.map_or(0, |l| l.index),
            members,
            counts: Some(pb::JobCounts {
                pending: counts.pending,
                running: counts.running,
                succeeded: counts.succeeded,
                failed: counts.failed,
                stale_completions: counts.stale_completions,
            }),
            removed_node_ids: removed,
        }))
    }
}
