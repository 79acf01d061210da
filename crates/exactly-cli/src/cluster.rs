//! `exactly cluster status | join | drain | remove`: membership operations and the cluster view.
//!
//! `drain` and `remove` commit the request and then, unless `--no-wait`, follow the node in the
//! cluster status until it has left, printing each change of its progress.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Subcommand;
use exactly_client::{Client, ClientOptions, Member, StatusResponse};

use crate::output::{emit, emit_json};
use crate::status;

/// How long `drain` and `remove` wait, beyond the drain deadline, for the node to leave. After
/// the deadline its jobs are cancelled within the kill grace; a dead node's jobs move once its
/// lease expires (6 s by default); then the membership change takes a few seconds at most.
const LEAVE_WAIT_EXTRA: Duration = Duration::from_secs(120);
/// How often `drain` and `remove` look at the cluster status while they wait.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How long the status is asked of the leader (for replication lag) before the answer of any
/// node is used instead.
const LEADER_STATUS_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Subcommand, Debug, PartialEq)]
pub enum ClusterCommand {
    /// Show members (role, health, replication lag, running jobs, drains), removed nodes and
    /// job counts, as the leader sees them.
    Status,
    /// Admit a node that was started without --join (and without --init) at ADDR (host:port,
    /// the address the other nodes reach it at).
    Join {
        /// The new node's gRPC address.
        addr: String,
    },
    /// Drain a node: no new jobs; running jobs may finish until the deadline, then they are
    /// cancelled and run elsewhere with new fencing tokens; then it leaves the membership (a
    /// leaving voter is replaced by a caught-up learner). Waits until it has left.
    Drain {
        /// The node's id (see `exactly cluster status`).
        node: u64,
        /// How long its running jobs may finish (for example 60s, 5m; 0s cancels them at once).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        deadline: Duration,
        /// Return once the drain is committed instead of waiting for the node to leave.
        #[arg(long)]
        no_wait: bool,
    },
    /// Remove a node now (typically a dead one): a drain without a deadline, after which its id
    /// is refused for good (it never rejoins with its old data). A dead node's jobs run
    /// elsewhere once its lease expires. Waits until it has left.
    Remove {
        /// The node's id (see `exactly cluster status`).
        node: u64,
        /// Return once the removal is committed instead of waiting for the node to leave.
        #[arg(long)]
        no_wait: bool,
    },
}

/// Runs one `exactly cluster` command.
pub async fn run(client: &Client, command: &ClusterCommand, json: bool) -> anyhow::Result<()> {
    match command {
        ClusterCommand::Status => show_status(client, json).await,
        ClusterCommand::Join { addr } => join(client, addr, json).await,
        ClusterCommand::Drain {
            node,
            deadline,
            no_wait,
        } => {
            let reply = client.drain(*node, *deadline).await?;
            leave(
                client,
                *node,
                reply.running,
                *deadline,
                false,
                *no_wait,
                json,
            )
            .await
        }
        ClusterCommand::Remove { node, no_wait } => {
            let reply = client.remove(*node).await?;
            leave(
                client,
                *node,
                reply.running,
                Duration::ZERO,
                true,
                *no_wait,
                json,
            )
            .await
        }
    }
}

/// `exactly status` and `exactly cluster status`.
pub async fn show_status(client: &Client, json: bool) -> anyhow::Result<()> {
    let status = leader_status(client).await?;
    if json {
        emit_json(&status::StatusView::from(&status))
    } else {
        emit(&status::render(&status, now_ms()))
    }
}

/// The status as the leader sees it (it alone knows every member's replication lag), or as the
/// answering node sees it when the leader cannot be asked directly.
pub async fn leader_status(client: &Client) -> anyhow::Result<StatusResponse> {
    let status = client.status().await?;
    if status.leader_id == 0 || status.leader_id == status.node_id {
        return Ok(status);
    }
    let Some(addr) = status
        .members
        .iter()
        .find(|m| m.node_id == status.leader_id)
        .map(|m| m.addr.clone())
    else {
        return Ok(status);
    };
    let budget_ms = LEADER_STATUS_TIMEOUT.as_millis() as u64;
    let defaults = client.options().clone();
    let options = ClientOptions {
        retry_total_ms_max: budget_ms,
        call_timeout_ms: defaults.call_timeout_ms.min(budget_ms),
        connect_timeout_ms: defaults.connect_timeout_ms.min(budget_ms),
        retry_backoff_max_ms: defaults.retry_backoff_max_ms.min(budget_ms),
        retry_backoff_initial_ms: defaults.retry_backoff_initial_ms.min(budget_ms),
        ..defaults
    };
    let from_leader = match Client::connect_with(vec![addr], options) {
        Ok(leader) => leader.status().await.ok(),
        Err(_) => None,
    };
    Ok(from_leader
        .filter(|s| s.leader_id == s.node_id)
        .unwrap_or(status))
}

async fn join(client: &Client, addr: &str, json: bool) -> anyhow::Result<()> {
    let target = Client::connect_with(vec![addr.to_string()], client.options().clone())?;
    let theirs = target
        .status()
        .await
        .with_context(|| format!("asking the node at {addr} for its id"))?;
    let id = theirs.node_id;
    let ours = leader_status(client).await?;
    if ours.members.iter().any(|m| m.node_id == id) {
        anyhow::bail!(
            "node {id} at {addr} is a member already (FAILED_PRECONDITION: nothing to do)"
        );
    }
    let reply = client.join(id, addr.to_string()).await?;
    if json {
        return emit_json(&serde_json::json!({ "node_id": id, "voter": reply.voter }));
    }
    let role = if reply.voter { "a voter" } else { "a learner" };
    emit(&format!("node {id} at {addr} joined as {role}\n"))
}

/// Follows a drain or removal until the node has left (unless `no_wait`).
async fn leave(
    client: &Client,
    node: u64,
    running: u32,
    deadline: Duration,
    remove: bool,
    no_wait: bool,
    json: bool,
) -> anyhow::Result<()> {
    let what = if remove { "removal" } else { "drain" };
    if no_wait {
        if json {
            return emit_json(&serde_json::json!({ "node_id": node, "running": running }));
        }
        return emit(&format!(
            "node {node}: {what} committed ({running} jobs running); `exactly cluster status` \
             shows its progress\n"
        ));
    }
    let progress = |line: String| {
        // With --json, standard output carries only the final object.
        if json {
            eprintln!("{line}");
            Ok(())
        } else {
            emit(&format!("{line}\n"))
        }
    };
    progress(format!(
        "node {node}: {what} committed; {running} jobs running"
    ))?;
    let started = Instant::now();
    let limit = deadline + LEAVE_WAIT_EXTRA;
    let mut last = String::new();
    loop {
        let line = match leader_status(client).await {
            Ok(status) => match progress_of(&status, node, remove, now_ms()) {
                Progress::Left => break,
                Progress::Still(line) => line,
            },
            Err(e) => format!("status unavailable: {e:#}"),
        };
        if line != last {
            progress(format!("node {node}: {line}"))?;
            last = line;
        }
        if started.elapsed() > limit {
            anyhow::bail!(
                "node {node} has not left after {:.0}s ({last}); `exactly cluster status` shows \
                 where it stands",
                started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    let took = started.elapsed().as_secs_f64();
    if json {
        return emit_json(&serde_json::json!({
            "node_id": node,
            "left": true,
            "removed": remove,
            "seconds": (took * 10.0).round() / 10.0,
        }));
    }
    let how = if remove {
        "was removed from the cluster (its id is refused from now on)"
    } else {
        "left the cluster"
    };
    progress(format!("node {node} {how} after {took:.1}s"))
}

/// Where a leaving node stands in one status.
#[derive(Debug, PartialEq)]
pub enum Progress {
    /// Out of the membership (and, for a removal, recorded as removed).
    Left,
    /// Still on its way, in words.
    Still(String),
}

/// Reads a leaving node's progress from a status taken at `now_ms`.
pub fn progress_of(status: &StatusResponse, node: u64, remove: bool, now_ms: u64) -> Progress {
    let Some(member) = status.members.iter().find(|m| m.node_id == node) else {
        if !remove || status.removed_node_ids.contains(&node) {
            return Progress::Left;
        }
        return Progress::Still("out of the membership; recording its removal".into());
    };
    Progress::Still(describe(member, now_ms))
}

fn describe(m: &Member, now_ms: u64) -> String {
    if !m.draining {
        return "waiting for the drain to reach the leader".into();
    }
    if m.running == 0 {
        return "running nothing; leaving the membership".into();
    }
    if m.health == "expired" || m.health == "silent" {
        return format!(
            "{} jobs held by a node that does not renew its lease ({}); they move once its \
             lease has expired",
            m.running, m.health
        );
    }
    if m.drain_deadline_ms > now_ms {
        format!(
            "{} jobs running; deadline in {}s",
            m.running,
            (m.drain_deadline_ms - now_ms).div_ceil(1000)
        )
    } else {
        format!(
            "deadline passed; cancelling {} jobs (they run again elsewhere)",
            m.running
        )
    }
}

/// The wall clock in Unix milliseconds (drain deadlines are in the leader's wall clock).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(draining: bool, running: u32, deadline: u64, health: &str) -> Member {
        Member {
            node_id: 3,
            addr: "127.0.0.1:7103".into(),
            role: "voter".into(),
            draining,
            running,
            drain_deadline_ms: deadline,
            health: health.into(),
            ..Member::default()
        }
    }

    fn status(members: Vec<Member>, removed: Vec<u64>) -> StatusResponse {
        StatusResponse {
            members,
            removed_node_ids: removed,
            ..StatusResponse::default()
        }
    }

    /// A leaving node's progress reads as words through every stage, and it counts as gone when
    /// it is out of the membership (and, for a removal, listed as removed).
    #[test]
    fn progress_through_a_drain() {
        let now = 1_000_000;
        let cases = [
            (
                member(false, 2, 0, "ok"),
                "waiting for the drain to reach the leader",
            ),
            (
                member(true, 2, now + 40_500, "ok"),
                "2 jobs running; deadline in 41s",
            ),
            (
                member(true, 2, now - 1, "ok"),
                "deadline passed; cancelling 2 jobs (they run again elsewhere)",
            ),
            (
                member(true, 1, now, "silent"),
                "1 jobs held by a node that does not renew its lease (silent); they move once \
                 its lease has expired",
            ),
            (
                member(true, 0, now, "ok"),
                "running nothing; leaving the membership",
            ),
        ];
        for (m, want) in cases {
            assert_eq!(
                progress_of(&status(vec![m], vec![]), 3, false, now),
                Progress::Still(want.into())
            );
        }
        assert_eq!(
            progress_of(&status(vec![], vec![]), 3, false, now),
            Progress::Left
        );
        assert_eq!(
            progress_of(&status(vec![], vec![]), 3, true, now),
            Progress::Still("out of the membership; recording its removal".into())
        );
        assert_eq!(
            progress_of(&status(vec![], vec![3]), 3, true, now),
            Progress::Left
        );
    }
}
