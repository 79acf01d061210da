//! The client's retry rules against real sockets: in-process fake nodes that answer with scripted
//! statuses, a closed port, and a listener that drops connections mid-call.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use exactly_client::{Client, ClientOptions, Code, Error, JobSpec};
use exactly_proto::v1::cluster_server::{Cluster, ClusterServer};
use exactly_proto::v1::jobs_server::{Jobs, JobsServer};
use exactly_proto::v1::{
    DrainRequest, DrainResponse, GetRequest, GetResponse, Job, JoinRequest, JoinResponse,
    RemoveRequest, StatusRequest, StatusResponse, SubmitRequest, SubmitResponse,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// How a fake node answers every call.
#[derive(Clone, Copy)]
enum Behavior {
    Ok,
    Fail(Code),
    Sleep(Duration),
}

struct FakeNode {
    node_id: u64,
    behavior: Behavior,
    calls: AtomicU32,
}

impl FakeNode {
    async fn answer<T>(&self, ok: T) -> Result<Response<T>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match self.behavior {
            Behavior::Ok => Ok(Response::new(ok)),
            Behavior::Fail(code) => Err(Status::new(
                code,
                format!("scripted by node {}", self.node_id),
            )),
            Behavior::Sleep(d) => {
                tokio::time::sleep(d).await;
                Ok(Response::new(ok))
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
        let n = request.into_inner().jobs.len() as u64;
        self.answer(SubmitResponse {
            job_ids: (1..=n).collect(),
            existing: vec![false; n as usize],
        })
        .await
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let id = request.into_inner().job_id;
        self.answer(GetResponse {
            job: Some(Job {
                id,
                ..Job::default()
            }),
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

    async fn cancel(
        &self,
        _: Request<exactly_proto::v1::CancelRequest>,
    ) -> Result<Response<exactly_proto::v1::CancelResponse>, Status> {
        Err(Status::unimplemented("the fake node does not cancel"))
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
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        self.answer(StatusResponse {
            node_id: self.node_id,
            ..StatusResponse::default()
        })
        .await
    }

    async fn drain(&self, r: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        let r = r.into_inner();
        self.answer(DrainResponse {
            node_id: r.node_id,
            running: (r.deadline_ms / 1000) as u32,
        })
        .await
    }

    async fn remove(&self, r: Request<RemoveRequest>) -> Result<Response<DrainResponse>, Status> {
        self.answer(DrainResponse {
            node_id: r.into_inner().node_id,
            running: 0,
        })
        .await
    }

    async fn join(&self, r: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        self.answer(JoinResponse {
            voter: r.into_inner().node_id % 2 == 1,
        })
        .await
    }
}

/// Starts a fake node on a free loopback port.
async fn fake(node_id: u64, behavior: Behavior) -> (String, Arc<FakeNode>) {
    let node = Arc::new(FakeNode {
        node_id,
        behavior,
        calls: AtomicU32::new(0),
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
    }
}

fn noop() -> JobSpec {
    JobSpec {
        kind: "noop".into(),
        ..JobSpec::default()
    }
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

/// INVALID_ARGUMENT, RESOURCE_EXHAUSTED and NOT_FOUND are returned at once, without trying others.
#[tokio::test]
async fn final_codes_are_not_retried() {
    for code in [
        Code::InvalidArgument,
        Code::ResourceExhausted,
        Code::NotFound,
    ] {
        let (first, a) = fake(1, Behavior::Fail(code)).await;
        let (second, b) = fake(2, Behavior::Ok).await;
        let client = Client::connect_with(vec![first, second], quick()).unwrap();
        let err = client.get(7).await.unwrap_err();
        assert!(matches!(err, Error::Status { .. }), "{err}");
        assert_eq!(err.code(), code);
        let err = client.submit_one(noop()).await.unwrap_err();
        assert_eq!(err.code(), code);
        assert_eq!(a.calls.load(Ordering::SeqCst), 2);
        assert_eq!(b.calls.load(Ordering::SeqCst), 0);
    }
}

/// A server DEADLINE_EXCEEDED makes a Submit's outcome unknown, while a Get moves on and succeeds.
#[tokio::test]
async fn server_deadline_is_unknown_for_submit_but_retried_for_reads() {
    let (first, a) = fake(1, Behavior::Fail(Code::DeadlineExceeded)).await;
    let (second, b) = fake(2, Behavior::Ok).await;
    let client = Client::connect_with(vec![first, second], quick()).unwrap();
    let err = client.submit_one(noop()).await.unwrap_err();
    assert!(err.is_unknown_outcome(), "{err}");
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert_eq!(b.calls.load(Ordering::SeqCst), 0);
    assert_eq!(client.get(9).await.unwrap().id, 9);
    assert_eq!(a.calls.load(Ordering::SeqCst), 2);
    assert_eq!(b.calls.load(Ordering::SeqCst), 1);
}

/// Drain, remove and join are idempotent, so a server DEADLINE_EXCEEDED moves them on to the
/// next endpoint like a read; the request carries the node id and the deadline in milliseconds.
#[tokio::test]
async fn membership_calls_retry_like_reads() {
    let (first, a) = fake(1, Behavior::Fail(Code::DeadlineExceeded)).await;
    let (second, b) = fake(2, Behavior::Ok).await;
    let client = Client::connect_with(vec![first, second], quick()).unwrap();
    let reply = client.drain(3, Duration::from_secs(7)).await.unwrap();
    assert_eq!((reply.node_id, reply.running), (3, 7));
    assert_eq!(a.calls.load(Ordering::SeqCst), 1);
    assert_eq!(client.remove(4).await.unwrap().node_id, 4);
    assert!(client.join(5, "10.0.0.5:7101".into()).await.unwrap().voter);
    assert_eq!(b.calls.load(Ordering::SeqCst), 3);
}

/// A connection dropped after sending makes Submit's outcome unknown; Status moves to a live node.
#[tokio::test]
async fn broken_connection_is_unknown_for_submit_but_retried_for_reads() {
    let dropper = connection_dropper().await;
    let (live, node) = fake(2, Behavior::Ok).await;
    let client = Client::connect_with(vec![dropper, live], quick()).unwrap();
    let err = client.submit_one(noop()).await.unwrap_err();
    assert!(err.is_unknown_outcome(), "{err}");
    assert_eq!(node.calls.load(Ordering::SeqCst), 0);
    assert_eq!(client.status().await.unwrap().node_id, 2);
}

/// A Submit outliving the call timeout is DEADLINE_EXCEEDED with an unknown outcome.
#[tokio::test]
async fn slow_submit_is_unknown_outcome() {
    let (slow, _) = fake(1, Behavior::Sleep(Duration::from_secs(5))).await;
    let (live, b) = fake(2, Behavior::Ok).await;
    let client = Client::connect_with(vec![slow, live], quick()).unwrap();
    let started = Instant::now();
    let err = client.submit_one(noop()).await.unwrap_err();
    assert!(err.is_unknown_outcome(), "{err}");
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(b.calls.load(Ordering::SeqCst), 0);
}

/// With every endpoint down, a call gives up within the retry budget and says how hard it tried.
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
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
}
