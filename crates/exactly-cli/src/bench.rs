//! `exactly bench`: submits many jobs, waits until the cluster reports them finished, and reports
//! throughput and latency.
//!
//! Completion is detected from the cluster-wide job counts in Status (succeeded + failed), so the
//! bench assumes no other traffic finishes jobs meanwhile. Completion latency comes from each
//! sampled job's own record (`updated_at_ms - created_at_ms`), both stamped by the leader's clock,
//! so it does not depend on this machine's clock or on the polling interval.
//!
//! A submit request with an unknown outcome (the connection broke mid-call) may still have created
//! its jobs, and they finish too; then the count can be reached while an acknowledged job is still
//! running. The report shows this as sampled jobs not finished.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use exactly_client::{Client, Job, JobSpec, JobState};
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::output::{emit, emit_json, key_values, micros_as_ms};
use crate::submit::{chunk_sizes, millis, parse_positive_duration};

/// Most jobs one bench submits (their ids are kept in memory).
pub const BENCH_JOBS_MAX: u64 = 10_000_000;
/// Most submit requests in flight at once.
pub const BENCH_CONCURRENCY_MAX: u32 = 256;
/// Largest synthetic payload per job; the node's own payload-bytes-max may be smaller.
pub const BENCH_PAYLOAD_BYTES_MAX: u32 = 16 * 1024 * 1024;
/// Most jobs read back for the completion latency.
pub const BENCH_SAMPLE_MAX: u32 = 100_000;
/// Most Get calls in flight while reading the sample.
pub const SAMPLE_GETS_IN_FLIGHT_MAX: usize = 32;
/// How often Status is polled while waiting for completions, in milliseconds.
pub const STATUS_POLL_INTERVAL_MS: u64 = 50;
/// Highest latency the histograms track (one hour), in microseconds; larger values saturate.
const LATENCY_US_MAX: u64 = 3_600_000_000;

/// What the completion latency is measured from, printed with the results.
pub const COMPLETION_CLOCK_NOTE: &str =
    "updated_at_ms - created_at_ms of each sampled job; both are stamped by the leader's clock";

/// Flags of `exactly bench`.
#[derive(clap::Args, Debug, PartialEq)]
pub struct BenchArgs {
    /// How many jobs to submit.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=BENCH_JOBS_MAX))]
    pub jobs: u64,
    /// Jobs per Submit request (at most 1000; default 100, or 1 with --rate).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=exactly_client::SUBMIT_JOBS_MAX as i64))]
    pub batch: Option<u32>,
    /// Submit requests in flight at once.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=i64::from(BENCH_CONCURRENCY_MAX)))]
    pub concurrency: u32,
    /// Handler of the submitted jobs.
    #[arg(long, default_value = "noop")]
    pub kind: String,
    /// Size of each job's payload (zero bytes).
    #[arg(long, value_name = "BYTES", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=i64::from(BENCH_PAYLOAD_BYTES_MAX)))]
    pub payload_bytes: u32,
    /// Give up if the jobs have not all finished this long after the first submit.
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = parse_positive_duration)]
    pub timeout: Duration,
    /// How many submitted jobs to read back for the completion latency (0 skips it).
    #[arg(long, value_name = "N", default_value_t = 2_000, value_parser = clap::value_parser!(u32).range(0..=i64::from(BENCH_SAMPLE_MAX)))]
    pub sample: u32,
    /// Open loop: send this many requests per second whatever the cluster answers (one job
    /// each unless --batch), for --duration, and report every answer per second and each job's
    /// submit-to-end latency from a Watch stream. Without it: closed loop (--jobs, --concurrency).
    #[arg(long, value_name = "REQUESTS_PER_S", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rate: Option<u32>,
    /// Open loop: how long to offer the load.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_positive_duration)]
    pub duration: Duration,
    /// Open loop: connections the requests are spread over (each its own client).
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub connections: u32,
    /// Open loop: how long to wait after the last request for acknowledged jobs to finish.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_positive_duration)]
    pub drain: Duration,
}

impl BenchArgs {
    /// Jobs per request: as given, else 100 in a closed loop and 1 in an open loop.
    pub fn jobs_per_request(&self) -> u32 {
        self.batch
            .unwrap_or(if self.rate.is_some() { 1 } else { 100 })
    }
}

/// p50, p99 and max of a histogram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    /// How many values were recorded.
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

impl Summary {
    /// The summary of a histogram, or `None` when it is empty.
    pub fn of(histogram: &Histogram<u64>) -> Option<Summary> {
        if histogram.is_empty() {
            return None;
        }
        Some(Summary {
            count: histogram.len(),
            p50: histogram.value_at_quantile(0.50),
            p99: histogram.value_at_quantile(0.99),
            max: histogram.max(),
        })
    }
}

/// Everything that went wrong during a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Failures {
    /// Submit requests that failed.
    pub submit_requests: u64,
    /// Jobs in those requests (not acknowledged; some may still exist, see the next field).
    pub submit_jobs: u64,
    /// Failed submit requests whose outcome is unknown: their jobs may exist.
    pub submit_unknown_outcome_requests: u64,
    /// The first submit error, as printed by the client.
    pub first_submit_error: Option<String>,
    /// Jobs that ended in the failed state during the run (from Status: failed count growth).
    pub jobs_failed: u64,
    /// Status polls that failed while waiting for completions.
    pub status_poll_errors: u64,
    /// Sampled jobs whose Get failed.
    pub sample_get_errors: u64,
    /// Sampled jobs that were not in a terminal state when read.
    pub sample_not_terminal: u64,
}

/// The result of one run; `--json` prints exactly this.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Report {
    pub jobs: u64,
    pub acknowledged: u64,
    pub batch: u32,
    pub concurrency: u32,
    pub kind: String,
    pub payload_bytes: u32,
    /// From the first submit to Status showing every acknowledged job finished.
    pub elapsed_ms: u64,
    /// From the first submit to the last submit answer.
    pub submit_elapsed_ms: u64,
    /// Acknowledged jobs per second over `elapsed_ms`.
    pub throughput_jobs_per_s: f64,
    /// Acknowledged jobs per second over `submit_elapsed_ms`.
    pub submit_jobs_per_s: f64,
    /// Per Submit request, in microseconds.
    pub submit_latency_us: Option<Summary>,
    /// Submit to terminal state per sampled job, in milliseconds.
    pub completion_latency_ms: Option<Summary>,
    pub completion_latency_source: &'static str,
    pub sampled_jobs: u64,
    pub failures: Failures,
}

/// Jobs per second; 0 for an empty interval.
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 {
        return 0.0;
    }
    count as f64 / seconds
}

/// Up to `n` ids spread evenly over `ids` (first one included), in their order.
pub fn sample_evenly(ids: &[u64], n: usize) -> Vec<u64> {
    if n == 0 || ids.is_empty() {
        return Vec::new();
    }
    if n >= ids.len() {
        return ids.to_vec();
    }
    (0..n).map(|i| ids[i * ids.len() / n]).collect()
}

/// Submit-to-finish time of a job from its own record, in milliseconds; `None` unless the job is
/// terminal and its timestamps are ordered.
pub fn completion_latency_ms(job: &Job) -> Option<u64> {
    match JobState::try_from(job.state) {
        Ok(JobState::Succeeded | JobState::Dead | JobState::Cancelled) => {
            job.updated_at_ms.checked_sub(job.created_at_ms)
        }
        _ => None,
    }
}

/// How many jobs finished (succeeded, dead or cancelled) since `before`, from cluster-wide counts.
pub fn finished_since(before: &exactly_client::JobCounts, now: &exactly_client::JobCounts) -> u64 {
    (now.succeeded + now.dead + now.cancelled)
        .saturating_sub(before.succeeded + before.dead + before.cancelled)
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).context("creating a latency histogram")
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// Counters the progress line reads.
#[derive(Default)]
struct Progress {
    acknowledged: AtomicU64,
    finished: AtomicU64,
}

/// Prints a one-line progress display to standard error twice a second until aborted.
fn spawn_progress(progress: Arc<Progress>, jobs: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            eprint!(
                "\racknowledged {}/{jobs}  finished {}/{jobs}   ",
                progress.acknowledged.load(Ordering::Relaxed),
                progress.finished.load(Ordering::Relaxed)
            );
        }
    })
}

/// Runs the benchmark and returns its report. Fails if no job was accepted or the jobs did not all
/// finish within `--timeout`.
pub async fn measure(
    client: &Client,
    args: &BenchArgs,
    show_progress: bool,
) -> anyhow::Result<Report> {
    let before = client
        .status()
        .await
        .context("reading the job counts before the bench")?
        .counts
        .unwrap_or_default();
    let spec = JobSpec {
        kind: args.kind.clone(),
        payload: vec![0u8; args.payload_bytes as usize],
        ..JobSpec::default()
    };
    let progress = Arc::new(Progress::default());
    let ticker = show_progress.then(|| spawn_progress(progress.clone(), args.jobs));
    let result = run_phases(client, args, &spec, &before, &progress).await;
    if let Some(ticker) = ticker {
        ticker.abort();
        eprintln!();
    }
    result
}

async fn run_phases(
    client: &Client,
    args: &BenchArgs,
    spec: &JobSpec,
    before: &exactly_client::JobCounts,
    progress: &Progress,
) -> anyhow::Result<Report> {
    let mut failures = Failures::default();
    let mut submit_latency = histogram()?;
    let mut ids: Vec<u64> = Vec::with_capacity(args.jobs as usize);
    let started = Instant::now();
    let deadline = started + args.timeout;

    // Submit: `concurrency` requests in flight, each timed on its own.
    let mut submits = futures::stream::iter(chunk_sizes(
        args.jobs as usize,
        args.jobs_per_request() as usize,
    ))
    .map(|size| {
        let client = client.clone();
        let jobs = vec![spec.clone(); size];
        async move {
            let sent = Instant::now();
            let result = client.submit(jobs).await;
            (size, sent.elapsed(), result)
        }
    })
    .buffer_unordered(args.concurrency as usize);
    loop {
        let next = match tokio::time::timeout_at(deadline, submits.next()).await {
            Ok(next) => next,
            Err(_) => bail!(
                "timed out after {} while submitting: {} of {} jobs acknowledged{}",
                humantime::format_duration(args.timeout),
                ids.len(),
                args.jobs,
                submit_failure_note(&failures)
            ),
        };
        let Some((size, latency, result)) = next else {
            break;
        };
        match result {
            Ok(batch) => {
                submit_latency.saturating_record(micros(latency));
                ids.extend(batch);
                progress
                    .acknowledged
                    .store(ids.len() as u64, Ordering::Relaxed);
            }
            Err(err) => {
                failures.submit_requests += 1;
                failures.submit_jobs += size as u64;
                if err.is_unknown_outcome() {
                    failures.submit_unknown_outcome_requests += 1;
                }
                failures
                    .first_submit_error
                    .get_or_insert_with(|| err.to_string());
            }
        }
    }
    let submit_elapsed = started.elapsed();
    let acknowledged = ids.len() as u64;
    if acknowledged == 0 {
        bail!(
            "no job was accepted: {}",
            failures
                .first_submit_error
                .as_deref()
                .unwrap_or("no submit request was sent")
        );
    }

    // Wait until the cluster-wide finished count has grown by every acknowledged job.
    let mut finished = 0;
    let (elapsed, after) = loop {
        match tokio::time::timeout_at(deadline, client.status()).await {
            Ok(Ok(status)) => {
                let counts = status.counts.unwrap_or_default();
                finished = finished_since(before, &counts);
                progress.finished.store(finished, Ordering::Relaxed);
                if finished >= acknowledged {
                    break (started.elapsed(), counts);
                }
            }
            Ok(Err(_)) => failures.status_poll_errors += 1,
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {}: {finished} of {acknowledged} acknowledged jobs finished \
                 (succeeded or failed, per the cluster's job counts){}",
                humantime::format_duration(args.timeout),
                submit_failure_note(&failures)
            );
        }
        tokio::time::sleep(Duration::from_millis(STATUS_POLL_INTERVAL_MS)).await;
    };
    failures.jobs_failed = after.dead.saturating_sub(before.dead);

    // Read a sample back for the submit-to-finish latency, from each job's own timestamps.
    let sampled = sample_evenly(&ids, args.sample as usize);
    let mut completion = histogram()?;
    let mut reads = futures::stream::iter(sampled.iter().copied())
        .map(|id| {
            let client = client.clone();
            async move { client.get(id).await }
        })
        .buffer_unordered(SAMPLE_GETS_IN_FLIGHT_MAX);
    while let Some(result) = reads.next().await {
        match result {
            Ok(job) => match completion_latency_ms(&job) {
                Some(ms) => completion.saturating_record(ms),
                None => failures.sample_not_terminal += 1,
            },
            Err(_) => failures.sample_get_errors += 1,
        }
    }

    Ok(Report {
        jobs: args.jobs,
        acknowledged,
        batch: args.jobs_per_request(),
        concurrency: args.concurrency,
        kind: args.kind.clone(),
        payload_bytes: args.payload_bytes,
        elapsed_ms: millis(elapsed),
        submit_elapsed_ms: millis(submit_elapsed),
        throughput_jobs_per_s: per_second(acknowledged, elapsed),
        submit_jobs_per_s: per_second(acknowledged, submit_elapsed),
        submit_latency_us: Summary::of(&submit_latency),
        completion_latency_ms: Summary::of(&completion),
        completion_latency_source: COMPLETION_CLOCK_NOTE,
        sampled_jobs: sampled.len() as u64,
        failures,
    })
}

/// The submit failures, for an error message that ends the run early; empty when there were none.
fn submit_failure_note(f: &Failures) -> String {
    match &f.first_submit_error {
        None => String::new(),
        Some(first) => format!(
            "; {} submit requests failed ({} jobs not acknowledged, {} with unknown outcome), \
             the first with: {first}",
            f.submit_requests, f.submit_jobs, f.submit_unknown_outcome_requests
        ),
    }
}

fn seconds(ms: u64) -> String {
    format!("{}.{:03} s", ms / 1_000, ms % 1_000)
}

/// The report as aligned human-readable lines.
pub fn render(r: &Report) -> String {
    let submit_latency = match &r.submit_latency_us {
        Some(s) => format!(
            "p50 {}  p99 {}  max {} (per request of up to {} jobs, {} requests)",
            micros_as_ms(s.p50),
            micros_as_ms(s.p99),
            micros_as_ms(s.max),
            r.batch,
            s.count
        ),
        None => "-".into(),
    };
    let completion_latency = match &r.completion_latency_ms {
        Some(s) => format!(
            "p50 {} ms  p99 {} ms  max {} ms (submit to finish, {} sampled jobs)\n{COMPLETION_CLOCK_NOTE}",
            s.p50, s.p99, s.max, s.count
        ),
        None => "- (no sampled job could be read)".into(),
    };
    let f = &r.failures;
    let mut failures = format!(
        "{} submit requests ({} jobs not acknowledged, {} requests with unknown outcome)\n\
         {} jobs ended failed\n\
         {} status polls, {} sample reads, {} sampled jobs not finished",
        f.submit_requests,
        f.submit_jobs,
        f.submit_unknown_outcome_requests,
        f.jobs_failed,
        f.status_poll_errors,
        f.sample_get_errors,
        f.sample_not_terminal
    );
    if let Some(first) = &f.first_submit_error {
        failures.push_str(&format!("\nfirst submit error: {first}"));
    }
    key_values(&[
        (
            "jobs",
            format!(
                "{} requested, {} acknowledged (kind {}, {}-byte payloads, batches of {}, {} in flight)",
                r.jobs, r.acknowledged, r.kind, r.payload_bytes, r.batch, r.concurrency
            ),
        ),
        ("elapsed", format!("{} (first submit to all finished)", seconds(r.elapsed_ms))),
        ("throughput", format!("{:.1} jobs/s", r.throughput_jobs_per_s)),
        (
            "submit throughput",
            format!(
                "{:.1} jobs/s (all submits answered after {})",
                r.submit_jobs_per_s,
                seconds(r.submit_elapsed_ms)
            ),
        ),
        ("submit latency", submit_latency),
        ("completion latency", completion_latency),
        ("failures", failures),
    ])
}

/// Runs `exactly bench`. Exits with an error after printing the report if any submit failed.
pub async fn run(client: &Client, args: &BenchArgs, json: bool) -> anyhow::Result<()> {
    if let Some(rate) = args.rate {
        let plan = crate::bench_open::OpenLoop {
            rate,
            duration: args.duration,
            connections: args.connections,
            jobs_per_request: args.jobs_per_request(),
            kind: args.kind.clone(),
            payload_bytes: args.payload_bytes,
            drain: args.drain,
        };
        let report = crate::bench_open::measure(client, &plan).await?;
        if json {
            emit_json(&report)?;
        } else {
            emit(&crate::bench_open::render(&report))?;
        }
        return Ok(());
    }
    let show_progress = !json && std::io::stderr().is_terminal();
    let report = measure(client, args, show_progress).await?;
    if json {
        emit_json(&report)?;
    } else {
        emit(&render(&report))?;
    }
    if report.failures.submit_requests > 0 {
        bail!(
            "{} submit requests failed ({} jobs not acknowledged); the results above cover the \
             acknowledged jobs only",
            report.failures.submit_requests,
            report.failures.submit_jobs
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_client::JobCounts;

    /// A run cut short names its submit failures, and says nothing when there were none.
    #[test]
    fn failure_note_names_submit_errors() {
        assert_eq!(submit_failure_note(&Failures::default()), "");
        let f = Failures {
            submit_requests: 2,
            submit_jobs: 200,
            submit_unknown_outcome_requests: 1,
            first_submit_error: Some("UNAVAILABLE: gone".into()),
            ..Failures::default()
        };
        assert_eq!(
            submit_failure_note(&f),
            "; 2 submit requests failed (200 jobs not acknowledged, 1 with unknown outcome), \
             the first with: UNAVAILABLE: gone"
        );
    }

    /// Throughput divides by the interval in seconds and is 0 for an empty interval.
    #[test]
    fn per_second_handles_zero() {
        assert_eq!(per_second(500, Duration::from_millis(250)), 2_000.0);
        assert_eq!(per_second(500, Duration::ZERO), 0.0);
    }

    /// The sample spreads over the whole run and never exceeds the ids available.
    #[test]
    fn sample_is_spread_evenly() {
        let ids: Vec<u64> = (100..110).collect();
        assert_eq!(sample_evenly(&ids, 5), vec![100, 102, 104, 106, 108]);
        assert_eq!(sample_evenly(&ids, 50), ids);
        assert!(sample_evenly(&ids, 0).is_empty());
        assert!(sample_evenly(&[], 3).is_empty());
    }

    /// Only terminal jobs with ordered timestamps yield a completion latency.
    #[test]
    fn completion_latency_needs_a_terminal_job() {
        let job = |state: JobState, created, updated| Job {
            state: state as i32,
            created_at_ms: created,
            updated_at_ms: updated,
            ..Job::default()
        };
        assert_eq!(
            completion_latency_ms(&job(JobState::Succeeded, 1_000, 1_250)),
            Some(250)
        );
        assert_eq!(
            completion_latency_ms(&job(JobState::Dead, 1_000, 1_000)),
            Some(0)
        );
        assert_eq!(
            completion_latency_ms(&job(JobState::Running, 1_000, 1_250)),
            None
        );
        assert_eq!(
            completion_latency_ms(&job(JobState::Succeeded, 2_000, 1_000)),
            None
        );
    }

    /// Finished jobs are counted from succeeded plus dead plus cancelled growth, never negative.
    #[test]
    fn finished_counts_growth() {
        let before = JobCounts {
            succeeded: 10,
            dead: 2,
            ..JobCounts::default()
        };
        let now = JobCounts {
            succeeded: 15,
            dead: 3,
            pending: 99,
            ..JobCounts::default()
        };
        assert_eq!(finished_since(&before, &now), 6);
        assert_eq!(finished_since(&now, &before), 0);
    }

    /// Percentiles come from the histogram; an empty one has no summary.
    #[test]
    fn summary_reports_percentiles() {
        let mut h = histogram().unwrap();
        assert_eq!(Summary::of(&h), None);
        for v in 1..=100 {
            h.record(v * 1_000).unwrap();
        }
        let s = Summary::of(&h).unwrap();
        assert_eq!(s.count, 100);
        assert!((49_000..=51_000).contains(&s.p50), "{s:?}");
        assert!((98_000..=100_100).contains(&s.p99), "{s:?}");
        assert!((100_000..=100_100).contains(&s.max), "{s:?}");
    }

    fn report() -> Report {
        Report {
            jobs: 10_000,
            acknowledged: 10_000,
            batch: 100,
            concurrency: 8,
            kind: "noop".into(),
            payload_bytes: 0,
            elapsed_ms: 12_345,
            submit_elapsed_ms: 2_000,
            throughput_jobs_per_s: 810.04,
            submit_jobs_per_s: 5_000.0,
            submit_latency_us: Some(Summary {
                count: 100,
                p50: 1_234,
                p99: 5_678,
                max: 9_012,
            }),
            completion_latency_ms: Some(Summary {
                count: 2_000,
                p50: 120,
                p99: 450,
                max: 600,
            }),
            completion_latency_source: COMPLETION_CLOCK_NOTE,
            sampled_jobs: 2_000,
            failures: Failures::default(),
        }
    }

    /// The human report has one aligned line per figure and names the leader's clock.
    #[test]
    fn renders_report() {
        assert_eq!(
            render(&report()),
            "\
jobs                10000 requested, 10000 acknowledged (kind noop, 0-byte payloads, batches of 100, 8 in flight)
elapsed             12.345 s (first submit to all finished)
throughput          810.0 jobs/s
submit throughput   5000.0 jobs/s (all submits answered after 2.000 s)
submit latency      p50 1.234 ms  p99 5.678 ms  max 9.012 ms (per request of up to 100 jobs, 100 requests)
completion latency  p50 120 ms  p99 450 ms  max 600 ms (submit to finish, 2000 sampled jobs)
                    updated_at_ms - created_at_ms of each sampled job; both are stamped by the leader's clock
failures            0 submit requests (0 jobs not acknowledged, 0 requests with unknown outcome)
                    0 jobs ended failed
                    0 status polls, 0 sample reads, 0 sampled jobs not finished
"
        );
    }

    /// The JSON report is one object with the same figures.
    #[test]
    fn json_report_is_one_object() {
        let value = serde_json::to_value(report()).unwrap();
        assert_eq!(value["jobs"], 10_000);
        assert_eq!(value["submit_latency_us"]["p99"], 5_678);
        assert_eq!(value["completion_latency_ms"]["max"], 600);
        assert_eq!(value["failures"]["submit_requests"], 0);
        assert!(value["completion_latency_source"]
            .as_str()
            .unwrap()
            .contains("leader's clock"));
    }
}
