//! Group commit of client Submits: every Submit this node takes waits in one bounded queue, and
//! a single task proposes what has queued as one `Command::SubmitGroups` entry (one Raft commit,
//! one fsync on a quorum, for many requests), with at most [`GROUPS_IN_FLIGHT_MAX`] entries in
//! flight. Nothing waits on a timer: an idle node proposes a lone request at once; under load,
//! requests gather while earlier entries commit, so batching grows with the load. Each request
//! keeps its own all-or-nothing answer (apply treats each group as its own Submit).
//!
//! **Admission control:** the queue is bounded in requests and in payload bytes; past either
//! bound a Submit is refused at once with `RESOURCE_EXHAUSTED` and a `retry-after-ms` hint,
//! having proposed nothing, instead of waiting into a timeout with an unknown outcome.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use exactly_core::limits::{SUBMIT_GROUPS_MAX, SUBMIT_GROUP_JOBS_MAX};
use exactly_core::{NewJob, Proposal, Rejection, Submitted};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::node::{Node, ProposeError, WRITE_APPLY_WAIT_MAX};

/// Submit requests waiting to be proposed on one node, at most.
pub const SUBMIT_QUEUE_REQUESTS_MAX: usize = 8_192;
/// Payload bytes waiting to be proposed on one node, at most.
pub const SUBMIT_QUEUE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// SubmitGroups entries one node has in flight at once.
pub const GROUPS_IN_FLIGHT_MAX: usize = 4;
/// Payload bytes one SubmitGroups entry carries, at most (a lone larger request goes alone).
pub const GROUP_BYTES_MAX: usize = 4 * 1024 * 1024;
/// The retry hint a refused Submit carries.
pub const RETRY_AFTER: Duration = Duration::from_millis(100);
/// Admission by queueing delay: while the oldest request in this node's queue has waited longer
/// than this, new Submits are refused at once (the queue is not draining as fast as it fills:
/// more would only wait into their callers' timeouts).
pub const ADMIT_QUEUE_DELAY_MAX: Duration = Duration::from_millis(200);
/// Admission by the age of what is committing: while the oldest request this node admitted and
/// has not answered yet (queued, or in an entry in flight) was admitted longer ago than this,
/// new Submits are refused at once. Without it, under a steady overload each entry in flight
/// grew to its limit and took seconds to commit, and one client connection's 1,024 streams
/// filled with admitted requests, so that even refusals waited seconds for a stream in the
/// client (measured: refusals p50 3.9 s, 6,719 of 200,000 unknown outcomes at 10,000/s over
/// four connections).
pub const ADMIT_ANSWER_DELAY_MAX: Duration = Duration::from_millis(400);
/// A request that waited this long in the queue is refused when its turn comes, unproposed.
pub const QUEUE_WAIT_MAX: Duration = Duration::from_secs(1);

/// What one Submit gets back: its jobs' results and the entry's log index.
pub type Outcome = Result<(Vec<Result<Submitted, Rejection>>, u64), ProposeError>;

struct Request {
    jobs: Vec<NewJob>,
    bytes: usize,
    queued_at: tokio::time::Instant,
    reply: oneshot::Sender<Outcome>,
}

/// Why a Submit was not queued.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(
        "node {node} has {waiting} submit requests ({bytes} payload bytes) waiting to commit, its \
         limit: nothing was proposed; retry after {RETRY_AFTER:?}, or at another node"
    )]
    Full {
        node: u64,
        waiting: usize,
        bytes: usize,
    },
    #[error(
        "node {node} is overloaded: a submit it took {delay_ms} ms ago is still unanswered \
         (limits: {ADMIT_QUEUE_DELAY_MAX:?} queued, {ADMIT_ANSWER_DELAY_MAX:?} until committed): \
         nothing was proposed; retry after {RETRY_AFTER:?}, or at another node"
    )]
    Overloaded { node: u64, delay_ms: u64 },
    #[error("node is shutting down; nothing was proposed")]
    Closed,
}

/// When each request in the queue was queued, oldest first (the queue's order: a request is
/// queued and its time pushed under this lock, and the grouping task pops one per request it
/// groups, the carried one included).
type Waiting = Arc<std::sync::Mutex<std::collections::VecDeque<tokio::time::Instant>>>;

/// Whether a Submit may join the queue: refused while the oldest queued request has waited past
/// [`ADMIT_QUEUE_DELAY_MAX`] (the queue is not draining as fast as it fills), or, while requests
/// wait in the queue, the oldest request in an entry in flight was queued longer ago than
/// [`ADMIT_ANSWER_DELAY_MAX`] (entries commit too slowly for what they carry). The age of the oldest waiting request, not of the
/// last one taken, so that a queue whose grouping task is stalled (every entry in flight waiting
/// on slow commits) refuses too: measured, the last-taken delay stayed small while 8,192
/// requests queued for seconds at 10,000 submits/s. `Err` carries the age that refused.
pub(crate) fn admits(
    oldest_queued: Option<Duration>,
    oldest_in_flight: Option<Duration>,
) -> Result<(), Duration> {
    match (oldest_queued, oldest_in_flight) {
        (Some(waited), _) if waited > ADMIT_QUEUE_DELAY_MAX => Err(waited),
        // Only with a backlog: one slow commit alone (a leader change, a slow fsync) is not an
        // overload, and refusing then would refuse a lone client (CI: a submit right after a
        // leader's restart was refused while one earlier submit was still committing).
        (Some(_), Some(waited)) if waited > ADMIT_ANSWER_DELAY_MAX => Err(waited),
        _ => Ok(()),
    }
}

/// When the oldest request of each entry in flight was queued, by entry.
type InFlight = Arc<std::sync::Mutex<std::collections::BTreeMap<u64, tokio::time::Instant>>>;

/// The handle the API uses: cheap to clone.
#[derive(Clone)]
pub struct Submitter {
    tx: mpsc::Sender<Request>,
    bytes: Arc<AtomicUsize>,
    waiting: Waiting,
    in_flight: InFlight,
    node_id: u64,
}

impl Submitter {
    /// Starts the grouping task for `node`.
    pub fn start(node: Node) -> Self {
        let (tx, rx) = mpsc::channel(SUBMIT_QUEUE_REQUESTS_MAX);
        let bytes = Arc::new(AtomicUsize::new(0));
        let waiting = Waiting::default();
        let in_flight = InFlight::default();
        crate::supervise::spawn(
            &node,
            "submit queue",
            run(
                node.clone(),
                rx,
                bytes.clone(),
                waiting.clone(),
                in_flight.clone(),
            ),
        );
        Self {
            tx,
            bytes,
            waiting,
            in_flight,
            node_id: node.id,
        }
    }

    /// Queues a Submit and waits for its answer. Refused at once when the queue is full.
    pub async fn submit(&self, jobs: Vec<NewJob>) -> Result<Outcome, Refused> {
        let oldest_queued = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .front()
            .map(|at| at.elapsed());
        let oldest_in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .min()
            .map(|at| at.elapsed());
        if let Err(waited) = admits(oldest_queued, oldest_in_flight) {
            return Err(Refused::Overloaded {
                node: self.node_id,
                delay_ms: waited.as_millis() as u64,
            });
        }
        let bytes: usize = jobs.iter().map(|j| j.payload.len()).sum();
        let queued = self.bytes.fetch_add(bytes, Ordering::AcqRel);
        if queued > 0 && queued + bytes > SUBMIT_QUEUE_BYTES_MAX {
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err(self.full(queued));
        }
        let (reply, answer) = oneshot::channel();
        let request = Request {
            jobs,
            bytes,
            queued_at: tokio::time::Instant::now(),
            reply,
        };
        let sent = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            let sent = self.tx.try_send(request);
            if sent.is_ok() {
                waiting.push_back(tokio::time::Instant::now());
            }
            sent
        };
        if let Err(e) = sent {
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => self.full(queued),
                mpsc::error::TrySendError::Closed(_) => Refused::Closed,
            });
        }
        answer.await.map_err(|_| Refused::Closed)
    }

    fn full(&self, bytes: usize) -> Refused {
        Refused::Full {
            node: self.node_id,
            waiting: SUBMIT_QUEUE_REQUESTS_MAX - self.tx.capacity(),
            bytes,
        }
    }
}

/// Takes the next batch from a queue: the first item (waiting for one), then everything already
/// waiting, at most `max` items, while `joins` accepts each next one (it is told of the first
/// too, which always goes, so that it can count it). An item `joins` refuses is kept in `carry`
/// and starts the next batch. `None` once the queue is closed and empty. Shared by the group
/// commit here and the leader's proposal batching (`proposer.rs`).
pub(crate) async fn gather<T>(
    rx: &mut mpsc::Receiver<T>,
    carry: &mut Option<T>,
    max: usize,
    mut joins: impl FnMut(&T) -> bool,
) -> Option<Vec<T>> {
    let first = match carry.take() {
        Some(item) => item,
        None => rx.recv().await?,
    };
    joins(&first);
    let mut batch = vec![first];
    while batch.len() < max {
        let Ok(next) = rx.try_recv() else { break };
        if !joins(&next) {
            *carry = Some(next);
            break;
        }
        batch.push(next);
    }
    Some(batch)
}

/// Takes the next group from the queue: everything waiting, up to the entry's limits.
async fn next_group(
    rx: &mut mpsc::Receiver<Request>,
    carry: &mut Option<Request>,
) -> Option<Vec<Request>> {
    let (mut jobs, mut bytes, mut first) = (0, 0, true);
    gather(rx, carry, SUBMIT_GROUPS_MAX, |r| {
        let over = jobs + r.jobs.len() > SUBMIT_GROUP_JOBS_MAX || bytes + r.bytes > GROUP_BYTES_MAX;
        if over && !first {
            return false;
        }
        first = false;
        jobs += r.jobs.len();
        bytes += r.bytes;
        true
    })
    .await
}

async fn run(
    node: Node,
    mut rx: mpsc::Receiver<Request>,
    queued: Arc<AtomicUsize>,
    waiting: Waiting,
    in_flight: InFlight,
) {
    let permits = Arc::new(Semaphore::new(GROUPS_IN_FLIGHT_MAX));
    let mut carry = None;
    let mut entries = 0u64;
    loop {
        // A permit first: requests keep gathering while every slot is busy.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let group = tokio::select! {
            group = next_group(&mut rx, &mut carry) => group,
            () = node.shutdown.cancelled() => None,
        };
        let Some(group) = group else { return };
        let bytes: usize = group.iter().map(|r| r.bytes).sum();
        queued.fetch_sub(bytes, Ordering::AcqRel);
        {
            let mut waiting = waiting.lock().unwrap_or_else(|p| p.into_inner());
            let n = group.len().min(waiting.len());
            waiting.drain(..n);
        }
        // Requests that waited past their callers' patience are refused, unproposed.
        let (group, stale): (Vec<Request>, Vec<Request>) = group
            .into_iter()
            .partition(|r| r.queued_at.elapsed() < QUEUE_WAIT_MAX);
        for r in stale {
            let _ = r.reply.send(Err(ProposeError::Overloaded(format!(
                "the submit waited {:?} in node {}'s queue (limit {QUEUE_WAIT_MAX:?}); nothing \
                 was proposed; retry after {RETRY_AFTER:?}, or at another node",
                r.queued_at.elapsed(),
                node.id
            ))));
        }
        let Some(oldest) = group.iter().map(|r| r.queued_at).min() else {
            continue;
        };
        entries += 1;
        let entry = entries;
        in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(entry, oldest);
        let node = node.clone();
        let in_flight = in_flight.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // However this task ends (answered, or dropped at shutdown), the entry is no longer
            // in flight.
            struct Landed(InFlight, u64);
            impl Drop for Landed {
                fn drop(&mut self) {
                    self.0
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&self.1);
                }
            }
            let _landed = Landed(in_flight, entry);
            let (jobs, replies): (Vec<Vec<NewJob>>, Vec<oneshot::Sender<Outcome>>) =
                group.into_iter().map(|r| (r.jobs, r.reply)).unzip();
            match node.ask_at(Proposal::submit_groups(jobs)).await {
                Ok((results, index)) => {
                    // Read-your-writes on this node (see `Node::propose_for_client`).
                    node.await_applied(index, WRITE_APPLY_WAIT_MAX).await;
                    for (reply, results) in replies.into_iter().zip(results) {
                        let _ = reply.send(Ok((results, index)));
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{admits, gather, ADMIT_ANSWER_DELAY_MAX, ADMIT_QUEUE_DELAY_MAX};
    use std::time::Duration;
    use tokio::sync::mpsc;

    /// An empty queue, or one whose oldest request is within the bound, admits; one whose
    /// oldest request waited past it refuses, naming how long.
    #[test]
    fn admission_follows_the_oldest_waiting_request() {
        let ms = Duration::from_millis;
        assert_eq!(admits(None, None), Ok(()));
        assert_eq!(admits(Some(ms(0)), Some(ms(0))), Ok(()));
        assert_eq!(admits(Some(ADMIT_QUEUE_DELAY_MAX), None), Ok(()));
        assert_eq!(admits(None, Some(ADMIT_ANSWER_DELAY_MAX)), Ok(()));
        let past = ADMIT_QUEUE_DELAY_MAX + ms(1);
        assert_eq!(admits(Some(past), None), Err(past));
        assert_eq!(admits(Some(ms(5_000)), Some(ms(1))), Err(ms(5_000)));
        let slow = ADMIT_ANSWER_DELAY_MAX + ms(1);
        assert_eq!(admits(Some(ms(10)), Some(slow)), Err(slow));
        assert_eq!(
            admits(None, Some(slow)),
            Ok(()),
            "no backlog: a slow commit alone"
        );
    }

    /// Weights 5, 3, 4, 9, 1 with a limit of 8 per batch and 3 items: the first always goes,
    /// an item over the limit is carried into the next batch, and `max` caps the count.
    #[tokio::test]
    async fn gather_takes_what_waits_within_its_limits() {
        let (tx, mut rx) = mpsc::channel(16);
        for w in [5usize, 3, 4, 9, 1, 1, 1, 1] {
            tx.send(w).await.unwrap();
        }
        drop(tx);
        let mut carry = None;
        let mut batches = Vec::new();
        loop {
            let mut total = 0;
            let batch = gather(&mut rx, &mut carry, 3, |&w| {
                if total > 0 && total + w > 8 {
                    return false;
                }
                total += w;
                true
            })
            .await;
            match batch {
                Some(b) => batches.push(b),
                None => break,
            }
        }
        assert_eq!(
            batches,
            vec![vec![5, 3], vec![4], vec![9], vec![1, 1, 1], vec![1]]
        );
        assert!(carry.is_none());
    }
}
