//! Cron schedules in the state machine: each tick fires at most once, the overlap and missed-tick
//! policies, pause/resume, replace and remove, and the refusals.

mod common;

use common::{new_job, spec, Harness};
use exactly_core::cron::MissedTickPolicy;
use exactly_core::limits::CRON_CATCH_UP_FIRES_MAX;
use exactly_core::schedule::{fire_key, Fire, Fired, OverlapPolicy, ScheduleSpec};
use exactly_core::{Command, JobId, JobStatus, Rejection, Response};

/// 2026-01-01T00:00:00Z.
const T0: u64 = 1_767_225_600_000;
const MINUTE: u64 = 60_000;

fn add(h: &mut Harness, now: u64, s: ScheduleSpec) -> Result<(), Rejection> {
    match h.apply(now, Command::AddSchedule(s)).0 {
        Response::ScheduleChanged(r) => r,
        other => panic!("unexpected {other:?}"),
    }
}

/// The one job a fire created (it must have created exactly one).
fn one_job(fired: Result<Fired, Rejection>) -> JobId {
    match fired {
        Ok(Fired {
            ref jobs,
            skipped: 0,
            refused: None,
        }) if jobs.len() == 1 => jobs[0],
        other => panic!("expected one job, got {other:?}"),
    }
}

/// A fire that created no job and passed `n` ticks.
fn skipped(n: u64) -> Fired {
    Fired {
        jobs: vec![],
        skipped: n,
        refused: None,
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
    let [id] = fired.jobs[..] else {
        panic!("expected one job, got {fired:?}")
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
    let first = one_job(fire(&mut h, T0 + MINUTE, "s", T0 + MINUTE));
    assert_eq!(
        fire(&mut h, T0 + 2 * MINUTE, "s", T0 + 2 * MINUTE),
        Ok(skipped(1))
    );
    assert_eq!(h.table.schedule("s").unwrap().skipped, 1);
    h.apply(T0 + 2 * MINUTE, Command::Cancel(vec![first]));
    one_job(fire(&mut h, T0 + 3 * MINUTE, "s", T0 + 3 * MINUTE));
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
        assert_eq!(fired.jobs.len(), usize::from(expect_job), "{policy:?}");
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
    one_job(fire(&mut h, T0 + MINUTE + 8_000, "s", T0 + MINUTE));
}

const SECOND: u64 = 1_000;

/// The ticks of the jobs a schedule fired, read from their keys, in job id order.
fn fired_ticks(h: &Harness, name: &str) -> Vec<u64> {
    let prefix = format!("schedule/{name}/");
    h.table
        .jobs()
        .filter(|j| j.schedule.as_deref() == Some(name))
        .map(|j| {
            let key = j.idempotency_key.as_deref().unwrap_or_default();
            key.strip_prefix(&prefix)
                .and_then(|t| t.parse().ok())
                .unwrap_or_else(|| panic!("job {} has key {key:?}", j.id))
        })
        .collect()
}

/// The failover reported from outside: an every-second schedule whose leader was gone for 3.3 s.
/// The first fire after it creates one job per tick that came due meanwhile (all within the
/// grace), in tick order with ascending ids, each keyed by its tick; nothing counts as skipped,
/// and the next tick is the first after now. Under either overlap policy.
#[test]
fn a_failover_fires_every_tick_within_the_grace_each_its_own_job() {
    for overlap in [OverlapPolicy::Allow, OverlapPolicy::Skip] {
        let mut h = Harness::new();
        let mut s = spec("s", "* * * * * *");
        s.overlap = overlap;
        add(&mut h, T0, s).unwrap();
        let fired = fire(&mut h, T0 + 4_300, "s", T0 + SECOND).expect("fires");
        assert_eq!(fired.jobs.len(), 4, "{overlap:?}: {fired:?}");
        assert_eq!((fired.skipped, fired.refused.clone()), (0, None));
        assert!(fired.jobs.windows(2).all(|w| w[0] < w[1]), "{overlap:?}");
        let ticks: Vec<u64> = (1..=4).map(|k| T0 + k * SECOND).collect();
        assert_eq!(fired_ticks(&h, "s"), ticks, "{overlap:?}");
        let sched = h.table.schedule("s").unwrap();
        assert_eq!((sched.fired, sched.skipped), (4, 0), "{overlap:?}");
        assert_eq!(sched.next_tick_ms, Some(T0 + 5 * SECOND));
        assert_eq!(sched.last_fired_tick_ms, Some(T0 + 4 * SECOND));
        assert_eq!(sched.last_job, fired.jobs.last().copied());
    }
}

/// The overlap rule of a catch-up, row by row (four every-second ticks due at once, overlap
/// Skip unless a row says Allow): a previous job that existed before the ticks and still pends
/// makes each of them an overlap (skipped, counted); a finished one does not; and a job fired
/// late in the same catch-up never makes the next tick an overlap. A `skip` schedule's jobs
/// share the ordering line `schedule/<name>` (or the template's own key), so only the oldest is
/// ready and they run one at a time, in tick order; `allow` adds no key and all are ready.
#[test]
fn overlap_in_a_catch_up_is_judged_at_each_tick_s_time() {
    struct Row {
        name: &'static str,
        overlap: OverlapPolicy,
        template_key: Option<&'static str>,
        /// Fire one tick on time first, and finish its job (or not) before the catch-up.
        earlier_job_finished: Option<bool>,
        fired: usize,
        skipped: u64,
        line: Option<&'static str>,
    }
    let rows = [
        Row {
            name: "no earlier job: all four fire, one line",
            overlap: OverlapPolicy::Skip,
            template_key: None,
            earlier_job_finished: None,
            fired: 4,
            skipped: 0,
            line: Some("schedule/s"),
        },
        Row {
            name: "earlier job finished: all four fire",
            overlap: OverlapPolicy::Skip,
            template_key: None,
            earlier_job_finished: Some(true),
            fired: 4,
            skipped: 0,
            line: Some("schedule/s"),
        },
        Row {
            name: "earlier job still pending since before the ticks: all four are overlaps",
            overlap: OverlapPolicy::Skip,
            template_key: None,
            earlier_job_finished: Some(false),
            fired: 0,
            skipped: 4,
            line: None,
        },
        Row {
            name: "allow: the pending earlier job blocks nothing, no line",
            overlap: OverlapPolicy::Allow,
            template_key: None,
            earlier_job_finished: Some(false),
            fired: 4,
            skipped: 0,
            line: None,
        },
        Row {
            name: "the template's own ordering key is kept",
            overlap: OverlapPolicy::Skip,
            template_key: Some("mine"),
            earlier_job_finished: None,
            fired: 4,
            skipped: 0,
            line: Some("mine"),
        },
    ];
    for row in rows {
        let mut h = Harness::new();
        let mut s = spec("s", "* * * * * *");
        s.overlap = row.overlap;
        s.job.ordering_key = row.template_key.map(str::to_string);
        add(&mut h, T0, s).unwrap();
        let mut first_due = T0 + SECOND;
        let mut earlier = None;
        if let Some(finished) = row.earlier_job_finished {
            let id = one_job(fire(&mut h, T0 + SECOND, "s", T0 + SECOND));
            if finished {
                h.apply(T0 + SECOND, Command::Cancel(vec![id]));
            }
            earlier = Some(id);
            first_due = T0 + 2 * SECOND;
        }
        let now = first_due + 3 * SECOND + 300;
        let fired = fire(&mut h, now, "s", first_due).expect("applies");
        assert_eq!(fired.jobs.len(), row.fired, "{}: {fired:?}", row.name);
        assert_eq!(fired.skipped, row.skipped, "{}", row.name);
        let sched = h.table.schedule("s").unwrap();
        assert_eq!(
            sched.next_tick_ms,
            Some(first_due + 4 * SECOND),
            "{}",
            row.name
        );
        assert_eq!(
            sched.fired + sched.skipped,
            4 + u64::from(earlier.is_some()),
            "{}: every tick accounted for",
            row.name
        );
        for &id in &fired.jobs {
            assert_eq!(h.job(id).ordering_key.as_deref(), row.line, "{}", row.name);
        }
        if let (Some(_), Some(&oldest)) = (row.line, fired.jobs.first()) {
            let ready: Vec<JobId> = h.table.ready_jobs().collect();
            assert_eq!(ready, vec![oldest], "{}: one at a time", row.name);
        }
        if row.overlap == OverlapPolicy::Allow {
            let ready: Vec<JobId> = h.table.ready_jobs().collect();
            assert_eq!(ready.len(), 1 + fired.jobs.len(), "{}", row.name);
        }
    }
}

/// A catch-up longer than `CRON_CATCH_UP_FIRES_MAX` goes on over several entries: each fires at
/// most the limit, oldest first, and leaves the next tick at the first unfired one (already
/// due), which the leader proposes next; over the entries every tick fires once, in order, and
/// nothing counts as skipped. A job of the previous entry does not make those ticks overlaps
/// (it was created after they came due), but a tick that came due after it was created does.
#[test]
fn a_long_catch_up_goes_on_entry_by_entry() {
    let mut h = Harness::new();
    let mut s = spec("s", "* * * * * *");
    s.overlap = OverlapPolicy::Skip;
    add(&mut h, T0, s).unwrap();
    // 25 ticks came due during the outage.
    let mut now = T0 + 25 * SECOND + 500;
    let mut entries = 0;
    loop {
        let next = h.table.schedule("s").unwrap().next_tick_ms.unwrap();
        if next > now {
            break;
        }
        let fired = fire(&mut h, now, "s", next).expect("applies");
        assert!(fired.jobs.len() <= CRON_CATCH_UP_FIRES_MAX);
        assert_eq!(fired.skipped, 0, "entry {entries}: {fired:?}");
        entries += 1;
        now += 5;
    }
    assert_eq!(entries, 3, "25 ticks, at most 10 per entry");
    let expected: Vec<u64> = (1..=25).map(|k| T0 + k * SECOND).collect();
    assert_eq!(fired_ticks(&h, "s"), expected);
    let sched = h.table.schedule("s").unwrap();
    assert_eq!((sched.fired, sched.skipped), (25, 0));
    assert_eq!(sched.next_tick_ms, Some(T0 + 26 * SECOND));
    // A tick already fired is stale.
    assert!(matches!(
        fire(&mut h, now, "s", T0 + 12 * SECOND),
        Err(Rejection::StaleTick { .. })
    ));
    // The next tick comes due while the catch-up's jobs still wait in their line: an overlap.
    assert_eq!(
        fire(&mut h, T0 + 26 * SECOND, "s", T0 + 26 * SECOND),
        Ok(skipped(1))
    );
}

/// Late ticks past the grace and recent ones in one fire: Skip counts the late ones as missed
/// and fires each recent one; RunOnce first fires one job for all late ones (for the newest),
/// then each recent one. Every tick is fired or counted.
#[test]
fn late_ticks_follow_the_missed_policy_and_recent_ones_fire() {
    // Every second; 70 s without a leader: ticks 1..=9 are past the 60 s grace, 10..=70 not.
    for (policy, late_job) in [
        (MissedTickPolicy::Skip, false),
        (MissedTickPolicy::RunOnce, true),
    ] {
        let mut h = Harness::new();
        let mut s = spec("s", "* * * * * *");
        s.missed = policy;
        add(&mut h, T0, s).unwrap();
        let now = T0 + 70 * SECOND;
        loop {
            let next = h.table.schedule("s").unwrap().next_tick_ms.unwrap();
            if next > now {
                break;
            }
            fire(&mut h, now, "s", next).expect("applies");
        }
        let mut expected: Vec<u64> = (10..=70).map(|k| T0 + k * SECOND).collect();
        if late_job {
            expected.insert(0, T0 + 9 * SECOND);
        }
        assert_eq!(fired_ticks(&h, "s"), expected, "{policy:?}");
        let sched = h.table.schedule("s").unwrap();
        assert_eq!(sched.fired + sched.skipped, 70, "{policy:?}");
        assert_eq!(sched.skipped, if late_job { 8 } else { 9 }, "{policy:?}");
    }
}

/// A tick whose job cannot be created (a client took its key with another payload) is counted
/// as skipped with the reason; the other ticks of the catch-up fire.
#[test]
fn a_refused_tick_does_not_stop_the_catch_up() {
    let mut h = Harness::new();
    add(&mut h, T0, spec("s", "* * * * * *")).unwrap();
    let mut taken = new_job("reports", "noop", b"not the template's");
    taken.idempotency_key = Some(fire_key("s", T0 + 2 * SECOND));
    h.submit(T0, vec![taken]);
    let fired = fire(&mut h, T0 + 3 * SECOND + 100, "s", T0 + SECOND).expect("applies");
    assert_eq!(fired.jobs.len(), 2, "{fired:?}");
    assert_eq!(fired.skipped, 1);
    assert!(matches!(
        fired.refused,
        Some(Rejection::IdempotencyConflict { .. })
    ));
    assert_eq!(
        h.table.schedule("s").unwrap().next_tick_ms,
        Some(T0 + 4 * SECOND)
    );
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
/// with the reason (a name that is not printable ASCII too: it is part of every fired job's
/// idempotency key); and none of the refusals changes anything.
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
        (spec("night\nly", "@daily"), "printable ASCII"),
        (spec("nächtlich", "@daily"), "printable ASCII"),
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
    let id = one_job(fire(&mut h, T0 + MINUTE, "s", T0 + MINUTE));
    assert_eq!(h.job(id).status, JobStatus::Pending);
    assert_eq!(h.table.ready_jobs().collect::<Vec<_>>(), vec![id]);
}
