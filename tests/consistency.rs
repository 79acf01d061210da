//! How fresh reads are (in-process 3-node clusters over loopback gRPC): a write's reply carries
//! its log position, a read on the node that took the write sees it at once, a read that asks
//! for a position (`exactly-min-index`) or for linearizability (`exactly-read`) waits for it or
//! says it cannot, and a restarted node is not ready before it has applied what was committed
//! when it started.

use openraft::async_runtime::WatchReceiver;
use std::time::{Duration, Instant};

use exactly_proto::v1 as pb;
use exactly_tests::{wait_for, TestCluster};
use tonic::Request;

/// The index of the leader among the cluster's nodes, and of one follower.
fn leader_and_follower(cluster: &TestCluster) -> (usize, usize) {
    let leader = cluster
        .nodes
        .iter()
        .position(|n| n.node.is_leader())
        .expect("a leader");
    let follower = (0..cluster.nodes.len()).find(|&i| i != leader).unwrap();
    (leader, follower)
}

fn index_of<T>(reply: &tonic::Response<T>) -> u64 {
    reply
        .metadata()
        .get("exactly-index")
        .expect("every reply carries exactly-index")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn delayed_job() -> pb::JobSpec {
    pb::JobSpec {
        kind: "noop".into(),
        delay_ms: 3_600_000,
        ..Default::default()
    }
}

/// Cancel and Redrive sent to a follower, then Get on that same follower, 40 times each: the
/// Get always shows the write (the follower answers a write only once it has applied it too),
/// and every reply carries the log position it reflects.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_through_a_follower_is_read_there_at_once() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3, |_| {}).await?;
    let (_, follower) = leader_and_follower(&cluster);
    let mut jobs = cluster.jobs_client(follower).await?;
    let mut dead =
        pb::dead_letters_client::DeadLettersClient::connect(cluster.endpoints()[follower].clone())
            .await?;
    let mut stale = 0;
    for round in 0..40 {
        let submitted = jobs
            .submit(pb::SubmitRequest {
                jobs: vec![delayed_job()],
            })
            .await?;
        let at = index_of(&submitted);
        let id = submitted.into_inner().job_ids[0];
        let cancelled = jobs.cancel(pb::CancelRequest { job_ids: vec![id] }).await?;
        assert!(index_of(&cancelled) > at, "round {round}");
        let got = jobs
            .get(pb::GetRequest {
                job_id: id,
                ..Default::default()
            })
            .await?;
        assert!(index_of(&got) >= index_of(&cancelled), "round {round}");
        if got.into_inner().job.unwrap().state != pb::JobState::Cancelled as i32 {
            stale += 1;
        }
    }
    assert_eq!(
        stale, 0,
        "{stale} of 40 Gets after a Cancel showed the old state"
    );

    // Dead letters to redrive: `fail` with a permanent failure dies at once.
    let failing = pb::JobSpec {
        kind: "fail".into(),
        payload: b"permanent".to_vec(),
        ..Default::default()
    };
    let ids = jobs
        .submit(pb::SubmitRequest {
            jobs: vec![failing; 40],
        })
        .await?
        .into_inner()
        .job_ids;
    let node = &cluster.nodes[follower].node;
    wait_for(Duration::from_secs(20), || {
        node.read_view(|t| {
            ids.iter().all(|id| {
                t.job(*id)
                    .is_some_and(|j| j.status == exactly_core::JobStatus::Dead)
            })
        })
    })
    .await?;
    for &id in &ids {
        dead.redrive(pb::DeadLetterFilter {
            job_ids: vec![id],
            ..Default::default()
        })
        .await?;
        let job = jobs
            .get(pb::GetRequest {
                job_id: id,
                ..Default::default()
            })
            .await?
            .into_inner()
            .job
            .unwrap();
        if job.state == pb::JobState::Dead as i32 && job.attempts.len() < 2 {
            stale += 1;
        }
    }
    assert_eq!(
        stale, 0,
        "{stale} of 40 Gets after a Redrive showed the old state"
    );
    cluster.shutdown().await;
    Ok(())
}

/// A read that asks for a position (`exactly-min-index`) is answered once the node has applied
/// it; one no node can reach is UNAVAILABLE within about a second (the client goes elsewhere);
/// a linearizable read on a follower reflects a write made through the leader just before; bad
/// header values are INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_wait_for_the_position_they_ask_for() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3, |_| {}).await?;
    let (leader, follower) = leader_and_follower(&cluster);
    let mut on_leader = cluster.jobs_client(leader).await?;
    let mut on_follower = cluster.jobs_client(follower).await?;
    for _ in 0..20 {
        let reply = on_leader
            .submit(pb::SubmitRequest {
                jobs: vec![delayed_job()],
            })
            .await?;
        let at = index_of(&reply);
        let id = reply.into_inner().job_ids[0];
        let mut get = Request::new(pb::GetRequest {
            job_id: id,
            ..Default::default()
        });
        get.metadata_mut()
            .insert("exactly-min-index", at.to_string().parse()?);
        let got = on_follower.get(get).await?;
        assert!(index_of(&got) >= at);
        assert_eq!(got.into_inner().job.unwrap().id, id);

        let reply = on_leader
            .cancel(pb::CancelRequest { job_ids: vec![id] })
            .await?;
        let mut get = Request::new(pb::GetRequest {
            job_id: id,
            ..Default::default()
        });
        get.metadata_mut()
            .insert("exactly-read", "linearizable".parse()?);
        let got = on_follower.get(get).await?;
        assert!(index_of(&got) >= index_of(&reply));
        assert_eq!(
            got.into_inner().job.unwrap().state,
            pb::JobState::Cancelled as i32
        );
    }
    let mut list = Request::new(pb::ListRequest::default());
    list.metadata_mut()
        .insert("exactly-min-index", "1000000000".parse()?);
    let started = Instant::now();
    let err = on_follower.list(list).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    assert!(err.message().contains("ask another node"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    for (header, value) in [("exactly-min-index", "soon"), ("exactly-read", "strong")] {
        let mut list = Request::new(pb::ListRequest::default());
        list.metadata_mut().insert(header, value.parse()?);
        let err = on_follower.list(list).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{header}: {err}");
        assert!(err.message().contains(header), "{err}");
    }
    cluster.shutdown().await;
    Ok(())
}

/// The Rust client remembers the largest position it saw and asks for it on every read, so a
/// job it cancelled through one node reads as cancelled through any other; with
/// `linearizable_reads` it also sees a write another client made through another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_rust_client_reads_its_writes_on_any_node() -> anyhow::Result<()> {
    let cluster = TestCluster::start(3, |_| {}).await?;
    let endpoints = cluster.endpoints();
    for round in 0..20usize {
        // A client per node, so that the write and the read go to different nodes.
        let writer = exactly_client::Client::connect(vec![endpoints[round % 3].clone()])?;
        let id = writer
            .submit_one(exactly_client::JobSpec {
                kind: "noop".into(),
                delay_ms: 3_600_000,
                ..Default::default()
            })
            .await?;
        writer.cancel(vec![id]).await?;
        let seen = writer.seen_index();
        assert!(seen > 0);
        let reader = exactly_client::Client::connect_with(
            vec![endpoints[(round + 1) % 3].clone()],
            exactly_client::ClientOptions {
                linearizable_reads: true,
                ..Default::default()
            },
        )?;
        let job = reader.get(id).await?;
        assert_eq!(job.state, pb::JobState::Cancelled as i32, "round {round}");
        assert!(reader.seen_index() >= seen, "round {round}");
    }
    cluster.shutdown().await;
    Ok(())
}

/// A follower stopped while the cluster commits 300 more entries is not ready when it starts
/// again until it has applied everything the leader had committed by then (before, it answered
/// ready with its pre-crash state, tens of entries behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_is_ready_only_once_caught_up() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3, |_| {}).await?;
    let (leader, follower) = leader_and_follower(&cluster);
    let stopped = cluster.nodes.remove(follower);
    let config = stopped.node.config.clone();
    stopped.shutdown().await;
    let leader = if follower < leader {
        leader - 1
    } else {
        leader
    };
    let mut jobs = cluster.jobs_client(leader).await?;
    for _ in 0..300 {
        jobs.submit(pb::SubmitRequest {
            jobs: vec![delayed_job()],
        })
        .await?;
    }
    let committed = cluster.nodes[leader]
        .node
        .raft
        .metrics()
        .borrow_watched()
        .last_applied
        .map_or(0, |l| l.index);
    let mut registry = exactly_handlers::Registry::with_builtins();
    config.register_kinds(&mut registry)?;
    let node = exactly_node::start(config, registry).await?;
    let started = Instant::now();
    let mut checks = 0;
    loop {
        checks += 1;
        let applied = node.node.state.last_applied().map_or(0, |l| l.index);
        match node.node.not_ready() {
            None => {
                assert!(
                    applied >= committed,
                    "ready at {applied}, behind the {committed} committed when it started"
                );
                break;
            }
            Some(why) => {
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(30),
                    "not ready after 30 s: {why}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    eprintln!(
        "restarted node ready after {:?} ({checks} checks), at or past index {committed}",
        started.elapsed()
    );
    node.shutdown().await;
    cluster.shutdown().await;
    Ok(())
}
