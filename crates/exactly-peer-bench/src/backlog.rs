//! `--backlog N`: a backlog, like `scripts/backlog.sh` makes on exactly. N messages are
//! published with no consumer pulling (requests of `--in-flight` publishes awaited together, a
//! tenth at a time), then the worker starts and drains them. After each tenth of the fill and of
//! the drain it prints that tenth's rate, each `--watch-pid`'s resident memory and each
//! `--watch-dir`'s size, so a rate that falls with depth or memory that grows with it shows.

use std::time::Duration;

use anyhow::bail;
use async_nats::jetstream::consumer::PullConsumer;
use tokio::time::Instant;

use crate::jetstream::{answer_of, connect, Worker, SUBJECT};
use crate::report::Answer;

/// What a backlog run is asked to do.
#[derive(Clone, Debug, PartialEq)]
pub struct Backlog {
    pub messages: u64,
    /// Publishes sent before their acks are awaited together.
    pub in_flight: u32,
    pub payload_bytes: u32,
    /// Give up the fill, and then the drain, this long after each starts.
    pub timeout: Duration,
    pub ack_timeout: Duration,
    /// Processes whose resident memory is printed after each tenth (the servers).
    pub watch: Vec<u32>,
    /// Directories whose size is printed after each tenth (the servers' stores).
    pub dirs: Vec<std::path::PathBuf>,
}

/// How often the drain counts the messages acked, in milliseconds.
const DRAIN_POLL_MS: u64 = 20;

/// Resident memory of each watched process, in MiB (`?` for one that cannot be read).
fn memory(pids: &[u32]) -> String {
    let rss = |pid: u32| -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024)
    };
    let each: Vec<String> = pids
        .iter()
        .map(|&pid| rss(pid).map_or("?".to_string(), |m| m.to_string()))
        .collect();
    if each.is_empty() {
        String::new()
    } else {
        format!("  RSS MiB: {}", each.join(" "))
    }
}

/// The size of each watched directory (its files, recursively), in MiB.
fn sizes(dirs: &[std::path::PathBuf]) -> String {
    fn size(path: &std::path::Path) -> u64 {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return 0;
        };
        if !meta.is_dir() {
            return meta.len();
        }
        std::fs::read_dir(path)
            .map(|entries| entries.flatten().map(|e| size(&e.path())).sum())
            .unwrap_or(0)
    }
    if dirs.is_empty() {
        return String::new();
    }
    let each: Vec<String> = dirs
        .iter()
        .map(|d| (size(d) / (1024 * 1024)).to_string())
        .collect();
    format!("; data MiB: {}", each.join(" "))
}

fn rate(count: u64, took: Duration) -> f64 {
    count as f64 / took.as_secs_f64().max(1e-9)
}

/// Fills the stream with `plan.messages` messages, then drains them through a worker on
/// `consumer`; prints a line per tenth of each and the overall rates, and fails if a publish
/// failed or the drain did not finish in time.
pub async fn run(
    servers: &[String],
    consumer: &PullConsumer,
    plan: &Backlog,
) -> anyhow::Result<()> {
    let js = connect(servers, 0, plan.ack_timeout, plan.in_flight as usize).await?;
    let payload = vec![0u8; plan.payload_bytes as usize];
    let tenth = plan.messages.div_ceil(10).max(1);
    println!(
        "fill: {} messages into the stream with no consumer pulling, {} publishes in flight",
        plan.messages, plan.in_flight
    );
    let fill_start = Instant::now();
    let deadline = fill_start + plan.timeout;
    let mut acknowledged = 0u64;
    let mut failed = 0u64;
    let mut first_error = None;
    let mut sent = 0u64;
    let mut tenth_start = fill_start;
    let mut tenth_sent = 0u64;
    while sent < plan.messages {
        if Instant::now() >= deadline {
            bail!("the fill did not end within {:?}", plan.timeout);
        }
        let size = (plan.messages - sent)
            .min(u64::from(plan.in_flight))
            .min(tenth - tenth_sent);
        let mut pending = Vec::with_capacity(size as usize);
        for _ in 0..size {
            let published = js.publish(SUBJECT, payload.clone().into()).await;
            pending.push(async move {
                match published {
                    Ok(ack) => ack.await,
                    Err(err) => Err(err),
                }
            });
        }
        for result in futures::future::join_all(pending).await {
            match answer_of(result) {
                (Answer::Acknowledged(_), _) => acknowledged += 1,
                (_, error) => {
                    failed += 1;
                    first_error = first_error.or(error);
                }
            }
        }
        sent += size;
        tenth_sent += size;
        if tenth_sent == tenth || sent == plan.messages {
            let now = Instant::now();
            println!(
                "filled {sent:>10}: {:>8.0} messages/s{}{}",
                rate(tenth_sent, now - tenth_start),
                memory(&plan.watch),
                sizes(&plan.dirs)
            );
            tenth_start = now;
            tenth_sent = 0;
        }
    }
    let filled = fill_start.elapsed();
    println!(
        "fill: {:.0} messages/s overall ({acknowledged} acknowledged, {failed} failed)",
        rate(acknowledged, filled)
    );
    if failed > 0 {
        bail!(
            "{failed} publishes failed; first: {}",
            first_error.unwrap_or_default()
        );
    }

    println!("drain: the worker starts");
    let worker = Worker::start(consumer).await?;
    let drain_start = Instant::now();
    let deadline = drain_start + plan.timeout;
    let mut last = (drain_start, 0u64);
    let mut next = tenth.min(acknowledged);
    loop {
        let done = worker.finished_count() as u64;
        let now = Instant::now();
        if done >= next {
            println!(
                "left {:>12}: {:>8.0} messages/s{}{}",
                acknowledged - done,
                rate(done - last.1, now - last.0),
                memory(&plan.watch),
                sizes(&plan.dirs)
            );
            last = (now, done);
            next = (done + tenth).min(acknowledged);
        }
        if done >= acknowledged {
            break;
        }
        if now >= deadline {
            bail!(
                "the drain did not end within {:?}: {done} of {acknowledged} acked",
                plan.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(DRAIN_POLL_MS)).await;
    }
    println!(
        "drain: {:.0} messages/s overall",
        rate(acknowledged, drain_start.elapsed())
    );
    let (errors, first) = worker.errors();
    if errors > 0 {
        println!(
            "worker errors: {errors}; first: {}",
            first.unwrap_or_default()
        );
    }
    Ok(())
}
