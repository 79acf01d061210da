//! `exactly bench --rate R`: an open-loop load, as users load a job system. Requests (one job
//! each by default) leave at a fixed rate whatever the cluster answers, over `--connections`
//! connections, for `--duration`; every answer is classified (acknowledged, refused: provably
//! nothing committed, unknown outcome, other error) per second of offered load, and each
//! acknowledged job's end-to-end latency runs from its *scheduled* send time (so a stalled
//! cluster cannot hide its stall: no coordinated omission) to its terminal event on a Watch
//! stream opened before the first request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use exactly_client::{Client, ClientOptions, Code, JobSpec, JobState, WatchScope};
use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::bench::Summary;
use crate::output::{key_values, micros_as_ms};

/// Requests a run keeps in flight at most; past it a scheduled request is counted as not sent
/// (the client, not the cluster, could not keep up).
pub const OPEN_IN_FLIGHT_MAX: usize = 50_000;
/// A refusal answered within this many milliseconds counts as prompt (issue 11's bound).
pub const REFUSAL_PROMPT_MS: u64 = 50;
/// Highest latency the histograms track (ten minutes), in microseconds.
const LATENCY_US_MAX: u64 = 600_000_000;

/// What an open-loop run is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub struct OpenLoop {
    /// Requests per second.
    pub rate: u32,
    pub duration: Duration,
    pub connections: u32,
    pub jobs_per_request: u32,
    pub kind: String,
    pub payload_bytes: u32,
    /// How long to wait for acknowledged jobs to finish after the last request was sent.
    pub drain: Duration,
}

/// One second of offered load: what became of the requests scheduled in it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Second {
    pub offered: u64,
    pub acknowledged: u64,
    /// Answered with a status that proves nothing was committed (UNAVAILABLE,
    /// RESOURCE_EXHAUSTED).
    pub refused: u64,
    /// DEADLINE_EXCEEDED, UNKNOWN, CANCELLED, a broken connection: it may have committed.
    pub unknown: u64,
    /// Any other status.
    pub errors: u64,
    /// Not sent: the client already had `OPEN_IN_FLIGHT_MAX` requests in flight.
    pub not_sent: u64,
    /// Slowest answer of the second's requests, in milliseconds.
    pub slowest_answer_ms: u64,
    /// 99th percentile of the second's acknowledged requests' submit latency, in milliseconds.
    pub submit_p99_ms: u64,
    /// 99th percentile of the end-to-end latency of the jobs acknowledged for this second's
    /// requests (those seen finished), in milliseconds: how latency recovers after an overload.
    pub end_to_end_p99_ms: u64,
}

/// The result of an open-loop run; `--json` prints exactly this.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OpenReport {
    pub rate: u32,
    pub duration_ms: u64,
    pub connections: u32,
    pub jobs_per_request: u32,
    pub kind: String,
    pub requests: Second,
    /// Jobs acknowledged and seen finished (a terminal Watch event) within the drain time.
    pub finished_jobs: u64,
    /// Finished jobs per second of offered load.
    pub goodput_jobs_per_s: f64,
    /// Acknowledged jobs not seen finished within the drain time.
    pub unfinished_jobs: u64,
    /// Request sent (scheduled) to answered, acknowledged requests only, in microseconds.
    pub submit_latency_us: Option<Summary>,
    /// Scheduled send to the job's terminal event on the Watch stream, in microseconds.
    pub end_to_end_latency_us: Option<Summary>,
    /// Request sent (scheduled) to answered, refused requests only, in microseconds.
    pub refusal_latency_us: Option<Summary>,
    /// Refused requests answered within [`REFUSAL_PROMPT_MS`].
    pub refused_promptly: u64,
    /// Refused or unknown requests answered after this many milliseconds, at most.
    pub slowest_refusal_ms: u64,
    pub first_error: Option<String>,
    pub per_second: Vec<Second>,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).context("creating a latency histogram")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// How one request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Acknowledged(Vec<u64>),
    Refused,
    Unknown,
    Error,
}

/// Classifies a failed submit: refused only when the status proves nothing was committed.
pub fn classify(code: Code, unknown_outcome: bool) -> Answer {
    if unknown_outcome {
        return Answer::Unknown;
    }
    match code {
        Code::Unavailable | Code::ResourceExhausted => Answer::Refused,
        Code::DeadlineExceeded | Code::Unknown | Code::Cancelled | Code::Aborted => Answer::Unknown,
        _ => Answer::Error,
    }
}

/// Runs the open-loop load against the endpoints of `client`.
pub async fn measure(client: &Client, plan: &OpenLoop) -> anyhow::Result<OpenReport> {
    let endpoints = client.endpoints();
    // One try per request: a retry would hide the answer the cluster gave.
    // The run bounds what it has in flight itself (`OPEN_IN_FLIGHT_MAX`, counted as not sent).
    let options = ClientOptions {
        retry_attempts_max: 1,
        in_flight_max: OPEN_IN_FLIGHT_MAX as u32,
        ..client.options().clone()
    };
    let mut clients = Vec::new();
    for c in 0..plan.connections as usize {
        let mut rotated = endpoints.clone();
        rotated.rotate_left(c % endpoints.len());
        clients.push(Client::connect_with(rotated, options.clone())?);
    }
    // Terminal events, by job id, with when they arrived.
    let finished: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let mut watch = client
        .watch(WatchScope::All, None)
        .await
        .context("opening the Watch stream that times each job's end")?;
    let watcher = {
        let finished = finished.clone();
        tokio::spawn(async move {
            while let Ok(event) = watch.next().await {
                if matches!(
                    event.state(),
                    JobState::Succeeded | JobState::Dead | JobState::Cancelled
                ) {
                    finished
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(event.job_id)
                        .or_insert_with(Instant::now);
                }
            }
        })
    };

    let spec = JobSpec {
        kind: plan.kind.clone(),
        payload: vec![0u8; plan.payload_bytes as usize],
        ..JobSpec::default()
    };
    let total = (u64::from(plan.rate) * plan.duration.as_millis() as u64 / 1000).max(1);
    let seconds = plan.duration.as_secs().max(1) as usize;
    let interval = Duration::from_secs_f64(1.0 / f64::from(plan.rate));
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<(Instant, Instant, Answer, Option<String>)>();
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut not_sent = vec![0u64; seconds];
    for k in 0..total {
        let scheduled = started + interval.mul_f64(k as f64);
        tokio::time::sleep_until(scheduled).await;
        if in_flight.load(std::sync::atomic::Ordering::Relaxed) >= OPEN_IN_FLIGHT_MAX {
            not_sent[((k * 1000 / u64::from(plan.rate)) as usize / 1000).min(seconds - 1)] += 1;
            continue;
        }
        let client = clients[(k % clients.len() as u64) as usize].clone();
        let jobs = vec![spec.clone(); plan.jobs_per_request as usize];
        let tx = tx.clone();
        let in_flight = in_flight.clone();
        in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            let (answer, error) = match client.submit(jobs).await {
                Ok(ids) => (Answer::Acknowledged(ids), None),
                Err(e) => (
                    classify(e.code(), e.is_unknown_outcome()),
                    Some(e.to_string()),
                ),
            };
            in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            let _ = tx.send((scheduled, Instant::now(), answer, error));
        });
    }
    drop(tx);
    let mut per_second = vec![Second::default(); seconds];
    let mut requests = Second::default();
    let mut submit_latency = histogram()?;
    let mut submit_by_second = (0..seconds)
        .map(|_| histogram())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut slowest_refusal = Duration::ZERO;
    let mut refusal_latency = histogram()?;
    let mut refused_promptly = 0;
    let mut acknowledged: Vec<(u64, Instant)> = Vec::new();
    let mut first_error: Option<String> = None;
    while let Some((scheduled, answered, answer, error)) = rx.recv().await {
        if first_error.is_none() {
            first_error = error;
        }
        let second = ((scheduled - started).as_secs() as usize).min(seconds - 1);
        let s = &mut per_second[second];
        s.offered += 1;
        let took = answered.saturating_duration_since(scheduled);
        s.slowest_answer_ms = s.slowest_answer_ms.max(took.as_millis() as u64);
        match answer {
            Answer::Acknowledged(ids) => {
                s.acknowledged += 1;
                submit_latency.saturating_record(micros(took));
                submit_by_second[second].saturating_record(micros(took));
                acknowledged.extend(ids.into_iter().map(|id| (id, scheduled)));
            }
            Answer::Refused => {
                s.refused += 1;
                refusal_latency.saturating_record(micros(took));
                if took <= Duration::from_millis(REFUSAL_PROMPT_MS) {
                    refused_promptly += 1;
                }
                slowest_refusal = slowest_refusal.max(took);
            }
            Answer::Unknown => {
                s.unknown += 1;
                slowest_refusal = slowest_refusal.max(took);
            }
            Answer::Error => s.errors += 1,
        }
    }
    for (s, n) in per_second.iter_mut().zip(&not_sent) {
        s.not_sent = *n;
        s.offered += *n;
    }
    for s in &per_second {
        requests.offered += s.offered;
        requests.acknowledged += s.acknowledged;
        requests.refused += s.refused;
        requests.unknown += s.unknown;
        requests.errors += s.errors;
        requests.not_sent += s.not_sent;
        requests.slowest_answer_ms = requests.slowest_answer_ms.max(s.slowest_answer_ms);
    }

    // Wait (bounded) for every acknowledged job's terminal event.
    let until = Instant::now() + plan.drain;
    loop {
        let done = {
            let finished = finished.lock().unwrap_or_else(|p| p.into_inner());
            acknowledged.iter().all(|(id, _)| finished.contains_key(id))
        };
        if done || Instant::now() >= until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watcher.abort();
    let finished = finished.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut end_to_end = histogram()?;
    let mut end_to_end_by_second = (0..seconds)
        .map(|_| histogram())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut finished_jobs = 0;
    for (id, scheduled) in &acknowledged {
        if let Some(at) = finished.get(id) {
            finished_jobs += 1;
            let took = micros(at.saturating_duration_since(*scheduled));
            end_to_end.saturating_record(took);
            let second = ((*scheduled - started).as_secs() as usize).min(seconds - 1);
            end_to_end_by_second[second].saturating_record(took);
        }
    }
    let p99_ms = |h: &Histogram<u64>| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(0.99) / 1000
        }
    };
    for (i, s) in per_second.iter_mut().enumerate() {
        s.submit_p99_ms = p99_ms(&submit_by_second[i]);
        s.end_to_end_p99_ms = p99_ms(&end_to_end_by_second[i]);
    }
    Ok(OpenReport {
        rate: plan.rate,
        duration_ms: plan.duration.as_millis() as u64,
        connections: plan.connections,
        jobs_per_request: plan.jobs_per_request,
        kind: plan.kind.clone(),
        requests,
        finished_jobs,
        goodput_jobs_per_s: finished_jobs as f64 / plan.duration.as_secs_f64(),
        unfinished_jobs: acknowledged.len() as u64 - finished_jobs,
        submit_latency_us: Summary::of(&submit_latency),
        end_to_end_latency_us: Summary::of(&end_to_end),
        refusal_latency_us: Summary::of(&refusal_latency),
        refused_promptly,
        slowest_refusal_ms: slowest_refusal.as_millis() as u64,
        first_error,
        per_second,
    })
}

fn latency(s: &Option<Summary>) -> String {
    match s {
        Some(s) => format!(
            "p50 {}  p99 {}  max {} ({} values)",
            micros_as_ms(s.p50),
            micros_as_ms(s.p99),
            micros_as_ms(s.max),
            s.count
        ),
        None => "-".into(),
    }
}

/// The report as aligned lines, then one line per second.
pub fn render(r: &OpenReport) -> String {
    let q = &r.requests;
    let mut out = key_values(&[
        (
            "offered",
            format!(
                "{} requests/s for {:.1} s over {} connections, {} {} job(s) per request",
                r.rate,
                r.duration_ms as f64 / 1000.0,
                r.connections,
                r.jobs_per_request,
                r.kind
            ),
        ),
        (
            "requests",
            format!(
                "{} offered: {} acknowledged, {} refused (nothing committed), {} unknown outcome, \
                 {} other errors, {} not sent (client saturated)",
                q.offered, q.acknowledged, q.refused, q.unknown, q.errors, q.not_sent
            ),
        ),
        (
            "goodput",
            format!(
                "{:.1} jobs/s finished ({} finished, {} acknowledged but not seen finished)",
                r.goodput_jobs_per_s, r.finished_jobs, r.unfinished_jobs
            ),
        ),
        ("submit latency", latency(&r.submit_latency_us)),
        ("end to end", latency(&r.end_to_end_latency_us)),
        (
            "refusals",
            format!(
                "{}; {} of {} within {REFUSAL_PROMPT_MS} ms",
                latency(&r.refusal_latency_us),
                r.refused_promptly,
                q.refused
            ),
        ),
        (
            "slowest refusal",
            format!("{} ms (refused or unknown answers)", r.slowest_refusal_ms),
        ),
        (
            "first error",
            r.first_error.clone().unwrap_or_else(|| "-".into()),
        ),
    ]);
    out.push_str(
        "second  offered  acked  refused  unknown  errors  not-sent  slowest(ms)  \
         submit-p99(ms)  e2e-p99(ms)\n",
    );
    for (i, s) in r.per_second.iter().enumerate() {
        out.push_str(&format!(
            "{i:>6}  {:>7}  {:>5}  {:>7}  {:>7}  {:>6}  {:>8}  {:>11}  {:>14}  {:>11}\n",
            s.offered,
            s.acknowledged,
            s.refused,
            s.unknown,
            s.errors,
            s.not_sent,
            s.slowest_answer_ms,
            s.submit_p99_ms,
            s.end_to_end_p99_ms
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only statuses that prove nothing was committed count as refusals.
    #[test]
    fn refusals_are_only_provable_ones() {
        assert_eq!(classify(Code::Unavailable, false), Answer::Refused);
        assert_eq!(classify(Code::ResourceExhausted, false), Answer::Refused);
        assert_eq!(classify(Code::Unavailable, true), Answer::Unknown);
        assert_eq!(classify(Code::DeadlineExceeded, false), Answer::Unknown);
        assert_eq!(classify(Code::Unknown, false), Answer::Unknown);
        assert_eq!(classify(Code::InvalidArgument, false), Answer::Error);
    }
}
