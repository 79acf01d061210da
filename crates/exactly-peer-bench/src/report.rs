//! The pure part of the benchmark: how a publish answer is classified, how answers add up per
//! second of offered load, the two reports and their human rendering. The reports carry the
//! field names of `exactly bench`'s JSON (`OpenReport` for `--rate`, `Report` for the batched
//! run), so one script reads both systems' figures with the same keys.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::context::PublishErrorKind;
use hdrhistogram::Histogram;

/// Highest latency the histograms track (one hour), in microseconds; larger values saturate.
const LATENCY_US_MAX: u64 = 3_600_000_000;

/// What every report says it measured, so a JSON file names its system.
pub const SYSTEM: &str = "nats-jetstream";

/// The setup measured, printed with every report.
pub const SETUP_NOTE: &str = "stream BENCH on bench.jobs (R3, file storage, work-queue \
     retention), durable pull consumer with explicit acks; a job ends with a confirmed ack";

/// What the batched run's completion latency is measured from.
pub const COMPLETION_CLOCK_NOTE: &str =
    "publish sent to its confirmed ack, per message, on this machine's monotonic clock";

/// An empty latency histogram with three significant digits.
pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).context("creating a latency histogram")
}

/// A duration in whole microseconds, saturating.
pub fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// A duration in whole milliseconds, saturating.
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Count per second of `elapsed`; 0 for an empty interval.
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 {
        return 0.0;
    }
    count as f64 / seconds
}

/// p50, p99 and max of a histogram (`exactly bench`'s `Summary`).
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

/// How one publish ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The stream stored it: a PubAck with this stream sequence.
    Acknowledged(u64),
    /// Provably not stored.
    Refused,
    /// Maybe stored.
    Unknown,
    /// Anything else (the client refused to send it, or the answer made no sense).
    Error,
}

/// Classifies a failed publish; `server_error` is true when the stream answered with a JetStream
/// error. Refused only when the answer proves nothing was stored: "no responders" (503: nobody
/// listens on the subject, so no stream took it) and any error the stream answered with (the
/// stream leader says it did not store the message). A timeout or a broken connection leaves the
/// outcome unknown; a publish the client never sent (in-flight or payload limit) is an error.
pub fn classify(kind: PublishErrorKind, server_error: bool) -> Answer {
    match kind {
        PublishErrorKind::StreamNotFound
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => Answer::Refused,
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => Answer::Unknown,
        PublishErrorKind::Other if server_error => Answer::Refused,
        PublishErrorKind::Other
        | PublishErrorKind::MaxAckPending
        | PublishErrorKind::MaxPayloadExceeded => Answer::Error,
    }
}

/// One second of offered load: what became of the publishes scheduled in it (`exactly bench
/// --rate`'s `Second`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Second {
    pub offered: u64,
    pub acknowledged: u64,
    /// Answered in a way that proves nothing was stored (see [`classify`]).
    pub refused: u64,
    /// Timed out or lost with the connection: it may have been stored.
    pub unknown: u64,
    /// Any other failure.
    pub errors: u64,
    /// Not sent: the bench already had `OPEN_IN_FLIGHT_MAX` publishes in flight.
    pub not_sent: u64,
    /// Slowest answer of the second's publishes, in milliseconds.
    pub slowest_answer_ms: u64,
}

/// Answers added up per second of offered load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tally {
    per_second: Vec<Second>,
    slowest_refusal: Duration,
}

impl Tally {
    /// A tally over `seconds` seconds (at least one); later answers count in the last second.
    pub fn new(seconds: usize) -> Tally {
        Tally {
            per_second: vec![Second::default(); seconds.max(1)],
            slowest_refusal: Duration::ZERO,
        }
    }

    fn second(&mut self, offset: Duration) -> &mut Second {
        let last = self.per_second.len() - 1;
        let index = usize::try_from(offset.as_secs()).unwrap_or(usize::MAX);
        &mut self.per_second[index.min(last)]
    }

    /// A publish scheduled `offset` after the start, answered `took` after it was scheduled.
    pub fn answer(&mut self, offset: Duration, took: Duration, answer: &Answer) {
        let s = self.second(offset);
        s.offered += 1;
        s.slowest_answer_ms = s.slowest_answer_ms.max(millis(took));
        match answer {
            Answer::Acknowledged(_) => s.acknowledged += 1,
            Answer::Refused => s.refused += 1,
            Answer::Unknown => s.unknown += 1,
            Answer::Error => s.errors += 1,
        }
        if matches!(answer, Answer::Refused | Answer::Unknown) {
            self.slowest_refusal = self.slowest_refusal.max(took);
        }
    }

    /// A publish scheduled `offset` after the start that was not sent.
    pub fn not_sent(&mut self, offset: Duration) {
        let s = self.second(offset);
        s.offered += 1;
        s.not_sent += 1;
    }

    pub fn per_second(&self) -> &[Second] {
        &self.per_second
    }

    /// The slowest refused or unknown answer.
    pub fn slowest_refusal(&self) -> Duration {
        self.slowest_refusal
    }

    /// All seconds added up; `slowest_answer_ms` is the slowest of all.
    pub fn totals(&self) -> Second {
        let mut t = Second::default();
        for s in &self.per_second {
            t.offered += s.offered;
            t.acknowledged += s.acknowledged;
            t.refused += s.refused;
            t.unknown += s.unknown;
            t.errors += s.errors;
            t.not_sent += s.not_sent;
            t.slowest_answer_ms = t.slowest_answer_ms.max(s.slowest_answer_ms);
        }
        t
    }
}

/// The result of an open-loop run (`--rate`); `--json` prints exactly this. The fields of
/// `exactly bench --rate`'s `OpenReport` come first, with the same names and meanings (a job is
/// a message; it finished when its confirmed ack was answered).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OpenReport {
    pub rate: u32,
    pub duration_ms: u64,
    pub connections: u32,
    pub jobs_per_request: u32,
    pub kind: String,
    pub requests: Second,
    /// Acknowledged messages whose confirmed ack was answered within the drain time.
    pub finished_jobs: u64,
    /// Finished jobs per second of offered load.
    pub goodput_jobs_per_s: f64,
    /// Acknowledged messages without a confirmed ack within the drain time.
    pub unfinished_jobs: u64,
    /// Scheduled send to PubAck, acknowledged publishes only, in microseconds.
    pub submit_latency_us: Option<Summary>,
    /// Scheduled send to the answer of the message's confirmed ack, in microseconds.
    pub end_to_end_latency_us: Option<Summary>,
    /// Refused or unknown publishes answered after this many milliseconds, at most.
    pub slowest_refusal_ms: u64,
    /// The first failed publish, as the client printed it.
    pub first_error: Option<String>,
    pub per_second: Vec<Second>,
    /// Always [`SYSTEM`].
    pub system: &'static str,
    pub payload_bytes: u32,
    /// Confirmed acks that failed (timed out or errored); the message is redelivered after the
    /// consumer's ack wait.
    pub ack_errors: u64,
    /// The first failed confirmed ack or pull error.
    pub first_ack_error: Option<String>,
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

/// The open-loop report as aligned lines, then one line per second (the layout of `exactly bench
/// --rate`).
pub fn render_open(r: &OpenReport) -> String {
    let q = &r.requests;
    let mut out = key_values(&[
        ("system", format!("NATS JetStream: {SETUP_NOTE}")),
        (
            "offered",
            format!(
                "{} requests/s for {:.1} s over {} connections, {} {} job(s) per request \
                 ({}-byte messages)",
                r.rate,
                r.duration_ms as f64 / 1000.0,
                r.connections,
                r.jobs_per_request,
                r.kind,
                r.payload_bytes
            ),
        ),
        (
            "requests",
            format!(
                "{} offered: {} acknowledged, {} refused (nothing stored), {} unknown outcome, \
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
            "slowest refusal",
            format!("{} ms (refused or unknown answers)", r.slowest_refusal_ms),
        ),
        (
            "first error",
            r.first_error.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "ack errors",
            match &r.first_ack_error {
                Some(first) => format!("{} (first: {first})", r.ack_errors),
                None => r.ack_errors.to_string(),
            },
        ),
    ]);
    out.push_str("second  offered  acked  refused  unknown  errors  not-sent  slowest(ms)\n");
    for (i, s) in r.per_second.iter().enumerate() {
        out.push_str(&format!(
            "{i:>6}  {:>7}  {:>5}  {:>7}  {:>7}  {:>6}  {:>8}  {:>11}\n",
            s.offered,
            s.acknowledged,
            s.refused,
            s.unknown,
            s.errors,
            s.not_sent,
            s.slowest_answer_ms
        ));
    }
    out
}

/// Everything that went wrong during a batched run, under `exactly bench`'s `Failures` names.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Failures {
    /// Publishes that failed.
    pub submit_requests: u64,
    /// Messages in those publishes (one each).
    pub submit_jobs: u64,
    /// Failed publishes whose outcome is unknown: their messages may be stored.
    pub submit_unknown_outcome_requests: u64,
    /// The first publish error, as printed by the client.
    pub first_submit_error: Option<String>,
    /// Always 0: the consumer only acks, no job can fail.
    pub jobs_failed: u64,
    /// Always 0: consumption is seen directly, nothing is polled.
    pub status_poll_errors: u64,
    /// Confirmed acks that failed (the message is redelivered after the ack wait).
    pub sample_get_errors: u64,
    /// Acknowledged messages without a confirmed ack when the run ended.
    pub sample_not_terminal: u64,
}

/// The result of a batched run (`--messages`); `--json` prints exactly this. The fields of
/// `exactly bench --jobs`'s `Report` come first, with the same names: a request is one publish
/// (`batch` is 1 message per publish) and `concurrency` is how many publishes are sent before
/// their acks are awaited together.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct BatchReport {
    pub jobs: u64,
    pub acknowledged: u64,
    pub batch: u32,
    pub concurrency: u32,
    pub kind: String,
    pub payload_bytes: u32,
    /// From the first publish to the last confirmed ack of an acknowledged message.
    pub elapsed_ms: u64,
    /// From the first publish to the last PubAck.
    pub submit_elapsed_ms: u64,
    /// Finished (acknowledged and confirmed-acked) messages per second over `elapsed_ms`.
    pub throughput_jobs_per_s: f64,
    /// Acknowledged messages per second over `submit_elapsed_ms`.
    pub submit_jobs_per_s: f64,
    /// Publish to PubAck, per message, in microseconds.
    pub submit_latency_us: Option<Summary>,
    /// Publish to confirmed ack, per acknowledged message, in milliseconds.
    pub completion_latency_ms: Option<Summary>,
    pub completion_latency_source: &'static str,
    /// Messages whose completion latency was measured (all acknowledged and finished ones).
    pub sampled_jobs: u64,
    pub failures: Failures,
    /// Always [`SYSTEM`].
    pub system: &'static str,
    /// `completion_latency_ms` in microseconds (JetStream's are often below a millisecond).
    pub end_to_end_latency_us: Option<Summary>,
    /// The first failed confirmed ack or pull error.
    pub first_ack_error: Option<String>,
}

fn seconds(ms: u64) -> String {
    format!("{}.{:03} s", ms / 1_000, ms % 1_000)
}

/// The batched report as aligned lines (the layout of `exactly bench --jobs`).
pub fn render_batch(r: &BatchReport) -> String {
    let submit_latency = match &r.submit_latency_us {
        Some(s) => format!(
            "p50 {}  p99 {}  max {} (per publish of 1 message, {} publishes)",
            micros_as_ms(s.p50),
            micros_as_ms(s.p99),
            micros_as_ms(s.max),
            s.count
        ),
        None => "-".into(),
    };
    let completion_latency = match &r.end_to_end_latency_us {
        Some(s) => format!(
            "p50 {}  p99 {}  max {} (publish to confirmed ack, {} messages)\n\
             {COMPLETION_CLOCK_NOTE}",
            micros_as_ms(s.p50),
            micros_as_ms(s.p99),
            micros_as_ms(s.max),
            s.count
        ),
        None => "- (no message finished)".into(),
    };
    let f = &r.failures;
    let mut failures = format!(
        "{} publishes ({} messages not acknowledged, {} with unknown outcome)\n\
         {} confirmed acks failed, {} acknowledged messages not finished",
        f.submit_requests,
        f.submit_jobs,
        f.submit_unknown_outcome_requests,
        f.sample_get_errors,
        f.sample_not_terminal
    );
    if let Some(first) = &f.first_submit_error {
        failures.push_str(&format!("\nfirst publish error: {first}"));
    }
    if let Some(first) = &r.first_ack_error {
        failures.push_str(&format!("\nfirst ack error: {first}"));
    }
    key_values(&[
        ("system", format!("NATS JetStream: {SETUP_NOTE}")),
        (
            "jobs",
            format!(
                "{} requested, {} acknowledged ({}-byte messages, {} publishes in flight, \
                 their acks awaited together)",
                r.jobs, r.acknowledged, r.payload_bytes, r.concurrency
            ),
        ),
        (
            "elapsed",
            format!(
                "{} (first publish to last confirmed ack)",
                seconds(r.elapsed_ms)
            ),
        ),
        (
            "throughput",
            format!("{:.1} jobs/s", r.throughput_jobs_per_s),
        ),
        (
            "submit throughput",
            format!(
                "{:.1} jobs/s (all publishes answered after {})",
                r.submit_jobs_per_s,
                seconds(r.submit_elapsed_ms)
            ),
        ),
        ("submit latency", submit_latency),
        ("completion latency", completion_latency),
        ("failures", failures),
    ])
}

/// Microseconds as milliseconds with three decimals (`1.234 ms`).
pub fn micros_as_ms(us: u64) -> String {
    format!("{}.{:03} ms", us / 1_000, us % 1_000)
}

/// Key/value lines with the values aligned one column past the longest key; a value spanning
/// several lines keeps its continuation lines under the first (`exactly`'s layout).
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        for (n, line) in value.split('\n').enumerate() {
            let label = if n == 0 { *key } else { "" };
            let text = format!("{label:width$}  {line}");
            out.push_str(text.trim_end());
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only answers that prove nothing was stored count as refusals; a lost answer is unknown.
    #[test]
    fn refusals_are_only_provable_ones() {
        assert_eq!(
            classify(PublishErrorKind::StreamNotFound, false),
            Answer::Refused
        );
        assert_eq!(classify(PublishErrorKind::Other, true), Answer::Refused);
        assert_eq!(
            classify(PublishErrorKind::WrongLastSequence, true),
            Answer::Refused
        );
        assert_eq!(classify(PublishErrorKind::TimedOut, false), Answer::Unknown);
        assert_eq!(
            classify(PublishErrorKind::BrokenPipe, false),
            Answer::Unknown
        );
        assert_eq!(classify(PublishErrorKind::Other, false), Answer::Error);
        assert_eq!(
            classify(PublishErrorKind::MaxAckPending, false),
            Answer::Error
        );
        assert_eq!(
            classify(PublishErrorKind::MaxPayloadExceeded, false),
            Answer::Error
        );
    }

    /// Answers count in the second they were scheduled in, late ones in the last second; the
    /// slowest refusal covers refused and unknown answers only.
    #[test]
    fn tally_counts_per_scheduled_second() {
        let mut t = Tally::new(2);
        let ms = Duration::from_millis;
        t.answer(ms(100), ms(3), &Answer::Acknowledged(1));
        t.answer(ms(900), ms(7_000), &Answer::Unknown);
        t.answer(ms(1_200), ms(40), &Answer::Refused);
        t.answer(ms(5_000), ms(9_000), &Answer::Error);
        t.not_sent(ms(1_999));
        assert_eq!(
            t.per_second(),
            &[
                Second {
                    offered: 2,
                    acknowledged: 1,
                    unknown: 1,
                    slowest_answer_ms: 7_000,
                    ..Second::default()
                },
                Second {
                    offered: 3,
                    refused: 1,
                    errors: 1,
                    not_sent: 1,
                    slowest_answer_ms: 9_000,
                    ..Second::default()
                },
            ]
        );
        assert_eq!(t.slowest_refusal(), ms(7_000));
        assert_eq!(
            t.totals(),
            Second {
                offered: 5,
                acknowledged: 1,
                refused: 1,
                unknown: 1,
                errors: 1,
                not_sent: 1,
                slowest_answer_ms: 9_000,
            }
        );
    }

    /// Throughput divides by the interval in seconds and is 0 for an empty interval.
    #[test]
    fn per_second_handles_zero() {
        assert_eq!(per_second(500, Duration::from_millis(250)), 2_000.0);
        assert_eq!(per_second(500, Duration::ZERO), 0.0);
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

    fn open_report() -> OpenReport {
        OpenReport {
            rate: 500,
            duration_ms: 2_000,
            connections: 4,
            jobs_per_request: 1,
            kind: "noop".into(),
            requests: Second {
                offered: 1_000,
                acknowledged: 997,
                refused: 1,
                unknown: 2,
                errors: 0,
                not_sent: 0,
                slowest_answer_ms: 5_001,
            },
            finished_jobs: 997,
            goodput_jobs_per_s: 498.5,
            unfinished_jobs: 0,
            submit_latency_us: Some(Summary {
                count: 997,
                p50: 1_234,
                p99: 5_678,
                max: 9_012,
            }),
            end_to_end_latency_us: Some(Summary {
                count: 997,
                p50: 2_500,
                p99: 8_000,
                max: 12_000,
            }),
            slowest_refusal_ms: 5_001,
            first_error: Some("timed out: didn't receive ack in time".into()),
            per_second: vec![
                Second {
                    offered: 500,
                    acknowledged: 500,
                    slowest_answer_ms: 9,
                    ..Second::default()
                },
                Second {
                    offered: 500,
                    acknowledged: 497,
                    refused: 1,
                    unknown: 2,
                    slowest_answer_ms: 5_001,
                    ..Second::default()
                },
            ],
            system: SYSTEM,
            payload_bytes: 0,
            ack_errors: 0,
            first_ack_error: None,
        }
    }

    /// The open-loop report has `exactly bench --rate`'s lines, then one line per second.
    #[test]
    fn renders_open_report() {
        assert_eq!(
            render_open(&open_report()),
            format!(
                "\
system           NATS JetStream: {SETUP_NOTE}
offered          500 requests/s for 2.0 s over 4 connections, 1 noop job(s) per request (0-byte messages)
requests         1000 offered: 997 acknowledged, 1 refused (nothing stored), 2 unknown outcome, 0 other errors, 0 not sent (client saturated)
goodput          498.5 jobs/s finished (997 finished, 0 acknowledged but not seen finished)
submit latency   p50 1.234 ms  p99 5.678 ms  max 9.012 ms (997 values)
end to end       p50 2.500 ms  p99 8.000 ms  max 12.000 ms (997 values)
slowest refusal  5001 ms (refused or unknown answers)
first error      timed out: didn't receive ack in time
ack errors       0
second  offered  acked  refused  unknown  errors  not-sent  slowest(ms)
     0      500    500        0        0       0         0            9
     1      500    497        1        2       0         0         5001
"
            )
        );
    }

    /// The open-loop JSON has the keys `exactly bench --rate --json` has, in the same shapes.
    #[test]
    fn open_json_matches_exactly_keys() {
        let value = serde_json::to_value(open_report()).unwrap();
        for key in [
            "rate",
            "duration_ms",
            "connections",
            "jobs_per_request",
            "kind",
            "requests",
            "finished_jobs",
            "goodput_jobs_per_s",
            "unfinished_jobs",
            "submit_latency_us",
            "end_to_end_latency_us",
            "slowest_refusal_ms",
            "first_error",
            "per_second",
        ] {
            assert!(value.get(key).is_some(), "missing {key}");
        }
        assert_eq!(value["requests"]["acknowledged"], 997);
        assert_eq!(value["requests"]["not_sent"], 0);
        assert_eq!(value["goodput_jobs_per_s"], 498.5);
        assert_eq!(value["end_to_end_latency_us"]["p50"], 2_500);
        assert_eq!(value["end_to_end_latency_us"]["p99"], 8_000);
        assert_eq!(value["submit_latency_us"]["max"], 9_012);
        assert_eq!(value["per_second"][1]["unknown"], 2);
        assert_eq!(value["system"], "nats-jetstream");
    }

    fn batch_report() -> BatchReport {
        BatchReport {
            jobs: 10_000,
            acknowledged: 10_000,
            batch: 1,
            concurrency: 1_000,
            kind: "noop".into(),
            payload_bytes: 0,
            elapsed_ms: 2_345,
            submit_elapsed_ms: 2_000,
            throughput_jobs_per_s: 4_264.39,
            submit_jobs_per_s: 5_000.0,
            submit_latency_us: Some(Summary {
                count: 10_000,
                p50: 1_234,
                p99: 5_678,
                max: 9_012,
            }),
            completion_latency_ms: Some(Summary {
                count: 10_000,
                p50: 2,
                p99: 9,
                max: 30,
            }),
            completion_latency_source: COMPLETION_CLOCK_NOTE,
            sampled_jobs: 10_000,
            failures: Failures::default(),
            system: SYSTEM,
            end_to_end_latency_us: Some(Summary {
                count: 10_000,
                p50: 2_100,
                p99: 9_500,
                max: 30_000,
            }),
            first_ack_error: None,
        }
    }

    /// The batched report has `exactly bench --jobs`'s lines.
    #[test]
    fn renders_batch_report() {
        assert_eq!(
            render_batch(&batch_report()),
            format!(
                "\
system              NATS JetStream: {SETUP_NOTE}
jobs                10000 requested, 10000 acknowledged (0-byte messages, 1000 publishes in flight, their acks awaited together)
elapsed             2.345 s (first publish to last confirmed ack)
throughput          4264.4 jobs/s
submit throughput   5000.0 jobs/s (all publishes answered after 2.000 s)
submit latency      p50 1.234 ms  p99 5.678 ms  max 9.012 ms (per publish of 1 message, 10000 publishes)
completion latency  p50 2.100 ms  p99 9.500 ms  max 30.000 ms (publish to confirmed ack, 10000 messages)
                    {COMPLETION_CLOCK_NOTE}
failures            0 publishes (0 messages not acknowledged, 0 with unknown outcome)
                    0 confirmed acks failed, 0 acknowledged messages not finished
"
            )
        );
    }

    /// The batched JSON has the keys `exactly bench --jobs --json` has, in the same shapes.
    #[test]
    fn batch_json_matches_exactly_keys() {
        let value = serde_json::to_value(batch_report()).unwrap();
        for key in [
            "jobs",
            "acknowledged",
            "batch",
            "concurrency",
            "kind",
            "payload_bytes",
            "elapsed_ms",
            "submit_elapsed_ms",
            "throughput_jobs_per_s",
            "submit_jobs_per_s",
            "submit_latency_us",
            "completion_latency_ms",
            "completion_latency_source",
            "sampled_jobs",
            "failures",
        ] {
            assert!(value.get(key).is_some(), "missing {key}");
        }
        assert_eq!(value["throughput_jobs_per_s"], 4_264.39);
        assert_eq!(value["completion_latency_ms"]["p99"], 9);
        assert_eq!(value["end_to_end_latency_us"]["p50"], 2_100);
        assert_eq!(value["failures"]["submit_requests"], 0);
        assert_eq!(value["failures"]["sample_not_terminal"], 0);
    }
}
