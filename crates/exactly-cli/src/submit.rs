//! `exactly submit`: builds one job spec from the flags and submits it `--count` times.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use exactly_client::{Client, JobSpec, SUBMIT_JOBS_MAX};

use crate::output::{emit, emit_json};

/// Most copies one `submit --count` sends; larger loads are what `bench` is for.
pub const SUBMIT_COUNT_MAX: u32 = 1_000_000;

/// Most bytes read for a payload from a file or standard input. The node enforces its own, usually
/// smaller, payload-bytes-max; this only keeps a mistaken `/dev/zero` from exhausting memory.
pub const PAYLOAD_READ_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Flags of `exactly submit`.
#[derive(clap::Args, Debug, PartialEq)]
#[command(group(
    clap::ArgGroup::new("payload-source").args(["payload", "payload_file", "payload_stdin"])
))]
pub struct SubmitArgs {
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
    /// Attempts before the job fails for good; the node's default when omitted.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: Option<u32>,
    /// Execution timeout of one attempt (for example 30s, 2m); the node's default when omitted.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub timeout: Option<Duration>,
    /// Do not start before this long from now (for example 10s). Measured on this machine's clock;
    /// the cluster compares it with the leader's.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub delay: Option<Duration>,
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

/// Milliseconds of a duration, saturating at `u64::MAX`.
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl SubmitArgs {
    /// The job spec these flags describe, with `payload` already read and `now_ms` the current
    /// Unix time (for `--delay`).
    pub fn spec(&self, payload: Vec<u8>, now_ms: u64) -> JobSpec {
        JobSpec {
            queue: self.queue.clone().unwrap_or_default(),
            kind: self.kind.clone(),
            payload,
            priority: self.priority,
            max_attempts: self.max_attempts.unwrap_or(0),
            timeout_ms: self.timeout.map(millis).unwrap_or(0),
            run_at_ms: self
                .delay
                .map(|delay| now_ms.saturating_add(millis(delay)))
                .unwrap_or(0),
            ..JobSpec::default()
        }
    }

    /// Reads the payload from wherever the flags say; empty when none was given.
    fn read_payload(&self) -> anyhow::Result<Vec<u8>> {
        if let Some(text) = &self.payload {
            return Ok(text.clone().into_bytes());
        }
        if let Some(path) = &self.payload_file {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open payload file {}", path.display()))?;
            return read_bounded(file).with_context(|| format!("payload file {}", path.display()));
        }
        if self.payload_stdin {
            return read_bounded(std::io::stdin().lock()).context("payload from standard input");
        }
        Ok(Vec::new())
    }
}

fn read_bounded(reader: impl Read) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    reader
        .take(PAYLOAD_READ_BYTES_MAX + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > PAYLOAD_READ_BYTES_MAX {
        bail!("larger than {PAYLOAD_READ_BYTES_MAX} bytes");
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
}

/// Runs `exactly submit`: prints one job id per line, or `{"job_ids": [...]}` with `--json`.
/// If a later request fails, the ids already acknowledged are still printed before the error.
pub async fn run(client: &Client, args: &SubmitArgs, json: bool) -> anyhow::Result<()> {
    let payload = args.read_payload()?;
    let now_ms = millis(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default(),
    );
    let spec = args.spec(payload, now_ms);
    let total = args.count as usize;
    let mut ids = Vec::with_capacity(total);
    for size in chunk_sizes(total, SUBMIT_JOBS_MAX) {
        match client.submit(vec![spec.clone(); size]).await {
            Ok(batch) => {
                if !json {
                    let lines: String = batch.iter().map(|id| format!("{id}\n")).collect();
                    emit(&lines)?;
                }
                ids.extend(batch);
            }
            Err(err) => {
                if json && !ids.is_empty() {
                    emit_json(&Submitted { job_ids: &ids })?;
                }
                if ids.is_empty() {
                    return Err(err.into());
                }
                return Err(anyhow::Error::new(err).context(format!(
                    "{} of {total} jobs were submitted (their ids are printed above); the rest failed",
                    ids.len()
                )));
            }
        }
    }
    if json {
        emit_json(&Submitted { job_ids: &ids })?;
    }
    Ok(())
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
}
