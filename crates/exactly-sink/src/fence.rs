//! The rule a downstream must follow to apply an external effect exactly once, free of I/O.
//!
//! exactly runs a job again after a failure it cannot rule out (its node crashed, was cut off
//! or paused past its lease), each time with a larger fencing token (`EXACTLY_FENCING_TOKEN` for
//! `exec` handlers, `JobContext::fencing_token` for Rust ones). So one job's effect can arrive
//! more than once, from different attempts, in any order. A downstream that wants the effect
//! applied exactly once must, per job id, in the same transaction as the effect:
//!
//! 1. **Deduplicate by job id.** Apply the first effect for a job. Acknowledge any later one
//!    (with a token not older than the largest seen) as "already applied" (`repeat`) without
//!    applying it again, so the attempt succeeds and the job is not retried forever.
//! 2. **Fence by token.** Keep the largest token seen for the job, raised by every call that is
//!    not refused, and refuse (`stale`) an effect whose token is smaller: it comes from an
//!    attempt the cluster has already replaced, whose process may still be running.
//!
//! Both are needed. Token ordering alone cannot stop a double effect: the re-run after a crash,
//! or after a pause the old process woke from before noticing that its lease had lapsed, holds
//! a *newer* token, so it would be applied on top of the first attempt's effect (the e-mail
//! goes out twice). Deduplicating by job id alone cannot stop a stale attempt that wakes up
//! after a newer one has called from acting as if it were current (overwriting the newer
//! attempt's state, or being reported as the job's effect); the token refuses it.
//!
//! The effect applied is the first one to arrive, which may be an older attempt's if it called
//! before any newer attempt did; that is still exactly once.

use std::collections::BTreeMap;

use serde::Serialize;

/// What the sink does with one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The first effect for the job: applied.
    Applied,
    /// The job's effect was already applied and the token is not older than the largest seen:
    /// acknowledged, not applied again.
    Repeat,
    /// A newer token was seen for the job: refused.
    Stale {
        /// The largest token seen for the job.
        newest: u64,
    },
}

/// What the sink knows about one job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct JobFence {
    /// The token whose effect was applied.
    pub applied_token: u64,
    /// How many times the effect was applied: 1 for every job the sink knows of.
    pub applied: u64,
    /// The largest token seen in a call that was not refused.
    pub newest_token: u64,
    /// Calls acknowledged as already applied.
    pub repeats: u64,
    /// Calls refused because a newer token had been seen.
    pub refused_stale: u64,
}

/// The state of every job the sink has heard of.
#[derive(Clone, Debug, Default)]
pub struct Fence {
    jobs: BTreeMap<u64, JobFence>,
}

impl Fence {
    /// Decides on an effect for `job` from the attempt holding `token`, and records it.
    pub fn offer(&mut self, job: u64, token: u64) -> Verdict {
        let Some(entry) = self.jobs.get_mut(&job) else {
            self.jobs.insert(
                job,
                JobFence {
                    applied_token: token,
                    applied: 1,
                    newest_token: token,
                    ..JobFence::default()
                },
            );
            return Verdict::Applied;
        };
        if token < entry.newest_token {
            entry.refused_stale += 1;
            Verdict::Stale {
                newest: entry.newest_token,
            }
        } else {
            entry.newest_token = token;
            entry.repeats += 1;
            Verdict::Repeat
        }
    }

    /// Every job's state, by job id.
    pub fn jobs(&self) -> &BTreeMap<u64, JobFence> {
        &self.jobs
    }

    /// How many jobs the sink tracks.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of call sequences for one job, the verdict of each call and the job's state after
    /// the last one.
    #[test]
    fn applies_first_repeats_newer_or_equal_refuses_older() {
        use Verdict::*;
        let job = |applied_token, newest_token, repeats, refused_stale| JobFence {
            applied_token,
            applied: 1,
            newest_token,
            repeats,
            refused_stale,
        };
        let cases: &[(&str, &[u64], &[Verdict], JobFence)] = &[
            ("first applies", &[5], &[Applied], job(5, 5, 0, 0)),
            (
                "newer token after applied: repeat, largest token raised",
                &[5, 7],
                &[Applied, Repeat],
                job(5, 7, 1, 0),
            ),
            (
                "same token: repeat",
                &[5, 5],
                &[Applied, Repeat],
                job(5, 5, 1, 0),
            ),
            (
                "older token: stale",
                &[7, 5],
                &[Applied, Stale { newest: 7 }],
                job(7, 7, 0, 1),
            ),
            (
                "older token after a newer repeat: stale",
                &[5, 9, 7, 5, 9],
                &[
                    Applied,
                    Repeat,
                    Stale { newest: 9 },
                    Stale { newest: 9 },
                    Repeat,
                ],
                job(5, 9, 2, 2),
            ),
        ];
        for (what, tokens, want, state) in cases {
            let mut fence = Fence::default();
            let got: Vec<Verdict> = tokens.iter().map(|&t| fence.offer(1, t)).collect();
            assert_eq!(&got, want, "{what}: tokens {tokens:?}");
            assert_eq!(&fence.jobs()[&1], state, "{what}: tokens {tokens:?}");
        }
    }

    /// Jobs do not share state.
    #[test]
    fn state_is_per_job() {
        let mut fence = Fence::default();
        for (job, token) in [(1, 10), (2, 3), (1, 10), (1, 4), (2, 9), (1, 12)] {
            fence.offer(job, token);
        }
        assert_eq!(
            fence.jobs()[&1],
            JobFence {
                applied_token: 10,
                applied: 1,
                newest_token: 12,
                repeats: 2,
                refused_stale: 1,
            }
        );
        assert_eq!(
            fence.jobs()[&2],
            JobFence {
                applied_token: 3,
                applied: 1,
                newest_token: 9,
                repeats: 1,
                refused_stale: 0,
            }
        );
        assert_eq!(fence.len(), 2);
    }
}
