//! `exactly status`: the cluster as the answering node sees it.

use exactly_client::{Client, JobCounts, Member, StatusResponse};

use crate::output::{emit, emit_json, key_values, or_dash, Table};

/// Runs `exactly status`.
pub async fn run(client: &Client, json: bool) -> anyhow::Result<()> {
    let status = client.status().await?;
    if json {
        emit_json(&StatusView::from(&status))
    } else {
        emit(&render(&status))
    }
}

/// The status as human-readable text: node and log positions, a members table, job counts.
pub fn render(status: &StatusResponse) -> String {
    let leader = if status.leader_id == 0 {
        "none known".to_string()
    } else {
        status.leader_id.to_string()
    };
    let mut out = key_values(&[
        ("node", status.node_id.to_string()),
        ("leader", leader),
        ("term", status.term.to_string()),
        ("last log index", status.last_log_index.to_string()),
        ("committed index", status.committed_index.to_string()),
        ("applied index", status.applied_index.to_string()),
    ]);
    out.push('\n');
    let mut members = Table::new(&[
        "ID",
        "ADDR",
        "ROLE",
        "LEADER",
        "MATCHED",
        "SLOTS",
        "RUNNING",
        "INCARNATION",
    ]);
    for m in &status.members {
        members.row(vec![
            m.node_id.to_string(),
            or_dash(&m.addr),
            or_dash(&m.role),
            if m.leader { "*".into() } else { String::new() },
            m.matched_index.to_string(),
            m.slots.to_string(),
            m.running.to_string(),
            m.incarnation.to_string(),
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
            role: "voter".into(),
            leader,
            matched_index: 1200 + id,
            slots: 16,
            running: id as u32,
            incarnation: 1,
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
        }
    }

    /// The human view lists node, leader, log indexes, members with a leader marker, and counts
    /// by state (dead letters and cancelled jobs separately).
    #[test]
    fn renders_status() {
        assert_eq!(
            render(&sample()),
            "\
node             1
leader           2
term             7
last log index   1204
committed index  1203
applied index    1202

ID  ADDR            ROLE   LEADER  MATCHED  SLOTS  RUNNING  INCARNATION
1   127.0.0.1:7101  voter          1201     16     1        1
2   127.0.0.1:7102  voter  *       1202     16     2        1
3   127.0.0.1:7103  voter          1203     16     3        1

PENDING  RUNNING  SUCCEEDED  DEAD  CANCELLED  STALE COMPLETIONS
4        6        10000      2     0          1
"
        );
    }

    /// Without a known leader the human view says so instead of printing node 0.
    #[test]
    fn renders_unknown_leader() {
        let status = StatusResponse {
            leader_id: 0,
            ..sample()
        };
        assert!(render(&status).contains("leader           none known\n"));
    }

    /// The JSON view nests members and counts under their proto names.
    #[test]
    fn json_view_nests_members_and_counts() {
        let value = serde_json::to_value(StatusView::from(&sample())).unwrap();
        assert_eq!(value["leader_id"], 2);
        assert_eq!(value["members"][1]["leader"], true);
        assert_eq!(value["counts"]["succeeded"], 10_000);
    }
}
