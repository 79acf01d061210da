//! Adding, removing, pausing and firing cron schedules.
//!
//! **Catch-up and overlap.** Ticks that came due while no leader could fire them (a failover)
//! fire late, each its own job, oldest first, as long as they are within
//! [`CRON_LATE_GRACE_MS`]; older ones follow the missed-tick policy. Under
//! [`OverlapPolicy::Skip`] a tick is skipped only if the schedule's previous job was created
//! before the tick and still pends or runs ([`JobTable::overlaps`]): a job fired late in the same
//! catch-up does not make the next tick an overlap. So that `Skip` still means "never two runs
//! at once", its jobs share the ordering line `schedule/<name>` in their queue (unless the
//! template names an ordering key of its own, which serializes them already): a catch-up's jobs
//! run one after the other, in tick order.

use super::JobTable;
use crate::command::{Effect, Rejection};
use crate::cron::CronSchedule;
use crate::limits::{
    CRON_CATCH_UP_FIRES_MAX, CRON_LATE_GRACE_MS, FIRE_BATCH_MAX, SCHEDULES_MAX,
    SCHEDULE_NAME_BYTES_MAX, SCHEDULE_PAYLOAD_BYTES_MAX,
};
use crate::records::Records;
use crate::schedule::{
    fire_key, schedule_line, Fire, Fired, OverlapPolicy, Schedule, ScheduleSpec,
};
use crate::JobId;

/// Checks a schedule spec and parses its expression: the API edge calls this too, so a bad
/// schedule is refused before anything is proposed.
pub fn validate_schedule(spec: &ScheduleSpec) -> Result<CronSchedule, String> {
    if spec.name.is_empty() || spec.name.len() > SCHEDULE_NAME_BYTES_MAX {
        return Err(format!(
            "schedule name must be 1..={SCHEDULE_NAME_BYTES_MAX} bytes, got {}",
            spec.name.len()
        ));
    }
    // The name is part of each fired job's idempotency key, `schedule/<name>/<tick ms>`.
    if let Some((at, byte)) = spec
        .name
        .bytes()
        .enumerate()
        .find(|&(_, b)| !(0x20..=0x7e).contains(&b))
    {
        return Err(format!(
            "schedule name must be printable ASCII (0x20-0x7E), as it is part of its jobs' \
             idempotency keys; byte {at} is {byte:#04x}"
        ));
    }
    let cron = CronSchedule::parse(&spec.cron, &spec.tz).map_err(|e| e.to_string())?;
    if !cron.days_exist() {
        return Err(format!(
            "cron expression {:?} matches no calendar day, so it would never fire",
            spec.cron
        ));
    }
    super::validate_new_job(&spec.job)?;
    if spec.job.payload.len() > SCHEDULE_PAYLOAD_BYTES_MAX {
        return Err(format!(
            "a schedule's payload of {} bytes exceeds the limit of {SCHEDULE_PAYLOAD_BYTES_MAX}",
            spec.job.payload.len()
        ));
    }
    if spec.job.idempotency_key.is_some() {
        return Err("a schedule's job takes no idempotency key: each tick gets its own".into());
    }
    if spec.job.run_at_ms != 0 {
        return Err("a schedule's job takes no run_at: the tick is its time".into());
    }
    Ok(cron)
}

impl<R: Records> JobTable<R> {
    pub(super) fn add_schedule(&mut self, spec: ScheduleSpec) -> Result<(), Rejection> {
        let cron = validate_schedule(&spec).map_err(Rejection::Invalid)?;
        let exists = self.schedules.contains_key(&spec.name);
        if exists && !spec.replace {
            return Err(Rejection::ScheduleExists(spec.name));
        }
        if !exists && self.schedules.len() >= SCHEDULES_MAX {
            return Err(Rejection::TooManySchedules(SCHEDULES_MAX));
        }
        let previous = self.schedules.get(&spec.name);
        let schedule = Schedule {
            name: spec.name.clone(),
            next_tick_ms: cron.next_after(self.now_ms),
            cron,
            job: spec.job,
            overlap: spec.overlap,
            missed: spec.missed,
            paused: false,
            // A replaced schedule keeps its history: its last job still counts for overlap.
            last_fired_tick_ms: previous.and_then(|p| p.last_fired_tick_ms),
            last_job: previous.and_then(|p| p.last_job),
            fired: previous.map_or(0, |p| p.fired),
            skipped: previous.map_or(0, |p| p.skipped),
            created_at_ms: self.now_ms,
        };
        self.schedules.insert(spec.name, schedule);
        Ok(())
    }

    pub(super) fn remove_schedule(&mut self, name: &str) -> Result<(), Rejection> {
        self.schedules
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| Rejection::UnknownSchedule(name.to_string()))
    }

    pub(super) fn pause_schedule(&mut self, name: &str, paused: bool) -> Result<(), Rejection> {
        let now = self.now_ms;
        let schedule = self
            .schedules
            .get_mut(name)
            .ok_or_else(|| Rejection::UnknownSchedule(name.to_string()))?;
        if schedule.paused && !paused {
            // Ticks that passed while paused were not missed by an outage: they were not wanted.
            schedule.next_tick_ms = schedule.cron.next_after(now);
        }
        schedule.paused = paused;
        Ok(())
    }

    pub(super) fn fire_schedules(
        &mut self,
        fires: Vec<Fire>,
        effects: &mut Vec<Effect>,
    ) -> Vec<Result<Fired, Rejection>> {
        if fires.len() > FIRE_BATCH_MAX {
            let err = Rejection::BatchTooLarge {
                got: fires.len(),
                max: FIRE_BATCH_MAX,
            };
            return fires.iter().map(|_| Err(err.clone())).collect();
        }
        fires
            .into_iter()
            .map(|fire| self.fire_one(fire, effects))
            .collect()
    }

    /// Fires the due ticks of one schedule, each at most once: only if `tick_ms` is still the
    /// schedule's next tick. What fires is [`CronSchedule::plan_fire`]'s plan (every due tick
    /// within [`CRON_LATE_GRACE_MS`], and late ones by the missed-tick policy, at most
    /// [`CRON_CATCH_UP_FIRES_MAX`]), each tick its own job keyed `schedule/<name>/<tick ms>`, in
    /// tick order, less the ticks the overlap policy skips ([`JobTable::overlaps`]).
    fn fire_one(&mut self, fire: Fire, effects: &mut Vec<Effect>) -> Result<Fired, Rejection> {
        let now = self.now_ms;
        let schedule = self
            .schedules
            .get(&fire.name)
            .ok_or_else(|| Rejection::UnknownSchedule(fire.name.clone()))?;
        if schedule.paused {
            return Err(Rejection::SchedulePaused(fire.name));
        }
        if schedule.next_tick_ms != Some(fire.tick_ms) || now < fire.tick_ms {
            return Err(Rejection::StaleTick {
                name: fire.name,
                got: fire.tick_ms,
                next: schedule.next_tick_ms,
            });
        }
        let plan = schedule.cron.plan_fire(
            fire.tick_ms,
            now,
            schedule.missed,
            CRON_LATE_GRACE_MS,
            CRON_CATCH_UP_FIRES_MAX,
        );
        let name = fire.name;
        let mut fired = Fired {
            jobs: Vec::with_capacity(plan.fire.len()),
            skipped: plan.missed,
            refused: None,
        };
        for tick in plan.fire {
            let schedule = &self.schedules[&name];
            if schedule.overlap == OverlapPolicy::Skip && self.overlaps(schedule.last_job, tick) {
                fired.skipped += 1;
                continue;
            }
            let mut job = schedule.job.clone();
            job.idempotency_key = Some(fire_key(&name, tick));
            job.run_at_ms = 0;
            if schedule.overlap == OverlapPolicy::Skip && job.ordering_key.is_none() {
                job.ordering_key = Some(schedule_line(&name));
            }
            match self.submit_one(job, Some(name.clone()), effects) {
                Ok(submitted) => {
                    let schedule = self.schedules.get_mut(&name).expect("checked above");
                    schedule.fired += 1;
                    schedule.last_job = Some(submitted.id);
                    schedule.last_fired_tick_ms = Some(tick);
                    fired.jobs.push(submitted.id);
                }
                // The template was valid when added; a failure here (a queue limit, a key taken
                // by a client) skips the tick rather than blocking the schedule forever.
                Err(why) => {
                    fired.skipped += 1;
                    fired.refused.get_or_insert(why);
                }
            }
        }
        let schedule = self.schedules.get_mut(&name).expect("checked above");
        schedule.skipped += fired.skipped;
        schedule.next_tick_ms = plan.next_tick_ms;
        Ok(fired)
    }

    /// Whether a tick at `tick_ms` overlaps the schedule's previous job (`last`) in the sense of
    /// [`OverlapPolicy::Skip`]: that job still pends or runs *and it existed when the tick came
    /// due* (created before `tick_ms`). A job created at or after the tick's time did not exist
    /// then: it was fired late for an earlier tick in the same catch-up (a leader failover
    /// delayed both), so the tick is not skipped for it. Overlap is judged as of the tick's own
    /// time, as if every tick had fired on time.
    fn overlaps(&self, last: Option<JobId>, tick_ms: u64) -> bool {
        last.and_then(|id| self.job(id))
            .is_some_and(|job| !job.status.is_terminal() && job.created_at_ms < tick_ms)
    }
}
