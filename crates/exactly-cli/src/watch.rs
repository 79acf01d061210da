//! `exactly watch`: one line per job event, of one job, one queue or every job, until Ctrl-C (or
//! `--count` events). The watch reconnects by itself and resumes where it stopped; the position
//! it stopped at is printed on exit so a later `--after` continues from there.

use exactly_client::{Client, EventPosition, JobEventMessage, WatchScope};

use crate::output::{emit, state_name, time_ms};

/// Flags of `exactly watch`.
#[derive(clap::Args, Debug, PartialEq)]
pub struct WatchArgs {
    /// Watch this job only.
    #[arg(long, value_name = "ID", conflicts_with = "queue")]
    pub job: Option<u64>,
    /// Watch the jobs of this queue only.
    #[arg(long)]
    pub queue: Option<String>,
    /// Resume after this position (INDEX:SEQ, as printed in the first column); default: from now.
    #[arg(long, value_name = "INDEX:SEQ", value_parser = parse_position)]
    pub after: Option<EventPosition>,
    /// Exit after this many events.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// With --job: keep watching after the job has finished (a redrive runs it again). Without
    /// it, the watch ends at the job's terminal state, at once if it has one already.
    #[arg(long, requires = "job")]
    pub follow: bool,
}

/// Whether a job in `state` (the wire enum) has finished: succeeded, dead or cancelled.
fn terminal(state: i32) -> bool {
    matches!(
        exactly_client::JobState::try_from(state),
        Ok(exactly_client::JobState::Succeeded
            | exactly_client::JobState::Dead
            | exactly_client::JobState::Cancelled)
    )
}

/// `INDEX:SEQ`, both decimal.
pub fn parse_position(text: &str) -> Result<EventPosition, String> {
    let (index, seq) = text
        .split_once(':')
        .ok_or_else(|| "expected INDEX:SEQ, for example 1042:0".to_string())?;
    Ok(EventPosition {
        index: index
            .parse()
            .map_err(|err| format!("index {index:?}: {err}"))?,
        seq: seq.parse().map_err(|err| format!("seq {seq:?}: {err}"))?,
    })
}

fn position_text(p: Option<EventPosition>) -> String {
    p.map_or("-".into(), |p| format!("{}:{}", p.index, p.seq))
}

/// Where a watch starts, for people: a position whose seq is `u32::MAX` means "after all of
/// that log entry" (a watch from now), so it reads as the entry, not as a huge number.
fn start_text(p: Option<EventPosition>) -> String {
    match p {
        Some(p) if p.seq == u32::MAX => format!("log entry {}", p.index),
        other => format!("position {}", position_text(other)),
    }
}

/// One event as one human-readable line.
pub fn line(e: &JobEventMessage) -> String {
    let mut text = format!(
        "{}  {}  job {}  queue {}  {}",
        position_text(e.position),
        time_ms(e.at_ms),
        e.job_id,
        e.queue,
        state_name(e.state)
    );
    if e.attempt > 0 {
        text.push_str(&format!("  attempt {}", e.attempt));
    }
    if e.node_id > 0 {
        text.push_str(&format!("  node {}  token {}", e.node_id, e.token));
    }
    text.push('\n');
    text
}

/// One event for `--json`: one object per line.
#[derive(Debug, serde::Serialize)]
pub struct EventView {
    /// `INDEX:SEQ`, the form `--after` takes.
    position: String,
    index: u64,
    seq: u32,
    job_id: u64,
    queue: String,
    state: String,
    attempt: u32,
    token: u64,
    node_id: u64,
    at_ms: u64,
}

impl From<&JobEventMessage> for EventView {
    fn from(e: &JobEventMessage) -> Self {
        let p = e.position.unwrap_or_default();
        EventView {
            position: position_text(e.position),
            index: p.index,
            seq: p.seq,
            job_id: e.job_id,
            queue: e.queue.clone(),
            state: state_name(e.state),
            attempt: e.attempt,
            token: e.token,
            node_id: e.node_id,
            at_ms: e.at_ms,
        }
    }
}

/// Runs `exactly watch` until Ctrl-C, `--count` events, or an error.
pub async fn run(client: &Client, args: &WatchArgs, json: bool) -> anyhow::Result<()> {
    let (scope, what) = match (&args.job, &args.queue) {
        (Some(id), _) => (WatchScope::Job(*id), format!("job {id}")),
        (None, Some(queue)) => (WatchScope::Queue(queue.clone()), format!("queue {queue}")),
        (None, None) => (WatchScope::All, "every job".to_string()),
    };
    let mut watch = client.watch(scope, args.after).await?;
    // One job, not followed: the watch ends at its terminal state. Read after the watch is open,
    // so a state reached in between is either seen here or arrives as an event.
    let until_done = args.job.filter(|_| !args.follow);
    if let Some(id) = until_done {
        let job = client.get(id).await?;
        if terminal(job.state) && args.after.is_none() {
            eprintln!(
                "job {id} is {} already (--after or --follow to watch anyway)",
                state_name(job.state)
            );
            return Ok(());
        }
    }
    eprintln!(
        "watching {what} after {} (Ctrl-C to stop)",
        start_text(watch.position())
    );
    let mut seen: u64 = 0;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let result = loop {
        if args.count.is_some_and(|n| seen >= n) {
            break Ok(());
        }
        let event = tokio::select! {
            _ = &mut interrupted => break Ok(()),
            event = watch.next() => event,
        };
        match event {
            Ok(event) => {
                seen += 1;
                let text = if json {
                    let mut text = serde_json::to_string(&EventView::from(&event))?;
                    text.push('\n');
                    text
                } else {
                    line(&event)
                };
                emit(&text)?;
                if until_done.is_some() && terminal(event.state) {
                    break Ok(());
                }
            }
            Err(err) => break Err(err),
        }
    };
    eprintln!(
        "stopped after {seen} events at position {} (resume with --after {})",
        position_text(watch.position()),
        position_text(watch.position())
    );
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_client::JobState;

    /// Positions parse from INDEX:SEQ and bad ones say what is expected.
    #[test]
    fn positions_parse() {
        assert_eq!(
            parse_position("1042:3"),
            Ok(EventPosition {
                index: 1042,
                seq: 3
            })
        );
        assert!(parse_position("1042").unwrap_err().contains("INDEX:SEQ"));
        assert!(parse_position("a:1").is_err());
        assert!(parse_position("1:-1").is_err());
        let at = |index, seq| Some(EventPosition { index, seq });
        assert_eq!(start_text(at(1780, u32::MAX)), "log entry 1780");
        assert_eq!(start_text(at(1042, 3)), "position 1042:3");
        assert_eq!(start_text(None), "position -");
    }

    /// A line carries the position first, then time, job, queue, state, attempt, node and token.
    #[test]
    fn event_line() {
        let event = JobEventMessage {
            position: Some(EventPosition { index: 12, seq: 1 }),
            job_id: 5,
            queue: "mail".into(),
            state: JobState::Running as i32,
            attempt: 2,
            token: 12,
            node_id: 3,
            at_ms: 1_700_000_000_000,
        };
        assert_eq!(
            line(&event),
            "12:1  2023-11-14T22:13:20.000Z  job 5  queue mail  running  attempt 2  node 3  token 12\n"
        );
        let pending = JobEventMessage {
            state: JobState::Pending as i32,
            attempt: 0,
            node_id: 0,
            ..event.clone()
        };
        assert!(line(&pending).ends_with("queue mail  pending\n"));
        let value = serde_json::to_value(EventView::from(&event)).unwrap();
        assert_eq!(value["position"], "12:1");
        assert_eq!(value["state"], "running");
    }
}
