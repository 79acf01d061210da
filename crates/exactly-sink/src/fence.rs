//! The fencing rule, free of I/O: per job, accept an effect only from a token at least as new as
//! the newest one seen.
//!
//! This is what any downstream that receives effects from exactly's handlers should do with
//! `EXACTLY_FENCING_TOKEN`: keep the newest token per job (in the same transaction as the
//! effect) and refuse a smaller one. An older token belongs to an attempt the cluster has
//! already given up on (its node paused, was cut off or crashed), whose process may still be
//! running; without this check its late effect would land after, or on top of, the new one.
//! An equal token is the same attempt repeating itself (a retried request), so it is reported
//! but not applied twice.

use std::collections::BTreeMap;

use serde::Serialize;

/// What the sink does with one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The token is the newest seen for the job: the effect is applied.
    Accepted,
    /// The token equals the newest seen: the same attempt again; not applied twice.
    Repeat,
    /// A newer token was seen for the job: the effect is refused.
    Stale {
        /// The newest token seen for the job.
        newest: u64,
    },
}

/// What the sink knows about one job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct JobFence {
    /// The newest token accepted for the job.
    pub accepted_token: u64,
    /// Every distinct token whose effect was applied, in the order applied (so increasing). More
    /// than one means the job's effect was applied by more than one attempt.
    pub accepted_tokens: Vec<u64>,
    /// Calls applied.
    pub accepted: u64,
    /// Calls that repeated the newest token.
    pub repeats: u64,
    /// Calls refused because a newer token had been seen.
    pub refused_stale: u64,
}

/// The fencing state of every job the sink has heard of.
#[derive(Clone, Debug, Default)]
pub struct Fence {
    jobs: BTreeMap<u64, JobFence>,
}

impl Fence {
    /// Decides on an effect for `job` from the attempt holding `token`, and records it.
    pub fn offer(&mut self, job: u64, token: u64) -> Verdict {
        let entry = self.jobs.entry(job).or_default();
        let verdict = if entry.accepted_tokens.is_empty() || token > entry.accepted_token {
            entry.accepted_token = token;
            entry.accepted_tokens.push(token);
            entry.accepted += 1;
            Verdict::Accepted
        } else if token == entry.accepted_token {
            entry.repeats += 1;
            Verdict::Repeat
        } else {
            entry.refused_stale += 1;
            Verdict::Stale {
                newest: entry.accepted_token,
            }
        };
        debug_assert!(entry.accepted_tokens.windows(2).all(|w| w[0] < w[1]));
        verdict
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

    /// A table of call sequences for one job and the verdict of each call.
    #[test]
    fn accepts_newer_repeats_equal_refuses_older() {
        use Verdict::*;
        let cases: &[(&[u64], &[Verdict])] = &[
            (&[5], &[Accepted]),
            (&[5, 5], &[Accepted, Repeat]),
            (&[5, 7], &[Accepted, Accepted]),
            (&[7, 5], &[Accepted, Stale { newest: 7 }]),
            (
                &[5, 7, 5, 7],
                &[Accepted, Accepted, Stale { newest: 7 }, Repeat],
            ),
        ];
        for (tokens, want) in cases {
            let mut fence = Fence::default();
            let got: Vec<Verdict> = tokens.iter().map(|&t| fence.offer(1, t)).collect();
            assert_eq!(&got, want, "tokens {tokens:?}");
        }
    }

    /// Counts per job reflect every call, and jobs do not share fencing state.
    #[test]
    fn counts_are_per_job() {
        let mut fence = Fence::default();
        for (job, token) in [(1, 10), (2, 3), (1, 10), (1, 4), (2, 9), (1, 12)] {
            fence.offer(job, token);
        }
        assert_eq!(
            fence.jobs()[&1],
            JobFence {
                accepted_token: 12,
                accepted_tokens: vec![10, 12],
                accepted: 2,
                repeats: 1,
                refused_stale: 1,
            }
        );
        assert_eq!(
            fence.jobs()[&2],
            JobFence {
                accepted_token: 9,
                accepted_tokens: vec![3, 9],
                accepted: 2,
                repeats: 0,
                refused_stale: 0,
            }
        );
        assert_eq!(fence.len(), 2);
    }
}
