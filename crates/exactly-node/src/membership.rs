//! Membership changes after start-up: the leader's side of drains (taking a node that runs
//! nothing out of the Raft membership, promoting a learner so voters stay at `voters-target`),
//! a node's own drain-and-leave (SIGTERM), and how a node that is out learns it and stands down.
//!
//! The drain itself is replicated state (`Command::Drain`, `JobTable::leaving`), so whichever
//! node leads carries it on: [`reconcile`] runs on the leader's scheduler and is idempotent.
//! A leaving node goes through these steps, each safe to repeat after a leader change:
//!
//! 1. It gets no new attempts (apply refuses them; the planner skips it).
//! 2. Its running attempts finish, or, from the drain deadline on, the node cancels them and
//!    gives them back (`Outcome::Abandoned`) once its handlers stopped; a dead node's attempts
//!    are given back by its lease expiry. Nothing is reassigned while a node may still run it.
//! 3. Once the state machine shows it running nothing, the leader changes the membership: a
//!    voter is replaced by a caught-up learner when voters would drop below `voters-target`
//!    (one joint change), a learner is simply removed.
//! 4. The leader commits `Command::NodeLeft`: the node's lease entry goes, and a *removed*
//!    node's id is remembered for good, so it never registers (takes work) again and its vote
//!    requests are refused before they reach Raft ([`removed_refusal`]).
//!
//! A node that drained itself (SIGTERM) or was drained by an operator is not banned: started
//! again with its data, it asks to be admitted like a joining node (`server.rs`) and comes back
//! as a learner (promoted while voters are short).
//!
//! **Invariant:** the leader never removes the last voter, and never commits `NodeLeft` for a
//! node that still runs attempts (apply refuses it too).

use openraft::async_runtime::WatchReceiver;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use exactly_core::{Command, DrainNode, LeaveReason, Proposal, Rejection, Response};
use openraft::ChangeMembers;
use tokio::sync::Notify;

use crate::node::{ForwardReply, Node, ProposeError};

pub mod plan;

pub use plan::PROMOTE_LAG_ENTRIES_MAX;
use plan::{Change, Hold, Step};
/// How often a leaving node asks whether it has left yet.
const LEAVE_POLL: Duration = Duration::from_millis(200);
/// After the drain deadline (and the kill grace), how long a stopping node waits for its last
/// outcomes to commit before it stops anyway.
pub const STOP_MARGIN: Duration = Duration::from_secs(3);
/// How long a drained node that may leave waits for the leader to take it out of the
/// membership before it stops anyway (the leader finishes the change without it).
pub const LEAVE_WAIT: Duration = Duration::from_secs(5);
/// How long a node that is stopping keeps trying to commit its own drain. Past it the cluster
/// has had no quorum for that long (a failover takes well under a second; every other node is
/// stopping too, or cut off): the node stops as a member, like a crash as far as the cluster is
/// concerned (its lease expires; started again, it registers and carries on).
pub const DRAIN_COMMIT_WAIT_MAX: Duration = Duration::from_secs(3);

/// How a node that was asked to stop (SIGTERM) went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// It left the membership: a learner, or a voter a learner replaced.
    Left,
    /// It stays a member (why): started again with its data, it carries on as the same node.
    Stayed(String),
}

/// Whether this node is out of the cluster: it left (drained) or was removed. Set once per
/// process and never cleared: a node that left comes back only by starting again.
#[derive(Default)]
pub struct Departure {
    /// 0: a member; [`LEFT`]; [`REMOVED`].
    state: AtomicU8,
    notify: Notify,
}

const LEFT: u8 = 1;
const REMOVED: u8 = 2;

impl Departure {
    /// Records that this node left the membership (it may come back by starting again).
    pub fn mark_left(&self) {
        self.mark(LEFT);
    }

    /// Records that this node was removed for good.
    pub fn mark_removed(&self) {
        self.mark(REMOVED);
    }

    fn mark(&self, state: u8) {
        if self.state.fetch_max(state, Ordering::AcqRel) == 0 {
            self.notify.notify_one();
        }
    }

    /// Whether this node is out of the cluster (left or removed).
    pub fn has_departed(&self) -> bool {
        self.state.load(Ordering::Acquire) != 0
    }

    /// Whether this node was removed for good.
    pub fn is_removed(&self) -> bool {
        self.state.load(Ordering::Acquire) == REMOVED
    }

    /// Returns once this node is out of the cluster.
    pub async fn wait(&self) {
        while !self.has_departed() {
            self.notify.notified().await;
        }
    }
}

/// The error a node answers a vote request, an AppendEntries or a snapshot with when the node
/// that sent it (as candidate or leader) was removed for good: the removed node must not raise
/// the cluster's term, and learns from this that it is out. (A node that merely left is not
/// refused here: openraft refuses its stale candidacy by the log, and it may come back.)
pub fn removed_refusal(node: &Node, candidate: u64) -> Option<tonic::Status> {
    node.read(|t| t.is_removed(candidate)).then(|| {
        crate::codec::Refusal::Removed { node: candidate }.status(
            tonic::Code::FailedPrecondition,
            format!(
                "removed from the cluster: node {candidate} was removed; start it with an empty \
                 data directory to join again as a new node"
            ),
        )
    })
}

/// Why a node could not drain itself and leave.
#[derive(Debug, thiserror::Error)]
pub enum LeaveError {
    /// Nothing to leave: the node is alone, or it is the last voter and no learner can take its
    /// place (the cluster cannot go on without it).
    #[error("node {0} is the only voter and no learner can replace it; it cannot leave the cluster, only stop")]
    LastVoter(u64),
    #[error("node {0} was removed from the cluster already")]
    Removed(u64),
    #[error("the drain could not be committed: {0}")]
    Propose(#[from] ProposeError),
    #[error("the drain was refused: {0}")]
    Refused(Rejection),
    #[error("the leader did not take node {node} out of the membership within {waited:?}")]
    TimedOut { node: u64, waited: Duration },
}

impl Node {
    /// Whether `id` may not leave because it is the only voter and no learner could take its
    /// place.
    pub fn is_last_voter(&self, id: u64) -> bool {
        let m = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        let voters: BTreeSet<u64> = m.membership().voter_ids().collect();
        let others = m.membership().nodes().filter(|(n, _)| **n != id).count();
        voters.len() == 1 && voters.contains(&id) && others == 0
    }

    /// Whether `id` is in this node's view of the Raft membership (voter or learner).
    pub fn is_member(&self, id: u64) -> bool {
        self.raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .get_node(&id)
            .is_some()
    }

    /// Proposes a drain of `node`; returns how many attempts it runs now.
    pub async fn propose_drain(
        &self,
        node: u64,
        deadline: Duration,
        reason: LeaveReason,
        by: Option<String>,
    ) -> Result<u32, LeaveError> {
        let drain = Proposal::drain(DrainNode {
            node,
            deadline_after_ms: deadline.as_millis().min(u64::MAX as u128) as u64,
            reason,
        });
        // An operator's drain or removal goes into the audit trail; a node's own (SIGTERM) not.
        let draining = match by {
            Some(by) => self.ask_as(by, drain).await?.0,
            None => self.ask(drain).await?,
        };
        match draining {
            Ok(running) => Ok(running),
            Err(Rejection::Removed(n)) => Err(LeaveError::Removed(n)),
            Err(why) => Err(LeaveError::Refused(why)),
        }
    }

    /// What SIGTERM does: drains this node (no new work; running attempts may finish for
    /// `deadline`, then they are stopped and given back), waits until its outcomes are committed,
    /// then leaves the membership if the cluster can spare it, else stays a member.
    ///
    /// A learner leaves, and so does a voter that a learner can replace. A voter that nobody
    /// can replace stays a voter: a SIGTERM cannot tell a scale-down from a restart or from the
    /// whole cluster being stopped (`docker compose down`, a host shutdown), and shrinking the
    /// voters then would dismantle the cluster. Started again with its data, a node that stayed
    /// carries on as the same member. Returns within `deadline` + `lease.kill-grace` +
    /// [`STOP_MARGIN`] (+ [`DRAIN_COMMIT_WAIT_MAX`] when the drain cannot commit at first).
    pub async fn drain_and_leave(&self, deadline: Duration) -> Result<Stopped, LeaveError> {
        if self.departure.is_removed() {
            return Err(LeaveError::Removed(self.id));
        }
        // Drained by an operator and out already (found by the container test: a stop after
        // `exactly cluster drain` retried its own drain until the stop timeout killed it).
        if self.departure.has_departed() {
            return Ok(Stopped::Left);
        }
        let started = tokio::time::Instant::now();
        // The proposal retries within `limits.propose-timeout`; keep trying while the cluster
        // elects, for at most DRAIN_COMMIT_WAIT_MAX.
        let running = loop {
            let attempt = tokio::time::timeout(
                DRAIN_COMMIT_WAIT_MAX.saturating_sub(started.elapsed()),
                self.propose_drain(self.id, deadline, LeaveReason::Stopping, None),
            )
            .await;
            match attempt {
                Ok(Ok(running)) => break running,
                // It learned meanwhile that it is out (drained by an operator).
                Ok(Err(LeaveError::Propose(ProposeError::Departed(_))))
                    if !self.departure.is_removed() =>
                {
                    return Ok(Stopped::Left);
                }
                Ok(Err(LeaveError::Propose(e))) if started.elapsed() < DRAIN_COMMIT_WAIT_MAX => {
                    tracing::warn!(error = %e, "drain not committed yet; retrying");
                    tokio::time::sleep(LEAVE_POLL).await;
                }
                Ok(Err(LeaveError::Propose(e))) => {
                    return Ok(Stopped::Stayed(format!(
                        "the drain could not be committed within {DRAIN_COMMIT_WAIT_MAX:?} ({e})"
                    )));
                }
                Err(_) => {
                    return Ok(Stopped::Stayed(format!(
                        "the drain could not be committed within {DRAIN_COMMIT_WAIT_MAX:?}"
                    )));
                }
                Ok(Err(e)) => return Err(e),
            }
        };
        tracing::info!(
            node = self.id,
            running,
            ?deadline,
            "draining: no new work; running attempts may finish before the deadline"
        );
        // Until nothing of this node's work is in hand: its attempts ended (past the deadline
        // the executor stops them and gives them back) and their outcomes committed. Without a
        // lease (no quorum: the rest of the cluster is stopping too) nothing more can commit:
        // once its handlers stopped the node goes, and its attempts end when it restarts or its
        // lease expires.
        let hard_stop = deadline + self.config.lease.kill_grace + STOP_MARGIN;
        let mut last_running = running as usize;
        loop {
            if self.has_left().await {
                tracing::info!(node = self.id, took = ?started.elapsed(), "left the cluster");
                return Ok(Stopped::Left);
            }
            let handlers = self.work_in_hand.running();
            let unreported = self.work_in_hand.unreported();
            let running = self.read(|t| t.running_on(self.id));
            if running != last_running {
                tracing::info!(node = self.id, running, "draining");
                last_running = running;
            }
            let reported = unreported == 0 && running == 0;
            if handlers == 0 && (reported || !self.lease_valid()) {
                break;
            }
            if started.elapsed() >= hard_stop {
                tracing::warn!(
                    node = self.id,
                    handlers,
                    unreported,
                    running,
                    "drain deadline passed with work still in hand: stopping anyway"
                );
                break;
            }
            tokio::time::sleep(LEAVE_POLL).await;
        }
        if let Some(why) = self.why_stay() {
            tracing::info!(node = self.id, took = ?started.elapsed(), %why, "drained; staying a member");
            return Ok(Stopped::Stayed(why));
        }
        // The leader takes a drained learner out, or replaces a drained voter, in its next
        // membership round.
        let wait_until = tokio::time::Instant::now() + LEAVE_WAIT;
        while tokio::time::Instant::now() < wait_until {
            if self.has_left().await {
                tracing::info!(node = self.id, took = ?started.elapsed(), "left the cluster");
                return Ok(Stopped::Left);
            }
            tokio::time::sleep(LEAVE_POLL).await;
        }
        Ok(Stopped::Stayed(format!(
            "the leader did not take it out of the membership within {LEAVE_WAIT:?}"
        )))
    }

    /// Why this drained node should stay a member rather than leave, if it should: it is a
    /// voter, the voters are not above `voters-target`, and no learner that is not itself leaving
    /// could take its place (the same rule as the leader's [`reconcile`] for a `Stopping` node).
    fn why_stay(&self) -> Option<String> {
        let membership = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        let membership = membership.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        if !voters.contains(&self.id) || voters.len() > self.config.voters_target {
            return None;
        }
        let replaceable = membership.nodes().any(|(id, _)| {
            !voters.contains(id)
                && self.read(|t| {
                    t.leaving(*id).is_none() && t.nodes().get(id).is_some_and(|n| !n.expired)
                })
        });
        (!replaceable).then(|| {
            format!(
                "a voter of {} with no learner to take its place: leaving would shrink the voters \
                 below voters-target ({})",
                voters.len(),
                self.config.voters_target
            )
        })
    }

    /// Whether this node is out of the membership: in its own view, or in the leader's (the
    /// leader stops replicating to a removed node at once, so its own view may never change).
    async fn has_left(&self) -> bool {
        if self.departure.has_departed() || !self.is_member(self.id) {
            return true;
        }
        let Some((leader, _)) = self.leader() else {
            return false;
        };
        if leader == self.id {
            return false;
        }
        // Asked over the peer port (the public one may need a token this node does not hold):
        // the leader answers a node outside its membership with `NotMember`.
        matches!(
            tokio::time::timeout(Duration::from_secs(1), self.ask_read_index()).await,
            Ok(Ok((_, crate::internal::ReadIndexReply::NotMember { .. })))
        )
    }
}

/// What the leader's membership step may do, one change at a time.
pub struct Reconcile {
    pub voters_target: usize,
    /// Nodes without a recent renewal: never promoted.
    pub quiet: BTreeSet<u64>,
}

/// One round of the leader's membership work: fix this leader's own address, or take one
/// drained node out (or record the removal of one that is out already), else promote one
/// learner while voters are short. The decision is [`plan::next_step`]'s; this reads what it
/// decides from and carries the step out. Every round re-reads the current state, so a round
/// that fails half-way (lost leadership, a concurrent change) is finished by the next round or
/// the next leader.
pub async fn reconcile(node: &Node, policy: &Reconcile) {
    let metrics = node.raft.metrics().borrow_watched().clone();
    if metrics.current_leader != Some(node.id) {
        return;
    }
    let membership = metrics.membership_config.membership();
    let view = node.read(|t| plan::View {
        me: node.id,
        my_addr: node.peer_addr.clone(),
        my_recorded_addr: membership.get_node(&node.id).map(|n| n.addr.clone()),
        voters: membership.voter_ids().collect(),
        members: membership.nodes().map(|(id, _)| *id).collect(),
        last_log_index: metrics.last_log_index.unwrap_or(0),
        matched: metrics
            .replication
            .as_ref()
            .map(|r| r.iter().map(|(id, m)| (*id, m.map(|l| l.index))).collect())
            .unwrap_or_default(),
        drained: t
            .leaving_nodes()
            .keys()
            .copied()
            .filter(|&id| t.running_on(id) == 0)
            .collect(),
        stopping: t
            .leaving_nodes()
            .iter()
            .filter(|(_, l)| l.reason == LeaveReason::Stopping)
            .map(|(id, _)| *id)
            .collect(),
        healthy: t
            .nodes()
            .iter()
            .filter(|(id, entry)| !entry.expired && t.leaving(**id).is_none())
            .map(|(id, _)| *id)
            .collect(),
        quiet: policy.quiet.clone(),
        voters_target: policy.voters_target,
    });
    match plan::next_step(&view) {
        // A leader restarted at a new address (a recreated container) is told of it by nobody.
        Step::SetAddress { from, to } => {
            let _ = crate::internal::set_address(node, node.id, from, to).await;
        }
        Step::Leave {
            node: id,
            change,
            promoted,
        } => {
            if let Some(learner) = promoted {
                tracing::info!(
                    leaving = id,
                    promoted = learner,
                    "replacing a leaving voter"
                );
            }
            let change = match change {
                Change::ReplaceAllVoters(voters) => ChangeMembers::ReplaceAllVoters(voters),
                Change::RemoveNodes(nodes) => ChangeMembers::RemoveNodes(nodes),
            };
            tracing::info!(node = id, "drained; taking it out of the membership");
            match node.raft.change_membership(change, false).await {
                Ok(_) => record_departure(node, id).await,
                Err(e) => {
                    tracing::warn!(node = id, error = %e, "membership change for a drained node")
                }
            }
        }
        Step::RecordDeparture(id) => record_departure(node, id).await,
        Step::Hold {
            node: id,
            why: Hold::LastVoter,
        } => tracing::warn!(
            node = id,
            "the last voter cannot leave until a learner is healthy and caught up"
        ),
        Step::Hold {
            node: id,
            why: Hold::StoppingVoterStays,
        } => tracing::debug!(
            node = id,
            "a stopping voter nobody can replace stays a voter"
        ),
        Step::Promote(learner) => {
            let added = BTreeSet::from([learner]);
            match node
                .raft
                .change_membership(ChangeMembers::AddVoterIds(added), false)
                .await
            {
                Ok(_) => tracing::info!(node = learner, "promoted a learner to voter"),
                Err(e) => tracing::warn!(node = learner, error = %e, "promoting a learner"),
            }
        }
        Step::Nothing => {}
    }
}

/// Commits `NodeLeft` for a drained node that is out of the membership (on this leader; a
/// leader that removed itself leaves this to the next one).
async fn record_departure(node: &Node, id: u64) {
    let budget = node.config.limits.propose_timeout;
    match tokio::time::timeout(budget, node.write_local(Command::NodeLeft(id))).await {
        Ok(ForwardReply::Committed(Response::NodeLeft(Ok(())), _)) => {
            tracing::info!(node = id, "node left the cluster");
        }
        Ok(ForwardReply::Committed(other, _)) => {
            tracing::warn!(node = id, ?other, "departure refused")
        }
        Ok(other) => tracing::debug!(node = id, ?other, "departure not committed"),
        Err(_) => tracing::debug!(node = id, "departure not committed in time"),
    }
}
