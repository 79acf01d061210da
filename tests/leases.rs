//! Lease tests on in-process clusters: a lost node's attempts move elsewhere only after it has
//! stopped them, and never sooner than the lease allows.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use exactly_handlers::{Handler, HandlerOutcome, JobContext, Registry};
use exactly_node::faults::{Fate, Faults};
use exactly_node::{NodeConfig, RunningNode, StartOptions};
use exactly_proto::v1 as pb;
use exactly_tests::{test_config, wait_for};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

/// One execution with its start and end on the process-wide monotonic clock.
#[derive(Clone, Debug)]
struct Run {
    job: u64,
    token: u64,
    node: u64,
    start: Instant,
    end: Option<Instant>,
    cancelled: bool,
}

#[derive(Default)]
struct Runs(Mutex<Vec<Run>>);

/// Holds each job for the duration in its payload (ms), or until cancelled, recording both ends.
struct HoldHandler(Arc<Runs>);

impl Handler for HoldHandler {
    fn run(
        &self,
        ctx: JobContext,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, HandlerOutcome> {
        let runs = self.0.clone();
        let index = {
            let mut r = runs.0.lock().unwrap();
            r.push(Run {
                job: ctx.job_id,
                token: ctx.fencing_token,
                node: ctx.node_id,
                start: Instant::now(),
                end: None,
                cancelled: false,
            });
            r.len() - 1
        };
        let ms: u64 = String::from_utf8_lossy(&ctx.payload).parse().unwrap_or(0);
        Box::pin(async move {
            let cancelled = tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms)) => false,
                _ = cancel.cancelled() => true,
            };
            let mut r = runs.0.lock().unwrap();
            r[index].end = Some(Instant::now());
            r[index].cancelled = cancelled;
            if cancelled {
                HandlerOutcome::Failed {
                    error: "cancelled".into(),
                    retryable: true,
                }
            } else {
                HandlerOutcome::Succeeded(Vec::new())
            }
        })
    }
}

/// Cuts chosen nodes off from every other node, both ways.
#[derive(Default)]
struct Isolation(Mutex<BTreeSet<u64>>);

impl Faults for Isolation {
    fn fate(&self, from: u64, to: u64) -> Fate {
        let cut = self.0.lock().unwrap();
        if cut.contains(&from) || cut.contains(&to) {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    }
}

struct Cluster {
    _dir: tempfile::TempDir,
    nodes: Vec<Option<RunningNode>>,
    runs: Arc<Runs>,
    isolation: Arc<Isolation>,
}

impl Cluster {
    async fn start(tweak: impl Fn(&mut NodeConfig)) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let runs = Arc::new(Runs::default());
        let isolation = Arc::new(Isolation::default());
        let mut nodes = Vec::new();
        for id in 1..=3u64 {
            let mut c = test_config(dir.path(), id);
            if id == 1 {
                c.init = true;
            } else {
                c.join = vec![nodes
                    .first()
                    .and_then(|n: &Option<RunningNode>| n.as_ref())
                    .map(|n| n.addr.clone())
                    .unwrap()];
            }
            tweak(&mut c);
            let mut registry = Registry::with_builtins();
            registry.register("hold", Arc::new(HoldHandler(runs.clone())));
            let options = StartOptions {
                faults: Some(isolation.clone()),
                ..StartOptions::default()
            };
            nodes.push(Some(exactly_node::start_with(c, registry, options).await?));
        }
        let cluster = Self {
            _dir: dir,
            nodes,
            runs,
            isolation,
        };
        wait_for(Duration::from_secs(30), || {
            cluster
                .live()
                .all(|n| n.node.read(|t| t.nodes().len()) == 3)
        })
        .await?;
        Ok(cluster)
    }

    fn live(&self) -> impl Iterator<Item = &RunningNode> {
        self.nodes.iter().flatten()
    }

    fn node(&self, id: u64) -> &RunningNode {
        self.live().find(|n| n.id() == id).unwrap()
    }

    fn leader(&self) -> u64 {
        self.live()
            .find_map(|n| n.node.leader().map(|(l, _)| l))
            .unwrap()
    }

    async fn submit(&self, via: u64, jobs: Vec<pb::JobSpec>) -> anyhow::Result<Vec<u64>> {
        let mut c =
            pb::jobs_client::JobsClient::connect(format!("http://{}", self.node(via).addr)).await?;
        Ok(c.submit(pb::SubmitRequest { jobs })
            .await?
            .into_inner()
            .job_ids)
    }

    fn runs(&self) -> Vec<Run> {
        self.runs.0.lock().unwrap().clone()
    }

    async fn shutdown(self) {
        for n in self.nodes.into_iter().flatten() {
            n.shutdown().await;
        }
    }
}

fn hold(ms: u64) -> pb::JobSpec {
    pb::JobSpec {
        kind: "hold".into(),
        payload: ms.to_string().into_bytes(),
        max_attempts: 5,
        ..Default::default()
    }
}

/// Checks that no two executions of one job overlap in time, and returns executions per job.
fn assert_no_overlap(runs: &[Run]) -> HashMap<u64, Vec<Run>> {
    let mut by_job: HashMap<u64, Vec<Run>> = HashMap::new();
    for r in runs {
        by_job.entry(r.job).or_default().push(r.clone());
    }
    for (job, rs) in &by_job {
        for a in rs {
            for b in rs {
                if a.token < b.token {
                    let a_end = a
                        .end
                        .unwrap_or_else(|| panic!("job {job} token {} never ended", a.token));
                    assert!(
                        a_end <= b.start,
                        "job {job}: token {} on node {} ran until {:?} after token {} started on node {}",
                        a.token,
                        a.node,
                        a_end - b.start,
                        b.token,
                        b.node
                    );
                }
            }
        }
    }
    by_job
}

/// A node holding long jobs is cut off from the others: it cancels them (self-fencing) before
/// the leader expires its lease and the jobs start elsewhere with larger tokens; each job then
/// completes once, and the isolated node's late completions are refused as stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_worker_fences_before_its_jobs_move() -> anyhow::Result<()> {
    let cluster = Cluster::start(|_| {}).await?;
    let leader = cluster.leader();
    let victim = (1..=3).find(|&n| n != leader).unwrap();
    // Enough 10-second jobs that every node gets some.
    let ids = cluster
        .submit(leader, (0..30).map(|_| hold(10_000)).collect())
        .await?;
    wait_for(Duration::from_secs(10), || {
        cluster.runs().iter().filter(|r| r.node == victim).count() > 0
    })
    .await?;
    let cut_at = Instant::now();
    cluster.isolation.0.lock().unwrap().insert(victim);

    // Every job completes once the victim's jobs have moved (they re-run elsewhere).
    wait_for(Duration::from_secs(60), || {
        let table = cluster.node(leader).node.read_view(|t| t.copy());
        ids.iter().all(|id| {
            table
                .job(*id)
                .is_some_and(|j| j.status == exactly_core::JobStatus::Succeeded)
        })
    })
    .await?;
    cluster.isolation.0.lock().unwrap().clear();

    let runs = cluster.runs();
    let by_job = assert_no_overlap(&runs);
    let moved: Vec<&Vec<Run>> = by_job
        .values()
        .filter(|rs| rs.iter().any(|r| r.node == victim))
        .collect();
    assert!(!moved.is_empty());
    let mut fence_after = Vec::new();
    let mut restart_after = Vec::new();
    for rs in &moved {
        let first = rs.iter().find(|r| r.node == victim).unwrap();
        assert!(
            first.cancelled,
            "the victim cancelled its attempt: {first:?}"
        );
        fence_after.push(first.end.unwrap() - cut_at);
        let next = rs
            .iter()
            .find(|r| r.token > first.token)
            .expect("re-run elsewhere");
        assert_ne!(next.node, victim);
        restart_after.push(next.start - cut_at);
    }
    eprintln!(
        "victim node {victim}: {} jobs; fenced after {:?}..{:?}; re-run after {:?}..{:?}",
        moved.len(),
        fence_after.iter().min().unwrap(),
        fence_after.iter().max().unwrap(),
        restart_after.iter().min().unwrap(),
        restart_after.iter().max().unwrap()
    );
    // Each job succeeded exactly once, from its last attempt.
    let table = cluster.node(leader).node.read_view(|t| t.copy());
    for id in &ids {
        let job = table.job(*id).unwrap();
        let wins = job
            .attempts
            .iter()
            .filter(|a| a.end == Some(exactly_core::AttemptEnd::Succeeded))
            .count();
        assert_eq!(wins, 1, "job {id}: {job:?}");
    }
    // After healing, the victim's late "cancelled" completions are refused as stale.
    wait_for(Duration::from_secs(20), || {
        cluster
            .node(leader)
            .node
            .read(|t| t.counts().stale_completions)
            > 0
    })
    .await?;
    cluster.shutdown().await;
    Ok(())
}

/// A worker that dies for good (no restart) holding long jobs: the leader expires its lease
/// after `lease.expire-after` and the jobs run to completion on the other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_worker_jobs_move_after_the_lease_expires() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(|_| {}).await?;
    let leader = cluster.leader();
    let victim = (1..=3).find(|&n| n != leader).unwrap();
    let ids = cluster
        .submit(leader, (0..30).map(|_| hold(2_000)).collect())
        .await?;
    wait_for(Duration::from_secs(10), || {
        cluster.runs().iter().filter(|r| r.node == victim).count() > 0
    })
    .await?;
    let held: BTreeSet<u64> = cluster
        .runs()
        .iter()
        .filter(|r| r.node == victim)
        .map(|r| r.job)
        .collect();
    let index = cluster
        .nodes
        .iter()
        .position(|n| n.as_ref().is_some_and(|n| n.id() == victim))
        .unwrap();
    let killed_at = Instant::now();
    // Cut it off first so nothing it does afterwards reaches the cluster, then stop it.
    cluster.isolation.0.lock().unwrap().insert(victim);
    cluster.nodes[index].take().unwrap().shutdown().await;

    wait_for(Duration::from_secs(60), || {
        let table = cluster.node(leader).node.read_view(|t| t.copy());
        ids.iter().all(|id| {
            table
                .job(*id)
                .is_some_and(|j| j.status == exactly_core::JobStatus::Succeeded)
        })
    })
    .await?;
    let runs = cluster.runs();
    assert_no_overlap(&runs);
    let lease = NodeConfig::default().lease;
    let mut moved_after = Vec::new();
    for job in &held {
        let again = runs
            .iter()
            .filter(|r| r.job == *job && r.node != victim)
            .map(|r| r.start)
            .min()
            .expect("re-run elsewhere");
        let after = again - killed_at;
        // The leader counts from the last renewal it applied, at most one renew interval (plus
        // a commit) before the kill; and the jobs must move soon after the expiry.
        assert!(
            after + lease.renew_interval >= lease.expire_after,
            "job {job} moved after only {after:?}"
        );
        assert!(
            after <= lease.expire_after + Duration::from_secs(3),
            "job {job} moved only after {after:?}"
        );
        moved_after.push(after);
    }
    eprintln!(
        "{} jobs of the dead node moved after {:?}..{:?} (expire-after {:?})",
        held.len(),
        moved_after.iter().min().unwrap(),
        moved_after.iter().max().unwrap(),
        lease.expire_after
    );
    cluster.shutdown().await;
    Ok(())
}

/// No handler outlives its executor: stopping the executor actor (a shutdown's last step, or
/// the actor dying) stops every attempt it runs at once, even with a `CancelAll` still queued
/// behind the stop signal. Regression: a node shut down right after it was cut off left a
/// 9 s handler running 3.3 s into the job's next attempt elsewhere (CI, under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handlers_never_outlive_their_executor() -> anyhow::Result<()> {
    let cluster = Cluster::start(|_| {}).await?;
    let leader = cluster.leader();
    cluster
        .submit(leader, (0..12).map(|_| hold(20_000)).collect())
        .await?;
    let victim = (1..=3).find(|&n| n != leader).unwrap();
    wait_for(Duration::from_secs(10), || {
        cluster.runs().iter().any(|r| r.node == victim)
    })
    .await?;
    cluster.node(victim).stop_executor();
    wait_for(Duration::from_secs(2), || {
        cluster
            .runs()
            .iter()
            .filter(|r| r.node == victim)
            .all(|r| r.end.is_some())
    })
    .await
    .map_err(|e| anyhow::anyhow!("handlers of a stopped executor still run: {e}"))?;
    assert!(cluster
        .runs()
        .iter()
        .filter(|r| r.node == victim)
        .all(|r| r.cancelled));
    cluster.shutdown().await;
    Ok(())
}

/// How the leader is taken away in [`leader_failover_cancels_nothing_on_healthy_nodes`].
#[derive(Clone, Copy, Debug)]
enum LeaderLoss {
    /// The process dies (cut off first, then shut down).
    Killed,
    /// The process lives on but nothing it sends or receives arrives, as for a frozen leader
    /// seen from the others (it fences its own attempts; the others must not).
    CutOff,
}

/// A leader failover (the leader killed, or cut off as if frozen) while one-attempt jobs run on
/// every node: the healthy nodes keep their leases through the election, so none of their
/// running attempts is cancelled; the lost leader's attempts are given back (abandoned, costing
/// no attempt) and run once more elsewhere; every job succeeds and none becomes a dead letter.
/// The lost leader's jobs move about `lease.expire-after` after its last renewal, not that plus
/// the election (the new leader counts from renewals it applied as a follower). Runs with the
/// default Raft timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_failover_cancels_nothing_on_healthy_nodes() -> anyhow::Result<()> {
    for loss in [LeaderLoss::Killed, LeaderLoss::CutOff] {
        // The shipped Raft timing, not the test fixture's: this is what users run.
        let mut cluster = Cluster::start(|c| c.raft = NodeConfig::default().raft).await?;
        let leader = cluster.leader();
        let jobs: Vec<pb::JobSpec> = (0..30)
            .map(|_| pb::JobSpec {
                max_attempts: 1,
                ..hold(9_000)
            })
            .collect();
        let ids = cluster.submit(leader, jobs).await?;
        // Every node runs some.
        wait_for(Duration::from_secs(10), || {
            let runs = cluster.runs();
            (1..=3).all(|n| runs.iter().any(|r| r.node == n))
        })
        .await?;
        let lost_at = Instant::now();
        cluster.isolation.0.lock().unwrap().insert(leader);
        if let LeaderLoss::Killed = loss {
            let index = cluster
                .nodes
                .iter()
                .position(|n| n.as_ref().is_some_and(|n| n.id() == leader))
                .unwrap();
            cluster.nodes[index].take().unwrap().shutdown().await;
        }
        let survivor = (1..=3).find(|&n| n != leader).unwrap();
        wait_for(Duration::from_secs(60), || {
            let table = cluster.node(survivor).node.read_view(|t| t.copy());
            ids.iter()
                .all(|id| table.job(*id).is_some_and(|j| j.status.is_terminal()))
        })
        .await?;
        let elected = cluster
            .live()
            .filter(|n| n.id() != leader)
            .find_map(|n| n.node.leader().map(|(l, _)| l))
            .unwrap();
        assert_ne!(elected, leader, "{loss:?}");
        let runs = cluster.runs();
        assert_no_overlap(&runs);
        let healthy_cancelled: Vec<&Run> = runs
            .iter()
            .filter(|r| r.node != leader && r.cancelled)
            .collect();
        assert!(
            healthy_cancelled.is_empty(),
            "{loss:?}: the failover cancelled attempts on healthy nodes: {healthy_cancelled:?}"
        );
        let table = cluster.node(survivor).node.read_view(|t| t.copy());
        let mut moved_after = Vec::new();
        for id in &ids {
            let job = table.job(*id).unwrap();
            assert_eq!(
                job.status,
                exactly_core::JobStatus::Succeeded,
                "{loss:?}: job {id} (no handler failed) must succeed: {job:?}"
            );
            assert_eq!(job.failures, 0, "{loss:?}: job {id}: {job:?}");
            if job.attempts.len() > 1 {
                let first = &job.attempts[0];
                assert_eq!(
                    first.node, leader,
                    "{loss:?}: only the lost leader's jobs move"
                );
                let Some(exactly_core::AttemptEnd::Abandoned { reason }) = &first.end else {
                    panic!("{loss:?}: job {id}: the lost attempt must be abandoned: {job:?}");
                };
                assert!(
                    reason.contains("lease") && !reason.contains("cancelled: cancelled"),
                    "{loss:?}: {reason}"
                );
                let again = runs
                    .iter()
                    .filter(|r| r.job == *id && r.node != leader)
                    .map(|r| r.start)
                    .min()
                    .unwrap();
                moved_after.push(again - lost_at);
            }
        }
        let lease = NodeConfig::default().lease;
        assert!(!moved_after.is_empty(), "{loss:?}: the leader ran jobs");
        let slowest = *moved_after.iter().max().unwrap();
        // Counted from the last renewal the new leader applied, at most a renew interval (and a
        // commit) before the loss; a count from the election would add the whole failover.
        assert!(
            slowest <= lease.expire_after + Duration::from_millis(750),
            "{loss:?}: the lost leader's jobs moved only after {slowest:?}"
        );
        eprintln!(
            "{loss:?}: leader {leader} lost; {} of its jobs moved after {:?}..{:?}; \
             healthy nodes cancelled 0 attempts",
            moved_after.len(),
            moved_after.iter().min().unwrap(),
            slowest
        );
        cluster.shutdown().await;
    }
    Ok(())
}

/// Two of three nodes cut off for 4 s (less than the lease expiry): no node can commit a
/// renewal, so every node fences itself and stops its attempts. Those ends are not the jobs'
/// doing: each is recorded as abandoned with a reason that says the lease lapsed, costs no
/// attempt, and every one-attempt job still succeeds (none is a dead letter).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_lease_costs_no_attempt() -> anyhow::Result<()> {
    let cluster = Cluster::start(|_| {}).await?;
    let leader = cluster.leader();
    let ids = cluster
        .submit(
            leader,
            (0..12)
                .map(|_| pb::JobSpec {
                    max_attempts: 1,
                    ..hold(8_000)
                })
                .collect(),
        )
        .await?;
    wait_for(Duration::from_secs(10), || {
        let runs = cluster.runs();
        (1..=3).all(|n| runs.iter().any(|r| r.node == n))
    })
    .await?;
    let cut: Vec<u64> = (1..=3).filter(|&n| n != leader).collect();
    cluster
        .isolation
        .0
        .lock()
        .unwrap()
        .extend(cut.iter().copied());
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.isolation.0.lock().unwrap().clear();
    wait_for(Duration::from_secs(60), || {
        let table = cluster.node(leader).node.read_view(|t| t.copy());
        ids.iter()
            .all(|id| table.job(*id).is_some_and(|j| j.status.is_terminal()))
    })
    .await?;
    assert_no_overlap(&cluster.runs());
    let fenced = cluster.runs().iter().filter(|r| r.cancelled).count();
    assert!(fenced > 0, "the cut nodes fenced themselves");
    // Wait for every node's view, then read the leader's.
    let table = cluster.node(cluster.leader()).node.read_view(|t| t.copy());
    let mut abandoned = 0;
    for id in &ids {
        let job = table.job(*id).unwrap();
        assert_eq!(
            job.status,
            exactly_core::JobStatus::Succeeded,
            "job {id}: {job:?}"
        );
        assert_eq!(job.failures, 0, "job {id}: {job:?}");
        for a in &job.attempts {
            match &a.end {
                Some(exactly_core::AttemptEnd::Abandoned { reason }) => {
                    abandoned += 1;
                    assert!(
                        reason.contains("lease lapsed") || reason.contains("no valid lease"),
                        "job {id}: {reason}"
                    );
                }
                Some(exactly_core::AttemptEnd::Succeeded) => {}
                other => panic!("job {id}: attempt ended {other:?}: {job:?}"),
            }
        }
    }
    assert!(abandoned > 0);
    eprintln!("{fenced} attempts fenced, {abandoned} recorded as abandoned, 0 dead");
    cluster.shutdown().await;
    Ok(())
}

/// An executor that dies while its node runs (a panic in it stops the actor) stops the node
/// (crash-only) instead of leaving it renewing a lease for attempts nothing runs: the node
/// says why, its lease runs out, and every job it held runs to the end elsewhere, each exactly
/// once to completion.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_executor_dies_stops_and_its_jobs_run_elsewhere() -> anyhow::Result<()> {
    let cluster = Cluster::start(|_| {}).await?;
    let leader = cluster.leader();
    let ids = cluster
        .submit(leader, (0..9).map(|_| hold(1_500)).collect())
        .await?;
    let victim = (1..=3).find(|&n| n != leader).unwrap();
    wait_for(Duration::from_secs(10), || {
        cluster
            .runs()
            .iter()
            .any(|r| r.node == victim && r.end.is_none())
    })
    .await?;
    cluster.node(victim).stop_executor();
    let node = cluster.node(victim).node.clone();
    wait_for(Duration::from_secs(2), || node.shutdown.is_cancelled())
        .await
        .map_err(|e| anyhow::anyhow!("the node kept running without its executor: {e}"))?;
    let why = node.failure().expect("the node says why it stopped");
    assert!(why.contains("executor"), "{why}");
    let others: Vec<&RunningNode> = cluster.live().filter(|n| n.id() != victim).collect();
    wait_for(Duration::from_secs(30), || {
        ids.iter().all(|&id| {
            others.iter().all(|n| {
                n.node.read_view(|t| {
                    t.job(id)
                        .is_some_and(|j| j.status == exactly_core::JobStatus::Succeeded)
                })
            })
        })
    })
    .await
    .map_err(|e| anyhow::anyhow!("jobs of the stopped node did not finish elsewhere: {e}"))?;
    let by_job = assert_no_overlap(&cluster.runs());
    for id in &ids {
        let completed = by_job[id]
            .iter()
            .filter(|r| r.end.is_some() && !r.cancelled)
            .count();
        assert_eq!(completed, 1, "job {id}: {:?}", by_job[id]);
    }
    cluster.shutdown().await;
    Ok(())
}

/// A scheduler that stops while its node leads (a panic in it stops the actor) is started
/// again: a failing job, whose retries only the scheduler assigns, still runs all its attempts
/// and ends as a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduler_that_dies_is_started_again() -> anyhow::Result<()> {
    let cluster = Cluster::start(|_| {}).await?;
    let leader = cluster.leader();
    let hooks = cluster.node(leader).hooks.clone();
    let first = hooks
        .scheduler
        .lock()
        .unwrap()
        .clone()
        .expect("the leader runs a scheduler");
    first.stop(None);
    let again = || {
        hooks
            .scheduler
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|a| a.get_id() != first.get_id())
    };
    wait_for(Duration::from_secs(5), again)
        .await
        .map_err(|e| anyhow::anyhow!("the scheduler was not started again: {e}"))?;
    let ids = cluster
        .submit(
            leader,
            vec![pb::JobSpec {
                kind: "fail".into(),
                max_attempts: 3,
                backoff_base_ms: 50,
                backoff_max_ms: 100,
                ..Default::default()
            }],
        )
        .await?;
    let node = cluster.node(leader).node.clone();
    wait_for(Duration::from_secs(15), || {
        node.read_view(|t| {
            t.job(ids[0])
                .is_some_and(|j| j.status == exactly_core::JobStatus::Dead && j.attempts.len() == 3)
        })
    })
    .await
    .map_err(|e| anyhow::anyhow!("the failing job's retries were not assigned: {e}"))?;
    cluster.shutdown().await;
    Ok(())
}
