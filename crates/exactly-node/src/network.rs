//! openraft's network over tonic: one lazily connected channel per peer, Raft RPCs as opaque
//! blobs, and snapshots streamed whole in bounded chunks into `install_full_snapshot` (openraft's
//! chunked install has a per-chunk timeout that can loop forever on large snapshots).

use std::future::Future;
use std::time::Duration;

use exactly_proto::internal::internal_client::InternalClient;
use exactly_proto::internal::{Blob, SnapshotChunk};
use exactly_store::raft_types::{LogId, Snapshot, Vote};
use exactly_store::TypeConfig;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::StreamAppendResult;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, OptionalSend, RaftNetworkV2};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tonic::transport::{Channel, Endpoint};

use std::sync::Arc;

use crate::codec;
use crate::codec::Refusal;
use crate::faults::{self, FaultsHandle};
use crate::membership::Departure;

/// Bytes per snapshot chunk on the wire.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;
/// How long to wait for a TCP connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Largest gRPC message between nodes (an append batch of many submits).
pub const INTERNAL_MESSAGE_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Makes a lazily connected channel to a node address ("host:port" or a URL).
pub fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    let url = if addr.starts_with("http://") || addr.starts_with("https://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(with_transport(Endpoint::from_shared(url)?).connect_lazy())
}

/// The connection settings every channel to a node uses.
fn with_transport(endpoint: Endpoint) -> Endpoint {
    endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
}

/// A lazily connected channel to a node's peer service: plaintext, or mutual TLS expecting
/// node `target`'s certificate (any cluster node's when `None`), with the certificates loaded
/// last whenever it (re)connects.
pub fn peer_channel(
    addr: &str,
    tls: Option<&std::sync::Arc<crate::tls::PeerTls>>,
    target: Option<u64>,
) -> Result<Channel, tonic::transport::Error> {
    let Some(tls) = tls else {
        return channel(addr);
    };
    let host = addr
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    // The connector does the TLS; the URI only names the host and port.
    let endpoint = with_transport(Endpoint::from_shared(format!("http://{host}"))?);
    Ok(endpoint.connect_with_connector_lazy(tls.connector(target)))
}

pub fn internal_client(channel: Channel) -> InternalClient<Channel> {
    InternalClient::new(channel)
        .max_decoding_message_size(INTERNAL_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(INTERNAL_MESSAGE_BYTES_MAX)
}

/// Creates connections to peers.
#[derive(Clone, Default)]
pub struct Network {
    /// This node's id (the sender of every message).
    pub id: u64,
    /// Test-only fault injection; `None` in production.
    pub faults: Option<FaultsHandle>,
    /// Marked when a peer refuses this node's vote request because it was removed.
    pub departure: Arc<Departure>,
    /// When each peer last answered a Raft message of this node's.
    pub answers: Arc<Answers>,
    /// Mutual TLS on the peer port, if configured.
    pub tls: Option<Arc<crate::tls::PeerTls>>,
    /// One channel per peer, shared by every connection openraft asks for.
    pub channels: Arc<Channels>,
}

/// The channel to each peer, made once and shared (tonic channels multiplex calls over one
/// HTTP/2 connection). openraft 0.9 asked for a new connection for every leadership check and
/// vote round, each heartbeat interval: with a channel each, a leader opened 36 TCP connections
/// a second (and with peer TLS as many handshakes). A channel is made again when the peer's
/// address or the TLS material's generation changed.
///
/// Also each member's address as the newest membership names it ([`Channels::follow`]):
/// openraft 0.10 keeps a connection (a heartbeat worker's, a replication stream's) for as long
/// as the peer stays a member, even when the membership gives it a new address, so every
/// message looks the address up here.
#[derive(Default)]
pub struct Channels {
    by_peer: std::sync::Mutex<std::collections::HashMap<u64, Shared>>,
    addresses: std::sync::Mutex<std::collections::HashMap<u64, String>>,
}

struct Shared {
    addr: String,
    generation: u64,
    client: InternalClient<Channel>,
}

impl Channels {
    /// Records the members' addresses of the newest membership.
    pub fn set_addresses(&self, members: impl IntoIterator<Item = (u64, String)>) {
        let mut addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        *addresses = members.into_iter().collect();
    }

    /// `target`'s address in the newest membership, if it is a member.
    fn address(&self, target: u64) -> Option<String> {
        let addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        addresses.get(&target).cloned()
    }

    /// Keeps the members' addresses up to date with `raft`'s membership until the node stops.
    pub async fn follow(self: Arc<Self>, raft: exactly_store::Raft) {
        use openraft::async_runtime::WatchReceiver;
        let mut metrics = raft.metrics();
        loop {
            let members: Vec<(u64, String)> = metrics
                .borrow_watched()
                .membership_config
                .nodes()
                .map(|(id, node)| (*id, node.addr.clone()))
                .collect();
            self.set_addresses(members);
            if metrics.changed().await.is_err() {
                return;
            }
        }
    }

    /// The channel to `target` at `addr`, made now if there is none for this address and TLS
    /// generation.
    fn get(
        &self,
        target: u64,
        addr: &str,
        tls: Option<&Arc<crate::tls::PeerTls>>,
    ) -> Result<InternalClient<Channel>, String> {
        let generation = tls.map_or(0, |t| t.generation());
        let mut by_peer = self.by_peer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = by_peer.get(&target) {
            if shared.addr == addr && shared.generation == generation {
                return Ok(shared.client.clone());
            }
        }
        let client = peer_channel(addr, tls, Some(target))
            .map(internal_client)
            .map_err(|e| format!("bad address {addr:?}: {e}"))?;
        by_peer.insert(
            target,
            Shared {
                addr: addr.to_string(),
                generation,
                client: client.clone(),
            },
        );
        Ok(client)
    }
}

pub struct Connection {
    from: u64,
    target: u64,
    addr: String,
    client: Result<InternalClient<Channel>, String>,
    /// The peer TLS material's generation the channel was made with: when the material is
    /// reloaded (a rotated certificate, a new CRL), the next message goes over a new
    /// connection, whose handshake checks the peer against the new list.
    tls: Option<(Arc<crate::tls::PeerTls>, u64)>,
    faults: Option<FaultsHandle>,
    departure: Arc<Departure>,
    answers: Arc<Answers>,
    channels: Arc<Channels>,
    /// Whether the peer serves `AppendStream` (a node of an older version does not: its
    /// replication then goes one `AppendEntries` at a time).
    pipelines: bool,
}

/// When each peer last answered one of this node's Raft messages (a heartbeat, an append, a
/// vote), on the monotonic clock. A leader sends every member a heartbeat each
/// `raft.heartbeat-interval`, so a member that has not answered for a few intervals is dead,
/// frozen or cut off: the scheduler gives it no new work (its lease, not this, decides when its
/// running jobs are taken back). A scheduling hint only: nothing safety-related depends on it.
#[derive(Default)]
pub struct Answers {
    last: std::sync::Mutex<std::collections::HashMap<u64, std::time::Instant>>,
}

impl Answers {
    pub fn record(&self, peer: u64, at: std::time::Instant) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let entry = last.entry(peer).or_insert(at);
        *entry = (*entry).max(at);
    }

    /// The peers among `members` (other than `me`) that have not answered within `within`
    /// before `now`, never answered included.
    pub fn silent(
        &self,
        me: u64,
        members: &std::collections::BTreeSet<u64>,
        now: std::time::Instant,
        within: std::time::Duration,
    ) -> std::collections::BTreeSet<u64> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        silent(&last, me, members, now, within)
    }
}

/// Pure rule behind [`Answers::silent`].
fn silent(
    last: &std::collections::HashMap<u64, std::time::Instant>,
    me: u64,
    members: &std::collections::BTreeSet<u64>,
    now: std::time::Instant,
    within: std::time::Duration,
) -> std::collections::BTreeSet<u64> {
    members
        .iter()
        .copied()
        .filter(|&m| m != me)
        .filter(|m| {
            last.get(m)
                .is_none_or(|&at| now.saturating_duration_since(at) > within)
        })
        .collect()
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Connection {
        Connection {
            from: self.id,
            target,
            addr: node.addr.clone(),
            client: self.channels.get(target, &node.addr, self.tls.as_ref()),
            tls: self.tls.as_ref().map(|t| (t.clone(), t.generation())),
            channels: self.channels.clone(),
            faults: self.faults.clone(),
            departure: self.departure.clone(),
            answers: self.answers.clone(),
            pipelines: true,
        }
    }
}

const LOST: &str = "message lost (fault injection): no answer within the deadline";

/// A message the fault harness lost costs its sender the deadline, as a real lost message
/// does, and ends as a real timeout does ([`Connection::call`]): a network error, which openraft
/// retries at the next heartbeat or entry, not an unreachable peer, which it backs off from.
fn lost_err() -> RpcErr {
    RPCError::Network(NetworkError::new(&std::io::Error::other(LOST)))
}

type RpcErr = RPCError<TypeConfig>;

fn unreachable_err(e: impl std::fmt::Display) -> RpcErr {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e.to_string())))
}

/// A peer's answer that its Raft node failed: openraft backs off from it as from an
/// unreachable peer (the peer stops or restarts).
fn remote_err(target: u64, e: RaftError<TypeConfig>) -> RpcErr {
    unreachable_err(format!("node {target}: {e}"))
}

/// A failed Raft RPC's status as openraft is told it ([`failure`]); a removal refusal marks
/// this node removed.
fn status_err(
    status: &tonic::Status,
    waited: Duration,
    deadline: Duration,
    departure: &Departure,
) -> RpcErr {
    match failure(status.code(), Refusal::of(status), waited, deadline) {
        Failure::Slow | Failure::Other => RPCError::Network(NetworkError::new(status)),
        Failure::Unreachable => unreachable_err(status.message()),
        Failure::Removed => {
            departure.mark_removed();
            unreachable_err(status.message())
        }
    }
}

/// How a Raft RPC that failed is reported to openraft.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// No answer within the deadline (openraft gives an AppendEntries one heartbeat
    /// interval): the peer is slow, not gone. Reported as a network error, which openraft
    /// retries at the next heartbeat or entry. As unreachable it put the peer's replication into
    /// openraft's 500 ms backoff, and that node's clients waited for its apply (measured: a
    /// 583 ms stall at 500 submits/s after one 50 ms timeout).
    Slow,
    /// No connection (refused, reset, the channel down): unreachable, which openraft backs off
    /// from.
    Unreachable,
    /// The peer says this node was removed from the cluster.
    Removed,
    /// Anything else, e.g. a node at that address that is not the target (its address was
    /// reused by a new node): a network error, which never counts for the target.
    Other,
}

/// Classifies a failed Raft RPC by its status (code and typed refusal) and how long it waited
/// against its deadline.
fn failure(
    code: tonic::Code,
    refusal: Option<Refusal>,
    waited: Duration,
    deadline: Duration,
) -> Failure {
    use tonic::Code;
    match (code, refusal) {
        (Code::DeadlineExceeded | Code::Cancelled, _) if waited >= deadline => Failure::Slow,
        (Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled, _) => Failure::Unreachable,
        (Code::FailedPrecondition, Some(Refusal::Removed { .. })) => Failure::Removed,
        _ => Failure::Other,
    }
}

impl Connection {
    // openraft's error type is what the trait returns; boxing it here would only unbox it again.
    #[allow(clippy::result_large_err)]
    fn client(&mut self) -> Result<InternalClient<Channel>, RpcErr> {
        let mut stale = false;
        if let Some(addr) = self.channels.address(self.target) {
            if addr != self.addr {
                self.addr = addr;
                stale = true;
            }
        }
        if let Some((tls, generation)) = &mut self.tls {
            let now = tls.generation();
            if now != *generation {
                *generation = now;
                stale = true;
            }
        }
        if stale {
            let tls = self.tls.as_ref().map(|(tls, _)| tls);
            self.client = self.channels.get(self.target, &self.addr, tls);
        }
        self.client.clone().map_err(unreachable_err)
    }

    /// Sends one blob RPC and decodes the reply, which is a `Result<T, RaftError>`.
    async fn call<Req, T>(
        &mut self,
        req: &Req,
        option: &RPCOption,
        send: impl AsyncFnOnce(
            InternalClient<Channel>,
            tonic::Request<Blob>,
        ) -> Result<tonic::Response<Blob>, tonic::Status>,
    ) -> Result<T, RpcErr>
    where
        Req: serde::Serialize,
        T: serde::de::DeserializeOwned,
    {
        let client = self.client()?;
        let ttl = option.hard_ttl();
        if faults::pass_raft_request(&self.faults, self.from, self.target, ttl)
            .await
            .is_err()
        {
            return Err(lost_err());
        }
        let mut request = tonic::Request::new(Blob {
            data: codec::encode(req),
            target: self.target,
        });
        request.set_timeout(option.hard_ttl());
        let sent = std::time::Instant::now();
        let reply = send(client, request)
            .await
            .map_err(|status| status_err(&status, sent.elapsed(), ttl, &self.departure))?;
        if faults::pass(&self.faults, self.target, self.from, ttl)
            .await
            .is_err()
        {
            return Err(lost_err());
        }
        self.answers.record(self.target, std::time::Instant::now());
        let decoded: Result<T, RaftError<TypeConfig>> = codec::decode(&reply.into_inner().data)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        decoded.map_err(|e| remote_err(self.target, e))
    }
}

impl RaftNetworkV2<TypeConfig> for Connection {
    type SnapshotData = tokio::fs::File;

    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RpcErr> {
        let last = req.entries.last().map(|e| e.log_id.index);
        if let Some(index) = last {
            tracing::trace!(target: exactly_store::TIMELINE, to = self.target, index, "sent");
        }
        let reply = self
            .call(&req, &option, async |mut c, r| c.append_entries(r).await)
            .await;
        if let Some(index) = last {
            let (from, ok) = (self.target, reply.is_ok());
            tracing::trace!(target: exactly_store::TIMELINE, from, index, ok, "answered");
        }
        reply
    }

    /// openraft's replication to this peer: the requests of one session go down one
    /// `AppendStream` call as openraft makes them, each without waiting for the answer to the
    /// one before ([`pipeline`]); a one-request stream (a heartbeat) is one `AppendEntries`.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RpcErr>>, RpcErr>>
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>>
            + OptionalSend
            + Unpin
            + 'static,
    {
        if input.size_hint() == (1, Some(1)) || !self.pipelines {
            return openraft::network::stream_append_sequential(self, input, option);
        }
        Box::pin(async move {
            let answers: BoxStream<'s, _> = self.pipeline(input, option).await?;
            Ok(answers)
        })
    }

    async fn vote(
        &mut self,
        req: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RpcErr> {
        self.call(&req, &option, async |mut c, r| c.vote(r).await)
            .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self.client().map_err(|e| {
            StreamingError::Unreachable(Unreachable::new(&std::io::Error::other(e.to_string())))
        })?;
        let lost = |_| StreamingError::Unreachable(Unreachable::new(&std::io::Error::other(LOST)));
        let ttl = Duration::from_secs(1);
        faults::pass_raft_request(&self.faults, self.from, self.target, ttl)
            .await
            .map_err(lost)?;
        let header = codec::encode(&(vote, snapshot.meta.clone()));
        let mut data = snapshot.snapshot;
        data.seek(std::io::SeekFrom::Start(0))
            .await
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?;
        let chunks = snapshot_chunks(data, header, self.target);
        let send = client.install_snapshot(chunks);
        let reply = tokio::select! {
            reply = send => reply,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        let reply = reply.map_err(|status| {
            StreamingError::Unreachable(Unreachable::new(&std::io::Error::other(
                status.message().to_string(),
            )))
        })?;
        faults::pass(&self.faults, self.target, self.from, ttl)
            .await
            .map_err(lost)?;
        let decoded: Result<SnapshotResponse<TypeConfig>, Fatal<TypeConfig>> =
            codec::decode(&reply.into_inner().data)
                .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let target = self.target;
        decoded.map_err(|e| {
            StreamingError::Unreachable(Unreachable::new(&std::io::Error::other(format!(
                "node {target}: {e}"
            ))))
        })
    }
}

/// Requests a pipelined `AppendStream` has in flight at most: the next waits for an answer
/// (openraft's own pipeline on the follower's side holds as many).
pub const APPEND_PIPELINE_MAX: usize = 64;

/// The requests a pipelined `AppendStream` sent and has not had answered yet, oldest first:
/// the follower answers in order, so each answer is the oldest one's.
#[derive(Default)]
struct Inflight {
    sent: std::sync::Mutex<std::collections::VecDeque<Sent>>,
    /// Wakes the reader of answers when a request goes out while none was waiting.
    pushed: tokio::sync::Notify,
    /// Wakes the sender of requests when an answer came in while it waited for room.
    popped: tokio::sync::Notify,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Sent {
    /// A request: the log id it ends at (its `prev_log_id` if it carries no entry) and when it
    /// left, from which its answer's deadline runs.
    Request {
        last: Option<LogId>,
        at: tokio::time::Instant,
    },
    /// The stream stopped sending here, and ends with this error once the answers to the
    /// requests before are in.
    End(Stop),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// The fault harness lost the next request.
    Lost,
    /// The peer's address or this node's TLS material changed since the stream opened: the
    /// next request goes over a new connection, whose handshake checks the peer against the
    /// current certificates and revocation list (a stream lives as long as the leadership).
    Stale,
}

impl Inflight {
    fn push(&self, sent: Sent) {
        self.lock().push_back(sent);
        self.pushed.notify_one();
    }

    fn front(&self) -> Option<Sent> {
        self.lock().front().cloned()
    }

    fn pop(&self) -> Option<Sent> {
        let sent = self.lock().pop_front();
        self.popped.notify_one();
        sent
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<Sent>> {
        self.sent.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the follower's answer to a request that ended at `last` means for openraft, and
/// whether the stream goes on after it: not after a refusal (a conflict, a higher vote), a
/// failed Raft node, or a partial success (openraft starts again from what matched).
fn answered(
    target: u64,
    last: Option<LogId>,
    answer: Result<StreamAppendResult<TypeConfig>, Fatal<TypeConfig>>,
) -> (Result<StreamAppendResult<TypeConfig>, RpcErr>, bool) {
    match answer {
        Ok(Ok(matching)) => {
            let whole = matching == last;
            (Ok(Ok(matching)), whole)
        }
        Ok(Err(refused)) => (Ok(Err(refused)), false),
        Err(fatal) => (Err(remote_err(target, RaftError::Fatal(fatal))), false),
    }
}

/// Reads a pipelined `AppendStream`'s answers ([`Connection::pipeline`]).
struct Answering {
    answers: tonic::Streaming<Blob>,
    /// Ends the requests when openraft drops the answers ([`Requests::over`]).
    _over: tokio_util::sync::DropGuard,
    inflight: Arc<Inflight>,
    faults: Option<FaultsHandle>,
    from: u64,
    target: u64,
    /// Each answer's deadline after its request left: what openraft gives one AppendEntries.
    ttl: Duration,
    departure: Arc<Departure>,
    seen: Arc<Answers>,
}

impl Answering {
    async fn step(
        this: Option<Self>,
    ) -> Option<(Result<StreamAppendResult<TypeConfig>, RpcErr>, Option<Self>)> {
        let mut this = this?;
        let (item, more) = this.next().await?;
        Some((item, more.then_some(this)))
    }

    /// The next item of the stream openraft reads, and whether another may follow it.
    async fn next(&mut self) -> Option<(Result<StreamAppendResult<TypeConfig>, RpcErr>, bool)> {
        loop {
            let message = match self.inflight.front() {
                Some(Sent::End(Stop::Lost)) => return Some((Err(lost_err()), false)),
                Some(Sent::End(Stop::Stale)) => {
                    let e = network_err("the peer's address or the TLS material changed");
                    return Some((Err(e), false));
                }
                Some(Sent::Request { at, .. }) => {
                    let deadline = at + self.ttl;
                    match tokio::time::timeout_at(deadline, self.answers.message()).await {
                        Ok(message) => message,
                        Err(_) => return Some((Err(slow_err(self.ttl)), false)),
                    }
                }
                // Nothing in flight: wait for a request to go out (an answer now would answer
                // nothing, which is refused below).
                None => tokio::select! {
                    message = self.answers.message() => message,
                    () = self.inflight.pushed.notified() => continue,
                },
            };
            return match message {
                Ok(Some(blob)) => Some(self.answer(blob).await),
                Ok(None) if self.inflight.is_empty() => None,
                Ok(None) => Some((
                    Err(network_err(
                        "the peer ended the append stream with requests unanswered",
                    )),
                    false,
                )),
                Err(status) => {
                    let waited = match self.inflight.front() {
                        Some(Sent::Request { at, .. }) => at.elapsed(),
                        _ => Duration::ZERO,
                    };
                    let e = status_err(&status, waited, self.ttl, &self.departure);
                    Some((Err(e), false))
                }
            };
        }
    }

    async fn answer(
        &mut self,
        blob: Blob,
    ) -> (Result<StreamAppendResult<TypeConfig>, RpcErr>, bool) {
        let Some(Sent::Request { last, .. }) = self.inflight.pop() else {
            return (Err(network_err("an append answer to no request")), false);
        };
        if faults::pass(&self.faults, self.target, self.from, self.ttl)
            .await
            .is_err()
        {
            return (Err(lost_err()), false);
        }
        self.seen.record(self.target, std::time::Instant::now());
        let decoded = match codec::decode(&blob.data) {
            Ok(decoded) => decoded,
            Err(e) => return (Err(RPCError::Network(NetworkError::new(&e))), false),
        };
        if let (Some(last), Ok(Ok(_))) = (&last, &decoded) {
            let (from, index) = (self.target, last.index);
            tracing::trace!(target: exactly_store::TIMELINE, from, index, ok = true, "answered");
        }
        answered(self.target, last, decoded)
    }
}

fn network_err(what: &str) -> RpcErr {
    RPCError::Network(NetworkError::new(&std::io::Error::other(what.to_string())))
}

/// No answer within the deadline: a slow peer, reported as [`Failure::Slow`] is.
fn slow_err(ttl: Duration) -> RpcErr {
    network_err(&format!("no append answer within {ttl:?}"))
}

impl Connection {
    /// Opens an `AppendStream` to the peer and sends `input`'s requests down it as openraft
    /// makes them, each without waiting for the answer to the one before; the stream openraft
    /// reads yields the answers in order, each within `option`'s deadline after its request
    /// left. The fault harness's fate applies to each request and each answer as to a call.
    async fn pipeline<S>(
        &mut self,
        input: S,
        option: RPCOption,
    ) -> Result<BoxStream<'static, Result<StreamAppendResult<TypeConfig>, RpcErr>>, RpcErr>
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>>
            + OptionalSend
            + Unpin
            + 'static,
    {
        let mut client = self.client()?;
        let ttl = option.hard_ttl();
        let inflight = Arc::new(Inflight::default());
        let over = tokio_util::sync::CancellationToken::new();
        let over_guard = over.clone().drop_guard();
        let requests = futures::stream::unfold(
            Some(Requests {
                input,
                over: over.clone(),
                inflight: inflight.clone(),
                addr: self.addr.clone(),
                tls: self.tls.clone(),
                channels: self.channels.clone(),
                faults: self.faults.clone(),
                from: self.from,
                target: self.target,
                ttl,
            }),
            Requests::next,
        );
        let opened = tokio::time::Instant::now();
        let answers = match tokio::time::timeout(ttl, client.append_stream(requests)).await {
            Err(_) => return Err(slow_err(ttl)),
            Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => {
                // A node of an older version: one AppendEntries at a time from now on. openraft
                // starts the session again after this error.
                self.pipelines = false;
                return Err(network_err("the peer does not serve AppendStream"));
            }
            Ok(Err(status)) => {
                return Err(status_err(&status, opened.elapsed(), ttl, &self.departure))
            }
            Ok(Ok(answers)) => answers.into_inner(),
        };
        let answering = Answering {
            answers,
            _over: over_guard,
            inflight,
            faults: self.faults.clone(),
            from: self.from,
            target: self.target,
            ttl,
            departure: self.departure.clone(),
            seen: self.answers.clone(),
        };
        Ok(futures::stream::unfold(Some(answering), Answering::step).boxed())
    }
}

/// Feeds a pipelined `AppendStream` ([`Connection::pipeline`]).
struct Requests<S> {
    input: S,
    /// Cancelled when openraft drops the answers: the session is over. openraft's request
    /// stream holds its replication state's lock while it waits for new entries, and the next
    /// session waits for that lock; the transport may keep a stream it no longer sends
    /// anything of, so the requests end here at once, which drops openraft's stream.
    over: tokio_util::sync::CancellationToken,
    inflight: Arc<Inflight>,
    /// The address and TLS generation the stream's connection was made for.
    addr: String,
    tls: Option<(Arc<crate::tls::PeerTls>, u64)>,
    channels: Arc<Channels>,
    faults: Option<FaultsHandle>,
    from: u64,
    target: u64,
    ttl: Duration,
}

impl<S> Requests<S>
where
    S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + Unpin,
{
    fn stale(&self) -> bool {
        let moved = self
            .channels
            .address(self.target)
            .is_some_and(|addr| addr != self.addr);
        let reloaded = self
            .tls
            .as_ref()
            .is_some_and(|(tls, g)| tls.generation() != *g);
        moved || reloaded
    }

    /// The next request openraft makes, encoded, once the fault harness lets it leave.
    async fn next(this: Option<Self>) -> Option<(Blob, Option<Self>)> {
        let mut this = this?;
        while this.inflight.len() >= APPEND_PIPELINE_MAX {
            tokio::select! {
                () = this.inflight.popped.notified() => {}
                () = this.over.cancelled() => return None,
            }
        }
        let req = tokio::select! {
            req = this.input.next() => req?,
            () = this.over.cancelled() => return None,
        };
        if faults::pass_raft_request(&this.faults, this.from, this.target, this.ttl)
            .await
            .is_err()
        {
            this.inflight.push(Sent::End(Stop::Lost));
            return None;
        }
        if this.stale() {
            this.inflight.push(Sent::End(Stop::Stale));
            return None;
        }
        let last = req.entries.last().map(|e| e.log_id).or(req.prev_log_id);
        let target = this.target;
        if let Some(index) = req.entries.last().map(|e| e.log_id.index) {
            tracing::trace!(target: exactly_store::TIMELINE, to = target, index, "sent");
        }
        let data = codec::encode(&req);
        let at = tokio::time::Instant::now();
        this.inflight.push(Sent::Request { last, at });
        Some((Blob { data, target }, Some(this)))
    }
}

/// Snapshot data read from `data` (from its current position to its end) as chunks of at most
/// [`SNAPSHOT_CHUNK_BYTES`], read as they are sent: the first carries `header` and `target`
/// (and no data if the snapshot is empty). A read error ends the stream early: the receiver
/// then refuses the truncated snapshot and openraft sends it again.
fn snapshot_chunks(
    data: tokio::fs::File,
    header: Vec<u8>,
    target: u64,
) -> impl futures::Stream<Item = SnapshotChunk> {
    futures::stream::unfold(
        (data, Some(header), false),
        move |(mut data, header, done)| async move {
            if done {
                return None;
            }
            let mut buf = vec![0u8; SNAPSHOT_CHUNK_BYTES];
            let mut filled = 0;
            while filled < buf.len() {
                match data.read(&mut buf[filled..]).await {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading snapshot data to send");
                        return None;
                    }
                }
            }
            if filled == 0 && header.is_none() {
                return None;
            }
            buf.truncate(filled);
            let first = header.is_some();
            let chunk = SnapshotChunk {
                header: header.unwrap_or_default(),
                data: buf,
                target: if first { target } else { 0 },
            };
            // A short read means the end: nothing more to send after this chunk.
            let done = filled < SNAPSHOT_CHUNK_BYTES;
            Some((chunk, (data, None, done)))
        },
    )
}

#[cfg(test)]
mod tests {
    /// A deadline missed is a slow peer (no backoff); a connection that fails before it is an
    /// unreachable one; a typed removal refusal is a removal, whatever the words; the rest is a
    /// plain network error.
    #[test]
    fn failed_rpcs_are_classified_by_status_and_deadline() {
        use super::{failure, Failure, Refusal};
        use tonic::Code;
        let ms = Duration::from_millis;
        let removed = || Some(Refusal::Removed { node: 3 });
        let not_leader = || Some(Refusal::NotLeader { leader: None });
        let cases = [
            (Code::Cancelled, None, ms(50), Failure::Slow),
            (Code::DeadlineExceeded, None, ms(80), Failure::Slow),
            (Code::Cancelled, None, ms(3), Failure::Unreachable),
            (Code::DeadlineExceeded, None, ms(49), Failure::Unreachable),
            (Code::Unavailable, None, ms(1), Failure::Unreachable),
            (Code::Unavailable, None, ms(500), Failure::Unreachable),
            (Code::FailedPrecondition, removed(), ms(1), Failure::Removed),
            (
                Code::FailedPrecondition,
                not_leader(),
                ms(1),
                Failure::Other,
            ),
            (Code::FailedPrecondition, None, ms(1), Failure::Other),
            (Code::PermissionDenied, removed(), ms(1), Failure::Other),
        ];
        for (code, refusal, waited, expected) in cases {
            assert_eq!(
                failure(code, refusal.clone(), waited, ms(50)),
                expected,
                "{code:?} {refusal:?} after {waited:?}"
            );
        }
    }

    /// An answer keeps the pipeline going only when it is a whole success: a partial one, a
    /// refusal or a failed Raft node ends it (openraft then starts again from what matched).
    #[test]
    fn only_a_whole_success_keeps_the_pipeline_going() {
        use exactly_store::raft_types::log_id;
        use openraft::error::Fatal;
        use openraft::raft::StreamAppendError;
        let sent = Some(log_id(2, 1, 9));
        let (item, more) = super::answered(3, sent, Ok(Ok(sent)));
        assert!(more);
        assert!(matches!(item, Ok(Ok(m)) if m == sent));
        // A request without entries on an empty log ends at no log id.
        assert!(super::answered(3, None, Ok(Ok(None))).1);
        let (item, more) = super::answered(3, sent, Ok(Ok(Some(log_id(2, 1, 7)))));
        assert!(!more, "a partial success ends the stream");
        assert!(matches!(item, Ok(Ok(Some(m))) if m.index == 7));
        let conflict = StreamAppendError::Conflict(log_id(2, 1, 5));
        let (item, more) = super::answered(3, sent, Ok(Err(conflict.clone())));
        assert!(!more);
        assert!(matches!(item, Ok(Err(e)) if e == conflict));
        let (item, more) = super::answered(3, sent, Err(Fatal::Stopped));
        assert!(!more);
        assert!(matches!(item, Err(RPCError::Unreachable(_))), "{item:?}");
    }

    /// Answers are matched to requests oldest first; a request going out wakes a reader that
    /// waits with nothing in flight.
    #[tokio::test]
    async fn requests_in_flight_are_answered_oldest_first() {
        use super::{Inflight, Sent, Stop};
        let inflight = std::sync::Arc::new(Inflight::default());
        assert!(inflight.is_empty());
        let waiter = {
            let inflight = inflight.clone();
            tokio::spawn(async move { inflight.pushed.notified().await })
        };
        let at = tokio::time::Instant::now();
        let first = Sent::Request { last: None, at };
        let second = Sent::Request {
            last: Some(exactly_store::raft_types::log_id(1, 1, 1)),
            at,
        };
        inflight.push(first.clone());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the reader wakes")
            .unwrap();
        inflight.push(second.clone());
        inflight.push(Sent::End(Stop::Lost));
        assert_eq!(inflight.front(), Some(first.clone()));
        assert_eq!(inflight.pop(), Some(first));
        assert_eq!(inflight.pop(), Some(second));
        assert_eq!(inflight.pop(), Some(Sent::End(Stop::Lost)));
        assert!(inflight.is_empty());
    }

    use openraft::error::RPCError;
    use std::collections::{BTreeSet, HashMap};
    use std::time::{Duration, Instant};

    /// Silent: members other than this node that never answered or not within the window.
    #[test]
    fn silent_peers_are_those_without_a_recent_answer() {
        let t0 = Instant::now();
        let members: BTreeSet<u64> = [1, 2, 3, 4].into();
        let last: HashMap<u64, Instant> = [
            (2, t0),                              // answered just now
            (3, t0 - Duration::from_millis(500)), // long ago
            (9, t0),                              // not a member: ignored
        ]
        .into();
        let within = Duration::from_millis(200);
        // Node 1 is this node; node 4 never answered.
        assert_eq!(super::silent(&last, 1, &members, t0, within), [3, 4].into());
        // Exactly at the window's edge still counts as answered.
        let edge = t0 + within;
        assert_eq!(
            super::silent(&last, 1, &members, edge, within),
            [3, 4].into()
        );
        let past = edge + Duration::from_millis(1);
        assert_eq!(
            super::silent(&last, 1, &members, past, within),
            [2, 3, 4].into()
        );
    }

    /// A later answer moves the time forward; an older one recorded late never moves it back.
    #[test]
    fn answers_keep_the_latest_time() {
        let answers = super::Answers::default();
        let t0 = Instant::now();
        answers.record(2, t0 + Duration::from_millis(300));
        answers.record(2, t0);
        let members: BTreeSet<u64> = [1, 2].into();
        let at = t0 + Duration::from_millis(400);
        assert!(answers
            .silent(1, &members, at, Duration::from_millis(200))
            .is_empty());
    }

    /// The answer to an AppendEntries request that it matched up to its last log id.
    fn echo(blob: Result<super::Blob, tonic::Status>) -> Result<super::Blob, tonic::Status> {
        type Req = super::AppendEntriesRequest<exactly_store::TypeConfig>;
        type Answer = Result<
            super::StreamAppendResult<exactly_store::TypeConfig>,
            openraft::error::Fatal<exactly_store::TypeConfig>,
        >;
        let req: Req = crate::codec::decode(&blob?.data)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let last = req.entries.last().map(|e| e.log_id).or(req.prev_log_id);
        let answer: Answer = Ok(Ok(last));
        Ok(super::Blob {
            data: crate::codec::encode(&answer),
            target: 0,
        })
    }

    /// A peer whose `AppendStream` answers every request at once that it matched its last
    /// log id (or, `silent`, takes them in and never answers); the other calls are not served.
    #[derive(Clone, Default)]
    struct Echo {
        /// Takes requests in but never answers.
        silent: bool,
        received: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    #[tonic::async_trait]
    impl exactly_proto::internal::internal_server::Internal for Echo {
        type AppendStreamStream =
            futures::stream::BoxStream<'static, Result<super::Blob, tonic::Status>>;

        async fn append_stream(
            &self,
            request: tonic::Request<tonic::Streaming<super::Blob>>,
        ) -> Result<tonic::Response<Self::AppendStreamStream>, tonic::Status> {
            use futures::StreamExt;
            let (silent, received) = (self.silent, self.received.clone());
            let answers = request.into_inner().filter_map(move |blob| {
                received.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let answer = echo(blob);
                async move { (!silent).then_some(answer) }
            });
            Ok(tonic::Response::new(answers.boxed()))
        }

        async fn append_entries(
            &self,
            _: tonic::Request<super::Blob>,
        ) -> Result<tonic::Response<super::Blob>, tonic::Status> {
            Err(tonic::Status::unimplemented("test peer"))
        }

        async fn vote(
            &self,
            _: tonic::Request<super::Blob>,
        ) -> Result<tonic::Response<super::Blob>, tonic::Status> {
            Err(tonic::Status::unimplemented("test peer"))
        }

        async fn install_snapshot(
            &self,
            _: tonic::Request<tonic::Streaming<super::SnapshotChunk>>,
        ) -> Result<tonic::Response<super::Blob>, tonic::Status> {
            Err(tonic::Status::unimplemented("test peer"))
        }

        async fn forward(
            &self,
            _: tonic::Request<super::Blob>,
        ) -> Result<tonic::Response<super::Blob>, tonic::Status> {
            Err(tonic::Status::unimplemented("test peer"))
        }

        async fn join(
            &self,
            _: tonic::Request<exactly_proto::internal::JoinRequest>,
        ) -> Result<tonic::Response<super::Blob>, tonic::Status> {
            Err(tonic::Status::unimplemented("test peer"))
        }

        async fn read_index(
            &self,
            _: tonic::Request<super::Blob>,
        ) -> Result<tonic::Response<super::Blob>, tonic::Status> {
            Err(tonic::Status::unimplemented("test peer"))
        }

        async fn members(
            &self,
            _: tonic::Request<super::Blob>,
        ) -> Result<tonic::Response<super::Blob>, tonic::Status> {
            Err(tonic::Status::unimplemented("test peer"))
        }
    }

    /// Serves `echo` on a loopback port until the guard is dropped.
    async fn echo_server(echo: Echo) -> (String, tokio_util::sync::DropGuard) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = tokio_util::sync::CancellationToken::new();
        let until = stop.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(exactly_proto::internal::internal_server::InternalServer::new(echo))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move { until.cancelled().await },
                ),
        );
        (addr, stop.drop_guard())
    }

    /// A request waits for an answer when `APPEND_PIPELINE_MAX` are unanswered, however many
    /// openraft has ready.
    #[tokio::test]
    async fn a_pipeline_holds_at_most_its_bound_unanswered() {
        use openraft::network::{RPCOption, RaftNetworkFactory};
        use openraft::{BasicNode, RaftNetworkV2};
        use std::sync::atomic::Ordering;
        let echo = Echo {
            silent: true,
            ..Echo::default()
        };
        let received = echo.received.clone();
        let (addr, _stop) = echo_server(echo).await;
        let mut network = super::Network::default();
        let mut conn = network.new_client(2, &BasicNode { addr }).await;
        let ready = (1..=200u64).map(|index| super::AppendEntriesRequest::<
            exactly_store::TypeConfig,
        > {
            vote: openraft::Vote::new_committed(1, 1),
            prev_log_id: Some(exactly_store::raft_types::log_id(1, 1, index)),
            entries: Vec::new(),
            leader_commit: None,
        });
        let input = futures::stream::iter(ready);
        let option = RPCOption::new(Duration::from_secs(30));
        let _answers = conn
            .stream_append(input, option)
            .await
            .expect("the stream opens");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while received.load(Ordering::SeqCst) < super::APPEND_PIPELINE_MAX {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the requests did not go out"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(received.load(Ordering::SeqCst), super::APPEND_PIPELINE_MAX);
    }

    /// Requests go out without waiting for answers, which come back in order; when openraft
    /// drops the answers (its session is over), its request stream is dropped at once, even
    /// while it waits for entries: it holds openraft's replication state while it waits, and
    /// the next session waits for that (found by the chaos suite: a follower got no more of the
    /// log once an answer was lost while the cluster was idle).
    #[tokio::test]
    async fn a_pipeline_sends_ahead_and_lets_go_of_its_requests_when_dropped() {
        use futures::StreamExt;
        use openraft::network::{RPCOption, RaftNetworkFactory};
        use openraft::{BasicNode, RaftNetworkV2};
        use std::sync::Arc;
        let (addr, _stop) = echo_server(Echo::default()).await;
        let mut network = super::Network::default();
        let mut conn = network.new_client(2, &BasicNode { addr }).await;
        let request = |index: u64| super::AppendEntriesRequest::<exactly_store::TypeConfig> {
            vote: openraft::Vote::new_committed(1, 1),
            prev_log_id: Some(exactly_store::raft_types::log_id(1, 1, index)),
            entries: Vec::new(),
            leader_commit: None,
        };
        // Three requests, then a wait for entries that never come; `held` is alive as long as
        // the stream is.
        let held = Arc::new(());
        let witness = held.clone();
        let input = futures::stream::iter([request(3), request(4), request(5)])
            .chain(futures::stream::pending())
            .map(move |r| {
                let _ = &witness;
                r
            });
        let option = RPCOption::new(Duration::from_secs(5));
        let mut answers = conn
            .stream_append(Box::pin(input), option)
            .await
            .expect("the stream opens");
        for index in 3..=5 {
            let answer = answers.next().await.expect("an answer");
            assert!(
                matches!(answer, Ok(Ok(Some(m))) if m.index == index),
                "{answer:?}"
            );
        }
        assert_eq!(Arc::strong_count(&held), 2);
        drop(answers);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&held) > 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "openraft's request stream outlived its session"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Serves gRPC (health only: every Raft call is UNIMPLEMENTED, over a working HTTP/2
    /// connection) on a loopback port and counts the TCP connections it accepts.
    async fn counting_server() -> (
        String,
        std::sync::Arc<std::sync::atomic::AtomicUsize>,
        tokio_util::sync::DropGuard,
    ) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio_stream::StreamExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(move |s| {
            counted.fetch_add(1, Ordering::SeqCst);
            s
        });
        let stop = tokio_util::sync::CancellationToken::new();
        let (_, health) = tonic_health::server::health_reporter();
        let until = stop.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming_shutdown(incoming, async move { until.cancelled().await }),
        );
        (addr, accepted, stop.drop_guard())
    }

    /// A peer that does not serve `AppendStream` (a node of an older version) gets its
    /// entries one `AppendEntries` at a time: the first stream fails and the connection stops
    /// pipelining.
    #[tokio::test]
    async fn a_peer_without_append_stream_is_sent_one_request_at_a_time() {
        use openraft::network::{RPCOption, RaftNetworkFactory};
        use openraft::{BasicNode, RaftNetworkV2};
        let (addr, _accepted, _stop) = counting_server().await;
        let mut network = super::Network::default();
        let mut conn = network.new_client(2, &BasicNode { addr }).await;
        let request = || openraft::raft::AppendEntriesRequest::<exactly_store::TypeConfig> {
            vote: openraft::Vote::new_committed(1, 1),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        };
        let option = RPCOption::new(Duration::from_secs(2));
        assert!(conn.pipelines);
        let two = futures::stream::iter([request(), request()]);
        let failed = match conn.stream_append(two, option.clone()).await {
            Err(RPCError::Network(_)) => true,
            Err(e) => panic!("{e:?}"),
            Ok(_) => false,
        };
        assert!(failed, "the first stream fails");
        assert!(
            !conn.pipelines,
            "a connection stops pipelining to such a peer"
        );
    }

    /// openraft asks for a new connection for every leadership check and vote round: they all
    /// share one channel, hence one TCP connection, per peer; a new address gets a new one.
    #[tokio::test]
    async fn connections_to_a_peer_share_one_channel() {
        use openraft::network::{RPCOption, RaftNetworkFactory};
        use openraft::RaftNetworkV2;
        use openraft::{BasicNode, Vote};
        use std::sync::atomic::Ordering;
        let (addr, accepted, _stop) = counting_server().await;
        let mut network = super::Network::default();
        let vote =
            openraft::raft::VoteRequest::<exactly_store::TypeConfig>::new(Vote::new(1, 1), None);
        let option = RPCOption::new(Duration::from_secs(2));
        for _ in 0..10 {
            let mut connection = network.new_client(2, &BasicNode::new(&addr)).await;
            // The peer answers UNIMPLEMENTED: a network error, over a connection that worked.
            let answer = connection.vote(vote.clone(), option.clone()).await;
            assert!(
                matches!(answer, Err(openraft::error::RPCError::Network(_))),
                "{answer:?}"
            );
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for ten clients"
        );
        // The peer moved (its address changed in the membership): a new channel.
        let (moved, accepted_there, _stop2) = counting_server().await;
        let mut connection = network.new_client(2, &BasicNode::new(&moved)).await;
        let _ = connection.vote(vote.clone(), option.clone()).await;
        assert_eq!(accepted_there.load(Ordering::SeqCst), 1);
        // Another peer at the first address has a channel of its own.
        let mut other = network.new_client(3, &BasicNode::new(&addr)).await;
        let _ = other.vote(vote, option).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// A peer's typed removal refusal marks this node removed (it stops campaigning); the same
    /// words without the typed refusal do not, and are a plain network error.
    #[tokio::test]
    async fn a_typed_removal_refusal_marks_this_node_removed() {
        use openraft::error::RPCError;
        use openraft::network::{RPCOption, RaftNetworkFactory};
        use openraft::raft::{VoteRequest, VoteResponse};
        use openraft::{BasicNode, Vote};
        let mut network = super::Network::default();
        let departure = network.departure.clone();
        // Lazily connected and never used: the answers below come from the test.
        let mut connection = network.new_client(2, &BasicNode::new("127.0.0.1:9")).await;
        let vote = VoteRequest::<exactly_store::TypeConfig>::new(Vote::new(7, 1), None);
        let option = RPCOption::new(Duration::from_secs(1));
        let words = tonic::Status::failed_precondition(
            "removed from the cluster: node 1 was removed; start it with an empty data directory",
        );
        let answer: Result<VoteResponse<exactly_store::TypeConfig>, super::RpcErr> = connection
            .call(&vote, &option, async move |_, _| Err(words))
            .await;
        assert!(matches!(answer, Err(RPCError::Network(_))), "{answer:?}");
        assert!(!departure.is_removed());
        let refusal = super::Refusal::Removed { node: 1 }
            .status(tonic::Code::FailedPrecondition, "node 1 was removed");
        let answer: Result<VoteResponse<exactly_store::TypeConfig>, super::RpcErr> = connection
            .call(&vote, &option, async move |_, _| Err(refusal))
            .await;
        assert!(
            matches!(answer, Err(RPCError::Unreachable(_))),
            "{answer:?}"
        );
        assert!(departure.is_removed());
    }
}
