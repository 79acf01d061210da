//! A seam for fault injection in node-to-node traffic.
//!
//! Production nodes have no [`Faults`]. Cluster tests install one to partition (both ways or one
//! way), drop, delay and so reorder messages between nodes. A request from `a` to `b` is subject
//! to the fate of `a → b`; its reply to the fate of `b → a`, so a one-way partition can lose a
//! reply after the request took effect — the "outcome unknown" case real networks produce.

use std::sync::Arc;
use std::time::Duration;

/// What happens to one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Deliver,
    /// Delivered after this long.
    Delay(Duration),
    /// Lost: the sender waits for its timeout.
    Drop,
}

/// Decides the fate of each node-to-node message.
pub trait Faults: Send + Sync + 'static {
    fn fate(&self, from: u64, to: u64) -> Fate;

    /// The fate of a Raft request (append, vote, snapshot) `from → to`; by default that of any
    /// message. A test can lose only these (the sender dials a stale address for Raft while the
    /// receiver's own requests and their replies still get through).
    fn raft_request_fate(&self, from: u64, to: u64) -> Fate {
        self.fate(from, to)
    }
}

/// Shared handle, cheap to clone.
pub type FaultsHandle = Arc<dyn Faults>;

/// [`pass`] for a Raft request (see [`Faults::raft_request_fate`]).
pub(crate) async fn pass_raft_request(
    faults: &Option<FaultsHandle>,
    from: u64,
    to: u64,
    lost_after: Duration,
) -> Result<(), ()> {
    let Some(f) = faults else {
        return Ok(());
    };
    apply(f.raft_request_fate(from, to), lost_after).await
}

/// Applies the fate of `from → to` before a message leaves. `Err(())`: it is lost, after the
/// sender has waited `lost_after` (what a lost message costs a real sender: its timeout).
pub(crate) async fn pass(
    faults: &Option<FaultsHandle>,
    from: u64,
    to: u64,
    lost_after: Duration,
) -> Result<(), ()> {
    let Some(f) = faults else {
        return Ok(());
    };
    apply(f.fate(from, to), lost_after).await
}

async fn apply(fate: Fate, lost_after: Duration) -> Result<(), ()> {
    match fate {
        Fate::Deliver => Ok(()),
        Fate::Delay(d) => {
            tokio::time::sleep(d).await;
            Ok(())
        }
        Fate::Drop => {
            tokio::time::sleep(lost_after).await;
            Err(())
        }
    }
}
