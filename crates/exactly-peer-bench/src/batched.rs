//! `--messages N`: the batched maximum, like `exactly bench --jobs N`. Publishes go out as fast
//! as the client sends them, `--in-flight` at a time, their PubAcks awaited together; the worker
//! acks each message (confirmed) as it arrives. Throughput runs from the first publish to the
//! last acknowledged message's confirmed ack; every message's latency from its publish to that
//! confirmation.

use std::time::Duration;

use tokio::time::Instant;

use crate::jetstream::{answer_of, connect, Worker, SUBJECT};
use crate::report::{
    histogram, micros, millis, per_second, Answer, BatchReport, Failures, Summary,
    COMPLETION_CLOCK_NOTE, SYSTEM,
};

/// Most messages one run publishes (their sequences are kept in memory).
pub const MESSAGES_MAX: u64 = 10_000_000;
/// Most publishes awaiting their acks at once.
pub const BATCH_IN_FLIGHT_MAX: u32 = 50_000;

/// What a batched run is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub struct Batched {
    pub messages: u64,
    /// Publishes sent before their acks are awaited together.
    pub in_flight: u32,
    pub payload_bytes: u32,
    /// Give up waiting for acks and confirmed acks this long after the first publish.
    pub timeout: Duration,
    /// Longest wait for a PubAck (and for a confirmed ack's answer).
    pub ack_timeout: Duration,
}

/// Runs the batched load against `servers`; `worker` ends the jobs.
pub async fn measure(
    servers: &[String],
    worker: &Worker,
    plan: &Batched,
) -> anyhow::Result<BatchReport> {
    let js = connect(servers, 0, plan.ack_timeout, plan.in_flight as usize).await?;
    let payload = vec![0u8; plan.payload_bytes as usize];
    let mut failures = Failures::default();
    let mut submit_latency = histogram()?;
    // Stream sequence and publish time of every acknowledged message.
    let mut acknowledged: Vec<(u64, Instant)> = Vec::with_capacity(plan.messages as usize);
    let started = Instant::now();
    let deadline = started + plan.timeout;
    let mut last_answer = started;
    let mut sent = 0u64;
    while sent < plan.messages && Instant::now() < deadline {
        let size = (plan.messages - sent).min(u64::from(plan.in_flight));
        let mut pending = Vec::with_capacity(size as usize);
        for _ in 0..size {
            let at = Instant::now();
            let published = js.publish(SUBJECT, payload.clone().into()).await;
            pending.push(async move {
                let result = match published {
                    Ok(ack) => ack.await,
                    Err(err) => Err(err),
                };
                (at, Instant::now(), result)
            });
        }
        for (at, answered, result) in futures::future::join_all(pending).await {
            last_answer = last_answer.max(answered);
            match answer_of(result) {
                (Answer::Acknowledged(sequence), _) => {
                    submit_latency.saturating_record(micros(answered - at));
                    acknowledged.push((sequence, at));
                }
                (answer, error) => {
                    failures.submit_requests += 1;
                    failures.submit_jobs += 1;
                    if answer == Answer::Unknown {
                        failures.submit_unknown_outcome_requests += 1;
                    }
                    if failures.first_submit_error.is_none() {
                        failures.first_submit_error = error;
                    }
                }
            }
        }
        sent += size;
    }
    let submit_elapsed = last_answer - started;
    if acknowledged.is_empty() {
        anyhow::bail!(
            "no message was acknowledged: {}",
            failures
                .first_submit_error
                .as_deref()
                .unwrap_or("no publish was sent")
        );
    }

    let sequences: Vec<u64> = acknowledged.iter().map(|(s, _)| *s).collect();
    worker.wait_for(&sequences, deadline).await;
    let finished = worker.finished();
    let mut end_to_end = histogram()?;
    let mut completion = histogram()?;
    let mut last_finish = started;
    for (sequence, at) in &acknowledged {
        if let Some(done) = finished.get(sequence) {
            let took = done.saturating_duration_since(*at);
            end_to_end.saturating_record(micros(took));
            completion.saturating_record(millis(took));
            last_finish = last_finish.max(*done);
        }
    }
    let sampled_jobs = end_to_end.len();
    failures.sample_not_terminal = acknowledged.len() as u64 - sampled_jobs;
    let (ack_errors, first_ack_error) = worker.errors();
    failures.sample_get_errors = ack_errors;
    let elapsed = last_finish - started;
    let count = acknowledged.len() as u64;
    Ok(BatchReport {
        jobs: plan.messages,
        acknowledged: count,
        batch: 1,
        concurrency: plan.in_flight,
        kind: "noop".into(),
        payload_bytes: plan.payload_bytes,
        elapsed_ms: millis(elapsed),
        submit_elapsed_ms: millis(submit_elapsed),
        throughput_jobs_per_s: per_second(sampled_jobs, elapsed),
        submit_jobs_per_s: per_second(count, submit_elapsed),
        submit_latency_us: Summary::of(&submit_latency),
        completion_latency_ms: Summary::of(&completion),
        completion_latency_source: COMPLETION_CLOCK_NOTE,
        sampled_jobs,
        failures,
        system: SYSTEM,
        end_to_end_latency_us: Summary::of(&end_to_end),
        first_ack_error,
    })
}
