//! Cron schedules in the state machine: each tick fires at most once, the overlap and missed-tick
//! policies, pause/resume, replace and remove, and the refusals.

mod common;

use common::{new_job, Harness};
use exactly_core::cron::MissedTickPolicy;
use exactly_core::schedule::{fire_key, Fire, Fired, OverlapPolicy, ScheduleSpec};
use exactly_core::{Command, JobStatus, Rejection, Response};

/// 2026-01-01T00:00:00Z.
const T0: u64 = 1_767_225_600_000;
const MINUTE: u64 = 60_000;

fn spec(name: &str, cron: &str) -> ScheduleSpec {
    ScheduleSpec {
        name: name.into(),
        cron: cron.into(),
        tz: "UTC".into(),
        job: new_job("reports", "noop", b"tick"),
        overlap: OverlapPolicy::Allow,
        missed: MissedTickPolicy::Skip,
        replace: false,
    }
}

fn add(h: &mut Harness, now: u64, s: ScheduleSpec) -> Result<(), Rejection> {
    match h.apply(now, Command::AddSchedule(s)).0 {
        Response::ScheduleChanged(r) => r,
        other => panic!("unexpected {other:?}"),
    }
}

fn fire(h: &mut Harness, now: u64, name: &str, tick_ms: u64) -> Result<Fired, Rejection> {
    let fires = vec![Fire {
        name: name.into(),
        tick_ms,
    }];
    match h.apply(now, Command::FireSchedules(fires)).0 {
        Response::Fired(mut r) => r.remove(0),
        other => panic!("unexpected {other:?}"),
    }
}

/// A tick fires one job with the per-tick idempotency key; firing the same tick again (a second
/// leader, a retry) is refused as stale and creates nothing.
#[test]
fn a_tick_fires_exactly_once() {
    let mut h = Harness::new();
    add(&mut h, T0 + 1, spec("every-minute", "* * * * *")).expect("added");
    let next = h.table.schedule("every-minute").unwrap().next_tick_ms;
    assert_eq!(next, Some(T0 + MINUTE));

    let fired = fire(&mut h, T0 + MINUTE + 5, "every-minute", T0 + MINUTE).expect("fires");
    let Fired::Job(id) = fired else {
        panic!("expected a job, got {fired:?}")
    };
    let job = h.job(id);
    assert_eq!(job.schedule.as_deref(), Some("every-minute"));
    assert_eq!(
        job.idempotency_key.as_deref(),
        Some(fire_key("every-minute", T0 + MINUTE).as_str())
    );
    assert_eq!(job.queue, "reports");

    let again = fire(&mut h, T0 + MINUTE + 9, "every-minute", T0 + MINUTE);
    assert_eq!(
        again,
        Err(Rejection::StaleTick {
            name: "every-minute".into(),
            got: T0 + MINUTE,
            next: Some(T0 + 2 * MINUTE),
        })
    );
    assert_eq!(h.table.jobs().count(), 1);
    let s = h.table.schedule("every-minute").unwrap();
    assert_eq!((s.fired, s.skipped, s.last_job), (1, 0, Some(id)));
}

/// A tick proposed before its time is refused (the leader's clock ran ahead of the log's).
#[test]
fn a_tick_before_its_time_is_refused() {
    let mut h = Harness::new();
    add(&mut h, T0, spec("s", "* * * * *")).unwrap();
    assert!(matches!(
        fire(&mut h, T0 + MINUTE - 1, "s", T0 + MINUTE),
        Err(Rejection::StaleTick { .. })
    ));
    assert_eq!(h.table.jobs().count(), 0);
}

/// Overlap skip: while the previous job is live, a tick is skipped and counted; once it
/// finished, the next tick fires.
#[test]
fn overlap_skip_waits_for_the_previous_job() {
    let mut h = Harness::new();
    let mut s = spec("s", "* * * * *");
    s.overlap = OverlapPolicy::Skip;
    add(&mut h, T0, s).unwrap();
    let Ok(Fired::Job(first)) = fire(&mut h, T0 + MINUTE, "s", T0 + MINUTE) else {
        panic!("first tick fires")
    };
    assert_eq!(
        fire(&mut h, T0 + 2 * MINUTE, "s", T0 + 2 * MINUTE),
        Ok(Fired::Skipped)
    );
    assert_eq!(h.table.schedule("s").unwrap().skipped, 1);
    h.apply(T0 + 2 * MINUTE, Command::Cancel(vec![first]));
    assert!(matches!(
        fire(&mut h, T0 + 3 * MINUTE, "s", T0 + 3 * MINUTE),
        Ok(Fired::Job(_))
    ));
}

/// After an outage of five hourly ticks (the newest half an hour late, past the grace): Skip fires
/// nothing and counts them; RunOnce fires one job for all of them. Either way the next tick is
/// the first after now.
#[test]
fn missed_ticks_follow_the_policy() {
    const HOUR: u64 = 60 * MINUTE;
    for (policy, expect_job) in [
        (MissedTickPolicy::Skip, false),
        (MissedTickPolicy::RunOnce, true),
    ] {
        let mut h = Harness::new();
        let mut s = spec("s", "0 * * * *");
        s.missed = policy;
        add(&mut h, T0, s).unwrap();
        let now = T0 + 5 * HOUR + 30 * MINUTE;
        let fired = fire(&mut h, now, "s", T0 + HOUR).expect("applies");
        assert_eq!(matches!(fired, Fired::Job(_)), expect_job, "{policy:?}");
        let s = h.table.schedule("s").unwrap();
        assert_eq!(s.next_tick_ms, Some(T0 + 6 * HOUR), "{policy:?}");
        assert_eq!(
            s.fired + s.skipped,
            5,
            "{policy:?}: every due tick accounted for"
        );
        assert_eq!(h.table.jobs().count(), usize::from(expect_job));
    }
}

/// A tick delayed by a leader failover (within the late grace) still fires under Skip.
#[test]
fn a_tick_delayed_by_a_failover_still_fires() {
    let mut h = Harness::new();
    add(&mut h, T0, spec("s", "* * * * *")).unwrap();
    let fired = fire(&mut h, T0 + MINUTE + 8_000, "s", T0 + MINUTE);
    assert!(matches!(fired, Ok(Fired::Job(_))));
}

/// Paused schedules fire nothing; resuming skips the ticks that passed while paused.
#[test]
fn pause_and_resume() {
    let mut h = Harness::new();
    add(&mut h, T0, spec("s", "* * * * *")).unwrap();
    let r = h.apply(
        T0,
        Command::PauseSchedule {
            name: "s".into(),
            paused: true,
        },
    );
    assert_eq!(r.0, Response::ScheduleChanged(Ok(())));
    assert_eq!(
        fire(&mut h, T0 + MINUTE, "s", T0 + MINUTE),
        Err(Rejection::SchedulePaused("s".into()))
    );
    h.apply(
        T0 + 30 * MINUTE + 1,
        Command::PauseSchedule {
            name: "s".into(),
            paused: false,
        },
    );
    assert_eq!(
        h.table.schedule("s").unwrap().next_tick_ms,
        Some(T0 + 31 * MINUTE)
    );
    assert_eq!(h.table.jobs().count(), 0);
}

/// Adding an existing name is refused unless replacing; remove deletes; bad specs are refused
/// with the reason; and none of the refusals changes anything.
#[test]
fn add_replace_remove_and_refusals() {
    let mut h = Harness::new();
    add(&mut h, T0, spec("s", "0 * * * *")).unwrap();
    assert_eq!(
        add(&mut h, T0, spec("s", "* * * * *")),
        Err(Rejection::ScheduleExists("s".into()))
    );
    let mut replace = spec("s", "*/5 * * * *");
    replace.replace = true;
    add(&mut h, T0, replace).unwrap();
    assert_eq!(h.table.schedule("s").unwrap().cron.expr(), "*/5 * * * *");

    let before = h.table.clone();
    let mut keyed = spec("k", "* * * * *");
    keyed.job.idempotency_key = Some("x".into());
    for (bad, why) in [
        (spec("", "* * * * *"), "schedule name"),
        (spec("b", "61 * * * *"), "minute"),
        (spec("b", "0 0 31 2 *"), "never fire"),
        (keyed, "idempotency key"),
    ] {
        match add(&mut h, T0, bad) {
            Err(Rejection::Invalid(reason)) => assert!(reason.contains(why), "{reason}"),
            other => panic!("expected invalid ({why}), got {other:?}"),
        }
    }
    let mut tz = spec("b", "* * * * *");
    tz.tz = "Mars/Olympus".into();
    assert!(matches!(add(&mut h, T0, tz), Err(Rejection::Invalid(_))));
    assert_eq!(h.table, before, "refusals change nothing");

    let r = h.apply(T0, Command::RemoveSchedule("s".into())).0;
    assert_eq!(r, Response::ScheduleChanged(Ok(())));
    assert!(h.table.schedules().is_empty());
    let r = h.apply(T0, Command::RemoveSchedule("s".into())).0;
    assert_eq!(
        r,
        Response::ScheduleChanged(Err(Rejection::UnknownSchedule("s".into())))
    );
    assert_eq!(
        fire(&mut h, T0 + MINUTE, "s", T0 + MINUTE),
        Err(Rejection::UnknownSchedule("s".into()))
    );
}

/// A fired job runs like any other: it is pending in its queue with its template's options.
#[test]
fn fired_jobs_are_ordinary_jobs() {
    let mut h = Harness::new();
    add(&mut h, T0, spec("s", "* * * * *")).unwrap();
    let Ok(Fired::Job(id)) = fire(&mut h, T0 + MINUTE, "s", T0 + MINUTE) else {
        panic!("fires")
    };
    assert_eq!(h.job(id).status, JobStatus::Pending);
    assert_eq!(h.table.ready_jobs().collect::<Vec<_>>(), vec![id]);
}
