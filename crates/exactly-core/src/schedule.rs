//! Recurring cron schedules as the state machine stores them.
//!
//! A schedule fires each tick at most once cluster-wide: the leader proposes
//! [`crate::Command::FireSchedules`] naming the tick it saw as next, and apply fires only if that
//! is still the schedule's next tick, then moves the next tick past the leader's clock. Two
//! leaders (or one leader retrying) proposing the same tick therefore create one job.

use serde::{Deserialize, Serialize};

use crate::command::NewJob;
use crate::cron::{CronSchedule, MissedTickPolicy};
use crate::JobId;

/// Whether a tick fires while the schedule's previous job is still pending or running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OverlapPolicy {
    /// Skip the tick (counted in `skipped`).
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

/// What one fire did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fired {
    /// A job was created for the tick.
    Job(JobId),
    /// The tick was skipped (overlap policy, or late under the Skip missed-tick policy).
    Skipped,
}

/// The idempotency key of the job a schedule fires for a tick: handlers and downstreams see one
/// key per (schedule, tick), whichever attempt runs it.
pub fn fire_key(name: &str, tick_ms: u64) -> String {
    format!("schedule/{name}/{tick_ms}")
}
