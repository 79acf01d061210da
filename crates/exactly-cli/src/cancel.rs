//! `exactly cancel ID...`: cancels jobs and says, per job, whether it was cancelled and from which
//! state. Exits non-zero if any job could not be cancelled.

use exactly_client::{code_name, CancelResult, CancelResultExt, Client, CANCEL_JOBS_MAX};

use crate::output::{emit, emit_json, state_name, Table};
use crate::RefusedError;

/// Flags of `exactly cancel`.
#[derive(clap::Args, Debug, PartialEq)]
pub struct CancelArgs {
    /// The jobs to cancel.
    #[arg(value_name = "ID", required = true, num_args = 1..)]
    pub job_ids: Vec<u64>,
}

/// One result for `--json`.
#[derive(Debug, serde::Serialize)]
pub struct CancelView {
    job_id: u64,
    cancelled: bool,
    /// The state the job was in when it was cancelled; empty if it was not.
    previous_state: String,
    /// The outcome as a gRPC code name: `OK`, `NOT_FOUND`, `FAILED_PRECONDITION`.
    code: &'static str,
    /// Why it was not cancelled; empty if it was.
    error: String,
}

impl From<&CancelResult> for CancelView {
    fn from(r: &CancelResult) -> Self {
        let cancelled = r.cancelled();
        CancelView {
            job_id: r.job_id,
            cancelled,
            previous_state: if cancelled {
                state_name(r.previous_state)
            } else {
                String::new()
            },
            code: code_name(r.status_code()),
            error: r.error.clone(),
        }
    }
}

/// The results as a table: one row per job.
pub fn render(results: &[CancelResult]) -> String {
    let mut table = Table::new(&["JOB", "RESULT"]);
    for r in results {
        let result = if r.cancelled() {
            format!("cancelled (was {})", state_name(r.previous_state))
        } else {
            format!("not cancelled: {}: {}", code_name(r.status_code()), r.error)
        };
        table.row(vec![r.job_id.to_string(), result]);
    }
    table.render()
}

/// Runs `exactly cancel`, in requests of at most 1000 ids.
pub async fn run(client: &Client, args: &CancelArgs, json: bool) -> anyhow::Result<()> {
    let mut results = Vec::with_capacity(args.job_ids.len());
    for ids in args.job_ids.chunks(CANCEL_JOBS_MAX) {
        match client.cancel(ids.to_vec()).await {
            Ok(batch) => results.extend(batch),
            Err(err) if results.is_empty() => return Err(err.into()),
            Err(err) => {
                print(&results, json)?;
                return Err(anyhow::Error::new(err).context(format!(
                    "the results of the first {} jobs are printed above; the rest failed",
                    results.len()
                )));
            }
        }
    }
    print(&results, json)?;
    let refused = results.iter().filter(|r| !r.cancelled()).count();
    if refused > 0 {
        return Err(RefusedError(format!(
            "{refused} of {} jobs were not cancelled",
            results.len()
        ))
        .into());
    }
    Ok(())
}

fn print(results: &[CancelResult], json: bool) -> anyhow::Result<()> {
    if json {
        #[derive(serde::Serialize)]
        struct Results {
            results: Vec<CancelView>,
        }
        emit_json(&Results {
            results: results.iter().map(CancelView::from).collect(),
        })
    } else {
        emit(&render(results))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_client::JobState;

    /// Cancelled jobs show their previous state; refused ones show the code and the server's
    /// reason; a result with an error but no code (an older server) shows UNKNOWN.
    #[test]
    fn renders_results() {
        let results = [
            CancelResult {
                job_id: 4,
                previous_state: JobState::Running as i32,
                error: String::new(),
                code: 0,
            },
            CancelResult {
                job_id: 9,
                previous_state: JobState::Unspecified as i32,
                error: "job is already succeeded".into(),
                code: exactly_client::Code::FailedPrecondition as i32,
            },
            CancelResult {
                job_id: 11,
                previous_state: JobState::Unspecified as i32,
                error: "job 11 has already finished".into(),
                code: 0,
            },
        ];
        assert_eq!(
            render(&results),
            "JOB  RESULT\n\
             4    cancelled (was running)\n\
             9    not cancelled: FAILED_PRECONDITION: job is already succeeded\n\
             11   not cancelled: UNKNOWN: job 11 has already finished\n"
        );
        let value = serde_json::to_value(CancelView::from(&results[1])).unwrap();
        assert_eq!(value["cancelled"], false);
        assert_eq!(value["previous_state"], "");
        assert_eq!(value["code"], "FAILED_PRECONDITION");
        let value = serde_json::to_value(CancelView::from(&results[0])).unwrap();
        assert_eq!(value["code"], "OK");
    }
}
