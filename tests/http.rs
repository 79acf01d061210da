//! `http` job kinds end to end: a 3-node in-process cluster whose configuration defines
//! `[http.call]` and `[http.flaky]` kinds pointing at a loopback axum server that counts calls per
//! `Idempotency-Key`. The server is started and stopped by the test.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use exactly_handlers::HttpSpec;
use exactly_proto::v1 as pb;
use exactly_tests::TestCluster;

/// One call as the server saw it.
#[derive(Clone, Debug)]
struct Call {
    key: String,
    job_id: String,
    token: String,
    trace: String,
    body: Bytes,
}

#[derive(Default)]
struct Calls {
    calls: Vec<Call>,
    per_key: HashMap<String, usize>,
}

type Shared = Arc<Mutex<Calls>>;

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// Records the call and returns how many calls its key has had, this one included.
fn record(state: &Shared, headers: &HeaderMap, body: Bytes) -> usize {
    let mut calls = state.lock().unwrap();
    let key = header(headers, "idempotency-key");
    let traceparent = header(headers, "traceparent");
    calls.calls.push(Call {
        key: key.clone(),
        job_id: header(headers, "x-exactly-job-id"),
        token: header(headers, "x-exactly-fencing-token"),
        trace: traceparent.split('-').nth(1).unwrap_or("").to_string(),
        body,
    });
    let n = calls.per_key.entry(key).or_insert(0);
    *n += 1;
    *n
}

/// `POST /effect`: 200 `applied <key>`.
async fn effect(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    record(&state, &headers, body);
    (
        StatusCode::OK,
        format!("applied {}", header(&headers, "idempotency-key")),
    )
}

/// `POST /flaky`: 503 on a key's first call, 200 after.
async fn flaky(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    match record(&state, &headers, body) {
        1 => (StatusCode::SERVICE_UNAVAILABLE, "try again".to_string()),
        _ => (StatusCode::OK, "applied on retry".to_string()),
    }
}

/// The loopback server, aborted when dropped.
struct Server {
    addr: std::net::SocketAddr,
    state: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start() -> anyhow::Result<Self> {
        let state: Shared = Arc::default();
        let app = Router::new()
            .route("/effect", post(effect))
            .route("/flaky", post(flaky))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, state, task })
    }

    fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    fn calls_with_key(&self, key: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .per_key
            .get(key)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls Get until the job is finished (succeeded or failed), for up to `limit`.
async fn finished(cluster: &TestCluster, id: u64, limit: Duration) -> anyhow::Result<pb::Job> {
    let mut client = cluster.jobs_client(0).await?;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let job = client
            .get(pb::GetRequest {
                job_id: id,
                ..Default::default()
            })
            .await?
            .into_inner()
            .job
            .ok_or_else(|| anyhow::anyhow!("job {id} not found"))?;
        let state = pb::JobState::try_from(job.state)?;
        if matches!(state, pb::JobState::Succeeded | pb::JobState::Dead) {
            return Ok(job);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "job {id} still {state:?} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A job of a configured http kind, submitted to a 3-node cluster, calls the server exactly
/// once, with the job's idempotency key, job id, fencing token and payload, and the response
/// body becomes its result. A job whose server first answers 503 is retried with a new fencing
/// token but the same idempotency key and trace, and succeeds on the second call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_job_calls_the_server_once_with_its_idempotency_key() -> anyhow::Result<()> {
    let server = Server::start().await?;
    let (call_url, flaky_url) = (
        format!("http://{}/effect", server.addr),
        format!("http://{}/flaky", server.addr),
    );
    let cluster = TestCluster::start(3, |c| {
        c.http
            .insert("call".to_string(), HttpSpec::new(call_url.clone()));
        c.http
            .insert("flaky".to_string(), HttpSpec::new(flaky_url.clone()));
    })
    .await?;
    let mut client = cluster.jobs_client(1).await?;
    let ids = client
        .submit(pb::SubmitRequest {
            jobs: vec![
                pb::JobSpec {
                    kind: "call".to_string(),
                    payload: b"charge card 1".to_vec(),
                    ..Default::default()
                },
                pb::JobSpec {
                    kind: "flaky".to_string(),
                    payload: b"charge card 2".to_vec(),
                    max_attempts: 3,
                    ..Default::default()
                },
            ],
        })
        .await?
        .into_inner()
        .job_ids;
    let [call, flaky] = ids[..] else {
        anyhow::bail!("expected two job ids, got {ids:?}");
    };

    let job = finished(&cluster, call, Duration::from_secs(30)).await?;
    let key = format!("exactly-job-{call}");
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{job:?}");
    assert_eq!(job.result, format!("applied {key}").as_bytes());
    assert_eq!(server.calls_with_key(&key), 1, "{:?}", server.calls());
    let calls: Vec<Call> = server
        .calls()
        .into_iter()
        .filter(|c| c.key == key)
        .collect();
    assert_eq!(calls[0].job_id, call.to_string());
    assert_eq!(calls[0].token, job.attempts[0].token.to_string());
    assert_eq!(&calls[0].body[..], b"charge card 1");

    // Retries back off 1 s after the first failure.
    let job = finished(&cluster, flaky, Duration::from_secs(30)).await?;
    let key = format!("exactly-job-{flaky}");
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{job:?}");
    assert_eq!(job.result, b"applied on retry");
    assert_eq!(job.attempts.len(), 2, "{job:?}");
    assert!(job.attempts[0].error.contains("HTTP 503"), "{job:?}");
    let calls: Vec<Call> = server
        .calls()
        .into_iter()
        .filter(|c| c.key == key)
        .collect();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].token, job.attempts[0].token.to_string());
    assert_eq!(calls[1].token, job.attempts[1].token.to_string());
    assert_ne!(calls[0].token, calls[1].token);
    assert_eq!(
        calls[0].trace, calls[1].trace,
        "one trace for both attempts"
    );
    assert_eq!(calls[0].trace.len(), 32);

    cluster.shutdown().await;
    Ok(())
}
