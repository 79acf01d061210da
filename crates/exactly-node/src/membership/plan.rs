//! The leader's membership decisions, pure: given what the leader sees (the Raft membership,
//! replication progress, the replicated drains and leases), the one step a membership round
//! takes. [`super::reconcile`] reads the view, asks [`next_step`] and carries the step out; a
//! round takes one step, and every step is safe to repeat (the next round, or the next
//! leader, reads the state again and goes on).
//!
//! Rules (module docs of [`super`]), asserted by the table test below:
//! - A leader whose own address in the membership is stale fixes that first, and nothing else.
//! - A drained node (leaving, running nothing) leaves before anything else happens: a learner
//!   is removed; a voter is replaced by the most caught-up healthy learner when voters would
//!   drop below the target (one joint change), else removed from the voters. The last voter
//!   never leaves, and a voter that is only stopping (SIGTERM) stays unless it is replaced.
//! - A drained node already out of the membership gets its departure recorded (`NodeLeft`).
//! - Otherwise, while voters are fewer than the target, one healthy, non-quiet learner at most
//!   [`PROMOTE_LAG_ENTRIES_MAX`] entries behind is promoted (most caught-up first, then lowest
//!   id).

use std::collections::{BTreeMap, BTreeSet};

use exactly_core::NodeId;

/// A learner is promoted to voter only if it is at most this many entries behind the leader.
pub const PROMOTE_LAG_ENTRIES_MAX: u64 = 100;

/// What the leader sees at the start of a round.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// This node (the leader).
    pub me: NodeId,
    /// This node's peer address now.
    pub my_addr: String,
    /// This node's address as the membership records it (`None`: not a member).
    pub my_recorded_addr: Option<String>,
    pub voters: BTreeSet<NodeId>,
    /// Voters and learners.
    pub members: BTreeSet<NodeId>,
    /// The leader's last log index.
    pub last_log_index: u64,
    /// How far the leader knows each member's log matches its own (`None` for a member: not
    /// known yet).
    pub matched: BTreeMap<NodeId, Option<u64>>,
    /// Nodes leaving that run nothing any more, in id order.
    pub drained: Vec<NodeId>,
    /// Leaving nodes whose reason is that they are stopping (SIGTERM).
    pub stopping: BTreeSet<NodeId>,
    /// Registered nodes with an unexpired lease that are not leaving.
    pub healthy: BTreeSet<NodeId>,
    /// Nodes without a recent renewal (never promoted).
    pub quiet: BTreeSet<NodeId>,
    /// `voters-target`.
    pub voters_target: usize,
}

/// The membership change a drained member's departure needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// The voters become exactly these (the leaving voter out, maybe a learner in).
    ReplaceAllVoters(BTreeSet<NodeId>),
    /// The leaving learner is removed.
    RemoveNodes(BTreeSet<NodeId>),
}

/// Why a round does nothing although a node is drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// The node is the last voter and no learner can replace it.
    LastVoter,
    /// A voter that is only stopping, with nobody to replace it, stays a voter: the others may
    /// be stopping too (a whole cluster shut down), and a restart brings it back.
    StoppingVoterStays,
}

/// The one step of a round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Record this node's new address in the membership.
    SetAddress { from: String, to: String },
    /// Take the drained node out of the membership with `change` (`promoted`: the learner that
    /// replaces it, for the log), then record its departure.
    Leave {
        node: NodeId,
        change: Change,
        promoted: Option<NodeId>,
    },
    /// The drained node is out of the membership already: record its departure.
    RecordDeparture(NodeId),
    /// The drained node cannot leave yet.
    Hold { node: NodeId, why: Hold },
    /// Promote this learner to voter.
    Promote(NodeId),
    /// Nothing to do.
    Nothing,
}

/// The step a round takes from `view`.
pub fn next_step(view: &View) -> Step {
    if let Some(recorded) = &view.my_recorded_addr {
        if *recorded != view.my_addr {
            return Step::SetAddress {
                from: recorded.clone(),
                to: view.my_addr.clone(),
            };
        }
    }
    if let Some(&id) = view.drained.first() {
        if !view.members.contains(&id) {
            return Step::RecordDeparture(id);
        }
        return leave(view, id);
    }
    if view.voters.len() < view.voters_target {
        if let Some(learner) = promotable_learner(view) {
            return Step::Promote(learner);
        }
    }
    Step::Nothing
}

fn leave(view: &View, id: NodeId) -> Step {
    if !view.voters.contains(&id) {
        return Step::Leave {
            node: id,
            change: Change::RemoveNodes(BTreeSet::from([id])),
            promoted: None,
        };
    }
    let mut next: BTreeSet<NodeId> = view.voters.iter().copied().filter(|v| *v != id).collect();
    let mut promoted = None;
    if next.len() < view.voters_target.max(1) {
        promoted = promotable_learner(view);
        next.extend(promoted);
    }
    if next.is_empty() {
        return Step::Hold {
            node: id,
            why: Hold::LastVoter,
        };
    }
    if view.stopping.contains(&id) && next.len() < view.voters_target.max(1).min(view.voters.len())
    {
        return Step::Hold {
            node: id,
            why: Hold::StoppingVoterStays,
        };
    }
    Step::Leave {
        node: id,
        change: Change::ReplaceAllVoters(next),
        promoted,
    }
}

/// A learner fit to become a voter: healthy, not quiet, and caught up with the leader's log;
/// the most caught-up one wins, then the lowest id.
fn promotable_learner(view: &View) -> Option<NodeId> {
    view.members
        .iter()
        .filter(|id| {
            !view.voters.contains(id) && view.healthy.contains(id) && !view.quiet.contains(id)
        })
        .filter_map(|id| {
            let matched = view.matched.get(id).copied().flatten()?;
            (view.last_log_index.saturating_sub(matched) <= PROMOTE_LAG_ENTRIES_MAX)
                .then_some((matched, *id))
        })
        .max_by_key(|&(matched, id)| (matched, std::cmp::Reverse(id)))
        .map(|(_, id)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    /// Leader 1; voters 1, 2, 3; learner 4 caught up; all healthy; target 3.
    fn cluster() -> View {
        View {
            me: 1,
            my_addr: "10.0.0.1:7001".into(),
            my_recorded_addr: Some("10.0.0.1:7001".into()),
            voters: set(&[1, 2, 3]),
            members: set(&[1, 2, 3, 4]),
            last_log_index: 1000,
            matched: [
                (1, Some(1000)),
                (2, Some(1000)),
                (3, Some(990)),
                (4, Some(995)),
            ]
            .into_iter()
            .collect(),
            drained: vec![],
            stopping: BTreeSet::new(),
            healthy: set(&[1, 2, 3, 4]),
            quiet: BTreeSet::new(),
            voters_target: 3,
        }
    }

    #[test]
    fn each_situation_takes_its_step() {
        type Case = (&'static str, Box<dyn Fn(&mut View)>, Step);
        let cases: Vec<Case> = vec![
            (
                "a settled cluster does nothing",
                Box::new(|_| {}),
                Step::Nothing,
            ),
            (
                "a stale own address is fixed first, before a drained node leaves",
                Box::new(|v| {
                    v.my_recorded_addr = Some("10.0.0.9:7001".into());
                    v.drained = vec![4];
                }),
                Step::SetAddress {
                    from: "10.0.0.9:7001".into(),
                    to: "10.0.0.1:7001".into(),
                },
            ),
            (
                "a drained learner is removed",
                Box::new(|v| v.drained = vec![4]),
                Step::Leave {
                    node: 4,
                    change: Change::RemoveNodes(set(&[4])),
                    promoted: None,
                },
            ),
            (
                "a drained voter is replaced by the caught-up learner in one change",
                Box::new(|v| {
                    v.drained = vec![3];
                    v.healthy.remove(&3);
                }),
                Step::Leave {
                    node: 3,
                    change: Change::ReplaceAllVoters(set(&[1, 2, 4])),
                    promoted: Some(4),
                },
            ),
            (
                "a drained voter with no learner fit leaves the voters short",
                Box::new(|v| {
                    v.drained = vec![3];
                    v.matched
                        .insert(4, Some(1000 - PROMOTE_LAG_ENTRIES_MAX - 1));
                }),
                Step::Leave {
                    node: 3,
                    change: Change::ReplaceAllVoters(set(&[1, 2])),
                    promoted: None,
                },
            ),
            (
                "a stopping voter nobody replaces stays",
                Box::new(|v| {
                    v.drained = vec![3];
                    v.stopping.insert(3);
                    v.quiet.insert(4);
                }),
                Step::Hold {
                    node: 3,
                    why: Hold::StoppingVoterStays,
                },
            ),
            (
                "a stopping voter above the target leaves",
                Box::new(|v| {
                    v.voters_target = 2;
                    v.drained = vec![3];
                    v.stopping.insert(3);
                }),
                Step::Leave {
                    node: 3,
                    change: Change::ReplaceAllVoters(set(&[1, 2])),
                    promoted: None,
                },
            ),
            (
                "the last voter never leaves without a replacement",
                Box::new(|v| {
                    v.voters = set(&[1]);
                    v.members = set(&[1]);
                    v.drained = vec![1];
                }),
                Step::Hold {
                    node: 1,
                    why: Hold::LastVoter,
                },
            ),
            (
                "the last voter is replaced by a learner",
                Box::new(|v| {
                    v.voters = set(&[1]);
                    v.members = set(&[1, 4]);
                    v.drained = vec![1];
                    v.healthy.remove(&1);
                }),
                Step::Leave {
                    node: 1,
                    change: Change::ReplaceAllVoters(set(&[4])),
                    promoted: Some(4),
                },
            ),
            (
                "a drained node already out gets its departure recorded",
                Box::new(|v| v.drained = vec![7]),
                Step::RecordDeparture(7),
            ),
            (
                "the lowest drained id goes first",
                Box::new(|v| v.drained = vec![2, 4]),
                Step::Leave {
                    node: 2,
                    change: Change::ReplaceAllVoters(set(&[1, 3, 4])),
                    promoted: Some(4),
                },
            ),
            (
                "voters short: the most caught-up healthy learner is promoted",
                Box::new(|v| {
                    v.voters = set(&[1, 2]);
                    v.members = set(&[1, 2, 4, 5, 6]);
                    v.healthy.extend([5, 6]);
                    v.matched.insert(5, Some(999));
                    v.matched.insert(6, Some(999));
                }),
                Step::Promote(5),
            ),
            (
                "a quiet, unhealthy, unknown or lagging learner is not promoted",
                Box::new(|v| {
                    v.voters = set(&[1, 2]);
                    v.members = set(&[1, 2, 4, 5, 6, 7]);
                    v.quiet.insert(4);
                    v.healthy.extend([6, 7]);
                    v.matched.insert(5, Some(1000));
                    v.matched.insert(6, None);
                    v.matched
                        .insert(7, Some(1000 - PROMOTE_LAG_ENTRIES_MAX - 1));
                }),
                Step::Nothing,
            ),
            (
                "voters at the target: nothing is promoted",
                Box::new(|v| {
                    v.members.insert(5);
                }),
                Step::Nothing,
            ),
        ];
        for (name, change, expected) in cases {
            let mut view = cluster();
            change(&mut view);
            assert_eq!(next_step(&view), expected, "{name}");
        }
    }
}
