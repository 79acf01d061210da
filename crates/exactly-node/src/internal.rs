//! The node-to-node gRPC service: Raft RPCs, snapshot streams, forwarded writes and joins.

use openraft::async_runtime::WatchReceiver;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use exactly_core::Command;
use exactly_proto::internal::internal_server::Internal;
use exactly_proto::internal::{Blob, JoinRequest, SnapshotChunk};
use exactly_store::raft_types::{Snapshot, SnapshotMeta, Vote};
use exactly_store::TypeConfig;
use openraft::error::Fatal;
use openraft::raft::{AppendEntriesRequest, SnapshotResponse};
use openraft::{BasicNode, ChangeMembers};
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::codec;
use crate::node::{ForwardReply, Node, ProposeError};

#[derive(Clone)]
pub struct InternalService {
    pub node: Node,
    /// What members said about senders this node does not know as members
    /// ([`leader_standing`]).
    pub vouches: Arc<std::sync::Mutex<Vouches>>,
}

impl InternalService {
    pub fn new(node: Node) -> Self {
        Self {
            node,
            vouches: Default::default(),
        }
    }
}

/// Per sender id: whether a member vouched for it, and when that was learned.
pub type Vouches = std::collections::HashMap<u64, (bool, std::time::Instant)>;

/// How long a member's word that a node is a member holds.
pub const VOUCHED_FOR: Duration = Duration::from_secs(30);
/// How long a sender no member vouched for is refused without asking again.
pub const UNVOUCHED_FOR: Duration = Duration::from_secs(2);
/// How long the members asked may take to answer, together.
pub const VOUCH_TIMEOUT: Duration = Duration::from_millis(500);
/// Node ids a `Members` answer may hold, at most.
pub const MEMBERS_MAX: usize = 1_000;

/// Where a sender of leader traffic (AppendEntries, InstallSnapshot) stands with this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// In this node's membership (or this node has none yet: it is joining).
    Member,
    /// Not in it, but a member said it is, recently enough.
    Vouched,
    /// No member said so, recently enough: refused without asking again.
    Refused,
    /// Not known: ask the members.
    Ask,
}

/// The pure rule: a lagging follower may not yet know a leader that joined after it fell
/// behind, so an unknown sender is asked about, not refused outright; what members said is
/// remembered for [`VOUCHED_FOR`] (yes) or [`UNVOUCHED_FOR`] (no).
pub fn leader_standing(
    known: &std::collections::BTreeSet<u64>,
    sender: u64,
    said: Option<(bool, std::time::Instant)>,
    now: std::time::Instant,
) -> Standing {
    if known.is_empty() || known.contains(&sender) {
        return Standing::Member;
    }
    match said {
        Some((true, at)) if now.saturating_duration_since(at) < VOUCHED_FOR => Standing::Vouched,
        Some((false, at)) if now.saturating_duration_since(at) < UNVOUCHED_FOR => Standing::Refused,
        _ => Standing::Ask,
    }
}

fn blob<T: serde::Serialize>(value: &T) -> Response<Blob> {
    Response::new(Blob {
        data: codec::encode(value),
        target: 0,
    })
}

/// What a ReadIndex answers.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum ReadIndexReply {
    /// Leadership confirmed by a quorum: a replica that has applied this index serves
    /// linearizable reads.
    Index(u64),
    NotLeader,
    Failed(String),
    /// The asking node is not in the leader's membership (`removed`: and never may be again);
    /// how a node that drained away learns that it is out (see `Node::has_left`).
    NotMember {
        removed: bool,
    },
}

/// What a ReadIndex request carries: the asking node (with peer TLS, it must be the node its
/// certificate names). An empty body (an older node) asks for the index only.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ReadIndexAsk {
    pub node: u64,
}

/// What a Join answers.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum JoinReply {
    /// Added (or already present); `voter` says whether it was promoted.
    Joined {
        voter: bool,
    },
    NotLeader,
    Failed(String),
    /// That node id was removed from the cluster: it never comes back.
    Removed,
}

/// Who sent a request, as far as this node can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sender {
    /// Plaintext peer port: anyone who reaches it (README, "Security").
    Unauthenticated,
    /// Mutual TLS: the node id the sender's certificate names.
    Node(u64),
}

/// Refuses a request whose sender is not `claimed` (the leader or candidate a Raft message
/// names, the node a renewal or join is about). Plaintext: nothing to check.
/// The requests of an `AppendStream` that pass their checks, in order; the first that does not
/// ends them, with its refusal left in `refused` for the stream of answers to end with.
struct Inbound {
    service: InternalService,
    inbound: Streaming<Blob>,
    sender: Sender,
    /// The sender's certificate (DER), checked against the revocation list before each request.
    cert: Option<Vec<u8>>,
    refused: Arc<std::sync::Mutex<Option<Status>>>,
}

impl Inbound {
    async fn next(this: Option<Self>) -> Option<(AppendEntriesRequest<TypeConfig>, Option<Self>)> {
        let mut this = this?;
        match this.checked().await {
            Ok(Some(req)) => Some((req, Some(this))),
            Ok(None) => None,
            Err(status) => {
                *this.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                None
            }
        }
    }

    async fn checked(&mut self) -> Result<Option<AppendEntriesRequest<TypeConfig>>, Status> {
        let Some(message) = self.inbound.message().await? else {
            return Ok(None);
        };
        if let (Some(tls), Sender::Node(id)) = (&self.service.node.peer_tls, self.sender) {
            check_revoked(tls, id, self.cert.as_deref())?;
        }
        self.service
            .check_append(self.sender, message)
            .await
            .map(Some)
    }
}

/// Refuses a certificate (DER) the revocation list names now, on a connection opened before it
/// was revoked too.
fn check_revoked(tls: &crate::tls::PeerTls, id: u64, der: Option<&[u8]>) -> Result<(), Status> {
    if der.is_some_and(|der| tls.is_revoked(der)) {
        return Err(Status::unauthenticated(format!(
            "node {id}'s certificate is revoked (peer-tls.crl)"
        )));
    }
    Ok(())
}

fn check_claim(sender: Sender, claimed: u64, what: &str) -> Result<(), Status> {
    match sender {
        Sender::Node(id) if id != claimed => Err(Status::permission_denied(format!(
            "{what} names node {claimed}, but the sender's certificate is node {id}'s"
        ))),
        _ => Ok(()),
    }
}

impl InternalService {
    /// The sender of a request: with peer TLS, the node its certificate names (a connection
    /// without a node certificate never gets here: the TLS handshake requires one).
    /// A certificate the CRL lists now is refused on a connection opened before it was
    /// revoked, too.
    fn sender<T>(&self, request: &Request<T>) -> Result<Sender, Status> {
        let Some(tls) = &self.node.peer_tls else {
            return Ok(Sender::Unauthenticated);
        };
        let id = crate::tls::sender(request)
            .ok_or_else(|| Status::unauthenticated("no node certificate on this connection"))?;
        check_revoked(tls, id, crate::tls::sender_cert(request))?;
        Ok(Sender::Node(id))
    }

    /// Refuses a sender that is not in this node's view of the membership (`voters_only`: not
    /// a voter). Plaintext: nothing to check.
    fn check_member(&self, sender: Sender, voters_only: bool, what: &str) -> Result<(), Status> {
        let Sender::Node(id) = sender else {
            return Ok(());
        };
        let metrics = self.node.raft.metrics();
        let metrics = metrics.borrow_watched();
        let membership = metrics.membership_config.membership();
        let member = membership.voter_ids().any(|v| v == id)
            || (!voters_only && membership.learner_ids().any(|l| l == id));
        if member {
            return Ok(());
        }
        let role = if voters_only { "a voter" } else { "a member" };
        Err(Status::permission_denied(format!(
            "node {id} is not {role} of this cluster: it may not send {what}"
        )))
    }

    /// Refuses outcomes of attempts that ran on another node than the sender: an honest node
    /// reports only its own (a late report of an attempt since replaced is still its own, and
    /// the state machine refuses it as stale). A token this node does not know (a deleted
    /// job, a future index) is left to the state machine, which refuses it too.
    fn check_own_attempts(
        &self,
        sender: Sender,
        list: &[exactly_core::Completion],
    ) -> Result<(), Status> {
        let Sender::Node(id) = sender else {
            return Ok(());
        };
        // A finished job's attempts are in its archived record (read only for such a job).
        let foreign = self.node.state.read_jobs(|t, archive| {
            list.iter().find_map(|c| {
                let job = match t.job(c.job) {
                    Some(job) => job,
                    None => archive.finished(t, c.job).ok().flatten()?,
                };
                let attempt = job.attempts.iter().find(|a| a.token == c.token)?;
                (attempt.node != id).then_some((c.job, c.token, attempt.node))
            })
        });
        match foreign {
            Some((job, token, node)) => Err(Status::permission_denied(format!(
                "the outcome of job {job} attempt {token} ran on node {node}: node {id} may not \
                 report it"
            ))),
            None => Ok(()),
        }
    }

    /// The node ids of this node's membership (the latest it has, committed or not).
    fn known_members(&self) -> std::collections::BTreeSet<u64> {
        let metrics = self.node.raft.metrics();
        let metrics = metrics.borrow_watched();
        let membership = metrics.membership_config.membership();
        membership
            .voter_ids()
            .chain(membership.learner_ids())
            .collect()
    }

    /// Refuses leader traffic (AppendEntries, InstallSnapshot) from a node that is not a member:
    /// one this node does not know is asked about at the voters it knows, and taken if one of
    /// them holds it in its membership (a follower that fell behind a membership change must
    /// still hear from a leader that joined meanwhile). Plaintext: nothing to check.
    async fn check_leader(&self, sender: Sender, what: &str) -> Result<(), Status> {
        let Sender::Node(id) = sender else {
            return Ok(());
        };
        let known = self.known_members();
        let said = self
            .vouches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .copied();
        let refused = || {
            Status::permission_denied(format!(
                "node {id} is not a member of this cluster (nor of any member's view of it): it \
                 may not send {what}"
            ))
        };
        match leader_standing(&known, id, said, std::time::Instant::now()) {
            Standing::Member | Standing::Vouched => return Ok(()),
            Standing::Refused => return Err(refused()),
            Standing::Ask => {}
        }
        let vouched = self.ask_members(id).await;
        {
            let mut vouches = self.vouches.lock().unwrap_or_else(|p| p.into_inner());
            // Bounded: one entry per sender id asked about within the last VOUCHED_FOR.
            let now = std::time::Instant::now();
            vouches.retain(|_, (_, at)| now.saturating_duration_since(*at) < VOUCHED_FOR);
            vouches.insert(id, (vouched, now));
        }
        if vouched {
            tracing::info!(
                node = self.node.id,
                leader = id,
                "a member vouched for a leader this node did not know yet"
            );
            Ok(())
        } else {
            Err(refused())
        }
    }

    /// Whether one of the voters this node knows (other than itself) holds `id` in its
    /// membership, asked all at once within [`VOUCH_TIMEOUT`].
    async fn ask_members(&self, id: u64) -> bool {
        let voters: Vec<(u64, String)> = {
            let metrics = self.node.raft.metrics();
            let metrics = metrics.borrow_watched();
            let membership = metrics.membership_config.membership();
            membership
                .nodes()
                .filter(|(v, _)| **v != self.node.id && membership.voter_ids().any(|x| x == **v))
                .map(|(v, n)| (*v, n.addr.clone()))
                .collect()
        };
        let asks = voters.into_iter().filter_map(|(voter, addr)| {
            let mut client = self.node.peer(&addr).ok()?;
            Some(async move {
                let reply = client
                    .members(Blob {
                        data: Vec::new(),
                        target: voter,
                    })
                    .await
                    .ok()?;
                let ids: Vec<u64> = codec::decode(&reply.into_inner().data).ok()?;
                (ids.len() <= MEMBERS_MAX).then_some(ids.contains(&id))
            })
        });
        let answers = tokio::time::timeout(VOUCH_TIMEOUT, futures::future::join_all(asks)).await;
        answers.is_ok_and(|all| all.into_iter().any(|a| a == Some(true)))
    }

    /// The checks an AppendEntries from `sender` passes before Raft sees it, on either path
    /// (one call or the pipelined stream): meant for this node, well formed, sent by the leader
    /// it names, which is not a removed node and is a member (or vouched for).
    async fn check_append(
        &self,
        sender: Sender,
        Blob { data, target }: Blob,
    ) -> Result<AppendEntriesRequest<TypeConfig>, Status> {
        self.check_target(target)?;
        let req: AppendEntriesRequest<TypeConfig> = codec::decode(&data)?;
        if let Some(index) = req.entries.last().map(|e| e.log_id.index) {
            tracing::trace!(target: exactly_store::TIMELINE, index, "received");
        }
        let leader = req.vote.leader_id.node_id;
        check_claim(sender, leader, "AppendEntries")?;
        // A removed node never leads again (its id is never reused): what it sends as leader
        // must not move this node's term, and the refusal tells it that it was removed.
        if let Some(refusal) = crate::membership::removed_refusal(&self.node, leader) {
            return Err(refusal);
        }
        self.check_leader(sender, "AppendEntries").await?;
        Ok(req)
    }

    /// Refuses a Raft message meant for another node id (0: the sender did not say).
    fn check_target(&self, target: u64) -> Result<(), Status> {
        if target != 0 && target != self.node.id {
            return Err(Status::failed_precondition(format!(
                "this is node {}, not node {target}: the address now belongs to another node",
                self.node.id
            )));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Internal for InternalService {
    /// With peer TLS, only from the leader the message names, and only from a member: one this
    /// node does not know yet (a lagging follower may not have the entry that admitted a new
    /// leader) is taken if a voter it knows vouches for it ([`InternalService::check_leader`]).
    async fn append_entries(&self, request: Request<Blob>) -> Result<Response<Blob>, Status> {
        let sender = self.sender(&request)?;
        let req = self.check_append(sender, request.into_inner()).await?;
        let last = req.entries.last().map(|e| e.log_id.index);
        let reply = blob(&self.node.raft.append_entries(req).await);
        if let Some(index) = last {
            tracing::trace!(target: exactly_store::TIMELINE, index, "acknowledged");
        }
        Ok(reply)
    }

    type AppendStreamStream = futures::stream::BoxStream<'static, Result<Blob, Status>>;

    /// AppendEntries pipelined (see the proto): each request passes the checks of
    /// [`Internal::append_entries`] before Raft sees it, and openraft's `stream_append` appends
    /// the next while the one before is still being made durable.
    async fn append_stream(
        &self,
        request: Request<Streaming<Blob>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        let sender = self.sender(&request)?;
        // The stream lives as long as the sender's leadership: its certificate is checked
        // against the revocation list again before each request.
        let cert = crate::tls::sender_cert(&request).map(<[u8]>::to_vec);
        let refused: Arc<std::sync::Mutex<Option<Status>>> = Arc::default();
        let checked = futures::stream::unfold(
            Some(Inbound {
                service: self.clone(),
                inbound: request.into_inner(),
                sender,
                cert,
                refused: refused.clone(),
            }),
            Inbound::next,
        );
        let answers = self.node.raft.stream_append(checked).map(|answer| {
            if let Ok(Ok(Some(log_id))) = &answer {
                let index = log_id.index;
                tracing::trace!(target: exactly_store::TIMELINE, index, "acknowledged");
            }
            Ok(Blob {
                data: codec::encode(&answer),
                target: 0,
            })
        });
        let refusal = futures::stream::once(async move {
            refused.lock().unwrap_or_else(|p| p.into_inner()).take()
        })
        .filter_map(|status| status.map(Err));
        Ok(Response::new(Box::pin(answers.chain(refusal))))
    }

    /// This node's membership, for a member that does not know a sender of leader traffic
    /// ([`InternalService::check_leader`]); with peer TLS, only to members.
    async fn members(&self, request: Request<Blob>) -> Result<Response<Blob>, Status> {
        let sender = self.sender(&request)?;
        self.check_target(request.get_ref().target)?;
        self.check_member(sender, false, "membership questions")?;
        let ids: Vec<u64> = self.known_members().into_iter().collect();
        Ok(blob(&ids))
    }

    /// A removed node's vote request never reaches Raft: it must not raise this node's term,
    /// and the refusal tells it that it was removed.
    /// With peer TLS, only from the candidate it names, and only from a voter.
    async fn vote(&self, request: Request<Blob>) -> Result<Response<Blob>, Status> {
        let sender = self.sender(&request)?;
        let Blob { data, target } = request.into_inner();
        self.check_target(target)?;
        let req = codec::decode_vote_request(&data)?;
        let candidate = req.vote.leader_id.node_id;
        check_claim(sender, candidate, "the vote request")?;
        if let Some(refusal) = crate::membership::removed_refusal(&self.node, candidate) {
            return Err(refusal);
        }
        self.check_member(sender, true, "vote requests")?;
        Ok(blob(&self.node.raft.vote(req).await))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<Blob>, Status> {
        let sender = self.sender(&request)?;
        let cap = self.node.config.limits.snapshot_bytes_max;
        let mut stream = request.into_inner();
        // The first chunk names the sender's vote and the snapshot: everything that can be
        // decided from it is decided before any data is taken in.
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        self.check_target(first.target)?;
        let (vote, meta): (Vote, SnapshotMeta) = codec::decode(&first.header)?;
        check_claim(sender, vote.leader_id.node_id, "the snapshot")?;
        self.check_leader(sender, "snapshots").await?;
        if let Some(refusal) =
            crate::membership::removed_refusal(&self.node, vote.leader_id.node_id)
        {
            return Err(refusal);
        }
        // openraft refuses a snapshot from a leader whose vote is not at least this node's,
        // whatever it holds, and answers with this node's vote: answer so at once, without
        // reading the data (this node's vote only grows, so a stale view only lets more through
        // to openraft, which decides again).
        let mine = self.node.raft.metrics().borrow_watched().vote;
        // Not "at least": lower, or incomparable (votes are partially ordered).
        let at_least = matches!(
            vote.partial_cmp(&mine),
            Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal)
        );
        if !at_least {
            let refused: Result<SnapshotResponse<TypeConfig>, Fatal<TypeConfig>> =
                Ok(SnapshotResponse::new(mine));
            return Ok(blob(&refused));
        }
        // Into an anonymous file in the snapshot directory, never into memory: a snapshot is as
        // large as the state, and the cap is checked as the bytes arrive.
        let store = self.node.store.clone();
        let file = tokio::task::spawn_blocking(move || store.incoming_snapshot_file())
            .await
            .map_err(|e| Status::internal(format!("receiving the snapshot: {e}")))?
            .map_err(|e| Status::unavailable(format!("receiving the snapshot: {e}")))?;
        let mut file = tokio::io::BufWriter::new(tokio::fs::File::from_std(file));
        let write_err =
            |e: std::io::Error| Status::unavailable(format!("receiving the snapshot: {e}"));
        let too_big = || {
            Status::resource_exhausted(format!(
                "snapshot exceeds limits.snapshot-bytes-max ({cap} bytes)"
            ))
        };
        let mut received = first.data.len() as u64;
        if received > cap {
            return Err(too_big());
        }
        file.write_all(&first.data).await.map_err(write_err)?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            received += chunk.data.len() as u64;
            if received > cap {
                return Err(too_big());
            }
            file.write_all(&chunk.data).await.map_err(write_err)?;
        }
        file.flush().await.map_err(write_err)?;
        let mut file = file.into_inner().into_std().await;
        // Before openraft sees it: it purges the log before the state machine decodes the data.
        let checked = tokio::task::spawn_blocking(move || {
            exactly_store::check_snapshot_file(&meta, &mut file).map(|()| (meta, file))
        })
        .await
        .map_err(|e| Status::internal(format!("checking the snapshot: {e}")))?;
        let (meta, file) = checked.map_err(|e| {
            tracing::warn!(error = %e, "refused a snapshot from a peer");
            Status::invalid_argument(format!("snapshot refused, nothing changed: {e}"))
        })?;
        let snapshot = Snapshot {
            meta,
            snapshot: tokio::fs::File::from_std(file),
        };
        Ok(blob(
            &self.node.raft.install_full_snapshot(vote, snapshot).await,
        ))
    }

    /// From a member: the leader's read index. From a node that is not (one that drained away
    /// or was removed, asking whether it is out): only that answer.
    async fn read_index(&self, request: Request<Blob>) -> Result<Response<Blob>, Status> {
        let sender = self.sender(&request)?;
        let data = &request.get_ref().data;
        let asker = if data.is_empty() {
            None
        } else {
            let ask: ReadIndexAsk = codec::decode(data)?;
            check_claim(sender, ask.node, "the read-index request")?;
            Some(ask.node)
        };
        let asker = match sender {
            Sender::Node(id) => Some(id),
            Sender::Unauthenticated => asker,
        };
        if let Some(id) = asker {
            if !self.node.is_leader() {
                return Ok(blob(&ReadIndexReply::NotLeader));
            }
            if !self.node.is_member(id) {
                let removed = self.node.read(|t| t.is_removed(id));
                return Ok(blob(&ReadIndexReply::NotMember { removed }));
            }
        }
        self.check_member(sender, false, "read-index requests")?;
        Ok(blob(&self.node.leader_read_index().await))
    }

    /// With peer TLS, only from a member, and a node's renewal or registration only from that
    /// node.
    async fn forward(&self, request: Request<Blob>) -> Result<Response<Blob>, Status> {
        let received = std::time::Instant::now();
        let sender = self.sender(&request)?;
        let command: Command = codec::decode(&request.into_inner().data)?;
        check_forwarded(&command, self.node.config.limits.payload_bytes_max)?;
        match &command {
            Command::Renew(r) => check_claim(sender, r.lease.node, "the renewal")?,
            Command::RegisterNode(r) => check_claim(sender, r.node, "the registration")?,
            Command::Complete(list) => self.check_own_attempts(sender, list)?,
            _ => {}
        }
        self.check_member(sender, false, "forwarded writes")?;
        if !self.node.is_leader() {
            return Ok(blob(&ForwardReply::NotLeader));
        }
        let budget = self.node.config.limits.propose_timeout;
        let reply = match tokio::time::timeout(budget, self.node.write_local(command)).await {
            Ok(reply) => reply,
            Err(_) => ForwardReply::Failed(ProposeError::Timeout(budget)),
        };
        if let ForwardReply::Committed(_, index) = &reply {
            tracing::trace!(
                target: exactly_store::TIMELINE,
                index,
                took_us = received.elapsed().as_micros() as u64,
                "forward_answered"
            );
        }
        Ok(blob(&reply))
    }

    /// With peer TLS, a node joins only as the id its certificate names.
    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<Blob>, Status> {
        let sender = self.sender(&request)?;
        let JoinRequest { node_id, addr, by } = request.into_inner();
        if node_id == 0 {
            return Err(Status::invalid_argument("join needs a node id"));
        }
        let by = if by.is_empty() {
            format!("node-{node_id}")
        } else {
            let printable = by.bytes().all(|b| b.is_ascii_graphic());
            if by.len() > exactly_core::limits::AUDIT_BY_BYTES_MAX || !printable {
                return Err(Status::invalid_argument(
                    "the join request's `by` must be a credential name",
                ));
            }
            by
        };
        exactly_core::state::validate_node_addr(&addr).map_err(Status::invalid_argument)?;
        check_claim(sender, node_id, "the join request")?;
        if !self.node.is_leader() {
            // Tell the caller who leads so it can ask there.
            let leader = self.node.leader().map(|(_, a)| a);
            let message = format!(
                "not the leader; leader: {}",
                leader.as_deref().unwrap_or("?")
            );
            return Err(crate::codec::Refusal::NotLeader { leader }
                .status(tonic::Code::FailedPrecondition, message));
        }
        Ok(blob(&admit(&self.node, node_id, addr, by).await))
    }
}

/// What a peer may forward to the leader, checked before anything is proposed. A peer forwards
/// what the public API asked of it (client writes, already checked at the edge of the node that
/// took them, and checked again here against this node's payload limit) and what its own node
/// reports (its registration, lease renewals and attempt outcomes). What only a leader decides
/// is never taken from a peer: assignments, lease expiry, retention, cron fires, a member's
/// departure, and the leader's own batched or submit-and-assign entries. Forged, any of these
/// could start a second attempt of a running job or delete finished work (issue 12: a forged
/// `Expire` ran one job on two nodes at once, a forged `Retain` deleted every finished job).
pub(crate) fn check_forwarded(command: &Command, payload_bytes_max: usize) -> Result<(), Status> {
    // An operator's write with its credential's name: what the name wraps is checked here, and
    // apply checks the rest (an operator's command, a bounded printable name).
    let command = match command {
        Command::Audited(audited) => {
            audited.check().map_err(Status::invalid_argument)?;
            &audited.command
        }
        other => other,
    };
    let leader_only = match command {
        Command::Assign(_) => Some("Assign"),
        Command::Expire(_) => Some("Expire"),
        Command::Retain(_) => Some("Retain"),
        Command::FireSchedules(_) => Some("FireSchedules"),
        Command::NodeLeft(_) => Some("NodeLeft"),
        Command::Joined(_) => Some("Joined"),
        Command::SubmitAssign { .. } => Some("SubmitAssign"),
        Command::Batch(_) => Some("Batch"),
        // Unwrapped above; one inside another is refused by `Audited::check`.
        Command::Audited(_) => Some("nested Audited"),
        Command::Submit(_)
        | Command::SubmitGroups(_)
        | Command::Complete(_)
        | Command::Renew(_)
        | Command::RegisterNode(_)
        | Command::Cancel(_)
        | Command::Redrive(_)
        | Command::PurgeDead(_)
        | Command::ConfigureQueue { .. }
        | Command::AddSchedule(_)
        | Command::RemoveSchedule(_)
        | Command::PauseSchedule { .. }
        | Command::Drain(_)
        | Command::IssueToken(_)
        | Command::RevokeToken(_) => None,
    };
    if let Some(name) = leader_only {
        return Err(Status::permission_denied(format!(
            "a {name} command is proposed only by the leader itself, never forwarded by a peer; \
             nothing was proposed"
        )));
    }
    let jobs: Vec<&exactly_core::NewJob> = match command {
        Command::Submit(jobs) => jobs.iter().collect(),
        Command::SubmitGroups(groups) => groups.iter().flatten().collect(),
        _ => Vec::new(),
    };
    if let Some((i, job)) = jobs
        .iter()
        .enumerate()
        .find(|(_, j)| j.payload.len() > payload_bytes_max)
    {
        return Err(Status::resource_exhausted(format!(
            "forwarded job {i}: payload of {} bytes exceeds limits.payload-bytes-max ({} bytes) \
             on the leader; nothing was proposed",
            job.payload.len(),
            payload_bytes_max
        )));
    }
    Ok(())
}

/// Adds a node as a learner (waiting until it has caught up), then promotes it to voter while
/// the cluster has fewer voters than `voters-target`.
///
/// Runs to its end on its own task even if the caller goes away (a join request that timed out
/// while its learner caught up: CI once lost node 2's record that way), one admission at a
/// time: a membership change made is also recorded, and a retry waits for the try before it
/// and then finds nothing left to change, so records nothing.
pub(crate) async fn admit(node: &Node, id: u64, addr: String, by: String) -> JoinReply {
    let node = node.clone();
    tokio::spawn(async move {
        let _one_at_a_time = node.admissions.lock().await;
        admit_now(&node, id, addr, by).await
    })
    .await
    .unwrap_or_else(|e| JoinReply::Failed(format!("the admission task failed: {e}")))
}

async fn admit_now(node: &Node, id: u64, addr: String, by: String) -> JoinReply {
    if node.read(|t| t.is_removed(id)) {
        return JoinReply::Removed;
    }
    let raft = &node.raft;
    let membership = raft
        .metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .clone();
    let mut changed = false;
    let new_member = match membership.get_node(&id) {
        None => {
            let learner = BasicNode { addr: addr.clone() };
            if let Err(e) = raft.add_learner(id, learner, true).await {
                return match e {
                    openraft::error::RaftError::APIError(
                        openraft::error::ClientWriteError::ForwardToLeader(_),
                    ) => JoinReply::NotLeader,
                    other => JoinReply::Failed(other.to_string()),
                };
            }
            changed = true;
            true
        }
        // A member that comes back at another address (a container recreated with a new host
        // name keeps its data and id): without this, the leader would go on dialing the old
        // address, and the node would get no log.
        Some(known) if known.addr != addr => {
            if let Err(e) = set_address(node, id, known.addr.clone(), addr.clone()).await {
                return e;
            }
            changed = true;
            false
        }
        Some(_) => false,
    };
    let membership = raft
        .metrics()
        .borrow_watched()
        .membership_config
        .membership()
        .clone();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let reply = if voters.contains(&id) {
        JoinReply::Joined { voter: true }
    } else if voters.len() >= node.config.voters_target {
        JoinReply::Joined { voter: false }
    } else {
        match raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
        {
            Ok(_) => {
                changed = true;
                JoinReply::Joined { voter: true }
            }
            Err(e) => JoinReply::Failed(e.to_string()),
        }
    };
    if let (true, JoinReply::Joined { voter }) = (changed, &reply) {
        record_join(node, by, id, addr, *voter, new_member).await;
    }
    reply
}

/// Records a change of the membership that a join made in the audit trail, with who asked. The
/// membership changed already; a record that cannot be committed (the leader lost its place) is
/// logged, not retried.
async fn record_join(node: &Node, by: String, id: u64, addr: String, voter: bool, new: bool) {
    let note = exactly_core::JoinNote {
        node: id,
        addr,
        voter,
        new_member: new,
    };
    if let Err(e) = node.ask_as(by, exactly_core::Proposal::joined(note)).await {
        tracing::warn!(node = id, error = %e, "a join is not in the audit trail");
    }
}

/// Replaces the address of member `id` in the Raft membership (a membership change of node
/// information only: voters and learners stay as they are).
pub(crate) async fn set_address(
    node: &Node,
    id: u64,
    old: String,
    addr: String,
) -> Result<(), JoinReply> {
    let change = ChangeMembers::SetNodes(std::collections::BTreeMap::from([(
        id,
        BasicNode { addr: addr.clone() },
    )]));
    match node.raft.change_membership(change, false).await {
        Ok(_) => {
            tracing::info!(node = id, %old, new = %addr, "member's address changed");
            Ok(())
        }
        Err(openraft::error::RaftError::APIError(
            openraft::error::ClientWriteError::ForwardToLeader(_),
        )) => Err(JoinReply::NotLeader),
        Err(e) => Err(JoinReply::Failed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use exactly_core::{Command, NewJob, NodeLease, Retention};
    use tonic::Code;

    use std::time::Duration;

    use super::{check_forwarded, leader_standing, Standing, UNVOUCHED_FOR, VOUCHED_FOR};

    fn job(payload_bytes: usize) -> NewJob {
        NewJob {
            payload: vec![0; payload_bytes],
            ..NewJob::default()
        }
    }

    /// Client writes and a node's own reports pass; what only the leader decides is refused
    /// with PERMISSION_DENIED; an oversized payload (checked again on the leader) with
    /// RESOURCE_EXHAUSTED.
    #[test]
    fn a_peer_forwards_only_client_writes_and_its_own_reports() {
        let cases: Vec<(Command, Option<Code>)> = vec![
            (Command::Submit(vec![job(10)]), None),
            (
                Command::SubmitGroups(vec![vec![job(10)], vec![job(100)]]),
                None,
            ),
            (Command::Cancel(vec![1]), None),
            (Command::Complete(Vec::new()), None),
            (Command::RemoveSchedule("s".into()), None),
            (
                Command::Submit(vec![job(10), job(101)]),
                Some(Code::ResourceExhausted),
            ),
            (
                Command::SubmitGroups(vec![vec![job(1)], vec![job(101)]]),
                Some(Code::ResourceExhausted),
            ),
            (Command::Assign(Vec::new()), Some(Code::PermissionDenied)),
            (
                Command::Expire(exactly_core::Expiry {
                    lease: NodeLease {
                        node: 2,
                        incarnation: 1,
                    },
                    renewed_index: 7,
                }),
                Some(Code::PermissionDenied),
            ),
            (
                Command::Retain(Retention::default()),
                Some(Code::PermissionDenied),
            ),
            (
                Command::FireSchedules(Vec::new()),
                Some(Code::PermissionDenied),
            ),
            (Command::NodeLeft(2), Some(Code::PermissionDenied)),
            (
                Command::SubmitAssign {
                    groups: vec![vec![job(1)]],
                    excluded: BTreeSet::new(),
                },
                Some(Code::PermissionDenied),
            ),
            (
                Command::Batch(vec![Command::Cancel(vec![1])]),
                Some(Code::PermissionDenied),
            ),
        ];
        for (command, expected) in cases {
            let got = check_forwarded(&command, 100).err().map(|s| s.code());
            assert_eq!(got, expected, "{command:?}");
        }
    }

    /// Members and a node that is joining take any leader; an unknown one is asked about, and
    /// what members said holds for a while: a yes for VOUCHED_FOR, a no for UNVOUCHED_FOR.
    #[test]
    fn an_unknown_leader_is_asked_about_and_the_answer_remembered() {
        let now = std::time::Instant::now();
        let known: BTreeSet<u64> = [1, 2, 3].into();
        let later = |d: Duration| now + d;
        assert_eq!(leader_standing(&known, 2, None, now), Standing::Member);
        assert_eq!(
            leader_standing(&BTreeSet::new(), 9, None, now),
            Standing::Member
        );
        assert_eq!(leader_standing(&known, 9, None, now), Standing::Ask);
        let yes = Some((true, now));
        let no = Some((false, now));
        assert_eq!(leader_standing(&known, 9, yes, now), Standing::Vouched);
        assert_eq!(
            leader_standing(
                &known,
                9,
                yes,
                later(VOUCHED_FOR - Duration::from_millis(1))
            ),
            Standing::Vouched
        );
        assert_eq!(
            leader_standing(&known, 9, yes, later(VOUCHED_FOR)),
            Standing::Ask
        );
        assert_eq!(leader_standing(&known, 9, no, now), Standing::Refused);
        assert_eq!(
            leader_standing(&known, 9, no, later(UNVOUCHED_FOR)),
            Standing::Ask
        );
        // Once it is known, what was said no longer matters.
        let known: BTreeSet<u64> = [1, 2, 3, 9].into();
        assert_eq!(leader_standing(&known, 9, no, now), Standing::Member);
    }
}
