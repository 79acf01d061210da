//! The public gRPC API (`exactly.v1`): validation at the edge, conversions between wire and
//! domain types, and the one place where errors become `tonic::Status` (`status_of` for the
//! state machine's refusals, `From<ProposeError>` for Raft's answers).
//!
//! Submodules hold one service each: `jobs` (Submit, Get, List, Cancel, Watch), `admin`
//! (DeadLetters, Queues), `schedules` (Schedules), and `convert` (wire <-> domain conversions).
//! The Cluster service lives here.

use exactly_core::Rejection;
use exactly_proto::v1 as pb;
use exactly_proto::v1::cluster_server::Cluster;
use tonic::{Request, Response, Status};

use crate::node::{Node, ProposeError};

mod admin;
pub mod convert;
mod jobs;
mod schedules;

pub use admin::{DeadLettersService, QueuesService};
pub use convert::job_to_pb;
pub use jobs::JobsService;
pub use schedules::SchedulesService;

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
        Rejection::ScheduleExists(_) => Status::already_exists(message),
        Rejection::UnknownJob(_) | Rejection::UnknownSchedule(_) => Status::not_found(message),
        Rejection::Finished(_) | Rejection::NotPending(_) => Status::failed_precondition(message),
        Rejection::TooManyQueues(_)
        | Rejection::TooManySchedules(_)
        | Rejection::BatchTooLarge { .. }
        | Rejection::Full(_) => Status::resource_exhausted(message),
        // The rest are refusals of the cluster's own commands (assignments, leases): a client
        // can never cause them, so one reaching a client is our bug.
        _ => Status::internal(message),
    }
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
        }
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

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let node = &self.node;
        let metrics = node.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let replication = metrics.replication.clone().unwrap_or_default();
        let (counts, registered, running) = node.read(|t| {
            let registered = t.nodes().clone();
            let running: std::collections::BTreeMap<u64, usize> = registered
                .keys()
                .map(|&id| (id, t.running_on(id)))
                .collect();
            (t.counts().clone(), registered, running)
        });
        let members = membership
            .nodes()
            .map(|(&id, n)| {
                let reg = registered.get(&id);
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
                dead: counts.dead,
                cancelled: counts.cancelled,
                stale_completions: counts.stale_completions,
            }),
        }))
    }
}
