//! The public gRPC API (`exactly.v1`): validation at the edge, conversions between wire and
//! domain types, and the one place where errors become `tonic::Status` (`status_of` for the
//! state machine's refusals, `From<ProposeError>` for Raft's answers).
//!
//! Submodules hold one service each: `jobs` (Submit, Get, List, Cancel, Watch), `admin`
//! (DeadLetters, Queues), `schedules` (Schedules), and `convert` (wire <-> domain conversions).
//! The Cluster service lives here.

use exactly_core::{LeaveReason, Rejection};
use exactly_proto::v1 as pb;
use exactly_proto::v1::cluster_server::Cluster;
use openraft::async_runtime::WatchReceiver;
use tonic::{Request, Response, Status};

use crate::config::DRAIN_DEADLINE_MAX;
use crate::internal::JoinReply;
use crate::membership::LeaveError;
use crate::node::{Node, ProposeError};

mod admin;
pub mod consistency;
pub mod convert;
mod jobs;
mod schedules;
mod tokens;

pub use admin::{DeadLettersService, QueuesService};
pub use convert::job_to_pb;
pub use jobs::JobsService;
pub use schedules::SchedulesService;
pub use tokens::TokensService;

pub struct ClusterService {
    pub node: Node,
}

/// The status a client gets for a refusal by the state machine. `context` names the item
/// (`jobs[3]`, `job 17`) so the message says which one.
pub fn status_of(context: &str, why: &Rejection) -> Status {
    let message = format!("{context}: {why}");
    match why {
        Rejection::Invalid(_) => Status::invalid_argument(message),
        Rejection::IdempotencyConflict { .. } | Rejection::KeyConflictInBatch(_) => {
            Status::already_exists(message)
        }
        Rejection::ScheduleExists(_) | Rejection::TokenExists(_) | Rejection::TokenDigestInUse => {
            Status::already_exists(message)
        }
        Rejection::UnknownJob(_) | Rejection::UnknownSchedule(_) | Rejection::UnknownToken(_) => {
            Status::not_found(message)
        }
        Rejection::Finished(_) | Rejection::NotPending(_) => Status::failed_precondition(message),
        Rejection::TooManyQueues(_)
        | Rejection::TooManySchedules(_)
        | Rejection::BatchTooLarge { .. }
        | Rejection::TooManyTokens(_)
        | Rejection::Full(_) => Status::resource_exhausted(message),
        // The rest are refusals of the cluster's own commands (assignments, leases): a client
        // can never cause them, so one reaching a client is our bug.
        _ => Status::internal(message),
    }
}

/// The refusal of a node past its bounds: `RESOURCE_EXHAUSTED` with a `retry-after-ms` header
/// (the client's sign that nothing was proposed and a retry after the hint is safe; the same code
/// without the header is a limit of the request itself, which a retry cannot pass).
pub(crate) fn overloaded(message: String) -> Status {
    let mut status = Status::resource_exhausted(message);
    status.metadata_mut().insert(
        "retry-after-ms",
        tonic::metadata::MetadataValue::from(crate::group::RETRY_AFTER.as_millis() as u64),
    );
    status
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
            ProposeError::StoppedInFlight(_) | ProposeError::LeaderChanged(_) => {
                Status::unknown(e.to_string())
            }
            ProposeError::Unexpected(_) => Status::internal(e.to_string()),
            // Refused before anything was proposed.
            ProposeError::Overloaded(_) => overloaded(e.to_string()),
            // Nothing was proposed, and any other node can take the call: UNAVAILABLE makes a
            // client go on to its next endpoint (found by the container test: a client that
            // reached a drained node got its batch refused).
            ProposeError::Departed(_) => Status::unavailable(e.to_string()),
        }
    }
}

/// The highest log index known committed: on the leader, the index a majority of voters has
/// matched; elsewhere, the applied index (a follower learns commits only as it applies them).
fn committed_index(
    metrics: &openraft::RaftMetrics<exactly_store::TypeConfig>,
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

/// Audit records per page when the request sets no limit, and at most.
const AUDIT_PAGE_DEFAULT: usize = 100;
const AUDIT_PAGE_MAX: usize = 1_000;

impl ClusterService {
    /// Validates and proposes a drain of `id` with `deadline` (0 for a removal).
    async fn drain_node(
        &self,
        by: String,
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
        let running = node.propose_drain(id, deadline, reason, Some(by)).await?;
        Ok(pb::DrainResponse {
            node_id: id,
            running,
        })
    }

    /// Admits a node, on the leader or through it.
    async fn join_node(
        &self,
        by: String,
        id: u64,
        addr: String,
    ) -> Result<pb::JoinResponse, ClusterError> {
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
            Some((leader, _)) if leader == node.id => {
                crate::internal::admit(node, id, addr, by).await
            }
            Some((_, leader_addr)) => {
                let mut client = node
                    .peer(&leader_addr)
                    .map_err(|e| ClusterError::JoinFailed {
                        node: id,
                        why: e.to_string(),
                    })?;
                let blob = client
                    .join(exactly_proto::internal::JoinRequest {
                        node_id: id,
                        addr,
                        by,
                    })
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
        let by = crate::auth::actor(&request);
        let pb::DrainRequest {
            node_id,
            deadline_ms,
        } = request.into_inner();
        let deadline = std::time::Duration::from_millis(deadline_ms);
        Ok(Response::new(
            self.drain_node(by, node_id, deadline, LeaveReason::Drained)
                .await?,
        ))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let by = crate::auth::actor(&request);
        let id = request.into_inner().node_id;
        Ok(Response::new(
            self.drain_node(by, id, std::time::Duration::ZERO, LeaveReason::Removed)
                .await?,
        ))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let by = crate::auth::actor(&request);
        let pb::JoinRequest { node_id, addr } = request.into_inner();
        Ok(Response::new(self.join_node(by, node_id, addr).await?))
    }

    async fn audit(
        &self,
        request: Request<pb::AuditRequest>,
    ) -> Result<Response<pb::AuditResponse>, Status> {
        let at = consistency::before_read(&self.node, &request).await?;
        let pb::AuditRequest { after_index, limit } = request.into_inner();
        let limit = match limit {
            0 => AUDIT_PAGE_DEFAULT,
            n if n as usize > AUDIT_PAGE_MAX => {
                return Err(Status::invalid_argument(format!(
                    "limit {n} exceeds the maximum of {AUDIT_PAGE_MAX}"
                )))
            }
            n => n as usize,
        };
        let records = self.node.read(|t| {
            let trail = t.audit();
            let page: Vec<_> = if after_index == 0 {
                trail
                    .iter()
                    .skip(trail.len().saturating_sub(limit))
                    .collect()
            } else {
                trail
                    .iter()
                    .filter(|r| r.index > after_index)
                    .take(limit)
                    .collect()
            };
            page.into_iter()
                .map(|r| pb::AuditRecord {
                    index: r.index,
                    at_ms: r.at_ms,
                    by: r.by.clone(),
                    action: r.action.clone(),
                    outcome: r.outcome.clone(),
                })
                .collect()
        });
        Ok(consistency::stamped(
            Response::new(pb::AuditResponse { records }),
            at,
        ))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let at = consistency::before_read(&self.node, &request).await?;
        Ok(consistency::stamped(
            Response::new(cluster_status(&self.node)),
            at,
        ))
    }
}

/// The cluster as this node sees it: membership and roles from Raft, health and jobs per node
/// from its replica (the Status call and the dashboard).
pub(crate) fn cluster_status(node: &Node) -> pb::StatusResponse {
    {
        let metrics = node.raft.metrics().borrow_watched().clone();
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
        pb::StatusResponse {
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
                dead: counts.dead,
                cancelled: counts.cancelled,
                stale_completions: counts.stale_completions,
            }),
            removed_node_ids: removed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only outcomes where nothing was proposed are UNAVAILABLE (safe to retry elsewhere).
    #[test]
    fn propose_errors_map_to_retry_safe_codes_only_when_nothing_was_proposed() {
        let d = std::time::Duration::from_secs(1);
        let code = |e| Status::from(e).code();
        assert_eq!(code(ProposeError::NoLeader(d)), tonic::Code::Unavailable);
        assert_eq!(code(ProposeError::Departed(7)), tonic::Code::Unavailable);
        assert_eq!(
            code(ProposeError::ShuttingDown("x".into())),
            tonic::Code::Unavailable
        );
        assert_eq!(
            code(ProposeError::Timeout(d)),
            tonic::Code::DeadlineExceeded
        );
        assert_eq!(
            code(ProposeError::StoppedInFlight("x".into())),
            tonic::Code::Unknown
        );
        assert_eq!(code(ProposeError::LeaderChanged(3)), tonic::Code::Unknown);
    }
}
