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
        let table = cluster.node(leader).node.read(|t| t.clone());
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
    let table = cluster.node(leader).node.read(|t| t.clone());
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
        let table = cluster.node(leader).node.read(|t| t.clone());
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
