//! Queue settings and the rate-limit arithmetic shared by apply and the scheduler.
//!
//! A queue is created by the first job submitted to it; its settings (concurrency limit, rate
//! limit, paused) are replicated commands, so every replica and every future leader enforces the
//! same limits cluster-wide, never per node.

use serde::{Deserialize, Serialize};

use crate::limits::{RATE_JOBS_MAX, RATE_PERIOD_MS_MAX};

/// A queue's settings. The default is unlimited and running.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    /// Jobs of this queue running at once across the whole cluster; 0 means no limit.
    pub concurrency_max: u32,
    /// Attempts started per period, cluster-wide; `None` means no limit.
    pub rate: Option<RateLimit>,
    /// A paused queue starts nothing; running attempts finish.
    pub paused: bool,
}

impl QueueConfig {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(rate) = &self.rate {
            rate.validate()?;
        }
        Ok(())
    }

    /// Whether these are the settings a queue has when nobody configured it.
    pub fn is_default(&self) -> bool {
        *self == QueueConfig::default()
    }
}

/// At most `jobs` attempt starts per `period_ms`, in bursts of at most `jobs`.
///
/// Enforced with the generic cell rate algorithm (GCRA), whose whole state is one timestamp (the
/// "theoretical arrival time", in microseconds), so it is cheap to replicate and needs no timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    pub jobs: u32,
    pub period_ms: u64,
}

impl RateLimit {
    pub fn validate(&self) -> Result<(), String> {
        if self.jobs == 0 || self.jobs > RATE_JOBS_MAX {
            return Err(format!(
                "rate limit jobs must be 1..={RATE_JOBS_MAX}, got {}",
                self.jobs
            ));
        }
        if self.period_ms == 0 || self.period_ms > RATE_PERIOD_MS_MAX {
            return Err(format!(
                "rate limit period must be 1..={RATE_PERIOD_MS_MAX} ms, got {}",
                self.period_ms
            ));
        }
        Ok(())
    }

    /// Microseconds between two starts at the sustained rate (at least 1). Rounded up: rounded
    /// down, the sustained rate would exceed the limit (600 per ms would allow 1,000 per ms).
    fn interval_us(&self) -> u64 {
        self.period_ms
            .saturating_mul(1000)
            .div_ceil(u64::from(self.jobs.max(1)))
            .max(1)
    }

    /// How far ahead of now the theoretical arrival time may run: a burst of `jobs` starts.
    fn tolerance_us(&self) -> u64 {
        self.interval_us()
            .saturating_mul(u64::from(self.jobs.max(1)) - 1)
    }

    /// How many starts the limit allows at `now_ms`, given the state `tat_us`.
    pub fn allowance(&self, tat_us: u64, now_ms: u64) -> u32 {
        let now_us = now_ms.saturating_mul(1000);
        let from = tat_us.max(now_us);
        let limit = now_us.saturating_add(self.tolerance_us());
        if from > limit {
            return 0;
        }
        let n = (limit - from) / self.interval_us() + 1;
        n.min(u64::from(self.jobs)) as u32
    }

    /// Takes one start at `now_ms`: the new state, or `None` if the limit refuses it.
    pub fn take(&self, tat_us: u64, now_ms: u64) -> Option<u64> {
        if self.allowance(tat_us, now_ms) == 0 {
            return None;
        }
        Some(
            tat_us
                .max(now_ms.saturating_mul(1000))
                .saturating_add(self.interval_us()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A limit of 3 per second allows a burst of 3, then one start per 333 ms.
    #[test]
    fn gcra_allows_a_burst_then_the_sustained_rate() {
        let rate = RateLimit {
            jobs: 3,
            period_ms: 1000,
        };
        let mut tat = 0;
        let now = 10_000;
        assert_eq!(rate.allowance(tat, now), 3);
        for _ in 0..3 {
            tat = rate.take(tat, now).expect("within the burst");
        }
        assert_eq!(rate.allowance(tat, now), 0);
        assert_eq!(rate.take(tat, now), None);
        assert_eq!(rate.allowance(tat, now + 332), 0);
        assert_eq!(rate.allowance(tat, now + 334), 1);
        // After a full idle period the whole burst is available again, never more.
        assert_eq!(rate.allowance(tat, now + 60_000), 3);
    }

    /// Zero jobs, a zero period and values past the named limits are refused.
    #[test]
    fn invalid_rate_limits_are_refused() {
        for (jobs, period_ms) in [
            (0, 1000),
            (1, 0),
            (RATE_JOBS_MAX + 1, 1000),
            (1, RATE_PERIOD_MS_MAX + 1),
        ] {
            assert!(RateLimit { jobs, period_ms }.validate().is_err());
        }
        assert!(RateLimit {
            jobs: RATE_JOBS_MAX,
            period_ms: RATE_PERIOD_MS_MAX
        }
        .validate()
        .is_ok());
    }
}
