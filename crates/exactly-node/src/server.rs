//! Starting and stopping a node: storage, Raft, actors, the gRPC server, bootstrap or join, and
//! registration of this incarnation in the state machine.

use openraft::async_runtime::WatchReceiver;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use exactly_handlers::Registry;
use exactly_proto::internal::internal_server::InternalServer;
use exactly_proto::internal::JoinRequest;
use exactly_proto::v1::cluster_server::ClusterServer;
use exactly_proto::v1::dead_letters_server::DeadLettersServer;
use exactly_proto::v1::jobs_server::JobsServer;
use exactly_proto::v1::queues_server::QueuesServer;
use exactly_proto::v1::schedules_server::SchedulesServer;
use exactly_proto::v1::tokens_server::TokensServer;
use exactly_store::{Raft, Store};
use openraft::BasicNode;
use ractor::{Actor, ActorRef};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::{
    ClusterService, DeadLettersService, JobsService, QueuesService, SchedulesService, TokensService,
};
use crate::config::NodeConfig;
use crate::executor::{Executor, ExecutorMsg};
use crate::hooks::Hooks;
use crate::internal::{InternalService, JoinReply};
use crate::network::{Network, INTERNAL_MESSAGE_BYTES_MAX};
use crate::node::{Node, NodeInner};
use crate::scheduler::Scheduler;
use crate::{codec, network, supervise};

/// Largest public gRPC message (a submit batch of large payloads).
pub const API_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Pause between attempts to join or register.
const RETRY_PAUSE: Duration = Duration::from_millis(300);
/// How long one request to be admitted may take before the next member is asked.
const JOIN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("storage: {0}")]
    Store(#[from] exactly_store::Error),
    #[error("raft: {0}")]
    Raft(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("actor: {0}")]
    Actor(String),
    #[error("{0}")]
    PeerTls(String),
    #[error("api-tls: {0}")]
    ApiTls(String),
    #[error("http-tls: {0}")]
    HttpTls(String),
    #[error("tokens: {0}")]
    Tokens(String),
}

/// A running node. Dropping it does not stop it: call [`RunningNode::shutdown`].
pub struct RunningNode {
    pub node: Node,
    pub hooks: Arc<Hooks>,
    /// The public API's address.
    pub addr: String,
    /// The node-to-node service's address (the public one without `peer-listen`).
    pub peer_addr: String,
    /// The bound HTTP address (/healthz, /readyz, /metrics), if any.
    pub http_addr: Option<std::net::SocketAddr>,
    executor: ActorRef<ExecutorMsg>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningNode {
    /// Stops this node's executor actor and nothing else, as a crash of the actor would: every
    /// handler it runs is stopped with it. For tests of what outlives what.
    pub fn stop_executor(&self) {
        self.executor.stop(None);
    }

    pub fn id(&self) -> u64 {
        self.node.id
    }

    /// Stops serving, cancels running attempts, and shuts Raft down.
    pub async fn shutdown(self) {
        self.node.shutdown.cancel();
        let _ = self.executor.send_message(ExecutorMsg::CancelAll);
        if let Some(s) = self
            .hooks
            .scheduler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            s.stop(None);
        }
        let _ = self.node.raft.shutdown().await;
        // With the table on disk, a restart then resumes where this node stopped.
        if let Err(e) = self.node.state.flush().await {
            tracing::warn!(error = %e, "flushing the state at shutdown failed");
        }
        self.executor.stop(None);
        for t in self.tasks {
            t.abort();
        }
    }
}

impl RunningNode {
    /// What SIGTERM does: drains this node (no new work; running attempts may finish for
    /// `deadline`, then they are stopped and given back), then leaves the membership if the
    /// cluster can spare it, else stays a member (see [`Node::drain_and_leave`]). Call
    /// [`RunningNode::shutdown`] after it.
    pub async fn drain_and_leave(
        &self,
        deadline: Duration,
    ) -> Result<crate::membership::Stopped, crate::membership::LeaveError> {
        self.node.drain_and_leave(deadline).await
    }
}

/// Once this node learns that it is out of the cluster — it left (a drain finished; its renewal
/// is refused) or was removed (its own state machine, a refused registration or renewal, a peer
/// refusing its vote request) — it stops campaigning so that it cannot raise the cluster's term,
/// and cancels anything it still runs. It keeps serving reads and status (its /readyz says why
/// it is not ready) until it is stopped.
/// Logs at ERROR when the Raft core stops while the node is not shutting down: what an operator
/// must act on, which openraft itself logs among lines the node writes at INFO (`logging.rs`).
async fn report_raft_core_stop(node: Node) {
    let mut metrics = node.raft.metrics();
    loop {
        let state = metrics.borrow_watched().running_state.clone();
        if let Err(fatal) = state {
            if !node.shutdown.is_cancelled() {
                tracing::error!(
                    node = node.id,
                    error = %fatal,
                    "the Raft core stopped: this node no longer takes part in the cluster \
                     (/healthz answers 503); restart it once the error is understood"
                );
            }
            return;
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            () = node.shutdown.cancelled() => return,
        }
    }
}

async fn stand_down_when_removed(node: Node, executor: ActorRef<ExecutorMsg>) {
    tokio::select! {
        () = node.departure.wait() => {}
        () = node.shutdown.cancelled() => return,
    }
    node.raft.runtime_config().elect(false);
    let _ = executor.send_message(ExecutorMsg::CancelAll);
    if node.departure.is_removed() {
        tracing::error!(
            node = node.id,
            "this node was removed from the cluster: it no longer votes, campaigns or runs jobs; \
             stop it, and start it with an empty data directory to join again as a new node"
        );
    } else {
        tracing::warn!(
            node = node.id,
            "this node left the cluster (drained): it no longer votes, campaigns or runs jobs; \
             stop it (started again, it asks to be admitted again)"
        );
    }
}

/// Watches the executor actor. If it ends while the node runs (a panic in one of its handlers
/// stops a ractor actor), the node could no longer start, finish or give back attempts, yet
/// would keep renewing its lease, and its jobs would stay `running` until a restart. So the
/// node stops instead (crash-only): its handlers stopped with the executor, its renewals stop
/// now, the lease runs out, and the leader gives the attempts to other nodes under higher
/// fencing tokens; `exactlyd` exits non-zero, and systemd or Kubernetes starts it again.
async fn supervise_executor(node: Node, task: JoinHandle<()>) {
    let ended = task.await;
    if node.shutdown.is_cancelled() {
        return;
    }
    let how = match ended {
        Err(e) if e.is_panic() => "panicked",
        _ => "stopped",
    };
    node.fail(format!(
        "the executor {how} while the node ran; its attempts move to other nodes once this \
         node's lease runs out"
    ));
}

/// Actor names are process-global in ractor; several nodes (and several test clusters with the
/// same node ids) share one process in tests, so every name carries a process-unique sequence.
fn actor_name(node: u64, incarnation: u64, role: &str) -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("exactly-{node}-{incarnation}-{role}-{seq}")
}

/// What a node is started with besides its configuration and handlers.
#[derive(Clone, Default)]
pub struct StartOptions {
    /// Test-only fault injection for node-to-node traffic.
    pub faults: Option<crate::faults::FaultsHandle>,
    /// How the store is opened: the default (real fsyncs, nothing else) in production; tests
    /// add a durability hook and disk faults.
    pub store: exactly_store::StoreOptions,
    /// Test-only: run Raft on the runtime that starts the node rather than on its own (see
    /// `RaftRuntime`), so that pausing or dropping that runtime pauses or kills the whole node.
    pub shared_raft_runtime: bool,
}

/// Starts a node from a validated configuration and a handler registry.
pub async fn start(config: NodeConfig, registry: Registry) -> Result<RunningNode, StartError> {
    start_with(config, registry, StartOptions::default()).await
}

/// [`start`] with options (fault injection for tests).
pub async fn start_with(
    config: NodeConfig,
    registry: Registry,
    options: StartOptions,
) -> Result<RunningNode, StartError> {
    let store_options = exactly_store::StoreOptions {
        table: config.table_storage,
        ..options.store
    };
    let store = Store::open_with(&config.data_dir, store_options)?;
    let id = store.node_id_or_init(|| {
        config
            .node_id
            .unwrap_or_else(|| rand::random::<u64>() >> 1 | 1)
    })?;
    if let Some(configured) = config.node_id {
        if configured != id {
            tracing::warn!(
                configured,
                stored = id,
                "data directory belongs to another node id; using the stored one"
            );
        }
    }
    // The previous life of this node is dead (sled's lock proves it), but commands it started
    // may not be: kill them before this incarnation registers and its jobs move on.
    let leftovers = exactly_handlers::exec::kill_leftover_groups(&config.exec_group_dir(), id);
    if leftovers > 0 {
        tracing::warn!(
            node = id,
            groups = leftovers,
            "killed exec commands left by the previous run"
        );
    }
    let peer_tls = match &config.peer_tls {
        Some(files) => Some(crate::tls::PeerTls::load(files, id).map_err(StartError::PeerTls)?),
        None => None,
    };
    let tokens = crate::auth::TokenSet::load(&config).map_err(StartError::Tokens)?;
    let api_tls = match &config.api_tls {
        Some(files) => Some(
            crate::tls::ApiTls::load(files, crate::tls::ALPN_GRPC, tokens.revoked())
                .map_err(StartError::ApiTls)?,
        ),
        None => None,
    };
    let http_tls = match &config.http_tls {
        Some(files) => Some(
            crate::tls::ApiTls::load(files, crate::tls::ALPN_HTTP, Default::default())
                .map_err(StartError::HttpTls)?,
        ),
        None => None,
    };
    let incarnation = store.next_incarnation()?;
    let hooks = Arc::new(Hooks::new(id));
    let _ = hooks.tokens.set(tokens.clone());
    let state = store.state_machine(hooks.clone())?;
    // The issued tokens of the loaded snapshot (later changes arrive through the hooks).
    state.read(|t| tokens.set_issued(t.issued_tokens()));
    hooks
        .events
        .start_after(state.last_applied().map_or(0, |l| l.index));
    let raft_config = Arc::new(
        config
            .openraft_config()
            .validate()
            .map_err(|e| StartError::Raft(e.to_string()))?,
    );
    let departure = Arc::new(crate::membership::Departure::default());
    if state.read(|t| t.is_removed(id)) {
        departure.mark_removed();
    }
    let answers = Arc::new(crate::network::Answers::default());
    let network = Network {
        id,
        faults: options.faults.clone(),
        departure: departure.clone(),
        answers: answers.clone(),
        tls: peer_tls.clone(),
        channels: Default::default(),
    };
    let channels = network.channels.clone();
    // openraft spawns its tasks on the runtime it is created on: its own (see `RaftRuntime`).
    let raft_runtime = if options.shared_raft_runtime {
        crate::node::RaftRuntime::shared()
    } else {
        crate::node::RaftRuntime::own(id).map_err(|e| StartError::Raft(e.to_string()))?
    };
    let raft = {
        let (log_store, state) = (store.log_store(), state.clone());
        raft_runtime
            .handle()
            .spawn(async move { Raft::new(id, raft_config, network, log_store, state).await })
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?
            .map_err(|e| StartError::Raft(e.to_string()))?
    };
    // Bind before anything else can fail late, and so that port 0 (tests) resolves to a real port.
    let listener = bind(config.listen)?;
    let local = listener.local_addr().map_err(|source| StartError::Listen {
        addr: config.listen,
        source,
    })?;
    let addr = config
        .advertise
        .clone()
        .unwrap_or_else(|| local.to_string());
    let peer_listener = match config.peer_listen {
        Some(at) => Some(bind_std(at)?),
        None => None,
    };
    let peer_addr = match (&peer_listener, &config.peer_advertise) {
        (Some(_), Some(advertised)) => advertised.clone(),
        (Some(l), None) => l
            .local_addr()
            .map_err(|source| StartError::Listen {
                addr: config.peer_listen.unwrap_or(config.listen),
                source,
            })?
            .to_string(),
        (None, _) => addr.clone(),
    };
    let http = match config.http_listen {
        Some(at) => {
            Some(crate::http::bind(at).map_err(|source| StartError::Listen { addr: at, source })?)
        }
        None => None,
    };
    crate::http::init_metrics();
    let node = Node(Arc::new(NodeInner {
        id,
        addr: addr.clone(),
        peer_addr: peer_addr.clone(),
        admissions: Default::default(),
        incarnation: incarnation.into(),
        lease_until_ms: Default::default(),
        lease_deadline: tokio::sync::watch::channel(0).0,
        config,
        raft,
        store,
        state,
        registry,
        shutdown: CancellationToken::new(),
        failure: Default::default(),
        quorum_confirmed_ms: Default::default(),
        faults: options.faults,
        started: std::time::Instant::now(),
        events: hooks.events.clone(),
        peers: Default::default(),
        peer_tls,
        departure,
        answers,
        work_in_hand: Default::default(),
        ready_index: u64::MAX.into(),
        submitter: Default::default(),
        assign_view: Default::default(),
        proposer: Default::default(),
        raft_runtime,
    }));
    let _ = node
        .proposer
        .set(crate::proposer::Proposer::start(node.clone()));
    let _ = node
        .submitter
        .set(crate::group::Submitter::start(node.clone()));
    tracing::info!(node = id, incarnation, %addr, %peer_addr, "node starting");
    for open in node.config.exposure() {
        tracing::warn!(
            node = id,
            "INSECURE (--insecure): serving {open} beyond this machine"
        );
    }
    if let Some(why) = node.config.cleartext_secrets() {
        tracing::warn!(node = id, "{why}");
    }

    let (executor, executor_task) = Actor::spawn(
        Some(actor_name(id, incarnation, "executor")),
        Executor,
        node.clone(),
    )
    .await
    .map_err(|e| StartError::Actor(e.to_string()))?;
    let _ = hooks.executor.set(executor.clone());

    let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
    let with_internal = peer_listener.is_none();
    let api_tls_reload = api_tls.clone();
    // Every long-lived task is supervised: a panic in one stops the node loudly
    // (`supervise.rs`); the executor's own supervisor does the same for the actor.
    type Task = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
    let spawn = |name: &'static str, task: Task| supervise::spawn(&node, name, task);
    let mut tasks = vec![
        spawn(
            "API server",
            Box::pin(serve(
                node.clone(),
                listener,
                with_internal,
                api_tls,
                tokens.clone(),
            )?),
        ),
        spawn(
            "leadership watcher",
            Box::pin(watch_leadership(node.clone(), hooks.clone())),
        ),
        spawn(
            "quorum check",
            Box::pin(confirm_quorum_while_leading(node.clone())),
        ),
        spawn(
            "lease",
            Box::pin(bootstrap_and_register(node.clone(), addr.clone())),
        ),
        spawn(
            "removal watcher",
            Box::pin(stand_down_when_removed(node.clone(), executor.clone())),
        ),
        spawn("readiness", Box::pin(learn_ready_index(node.clone()))),
        spawn(
            "Raft core watcher",
            Box::pin(report_raft_core_stop(node.clone())),
        ),
        spawn(
            "member address watcher",
            Box::pin(channels.follow(node.raft.clone())),
        ),
        tokio::spawn(supervise_executor(node.clone(), executor_task)),
    ];
    if let Some(listener) = http {
        tasks.push(spawn(
            "HTTP server",
            Box::pin(crate::http::serve(
                node.clone(),
                listener,
                tokens.clone(),
                http_tls.clone(),
            )),
        ));
    }
    if let Some(tls) = http_tls {
        tasks.push(spawn(
            "HTTP TLS reloader",
            Box::pin(crate::tls::reload_on_change(tls, node.shutdown.clone())),
        ));
    }
    if let Some(listener) = peer_listener {
        let handle = node.raft_runtime.handle();
        tasks.push(supervise::spawn_on(
            &handle,
            &node,
            "peer server",
            serve_peers(node.clone(), listener),
        ));
    }
    if let Some(tls) = &node.peer_tls {
        tasks.push(spawn(
            "peer TLS reloader",
            Box::pin(crate::tls::reload_on_change(
                tls.clone(),
                node.shutdown.clone(),
            )),
        ));
    }
    if node.config.tokens_file.is_some() {
        tasks.push(spawn(
            "tokens file reloader",
            Box::pin(crate::tls::reload_on_change(
                tokens.clone(),
                node.shutdown.clone(),
            )),
        ));
    }
    if let Some(tls) = api_tls_reload {
        tasks.push(spawn(
            "API TLS reloader",
            Box::pin(crate::tls::reload_on_change(tls, node.shutdown.clone())),
        ));
    }

    Ok(RunningNode {
        node,
        hooks,
        addr,
        peer_addr,
        http_addr,
        executor,
        tasks,
    })
}

fn bind(listen: std::net::SocketAddr) -> Result<tokio::net::TcpListener, StartError> {
    let std_listener = bind_std(listen)?;
    tokio::net::TcpListener::from_std(std_listener).map_err(|source| StartError::Listen {
        addr: listen,
        source,
    })
}

/// Binds a non-blocking listener, to be registered with whichever runtime serves it.
fn bind_std(listen: std::net::SocketAddr) -> Result<std::net::TcpListener, StartError> {
    let err = |source| StartError::Listen {
        addr: listen,
        source,
    };
    let std_listener = std::net::TcpListener::bind(listen).map_err(err)?;
    std_listener.set_nonblocking(true).map_err(err)?;
    Ok(std_listener)
}

/// The node-to-node service, with its message bounds.
fn internal_service(node: &Node) -> InternalServer<InternalService> {
    InternalServer::new(InternalService::new(node.clone()))
        .max_decoding_message_size(INTERNAL_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(INTERNAL_MESSAGE_BYTES_MAX)
}

/// Serves the node-to-node service on the peer listener. Runs on the node's Raft runtime, so
/// that the Raft messages it takes in wait behind no client request (see `RaftRuntime`).
async fn serve_peers(node: Node, listener: std::net::TcpListener) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "peer listener");
            return;
        }
    };
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(internal_service(&node));
    let stop = node.shutdown.clone().cancelled_owned();
    let result = match &node.peer_tls {
        // TLS by this node's own acceptor, so that rotated certificates are taken up without a
        // restart (`tls::reload_on_change`).
        Some(tls) => {
            let incoming = tls.incoming(listener, node.shutdown.clone());
            router.serve_with_incoming_shutdown(incoming, stop).await
        }
        None => {
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, stop).await
        }
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "peer gRPC server stopped");
    }
}

/// How often gRPC health is brought in line with readiness (`/readyz`).
const READINESS_CHECK: std::time::Duration = std::time::Duration::from_millis(500);

/// Returns the serving task of the public API; with `with_internal`, the node-to-node service
/// shares the listener (no `peer-listen`).
fn serve(
    node: Node,
    listener: tokio::net::TcpListener,
    with_internal: bool,
    tls: Option<Arc<crate::tls::ApiTls>>,
    tokens: Arc<crate::auth::TokenSet>,
) -> Result<impl std::future::Future<Output = ()>, StartError> {
    let builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(node.config.limits.streams_per_connection_max));
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(exactly_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError::Actor(e.to_string()))?;
    let shutdown = node.shutdown.clone();
    let watched = node.clone();
    Ok(async move {
        // gRPC health follows /readyz: SERVING (the server as a whole, "", and the Jobs
        // service) only while the node is ready, checked every READINESS_CHECK.
        let reporter = health_reporter.clone();
        tokio::spawn(async move {
            let mut last = None;
            let mut tick = tokio::time::interval(READINESS_CHECK);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = watched.shutdown.cancelled() => return,
                }
                let ready = watched.not_ready().is_none();
                if last == Some(ready) {
                    continue;
                }
                last = Some(ready);
                let status = if ready {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status("", status).await;
                reporter
                    .set_service_status(
                        <JobsServer<JobsService> as tonic::server::NamedService>::NAME,
                        status,
                    )
                    .await;
            }
        });
        let router = builder
            .layer(crate::auth::AuthLayer {
                tokens: tokens.clone(),
            })
            .add_service(health)
            .add_service(reflection)
            .add_service(
                JobsServer::new(JobsService {
                    node: node.clone(),
                    tokens: tokens.clone(),
                })
                .max_decoding_message_size(API_MESSAGE_BYTES_MAX),
            )
            .add_service(ClusterServer::new(ClusterService { node: node.clone() }))
            .add_service(TokensServer::new(TokensService {
                node: node.clone(),
                tokens: tokens.clone(),
            }))
            .add_service(DeadLettersServer::new(DeadLettersService {
                node: node.clone(),
            }))
            .add_service(QueuesServer::new(QueuesService { node: node.clone() }))
            .add_service(SchedulesServer::new(SchedulesService {
                node: node.clone(),
            }))
            .add_optional_service(with_internal.then(|| internal_service(&node)));
        let stop = shutdown.clone().cancelled_owned();
        let result = match tls {
            // TLS by this node's own acceptor, which takes up a rotated certificate without a
            // restart (`tls::reload_on_change`); it sets TCP_NODELAY on accepted sockets too.
            Some(tls) => {
                let incoming = crate::tls::incoming(tls, listener, shutdown.clone());
                router.serve_with_incoming_shutdown(incoming, stop).await
            }
            None => {
                // Without TCP_NODELAY on accepted sockets, a reply larger than one segment waits
                // for the peer's delayed ACK (~40 ms): measured as a 48 ms floor on batch
                // submits.
                let incoming =
                    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                router.serve_with_incoming_shutdown(incoming, stop).await
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server stopped");
        }
    })
}

/// While this node leads, confirms its leadership with a quorum every heartbeat interval, so
/// that writes stop being accepted soon after it is cut off (see [`Node::quorum_fresh`]).
async fn confirm_quorum_while_leading(node: Node) {
    let every = node.config.raft.heartbeat_interval;
    loop {
        if node.is_leader() {
            node.confirm_quorum().await;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = node.shutdown.cancelled() => return,
        }
    }
}

/// Learns, once, how far the log was committed when this node started (the leader's read
/// index): `/readyz` says ready only once this node has applied that far, so a restarted node
/// does not serve its pre-crash state as current.
async fn learn_ready_index(node: Node) {
    loop {
        if node.leader().is_some() {
            match node.read_index().await {
                Ok(index) => {
                    node.ready_index
                        .store(index, std::sync::atomic::Ordering::Release);
                    tracing::debug!(
                        node = node.id,
                        index,
                        "ready once applied to the leader's read index"
                    );
                    return;
                }
                Err(why) => tracing::debug!(%why, "read index not learned yet"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(READY_INDEX_RETRY) => {}
            _ = node.shutdown.cancelled() => return,
        }
    }
}

/// Pause between attempts to learn the leader's read index at start-up.
const READY_INDEX_RETRY: Duration = Duration::from_millis(100);

/// Starts the scheduler actor when this node becomes leader and stops it when it is not.
///
/// Watches openraft's server metrics (vote, state, leader, membership), which change only when
/// those do, not the full metrics, which are sent again after every batch of Raft work (several
/// times per entry): each would wake this task for nothing.
///
/// The scheduler is supervised: if it ends while this node still leads (a panic in it stops
/// the actor), it is started again after [`SCHEDULER_RESTART_DELAY`]. It keeps no state that
/// matters across a restart (what it decides is read from the applied state each time, and
/// apply refuses a repeated decision), so a fresh one carries on.
async fn watch_leadership(node: Node, hooks: Arc<Hooks>) {
    let mut metrics = node.raft.server_metrics();
    let restart = Arc::new(tokio::sync::Notify::new());
    loop {
        let leading = {
            let m = metrics.borrow_watched();
            m.current_leader == Some(node.id) && m.state == openraft::ServerState::Leader
        };
        let running = hooks
            .scheduler
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if leading && !running {
            let name = actor_name(node.id, node.incarnation(), "scheduler");
            match Actor::spawn(Some(name), Scheduler, (node.clone(), hooks.clone())).await {
                Ok((actor, task)) => {
                    tracing::info!(node = node.id, "became leader; scheduler started");
                    let id = actor.get_id();
                    *hooks.scheduler.lock().unwrap_or_else(|p| p.into_inner()) = Some(actor);
                    tokio::spawn(supervise_scheduler(
                        node.clone(),
                        hooks.clone(),
                        id,
                        task,
                        restart.clone(),
                    ));
                }
                Err(e) => tracing::error!(error = %e, "cannot start scheduler"),
            }
        } else if !leading && running {
            if let Some(actor) = hooks
                .scheduler
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                actor.stop(None);
                tracing::info!(node = node.id, "no longer leader; scheduler stopped");
            }
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            () = restart.notified() => {}
            _ = node.shutdown.cancelled() => return,
        }
    }
}

/// How long a scheduler that stopped on its own waits before it is started again (a scheduler
/// that panics at every start must not spin).
pub const SCHEDULER_RESTART_DELAY: Duration = Duration::from_secs(1);

/// Waits for the scheduler actor `id` to end. If it ended on its own (it is still the one in
/// `hooks`: [`watch_leadership`] takes it out before it stops it) while the node runs, takes it
/// out and, after [`SCHEDULER_RESTART_DELAY`], has `watch_leadership` start a new one if the
/// node still leads.
async fn supervise_scheduler(
    node: Node,
    hooks: Arc<Hooks>,
    id: ractor::ActorId,
    task: JoinHandle<()>,
    restart: Arc<tokio::sync::Notify>,
) {
    let ended = task.await;
    if node.shutdown.is_cancelled() {
        return;
    }
    {
        let mut slot = hooks.scheduler.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_none_or(|a| a.get_id() != id) {
            return;
        }
        *slot = None;
    }
    let how = match ended {
        Err(e) if e.is_panic() => "panicked",
        _ => "stopped",
    };
    tracing::error!(
        node = node.id,
        "the scheduler {how} while this node leads; starting a new one in {:?}",
        SCHEDULER_RESTART_DELAY
    );
    tokio::select! {
        () = tokio::time::sleep(SCHEDULER_RESTART_DELAY) => {}
        () = node.shutdown.cancelled() => return,
    }
    restart.notify_one();
}

/// Bootstraps (with `init`) or joins (with `join`), then registers this incarnation so the
/// scheduler may assign to it (and so jobs of the previous incarnation are requeued).
async fn bootstrap_and_register(node: Node, addr: String) {
    let initialized = node.raft.is_initialized().await.unwrap_or(false);
    if !initialized && node.config.init {
        let members = BTreeMap::from([(
            node.id,
            BasicNode {
                addr: node.peer_addr.clone(),
            },
        )]);
        match node.raft.initialize(members).await {
            Ok(()) => tracing::info!(node = node.id, "initialized a new cluster"),
            Err(e) => tracing::warn!(error = %e, "initialize"),
        }
    } else if !initialized && !node.config.join.is_empty() {
        join(&node, &node.peer_addr, node.config.join.clone()).await;
    } else if initialized && !node.departure.has_departed() {
        // A node that drained itself away (SIGTERM) and starts again is no longer a member: it
        // asks to be admitted again. For a member this is one cheap round trip (the leader
        // answers at once), and a removed node learns here that it is out for good. In the
        // background: a member registers at once, whatever the join says.
        let mut targets = node.config.join.clone();
        let membership = node
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        for (id, member) in membership.membership().nodes() {
            if *id != node.id && !targets.contains(&member.addr) {
                targets.push(member.addr.clone());
            }
        }
        targets.retain(|t| *t != node.peer_addr);
        if !targets.is_empty() {
            let node = node.clone();
            tokio::spawn(async move { join(&node, &node.peer_addr, targets).await });
        }
    }
    if node.departure.has_departed() {
        return;
    }
    node.keep_lease(addr).await;
}

/// Asks the configured peers (and whichever leader they name) to admit this node, until one does.
async fn join(node: &Node, addr: &str, mut targets: Vec<String>) {
    let mut i = 0usize;
    loop {
        if node.shutdown.is_cancelled() {
            return;
        }
        let target = targets[i % targets.len()].clone();
        i += 1;
        let reply = match network::peer_channel(&target, node.peer_tls.as_ref(), None) {
            Ok(ch) => {
                let mut client = network::internal_client(ch);
                let request = client.join(JoinRequest {
                    node_id: node.id,
                    addr: addr.to_string(),
                    by: String::new(),
                });
                // A paused or half-dead peer must not hold the join up; an admission that took
                // longer (a big snapshot to catch up on) goes on, and the next try finds it done.
                tokio::time::timeout(JOIN_ATTEMPT_TIMEOUT, request)
                    .await
                    .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("join timed out")))
            }
            Err(e) => Err(tonic::Status::invalid_argument(e.to_string())),
        };
        match reply {
            Ok(blob) => match codec::decode::<JoinReply>(&blob.into_inner().data) {
                Ok(JoinReply::Joined { voter }) => {
                    tracing::info!(node = node.id, voter, via = %target, "joined the cluster");
                    return;
                }
                Ok(JoinReply::Removed) => {
                    node.departure.mark_removed();
                    return;
                }
                Ok(other) => tracing::info!(?other, via = %target, "join not accepted yet"),
                Err(e) => tracing::warn!(error = %e, "bad join reply"),
            },
            Err(status) => {
                learn_leader(&mut targets, &status);
                tracing::debug!(via = %target, %status, "join attempt failed");
            }
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// A join refused by a follower names the leader (typed, in the status details): it becomes
/// one more address to try, once.
fn learn_leader(targets: &mut Vec<String>, status: &tonic::Status) {
    if let Some(crate::codec::Refusal::NotLeader {
        leader: Some(leader),
    }) = crate::codec::Refusal::of(status)
    {
        if !leader.is_empty() && !targets.contains(&leader) {
            targets.push(leader);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::codec::Refusal;
    use tonic::Code;

    /// Only a typed not-leader refusal with an address adds a target, and only once; the same
    /// words in a message add nothing.
    #[test]
    fn a_join_refused_by_a_follower_tries_the_leader_it_names() {
        let mut targets = vec!["10.0.0.1:7001".to_string()];
        let named = |leader: Option<&str>| {
            Refusal::NotLeader {
                leader: leader.map(str::to_string),
            }
            .status(Code::FailedPrecondition, "not the leader")
        };
        super::learn_leader(&mut targets, &named(Some("10.0.0.2:7001")));
        super::learn_leader(&mut targets, &named(Some("10.0.0.2:7001")));
        super::learn_leader(&mut targets, &named(None));
        super::learn_leader(&mut targets, &named(Some("")));
        let words = tonic::Status::failed_precondition("not the leader; leader: 10.0.0.3:7001");
        super::learn_leader(&mut targets, &words);
        let removed = Refusal::Removed { node: 4 }.status(Code::FailedPrecondition, "removed");
        super::learn_leader(&mut targets, &removed);
        assert_eq!(targets, ["10.0.0.1:7001", "10.0.0.2:7001"]);
    }
}
