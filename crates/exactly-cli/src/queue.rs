//! `exactly queue list|configure`: queue settings, enforced cluster-wide (a concurrency limit, a
//! rate limit, paused or not) and each queue's jobs: pending, running, finished and dead.

use std::time::Duration;

use exactly_client::{Client, ConfigureQueueRequest, QueueInfo, RateLimitSpec};

use crate::output::{emit, emit_json, key_values, rate_text, Table};
use crate::UsageError;

#[derive(clap::Subcommand, Debug, PartialEq)]
pub enum QueueCommand {
    /// Every queue with jobs or settings.
    List,
    /// Change a queue's settings; settings not named keep their value.
    Configure(ConfigureArgs),
}

/// Flags of `exactly queue configure`.
#[derive(clap::Args, Debug, PartialEq)]
pub struct ConfigureArgs {
    /// The queue.
    pub name: String,
    /// Jobs of this queue running at once, cluster-wide; 0 removes the limit.
    #[arg(long, value_name = "N")]
    pub concurrency: Option<u32>,
    /// At most JOBS attempt starts per PERIOD, cluster-wide (for example 10/1s, 100/1m, 5/s).
    #[arg(long, value_name = "JOBS/PERIOD", value_parser = parse_rate, conflicts_with = "clear_rate")]
    pub rate: Option<RateLimitSpec>,
    /// Remove the rate limit.
    #[arg(long)]
    pub clear_rate: bool,
    /// Stop starting this queue's jobs (running ones finish).
    #[arg(long, conflicts_with = "resume")]
    pub pause: bool,
    /// Start this queue's jobs again.
    #[arg(long)]
    pub resume: bool,
}

/// `JOBS/PERIOD`: a positive job count and a duration of at least 1 ms; a bare unit (`s`, `m`,
/// `h`) means one of it.
pub fn parse_rate(text: &str) -> Result<RateLimitSpec, String> {
    let (jobs, period) = text
        .split_once('/')
        .ok_or_else(|| "expected JOBS/PERIOD, for example 10/1s".to_string())?;
    let jobs: u32 = jobs
        .trim()
        .parse()
        .map_err(|err| format!("jobs {jobs:?}: {err}"))?;
    if jobs == 0 {
        return Err("jobs must be at least 1".into());
    }
    let period = period.trim();
    let starts_with_digit = period.chars().next().is_some_and(|c| c.is_ascii_digit());
    let period = if starts_with_digit {
        period.to_string()
    } else {
        format!("1{period}")
    };
    let duration: Duration =
        humantime::parse_duration(&period).map_err(|err| format!("period {period:?}: {err}"))?;
    let period_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    if period_ms == 0 {
        return Err("the period must be at least 1ms".into());
    }
    Ok(RateLimitSpec { jobs, period_ms })
}

impl ConfigureArgs {
    /// The request these flags describe; a usage error if they change nothing.
    pub fn request(&self) -> Result<ConfigureQueueRequest, UsageError> {
        let paused = match (self.pause, self.resume) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
        if self.concurrency.is_none() && self.rate.is_none() && !self.clear_rate && paused.is_none()
        {
            return Err(UsageError(
                "nothing to change: give --concurrency, --rate, --clear-rate, --pause or --resume"
                    .into(),
            ));
        }
        Ok(ConfigureQueueRequest {
            queue: self.name.clone(),
            concurrency_max: self.concurrency,
            rate: self.rate,
            clear_rate: self.clear_rate,
            paused,
        })
    }
}

fn concurrency_text(n: u32) -> String {
    if n == 0 {
        "unlimited".into()
    } else {
        n.to_string()
    }
}

fn rate_of(q: &QueueInfo) -> String {
    q.rate
        .map_or("unlimited".into(), |r| rate_text(r.jobs, r.period_ms))
}

/// The queues as a table.
pub fn render_list(queues: &[QueueInfo]) -> String {
    if queues.is_empty() {
        // The cluster lists a queue while it holds jobs in any state (until retention deletes
        // finished ones) or has settings of its own.
        return "no queues: no job has been submitted, or retention has deleted every finished \
                one, and no queue has settings\n"
            .into();
    }
    let mut table = Table::new(&[
        "QUEUE",
        "STATE",
        "CONCURRENCY",
        "RATE",
        "PENDING",
        "RUNNING",
        "FINISHED",
        "DEAD",
    ]);
    for q in queues {
        table.row(vec![
            q.name.clone(),
            if q.paused { "paused" } else { "active" }.into(),
            concurrency_text(q.concurrency_max),
            rate_of(q),
            q.pending.to_string(),
            q.running.to_string(),
            q.finished.to_string(),
            q.dead.to_string(),
        ]);
    }
    table.render()
}

/// One queue as key/value lines.
pub fn render_one(q: &QueueInfo) -> String {
    key_values(&[
        ("queue", q.name.clone()),
        ("state", if q.paused { "paused" } else { "active" }.into()),
        ("concurrency", concurrency_text(q.concurrency_max)),
        ("rate", rate_of(q)),
        ("pending", q.pending.to_string()),
        ("running", q.running.to_string()),
        ("finished", q.finished.to_string()),
        ("dead", q.dead.to_string()),
    ])
}

/// A queue for `--json`; field names follow the proto, the rate is null when unlimited.
#[derive(Debug, serde::Serialize)]
pub struct QueueView {
    name: String,
    /// 0: no limit.
    concurrency_max: u32,
    rate: Option<RateView>,
    paused: bool,
    pending: u64,
    running: u32,
    /// Succeeded and cancelled jobs still retained.
    finished: u64,
    dead: u64,
}

#[derive(Debug, serde::Serialize)]
struct RateView {
    jobs: u32,
    period_ms: u64,
}

impl From<&QueueInfo> for QueueView {
    fn from(q: &QueueInfo) -> Self {
        QueueView {
            name: q.name.clone(),
            concurrency_max: q.concurrency_max,
            rate: q.rate.map(|r| RateView {
                jobs: r.jobs,
                period_ms: r.period_ms,
            }),
            paused: q.paused,
            pending: q.pending,
            running: q.running,
            finished: q.finished,
            dead: q.dead,
        }
    }
}

/// Runs `exactly queue ...`.
pub async fn run(client: &Client, command: &QueueCommand, json: bool) -> anyhow::Result<()> {
    match command {
        QueueCommand::List => {
            let queues = client.list_queues().await?;
            if json {
                #[derive(serde::Serialize)]
                struct Queues {
                    queues: Vec<QueueView>,
                }
                emit_json(&Queues {
                    queues: queues.iter().map(QueueView::from).collect(),
                })
            } else {
                emit(&render_list(&queues))
            }
        }
        QueueCommand::Configure(args) => {
            let info = client.configure_queue(args.request()?).await?;
            if json {
                emit_json(&QueueView::from(&info))
            } else {
                emit(&render_one(&info))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No queue to show says when that happens.
    #[test]
    fn an_empty_list_says_why() {
        let text = render_list(&[]);
        assert!(text.contains("no job has been submitted"), "{text}");
    }

    /// Rates parse as JOBS/PERIOD, a bare unit meaning one of it; zero or garbage is refused.
    #[test]
    fn rates_parse() {
        let rate = |jobs, period_ms| RateLimitSpec { jobs, period_ms };
        assert_eq!(parse_rate("10/1s"), Ok(rate(10, 1_000)));
        assert_eq!(parse_rate("5/s"), Ok(rate(5, 1_000)));
        assert_eq!(parse_rate("100/1m"), Ok(rate(100, 60_000)));
        assert_eq!(parse_rate("3/250ms"), Ok(rate(3, 250)));
        assert_eq!(parse_rate("3/1m30s"), Ok(rate(3, 90_000)));
        assert!(parse_rate("0/1s").is_err());
        assert!(parse_rate("10").is_err());
        assert!(parse_rate("10/0s").is_err());
        assert!(parse_rate("x/1s").is_err());
        // What `queue list` prints is accepted back.
        assert_eq!(parse_rate(&rate_text(3, 90_000)), Ok(rate(3, 90_000)));
    }

    /// Configure needs a change; pause and resume map to the optional `paused`.
    #[test]
    fn configure_requests() {
        let args = |concurrency, pause, resume| ConfigureArgs {
            name: "mail".into(),
            concurrency,
            rate: None,
            clear_rate: false,
            pause,
            resume,
        };
        assert!(args(None, false, false).request().is_err());
        let r = args(Some(0), false, false).request().unwrap();
        assert_eq!((r.concurrency_max, r.paused), (Some(0), None));
        assert_eq!(
            args(None, true, false).request().unwrap().paused,
            Some(true)
        );
        assert_eq!(
            args(None, false, true).request().unwrap().paused,
            Some(false)
        );
    }

    /// The list shows limits, "unlimited" for none, and the counts.
    #[test]
    fn renders_queues() {
        let queues = [
            QueueInfo {
                name: "default".into(),
                pending: 3,
                running: 1,
                finished: 120,
                dead: 2,
                ..QueueInfo::default()
            },
            QueueInfo {
                name: "mail".into(),
                concurrency_max: 2,
                rate: Some(RateLimitSpec {
                    jobs: 10,
                    period_ms: 1_000,
                }),
                paused: true,
                pending: 0,
                running: 0,
                finished: 0,
                dead: 0,
            },
        ];
        assert_eq!(
            render_list(&queues),
            "QUEUE    STATE   CONCURRENCY  RATE       PENDING  RUNNING  FINISHED  DEAD\n\
             default  active  unlimited    unlimited  3        1        120       2\n\
             mail     paused  2            10/1s      0        0        0         0\n"
        );
    }
}
