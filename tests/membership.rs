//! Membership and elastic scaling on in-process clusters, every run checked by the history
//! checker: nodes joining under load and being promoted, drains that let running jobs finish or
//! give them back past the deadline, SIGTERM's drain-and-leave and a restart that rejoins, a dead
//! voter removed and replaced, a removed node coming back with its old data, and a snapshot
//! installed on a new node after the log was compacted.

use openraft::async_runtime::WatchReceiver;
use std::collections::BTreeSet;
use std::time::Duration;

use exactly_core::JobStatus;
use exactly_node::membership::Stopped;
use exactly_proto::v1 as pb;
use exactly_tests::harness::FaultyCluster;
use exactly_tests::history::{now_us, Event, Report, RunPlan, SubmitOutcome};
use exactly_tests::wait_for;
use exactly_tests::workload::{run_workload, ChaosOptions, JobPlan, Scenario, WorkloadOptions};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error,openraft=off".into()),
        )
        .with_test_writer()
        .try_init();
}

/// How long the tests wait for a membership change (elections, catching up, lease expiry).
const CHANGE_WAIT: Duration = Duration::from_secs(40);
/// How long the final settle may take.
const SETTLE_MAX: Duration = Duration::from_secs(60);

fn plans(n: usize, run: RunPlan) -> Vec<JobPlan> {
    vec![
        JobPlan {
            run,
            timeout: Duration::ZERO,
        };
        n
    ]
}

fn ids(outcome: SubmitOutcome) -> anyhow::Result<Vec<u64>> {
    match outcome {
        SubmitOutcome::Ok(ids) => Ok(ids),
        other => anyhow::bail!("submit not acknowledged: {other:?}"),
    }
}

/// Voters and learners as `node` sees the Raft membership.
fn roles(cluster: &FaultyCluster, node: u64) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let Some(n) = cluster.node(node) else {
        return Default::default();
    };
    let m = n.raft.metrics().borrow_watched().membership_config.clone();
    let voters: BTreeSet<u64> = m.membership().voter_ids().collect();
    let learners: BTreeSet<u64> = m.membership().learner_ids().collect();
    (voters, learners)
}

/// The leader's view of the voters, if a leader is known.
fn leader_voters(cluster: &FaultyCluster) -> Option<BTreeSet<u64>> {
    Some(roles(cluster, cluster.leader()?).0)
}

async fn cluster_client(
    cluster: &FaultyCluster,
    via: u64,
) -> anyhow::Result<pb::cluster_client::ClusterClient<tonic::transport::Channel>> {
    let addr = cluster
        .endpoints()
        .into_iter()
        .find(|(id, _)| *id == via)
        .map(|(_, a)| a)
        .ok_or_else(|| anyhow::anyhow!("no node {via}"))?;
    Ok(pb::cluster_client::ClusterClient::connect(format!("http://{addr}")).await?)
}

/// Whether `node` is out of the leader's membership and its lease entry is gone there.
fn has_left(cluster: &FaultyCluster, node: u64) -> bool {
    let Some(leader) = cluster.leader() else {
        return false;
    };
    let (voters, learners) = roles(cluster, leader);
    let registered = cluster
        .node(leader)
        .is_some_and(|n| n.read(|t| t.nodes().contains_key(&node)));
    !voters.contains(&node) && !learners.contains(&node) && !registered
}

/// A job running on `node` now (from a running replica), with its token.
fn running_on(s: &Scenario, jobs: &[u64], node: u64) -> Vec<(u64, u64)> {
    jobs.iter()
        .filter_map(|&job| match s.running(job) {
            Some((n, token)) if n == node => Some((job, token)),
            _ => None,
        })
        .collect()
}

/// Executions recorded on `node` that started after `since` (microseconds).
fn executions_on_since(s: &Scenario, node: u64, since: u64) -> usize {
    s.recorder
        .events()
        .iter()
        .filter(|e| matches!(e, Event::ExecStart { node: n, at, .. } if *n == node && *at >= since))
        .count()
}

/// Submits batches of `batch` jobs that each run for `run` through the current leader, one
/// every `pause`, until `node` has started a job after `since` (at most 40 batches).
async fn submit_until_it_runs(
    s: &Scenario,
    node: u64,
    since: u64,
    batch: usize,
    run: Duration,
    pause: Duration,
) -> anyhow::Result<()> {
    for _ in 0..40 {
        if executions_on_since(s, node, since) > 0 {
            return Ok(());
        }
        let leader = s.leader().await?;
        ids(s.submit(leader, &plans(batch, RunPlan::fixed(run))).await?)?;
        tokio::time::sleep(pause).await;
    }
    anyhow::ensure!(
        executions_on_since(s, node, since) > 0,
        "node {node} never ran a job"
    );
    Ok(())
}

fn assert_clean(report: &Report) {
    assert!(report.is_clean(), "{report:#}");
    assert_eq!(report.lost + report.duplicated + report.stale_accepted, 0);
}

/// Under a steady stream of jobs, nodes 4 and 5 join a 3-node cluster whose voters-target is 5:
/// each catches up and is promoted to voter. Node 6 joins once the target is reached and stays a
/// learner that runs jobs. Every acknowledged job completes exactly once (checker clean).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_joining_under_load_are_promoted_up_to_the_target_then_stay_learners(
) -> anyhow::Result<()> {
    init_tracing();
    let options = ChaosOptions::short();
    let mut s = Scenario::start_with(3, options.clone(), |c| c.voters_target = 5).await?;
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let workload = tokio::spawn(run_workload(
        s.cluster.endpoints(),
        s.recorder.clone(),
        7,
        until,
        WorkloadOptions::default(),
    ));
    tokio::time::sleep(Duration::from_millis(800)).await;
    s.recorder.nemesis("add nodes 4 and 5");
    s.cluster.add(4, |_| {}).await?;
    s.cluster.add(5, |_| {}).await?;
    let all: BTreeSet<u64> = (1..=5).collect();
    wait_for(CHANGE_WAIT, || {
        leader_voters(&s.cluster).as_ref() == Some(&all)
    })
    .await?;
    s.recorder.nemesis("add node 6");
    let added_at = now_us();
    s.cluster.add(6, |_| {}).await?;
    wait_for(CHANGE_WAIT, || {
        s.cluster.leader().is_some_and(|l| {
            let (voters, learners) = roles(&s.cluster, l);
            voters == all
                && learners.contains(&6)
                && s.cluster
                    .node(l)
                    .is_some_and(|n| n.read(|t| t.nodes().contains_key(&6)))
        })
    })
    .await?;
    workload.await??;
    // Node 6 takes work: submit until it has run a job.
    let leader = s.leader().await?;
    submit_until_it_runs(
        &s,
        6,
        added_at,
        20,
        Duration::from_millis(300),
        Duration::from_millis(500),
    )
    .await?;
    assert_eq!(roles(&s.cluster, leader).0, all, "node 6 stayed a learner");
    s.healed();
    let report = s.finish(SETTLE_MAX).await;
    assert_clean(&report);
    assert!(report.acknowledged > 50, "{report}");
    Ok(())
}

/// Draining a voter with running jobs: it gets no new attempts, its running attempts finish on
/// it (nothing cancelled, nothing run twice), then it leaves the membership and the caught-up
/// learner is promoted, so the cluster keeps its 3 voters. Status shows the drain meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_lets_running_attempts_finish_then_a_learner_replaces_the_voter() -> anyhow::Result<()>
{
    init_tracing();
    let mut s = Scenario::start_with(4, ChaosOptions::short(), |c| c.voters_target = 3).await?;
    let leader = s.leader().await?;
    let (voters, learners) = roles(&s.cluster, leader);
    // Nodes join concurrently: whichever is admitted last stays a learner.
    assert_eq!(voters.len(), 3, "three voters: {voters:?}");
    assert_eq!(
        learners.len(),
        1,
        "one node joined as a learner: {learners:?}"
    );
    let learner = *learners.iter().next().expect("one learner");
    let victim = *voters.iter().find(|&&v| v != leader).expect("a follower");

    let jobs = ids(s
        .submit(leader, &plans(16, RunPlan::fixed(Duration::from_secs(2))))
        .await?)?;
    wait_for(CHANGE_WAIT, || !running_on(&s, &jobs, victim).is_empty()).await?;

    s.recorder.nemesis(format!("drain node {victim}"));
    let reply = cluster_client(&s.cluster, leader)
        .await?
        .drain(pb::DrainRequest {
            node_id: victim,
            deadline_ms: 60_000,
        })
        .await?
        .into_inner();
    assert_eq!(reply.node_id, victim);
    assert!(reply.running > 0, "{reply:?}");
    // The leader has applied the drain when it answers: every attempt assigned later has a
    // larger token (a log index) than what it has applied now.
    let (held, drained_at_index): (BTreeSet<(u64, u64)>, u64) = {
        let n = s.cluster.node(leader).unwrap();
        let held = n.read(|t| {
            t.jobs_running_on(victim)
                .filter_map(|j| j.current_attempt().map(|a| (j.id, a.token)))
                .collect()
        });
        (held, n.state.last_applied().map_or(0, |l| l.index))
    };
    assert!(!held.is_empty());
    let status = cluster_client(&s.cluster, leader)
        .await?
        .status(pb::StatusRequest {})
        .await?
        .into_inner();
    let member = status.members.iter().find(|m| m.node_id == victim).unwrap();
    assert!(
        member.draining && member.drain_deadline_ms > 0,
        "{member:?}"
    );
    assert_eq!(member.health, "ok");
    assert!(member.lag.is_some(), "the leader knows each member's lag");

    // New work goes elsewhere while the drain runs.
    let more = ids(s
        .submit(
            leader,
            &plans(16, RunPlan::fixed(Duration::from_millis(200))),
        )
        .await?)?;
    wait_for(CHANGE_WAIT, || has_left(&s.cluster, victim)).await?;
    let leader = s.leader().await?;
    let expected: BTreeSet<u64> = voters
        .iter()
        .copied()
        .filter(|&v| v != victim)
        .chain([learner])
        .collect();
    assert_eq!(
        roles(&s.cluster, leader).0,
        expected,
        "the learner replaced it"
    );

    // Its attempts ran to success on it, under the tokens they had when the drain began.
    let node = s.cluster.node(leader).unwrap();
    for &(job, token) in &held {
        let j = node.read_view(|t| t.job(job)).unwrap();
        assert_eq!(j.status, JobStatus::Succeeded, "job {job}");
        let last = j.attempts.last().unwrap();
        assert_eq!((last.node, last.token), (victim, token), "job {job}");
        assert_eq!(j.attempts.len(), 1, "job {job} ran once");
    }
    let late: Vec<(u64, u64)> = node.read_view(|t| {
        t.all_jobs()
            .iter()
            .flat_map(|j| j.attempts.iter().map(move |a| (j.id, a.node, a.token)))
            .filter(|&(_, n, token)| n == victim && token > drained_at_index)
            .map(|(id, _, token)| (id, token))
            .collect()
    });
    assert!(
        late.is_empty(),
        "attempts reached node {victim} after its drain: {late:?}"
    );
    assert!(more.iter().all(|&j| node.read_view(|t| t
        .job(j)
        .is_some_and(|job| job.attempts.iter().all(|a| a.node != victim)))));
    assert!(
        !node.read(|t| t.is_removed(victim)),
        "a drained node is not banned"
    );

    // Stopped now (SIGTERM), the node that left does not try to drain again: it just stops.
    wait_for(CHANGE_WAIT, || {
        s.cluster
            .node(victim)
            .is_some_and(|n| n.departure.has_departed())
    })
    .await?;
    let stopping = std::time::Instant::now();
    let left = s.cluster.terminate(victim, Duration::from_secs(10)).await?;
    assert_eq!(left, Ok(Stopped::Left));
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "SIGTERM after leaving took {:?}",
        stopping.elapsed()
    );
    s.healed();
    let report = s.finish(SETTLE_MAX).await;
    assert_clean(&report);
    assert_eq!(report.fenced, 0, "nothing was cancelled: {report}");
    assert_eq!(report.abandoned, 0, "nothing was given back: {report}");
    Ok(())
}

/// Draining a node whose jobs outlast the deadline: at the deadline it cancels them, gives each
/// back once its handler stopped, and each runs again on another node with a larger fencing
/// token, never overlapping the cancelled run (checker clean). Then the node leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drain_past_the_deadline_gives_attempts_back_and_they_run_elsewhere() -> anyhow::Result<()>
{
    init_tracing();
    let mut s = Scenario::start(3, ChaosOptions::short()).await?;
    let leader = s.leader().await?;
    let victim = s.cluster.ids().into_iter().find(|&n| n != leader).unwrap();
    let slow = RunPlan {
        first: Duration::from_secs(60),
        then: Duration::from_millis(100),
    };
    let jobs = ids(s.submit(leader, &plans(12, slow)).await?)?;
    wait_for(CHANGE_WAIT, || !running_on(&s, &jobs, victim).is_empty()).await?;
    let held = running_on(&s, &jobs, victim);

    s.recorder
        .nemesis(format!("drain node {victim} with a 1 s deadline"));
    let drained_at = std::time::Instant::now();
    cluster_client(&s.cluster, victim)
        .await?
        .drain(pb::DrainRequest {
            node_id: victim,
            deadline_ms: 1_000,
        })
        .await?;
    wait_for(CHANGE_WAIT, || {
        held.iter()
            .all(|&(job, _)| s.running(job).is_some_and(|(n, _)| n != victim))
    })
    .await?;
    let moved_after = drained_at.elapsed();
    assert!(
        moved_after >= Duration::from_millis(1_000),
        "attempts moved before the deadline: {moved_after:?}"
    );
    wait_for(CHANGE_WAIT, || has_left(&s.cluster, victim)).await?;
    let leader = s.leader().await?;
    let node = s.cluster.node(leader).unwrap();
    for &(job, token) in &held {
        let j = node.read_view(|t| t.job(job)).unwrap();
        let given_back = &j.attempts[0];
        assert_eq!((given_back.node, given_back.token), (victim, token));
        assert!(
            matches!(&given_back.end, Some(exactly_core::AttemptEnd::Abandoned { reason }) if reason.contains("drained")),
            "job {job}: {:?}",
            given_back.end
        );
        assert_eq!(j.failures, 0, "a give-back costs no attempt");
        assert!(j.attempts[1].token > token && j.attempts[1].node != victim);
    }
    s.cluster.stop(victim).await?;
    // The jobs that did not run on the victim still run for a minute: give them time to finish
    // only if they are few; the settle waits for every acknowledged job.
    s.healed();
    let report = s.finish(Duration::from_secs(90)).await;
    assert_clean(&report);
    assert!(report.fenced >= held.len(), "{report}");
    println!(
        "drain past the deadline: {} attempts moved {:.2}s after the drain (deadline 1 s)",
        held.len(),
        moved_after.as_secs_f64()
    );
    Ok(())
}

/// SIGTERM on the leader of three voters with no learner: it drains (its running attempts
/// finish on it, nothing is cancelled) and stops, but stays a voter, since nobody could take its
/// place and the others might be stopping too. The other two elect a leader and run new jobs;
/// started again with its data, it registers a new incarnation as the same voter and runs jobs.
/// The membership never changed. Checker clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_on_a_voter_nobody_can_replace_drains_and_stays_a_voter() -> anyhow::Result<()> {
    init_tracing();
    let mut s = Scenario::start(3, ChaosOptions::short()).await?;
    let leader = s.leader().await?;
    let (voters, _) = roles(&s.cluster, leader);
    let jobs = ids(s
        .submit(
            leader,
            &plans(12, RunPlan::fixed(Duration::from_millis(700))),
        )
        .await?)?;
    wait_for(CHANGE_WAIT, || !running_on(&s, &jobs, leader).is_empty()).await?;
    s.recorder
        .nemesis(format!("SIGTERM node {leader} (the leader)"));
    let left = s.cluster.terminate(leader, Duration::from_secs(10)).await?;
    let Ok(Stopped::Stayed(why)) = &left else {
        panic!("a voter nobody can replace stays a voter: {left:?}");
    };
    assert!(why.contains("voters-target"), "{why}");
    let new_leader = s.leader().await?;
    assert_ne!(new_leader, leader);
    assert_eq!(
        roles(&s.cluster, new_leader).0,
        voters,
        "the voters did not change"
    );
    ids(s
        .submit(
            new_leader,
            &plans(12, RunPlan::fixed(Duration::from_millis(200))),
        )
        .await?)?;

    s.recorder.nemesis(format!("restart node {leader}"));
    s.cluster.restart(leader).await?;
    let back_at = now_us();
    submit_until_it_runs(
        &s,
        leader,
        back_at,
        12,
        Duration::from_millis(200),
        Duration::from_millis(300),
    )
    .await?;
    let now_leader = s.leader().await?;
    assert_eq!(
        roles(&s.cluster, now_leader).0,
        voters,
        "the same three voters"
    );
    s.healed();
    let report = s.finish(SETTLE_MAX).await;
    assert_clean(&report);
    assert_eq!(report.fenced, 0, "the drain cancelled nothing: {report}");
    Ok(())
}

/// SIGTERM on a voter while a caught-up learner can take its place (a scale-down): it drains,
/// the learner replaces it in one joint change (voters stay at 3), and it leaves. Started again
/// with its data, it asks to be admitted and comes back as a learner. Checker clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_on_a_replaceable_voter_hands_over_and_leaves() -> anyhow::Result<()> {
    init_tracing();
    let mut s = Scenario::start_with(4, ChaosOptions::short(), |c| c.voters_target = 3).await?;
    let leader = s.leader().await?;
    let (voters, learners) = roles(&s.cluster, leader);
    assert_eq!(
        (voters.len(), learners.len()),
        (3, 1),
        "{voters:?} {learners:?}"
    );
    let learner = *learners.iter().next().unwrap();
    let victim = *voters.iter().find(|&&v| v != leader).unwrap();
    ids(s
        .submit(
            leader,
            &plans(12, RunPlan::fixed(Duration::from_millis(700))),
        )
        .await?)?;
    s.recorder.nemesis(format!("SIGTERM node {victim}"));
    let left = s.cluster.terminate(victim, Duration::from_secs(10)).await?;
    assert_eq!(left, Ok(Stopped::Left));
    let leader = s.leader().await?;
    let expected: BTreeSet<u64> = voters
        .iter()
        .copied()
        .filter(|&v| v != victim)
        .chain([learner])
        .collect();
    wait_for(CHANGE_WAIT, || roles(&s.cluster, leader).0 == expected).await?;

    s.recorder.nemesis(format!("restart node {victim}"));
    s.cluster.restart(victim).await?;
    wait_for(CHANGE_WAIT, || {
        let (v, l) = roles(&s.cluster, leader);
        v == expected && l.contains(&victim)
    })
    .await?;
    let back_at = now_us();
    submit_until_it_runs(
        &s,
        victim,
        back_at,
        12,
        Duration::from_millis(200),
        Duration::from_millis(300),
    )
    .await?;
    s.healed();
    let report = s.finish(SETTLE_MAX).await;
    assert_clean(&report);
    Ok(())
}

/// SIGTERM to every node of a 3-node cluster at once (`docker compose down`, a host shutdown)
/// while jobs run and wait: each node drains and stops within its drain deadline plus a few
/// seconds, none leaves the membership; started again with their data, the nodes are the same
/// three voters, elect a leader, and every acknowledged job completes exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopping_the_whole_cluster_keeps_it() -> anyhow::Result<()> {
    init_tracing();
    let mut s = Scenario::start(3, ChaosOptions::short()).await?;
    let leader = s.leader().await?;
    let (voters, _) = roles(&s.cluster, leader);
    ids(s
        .submit(leader, &plans(30, RunPlan::fixed(Duration::from_secs(1))))
        .await?)?;
    ids(s
        .submit(
            leader,
            &plans(200, RunPlan::fixed(Duration::from_millis(50))),
        )
        .await?)?;
    let deadline = Duration::from_secs(5);
    s.recorder.nemesis("SIGTERM every node at once".to_string());
    let all = s.cluster.ids();
    let ended = s.cluster.terminate_all(&all, deadline).await?;
    let bound = deadline
        + exactly_node::NodeConfig::default().lease.kill_grace
        + exactly_node::membership::STOP_MARGIN
        + Duration::from_secs(2);
    for (id, left, took) in &ended {
        assert!(
            matches!(left, Ok(Stopped::Stayed(_))),
            "node {id} stays a member: {left:?}"
        );
        assert!(
            *took < bound,
            "node {id} took {took:?} to stop (bound {bound:?})"
        );
        eprintln!("node {id} stopped after {took:?}: {left:?}");
    }
    let restarted = std::time::Instant::now();
    for &id in &all {
        s.recorder.nemesis(format!("restart node {id}"));
        s.cluster.restart(id).await?;
    }
    let leader = s.leader().await?;
    eprintln!(
        "whole cluster back with leader {leader} after {:?}",
        restarted.elapsed()
    );
    assert_eq!(roles(&s.cluster, leader).0, voters, "the same three voters");
    wait_for(CHANGE_WAIT, || {
        s.cluster
            .node(leader)
            .is_some_and(|n| n.read(|t| all.iter().all(|id| t.nodes().contains_key(id))))
    })
    .await?;
    s.healed();
    let report = s.finish(SETTLE_MAX).await;
    assert_clean(&report);
    Ok(())
}

/// A voter dies; `remove` takes it out: its attempts move once its lease has expired (never
/// before), voters drop to 2, and a new node joins and is promoted back to 3. The removed node
/// then comes back with its old data: it learns it was removed, stops campaigning (no member's
/// term moves), registers nothing and runs nothing. Checker clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_removed_dead_voter_is_replaced_and_cannot_come_back() -> anyhow::Result<()> {
    init_tracing();
    let options = ChaosOptions::short();
    let expire_after = options.lease.expire_after;
    let renew_interval = options.lease.renew_interval;
    let mut s = Scenario::start(3, options).await?;
    let leader = s.leader().await?;
    let victim = s.cluster.ids().into_iter().find(|&n| n != leader).unwrap();
    let jobs = ids(s
        .submit(leader, &plans(12, RunPlan::fixed(Duration::from_secs(3))))
        .await?)?;
    wait_for(CHANGE_WAIT, || !running_on(&s, &jobs, victim).is_empty()).await?;
    let held = running_on(&s, &jobs, victim);

    s.recorder.nemesis(format!("crash node {victim}"));
    s.cluster.crash(victim).await?;
    let crashed = std::time::Instant::now();
    s.recorder.nemesis(format!("remove node {victim}"));
    let reply = cluster_client(&s.cluster, leader)
        .await?
        .remove(pb::RemoveRequest { node_id: victim })
        .await?
        .into_inner();
    assert_eq!(reply.node_id, victim);
    wait_for(CHANGE_WAIT, || has_left(&s.cluster, victim)).await?;
    // The removal did not take its attempts: its lease expiry did, a full lease period after
    // its last renewal (which came at most a renew interval before the crash).
    assert!(
        crashed.elapsed() + renew_interval >= expire_after,
        "a dead node's attempts moved before its lease expired ({:?})",
        crashed.elapsed()
    );
    let leader = s.leader().await?;
    assert_eq!(roles(&s.cluster, leader).0.len(), 2);
    let node = s.cluster.node(leader).unwrap();
    assert!(node.read(|t| t.is_removed(victim)));
    for &(job, token) in &held {
        let j = node.read_view(|t| t.job(job)).unwrap();
        let ended = j.attempts.iter().find(|a| a.token == token).unwrap();
        assert!(
            matches!(&ended.end, Some(exactly_core::AttemptEnd::Abandoned { reason }) if reason.contains("expired")),
            "job {job}: {:?}",
            ended.end
        );
        assert!(j
            .attempts
            .iter()
            .any(|a| a.token > token && a.node != victim));
    }
    // Removing it again, or draining it, is refused precisely.
    let again = cluster_client(&s.cluster, leader)
        .await?
        .remove(pb::RemoveRequest { node_id: victim })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again}");

    s.recorder.nemesis("add node 4");
    s.cluster.add(4, |_| {}).await?;
    wait_for(CHANGE_WAIT, || {
        leader_voters(&s.cluster).is_some_and(|v| v.len() == 3 && v.contains(&4))
    })
    .await?;

    // The removed node comes back with its old data.
    let leader = s.leader().await?;
    let terms_before: Vec<(u64, u64)> = s
        .cluster
        .hosts()
        .map(|h| (h.id, h.node().raft.metrics().borrow_watched().current_term))
        .collect();
    s.recorder.nemesis(format!("restart removed node {victim}"));
    let back_at = now_us();
    s.cluster.restart(victim).await?;
    wait_for(CHANGE_WAIT, || {
        s.cluster
            .node(victim)
            .is_some_and(|n| n.departure.is_removed())
    })
    .await?;
    // Several election timeouts (300-600 ms in tests) pass: nobody's term moves. Nor does an
    // AppendEntries in the removed node's name with a higher term, sent to every member: a
    // removed node never leads again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for &(id, term) in &terms_before {
        let addr = s.cluster.node(id).unwrap().peer_addr.clone();
        let mut peer =
            exactly_node::network::internal_client(exactly_node::network::channel(&addr)?);
        let append = openraft::raft::AppendEntriesRequest::<exactly_store::TypeConfig> {
            vote: openraft::Vote::new_committed(term + 5, victim),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        };
        let refused = peer
            .append_entries(exactly_proto::internal::Blob {
                data: exactly_node::codec::encode(&append),
                target: id,
            })
            .await
            .expect_err("an AppendEntries from a removed node");
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
    }
    for (id, term) in terms_before {
        let now = s
            .cluster
            .node(id)
            .unwrap()
            .raft
            .metrics()
            .borrow_watched()
            .current_term;
        assert_eq!(now, term, "node {id}'s term moved");
    }
    assert_eq!(
        s.cluster.leader(),
        Some(leader),
        "the leader did not change"
    );
    ids(s
        .submit(
            leader,
            &plans(24, RunPlan::fixed(Duration::from_millis(100))),
        )
        .await?)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        executions_on_since(&s, victim, back_at),
        0,
        "the removed node ran a job"
    );
    let l = s.cluster.node(leader).unwrap();
    assert!(
        !l.read(|t| t.nodes().contains_key(&victim)),
        "it registered again"
    );
    assert!(!roles(&s.cluster, leader).0.contains(&victim));
    assert!(!roles(&s.cluster, leader).1.contains(&victim));

    s.cluster.stop(victim).await?;
    s.healed();
    let report = s.finish(SETTLE_MAX).await;
    assert_clean(&report);
    Ok(())
}

/// With snapshots every 40 entries and the log purged behind them, a node that joins after the
/// leader's log no longer holds the first jobs' entries can only get them from a snapshot: it
/// ends with every job, identical to the other replicas, and runs new jobs. Checker clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_node_gets_a_snapshot_after_the_log_was_compacted() -> anyhow::Result<()> {
    init_tracing();
    let mut s = Scenario::start_with(3, ChaosOptions::short(), |c| {
        c.raft.snapshot_after_entries = 40;
        c.raft.keep_entries_after_snapshot = 10;
    })
    .await?;
    let leader = s.leader().await?;
    let mut first = Vec::new();
    for _ in 0..10 {
        first.extend(ids(s
            .submit(
                leader,
                &plans(20, RunPlan::fixed(Duration::from_millis(10))),
            )
            .await?)?);
    }
    let node = s.cluster.node(leader).unwrap().clone();
    // Every submit above is at or below this index.
    let submitted_by = node
        .raft
        .metrics()
        .borrow_watched()
        .last_log_index
        .unwrap_or(0);
    wait_for(CHANGE_WAIT, || {
        node.read(|t| t.counts().succeeded) >= first.len() as u64
    })
    .await?;
    // Renewals keep appending: wait until the log is purged past every submit.
    wait_for(CHANGE_WAIT, || {
        node.raft
            .metrics()
            .borrow_watched()
            .purged
            .is_some_and(|p| p.index > submitted_by)
    })
    .await?;
    let purged = node.raft.metrics().borrow_watched().purged.map(|p| p.index);
    drop(node);
    s.recorder
        .nemesis(format!("add node 4 (leader log purged up to {purged:?})"));
    let added_at = now_us();
    s.cluster.add(4, |_| {}).await?;
    wait_for(CHANGE_WAIT, || {
        s.cluster.node(4).is_some_and(|n| {
            n.read_view(|t| {
                first
                    .iter()
                    .all(|&j| t.job(j).is_some_and(|j| j.status.is_terminal()))
            })
        })
    })
    .await?;
    submit_until_it_runs(
        &s,
        4,
        added_at,
        20,
        Duration::from_millis(200),
        Duration::from_millis(300),
    )
    .await?;
    s.healed();
    let report = s.finish(SETTLE_MAX).await;
    assert_clean(&report);
    Ok(())
}

/// A node started with neither --init nor --join waits; `Cluster.Join` (what `exactly cluster
/// join` calls), sent to a follower, has the leader admit it: it becomes a voter (voters were
/// short of the target), registers and runs jobs. Joining it again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_join_admits_a_node_started_without_join() -> anyhow::Result<()> {
    init_tracing();
    let mut s = Scenario::start_with(2, ChaosOptions::short(), |c| c.voters_target = 3).await?;
    let leader = s.leader().await?;
    let follower = if leader == 1 { 2 } else { 1 };
    s.cluster.add(3, |c| c.join.clear()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !roles(&s.cluster, leader).1.contains(&3),
        "not admitted by itself"
    );
    let addr = s
        .cluster
        .endpoints()
        .into_iter()
        .find(|(id, _)| *id == 3)
        .map(|(_, a)| a)
        .unwrap();
    let reply = cluster_client(&s.cluster, follower)
        .await?
        .join(pb::JoinRequest {
            node_id: 3,
            addr: addr.clone(),
        })
        .await?
        .into_inner();
    assert!(reply.voter, "voters were short of the target");
    wait_for(CHANGE_WAIT, || {
        s.cluster
            .node(leader)
            .is_some_and(|n| n.read(|t| t.nodes().contains_key(&3)))
    })
    .await?;
    assert_eq!(roles(&s.cluster, leader).0, BTreeSet::from([1, 2, 3]));
    let again = cluster_client(&s.cluster, leader)
        .await?
        .join(pb::JoinRequest { node_id: 3, addr })
        .await?
        .into_inner();
    assert!(again.voter);
    let added_at = now_us();
    submit_until_it_runs(
        &s,
        3,
        added_at,
        12,
        Duration::from_millis(100),
        Duration::from_millis(300),
    )
    .await?;
    s.healed();
    let report = s.finish(SETTLE_MAX).await;
    assert_clean(&report);
    Ok(())
}

/// The only voter cannot leave: a drain or removal of it is FAILED_PRECONDITION, an unknown
/// node is NOT_FOUND, and SIGTERM drains it (nothing runs) and stops it as the voter it stays. A
/// Raft message addressed to another node id is refused before it is decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_voter_just_stops_and_misaddressed_messages_are_refused() -> anyhow::Result<()> {
    init_tracing();
    let mut s = Scenario::start(1, ChaosOptions::short()).await?;
    let mut client = cluster_client(&s.cluster, 1).await?;
    let err = client
        .drain(pb::DrainRequest {
            node_id: 1,
            deadline_ms: 1_000,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("only voter"), "{err}");
    let err = client
        .remove(pb::RemoveRequest { node_id: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let err = client
        .drain(pb::DrainRequest {
            node_id: 42,
            deadline_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    let err = client
        .drain(pb::DrainRequest {
            node_id: 1,
            deadline_ms: 2 * 24 * 3600 * 1000,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

    let addr = s.cluster.endpoints()[0].1.clone();
    let mut internal =
        exactly_proto::internal::internal_client::InternalClient::connect(format!("http://{addr}"))
            .await?;
    let err = internal
        .vote(exactly_proto::internal::Blob {
            data: vec![0xff; 4],
            target: 9,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("not node 9"), "{err}");

    let started = std::time::Instant::now();
    let left = s.cluster.terminate(1, Duration::from_secs(30)).await?;
    let Ok(Stopped::Stayed(why)) = left else {
        panic!("the only voter stays one: {left:?}");
    };
    assert!(why.contains("voters-target"), "{why}");
    assert!(started.elapsed() < Duration::from_secs(10));
    Ok(())
}

/// The only voter, drained while a learner is caught up, hands over: one joint change makes the
/// learner the voter, the old leader steps down and leaves, and the new one leads and runs jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_only_voter_hands_over_to_a_learner_when_drained() -> anyhow::Result<()> {
    init_tracing();
    let mut s = Scenario::start_with(2, ChaosOptions::short(), |c| c.voters_target = 1).await?;
    let leader = s.leader().await?;
    assert_eq!(
        roles(&s.cluster, leader),
        (BTreeSet::from([1]), BTreeSet::from([2]))
    );
    ids(s
        .submit(1, &plans(8, RunPlan::fixed(Duration::from_millis(300))))
        .await?)?;
    s.recorder.nemesis("drain node 1, the only voter");
    cluster_client(&s.cluster, 2)
        .await?
        .drain(pb::DrainRequest {
            node_id: 1,
            deadline_ms: 10_000,
        })
        .await?;
    wait_for(CHANGE_WAIT, || {
        s.cluster.leader() == Some(2) && has_left(&s.cluster, 1)
    })
    .await?;
    assert_eq!(roles(&s.cluster, 2), (BTreeSet::from([2]), BTreeSet::new()));
    s.cluster.stop(1).await?;
    ids(s
        .submit(2, &plans(8, RunPlan::fixed(Duration::from_millis(100))))
        .await?)?;
    s.healed();
    let report = s.finish(SETTLE_MAX).await;
    assert_clean(&report);
    Ok(())
}

/// A follower is recreated at a new address with its data (a container with a new host name):
/// it asks to be admitted again, the leader replaces its address in the membership, and it gets
/// the log and runs jobs again. Checker clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_back_at_a_new_address_gets_the_log_there() -> anyhow::Result<()> {
    init_tracing();
    let mut s = Scenario::start(3, ChaosOptions::short()).await?;
    let leader = s.leader().await?;
    let follower = *s
        .cluster
        .ids()
        .iter()
        .find(|&&id| id != leader)
        .expect("3 nodes");
    ids(s
        .submit(
            leader,
            &plans(12, RunPlan::fixed(Duration::from_millis(300))),
        )
        .await?)?;
    s.recorder.nemesis(format!("kill node {follower}"));
    s.cluster.crash(follower).await?;
    let old_addr = member_addr(&s.cluster, leader, follower).expect("a member");
    s.recorder
        .nemesis(format!("restart node {follower} at a new address"));
    let new_addr = s.cluster.restart_at_new_address(follower).await?;
    assert_ne!(old_addr, new_addr);
    wait_for(CHANGE_WAIT, || {
        s.cluster
            .leader()
            .and_then(|l| member_addr(&s.cluster, l, follower))
            .is_some_and(|a| a == new_addr)
    })
    .await?;
    let back_at = now_us();
    submit_until_it_runs(
        &s,
        follower,
        back_at,
        12,
        Duration::from_millis(100),
        Duration::from_millis(300),
    )
    .await?;
    s.healed();
    let report = s.finish(SETTLE_MAX).await;
    assert_clean(&report);
    Ok(())
}

/// `node`'s address in `via`'s view of the Raft membership.
fn member_addr(cluster: &FaultyCluster, via: u64, node: u64) -> Option<String> {
    let n = cluster.node(via)?;
    let m = n.raft.metrics().borrow_watched().membership_config.clone();
    m.membership().get_node(&node).map(|b| b.addr.clone())
}

/// A learner whose renewals reach the leader but that gets no log from it (every Raft request to
/// it is lost, as when the leader dials a stale address; its forwarded renewals and their
/// replies still get through) loses its lease: its renewals are refused once it is
/// `RENEW_APPLY_LAG_MAX_MS` behind, it fences itself, and its jobs rerun elsewhere. Healed, it
/// catches up and runs jobs again. Checker clean: no overlap, nothing lost or run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_gets_no_log_loses_its_lease() -> anyhow::Result<()> {
    /// Long enough that the held jobs cannot simply finish on the cut-off node.
    const JOB_RUNS: Duration = Duration::from_secs(20);
    init_tracing();
    // The victim is a learner: a voter without log would campaign and lose track of the leader
    // (and its renewals with it); a learner keeps forwarding to the leader it knows.
    let mut s = Scenario::start(3, ChaosOptions::short()).await?;
    let victim = 4;
    s.cluster.add(victim, |_| {}).await?;
    wait_for(CHANGE_WAIT, || {
        s.cluster.leader().is_some_and(|l| {
            roles(&s.cluster, l).1.contains(&victim)
                && s.cluster
                    .node(l)
                    .is_some_and(|n| n.read(|t| t.nodes().contains_key(&victim)))
        })
    })
    .await?;
    let leader = s.leader().await?;
    let jobs = ids(s
        .submit(leader, &plans(32, RunPlan::fixed(JOB_RUNS)))
        .await?)?;
    wait_for(CHANGE_WAIT, || !running_on(&s, &jobs, victim).is_empty()).await?;
    let held = running_on(&s, &jobs, victim);
    s.recorder.nemesis(format!(
        "lose every Raft request to node {victim} (its forwards and all replies pass)"
    ));
    for other in s.cluster.ids() {
        if other != victim {
            s.cluster.faults().cut_raft_requests(other, victim);
        }
    }
    // Its lease runs out: the jobs it held get new attempts on other nodes long before they
    // could have finished on it. (Read on the leader: the victim's own replica is frozen.)
    let cut_at = std::time::Instant::now();
    wait_for(JOB_RUNS - Duration::from_secs(2), || {
        let Some(l) = s.cluster.leader().and_then(|l| s.cluster.node(l)) else {
            return false;
        };
        l.read_view(|t| {
            held.iter().all(|(job, token)| {
                t.job(*job).is_some_and(|j| {
                    j.attempts
                        .iter()
                        .any(|a| a.node != victim && a.token > *token)
                })
            })
        })
    })
    .await?;
    eprintln!(
        "jobs held by the node without log moved on after {:?}",
        cut_at.elapsed()
    );
    // And it does not get a lease back while it gets no log (by renewing, or by registering a
    // new incarnation once the leader expired the old one): sampled for 3 renew intervals past
    // a full lease cycle (self-fence + expiry + the lag window).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut held_lease = 0;
    for _ in 0..30 {
        if s.cluster.node(victim).is_some_and(|n| n.lease_valid()) {
            held_lease += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        held_lease, 0,
        "the node without log held a valid lease in {held_lease} of 30 samples"
    );
    s.recorder.nemesis("heal");
    s.cluster.faults().heal();
    // Healed, it catches up, registers and runs jobs again.
    let back_at = now_us();
    submit_until_it_runs(
        &s,
        victim,
        back_at,
        12,
        Duration::from_millis(100),
        Duration::from_millis(300),
    )
    .await?;
    s.healed();
    let report = s.finish(SETTLE_MAX).await;
    assert_clean(&report);
    Ok(())
}

/// SIGTERM on a node whose cluster has no quorum (the other two voters are gone: the whole
/// cluster is being stopped) does not wait for a drain that cannot commit: it stops as a member
/// within `DRAIN_COMMIT_WAIT_MAX` and a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_without_quorum_stops_without_leaving() -> anyhow::Result<()> {
    init_tracing();
    let mut s = Scenario::start(3, ChaosOptions::short()).await?;
    let leader = s.leader().await?;
    for id in s.cluster.ids() {
        if id != leader {
            s.recorder.nemesis(format!("kill node {id}"));
            s.cluster.crash(id).await?;
        }
    }
    let started = std::time::Instant::now();
    let left = s.cluster.terminate(leader, Duration::from_secs(20)).await?;
    let took = started.elapsed();
    assert!(
        matches!(left, Ok(Stopped::Stayed(_))),
        "it cannot have left: {left:?}"
    );
    let bound = exactly_node::membership::DRAIN_COMMIT_WAIT_MAX + Duration::from_secs(8);
    assert!(took < bound, "SIGTERM without quorum took {took:?}");
    eprintln!("SIGTERM without quorum: stopped after {took:?}: {left:?}");
    Ok(())
}
