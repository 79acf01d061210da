//! `exactly submit`: builds one job spec from the flags and submits it `--count` times. The job
//! flags ([`JobArgs`]) are shared with `exactly cron add`, whose ticks submit the same kind of
//! job.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use exactly_client::{assign_idempotency_keys, Client, JobSpec, SUBMIT_JOBS_MAX};

use crate::output::{emit, emit_json};
use crate::UsageError;

/// Most copies one `submit --count` sends; larger loads are what `bench` is for.
pub const SUBMIT_COUNT_MAX: u32 = 1_000_000;

/// Most bytes read for a payload from a file or standard input. The node enforces its own, usually
/// smaller, payload-bytes-max; this only keeps a mistaken `/dev/zero` from exhausting memory.
pub const PAYLOAD_READ_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// The flags that describe a job, shared by `submit` and `cron add`.
#[derive(clap::Args, Debug, PartialEq)]
#[command(group(
    clap::ArgGroup::new("payload-source").args(["payload", "payload_file", "payload_stdin"])
))]
pub struct JobArgs {
    /// Which handler runs the job (for example noop, sleep, fail, exec).
    #[arg(long)]
    pub kind: String,
    /// Queue name; the node's default queue when omitted.
    #[arg(long)]
    pub queue: Option<String>,
    /// Payload given as a string.
    #[arg(long, value_name = "STR")]
    pub payload: Option<String>,
    /// Payload read from a file.
    #[arg(long, value_name = "PATH")]
    pub payload_file: Option<PathBuf>,
    /// Payload read from standard input.
    #[arg(long)]
    pub payload_stdin: bool,
    /// Higher runs first.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub priority: i32,
    /// Attempts before the job becomes a dead letter; the node's default when omitted.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: Option<u32>,
    /// Execution timeout of one attempt (for example 30s, 2m); the node's default when omitted.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub timeout: Option<Duration>,
    /// Jobs of one queue with the same ordering key run one at a time, in submission order.
    #[arg(long, value_name = "KEY")]
    pub ordering_key: Option<String>,
    /// A label NAME=VALUE; repeat for more (at most 16).
    #[arg(long = "label", value_name = "NAME=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Delay before the first retry (for example 500ms); it doubles per retry, with jitter.
    /// Default 1s.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub backoff_base: Option<Duration>,
    /// Longest delay between retries (for example 10m). Default 5m.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub backoff_max: Option<Duration>,
}

/// Flags of `exactly submit`.
#[derive(clap::Args, Debug, PartialEq)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// A repeat of this key (within the cluster's retention, 24 h by default) returns the
    /// original job and creates nothing. Without it the client picks a random key, so its own
    /// retries never create the job twice.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
    /// Do not start before this long from now (for example 10s), measured by the cluster.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, conflicts_with = "run_at")]
    pub delay: Option<Duration>,
    /// Do not start before this time: RFC 3339 (2030-01-31T09:00:00Z) or Unix milliseconds.
    #[arg(long, value_name = "TIME", value_parser = parse_time_ms)]
    pub run_at: Option<u64>,
    /// Submit this many copies of the job. Sent in requests of at most 1000 jobs; each request is
    /// all-or-nothing on its own.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=i64::from(SUBMIT_COUNT_MAX)))]
    pub count: u32,
}

/// A duration of at least one millisecond (the wire carries milliseconds, and 0 means "default").
pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|err| err.to_string())?;
    if duration.as_millis() == 0 {
        return Err("must be at least 1ms".into());
    }
    Ok(duration)
}

/// `NAME=VALUE`; the name must not be empty, the value may be.
pub fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err("expected NAME=VALUE".into()),
    }
}

/// A point in time as Unix milliseconds: RFC 3339 (`2030-01-31T09:00:00Z`, or with a space and
/// without the `Z`, read as UTC) or a plain number of milliseconds.
pub fn parse_time_ms(text: &str) -> Result<u64, String> {
    let ms = match text.parse::<u64>() {
        Ok(ms) => ms,
        Err(_) => {
            let time = humantime::parse_rfc3339_weak(text)
                .map_err(|err| format!("{err} (expected RFC 3339 or Unix milliseconds)"))?;
            let since = time
                .duration_since(UNIX_EPOCH)
                .map_err(|_| "must not be before 1970".to_string())?;
            millis(since)
        }
    };
    if ms == 0 {
        return Err("must be after the Unix epoch".into());
    }
    Ok(ms)
}

/// Milliseconds of a duration, saturating at `u64::MAX`.
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl JobArgs {
    /// The job spec these flags describe, with `payload` already read.
    pub fn spec(&self, payload: Vec<u8>) -> JobSpec {
        JobSpec {
            queue: self.queue.clone().unwrap_or_default(),
            kind: self.kind.clone(),
            payload,
            priority: self.priority,
            max_attempts: self.max_attempts.unwrap_or(0),
            timeout_ms: self.timeout.map(millis).unwrap_or(0),
            ordering_key: self.ordering_key.clone().unwrap_or_default(),
            labels: self.labels.iter().cloned().collect::<HashMap<_, _>>(),
            backoff_base_ms: self.backoff_base.map(millis).unwrap_or(0),
            backoff_max_ms: self.backoff_max.map(millis).unwrap_or(0),
            ..JobSpec::default()
        }
    }

    /// Reads the payload from wherever the flags say; empty when none was given. A payload that
    /// cannot be read is a usage error.
    pub fn read_payload(&self) -> anyhow::Result<Vec<u8>> {
        if let Some(text) = &self.payload {
            return Ok(text.clone().into_bytes());
        }
        if let Some(path) = &self.payload_file {
            let file = std::fs::File::open(path).map_err(|err| {
                UsageError(format!(
                    "cannot open payload file {}: {err}",
                    path.display()
                ))
            })?;
            return read_bounded(file).map_err(|err| {
                UsageError(format!("payload file {}: {err}", path.display())).into()
            });
        }
        if self.payload_stdin {
            return read_bounded(std::io::stdin().lock())
                .map_err(|err| UsageError(format!("payload from standard input: {err}")).into());
        }
        Ok(Vec::new())
    }
}

impl SubmitArgs {
    /// The job spec these flags describe, with `payload` already read. Without
    /// `--idempotency-key` the key is left empty (one is chosen per job later).
    pub fn spec(&self, payload: Vec<u8>) -> JobSpec {
        JobSpec {
            idempotency_key: self.idempotency_key.clone().unwrap_or_default(),
            delay_ms: self.delay.map(millis).unwrap_or(0),
            run_at_ms: self.run_at.unwrap_or(0),
            ..self.job.spec(payload)
        }
    }
}

fn read_bounded(reader: impl Read) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader
        .take(PAYLOAD_READ_BYTES_MAX + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > PAYLOAD_READ_BYTES_MAX {
        anyhow::bail!("larger than {PAYLOAD_READ_BYTES_MAX} bytes");
    }
    Ok(bytes)
}

/// The request sizes that carry `count` jobs: full requests of `per_request`, then the rest.
pub fn chunk_sizes(count: usize, per_request: usize) -> Vec<usize> {
    let per_request = per_request.max(1);
    let mut sizes = vec![per_request; count / per_request];
    let rest = count % per_request;
    if rest > 0 {
        sizes.push(rest);
    }
    sizes
}

#[derive(serde::Serialize)]
struct Submitted<'a> {
    job_ids: &'a [u64],
    /// Per job: its idempotency key was seen before and no job was created.
    existing: &'a [bool],
}

/// Runs `exactly submit`: prints one job id per line, or `{"job_ids": [...], "existing": [...]}`
/// with `--json`. A job whose key was seen before is reported on standard error (its id, the
/// original job's, is still printed). If a later request fails, the ids already acknowledged are
/// still printed before the error.
pub async fn run(client: &Client, args: &SubmitArgs, json: bool) -> anyhow::Result<()> {
    if args.idempotency_key.is_some() && args.count > 1 {
        return Err(UsageError(
            "--idempotency-key names one job; it cannot be used with --count above 1".into(),
        )
        .into());
    }
    let spec = args.spec(args.job.read_payload()?);
    let total = args.count as usize;
    let mut ids = Vec::with_capacity(total);
    let mut existing = Vec::with_capacity(total);
    for size in chunk_sizes(total, SUBMIT_JOBS_MAX) {
        // Keys are chosen here, not in the client, so that an unknown outcome can name them.
        let mut jobs = vec![spec.clone(); size];
        assign_idempotency_keys(&mut jobs);
        let key_hint = (total == 1).then(|| jobs[0].idempotency_key.clone());
        match client.submit_detailed(jobs).await {
            Ok(submission) => {
                let mut notes = String::new();
                for job in submission.jobs.iter().filter(|j| j.existing) {
                    // After a resend the key may have been recorded by this command's own
                    // first try, whose answer was lost: say so rather than blame someone else.
                    let by = if submission.resent_after_unknown_outcome {
                        " (by an earlier submit, or by this command's first try whose answer was lost)"
                    } else {
                        ""
                    };
                    notes.push_str(&format!(
                        "job {} already existed{by} (idempotency key {:?}); nothing new was created\n",
                        job.id, job.idempotency_key
                    ));
                }
                if !json {
                    let lines: String = submission
                        .jobs
                        .iter()
                        .map(|j| format!("{}\n", j.id))
                        .collect();
                    emit(&lines)?;
                }
                eprint!("{notes}");
                ids.extend(submission.jobs.iter().map(|j| j.id));
                existing.extend(submission.jobs.iter().map(|j| j.existing));
            }
            Err(err) => {
                if json && !ids.is_empty() {
                    emit_json(&Submitted {
                        job_ids: &ids,
                        existing: &existing,
                    })?;
                }
                let mut err = anyhow::Error::new(err);
                if let (true, Some(key)) = (is_unknown(&err), key_hint) {
                    err = err.context(format!(
                        "the job may or may not exist; submitting it again with \
                         --idempotency-key {key} is safe and tells"
                    ));
                }
                if ids.is_empty() {
                    return Err(err);
                }
                return Err(err.context(format!(
                    "{} of {total} jobs were submitted (their ids are printed above); the rest failed",
                    ids.len()
                )));
            }
        }
    }
    if json {
        emit_json(&Submitted {
            job_ids: &ids,
            existing: &existing,
        })?;
    }
    Ok(())
}

fn is_unknown(err: &anyhow::Error) -> bool {
    err.downcast_ref::<exactly_client::Error>()
        .is_some_and(exactly_client::Error::is_unknown_outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A count splits into full requests and one remainder.
    #[test]
    fn counts_split_into_requests() {
        assert_eq!(chunk_sizes(1, 1000), vec![1]);
        assert_eq!(chunk_sizes(1000, 1000), vec![1000]);
        assert_eq!(chunk_sizes(2500, 1000), vec![1000, 1000, 500]);
    }

    /// Durations below one millisecond are rejected because 0 on the wire means "node default".
    #[test]
    fn timeouts_must_be_positive() {
        assert_eq!(
            parse_positive_duration("1500ms"),
            Ok(Duration::from_millis(1500))
        );
        assert!(parse_positive_duration("0s").is_err());
        assert!(parse_positive_duration("10us").is_err());
    }

    /// A payload over the read limit is refused rather than buffered.
    #[test]
    fn payload_read_is_bounded() {
        let big = std::io::repeat(0).take(PAYLOAD_READ_BYTES_MAX + 10);
        assert!(read_bounded(big).is_err());
        assert_eq!(read_bounded(&b"abc"[..]).unwrap(), b"abc");
    }

    /// Labels split at the first `=`; a missing name or `=` is refused.
    #[test]
    fn labels_parse() {
        assert_eq!(parse_label("team=mail"), Ok(("team".into(), "mail".into())));
        assert_eq!(parse_label("expr=a=b"), Ok(("expr".into(), "a=b".into())));
        assert_eq!(parse_label("empty="), Ok(("empty".into(), String::new())));
        assert!(parse_label("=x").is_err());
        assert!(parse_label("novalue").is_err());
    }

    /// Times parse from RFC 3339 (strict or weak) and from Unix milliseconds.
    #[test]
    fn times_parse() {
        assert_eq!(parse_time_ms("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(parse_time_ms("2023-11-14 22:13:20"), Ok(1_700_000_000_000));
        assert_eq!(parse_time_ms("1700000000123"), Ok(1_700_000_000_123));
        assert!(parse_time_ms("0").is_err());
        assert!(parse_time_ms("tomorrow").is_err());
    }
}
