//! Proposal batching on the leader: every command this node proposes as leader (its own
//! submits, assignments, outcomes and housekeeping, and what followers forward) goes through one
//! queue, and a single task proposes what has queued as one `Command::Batch` entry.
//!
//! openraft appends each `client_write` as its own entry (0.9 one fsync after another inside the
//! Raft core; 0.10 groups the writes queued in its API channel into one append, still an entry
//! and a response each): at a few hundred small entries per second the leader spends its time on
//! per-entry work, and every proposal waits behind the ones queued before it. Batched, what arrives while the
//! previous entries are appended shares one append and one fsync on a quorum. Nothing waits on a
//! timer: a lone command on an idle node is proposed at once (as itself, not as a batch), and
//! the batches grow with the load. At most [`PROPOSALS_IN_FLIGHT_MAX`] entries are in flight, so
//! that the next one is appended while the previous one replicates.
//!
//! Each proposer gets its own answer: the sub-command's response and the entry's index, or the
//! entry's failure (the whole entry commits or not).

use std::sync::Arc;

use exactly_core::limits::BATCH_COMMANDS_MAX;
use exactly_core::{Command, Response};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::node::{ForwardReply, Node, ProposeError};

/// Batched entries one leader has in flight at once.
pub const PROPOSALS_IN_FLIGHT_MAX: usize = 2;
/// Estimated bytes of one batched entry, at most (a lone larger command goes alone).
pub const BATCH_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Commands waiting for a batch, at most; proposers wait for room beyond it.
const QUEUE_MAX: usize = 4096;

struct Proposal {
    command: Command,
    bytes: usize,
    reply: oneshot::Sender<ForwardReply>,
}

/// The handle of a node's proposal queue. Cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Proposal>,
}

impl Proposer {
    /// Starts the proposing task; it ends when the node shuts down.
    pub fn start(node: Node) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_MAX);
        crate::supervise::spawn(&node.clone(), "proposal queue", run(node, rx));
        Self { tx }
    }

    /// Proposes `command` in the next batch and waits for its answer.
    pub async fn propose(&self, command: Command) -> ForwardReply {
        let (reply, answer) = oneshot::channel();
        let bytes = estimated_bytes(&command);
        let proposal = Proposal {
            command,
            bytes,
            reply,
        };
        if self.tx.send(proposal).await.is_err() {
            return stopped();
        }
        answer.await.unwrap_or_else(|_| stopped())
    }
}

fn stopped() -> ForwardReply {
    ForwardReply::Failed(ProposeError::ShuttingDown(
        "the node is stopping; nothing was proposed".into(),
    ))
}

/// A cheap upper estimate of a command's encoded size: payloads, results and errors, plus a
/// fixed allowance per item.
fn estimated_bytes(command: &Command) -> usize {
    const PER_ITEM: usize = 512;
    let jobs = |groups: &[Vec<exactly_core::NewJob>]| -> usize {
        groups
            .iter()
            .flatten()
            .map(|j| j.payload.len() + PER_ITEM)
            .sum()
    };
    match command {
        Command::Submit(list) => list.iter().map(|j| j.payload.len() + PER_ITEM).sum(),
        Command::SubmitGroups(groups) => jobs(groups),
        Command::SubmitAssign { groups, .. } => jobs(groups),
        Command::Complete(list) => list
            .iter()
            .map(|c| match &c.outcome {
                exactly_core::Outcome::Succeeded { result } => result.len() + PER_ITEM,
                _ => 2 * PER_ITEM + exactly_core::limits::ERROR_BYTES_MAX,
            })
            .sum(),
        _ => 64 * 1024,
    }
}

/// Takes the next batch: everything waiting, up to the entry's limits.
async fn next_batch(
    rx: &mut mpsc::Receiver<Proposal>,
    carry: &mut Option<Proposal>,
) -> Option<Vec<Proposal>> {
    let (mut bytes, mut first) = (0, true);
    crate::group::gather(rx, carry, BATCH_COMMANDS_MAX, |p| {
        if bytes + p.bytes > BATCH_BYTES_MAX && !first {
            return false;
        }
        first = false;
        bytes += p.bytes;
        true
    })
    .await
}

async fn run(node: Node, mut rx: mpsc::Receiver<Proposal>) {
    let permits = Arc::new(Semaphore::new(PROPOSALS_IN_FLIGHT_MAX));
    let mut carry = None;
    loop {
        // A permit first: proposals keep gathering while every slot is busy.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let batch = tokio::select! {
            batch = next_batch(&mut rx, &mut carry) => batch,
            () = node.shutdown.cancelled() => None,
        };
        let Some(batch) = batch else { return };
        let node = node.clone();
        tokio::spawn(async move {
            let _permit = permit;
            propose(&node, batch).await;
        });
    }
}

async fn propose(node: &Node, mut batch: Vec<Proposal>) {
    if batch.len() == 1 {
        let Some(p) = batch.pop() else { return };
        let _ = p.reply.send(node.client_write(p.command).await);
        return;
    }
    let (commands, replies): (Vec<Command>, Vec<oneshot::Sender<ForwardReply>>) =
        batch.into_iter().map(|p| (p.command, p.reply)).unzip();
    let count = commands.len();
    match node.client_write(Command::Batch(commands)).await {
        ForwardReply::Committed(Response::Batch(Ok(responses)), index)
            if responses.len() == count =>
        {
            for (reply, response) in replies.into_iter().zip(responses) {
                let _ = reply.send(ForwardReply::Committed(response, index));
            }
        }
        ForwardReply::Committed(other, _) => {
            // Our own batch refused whole: a bug, reported to every proposer.
            let e = ProposeError::Unexpected(format!("batch of {count} refused: {other:?}"));
            for reply in replies {
                let _ = reply.send(ForwardReply::Failed(e.clone()));
            }
        }
        failed => {
            for reply in replies {
                let _ = reply.send(failed.clone());
            }
        }
    }
}
