//! The `exactly` binary end to end against an in-process fake node: output, exit codes and error
//! text. The fake finishes every job the moment it is submitted, so it tests the CLI, not a cluster.

use std::process::{Output, Stdio};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use exactly_proto::v1::cluster_server::{Cluster, ClusterServer};
use exactly_proto::v1::jobs_server::{Jobs, JobsServer};
use exactly_proto::v1::{
    Attempt, CancelRequest, CancelResponse, DrainRequest, DrainResponse, GetRequest, GetResponse,
    Job, JobCounts, JobEventMessage, JobState, JoinRequest, JoinResponse, ListRequest,
    ListResponse, Member, RemoveRequest, StatusRequest, StatusResponse, SubmitRequest,
    SubmitResponse, WatchRequest,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// A two-node "cluster" (node 1 leads) that completes jobs instantly: kind `fail` fails, kind
/// `bad` is rejected. Node 2 can be drained or removed: each status call after that shows it one
/// step further (2 jobs running, 1, none, gone).
#[derive(Default)]
struct FakeCluster {
    /// The answering node's id (0: 1). A fake with another id plays a node that wants to join.
    node_id: u64,
    jobs: Mutex<Vec<Job>>,
    /// (node, removed, status calls since the drain).
    leaving: Mutex<Option<(u64, bool, u32)>>,
    joined: Mutex<Vec<(u64, String)>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tonic::async_trait]
impl Jobs for FakeCluster {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let specs = request.into_inner().jobs;
        if specs.iter().any(|s| s.kind == "bad") {
            return Err(Status::invalid_argument("unknown kind \"bad\""));
        }
        let mut jobs = self.jobs.lock().unwrap();
        let mut ids = Vec::new();
        for spec in specs {
            let id = jobs.len() as u64 + 1;
            let created = now_ms();
            let failed = spec.kind == "fail";
            jobs.push(Job {
                id,
                queue: if spec.queue.is_empty() {
                    "default".into()
                } else {
                    spec.queue
                },
                kind: spec.kind,
                priority: spec.priority,
                state: if failed {
                    JobState::Dead
                } else {
                    JobState::Succeeded
                } as i32,
                payload_bytes: spec.payload.len() as u32,
                max_attempts: spec.max_attempts.max(1),
                timeout_ms: spec.timeout_ms,
                created_at_ms: created,
                updated_at_ms: created + 7,
                run_at_ms: spec.run_at_ms,
                attempts: vec![Attempt {
                    number: 1,
                    token: 100 + id,
                    node_id: 1,
                    started_at_ms: created + 2,
                    ended_at_ms: created + 7,
                    outcome: if failed { "failed" } else { "succeeded" }.into(),
                    error: if failed {
                        "exit status 1".into()
                    } else {
                        String::new()
                    },
                }],
                result: if failed { Vec::new() } else { spec.payload },
                last_error: if failed {
                    "exit status 1".into()
                } else {
                    String::new()
                },
                ..Job::default()
            });
            ids.push(id);
        }
        let existing = vec![false; ids.len()];
        Ok(Response::new(SubmitResponse {
            job_ids: ids,
            existing,
        }))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let id = request.into_inner().job_id;
        let jobs = self.jobs.lock().unwrap();
        match jobs.get((id as usize).wrapping_sub(1)) {
            Some(job) => Ok(Response::new(GetResponse {
                job: Some(job.clone()),
            })),
            None => Err(Status::not_found(format!("job {id} does not exist"))),
        }
    }

    // The calls below are not used by these tests; the fake refuses them plainly.
    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Err(Status::unimplemented("the fake cluster does not list"))
    }

    async fn cancel(&self, _: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        Err(Status::unimplemented("the fake cluster does not cancel"))
    }

    type WatchStream = tokio_stream::Empty<Result<JobEventMessage, Status>>;

    async fn watch(&self, _: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("the fake cluster does not watch"))
    }
}

impl FakeCluster {
    fn member(id: u64) -> Member {
        Member {
            node_id: id,
            addr: format!("127.0.0.1:710{id}"),
            role: "voter".into(),
            leader: id == 1,
            matched_index: 10,
            slots: 16,
            running: 0,
            incarnation: 1,
            health: "ok".into(),
            lease_age_ms: 120,
            lag: Some(0),
            draining: false,
            drain_deadline_ms: 0,
        }
    }

    fn start_leaving(&self, node: u64, removed: bool) -> Result<Response<DrainResponse>, Status> {
        match node {
            1 => Err(Status::failed_precondition(
                "node 1 is the only voter; it cannot leave the cluster, only stop",
            )),
            2 => {
                *self.leaving.lock().unwrap() = Some((node, removed, 0));
                Ok(Response::new(DrainResponse {
                    node_id: node,
                    running: 2,
                }))
            }
            _ => Err(Status::not_found(format!(
                "node {node} is not a member of this cluster"
            ))),
        }
    }
}

#[tonic::async_trait]
impl Cluster for FakeCluster {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let jobs = self.jobs.lock().unwrap();
        let failed = jobs
            .iter()
            .filter(|j| j.state == JobState::Dead as i32)
            .count() as u64;
        let node_id = if self.node_id == 0 { 1 } else { self.node_id };
        let mut members = vec![Self::member(1), Self::member(2)];
        let mut removed_node_ids = Vec::new();
        if let Some((node, removed, polls)) = self.leaving.lock().unwrap().as_mut() {
            *polls += 1;
            if *polls >= 4 {
                members.retain(|m| m.node_id != *node);
                if *removed {
                    removed_node_ids.push(*node);
                }
            } else if let Some(m) = members.iter_mut().find(|m| m.node_id == *node) {
                m.draining = true;
                m.running = 3 - *polls;
                m.drain_deadline_ms = now_ms() + 60_000;
            }
        }
        if self.node_id != 0 {
            // A node that has not joined: no leader, no members.
            members.clear();
        }
        Ok(Response::new(StatusResponse {
            node_id,
            leader_id: if self.node_id == 0 { 1 } else { 0 },
            term: 3,
            last_log_index: 10,
            committed_index: 10,
            applied_index: 10,
            members,
            counts: Some(JobCounts {
                succeeded: jobs.len() as u64 - failed,
                dead: failed,
                ..JobCounts::default()
            }),
            removed_node_ids,
        }))
    }

    async fn drain(&self, r: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        self.start_leaving(r.into_inner().node_id, false)
    }

    async fn remove(&self, r: Request<RemoveRequest>) -> Result<Response<DrainResponse>, Status> {
        self.start_leaving(r.into_inner().node_id, true)
    }

    async fn join(&self, r: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let JoinRequest { node_id, addr } = r.into_inner();
        self.joined.lock().unwrap().push((node_id, addr));
        Ok(Response::new(JoinResponse { voter: false }))
    }
}

async fn start_fake() -> String {
    start_fake_as(0).await
}

/// A fake answering as node `node_id` (0: the leader of the fake cluster).
async fn start_fake_as(node_id: u64) -> String {
    let fake = std::sync::Arc::new(FakeCluster {
        node_id,
        ..FakeCluster::default()
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(JobsServer::from_arc(fake.clone()))
            .add_service(ClusterServer::from_arc(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// Runs `exactly` with the given arguments against `endpoint`, feeding `stdin`.
async fn exactly(endpoint: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_exactly"))
        .args(args)
        .env("EXACTLY_ENDPOINTS", endpoint)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    child.wait_with_output().await.unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// Submit prints one id per line (or a JSON list), and get shows the job that was submitted.
#[tokio::test]
async fn submit_then_get() {
    let endpoint = start_fake().await;
    let out = exactly(
        &endpoint,
        &["submit", "--kind", "noop", "--count", "3"],
        b"",
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "1\n2\n3\n");

    let out = exactly(
        &endpoint,
        &["--json", "submit", "--kind", "echo", "--payload-stdin"],
        b"hello",
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let value: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(value["job_ids"], serde_json::json!([4]));

    let out = exactly(&endpoint, &["get", "4"], b"").await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("state         succeeded\n"), "{text}");
    assert!(text.contains("payload       5 bytes\n"), "{text}");
    assert!(text.contains("result (5 bytes, text):\nhello\n"), "{text}");

    let out = exactly(&endpoint, &["get", "4", "--json"], b"").await;
    let value: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(value["attempts"][0]["token"], 104);
}

/// Errors print their gRPC code and message on standard error and exit with 1.
#[tokio::test]
async fn errors_exit_one_with_code() {
    let endpoint = start_fake().await;
    let out = exactly(&endpoint, &["get", "999"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "error: NOT_FOUND: job 999 does not exist\n");
    assert!(stdout(&out).is_empty());

    let out = exactly(&endpoint, &["submit", "--kind", "bad"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: INVALID_ARGUMENT: unknown kind"),
        "{}",
        stderr(&out)
    );
}

/// With no node reachable, the CLI gives up within --retry-time and says UNAVAILABLE.
#[tokio::test]
async fn unreachable_cluster_is_unavailable() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let out = exactly(&dead, &["status", "--retry-time", "300ms"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.starts_with("error: UNAVAILABLE: "), "{err}");
    assert!(err.contains("gave up after"), "{err}");
}

/// Usage mistakes exit with 1; --help exits with 0.
#[tokio::test]
async fn usage_exit_codes() {
    let out = exactly("http://127.0.0.1:1", &["submit"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    let out = exactly("http://127.0.0.1:1", &["--help"], b"").await;
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("bench"));
}

/// Status prints the members table and the job counts.
#[tokio::test]
async fn status_table() {
    let endpoint = start_fake().await;
    let out = exactly(&endpoint, &["status"], b"").await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(
            "ID  ADDR            ROLE   LEADER  HEALTH  LAG  RUNNING  SLOTS  INCARNATION  DRAIN\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("1   127.0.0.1:7101  voter  *       ok      0    0        16     1\n"),
        "{text}"
    );
    let again = exactly(&endpoint, &["cluster", "status"], b"").await;
    assert_eq!(stdout(&again), text, "`cluster status` is `status`");
}

/// `cluster drain` commits the drain, prints each change of the node's progress, and returns
/// once the node has left; `--json` prints only the final object on standard output.
#[tokio::test]
async fn cluster_drain_waits_until_the_node_left() {
    let endpoint = start_fake().await;
    let out = exactly(
        &endpoint,
        &["cluster", "drain", "2", "--deadline", "60s"],
        b"",
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(lines[0], "node 2: drain committed; 2 jobs running");
    assert!(
        lines[1].starts_with("node 2: 2 jobs running; deadline in "),
        "{lines:?}"
    );
    assert!(
        lines[2].starts_with("node 2: 1 jobs running; deadline in "),
        "{lines:?}"
    );
    assert_eq!(lines[3], "node 2: running nothing; leaving the membership");
    assert!(
        lines[4].starts_with("node 2 left the cluster after "),
        "{lines:?}"
    );
    assert_eq!(lines.len(), 5, "{lines:?}");

    let endpoint = start_fake().await;
    let out = exactly(&endpoint, &["--json", "cluster", "remove", "2"], b"").await;
    assert!(out.status.success(), "{}", stderr(&out));
    let value: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(value["node_id"], 2);
    assert_eq!(value["left"], true);
    assert_eq!(value["removed"], true);
    assert!(
        stderr(&out).contains("node 2: removal committed"),
        "{}",
        stderr(&out)
    );
}

/// `--no-wait` returns once the drain is committed; refusals print their gRPC code.
#[tokio::test]
async fn cluster_drain_no_wait_and_refusals() {
    let endpoint = start_fake().await;
    let out = exactly(&endpoint, &["cluster", "drain", "2", "--no-wait"], b"").await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "node 2: drain committed (2 jobs running); `exactly cluster status` shows its progress\n"
    );
    let out = exactly(&endpoint, &["cluster", "drain", "9"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: NOT_FOUND: node 9 is not a member of this cluster\n"
    );
    let out = exactly(&endpoint, &["cluster", "remove", "1"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: FAILED_PRECONDITION: node 1 is the only voter"),
        "{}",
        stderr(&out)
    );
}

/// `cluster join ADDR` asks the node at ADDR for its id and has the cluster admit it; a member
/// is refused without a call.
#[tokio::test]
async fn cluster_join_admits_the_node_at_an_address() {
    let endpoint = start_fake().await;
    let newcomer = start_fake_as(9).await;
    let addr = newcomer.trim_start_matches("http://").to_string();
    let out = exactly(&endpoint, &["cluster", "join", &addr], b"").await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("node 9 at {addr} joined as a learner\n")
    );
    let member = endpoint.trim_start_matches("http://").to_string();
    let out = exactly(&endpoint, &["cluster", "join", &member], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("is a member already"),
        "{}",
        stderr(&out)
    );
}

/// Bench submits every job in batches, waits for the counts, and reads the sample back.
#[tokio::test]
async fn bench_against_fake() {
    let endpoint = start_fake().await;
    // Jobs finished before the bench must not count towards it.
    let out = exactly(
        &endpoint,
        &["submit", "--kind", "noop", "--count", "5"],
        b"",
    )
    .await;
    assert!(out.status.success());
    let args = [
        "--json",
        "bench",
        "--jobs",
        "250",
        "--batch",
        "40",
        "--concurrency",
        "3",
        "--sample",
        "100",
        "--payload-bytes",
        "16",
    ];
    let out = exactly(&endpoint, &args, b"").await;
    assert!(out.status.success(), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(r["acknowledged"], 250);
    assert_eq!(r["submit_latency_us"]["count"], 7); // 6 × 40 + 10
    assert_eq!(r["sampled_jobs"], 100);
    assert_eq!(r["completion_latency_ms"]["count"], 100);
    assert_eq!(r["completion_latency_ms"]["max"], 7);
    assert_eq!(r["failures"]["jobs_failed"], 0);

    let out = exactly(&endpoint, &["bench", "--jobs", "20", "--kind", "fail"], b"").await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("20 jobs ended failed"), "{text}");
    assert!(text.contains("leader's clock"), "{text}");
}

/// Bench with every submit rejected fails with the server's error.
#[tokio::test]
async fn bench_with_rejected_submits_fails() {
    let endpoint = start_fake().await;
    let out = exactly(&endpoint, &["bench", "--jobs", "10", "--kind", "bad"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no job was accepted: INVALID_ARGUMENT"),
        "{}",
        stderr(&out)
    );
}
