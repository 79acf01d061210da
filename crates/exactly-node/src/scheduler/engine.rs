//! The leader's scheduling decisions, pure, in the shape of `JobTable::apply`: which members
//! get no new work, when to plan assignments (one Assign proposal in flight at a time), which
//! leases to expire (each once until answered), which cron ticks to fire, when a retention pass
//! is due and with which cut-offs, and when a membership round starts (one at a time).
//!
//! [`Engine::handle`] takes one [`Event`] and a [`World`] (the applied table, both clocks, the
//! Raft members, the members silent on heartbeats and the lease review's verdict, all as
//! inputs) and returns the [`Action`]s the actor carries out. The actor reads the world, runs
//! the engine under the table's read lock and spawns the proposals; it decides nothing.
//!
//! Rules, asserted by the tests below:
//! - At most one Assign proposal is in flight; a wake-up meanwhile plans again as soon as it
//!   returns, and so does a full batch (more may be ready). A failed proposal plans nothing
//!   until the next tick.
//! - Members not in the Raft membership, quiet (no recent renewal) or silent (no heartbeat
//!   answers) get no new work; the view is published for the leader's group commit.
//! - An expiry is proposed once per lease until its proposal returns, and logged once while
//!   the lease stays lapsed.
//! - At most one housekeeping proposal is in flight: due cron ticks first (unpaused schedules,
//!   at most [`FIRE_BATCH_MAX`]), else a retention pass at most every `interval` and only when
//!   something is past its age; a full retention batch goes on at once.
//! - A membership round starts every [`MEMBERSHIP_EVERY_TICKS`] ticks, one at a time.

use std::collections::BTreeSet;
use std::time::Duration;

use exactly_core::limits::{ASSIGN_BATCH_MAX, FIRE_BATCH_MAX, RETAIN_BATCH_MAX};
use exactly_core::records::{MemRecords, Records};
use exactly_core::schedule::Fire;
use exactly_core::{
    plan_assignments, Assignment, Command, Expiry, JobTable, NodeId, NodeLease, Retention,
};

/// Scheduler ticks between two membership rounds (drained nodes leaving, voters topped up).
pub const MEMBERSHIP_EVERY_TICKS: u32 = 3;

/// The retention settings the engine cuts by.
#[derive(Clone, Copy, Debug)]
pub struct RetentionSettings {
    pub finished: Duration,
    pub dead_letters: Duration,
    pub idempotency_keys: Duration,
    /// At most one pass per this long (unless the last one filled its batch).
    pub interval: Duration,
}

/// What happened, as the actor saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Something became assignable (a submit, a completion, a registration).
    Wake,
    /// The periodic tick: plan, housekeep, maybe start a membership round.
    Tick,
    /// The Assign proposal returned (`ok`: committed).
    Proposed { planned: usize, ok: bool },
    /// The housekeeping proposal returned.
    Housekept(Housekept),
    /// The membership round finished.
    MembershipDone,
    /// The Expire proposal for this lease returned (committed or not).
    Expired(NodeLease),
}

/// How a housekeeping proposal went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Housekept {
    /// Cron ticks fired (a long catch-up may leave the next one due at once).
    Fired,
    /// A retention pass deleted this many jobs and keys.
    Retained { jobs: u32, keys: u32 },
    /// Not committed (lost leadership, no quorum, a timeout).
    NotCommitted,
}

/// The world as of one event: inputs only.
pub struct World<'a, R: Records = MemRecords> {
    /// The applied table.
    pub table: &'a JobTable<R>,
    /// This leader's wall clock (what apply will be stamped with), Unix ms.
    pub now_wall_ms: u64,
    /// Monotonic milliseconds (any fixed origin).
    pub now_mono_ms: u64,
    /// The Raft members (voters and learners).
    pub members: &'a BTreeSet<NodeId>,
    /// Members that stopped answering the leader's heartbeats.
    pub silent: &'a BTreeSet<NodeId>,
    /// The lease review: leases lapsed on this leader's clock.
    pub expire: &'a [Expiry],
    /// The lease review: nodes with no recent renewal.
    pub quiet: &'a BTreeSet<NodeId>,
}

/// What the actor is to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Publish the members that get no new work (the leader's group commit plans with it).
    View(BTreeSet<NodeId>),
    /// Propose these assignments; answer [`Event::Proposed`].
    Assign(Vec<Assignment>),
    /// Propose this expiry; answer [`Event::Expired`]. `log`: first time this lapse is seen.
    Expire { expiry: Expiry, log: bool },
    /// Propose this cron fire or retention pass; answer [`Event::Housekept`].
    Housekeep(Box<Command>),
    /// Run a membership round with these quiet nodes; answer [`Event::MembershipDone`].
    Membership { quiet: BTreeSet<NodeId> },
}

/// The scheduler's state: only what is in flight and when things last ran.
#[derive(Clone, Debug)]
pub struct Engine {
    retention: RetentionSettings,
    /// An Assign proposal is in flight.
    assigning: bool,
    /// Plan again when it returns.
    again: bool,
    /// Expiries proposed and not yet answered.
    expiring: BTreeSet<NodeLease>,
    /// Lapsed leases already logged (an expiry that cannot commit is retried every tick but
    /// logged once).
    expiry_logged: BTreeSet<NodeLease>,
    /// A cron-fire or retention proposal is in flight.
    housekeeping: bool,
    /// When the last retention pass ran or found nothing (monotonic ms).
    retained_at_ms: Option<u64>,
    /// A membership round is running.
    membership_busy: bool,
    /// Ticks since the last membership round started.
    ticks_since_membership: u32,
}

impl Engine {
    pub fn new(retention: RetentionSettings) -> Self {
        Engine {
            retention,
            assigning: false,
            again: false,
            expiring: BTreeSet::new(),
            expiry_logged: BTreeSet::new(),
            housekeeping: false,
            retained_at_ms: None,
            membership_busy: false,
            ticks_since_membership: 0,
        }
    }

    /// Applies one event and returns what to do.
    pub fn handle<R: Records>(&mut self, event: Event, world: &World<'_, R>) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Wake => self.plan(world, &mut out),
            Event::Tick => {
                self.plan(world, &mut out);
                self.housekeep(world, &mut out);
                self.ticks_since_membership += 1;
                if !self.membership_busy && self.ticks_since_membership >= MEMBERSHIP_EVERY_TICKS {
                    self.ticks_since_membership = 0;
                    self.membership_busy = true;
                    out.push(Action::Membership {
                        quiet: world.quiet.clone(),
                    });
                }
            }
            Event::Proposed { planned, ok } => {
                self.assigning = false;
                // Not committed: lost leadership or no quorum; the tick retries (and the
                // leadership watcher stops this actor if another node leads now).
                if ok && (self.again || planned == ASSIGN_BATCH_MAX) {
                    self.again = false;
                    self.plan(world, &mut out);
                }
            }
            Event::Housekept(how) => {
                self.housekeeping = false;
                let more = match how {
                    // A catch-up longer than the fire limit leaves the next tick due.
                    Housekept::Fired => true,
                    // A full batch means more may be past retention: go on at once.
                    Housekept::Retained { jobs, keys } => {
                        let full =
                            jobs as usize == RETAIN_BATCH_MAX || keys as usize == RETAIN_BATCH_MAX;
                        if full {
                            self.retained_at_ms = None;
                        }
                        full
                    }
                    Housekept::NotCommitted => false,
                };
                if more {
                    self.housekeep(world, &mut out);
                }
            }
            Event::MembershipDone => self.membership_busy = false,
            Event::Expired(lease) => {
                self.expiring.remove(&lease);
            }
        }
        out
    }

    /// Expires lapsed leases, then plans a batch of assignments unless one is in flight.
    fn plan<R: Records>(&mut self, world: &World<'_, R>, out: &mut Vec<Action>) {
        // The lease view first: a new leader's very first plan must already skip a dead
        // predecessor.
        self.expiry_logged
            .retain(|l| world.expire.iter().any(|e| e.lease == *l));
        for expiry in world.expire {
            if self.expiring.insert(expiry.lease) {
                let log = self.expiry_logged.insert(expiry.lease);
                out.push(Action::Expire {
                    expiry: *expiry,
                    log,
                });
            }
        }
        if self.assigning {
            self.again = true;
            return;
        }
        // Registered nodes out of the membership, quiet or silent get nothing new (leaving
        // and expired ones are skipped by the policy itself).
        let excluded: BTreeSet<NodeId> = world
            .table
            .nodes()
            .keys()
            .filter(|id| {
                !world.members.contains(id) || world.quiet.contains(id) || world.silent.contains(id)
            })
            .copied()
            .collect();
        let plan = plan_assignments(world.table, world.now_wall_ms, ASSIGN_BATCH_MAX, &excluded);
        out.push(Action::View(excluded));
        if !plan.is_empty() {
            self.assigning = true;
            out.push(Action::Assign(plan));
        }
    }

    /// The next piece of housekeeping, if any and none is in flight: due cron ticks first
    /// (they are time-critical), then a retention pass every `interval`.
    fn housekeep<R: Records>(&mut self, world: &World<'_, R>, out: &mut Vec<Action>) {
        if self.housekeeping {
            return;
        }
        let now = world.now_wall_ms;
        let fires: Vec<Fire> = world
            .table
            .schedules()
            .values()
            .filter(|s| !s.paused)
            .filter_map(|s| {
                let tick = s.next_tick_ms.filter(|&tick| tick <= now)?;
                Some(Fire {
                    name: s.name.clone(),
                    tick_ms: tick,
                })
            })
            .take(FIRE_BATCH_MAX)
            .collect();
        let command = if !fires.is_empty() {
            Command::FireSchedules(fires)
        } else {
            let keep = self.retention;
            if self.retained_at_ms.is_some_and(|at| {
                world.now_mono_ms.saturating_sub(at) < keep.interval.as_millis() as u64
            }) {
                return;
            }
            self.retained_at_ms = Some(world.now_mono_ms);
            let cut = |age: Duration| now.saturating_sub(age.as_millis() as u64);
            let retention = Retention {
                finished_before_ms: cut(keep.finished),
                dead_before_ms: cut(keep.dead_letters),
                keys_before_ms: cut(keep.idempotency_keys),
                max: RETAIN_BATCH_MAX as u32,
            };
            let t = world.table;
            let due = t
                .oldest_finished_ms()
                .is_some_and(|at| at < retention.finished_before_ms)
                || t.oldest_dead_ms()
                    .is_some_and(|at| at < retention.dead_before_ms)
                || t.oldest_key_ms()
                    .is_some_and(|at| at < retention.keys_before_ms);
            if !due {
                return;
            }
            Command::Retain(retention)
        };
        self.housekeeping = true;
        out.push(Action::Housekeep(Box::new(command)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_core::cron::MissedTickPolicy;
    use exactly_core::schedule::{OverlapPolicy, ScheduleSpec};
    use exactly_core::{Completion, NewJob, NodeRegistration, Outcome, Request};

    /// 2026-01-01T00:00:00Z.
    const T0: u64 = 1_767_225_600_000;

    fn settings() -> RetentionSettings {
        RetentionSettings {
            finished: Duration::from_secs(10),
            dead_letters: Duration::from_secs(60),
            idempotency_keys: Duration::from_secs(60),
            interval: Duration::from_secs(1),
        }
    }

    /// A table built by applying `commands` at `T0`, one entry each from index 1.
    fn table(commands: Vec<Command>) -> JobTable {
        let mut t = JobTable::new();
        for (i, command) in commands.into_iter().enumerate() {
            t.apply(i as u64 + 1, Request::at(T0, command));
        }
        t
    }

    fn register(node: NodeId) -> Command {
        Command::RegisterNode(NodeRegistration {
            node,
            incarnation: 1,
            slots: 4,
            addr: format!("10.0.0.{node}:7000"),
            applied: u64::MAX,
        })
    }

    fn submit(n: usize) -> Command {
        let job = NewJob {
            queue: "q".into(),
            kind: "noop".into(),
            max_attempts: 3,
            ..NewJob::default()
        };
        Command::Submit(vec![job; n])
    }

    fn schedule(name: &str) -> Command {
        Command::AddSchedule(ScheduleSpec {
            name: name.into(),
            cron: "* * * * *".into(),
            tz: "UTC".into(),
            job: NewJob {
                queue: "q".into(),
                kind: "noop".into(),
                max_attempts: 3,
                ..NewJob::default()
            },
            overlap: OverlapPolicy::Allow,
            missed: MissedTickPolicy::Skip,
            replace: false,
        })
    }

    struct Inputs {
        members: BTreeSet<NodeId>,
        silent: BTreeSet<NodeId>,
        quiet: BTreeSet<NodeId>,
        expire: Vec<Expiry>,
    }

    impl Inputs {
        fn new(members: &[NodeId]) -> Self {
            Inputs {
                members: members.iter().copied().collect(),
                silent: BTreeSet::new(),
                quiet: BTreeSet::new(),
                expire: Vec::new(),
            }
        }

        fn world<'a>(&'a self, table: &'a JobTable, wall: u64, mono: u64) -> World<'a> {
            World {
                table,
                now_wall_ms: wall,
                now_mono_ms: mono,
                members: &self.members,
                silent: &self.silent,
                expire: &self.expire,
                quiet: &self.quiet,
            }
        }
    }

    fn assigned(out: &[Action]) -> Vec<(u64, NodeId)> {
        out.iter()
            .filter_map(|a| match a {
                Action::Assign(plan) => Some(plan.iter().map(|p| (p.job, p.node))),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn housekeeping(out: &[Action]) -> Vec<&Command> {
        out.iter()
            .filter_map(|a| match a {
                Action::Housekeep(c) => Some(&**c),
                _ => None,
            })
            .collect()
    }

    /// One Assign proposal at a time: a wake-up while one is in flight plans again when it
    /// returns; a full batch plans again by itself; a failed one waits for the next tick.
    #[test]
    fn one_assign_proposal_is_in_flight_at_a_time() {
        let t = table(vec![register(1), submit(3)]);
        let inputs = Inputs::new(&[1]);
        let w = inputs.world(&t, T0, 0);
        let mut e = Engine::new(settings());
        let out = e.handle(Event::Wake, &w);
        assert_eq!(assigned(&out), vec![(1, 1), (2, 1), (3, 1)]);
        assert!(out.contains(&Action::View(BTreeSet::new())));
        assert!(
            e.handle(Event::Wake, &w).is_empty(),
            "in flight: remembered"
        );
        let out = e.handle(
            Event::Proposed {
                planned: 3,
                ok: true,
            },
            &w,
        );
        assert_eq!(assigned(&out).len(), 3, "planned again after the wake-up");
        let out = e.handle(
            Event::Proposed {
                planned: 3,
                ok: true,
            },
            &w,
        );
        assert!(out.is_empty(), "nothing asked for a new plan");
        e.handle(Event::Wake, &w);
        let out = e.handle(
            Event::Proposed {
                planned: ASSIGN_BATCH_MAX,
                ok: true,
            },
            &w,
        );
        assert_eq!(assigned(&out).len(), 3, "a full batch plans again");
        e.handle(Event::Wake, &w);
        let out = e.handle(
            Event::Proposed {
                planned: 3,
                ok: false,
            },
            &w,
        );
        assert!(out.is_empty(), "a failed proposal waits for the tick");
        assert_eq!(assigned(&e.handle(Event::Wake, &w)).len(), 3);
    }

    /// Registered nodes out of the Raft membership, quiet or silent get nothing new, and the
    /// leader's group commit is told so.
    #[test]
    fn nodes_out_quiet_or_silent_get_no_new_work() {
        let t = table(vec![
            register(1),
            register(2),
            register(3),
            register(4),
            submit(8),
        ]);
        let mut inputs = Inputs::new(&[1, 2, 3]);
        inputs.quiet.insert(2);
        inputs.silent.insert(3);
        let w = inputs.world(&t, T0, 0);
        let out = Engine::new(settings()).handle(Event::Wake, &w);
        assert!(out.contains(&Action::View([2, 3, 4].into_iter().collect())));
        let nodes: BTreeSet<NodeId> = assigned(&out).into_iter().map(|(_, n)| n).collect();
        assert_eq!(nodes, BTreeSet::from([1]));
    }

    /// An expiry is proposed once per lease until its proposal returns, and logged once for as
    /// long as the lease stays lapsed.
    #[test]
    fn an_expiry_is_proposed_once_until_answered_and_logged_once() {
        let t = table(vec![register(1), register(2)]);
        let lease = NodeLease {
            node: 2,
            incarnation: 1,
        };
        let expiry = Expiry {
            lease,
            renewed_index: 2,
        };
        let mut inputs = Inputs::new(&[1, 2]);
        inputs.expire.push(expiry);
        let mut e = Engine::new(settings());
        let expiries = |out: Vec<Action>| -> Vec<bool> {
            out.into_iter()
                .filter_map(|a| match a {
                    Action::Expire { log, .. } => Some(log),
                    _ => None,
                })
                .collect()
        };
        let w = inputs.world(&t, T0, 0);
        assert_eq!(expiries(e.handle(Event::Wake, &w)), vec![true]);
        assert_eq!(expiries(e.handle(Event::Tick, &w)), Vec::<bool>::new());
        e.handle(Event::Expired(lease), &w);
        assert_eq!(
            expiries(e.handle(Event::Wake, &w)),
            vec![false],
            "retried, not logged"
        );
        e.handle(Event::Expired(lease), &w);
        let calm = Inputs::new(&[1, 2]);
        e.handle(Event::Wake, &calm.world(&t, T0, 0));
        assert_eq!(
            expiries(e.handle(Event::Wake, &w)),
            vec![true],
            "a new lapse is logged"
        );
    }

    /// Due cron ticks of unpaused schedules fire before any retention pass, one housekeeping
    /// proposal at a time; a fire asks for another round at once.
    #[test]
    fn due_cron_ticks_fire_first_one_proposal_at_a_time() {
        let paused = Command::PauseSchedule {
            name: "b".into(),
            paused: true,
        };
        let t = table(vec![schedule("a"), schedule("b"), paused]);
        let tick = t.schedules()["a"].next_tick_ms.expect("a next tick");
        let inputs = Inputs::new(&[1]);
        let mut e = Engine::new(settings());
        let early = inputs.world(&t, tick - 1, 0);
        assert!(housekeeping(&e.handle(Event::Tick, &early)).is_empty());
        let due = inputs.world(&t, tick, 0);
        let out = e.handle(Event::Tick, &due);
        let fires = vec![Fire {
            name: "a".into(),
            tick_ms: tick,
        }];
        assert_eq!(
            housekeeping(&out),
            vec![&Command::FireSchedules(fires.clone())]
        );
        assert!(
            housekeeping(&e.handle(Event::Tick, &due)).is_empty(),
            "one in flight"
        );
        let out = e.handle(Event::Housekept(Housekept::Fired), &due);
        assert_eq!(housekeeping(&out), vec![&Command::FireSchedules(fires)]);
    }

    /// A retention pass runs at most every `interval`, only when something is past its age,
    /// with cut-offs from the leader's wall clock; a full batch goes on at once.
    #[test]
    fn retention_runs_when_due_at_most_every_interval() {
        let done = Command::Complete(vec![Completion {
            job: 1,
            token: 3,
            outcome: Outcome::Succeeded { result: vec![] },
        }]);
        let assign = Command::Assign(vec![exactly_core::Assignment {
            job: 1,
            node: 1,
            incarnation: 1,
        }]);
        let t = table(vec![register(1), submit(1), assign, done]);
        assert_eq!(t.oldest_finished_ms(), Some(T0));
        let inputs = Inputs::new(&[1]);
        let mut e = Engine::new(settings());
        // Not old enough yet: nothing, and the next look waits for the interval.
        assert!(housekeeping(&e.handle(Event::Tick, &inputs.world(&t, T0 + 10_000, 0))).is_empty());
        let late = T0 + 10_001;
        assert!(housekeeping(&e.handle(Event::Tick, &inputs.world(&t, late, 999))).is_empty());
        let out = e.handle(Event::Tick, &inputs.world(&t, late, 1000));
        let pass = Retention {
            finished_before_ms: late - 10_000,
            dead_before_ms: late - 60_000,
            keys_before_ms: late - 60_000,
            max: RETAIN_BATCH_MAX as u32,
        };
        assert_eq!(housekeeping(&out), vec![&Command::Retain(pass.clone())]);
        let w = inputs.world(&t, late, 1001);
        let out = e.handle(
            Event::Housekept(Housekept::Retained { jobs: 1, keys: 0 }),
            &w,
        );
        assert!(out.is_empty(), "a partial batch waits for the interval");
        let full = Housekept::Retained {
            jobs: RETAIN_BATCH_MAX as u32,
            keys: 0,
        };
        e.handle(Event::Tick, &inputs.world(&t, late, 2001));
        let out = e.handle(Event::Housekept(full), &inputs.world(&t, late, 2002));
        assert_eq!(
            housekeeping(&out),
            vec![&Command::Retain(pass)],
            "a full batch goes on"
        );
        let out = e.handle(Event::Housekept(Housekept::NotCommitted), &w);
        assert!(out.is_empty());
    }

    /// A membership round starts every third tick, never two at once, with the quiet nodes.
    #[test]
    fn membership_rounds_start_every_third_tick_one_at_a_time() {
        let t = table(vec![register(1)]);
        let mut inputs = Inputs::new(&[1]);
        inputs.quiet.insert(3);
        let w = inputs.world(&t, T0, 0);
        let mut e = Engine::new(settings());
        let rounds = |out: &[Action]| {
            out.iter()
                .filter(|a| matches!(a, Action::Membership { quiet } if quiet.contains(&3)))
                .count()
        };
        let started: Vec<usize> = (0..9).map(|_| rounds(&e.handle(Event::Tick, &w))).collect();
        assert_eq!(
            started,
            vec![0, 0, 1, 0, 0, 0, 0, 0, 0],
            "busy: no second round"
        );
        e.handle(Event::MembershipDone, &w);
        let started: Vec<usize> = (0..3).map(|_| rounds(&e.handle(Event::Tick, &w))).collect();
        assert_eq!(started, vec![1, 0, 0]);
    }
}
