//! The client's retry rules against real sockets: in-process fake nodes that answer with scripted
//! statuses, a closed port, and a listener that drops connections mid-call.
//!
//! The fake nodes of one test share one "cluster" store that remembers idempotency keys the way
//! the real state machine does (a repeated key returns the original job and creates nothing), so
//! a test can commit a Submit on one node, lose the answer, and check what the retry on another
//! node finds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use exactly_client::{Client, ClientOptions, Code, Error, JobSpec};
use exactly_proto::v1::cluster_server::{Cluster, ClusterServer};
use exactly_proto::v1::jobs_server::{Jobs, JobsServer};
use exactly_proto::v1::{
    CancelRequest, CancelResponse, CancelResult, GetRequest, GetResponse, Job, JobState,
    StatusRequest, StatusResponse, SubmitRequest, SubmitResponse,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// How a fake node answers every call.
#[derive(Clone, Copy)]
enum Behavior {
    /// Apply the request and answer.
    Ok,
    /// Refuse with this code before applying anything.
    Fail(Code),
    /// Apply the request, then fail with this code: the answer is lost, the effect is not.
    ApplyThenFail(Code),
    /// Apply the request, then answer only after this long (past the client's deadline).
    ApplyThenSleep(Duration),
    /// Refuse the first `n` calls as overloaded (RESOURCE_EXHAUSTED with a `retry-after-ms`
    /// hint of `ms`), applying nothing; apply the ones after.
    Overloaded { n: u32, ms: u64 },
}

/// What the whole fake cluster has committed.
#[derive(Default)]
struct Store {
    /// Job ids by idempotency key.
    keys: HashMap<String, u64>,
    next_id: u64,
    cancelled: Vec<u64>,
}

impl Store {
    /// Submits like the state machine: a known key returns its job, a new one creates a job.
    fn submit(&mut self, request: &SubmitRequest) -> SubmitResponse {
        let mut reply = SubmitResponse::default();
        for job in &request.jobs {
            let existing =
                !job.idempotency_key.is_empty() && self.keys.contains_key(&job.idempotency_key);
            let id = if existing {
                self.keys[&job.idempotency_key]
            } else {
                self.next_id += 1;
                if !job.idempotency_key.is_empty() {
                    self.keys.insert(job.idempotency_key.clone(), self.next_id);
                }
                self.next_id
            };
            reply.job_ids.push(id);
            reply.existing.push(existing);
        }
        reply
    }
}

struct FakeNode {
    node_id: u64,
    behavior: Behavior,
    calls: AtomicU32,
    store: Arc<Mutex<Store>>,
    /// Every Submit request this node received.
    submits: Mutex<Vec<SubmitRequest>>,
}

impl FakeNode {
    /// Applies `apply` (unless the behaviour refuses first) and answers as scripted.
    async fn answer<T>(&self, apply: impl FnOnce(&mut Store) -> T) -> Result<Response<T>, Status> {
        let call = self.calls.fetch_add(1, Ordering::SeqCst);
        let scripted = |code| Status::new(code, format!("scripted by node {}", self.node_id));
        match self.behavior {
            Behavior::Fail(code) => Err(scripted(code)),
            Behavior::Overloaded { n, ms } if call < n => {
                let mut status = scripted(Code::ResourceExhausted);
                status
                    .metadata_mut()
                    .insert("retry-after-ms", ms.to_string().parse().unwrap());
                Err(status)
            }
            Behavior::Overloaded { .. } => {
                Ok(Response::new(apply(&mut self.store.lock().unwrap())))
            }
            Behavior::Ok => Ok(Response::new(apply(&mut self.store.lock().unwrap()))),
            Behavior::ApplyThenFail(code) => {
                apply(&mut self.store.lock().unwrap());
                Err(scripted(code))
            }
            Behavior::ApplyThenSleep(d) => {
                let value = apply(&mut self.store.lock().unwrap());
                tokio::time::sleep(d).await;
                Ok(Response::new(value))
            }
        }
    }
}

#[tonic::async_trait]
impl Jobs for FakeNode {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let request = request.into_inner();
        self.submits.lock().unwrap().push(request.clone());
        self.answer(|store| store.submit(&request)).await
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let id = request.into_inner().job_id;
        self.answer(|_| GetResponse {
            job: Some(Job {
                id,
                ..Job::default()
            }),
            payload: None,
        })
        .await
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let ids = request.into_inner().job_ids;
        self.answer(|store| {
            store.cancelled.extend(&ids);
            CancelResponse {
                results: ids
                    .iter()
                    .map(|&job_id| CancelResult {
                        job_id,
                        previous_state: JobState::Pending as i32,
                        error: String::new(),
                        code: 0,
                    })
                    .collect(),
            }
        })
        .await
    }

    // The calls below are not used by these tests; the fake refuses them plainly.
    async fn list(
        &self,
        _: Request<exactly_proto::v1::ListRequest>,
    ) -> Result<Response<exactly_proto::v1::ListResponse>, Status> {
        Err(Status::unimplemented("the fake node does not list"))
    }

    type WatchStream = tokio_stream::Empty<Result<exactly_proto::v1::JobEventMessage, Status>>;

    async fn watch(
        &self,
        _: Request<exactly_proto::v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("the fake node does not watch"))
    }
}

#[tonic::async_trait]
impl Cluster for FakeNode {
    async fn audit(
        &self,
        _: Request<exactly_proto::v1::AuditRequest>,
    ) -> Result<Response<exactly_proto::v1::AuditResponse>, Status> {
        Err(Status::unimplemented("the fake keeps no audit trail"))
    }

    // Membership calls are not used by these tests; the fake refuses them plainly.
    async fn drain(
        &self,
        _: Request<exactly_proto::v1::DrainRequest>,
    ) -> Result<Response<exactly_proto::v1::DrainResponse>, Status> {
        Err(Status::unimplemented("the fake does not drain"))
    }

    async fn remove(
        &self,
        _: Request<exactly_proto::v1::RemoveRequest>,
    ) -> Result<Response<exactly_proto::v1::DrainResponse>, Status> {
        Err(Status::unimplemented("the fake does not remove"))
    }

    async fn join(
        &self,
        _: Request<exactly_proto::v1::JoinRequest>,
    ) -> Result<Response<exactly_proto::v1::JoinResponse>, Status> {
        Err(Status::unimplemented("the fake does not join"))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let node_id = self.node_id;
        self.answer(|_| StatusResponse {
            node_id,
            ..StatusResponse::default()
        })
        .await
    }
}

/// A fake cluster: the nodes started by `node` share its store.
#[derive(Default)]
struct FakeCluster {
    store: Arc<Mutex<Store>>,
}

impl FakeCluster {
    /// Starts a fake node on a free loopback port. The server task ends with the test's runtime.
    async fn node(&self, node_id: u64, behavior: Behavior) -> (String, Arc<FakeNode>) {
        let node = Arc::new(FakeNode {
            node_id,
            behavior,
            calls: AtomicU32::new(0),
            store: self.store.clone(),
            submits: Mutex::new(Vec::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tonic::transport::Server::builder()
            .add_service(JobsServer::from_arc(node.clone()))
            .add_service(ClusterServer::from_arc(node.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        (format!("http://{addr}"), node)
    }

    /// How many jobs the cluster created.
    fn jobs_created(&self) -> u64 {
        self.store.lock().unwrap().next_id
    }
}

/// A fake node in a cluster of its own.
async fn fake(node_id: u64, behavior: Behavior) -> (String, Arc<FakeNode>) {
    FakeCluster::default().node(node_id, behavior).await
}

/// A loopback address nothing listens on.
async fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// A listener that accepts each connection, reads what the client sends, then drops it: the
/// request may have arrived, but no answer ever comes.
async fn connection_dropper() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                // Wait for the request's bytes, then hang up without answering.
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), socket.read(&mut buf)).await;
                drop(socket);
            });
        }
    });
    format!("http://{addr}")
}

fn quick() -> ClientOptions {
    ClientOptions {
        call_timeout_ms: 500,
        connect_timeout_ms: 200,
        retry_backoff_initial_ms: 5,
        retry_backoff_max_ms: 20,
        retry_total_ms_max: 1_000,
        retry_attempts_max: 16,
        ..ClientOptions::default()
    }
}

fn noop() -> JobSpec {
    JobSpec {
        kind: "noop".into(),
        ..JobSpec::default()
    }
}

/// The idempotency keys of every Submit a node received, request by request.
fn keys_seen(node: &FakeNode) -> Vec<Vec<String>> {
    node.submits
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.jobs.iter().map(|j| j.idempotency_key.clone()).collect())
        .collect()
}

/// A Submit whose first endpoint refuses the connection is retried on the next one.
#[tokio::test]
async fn submit_retries_after_connection_refused() {
    let dead = closed_port().await;
    let (live, node) = fake(2, Behavior::Ok).await;
    let client = Client::connect_with(vec![dead, live], quick()).unwrap();
    let ids = client.submit(vec![noop(), noop()]).await.unwrap();
    assert_eq!(ids, vec![1, 2]);
    assert_eq!(node.calls.load(Ordering::SeqCst), 1);
}

/// A call that gives up on an endpoint that refused the connection (a budget of one try, as
/// `exactly bench --rate` runs) leaves the next call to start at the next endpoint: a node that
/// went down is not asked first by every call for good.
#[tokio::test]
async fn the_next_call_starts_past_an_endpoint_that_failed() {
    let dead = closed_port().await;
    let (live, node) = fake(2, Behavior::Ok).await;
    let one_try = ClientOptions {
        retry_attempts_max: 1,
        ..quick()
    };
    let client = Client::connect_with(vec![dead, live], one_try).unwrap();
    let refused = client.submit_one(noop()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused}");
    assert_eq!(node.calls.load(Ordering::SeqCst), 0);
    for expected in 1..=3 {
        assert_eq!(client.submit_one(noop()).await.unwrap(), expected);
    }
    assert_eq!(node.calls.load(Ordering::SeqCst), 3);
}

/// A Submit answered UNAVAILABLE by the server is retried on the next endpoint, once.
#[tokio::test]
async fn submit_retries_after_server_unavailable() {
    let (first, a) = fake(1, Behavior::Fail(Code::Unavailable)).await;
    let (second, b) = fake(2, Behavior::Ok).await;
    let client = Client::connect_with(vec![first, second], quick()).unwrap();
    assert_eq!(client.submit_one(noop()).await.unwrap(), 1);
    assert_eq!(a.calls.load(Ordering::SeqCst), 1);
    assert_eq!(b.calls.load(Ordering::SeqCst), 1);
    // The endpoint that answered is preferred by the next call.
    client.status().await.unwrap();
    assert_eq!(a.calls.load(Ordering::SeqCst), 1);
}

/// An overloaded node's refusal (RESOURCE_EXHAUSTED with a retry hint) is retried, after at
/// least the hint each time, and the job is created once; without the hint the same code is a
/// final answer.
#[tokio::test]
async fn submit_waits_out_an_overload_refusal() {
    let (endpoint, node) = fake(1, Behavior::Overloaded { n: 2, ms: 60 }).await;
    let client = Client::connect_with(vec![endpoint], quick()).unwrap();
    let started = Instant::now();
    assert_eq!(client.submit_one(noop()).await.unwrap(), 1);
    assert!(
        started.elapsed() >= Duration::from_millis(120),
        "two refusals with a 60 ms hint were retried after {:?}",
        started.elapsed()
    );
    assert_eq!(node.calls.load(Ordering::SeqCst), 3);
    let (plain, node) = fake(2, Behavior::Fail(Code::ResourceExhausted)).await;
    let client = Client::connect_with(vec![plain], quick()).unwrap();
    let err = client.submit_one(noop()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Status {
                code: Code::ResourceExhausted,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(node.calls.load(Ordering::SeqCst), 1);
}

/// A client never has more than `in_flight_max` calls in flight: the rest wait their turn.
#[tokio::test]
async fn calls_in_flight_are_bounded() {
    let (endpoint, node) = fake(1, Behavior::ApplyThenSleep(Duration::from_millis(100))).await;
    let options = ClientOptions {
        in_flight_max: 2,
        ..quick()
    };
    let client = Client::connect_with(vec![endpoint], options).unwrap();
    let started = Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.status().await })
        })
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
    // Six 100 ms calls two at a time take three rounds.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(node.calls.load(Ordering::SeqCst), 6);
}

/// Every job without a key is sent with its own v4 UUID; a key the caller set is sent as it is;
/// the answer reports each job's key and that none existed before.
#[tokio::test]
async fn submit_gives_every_job_a_key() {
    let (endpoint, node) = fake(1, Behavior::Ok).await;
    let client = Client::connect_with(vec![endpoint], quick()).unwrap();
    let mine = JobSpec {
        idempotency_key: "order-17".into(),
        ..noop()
    };
    let submission = client
        .submit_detailed(vec![noop(), mine, noop()])
        .await
        .unwrap();
    let sent = keys_seen(&node);
    assert_eq!(sent.len(), 1);
    let sent = &sent[0];
    assert_eq!(sent[1], "order-17");
    for key in [&sent[0], &sent[2]] {
        assert_eq!(key.len(), 36, "{key}");
        assert_eq!(&key[14..15], "4", "a version-4 UUID: {key}");
    }
    assert_ne!(sent[0], sent[2]);
    let reported: Vec<&str> = submission
        .jobs
        .iter()
        .map(|j| j.idempotency_key.as_str())
        .collect();
    assert_eq!(
        reported,
        sent.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert_eq!(submission.ids(), vec![1, 2, 3]);
    assert!(submission.jobs.iter().all(|j| !j.existing));
    assert!(!submission.resent_after_unknown_outcome);
}

/// A key seen before is reported as existing with the original job's id.
#[tokio::test]
async fn repeated_key_reports_the_original_job() {
    let (endpoint, _) = fake(1, Behavior::Ok).await;
    let client = Client::connect_with(vec![endpoint], quick()).unwrap();
    let job = JobSpec {
        idempotency_key: "k".into(),
        ..noop()
    };
    let first = client.submit_detailed(vec![job.clone()]).await.unwrap();
    let again = client.submit_detailed(vec![job, noop()]).await.unwrap();
    assert_eq!(first.jobs[0].id, 1);
    assert!(!first.jobs[0].existing);
    assert_eq!(again.jobs[0].id, 1);
    assert!(again.jobs[0].existing);
    assert_eq!(again.jobs[1].id, 2);
    assert!(!again.jobs[1].existing);
}

/// The first node commits the Submit but answers DEADLINE_EXCEEDED (the commit outran its
/// wait), then UNKNOWN on a second setup: the client retries on the next node with the same
/// keys, which finds the jobs: each job exists once, reported as existing, and the answer says a
/// try with an unknown outcome came before.
#[tokio::test]
async fn submit_with_unknown_outcome_is_retried_with_the_same_keys() {
    for code in [Code::DeadlineExceeded, Code::Unknown] {
        let cluster = FakeCluster::default();
        let (first, a) = cluster.node(1, Behavior::ApplyThenFail(code)).await;
        let (second, b) = cluster.node(2, Behavior::Ok).await;
        let client = Client::connect_with(vec![first, second], quick()).unwrap();
        let submission = client.submit_detailed(vec![noop(), noop()]).await.unwrap();
        assert_eq!(submission.ids(), vec![1, 2], "{code:?}");
        assert!(submission.jobs.iter().all(|j| j.existing), "{code:?}");
        assert!(submission.resent_after_unknown_outcome);
        assert_eq!(cluster.jobs_created(), 2, "no job was created twice");
        assert_eq!(keys_seen(&a), keys_seen(&b), "the retry reused the keys");
    }
}

/// A node that commits and then answers too late: the client's deadline passes, it retries on
/// the next node with the same key, and the job exists once.
#[tokio::test]
async fn slow_submit_is_retried_with_the_same_key() {
    let cluster = FakeCluster::default();
    let (slow, a) = cluster
        .node(1, Behavior::ApplyThenSleep(Duration::from_secs(5)))
        .await;
    let (live, b) = cluster.node(2, Behavior::Ok).await;
    let client = Client::connect_with(vec![slow, live], quick()).unwrap();
    let started = Instant::now();
    let submission = client.submit_detailed(vec![noop()]).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(submission.ids(), vec![1]);
    assert!(submission.jobs[0].existing);
    assert!(submission.resent_after_unknown_outcome);
    assert_eq!(cluster.jobs_created(), 1);
    assert_eq!(keys_seen(&a), keys_seen(&b));
}

/// A connection dropped after the request was sent leaves the outcome unknown: Submit is retried
/// on a live node and succeeds; Cancel, which is not idempotent, reports the unknown outcome.
#[tokio::test]
async fn broken_connection_retries_submit_but_not_cancel() {
    let dropper = connection_dropper().await;
    let (live, node) = fake(2, Behavior::Ok).await;
    let client = Client::connect_with(vec![dropper.clone(), live.clone()], quick()).unwrap();
    let submission = client.submit_detailed(vec![noop()]).await.unwrap();
    assert_eq!(submission.ids(), vec![1]);
    assert!(submission.resent_after_unknown_outcome);
    assert_eq!(node.calls.load(Ordering::SeqCst), 1);

    let client = Client::connect_with(vec![dropper, live], quick()).unwrap();
    let err = client.cancel(vec![1]).await.unwrap_err();
    assert!(err.is_unknown_outcome(), "{err}");
    assert_eq!(
        node.calls.load(Ordering::SeqCst),
        1,
        "cancel was not resent"
    );
    assert_eq!(client.status().await.unwrap().node_id, 2);
}

/// A server DEADLINE_EXCEEDED makes a Cancel's outcome unknown at once (no second try), while a
/// Get moves on and succeeds.
#[tokio::test]
async fn server_deadline_is_unknown_for_cancel_but_retried_for_reads() {
    let cluster = FakeCluster::default();
    let (first, a) = cluster
        .node(1, Behavior::ApplyThenFail(Code::DeadlineExceeded))
        .await;
    let (second, b) = cluster.node(2, Behavior::Ok).await;
    let client = Client::connect_with(vec![first, second], quick()).unwrap();
    let err = client.cancel(vec![7]).await.unwrap_err();
    assert!(err.is_unknown_outcome(), "{err}");
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert_eq!(b.calls.load(Ordering::SeqCst), 0);
    assert_eq!(cluster.store.lock().unwrap().cancelled, vec![7]);
    assert_eq!(client.get(9).await.unwrap().id, 9);
    assert_eq!(a.calls.load(Ordering::SeqCst), 2);
    assert_eq!(b.calls.load(Ordering::SeqCst), 1);
}

/// When every try of a Submit may have committed and the budget runs out, the error says the
/// outcome is unknown (not merely "unavailable"), and however many tries were sent, the keys
/// made them create the job once.
#[tokio::test]
async fn submit_budget_exhausted_after_unknown_outcome_is_unknown() {
    let cluster = FakeCluster::default();
    let (first, a) = cluster
        .node(1, Behavior::ApplyThenFail(Code::Unknown))
        .await;
    let (second, b) = cluster
        .node(2, Behavior::ApplyThenFail(Code::DeadlineExceeded))
        .await;
    let client = Client::connect_with(vec![first, second], quick()).unwrap();
    let err = client.submit_one(noop()).await.unwrap_err();
    assert!(err.is_unknown_outcome(), "{err}");
    assert!(err.to_string().contains("gave up after"), "{err}");
    let tries = a.calls.load(Ordering::SeqCst) + b.calls.load(Ordering::SeqCst);
    assert!(tries > 2, "{tries} tries");
    assert_eq!(cluster.jobs_created(), 1);
    let mut keys: Vec<Vec<String>> = keys_seen(&a);
    keys.extend(keys_seen(&b));
    keys.dedup();
    assert_eq!(keys.len(), 1, "every try carried the same key: {keys:?}");
}

/// INVALID_ARGUMENT, RESOURCE_EXHAUSTED, NOT_FOUND and ALREADY_EXISTS are returned at once,
/// without trying others.
#[tokio::test]
async fn final_codes_are_not_retried() {
    for code in [
        Code::InvalidArgument,
        Code::ResourceExhausted,
        Code::NotFound,
        Code::AlreadyExists,
    ] {
        let (first, a) = fake(1, Behavior::Fail(code)).await;
        let (second, b) = fake(2, Behavior::Ok).await;
        let client = Client::connect_with(vec![first, second], quick()).unwrap();
        let err = client.get(7).await.unwrap_err();
        assert!(matches!(err, Error::Status { .. }), "{err}");
        assert_eq!(err.code(), code);
        let err = client.submit_one(noop()).await.unwrap_err();
        assert_eq!(err.code(), code);
        assert!(err.to_string().contains("scripted by node 1"), "{err}");
        assert_eq!(a.calls.load(Ordering::SeqCst), 2);
        assert_eq!(b.calls.load(Ordering::SeqCst), 0);
    }
}

/// With every endpoint down, a call gives up within the retry budget and says how hard it tried;
/// nothing was sent, so the error is "unavailable", not "unknown".
#[tokio::test]
async fn all_endpoints_down_gives_up_in_bounded_time() {
    let client =
        Client::connect_with(vec![closed_port().await, closed_port().await], quick()).unwrap();
    let started = Instant::now();
    let err = client.submit_one(noop()).await.unwrap_err();
    let elapsed = started.elapsed();
    match &err {
        Error::RetriesExhausted { code, attempts, .. } => {
            assert_eq!(*code, Code::Unavailable);
            assert!(*attempts > 2, "{err}");
        }
        other => panic!("expected RetriesExhausted, got {other}"),
    }
    assert!(err.is_unavailable());
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
}
