//! `exactly cron add|list|remove|pause|resume`: recurring cron schedules, each tick fired once
//! cluster-wide. `add` takes the job flags of `submit` (without the ones a tick decides: delay,
//! run-at, idempotency key, count).

use std::collections::BTreeMap;

use exactly_client::{
    AddScheduleRequest, Client, JobSpec, MissedTickPolicy, OverlapPolicy, ScheduleInfo,
};

use crate::get::labels_text;
use crate::output::{bytes_text, emit, emit_json, key_values, or_dash, time_ms, Encoding, Table};
use crate::submit::JobArgs;

#[derive(clap::Subcommand, Debug, PartialEq)]
pub enum CronCommand {
    /// Add a schedule (or replace one with --replace).
    Add(Box<CronAddArgs>),
    /// Every schedule with its next tick and counts.
    List,
    /// Remove a schedule; jobs it already fired are not touched.
    Remove {
        /// The schedule's name.
        name: String,
    },
    /// Stop firing a schedule's ticks until it is resumed.
    Pause {
        /// The schedule's name.
        name: String,
    },
    /// Fire a paused schedule's ticks again.
    Resume {
        /// The schedule's name.
        name: String,
    },
}

/// What to do with a tick while the previous job of the schedule still runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverlapArg {
    /// Skip the tick; the schedule's jobs run one at a time.
    Skip,
    /// Fire it anyway.
    Allow,
}

/// What to do with ticks more than 60 s late (the cluster had no leader for longer); later ones
/// fire late, each its own job, either way.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissedArg {
    /// Skip them.
    Skip,
    /// Fire one job for all of them when the cluster is back.
    RunOnce,
}

/// Flags of `exactly cron add`.
#[derive(clap::Args, Debug, PartialEq)]
pub struct CronAddArgs {
    /// A unique name for the schedule.
    pub name: String,
    /// A cron expression: "MIN HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK" (quote it), a leading
    /// seconds field, or @hourly, @daily, @weekly, @monthly, @yearly.
    pub cron: String,
    /// IANA time zone the expression is read in (for example Europe/Berlin); default UTC.
    #[arg(long, value_name = "ZONE")]
    pub tz: Option<String>,
    /// A tick while the schedule's previous job still runs: skip it, or fire anyway.
    #[arg(long, value_enum, default_value_t = OverlapArg::Skip)]
    pub overlap: OverlapArg,
    /// Ticks more than 60 s late (no leader for longer): skip them, or fire one job for all.
    /// Ticks less late fire each, either way.
    #[arg(long, value_enum, default_value_t = MissedArg::Skip)]
    pub missed: MissedArg,
    /// Replace a schedule of the same name instead of failing.
    #[arg(long)]
    pub replace: bool,
    #[command(flatten)]
    pub job: JobArgs,
}

impl CronAddArgs {
    /// The request these flags describe, with the job's payload already read.
    pub fn request(&self, payload: Vec<u8>) -> AddScheduleRequest {
        AddScheduleRequest {
            name: self.name.clone(),
            cron: self.cron.clone(),
            time_zone: self.tz.clone().unwrap_or_default(),
            job: Some(self.job.spec(payload)),
            overlap: match self.overlap {
                OverlapArg::Skip => OverlapPolicy::Skip,
                OverlapArg::Allow => OverlapPolicy::Allow,
            } as i32,
            missed: match self.missed {
                MissedArg::Skip => MissedTickPolicy::Skip,
                MissedArg::RunOnce => MissedTickPolicy::RunOnce,
            } as i32,
            replace: self.replace,
        }
    }
}

fn overlap_name(raw: i32) -> String {
    match OverlapPolicy::try_from(raw) {
        Ok(OverlapPolicy::Skip | OverlapPolicy::Unspecified) => "skip".into(),
        Ok(OverlapPolicy::Allow) => "allow".into(),
        Err(_) => format!("unknown({raw})"),
    }
}

fn missed_name(raw: i32) -> String {
    match MissedTickPolicy::try_from(raw) {
        Ok(MissedTickPolicy::Skip | MissedTickPolicy::Unspecified) => "skip".into(),
        Ok(MissedTickPolicy::RunOnce) => "run-once".into(),
        Err(_) => format!("unknown({raw})"),
    }
}

fn zone(s: &ScheduleInfo) -> String {
    if s.time_zone.is_empty() {
        "UTC".into()
    } else {
        s.time_zone.clone()
    }
}

fn next_tick(s: &ScheduleInfo) -> String {
    if s.next_tick_ms == 0 {
        "never".into()
    } else {
        time_ms(s.next_tick_ms)
    }
}

/// The schedules as a table.
pub fn render_list(schedules: &[ScheduleInfo]) -> String {
    if schedules.is_empty() {
        return "no schedules\n".into();
    }
    let mut table = Table::new(&[
        "NAME",
        "CRON",
        "ZONE",
        "STATE",
        "NEXT TICK",
        "FIRED",
        "SKIPPED",
        "LAST JOB",
        "JOB",
    ]);
    for s in schedules {
        let job = s.job.clone().unwrap_or_default();
        table.row(vec![
            s.name.clone(),
            s.cron.clone(),
            zone(s),
            if s.paused { "paused" } else { "active" }.into(),
            next_tick(s),
            s.fired.to_string(),
            s.skipped.to_string(),
            if s.last_job_id == 0 {
                "-".into()
            } else {
                s.last_job_id.to_string()
            },
            format!("{} in {}", job.kind, or_dash(&job.queue)),
        ]);
    }
    table.render()
}

/// One schedule as key/value lines.
pub fn render_one(s: &ScheduleInfo) -> String {
    let job = s.job.clone().unwrap_or_default();
    let (encoding, payload) = bytes_text(&job.payload);
    let payload = match encoding {
        Encoding::Utf8 if payload.is_empty() => "-".into(),
        Encoding::Utf8 => payload,
        Encoding::Hex => format!("{payload} (hex)"),
    };
    key_values(&[
        ("schedule", s.name.clone()),
        ("cron", s.cron.clone()),
        ("zone", zone(s)),
        ("state", if s.paused { "paused" } else { "active" }.into()),
        ("overlap", overlap_name(s.overlap)),
        ("missed ticks", missed_name(s.missed)),
        ("next tick", next_tick(s)),
        ("last fired tick", time_ms(s.last_fired_tick_ms)),
        (
            "last job",
            if s.last_job_id == 0 {
                "-".into()
            } else {
                s.last_job_id.to_string()
            },
        ),
        ("fired", s.fired.to_string()),
        ("skipped", s.skipped.to_string()),
        ("job kind", job.kind.clone()),
        ("job queue", or_dash(&job.queue)),
        ("job payload", payload),
        ("job labels", labels_text(&job.labels)),
    ])
}

/// A schedule for `--json`; field names follow the proto, policies by name.
#[derive(Debug, serde::Serialize)]
pub struct ScheduleView {
    name: String,
    cron: String,
    time_zone: String,
    job: JobSpecView,
    overlap: String,
    missed: String,
    paused: bool,
    /// 0 if the expression never fires again.
    next_tick_ms: u64,
    last_fired_tick_ms: u64,
    last_job_id: u64,
    fired: u64,
    skipped: u64,
}

/// A schedule's job template for `--json`.
#[derive(Debug, serde::Serialize)]
pub struct JobSpecView {
    queue: String,
    kind: String,
    payload: String,
    payload_encoding: Encoding,
    priority: i32,
    max_attempts: u32,
    timeout_ms: u64,
    ordering_key: String,
    labels: BTreeMap<String, String>,
    backoff_base_ms: u64,
    backoff_max_ms: u64,
}

impl From<&JobSpec> for JobSpecView {
    fn from(j: &JobSpec) -> Self {
        let (payload_encoding, payload) = bytes_text(&j.payload);
        JobSpecView {
            queue: j.queue.clone(),
            kind: j.kind.clone(),
            payload,
            payload_encoding,
            priority: j.priority,
            max_attempts: j.max_attempts,
            timeout_ms: j.timeout_ms,
            ordering_key: j.ordering_key.clone(),
            labels: j.labels.clone().into_iter().collect(),
            backoff_base_ms: j.backoff_base_ms,
            backoff_max_ms: j.backoff_max_ms,
        }
    }
}

impl From<&ScheduleInfo> for ScheduleView {
    fn from(s: &ScheduleInfo) -> Self {
        ScheduleView {
            name: s.name.clone(),
            cron: s.cron.clone(),
            time_zone: s.time_zone.clone(),
            job: JobSpecView::from(&s.job.clone().unwrap_or_default()),
            overlap: overlap_name(s.overlap),
            missed: missed_name(s.missed),
            paused: s.paused,
            next_tick_ms: s.next_tick_ms,
            last_fired_tick_ms: s.last_fired_tick_ms,
            last_job_id: s.last_job_id,
            fired: s.fired,
            skipped: s.skipped,
        }
    }
}

fn print_one(s: &ScheduleInfo, json: bool) -> anyhow::Result<()> {
    if json {
        emit_json(&ScheduleView::from(s))
    } else {
        emit(&render_one(s))
    }
}

/// Runs `exactly cron ...`.
pub async fn run(client: &Client, command: &CronCommand, json: bool) -> anyhow::Result<()> {
    match command {
        CronCommand::Add(args) => {
            let request = args.request(args.job.read_payload()?);
            print_one(&client.add_schedule(request).await?, json)
        }
        CronCommand::List => {
            let schedules = client.list_schedules().await?;
            if json {
                #[derive(serde::Serialize)]
                struct Schedules {
                    schedules: Vec<ScheduleView>,
                }
                emit_json(&Schedules {
                    schedules: schedules.iter().map(ScheduleView::from).collect(),
                })
            } else {
                emit(&render_list(&schedules))
            }
        }
        CronCommand::Remove { name } => {
            client.remove_schedule(name).await?;
            if json {
                emit_json(&serde_json::json!({ "removed": name }))
            } else {
                emit(&format!("removed schedule {name}\n"))
            }
        }
        CronCommand::Pause { name } => {
            print_one(&client.set_schedule_paused(name, true).await?, json)
        }
        CronCommand::Resume { name } => {
            print_one(&client.set_schedule_paused(name, false).await?, json)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_client::OverlapPolicy;

    fn sample() -> ScheduleInfo {
        ScheduleInfo {
            name: "nightly".into(),
            cron: "0 3 * * *".into(),
            time_zone: "Europe/Berlin".into(),
            job: Some(JobSpec {
                kind: "noop".into(),
                queue: "reports".into(),
                payload: b"all".to_vec(),
                ..JobSpec::default()
            }),
            overlap: OverlapPolicy::Allow as i32,
            missed: MissedTickPolicy::RunOnce as i32,
            paused: false,
            next_tick_ms: 1_700_000_000_000,
            last_fired_tick_ms: 0,
            last_job_id: 0,
            fired: 0,
            skipped: 2,
        }
    }

    /// The table shows the zone, the state, the next tick and the job's kind and queue.
    #[test]
    fn renders_schedule_list() {
        let text = render_list(&[sample()]);
        assert_eq!(
            text,
            "NAME     CRON       ZONE           STATE   NEXT TICK                 FIRED  SKIPPED  LAST JOB  JOB\n\
             nightly  0 3 * * *  Europe/Berlin  active  2023-11-14T22:13:20.000Z  0      2        -         noop in reports\n"
        );
        assert_eq!(render_list(&[]), "no schedules\n");
    }

    /// One schedule shows its policies by name and its job template; JSON likewise.
    #[test]
    fn renders_one_schedule() {
        let text = render_one(&sample());
        assert!(text.contains("overlap          allow\n"), "{text}");
        assert!(text.contains("missed ticks     run-once\n"), "{text}");
        assert!(text.contains("job payload      all\n"), "{text}");
        let value = serde_json::to_value(ScheduleView::from(&sample())).unwrap();
        assert_eq!(value["missed"], "run-once");
        assert_eq!(value["job"]["queue"], "reports");
    }
}
