//! In-process cluster tests: real nodes (openraft, sled, gRPC on loopback) in one process.

use openraft::async_runtime::WatchReceiver;
use std::time::{Duration, Instant};

use exactly_proto::v1 as pb;
use exactly_tests::{http_get, ledger_job, wait_for, TestCluster, LEDGER_KIND};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,openraft=error".into()),
        )
        .with_test_writer()
        .try_init();
}

/// 10,000 jobs submitted in batches through all three nodes: every job completes, none runs
/// twice (the ledger counts executions), and all three state machines end identical. Every job
/// carries an idempotency key, so a batch whose outcome is unknown (a slow commit on a busy
/// machine answers DEADLINE_EXCEEDED) is sent again with the same keys, as a client would: the
/// repeat returns the original jobs, and the exactly-once checks below still count executions.
/// 40 batches of 250 arrive at once, so a node may refuse one as overloaded (RESOURCE_EXHAUSTED
/// with a `retry-after-ms` hint, nothing proposed); the submitter waits out the hint and resends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_jobs_run_exactly_once_on_three_nodes() -> anyhow::Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3, |_| {}).await?;
    const JOBS: usize = 10_000;
    const BATCH: usize = 250;
    // Retries are bounded in time, not in count: on a busy CI machine a node stayed over its
    // admission limits for longer than ten 100 ms hints.
    const RETRY_FOR: Duration = Duration::from_secs(60);
    let mut submitters = Vec::new();
    for s in 0..(JOBS / BATCH) {
        let mut client = cluster.jobs_client(s % 3).await?;
        submitters.push(tokio::spawn(async move {
            let jobs: Vec<pb::JobSpec> = (0..BATCH)
                .map(|i| pb::JobSpec {
                    idempotency_key: format!("batch-{s}-job-{i}"),
                    ..ledger_job(format!("{s}-{i}").as_bytes())
                })
                .collect();
            let retry_until = Instant::now() + RETRY_FOR;
            loop {
                let request = pb::SubmitRequest { jobs: jobs.clone() };
                match client.submit(request).await {
                    Ok(r) => return Ok(r.into_inner().job_ids),
                    // An overload refusal proposed nothing and names when to come back.
                    Err(status)
                        if Instant::now() < retry_until
                            && status.code() == tonic::Code::ResourceExhausted
                            && status.metadata().get("retry-after-ms").is_some() =>
                    {
                        let hint = status
                            .metadata()
                            .get("retry-after-ms")
                            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                            .unwrap_or(100);
                        tokio::time::sleep(Duration::from_millis(hint)).await;
                    }
                    Err(status)
                        if Instant::now() < retry_until
                            && matches!(
                                status.code(),
                                tonic::Code::DeadlineExceeded
                                    | tonic::Code::Unknown
                                    | tonic::Code::Unavailable
                            ) =>
                    {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(status) => return Err(status),
                }
            }
        }));
    }
    let mut ids = Vec::new();
    for s in submitters {
        ids.extend(s.await??);
    }
    assert_eq!(ids.len(), JOBS);
    let mut unique = ids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), JOBS, "job ids are unique");

    wait_for(Duration::from_secs(120), || {
        cluster
            .nodes
            .iter()
            .all(|n| n.node.read(|t| t.counts().succeeded) == JOBS as u64)
    })
    .await?;

    let counts = cluster.ledger.counts();
    assert_eq!(counts.len(), JOBS, "every job executed");
    let twice: Vec<_> = counts.iter().filter(|(_, &c)| c != 1).collect();
    assert!(twice.is_empty(), "jobs executed more than once: {twice:?}");
    for id in &ids {
        assert!(counts.contains_key(id), "job {id} never executed");
    }
    // Executions spread over all three nodes.
    let mut per_node = std::collections::BTreeMap::new();
    for e in cluster.ledger.executions() {
        *per_node.entry(e.node).or_insert(0) += 1;
    }
    assert_eq!(per_node.len(), 3, "all nodes executed jobs: {per_node:?}");

    // All replicas converge to identical state. Lease renewals keep applying, so compare
    // snapshots taken at one applied index (unchanged across the read on every node).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let tables = loop {
        let reads: Vec<_> = cluster
            .nodes
            .iter()
            .map(|n| {
                let before = n.node.state.last_applied();
                let table = n.node.read(exactly_store::in_memory);
                (before, table, n.node.state.last_applied())
            })
            .collect();
        let stable = reads.iter().all(|(b, _, a)| b == a);
        let same_index = reads.windows(2).all(|w| w[0].0 == w[1].0);
        if stable && same_index {
            break reads.into_iter().map(|(_, t, _)| t).collect::<Vec<_>>();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replicas never met at one index"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(
        tables[0] == tables[1] && tables[1] == tables[2],
        "state machines differ"
    );
    tables[0].check_invariants().map_err(anyhow::Error::msg)?;
    cluster.shutdown().await;
    Ok(())
}

/// Bad input is refused at the edge with a precise status and nothing is committed: an unknown
/// kind gets INVALID_ARGUMENT, an oversize payload RESOURCE_EXHAUSTED, an empty submit
/// INVALID_ARGUMENT, and Get of a missing job NOT_FOUND.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_refused_before_anything_is_committed() -> anyhow::Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3, |c| c.limits.payload_bytes_max = 1024).await?;
    // Let registrations and the leader's blank entry settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log_index = |c: &TestCluster| {
        c.nodes
            .iter()
            .map(|n| {
                n.node
                    .raft
                    .metrics()
                    .borrow_watched()
                    .last_log_index
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    };
    let before = log_index(&cluster);
    for i in 0..3 {
        let mut client = cluster.jobs_client(i).await?;
        let unknown = pb::JobSpec {
            kind: "no-such-kind".into(),
            ..Default::default()
        };
        let err = client
            .submit(pb::SubmitRequest {
                jobs: vec![ledger_job(b"ok"), unknown],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("no-such-kind"), "{}", err.message());

        let big = ledger_job(&vec![0u8; 1025]);
        let err = client
            .submit(pb::SubmitRequest { jobs: vec![big] })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert!(
            err.message().contains("payload-bytes-max"),
            "{}",
            err.message()
        );

        let err = client
            .submit(pb::SubmitRequest { jobs: vec![] })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);

        let too_many = (0..1001).map(|_| ledger_job(b"")).collect();
        let err = client
            .submit(pb::SubmitRequest { jobs: too_many })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);

        let err = client
            .get(pb::GetRequest {
                job_id: 999_999,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
    }
    // Lease renewals keep appending; no Submit may have been.
    let after = log_index(&cluster);
    for n in &cluster.nodes {
        let mut reader = n.node.store.log_store();
        let entries = openraft::storage::RaftLogReader::try_get_log_entries(
            &mut reader,
            before + 1..after + 1,
        )
        .await?;
        for e in entries {
            if let openraft::EntryPayload::Normal(req) = &e.payload {
                assert!(
                    !matches!(req.command, exactly_core::Command::Submit(_)),
                    "a submit was committed at {}",
                    e.log_id.index
                );
            }
        }
    }
    for n in &cluster.nodes {
        assert_eq!(n.node.read_view(|t| t.all_jobs().len()), 0);
    }
    assert!(cluster.ledger.executions().is_empty());
    cluster.shutdown().await;
    Ok(())
}

/// The gRPC health of a node's whole server ("").
async fn health(addr: &str) -> anyhow::Result<i32> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(reply.into_inner().status)
}

/// A node that cannot reach a quorum answers a submit with UNAVAILABLE within a bounded time
/// (the propose timeout plus a margin) instead of hanging, and commits nothing; its gRPC health
/// follows its readiness, SERVING before and NOT_SERVING once it has no leader or lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_quorum_gives_unavailable_in_bounded_time() -> anyhow::Result<()> {
    use tonic_health::pb::health_check_response::ServingStatus;
    init_tracing();
    let mut cluster = TestCluster::start(3, |c| {
        c.limits.propose_timeout = Duration::from_secs(2);
    })
    .await?;
    let serving = ServingStatus::Serving as i32;
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&cluster.nodes[0].addr).await? != serving {
        assert!(
            Instant::now() < deadline,
            "a ready node's health is not SERVING"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stop two of three nodes; the survivor has no quorum whether or not it led.
    let survivor = cluster.nodes.remove(0);
    for n in cluster.nodes.drain(..) {
        n.shutdown().await;
    }
    // A write a leader accepted just before losing its quorum ends with DEADLINE_EXCEEDED
    // (outcome unknown). Once the leader's last quorum confirmation is older than the election
    // timeout (600 ms here), it proposes nothing and answers UNAVAILABLE.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut client =
        pb::jobs_client::JobsClient::connect(format!("http://{}", survivor.addr)).await?;
    for _ in 0..2 {
        let started = Instant::now();
        let err = client
            .submit(pb::SubmitRequest {
                jobs: vec![ledger_job(b"x")],
            })
            .await
            .unwrap_err();
        let took = started.elapsed();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(took < Duration::from_secs(4), "took {took:?}");
    }
    assert_eq!(survivor.node.read_view(|t| t.all_jobs().len()), 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&survivor.addr).await? != ServingStatus::NotServing as i32 {
        assert!(
            Instant::now() < deadline,
            "a node without a quorum stays SERVING"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    survivor.shutdown().await;
    Ok(())
}

/// A job submitted through a follower is readable through every node, and its record names the
/// node and fencing token of its single attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_through_any_node_shows_the_attempt() -> anyhow::Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3, |_| {}).await?;
    let mut client = cluster.jobs_client(2).await?;
    let id = client
        .submit(pb::SubmitRequest {
            jobs: vec![ledger_job(b"hello")],
        })
        .await?
        .into_inner()
        .job_ids[0];
    cluster.wait_succeeded(id, Duration::from_secs(10)).await?;
    for i in 0..3 {
        let job = cluster
            .jobs_client(i)
            .await?
            .get(pb::GetRequest {
                job_id: id,
                ..Default::default()
            })
            .await?
            .into_inner()
            .job
            .unwrap();
        assert_eq!(job.state, pb::JobState::Succeeded as i32);
        assert_eq!(job.attempts.len(), 1);
        assert!(job.attempts[0].token > 0);
        assert_eq!(job.attempts[0].outcome, "succeeded");
    }
    let runs = cluster.ledger.executions();
    assert_eq!(runs.len(), 1);
    cluster.shutdown().await;
    Ok(())
}

/// Every node's /healthz and /readyz answer 200 once the cluster runs, /metrics shows job
/// counts and Raft state in Prometheus text for that node, and its dashboard serves the page
/// and the status it polls: this node, the leader, three voters, the job that ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_health_readiness_and_metrics() -> anyhow::Result<()> {
    init_tracing();
    let cluster = TestCluster::start(3, |c| {
        c.http_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await?;
    let mut client = cluster.jobs_client(0).await?;
    client
        .submit(pb::SubmitRequest {
            jobs: vec![ledger_job(b"m")],
        })
        .await?;
    for n in &cluster.nodes {
        let addr = n.http_addr.expect("http enabled");
        let (code, _) = http_get(addr, "/healthz", None).await?;
        assert_eq!(code, 200);
        let mut ready = 0;
        for _ in 0..100 {
            ready = http_get(addr, "/readyz", None).await?.0;
            if ready == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(ready, 200);
        let (code, text) = http_get(addr, "/metrics", None).await?;
        assert_eq!(code, 200);
        let id = n.id();
        assert!(
            text.contains(&format!("exactly_raft_term{{node=\"{id}\"}}")),
            "{text}"
        );
        assert!(text.contains("exactly_jobs{"), "{text}");
        // Cluster-wide counts come from the leader alone: summed over nodes, each job once.
        let succeeded = format!("exactly_jobs{{node=\"{id}\",state=\"succeeded\"}} ");
        if !n.node.is_leader() {
            assert!(text.contains(&format!("{succeeded}0\n")), "{text}");
        }
        // The dashboard: the page, and the status it polls (this node's view).
        let (code, page) = http_get(addr, "/", None).await?;
        assert_eq!(code, 200);
        assert!(page.contains("<title>exactly</title>"), "{page}");
        assert!(page.contains("api/status"), "the page polls api/status");
        let mut seen = serde_json::Value::Null;
        for _ in 0..100 {
            let (code, text) = http_get(addr, "/api/status", None).await?;
            assert_eq!(code, 200, "{text}");
            let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            seen = serde_json::from_str(body)?;
            if seen["counts"]["succeeded"] == 1 && seen["node"]["leader_id"] != "0" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(seen["node"]["id"], id.to_string(), "{seen:#}");
        assert_eq!(seen["counts"]["succeeded"], 1, "{seen:#}");
        let members = seen["members"].as_array().expect("members");
        assert_eq!(members.len(), 3, "{seen:#}");
        assert_eq!(
            members.iter().filter(|m| m["leader"] == true).count(),
            1,
            "{seen:#}"
        );
        assert!(members.iter().all(|m| m["role"] == "voter"), "{seen:#}");
        let jobs = seen["jobs"].as_array().expect("jobs");
        assert_eq!(jobs.len(), 1, "{seen:#}");
        assert_eq!(jobs[0]["status"], "succeeded", "{seen:#}");
        assert_eq!(jobs[0]["kind"], LEDGER_KIND, "{seen:#}");
        assert_eq!(jobs[0]["attempts"], 1, "{seen:#}");
        assert!(seen["node"]["not_ready"].is_null(), "{seen:#}");
    }
    cluster.shutdown().await;
    Ok(())
}

/// `limits.streams-per-connection-max` is what a node advertises as HTTP/2
/// `MAX_CONCURRENT_STREAMS`: with 1, a request on a connection that has a Watch stream open
/// does not start until the stream closes (a compliant client queues it on its side), and then
/// runs at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_has_at_most_the_configured_streams_open() -> anyhow::Result<()> {
    init_tracing();
    let cluster = TestCluster::start(1, |c| c.limits.streams_per_connection_max = 1).await?;
    let mut jobs = cluster.jobs_client(0).await?;
    let watch = jobs
        .watch(pb::WatchRequest {
            queue: "watched".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let get = |mut jobs: pb::jobs_client::JobsClient<tonic::transport::Channel>| async move {
        jobs.get(pb::GetRequest {
            job_id: 1,
            ..Default::default()
        })
        .await
    };
    let second = tokio::time::timeout(Duration::from_secs(1), get(jobs.clone())).await;
    assert!(second.is_err(), "a second stream opened: {second:?}");
    drop(watch);
    let third = tokio::time::timeout(Duration::from_secs(5), get(jobs.clone())).await;
    let status = third
        .expect("the stream limit freed")
        .expect_err("no job 1");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    cluster.shutdown().await;
    Ok(())
}
