//! `exactly get JOB_ID`: one job with its attempts and result.

use exactly_client::{Attempt, Client, Job, JobState};

use std::collections::BTreeMap;

use crate::output::{
    bytes_text, duration_ms, emit, emit_bytes, emit_json, key_values, or_dash, state_name, time_ms,
    Encoding, Table,
};

/// Runs `exactly get` (with `payload`: only the payload's bytes).
pub async fn run(client: &Client, job_id: u64, payload: bool, json: bool) -> anyhow::Result<()> {
    if payload {
        let (job, payload) = client.get_with_payload(job_id).await?;
        return match payload {
            Some(bytes) => emit_bytes(&bytes),
            None => Err(crate::RefusedError(format!(
                "job {job_id} is {}: a job's payload is dropped when it succeeds or is cancelled",
                state_name(job.state)
            ))
            .into()),
        };
    }
    let job = client.get(job_id).await?;
    if json {
        emit_json(&JobView::from(&job))
    } else {
        emit(&render(&job))
    }
}

/// A job as human-readable text: a key/value block, an attempts table and the result.
pub fn render(job: &Job) -> String {
    let mut out = key_values(&[
        ("job", job.id.to_string()),
        ("state", state_name(job.state)),
        ("queue", or_dash(&job.queue)),
        ("kind", job.kind.clone()),
        ("priority", job.priority.to_string()),
        ("payload", format!("{} bytes", job.payload_bytes)),
        (
            "max attempts",
            or_node_default(u64::from(job.max_attempts), ""),
        ),
        ("failures", job.failures.to_string()),
        ("timeout", or_node_default(job.timeout_ms, " ms")),
        (
            "backoff",
            backoff_text(job.backoff_base_ms, job.backoff_max_ms),
        ),
        ("created", time_ms(job.created_at_ms)),
        ("updated", time_ms(job.updated_at_ms)),
        ("run at", time_ms(job.run_at_ms)),
        ("idempotency key", or_dash(&job.idempotency_key)),
        ("ordering key", or_dash(&job.ordering_key)),
        ("labels", labels_text(&job.labels)),
        ("schedule", or_dash(&job.schedule)),
        ("last error", or_dash(&job.last_error)),
    ]);
    out.push('\n');
    if job.attempts.is_empty() {
        out.push_str("attempts: none\n");
    } else {
        let mut table = Table::new(&[
            "ATTEMPT", "NODE", "TOKEN", "STARTED", "ENDED", "OUTCOME", "ERROR",
        ]);
        let dead = job.state == JobState::Dead as i32;
        for (i, a) in job.attempts.iter().enumerate() {
            // A dead job's last retryable failure was not retried: it had no attempt left.
            let last = i + 1 == job.attempts.len();
            let outcome = if dead && last && a.outcome == "failed-retryable" {
                "failed-retryable, no attempts left".to_string()
            } else {
                or_dash(&a.outcome)
            };
            table.row(vec![
                a.number.to_string(),
                a.node_id.to_string(),
                a.token.to_string(),
                time_ms(a.started_at_ms),
                time_ms(a.ended_at_ms),
                outcome,
                or_dash(&a.error),
            ]);
        }
        out.push_str(&table.render());
    }
    out.push('\n');
    if job.result.is_empty() {
        out.push_str("result: none\n");
    } else {
        let (encoding, text) = bytes_text(&job.result);
        let label = match encoding {
            Encoding::Utf8 => "text",
            Encoding::Hex => "hex, not UTF-8",
        };
        out.push_str(&format!(
            "result ({} bytes, {label}):\n{text}\n",
            job.result.len()
        ));
    }
    out
}

/// `base, doubling up to max`, each part "default" when unset (0).
fn backoff_text(base_ms: u64, max_ms: u64) -> String {
    let part = |ms: u64| {
        if ms == 0 {
            "default".to_string()
        } else {
            duration_ms(ms)
        }
    };
    format!("{}, doubling up to {}", part(base_ms), part(max_ms))
}

/// Labels as `name=value` pairs sorted by name, or `-`.
pub fn labels_text<S: std::hash::BuildHasher>(
    labels: &std::collections::HashMap<String, String, S>,
) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    let sorted: BTreeMap<_, _> = labels.iter().collect();
    sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A number with its unit, or "node default" for 0 (the wire's "not set").
fn or_node_default(value: u64, unit: &str) -> String {
    if value == 0 {
        "node default".into()
    } else {
        format!("{value}{unit}")
    }
}

/// The full job for `--json`. Field names follow the proto; `state` is a lower-case name and the
/// result carries its encoding.
#[derive(Debug, serde::Serialize)]
pub struct JobView {
    id: u64,
    queue: String,
    kind: String,
    priority: i32,
    state: String,
    payload_bytes: u32,
    max_attempts: u32,
    timeout_ms: u64,
    created_at_ms: u64,
    updated_at_ms: u64,
    run_at_ms: u64,
    attempts: Vec<AttemptView>,
    result: String,
    result_encoding: Encoding,
    last_error: String,
    idempotency_key: String,
    ordering_key: String,
    labels: BTreeMap<String, String>,
    /// The cron schedule that fired this job, if any.
    schedule: String,
    /// Failures that counted against max_attempts.
    failures: u32,
    backoff_base_ms: u64,
    backoff_max_ms: u64,
}

/// One attempt for `--json`.
#[derive(Debug, serde::Serialize)]
pub struct AttemptView {
    number: u32,
    token: u64,
    node_id: u64,
    started_at_ms: u64,
    ended_at_ms: u64,
    outcome: String,
    error: String,
}

impl From<&Attempt> for AttemptView {
    fn from(a: &Attempt) -> Self {
        AttemptView {
            number: a.number,
            token: a.token,
            node_id: a.node_id,
            started_at_ms: a.started_at_ms,
            ended_at_ms: a.ended_at_ms,
            outcome: a.outcome.clone(),
            error: a.error.clone(),
        }
    }
}

impl From<&Job> for JobView {
    fn from(job: &Job) -> Self {
        let (result_encoding, result) = bytes_text(&job.result);
        JobView {
            id: job.id,
            queue: job.queue.clone(),
            kind: job.kind.clone(),
            priority: job.priority,
            state: state_name(job.state),
            payload_bytes: job.payload_bytes,
            max_attempts: job.max_attempts,
            timeout_ms: job.timeout_ms,
            created_at_ms: job.created_at_ms,
            updated_at_ms: job.updated_at_ms,
            run_at_ms: job.run_at_ms,
            attempts: job.attempts.iter().map(AttemptView::from).collect(),
            result,
            result_encoding,
            last_error: job.last_error.clone(),
            idempotency_key: job.idempotency_key.clone(),
            ordering_key: job.ordering_key.clone(),
            labels: job.labels.clone().into_iter().collect(),
            schedule: job.schedule.clone(),
            failures: job.failures,
            backoff_base_ms: job.backoff_base_ms,
            backoff_max_ms: job.backoff_max_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Job {
        Job {
            id: 42,
            queue: "mail".into(),
            kind: "exec".into(),
            priority: 5,
            state: JobState::Succeeded as i32,
            payload_bytes: 3,
            max_attempts: 3,
            timeout_ms: 30_000,
            created_at_ms: 1_700_000_000_000,
            updated_at_ms: 1_700_000_002_500,
            run_at_ms: 0,
            attempts: vec![
                Attempt {
                    number: 1,
                    token: 17,
                    node_id: 2,
                    started_at_ms: 1_700_000_000_100,
                    ended_at_ms: 1_700_000_001_000,
                    outcome: "abandoned".into(),
                    error: "lease expired".into(),
                },
                Attempt {
                    number: 2,
                    token: 31,
                    node_id: 3,
                    started_at_ms: 1_700_000_002_000,
                    ended_at_ms: 1_700_000_002_500,
                    outcome: "succeeded".into(),
                    error: String::new(),
                },
            ],
            result: b"sent".to_vec(),
            last_error: String::new(),
            idempotency_key: "order-17".into(),
            labels: [("team".to_string(), "mail".to_string())].into(),
            failures: 0,
            backoff_base_ms: 500,
            ..Job::default()
        }
    }

    /// A dead job's last retryable failure says that no attempt was left; earlier ones, and a
    /// live job's, do not.
    #[test]
    fn a_dead_jobs_last_retryable_failure_says_why_it_stopped() {
        let failed = |number| Attempt {
            number,
            outcome: "failed-retryable".into(),
            error: "timeout".into(),
            ..Attempt::default()
        };
        let mut job = Job {
            state: JobState::Dead as i32,
            attempts: vec![failed(1), failed(2)],
            ..sample()
        };
        let text = render(&job);
        assert_eq!(
            text.matches("failed-retryable, no attempts left").count(),
            1,
            "{text}"
        );
        job.state = JobState::Pending as i32;
        assert!(!render(&job).contains("no attempts left"));
    }

    /// The human view shows the job's fields, an aligned attempts table and the result text.
    #[test]
    fn renders_job_with_attempts() {
        let text = render(&sample());
        assert_eq!(
            text,
            "\
job              42
state            succeeded
queue            mail
kind             exec
priority         5
payload          3 bytes
max attempts     3
failures         0
timeout          30000 ms
backoff          500ms, doubling up to default
created          2023-11-14T22:13:20.000Z
updated          2023-11-14T22:13:22.500Z
run at           -
idempotency key  order-17
ordering key     -
labels           team=mail
schedule         -
last error       -

ATTEMPT  NODE  TOKEN  STARTED                   ENDED                     OUTCOME    ERROR
1        2     17     2023-11-14T22:13:20.100Z  2023-11-14T22:13:21.000Z  abandoned  lease expired
2        3     31     2023-11-14T22:13:22.000Z  2023-11-14T22:13:22.500Z  succeeded  -

result (4 bytes, text):
sent
"
        );
    }

    /// Unset options (0 on the wire) print as the node's default.
    #[test]
    fn renders_unset_options_as_node_default() {
        let job = Job {
            timeout_ms: 0,
            max_attempts: 0,
            ..sample()
        };
        let text = render(&job);
        assert!(text.contains("max attempts     node default\n"), "{text}");
        assert!(text.contains("timeout          node default\n"), "{text}");
    }

    /// A non-UTF-8 result is shown in hex and says so.
    #[test]
    fn renders_binary_result_as_hex() {
        let job = Job {
            result: vec![0xde, 0xad, 0xbe, 0xef],
            ..sample()
        };
        assert!(render(&job).ends_with("result (4 bytes, hex, not UTF-8):\ndeadbeef\n"));
    }

    /// The JSON view carries every field, the state by name and the result's encoding.
    #[test]
    fn json_view_has_all_fields() {
        let value = serde_json::to_value(JobView::from(&sample())).unwrap();
        assert_eq!(value["id"], 42);
        assert_eq!(value["state"], "succeeded");
        assert_eq!(value["result"], "sent");
        assert_eq!(value["result_encoding"], "utf8");
        assert_eq!(value["attempts"][1]["token"], 31);
        assert_eq!(value["attempts"][0]["error"], "lease expired");
        assert_eq!(value["idempotency_key"], "order-17");
        assert_eq!(value["labels"]["team"], "mail");
        assert_eq!(value["backoff_base_ms"], 500);
        assert_eq!(value.as_object().unwrap().len(), 22);
    }
}
