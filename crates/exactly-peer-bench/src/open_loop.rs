//! `--rate R`: the open loop of `exactly bench --rate`, against JetStream. Publishes (one message,
//! one job, each) leave at a fixed rate whatever the cluster answers, spread over `--connections`
//! connections, for `--duration`; each awaits its PubAck (the acknowledged submit) and every
//! answer is classified per second of offered load. A job ends when the worker's confirmed ack
//! is answered; its end-to-end latency runs from its *scheduled* send time, so a stalled cluster
//! cannot hide its stall (no coordinated omission).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::jetstream::{answer_of, connect, Worker, SUBJECT};
use crate::report::{histogram, micros, millis, Answer, OpenReport, Summary, Tally, SYSTEM};

/// Publishes a run keeps in flight at most (as `exactly bench --rate`); past it a scheduled
/// publish is counted as not sent (the client, not the cluster, could not keep up).
pub const OPEN_IN_FLIGHT_MAX: usize = 50_000;

/// What an open-loop run is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub struct OpenLoop {
    /// Publishes per second.
    pub rate: u32,
    pub duration: Duration,
    pub connections: u32,
    pub payload_bytes: u32,
    /// How long to wait after the last publish for acknowledged messages to be acked.
    pub drain: Duration,
    /// Longest wait for a PubAck (and for a confirmed ack's answer).
    pub ack_timeout: Duration,
}

/// When the `k`th publish (from 0) is due after the start at `rate` per second: in whole
/// nanoseconds, so the `rate`th publish is due at exactly one second and counts in second 1.
pub fn scheduled_offset(k: u64, rate: u32) -> Duration {
    let nanos = u128::from(k) * 1_000_000_000 / u128::from(rate.max(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Runs the open-loop load against `servers`; `worker` ends the jobs.
pub async fn measure(
    servers: &[String],
    worker: &Worker,
    plan: &OpenLoop,
) -> anyhow::Result<OpenReport> {
    let mut publishers = Vec::new();
    for c in 0..plan.connections as usize {
        publishers.push(connect(servers, c, plan.ack_timeout, OPEN_IN_FLIGHT_MAX).await?);
    }
    let payload = vec![0u8; plan.payload_bytes as usize];
    let total = (u64::from(plan.rate) * millis(plan.duration) / 1000).max(1);
    let seconds = usize::try_from(plan.duration.as_secs().max(1)).unwrap_or(usize::MAX);
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<(Duration, Instant, Answer, Option<String>)>();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut tally = Tally::new(seconds);
    let started = Instant::now();
    for k in 0..total {
        let offset = scheduled_offset(k, plan.rate);
        tokio::time::sleep_until(started + offset).await;
        if in_flight.load(Ordering::Relaxed) >= OPEN_IN_FLIGHT_MAX {
            tally.not_sent(offset);
            continue;
        }
        let js = publishers[(k % publishers.len() as u64) as usize].clone();
        let payload = payload.clone();
        let tx = tx.clone();
        let in_flight = in_flight.clone();
        in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let result = match js.publish(SUBJECT, payload.into()).await {
                Ok(ack) => ack.await,
                Err(err) => Err(err),
            };
            let (answer, error) = answer_of(result);
            in_flight.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send((offset, Instant::now(), answer, error));
        });
    }
    drop(tx);

    let mut submit_latency = histogram()?;
    // Stream sequence and scheduled send time of every acknowledged message.
    let mut acknowledged: Vec<(u64, Instant)> = Vec::new();
    let mut first_error: Option<String> = None;
    while let Some((offset, answered, answer, error)) = rx.recv().await {
        if first_error.is_none() {
            first_error = error;
        }
        let scheduled = started + offset;
        let took = answered.saturating_duration_since(scheduled);
        tally.answer(offset, took, &answer);
        if let Answer::Acknowledged(sequence) = answer {
            submit_latency.saturating_record(micros(took));
            acknowledged.push((sequence, scheduled));
        }
    }

    let sequences: Vec<u64> = acknowledged.iter().map(|(s, _)| *s).collect();
    worker
        .wait_for(&sequences, Instant::now() + plan.drain)
        .await;
    let finished = worker.finished();
    let mut end_to_end = histogram()?;
    let mut finished_jobs = 0;
    for (sequence, scheduled) in &acknowledged {
        if let Some(at) = finished.get(sequence) {
            finished_jobs += 1;
            end_to_end.saturating_record(micros(at.saturating_duration_since(*scheduled)));
        }
    }
    let (ack_errors, first_ack_error) = worker.errors();
    Ok(OpenReport {
        rate: plan.rate,
        duration_ms: millis(plan.duration),
        connections: plan.connections,
        jobs_per_request: 1,
        kind: "noop".into(),
        requests: tally.totals(),
        finished_jobs,
        goodput_jobs_per_s: finished_jobs as f64 / plan.duration.as_secs_f64(),
        unfinished_jobs: acknowledged.len() as u64 - finished_jobs,
        submit_latency_us: Summary::of(&submit_latency),
        end_to_end_latency_us: Summary::of(&end_to_end),
        slowest_refusal_ms: millis(tally.slowest_refusal()),
        first_error,
        per_second: tally.per_second().to_vec(),
        system: SYSTEM,
        payload_bytes: plan.payload_bytes,
        ack_errors,
        first_ack_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Publishes are evenly spaced and the `rate`th one opens the next second, without float
    /// rounding pulling it back into the previous one.
    #[test]
    fn publishes_are_scheduled_evenly() {
        assert_eq!(scheduled_offset(0, 3_000), Duration::ZERO);
        assert_eq!(scheduled_offset(1, 4), Duration::from_millis(250));
        assert_eq!(scheduled_offset(3_000, 3_000), Duration::from_secs(1));
        assert_eq!(scheduled_offset(2_999, 3_000).as_secs(), 0);
        assert_eq!(scheduled_offset(7, 3), Duration::from_nanos(2_333_333_333));
    }
}
