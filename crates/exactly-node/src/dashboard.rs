//! The web dashboard on the node's HTTP port: `GET /` is one self-contained page (no external
//! scripts, styles or fonts: it works on an air-gapped network) that polls `GET /api/status`
//! every second and shows the cluster as this node sees it: members with roles, health,
//! replication lag and jobs per node, drains and removed nodes, job counts, queues, schedules
//! and the newest jobs.
//!
//! Everything is read from this node's replica and its Raft metrics (nothing is proposed), so
//! a dashboard keeps answering on a node cut off from the leader and shows what that node
//! knows (its applied index and whether it is ready are on the page).

use axum::extract::State;
use axum::response::Html;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::node::Node;

/// Jobs the page lists (the newest by id).
pub const DASHBOARD_JOBS_MAX: usize = 30;
/// Queues and schedules the page lists, at most (the first by name).
pub const DASHBOARD_ROWS_MAX: usize = 100;

/// The dashboard's routes (state: the node).
pub fn routes() -> Router<Node> {
    Router::new()
        .route("/", get(page))
        .route("/api/status", get(status))
}

async fn page() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

#[derive(Serialize)]
pub struct DashboardStatus {
    pub node: ThisNode,
    pub members: Vec<MemberRow>,
    pub removed: Vec<String>,
    pub counts: Counts,
    pub queues: Vec<QueueRow>,
    pub queues_total: usize,
    pub schedules: Vec<ScheduleRow>,
    pub schedules_total: usize,
    pub jobs: Vec<JobRow>,
    /// Leader time of the last applied entry (Unix ms).
    pub now_ms: u64,
}

/// Ids are strings: they are 63-bit and JavaScript numbers are not.
#[derive(Serialize)]
pub struct ThisNode {
    pub id: String,
    pub addr: String,
    pub leader_id: String,
    pub term: u64,
    pub last_log_index: u64,
    pub committed_index: u64,
    pub applied_index: u64,
    /// Why this node is not ready (`/readyz`), or null.
    pub not_ready: Option<String>,
    /// What this node serves beyond its machine without TLS or tokens (`--insecure`).
    pub insecure: Vec<&'static str>,
}

#[derive(Serialize)]
pub struct MemberRow {
    pub id: String,
    pub addr: String,
    pub role: String,
    pub leader: bool,
    pub health: String,
    /// Entries behind the leader (known on the leader only).
    pub lag: Option<u64>,
    pub running: u32,
    pub slots: u32,
    pub incarnation: u64,
    pub draining: bool,
    pub drain_deadline_ms: u64,
    pub lease_age_ms: u64,
}

#[derive(Serialize)]
pub struct Counts {
    pub pending: u64,
    pub running: u64,
    pub succeeded: u64,
    pub dead: u64,
    pub cancelled: u64,
    pub stale_completions: u64,
}

#[derive(Serialize)]
pub struct QueueRow {
    pub name: String,
    pub pending: u64,
    pub running: u32,
    pub concurrency_max: u32,
    /// `N/period`, e.g. `10/1s`, or null.
    pub rate: Option<String>,
    pub paused: bool,
}

#[derive(Serialize)]
pub struct ScheduleRow {
    pub name: String,
    pub cron: String,
    /// IANA time zone the expression is read in.
    pub tz: String,
    pub queue: String,
    pub kind: String,
    pub paused: bool,
    pub next_tick_ms: Option<u64>,
    pub last_job: Option<String>,
}

#[derive(Serialize)]
pub struct JobRow {
    pub id: String,
    pub queue: String,
    pub kind: String,
    pub status: &'static str,
    pub attempts: usize,
    /// Node and fencing token of the latest attempt.
    pub node: Option<String>,
    pub token: Option<u64>,
    pub updated_at_ms: u64,
    pub last_error: Option<String>,
}

/// What the page shows, read from this node.
pub fn dashboard_status(node: &Node) -> DashboardStatus {
    let status = crate::api::cluster_status(node);
    let counts = status.counts.unwrap_or_default();
    let members = status
        .members
        .iter()
        .map(|m| MemberRow {
            id: m.node_id.to_string(),
            addr: m.addr.clone(),
            role: m.role.clone(),
            leader: m.leader,
            health: m.health.clone(),
            lag: m.lag,
            running: m.running,
            slots: m.slots,
            incarnation: m.incarnation,
            draining: m.draining,
            drain_deadline_ms: m.drain_deadline_ms,
            lease_age_ms: m.lease_age_ms,
        })
        .collect();
    let (queues, queues_total, schedules, schedules_total, jobs, now_ms) =
        node.state.read_jobs(|t, archive| {
            let queues = t
                .queues()
                .iter()
                .take(DASHBOARD_ROWS_MAX)
                .map(|(name, q)| QueueRow {
                    name: name.clone(),
                    pending: q.live().saturating_sub(u64::from(q.running())),
                    running: q.running(),
                    concurrency_max: q.config.concurrency_max,
                    rate: q.config.rate.as_ref().map(|r| {
                        format!(
                            "{}/{}",
                            r.jobs,
                            humantime::format_duration(std::time::Duration::from_millis(
                                r.period_ms
                            ))
                        )
                    }),
                    paused: q.config.paused,
                })
                .collect::<Vec<_>>();
            let schedules = t
                .schedules()
                .values()
                .take(DASHBOARD_ROWS_MAX)
                .map(|s| ScheduleRow {
                    name: s.name.clone(),
                    cron: s.cron.expr().to_string(),
                    tz: s.cron.tz().to_string(),
                    queue: s.job.queue.clone(),
                    kind: s.job.kind.clone(),
                    paused: s.paused,
                    next_tick_ms: s.next_tick_ms,
                    last_job: s.last_job.map(|j| j.to_string()),
                })
                .collect::<Vec<_>>();
            let jobs = t
                .all_jobs_newest()
                .filter_map(|listed| match listed {
                    exactly_core::Listed::Record(job) => Some(*job),
                    // A record that cannot be read is left out of this overview (Get reports it).
                    exactly_core::Listed::Archived(id, _) => archive.finished(t, id).ok().flatten(),
                })
                .take(DASHBOARD_JOBS_MAX)
                .map(|j| {
                    let last = j.attempts.last();
                    JobRow {
                        id: j.id.to_string(),
                        queue: j.queue.clone(),
                        kind: j.kind.clone(),
                        status: j.status.as_str(),
                        attempts: j.attempts.len(),
                        node: last.map(|a| a.node.to_string()),
                        token: last.map(|a| a.token),
                        updated_at_ms: j.updated_at_ms,
                        last_error: j.last_error.clone(),
                    }
                })
                .collect::<Vec<_>>();
            (
                queues,
                t.queues().len(),
                schedules,
                t.schedules().len(),
                jobs,
                t.now_ms(),
            )
        });
    DashboardStatus {
        node: ThisNode {
            id: node.id.to_string(),
            addr: node.addr.clone(),
            leader_id: status.leader_id.to_string(),
            term: status.term,
            last_log_index: status.last_log_index,
            committed_index: status.committed_index,
            applied_index: status.applied_index,
            not_ready: node.not_ready(),
            insecure: node.config.exposure(),
        },
        members,
        removed: status
            .removed_node_ids
            .iter()
            .map(|id| id.to_string())
            .collect(),
        counts: Counts {
            pending: counts.pending,
            running: counts.running,
            succeeded: counts.succeeded,
            dead: counts.dead,
            cancelled: counts.cancelled,
            stale_completions: counts.stale_completions,
        },
        queues,
        queues_total,
        schedules,
        schedules_total,
        jobs,
        now_ms,
    }
}

async fn status(State(node): State<Node>) -> Json<DashboardStatus> {
    Json(dashboard_status(&node))
}
