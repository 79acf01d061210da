//! A seeded fault controller for node-to-node traffic: the test side of
//! [`exactly_node::faults::Faults`].
//!
//! It holds a table of link states between node ids. A link `from → to` can be cut (a partition,
//! both ways or one way), lossy (each message dropped with probability `p`), or slow (each message
//! delayed by a fixed or random time; random delays reorder concurrent messages). Anything not in
//! the table is delivered at once. Every node of a cluster shares one controller, and the network
//! layer asks it for the fate of each message as it leaves.
//!
//! **Reproducibility:** the random draws come from one `StdRng` seeded by the caller, behind a
//! mutex. The *sequence* of draws is fixed by the seed, but which message gets which draw depends
//! on how the nodes' threads interleave, so two runs of one seed are not bit-identical. What a
//! seed reproduces exactly is the fault *schedule* (see [`crate::harness::Schedule`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use exactly_node::faults::{Fate, Faults, FaultsHandle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The state of one directed link `from → to`. The default is a healthy link.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Link {
    /// Every message is lost (a partition in this direction).
    pub cut: bool,
    /// Raft requests are lost, nothing else: the sender dials a stale address for Raft while
    /// forwarded requests and every reply still get through.
    pub raft_cut: bool,
    /// Probability in `0.0..=1.0` that a message is lost.
    pub drop_p: f64,
    /// Each delivered message is delayed by a time drawn uniformly from `min..=max`.
    pub delay: Option<(Duration, Duration)>,
}

impl Link {
    fn is_healthy(&self) -> bool {
        *self == Link::default()
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.cut {
            return f.write_str("cut");
        }
        if self.raft_cut {
            return f.write_str("raft requests cut");
        }
        let mut parts = Vec::new();
        if self.drop_p > 0.0 {
            parts.push(format!("drop {:.0}%", self.drop_p * 100.0));
        }
        if let Some((min, max)) = self.delay {
            parts.push(format!("delay {}..{}ms", min.as_millis(), max.as_millis()));
        }
        if parts.is_empty() {
            parts.push("ok".into());
        }
        f.write_str(&parts.join(", "))
    }
}

/// How many messages met each fate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FateCounts {
    pub delivered: u64,
    pub delayed: u64,
    pub dropped: u64,
}

struct State {
    rng: StdRng,
    links: BTreeMap<(u64, u64), Link>,
}

/// A shared, seeded table of link states. Cheap to share: wrap it in an `Arc` and hand
/// [`FaultController::handle`] to every node.
pub struct FaultController {
    state: Mutex<State>,
    delivered: AtomicU64,
    delayed: AtomicU64,
    dropped: AtomicU64,
}

impl FaultController {
    /// A controller with every link healthy, drawing its random numbers from `seed`.
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                rng: StdRng::seed_from_u64(seed),
                links: BTreeMap::new(),
            }),
            delivered: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    /// The handle nodes are started with (`StartOptions { faults: Some(..) }`).
    pub fn handle(self: &Arc<Self>) -> FaultsHandle {
        self.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, from: u64, to: u64, f: impl FnOnce(&mut Link)) {
        if from == to {
            return;
        }
        let mut state = self.state();
        let link = state.links.entry((from, to)).or_default();
        f(link);
        if link.is_healthy() {
            state.links.remove(&(from, to));
        }
    }

    /// Cuts `from → to` only: requests one way are lost, so are replies the other way.
    pub fn cut_one_way(&self, from: u64, to: u64) {
        self.update(from, to, |l| l.cut = true);
    }

    /// Loses every Raft request `from → to` (appends, votes, snapshots), nothing else: `from`
    /// dials a stale address of `to` for Raft, while `to`'s own requests and all replies pass.
    pub fn cut_raft_requests(&self, from: u64, to: u64) {
        self.update(from, to, |l| l.raft_cut = true);
    }

    /// Cuts both directions between `a` and `b`.
    pub fn cut_both(&self, a: u64, b: u64) {
        self.cut_one_way(a, b);
        self.cut_one_way(b, a);
    }

    /// Cuts every link between `side` and `rest`, both ways: the two groups cannot talk.
    pub fn partition(&self, side: &[u64], rest: &[u64]) {
        for &a in side {
            for &b in rest {
                self.cut_both(a, b);
            }
        }
    }

    /// Cuts `node` off from every node in `all` (itself excepted), both ways.
    pub fn isolate(&self, node: u64, all: &[u64]) {
        self.partition(&[node], all);
    }

    /// Drops each message `from → to` with probability `p` (clamped to `0.0..=1.0`).
    pub fn lossy(&self, from: u64, to: u64, p: f64) {
        self.update(from, to, |l| l.drop_p = p.clamp(0.0, 1.0));
    }

    /// Delays each message `from → to` by a time drawn from `min..=max` (`min == max`: fixed).
    pub fn delay(&self, from: u64, to: u64, min: Duration, max: Duration) {
        let (min, max) = if min <= max { (min, max) } else { (max, min) };
        self.update(from, to, |l| l.delay = Some((min, max)));
    }

    /// Restores `from → to` to a healthy link.
    pub fn heal_link(&self, from: u64, to: u64) {
        self.state().links.remove(&(from, to));
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.state().links.clear();
    }

    /// The state of `from → to`.
    pub fn link(&self, from: u64, to: u64) -> Link {
        self.state()
            .links
            .get(&(from, to))
            .copied()
            .unwrap_or_default()
    }

    /// Whether every link is healthy.
    pub fn is_healed(&self) -> bool {
        self.state().links.is_empty()
    }

    /// Every unhealthy link, for logs: `1→2 cut; 2→3 drop 20%`.
    pub fn describe(&self) -> String {
        let state = self.state();
        if state.links.is_empty() {
            return "healthy".into();
        }
        state
            .links
            .iter()
            .map(|((a, b), l)| format!("{a}→{b} {l}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// How many messages met each fate so far.
    pub fn counts(&self) -> FateCounts {
        FateCounts {
            delivered: self.delivered.load(Ordering::Relaxed),
            delayed: self.delayed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    /// The fate of one message, drawing from the seeded generator.
    fn decide(&self, from: u64, to: u64) -> Fate {
        let mut state = self.state();
        let Some(link) = state.links.get(&(from, to)).copied() else {
            return Fate::Deliver;
        };
        if link.cut {
            return Fate::Drop;
        }
        if link.drop_p > 0.0 && state.rng.random_bool(link.drop_p) {
            return Fate::Drop;
        }
        match link.delay {
            Some((min, max)) if max > Duration::ZERO => {
                let d = if min == max {
                    min
                } else {
                    state.rng.random_range(min..=max)
                };
                Fate::Delay(d)
            }
            _ => Fate::Deliver,
        }
    }
}

impl Faults for FaultController {
    fn fate(&self, from: u64, to: u64) -> Fate {
        let fate = self.decide(from, to);
        let counter = match fate {
            Fate::Deliver => &self.delivered,
            Fate::Delay(_) => &self.delayed,
            Fate::Drop => &self.dropped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        fate
    }

    fn raft_request_fate(&self, from: u64, to: u64) -> Fate {
        if self.link(from, to).raft_cut {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Fate::Drop;
        }
        self.fate(from, to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A healthy controller delivers everything; a cut link drops in its direction only.
    #[test]
    fn cut_one_way_drops_only_that_direction() {
        let f = FaultController::new(1);
        assert_eq!(f.fate(1, 2), Fate::Deliver);
        f.cut_one_way(1, 2);
        assert_eq!(f.fate(1, 2), Fate::Drop);
        assert_eq!(f.fate(2, 1), Fate::Deliver);
        f.heal();
        assert_eq!(f.fate(1, 2), Fate::Deliver);
        assert!(f.is_healed());
        assert_eq!(
            f.counts(),
            FateCounts {
                delivered: 3,
                delayed: 0,
                dropped: 1
            }
        );
    }

    /// A partition cuts every link across it, both ways, and none inside a side.
    #[test]
    fn partition_cuts_across_not_within() {
        let f = FaultController::new(1);
        f.partition(&[1], &[2, 3]);
        for (a, b) in [(1, 2), (2, 1), (1, 3), (3, 1)] {
            assert_eq!(f.fate(a, b), Fate::Drop, "{a}→{b}");
        }
        assert_eq!(f.fate(2, 3), Fate::Deliver);
        assert_eq!(f.fate(3, 2), Fate::Deliver);
        assert!(f.describe().contains("1→2 cut"), "{}", f.describe());
    }

    /// The same seed gives the same sequence of fates for the same sequence of messages, and a
    /// lossy link drops about `p` of its messages.
    #[test]
    fn fates_are_deterministic_per_seed() {
        let run = |seed| {
            let f = FaultController::new(seed);
            f.lossy(1, 2, 0.3);
            f.delay(2, 1, Duration::from_millis(5), Duration::from_millis(50));
            (0..2000)
                .map(|i| {
                    if i % 2 == 0 {
                        f.fate(1, 2)
                    } else {
                        f.fate(2, 1)
                    }
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let fates = run(7);
        let dropped = fates.iter().filter(|f| **f == Fate::Drop).count();
        assert!((200..400).contains(&dropped), "dropped {dropped} of 1000");
        for f in fates.iter().skip(1).step_by(2) {
            match f {
                Fate::Delay(d) => {
                    assert!(*d >= Duration::from_millis(5) && *d <= Duration::from_millis(50))
                }
                other => panic!("expected a delay, got {other:?}"),
            }
        }
    }

    /// A fixed delay is exactly that delay; healing one link leaves the others alone.
    #[test]
    fn fixed_delay_and_heal_link() {
        let f = FaultController::new(3);
        let d = Duration::from_millis(20);
        f.delay(1, 2, d, d);
        f.cut_one_way(2, 3);
        assert_eq!(f.fate(1, 2), Fate::Delay(d));
        f.heal_link(1, 2);
        assert_eq!(f.fate(1, 2), Fate::Deliver);
        assert_eq!(f.fate(2, 3), Fate::Drop);
        assert_eq!(f.link(2, 3).to_string(), "cut");
    }
}
