//! Figures for scaling with a large state: how long a new node takes to join and run its first
//! job when the cluster holds many finished jobs, how big a snapshot of many finished jobs is
//! and how long it takes to build and to install on a new node, and how long a node with that
//! state takes from restart to ready (`/readyz`).
//!
//! By default the state is small (a few thousand jobs) so that `cargo test` checks the paths
//! (snapshot install, restart, readiness) in seconds. `EXACTLY_SLOW_TESTS=1` uses 100,000 jobs
//! for the join and 1,000,000 for the snapshot (`EXACTLY_SCALE_JOBS=<n>` overrides both), and
//! prints the figures; run it in release for figures worth quoting:
//!
//! ```sh
//! EXACTLY_SLOW_TESTS=1 cargo test --release -p exactly-tests --test scale -- --nocapture --test-threads 1
//! ```

use openraft::async_runtime::WatchReceiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use exactly_handlers::Registry;
use exactly_node::{Node, NodeConfig};
use exactly_proto::v1 as pb;
use exactly_tests::faults::FaultController;
use exactly_tests::harness::FaultyCluster;
use exactly_tests::{wait_for, Ledger, LedgerHandler, LEDGER_KIND};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error,openraft=off".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Jobs per submit (the API's limit).
const BATCH: usize = 1_000;
/// Submits in flight at once while loading the state.
const SUBMITTERS: usize = 4;

fn slow() -> bool {
    std::env::var_os("EXACTLY_SLOW_TESTS").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Jobs to load: `EXACTLY_SCALE_JOBS`, else `big` with `EXACTLY_SLOW_TESTS`, else `small`.
fn jobs(small: usize, big: usize) -> usize {
    match std::env::var("EXACTLY_SCALE_JOBS") {
        Ok(n) => n.parse().expect("EXACTLY_SCALE_JOBS must be a number"),
        Err(_) if slow() => big,
        Err(_) => small,
    }
}

fn registry(ledger: &Arc<Ledger>) -> Registry {
    let mut r = Registry::with_builtins();
    r.register(LEDGER_KIND, Arc::new(LedgerHandler(ledger.clone())));
    r
}

/// Bulk nodes: many slots, room for a million live jobs, fast elections.
fn configure(c: &mut NodeConfig, snapshot_after_entries: u64) {
    c.slots = 1024;
    c.limits.jobs_live_max = 4_000_000;
    c.limits.propose_timeout = Duration::from_secs(10);
    c.raft.snapshot_after_entries = snapshot_after_entries;
    c.raft.keep_entries_after_snapshot = 100;
}

/// This process's resident memory in MiB (every node of the cluster runs in it).
fn rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

async fn jobs_client(
    cluster: &FaultyCluster,
    id: u64,
) -> anyhow::Result<pb::jobs_client::JobsClient<tonic::transport::Channel>> {
    let addr = cluster
        .endpoints()
        .into_iter()
        .find(|(n, _)| *n == id)
        .map(|(_, a)| a)
        .ok_or_else(|| anyhow::anyhow!("no node {id}"))?;
    Ok(
        pb::jobs_client::JobsClient::connect(format!("http://{addr}"))
            .await?
            .max_decoding_message_size(64 * 1024 * 1024),
    )
}

/// Submits `n` no-op jobs to `via` and waits until `node` shows them all succeeded; returns the
/// time it took.
async fn load(cluster: &FaultyCluster, via: u64, n: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let node = cluster.node(via).unwrap().clone();
    let before = node.read(|t| t.counts().succeeded);
    let batches = n.div_ceil(BATCH);
    let mut tasks = Vec::new();
    for s in 0..SUBMITTERS {
        let mut client = jobs_client(cluster, via).await?;
        let mine: Vec<usize> = (s..batches).step_by(SUBMITTERS).collect();
        tasks.push(tokio::spawn(async move {
            for b in mine {
                let size = BATCH.min(n - b * BATCH);
                let jobs = vec![
                    pb::JobSpec {
                        kind: "noop".into(),
                        ..Default::default()
                    };
                    size
                ];
                let mut tries = 0;
                loop {
                    match client
                        .submit(pb::SubmitRequest { jobs: jobs.clone() })
                        .await
                    {
                        Ok(_) => break,
                        // Only "nothing was applied" answers are retried: the count must be exact.
                        // RESOURCE_EXHAUSTED is admission control's refusal, which proposed
                        // nothing (README "Overload"); a real client backs off and retries it too.
                        Err(s)
                            if matches!(
                                s.code(),
                                tonic::Code::Unavailable | tonic::Code::ResourceExhausted
                            ) && tries < 20 =>
                        {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(s) => return Err(anyhow::anyhow!("submit failed: {s}")),
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let want = before + n as u64;
    wait_for(Duration::from_secs(1800), || {
        node.read(|t| t.counts().succeeded) >= want
    })
    .await?;
    Ok(started.elapsed())
}

/// Waits until `node` is ready (what `/readyz` checks) and returns when it became so.
async fn wait_ready(node: &Node, limit: Duration) -> anyhow::Result<Instant> {
    wait_for(limit, || node.not_ready().is_none()).await?;
    Ok(Instant::now())
}

/// Has `node` build a snapshot of everything it applied and purge its log up to it; returns the
/// snapshot's last index.
async fn compact(node: &Node) -> anyhow::Result<u64> {
    node.raft.trigger().snapshot().await?;
    let applied = node.state.last_applied().map_or(0, |l| l.index);
    wait_for(Duration::from_secs(600), || {
        node.raft
            .metrics()
            .borrow_watched()
            .snapshot
            .is_some_and(|s| s.index >= applied)
    })
    .await?;
    let index = node
        .raft
        .metrics()
        .borrow_watched()
        .snapshot
        .map_or(0, |s| s.index);
    node.raft.trigger().purge_log(index).await?;
    wait_for(Duration::from_secs(60), || {
        node.raft
            .metrics()
            .borrow_watched()
            .purged
            .is_some_and(|p| p.index >= index)
    })
    .await?;
    Ok(index)
}

/// Bytes in a node's snapshot directory (the pointer and the current data file).
fn snapshot_bytes(cluster: &FaultyCluster, id: u64) -> u64 {
    let dir = cluster
        .data_dir()
        .join(format!("node-{id}"))
        .join("snapshot");
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(|e| e.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

/// A three-node cluster holding many finished jobs, its leader's log compacted into a snapshot,
/// takes a fourth node: it is admitted, installs a snapshot, registers and runs a
/// job; the test measures each step. The new node ends with every job, and a probe job runs
/// on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_joins_and_takes_work_with_many_finished_jobs() -> anyhow::Result<()> {
    init_tracing();
    let n = jobs(3_000, 100_000);
    let ledger = Arc::new(Ledger::default());
    let mut cluster = FaultyCluster::start(
        3,
        FaultController::new(1),
        registry(&ledger),
        |c: &mut NodeConfig| configure(c, 20_000),
    )
    .await?;
    let leader = {
        wait_for(Duration::from_secs(30), || cluster.leader().is_some()).await?;
        cluster.leader().unwrap()
    };
    let loaded = load(&cluster, leader, n).await?;
    let l = cluster.node(leader).unwrap().clone();
    let last_index = l
        .raft
        .metrics()
        .borrow_watched()
        .last_log_index
        .unwrap_or(0);
    // Whatever the policy did so far, compact every member's log now: the new node can then
    // only catch up from a snapshot, whichever member leads by then (on a busy CI machine the
    // leader changed and a follower whose log was whole caught node 4 up entry by entry).
    let purged = compact(&l).await?;
    drop(l);
    for id in [1, 2, 3].into_iter().filter(|&id| id != leader) {
        let node = cluster.node(id).unwrap().clone();
        compact(&node).await?;
    }

    let started = Instant::now();
    cluster.add(4, |_| {}).await?;
    let node4 = cluster.node(4).unwrap().clone();
    let served = started.elapsed();
    wait_for(Duration::from_secs(600), || {
        node4.read(|t| t.counts().succeeded) >= n as u64
    })
    .await?;
    let caught_up = started.elapsed();
    wait_for(Duration::from_secs(60), || {
        node4.read(|t| t.nodes().contains_key(&4))
    })
    .await?;
    let registered = started.elapsed();
    // Probe jobs until one runs on node 4.
    let mut client = jobs_client(&cluster, leader).await?;
    let probe = pb::JobSpec {
        kind: LEDGER_KIND.into(),
        ..Default::default()
    };
    let ran = loop {
        if ledger.executions().iter().any(|e| e.node == 4) {
            break started.elapsed();
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "node 4 never ran a job"
        );
        client
            .submit(pb::SubmitRequest {
                jobs: vec![probe.clone(); 64],
            })
            .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let ready = wait_ready(&node4, Duration::from_secs(60)).await? - started;
    let snapshot = snapshot_bytes(&cluster, 4);
    assert!(snapshot > 0, "node 4 holds the snapshot it installed");
    assert!(purged > 0 && purged <= last_index);
    println!(
        "join with {n} finished jobs in the state (loaded in {:.1}s; leader log {last_index} \
         entries, purged to {purged}; snapshot {:.1} MiB): node 4 serving {:.2}s, caught up \
         {:.2}s, registered {:.2}s, first job {:.2}s, ready {:.2}s after start; RSS of the \
         4-node process {} MiB",
        loaded.as_secs_f64(),
        snapshot as f64 / (1024.0 * 1024.0),
        served.as_secs_f64(),
        caught_up.as_secs_f64(),
        registered.as_secs_f64(),
        ran.as_secs_f64(),
        ready.as_secs_f64(),
        rss_mib(),
    );
    drop(node4);
    cluster.shutdown().await;
    Ok(())
}

/// One voter holding many finished jobs builds a snapshot (size and build time measured), a
/// learner joins and installs it (install time measured: from its start until it has applied
/// the snapshot's index), and then the learner and the voter each restart on their data (time
/// from restart to ready measured). Every replica ends with every job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_install_and_restart_with_many_finished_jobs() -> anyhow::Result<()> {
    init_tracing();
    let n = jobs(20_000, 1_000_000);
    let ledger = Arc::new(Ledger::default());
    // Snapshots only when asked: the figures are for one snapshot of the whole state.
    let mut cluster = FaultyCluster::start(
        1,
        FaultController::new(2),
        registry(&ledger),
        |c: &mut NodeConfig| configure(c, 100_000_000),
    )
    .await?;
    wait_for(Duration::from_secs(30), || cluster.leader() == Some(1)).await?;
    let loaded = load(&cluster, 1, n).await?;
    let rss_loaded = rss_mib();

    let n1 = cluster.node(1).unwrap().clone();
    let started = Instant::now();
    // The log is purged up to the snapshot, so the learner can only catch up from it.
    let snapshot_index = compact(&n1).await?;
    let built = started.elapsed();
    drop(n1);
    let bytes = snapshot_bytes(&cluster, 1);

    let started = Instant::now();
    cluster.add(2, |_| {}).await?;
    let n2 = cluster.node(2).unwrap().clone();
    wait_for(Duration::from_secs(1200), || {
        n2.state
            .last_applied()
            .is_some_and(|l| l.index >= snapshot_index)
    })
    .await?;
    let installed = started.elapsed();
    assert_eq!(n2.read(|t| t.counts().succeeded), n as u64);
    let ready2 = wait_ready(&n2, Duration::from_secs(120)).await? - started;
    drop(n2);

    // Restart the learner, then the voter, each on its data.
    let mut restarts = Vec::new();
    for id in [2u64, 1] {
        cluster.crash(id).await?;
        let started = Instant::now();
        cluster.restart(id).await?;
        let opened = started.elapsed();
        let node = cluster.node(id).unwrap().clone();
        let ready = wait_ready(&node, Duration::from_secs(600)).await? - started;
        assert_eq!(node.read(|t| t.counts().succeeded), n as u64);
        restarts.push((id, opened, ready));
    }
    println!(
        "{n} finished jobs (loaded in {:.1}s, {:.0} jobs/s; RSS of the 1-node process {} MiB): \
         snapshot {:.1} MiB ({:.0} bytes/job) built and log purged in {:.2}s; installed on a new learner \
         {:.2}s after its start (ready {:.2}s)",
        loaded.as_secs_f64(),
        n as f64 / loaded.as_secs_f64(),
        rss_loaded,
        bytes as f64 / (1024.0 * 1024.0),
        bytes as f64 / n as f64,
        built.as_secs_f64(),
        installed.as_secs_f64(),
        ready2.as_secs_f64(),
    );
    for (id, opened, ready) in restarts {
        let role = if id == 1 { "voter" } else { "learner" };
        println!(
            "restart of the {role} (node {id}) with {n} finished jobs: serving after {:.2}s, \
             ready after {:.2}s",
            opened.as_secs_f64(),
            ready.as_secs_f64()
        );
    }
    cluster.shutdown().await;
    Ok(())
}
