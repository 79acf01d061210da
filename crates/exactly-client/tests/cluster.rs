//! The client against real in-process nodes (openraft, sled in a temporary directory, gRPC on
//! loopback): idempotent submits, a watch that outlives the node it was connected to, and one
//! round trip through every other call the server implements here.

use std::time::Duration;

use exactly_client::{
    CancelResultExt, Client, ClientOptions, Code, ConfigureQueueRequest, DeadLetterFilter, JobSpec,
    JobState, ListRequest, RateLimitSpec, WatchScope,
};
use exactly_handlers::Registry;
use exactly_node::{NodeConfig, RunningNode};

/// A node on loopback with an ephemeral port and fast elections.
fn config(dir: &std::path::Path, node_id: u64) -> NodeConfig {
    let mut c = NodeConfig {
        node_id: Some(node_id),
        data_dir: dir.join(format!("node-{node_id}")),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..NodeConfig::default()
    };
    c.raft.heartbeat_interval = Duration::from_millis(50);
    c.raft.election_timeout_min = Duration::from_millis(300);
    c.raft.election_timeout_max = Duration::from_millis(600);
    c.limits.propose_timeout = Duration::from_secs(3);
    c
}

/// Starts `n` nodes (node 1 bootstraps, the others join it) and waits until every node has
/// registered all of them.
async fn cluster(dir: &std::path::Path, n: u64) -> anyhow::Result<Vec<RunningNode>> {
    let mut first = config(dir, 1);
    first.init = true;
    let mut nodes = vec![exactly_node::start(first, Registry::with_builtins()).await?];
    for id in 2..=n {
        let mut c = config(dir, id);
        c.join = vec![nodes[0].addr.clone()];
        nodes.push(exactly_node::start(c, Registry::with_builtins()).await?);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !nodes
        .iter()
        .all(|node| node.node.read(|t| t.nodes().len()) == n as usize)
    {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "nodes did not register"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(nodes)
}

fn endpoints(nodes: &[RunningNode]) -> Vec<String> {
    nodes.iter().map(|n| format!("http://{}", n.addr)).collect()
}

fn is_terminal(state: JobState) -> bool {
    matches!(
        state,
        JobState::Succeeded | JobState::Dead | JobState::Cancelled
    )
}

/// Reads events until `job` reaches a terminal state; returns every event's position and that
/// state. Fails after 60 s.
async fn until_finished(
    watch: &mut exactly_client::Watch,
    job: u64,
    positions: &mut Vec<(u64, u32)>,
) -> anyhow::Result<JobState> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let event = tokio::time::timeout_at(deadline, watch.next()).await??;
        let p = event.position.unwrap_or_default();
        positions.push((p.index, p.seq));
        if event.job_id == job && is_terminal(event.state()) {
            return Ok(event.state());
        }
    }
}

/// A keyed submit repeated returns the original job and creates nothing; the same key with
/// another payload is ALREADY_EXISTS and creates nothing. A watch from now sees the job run; its
/// node is then shut down, and the watch resumes on another node and sees the next job run,
/// with every event position strictly increasing (no event twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyed_submits_and_a_watch_that_outlives_its_node() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut nodes = cluster(dir.path(), 3).await?;
    let client = Client::connect_with(endpoints(&nodes), ClientOptions::default())?;
    let mut watch = client.watch(WatchScope::All, None).await?;
    let mut positions = Vec::new();

    let job = JobSpec {
        kind: "noop".into(),
        payload: b"receipt 17".to_vec(),
        idempotency_key: "order-17-receipt".into(),
        ..JobSpec::default()
    };
    let first = client.submit_detailed(vec![job.clone()]).await?;
    let again = client.submit_detailed(vec![job.clone()]).await?;
    assert!(!first.jobs[0].existing);
    assert!(again.jobs[0].existing);
    assert_eq!(first.jobs[0].id, again.jobs[0].id);
    let conflicting = JobSpec {
        payload: b"receipt 18".to_vec(),
        ..job
    };
    let err = client.submit(vec![conflicting]).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err}");
    let listed = client.list(ListRequest::default()).await?;
    assert_eq!(listed.jobs.len(), 1, "one job exists: {:?}", listed.jobs);

    let id = first.jobs[0].id;
    let state = until_finished(&mut watch, id, &mut positions).await?;
    assert_eq!(state, JobState::Succeeded);

    // Shut down the node the watch is connected to; the client moves on by itself.
    let watched = watch.endpoint();
    let gone = nodes
        .iter()
        .position(|n| format!("http://{}", n.addr) == watched)
        .expect("the watch uses one of the nodes");
    nodes.remove(gone).shutdown().await;
    let second = client
        .submit_one(JobSpec {
            kind: "noop".into(),
            ..JobSpec::default()
        })
        .await?;
    let state = until_finished(&mut watch, second, &mut positions).await?;
    assert_eq!(state, JobState::Succeeded);
    assert!(watch.reconnects() >= 1);
    assert_ne!(watch.endpoint(), watched);
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "positions strictly increase: {positions:?}"
    );

    for node in nodes {
        node.shutdown().await;
    }
    Ok(())
}

/// Every other call once against one real node: a delayed job is listed as pending and
/// cancelled (codes per job: OK, NOT_FOUND for an unknown id, FAILED_PRECONDITION when
/// cancelled again); a permanently failing job lands in dead letters, is redriven by queue,
/// dies again, is refused an empty Purge (INVALID_ARGUMENT, still dead), is redriven with
/// `all`, dies again and is purged; a queue is configured and listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_cancel_dead_letters_and_queues() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let nodes = cluster(dir.path(), 1).await?;
    let client = Client::connect(endpoints(&nodes))?;

    let delayed = client
        .submit_one(JobSpec {
            kind: "noop".into(),
            queue: "later".into(),
            delay_ms: 600_000,
            ..JobSpec::default()
        })
        .await?;
    let pending = client
        .list(ListRequest {
            state: JobState::Pending as i32,
            queue: "later".into(),
            ..ListRequest::default()
        })
        .await?;
    assert_eq!(
        pending.jobs.iter().map(|j| j.id).collect::<Vec<_>>(),
        [delayed]
    );
    let results = client.cancel(vec![delayed, 999_999]).await?;
    assert_eq!(results[0].previous_state(), JobState::Pending);
    assert!(results[0].error.is_empty());
    assert!(results[0].cancelled());
    assert_eq!(results[0].status_code(), Code::Ok);
    assert!(
        !results[1].error.is_empty(),
        "an unknown job is not cancelled"
    );
    assert_eq!(results[1].status_code(), Code::NotFound, "{:?}", results[1]);
    assert_eq!(client.get(delayed).await?.state(), JobState::Cancelled);
    let again = client.cancel(vec![delayed]).await?;
    assert!(!again[0].cancelled());
    assert_eq!(
        again[0].status_code(),
        Code::FailedPrecondition,
        "a finished job: {:?}",
        again[0]
    );

    let doomed = client
        .submit_one(JobSpec {
            kind: "fail".into(),
            queue: "doomed".into(),
            payload: b"permanent".to_vec(),
            ..JobSpec::default()
        })
        .await?;
    let mut watch = client.watch(WatchScope::Job(doomed), None).await?;
    // The watch may have started after the job died: check the job itself too.
    let dead = |client: Client| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if client.get(doomed).await?.state() == JobState::Dead {
                return anyhow::Ok(());
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "job never died");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    dead(client.clone()).await?;
    let filter = DeadLetterFilter {
        queue: "doomed".into(),
        ..DeadLetterFilter::default()
    };
    assert_eq!(client.redrive(filter.clone()).await?, [doomed]);
    // The redriven job is pending again, runs and dies again: the watch sees it. (Its first
    // Pending event came before the watch opened, so a Pending event here is the redrive's.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut redriven = false;
    loop {
        let event = tokio::time::timeout_at(deadline, watch.next()).await??;
        assert_eq!(
            event.job_id, doomed,
            "a job-scoped watch sees that job only"
        );
        redriven |= event.state() == JobState::Pending;
        if redriven && event.state() == JobState::Dead {
            break;
        }
    }
    dead(client.clone()).await?;
    // An empty filter is refused (it used to purge every dead letter); `all` selects them all.
    let err = client.purge(DeadLetterFilter::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert_eq!(client.get(doomed).await?.state(), JobState::Dead);
    let all = DeadLetterFilter {
        all: true,
        ..DeadLetterFilter::default()
    };
    assert_eq!(client.redrive(all).await?, [doomed]);
    dead(client.clone()).await?;
    assert_eq!(client.purge(filter).await?, [doomed]);
    let err = client.get(doomed).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");

    let info = client
        .configure_queue(ConfigureQueueRequest {
            queue: "mail".into(),
            concurrency_max: Some(2),
            rate: Some(RateLimitSpec {
                jobs: 10,
                period_ms: 1_000,
            }),
            paused: Some(true),
            ..ConfigureQueueRequest::default()
        })
        .await?;
    assert_eq!(
        (info.concurrency_max, info.paused, info.rate.map(|r| r.jobs)),
        (2, true, Some(10))
    );
    let queues = client.list_queues().await?;
    assert!(
        queues.iter().any(|q| q.name == "mail" && q.paused),
        "{queues:?}"
    );

    for node in nodes {
        node.shutdown().await;
    }
    Ok(())
}
