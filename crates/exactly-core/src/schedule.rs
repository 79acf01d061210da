//! Recurring cron schedules as the state machine stores them.
//!
//! A schedule fires each tick at most once cluster-wide: the leader proposes
//! [`crate::Command::FireSchedules`] naming the tick it saw as next, and apply fires only if that
//! is still the schedule's next tick, then moves the next tick past what it fired. Two leaders
//! (or one leader retrying) proposing the same tick therefore create one job.

use serde::{Deserialize, Serialize};

use crate::command::{NewJob, Rejection};
use crate::cron::{CronSchedule, MissedTickPolicy};
use crate::JobId;

/// Whether a tick fires while the schedule's previous job is still pending or running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OverlapPolicy {
    /// Skip the tick (counted in `skipped`) if the previous job was created before the tick and
    /// still pends or runs; the schedule's jobs run one at a time (they share an ordering line).
    Skip,
    /// Fire anyway.
    Allow,
}

/// A schedule as a client adds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    pub name: String,
    /// The cron expression and time zone, as given (parsed in apply).
    pub cron: String,
    pub tz: String,
    /// The job each tick submits (no idempotency key, no run_at: each fire gets a key of its own).
    pub job: NewJob,
    pub overlap: OverlapPolicy,
    pub missed: MissedTickPolicy,
    /// Replace a schedule of the same name instead of refusing.
    pub replace: bool,
}

/// A stored schedule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub name: String,
    pub cron: CronSchedule,
    pub job: NewJob,
    pub overlap: OverlapPolicy,
    pub missed: MissedTickPolicy,
    pub paused: bool,
    /// The next tick to fire (Unix ms); `None` if the expression never fires again.
    pub next_tick_ms: Option<u64>,
    pub last_fired_tick_ms: Option<u64>,
    pub last_job: Option<JobId>,
    /// Jobs fired.
    pub fired: u64,
    /// Ticks not fired: skipped by the overlap policy or missed during an outage.
    pub skipped: u64,
    pub created_at_ms: u64,
}

/// The leader asks to fire `name`'s tick `tick_ms` (the next tick it read from the state).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fire {
    pub name: String,
    pub tick_ms: u64,
}

/// What one fire did: the jobs it created, one per fired tick in tick order, and the ticks it
/// passed without a job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fired {
    /// A job per fired tick, oldest tick first.
    pub jobs: Vec<JobId>,
    /// Ticks passed without a job: late under the Skip missed-tick policy, skipped by the
    /// overlap policy, or refused (see `refused`). Added to the schedule's `skipped`.
    pub skipped: u64,
    /// Why a tick's job could not be created, if one could not (the first such reason).
    pub refused: Option<Rejection>,
}

/// The idempotency key of the job a schedule fires for a tick: handlers and downstreams see one
/// key per (schedule, tick), whichever attempt runs it.
pub fn fire_key(name: &str, tick_ms: u64) -> String {
    format!("schedule/{name}/{tick_ms}")
}

/// The ordering key that the jobs of an [`OverlapPolicy::Skip`] schedule share when the template
/// names none, so that they run one at a time (a catch-up fires several at once).
pub fn schedule_line(name: &str) -> String {
    format!("schedule/{name}")
}
