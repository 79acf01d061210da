//! `exactly-sink`: the reference downstream for applying an external effect exactly once.
//!
//! Handlers call `POST /effect?job=ID&token=T&node=N` for the external effect of an attempt.
//! Per job (see [`fence`] for the rule, and why a downstream needs both halves of it): the first
//! effect is applied (200 `applied`); a later one whose token is at least the largest seen for
//! the job is acknowledged but not applied again (200 `repeat`); one whose token is older is
//! refused (409 `stale`). It records every call and serves `GET /report` (per job: the applied
//! token, how many times the effect was applied, which must be 1, the largest token seen,
//! repeats and stale calls refused; and totals; JSON), `GET /calls` (every call in arrival
//! order, JSON), `GET /calls.txt` (the same as lines `job token node verdict at-ms`, verdict one
//! of `applied`, `repeat`, `stale`, for clients without a JSON parser) and `GET /healthz`.
//!
//! Tests use it to see, from outside the cluster, whether a job's effect was ever applied twice
//! or an abandoned attempt's effect slipped through. It keeps everything in memory: it is a test
//! fixture and an example, not a store.

mod fence;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde::{Deserialize, Serialize};
use std::io::Write;

use crate::fence::{Fence, JobFence, Verdict};

/// Calls kept in the log served by `GET /calls`; later calls still count but are not listed.
const CALLS_MAX: usize = 1_000_000;

/// Jobs the sink tracks at most; calls for further jobs are refused with 503.
const JOBS_MAX: usize = 1_000_000;

/// Command-line options.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "A reference downstream: applies each job's effect once and refuses stale tokens"
)]
struct Options {
    /// Address to listen on; port 0 picks a free port. The bound address is printed on stdout
    /// as the first line.
    #[arg(long, default_value = "127.0.0.1:0", env = "EXACTLY_SINK_LISTEN")]
    listen: SocketAddr,
}

/// The query of `POST /effect`.
#[derive(Debug, Deserialize)]
struct Effect {
    job: u64,
    token: u64,
    #[serde(default)]
    node: u64,
}

/// One recorded call.
#[derive(Clone, Debug, Serialize)]
struct Call {
    job: u64,
    token: u64,
    node: u64,
    verdict: Verdict,
    /// Wall-clock time at the sink, milliseconds since the Unix epoch.
    at_ms: u64,
}

#[derive(Default)]
struct Sink {
    fence: Fence,
    calls: Vec<Call>,
    calls_total: u64,
}

type Shared = Arc<Mutex<Sink>>;

/// Totals over every job, in `GET /report`.
#[derive(Debug, Default, Serialize)]
struct Totals {
    calls: u64,
    jobs: u64,
    /// Effects applied (one per job).
    applied: u64,
    repeats: u64,
    refused_stale: u64,
    /// Jobs whose effect was applied more than once: always 0.
    jobs_applied_more_than_once: u64,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    totals: Totals,
    jobs: &'a std::collections::BTreeMap<u64, JobFence>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn effect(State(sink): State<Shared>, Query(e): Query<Effect>) -> (StatusCode, String) {
    let mut sink = sink.lock().unwrap_or_else(|p| p.into_inner());
    if e.token == 0 {
        return (StatusCode::BAD_REQUEST, "token must be positive\n".into());
    }
    if sink.fence.len() >= JOBS_MAX && !sink.fence.jobs().contains_key(&e.job) {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many jobs\n".into());
    }
    let verdict = sink.fence.offer(e.job, e.token);
    sink.calls_total += 1;
    if sink.calls.len() < CALLS_MAX {
        let call = Call {
            job: e.job,
            token: e.token,
            node: e.node,
            verdict,
            at_ms: now_ms(),
        };
        sink.calls.push(call);
    }
    match verdict {
        Verdict::Applied => (StatusCode::OK, "applied\n".into()),
        Verdict::Repeat => (StatusCode::OK, "repeat\n".into()),
        Verdict::Stale { newest } => (
            StatusCode::CONFLICT,
            format!("stale: token {} is older than {newest}\n", e.token),
        ),
    }
}

async fn report(State(sink): State<Shared>) -> String {
    let sink = sink.lock().unwrap_or_else(|p| p.into_inner());
    let mut totals = Totals {
        calls: sink.calls_total,
        jobs: sink.fence.len() as u64,
        ..Totals::default()
    };
    for job in sink.fence.jobs().values() {
        totals.applied += job.applied;
        totals.repeats += job.repeats;
        totals.refused_stale += job.refused_stale;
        totals.jobs_applied_more_than_once += u64::from(job.applied > 1);
    }
    let report = Report {
        totals,
        jobs: sink.fence.jobs(),
    };
    serde_json::to_string(&report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

async fn calls(State(sink): State<Shared>) -> Json<Vec<Call>> {
    let sink = sink.lock().unwrap_or_else(|p| p.into_inner());
    Json(sink.calls.clone())
}

async fn calls_text(State(sink): State<Shared>) -> String {
    let sink = sink.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = String::new();
    for c in &sink.calls {
        let verdict = match c.verdict {
            Verdict::Applied => "applied",
            Verdict::Repeat => "repeat",
            Verdict::Stale { .. } => "stale",
        };
        out.push_str(&format!(
            "{} {} {} {verdict} {}\n",
            c.job, c.token, c.node, c.at_ms
        ));
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    let sink: Shared = Arc::default();
    let app = Router::new()
        .route("/effect", post(effect))
        .route("/report", get(report))
        .route("/calls", get(calls))
        .route("/calls.txt", get(calls_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(sink);
    let listener = tokio::net::TcpListener::bind(options.listen).await?;
    // The first line on stdout is the bound address: tests start us on port 0 and read it.
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", listener.local_addr()?)?;
    out.flush()?;
    drop(out);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
