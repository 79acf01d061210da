//! `exactly status` (and `exactly cluster status`): the cluster as one node (the leader, when it
//! can be asked) sees it. Fetching is in `cluster.rs`; this is the layout.

use exactly_client::{JobCounts, Member, StatusResponse};

use crate::output::{key_values, or_dash, Table};

/// The status as human-readable text: node and log positions, a members table (role, health,
/// replication lag, running jobs, drains), removed nodes, and job counts. `now_ms` (the wall
/// clock) turns drain deadlines into "in 41s".
pub fn render(status: &StatusResponse, now_ms: u64) -> String {
    let leader = if status.leader_id == 0 {
        "none known".to_string()
    } else {
        status.leader_id.to_string()
    };
    let mut pairs = vec![
        ("node", status.node_id.to_string()),
        ("leader", leader),
        ("term", status.term.to_string()),
        ("last log index", status.last_log_index.to_string()),
        ("committed index", status.committed_index.to_string()),
        ("applied index", status.applied_index.to_string()),
    ];
    if !status.removed_node_ids.is_empty() {
        let removed: Vec<String> = status.removed_node_ids.iter().map(u64::to_string).collect();
        pairs.push(("removed nodes", removed.join(", ")));
    }
    let mut out = key_values(&pairs);
    out.push('\n');
    let mut members = Table::new(&[
        "ID",
        "ADDR",
        "ROLE",
        "LEADER",
        "HEALTH",
        "LAG",
        "RUNNING",
        "SLOTS",
        "INCARNATION",
        "DRAIN",
    ]);
    for m in &status.members {
        members.row(vec![
            m.node_id.to_string(),
            or_dash(&m.addr),
            or_dash(&m.role),
            if m.leader { "*".into() } else { String::new() },
            or_dash(&m.health),
            m.lag.map_or_else(|| "-".into(), |lag| lag.to_string()),
            m.running.to_string(),
            m.slots.to_string(),
            m.incarnation.to_string(),
            drain_text(m, now_ms),
        ]);
    }
    out.push_str(&members.render());
    out.push('\n');
    let counts = status.counts.unwrap_or_default();
    let mut jobs = Table::new(&[
        "PENDING",
        "RUNNING",
        "SUCCEEDED",
        "DEAD",
        "CANCELLED",
        "STALE COMPLETIONS",
    ]);
    jobs.row(vec![
        counts.pending.to_string(),
        counts.running.to_string(),
        counts.succeeded.to_string(),
        counts.dead.to_string(),
        counts.cancelled.to_string(),
        counts.stale_completions.to_string(),
    ]);
    out.push_str(&jobs.render());
    out
}

/// The DRAIN cell: empty unless the member is draining.
fn drain_text(m: &Member, now_ms: u64) -> String {
    if !m.draining {
        String::new()
    } else if m.drain_deadline_ms > now_ms {
        format!(
            "deadline in {}s",
            (m.drain_deadline_ms - now_ms).div_ceil(1000)
        )
    } else {
        "past deadline".into()
    }
}

/// The status for `--json`; field names follow the proto.
#[derive(Debug, serde::Serialize)]
pub struct StatusView {
    node_id: u64,
    /// 0 when no leader is known.
    leader_id: u64,
    term: u64,
    last_log_index: u64,
    committed_index: u64,
    applied_index: u64,
    members: Vec<MemberView>,
    counts: CountsView,
    removed_node_ids: Vec<u64>,
}

/// One member for `--json`.
#[derive(Debug, serde::Serialize)]
pub struct MemberView {
    node_id: u64,
    addr: String,
    role: String,
    leader: bool,
    matched_index: u64,
    slots: u32,
    running: u32,
    incarnation: u64,
    health: String,
    lease_age_ms: u64,
    /// Entries behind the leader's log; null when a follower answered.
    lag: Option<u64>,
    draining: bool,
    /// Unix milliseconds (leader clock); 0 unless draining.
    drain_deadline_ms: u64,
}

/// Job counts by state for `--json`.
#[derive(Debug, serde::Serialize)]
pub struct CountsView {
    pending: u64,
    running: u64,
    succeeded: u64,
    dead: u64,
    cancelled: u64,
    stale_completions: u64,
}

impl From<&Member> for MemberView {
    fn from(m: &Member) -> Self {
        MemberView {
            node_id: m.node_id,
            addr: m.addr.clone(),
            role: m.role.clone(),
            leader: m.leader,
            matched_index: m.matched_index,
            slots: m.slots,
            running: m.running,
            incarnation: m.incarnation,
            health: m.health.clone(),
            lease_age_ms: m.lease_age_ms,
            lag: m.lag,
            draining: m.draining,
            drain_deadline_ms: m.drain_deadline_ms,
        }
    }
}

impl From<JobCounts> for CountsView {
    fn from(c: JobCounts) -> Self {
        CountsView {
            pending: c.pending,
            running: c.running,
            succeeded: c.succeeded,
            dead: c.dead,
            cancelled: c.cancelled,
            stale_completions: c.stale_completions,
        }
    }
}

impl From<&StatusResponse> for StatusView {
    fn from(s: &StatusResponse) -> Self {
        StatusView {
            node_id: s.node_id,
            leader_id: s.leader_id,
            term: s.term,
            last_log_index: s.last_log_index,
            committed_index: s.committed_index,
            applied_index: s.applied_index,
            members: s.members.iter().map(MemberView::from).collect(),
            counts: s.counts.unwrap_or_default().into(),
            removed_node_ids: s.removed_node_ids.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StatusResponse {
        let member = |id: u64, leader: bool| Member {
            node_id: id,
            addr: format!("127.0.0.1:710{id}"),
            role: if id == 3 { "learner" } else { "voter" }.into(),
            leader,
            matched_index: 1200 + id,
            slots: 16,
            running: id as u32,
            incarnation: 1,
            health: if id == 3 { "silent" } else { "ok" }.into(),
            lease_age_ms: 100 * id,
            lag: Some(3 - id),
            draining: id == 3,
            drain_deadline_ms: if id == 3 { NOW + 40_500 } else { 0 },
        };
        StatusResponse {
            node_id: 1,
            leader_id: 2,
            term: 7,
            last_log_index: 1204,
            committed_index: 1203,
            applied_index: 1202,
            members: vec![member(1, false), member(2, true), member(3, false)],
            counts: Some(JobCounts {
                pending: 4,
                running: 6,
                succeeded: 10_000,
                dead: 2,
                cancelled: 0,
                stale_completions: 1,
            }),
            removed_node_ids: vec![4, 7],
        }
    }

    const NOW: u64 = 1_700_000_000_000;

    /// The human view lists node, leader, log indexes, removed nodes, members with a leader
    /// marker, health, lag, running jobs and drains, and the counts.
    #[test]
    fn renders_status() {
        assert_eq!(
            render(&sample(), NOW),
            "\
node             1
leader           2
term             7
last log index   1204
committed index  1203
applied index    1202
removed nodes    4, 7

ID  ADDR            ROLE     LEADER  HEALTH  LAG  RUNNING  SLOTS  INCARNATION  DRAIN
1   127.0.0.1:7101  voter            ok      2    1        16     1
2   127.0.0.1:7102  voter    *       ok      1    2        16     1
3   127.0.0.1:7103  learner          silent  0    3        16     1            deadline in 41s

PENDING  RUNNING  SUCCEEDED  DEAD  CANCELLED  STALE COMPLETIONS
4        6        10000      2     0          1
"
        );
    }

    /// A follower's answer has no lag (shown as `-`), a past drain deadline says so, and a
    /// cluster without removed nodes prints no such line.
    #[test]
    fn renders_follower_view_and_past_deadlines() {
        let mut status = sample();
        status.removed_node_ids.clear();
        for m in &mut status.members {
            m.lag = None;
        }
        let text = render(&status, NOW + 60_000);
        assert!(!text.contains("removed nodes"), "{text}");
        assert!(
            text.contains("3   127.0.0.1:7103  learner          silent  -    3        16     1            past deadline\n"),
            "{text}"
        );
    }

    /// Without a known leader the human view says so instead of printing node 0.
    #[test]
    fn renders_unknown_leader() {
        let status = StatusResponse {
            leader_id: 0,
            ..sample()
        };
        assert!(render(&status, NOW).contains("leader           none known\n"));
    }

    /// The JSON view nests members and counts under their proto names.
    #[test]
    fn json_view_nests_members_and_counts() {
        let value = serde_json::to_value(StatusView::from(&sample())).unwrap();
        assert_eq!(value["leader_id"], 2);
        assert_eq!(value["members"][1]["leader"], true);
        assert_eq!(value["counts"]["succeeded"], 10_000);
        assert_eq!(value["members"][2]["draining"], true);
        assert_eq!(value["members"][2]["health"], "silent");
        assert_eq!(value["removed_node_ids"], serde_json::json!([4, 7]));
    }
}
