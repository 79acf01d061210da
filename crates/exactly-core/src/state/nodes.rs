//! Nodes: registrations (incarnations), lease renewals and lease expiry.

use super::{JobTable, NodeEntry};
use crate::command::{
    Effect, Expiry, LeaveReason, NodeLease, NodeRegistration, Rejection, Renewal,
};
use crate::job::AttemptEnd;
use crate::limits::{NODE_SLOTS_MAX, RENEW_APPLY_LAG_MAX_MS, RENEW_MARKS_MAX};
use crate::records::Records;
use crate::JobId;

impl<R: Records> JobTable<R> {
    pub(super) fn register_node(
        &mut self,
        log_index: u64,
        r: NodeRegistration,
        entropy: u64,
        effects: &mut Vec<Effect>,
    ) -> Result<u32, Rejection> {
        if self.removed.contains_key(&r.node) {
            return Err(Rejection::Removed(r.node));
        }
        if r.slots > NODE_SLOTS_MAX {
            return Err(Rejection::Invalid(format!(
                "slots must be at most {NODE_SLOTS_MAX}, got {}",
                r.slots
            )));
        }
        super::validate_node_addr(&r.addr).map_err(Rejection::Invalid)?;
        if let Some(entry) = self.nodes.get(&r.node) {
            let needed = needed_index(&entry.renewal_marks, self.now_ms);
            if r.applied < needed {
                return Err(Rejection::Lagging {
                    node: r.node,
                    applied: r.applied,
                    needed,
                });
            }
        }
        let previous = self.nodes.get(&r.node).map(|n| n.incarnation);
        if let Some(current) = previous {
            if r.incarnation < current {
                return Err(Rejection::StaleIncarnation {
                    node: r.node,
                    got: r.incarnation,
                    current,
                });
            }
        }
        // A node that drained itself to stop and has started again stays.
        let restarted = previous.is_some_and(|current| r.incarnation > current);
        if restarted
            && self
                .leaving
                .get(&r.node)
                .is_some_and(|l| l.reason == LeaveReason::Stopping)
        {
            self.leaving.remove(&r.node);
        }
        let same = self
            .nodes
            .get(&r.node)
            .filter(|n| n.incarnation == r.incarnation);
        let expired = same.is_some_and(|n| n.expired);
        let renewed_at_ms = same.map_or(0, |n| n.renewed_at_ms);
        let mut renewal_marks = same.map(|n| n.renewal_marks.clone()).unwrap_or_default();
        push_mark(&mut renewal_marks, log_index, self.now_ms);
        // A registration is the incarnation's first lease: the leader counts its expiry from here.
        effects.push(Effect::Renewed(NodeLease {
            node: r.node,
            incarnation: r.incarnation,
        }));
        self.nodes.insert(
            r.node,
            NodeEntry {
                incarnation: r.incarnation,
                slots: r.slots,
                addr: r.addr,
                registered_at_ms: self.now_ms,
                renewed_at_ms,
                expired,
                renewal_marks,
                renewed_index: log_index,
            },
        );
        // Attempts of an older incarnation can never report: that process is gone (its data
        // directory is locked by the new one). Requeue them now instead of waiting for a lease.
        let held: Vec<JobId> = self
            .running
            .get(&r.node)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let mut requeued = 0;
        for id in held {
            let Some(mut job) = self.job(id) else {
                continue;
            };
            let stale = job
                .current_attempt()
                .is_some_and(|a| a.incarnation < r.incarnation);
            if stale {
                let reason = format!("node {} restarted (incarnation {})", r.node, r.incarnation);
                // The effects go to the caller: the job's events must reach the shell.
                self.end_current_attempt(
                    &mut job,
                    AttemptEnd::Abandoned { reason },
                    true,
                    entropy,
                    effects,
                );
                requeued += 1;
            }
            self.put_job(job, effects);
        }
        Ok(requeued)
    }

    /// The entry of `lease.node`, if `lease.incarnation` is its current incarnation (shared by
    /// assign, renew and expire).
    pub(super) fn current_node(&mut self, lease: NodeLease) -> Result<&mut NodeEntry, Rejection> {
        if self.removed.contains_key(&lease.node) {
            return Err(Rejection::Removed(lease.node));
        }
        let node = self
            .nodes
            .get_mut(&lease.node)
            .ok_or(Rejection::UnknownNode(lease.node))?;
        if node.incarnation != lease.incarnation {
            return Err(Rejection::StaleIncarnation {
                node: lease.node,
                got: lease.incarnation,
                current: node.incarnation,
            });
        }
        Ok(node)
    }

    /// A committed lease renewal: counts only for the node's current, unexpired incarnation, and
    /// only if the node has applied what was committed [`RENEW_APPLY_LAG_MAX_MS`] before.
    pub(super) fn renew(
        &mut self,
        log_index: u64,
        renewal: Renewal,
        effects: &mut Vec<Effect>,
    ) -> Result<(), Rejection> {
        let Renewal { lease, applied } = renewal;
        let now = self.now_ms;
        let node = self.current_node(lease)?;
        if node.expired {
            return Err(Rejection::Expired {
                node: lease.node,
                incarnation: lease.incarnation,
            });
        }
        let needed = needed_index(&node.renewal_marks, now);
        if applied < needed {
            return Err(Rejection::Lagging {
                node: lease.node,
                applied,
                needed,
            });
        }
        push_mark(&mut node.renewal_marks, log_index, now);
        node.renewed_at_ms = now;
        node.renewed_index = log_index;
        effects.push(Effect::Renewed(lease));
        Ok(())
    }

    /// The leader decided this incarnation's lease lapsed: abandon its attempts (their jobs are
    /// requeued and will be reassigned with larger tokens) and refuse it further work.
    ///
    /// Refused if the incarnation registered or renewed again after the one the leader counted
    /// from: the leader decided before it had applied that renewal (it was committed, or even
    /// applied, while the Expire was on its way), and the node, which counts its lease from the
    /// renewal's send time, may be running attempts under it.
    pub(super) fn expire(
        &mut self,
        expiry: Expiry,
        entropy: u64,
        effects: &mut Vec<Effect>,
    ) -> Result<u32, Rejection> {
        let Expiry {
            lease,
            renewed_index,
        } = expiry;
        let node = self.current_node(lease)?;
        if node.expired {
            return Ok(0);
        }
        if node.renewed_index != renewed_index {
            return Err(Rejection::RenewedSince {
                node: lease.node,
                incarnation: lease.incarnation,
                counted_from: renewed_index,
                renewed: node.renewed_index,
            });
        }
        node.expired = true;
        let held: Vec<JobId> = self
            .running
            .get(&lease.node)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let mut requeued = 0;
        for id in held {
            let Some(mut job) = self.job(id) else {
                continue;
            };
            let reason = format!(
                "lease of node {} (incarnation {}) expired",
                lease.node, lease.incarnation
            );
            let end = AttemptEnd::Abandoned { reason };
            self.end_current_attempt(&mut job, end, true, entropy, effects);
            requeued += 1;
            self.put_job(job, effects);
        }
        Ok(requeued)
    }
}

/// The log index a node must have applied for a renewal (or registration) at `now_ms` to count:
/// that of its newest mark older than [`RENEW_APPLY_LAG_MAX_MS`] (0 if none is that old).
fn needed_index(marks: &std::collections::VecDeque<(u64, u64)>, now_ms: u64) -> u64 {
    marks
        .iter()
        .rev()
        .find(|(_, at)| at.saturating_add(RENEW_APPLY_LAG_MAX_MS) <= now_ms)
        .map_or(0, |(index, _)| *index)
}

/// Records a registration or accepted renewal at `index`, keeping the marks a later renewal may
/// be measured against: the newest one older than [`RENEW_APPLY_LAG_MAX_MS`] and newer ones
/// spaced at least 1/32 of it apart (so [`RENEW_MARKS_MAX`] marks always span it).
fn push_mark(marks: &mut std::collections::VecDeque<(u64, u64)>, index: u64, now_ms: u64) {
    let spacing = RENEW_APPLY_LAG_MAX_MS / 32;
    if marks
        .back()
        .is_some_and(|last| last.1.saturating_add(spacing) > now_ms)
    {
        return;
    }
    marks.push_back((index, now_ms));
    let old = |m: &(u64, u64)| m.1.saturating_add(RENEW_APPLY_LAG_MAX_MS) <= now_ms;
    while marks.len() > 1 && (marks.len() > RENEW_MARKS_MAX || marks.get(1).is_some_and(old)) {
        marks.pop_front();
    }
}
