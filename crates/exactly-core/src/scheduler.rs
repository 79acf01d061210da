//! The scheduling policy: a pure function from (state, now) to an assignment batch.
//!
//! The leader's scheduler actor calls [`plan_assignments`] and proposes the result as one Assign
//! command. The policy holds no truth of its own: whatever it proposes is checked again in apply,
//! so a plan made from a slightly old state is refused job by job, never half-applied.

use std::collections::{BTreeSet, BinaryHeap};

use crate::command::Assignment;
use crate::limits::ASSIGN_BATCH_MAX;
use crate::state::JobTable;
use crate::{JobId, NodeId};

/// Plans up to `batch_max` assignments of due pending jobs to registered nodes with free slots.
///
/// Jobs go in priority order, then submission order, whether they were delayed or not. Never
/// more than [`ASSIGN_BATCH_MAX`] are planned, since apply refuses a larger batch whole. Each job
/// goes to the node with the most free slots (ties to the lower id), which spreads load evenly.
/// `excluded` nodes (unreachable, or not yet caught up) receive nothing, and neither do expired
/// or leaving (draining) ones.
pub fn plan_assignments(
    state: &JobTable,
    now_ms: u64,
    batch_max: usize,
    excluded: &BTreeSet<NodeId>,
) -> Vec<Assignment> {
    // Max-heap of (free slots, reversed id) so the emptiest node, then the lowest id, wins.
    let mut free: BinaryHeap<(usize, std::cmp::Reverse<NodeId>, u64)> = state
        .nodes()
        .iter()
        .filter(|(id, entry)| {
            !excluded.contains(id) && !entry.expired && state.leaving(**id).is_none()
        })
        .filter_map(|(&id, entry)| {
            let free = (entry.slots as usize).saturating_sub(state.running_on(id));
            (free > 0).then_some((free, std::cmp::Reverse(id), entry.incarnation))
        })
        .collect();
    let total_free: usize = free.iter().map(|(f, _, _)| f).sum();
    // Capped at the apply limit: a larger plan would be refused whole, every tick, forever.
    let want = batch_max.min(total_free).min(ASSIGN_BATCH_MAX);
    if want == 0 {
        return Vec::new();
    }

    let mut candidates: Vec<(i64, JobId)> = Vec::with_capacity(want);
    // Every delayed job due by `now_ms` is a candidate, not only the first `want`: that index is
    // ordered by run_at, not priority, so truncating it before sorting skipped higher-priority
    // jobs. Apply moves delayed jobs into `ready` as its clock passes their run_at, so this scans
    // only jobs that fell due after the last applied entry's timestamp.
    for id in state.due_delayed_jobs(now_ms) {
        if let Some(job) = state.job(id) {
            candidates.push((-(job.priority as i64), id));
        }
    }
    for id in state.ready_jobs().take(want) {
        if let Some(job) = state.job(id) {
            candidates.push((-(job.priority as i64), id));
        }
    }
    candidates.sort_unstable();
    candidates.truncate(want);

    let mut plan = Vec::with_capacity(candidates.len());
    for (_, job) in candidates {
        let Some((slots, node, incarnation)) = free.pop() else {
            break;
        };
        plan.push(Assignment {
            job,
            node: node.0,
            incarnation,
        });
        if slots > 1 {
            free.push((slots - 1, node, incarnation));
        }
    }
    plan
}
