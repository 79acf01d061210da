//! The node handle: its Raft instance, store and state machine, and the one way every module
//! proposes a command — [`Node::propose`], which finds the leader (this node or another) and
//! waits a bounded time.

use openraft::async_runtime::WatchReceiver;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use exactly_core::{Command, Proposal, Request, Response};
use exactly_handlers::Registry;
use exactly_proto::internal::internal_client::InternalClient;
use exactly_proto::internal::Blob;
use exactly_store::{Raft, StateMachine, Store, TypeConfig};
use openraft::error::{ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::codec;
use crate::config::NodeConfig;
use crate::network;

/// Backoff between attempts to find a leader, at most.
const LEADER_RETRY_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Backoff between attempts to find a leader, at first.
const LEADER_RETRY_BACKOFF_MIN: Duration = Duration::from_millis(20);
/// After a new leader is elected while a write forwarded to the old one is unanswered, how long
/// the old one may still answer before the write's outcome is reported as unknown.
pub const LEADER_CHANGE_GRACE: Duration = Duration::from_millis(300);
/// How long a client's write waits, once committed, for this node to apply it before the
/// reply goes out anyway (a follower applies a commit one round trip after the leader).
pub const WRITE_APPLY_WAIT_MAX: Duration = Duration::from_secs(1);

/// Applied entries a node may lag its own last log entry by and still be ready.
pub const READY_APPLY_LAG_MAX: u64 = 1_000;

/// Which members the scheduler gives no new work, as it last planned (`None`: no scheduler
/// runs on this node). Published for the leader's group commit (`Node::write_local`), which
/// folds the same policy into each submit's entry (`Command::SubmitAssign`).
#[derive(Debug, Default)]
pub struct AssignView(std::sync::Mutex<Option<std::collections::BTreeSet<u64>>>);

impl AssignView {
    pub fn get(&self) -> Option<std::collections::BTreeSet<u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set(&self, view: Option<std::collections::BTreeSet<u64>>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = view;
    }
}

/// A committed entry's response that its typed proposal cannot read: `apply` answered its
/// command with something it never answers it (a bug, reported rather than guessed at).
fn unreadable(response: Response) -> ProposeError {
    ProposeError::Unexpected(format!("{response:?}"))
}

/// Why a proposal did not commit.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
pub enum ProposeError {
    /// No leader with a quorum could be reached before the deadline; nothing was proposed.
    #[error("no leader with a quorum reachable within {0:?}: the cluster has no quorum or is electing; nothing was committed")]
    NoLeader(Duration),
    /// A leader took the command but did not commit it before the deadline. It may still commit.
    #[error("not committed within {0:?}; the outcome is unknown and it may still commit")]
    Timeout(Duration),
    /// The node is shutting down; nothing was handed to Raft.
    #[error("node is shutting down: {0}")]
    ShuttingDown(String),
    /// Raft stopped (shutdown or a fatal error) while this write was in flight: it may already
    /// be on followers, and the next leader may commit it. Never report this as "not applied".
    #[error("raft stopped with the write in flight; the outcome is unknown and it may still commit: {0}")]
    StoppedInFlight(String),
    /// The write was forwarded to leader `0`, which did not answer, and another leader was
    /// elected meanwhile: the old leader may have replicated it before it stopped answering, so
    /// the new one may still commit it.
    #[error("leader {0} stopped answering with the write in flight and another leader was elected; the outcome is unknown and it may still commit")]
    LeaderChanged(u64),
    /// This node is overloaded and refused the write before proposing it.
    #[error("{0}")]
    Overloaded(String),
    /// The state machine answered with a response of another kind (a bug).
    #[error("unexpected response from the state machine: {0}")]
    Unexpected(String),
    /// This node left (or was removed from) the cluster; it proposes nothing any more.
    #[error(
        "node {0} is no longer a member of the cluster; nothing was proposed (use another node)"
    )]
    Departed(u64),
}

/// What a leader answers to a forwarded command.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ForwardReply {
    /// Committed and applied on the leader: its response and the entry's log index.
    Committed(Response, u64),
    NotLeader,
    /// This leader has not heard from a quorum recently; nothing was proposed.
    NoQuorum,
    Failed(ProposeError),
}

pub struct NodeInner {
    pub id: u64,
    /// Held while this node, as leader, admits a node: one admission at a time, so that a join
    /// retried while the first try still runs finds its work done (and records nothing twice).
    pub admissions: tokio::sync::Mutex<()>,
    /// The address clients reach this one at (`advertise`, else the bound listen address); also
    /// other nodes without a peer listener. Registered in the state machine (`NodeEntry::addr`).
    pub addr: String,
    /// The address other nodes reach this one's node-to-node service at (`peer-advertise`,
    /// else the bound `peer-listen`, else [`NodeInner::addr`]): its Raft membership address.
    pub peer_addr: String,
    /// This process's current incarnation (see [`Node::incarnation`]).
    pub incarnation: std::sync::atomic::AtomicU64,
    /// End of this node's lease, in [`exactly_handlers::monotonic_ms`] (0: no lease). See
    /// `lease.rs`.
    pub lease_until_ms: std::sync::atomic::AtomicU64,
    /// The same deadline for running attempts' handlers (the `exec` guard enforces it even when
    /// this process is frozen or dead).
    pub lease_deadline: tokio::sync::watch::Sender<u64>,
    pub config: NodeConfig,
    pub raft: Raft,
    pub store: Store,
    pub state: StateMachine,
    pub registry: Registry,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
    /// Why the node stopped itself, if it did ([`NodeInner::fail`]).
    pub failure: std::sync::OnceLock<String>,
    /// When this node, as leader, last confirmed its leadership with a quorum (heartbeat round),
    /// in milliseconds since `started`. 0: never.
    pub quorum_confirmed_ms: std::sync::atomic::AtomicU64,
    /// The node's monotonic start time, the origin of `quorum_confirmed_ms`.
    pub started: std::time::Instant,
    /// Test-only fault injection for node-to-node traffic.
    pub faults: Option<crate::faults::FaultsHandle>,
    /// Job events for Watch streams (shared with the apply hooks).
    pub events: Arc<crate::events::EventHub>,
    /// One lazily connected client per peer address, reused across forwards.
    pub peers: std::sync::Mutex<std::collections::HashMap<String, InternalClient<Channel>>>,
    /// Mutual TLS on the peer port, if configured (`crate::tls`).
    pub peer_tls: Option<Arc<crate::tls::PeerTls>>,
    /// Set once this node learns that it left or was removed (see `membership.rs`).
    pub departure: Arc<crate::membership::Departure>,
    /// When each peer last answered this node's Raft messages (see `network::Answers`).
    pub answers: Arc<crate::network::Answers>,
    /// What the executor has in hand, for a stopping node (see `Node::drain_and_leave`).
    pub work_in_hand: WorkInHand,
    /// Groups client Submits into few log entries (see `group.rs`); set once at start.
    pub submitter: std::sync::OnceLock<crate::group::Submitter>,
    /// Which members the running scheduler would give no new work (`None`: no scheduler runs
    /// here). The leader's group commit uses it to start attempts in the submit's own entry.
    pub assign_view: AssignView,
    /// Batches what this node proposes as leader into few entries (see `proposer.rs`); set once
    /// at start.
    pub proposer: std::sync::OnceLock<crate::proposer::Proposer>,
    /// The leader's read index learned once after start: this node is ready only once it has
    /// applied that far (`u64::MAX`: not learned yet). See `Node::not_ready`.
    pub ready_index: std::sync::atomic::AtomicU64,
    /// The runtime openraft's core, log, state machine and replication run on (see
    /// [`RaftRuntime`]).
    pub raft_runtime: RaftRuntime,
}

/// Threads of a node's Raft runtime.
pub const RAFT_RUNTIME_THREADS: usize = 2;

/// openraft's own tokio runtime: the Raft core, its storage tasks, the state machine's apply
/// and the replication streams (with their connections to peers) run on their own threads, not
/// among the client requests' tasks. Under a flood of client requests (or of their refusals) a
/// node's runtime queues thousands of tasks; Raft's heartbeats, appends and applies would wait
/// behind them, and a commit that stalls past the propose deadline turns acknowledged-looking
/// work into unknown outcomes. Found by the overload test: with admission that refused at
/// once, the clients' retries flooded the shared runtime and commits stalled for 3 s.
///
/// Dropped without blocking (`shutdown_background`), as the last `Node` handle may go away
/// inside async code; `RunningNode::shutdown` stops Raft first. The fault harness runs Raft on
/// the node's own runtime instead ([`RaftRuntime::shared`]), so that pausing or dropping that
/// runtime pauses or kills the whole node.
pub struct RaftRuntime(Option<tokio::runtime::Runtime>);

impl RaftRuntime {
    /// A runtime of its own for node `id`'s Raft.
    pub fn own(id: u64) -> std::io::Result<Self> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RAFT_RUNTIME_THREADS)
            .thread_name(format!("raft-{id}"))
            .enable_all()
            .build()
            .map(|rt| Self(Some(rt)))
    }

    /// Raft on the runtime that starts the node (tests that pause or kill a node's runtime).
    pub fn shared() -> Self {
        Self(None)
    }

    /// The handle to spawn Raft's tasks with. Called inside a runtime.
    pub fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for RaftRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// What this node's executor has in hand: attempts whose handlers run, and outcomes not yet
/// committed (held starts, reports not yet proposed or in flight).
#[derive(Default)]
pub struct WorkInHand {
    running: std::sync::atomic::AtomicUsize,
    unreported: std::sync::atomic::AtomicUsize,
}

impl WorkInHand {
    pub fn store(&self, running: usize, unreported: usize) {
        use std::sync::atomic::Ordering::Release;
        self.running.store(running, Release);
        self.unreported.store(unreported, Release);
    }

    /// Attempts whose handlers still run.
    pub fn running(&self) -> usize {
        self.running.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Outcomes not yet committed.
    pub fn unreported(&self) -> usize {
        self.unreported.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// A cheap-to-clone handle to a running node.
#[derive(Clone)]
pub struct Node(pub Arc<NodeInner>);

impl std::ops::Deref for Node {
    type Target = NodeInner;
    fn deref(&self) -> &NodeInner {
        &self.0
    }
}

/// The wall clock in Unix milliseconds: only the leader reads it, to stamp commands.
pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Node {
    /// The incarnation this process runs as now. It changes only when the leader expired the
    /// previous one (the process outlived its lease, e.g. behind a partition).
    pub fn incarnation(&self) -> u64 {
        self.incarnation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Milliseconds on the machine's monotonic clock (the lease clock; see `lease.rs`).
    pub fn mono_ms(&self) -> u64 {
        exactly_handlers::monotonic_ms()
    }

    /// The lease deadline as handlers see it (moved forward by every acknowledged renewal).
    pub fn lease_deadline(&self) -> exactly_handlers::LeaseDeadline {
        exactly_handlers::LeaseDeadline::from(self.lease_deadline.subscribe())
    }

    /// Reads the local replica's job table.
    pub fn read<T>(&self, f: impl FnOnce(&exactly_store::Table) -> T) -> T {
        self.state.read(f)
    }

    /// Reads the local replica's job table with the archived records of its finished jobs
    /// (see [`exactly_store::JobView`]).
    pub fn read_view<T>(&self, f: impl FnOnce(&exactly_store::JobView<'_>) -> T) -> T {
        self.state.read_view(f)
    }

    /// The current leader and its node-to-node address, as this node last heard.
    pub fn leader(&self) -> Option<(u64, String)> {
        // Read in place (every proposal asks): a clone of the metrics copies the membership
        // and replication maps.
        let watched = self.raft.metrics();
        let metrics = watched.borrow_watched();
        let leader = metrics.current_leader?;
        let addr = metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())?;
        Some((leader, addr))
    }

    /// Whether this node has applied an entry of its current term (as a new leader: its own
    /// first entry), hence every entry any earlier leader committed.
    pub fn applied_own_term(&self) -> bool {
        let term = self.raft.metrics().borrow_watched().current_term;
        self.state
            .last_applied()
            .is_some_and(|l| l.leader_id.term == term)
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow_watched().current_leader == Some(self.id)
    }

    /// Whether this leader confirmed its leadership with a quorum within the last
    /// `raft.election-timeout-max`. A leader cut off from its quorum stops accepting writes
    /// (callers get UNAVAILABLE, nothing is proposed) instead of letting them time out with an
    /// unknown outcome.
    pub fn quorum_fresh(&self) -> bool {
        let confirmed = self
            .quorum_confirmed_ms
            .load(std::sync::atomic::Ordering::Acquire);
        if confirmed == 0 {
            return false;
        }
        let now = self.started.elapsed().as_millis() as u64;
        now.saturating_sub(confirmed) <= self.config.raft.election_timeout_max.as_millis() as u64
    }

    /// Checks this node's leadership with a quorum (one heartbeat round) and records the time.
    pub async fn confirm_quorum(&self) -> bool {
        let sent = self.started.elapsed().as_millis() as u64;
        let budget = self.config.raft.election_timeout_min;
        // Only the quorum round (not `ensure_linearizable`, which also waits for apply to catch
        // up and would make a busy leader look cut off).
        match tokio::time::timeout(
            budget,
            self.raft.get_read_log_id(openraft::ReadPolicy::ReadIndex),
        )
        .await
        {
            Ok(Ok(_)) => {
                self.quorum_confirmed_ms
                    .fetch_max(sent.max(1), std::sync::atomic::Ordering::AcqRel);
                true
            }
            _ => false,
        }
    }

    /// Appends `command` on this node, which must be the leader. Waits for commit and apply.
    pub async fn write_local(&self, command: Command) -> ForwardReply {
        // A leader elected a moment ago has not confirmed its quorum yet (the background check
        // runs every heartbeat interval): confirm it now rather than send the write away to
        // retry after a backoff. A leader cut off from its quorum still refuses, having
        // proposed nothing, within `raft.election-timeout-min`.
        if !self.quorum_fresh() && !self.confirm_quorum().await {
            return ForwardReply::NoQuorum;
        }
        // Group commit folds assignment into the submit's entry while this node's scheduler
        // runs (with its view of who gets no new work); otherwise the scheduler assigns later.
        let command = match command {
            Command::SubmitGroups(groups) => match self.assign_view.get() {
                Some(excluded) => Command::SubmitAssign { groups, excluded },
                None => Command::SubmitGroups(groups),
            },
            other => other,
        };
        match self.proposer.get() {
            Some(proposer) => proposer.propose(command).await,
            None => self.client_write(command).await,
        }
    }

    /// Appends one entry holding `command` (stamped with this node's clock and fresh entropy)
    /// and waits for its commit and apply. Every proposal of a running node goes through its
    /// batching proposer (`proposer.rs`), which calls this.
    pub(crate) async fn client_write(&self, command: Command) -> ForwardReply {
        let request = Request {
            now_ms: wall_ms(),
            entropy: rand::random(),
            command,
        };
        let started = std::time::Instant::now();
        match self.raft.client_write(request).await {
            Ok(reply) => {
                tracing::trace!(
                    target: exactly_store::TIMELINE,
                    index = reply.log_id.index,
                    took_us = started.elapsed().as_micros() as u64,
                    "applied"
                );
                ForwardReply::Committed(reply.data, reply.log_id.index)
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                ForwardReply::NotLeader
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                ForwardReply::Failed(ProposeError::ShuttingDown(e.to_string()))
            }
            // This node appended the entry as leader, then took another leader's log, which
            // replaced it: the entry may have reached followers and commit under the new leader.
            Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_))) => {
                ForwardReply::Failed(ProposeError::LeaderChanged(self.id))
            }
            // No proposal carries a precondition.
            Err(RaftError::APIError(ClientWriteError::PreconditionFailed(e))) => {
                ForwardReply::Failed(ProposeError::Unexpected(e.to_string()))
            }
            // Found by the chaos suite (seeds 10 and 38): a leader stopped with an appended write
            // answered UNAVAILABLE, and the next leader committed the write.
            Err(RaftError::Fatal(e)) => {
                ForwardReply::Failed(ProposeError::StoppedInFlight(e.to_string()))
            }
        }
    }

    /// Proposes a command through whichever node leads, retrying while the leader is unknown or
    /// moves, for at most the configured `limits.propose-timeout`.
    pub async fn propose(&self, command: Command) -> Result<Response, ProposeError> {
        self.propose_at(command).await.map(|(response, _)| response)
    }

    /// A client's write: [`Node::propose`], then a bounded wait until this node has applied the
    /// entry too, so that a read on this node after the reply sees the write. Returns the entry's
    /// log index (the position a client's later reads may ask for, on any node).
    pub async fn propose_for_client(
        &self,
        command: Command,
    ) -> Result<(Response, u64), ProposeError> {
        let (response, index) = self.propose_at(command).await?;
        self.await_applied(index, WRITE_APPLY_WAIT_MAX).await;
        Ok((response, index))
    }

    /// A typed proposal ([`Proposal`]): [`Node::propose`], with the reply read as its type.
    pub async fn ask<T>(&self, proposal: Proposal<T>) -> Result<T, ProposeError> {
        let (command, reply) = proposal.split();
        let response = self.propose(command).await?;
        reply.read(response).map_err(unreadable)
    }

    /// [`Node::ask`] with the log index of the committed entry.
    pub async fn ask_at<T>(&self, proposal: Proposal<T>) -> Result<(T, u64), ProposeError> {
        let (command, reply) = proposal.split();
        let (response, index) = self.propose_at(command).await?;
        Ok((reply.read(response).map_err(unreadable)?, index))
    }

    /// An operator's or administrator's typed write from the public API: proposed audited by
    /// the caller's credential name (so the audit trail records it) with
    /// [`Node::propose_for_client`]'s read-your-writes wait; the reply as its type, with the
    /// entry's log index.
    pub async fn ask_as<T>(
        &self,
        by: String,
        proposal: Proposal<T>,
    ) -> Result<(T, u64), ProposeError> {
        let (command, reply) = proposal.audited(by).split();
        match self.propose_for_client(command).await? {
            (Response::Refused(why), _) => Err(ProposeError::Unexpected(why.to_string())),
            (response, index) => Ok((reply.read(response).map_err(unreadable)?, index)),
        }
    }

    /// Waits until this node has applied the log up to `index`, for at most `limit`. Returns
    /// whether it has.
    pub async fn await_applied(&self, index: u64, limit: Duration) -> bool {
        if self.state.last_applied().is_some_and(|l| l.index >= index) {
            return true;
        }
        self.raft
            .wait(Some(limit))
            .applied_index_at_least(Some(index), "read your writes")
            .await
            .is_ok()
    }

    /// [`Node::propose`], with the log index of the committed entry.
    pub async fn propose_at(&self, command: Command) -> Result<(Response, u64), ProposeError> {
        let budget = self.config.limits.propose_timeout;
        let deadline = Instant::now() + budget;
        let mut backoff = LEADER_RETRY_BACKOFF_MIN;
        let mut encoded: Option<Vec<u8>> = None;
        loop {
            if self.shutdown.is_cancelled() {
                return Err(ProposeError::ShuttingDown("shutdown requested".into()));
            }
            if self.departure.has_departed() {
                return Err(ProposeError::Departed(self.id));
            }
            // What Raft reports, not `leader()` (which also needs the leader's address): waiting
            // for a change of the one while testing the other would spin.
            let seen = self.raft.metrics().borrow_watched().current_leader;
            match self.leader() {
                Some((leader, _)) if leader == self.id => {
                    match tokio::time::timeout_at(deadline, self.write_local(command.clone())).await
                    {
                        Ok(ForwardReply::Committed(r, index)) => return Ok((r, index)),
                        Ok(ForwardReply::NotLeader | ForwardReply::NoQuorum) => {}
                        Ok(ForwardReply::Failed(e)) => return Err(e),
                        Err(_) => return Err(ProposeError::Timeout(budget)),
                    }
                }
                Some((leader, addr)) => {
                    let data = encoded
                        .get_or_insert_with(|| codec::encode(&command))
                        .clone();
                    let sent = std::time::Instant::now();
                    let forward = self.forward(leader, &addr, data, deadline);
                    tokio::pin!(forward);
                    // A leader that froze (SIGSTOP, a VM pause) holds the request without an
                    // answer: once another leader is elected, give it a moment, then report the
                    // outcome as unknown instead of waiting out the whole deadline.
                    let reply = tokio::select! {
                        reply = &mut forward => reply,
                        () = self.until_new_leader(leader) => {
                            match tokio::time::timeout(LEADER_CHANGE_GRACE, &mut forward).await {
                                Ok(reply) => reply,
                                Err(_) => return Err(ProposeError::LeaderChanged(leader)),
                            }
                        }
                    };
                    match reply {
                        Ok(ForwardReply::Committed(r, index)) => {
                            tracing::trace!(
                                target: exactly_store::TIMELINE,
                                index,
                                took_us = sent.elapsed().as_micros() as u64,
                                "forwarded"
                            );
                            return Ok((r, index));
                        }
                        Ok(ForwardReply::NotLeader | ForwardReply::NoQuorum) => {}
                        Ok(ForwardReply::Failed(e)) => return Err(e),
                        // The request never reached a leader (connection refused, leader gone):
                        // nothing was proposed, so trying again is safe.
                        Err(Some(_unreached)) => {}
                        Err(None) => return Err(ProposeError::Timeout(budget)),
                    }
                }
                None => {}
            }
            if Instant::now() + backoff >= deadline {
                return Err(ProposeError::NoLeader(budget));
            }
            self.until_leader_changes(seen, backoff).await;
            // A newly elected leader is tried at once and, if it is not ready yet, again soon:
            // the backoff only grows while the leader stays the same.
            backoff = if self.raft.metrics().borrow_watched().current_leader != seen {
                LEADER_RETRY_BACKOFF_MIN
            } else {
                (backoff * 2).min(LEADER_RETRY_BACKOFF_MAX)
            };
        }
    }

    /// On the leader: confirms leadership with a quorum and returns the index a replica must have
    /// applied to serve a linearizable read (openraft's read index).
    pub async fn leader_read_index(&self) -> crate::internal::ReadIndexReply {
        use crate::internal::ReadIndexReply;
        if !self.is_leader() {
            return ReadIndexReply::NotLeader;
        }
        let budget = self.config.raft.election_timeout_max;
        match tokio::time::timeout(
            budget,
            self.raft.get_read_log_id(openraft::ReadPolicy::ReadIndex),
        )
        .await
        {
            Ok(Ok((read, _applied))) => ReadIndexReply::Index(read.index()),
            Ok(Err(RaftError::APIError(_))) => ReadIndexReply::NotLeader,
            Ok(Err(e)) => ReadIndexReply::Failed(e.to_string()),
            Err(_) => ReadIndexReply::Failed(format!(
                "leadership not confirmed by a quorum within {budget:?}"
            )),
        }
    }

    /// The read index of the current leader (this node or another), for a linearizable read or
    /// for readiness: every write acknowledged before this call is at or below it.
    pub async fn read_index(&self) -> Result<u64, String> {
        use crate::internal::ReadIndexReply;
        let (leader, reply) = self.ask_read_index().await?;
        match reply {
            ReadIndexReply::Index(index) => Ok(index),
            ReadIndexReply::NotLeader => Err(format!("node {leader} is no longer the leader")),
            ReadIndexReply::Failed(why) => Err(why),
            ReadIndexReply::NotMember { removed } => Err(format!(
                "leader {leader} says this node is not a member{}",
                if removed { " (removed)" } else { "" }
            )),
        }
    }

    /// Asks the current leader (this node or another) for its read index, over the peer port.
    pub(crate) async fn ask_read_index(
        &self,
    ) -> Result<(u64, crate::internal::ReadIndexReply), String> {
        let (leader, addr) = self.leader().ok_or("no leader is known")?;
        if leader == self.id {
            return Ok((leader, self.leader_read_index().await));
        }
        let mut client = self.peer(&addr).map_err(|e| e.to_string())?;
        let mut request = tonic::Request::new(Blob {
            data: codec::encode(&crate::internal::ReadIndexAsk { node: self.id }),
            target: 0,
        });
        request.set_timeout(self.config.raft.election_timeout_max * 2);
        let blob = client
            .read_index(request)
            .await
            .map_err(|s| format!("leader {leader}: {}", s.message()))?;
        let reply = codec::decode(&blob.into_inner().data).map_err(|e| e.to_string())?;
        Ok((leader, reply))
    }

    /// Returns once Raft reports a leader other than `old` (not merely none: an election).
    /// (Server metrics, which change only with the vote, state, leader or membership: the full
    /// metrics are sent again after every batch of Raft work, and would wake every forwarded
    /// request's watcher several times per entry.)
    async fn until_new_leader(&self, old: u64) {
        let mut metrics = self.raft.server_metrics();
        loop {
            if metrics
                .borrow_watched()
                .current_leader
                .is_some_and(|l| l != old)
            {
                return;
            }
            if metrics.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits `backoff`, or less if the leader Raft reports changes from `seen` first (a new
    /// leader was elected: the next try should go to it at once, not after the backoff).
    async fn until_leader_changes(&self, seen: Option<u64>, backoff: Duration) {
        let mut metrics = self.raft.server_metrics();
        let changed = async {
            loop {
                if metrics.borrow_watched().current_leader != seen {
                    return;
                }
                if metrics.changed().await.is_err() {
                    // Raft stopped: let the backoff run out.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = changed => {}
        }
    }

    /// Sends an encoded command to the leader at `addr`. `Err(Some(_))`: it provably did not
    /// reach a leader; `Err(None)`: the outcome is unknown (deadline passed in flight).
    async fn forward(
        &self,
        leader: u64,
        addr: &str,
        data: Vec<u8>,
        deadline: Instant,
    ) -> Result<ForwardReply, Option<String>> {
        let lost_after = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        if crate::faults::pass(&self.faults, self.id, leader, lost_after)
            .await
            .is_err()
        {
            return Err(Some("request lost (fault injection)".into()));
        }
        let reply = self.forward_unfaulted(addr, data, deadline).await;
        if crate::faults::pass(&self.faults, leader, self.id, lost_after)
            .await
            .is_err()
        {
            // The leader may have committed it: the outcome is unknown.
            return Err(None);
        }
        reply
    }

    async fn forward_unfaulted(
        &self,
        addr: &str,
        data: Vec<u8>,
        deadline: Instant,
    ) -> Result<ForwardReply, Option<String>> {
        let mut client = self.peer(addr).map_err(|e| Some(e.to_string()))?;
        let mut request = tonic::Request::new(Blob { data, target: 0 });
        let remaining = deadline.saturating_duration_since(Instant::now());
        request.set_timeout(remaining);
        match tokio::time::timeout_at(deadline, client.forward(request)).await {
            Ok(Ok(reply)) => {
                codec::decode(&reply.into_inner().data).map_err(|e| Some(e.to_string()))
            }
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                Err(Some(status.message().to_string()))
            }
            Ok(Err(_)) | Err(_) => Err(None),
        }
    }
}

impl Node {
    /// A client for the peer at `addr`, from the cache or newly (lazily) connected.
    pub fn peer(&self, addr: &str) -> Result<InternalClient<Channel>, tonic::transport::Error> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = peers.get(addr) {
            return Ok(c.clone());
        }
        let channel = network::peer_channel(addr, self.peer_tls.as_ref(), None)?;
        let client = network::internal_client(channel);
        peers.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// Why this node is not ready (`/readyz`, the dashboard, readiness waits), or `None`.
    pub fn not_ready(&self) -> Option<String> {
        let node = self;
        let m = node.raft.metrics().borrow_watched().clone();
        if let Err(fatal) = &m.running_state {
            return Some(format!("raft stopped: {fatal}"));
        }
        if node.departure.is_removed() {
            return Some("removed from the cluster".into());
        }
        if node.departure.has_departed() {
            return Some("left the cluster (drained)".into());
        }
        if node.read(|t| t.leaving(node.id).is_some()) {
            return Some("draining: leaving the cluster".into());
        }
        if m.current_leader.is_none() {
            return Some("no leader known".into());
        }
        let applied = m.last_applied.map_or(0, |l| l.index);
        match node.ready_index.load(std::sync::atomic::Ordering::Acquire) {
            u64::MAX => {
                return Some("catching up: asking the leader how far the log is committed".into())
            }
            needed if applied < needed => {
                return Some(format!(
                "catching up: applied {applied} of the {needed} entries committed when it started"
            ))
            }
            _ => {}
        }
        if !node.lease_valid() {
            return Some("no valid lease (not registered yet, or fenced)".into());
        }
        let last = m.last_log_index.unwrap_or(0);
        if last.saturating_sub(applied) > READY_APPLY_LAG_MAX {
            return Some(format!("applying: {applied} of {last}"));
        }
        None
    }
}

/// The Raft type config, re-exported for modules that name openraft types.
pub type Config = TypeConfig;

impl NodeInner {
    /// Stops this node because a part it cannot run without failed (crash-only: its lease
    /// renewals end with it, so its jobs move to other nodes under higher fencing tokens once
    /// the lease runs out). The first reason is kept; `exactlyd` exits non-zero with it.
    pub fn fail(&self, why: impl Into<String>) {
        let why = why.into();
        tracing::error!(node = self.id, %why, "stopping this node");
        let _ = self.failure.set(why);
        self.shutdown.cancel();
    }

    /// Why the node stopped itself, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }
}
