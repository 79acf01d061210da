//! `exactly list` and `exactly dlq list`: jobs in id order, filtered, a page at a time or (with
//! `--all`) every page. Pages are printed as they arrive, so `--all` needs no memory per job.

use exactly_client::{Client, Job, JobState, ListRequest, LIST_LIMIT_MAX};

use crate::get::JobView;
use crate::output::{clip, emit, state_name, time_ms, PagedTable};

/// Characters of a job's last error shown in the table (`get` shows all of it).
const ERROR_COLUMN_CHARS_MAX: usize = 60;

/// A job state as a `--state` value.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateArg {
    Pending,
    Running,
    Succeeded,
    Dead,
    Cancelled,
}

impl From<StateArg> for JobState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Pending => JobState::Pending,
            StateArg::Running => JobState::Running,
            StateArg::Succeeded => JobState::Succeeded,
            StateArg::Dead => JobState::Dead,
            StateArg::Cancelled => JobState::Cancelled,
        }
    }
}

/// Filters and paging shared by `list` and `dlq list`.
#[derive(clap::Args, Debug, PartialEq)]
pub struct PageArgs {
    /// Only jobs of this queue.
    #[arg(long)]
    pub queue: Option<String>,
    /// Only jobs of this kind.
    #[arg(long)]
    pub kind: Option<String>,
    /// Jobs per page (at most 1000).
    #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=i64::from(LIST_LIMIT_MAX)))]
    pub limit: u32,
    /// Start after this job id (the `--after` a previous page printed).
    #[arg(long, value_name = "ID")]
    pub after: Option<u64>,
    /// Page through every matching job instead of printing one page.
    #[arg(long)]
    pub all: bool,
}

/// Flags of `exactly list`.
#[derive(clap::Args, Debug, PartialEq)]
pub struct ListArgs {
    /// Only jobs in this state.
    #[arg(long, value_enum)]
    pub state: Option<StateArg>,
    #[command(flatten)]
    pub page: PageArgs,
}

/// The table row of one job.
fn row(job: &Job) -> Vec<String> {
    let attempts = if job.max_attempts == 0 {
        job.attempts.len().to_string()
    } else {
        format!("{}/{}", job.failures, job.max_attempts)
    };
    vec![
        job.id.to_string(),
        state_name(job.state),
        job.queue.clone(),
        job.kind.clone(),
        attempts,
        time_ms(job.updated_at_ms),
        clip(&job.last_error, ERROR_COLUMN_CHARS_MAX),
    ]
}

const HEADERS: [&str; 7] = [
    "ID",
    "STATE",
    "QUEUE",
    "KIND",
    "FAILURES",
    "UPDATED",
    "LAST ERROR",
];

/// Runs `exactly list` (and, with `state` dead, `exactly dlq list`).
///
/// Human output is a table; when more jobs follow and `--all` was not given, a hint with the
/// next `--after` goes to standard error. `--json` prints `{"jobs": [...], "next_after_id": N}`
/// (`next_after_id` 0 when nothing follows), one job per line so that `--all` streams.
pub async fn run(
    client: &Client,
    state: Option<JobState>,
    args: &PageArgs,
    json: bool,
) -> anyhow::Result<()> {
    let mut request = ListRequest {
        queue: args.queue.clone().unwrap_or_default(),
        state: state.map_or(JobState::Unspecified as i32, |s| s as i32),
        kind: args.kind.clone().unwrap_or_default(),
        after_id: args.after.unwrap_or(0),
        limit: args.limit,
    };
    let mut table = PagedTable::new(&HEADERS);
    let mut printed: u64 = 0;
    if json {
        emit("{\"jobs\": [\n")?;
    }
    let next = loop {
        let page = client.list(request.clone()).await?;
        if json {
            let mut text = String::new();
            for job in &page.jobs {
                if printed > 0 {
                    text.push_str(",\n");
                }
                text.push_str("  ");
                text.push_str(&serde_json::to_string(&JobView::from(job))?);
                printed += 1;
            }
            emit(&text)?;
        } else {
            let rows: Vec<Vec<String>> = page.jobs.iter().map(row).collect();
            printed += rows.len() as u64;
            emit(&table.page(&rows))?;
        }
        if page.next_after_id == 0 || !args.all {
            break page.next_after_id;
        }
        // The server's contract is that pages move forward; a page that does not would loop
        // forever.
        anyhow::ensure!(
            page.next_after_id > request.after_id,
            "the server's next page starts at {} after a page that started at {}",
            page.next_after_id,
            request.after_id
        );
        request.after_id = page.next_after_id;
    };
    if json {
        emit(&format!("\n], \"next_after_id\": {next}}}\n"))?;
    } else {
        if printed == 0 {
            emit("no jobs matched\n")?;
        }
        if next != 0 {
            eprintln!("more jobs follow: add --after {next} (or --all)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row shows failures against max attempts and a clipped last error.
    #[test]
    fn row_shows_failures_and_clipped_error() {
        let job = Job {
            id: 7,
            state: JobState::Dead as i32,
            queue: "mail".into(),
            kind: "fail".into(),
            failures: 3,
            max_attempts: 3,
            updated_at_ms: 1_700_000_000_000,
            last_error: "x".repeat(100),
            ..Job::default()
        };
        let cells = row(&job);
        assert_eq!(cells[..5], ["7", "dead", "mail", "fail", "3/3"]);
        assert_eq!(cells[5], "2023-11-14T22:13:20.000Z");
        assert_eq!(cells[6].chars().count(), ERROR_COLUMN_CHARS_MAX);
        assert!(cells[6].ends_with('…'));
    }
}
