//! `exactly-peer-bench`: benchmarks a 3-node NATS JetStream cluster the way `exactly bench`
//! benchmarks exactly, so `scripts/bench-peer.sh` can print both side by side. A job is one
//! message on an R3 file-backed stream; it is submitted when its PubAck arrives and ends when a
//! durable pull consumer's confirmed ack is answered. `--rate` runs the open loop of `exactly
//! bench --rate`, `--messages` the batched maximum of `exactly bench --jobs`; `--json` prints the
//! report under the same field names. `--backlog` fills the stream with no consumer and then
//! drains it, as `scripts/backlog.sh` does on exactly.
//!
//! The crate depends on no exactly crate: it measures the peer, not exactly.

mod backlog;
mod batched;
mod jetstream;
mod open_loop;
mod report;

use std::io::Write;
use std::time::Duration;

use anyhow::bail;
use clap::Parser;

use crate::batched::{Batched, BATCH_IN_FLIGHT_MAX, MESSAGES_MAX};
use crate::jetstream::{Worker, ACKS_IN_FLIGHT_MAX};
use crate::open_loop::OpenLoop;

/// Largest message payload; NATS refuses messages over its `max_payload` (1 MiB by default).
const PAYLOAD_BYTES_MAX: u32 = 1024 * 1024;

/// Flags of `exactly-peer-bench`; one of `--rate` and `--messages` is required.
#[derive(Parser, Debug, PartialEq)]
#[command(
    name = "exactly-peer-bench",
    about = "Benchmarks a NATS JetStream cluster like `exactly bench` benchmarks exactly",
    group(clap::ArgGroup::new("mode").required(true).args(["rate", "messages", "backlog"]))
)]
struct Args {
    /// NATS servers of the cluster, comma-separated; each connection starts at the next one.
    #[arg(
        long,
        value_name = "URLS",
        value_delimiter = ',',
        default_value = "nats://127.0.0.1:4222"
    )]
    servers: Vec<String>,
    /// Open loop: publish this many messages (jobs) per second whatever the cluster answers, for
    /// --duration, and report every answer per second and each job's scheduled-send-to-
    /// confirmed-ack latency.
    #[arg(long, value_name = "MESSAGES_PER_S", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    rate: Option<u32>,
    /// Batched maximum: publish this many messages as fast as possible and report jobs/s from
    /// the first publish to the last confirmed ack.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MESSAGES_MAX))]
    messages: Option<u64>,
    /// Backlog: publish this many messages with no consumer pulling, then start the worker and
    /// drain them; print each tenth's rate (and the watched processes' memory).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MESSAGES_MAX))]
    backlog: Option<u64>,
    /// Backlog: a process (a server) whose resident memory is printed after each tenth;
    /// comma-separated or repeated.
    #[arg(long = "watch-pid", value_name = "PID", value_delimiter = ',')]
    watch_pids: Vec<u32>,
    /// Backlog: a directory (a server's store) whose size is printed after each tenth;
    /// comma-separated or repeated.
    #[arg(long = "watch-dir", value_name = "DIR", value_delimiter = ',')]
    watch_dirs: Vec<std::path::PathBuf>,
    /// Open loop: how long to offer the load.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Open loop: connections the publishes are spread over.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    connections: u32,
    /// Open loop: how long to wait after the last publish for acknowledged messages to be acked.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    drain: Duration,
    /// Batched: publishes sent before their acks are awaited together.
    #[arg(long, value_name = "N", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=i64::from(BATCH_IN_FLIGHT_MAX)))]
    in_flight: u32,
    /// Batched: give up this long after the first publish (backlog: after the fill starts,
    /// and again after the drain starts).
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = parse_duration)]
    timeout: Duration,
    /// Size of each message's payload (zero bytes).
    #[arg(long, value_name = "BYTES", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=i64::from(PAYLOAD_BYTES_MAX)))]
    payload_bytes: u32,
    /// Longest wait for a PubAck or a confirmed ack's answer (exactly's client waits 5 s per
    /// call).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    ack_timeout: Duration,
    /// The consumer's ack wait: a delivery not acked this long is delivered again.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    ack_wait: Duration,
    /// Print the report as one JSON object (the field names of `exactly bench --json`).
    #[arg(long)]
    json: bool,
}

impl Args {
    /// Checks the relations between flags, naming the flags and values.
    fn validate(self) -> anyhow::Result<Args> {
        // A confirmed ack still waiting for its answer must not race the redelivery of the
        // message it acks.
        if self.ack_wait <= self.ack_timeout {
            bail!(
                "--ack-wait ({:?}) must be longer than --ack-timeout ({:?})",
                self.ack_wait,
                self.ack_timeout
            );
        }
        if self.servers.iter().any(|s| s.trim().is_empty()) {
            bail!("--servers has an empty entry: {:?}", self.servers.join(","));
        }
        Ok(self)
    }
}

/// A positive duration as an integer and a unit: `500ms`, `30s`, `2m`, `1h`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit (ms, s, m or h)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3_600)),
        _ => return Err(format!("{text:?}: unit must be ms, s, m or h")),
    };
    if duration.is_zero() {
        return Err("must be at least 1ms".into());
    }
    Ok(duration)
}

/// Writes text to standard output; a closed pipe is not an error.
fn emit(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn emit_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    emit(&text)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse().validate()?;
    let setup = jetstream::connect(&args.servers, 0, args.ack_timeout, ACKS_IN_FLIGHT_MAX).await?;
    let consumer = jetstream::recreate(&setup, args.ack_wait).await?;
    if let Some(messages) = args.backlog {
        let plan = backlog::Backlog {
            messages,
            in_flight: args.in_flight,
            payload_bytes: args.payload_bytes,
            timeout: args.timeout,
            ack_timeout: args.ack_timeout,
            watch: args.watch_pids.clone(),
            dirs: args.watch_dirs.clone(),
        };
        return backlog::run(&args.servers, &consumer, &plan).await;
    }
    let worker = Worker::start(&consumer).await?;
    if let Some(rate) = args.rate {
        let plan = OpenLoop {
            rate,
            duration: args.duration,
            connections: args.connections,
            payload_bytes: args.payload_bytes,
            drain: args.drain,
            ack_timeout: args.ack_timeout,
        };
        let report = open_loop::measure(&args.servers, &worker, &plan).await?;
        if args.json {
            emit_json(&report)?;
        } else {
            emit(&report::render_open(&report))?;
        }
        return Ok(());
    }
    let Some(messages) = args.messages else {
        bail!("one of --rate, --messages and --backlog is required");
    };
    let plan = Batched {
        messages,
        in_flight: args.in_flight,
        payload_bytes: args.payload_bytes,
        timeout: args.timeout,
        ack_timeout: args.ack_timeout,
    };
    let report = batched::measure(&args.servers, &worker, &plan).await?;
    if args.json {
        emit_json(&report)?;
    } else {
        emit(&report::render_batch(&report))?;
    }
    let f = &report.failures;
    if f.submit_requests > 0 || f.sample_not_terminal > 0 {
        bail!(
            "{} publishes failed and {} acknowledged messages were not acked within {:?}; the \
             results above cover the finished messages only",
            f.submit_requests,
            f.sample_not_terminal,
            args.timeout
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("exactly-peer-bench").chain(args.iter().copied()))
    }

    /// Durations take a whole number and a unit, and are never zero.
    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3_600)));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("3d").is_err());
    }

    /// The open loop's defaults are `exactly bench --rate`'s: 30 s, 4 connections, 30 s drain.
    #[test]
    fn open_loop_defaults_match_exactly() {
        let args = parse(&["--rate", "500", "--servers", "nats://a:1,nats://b:2"]).unwrap();
        assert_eq!(args.rate, Some(500));
        assert_eq!(args.duration, Duration::from_secs(30));
        assert_eq!(args.connections, 4);
        assert_eq!(args.drain, Duration::from_secs(30));
        assert_eq!(args.payload_bytes, 0);
        assert_eq!(args.servers, vec!["nats://a:1", "nats://b:2"]);
    }

    /// Exactly one mode: --rate, --messages or --backlog.
    #[test]
    fn one_mode_is_required() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--rate", "1", "--messages", "10"]).is_err());
        assert!(parse(&["--backlog", "10", "--messages", "10"]).is_err());
        assert!(parse(&["--messages", "10"]).is_ok());
        assert!(parse(&["--messages", "0"]).is_err());
        let backlog = parse(&["--backlog", "10", "--watch-pid", "7,8", "--watch-pid", "9"]);
        let backlog = backlog.unwrap();
        assert_eq!(backlog.backlog, Some(10));
        assert_eq!(backlog.watch_pids, vec![7, 8, 9]);
        assert!(parse(&["--backlog", "0"]).is_err());
    }

    /// The ack wait must outlast the wait for a confirmed ack's answer.
    #[test]
    fn ack_wait_outlasts_ack_timeout() {
        let args = parse(&["--messages", "10", "--ack-wait", "5s"]).unwrap();
        assert!(args.validate().is_err());
        let args = parse(&["--messages", "10", "--ack-wait", "6s"]).unwrap();
        assert!(args.validate().is_ok());
    }
}
