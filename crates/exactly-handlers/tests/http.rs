//! The `http` handler against a real HTTP server: an axum app on 127.0.0.1:0, started by each
//! test and stopped when the test's [`TestServer`] is dropped. The server records every request
//! (path, headers, body), counts calls per `Idempotency-Key`, and notices requests that the
//! client abandoned before the response was sent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use exactly_handlers::http::{ERROR_BODY_BYTES_MAX, RESPONSE_BYTES_MAX_DEFAULT};
use exactly_handlers::{Handler, HandlerOutcome, HttpHandler, HttpSpec, JobContext};
use tokio_util::sync::CancellationToken;

/// One request as the server saw it.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

#[derive(Default)]
struct Record {
    seen: Vec<Seen>,
    per_key: HashMap<String, usize>,
    /// Requests to `/slow` whose handler was dropped before it answered (the client went away).
    abandoned: usize,
}

type Shared = Arc<Mutex<Record>>;

fn record(state: &Shared, path: &str, headers: &HeaderMap, body: &Bytes) {
    let mut record = state.lock().unwrap();
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap_or("<binary>").to_string())
        .unwrap_or_default();
    *record.per_key.entry(key).or_insert(0) += 1;
    record.seen.push(Seen {
        path: path.to_string(),
        headers: headers.clone(),
        body: body.clone(),
    });
}

/// `POST /ok`: 200 with `ok: <payload>`.
async fn ok(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    record(&state, "/ok", &headers, &body);
    let mut reply = b"ok: ".to_vec();
    reply.extend_from_slice(&body);
    (StatusCode::OK, reply).into_response()
}

/// `POST /big`: 200 with 10,000 bytes `0123456789…`.
async fn big(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    record(&state, "/big", &headers, &body);
    let reply: Vec<u8> = (0..10_000).map(|i| b'0' + (i % 10) as u8).collect();
    (StatusCode::OK, reply).into_response()
}

/// `POST /status/{code}`: that status, a body naming it (10,000 bytes for 599), and for 3xx a
/// `Location` pointing at `/ok`.
async fn status(
    State(state): State<Shared>,
    Path(code): Path<u16>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(&state, &format!("/status/{code}"), &headers, &body);
    let status = StatusCode::from_u16(code).expect("a status code");
    let text = if code == 599 {
        "e".repeat(10_000)
    } else {
        format!("reason {code}")
    };
    let mut response = (status, text).into_response();
    if status.is_redirection() {
        response
            .headers_mut()
            .insert("location", "/ok".parse().expect("header value"));
    }
    response
}

/// Counts a `/slow` request as abandoned if its handler is dropped before it answers.
struct AbandonGuard {
    state: Shared,
    answered: bool,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if !self.answered {
            self.state.lock().unwrap().abandoned += 1;
        }
    }
}

/// `POST /slow`: answers 200 only after 30 s.
async fn slow(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    record(&state, "/slow", &headers, &body);
    let mut guard = AbandonGuard {
        state: state.clone(),
        answered: false,
    };
    tokio::time::sleep(Duration::from_secs(30)).await;
    guard.answered = true;
    (StatusCode::OK, "slow").into_response()
}

/// A loopback HTTP server, aborted when dropped.
struct TestServer {
    addr: std::net::SocketAddr,
    state: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    async fn start() -> Self {
        let state: Shared = Arc::default();
        let app = Router::new()
            .route("/ok", post(ok))
            .route("/big", post(big))
            .route("/slow", post(slow))
            .route("/status/{code}", post(status))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("test server");
        });
        Self { addr, state, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
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

    fn abandoned(&self) -> usize {
        self.state.lock().unwrap().abandoned
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Attempt `attempt` of job `job_id` with fencing token `token` on node 3.
fn context(job_id: u64, attempt: u32, token: u64, payload: &[u8]) -> JobContext {
    JobContext {
        job_id,
        attempt,
        fencing_token: token,
        idempotency_key: format!("exactly-job-{job_id}"),
        node_id: 3,
        queue: "default".to_string(),
        kind: "call".to_string(),
        payload: payload.to_vec(),
        timeout: Duration::from_secs(30),
        lease: exactly_handlers::LeaseDeadline::unbounded(),
    }
}

fn handler(spec: HttpSpec) -> HttpHandler {
    HttpHandler::new(spec).expect("valid spec")
}

async fn run(spec: HttpSpec, ctx: JobContext) -> HandlerOutcome {
    handler(spec).run(ctx, CancellationToken::new()).await
}

fn failure(outcome: HandlerOutcome) -> (String, bool) {
    match outcome {
        HandlerOutcome::Failed { error, retryable } => (error, retryable),
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// A 2xx answer succeeds with the response body as the result; the payload arrives as the
/// request body; a body longer than `response-bytes-max` is cut to its first bytes.
#[tokio::test]
async fn success_keeps_the_body_as_the_result() {
    let server = TestServer::start().await;
    let outcome = run(
        HttpSpec::new(server.url("/ok")),
        context(7, 1, 42, b"hello, exactly"),
    )
    .await;
    assert_eq!(
        outcome,
        HandlerOutcome::Succeeded(b"ok: hello, exactly".to_vec())
    );
    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(&seen[0].body[..], b"hello, exactly");

    let HandlerOutcome::Succeeded(result) =
        run(HttpSpec::new(server.url("/big")), context(8, 1, 43, b"")).await
    else {
        panic!("expected success");
    };
    assert_eq!(result.len(), RESPONSE_BYTES_MAX_DEFAULT);
    assert!(result.starts_with(b"0123456789012"));

    let spec = HttpSpec {
        response_bytes_max: 5,
        ..HttpSpec::new(server.url("/big"))
    };
    assert_eq!(
        run(spec, context(9, 1, 44, b"")).await,
        HandlerOutcome::Succeeded(b"01234".to_vec())
    );
}

/// Each status class maps to its outcome: 2xx success; 408, 429 and 5xx retryable; other 4xx
/// and 3xx permanent. Errors carry the status and the body; a redirect is not followed.
#[tokio::test]
async fn status_classes_are_mapped() {
    let server = TestServer::start().await;
    for code in [200u16, 201, 202, 204] {
        let outcome = run(
            HttpSpec::new(server.url(&format!("/status/{code}"))),
            context(1, 1, 1, b""),
        )
        .await;
        assert!(
            matches!(outcome, HandlerOutcome::Succeeded(_)),
            "{code}: {outcome:?}"
        );
    }
    for (code, retryable) in [
        (408u16, true),
        (429, true),
        (500, true),
        (502, true),
        (503, true),
        (504, true),
        (400, false),
        (401, false),
        (403, false),
        (404, false),
        (409, false),
        (422, false),
        (301, false),
        (302, false),
        (307, false),
        (308, false),
    ] {
        let (error, got) = failure(
            run(
                HttpSpec::new(server.url(&format!("/status/{code}"))),
                context(1, 1, 1, b""),
            )
            .await,
        );
        assert_eq!(got, retryable, "{code}: {error}");
        assert!(error.contains(&format!("HTTP {code}")), "{code}: {error}");
        assert!(
            error.contains(&server.url(&format!("/status/{code}"))),
            "{error}"
        );
        if (300..400).contains(&code) {
            assert!(error.contains("redirects are not followed"), "{error}");
            assert!(error.contains("Location \"/ok\""), "{error}");
        } else {
            assert!(error.contains(&format!("reason {code}")), "{code}: {error}");
        }
    }
    // No redirect was followed: nothing ever reached /ok.
    assert!(server.seen().iter().all(|s| s.path != "/ok"));
}

/// A long error body is quoted only up to the snippet limit.
#[tokio::test]
async fn error_body_snippet_is_bounded() {
    let server = TestServer::start().await;
    let (error, retryable) = failure(
        run(
            HttpSpec::new(server.url("/status/599")),
            context(1, 1, 1, b""),
        )
        .await,
    );
    assert!(retryable);
    assert!(error.ends_with('…'), "{error}");
    let quoted = error.matches('e').count();
    assert!(
        (ERROR_BODY_BYTES_MAX..ERROR_BODY_BYTES_MAX + 16).contains(&quoted),
        "{quoted} bytes of body quoted"
    );
    assert!(error.len() < ERROR_BODY_BYTES_MAX + 200, "{}", error.len());
}

/// Every request carries the idempotency key, job id, attempt, fencing token, node id, a
/// `traceparent` whose trace id is the same for every attempt of a job and whose span id differs
/// per token, the default content type and the spec's static headers.
#[tokio::test]
async fn headers_describe_the_attempt() {
    let server = TestServer::start().await;
    let mut spec = HttpSpec::new(server.url("/ok"));
    spec.headers
        .insert("Authorization".to_string(), "Bearer secret".to_string());
    let handler = handler(spec);
    for (attempt, token) in [(1, 42), (2, 57)] {
        let outcome = handler
            .run(context(7, attempt, token, b"p"), CancellationToken::new())
            .await;
        assert!(
            matches!(outcome, HandlerOutcome::Succeeded(_)),
            "{outcome:?}"
        );
    }
    handler
        .run(context(8, 1, 42, b"p"), CancellationToken::new())
        .await;

    let seen = server.seen();
    assert_eq!(seen.len(), 3);
    let header = |i: usize, name: &str| {
        seen[i]
            .headers
            .get(name)
            .unwrap_or_else(|| panic!("request {i} lacks {name}"))
            .to_str()
            .expect("ASCII header")
            .to_string()
    };
    for (i, attempt, token) in [(0, "1", "42"), (1, "2", "57")] {
        assert_eq!(header(i, "idempotency-key"), "exactly-job-7");
        assert_eq!(header(i, "x-exactly-job-id"), "7");
        assert_eq!(header(i, "x-exactly-attempt"), attempt);
        assert_eq!(header(i, "x-exactly-fencing-token"), token);
        assert_eq!(header(i, "x-exactly-node-id"), "3");
        assert_eq!(header(i, "content-type"), "application/octet-stream");
        assert_eq!(header(i, "authorization"), "Bearer secret");
        assert!(header(i, "user-agent").starts_with("exactly/"));
    }
    assert_eq!(server.calls_with_key("exactly-job-7"), 2);
    assert_eq!(server.calls_with_key("exactly-job-8"), 1);

    // traceparent: 00-<32 lowercase hex>-<16 lowercase hex>-01.
    let parts: Vec<Vec<String>> = (0..3)
        .map(|i| {
            header(i, "traceparent")
                .split('-')
                .map(String::from)
                .collect()
        })
        .collect();
    for p in &parts {
        assert_eq!(p.len(), 4, "{p:?}");
        assert_eq!(p[0], "00");
        assert_eq!(p[1].len(), 32);
        assert_eq!(p[2].len(), 16);
        assert_eq!(p[3], "01");
        for hex in [&p[1], &p[2]] {
            assert!(
                hex.chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
                "{hex}"
            );
            assert!(hex.chars().any(|c| c != '0'), "all-zero id {hex}");
        }
    }
    assert_eq!(
        parts[0][1], parts[1][1],
        "attempts of one job share a trace"
    );
    assert_ne!(parts[0][2], parts[1][2], "each token is its own span");
    assert_eq!(parts[0][2], format!("{:016x}", 42), "span id is the token");
    assert_ne!(parts[0][1], parts[2][1], "another job is another trace");
}

/// A configured Content-Type replaces the default, and placeholders in the URL carry the
/// attempt's values.
#[tokio::test]
async fn content_type_and_url_placeholders() {
    let server = TestServer::start().await;
    let mut spec = HttpSpec::new(format!(
        "http://{}/status/{{attempt}}0{{node_id}}",
        server.addr
    ));
    spec.headers
        .insert("content-type".to_string(), "application/json".to_string());
    // attempt 2, node 3: /status/203.
    let outcome = run(spec, context(7, 2, 42, b"{}")).await;
    assert_eq!(outcome, HandlerOutcome::Succeeded(b"reason 203".to_vec()));
    let seen = server.seen();
    assert_eq!(seen[0].path, "/status/203");
    assert_eq!(seen[0].headers["content-type"], "application/json");
}

/// A server that does not answer within `request-timeout` gives a retryable failure soon after
/// the timeout.
#[tokio::test]
async fn timeout_is_retryable() {
    let server = TestServer::start().await;
    let spec = HttpSpec {
        request_timeout: Some(Duration::from_millis(300)),
        ..HttpSpec::new(server.url("/slow"))
    };
    let started = Instant::now();
    let (error, retryable) = failure(run(spec, context(1, 1, 1, b"")).await);
    let took = started.elapsed();
    assert!(retryable);
    assert!(
        error.contains("no complete response within 300ms"),
        "{error}"
    );
    assert!(took >= Duration::from_millis(300), "gave up after {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

/// Without `request-timeout`, the attempt's own timeout bounds the request.
#[tokio::test]
async fn attempt_timeout_is_the_default() {
    let server = TestServer::start().await;
    let mut ctx = context(1, 1, 1, b"");
    ctx.timeout = Duration::from_millis(200);
    let (error, retryable) = failure(run(HttpSpec::new(server.url("/slow")), ctx).await);
    assert!(retryable);
    assert!(
        error.contains("no complete response within 200ms"),
        "{error}"
    );
}

/// A refused connection (nothing listens on the port) is a retryable failure naming the cause.
#[tokio::test]
async fn connection_refused_is_retryable() {
    // Bind to learn a free port, then close it so nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let started = Instant::now();
    let (error, retryable) = failure(
        run(
            HttpSpec::new(format!("http://{addr}/ok")),
            context(1, 1, 1, b""),
        )
        .await,
    );
    assert!(retryable);
    assert!(error.contains("Connection refused"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// An https:// URL goes through TLS: against a server that speaks only plain HTTP the handshake
/// fails, retryably, and no request is ever handled.
#[tokio::test]
async fn https_goes_through_tls() {
    let server = TestServer::start().await;
    let (error, retryable) = failure(
        run(
            HttpSpec::new(format!("https://{}/ok", server.addr)),
            context(1, 1, 1, b""),
        )
        .await,
    );
    assert!(retryable, "{error}");
    assert!(
        error.starts_with(&format!("POST https://{}/ok: ", server.addr)),
        "{error}"
    );
    assert!(server.seen().is_empty());
}

/// Cancelling mid-request returns `cancelled` at once and abandons the request: the server sees
/// its handler dropped (the connection closed) long before it would have answered.
#[tokio::test]
async fn cancellation_aborts_the_request() {
    let server = TestServer::start().await;
    let cancel = CancellationToken::new();
    let run = tokio::spawn(
        handler(HttpSpec::new(server.url("/slow"))).run(context(1, 1, 1, b""), cancel.clone()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.seen().is_empty() {
        assert!(Instant::now() < deadline, "the request never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cancelled_at = Instant::now();
    cancel.cancel();
    let outcome = run.await.expect("handler task");
    assert_eq!(outcome, HandlerOutcome::cancelled());
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(1),
        "took {:?}",
        cancelled_at.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.abandoned() == 0 {
        assert!(
            Instant::now() < deadline,
            "the server never saw the request abandoned"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A token cancelled before the attempt starts sends nothing.
#[tokio::test]
async fn already_cancelled_sends_nothing() {
    let server = TestServer::start().await;
    let cancel = CancellationToken::new();
    cancel.cancel();
    let outcome = handler(HttpSpec::new(server.url("/ok")))
        .run(context(1, 1, 1, b""), cancel)
        .await;
    assert_eq!(outcome, HandlerOutcome::cancelled());
    assert!(server.seen().is_empty());
}
