//! `Client::watch` against fake nodes that serve one shared event history and break their streams
//! on script: the watch must resume on another node after the last event it delivered, never
//! deliver an event twice, anchor "from now" at a position, and report a lost position as
//! `Error::WatchPositionLost`.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use exactly_client::{Client, ClientOptions, Code, Error, EventPosition, JobState, WatchScope};
use exactly_proto::v1::cluster_server::{Cluster, ClusterServer};
use exactly_proto::v1::jobs_server::{Jobs, JobsServer};
use exactly_proto::v1::{
    CancelRequest, CancelResponse, GetRequest, GetResponse, JobEventMessage, ListRequest,
    ListResponse, StatusRequest, StatusResponse, SubmitRequest, SubmitResponse, WatchRequest,
};
use futures::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// How a fake node's stream ends after it has sent its events.
#[derive(Clone, Copy, Debug)]
enum End {
    /// Fail the stream with this code.
    Fail(Code),
    /// End the stream cleanly, as a node that shuts down does.
    Close,
    /// Keep the stream open and silent.
    Hang,
}

/// One fake node's script.
#[derive(Clone, Copy, Debug)]
struct Script {
    /// Events sent per stream before `end`.
    serve: usize,
    end: End,
    /// Start this many events before the requested position, as a server that resumed from an
    /// older position would (the client must skip what it already delivered).
    rewind: usize,
    /// Positions at or below this are no longer retained: such a resume gets OUT_OF_RANGE.
    floor: Option<(u64, u32)>,
    /// What Status reports as the applied index.
    applied_index: u64,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            serve: usize::MAX,
            end: End::Hang,
            rewind: 0,
            floor: None,
            applied_index: 0,
        }
    }
}

struct FakeNode {
    script: Script,
    /// The cluster's event history, shared by every node.
    history: Arc<Vec<JobEventMessage>>,
    /// The resume position of every Watch this node received.
    requests: Mutex<Vec<(u64, u32)>>,
}

fn position(e: &JobEventMessage) -> (u64, u32) {
    let p = e.position.as_ref().expect("fake events have positions");
    (p.index, p.seq)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEventMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Jobs for FakeNode {
    type WatchStream = EventStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = request.into_inner();
        let after = r.after.map(|p| (p.index, p.seq)).unwrap_or((0, 0));
        self.requests.lock().unwrap().push(after);
        if self.script.floor.is_some_and(|floor| after < floor) {
            return Err(Status::out_of_range(format!(
                "events after {after:?} are no longer retained"
            )));
        }
        let first = self.history.iter().position(|e| position(e) > after);
        let start = first
            .unwrap_or(self.history.len())
            .saturating_sub(self.script.rewind);
        let events: Vec<_> = self.history[start..]
            .iter()
            .filter(|e| r.job_id == 0 || e.job_id == r.job_id)
            .take(self.script.serve)
            .cloned()
            .map(Ok)
            .collect();
        let events = futures::stream::iter(events);
        let stream: EventStream = match self.script.end {
            End::Fail(code) => Box::pin(events.chain(futures::stream::once(async move {
                Err(Status::new(code, "scripted stream failure"))
            }))),
            End::Close => Box::pin(events),
            End::Hang => Box::pin(events.chain(futures::stream::pending())),
        };
        Ok(Response::new(stream))
    }

    // The calls below are not used by these tests; the fake refuses them plainly.
    async fn submit(&self, _: Request<SubmitRequest>) -> Result<Response<SubmitResponse>, Status> {
        Err(Status::unimplemented("the fake node does not submit"))
    }

    async fn get(&self, _: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        Err(Status::unimplemented("the fake node does not get"))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Err(Status::unimplemented("the fake node does not list"))
    }

    async fn cancel(&self, _: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        Err(Status::unimplemented("the fake node does not cancel"))
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
        Ok(Response::new(StatusResponse {
            applied_index: self.script.applied_index,
            ..StatusResponse::default()
        }))
    }
}

/// A history of `n` events: two per log entry from index 10 on, jobs 1, 2, 1, 2, ...
fn history(n: usize) -> Arc<Vec<JobEventMessage>> {
    Arc::new(
        (0..n)
            .map(|i| JobEventMessage {
                position: Some(EventPosition {
                    index: 10 + (i / 2) as u64,
                    seq: (i % 2) as u32,
                }),
                job_id: 1 + (i % 2) as u64,
                queue: "default".into(),
                state: JobState::Running as i32,
                ..JobEventMessage::default()
            })
            .collect(),
    )
}

/// Starts a fake node on the current runtime; it stops with the test.
async fn fake(history: &Arc<Vec<JobEventMessage>>, script: Script) -> (String, Arc<FakeNode>) {
    let node = Arc::new(FakeNode {
        script,
        history: history.clone(),
        requests: Mutex::new(Vec::new()),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(JobsServer::from_arc(node.clone()))
            .add_service(ClusterServer::from_arc(node.clone()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), node)
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

/// Collects `n` events from a watch, failing the test if that takes more than 10 s.
async fn take(watch: &mut exactly_client::Watch, n: usize) -> Vec<(u64, u32)> {
    let mut got = Vec::new();
    while got.len() < n {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("events keep coming")
            .expect("no watch error");
        got.push(position(&event));
    }
    got
}

/// Node A breaks its stream after 3 events (UNAVAILABLE), node B repeats 2 already-delivered
/// events and closes after 3: the watch moves between them, resumes each time after the last
/// event it delivered, and delivers all 9 events once, in order.
#[tokio::test]
async fn watch_resumes_on_another_node_without_duplicates() {
    let history = history(9);
    let (a_uri, a) = fake(
        &history,
        Script {
            serve: 3,
            end: End::Fail(Code::Unavailable),
            ..Script::default()
        },
    )
    .await;
    let (b_uri, b) = fake(
        &history,
        Script {
            serve: 5,
            rewind: 2,
            end: End::Close,
            ..Script::default()
        },
    )
    .await;
    let client = Client::connect_with(vec![a_uri, b_uri], quick()).unwrap();
    let start = EventPosition { index: 9, seq: 0 };
    let mut watch = client.watch(WatchScope::All, Some(start)).await.unwrap();
    let got = take(&mut watch, 9).await;
    let expected: Vec<_> = history.iter().map(position).collect();
    assert_eq!(got, expected, "every event once, in order");
    // A: from the start; B: after A's third event; A again: after B's last new event.
    assert_eq!(*a.requests.lock().unwrap(), [(9, 0), expected[5]]);
    assert_eq!(*b.requests.lock().unwrap(), [expected[2]]);
    assert_eq!(watch.reconnects(), 2);
    assert_eq!(watch.position(), Some(EventPosition { index: 14, seq: 0 }));
}

/// A watch "from now" starts after the node's applied index, keeps that anchor across a
/// disconnect that happens before any event, and skips events at or before it.
#[tokio::test]
async fn watch_from_now_is_anchored_across_an_early_disconnect() {
    let history = history(8);
    // A answers Status with applied index 11, then fails every stream before sending anything.
    let (a_uri, a) = fake(
        &history,
        Script {
            serve: 0,
            end: End::Fail(Code::Unavailable),
            applied_index: 11,
            ..Script::default()
        },
    )
    .await;
    // B resends two events from before the anchor.
    let (b_uri, b) = fake(
        &history,
        Script {
            rewind: 2,
            applied_index: 99,
            ..Script::default()
        },
    )
    .await;
    let client = Client::connect_with(vec![a_uri, b_uri], quick()).unwrap();
    let mut watch = client.watch(WatchScope::All, None).await.unwrap();
    assert_eq!(
        watch.position(),
        Some(EventPosition {
            index: 11,
            seq: u32::MAX
        })
    );
    let got = take(&mut watch, 4).await;
    assert_eq!(got, vec![(12, 0), (12, 1), (13, 0), (13, 1)]);
    assert_eq!(a.requests.lock().unwrap()[0], (11, u32::MAX));
    assert_eq!(
        b.requests.lock().unwrap()[0],
        (11, u32::MAX),
        "same anchor on B"
    );
}

/// When every node answers OUT_OF_RANGE the watch fails with a typed error naming the position;
/// when only one does, the watch moves to a node that still has the events.
#[tokio::test]
async fn lost_position_is_a_typed_error_only_when_no_node_has_it() {
    let history = history(6);
    let gone = Script {
        floor: Some((20, 0)),
        ..Script::default()
    };
    let (a_uri, _) = fake(&history, gone).await;
    let (b_uri, _) = fake(&history, gone).await;
    let client = Client::connect_with(vec![a_uri.clone(), b_uri], quick()).unwrap();
    let start = EventPosition { index: 10, seq: 1 };
    let err = client
        .watch(WatchScope::All, Some(start))
        .await
        .unwrap_err();
    match &err {
        Error::WatchPositionLost { index, seq, .. } => assert_eq!((*index, *seq), (10, 1)),
        other => panic!("expected WatchPositionLost, got {other}"),
    }
    assert_eq!(err.code(), Code::OutOfRange);

    let (c_uri, c) = fake(&history, Script::default()).await;
    let client = Client::connect_with(vec![a_uri, c_uri], quick()).unwrap();
    let mut watch = client.watch(WatchScope::All, Some(start)).await.unwrap();
    assert_eq!(take(&mut watch, 2).await, vec![(11, 0), (11, 1)]);
    assert_eq!(c.requests.lock().unwrap()[0], (10, 1));
}

/// OUT_OF_RANGE in the middle of a stream (the node fell too far behind) moves the watch to a
/// node that still has the events; a job-scoped watch asks for that job only.
#[tokio::test]
async fn out_of_range_mid_stream_moves_on() {
    let history = history(8);
    let (a_uri, _) = fake(
        &history,
        Script {
            serve: 1,
            end: End::Fail(Code::OutOfRange),
            ..Script::default()
        },
    )
    .await;
    let (b_uri, b) = fake(&history, Script::default()).await;
    let client = Client::connect_with(vec![a_uri, b_uri], quick()).unwrap();
    let start = EventPosition { index: 1, seq: 0 };
    let mut watch = client.watch(WatchScope::Job(2), Some(start)).await.unwrap();
    // Job 2's events are the second of each entry.
    assert_eq!(
        take(&mut watch, 4).await,
        vec![(10, 1), (11, 1), (12, 1), (13, 1)]
    );
    assert_eq!(b.requests.lock().unwrap()[0], (10, 1));
}

/// A final refusal (INVALID_ARGUMENT) is returned at once, not retried elsewhere.
#[tokio::test]
async fn final_refusal_is_returned() {
    let history = history(2);
    let (a_uri, _) = fake(
        &history,
        Script {
            serve: 0,
            end: End::Fail(Code::InvalidArgument),
            ..Script::default()
        },
    )
    .await;
    let client = Client::connect_with(vec![a_uri], quick()).unwrap();
    let mut watch = client
        .watch(WatchScope::Queue("q".into()), None)
        .await
        .unwrap();
    let err = watch.next().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
}

/// A node that vanishes mid-stream (its runtime, and so every connection, dropped: the client
/// sees a broken connection, not a status) is replaced by another node, and the stream API
/// delivers the rest once.
#[tokio::test]
async fn vanished_node_is_replaced() {
    let history = history(6);
    // Node A runs on its own runtime so that dropping the runtime cuts its connections.
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let history_a = history.clone();
    let a_thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let uri = runtime.block_on(async {
            fake(
                &history_a,
                Script {
                    serve: 2,
                    ..Script::default()
                },
            )
            .await
            .0
        });
        tx.send(uri).unwrap();
        let _ = stop_rx.recv();
        drop(runtime);
    });
    let a_uri = rx.recv().unwrap();
    let (b_uri, b) = fake(&history, Script::default()).await;
    let client = Client::connect_with(vec![a_uri, b_uri], quick()).unwrap();
    let start = EventPosition { index: 0, seq: 0 };
    let watch = client.watch(WatchScope::All, Some(start)).await.unwrap();
    let mut stream = Box::pin(watch.into_stream());
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(position(&stream.next().await.unwrap().unwrap()));
    }
    stop_tx.send(()).unwrap();
    a_thread.join().unwrap();
    for _ in 0..4 {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the watch moves to node B")
            .unwrap()
            .unwrap();
        got.push(position(&event));
    }
    assert_eq!(got, history.iter().map(position).collect::<Vec<_>>());
    assert_eq!(b.requests.lock().unwrap()[0], (10, 1));
}
