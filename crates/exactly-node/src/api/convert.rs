//! Conversions between wire (`exactly.v1`) and domain (`exactly-core`) types, in one place.

use exactly_core::limits::RUN_AT_AHEAD_MS_MAX;
use exactly_core::state::{validate_new_job, validate_run_at};
use exactly_core::{
    AttemptEnd, Backoff, Job, JobEvent, JobStatus, NewJob, QueueConfig, QueueState, RateLimit,
    Retained,
};
use exactly_proto::v1 as pb;
use tonic::Status;

use crate::node::{wall_ms, Node};

/// Turns a wire job spec into a domain job, applying this node's defaults and limits. `context`
/// names the spec in error messages (`jobs[2]`).
pub fn new_job(node: &Node, context: &str, spec: pb::JobSpec) -> Result<NewJob, Status> {
    job_from_pb(&node.config, &node.registry, wall_ms(), context, spec)
}

/// [`new_job`] as a pure function of the configuration, the kinds this node runs and the wall
/// clock: every check a submitted job meets at the edge (the fuzz target `submit` runs it).
pub fn job_from_pb(
    config: &crate::config::NodeConfig,
    registry: &exactly_handlers::Registry,
    now: u64,
    context: &str,
    spec: pb::JobSpec,
) -> Result<NewJob, Status> {
    let limits = &config.limits;
    let defaults = &config.defaults;
    if spec.payload.len() > limits.payload_bytes_max {
        return Err(Status::resource_exhausted(format!(
            "{context}: payload of {} bytes exceeds limits.payload-bytes-max ({} bytes)",
            spec.payload.len(),
            limits.payload_bytes_max
        )));
    }
    if !registry.contains(&spec.kind) {
        let kinds: Vec<&str> = registry.kinds().collect();
        return Err(Status::invalid_argument(format!(
            "{context}: unknown job kind {:?}; this node runs: {}",
            spec.kind,
            kinds.join(", ")
        )));
    }
    if spec.run_at_ms != 0 && spec.delay_ms != 0 {
        return Err(Status::invalid_argument(format!(
            "{context}: set run_at_ms or delay_ms, not both"
        )));
    }
    if spec.delay_ms > RUN_AT_AHEAD_MS_MAX {
        return Err(Status::invalid_argument(format!(
            "{context}: delay_ms {} exceeds the limit of {RUN_AT_AHEAD_MS_MAX} ms ({} days)",
            spec.delay_ms,
            RUN_AT_AHEAD_MS_MAX / (24 * 60 * 60 * 1000)
        )));
    }
    let run_at_ms = if spec.delay_ms != 0 {
        now.saturating_add(spec.delay_ms)
    } else {
        spec.run_at_ms
    };
    validate_run_at(run_at_ms, now)
        .map_err(|why| Status::invalid_argument(format!("{context}: {why}")))?;
    let job = NewJob {
        queue: if spec.queue.is_empty() {
            defaults.queue.clone()
        } else {
            spec.queue
        },
        kind: spec.kind,
        payload: spec.payload,
        priority: spec.priority,
        max_attempts: if spec.max_attempts == 0 {
            defaults.max_attempts
        } else {
            spec.max_attempts
        },
        timeout_ms: spec.timeout_ms,
        run_at_ms,
        idempotency_key: non_empty(spec.idempotency_key),
        ordering_key: non_empty(spec.ordering_key),
        labels: spec.labels.into_iter().collect(),
        backoff: Backoff {
            base_ms: spec.backoff_base_ms,
            max_ms: spec.backoff_max_ms,
        },
    };
    validate_new_job(&job).map_err(|why| Status::invalid_argument(format!("{context}: {why}")))?;
    Ok(job)
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// The wire form of a domain job spec (used to show a schedule's job template).
pub fn spec_to_pb(job: &NewJob) -> pb::JobSpec {
    pb::JobSpec {
        queue: job.queue.clone(),
        kind: job.kind.clone(),
        payload: job.payload.clone(),
        priority: job.priority,
        max_attempts: job.max_attempts,
        timeout_ms: job.timeout_ms,
        run_at_ms: job.run_at_ms,
        delay_ms: 0,
        idempotency_key: job.idempotency_key.clone().unwrap_or_default(),
        ordering_key: job.ordering_key.clone().unwrap_or_default(),
        labels: job.labels.clone().into_iter().collect(),
        backoff_base_ms: job.backoff.base_ms,
        backoff_max_ms: job.backoff.max_ms,
    }
}

pub fn state_to_pb(status: JobStatus) -> pb::JobState {
    match status {
        JobStatus::Pending => pb::JobState::Pending,
        JobStatus::Running => pb::JobState::Running,
        JobStatus::Succeeded => pb::JobState::Succeeded,
        JobStatus::Dead => pb::JobState::Dead,
        JobStatus::Cancelled => pb::JobState::Cancelled,
    }
}

/// The domain state a wire filter names; `None` for "any".
pub fn state_from_pb(state: i32) -> Result<Option<JobStatus>, Status> {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Unspecified) => Ok(None),
        Ok(pb::JobState::Pending) => Ok(Some(JobStatus::Pending)),
        Ok(pb::JobState::Running) => Ok(Some(JobStatus::Running)),
        Ok(pb::JobState::Succeeded) => Ok(Some(JobStatus::Succeeded)),
        Ok(pb::JobState::Dead) => Ok(Some(JobStatus::Dead)),
        Ok(pb::JobState::Cancelled) => Ok(Some(JobStatus::Cancelled)),
        Err(_) => Err(Status::invalid_argument(format!(
            "unknown job state {state}"
        ))),
    }
}

/// The wire form of a job record.
pub fn job_to_pb(job: &Job) -> pb::Job {
    pb::Job {
        id: job.id,
        queue: job.queue.clone(),
        kind: job.kind.clone(),
        priority: job.priority,
        state: state_to_pb(job.status) as i32,
        payload_bytes: job.payload_len,
        max_attempts: job.max_attempts,
        timeout_ms: job.timeout_ms,
        created_at_ms: job.created_at_ms,
        updated_at_ms: job.updated_at_ms,
        run_at_ms: job.run_at_ms,
        attempts: job
            .attempts
            .iter()
            .map(|a| {
                let (outcome, error) = match &a.end {
                    None => ("", String::new()),
                    Some(AttemptEnd::Succeeded) => ("succeeded", String::new()),
                    Some(AttemptEnd::Failed { error, retryable }) => (
                        if *retryable {
                            "failed-retryable"
                        } else {
                            "failed"
                        },
                        error.clone(),
                    ),
                    Some(AttemptEnd::Abandoned { reason }) => ("abandoned", reason.clone()),
                    Some(AttemptEnd::Cancelled { reason }) => ("cancelled", reason.clone()),
                };
                pb::Attempt {
                    number: a.number,
                    token: a.token,
                    node_id: a.node,
                    started_at_ms: a.started_at_ms,
                    ended_at_ms: a.ended_at_ms.unwrap_or(0),
                    outcome: outcome.to_string(),
                    error,
                }
            })
            .collect(),
        result: job.result.clone().unwrap_or_default(),
        last_error: job.last_error.clone().unwrap_or_default(),
        idempotency_key: job.idempotency_key.clone().unwrap_or_default(),
        ordering_key: job.ordering_key.clone().unwrap_or_default(),
        labels: job.labels.clone().into_iter().collect(),
        schedule: job.schedule.clone().unwrap_or_default(),
        failures: job.failures,
        backoff_base_ms: job.backoff.base_ms,
        backoff_max_ms: job.backoff.max_ms,
    }
}

pub fn event_to_pb(position: (u64, u32), event: &JobEvent) -> pb::JobEventMessage {
    pb::JobEventMessage {
        position: Some(pb::EventPosition {
            index: position.0,
            seq: position.1,
        }),
        job_id: event.job,
        queue: event.queue.clone(),
        state: state_to_pb(event.status) as i32,
        attempt: event.attempt,
        token: event.token,
        node_id: event.node.unwrap_or(0),
        at_ms: event.at_ms,
    }
}

pub fn rate_to_pb(rate: &RateLimit) -> pb::RateLimitSpec {
    pb::RateLimitSpec {
        jobs: rate.jobs,
        period_ms: rate.period_ms,
    }
}

pub fn queue_to_pb(
    name: &str,
    config: &QueueConfig,
    state: Option<&QueueState>,
    retained: Option<&Retained>,
) -> pb::QueueInfo {
    let running = state.map_or(0, |q| q.running());
    pb::QueueInfo {
        name: name.to_string(),
        concurrency_max: config.concurrency_max,
        rate: config.rate.as_ref().map(rate_to_pb),
        paused: config.paused,
        pending: state.map_or(0, |q| q.live().saturating_sub(u64::from(running))),
        running,
        finished: retained.map_or(0, |r| r.finished),
        dead: retained.map_or(0, |r| r.dead),
    }
}
