//! Prints how long the cron schedule math takes for typical and worst-case schedules, so the
//! figures quoted in `cron.rs` and ARCHITECTURE.md can be reproduced:
//! `cargo run --release -p exactly-core --example cron_timing`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use exactly_core::cron::{CronSchedule, MissedTickPolicy};

/// 2025-01-01T00:00:00Z in Unix epoch milliseconds.
const START_MS: u64 = 1_735_689_600_000;

/// Mean time of `f` over `runs` runs.
fn mean(runs: u32, mut f: impl FnMut()) -> Duration {
    let started = Instant::now();
    for _ in 0..runs {
        f();
    }
    started.elapsed() / runs
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("{:<44} {:>12}", "operation", "mean");
    for (expr, tz) in [
        ("*/5 * * * *", "UTC"),
        ("30 2 * * *", "America/New_York"),
        ("0 0 31 2 *", "UTC"),
    ] {
        let d = mean(2_000, || {
            black_box(CronSchedule::parse(black_box(expr), tz).ok());
        });
        println!("{:<44} {:>12?}", format!("parse {expr:?} {tz}"), d);
    }
    for (expr, tz, runs) in [
        ("* * * * *", "UTC", 20_000),
        ("0 * * * *", "Europe/Berlin", 20_000),
        ("30 2 * * *", "America/New_York", 20_000),
        ("0 0 29 2 *", "UTC", 2_000),
        ("0 0 29 2 +MON", "UTC", 2_000),
        ("0 0 31 2 *", "UTC", 20_000),
        // Only 02:00-02:59 on New York's spring-forward Sunday: always inside the gap while
        // chrono-tz models DST (through 2099), so the search runs 75 years to March 2100.
        ("*/30 2 * 3 +SUN#2", "America/New_York", 20),
    ] {
        let s = CronSchedule::parse(expr, tz)?;
        let d = mean(runs, || {
            black_box(s.next_after(black_box(START_MS)));
        });
        let next = s.next_after(START_MS);
        println!(
            "{:<44} {:>12?}  (next: {next:?})",
            format!("next_after {expr:?} {tz}"),
            d
        );
    }
    let s = CronSchedule::parse("* * * * *", "UTC")?;
    let year_ms = 365 * 24 * 60 * 60 * 1000;
    let d = mean(20, || {
        black_box(s.plan_fire(
            START_MS,
            START_MS + year_ms,
            MissedTickPolicy::RunOnce,
            30_000,
            exactly_core::limits::CRON_CATCH_UP_FIRES_MAX,
        ));
    });
    println!(
        "{:<44} {:>12?}",
        "plan_fire every minute after 1 year away", d
    );
    Ok(())
}
