//! The bridge from the state machine's apply path to this node's actors.
//!
//! Apply must not block, so the hooks only cast: attempt starts to the executor, and a
//! de-duplicated wake-up to the scheduler (one wake in its mailbox at a time, however many
//! entries apply).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use std::time::Instant;

use exactly_core::{NodeLease, StartAttempt};
use exactly_store::ApplyObserver;
use ractor::ActorRef;

use crate::executor::ExecutorMsg;
use crate::scheduler::SchedulerMsg;

#[derive(Default)]
pub struct Hooks {
    node_id: u64,
    pub executor: OnceLock<ActorRef<ExecutorMsg>>,
    pub scheduler: Mutex<Option<ActorRef<SchedulerMsg>>>,
    /// Set while a wake-up is in the scheduler's mailbox.
    pub wake_pending: AtomicBool,
    /// Applied index, for /readyz and tests.
    pub applied: std::sync::atomic::AtomicU64,
    /// When this replica applied each incarnation's newest lease renewal or registration (its
    /// log index, this process's monotonic clock). Only the leader acts on it (see `lease.rs`).
    pub renewals: Mutex<crate::lease::Renewals>,
    /// Job events for Watch streams.
    pub events: std::sync::Arc<crate::events::EventHub>,
    /// The public port's credentials: told of every change to the issued tokens.
    pub tokens: OnceLock<std::sync::Arc<crate::auth::TokenSet>>,
}

impl Hooks {
    pub fn new(node_id: u64) -> Self {
        Self {
            node_id,
            ..Self::default()
        }
    }

    /// Asks the scheduler (if this node leads) to plan again.
    pub fn wake_scheduler(&self) {
        if self.wake_pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let scheduler = self.scheduler.lock().unwrap_or_else(|p| p.into_inner());
        match scheduler.as_ref() {
            Some(s) => {
                if s.send_message(SchedulerMsg::Wake).is_err() {
                    self.wake_pending.store(false, Ordering::Release);
                }
            }
            None => self.wake_pending.store(false, Ordering::Release),
        }
    }
}

impl ApplyObserver for Hooks {
    fn on_start(&self, start: StartAttempt) {
        if start.node != self.node_id {
            return;
        }
        tracing::trace!(target: exactly_store::TIMELINE, job = start.job, "start");
        if let Some(executor) = self.executor.get() {
            let _ = executor.send_message(ExecutorMsg::Start(start));
        }
    }

    fn on_renewed(&self, lease: NodeLease, index: u64) {
        let mut renewals = self.renewals.lock().unwrap_or_else(|p| p.into_inner());
        // One entry per node: a newer incarnation replaces the older one's.
        renewals.retain(|l, _| l.node != lease.node || l.incarnation >= lease.incarnation);
        renewals.insert(lease, (index, Instant::now()));
    }

    fn on_applied(&self, index: u64) {
        self.applied.fetch_max(index, Ordering::AcqRel);
        self.wake_scheduler();
    }

    fn on_cancel(&self, job: u64, token: u64, node: u64) {
        if node != self.node_id {
            return;
        }
        if let Some(executor) = self.executor.get() {
            let _ = executor.send_message(ExecutorMsg::Cancel { job, token });
        }
    }

    fn on_events(&self, events: Vec<(u64, exactly_core::JobEvent)>) {
        self.events.publish(events);
    }

    fn on_tokens(&self, tokens: &exactly_store::IssuedTokens) {
        if let Some(set) = self.tokens.get() {
            set.set_issued(tokens);
        }
    }

    fn on_snapshot_installed(&self, index: u64) {
        self.events.reset_to(index);
        self.on_applied(index);
    }
}
