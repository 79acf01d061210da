//! The scheduling policy: a pure function from (state, now) to an assignment batch.
//!
//! The leader's scheduler actor calls [`plan_assignments`] and proposes the result as one Assign
//! command. The policy holds no truth of its own: whatever it proposes is checked again in apply,
//! so a plan made from a slightly old state is refused job by job, never half-applied.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use crate::command::Assignment;
use crate::limits::ASSIGN_BATCH_MAX;
use crate::records::Records;
use crate::state::JobTable;
use crate::{JobId, NodeId};

/// Plans up to `batch_max` assignments of due, eligible pending jobs to registered nodes with
/// free slots.
///
/// Jobs go in priority order, then submission order, across all queues, whether they were
/// delayed or not; each queue contributes at most what its settings allow now (paused,
/// concurrency limit, rate limit). Jobs behind an earlier job with the same ordering key are not
/// candidates at all (the state machine does not index them). Never more than
/// [`ASSIGN_BATCH_MAX`] are planned, since apply refuses a larger batch whole. Each job goes to
/// the node with the most free slots (ties to the lower id), which spreads load evenly.
/// `excluded` nodes (unreachable, or not yet caught up) receive nothing, and neither do expired
/// or leaving (draining) ones.
pub fn plan_assignments<R: Records>(
    state: &JobTable<R>,
    now_ms: u64,
    batch_max: usize,
    excluded: &BTreeSet<NodeId>,
) -> Vec<Assignment> {
    // Max-heap of (free slots, reversed id) so the emptiest node, then the lowest id, wins.
    let mut free: BinaryHeap<(usize, Reverse<NodeId>, u64)> = state
        .nodes()
        .iter()
        .filter(|(id, entry)| {
            !excluded.contains(id) && !entry.expired && state.leaving(**id).is_none()
        })
        .filter_map(|(&id, entry)| {
            let free = (entry.slots as usize).saturating_sub(state.running_on(id));
            (free > 0).then_some((free, Reverse(id), entry.incarnation))
        })
        .collect();
    let total_free: usize = free.iter().map(|(f, _, _)| f).sum();
    // Capped at the apply limit: a larger plan would be refused whole, every tick, forever.
    let want = batch_max.min(total_free).min(ASSIGN_BATCH_MAX);
    if want == 0 {
        return Vec::new();
    }

    let candidates = pick_jobs(state, now_ms, want);
    let mut plan = Vec::with_capacity(candidates.len());
    for job in candidates {
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

/// Up to `want` jobs in start order: a k-way merge of every queue's ready set (plus delayed jobs
/// that fell due since the last applied entry), taking from each queue at most its allowance.
/// Work is bounded by `want` plus the number of queues, however many jobs wait.
fn pick_jobs<R: Records>(state: &JobTable<R>, now_ms: u64, want: usize) -> Vec<JobId> {
    let queues: Vec<_> = state.queues().iter().collect();
    let index: BTreeMap<&str, usize> = queues
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.as_str(), i))
        .collect();
    let mut allowance: Vec<usize> = queues
        .iter()
        .map(|(_, q)| q.allowance(now_ms, want))
        .collect();

    // Delayed jobs due by `now_ms` (apply moves them into `ready` once its clock passes their
    // run_at): few, so collected and sorted as one more source.
    let mut delayed: Vec<(i64, JobId, usize)> = state
        .due_delayed_jobs(now_ms)
        .filter_map(|id| {
            let job = state.job(id)?;
            let q = *index.get(job.queue.as_str())?;
            Some((-(job.priority as i64), id, q))
        })
        .collect();
    delayed.sort_unstable();
    let mut delayed = delayed.into_iter().peekable();

    let mut sources: Vec<_> = queues
        .iter()
        .map(|(name, _)| state.ready_entries(name))
        .collect();
    // Min-heap of each source's next job: (key, source); source == queues.len() is `delayed`.
    let mut heap: BinaryHeap<Reverse<((i64, JobId), usize)>> = BinaryHeap::new();
    for (i, source) in sources.iter_mut().enumerate() {
        if allowance[i] > 0 {
            if let Some(key) = source.next() {
                heap.push(Reverse((key, i)));
            }
        }
    }
    let delayed_source = queues.len();
    if let Some(&(p, id, _)) = delayed.peek() {
        heap.push(Reverse(((p, id), delayed_source)));
    }

    let mut picked = Vec::with_capacity(want);
    while picked.len() < want {
        let Some(Reverse(((_, id), source))) = heap.pop() else {
            break;
        };
        let queue = if source == delayed_source {
            let Some((_, _, q)) = delayed.next() else {
                break;
            };
            if let Some(&(p, next, _)) = delayed.peek() {
                heap.push(Reverse(((p, next), delayed_source)));
            }
            q
        } else {
            source
        };
        if allowance[queue] == 0 {
            // The queue is used up: a queue source stops here; the delayed source goes on.
            continue;
        }
        allowance[queue] -= 1;
        picked.push(id);
        if source != delayed_source && allowance[queue] > 0 {
            if let Some(key) = sources[source].next() {
                heap.push(Reverse((key, source)));
            }
        }
    }
    picked
}
