//! `exactly dlq list|redrive|purge`: dead letters (jobs out of attempts or failed permanently).
//! `list` is `exactly list --state dead`; `redrive` runs matching dead letters again; `purge`
//! deletes them. Redrive and purge act on every match, calling the server (at most 1000 jobs per
//! call) until no match is left; with no filter they need `--all`, so that an empty command line
//! never purges everything.

use exactly_client::{Client, DeadLetterFilter, JobState, DEAD_LETTERS_PER_CALL_MAX};

use crate::list::PageArgs;
use crate::output::{emit, emit_json};
use crate::UsageError;

/// Calls one `dlq redrive|purge` makes at most (each moves up to 1000 jobs): a bound on the
/// loop, far above any dead-letter count a cluster holds (limits.jobs-live-max is 1,000,000 by
/// default).
pub const DLQ_CALLS_MAX: usize = 10_000;

#[derive(clap::Subcommand, Debug, PartialEq)]
pub enum DlqCommand {
    /// List dead letters (the same as `list --state dead`).
    List(PageArgs),
    /// Run matching dead letters again: attempts reset, history kept.
    Redrive(DlqFilterArgs),
    /// Delete matching dead letters and their payloads.
    Purge(DlqFilterArgs),
}

/// Which dead letters `redrive` and `purge` act on.
#[derive(clap::Args, Debug, PartialEq)]
pub struct DlqFilterArgs {
    /// This dead letter; repeat for more.
    #[arg(long = "id", value_name = "ID", conflicts_with = "all")]
    pub ids: Vec<u64>,
    /// Dead letters of this queue.
    #[arg(long, conflicts_with = "all")]
    pub queue: Option<String>,
    /// Dead letters of this kind.
    #[arg(long, conflicts_with = "all")]
    pub kind: Option<String>,
    /// Every dead letter.
    #[arg(long)]
    pub all: bool,
}

/// Runs `exactly dlq ...`.
pub async fn run(client: &Client, command: &DlqCommand, json: bool) -> anyhow::Result<()> {
    match command {
        DlqCommand::List(page) => crate::list::run(client, Some(JobState::Dead), page, json).await,
        DlqCommand::Redrive(args) => act(client, Action::Redrive, args, json).await,
        DlqCommand::Purge(args) => act(client, Action::Purge, args, json).await,
    }
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Redrive,
    Purge,
}

impl Action {
    fn past(self) -> &'static str {
        match self {
            Action::Redrive => "redrove",
            Action::Purge => "purged",
        }
    }
}

/// The server filters `args` describes, one per call group: the named ids in groups of at most
/// 1000, or one queue/kind filter (repeated until it matches nothing).
fn filters(args: &DlqFilterArgs) -> Result<Vec<DeadLetterFilter>, UsageError> {
    let filtered = !args.ids.is_empty() || args.queue.is_some() || args.kind.is_some();
    if !filtered && !args.all {
        return Err(UsageError(
            "name dead letters with --id, filter them with --queue or --kind, or pass --all".into(),
        ));
    }
    let base = DeadLetterFilter {
        job_ids: Vec::new(),
        queue: args.queue.clone().unwrap_or_default(),
        kind: args.kind.clone().unwrap_or_default(),
        limit: 0,
        // The server refuses an empty filter unless it says `all` (and `all` with a filter).
        all: !filtered,
    };
    if args.ids.is_empty() {
        return Ok(vec![base]);
    }
    Ok(args
        .ids
        .chunks(DEAD_LETTERS_PER_CALL_MAX)
        .map(|ids| DeadLetterFilter {
            job_ids: ids.to_vec(),
            ..base.clone()
        })
        .collect())
}

async fn act(
    client: &Client,
    action: Action,
    args: &DlqFilterArgs,
    json: bool,
) -> anyhow::Result<()> {
    // A usage error is reported alone: nothing was asked of the server, so there is no summary.
    let filters = filters(args)?;
    let mut done: Vec<u64> = Vec::new();
    let mut calls = 0;
    let result: anyhow::Result<()> = async {
        for filter in filters {
            loop {
                calls += 1;
                anyhow::ensure!(
                    calls <= DLQ_CALLS_MAX,
                    "stopped after {DLQ_CALLS_MAX} calls; run the command again for the rest"
                );
                let call = match action {
                    Action::Redrive => client.redrive(filter.clone()).await,
                    Action::Purge => client.purge(filter.clone()).await,
                };
                let ids = call?;
                let full = ids.len() >= DEAD_LETTERS_PER_CALL_MAX;
                done.extend(ids);
                // Named ids are all handled by one call; a filter may match more than one call
                // moves, so it is repeated until a call comes back short.
                if !filter.job_ids.is_empty() || !full {
                    break;
                }
            }
        }
        Ok(())
    }
    .await;
    if json {
        #[derive(serde::Serialize)]
        struct Done<'a> {
            job_ids: &'a [u64],
        }
        emit_json(&Done { job_ids: &done })?;
    } else if done.is_empty() {
        emit("no dead letters matched\n")?;
    } else {
        let ids: Vec<String> = done.iter().map(u64::to_string).collect();
        emit(&format!(
            "{} {} dead letters: {}\n",
            action.past(),
            done.len(),
            ids.join(" ")
        ))?;
    }
    match result {
        Err(err) if !done.is_empty() => Err(err.context(format!(
            "{} {} dead letters (listed above) before this error",
            action.past(),
            done.len()
        ))),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(ids: Vec<u64>, queue: Option<&str>, all: bool) -> DlqFilterArgs {
        DlqFilterArgs {
            ids,
            queue: queue.map(str::to_string),
            kind: None,
            all,
        }
    }

    /// No filter and no --all is a usage error; --all is one unfiltered call group that says
    /// `all` (the server refuses an empty filter without it).
    #[test]
    fn an_empty_filter_needs_all() {
        assert!(filters(&args(vec![], None, false)).is_err());
        let all = filters(&args(vec![], None, true)).unwrap();
        assert_eq!(
            all,
            vec![DeadLetterFilter {
                all: true,
                ..DeadLetterFilter::default()
            }]
        );
        let mail = filters(&args(vec![], Some("mail"), false)).unwrap();
        assert!(!mail[0].all, "a filter is sent without all");
    }

    /// Named ids are split into groups of at most 1000 and keep the other filters.
    #[test]
    fn ids_are_grouped() {
        let ids: Vec<u64> = (1..=2500).collect();
        let groups = filters(&args(ids, Some("mail"), false)).unwrap();
        assert_eq!(
            groups.iter().map(|g| g.job_ids.len()).collect::<Vec<_>>(),
            [1000, 1000, 500]
        );
        assert!(groups.iter().all(|g| g.queue == "mail"));
    }
}
