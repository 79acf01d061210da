//! Tests of the cron schedule math in `exactly_core::cron`: parsing and its errors, next ticks
//! with exact timestamps (including DST transitions in America/New_York and Europe/Berlin),
//! never-firing schedules, missed-tick planning, serde round trips, and property tests that no
//! input panics and that ticks are strictly increasing and never fired twice.

use chrono::{TimeZone, Utc};
use exactly_core::cron::{
    CronError, CronSchedule, FirePlan, MissedTickPolicy, CRON_EXPR_BYTES_MAX,
    CRON_MISSED_TICKS_COUNTED_MAX, CRON_TZ_BYTES_MAX, TZDB_VERSION,
};
use proptest::prelude::*;

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

/// Unix epoch milliseconds of a UTC date and time.
fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> u64 {
    let ms = Utc
        .with_ymd_and_hms(y, mo, d, h, mi, s)
        .single()
        .expect("a valid UTC time")
        .timestamp_millis();
    u64::try_from(ms).expect("after 1970")
}

fn sched(expr: &str, tz: &str) -> CronSchedule {
    CronSchedule::parse(expr, tz).unwrap_or_else(|e| panic!("{expr:?} in {tz:?} should parse: {e}"))
}

/// The first `n` ticks strictly after `after_ms`.
fn ticks(s: &CronSchedule, after_ms: u64, n: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    let mut t = after_ms;
    for _ in 0..n {
        match s.next_after(t) {
            Some(next) => {
                out.push(next);
                t = next;
            }
            None => break,
        }
    }
    out
}

// ----- parsing -----

/// Lists, ranges, steps and names each select exactly the ticks standard cron selects.
#[test]
fn standard_syntax_selects_the_expected_ticks() {
    // 2025-01-04 is a Saturday.
    let sat = utc(2025, 1, 4, 12, 0, 0);
    let cases: Vec<(&str, Vec<u64>)> = vec![
        (
            "0 9 * * MON-FRI",
            vec![
                utc(2025, 1, 6, 9, 0, 0),
                utc(2025, 1, 7, 9, 0, 0),
                utc(2025, 1, 8, 9, 0, 0),
            ],
        ),
        (
            "*/20 12 * * *",
            vec![
                utc(2025, 1, 4, 12, 20, 0),
                utc(2025, 1, 4, 12, 40, 0),
                utc(2025, 1, 5, 12, 0, 0),
            ],
        ),
        (
            "10-30/10 13 * * *",
            vec![
                utc(2025, 1, 4, 13, 10, 0),
                utc(2025, 1, 4, 13, 20, 0),
                utc(2025, 1, 4, 13, 30, 0),
                utc(2025, 1, 5, 13, 10, 0),
            ],
        ),
        (
            "0 0 1,15 * *",
            vec![
                utc(2025, 1, 15, 0, 0, 0),
                utc(2025, 2, 1, 0, 0, 0),
                utc(2025, 2, 15, 0, 0, 0),
            ],
        ),
        (
            "0 6 1 jan,Jul *",
            vec![utc(2025, 7, 1, 6, 0, 0), utc(2026, 1, 1, 6, 0, 0)],
        ),
        // 0 and 7 are both Sunday.
        (
            "0 0 * * 7",
            vec![utc(2025, 1, 5, 0, 0, 0), utc(2025, 1, 12, 0, 0, 0)],
        ),
        (
            "0 0 * * sun",
            vec![utc(2025, 1, 5, 0, 0, 0), utc(2025, 1, 12, 0, 0, 0)],
        ),
    ];
    for (expr, expected) in cases {
        let s = sched(expr, "");
        assert_eq!(ticks(&s, sat, expected.len()), expected, "{expr}");
    }
}

/// When both day fields are restricted, a day matches if either matches (Vixie cron); a leading
/// `+` on day-of-week makes it both.
#[test]
fn day_of_month_and_day_of_week_combine_with_or_unless_plus() {
    // From 2025-06-01 (a Sunday): the 13th is a Friday only in June 2025.
    let start = utc(2025, 6, 1, 0, 0, 0);
    let or = sched("0 0 13 * FRI", "UTC");
    assert_eq!(
        ticks(&or, start, 4),
        vec![
            utc(2025, 6, 6, 0, 0, 0),
            utc(2025, 6, 13, 0, 0, 0),
            utc(2025, 6, 20, 0, 0, 0),
            utc(2025, 6, 27, 0, 0, 0),
        ]
    );
    let and = sched("0 0 13 * +FRI", "UTC");
    assert_eq!(
        ticks(&and, start, 2),
        vec![utc(2025, 6, 13, 0, 0, 0), utc(2026, 2, 13, 0, 0, 0)]
    );
}

/// Every macro produces the same ticks as the expression it stands for, and @weekly is Sunday.
#[test]
fn macros_match_their_expansions() {
    let start = utc(2025, 5, 17, 13, 45, 0);
    for (name, expansion) in [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
        ("@DAILY", "0 0 * * *"),
    ] {
        let m = sched(name, "Europe/Berlin");
        let e = sched(expansion, "Europe/Berlin");
        assert_eq!(ticks(&m, start, 5), ticks(&e, start, 5), "{name}");
        assert_eq!(m.expr(), name, "the expression is kept as given");
    }
    // 2025-05-17 is a Saturday; midnight Sunday in UTC.
    assert_eq!(
        sched("@weekly", "").next_after(start),
        Some(utc(2025, 5, 18, 0, 0, 0))
    );
}

/// Six fields put seconds first; five fields fire at second 0.
#[test]
fn six_fields_have_seconds_first() {
    let start = utc(2025, 1, 1, 0, 0, 0);
    assert_eq!(
        ticks(&sched("30 0 12 * * *", ""), start, 2),
        vec![utc(2025, 1, 1, 12, 0, 30), utc(2025, 1, 2, 12, 0, 30)]
    );
    assert_eq!(
        ticks(&sched("*/20 * * * * *", ""), start, 3),
        vec![
            utc(2025, 1, 1, 0, 0, 20),
            utc(2025, 1, 1, 0, 0, 40),
            utc(2025, 1, 1, 0, 1, 0),
        ]
    );
}

/// Each malformed expression is refused with the variant, and the field, that says what is wrong.
#[test]
fn bad_expressions_name_what_is_wrong() {
    let field_err = |expr: &str| match CronSchedule::parse(expr, "UTC") {
        Err(CronError::BadField { field, value, .. }) => (field, value),
        other => panic!("{expr:?}: expected BadField, got {other:?}"),
    };
    let table: [(&str, &str, &str); 14] = [
        ("61 * * * *", "minute", "61"),
        ("* 24 * * *", "hour", "24"),
        ("* * 0 * *", "day-of-month", "0"),
        ("* * 32 * *", "day-of-month", "32"),
        ("* * * 13 *", "month", "13"),
        ("* * * * 8", "day-of-week", "8"),
        ("*/0 * * * *", "minute", "*/0"),
        ("1-70 * * * *", "minute", "1-70"),
        ("0/5 * * * *", "minute", "0/5"),
        ("* * * MON *", "month", "MON"),
        ("* * * * JAN", "day-of-week", "JAN"),
        ("* * * * MONDAY", "day-of-week", "MONDAY"),
        ("60 * * * * *", "second", "60"),
        ("* * * * * é", "day-of-week", "é"),
    ];
    for (expr, field, value) in table {
        assert_eq!(field_err(expr), (field, value.to_string()), "{expr}");
    }

    assert_eq!(CronSchedule::parse("", "UTC"), Err(CronError::Empty));
    assert_eq!(CronSchedule::parse(" \t ", "UTC"), Err(CronError::Empty));
    assert_eq!(
        CronSchedule::parse("@reboot", "UTC"),
        Err(CronError::UnknownMacro("@reboot".to_string()))
    );
    assert_eq!(
        CronSchedule::parse("* * * *", "UTC"),
        Err(CronError::FieldCount {
            expr: "* * * *".to_string(),
            count: 4
        })
    );
    // A year field is not accepted.
    assert!(matches!(
        CronSchedule::parse("0 0 0 1 1 * 2030", "UTC"),
        Err(CronError::FieldCount { count: 7, .. })
    ));
    // Messages carry the field and the value.
    let msg = CronSchedule::parse("0 25 * * *", "UTC")
        .expect_err("hour 25")
        .to_string();
    assert!(
        msg.contains("hour") && msg.contains("\"25\""),
        "message: {msg}"
    );
}

/// The expression and time zone lengths are capped by named limits, counted in bytes.
#[test]
fn lengths_are_capped() {
    let at_limit = format!("{:<width$}", "* * * * *", width = CRON_EXPR_BYTES_MAX);
    assert_eq!(at_limit.len(), CRON_EXPR_BYTES_MAX);
    assert!(CronSchedule::parse(&at_limit, "UTC").is_ok());
    let over = format!("{at_limit} ");
    assert_eq!(
        CronSchedule::parse(&over, "UTC"),
        Err(CronError::ExprTooLong {
            len_bytes: CRON_EXPR_BYTES_MAX + 1,
            max_bytes: CRON_EXPR_BYTES_MAX
        })
    );
    let long_tz = "A/".repeat(CRON_TZ_BYTES_MAX);
    assert_eq!(
        CronSchedule::parse("* * * * *", &long_tz),
        Err(CronError::TzTooLong {
            len_bytes: long_tz.len(),
            max_bytes: CRON_TZ_BYTES_MAX
        })
    );
}

/// An empty time zone means UTC; unknown or wrongly cased names are refused.
#[test]
fn time_zones_are_iana_names() {
    let s = sched("0 12 * * *", "");
    assert_eq!(s.tz(), "UTC");
    assert_eq!(s, sched("0 12 * * *", "UTC"));
    assert_eq!(
        s.next_after(utc(2025, 1, 1, 0, 0, 0)),
        Some(utc(2025, 1, 1, 12, 0, 0))
    );
    // Noon in Tokyo (UTC+9, no DST) is 03:00 UTC.
    assert_eq!(
        sched("0 12 * * *", "Asia/Tokyo").next_after(utc(2025, 1, 1, 0, 0, 0)),
        Some(utc(2025, 1, 1, 3, 0, 0))
    );
    for bad in ["Mars/Olympus", "europe/berlin", "CEST", " UTC"] {
        assert_eq!(
            CronSchedule::parse("* * * * *", bad),
            Err(CronError::UnknownTimeZone(bad.to_string())),
            "{bad}"
        );
    }
    assert_eq!(TZDB_VERSION.len(), 5, "an IANA release such as 2025b");
}

// ----- next_after -----

/// The next tick is strictly after the given instant, also within the same second.
#[test]
fn next_after_is_strictly_after() {
    let s = sched("* * * * *", "");
    let t = utc(2025, 1, 1, 10, 0, 0);
    assert_eq!(s.next_after(t - 1), Some(t));
    assert_eq!(s.next_after(t), Some(t + MINUTE_MS));
    assert_eq!(s.next_after(t + 999), Some(t + MINUTE_MS));
    let every_second = sched("* * * * * *", "");
    assert_eq!(every_second.next_after(t), Some(t + 1000));
    assert_eq!(every_second.next_after(t + 1), Some(t + 1000));
    assert_eq!(every_second.next_after(t + 999), Some(t + 1000));
}

/// February 29 fires only in leap years; impossible dates never fire and are known at parse time.
#[test]
fn rare_and_impossible_dates() {
    let leap = sched("0 0 29 2 *", "");
    assert!(leap.days_exist());
    assert_eq!(
        ticks(&leap, utc(2025, 1, 1, 0, 0, 0), 3),
        vec![
            utc(2028, 2, 29, 0, 0, 0),
            utc(2032, 2, 29, 0, 0, 0),
            utc(2036, 2, 29, 0, 0, 0),
        ]
    );
    // 2100 is not a leap year.
    assert_eq!(
        leap.next_after(utc(2096, 3, 1, 0, 0, 0)),
        Some(utc(2104, 2, 29, 0, 0, 0))
    );
    // February 29 on a Monday: 2044 is the next.
    let leap_monday = sched("0 0 29 2 +MON", "");
    assert!(leap_monday.days_exist());
    assert_eq!(
        leap_monday.next_after(utc(2025, 1, 1, 0, 0, 0)),
        Some(utc(2044, 2, 29, 0, 0, 0))
    );
    for never in [
        "0 0 31 2 *",
        "0 0 30 2 *",
        "0 0 31 4,6,9,11 *",
        "0 0 30 2 +MON",
    ] {
        let s = sched(never, "Europe/Berlin");
        assert!(!s.days_exist(), "{never}");
        assert_eq!(s.next_after(0), None, "{never}");
        assert_eq!(s.next_after(utc(2025, 1, 1, 0, 0, 0)), None, "{never}");
    }
    for ever in ["0 0 31 * *", "0 0 L 2 *", "0 0 * 2 5#5", "0 0 31 2 MON"] {
        let s = sched(ever, "");
        assert!(s.days_exist(), "{ever}");
        assert!(s.next_after(0).is_some(), "{ever}");
    }
}

/// Instants past what the calendar search covers answer None instead of failing.
#[test]
fn far_future_answers_none() {
    let s = sched("* * * * *", "America/New_York");
    assert_eq!(s.next_after(u64::MAX), None);
    assert_eq!(s.next_after(u64::MAX / 2), None);
    // Year 4999 still fires.
    assert!(s.next_after(utc(4999, 6, 1, 0, 0, 0)).is_some());
}

// ----- DST -----

/// chrono-tz lists transitions through 2099 only: after New York's last listed fall-back
/// (2099-11-01) it stays on standard time, so noon in July 2100 is 17:00 UTC, not 16:00. Pinned
/// here because replicas depend on it; a chrono-tz upgrade that changes it must be noticed.
#[test]
fn dst_is_modelled_through_2099() {
    let noon = sched("0 12 * * *", "America/New_York");
    assert_eq!(
        noon.next_after(utc(2099, 7, 1, 0, 0, 0)),
        Some(utc(2099, 7, 1, 16, 0, 0))
    );
    assert_eq!(
        noon.next_after(utc(2100, 7, 1, 0, 0, 0)),
        Some(utc(2100, 7, 1, 17, 0, 0))
    );
}

/// America/New_York, spring forward on 2025-03-09 (02:00 EST jumps to 03:00 EDT at 07:00 UTC).
/// A fixed-time 02:30 fires once, at 03:00 EDT; hourly fires at 01:00 EST then 03:00 EDT, one
/// real hour apart.
#[test]
fn new_york_spring_forward() {
    let fixed = sched("30 2 * * *", "America/New_York");
    assert_eq!(
        ticks(&fixed, utc(2025, 3, 8, 8, 0, 0), 2),
        vec![
            utc(2025, 3, 9, 7, 0, 0),   // 03:00 EDT, the first instant after the gap
            utc(2025, 3, 10, 6, 30, 0), // 02:30 EDT
        ]
    );
    let hourly = sched("0 * * * *", "America/New_York");
    assert_eq!(
        ticks(&hourly, utc(2025, 3, 9, 5, 30, 0), 3),
        vec![
            utc(2025, 3, 9, 6, 0, 0), // 01:00 EST
            utc(2025, 3, 9, 7, 0, 0), // 03:00 EDT
            utc(2025, 3, 9, 8, 0, 0), // 04:00 EDT
        ]
    );
}

/// America/New_York, fall back on 2025-11-02 (02:00 EDT returns to 01:00 EST at 06:00 UTC).
/// A fixed-time 01:30 fires once, at 01:30 EDT; hourly fires at both 01:00s, one real hour apart.
#[test]
fn new_york_fall_back() {
    let fixed = sched("30 1 * * *", "America/New_York");
    assert_eq!(
        ticks(&fixed, utc(2025, 11, 1, 12, 0, 0), 2),
        vec![
            utc(2025, 11, 2, 5, 30, 0), // 01:30 EDT; 01:30 EST (06:30 UTC) does not fire
            utc(2025, 11, 3, 6, 30, 0), // 01:30 EST next day
        ]
    );
    let hourly = sched("0 * * * *", "America/New_York");
    assert_eq!(
        ticks(&hourly, utc(2025, 11, 2, 3, 30, 0), 4),
        vec![
            utc(2025, 11, 2, 4, 0, 0), // 00:00 EDT
            utc(2025, 11, 2, 5, 0, 0), // 01:00 EDT
            utc(2025, 11, 2, 6, 0, 0), // 01:00 EST
            utc(2025, 11, 2, 7, 0, 0), // 02:00 EST
        ]
    );
    // Asked from inside the repeated hour (01:45 EDT), the fixed-time job is done for the day.
    assert_eq!(
        fixed.next_after(utc(2025, 11, 2, 5, 45, 0)),
        Some(utc(2025, 11, 3, 6, 30, 0))
    );
}

/// Europe/Berlin, spring forward on 2025-03-30 (02:00 CET jumps to 03:00 CEST at 01:00 UTC).
#[test]
fn berlin_spring_forward() {
    let fixed = sched("30 2 * * *", "Europe/Berlin");
    assert_eq!(
        ticks(&fixed, utc(2025, 3, 29, 12, 0, 0), 2),
        vec![
            utc(2025, 3, 30, 1, 0, 0),  // 03:00 CEST, the first instant after the gap
            utc(2025, 3, 31, 0, 30, 0), // 02:30 CEST
        ]
    );
    // Just before the jump, the skipped 02:30 is still ahead; at the jump it has fired.
    assert_eq!(
        fixed.next_after(utc(2025, 3, 30, 0, 59, 59)),
        Some(utc(2025, 3, 30, 1, 0, 0))
    );
    assert_eq!(
        fixed.next_after(utc(2025, 3, 30, 1, 0, 0)),
        Some(utc(2025, 3, 31, 0, 30, 0))
    );
    let hourly = sched("0 * * * *", "Europe/Berlin");
    assert_eq!(
        ticks(&hourly, utc(2025, 3, 29, 23, 30, 0), 3),
        vec![
            utc(2025, 3, 30, 0, 0, 0), // 01:00 CET
            utc(2025, 3, 30, 1, 0, 0), // 03:00 CEST
            utc(2025, 3, 30, 2, 0, 0), // 04:00 CEST
        ]
    );
}

/// Europe/Berlin, fall back on 2025-10-26 (03:00 CEST returns to 02:00 CET at 01:00 UTC).
#[test]
fn berlin_fall_back() {
    let fixed = sched("30 2 * * *", "Europe/Berlin");
    assert_eq!(
        ticks(&fixed, utc(2025, 10, 25, 12, 0, 0), 2),
        vec![
            utc(2025, 10, 26, 0, 30, 0), // 02:30 CEST; 02:30 CET (01:30 UTC) does not fire
            utc(2025, 10, 27, 1, 30, 0), // 02:30 CET next day
        ]
    );
    let hourly = sched("0 * * * *", "Europe/Berlin");
    assert_eq!(
        ticks(&hourly, utc(2025, 10, 25, 23, 30, 0), 3),
        vec![
            utc(2025, 10, 26, 0, 0, 0), // 02:00 CEST
            utc(2025, 10, 26, 1, 0, 0), // 02:00 CET
            utc(2025, 10, 26, 2, 0, 0), // 03:00 CET
        ]
    );
}

/// Hourly schedules fire exactly once per real hour across a whole year of DST transitions in
/// both zones: consecutive ticks are always exactly one hour apart.
#[test]
fn hourly_is_once_per_real_hour_all_year() {
    for tz in ["America/New_York", "Europe/Berlin"] {
        let hourly = sched("0 * * * *", tz);
        let all = ticks(&hourly, utc(2025, 1, 1, 0, 0, 0), 365 * 24);
        assert_eq!(all.len(), 365 * 24);
        assert_eq!(all[0], utc(2025, 1, 1, 1, 0, 0), "{tz}");
        for pair in all.windows(2) {
            assert_eq!(pair[1] - pair[0], HOUR_MS, "{tz} at {}", pair[0]);
        }
    }
}

/// Schedules with a list, range or step in the time fields are interval schedules in croner:
/// unlike Vixie cron, a listed time inside the spring gap is skipped and a listed time inside
/// the repeated hour fires at both occurrences.
#[test]
fn interval_lists_follow_real_time_across_dst() {
    let listed = sched("30 1,2 * * *", "America/New_York");
    assert_eq!(
        ticks(&listed, utc(2025, 3, 9, 0, 0, 0), 2),
        vec![
            utc(2025, 3, 9, 6, 30, 0),  // 01:30 EST
            utc(2025, 3, 10, 5, 30, 0), // 01:30 EDT next day: 02:30 on the 9th does not exist
        ]
    );
    assert_eq!(
        ticks(&listed, utc(2025, 11, 2, 0, 0, 0), 4),
        vec![
            utc(2025, 11, 2, 5, 30, 0), // 01:30 EDT
            utc(2025, 11, 2, 6, 30, 0), // 01:30 EST
            utc(2025, 11, 2, 7, 30, 0), // 02:30 EST
            utc(2025, 11, 3, 6, 30, 0), // 01:30 EST next day
        ]
    );
}

// ----- plan_fire -----

/// The per-plan fire limit the table uses unless a row says otherwise (the state machine's).
const FIRES_MAX: usize = exactly_core::limits::CRON_CATCH_UP_FIRES_MAX;

/// One row of the plan_fire table: an every-minute UTC schedule, ticks at BASE + k minutes.
struct PlanCase {
    name: &'static str,
    next_tick: u64,
    now: u64,
    policy: MissedTickPolicy,
    grace_ms: u64,
    fires_max: usize,
    expected: FirePlan,
}

/// The late- and missed-tick table: not due, on time, late, several due with some within the
/// grace and some past it, a grace that covers several ticks (each fires its own job, oldest
/// first), and the per-plan limit cutting a catch-up short (the next tick stays at the first
/// unfired one, nothing counted missed), under both policies.
#[test]
fn plan_fire_table() {
    use MissedTickPolicy::{RunOnce, Skip};
    let s = sched("* * * * *", "UTC");
    let base = utc(2025, 1, 1, 0, 0, 0);
    let m = |k: u64| base + k * MINUTE_MS;
    let sec = 1000;
    let plan = |fire: &[u64], missed: u64, next: u64| FirePlan {
        fire: fire.to_vec(),
        missed,
        missed_capped: false,
        next_tick_ms: Some(next),
    };
    let case = |name, next_tick, now, policy, grace_ms, expected| PlanCase {
        name,
        next_tick,
        now,
        policy,
        grace_ms,
        fires_max: FIRES_MAX,
        expected,
    };
    let cases = [
        case(
            "not due yet: nothing fires, next unchanged",
            m(1),
            m(0) + 30 * sec,
            Skip,
            30 * sec,
            plan(&[], 0, m(1)),
        ),
        case(
            "due exactly now (skip)",
            m(0),
            m(0),
            Skip,
            30 * sec,
            plan(&[m(0)], 0, m(1)),
        ),
        case(
            "due exactly now (run once)",
            m(0),
            m(0),
            RunOnce,
            0,
            plan(&[m(0)], 0, m(1)),
        ),
        case(
            "one tick, within grace (skip)",
            m(0),
            m(0) + 30 * sec,
            Skip,
            30 * sec,
            plan(&[m(0)], 0, m(1)),
        ),
        case(
            "one tick, late (skip): dropped",
            m(0),
            m(0) + 31 * sec,
            Skip,
            30 * sec,
            plan(&[], 1, m(1)),
        ),
        case(
            "one tick, late (run once): fired",
            m(0),
            m(0) + 31 * sec,
            RunOnce,
            30 * sec,
            plan(&[m(0)], 0, m(1)),
        ),
        case(
            "four due, newest within grace (skip): it fires, three late missed",
            m(0),
            m(3) + 10 * sec,
            Skip,
            30 * sec,
            plan(&[m(3)], 3, m(4)),
        ),
        case(
            "four due, newest within grace (run once): one job for the three late, then it",
            m(0),
            m(3) + 10 * sec,
            RunOnce,
            30 * sec,
            plan(&[m(2), m(3)], 2, m(4)),
        ),
        case(
            "four due, all late (skip): nothing fires, four missed",
            m(0),
            m(3) + 45 * sec,
            Skip,
            30 * sec,
            plan(&[], 4, m(4)),
        ),
        case(
            "four due, all late (run once): one fire for all",
            m(0),
            m(3) + 45 * sec,
            RunOnce,
            30 * sec,
            plan(&[m(3)], 3, m(4)),
        ),
        case(
            "grace covers four ticks (skip): each fires, oldest first, none missed",
            m(0),
            m(3) + 10 * sec,
            Skip,
            10 * 60 * sec,
            plan(&[m(0), m(1), m(2), m(3)], 0, m(4)),
        ),
        case(
            "grace covers four ticks (run once): the same, nothing is late",
            m(0),
            m(3) + 10 * sec,
            RunOnce,
            10 * 60 * sec,
            plan(&[m(0), m(1), m(2), m(3)], 0, m(4)),
        ),
        case(
            "grace covers the newest two of four (skip): two missed, two fire",
            m(0),
            m(3) + 10 * sec,
            Skip,
            MINUTE_MS + 10 * sec,
            plan(&[m(2), m(3)], 2, m(4)),
        ),
        case(
            "grace covers the newest two of four (run once): one for the late, two fire",
            m(0),
            m(3) + 10 * sec,
            RunOnce,
            MINUTE_MS + 10 * sec,
            plan(&[m(1), m(2), m(3)], 1, m(4)),
        ),
        case(
            "a tick exactly at the grace is within it",
            m(0),
            m(1) + 30 * sec,
            Skip,
            90 * sec,
            plan(&[m(0), m(1)], 0, m(2)),
        ),
        case(
            "now exactly on a later tick, no grace: that tick fires, the earlier two missed",
            m(0),
            m(2),
            Skip,
            0,
            plan(&[m(2)], 2, m(3)),
        ),
        PlanCase {
            name: "limit 3, six within grace: the oldest three fire, next is the fourth (due)",
            next_tick: m(0),
            now: m(5) + sec,
            policy: Skip,
            grace_ms: 10 * 60 * sec,
            fires_max: 3,
            expected: plan(&[m(0), m(1), m(2)], 0, m(3)),
        },
        PlanCase {
            name: "limit 3 (run once): the late tick's job counts against it",
            next_tick: m(0),
            now: m(5) + sec,
            policy: RunOnce,
            grace_ms: 3 * MINUTE_MS,
            fires_max: 3,
            // m0..m2 are past the grace: one job for them (m2), then m3 and m4; m5 waits.
            expected: plan(&[m(2), m(3), m(4)], 2, m(5)),
        },
        PlanCase {
            name: "limit 0 counts as 1",
            next_tick: m(0),
            now: m(2),
            policy: Skip,
            grace_ms: 10 * 60 * sec,
            fires_max: 0,
            expected: plan(&[m(0)], 0, m(1)),
        },
    ];
    for case in cases {
        let got = s.plan_fire(
            case.next_tick,
            case.now,
            case.policy,
            case.grace_ms,
            case.fires_max,
        );
        assert_eq!(got, case.expected, "{}", case.name);
    }
}

/// A failover delays an every-second schedule by 3.3 s (the outage reported from outside, where
/// two of 24 ticks were skipped): the leader that takes over fires every tick that came due
/// meanwhile, each its own job in tick order, and counts none as missed.
#[test]
fn plan_fire_after_a_failover_fires_every_tick_within_the_grace() {
    let s = sched("* * * * * *", "UTC");
    let t0 = utc(2025, 6, 1, 12, 0, 0);
    let now = t0 + 3_300;
    for policy in [MissedTickPolicy::Skip, MissedTickPolicy::RunOnce] {
        let plan = s.plan_fire(
            t0,
            now,
            policy,
            exactly_core::limits::CRON_LATE_GRACE_MS,
            FIRES_MAX,
        );
        assert_eq!(
            plan,
            FirePlan {
                fire: vec![t0, t0 + 1_000, t0 + 2_000, t0 + 3_000],
                missed: 0,
                missed_capped: false,
                next_tick_ms: Some(t0 + 4_000),
            },
            "{policy:?}"
        );
    }
}

/// A catch-up longer than the per-plan limit goes on plan after plan, in tick order, without a
/// gap or a repeat, until the next tick is after now; ticks that slipped past the grace while
/// it went on are missed (Skip).
#[test]
fn plan_fire_catch_up_goes_on_across_plans() {
    let s = sched("* * * * * *", "UTC");
    let t0 = utc(2025, 6, 1, 12, 0, 0);
    let grace = exactly_core::limits::CRON_LATE_GRACE_MS;
    // 45 s without a leader: 46 ticks due at the first plan, each plan 5 ms after the last.
    let mut now = t0 + 45_000;
    let mut next = t0;
    let mut fired = Vec::new();
    let mut plans = 0;
    while next <= now {
        let plan = s.plan_fire(next, now, MissedTickPolicy::Skip, grace, FIRES_MAX);
        assert!(plan.fire.len() <= FIRES_MAX);
        assert_eq!(plan.missed, 0, "all within the grace");
        fired.extend(plan.fire);
        next = plan.next_tick_ms.expect("an every-second schedule goes on");
        now += 5;
        plans += 1;
    }
    let expected: Vec<u64> = (0..=45).map(|k| t0 + k * 1_000).collect();
    assert_eq!(fired, expected);
    assert_eq!(plans, 5, "46 ticks, 10 per plan");
    assert_eq!(next, t0 + 46_000);

    // Stuck for 70 s: the first ten ticks are past the grace and missed; the rest fire.
    let plan = s.plan_fire(t0, t0 + 70_000, MissedTickPolicy::Skip, grace, 100);
    assert_eq!(plan.missed, 10);
    assert_eq!(
        plan.fire,
        (10..=70).map(|k| t0 + k * 1_000).collect::<Vec<_>>()
    );
}

/// After a year's outage of an every-minute schedule the count of late ticks stops at the named
/// limit and says so, yet the newest late tick (RunOnce's fire), the tick within the grace and
/// the next tick are exact.
#[test]
fn plan_fire_caps_the_missed_count() {
    let s = sched("* * * * *", "UTC");
    let start = utc(2025, 1, 1, 0, 0, 0);
    let now = start + 365 * DAY_MS + 5_000;
    let newest = start + 365 * DAY_MS;
    for (policy, fire, missed) in [
        (
            MissedTickPolicy::Skip,
            vec![newest],
            CRON_MISSED_TICKS_COUNTED_MAX + 1,
        ),
        (
            MissedTickPolicy::RunOnce,
            vec![newest - MINUTE_MS, newest],
            CRON_MISSED_TICKS_COUNTED_MAX,
        ),
    ] {
        let plan = s.plan_fire(start, now, policy, 30_000, FIRES_MAX);
        assert_eq!(plan.fire, fire, "{policy:?}");
        assert!(plan.missed_capped, "{policy:?}");
        assert_eq!(plan.missed, missed, "{policy:?}");
        assert_eq!(plan.next_tick_ms, Some(newest + MINUTE_MS));
    }
}

/// The cap is exact at its edge: limit + 1 late ticks are counted in full, limit + 2 are not.
#[test]
fn plan_fire_cap_edge() {
    let s = sched("* * * * *", "UTC");
    let start = utc(2025, 1, 1, 0, 0, 0);
    let n = CRON_MISSED_TICKS_COUNTED_MAX;
    // Ticks start .. start + n minutes: n + 1 due, all late.
    let plan = s.plan_fire(
        start,
        start + n * MINUTE_MS + 1,
        MissedTickPolicy::Skip,
        0,
        FIRES_MAX,
    );
    assert_eq!(
        (plan.fire.clone(), plan.missed, plan.missed_capped),
        (vec![], n + 1, false)
    );
    let plan = s.plan_fire(
        start,
        start + (n + 1) * MINUTE_MS + 1,
        MissedTickPolicy::Skip,
        0,
        FIRES_MAX,
    );
    assert!(plan.fire.is_empty());
    assert!(plan.missed_capped);
    assert!(plan.missed >= n);
    let plan = s.plan_fire(
        start,
        start + (n + 1) * MINUTE_MS + 1,
        MissedTickPolicy::RunOnce,
        0,
        FIRES_MAX,
    );
    assert_eq!(plan.fire, vec![start + (n + 1) * MINUTE_MS]);
    assert!(plan.missed_capped);
}

/// An outage across New York's fall-back counts the repeated hour's ticks as the real hours they
/// are, and fires one job for the newest.
#[test]
fn plan_fire_across_fall_back() {
    let hourly = sched("0 * * * *", "America/New_York");
    let plan = hourly.plan_fire(
        utc(2025, 11, 2, 4, 0, 0),
        utc(2025, 11, 2, 7, 30, 0),
        MissedTickPolicy::RunOnce,
        60_000,
        FIRES_MAX,
    );
    assert_eq!(
        plan,
        FirePlan {
            fire: vec![utc(2025, 11, 2, 7, 0, 0)],
            missed: 3, // 00:00 EDT, 01:00 EDT, 01:00 EST
            missed_capped: false,
            next_tick_ms: Some(utc(2025, 11, 2, 8, 0, 0)),
        }
    );
}

/// A schedule with no tick after now fires what is due and reports no next tick.
#[test]
fn plan_fire_on_an_exhausted_schedule() {
    let never = sched("0 0 31 2 *", "UTC");
    let t = utc(2025, 1, 1, 0, 0, 0);
    assert_eq!(
        never.plan_fire(t, t, MissedTickPolicy::Skip, 0, FIRES_MAX),
        FirePlan {
            fire: vec![t],
            missed: 0,
            missed_capped: false,
            next_tick_ms: None,
        }
    );
}

// ----- serde -----

/// postcard and serde_json round-trip a schedule to an equal one that computes the same ticks;
/// JSON shows the two strings.
#[test]
fn serde_round_trips() {
    let start = utc(2025, 3, 1, 0, 0, 0);
    for (expr, tz) in [
        ("30 2 * * *", "Europe/Berlin"),
        ("@hourly", "America/New_York"),
        ("*/10 * * * * *", ""),
        ("0 0 13 * +FRI", "Asia/Kolkata"),
    ] {
        let s = sched(expr, tz);
        let bytes = postcard::to_allocvec(&s).expect("postcard encode");
        let from_postcard: CronSchedule = postcard::from_bytes(&bytes).expect("postcard decode");
        let json = serde_json::to_string(&s).expect("json encode");
        let from_json: CronSchedule = serde_json::from_str(&json).expect("json decode");
        for back in [&from_postcard, &from_json] {
            assert_eq!(back, &s);
            assert_eq!(back.expr(), expr);
            assert_eq!(ticks(back, start, 5), ticks(&s, start, 5));
        }
    }
    let json = serde_json::to_value(sched("@daily", "")).expect("json encode");
    assert_eq!(
        json,
        serde_json::json!({"expr": "@daily", "tz": "UTC"}),
        "empty tz is stored as UTC"
    );
    for policy in [MissedTickPolicy::Skip, MissedTickPolicy::RunOnce] {
        let bytes = postcard::to_allocvec(&policy).expect("postcard encode");
        assert_eq!(
            postcard::from_bytes::<MissedTickPolicy>(&bytes).expect("decode"),
            policy
        );
    }
}

/// A stored schedule that no longer parses fails deserialization with the parse error, in both
/// formats, instead of becoming a different schedule.
#[test]
fn serde_refuses_schedules_that_do_not_parse() {
    let err = serde_json::from_str::<CronSchedule>(r#"{"expr":"61 * * * *","tz":"UTC"}"#)
        .expect_err("bad minute");
    assert!(err.to_string().contains("minute"), "{err}");
    let err = serde_json::from_str::<CronSchedule>(r#"{"expr":"@daily","tz":"Mars/Base"}"#)
        .expect_err("bad tz");
    assert!(err.to_string().contains("Mars/Base"), "{err}");

    // The same two strings, postcard-encoded by a look-alike struct.
    #[derive(serde::Serialize)]
    struct LookAlike<'a> {
        expr: &'a str,
        tz: &'a str,
    }
    let good = postcard::to_allocvec(&LookAlike {
        expr: "0 12 * * *",
        tz: "Europe/Berlin",
    })
    .expect("encode");
    assert_eq!(
        postcard::from_bytes::<CronSchedule>(&good).expect("decode"),
        sched("0 12 * * *", "Europe/Berlin")
    );
    let bad = postcard::to_allocvec(&LookAlike {
        expr: "0 12 * * * * * *",
        tz: "Europe/Berlin",
    })
    .expect("encode");
    assert!(postcard::from_bytes::<CronSchedule>(&bad).is_err());
    assert!(postcard::from_bytes::<CronSchedule>(&[0xff, 0xff, 0xff]).is_err());
}

// ----- properties -----

/// Strings built from cron's own alphabet, so the parser gets past its first checks often.
fn cronish() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("*".to_string()),
        Just("?".to_string()),
        Just("L".to_string()),
        Just("W".to_string()),
        Just("#".to_string()),
        Just("+".to_string()),
        Just("@".to_string()),
        Just("@daily".to_string()),
        Just("/".to_string()),
        Just("-".to_string()),
        Just(",".to_string()),
        Just(" ".to_string()),
        Just("MON".to_string()),
        Just("JAN".to_string()),
        Just("é".to_string()),
        (0u32..100_000).prop_map(|n| n.to_string()),
    ];
    prop::collection::vec(token, 0..24).prop_map(|v| v.concat())
}

fn zone() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "",
        "UTC",
        "America/New_York",
        "Europe/Berlin",
        "Australia/Lord_Howe",
        "Asia/Kathmandu",
        "Pacific/Apia",
        "Nowhere/Else",
    ])
}

/// Valid-looking expressions over every field, with lists, ranges and steps.
fn valid_expr() -> impl Strategy<Value = String> {
    fn field(min: u32, max: u32) -> impl Strategy<Value = String> {
        prop_oneof![
            Just("*".to_string()),
            (min..=max).prop_map(|v| v.to_string()),
            (min..=max, min..=max).prop_map(|(a, b)| format!("{}-{}", a.min(b), a.max(b))),
            (1..=max.max(1)).prop_map(|s| format!("*/{s}")),
            (min..=max, min..=max).prop_map(|(a, b)| format!("{a},{b}")),
        ]
    }
    (
        field(0, 59),
        field(0, 23),
        field(1, 31),
        field(1, 12),
        field(0, 7),
    )
        .prop_map(|(mi, h, dom, mo, dow)| format!("{mi} {h} {dom} {mo} {dow}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// No string, however malformed or non-ASCII, makes parse or next_after panic, and every
    /// answer from next_after is strictly after its argument.
    #[test]
    fn no_input_panics(
        expr in prop_oneof![any::<String>(), cronish(), "[ -~]{0,300}"],
        tz in prop_oneof![any::<String>(), zone().prop_map(str::to_string)],
        after in any::<u64>(),
        after_recent in 0u64..4_102_444_800_000,
    ) {
        if let Ok(s) = CronSchedule::parse(&expr, &tz) {
            for a in [after, after_recent] {
                if let Some(next) = s.next_after(a) {
                    prop_assert!(next > a);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// next_after is consistent: any instant between `t` and its next tick has the same next
    /// tick, so no tick lies in between and `plan_fire`'s bisection is sound. Checked in zones
    /// with DST, half-hour DST (Lord Howe) and a skipped day (Apia, 2011).
    #[test]
    fn next_after_has_no_tick_in_between(
        expr in valid_expr(),
        tz in zone().prop_filter("known zones", |z| *z != "Nowhere/Else"),
        start in 1_293_840_000_000u64..1_893_456_000_000,
        probes in prop::collection::vec(any::<u64>(), 1..8),
    ) {
        let s = sched(&expr, tz);
        if let Some(next) = s.next_after(start) {
            prop_assert!(next > start);
            for p in probes {
                let between = start + p % (next - start);
                prop_assert_eq!(s.next_after(between), Some(next), "probe {}", between);
            }
        }
    }

    /// Planning again and again as time moves on never fires a tick twice or out of order,
    /// never fires a tick after `now`, fires at most the limit per plan, and accounts for every
    /// due tick it passes: fired, or counted missed only if it was late (past the grace). The
    /// next tick is strictly after `now` unless the limit cut the plan short.
    #[test]
    fn plans_never_repeat_or_lose_a_tick(
        expr in valid_expr(),
        tz in zone().prop_filter("known zones", |z| *z != "Nowhere/Else"),
        start in 1_700_000_000_000u64..1_800_000_000_000,
        steps in prop::collection::vec(0u64..3 * DAY_MS, 1..20),
        run_once in any::<bool>(),
        grace_ms in 0u64..2 * HOUR_MS,
        fires_max in 1usize..12,
    ) {
        let s = sched(&expr, tz);
        let policy = if run_once { MissedTickPolicy::RunOnce } else { MissedTickPolicy::Skip };
        let Some(mut next) = s.next_after(start) else { return Ok(()) };
        let mut now = start;
        let mut last_fired: Option<u64> = None;
        for step in steps {
            now += step;
            let plan = s.plan_fire(next, now, policy, grace_ms, fires_max);
            if now < next {
                prop_assert_eq!(plan, FirePlan {
                    fire: vec![], missed: 0, missed_capped: false, next_tick_ms: Some(next),
                });
                continue;
            }
            prop_assert!(plan.fire.len() <= fires_max);
            for &fired in &plan.fire {
                prop_assert!(fired >= next && fired <= now);
                prop_assert!(last_fired.is_none_or(|l| fired > l), "in order, never twice");
                last_fired = Some(fired);
            }
            // Only RunOnce's one job for the late ticks may be late itself.
            let late = |t: u64| now - t > grace_ms;
            let late_fired = plan.fire.iter().filter(|&&t| late(t)).count();
            prop_assert!(late_fired <= usize::from(run_once));
            let full = plan.fire.len() == fires_max;
            match plan.next_tick_ms {
                Some(n) if full => prop_assert!(n > *plan.fire.last().unwrap_or(&next)),
                Some(n) => {
                    prop_assert!(n > now);
                    prop_assert_eq!(Some(n), s.next_after(now));
                }
                None => {}
            }
            if !plan.missed_capped {
                // Every due tick the plan passed is fired or counted missed.
                let passed = ticks_in(&s, next, plan.next_tick_ms.map_or(now, |n| n - 1));
                prop_assert_eq!(passed.len() as u64, plan.fire.len() as u64 + plan.missed);
                prop_assert!(passed.iter().filter(|&&t| !plan.fire.contains(&t)).all(|&t| late(t)));
            }
            match plan.next_tick_ms {
                Some(n) => next = n,
                None => break,
            }
        }
    }
}

/// Every tick in `[from, to]`, walked one by one (bounded: the caller's range holds at most the
/// counting limit plus the fire limit of ticks when a plan was not capped).
fn ticks_in(s: &CronSchedule, from: u64, to: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut t = Some(from).filter(|&f| f <= to && s.next_after(f.saturating_sub(1)) == Some(f));
    while let Some(tick) = t.filter(|&t| t <= to) {
        out.push(tick);
        t = s.next_after(tick);
    }
    out
}
