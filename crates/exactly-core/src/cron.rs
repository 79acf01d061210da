//! Cron schedule math: parse a cron expression in an IANA time zone, find the next tick after an
//! instant, and decide what to fire after the scheduler was away (an outage, a leader change).
//!
//! Everything here is a pure function of its arguments: instants are Unix epoch milliseconds
//! (UTC) passed in by the caller, never read from a clock. The state machine stores a
//! [`CronSchedule`] per recurring schedule and calls [`CronSchedule::next_after`] and
//! [`CronSchedule::plan_fire`] while applying a committed FireSchedules entry, so every replica
//! computes the same ticks.
//!
//! # Expressions
//!
//! The standard five fields `minute hour day-of-month month day-of-week`, each with lists (`1,15`),
//! ranges (`1-5`), steps (`*/10`, `0-30/5`) and names (`JAN`-`DEC` in the month field,
//! `SUN`-`SAT` in the day-of-week field, case-insensitive; 0 and 7 are both Sunday). An optional
//! sixth field in front gives seconds (`30 0 12 * * *` is 12:00:30 every day). The macros
//! `@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily`, `@midnight` and `@hourly` stand for
//! `0 0 1 1 *`, `0 0 1 1 *`, `0 0 1 * *`, `0 0 * * 0`, `0 0 * * *`, `0 0 * * *` and `0 * * * *`.
//! When both day-of-month and day-of-week are restricted, a day matches if *either* matches
//! (Vixie cron). The parser is the `croner` crate, whose extensions are accepted too: `L` (last day
//! of the month, or with `#` the last such weekday), `W` (nearest weekday), `#` (nth weekday,
//! `5#2` is the second Friday), `?` (same as `*` in the day fields) and a leading `+` on the
//! day-of-week field (day-of-month AND day-of-week). A year field is not accepted. Expressions are
//! at most [`CRON_EXPR_BYTES_MAX`] bytes; time zone names at most [`CRON_TZ_BYTES_MAX`].
//!
//! # Time zones and daylight saving time
//!
//! A schedule is evaluated on the wall clock of its time zone (an empty name means `UTC`). Where
//! the wall clock jumps, croner distinguishes two kinds of schedules:
//!
//! * **Fixed-time** schedules name exactly one second, one minute and one hour (`30 2 * * *`,
//!   `@daily`, `0 0 9 * * MON-FRI`).
//!   - A time skipped by spring-forward (02:30 on the day New York or Berlin jumps from 02:00 to
//!     03:00) fires once, at the first instant after the gap (03:00 local, the moment of the
//!     jump), as Vixie cron does.
//!   - A time repeated by fall-back (01:30 in New York on the November day) fires once, at its
//!     first occurrence (daylight time), not again an hour later.
//! * **Interval** schedules are all others (a `*`, a step, a list or a range in the second, minute
//!   or hour field: `0 * * * *`, `*/15 * * * *`, `0 1,2 * * *`). They follow real time:
//!   - wall-clock times inside a spring-forward gap do not exist and are not fired (an hourly
//!     schedule fires at 01:00 and then at 03:00, one hour of real time later);
//!   - wall-clock times repeated by fall-back fire at both occurrences (an hourly schedule fires
//!     at 01:00 daylight time and 01:00 standard time, one real hour apart).
//!
//!   So an hourly schedule fires once per real hour across both transitions. This differs from
//!   Vixie cron for lists and ranges without a `*` (Vixie treats `30 1,2 * * *` like a fixed-time
//!   job; croner treats it as an interval: 02:30 is skipped on the spring day and 01:30 fires twice
//!   on the fall day).
//!
//! **The time zone database is compiled into the binary** (`chrono-tz`, IANA release
//! [`TZDB_VERSION`]); nothing reads `/usr/share/zoneinfo`. Replicas compute ticks while applying
//! the log, so every node of one cluster must run the same build: two builds with different
//! releases could disagree on a tick for a zone whose rules changed between them. chrono-tz lists
//! transitions through 2099 and keeps the last offset after that (New York stays on standard
//! time from November 2099), and croner searches no further than the year 5000.
//!
//! # Late and missed ticks
//!
//! [`CronSchedule::plan_fire`] turns "the stored next tick, and the time now" into the ticks to
//! fire now and the new next tick. Every tick in `[next tick, now]` is due; a due tick is *late*
//! when `now - tick > late_grace_ms` and *recent* otherwise (late, perhaps, but within the
//! grace: it came due while no leader could fire it, during a failover).
//!
//! * Recent ticks each fire their own job, oldest first, whatever the policy.
//! * Late ticks follow the [`MissedTickPolicy`]: [`MissedTickPolicy::Skip`] counts them as missed
//!   and fires nothing for them; [`MissedTickPolicy::RunOnce`] fires one job for all of them,
//!   for the newest late tick (before the recent ones, so the fired ticks stay in tick order).
//!
//! At most `fires_max` ticks fire per plan (the state machine passes
//! [`crate::limits::CRON_CATCH_UP_FIRES_MAX`]); when more are due, the new next tick is the first
//! one left (still due, so the caller plans again at once) and nothing is skipped for it.
//! Otherwise the new next tick is the first tick strictly after now. Fired ticks strictly
//! increase from plan to plan, so no tick is ever fired twice.
//!
//! Counting late ticks walks them one by one, so the count stops at
//! [`CRON_MISSED_TICKS_COUNTED_MAX`] ([`FirePlan::missed_capped`] then says it is a lower bound);
//! the newest late tick is still found exactly, by bisection, in bounded work, and recent ticks
//! are walked only up to `fires_max`.
//!
//! # Cost
//!
//! Measured in a release build on the 2-core development machine
//! (`cargo run --release -p exactly-core --example cron_timing`): `parse` 50-120 µs (croner fills
//! a bit per year up to 5000 for the implicit year field), `next_after` about 3 µs for everyday
//! schedules and 0.6 ms for `0 0 29 2 +MON` (28 years of days searched), under 1 µs for a
//! schedule whose days never exist, and `plan_fire` about 3.5 ms for an every-minute schedule
//! after a year away (the counting limit plus bisection).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, TimeZone};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes of a cron expression, at most (checked before any parsing).
pub const CRON_EXPR_BYTES_MAX: usize = 256;

/// Bytes of a time zone name, at most. The longest IANA name is about 32 bytes.
pub const CRON_TZ_BYTES_MAX: usize = 64;

/// Missed ticks that [`CronSchedule::plan_fire`] counts one by one, at most. An every-minute
/// schedule after a year's outage has half a million missed ticks; walking them all inside apply
/// would stall every replica, so the count stops here and is reported as a lower bound.
pub const CRON_MISSED_TICKS_COUNTED_MAX: u64 = 1024;

/// The IANA time zone database release compiled into this build. Nodes of one cluster must agree
/// on it (see the module docs); it is worth showing in a node's status.
pub const TZDB_VERSION: &str = chrono_tz::IANA_TZDB_VERSION;

/// The time zone an empty time zone name stands for.
const DEFAULT_TZ: &str = "UTC";

/// Field names of the five-field form, in order.
const FIELDS_5: [&str; 5] = ["minute", "hour", "day-of-month", "month", "day-of-week"];
/// Field names of the six-field form, in order.
const FIELDS_6: [&str; 6] = [
    "second",
    "minute",
    "hour",
    "day-of-month",
    "month",
    "day-of-week",
];

/// Macros and the five-field expressions they stand for. Expanded here rather than by croner
/// because croner lacks `@midnight` and accepts `@` words anywhere in an expression.
const MACROS: [(&str, &str); 7] = [
    ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
    ("@monthly", "0 0 1 * *"),
    ("@weekly", "0 0 * * 0"),
    ("@daily", "0 0 * * *"),
    ("@midnight", "0 0 * * *"),
    ("@hourly", "0 * * * *"),
];

const MONTH_NAMES: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const WEEKDAY_NAMES: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// Why a cron expression or time zone was refused. Each variant names what is wrong so the API
/// edge can pass the message on to the user as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    /// The expression is empty or only whitespace.
    #[error("cron expression is empty")]
    Empty,
    /// The expression is longer than [`CRON_EXPR_BYTES_MAX`].
    #[error("cron expression is {len_bytes} bytes long; at most {max_bytes} bytes are allowed")]
    ExprTooLong {
        /// Bytes in the expression.
        len_bytes: usize,
        /// The limit, [`CRON_EXPR_BYTES_MAX`].
        max_bytes: usize,
    },
    /// A word starting with `@` that is not one of the supported macros.
    #[error(
        "unknown cron macro {0:?}; expected @yearly, @annually, @monthly, @weekly, @daily, \
         @midnight or @hourly"
    )]
    UnknownMacro(String),
    /// Not five or six whitespace-separated fields.
    #[error(
        "cron expression {expr:?} has {count} fields; expected 5 (minute hour day-of-month month \
         day-of-week) or 6 (second minute hour day-of-month month day-of-week)"
    )]
    FieldCount {
        /// The expression as given.
        expr: String,
        /// Fields found.
        count: usize,
    },
    /// One field is malformed or out of range.
    #[error("cron field {field} {value:?} is invalid: {reason}")]
    BadField {
        /// Which field: `second`, `minute`, `hour`, `day-of-month`, `month` or `day-of-week`.
        field: &'static str,
        /// The field as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The expression is refused but no single field can be blamed.
    #[error("cron expression {expr:?} is invalid: {reason}")]
    BadExpression {
        /// The expression as given.
        expr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The time zone name is longer than [`CRON_TZ_BYTES_MAX`].
    #[error("time zone name is {len_bytes} bytes long; at most {max_bytes} bytes are allowed")]
    TzTooLong {
        /// Bytes in the name.
        len_bytes: usize,
        /// The limit, [`CRON_TZ_BYTES_MAX`].
        max_bytes: usize,
    },
    /// The time zone is not in the compiled-in IANA database.
    #[error(
        "unknown time zone {0:?}; expected an IANA name such as \"Europe/Berlin\", \
         \"America/New_York\" or \"UTC\" (names are case-sensitive)"
    )]
    UnknownTimeZone(String),
}

/// A recurring schedule: a cron expression evaluated on the wall clock of an IANA time zone.
///
/// Serialized as its two strings (`expr`, `tz`) and parsed again when deserialized, so a snapshot
/// holds exactly what the user gave and a schedule that no longer parses fails deserialization
/// with a [`CronError`] message instead of becoming a different schedule.
#[derive(Clone)]
pub struct CronSchedule {
    /// The expression exactly as given (macros unexpanded, whitespace kept).
    expr: String,
    /// The time zone name; `UTC` when the caller gave an empty name.
    tz_name: String,
    tz: Tz,
    cron: Cron,
    /// Whether any calendar day matches the day and month fields (see [`calendar_days_exist`]).
    days_exist: bool,
}

impl CronSchedule {
    /// Parses `expr` (see the module docs for the syntax) in the IANA time zone `tz` (an empty
    /// `tz` means `UTC`). Never panics; every refusal is a [`CronError`] naming what is wrong.
    pub fn parse(expr: &str, tz: &str) -> Result<CronSchedule, CronError> {
        let cron = parse_expr(expr)?;
        let tz_name = if tz.is_empty() { DEFAULT_TZ } else { tz };
        if tz_name.len() > CRON_TZ_BYTES_MAX {
            return Err(CronError::TzTooLong {
                len_bytes: tz_name.len(),
                max_bytes: CRON_TZ_BYTES_MAX,
            });
        }
        let zone =
            Tz::from_str(tz_name).map_err(|_| CronError::UnknownTimeZone(tz_name.to_string()))?;
        Ok(CronSchedule {
            expr: expr.to_string(),
            tz_name: tz_name.to_string(),
            tz: zone,
            days_exist: calendar_days_exist(&cron),
            cron,
        })
    }

    /// The expression exactly as given to [`CronSchedule::parse`].
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The time zone name (`UTC` if [`CronSchedule::parse`] was given an empty name).
    pub fn tz(&self) -> &str {
        &self.tz_name
    }

    /// False when no calendar day can ever match the day-of-month, month and day-of-week fields
    /// (`0 0 31 2 *`, `0 0 30 2 +MON`): the schedule never fires, and the API edge may refuse it.
    /// True does not promise a tick: a schedule whose only times fall inside a DST gap in its zone
    /// could still never fire ([`CronSchedule::next_after`] then answers `None`).
    pub fn days_exist(&self) -> bool {
        self.days_exist
    }

    /// The first tick strictly after `after_ms` (Unix epoch milliseconds, UTC), evaluated on the
    /// schedule's wall clock with the DST rules of the module docs.
    ///
    /// `None` when the schedule never fires again: an impossible date (`0 0 31 2 *`), a tick past
    /// the year 5000 (croner's search horizon), or `after_ms` beyond what a calendar can
    /// represent. The work is bounded: croner steps through years, months and days by matching
    /// calendar fields, not minute by minute, and stops at its horizon; a schedule whose days
    /// never exist answers at once, without searching (see [`CronSchedule::days_exist`]).
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        if !self.days_exist {
            return None;
        }
        // Ticks fall on whole seconds, so searching from the whole second that contains
        // `after_ms`, exclusively, finds the first tick strictly after `after_ms` too.
        let secs = i64::try_from(after_ms / 1000).ok()?;
        let start: DateTime<Tz> = self.tz.timestamp_opt(secs, 0).single()?;
        let next = self.cron.find_next_occurrence(&start, false).ok()?;
        let next_ms = u64::try_from(next.timestamp_millis()).ok()?;
        // The contract callers rely on to never fire a tick twice; a search that answered
        // otherwise would be a bug in the parser crate, and ending the schedule beats repeating.
        (next_ms > after_ms).then_some(next_ms)
    }

    /// Decides what to fire when the scheduler looks at this schedule at `now_ms`, given the tick
    /// it stored as next (`next_tick_ms`, from an earlier [`CronSchedule::next_after`] or plan).
    ///
    /// * `now_ms < next_tick_ms`: nothing is due; nothing fires and the next tick is unchanged.
    /// * Otherwise every tick in `[next_tick_ms, now_ms]` is due (see the module docs). Under
    ///   [`MissedTickPolicy::RunOnce`] the newest late tick (`now_ms - tick > late_grace_ms`)
    ///   fires for all late ones; then every recent tick fires, oldest first; at most `fires_max`
    ///   in all (0 counts as 1). Late ticks not fired are counted in [`FirePlan::missed`]. The new
    ///   next tick is the first tick not fired: strictly after `now_ms` unless `fires_max` cut
    ///   the plan short.
    pub fn plan_fire(
        &self,
        next_tick_ms: u64,
        now_ms: u64,
        policy: MissedTickPolicy,
        late_grace_ms: u64,
        fires_max: usize,
    ) -> FirePlan {
        if now_ms < next_tick_ms {
            return FirePlan {
                fire: Vec::new(),
                missed: 0,
                missed_capped: false,
                next_tick_ms: Some(next_tick_ms),
            };
        }
        let fires_max = fires_max.max(1);
        // Ticks before this are late: now - tick > grace.
        let late_before = now_ms.saturating_sub(late_grace_ms);

        // Walk the late ticks oldest first, counting them, up to the counting limit.
        let mut late: u64 = 0;
        let mut newest_late = None;
        let mut capped = false;
        if next_tick_ms < late_before {
            late = 1;
            let mut newest = next_tick_ms;
            while let Some(tick) = self.next_after(newest).filter(|&t| t < late_before) {
                if late == CRON_MISSED_TICKS_COUNTED_MAX + 1 {
                    capped = true;
                    break;
                }
                late += 1;
                newest = tick;
            }
            if capped {
                newest = self.newest_due_by_bisection(newest, late_before - 1);
            }
            newest_late = Some(newest);
        }

        let mut fire = Vec::new();
        let mut missed = late;
        if let (Some(tick), MissedTickPolicy::RunOnce) = (newest_late, policy) {
            fire.push(tick);
            missed -= 1;
        }
        // The recent ticks, oldest first, up to the limit.
        let mut next = match newest_late {
            Some(tick) => self.next_after(tick),
            None => Some(next_tick_ms),
        };
        while let Some(tick) = next.filter(|&t| t <= now_ms) {
            if fire.len() == fires_max {
                break;
            }
            fire.push(tick);
            next = self.next_after(tick);
        }
        FirePlan {
            fire,
            missed,
            missed_capped: capped,
            next_tick_ms: next,
        }
    }

    /// The newest tick at or before `bound_ms`, given a tick `known` such that the tick after it
    /// is still at or before `bound_ms`. `next_after` is non-decreasing in its argument, so the
    /// largest `s` in `[known, bound_ms)` with `next_after(s) <= bound_ms` is found by bisection
    /// in at most 64 searches, and the tick after it is the newest one.
    fn newest_due_by_bisection(&self, known: u64, bound_ms: u64) -> u64 {
        let is_due_after = |s: u64| self.next_after(s).is_some_and(|t| t <= bound_ms);
        // Invariant: is_due_after(lo) and !is_due_after(hi) (next_after(bound_ms) > bound_ms).
        let mut lo = known;
        let mut hi = bound_ms;
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if is_due_after(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        // `lo` satisfies the invariant, so this is Some and at most bound_ms; `known` is a safe
        // answer should the parser crate ever break monotonicity.
        self.next_after(lo)
            .filter(|&t| t <= bound_ms)
            .unwrap_or(known)
    }
}

/// What to do with ticks that are due and late: more than the grace after their time (see
/// [`CronSchedule::plan_fire`]). Ticks within the grace always fire, each its own job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MissedTickPolicy {
    /// Fire nothing for late ticks: count them as missed.
    Skip,
    /// Fire one job for all late ticks, for the newest of them, however many and however late.
    RunOnce,
}

/// The outcome of [`CronSchedule::plan_fire`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirePlan {
    /// The ticks to fire a job for now, oldest first: under [`MissedTickPolicy::RunOnce`] the
    /// newest late tick (for all late ones), then the due ticks within the grace.
    pub fire: Vec<u64>,
    /// Late ticks not fired. A lower bound when `missed_capped` is set.
    pub missed: u64,
    /// More than [`CRON_MISSED_TICKS_COUNTED_MAX`] ticks were late, so `missed` is "at least".
    pub missed_capped: bool,
    /// The first tick not fired: strictly after `now_ms`, unless the plan stopped at its
    /// `fires_max` with more ticks due; `None` if the schedule never fires again.
    pub next_tick_ms: Option<u64>,
}

impl PartialEq for CronSchedule {
    fn eq(&self, other: &Self) -> bool {
        // The parsed parts are functions of the two strings.
        self.expr == other.expr && self.tz_name == other.tz_name
    }
}

impl Eq for CronSchedule {}

impl fmt::Debug for CronSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CronSchedule")
            .field("expr", &self.expr)
            .field("tz", &self.tz_name)
            .finish()
    }
}

/// The serialized form of a [`CronSchedule`], borrowed for serializing.
#[derive(Serialize)]
#[serde(rename = "CronSchedule")]
struct CronScheduleRef<'a> {
    expr: &'a str,
    tz: &'a str,
}

/// The serialized form of a [`CronSchedule`], owned for deserializing. Same fields, same order.
#[derive(Deserialize)]
#[serde(rename = "CronSchedule")]
struct CronScheduleOwned {
    expr: String,
    tz: String,
}

impl Serialize for CronSchedule {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        CronScheduleRef {
            expr: &self.expr,
            tz: &self.tz_name,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for CronSchedule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let owned = CronScheduleOwned::deserialize(deserializer)?;
        CronSchedule::parse(&owned.expr, &owned.tz).map_err(serde::de::Error::custom)
    }
}

/// Checks and parses an expression into croner's form.
fn parse_expr(expr: &str) -> Result<Cron, CronError> {
    if expr.len() > CRON_EXPR_BYTES_MAX {
        return Err(CronError::ExprTooLong {
            len_bytes: expr.len(),
            max_bytes: CRON_EXPR_BYTES_MAX,
        });
    }
    let trimmed = expr.trim();
    if trimmed.is_empty() {
        return Err(CronError::Empty);
    }
    let expanded = if trimmed.starts_with('@') {
        MACROS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(trimmed))
            .map(|(_, expansion)| *expansion)
            .ok_or_else(|| CronError::UnknownMacro(trimmed.to_string()))?
    } else {
        trimmed
    };

    let fields: Vec<&str> = expanded.split_whitespace().collect();
    let names: &[&'static str] = match fields.len() {
        5 => &FIELDS_5,
        6 => &FIELDS_6,
        count => {
            return Err(CronError::FieldCount {
                expr: expr.to_string(),
                count,
            })
        }
    };
    for (&field, &name) in fields.iter().zip(names) {
        check_field_chars(name, field)?;
    }

    match parser().parse(expanded) {
        Ok(cron) => Ok(cron),
        Err(err) => Err(
            blame_field(&fields, names).unwrap_or_else(|| CronError::BadExpression {
                expr: expr.to_string(),
                reason: err.to_string(),
            }),
        ),
    }
}

/// The one parser configuration: optional seconds, no year field, POSIX weekdays (0 and 7 are
/// Sunday), day-of-month OR day-of-week unless the pattern says `+`, strict step syntax.
fn parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
}

/// Refuses characters and names that do not belong in a field, before croner sees the field:
/// croner replaces weekday and month names anywhere in the expression (so `MON` in the month
/// field would quietly mean January) and its messages do not say which field is wrong.
fn check_field_chars(name: &'static str, field: &str) -> Result<(), CronError> {
    let bad = |reason: String| CronError::BadField {
        field: name,
        value: field.to_string(),
        reason,
    };
    let (extra_chars, words): (&[char], &[&str]) = match name {
        "day-of-month" => (&['?'], &["L", "W", "LW"]),
        "month" => (&[], &MONTH_NAMES),
        "day-of-week" => (&['?', '#', '+'], &WEEKDAY_NAMES),
        _ => (&[], &[]),
    };
    if let Some(c) = field.chars().find(|&c| {
        !(c.is_ascii_alphanumeric()
            || matches!(c, '*' | ',' | '-' | '/')
            || extra_chars.contains(&c))
    }) {
        return Err(bad(format!("character {c:?} is not allowed here")));
    }
    for word in field
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|w| !w.is_empty())
    {
        let upper = word.to_ascii_uppercase();
        // `L` also ends a weekday (`5L`, `FRI#L`), so it is allowed in day-of-week on its own.
        let known = words.contains(&upper.as_str()) || (name == "day-of-week" && upper == "L");
        if !known {
            let expected = match name {
                "month" => "a month name JAN-DEC",
                "day-of-week" => "a weekday name SUN-SAT or L",
                "day-of-month" => "L or W",
                _ => "digits only",
            };
            return Err(bad(format!(
                "{word:?} is not allowed here; expected {expected}"
            )));
        }
    }
    Ok(())
}

/// Whether any calendar day matches the pattern's day and month fields.
///
/// croner would find out by searching day by day up to the year 5000 (about 0.3 s in a debug
/// build for `0 0 31 2 *`), on every call. Whether a day matches depends only on its month, the
/// month's length, the weekday of its first day and the day number, so checking one month of
/// each such shape decides it. The 28 years 2001-2028 contain every shape: in 1901-2099 the
/// calendar repeats every 28 years, and each month starts on each weekday within one cycle, in
/// leap and common years alike.
fn calendar_days_exist(cron: &Cron) -> bool {
    let pattern = &cron.pattern;
    // Shapes already checked, as bits of (month, leap, first weekday).
    let mut seen = [[[false; 7]; 2]; 12];
    for year in 2001..=2028 {
        for month in 1..=12u32 {
            if !pattern.month_match(month).unwrap_or(false) {
                continue;
            }
            let Some(first) = chrono::NaiveDate::from_ymd_opt(year, month, 1) else {
                continue;
            };
            let first_weekday = first.weekday().num_days_from_sunday();
            let length = croner::time::days_in_month(year, month);
            let leap = usize::from(croner::time::is_leap_year(year));
            let shape = &mut seen[month as usize - 1][leap][first_weekday as usize];
            if *shape {
                continue;
            }
            *shape = true;
            let first_weekday = croner::Weekday::from_days_from_sunday(first_weekday);
            for day in 1..=length {
                let weekday = first_weekday.shift(day as i32 - 1);
                if pattern
                    .day_match(year, month, day, weekday)
                    .unwrap_or(false)
                {
                    return true;
                }
            }
        }
    }
    false
}

/// Finds the first field that croner refuses on its own (every other field `*`), to name it.
fn blame_field(fields: &[&str], names: &[&'static str]) -> Option<CronError> {
    (0..fields.len()).find_map(|i| {
        let probe: Vec<&str> = (0..fields.len())
            .map(|j| if j == i { fields[j] } else { "*" })
            .collect();
        parser()
            .parse(&probe.join(" "))
            .err()
            .map(|err| CronError::BadField {
                field: names[i],
                value: fields[i].to_string(),
                reason: croner_reason(&err),
            })
    })
}

/// croner's message without its generic prefix.
fn croner_reason(err: &croner::errors::CronError) -> String {
    match err {
        croner::errors::CronError::InvalidPattern(msg)
        | croner::errors::CronError::IllegalCharacters(msg)
        | croner::errors::CronError::ComponentError(msg) => msg.clone(),
        other => other.to_string(),
    }
}
