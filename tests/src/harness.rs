//! A fault-injecting cluster of real nodes in one process, and seeded fault schedules for it.
//!
//! **One runtime per node.** Each node runs inside its own single-threaded tokio runtime on a
//! dedicated OS thread ([`NodeHost`]). That is what makes the node-level faults honest:
//! - *crash* drops the node's runtime without a graceful shutdown: every task (Raft core,
//!   actors, gRPC server, running handlers) is dropped where it stands, like SIGKILL. Its data
//!   directory is kept; what sled had written survives, synced or not.
//! - *crash losing unsynced writes* is a power loss: the node's [`Disk`] loses power first (from
//!   that instant no durability point of the node completes, so nothing acknowledged later
//!   depends on one), then the node is killed, then [`exactly_store::lose_unsynced_writes`]
//!   leaves its data directory as the power loss would, from the newest durability point that
//!   completed before the cut. A *power loss* does this to every node at once (the cuts first).
//!   Nodes run on a slow disk ([`DiskOptions::append_sync_delay`]), so a cut usually finds
//!   written but unsynced log entries to drop.
//! - *restart* starts the node again on the same data directory and the same address (the
//!   membership names it). A new incarnation registers and requeues what the old one ran.
//! - *pause* blocks the node's only runtime thread on a `std` condition variable, so its timers
//!   and tasks stop while the other nodes go on, like SIGSTOP. Work already handed to tokio's
//!   blocking pool (sled applies and fsyncs in `spawn_blocking`) may still finish, and the kernel
//!   still accepts TCP connections for it; nothing is answered until it resumes.
//!
//! The harness talks to a node only through its [`Node`] handle (reads are plain locks, usable
//! from any thread) and its runtime [`Handle`](tokio::runtime::Handle) (to run work *inside*
//! the node's runtime). It never holds a `Node` clone beyond a crash, so a crashed node's sled
//! database really closes.
//!
//! **Schedules.** [`Schedule::generate`] turns a seed into timed [`Step`]s: partitions of random
//! subsets, isolating the leader, one-way cuts, lossy and slow links (random delays reorder),
//! crash + restart (some losing unsynced writes) and pause + resume episodes (targeting the
//! leader half the time), power losses of the whole cluster, and heals.
//! It always ends with [`Action::HealAll`]: links healed, every paused node resumed, every
//! crashed node restarted — except nodes crashed "forever" when
//! [`ScheduleOptions::crash_forever`] is on (which needs node leases for the cluster to take
//! their jobs back).

use openraft::async_runtime::WatchReceiver;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use exactly_handlers::Registry;
use exactly_node::{Node, NodeConfig, StartOptions};
use exactly_store::lose_unsynced_writes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::disk::{Disk, DiskOptions};
use crate::faults::FaultController;
use crate::history::{now_us, Event, NodeFinal, PowerLoss, Recorder};
use crate::test_config;

/// How long a restart keeps trying while the previous life's sled lock or port lingers.
const RESTART_TRY_MAX: Duration = Duration::from_secs(15);
/// How long a node thread may take to shut down its runtime.
const STOP_WAIT_MAX: Duration = Duration::from_secs(10);
/// How often the settle loop looks at the replicas.
const SETTLE_POLL: Duration = Duration::from_millis(50);
/// How long a crash that loses unsynced writes waits, at most, for its node (a majority of the
/// nodes, in a power loss) to hold written but unsynced log entries: power fails at random
/// instants, but only one that strikes mid-write tests anything, so the nemesis picks such an
/// instant if one comes soon. Nodes that append nothing for this long are cut anyway.
pub const UNSYNCED_WAIT_MAX: Duration = Duration::from_millis(500);
/// How often that wait looks at the disks.
const UNSYNCED_POLL: Duration = Duration::from_millis(1);

/// Blocks a node's runtime thread while paused.
#[derive(Default)]
struct Gate {
    paused: Mutex<bool>,
    resumed: Condvar,
}

impl Gate {
    /// Runs on the node's runtime thread: says it is blocked, then blocks until resumed.
    fn block(&self, blocked: oneshot::Sender<()>) {
        let mut paused = self.paused.lock().unwrap_or_else(|p| p.into_inner());
        let _ = blocked.send(());
        while *paused {
            paused = self.resumed.wait(paused).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn set(&self, value: bool) {
        *self.paused.lock().unwrap_or_else(|p| p.into_inner()) = value;
        if !value {
            self.resumed.notify_all();
        }
    }
}

/// How a node thread ends its node.
enum Stop {
    /// Drop everything where it stands (SIGKILL).
    Kill,
    /// `RunningNode::shutdown`, then drop.
    Graceful,
}

/// A node running in its own single-threaded runtime on its own OS thread.
pub struct NodeHost {
    pub id: u64,
    /// The address it listens on (stable across restarts).
    pub addr: String,
    node: Node,
    runtime: Handle,
    stop: oneshot::Sender<Stop>,
    thread: std::thread::JoinHandle<()>,
    gate: Arc<Gate>,
    paused: bool,
}

impl NodeHost {
    /// Starts a node on a new thread and returns once `start_with` returned (the node serves;
    /// joining and registration go on in the background).
    pub async fn launch(
        config: NodeConfig,
        registry: Registry,
        options: StartOptions,
    ) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(Node, String, Handle), String>>();
        let (stop_tx, stop_rx) = oneshot::channel::<Stop>();
        let name = format!("node-{}", config.node_id.unwrap_or(0));
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot build a runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let running = match exactly_node::start_with(config, registry, options).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let ready = (
                    running.node.clone(),
                    running.addr.clone(),
                    Handle::current(),
                );
                if ready_tx.send(Ok(ready)).is_err() {
                    return;
                }
                // A dropped sender (the harness went away) is a kill too.
                if let Ok(Stop::Graceful) = stop_rx.await {
                    running.shutdown().await;
                }
            });
            // Dropping the runtime drops every task of this node where it stands; it waits for
            // work already in tokio's blocking pool (sled calls) to finish.
            drop(runtime);
        })?;
        let (node, addr, runtime) = ready_rx
            .await
            .map_err(|_| anyhow::anyhow!("node thread ended before the node started"))?
            .map_err(anyhow::Error::msg)?;
        Ok(Self {
            id: node.id,
            addr,
            node,
            runtime,
            stop: stop_tx,
            thread,
            gate: Arc::new(Gate::default()),
            paused: false,
        })
    }

    /// The node handle, for reads. Do not keep clones past a crash.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The node's runtime, to run work inside it.
    pub fn runtime(&self) -> &Handle {
        &self.runtime
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Stops the node's runtime thread until [`NodeHost::resume`]. Returns once it is blocked.
    pub async fn pause(&mut self) {
        if self.paused {
            return;
        }
        self.paused = true;
        self.gate.set(true);
        let (blocked_tx, blocked_rx) = oneshot::channel();
        let gate = self.gate.clone();
        self.runtime.spawn(async move { gate.block(blocked_tx) });
        let _ = blocked_rx.await;
    }

    /// Lets a paused node run again. Every timer that fell due meanwhile fires at once.
    pub fn resume(&mut self) {
        if self.paused {
            self.paused = false;
            self.gate.set(false);
        }
    }

    /// Ends the node: `graceful` runs `RunningNode::shutdown`, otherwise everything is dropped
    /// where it stands. A paused node is resumed first (it may run briefly before it dies: a
    /// SIGCONT shortly followed by SIGKILL). Returns once its runtime is gone.
    pub async fn stop(mut self, graceful: bool) -> anyhow::Result<()> {
        self.resume();
        let Self {
            node, stop, thread, ..
        } = self;
        // The harness's handle must go first, or the node's sled database stays open.
        drop(node);
        let _ = stop.send(if graceful { Stop::Graceful } else { Stop::Kill });
        let joined = tokio::time::timeout(
            STOP_WAIT_MAX,
            tokio::task::spawn_blocking(move || thread.join()),
        )
        .await;
        match joined {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(_))) => anyhow::bail!("node thread panicked"),
            Ok(Err(e)) => anyhow::bail!("joining the node thread: {e}"),
            Err(_) => anyhow::bail!("node thread did not stop within {STOP_WAIT_MAX:?}"),
        }
    }
}

/// Where a cluster member is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    Running,
    Paused,
    Crashed,
}

struct Member {
    config: NodeConfig,
    host: Option<NodeHost>,
    /// The disk of the current (or last) life.
    disk: Arc<Disk>,
}

/// N real nodes in one process, each on its own runtime thread, all sharing one
/// [`FaultController`] for node-to-node traffic.
pub struct FaultyCluster {
    dir: tempfile::TempDir,
    members: BTreeMap<u64, Member>,
    faults: Arc<FaultController>,
    registry: Registry,
    disk: DiskOptions,
}

impl FaultyCluster {
    /// Starts nodes `1..=n` (node 1 bootstraps, the others join through it, all voters up to
    /// `n`), with `registry` on every node and `tweak` applied to every configuration, and waits
    /// until every node sees all `n` registered.
    pub async fn start(
        n: u64,
        faults: Arc<FaultController>,
        registry: Registry,
        tweak: impl Fn(&mut NodeConfig),
    ) -> anyhow::Result<Self> {
        Self::start_on_disks(n, faults, registry, DiskOptions::default(), tweak).await
    }

    /// [`FaultyCluster::start`] with disk faults on every node.
    pub async fn start_on_disks(
        n: u64,
        faults: Arc<FaultController>,
        registry: Registry,
        disk: DiskOptions,
        tweak: impl Fn(&mut NodeConfig),
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(n >= 1, "a cluster needs a node");
        let dir = tempfile::tempdir()?;
        let mut cluster = Self {
            dir,
            members: BTreeMap::new(),
            faults,
            registry,
            disk,
        };
        let mut seed_addr = String::new();
        for id in 1..=n {
            let mut config = test_config(cluster.dir.path(), id);
            config.voters_target = n as usize;
            if id == 1 {
                config.init = true;
            } else {
                config.join = vec![seed_addr.clone()];
            }
            tweak(&mut config);
            let disk = Arc::new(Disk::default());
            let host = NodeHost::launch(
                config.clone(),
                cluster.registry.clone(),
                cluster.options(&disk),
            )
            .await?;
            // Restarts must come back on the same address: the membership names it.
            config.listen = host.addr.parse()?;
            if id == 1 {
                seed_addr = host.addr.clone();
            }
            cluster.members.insert(
                id,
                Member {
                    config,
                    host: Some(host),
                    disk,
                },
            );
        }
        cluster.wait_registered(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// The start options of one node life on `disk`.
    fn options(&self, disk: &Arc<Disk>) -> StartOptions {
        StartOptions {
            faults: Some(self.faults.handle()),
            store: self.disk.store_options(disk),
            // A pause or crash of the node's runtime thread stops all of it, Raft included.
            shared_raft_runtime: true,
        }
    }

    /// Waits until every running node sees every member registered.
    pub async fn wait_registered(&self, limit: Duration) -> anyhow::Result<()> {
        let n = self.members.len();
        crate::wait_for(limit, || {
            self.hosts()
                .all(|h| h.node().read(|t| t.nodes().len()) == n)
        })
        .await
    }

    pub fn faults(&self) -> &Arc<FaultController> {
        &self.faults
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn ids(&self) -> Vec<u64> {
        self.members.keys().copied().collect()
    }

    /// `(id, address)` of every member; addresses stay valid across restarts.
    pub fn endpoints(&self) -> Vec<(u64, String)> {
        self.members
            .iter()
            .map(|(&id, m)| (id, m.config.listen.to_string()))
            .collect()
    }

    pub fn state(&self, id: u64) -> NodeState {
        match self.members.get(&id).and_then(|m| m.host.as_ref()) {
            None => NodeState::Crashed,
            Some(h) if h.is_paused() => NodeState::Paused,
            Some(_) => NodeState::Running,
        }
    }

    /// Running or paused members.
    pub fn hosts(&self) -> impl Iterator<Item = &NodeHost> {
        self.members.values().filter_map(|m| m.host.as_ref())
    }

    pub fn host(&self, id: u64) -> Option<&NodeHost> {
        self.members.get(&id)?.host.as_ref()
    }

    /// The node handle of a running or paused member.
    pub fn node(&self, id: u64) -> Option<&Node> {
        self.host(id).map(NodeHost::node)
    }

    /// The leader as the running nodes see it: the leader named in the highest term that any
    /// running node knows, if that leader is itself running.
    pub fn leader(&self) -> Option<u64> {
        let (_, leader) = self
            .hosts()
            .filter(|h| !h.is_paused())
            .filter_map(|h| {
                let m = h.node().raft.metrics().borrow_watched().clone();
                Some((m.current_term, m.current_leader?))
            })
            .max()?;
        (self.state(leader) == NodeState::Running).then_some(leader)
    }

    /// Kills a running (or paused) member where it stands; its data directory stays.
    pub async fn crash(&mut self, id: u64) -> anyhow::Result<()> {
        self.stop_member(id, false).await
    }

    /// Waits (at most `limit`) until `at_least` of the running members among `ids` hold
    /// written but unsynced log entries at once; returns how long that took, or `None` if that
    /// did not happen in time.
    pub async fn await_unsynced_entries(
        &self,
        ids: &[u64],
        at_least: usize,
        limit: Duration,
    ) -> Option<Duration> {
        let started = tokio::time::Instant::now();
        loop {
            let unsynced = ids
                .iter()
                .filter(|id| {
                    self.members
                        .get(id)
                        .is_some_and(|m| m.host.is_some() && m.disk.has_unsynced_entries())
                })
                .count();
            if unsynced >= at_least {
                return Some(started.elapsed());
            }
            if started.elapsed() >= limit {
                return None;
            }
            tokio::time::sleep(UNSYNCED_POLL).await;
        }
    }

    /// Cuts the power of a running (or paused) member, kills it and drops from its data
    /// directory every write no durability point had completed before the cut. See
    /// [`FaultyCluster::power_loss`].
    pub async fn crash_losing_unsynced(&mut self, id: u64) -> anyhow::Result<PowerLoss> {
        self.power_loss(&[id])
            .await?
            .pop()
            .ok_or_else(|| anyhow::anyhow!("node {id} is not running"))
    }

    /// A power loss of the running (or paused) members among `ids`: every one's disk loses
    /// power first, at (nearly) one instant; then each is killed and its data directory left
    /// as the power loss would leave it ([`lose_unsynced_writes`], from the newest durability
    /// point its disk completed before the cut). Members already crashed are left alone.
    pub async fn power_loss(&mut self, ids: &[u64]) -> anyhow::Result<Vec<PowerLoss>> {
        let cuts: Vec<_> = ids
            .iter()
            .filter_map(|id| {
                let member = self.members.get(id)?;
                member.host.as_ref()?;
                Some((*id, member.disk.cut_power()))
            })
            .collect();
        // Every node without power goes down, even if one of them fails to.
        let mut stopped = Vec::with_capacity(cuts.len());
        let mut first_error = None;
        for (id, cut) in cuts {
            match self.stop_member(id, false).await {
                Ok(()) => stopped.push((id, cut)),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let mut losses = Vec::with_capacity(stopped.len());
        for (id, cut) in stopped {
            let (image, _) = cut
                .durable
                .clone()
                .ok_or_else(|| anyhow::anyhow!("node {id} never completed a durability point"))?;
            let dir = self.members[&id].config.data_dir.clone();
            let lost = tokio::task::spawn_blocking(move || lose_unsynced_writes(&dir, &image))
                .await?
                .map_err(|e| anyhow::anyhow!("losing node {id}'s unsynced writes: {e}"))?;
            losses.push(PowerLoss {
                node: id,
                cut,
                lost,
            });
        }
        Ok(losses)
    }

    /// Stops a member gracefully (`RunningNode::shutdown`); its data directory stays.
    pub async fn stop(&mut self, id: u64) -> anyhow::Result<()> {
        self.stop_member(id, true).await
    }

    async fn stop_member(&mut self, id: u64, graceful: bool) -> anyhow::Result<()> {
        let member = self
            .members
            .get_mut(&id)
            .ok_or_else(|| anyhow::anyhow!("no node {id}"))?;
        match member.host.take() {
            Some(host) => host.stop(graceful).await,
            None => Ok(()),
        }
    }

    /// Starts a crashed member again on its data directory and address. Retries for a while:
    /// the previous life's sled lock or listening port may linger briefly.
    pub async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        // A new life on a new disk (the old one stays without power).
        let disk = Arc::new(Disk::default());
        let options = self.options(&disk);
        let registry = self.registry.clone();
        let member = self
            .members
            .get_mut(&id)
            .ok_or_else(|| anyhow::anyhow!("no node {id}"))?;
        if member.host.is_some() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + RESTART_TRY_MAX;
        loop {
            match NodeHost::launch(member.config.clone(), registry.clone(), options.clone()).await {
                Ok(host) => {
                    member.host = Some(host);
                    member.disk = disk;
                    return Ok(());
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(node = id, error = %e, "restart failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    anyhow::bail!("node {id} did not restart within {RESTART_TRY_MAX:?}: {e}")
                }
            }
        }
    }

    /// Has member `id` take a snapshot (waiting at most 30 s for it), crashes it and starts it
    /// again: it then loads its state from that snapshot, not from its log.
    pub async fn restart_from_snapshot(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self
            .node(id)
            .ok_or_else(|| anyhow::anyhow!("node {id} does not run"))?
            .clone();
        node.raft.trigger().snapshot().await?;
        crate::wait_for(Duration::from_secs(30), || {
            node.raft.metrics().borrow_watched().snapshot.is_some()
        })
        .await?;
        drop(node);
        self.crash(id).await?;
        self.restart(id).await
    }

    /// Starts a crashed member again on its data directory but at a new address (a container
    /// recreated with a new host name). Nothing listens at the old address any more.
    pub async fn restart_at_new_address(&mut self, id: u64) -> anyhow::Result<String> {
        let member = self
            .members
            .get_mut(&id)
            .ok_or_else(|| anyhow::anyhow!("no node {id}"))?;
        anyhow::ensure!(member.host.is_none(), "node {id} is running");
        member.config.listen = "127.0.0.1:0".parse()?;
        self.restart(id).await?;
        let member = self.members.get_mut(&id).expect("restarted just now");
        let addr = member
            .host
            .as_ref()
            .map(|h| h.addr.clone())
            .ok_or_else(|| anyhow::anyhow!("node {id} did not start"))?;
        member.config.listen = addr.parse()?;
        Ok(addr)
    }

    /// Pauses a running member (its runtime thread blocks). No-op if crashed or paused.
    pub async fn pause(&mut self, id: u64) {
        if let Some(host) = self.members.get_mut(&id).and_then(|m| m.host.as_mut()) {
            host.pause().await;
        }
    }

    /// Resumes a paused member.
    pub fn resume(&mut self, id: u64) {
        if let Some(host) = self.members.get_mut(&id).and_then(|m| m.host.as_mut()) {
            host.resume();
        }
    }

    /// Heals every link, resumes every paused member and restarts every crashed one except
    /// those in `keep_down`.
    pub async fn heal_all(&mut self, keep_down: &BTreeSet<u64>) -> anyhow::Result<()> {
        self.faults.heal();
        for id in self.ids() {
            match self.state(id) {
                NodeState::Paused => self.resume(id),
                NodeState::Crashed if !keep_down.contains(&id) => self.restart(id).await?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Each running member's final state, with the log index it was read at when that is
    /// certain (the applied index was the same before and after the read; apply updates the
    /// table and the index under one lock).
    pub fn finals(&self) -> Vec<NodeFinal> {
        self.hosts()
            .map(|h| {
                let node = h.node();
                let before = node.state.last_applied().map(|l| l.index);
                let mut last = node.read_view(|t| NodeFinal::from_table(h.id, None, t));
                let after = node.state.last_applied().map(|l| l.index);
                last.applied = before.filter(|b| Some(*b) == after);
                last
            })
            .collect()
    }

    /// Waits (at most `limit`) until every running member holds every job in `must_have`, every
    /// job it holds is terminal, and all members hold identical job records; returns the final
    /// states and whether they settled. If they never settle, the final states returned are,
    /// by preference, a look in which every member was read at the same log index (replicas
    /// that differ there have diverged), else the last look.
    pub async fn settle(
        &self,
        limit: Duration,
        must_have: &BTreeSet<u64>,
    ) -> (Vec<NodeFinal>, bool) {
        let deadline = tokio::time::Instant::now() + limit;
        let mut at_one_index: Option<Vec<NodeFinal>> = None;
        loop {
            let finals = self.finals();
            let settled = finals.iter().all(|n| {
                let ids: BTreeSet<u64> = n.jobs.iter().map(|j| j.id).collect();
                must_have.is_subset(&ids) && n.jobs.iter().all(|j| j.status.is_terminal())
            }) && finals.windows(2).all(|w| w[0].jobs == w[1].jobs);
            if settled {
                return (finals, true);
            }
            let one_index = finals.iter().all(|n| n.applied.is_some())
                && finals.windows(2).all(|w| w[0].applied == w[1].applied);
            if tokio::time::Instant::now() >= deadline {
                return (at_one_index.unwrap_or(finals), false);
            }
            if one_index {
                at_one_index = Some(finals);
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }

    /// Starts a new member `id` that joins through the first running member, configured like
    /// the existing members (same timing and limits; `edit` adjusts it). Returns once it serves;
    /// admission, catching up and registration go on in the background.
    pub async fn add(&mut self, id: u64, edit: impl Fn(&mut NodeConfig)) -> anyhow::Result<()> {
        anyhow::ensure!(!self.members.contains_key(&id), "node {id} exists already");
        let (template, seed) = self
            .members
            .values()
            .find_map(|m| m.host.as_ref().map(|h| (m.config.clone(), h.addr.clone())))
            .ok_or_else(|| anyhow::anyhow!("no running member to join through"))?;
        let fresh = test_config(self.dir.path(), id);
        let mut config = NodeConfig {
            node_id: Some(id),
            data_dir: fresh.data_dir,
            listen: fresh.listen,
            init: false,
            join: vec![seed],
            ..template
        };
        edit(&mut config);
        let disk = Arc::new(Disk::default());
        let host =
            NodeHost::launch(config.clone(), self.registry.clone(), self.options(&disk)).await?;
        config.listen = host.addr.parse()?;
        self.members.insert(
            id,
            Member {
                config,
                host: Some(host),
                disk,
            },
        );
        Ok(())
    }

    /// What SIGTERM does to `exactlyd`: drains the member (at most `deadline` for its running
    /// attempts), leaves the cluster if it can be spared, then stops it gracefully. Its data
    /// directory stays, so it can be restarted. Returns how the drain ended.
    pub async fn terminate(
        &mut self,
        id: u64,
        deadline: Duration,
    ) -> anyhow::Result<Result<exactly_node::membership::Stopped, String>> {
        let mut ended = self.terminate_all(&[id], deadline).await?;
        Ok(ended.remove(0).1)
    }

    /// SIGTERM to several members at once (a whole cluster stopped by `docker compose down` or
    /// a host shutdown): each drains concurrently, then each is stopped. Returns, per member, how
    /// its drain ended and how long it took from the signal until it was stopped.
    pub async fn terminate_all(
        &mut self,
        ids: &[u64],
        deadline: Duration,
    ) -> anyhow::Result<
        Vec<(
            u64,
            Result<exactly_node::membership::Stopped, String>,
            Duration,
        )>,
    > {
        let signalled = std::time::Instant::now();
        let mut pending = Vec::new();
        for &id in ids {
            let host = self
                .host(id)
                .ok_or_else(|| anyhow::anyhow!("node {id} is not running"))?;
            let node = host.node().clone();
            let (tx, rx) = oneshot::channel();
            host.runtime().spawn(async move {
                let left = node.drain_and_leave(deadline).await;
                let _ = tx.send((left.map_err(|e| e.to_string()), signalled.elapsed()));
            });
            pending.push((id, rx));
        }
        let mut ended = Vec::new();
        for (id, rx) in pending {
            let (left, _) = rx
                .await
                .map_err(|_| anyhow::anyhow!("node {id} stopped while draining"))?;
            ended.push((id, left));
        }
        let mut out = Vec::new();
        for (id, left) in ended {
            self.stop(id).await?;
            out.push((id, left, signalled.elapsed()));
        }
        Ok(out)
    }

    /// Kills every member and removes the data directory.
    pub async fn shutdown(mut self) {
        for id in self.ids() {
            if let Err(e) = self.crash(id).await {
                tracing::warn!(node = id, error = %e, "stopping at the end");
            }
        }
    }
}

/// Which node a node-level fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Node(u64),
    /// Whichever node leads when the step runs (a random running node if none is known).
    Leader,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Node(id) => write!(f, "node {id}"),
            Target::Leader => f.write_str("the leader"),
        }
    }
}

/// A state of the network. Each one replaces the previous (the runner heals, then applies).
#[derive(Clone, Debug, PartialEq)]
pub enum NetFault {
    /// `side` and the rest cannot talk, both ways.
    Partition { side: Vec<u64> },
    /// The leader cannot talk to anyone, both ways.
    IsolateLeader,
    /// Messages `from → to` are lost; the other direction works.
    OneWay { from: u64, to: u64 },
    /// Nothing reaches the leader (`inbound`) or nothing leaves it: requests or replies are lost.
    LeaderOneWay { inbound: bool },
    /// Every link drops each message with probability `p`.
    Lossy { p: f64 },
    /// Every link delays each message by a random time in the range (reorders them).
    Slow { min: Duration, max: Duration },
}

/// One thing the nemesis does.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Net(NetFault),
    HealNet,
    /// `graceful`: `RunningNode::shutdown` (cancels running attempts first, like SIGTERM)
    /// instead of dropping everything where it stands (SIGKILL). `forever`: no restart, not even
    /// by [`Action::HealAll`]. `lose_unsynced` (never with `graceful`): the node's power is cut,
    /// so writes no durability point had completed are lost
    /// ([`FaultyCluster::crash_losing_unsynced`]).
    Crash {
        episode: u32,
        target: Target,
        graceful: bool,
        forever: bool,
        lose_unsynced: bool,
    },
    /// Every running or paused node loses power at once ([`FaultyCluster::power_loss`]): a
    /// cluster-wide crash that loses unsynced writes. Its restart brings them all back.
    PowerLoss {
        episode: u32,
    },
    /// Ends a crash or power loss episode (if it ends before the schedule does; else `HealAll`
    /// restarts).
    Restart {
        episode: u32,
    },
    Pause {
        episode: u32,
        target: Target,
    },
    Resume {
        episode: u32,
    },
    /// Heal links, resume paused nodes, restart crashed ones (not those crashed forever).
    HealAll,
}

/// An action at a time since the schedule started.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub at: Duration,
    pub action: Action,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>6}ms ", self.at.as_millis())?;
        match &self.action {
            Action::Net(n) => write!(f, "net {n:?}"),
            Action::HealNet => write!(f, "heal links"),
            Action::Crash {
                episode,
                target,
                graceful,
                forever,
                lose_unsynced,
            } => {
                let how = match (graceful, lose_unsynced) {
                    (true, _) => "stop",
                    (false, true) => "crash (losing unsynced writes)",
                    (false, false) => "crash",
                };
                let forever = if *forever { " forever" } else { "" };
                write!(f, "{how} {target}{forever} (#{episode})")
            }
            Action::PowerLoss { episode } => write!(f, "power loss of every node (#{episode})"),
            Action::Restart { episode } => write!(f, "restart (#{episode})"),
            Action::Pause { episode, target } => write!(f, "pause {target} (#{episode})"),
            Action::Resume { episode } => write!(f, "resume (#{episode})"),
            Action::HealAll => write!(f, "heal all"),
        }
    }
}

/// What a generated schedule may contain.
#[derive(Clone, Debug)]
pub struct ScheduleOptions {
    /// Node ids are `1..=nodes`.
    pub nodes: u64,
    /// When the final [`Action::HealAll`] runs.
    pub duration: Duration,
    /// Time between steps, drawn uniformly from this range.
    pub gap: (Duration, Duration),
    /// How long a crash lasts before the restart.
    pub crash_for: (Duration, Duration),
    /// How long a pause lasts (longer than an election timeout deposes a paused leader).
    pub pause_for: (Duration, Duration),
    /// The share (0.0..=1.0) of crashes that are graceful stops (`RunningNode::shutdown`).
    pub graceful_share: f64,
    /// Node-level episodes (crash or pause) active at once, at most.
    pub down_max: usize,
    /// The share (0.0..=1.0) of non-graceful crashes that lose unsynced writes.
    pub lossy_crash_share: f64,
    /// The chance (0.0..=1.0) that a step which would otherwise do nothing (one in ten) is a
    /// power loss of every node instead, when no other node is down or paused but for good.
    pub power_loss_share: f64,
    /// Whether a crash may last forever (never restarted, even by [`Action::HealAll`]). At most
    /// a minority of nodes. Needs node leases: until then a node that never returns keeps its
    /// running jobs.
    pub crash_forever: bool,
}

impl ScheduleOptions {
    /// A short schedule for `cargo test`: crashes and pauses last up to 3.5 s, longer than the
    /// short sweep's lease expiry (2.5 s), and some crashes last forever.
    pub fn short(nodes: u64) -> Self {
        Self {
            nodes,
            duration: Duration::from_millis(5000),
            gap: (Duration::from_millis(150), Duration::from_millis(600)),
            crash_for: (Duration::from_millis(300), Duration::from_millis(3500)),
            pause_for: (Duration::from_millis(200), Duration::from_millis(3500)),
            graceful_share: 0.25,
            down_max: (nodes as usize - 1).max(1),
            crash_forever: true,
            lossy_crash_share: 0.5,
            power_loss_share: 0.5,
        }
    }

    /// A longer schedule for the `EXACTLY_LONG` sweep.
    pub fn long(nodes: u64) -> Self {
        Self {
            duration: Duration::from_secs(15),
            crash_for: (Duration::from_millis(300), Duration::from_millis(6000)),
            pause_for: (Duration::from_millis(200), Duration::from_millis(6000)),
            ..Self::short(nodes)
        }
    }
}

/// A reproducible list of faults.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub seed: u64,
    pub nodes: u64,
    pub duration: Duration,
    pub steps: Vec<Step>,
}

fn pick(rng: &mut StdRng, (min, max): (Duration, Duration)) -> Duration {
    if max <= min {
        min
    } else {
        rng.random_range(min..=max)
    }
}

impl Schedule {
    /// The schedule of `seed`: the same seed and options always give the same steps.
    pub fn generate(seed: u64, options: &ScheduleOptions) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        // Power faults draw from their own generator, so that they leave every other draw,
        // and the schedules of seeds without a power loss, as they were before they existed.
        let mut power_rng = StdRng::seed_from_u64(seed ^ 0x706f_7765_7200);
        // No node-level episode starts before this (every node is down in a power loss).
        let mut blackout_until = Duration::ZERO;
        let n = options.nodes;
        let ids: Vec<u64> = (1..=n).collect();
        let mut steps = Vec::new();
        // (end, node if concrete) of node-level episodes; `None` end: forever.
        let mut episodes: Vec<(Option<Duration>, Target)> = Vec::new();
        let mut forever = 0usize;
        let mut next_episode = 0u32;
        let mut t = Duration::ZERO;
        loop {
            t += pick(&mut rng, options.gap);
            if t >= options.duration {
                break;
            }
            let active: Vec<Target> = episodes
                .iter()
                .filter(|(end, _)| end.is_none_or(|e| e > t))
                .map(|(_, target)| *target)
                .collect();
            let roll = rng.random_range(0..100u32);
            let action = if roll < 40 {
                let net = match rng.random_range(0..6u32) {
                    0 => {
                        let size = rng.random_range(1..=(n as usize / 2).max(1));
                        let mut side = ids.clone();
                        for i in (1..side.len()).rev() {
                            side.swap(i, rng.random_range(0..=i));
                        }
                        side.truncate(size);
                        side.sort_unstable();
                        NetFault::Partition { side }
                    }
                    1 => NetFault::IsolateLeader,
                    2 => {
                        let from = rng.random_range(1..=n);
                        let mut to = rng.random_range(1..=n);
                        if to == from {
                            to = to % n + 1;
                        }
                        NetFault::OneWay { from, to }
                    }
                    3 => NetFault::LeaderOneWay {
                        inbound: rng.random_bool(0.5),
                    },
                    4 => NetFault::Lossy {
                        p: rng.random_range(0.05..0.4),
                    },
                    _ => {
                        let max = Duration::from_millis(rng.random_range(20..250));
                        NetFault::Slow {
                            min: Duration::ZERO,
                            max,
                        }
                    }
                };
                if n < 2 {
                    continue;
                }
                Action::Net(net)
            } else if roll < 55 {
                Action::HealNet
            } else if roll < 90 {
                if active.len() >= options.down_max || t < blackout_until {
                    continue;
                }
                let crash = roll < 75;
                let target = if rng.random_bool(0.5) {
                    Target::Leader
                } else {
                    let free: Vec<u64> = ids
                        .iter()
                        .copied()
                        .filter(|id| !active.contains(&Target::Node(*id)))
                        .collect();
                    if free.is_empty() {
                        continue;
                    }
                    Target::Node(free[rng.random_range(0..free.len())])
                };
                let episode = next_episode;
                next_episode += 1;
                let lasts = pick(
                    &mut rng,
                    if crash {
                        options.crash_for
                    } else {
                        options.pause_for
                    },
                );
                let forever_ok = crash && options.crash_forever && forever < (n as usize - 1) / 2;
                let is_forever = forever_ok && rng.random_bool(0.25);
                let end = if is_forever {
                    forever += 1;
                    None
                } else {
                    Some(t + lasts)
                };
                episodes.push((end, target));
                if let Some(end) = end.filter(|e| *e < options.duration) {
                    steps.push(Step {
                        at: end,
                        action: if crash {
                            Action::Restart { episode }
                        } else {
                            Action::Resume { episode }
                        },
                    });
                }
                if crash {
                    let graceful = rng.random_bool(options.graceful_share.clamp(0.0, 1.0));
                    let lose_unsynced = !graceful
                        && power_rng.random_bool(options.lossy_crash_share.clamp(0.0, 1.0));
                    Action::Crash {
                        episode,
                        target,
                        graceful,
                        forever: is_forever,
                        lose_unsynced,
                    }
                } else {
                    Action::Pause { episode, target }
                }
            } else {
                // Only when no node is down or paused, except for good: all come back together.
                let others_down = episodes.iter().any(|(end, _)| end.is_some_and(|e| e > t));
                if others_down
                    || t < blackout_until
                    || !power_rng.random_bool(options.power_loss_share.clamp(0.0, 1.0))
                {
                    continue;
                }
                let episode = next_episode;
                next_episode += 1;
                blackout_until = t + pick(&mut power_rng, options.crash_for);
                if blackout_until < options.duration {
                    steps.push(Step {
                        at: blackout_until,
                        action: Action::Restart { episode },
                    });
                }
                Action::PowerLoss { episode }
            };
            steps.push(Step { at: t, action });
        }
        steps.push(Step {
            at: options.duration,
            action: Action::HealAll,
        });
        // Stable: a restart scheduled at the same time as a later action stays before it.
        steps.sort_by_key(|s| s.at);
        Self {
            seed,
            nodes: n,
            duration: options.duration,
            steps,
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "schedule of seed {} ({} nodes, {}ms):",
            self.seed,
            self.nodes,
            self.duration.as_millis()
        )?;
        for s in &self.steps {
            writeln!(f, "  {s}")?;
        }
        Ok(())
    }
}

/// How long a power cut waited for unsynced entries, in words.
fn waited_text(waited: Option<Duration>) -> String {
    match waited {
        Some(d) => format!("cut {}ms later, with entries unsynced", d.as_millis()),
        None => format!("no unsynced entries within {UNSYNCED_WAIT_MAX:?}"),
    }
}

/// "node 3", or "nodes [1, 2, 3]".
fn nodes_text(nodes: &[u64]) -> String {
    match nodes {
        [one] => format!("node {one}"),
        many => format!("nodes {many:?}"),
    }
}

/// Carries out a [`Schedule`] on a cluster, in real time, recording every action as a nemesis
/// event. Node-level episodes are resolved when they start ([`Target::Leader`] becomes a node
/// id); an episode whose node is already down is moved to another running node, or skipped.
pub struct Nemesis {
    rng: StdRng,
    /// Episode → the nodes it hit (one, or every node a power loss hit).
    episodes: BTreeMap<u32, Vec<u64>>,
    /// Nodes crashed by an episode that has no restart.
    forever: BTreeSet<u64>,
}

impl Nemesis {
    pub fn new(schedule: &Schedule) -> Self {
        Self {
            rng: StdRng::seed_from_u64(schedule.seed ^ 0x6e65_6d65_7369_7321),
            episodes: BTreeMap::new(),
            forever: BTreeSet::new(),
        }
    }

    /// Nodes crashed forever so far.
    pub fn crashed_forever(&self) -> &BTreeSet<u64> {
        &self.forever
    }

    /// Runs every step at its time (relative to now) and returns when the last one is done.
    pub async fn run(
        &mut self,
        cluster: &mut FaultyCluster,
        schedule: &Schedule,
        recorder: &Recorder,
    ) -> anyhow::Result<()> {
        let start = tokio::time::Instant::now();
        for step in &schedule.steps {
            tokio::time::sleep_until(start + step.at).await;
            // Stamped when the action starts: a crash or restart takes a while.
            let at = now_us();
            let what = self.apply(cluster, &step.action, recorder).await?;
            tracing::info!(seed = schedule.seed, "nemesis: {what}");
            recorder.record(Event::Nemesis {
                at,
                what: format!("{what} (done at {:.3}s)", now_us() as f64 / 1e6),
            });
        }
        Ok(())
    }

    fn resolve(&mut self, cluster: &FaultyCluster, target: Target) -> Option<u64> {
        let busy: BTreeSet<u64> = self.episodes.values().flatten().copied().collect();
        let eligible = |id: u64| cluster.state(id) == NodeState::Running && !busy.contains(&id);
        let wanted = match target {
            Target::Node(id) => Some(id),
            Target::Leader => cluster.leader(),
        };
        if let Some(id) = wanted.filter(|id| eligible(*id)) {
            return Some(id);
        }
        let others: Vec<u64> = cluster
            .ids()
            .into_iter()
            .filter(|id| eligible(*id))
            .collect();
        (!others.is_empty()).then(|| others[self.rng.random_range(0..others.len())])
    }

    /// Carries out one action; returns what was done, in words.
    pub async fn apply(
        &mut self,
        cluster: &mut FaultyCluster,
        action: &Action,
        recorder: &Recorder,
    ) -> anyhow::Result<String> {
        let ids = cluster.ids();
        Ok(match action {
            Action::Net(net) => {
                let faults = cluster.faults().clone();
                faults.heal();
                // Without a known leader (mid-election), a leader fault hits a random node.
                let leader = cluster.leader().or_else(|| {
                    let up: Vec<u64> = ids
                        .iter()
                        .copied()
                        .filter(|&id| cluster.state(id) == NodeState::Running)
                        .collect();
                    (!up.is_empty()).then(|| up[self.rng.random_range(0..up.len())])
                });
                match net {
                    NetFault::Partition { side } => {
                        let rest: Vec<u64> =
                            ids.iter().copied().filter(|i| !side.contains(i)).collect();
                        faults.partition(side, &rest);
                    }
                    NetFault::IsolateLeader => {
                        if let Some(l) = leader {
                            faults.isolate(l, &ids);
                        }
                    }
                    NetFault::OneWay { from, to } => faults.cut_one_way(*from, *to),
                    NetFault::LeaderOneWay { inbound } => {
                        if let Some(l) = leader {
                            for &other in ids.iter().filter(|&&i| i != l) {
                                if *inbound {
                                    faults.cut_one_way(other, l);
                                } else {
                                    faults.cut_one_way(l, other);
                                }
                            }
                        }
                    }
                    NetFault::Lossy { p } => {
                        for &a in &ids {
                            for &b in &ids {
                                faults.lossy(a, b, *p);
                            }
                        }
                    }
                    NetFault::Slow { min, max } => {
                        for &a in &ids {
                            for &b in &ids {
                                faults.delay(a, b, *min, *max);
                            }
                        }
                    }
                }
                format!("net {net:?} (leader {leader:?}): {}", faults.describe())
            }
            Action::HealNet => {
                cluster.faults().heal();
                "heal links".into()
            }
            Action::Crash {
                episode,
                target,
                graceful,
                forever,
                lose_unsynced,
            } => match self.resolve(cluster, *target) {
                Some(id) => {
                    let mut lost = String::new();
                    if *graceful {
                        cluster.stop(id).await?;
                    } else if *lose_unsynced {
                        let waited = cluster
                            .await_unsynced_entries(&[id], 1, UNSYNCED_WAIT_MAX)
                            .await;
                        let loss = cluster.crash_losing_unsynced(id).await?;
                        lost = format!(": {}, lost {}", waited_text(waited), loss.lost);
                        recorder.record(Event::PowerLoss(Box::new(loss)));
                    } else {
                        cluster.crash(id).await?;
                    }
                    self.episodes.insert(*episode, vec![id]);
                    if *forever {
                        self.forever.insert(id);
                    }
                    let how = match (graceful, lose_unsynced) {
                        (true, _) => "stop",
                        (false, true) => "crash (losing unsynced writes)",
                        (false, false) => "crash",
                    };
                    let forever = if *forever { " forever" } else { "" };
                    format!("{how} node {id}{forever} ({target}, #{episode}){lost}")
                }
                None => format!("crash {target} skipped: no eligible node (#{episode})"),
            },
            Action::PowerLoss { episode } => {
                let up: Vec<u64> = ids
                    .iter()
                    .copied()
                    .filter(|&id| cluster.state(id) != NodeState::Crashed)
                    .collect();
                // A paused node loses power too: its pause ends with it.
                let paused: Vec<u64> = up
                    .iter()
                    .copied()
                    .filter(|&id| cluster.state(id) == NodeState::Paused)
                    .collect();
                self.episodes
                    .retain(|_, nodes| !nodes.iter().any(|id| paused.contains(id)));
                // A quorum losing its unsynced suffix at once is what an early acknowledgement
                // cannot survive.
                let majority = (ids.len() / 2 + 1).min(up.len());
                let waited = cluster
                    .await_unsynced_entries(&up, majority, UNSYNCED_WAIT_MAX)
                    .await;
                let losses = cluster.power_loss(&up).await?;
                let at = now_us();
                for node in paused {
                    recorder.record(Event::Resumed { node, at });
                }
                let what: Vec<String> = losses
                    .iter()
                    .map(|l| format!("node {} lost {}", l.node, l.lost))
                    .collect();
                for loss in losses {
                    recorder.record(Event::PowerLoss(Box::new(loss)));
                }
                self.episodes.insert(*episode, up);
                format!(
                    "power loss (#{episode}, {}): {}",
                    waited_text(waited),
                    what.join("; ")
                )
            }
            Action::Restart { episode } => match self.episodes.remove(episode) {
                Some(nodes) => {
                    for &id in &nodes {
                        cluster.restart(id).await?;
                    }
                    format!("restart {} (#{episode})", nodes_text(&nodes))
                }
                None => format!("restart skipped (#{episode})"),
            },
            Action::Pause { episode, target } => match self.resolve(cluster, *target) {
                Some(id) => {
                    recorder.record(Event::Paused {
                        node: id,
                        at: now_us(),
                    });
                    cluster.pause(id).await;
                    self.episodes.insert(*episode, vec![id]);
                    format!("pause node {id} ({target}, #{episode})")
                }
                None => format!("pause {target} skipped: no eligible node (#{episode})"),
            },
            Action::Resume { episode } => match self.episodes.remove(episode) {
                Some(nodes) => {
                    for &id in &nodes {
                        cluster.resume(id);
                        recorder.record(Event::Resumed {
                            node: id,
                            at: now_us(),
                        });
                    }
                    format!("resume {} (#{episode})", nodes_text(&nodes))
                }
                None => format!("resume skipped (#{episode})"),
            },
            Action::HealAll => {
                let keep_down = self.forever.clone();
                self.episodes
                    .retain(|_, nodes| nodes.iter().all(|id| keep_down.contains(id)));
                let paused: Vec<u64> = cluster
                    .ids()
                    .into_iter()
                    .filter(|&id| cluster.state(id) == NodeState::Paused)
                    .collect();
                cluster.heal_all(&keep_down).await?;
                for node in paused {
                    recorder.record(Event::Resumed { node, at: now_us() });
                }
                format!("heal all (crashed forever: {keep_down:?})")
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same seed gives the same schedule; different seeds differ; every schedule ends with
    /// HealAll, every crash and pause is ended by its restart or resume or by that HealAll, and
    /// no more node-level episodes overlap than allowed.
    #[test]
    fn schedules_are_deterministic_and_end_healed() {
        let options = ScheduleOptions::short(3);
        assert_eq!(
            Schedule::generate(5, &options),
            Schedule::generate(5, &options)
        );
        assert_ne!(
            Schedule::generate(5, &options),
            Schedule::generate(6, &options)
        );
        let mut kinds = std::collections::HashSet::new();
        for seed in 0..200 {
            let s = Schedule::generate(seed, &options);
            assert_eq!(s.steps.last().map(|s| &s.action), Some(&Action::HealAll));
            assert!(s.steps.windows(2).all(|w| w[0].at <= w[1].at));
            assert!(s.steps.iter().all(|s| s.at <= options.duration));
            let mut open = BTreeSet::new();
            for step in &s.steps {
                kinds.insert(std::mem::discriminant(&step.action));
                match step.action {
                    Action::Crash { episode, .. }
                    | Action::Pause { episode, .. }
                    | Action::PowerLoss { episode } => {
                        open.insert(episode);
                        assert!(open.len() <= options.down_max, "seed {seed}: {s}");
                    }
                    Action::Restart { episode } | Action::Resume { episode } => {
                        assert!(open.remove(&episode), "seed {seed}: {s}");
                    }
                    _ => {}
                }
            }
        }
        assert_eq!(
            kinds.len(),
            8,
            "every kind of action appears in 200 schedules"
        );
    }

    /// Power faults come at the configured rates, never lose unsynced writes in a graceful
    /// stop, start a power loss only while no node is down but for good, and leave the
    /// schedule of a seed without power faults as it was without them (their draws come from
    /// a generator of their own).
    #[test]
    fn power_faults_come_at_a_reasonable_rate() {
        let options = ScheduleOptions::short(3);
        let without = ScheduleOptions {
            lossy_crash_share: 0.0,
            power_loss_share: 0.0,
            ..options.clone()
        };
        let (mut kills, mut lossy, mut with_power_loss, mut unchanged) = (0, 0, 0, 0);
        for seed in 1..=50 {
            let s = Schedule::generate(seed, &options);
            let mut power_losses = 0;
            for step in &s.steps {
                match step.action {
                    Action::Crash {
                        graceful,
                        lose_unsynced,
                        ..
                    } => {
                        assert!(!(graceful && lose_unsynced), "seed {seed}: {s}");
                        kills += usize::from(!graceful);
                        lossy += usize::from(lose_unsynced);
                    }
                    Action::PowerLoss { .. } => power_losses += 1,
                    _ => {}
                }
            }
            with_power_loss += usize::from(power_losses > 0);
            // Without power faults the same seed gives the same steps, less the lossy flags.
            let plain = Schedule::generate(seed, &without);
            if power_losses == 0 {
                let strip = |s: &Schedule| -> Vec<Step> {
                    let mut steps = s.steps.clone();
                    for step in &mut steps {
                        if let Action::Crash { lose_unsynced, .. } = &mut step.action {
                            *lose_unsynced = false;
                        }
                    }
                    steps
                };
                assert_eq!(strip(&s), plain.steps, "seed {seed}");
                unchanged += 1;
            }
        }
        // Half the kills lose unsynced writes; between a fifth and a half of the schedules
        // have a power loss.
        assert!(
            lossy * 4 >= kills && lossy * 4 <= kills * 3,
            "{lossy} of {kills}"
        );
        assert!(
            (10..=25).contains(&with_power_loss),
            "{with_power_loss} of 50 schedules have a power loss"
        );
        assert_eq!(unchanged, 50 - with_power_loss);
    }

    /// With `crash_forever`, some crashes have no restart, never more than a minority.
    #[test]
    fn crash_forever_leaves_a_minority_down() {
        let options = ScheduleOptions {
            crash_forever: true,
            ..ScheduleOptions::long(5)
        };
        let mut seen = false;
        for seed in 0..200 {
            let s = Schedule::generate(seed, &options);
            let forever_episodes: BTreeSet<u32> = s
                .steps
                .iter()
                .filter_map(|s| match s.action {
                    Action::Crash {
                        episode,
                        forever: true,
                        ..
                    } => Some(episode),
                    _ => None,
                })
                .collect();
            for step in &s.steps {
                if let Action::Restart { episode } = step.action {
                    assert!(!forever_episodes.contains(&episode), "seed {seed}: {s}");
                }
            }
            let forever = forever_episodes.len();
            assert!(forever <= 2, "seed {seed}: {s}");
            seen |= forever > 0;
        }
        assert!(seen);
    }
}
