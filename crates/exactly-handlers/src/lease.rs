//! The node's lease as a running attempt sees it: a deadline on the machine's monotonic clock.
//!
//! A node may run an attempt only while its lease is valid (DESIGN.md, invariant 4). The node
//! fences itself (cancels, then kills after the kill grace) when the lease lapses, but a handler
//! that runs work *outside* the node process (the `exec` handler's commands) must also stop when
//! the node cannot: killed, frozen (SIGSTOP, a VM pause) or hung. So every attempt gets the
//! lease deadline, as absolute `CLOCK_MONOTONIC` milliseconds, and every later extension of it.
//! `CLOCK_MONOTONIC` is one clock for every process on the machine, so another process (the exec
//! guard) can compare it with its own reading without trusting the node to be alive.

use tokio::sync::watch;

/// Milliseconds on the machine's `CLOCK_MONOTONIC` (shared by every process on this machine; it
/// does not count time the machine spent suspended).
pub fn monotonic_ms() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => (t.tv_sec() as u64)
            .saturating_mul(1000)
            .saturating_add(t.tv_nsec() as u64 / 1_000_000),
        // clock_gettime(CLOCK_MONOTONIC) cannot fail on Linux; 0 makes every lease look lapsed,
        // the safe direction.
        Err(_) => 0,
    }
}

/// The lease deadline of the node running an attempt, in [`monotonic_ms`] milliseconds: the
/// attempt's processes must be told to stop at this instant and be dead `kill-grace` later,
/// unless the deadline moves on first (each acknowledged renewal moves it forward; it never moves
/// back). `u64::MAX` means "no lease" (a handler run outside a node, in tests or tools).
#[derive(Clone, Debug)]
pub struct LeaseDeadline(watch::Receiver<u64>);

impl LeaseDeadline {
    /// A deadline the node moves forward through the returned sender.
    pub fn channel(initial_ms: u64) -> (watch::Sender<u64>, Self) {
        let (tx, rx) = watch::channel(initial_ms);
        (tx, Self(rx))
    }

    /// A deadline that never comes (handlers run outside a node).
    pub fn unbounded() -> Self {
        Self::channel(u64::MAX).1
    }

    /// The deadline now.
    pub fn current_ms(&self) -> u64 {
        *self.0.borrow()
    }

    /// A receiver that sees every extension (for a task that forwards them elsewhere).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.0.clone()
    }
}

impl From<watch::Receiver<u64>> for LeaseDeadline {
    fn from(rx: watch::Receiver<u64>) -> Self {
        Self(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The monotonic clock moves forward and a channel carries extensions.
    #[test]
    fn deadline_moves_forward() {
        let a = monotonic_ms();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(monotonic_ms() >= a + 5);
        let (tx, deadline) = LeaseDeadline::channel(10);
        assert_eq!(deadline.current_ms(), 10);
        tx.send_modify(|d| *d = (*d).max(20));
        assert_eq!(deadline.current_ms(), 20);
        assert_eq!(LeaseDeadline::unbounded().current_ms(), u64::MAX);
    }
}
