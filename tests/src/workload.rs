//! The client side of a chaos run, and the run itself.
//!
//! [`run_workload`] submits batches of [`RecordingHandler`](crate::history::RecordingHandler)
//! jobs to random nodes while the nemesis works, recording each submit's outcome in Jepsen's
//! terms: ok, failed (definitely not applied) or unknown. [`run_chaos`] puts it all together for
//! one seed: start a [`FaultyCluster`], run the workload and the [`Schedule`] side by side, heal,
//! check that a write still goes through, wait for the jobs to settle, take every node's final
//! state, and [`check`] the history.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use exactly_handlers::Registry;
use exactly_node::config::{LeaseConfig, LEASE_CHECK_INTERVAL};
use exactly_node::NodeConfig;
use exactly_proto::v1 as pb;
use exactly_store::TableStorage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::{Channel, Endpoint};

use crate::disk::DiskOptions;
use crate::faults::FaultController;
use crate::harness::{FaultyCluster, Nemesis, Schedule, ScheduleOptions};
use crate::history::{
    check, now_us, payload, queue_of, Event, History, JobKey, Recorder, RecordingHandler, Report,
    RunPlan, SubmitOp, SubmitOutcome, RECORD_KIND,
};

/// What the clients do during a chaos run.
#[derive(Clone, Debug)]
pub struct WorkloadOptions {
    /// Time between two submits, drawn uniformly from this range.
    pub gap: (Duration, Duration),
    /// Jobs per submit, drawn uniformly from this range.
    pub batch: (u32, u32),
    /// How long each job's handler runs, drawn uniformly from this range.
    pub run_for: (Duration, Duration),
    /// The share of jobs (0.0..=1.0) whose first attempt outruns the job's timeout, so that the
    /// executor cancels it (a fencing event) and a retry with a new token succeeds.
    pub timeout_share: f64,
    /// The timeout of those jobs.
    pub timeout: Duration,
    /// How long a client waits for one submit before calling its outcome unknown.
    pub client_timeout: Duration,
    /// `max_attempts` of every job: cancellations (fencing) count as failures.
    pub max_attempts: u32,
}

impl Default for WorkloadOptions {
    fn default() -> Self {
        Self {
            gap: (Duration::from_millis(40), Duration::from_millis(120)),
            batch: (1, 12),
            run_for: (Duration::from_millis(10), Duration::from_millis(400)),
            timeout_share: 0.03,
            timeout: Duration::from_millis(300),
            client_timeout: Duration::from_secs(5),
            max_attempts: 10,
        }
    }
}

/// Whether a gRPC error means the request definitely did not take effect.
///
/// Failed: a status the node itself sent meaning "nothing was proposed" (UNAVAILABLE from the
/// API: no leader or no quorum; INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...), or a connection that
/// was refused before anything was sent. Everything else — timeouts, DEADLINE_EXCEEDED, UNKNOWN,
/// INTERNAL, CANCELLED, a transport error after the request left (even if tonic calls it
/// UNAVAILABLE) — is unknown.
pub fn classify(status: &tonic::Status) -> SubmitOutcome {
    use std::error::Error as _;
    use tonic::Code;
    let text = format!("{:?}: {}", status.code(), status.message());
    let mut source = status.source();
    let from_transport = source.is_some();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return SubmitOutcome::Failed(format!("{text} (connection refused)"));
            }
        }
        source = e.source();
    }
    match status.code() {
        Code::Unavailable if !from_transport => SubmitOutcome::Failed(text),
        Code::InvalidArgument
        | Code::ResourceExhausted
        | Code::FailedPrecondition
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::Unimplemented
        | Code::OutOfRange
            if !from_transport =>
        {
            SubmitOutcome::Failed(text)
        }
        _ => SubmitOutcome::Unknown(text),
    }
}

/// A lazily connected client for a node address.
pub fn client(addr: &str) -> anyhow::Result<pb::jobs_client::JobsClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_millis(500))
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(pb::jobs_client::JobsClient::new(channel))
}

/// One job of a submit: how it runs, and its timeout (0: the node's default).
#[derive(Clone, Copy, Debug)]
pub struct JobPlan {
    pub run: RunPlan,
    pub timeout: Duration,
}

/// Submits one batch (one job per plan) to `node` and records the operation.
pub async fn submit_once(
    recorder: &Recorder,
    client: &mut pb::jobs_client::JobsClient<Channel>,
    node: u64,
    plans: &[JobPlan],
    options: &WorkloadOptions,
) -> SubmitOutcome {
    let op = recorder.next_op();
    let jobs: Vec<pb::JobSpec> = plans
        .iter()
        .enumerate()
        .map(|(i, plan)| pb::JobSpec {
            queue: queue_of(op),
            kind: RECORD_KIND.to_string(),
            payload: payload(
                JobKey {
                    op,
                    index: i as u32,
                },
                plan.run,
            ),
            max_attempts: options.max_attempts,
            timeout_ms: plan.timeout.as_millis() as u64,
            ..Default::default()
        })
        .collect();
    let mut request = tonic::Request::new(pb::SubmitRequest { jobs });
    request.set_timeout(options.client_timeout);
    let invoked_at = now_us();
    let outcome = match tokio::time::timeout(options.client_timeout, client.submit(request)).await {
        Ok(Ok(reply)) => SubmitOutcome::Ok(reply.into_inner().job_ids),
        Ok(Err(status)) => classify(&status),
        Err(_) => SubmitOutcome::Unknown(format!("no answer within {:?}", options.client_timeout)),
    };
    recorder.record(Event::Submit(SubmitOp {
        op,
        node,
        jobs: plans.len() as u32,
        invoked_at,
        completed_at: now_us(),
        outcome: outcome.clone(),
    }));
    outcome
}

fn pick(rng: &mut StdRng, (min, max): (Duration, Duration)) -> Duration {
    if max <= min {
        min
    } else {
        rng.random_range(min..=max)
    }
}

/// Submits batches to random nodes until `until`, each in its own task (a submit to a paused
/// node hangs without holding up the others), then waits for every outstanding submit.
pub async fn run_workload(
    endpoints: Vec<(u64, String)>,
    recorder: Arc<Recorder>,
    seed: u64,
    until: tokio::time::Instant,
    options: WorkloadOptions,
) -> anyhow::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x776f_726b_6c6f_6164);
    let clients = endpoints
        .iter()
        .map(|(id, addr)| Ok((*id, client(addr)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut tasks = Vec::new();
    while tokio::time::Instant::now() < until {
        let (node, mut client) = clients[rng.random_range(0..clients.len())].clone();
        let size = rng.random_range(options.batch.0..=options.batch.1.max(options.batch.0));
        let plans: Vec<JobPlan> = (0..size)
            .map(|_| {
                let run = pick(&mut rng, options.run_for);
                if rng.random_bool(options.timeout_share.clamp(0.0, 1.0)) {
                    JobPlan {
                        run: RunPlan {
                            first: options.timeout * 3,
                            then: run.min(options.timeout / 3),
                        },
                        timeout: options.timeout,
                    }
                } else {
                    JobPlan {
                        run: RunPlan::fixed(run),
                        timeout: Duration::ZERO,
                    }
                }
            })
            .collect();
        let recorder = recorder.clone();
        let task_options = options.clone();
        tasks.push(tokio::spawn(async move {
            submit_once(&recorder, &mut client, node, &plans, &task_options).await;
        }));
        tokio::time::sleep(pick(&mut rng, options.gap)).await;
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}

/// After healing, submits one small batch, trying each node in turn until one acknowledges it
/// (every try is recorded). Fails if none does within `limit`: the healed cluster takes no
/// writes.
pub async fn submit_until_ok(
    endpoints: &[(u64, String)],
    recorder: &Recorder,
    limit: Duration,
    options: &WorkloadOptions,
) -> anyhow::Result<Duration> {
    let started = tokio::time::Instant::now();
    let mut i = 0usize;
    loop {
        let (node, addr) = &endpoints[i % endpoints.len()];
        i += 1;
        let mut c = client(addr)?;
        let plans = [JobPlan {
            run: RunPlan::fixed(Duration::from_millis(10)),
            timeout: Duration::ZERO,
        }; 3];
        let outcome = submit_once(recorder, &mut c, *node, &plans, options).await;
        if matches!(outcome, SubmitOutcome::Ok(_)) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            anyhow::bail!("no node acknowledged a submit within {limit:?} of healing: {outcome:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Everything a chaos run is parameterized by.
#[derive(Clone, Debug)]
pub struct ChaosOptions {
    pub schedule: ScheduleOptions,
    pub workload: WorkloadOptions,
    /// After healing: how long until every job must be terminal on every node (liveness).
    pub settle_max: Duration,
    /// `raft.snapshot-after-entries` by seed (`seed % len`): small values make nodes snapshot,
    /// purge their logs and send whole snapshots to nodes that fell behind (crashed, paused,
    /// partitioned), so the snapshot paths run under faults too.
    pub snapshot_after: Vec<u64>,
    /// `slots` of every node by seed (`(seed / 3) % len`): few slots keep jobs pending behind
    /// running ones, so assignments are refused for want of a slot and retried.
    pub slots: Vec<u32>,
    /// Lease timing of every node: tight, so that leases lapse, nodes fence themselves and the
    /// leader expires and reassigns within a schedule.
    pub lease: LeaseConfig,
    /// Every node's disk: slow enough that a crash losing unsynced writes finds some.
    pub disk: DiskOptions,
    /// `table-storage` of every node by seed (`seed % len`): the job table in memory or on
    /// disk, so both run under every kind of fault.
    pub table_storage: Vec<TableStorage>,
}

impl ChaosOptions {
    /// How long after waking from a pause an execution may still run (see
    /// [`History::resume_grace`]): the executor's lease check interval, the kill grace, and
    /// half a second for a busy machine to schedule the node's thread.
    pub fn resume_grace(&self) -> Duration {
        LEASE_CHECK_INTERVAL + self.lease.kill_grace + Duration::from_millis(500)
    }
}

impl ChaosOptions {
    /// What `cargo test` runs: 3 nodes, 5-second schedules, leases that lapse within 2.5 s.
    pub fn short() -> Self {
        Self {
            schedule: ScheduleOptions::short(3),
            workload: WorkloadOptions::default(),
            settle_max: Duration::from_secs(30),
            snapshot_after: vec![20_000, 200, 40],
            slots: vec![256, 4],
            // (1 s + 0.1 s + 0.3 s) × 1.1² = 1.69 s < 2.5 s. Tighter timings make a machine
            // busy with other work (a build) fence nodes for want of CPU.
            lease: LeaseConfig {
                renew_interval: Duration::from_millis(200),
                self_fence_after: Duration::from_secs(1),
                kill_grace: Duration::from_millis(300),
                expire_after: Duration::from_millis(2500),
                ..LeaseConfig::default()
            },
            disk: DiskOptions {
                append_sync_delay: APPEND_SYNC_DELAY,
                acknowledge_before_sync: false,
            },
            table_storage: vec![TableStorage::Memory, TableStorage::Disk],
        }
    }

    /// The `EXACTLY_LONG` sweep: 5 nodes, 15-second schedules, leases that lapse within 3 s.
    pub fn long() -> Self {
        Self {
            schedule: ScheduleOptions::long(5),
            workload: WorkloadOptions::default(),
            settle_max: Duration::from_secs(30),
            snapshot_after: vec![20_000, 500, 60],
            slots: vec![256, 8],
            // (1 s + 0.1 s + 0.5 s) × 1.1² = 1.94 s < 3 s.
            lease: LeaseConfig {
                renew_interval: Duration::from_millis(250),
                self_fence_after: Duration::from_secs(1),
                kill_grace: Duration::from_millis(500),
                expire_after: Duration::from_secs(3),
                ..LeaseConfig::default()
            },
            disk: DiskOptions {
                append_sync_delay: APPEND_SYNC_DELAY,
                acknowledge_before_sync: false,
            },
            table_storage: vec![TableStorage::Memory, TableStorage::Disk],
        }
    }
}

/// How long every append of a chaos node waits for its fsync (a slow disk): long enough that
/// the nemesis, which cuts the power while a node holds unsynced entries if that happens within
/// [`UNSYNCED_WAIT_MAX`](crate::harness::UNSYNCED_WAIT_MAX), finds such windows, and short
/// enough to keep the sweep's pace (a commit waits for two: the leader's, then a follower's;
/// 20 ms made jobs on 4-slot nodes settle 1.5 to 3 times slower).
pub const APPEND_SYNC_DELAY: Duration = Duration::from_millis(5);

/// The result of one seed.
pub struct ChaosOutcome {
    pub seed: u64,
    /// `raft.snapshot-after-entries` of this run, if set.
    pub snapshot_after: Option<u64>,
    /// `slots` of every node in this run, if set.
    pub slots: Option<u32>,
    /// `table-storage` of every node in this run, if set.
    pub table_storage: Option<TableStorage>,
    pub schedule: Schedule,
    pub report: Report,
    /// Wall time of the whole run (start-up to shutdown).
    pub took: Duration,
    /// From healing to the first acknowledged submit.
    pub write_after_heal: Option<Duration>,
    /// A harness-level failure (a node that would not restart, no write after healing, ...).
    pub harness_error: Option<String>,
}

impl ChaosOutcome {
    /// Clean: no anomaly and no harness error.
    pub fn passed(&self) -> bool {
        self.report.is_clean() && self.harness_error.is_none()
    }
}

impl std::fmt::Display for ChaosOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} ({}, {:.1}s{}{}{}{}): ",
            self.seed,
            if self.passed() { "ok" } else { "FAILED" },
            self.took.as_secs_f64(),
            self.snapshot_after
                .map(|n| format!(", snapshot every {n} entries"))
                .unwrap_or_default(),
            self.slots
                .map(|n| format!(", {n} slots"))
                .unwrap_or_default(),
            self.table_storage
                .map(|t| format!(", table on {t:?}"))
                .unwrap_or_default(),
            self.write_after_heal
                .map(|d| format!(", write {}ms after heal", d.as_millis()))
                .unwrap_or_default(),
        )?;
        if f.alternate() {
            write!(f, "{:#}", self.report)?;
        } else {
            write!(f, "{}", self.report)?;
        }
        if let Some(e) = &self.harness_error {
            writeln!(f, "  harness: {e}")?;
        }
        // `{:#}` shows the schedule and the nemesis timeline of a passing run too.
        if !self.passed() || f.alternate() {
            write!(f, "{}", self.schedule)?;
        }
        if self.passed() && f.alternate() {
            writeln!(f, "nemesis timeline:")?;
            for (at, what) in &self.report.timeline {
                writeln!(f, "  {:.3}s {what}", *at as f64 / 1e6)?;
            }
        }
        Ok(())
    }
}

/// The registry of every chaos node: the built-ins and the recording handler.
pub fn registry(recorder: &Arc<Recorder>) -> Registry {
    let mut r = Registry::with_builtins();
    r.register(
        RECORD_KIND,
        Arc::new(RecordingHandler {
            recorder: recorder.clone(),
            default_run: Duration::from_millis(50),
        }),
    );
    r
}

/// Runs one seed end to end and checks its history. `tweak` adjusts every node's configuration.
pub async fn run_chaos(
    seed: u64,
    options: &ChaosOptions,
    tweak: impl Fn(&mut NodeConfig),
) -> anyhow::Result<ChaosOutcome> {
    run_schedule(Schedule::generate(seed, &options.schedule), options, tweak).await
}

/// Runs `schedule` (generated from its seed, or written by hand) end to end with the workload
/// of its seed, and checks the history. `options.schedule` is not consulted.
pub async fn run_schedule(
    schedule: Schedule,
    options: &ChaosOptions,
    tweak: impl Fn(&mut NodeConfig),
) -> anyhow::Result<ChaosOutcome> {
    let started = Instant::now();
    let recorder = Recorder::new();
    let seed = schedule.seed;
    let faults = FaultController::new(seed ^ 0x6661_756c_7473);
    let snapshot_after = (!options.snapshot_after.is_empty())
        .then(|| options.snapshot_after[(seed % options.snapshot_after.len() as u64) as usize]);
    let slots = (!options.slots.is_empty())
        .then(|| options.slots[((seed / 3) % options.slots.len() as u64) as usize]);
    let table_storage = (!options.table_storage.is_empty())
        .then(|| options.table_storage[(seed % options.table_storage.len() as u64) as usize]);
    let configure = |c: &mut NodeConfig| {
        c.lease = options.lease.clone();
        if let Some(storage) = table_storage {
            c.table_storage = storage;
        }
        if let Some(slots) = slots {
            c.slots = slots;
        }
        if let Some(after) = snapshot_after {
            c.raft.snapshot_after_entries = after;
            c.raft.keep_entries_after_snapshot = (after / 4).max(1);
        }
        tweak(c);
    };
    let mut cluster = FaultyCluster::start_on_disks(
        schedule.nodes,
        faults,
        registry(&recorder),
        options.disk.clone(),
        configure,
    )
    .await?;
    let endpoints = cluster.endpoints();

    let until = tokio::time::Instant::now() + schedule.duration;
    let workload = tokio::spawn(run_workload(
        endpoints.clone(),
        recorder.clone(),
        seed,
        until,
        options.workload.clone(),
    ));
    let mut nemesis = Nemesis::new(&schedule);
    let mut harness_error = nemesis
        .run(&mut cluster, &schedule, &recorder)
        .await
        .err()
        .map(|e| format!("nemesis: {e:#}"));
    if harness_error.is_some() {
        // Bring back whatever can come back so the history still ends healed.
        let _ = cluster.heal_all(nemesis.crashed_forever()).await;
    }
    let healed_at = now_us();
    let healed = tokio::time::Instant::now();
    workload.await??;

    let write_after_heal =
        match submit_until_ok(&endpoints, &recorder, options.settle_max, &options.workload).await {
            Ok(_) => Some(healed.elapsed()),
            Err(e) => {
                harness_error.get_or_insert(format!("{e:#}"));
                None
            }
        };
    let acked: BTreeSet<u64> = recorder
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::Submit(SubmitOp {
                outcome: SubmitOutcome::Ok(ids),
                ..
            }) => Some(ids.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    let remaining = options.settle_max.saturating_sub(healed.elapsed());
    let (finals, _settled) = cluster.settle(remaining, &acked).await;
    let settled_at = now_us();
    cluster.shutdown().await;

    let history = History {
        events: recorder.events(),
        finals,
        healed_at: Some(healed_at),
        settled_at: Some(settled_at),
        resume_grace: options.resume_grace(),
    };
    let report = check(&history);
    Ok(ChaosOutcome {
        seed,
        snapshot_after,
        slots,
        table_storage,
        schedule,
        report,
        took: started.elapsed(),
        write_after_heal,
        harness_error,
    })
}

/// A hand-written fault scenario: a cluster with the chaos configuration and a recorder, steps
/// driven by the test, and the same checker at the end.
pub struct Scenario {
    pub cluster: FaultyCluster,
    pub recorder: Arc<Recorder>,
    pub options: ChaosOptions,
    healed_at: Option<crate::history::Micros>,
}

impl Scenario {
    /// Starts `nodes` nodes with `options`' lease timing and the recording handler.
    pub async fn start(nodes: u64, options: ChaosOptions) -> anyhow::Result<Self> {
        Self::start_with(nodes, options, |_| {}).await
    }

    /// [`Scenario::start`], with `tweak` applied to every node's configuration after the lease.
    pub async fn start_with(
        nodes: u64,
        options: ChaosOptions,
        tweak: impl Fn(&mut NodeConfig),
    ) -> anyhow::Result<Self> {
        let recorder = Recorder::new();
        let lease = options.lease.clone();
        let cluster = FaultyCluster::start_on_disks(
            nodes,
            FaultController::new(nodes),
            registry(&recorder),
            options.disk.clone(),
            |c| {
                c.lease = lease.clone();
                tweak(c);
            },
        )
        .await?;
        Ok(Self {
            cluster,
            recorder,
            options,
            healed_at: None,
        })
    }

    /// The current leader, waiting up to 10 s for one.
    pub async fn leader(&self) -> anyhow::Result<u64> {
        crate::wait_for(Duration::from_secs(10), || self.cluster.leader().is_some()).await?;
        self.cluster
            .leader()
            .ok_or_else(|| anyhow::anyhow!("no leader"))
    }

    /// Submits one batch to `node` (recorded like the workload's submits).
    pub async fn submit(&self, node: u64, plans: &[JobPlan]) -> anyhow::Result<SubmitOutcome> {
        let addr = self
            .cluster
            .endpoints()
            .into_iter()
            .find(|(id, _)| *id == node)
            .map(|(_, a)| a)
            .ok_or_else(|| anyhow::anyhow!("no node {node}"))?;
        Ok(submit_once(
            &self.recorder,
            &mut client(&addr)?,
            node,
            plans,
            &self.options.workload,
        )
        .await)
    }

    /// The open attempt of `job` as some running node sees it: (node, token).
    pub fn running(&self, job: u64) -> Option<(u64, u64)> {
        self.cluster
            .hosts()
            .filter(|h| !h.is_paused())
            .find_map(|h| {
                h.node().read(|t| {
                    t.job(job)
                        .and_then(|j| j.current_attempt().map(|a| (a.node, a.token)))
                })
            })
    }

    /// Whether the handler of `job`'s attempt `token` has started (on any node).
    pub fn started(&self, job: u64, token: u64) -> bool {
        self.recorder.events().iter().any(
            |e| matches!(e, Event::ExecStart { job: j, token: t, .. } if *j == job && *t == token),
        )
    }

    /// Whether some running node shows `job` succeeded.
    pub fn succeeded(&self, job: u64) -> bool {
        self.cluster.hosts().filter(|h| !h.is_paused()).any(|h| {
            h.node().read_view(|t| {
                t.job(job)
                    .is_some_and(|j| j.status == exactly_core::JobStatus::Succeeded)
            })
        })
    }

    /// Pauses `node`, recording it for the checker.
    pub async fn pause(&mut self, node: u64) {
        self.recorder.record(Event::Paused { node, at: now_us() });
        self.recorder.nemesis(format!("pause node {node}"));
        self.cluster.pause(node).await;
    }

    /// Resumes `node`, recording it for the checker.
    pub fn resume(&mut self, node: u64) {
        self.cluster.resume(node);
        self.recorder.record(Event::Resumed { node, at: now_us() });
        self.recorder.nemesis(format!("resume node {node}"));
    }

    /// Records the moment every fault is healed (for the settle time in the report).
    pub fn healed(&mut self) {
        self.recorder.nemesis("healed");
        self.healed_at = Some(now_us());
    }

    /// Waits (at most `limit`) for every acknowledged job to finish on every running node,
    /// takes the final states, stops the cluster and checks the history.
    pub async fn finish(self, limit: Duration) -> Report {
        let acked: BTreeSet<u64> = self
            .recorder
            .events()
            .iter()
            .filter_map(|e| match e {
                Event::Submit(SubmitOp {
                    outcome: SubmitOutcome::Ok(ids),
                    ..
                }) => Some(ids.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        let (finals, _) = self.cluster.settle(limit, &acked).await;
        let settled_at = now_us();
        self.cluster.shutdown().await;
        check(&History {
            events: self.recorder.events(),
            finals,
            healed_at: self.healed_at,
            settled_at: Some(settled_at),
            resume_grace: self.options.resume_grace(),
        })
    }
}
