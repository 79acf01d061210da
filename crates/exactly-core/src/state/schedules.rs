//! Adding, removing, pausing and firing cron schedules.

use super::JobTable;
use crate::command::{Effect, Rejection};
use crate::cron::CronSchedule;
use crate::limits::{
    CRON_LATE_GRACE_MS, FIRE_BATCH_MAX, SCHEDULES_MAX, SCHEDULE_NAME_BYTES_MAX,
    SCHEDULE_PAYLOAD_BYTES_MAX,
};
use crate::schedule::{fire_key, Fire, Fired, OverlapPolicy, Schedule, ScheduleSpec};

/// Checks a schedule spec and parses its expression: the API edge calls this too, so a bad
/// schedule is refused before anything is proposed.
pub fn validate_schedule(spec: &ScheduleSpec) -> Result<CronSchedule, String> {
    if spec.name.is_empty() || spec.name.len() > SCHEDULE_NAME_BYTES_MAX {
        return Err(format!(
            "schedule name must be 1..={SCHEDULE_NAME_BYTES_MAX} bytes, got {}",
            spec.name.len()
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

impl JobTable {
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

    /// Fires one tick, at most once: only if `tick_ms` is still the schedule's next tick.
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
        let plan = schedule
            .cron
            .plan_fire(fire.tick_ms, now, schedule.missed, CRON_LATE_GRACE_MS);
        let previous_live = schedule
            .last_job
            .and_then(|id| self.jobs.get(&id))
            .is_some_and(|job| !job.status.is_terminal());
        let overlap_blocks = schedule.overlap == OverlapPolicy::Skip && previous_live;
        let template = schedule.job.clone();
        let mut fired = Fired::Skipped;
        let mut job_id = None;
        if let Some(tick) = plan.fire.filter(|_| !overlap_blocks) {
            let mut job = template;
            job.idempotency_key = Some(fire_key(&fire.name, tick));
            job.run_at_ms = 0;
            match self.submit_one(job, Some(fire.name.clone()), effects) {
                Ok(submitted) => {
                    fired = Fired::Job(submitted.id);
                    job_id = Some((submitted.id, tick));
                }
                // The template was valid when added; a failure here (a queue limit, a key taken
                // by a client) skips the tick rather than blocking the schedule forever.
                Err(why) => {
                    let schedule = self.schedules.get_mut(&fire.name).expect("checked above");
                    schedule.skipped += 1 + plan.missed;
                    schedule.next_tick_ms = plan.next_tick_ms;
                    return Err(why);
                }
            }
        }
        let schedule = self.schedules.get_mut(&fire.name).expect("checked above");
        schedule.skipped += plan.missed;
        if let Some((id, tick)) = job_id {
            schedule.fired += 1;
            schedule.last_job = Some(id);
            schedule.last_fired_tick_ms = Some(tick);
        } else if plan.fire.is_some() {
            schedule.skipped += 1;
        }
        schedule.next_tick_ms = plan.next_tick_ms;
        Ok(fired)
    }
}
