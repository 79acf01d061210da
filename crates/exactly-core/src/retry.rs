//! Retry delays: exponential backoff with "equal jitter".
//!
//! The jitter is random but apply must be deterministic, so the leader draws the randomness
//! ([`crate::Request::entropy`]) and every replica derives the same delay from it here.

use crate::job::Backoff;
use crate::limits::{RETRY_BACKOFF_BASE_MS, RETRY_BACKOFF_MAX_MS};
use crate::JobId;

impl Backoff {
    /// The backoff with zero fields replaced by the built-in defaults.
    pub fn or_defaults(self) -> Backoff {
        let base_ms = if self.base_ms == 0 {
            RETRY_BACKOFF_BASE_MS
        } else {
            self.base_ms
        };
        let max_ms = if self.max_ms == 0 {
            RETRY_BACKOFF_MAX_MS.max(base_ms)
        } else {
            self.max_ms
        };
        Backoff { base_ms, max_ms }
    }
}

/// The backoff ceiling before retry number `failures + 1`: `base × 2^(failures − 1)`, capped.
pub fn backoff_ceiling_ms(failures: u32, backoff: Backoff) -> u64 {
    let b = backoff.or_defaults();
    let shift = failures.saturating_sub(1).min(40);
    b.base_ms.saturating_mul(1u64 << shift).min(b.max_ms)
}

/// The delay before retry number `failures + 1`: uniformly in `[ceiling / 2, ceiling]`, drawn
/// from the leader's `entropy` and the job id (so jobs failing in one entry spread out).
pub fn retry_delay_ms(failures: u32, backoff: Backoff, entropy: u64, job: JobId) -> u64 {
    let ceiling = backoff_ceiling_ms(failures, backoff);
    let floor = ceiling / 2;
    let span = ceiling - floor;
    floor + mix(entropy ^ job.wrapping_mul(0x9E37_79B9_7F4A_7C15)) % (span + 1)
}

/// SplitMix64's finaliser: spreads the bits of `x` so nearby inputs give unrelated outputs.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}
