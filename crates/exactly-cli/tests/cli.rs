//! The `exactly` binary end to end against an in-process fake cluster: output, exit codes and
//! error text for every command. The fake finishes jobs the moment they are submitted (kind
//! `fail` dies, kind `sleep` stays pending, kind `bad` is refused), remembers idempotency keys,
//! pages its lists, numbers events like the real event hub, and keeps queues and schedules in
//! memory. It tests the CLI, not a cluster.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use exactly_proto::v1::cluster_server::{Cluster, ClusterServer};
use exactly_proto::v1::dead_letters_server::{DeadLetters, DeadLettersServer};
use exactly_proto::v1::jobs_server::{Jobs, JobsServer};
use exactly_proto::v1::queues_server::{Queues, QueuesServer};
use exactly_proto::v1::schedules_server::{Schedules, SchedulesServer};
use exactly_proto::v1::{
    AddScheduleRequest, Attempt, CancelRequest, CancelResponse, CancelResult,
    ConfigureQueueRequest, DeadLetterFilter, DeadLetterResponse, EventPosition, GetRequest,
    GetResponse, Job, JobCounts, JobEventMessage, JobState, ListQueuesRequest, ListQueuesResponse,
    ListRequest, ListResponse, ListSchedulesRequest, ListSchedulesResponse, Member, QueueInfo,
    RemoveScheduleRequest, RemoveScheduleResponse, ScheduleInfo, SetSchedulePausedRequest,
    StatusRequest, StatusResponse, SubmitRequest, SubmitResponse, WatchRequest,
};
use futures::Stream;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// Cancelling this job id answers DEADLINE_EXCEEDED: the outcome of the cancel is unknown.
const UNKNOWN_OUTCOME_JOB: u64 = 777;
/// The first Submit with a job of this kind commits and then answers UNKNOWN (the answer is
/// "lost"); later ones answer normally.
const LOST_REPLY_KIND: &str = "lost-reply";

#[derive(Default)]
struct State {
    jobs: BTreeMap<u64, Job>,
    /// The last job id given out (purged jobs keep theirs).
    last_id: u64,
    /// Job ids by idempotency key.
    keys: HashMap<String, u64>,
    /// The last "log index": every write is one entry.
    index: u64,
    events: Vec<JobEventMessage>,
    queues: BTreeMap<String, QueueInfo>,
    schedules: BTreeMap<String, ScheduleInfo>,
    /// Whether a LOST_REPLY_KIND submit has lost its answer already.
    reply_lost: bool,
    /// Payloads of jobs that keep theirs (pending, running, dead), as the cluster does.
    payloads: HashMap<u64, Vec<u8>>,
}

impl State {
    /// Starts a new log entry and returns its index.
    fn entry(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    fn event(&mut self, index: u64, job: &Job) {
        let seq = self
            .events
            .iter()
            .filter(|e| e.position.is_some_and(|p| p.index == index))
            .count() as u32;
        self.events.push(JobEventMessage {
            position: Some(EventPosition { index, seq }),
            job_id: job.id,
            queue: job.queue.clone(),
            state: job.state,
            attempt: job.attempts.len() as u32,
            token: job.attempts.last().map_or(0, |a| a.token),
            node_id: job.attempts.last().map_or(0, |a| a.node_id),
            at_ms: job.updated_at_ms,
        });
    }

    /// The dead letters a filter selects; like the real server, an empty filter needs `all`
    /// and `all` takes no filter.
    fn dead_matching(&self, f: &DeadLetterFilter) -> Result<Vec<u64>, Status> {
        let unfiltered = f.job_ids.is_empty() && f.queue.is_empty() && f.kind.is_empty();
        if unfiltered != f.all {
            return Err(Status::invalid_argument(
                "set job_ids, queue or kind, or all = true (not both)",
            ));
        }
        let limit = if f.limit == 0 { 1000 } else { f.limit as usize };
        Ok(self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Dead as i32)
            .filter(|j| f.job_ids.is_empty() || f.job_ids.contains(&j.id))
            .filter(|j| f.queue.is_empty() || j.queue == f.queue)
            .filter(|j| f.kind.is_empty() || j.kind == f.kind)
            .map(|j| j.id)
            .take(limit)
            .collect())
    }
}

/// The fake cluster; clones share one state.
#[derive(Clone, Default)]
struct FakeCluster {
    state: Arc<Mutex<State>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEventMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Jobs for FakeCluster {
    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<SubmitResponse>, Status> {
        let specs = request.into_inner().jobs;
        if specs.iter().any(|s| s.kind == "bad") {
            return Err(Status::invalid_argument(
                "jobs[0]: unknown job kind \"bad\"",
            ));
        }
        let mut state = self.state.lock().unwrap();
        for (i, spec) in specs.iter().enumerate() {
            if let Some(id) = state.keys.get(&spec.idempotency_key) {
                let original = &state.jobs[id];
                if original.payload_bytes as usize != spec.payload.len() {
                    return Err(Status::already_exists(format!(
                        "jobs[{i}]: idempotency key {:?} belongs to job {id} with another payload",
                        spec.idempotency_key
                    )));
                }
            }
        }
        let lose_reply = !state.reply_lost && specs.iter().any(|s| s.kind == LOST_REPLY_KIND);
        let index = state.entry();
        let mut reply = SubmitResponse::default();
        for spec in specs {
            if let Some(&id) = state.keys.get(&spec.idempotency_key) {
                reply.job_ids.push(id);
                reply.existing.push(true);
                continue;
            }
            state.last_id += 1;
            let id = state.last_id;
            let created = now_ms();
            let payload = spec.payload.clone();
            let (job_state, outcome, error) = match spec.kind.as_str() {
                "fail" => (JobState::Dead, "failed", "exit status 1"),
                "sleep" => (JobState::Pending, "", ""),
                _ => (JobState::Succeeded, "succeeded", ""),
            };
            let attempts = if outcome.is_empty() {
                Vec::new()
            } else {
                vec![Attempt {
                    number: 1,
                    token: 100 + id,
                    node_id: 1,
                    started_at_ms: created + 2,
                    ended_at_ms: created + 7,
                    outcome: outcome.into(),
                    error: error.into(),
                }]
            };
            let job = Job {
                id,
                queue: if spec.queue.is_empty() {
                    "default".into()
                } else {
                    spec.queue
                },
                kind: spec.kind,
                priority: spec.priority,
                state: job_state as i32,
                payload_bytes: spec.payload.len() as u32,
                max_attempts: spec.max_attempts.max(1),
                timeout_ms: spec.timeout_ms,
                created_at_ms: created,
                updated_at_ms: created + 7,
                run_at_ms: spec.run_at_ms,
                attempts,
                result: if job_state == JobState::Succeeded {
                    spec.payload
                } else {
                    Vec::new()
                },
                last_error: error.into(),
                idempotency_key: spec.idempotency_key.clone(),
                ordering_key: spec.ordering_key,
                labels: spec.labels,
                failures: u32::from(job_state == JobState::Dead),
                backoff_base_ms: spec.backoff_base_ms,
                backoff_max_ms: spec.backoff_max_ms,
                ..Job::default()
            };
            let pending = Job {
                state: JobState::Pending as i32,
                attempts: Vec::new(),
                ..job.clone()
            };
            state.event(index, &pending);
            if job_state != JobState::Pending {
                state.event(index, &job);
            }
            if !spec.idempotency_key.is_empty() {
                state.keys.insert(spec.idempotency_key, id);
            }
            if job_state != JobState::Succeeded {
                state.payloads.insert(id, payload.clone());
            }
            state.jobs.insert(id, job);
            reply.job_ids.push(id);
            reply.existing.push(false);
        }
        if lose_reply {
            state.reply_lost = true;
            return Err(Status::unknown("the node stopped with the write in flight"));
        }
        Ok(Response::new(reply))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let GetRequest {
            job_id: id,
            include_payload,
        } = request.into_inner();
        let state = self.state.lock().unwrap();
        match state.jobs.get(&id) {
            Some(job) => Ok(Response::new(GetResponse {
                job: Some(job.clone()),
                payload: include_payload
                    .then(|| state.payloads.get(&id).cloned())
                    .flatten(),
            })),
            None => Err(Status::not_found(format!("job {id} does not exist"))),
        }
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let r = request.into_inner();
        let limit = if r.limit == 0 { 100 } else { r.limit as usize };
        let state = self.state.lock().unwrap();
        let mut jobs = Vec::new();
        let mut last = None;
        for job in state.jobs.range(r.after_id + 1..).map(|(_, j)| j) {
            if jobs.len() == limit {
                break;
            }
            last = Some(job.id);
            let keep = (r.queue.is_empty() || job.queue == r.queue)
                && (r.kind.is_empty() || job.kind == r.kind)
                && (r.state == 0 || job.state == r.state);
            if keep {
                jobs.push(job.clone());
            }
        }
        let more = last.is_some_and(|id| state.jobs.range(id + 1..).next().is_some());
        Ok(Response::new(ListResponse {
            jobs,
            next_after_id: if more { last.unwrap_or(0) } else { 0 },
        }))
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let ids = request.into_inner().job_ids;
        if ids.contains(&UNKNOWN_OUTCOME_JOB) {
            return Err(Status::deadline_exceeded(
                "proposed but not committed within 5s",
            ));
        }
        let mut state = self.state.lock().unwrap();
        let index = state.entry();
        let mut results = Vec::new();
        for job_id in ids {
            let result = match state.jobs.get(&job_id).cloned() {
                None => CancelResult {
                    job_id,
                    error: format!("job {job_id} does not exist"),
                    code: tonic::Code::NotFound as i32,
                    ..CancelResult::default()
                },
                Some(job) if job.state != JobState::Pending as i32 => CancelResult {
                    job_id,
                    error: format!("job {job_id} has already finished"),
                    code: tonic::Code::FailedPrecondition as i32,
                    ..CancelResult::default()
                },
                Some(mut job) => {
                    let previous_state = job.state;
                    job.state = JobState::Cancelled as i32;
                    state.event(index, &job);
                    state.jobs.insert(job_id, job);
                    CancelResult {
                        job_id,
                        previous_state,
                        error: String::new(),
                        code: tonic::Code::Ok as i32,
                    }
                }
            };
            results.push(result);
        }
        Ok(Response::new(CancelResponse { results }))
    }

    type WatchStream = EventStream;

    /// Streams the retained events after the request's position (or from now), polling for new
    /// ones, like a node's event hub.
    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<EventStream>, Status> {
        let r = request.into_inner();
        let after = match r.after {
            Some(p) => (p.index, p.seq),
            None => (self.state.lock().unwrap().index, u32::MAX),
        };
        let fake = self.clone();
        let stream = futures::stream::unfold(after, move |mut after| {
            let fake = fake.clone();
            let r = r.clone();
            async move {
                loop {
                    let next = {
                        let state = fake.state.lock().unwrap();
                        state
                            .events
                            .iter()
                            .find(|e| {
                                let p = e.position.unwrap_or_default();
                                (p.index, p.seq) > after
                                    && (r.job_id == 0 || e.job_id == r.job_id)
                                    && (r.queue.is_empty() || e.queue == r.queue)
                            })
                            .cloned()
                    };
                    match next {
                        Some(event) => {
                            let p = event.position.unwrap_or_default();
                            after = (p.index, p.seq);
                            return Some((Ok(event), after));
                        }
                        None => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl DeadLetters for FakeCluster {
    async fn redrive(
        &self,
        request: Request<DeadLetterFilter>,
    ) -> Result<Response<DeadLetterResponse>, Status> {
        let mut state = self.state.lock().unwrap();
        let ids = state.dead_matching(&request.into_inner())?;
        let index = state.entry();
        for id in &ids {
            let mut job = state.jobs[id].clone();
            job.state = JobState::Pending as i32;
            state.event(index, &job);
            state.jobs.insert(*id, job);
        }
        Ok(Response::new(DeadLetterResponse { job_ids: ids }))
    }

    async fn purge(
        &self,
        request: Request<DeadLetterFilter>,
    ) -> Result<Response<DeadLetterResponse>, Status> {
        let mut state = self.state.lock().unwrap();
        let ids = state.dead_matching(&request.into_inner())?;
        state.entry();
        for id in &ids {
            state.jobs.remove(id);
        }
        Ok(Response::new(DeadLetterResponse { job_ids: ids }))
    }
}

#[tonic::async_trait]
impl Queues for FakeCluster {
    async fn configure(
        &self,
        request: Request<ConfigureQueueRequest>,
    ) -> Result<Response<QueueInfo>, Status> {
        let r = request.into_inner();
        if r.rate.is_some() && r.clear_rate {
            return Err(Status::invalid_argument("set rate or clear_rate, not both"));
        }
        let mut state = self.state.lock().unwrap();
        state.entry();
        let queue = state.queues.entry(r.queue.clone()).or_insert(QueueInfo {
            name: r.queue,
            ..QueueInfo::default()
        });
        if let Some(n) = r.concurrency_max {
            queue.concurrency_max = n;
        }
        if r.rate.is_some() || r.clear_rate {
            queue.rate = r.rate;
        }
        if let Some(paused) = r.paused {
            queue.paused = paused;
        }
        Ok(Response::new(queue.clone()))
    }

    async fn list(
        &self,
        _: Request<ListQueuesRequest>,
    ) -> Result<Response<ListQueuesResponse>, Status> {
        let state = self.state.lock().unwrap();
        let mut queues = state.queues.clone();
        for job in state.jobs.values() {
            let queue = queues.entry(job.queue.clone()).or_insert(QueueInfo {
                name: job.queue.clone(),
                ..QueueInfo::default()
            });
            if job.state == JobState::Pending as i32 {
                queue.pending += 1;
            }
        }
        Ok(Response::new(ListQueuesResponse {
            queues: queues.into_values().collect(),
        }))
    }
}

#[tonic::async_trait]
impl Schedules for FakeCluster {
    async fn add(
        &self,
        request: Request<AddScheduleRequest>,
    ) -> Result<Response<ScheduleInfo>, Status> {
        let r = request.into_inner();
        if r.cron.split_whitespace().count() != 5 && !r.cron.starts_with('@') {
            return Err(Status::invalid_argument(format!(
                "cron expression {:?}: expected 5 fields",
                r.cron
            )));
        }
        let mut state = self.state.lock().unwrap();
        if state.schedules.contains_key(&r.name) && !r.replace {
            return Err(Status::already_exists(format!(
                "schedule {:?} exists; pass replace to overwrite it",
                r.name
            )));
        }
        state.entry();
        let info = ScheduleInfo {
            name: r.name.clone(),
            cron: r.cron,
            time_zone: r.time_zone,
            job: r.job,
            overlap: r.overlap,
            missed: r.missed,
            next_tick_ms: 1_900_000_000_000,
            ..ScheduleInfo::default()
        };
        state.schedules.insert(r.name, info.clone());
        Ok(Response::new(info))
    }

    async fn list(
        &self,
        _: Request<ListSchedulesRequest>,
    ) -> Result<Response<ListSchedulesResponse>, Status> {
        let state = self.state.lock().unwrap();
        Ok(Response::new(ListSchedulesResponse {
            schedules: state.schedules.values().cloned().collect(),
        }))
    }

    async fn remove(
        &self,
        request: Request<RemoveScheduleRequest>,
    ) -> Result<Response<RemoveScheduleResponse>, Status> {
        let name = request.into_inner().name;
        match self.state.lock().unwrap().schedules.remove(&name) {
            Some(_) => Ok(Response::new(RemoveScheduleResponse {})),
            None => Err(Status::not_found(format!(
                "schedule {name:?} does not exist"
            ))),
        }
    }

    async fn set_paused(
        &self,
        request: Request<SetSchedulePausedRequest>,
    ) -> Result<Response<ScheduleInfo>, Status> {
        let r = request.into_inner();
        let mut state = self.state.lock().unwrap();
        match state.schedules.get_mut(&r.name) {
            Some(s) => {
                s.paused = r.paused;
                Ok(Response::new(s.clone()))
            }
            None => Err(Status::not_found(format!(
                "schedule {:?} does not exist",
                r.name
            ))),
        }
    }
}

#[tonic::async_trait]
impl Cluster for FakeCluster {
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
        let state = self.state.lock().unwrap();
        let count =
            |s: JobState| state.jobs.values().filter(|j| j.state == s as i32).count() as u64;
        Ok(Response::new(StatusResponse {
            node_id: 1,
            leader_id: 1,
            term: 3,
            last_log_index: state.index,
            committed_index: state.index,
            applied_index: state.index,
            members: vec![Member {
                node_id: 1,
                addr: "127.0.0.1:7101".into(),
                role: "voter".into(),
                leader: true,
                matched_index: state.index,
                slots: 16,
                running: 0,
                incarnation: 1,
                health: "ok".into(),
                ..Member::default()
            }],
            removed_node_ids: Vec::new(),
            counts: Some(JobCounts {
                pending: count(JobState::Pending),
                succeeded: count(JobState::Succeeded),
                dead: count(JobState::Dead),
                cancelled: count(JobState::Cancelled),
                ..JobCounts::default()
            }),
        }))
    }
}

/// Starts the fake cluster on a loopback port; it stops with the test's runtime.
async fn start_fake() -> String {
    let fake = FakeCluster::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(JobsServer::new(fake.clone()))
            .add_service(DeadLettersServer::new(fake.clone()))
            .add_service(QueuesServer::new(fake.clone()))
            .add_service(SchedulesServer::new(fake.clone()))
            .add_service(ClusterServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// The `exactly` binary with `endpoint` as its cluster and piped standard streams.
fn command(endpoint: &str, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_exactly"));
    command
        .args(args)
        .env("EXACTLY_ENDPOINTS", endpoint)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs `exactly` with the given arguments against `endpoint`, feeding `stdin`.
async fn exactly(endpoint: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = command(endpoint, args).spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("exactly finishes")
        .unwrap()
}

/// Runs `exactly` and asserts that it succeeded; returns standard output.
async fn ok(endpoint: &str, args: &[&str]) -> String {
    let out = exactly(endpoint, args, b"").await;
    assert!(
        out.status.success(),
        "exactly {args:?} failed: {}",
        stderr(&out)
    );
    stdout(&out)
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("{err}: {text}"))
}

/// Submit prints one id per line (or a JSON list), and get shows the job that was submitted.
#[tokio::test]
async fn submit_then_get() {
    let endpoint = start_fake().await;
    let out = ok(&endpoint, &["submit", "--kind", "noop", "--count", "3"]).await;
    assert_eq!(out, "1\n2\n3\n");

    let out = exactly(
        &endpoint,
        &["--json", "submit", "--kind", "echo", "--payload-stdin"],
        b"hello",
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let value = json(&stdout(&out));
    assert_eq!(value["job_ids"], serde_json::json!([4]));
    assert_eq!(value["existing"], serde_json::json!([false]));

    let text = ok(&endpoint, &["get", "4"]).await;
    assert!(text.contains("state            succeeded\n"), "{text}");
    assert!(text.contains("payload          5 bytes\n"), "{text}");
    assert!(text.contains("result (5 bytes, text):\nhello\n"), "{text}");

    let value = json(&ok(&endpoint, &["get", "4", "--json"]).await);
    assert_eq!(value["attempts"][0]["token"], 104);
    // The client gave the job a key although none was asked for.
    assert_eq!(value["idempotency_key"].as_str().unwrap().len(), 36);
}

/// A repeated --idempotency-key prints the original job's id and says on standard error that
/// nothing new was created; the same key with another payload is refused with exit code 1. The
/// new job flags reach the server.
#[tokio::test]
async fn idempotency_key_and_job_flags() {
    let endpoint = start_fake().await;
    let args = [
        "submit",
        "--kind",
        "noop",
        "--payload",
        "receipt",
        "--idempotency-key",
        "order-17",
        "--ordering-key",
        "customer-9",
        "--label",
        "team=mail",
        "--backoff-base",
        "2s",
        "--backoff-max",
        "1m",
    ];
    assert_eq!(ok(&endpoint, &args).await, "1\n");
    let out = exactly(&endpoint, &args, b"").await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "1\n");
    assert!(
        stderr(&out).contains("job 1 already existed (idempotency key \"order-17\")"),
        "{}",
        stderr(&out)
    );
    let mut again = args.to_vec();
    again.insert(0, "--json");
    let value = json(&ok(&endpoint, &again).await);
    assert_eq!(value["existing"], serde_json::json!([true]));

    let out = exactly(
        &endpoint,
        &[
            "submit",
            "--kind",
            "noop",
            "--payload",
            "other",
            "--idempotency-key",
            "order-17",
        ],
        b"",
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: ALREADY_EXISTS: jobs[0]: idempotency key"),
        "{}",
        stderr(&out)
    );

    let text = ok(&endpoint, &["get", "1"]).await;
    assert!(text.contains("idempotency key  order-17\n"), "{text}");
    assert!(text.contains("ordering key     customer-9\n"), "{text}");
    assert!(text.contains("labels           team=mail\n"), "{text}");
    assert!(
        text.contains("backoff          2s, doubling up to 1m\n"),
        "{text}"
    );

    // One key cannot name several jobs.
    let out = exactly(
        &endpoint,
        &[
            "submit",
            "--kind",
            "noop",
            "--idempotency-key",
            "k",
            "--count",
            "2",
        ],
        b"",
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// A submit whose answer is lost after it committed is resent with the same key: the job exists
/// once, its id is printed, and the note says the key may have been recorded by the first try.
#[tokio::test]
async fn lost_reply_is_resent_with_the_same_key() {
    let endpoint = start_fake().await;
    let out = exactly(&endpoint, &["submit", "--kind", LOST_REPLY_KIND], b"").await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "1\n");
    assert!(
        stderr(&out).contains("job 1 already existed (by an earlier submit, or by this command's first try whose answer was lost)"),
        "{}",
        stderr(&out)
    );
    let value = json(&ok(&endpoint, &["--json", "list"]).await);
    assert_eq!(
        value["jobs"].as_array().unwrap().len(),
        1,
        "one job: {value}"
    );
}

/// Server refusals exit with 1 and print the code and message; usage errors exit with 2 (and
/// --help with 0); an unreachable cluster exits with 3; a write with an unknown outcome with 4.
#[tokio::test]
async fn exit_codes() {
    let endpoint = start_fake().await;
    let out = exactly(&endpoint, &["get", "999"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "error: NOT_FOUND: job 999 does not exist\n");
    assert!(stdout(&out).is_empty());

    let out = exactly(&endpoint, &["submit", "--kind", "bad"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: INVALID_ARGUMENT: jobs[0]: unknown job kind"),
        "{}",
        stderr(&out)
    );

    let out = exactly(&endpoint, &["submit"], b"").await;
    assert_eq!(out.status.code(), Some(2));
    let out = exactly(
        &endpoint,
        &[
            "submit",
            "--kind",
            "k",
            "--payload-file",
            "/nonexistent/payload",
        ],
        b"",
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot open payload file"),
        "{}",
        stderr(&out)
    );
    let out = exactly(&endpoint, &["--help"], b"").await;
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("cron"));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let out = exactly(&dead, &["status", "--retry-time", "300ms"], b"").await;
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    assert!(err.starts_with("error: UNAVAILABLE: "), "{err}");
    assert!(err.contains("gave up after"), "{err}");

    let unknown = UNKNOWN_OUTCOME_JOB.to_string();
    let out = exactly(&endpoint, &["cancel", &unknown], b"").await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("error: DEADLINE_EXCEEDED: outcome unknown"),
        "{}",
        stderr(&out)
    );
}

/// List prints a page with a hint to continue, --all pages through with one header, filters
/// apply, and --json streams every job with the next position.
#[tokio::test]
async fn list_pages() {
    let endpoint = start_fake().await;
    ok(&endpoint, &["submit", "--kind", "noop", "--count", "3"]).await;
    ok(
        &endpoint,
        &[
            "submit", "--kind", "fail", "--queue", "mail", "--count", "2",
        ],
    )
    .await;

    let out = exactly(&endpoint, &["list", "--limit", "2"], b"").await;
    assert!(out.status.success());
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(
        text.starts_with("ID  STATE      QUEUE    KIND  FAILURES  UPDATED"),
        "{text}"
    );
    assert!(
        stderr(&out).contains("more jobs follow: add --after 2"),
        "{}",
        stderr(&out)
    );

    let text = ok(&endpoint, &["list", "--limit", "2", "--all"]).await;
    assert_eq!(text.lines().count(), 6, "{text}");
    assert_eq!(text.matches("ID  ").count(), 1, "one header: {text}");
    assert!(text.contains("dead       mail     fail  1/1"), "{text}");

    let text = ok(&endpoint, &["list", "--state", "dead"]).await;
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.contains("exit status 1"), "{text}");
    let text = ok(&endpoint, &["list", "--queue", "nothing"]).await;
    assert_eq!(text, "no jobs matched\n");

    let value = json(&ok(&endpoint, &["--json", "list", "--limit", "2", "--all"]).await);
    let ids: Vec<u64> = value["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3, 4, 5]);
    assert_eq!(value["next_after_id"], 0);
    let value = json(
        &ok(
            &endpoint,
            &["--json", "list", "--limit", "2", "--after", "2"],
        )
        .await,
    );
    assert_eq!(value["jobs"][0]["id"], 3);
    assert_eq!(value["next_after_id"], 4);
}

/// Cancel reports each job, a refused one with its code (FAILED_PRECONDITION for a finished
/// job, NOT_FOUND for an unknown one; `code` in --json); a job that could not be cancelled makes
/// the command exit with 1.
#[tokio::test]
async fn cancel_reports_per_job() {
    let endpoint = start_fake().await;
    ok(&endpoint, &["submit", "--kind", "sleep", "--count", "2"]).await;
    ok(&endpoint, &["submit", "--kind", "noop"]).await;
    let text = ok(&endpoint, &["cancel", "1"]).await;
    assert_eq!(text, "JOB  RESULT\n1    cancelled (was pending)\n");

    let out = exactly(&endpoint, &["cancel", "2", "3", "99"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stdout(&out),
        "JOB  RESULT\n\
         2    cancelled (was pending)\n\
         3    not cancelled: FAILED_PRECONDITION: job 3 has already finished\n\
         99   not cancelled: NOT_FOUND: job 99 does not exist\n"
    );
    assert_eq!(stderr(&out), "error: 2 of 3 jobs were not cancelled\n");
    let out = exactly(&endpoint, &["--json", "cancel", "3", "99"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    let value = json(&stdout(&out));
    let codes: Vec<&str> = value["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["FAILED_PRECONDITION", "NOT_FOUND"]);
    let value = json(&ok(&endpoint, &["get", "--json", "2"]).await);
    assert_eq!(value["state"], "cancelled");
}

/// Dead letters are listed, redriven by id and purged by queue, across as many calls as it
/// takes (1500 dead letters need two calls of at most 1000); no filter needs --all, and --all
/// reaches the server as `all = true` (the fake, like a node, refuses an empty filter without
/// it).
#[tokio::test]
async fn dead_letters() {
    let endpoint = start_fake().await;
    ok(
        &endpoint,
        &[
            "submit", "--kind", "fail", "--queue", "mail", "--count", "2",
        ],
    )
    .await;
    ok(&endpoint, &["submit", "--kind", "noop"]).await;
    let text = ok(&endpoint, &["dlq", "list"]).await;
    assert_eq!(text.lines().count(), 3, "{text}");

    for json in [false, true] {
        let mut argv = vec!["dlq", "purge"];
        if json {
            argv.insert(0, "--json");
        }
        let out = exactly(&endpoint, &argv, b"").await;
        assert_eq!(out.status.code(), Some(2));
        assert!(stderr(&out).contains("--all"), "{}", stderr(&out));
        // Only the usage error: no summary of a purge that never ran.
        assert_eq!(stdout(&out), "", "{argv:?}");
    }

    assert_eq!(
        ok(&endpoint, &["dlq", "redrive", "--id", "2"]).await,
        "redrove 1 dead letters: 2\n"
    );
    let value = json(&ok(&endpoint, &["get", "--json", "2"]).await);
    assert_eq!(value["state"], "pending");
    assert_eq!(
        ok(&endpoint, &["dlq", "purge", "--queue", "mail"]).await,
        "purged 1 dead letters: 1\n"
    );
    assert_eq!(
        ok(&endpoint, &["dlq", "purge", "--queue", "mail"]).await,
        "no dead letters matched\n"
    );

    ok(&endpoint, &["submit", "--kind", "fail", "--count", "1500"]).await;
    let value = json(&ok(&endpoint, &["--json", "dlq", "purge", "--all"]).await);
    assert_eq!(value["job_ids"].as_array().unwrap().len(), 1500);
    assert_eq!(ok(&endpoint, &["dlq", "list"]).await, "no jobs matched\n");
}

/// Queue configure changes only what is named and prints the queue; list shows every queue;
/// configure without a change is a usage error.
#[tokio::test]
async fn queues() {
    let endpoint = start_fake().await;
    let text = ok(
        &endpoint,
        &[
            "queue",
            "configure",
            "mail",
            "--concurrency",
            "2",
            "--rate",
            "10/1s",
            "--pause",
        ],
    )
    .await;
    assert_eq!(
        text,
        "queue        mail\n\
         state        paused\n\
         concurrency  2\n\
         rate         10/1s\n\
         pending      0\n\
         running      0\n\
         finished     0\n\
         dead         0\n"
    );
    let value = json(
        &ok(
            &endpoint,
            &[
                "--json",
                "queue",
                "configure",
                "mail",
                "--resume",
                "--clear-rate",
            ],
        )
        .await,
    );
    assert_eq!(value["paused"], false);
    assert_eq!(value["concurrency_max"], 2);
    assert_eq!(value["rate"], serde_json::Value::Null);

    ok(
        &endpoint,
        &["submit", "--kind", "sleep", "--queue", "batch"],
    )
    .await;
    let text = ok(&endpoint, &["queue", "list"]).await;
    assert_eq!(
        text,
        "QUEUE  STATE   CONCURRENCY  RATE       PENDING  RUNNING  FINISHED  DEAD\n\
         batch  active  unlimited    unlimited  1        0        0         0\n\
         mail   active  2            unlimited  0        0        0         0\n"
    );
    let out = exactly(&endpoint, &["queue", "configure", "mail"], b"").await;
    assert_eq!(out.status.code(), Some(2));
    let out = exactly(
        &endpoint,
        &["queue", "configure", "mail", "--rate", "ten"],
        b"",
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
}

/// Cron add, list, pause, resume and remove; a duplicate name and an unknown schedule are
/// refused with the server's message.
#[tokio::test]
async fn cron_schedules() {
    let endpoint = start_fake().await;
    let add = [
        "cron",
        "add",
        "nightly",
        "0 3 * * *",
        "--tz",
        "Europe/Berlin",
        "--overlap",
        "allow",
        "--missed",
        "run-once",
        "--kind",
        "noop",
        "--queue",
        "reports",
        "--payload",
        "all",
    ];
    let text = ok(&endpoint, &add).await;
    assert!(text.contains("schedule         nightly\n"), "{text}");
    assert!(text.contains("zone             Europe/Berlin\n"), "{text}");
    assert!(text.contains("missed ticks     run-once\n"), "{text}");
    assert!(
        text.contains("next tick        2030-03-17T17:46:40.000Z\n"),
        "{text}"
    );

    let out = exactly(&endpoint, &add, b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: ALREADY_EXISTS: "),
        "{}",
        stderr(&out)
    );
    let mut replace = add.to_vec();
    replace.push("--replace");
    ok(&endpoint, &replace).await;

    let out = exactly(
        &endpoint,
        &["cron", "add", "bad", "every day", "--kind", "noop"],
        b"",
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("INVALID_ARGUMENT"),
        "{}",
        stderr(&out)
    );

    let text = ok(&endpoint, &["cron", "list"]).await;
    assert!(text.starts_with("NAME     CRON       ZONE"), "{text}");
    assert!(
        text.contains("nightly  0 3 * * *  Europe/Berlin  active"),
        "{text}"
    );
    let value = json(&ok(&endpoint, &["--json", "cron", "pause", "nightly"]).await);
    assert_eq!(value["paused"], true);
    assert_eq!(value["overlap"], "allow");
    assert_eq!(value["job"]["payload"], "all");
    let text = ok(&endpoint, &["cron", "resume", "nightly"]).await;
    assert!(text.contains("state            active\n"), "{text}");
    assert_eq!(
        ok(&endpoint, &["cron", "remove", "nightly"]).await,
        "removed schedule nightly\n"
    );
    let out = exactly(&endpoint, &["cron", "remove", "nightly"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("error: NOT_FOUND: "),
        "{}",
        stderr(&out)
    );
    assert_eq!(ok(&endpoint, &["cron", "list"]).await, "no schedules\n");
}

/// Watch from a position prints one line per event (or one JSON object per line) and stops after
/// --count; a job-scoped watch shows that job only.
#[tokio::test]
async fn watch_from_a_position() {
    let endpoint = start_fake().await;
    ok(&endpoint, &["submit", "--kind", "noop", "--count", "2"]).await;
    ok(&endpoint, &["submit", "--kind", "fail"]).await;
    let out = exactly(&endpoint, &["watch", "--after", "0:0", "--count", "6"], b"").await;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 6, "{lines:?}");
    assert!(lines[0].starts_with("1:0  "), "{}", lines[0]);
    assert!(
        lines[0].ends_with("job 1  queue default  pending"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].ends_with("job 1  queue default  succeeded  attempt 1  node 1  token 101"),
        "{}",
        lines[1]
    );
    assert!(lines[5].starts_with("2:1  "), "{}", lines[5]);
    assert!(
        lines[5].contains("job 3  queue default  dead"),
        "{}",
        lines[5]
    );
    assert!(
        stderr(&out).contains("stopped after 6 events at position 2:1 (resume with --after 2:1)"),
        "{}",
        stderr(&out)
    );

    let out = exactly(
        &endpoint,
        &[
            "--json", "watch", "--job", "2", "--after", "0:0", "--count", "2",
        ],
        b"",
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let events: Vec<serde_json::Value> = stdout(&out).lines().map(json).collect();
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| e["job_id"] == 2));
    assert_eq!(events[0]["position"], "1:2");
    assert_eq!(events[1]["state"], "succeeded");
}

/// `watch --job` ends at the job's terminal state: at once (saying so) for a job that finished
/// already, after its terminal event when replaying from a position; `--follow` needs `--job`.
#[tokio::test]
async fn a_job_watch_ends_when_the_job_has() {
    let endpoint = start_fake().await;
    ok(&endpoint, &["submit", "--kind", "noop", "--count", "2"]).await;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        exactly(&endpoint, &["watch", "--job", "1"], b""),
    )
    .await
    .expect("a watch of a finished job ends");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("job 1 is succeeded already"),
        "{}",
        stderr(&out)
    );
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        exactly(&endpoint, &["watch", "--job", "2", "--after", "0:0"], b""),
    )
    .await
    .expect("a replayed watch ends at the terminal event");
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[1].contains("job 2  queue default  succeeded"),
        "{lines:?}"
    );
    let out = exactly(&endpoint, &["watch", "--follow"], b"").await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// A watch from now prints only new events, and Ctrl-C (SIGINT) ends it with exit code 0 and the
/// position to resume from.
#[tokio::test]
async fn watch_until_interrupted() {
    let endpoint = start_fake().await;
    ok(&endpoint, &["submit", "--kind", "noop"]).await;
    let mut child = command(&endpoint, &["watch", "--queue", "mail"])
        .spawn()
        .unwrap();
    let mut err_lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = tokio::time::timeout(Duration::from_secs(30), err_lines.next_line())
        .await
        .expect("the watch starts")
        .unwrap()
        .unwrap();
    assert_eq!(
        started,
        "watching queue mail after log entry 1 (Ctrl-C to stop)"
    );
    ok(&endpoint, &["submit", "--kind", "noop", "--queue", "mail"]).await;
    let mut out_lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(30), out_lines.next_line())
            .await
            .expect("events arrive")
            .unwrap()
            .unwrap();
        seen.push(line);
    }
    assert!(
        seen[0].starts_with("2:0  ") && seen[0].contains("job 2  queue mail  pending"),
        "{seen:?}"
    );
    assert!(seen[1].contains("job 2  queue mail  succeeded"), "{seen:?}");

    let pid = nix::unistd::Pid::from_raw(child.id().expect("running") as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("SIGINT ends the watch")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let last = err_lines.next_line().await.unwrap().unwrap_or_default();
    assert_eq!(
        last,
        "stopped after 2 events at position 2:1 (resume with --after 2:1)"
    );
}

/// Status prints the members table and the job counts.
#[tokio::test]
async fn status_table() {
    let endpoint = start_fake().await;
    let text = ok(&endpoint, &["status"]).await;
    assert!(
        text.contains(
            "ID  ADDR            ROLE   LEADER  HEALTH  LAG  RUNNING  SLOTS  INCARNATION  DRAIN\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("1   127.0.0.1:7101  voter  *       ok      -    0        16     1\n"),
        "{text}"
    );
}

/// Bench submits every job in batches, waits for the counts, and reads the sample back.
#[tokio::test]
async fn bench_against_fake() {
    let endpoint = start_fake().await;
    // Jobs finished before the bench must not count towards it.
    ok(&endpoint, &["submit", "--kind", "noop", "--count", "5"]).await;
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
    let r = json(&ok(&endpoint, &args).await);
    assert_eq!(r["acknowledged"], 250);
    assert_eq!(r["submit_latency_us"]["count"], 7); // 6 × 40 + 10
    assert_eq!(r["sampled_jobs"], 100);
    assert_eq!(r["completion_latency_ms"]["count"], 100);
    assert_eq!(r["completion_latency_ms"]["max"], 7);
    assert_eq!(r["failures"]["jobs_failed"], 0);

    let text = ok(&endpoint, &["bench", "--jobs", "20", "--kind", "fail"]).await;
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

/// `exactly health` asks every endpoint's gRPC health service: exit 0 and "serving" when all
/// serve; exit 3 when one is not serving or does not answer, naming it (also with --json).
#[tokio::test]
async fn health_exits_zero_only_when_every_endpoint_serves() {
    use tonic_health::ServingStatus;
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let endpoint = format!("http://{addr}");
    let out = exactly(&endpoint, &["health"], b"").await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("serving"), "{}", stdout(&out));

    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let out = exactly(&endpoint, &["health"], b"").await;
    assert_eq!(out.status.code(), Some(3));
    assert!(stdout(&out).contains("not serving"), "{}", stdout(&out));
    assert!(stderr(&out).contains(&endpoint), "{}", stderr(&out));

    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let both = format!("{endpoint},http://{closed}");
    let out = exactly(&both, &["--json", "--retry-time", "1s", "health"], b"").await;
    assert_eq!(out.status.code(), Some(3));
    let answers = json(&stdout(&out));
    assert_eq!(answers[0]["serving"], true, "{answers}");
    assert_eq!(answers[1]["serving"], false, "{answers}");
    assert!(answers[1]["error"].is_string(), "{answers}");
}

/// `exactly get N --payload` prints a dead letter's (or pending job's) payload byte for byte,
/// and for a succeeded job, whose payload the cluster dropped, says so and exits 1.
#[tokio::test]
async fn get_payload_prints_the_bytes_while_the_cluster_holds_them() {
    let endpoint = start_fake().await;
    let dead = ok(
        &endpoint,
        &[
            "submit",
            "--kind",
            "fail",
            "--payload",
            "{\"to\":\"a@example.com\"}",
        ],
    )
    .await;
    let dead = dead.trim().to_string();
    let out = exactly(&endpoint, &["get", &dead, "--payload"], b"").await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(out.stdout, b"{\"to\":\"a@example.com\"}");

    let done = ok(&endpoint, &["submit", "--kind", "noop", "--payload", "x"]).await;
    let done = done.trim().to_string();
    let out = exactly(&endpoint, &["get", &done, "--payload"], b"").await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        stderr(&out).contains("succeeded") && stderr(&out).contains("dropped"),
        "{}",
        stderr(&out)
    );
}
