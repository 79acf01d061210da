//! The guard's decisions, without I/O: given the time, the lease deadline, what the node said
//! and what the process tree did, what to do now (SIGTERM the tree, SIGKILL it, report) and when
//! to look again. The I/O loop in [`super`] feeds it events and the clock and carries out its
//! [`Step`]s; the tests below drive it with a table of inputs.

use crate::exec::protocol::StopReason;

/// Between two SIGKILL rounds over the tree while processes remain (they may fork between our
/// scan of `/proc` and our signal), in milliseconds.
pub const KILL_ROUND_INTERVAL_MS: u64 = 10;

/// How long the guard keeps sending SIGKILL rounds before giving up on processes that survive
/// them (changed credentials, stuck in the kernel), in milliseconds. It then reports them as
/// survivors and exits.
pub const KILL_GIVE_UP_MS: u64 = 10_000;

/// Something the guard learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The node moved its lease deadline (it never moves back; an earlier value is ignored).
    Extend { deadline_ms: u64 },
    /// The node asked to stop the command.
    Cancel,
    /// The node's end of the control stream closed: the node died.
    ControlClosed,
    /// The node's control stream was malformed.
    ProtocolError,
    /// The command (the guard's direct child) exited and was reaped.
    CommandExited,
    /// The guard has no child left, hence no descendant: everything it started is gone.
    TreeEmpty,
}

/// A signal for every process of the tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TreeSignal {
    Term,
    Kill,
}

/// What to do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// Signal the whole tree now.
    pub signal: Option<TreeSignal>,
    /// Call [`Policy::tick`] at this time at the latest (`None`: only events matter).
    pub wake_at_ms: Option<u64>,
    /// Nothing is left to supervise: report and exit.
    pub done: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// The command runs; stop it at the lease deadline.
    Running,
    /// SIGTERM was sent; SIGKILL at `kill_at_ms`.
    Terminating {
        kill_at_ms: u64,
    },
    /// SIGKILL rounds until the tree is empty, or until `give_up_at_ms`.
    Killing {
        next_round_ms: u64,
        give_up_at_ms: u64,
    },
    Done,
}

/// The guard's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    deadline_ms: u64,
    grace_ms: u64,
    phase: Phase,
    stopped: Option<StopReason>,
    gave_up: bool,
}

impl Policy {
    /// A guard for a command started under the lease deadline `deadline_ms` (`u64::MAX`: no
    /// lease), with `grace_ms` between SIGTERM and SIGKILL.
    pub fn new(deadline_ms: u64, grace_ms: u64) -> Self {
        Self {
            deadline_ms,
            grace_ms,
            phase: Phase::Running,
            stopped: None,
            gave_up: false,
        }
    }

    /// Whether the command may start at `now_ms`: not once the lease has lapsed.
    pub fn may_start(&self, now_ms: u64) -> bool {
        now_ms < self.deadline_ms
    }

    /// Why the guard stopped the command, if it did (`None`: it ended on its own).
    pub fn stopped(&self) -> Option<StopReason> {
        self.stopped
    }

    /// Whether the guard stopped sending SIGKILL with processes still alive.
    pub fn gave_up(&self) -> bool {
        self.gave_up
    }

    /// The lease deadline the guard enforces now.
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }

    /// Takes `event` into account at `now_ms`, then decides as [`Policy::tick`] does.
    pub fn on(&mut self, now_ms: u64, event: Event) -> Step {
        let mut signal = None;
        match event {
            Event::Extend { deadline_ms } => {
                // Only while running: once the deadline has passed the node has fenced itself
                // too (same clock), and the leader may reassign the job; nothing revives it.
                if self.phase == Phase::Running {
                    self.deadline_ms = self.deadline_ms.max(deadline_ms);
                }
            }
            Event::Cancel => signal = self.stop(now_ms, StopReason::Cancelled),
            Event::ControlClosed => signal = self.stop(now_ms, StopReason::NodeGone),
            Event::ProtocolError => signal = self.stop(now_ms, StopReason::ProtocolError),
            Event::CommandExited => {
                // The command finished its work: what it left behind must not outlive the
                // attempt, and gets no grace (as a process group used to). A command that
                // exits while being stopped keeps the stop's schedule: its descendants get the
                // rest of their grace.
                if self.phase == Phase::Running {
                    self.phase = self.killing(now_ms);
                    signal = Some(TreeSignal::Kill);
                }
            }
            Event::TreeEmpty => self.phase = Phase::Done,
        }
        let step = self.tick(now_ms);
        Step {
            signal: step.signal.or(signal),
            ..step
        }
    }

    /// Decides at `now_ms`, with no new event.
    pub fn tick(&mut self, now_ms: u64) -> Step {
        let mut signal = None;
        match self.phase {
            Phase::Running if now_ms >= self.deadline_ms => {
                self.stopped = Some(StopReason::LeaseExpired);
                let kill_at_ms = self.deadline_ms.saturating_add(self.grace_ms);
                if now_ms >= kill_at_ms {
                    // Woke after the whole grace (the machine was suspended or stopped): the
                    // leader may already have reassigned the job, so no further grace.
                    self.phase = self.killing(now_ms);
                    signal = Some(TreeSignal::Kill);
                } else {
                    self.phase = Phase::Terminating { kill_at_ms };
                    signal = Some(TreeSignal::Term);
                }
            }
            Phase::Terminating { kill_at_ms } if now_ms >= kill_at_ms => {
                self.phase = self.killing(now_ms);
                signal = Some(TreeSignal::Kill);
            }
            Phase::Killing { give_up_at_ms, .. } if now_ms >= give_up_at_ms => {
                self.gave_up = true;
                self.phase = Phase::Done;
            }
            Phase::Killing {
                next_round_ms,
                give_up_at_ms,
            } if now_ms >= next_round_ms => {
                self.phase = Phase::Killing {
                    next_round_ms: now_ms + KILL_ROUND_INTERVAL_MS,
                    give_up_at_ms,
                };
                signal = Some(TreeSignal::Kill);
            }
            _ => {}
        }
        let wake_at_ms = match self.phase {
            Phase::Running => (self.deadline_ms != u64::MAX).then_some(self.deadline_ms),
            Phase::Terminating { kill_at_ms } => Some(kill_at_ms),
            Phase::Killing {
                next_round_ms,
                give_up_at_ms,
            } => Some(next_round_ms.min(give_up_at_ms)),
            Phase::Done => None,
        };
        Step {
            signal,
            wake_at_ms,
            done: self.phase == Phase::Done,
        }
    }

    /// Begins stopping a running command for `reason`: SIGTERM now, SIGKILL after the grace.
    /// A second reason can only bring the SIGKILL closer.
    fn stop(&mut self, now_ms: u64, reason: StopReason) -> Option<TreeSignal> {
        let kill_at_ms = now_ms.saturating_add(self.grace_ms);
        match self.phase {
            Phase::Running => {
                self.stopped = Some(reason);
                self.phase = Phase::Terminating { kill_at_ms };
                Some(TreeSignal::Term)
            }
            Phase::Terminating { kill_at_ms: k } => {
                self.phase = Phase::Terminating {
                    kill_at_ms: k.min(kill_at_ms),
                };
                None
            }
            Phase::Killing { .. } | Phase::Done => None,
        }
    }

    fn killing(&self, now_ms: u64) -> Phase {
        Phase::Killing {
            next_round_ms: now_ms + KILL_ROUND_INTERVAL_MS,
            give_up_at_ms: now_ms + KILL_GIVE_UP_MS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TreeSignal::{Kill, Term};
    use super::*;

    const GRACE: u64 = 1000;

    /// One input of a scenario: at `at` ms, an event (or a bare tick), and the step expected.
    struct Row {
        at: u64,
        event: Option<Event>,
        signal: Option<TreeSignal>,
        wake: Option<u64>,
        done: bool,
    }

    fn row(
        at: u64,
        event: Option<Event>,
        signal: Option<TreeSignal>,
        wake: Option<u64>,
        done: bool,
    ) -> Row {
        Row {
            at,
            event,
            signal,
            wake,
            done,
        }
    }

    /// Runs `rows` against a policy with lease deadline `deadline` and returns it.
    fn run(name: &str, deadline: u64, rows: &[Row]) -> Policy {
        let mut p = Policy::new(deadline, GRACE);
        for (i, r) in rows.iter().enumerate() {
            let step = match r.event {
                Some(e) => p.on(r.at, e),
                None => p.tick(r.at),
            };
            let want = Step {
                signal: r.signal,
                wake_at_ms: r.wake,
                done: r.done,
            };
            assert_eq!(step, want, "{name}: row {i} (at {}, {:?})", r.at, r.event);
        }
        p
    }

    use Event::*;

    /// The table: each scenario's inputs and the exact steps, and why the command was stopped.
    #[test]
    fn decisions_follow_the_table() {
        let k = KILL_ROUND_INTERVAL_MS;
        let scenarios: Vec<(&str, u64, Vec<Row>, Option<StopReason>)> = vec![
            (
                "command exits on its own, nothing left: report",
                5000,
                vec![
                    row(0, None, None, Some(5000), false),
                    row(100, Some(CommandExited), Some(Kill), Some(100 + k), false),
                    row(101, Some(TreeEmpty), None, None, true),
                ],
                None,
            ),
            (
                "command exits and leaves a process behind: SIGKILL rounds until empty",
                5000,
                vec![
                    row(100, Some(CommandExited), Some(Kill), Some(100 + k), false),
                    row(100 + k, None, Some(Kill), Some(100 + 2 * k), false),
                    row(100 + k + 1, None, None, Some(100 + 2 * k), false),
                    row(100 + k + 2, Some(TreeEmpty), None, None, true),
                ],
                None,
            ),
            (
                "extensions keep it running past the first deadline",
                5000,
                vec![
                    row(
                        4000,
                        Some(Extend { deadline_ms: 7000 }),
                        None,
                        Some(7000),
                        false,
                    ),
                    row(5000, None, None, Some(7000), false),
                    row(
                        6000,
                        Some(Extend { deadline_ms: 6500 }),
                        None,
                        Some(7000),
                        false,
                    ),
                    row(6999, None, None, Some(7000), false),
                ],
                None,
            ),
            (
                "deadline passes: SIGTERM at it, SIGKILL at deadline + grace",
                5000,
                vec![
                    row(5000, None, Some(Term), Some(6000), false),
                    row(
                        5500,
                        Some(Extend { deadline_ms: 9000 }),
                        None,
                        Some(6000),
                        false,
                    ),
                    row(5999, None, None, Some(6000), false),
                    row(6000, None, Some(Kill), Some(6000 + k), false),
                    row(6003, Some(TreeEmpty), None, None, true),
                ],
                Some(StopReason::LeaseExpired),
            ),
            (
                "woken late (the machine was stopped): SIGTERM anchored at the deadline",
                5000,
                vec![row(5400, None, Some(Term), Some(6000), false)],
                Some(StopReason::LeaseExpired),
            ),
            (
                "woken after deadline + grace: SIGKILL at once",
                5000,
                vec![row(9000, None, Some(Kill), Some(9000 + k), false)],
                Some(StopReason::LeaseExpired),
            ),
            (
                "node gone (EOF): SIGTERM now, SIGKILL after the grace",
                u64::MAX,
                vec![
                    row(0, None, None, None, false),
                    row(300, Some(ControlClosed), Some(Term), Some(1300), false),
                    row(1300, None, Some(Kill), Some(1300 + k), false),
                    row(1301, Some(CommandExited), None, Some(1300 + k), false),
                    row(1302, Some(TreeEmpty), None, None, true),
                ],
                Some(StopReason::NodeGone),
            ),
            (
                "cancel, then EOF: the earlier SIGKILL time stands, no second SIGTERM",
                u64::MAX,
                vec![
                    row(300, Some(Cancel), Some(Term), Some(1300), false),
                    row(800, Some(ControlClosed), None, Some(1300), false),
                    row(1300, None, Some(Kill), Some(1300 + k), false),
                ],
                Some(StopReason::Cancelled),
            ),
            (
                "cancel; the command exits within the grace, a descendant keeps its grace",
                u64::MAX,
                vec![
                    row(300, Some(Cancel), Some(Term), Some(1300), false),
                    row(400, Some(CommandExited), None, Some(1300), false),
                    row(1300, None, Some(Kill), Some(1300 + k), false),
                ],
                Some(StopReason::Cancelled),
            ),
            (
                "cancel after the command exited: nothing to stop, report as exited",
                u64::MAX,
                vec![
                    row(100, Some(CommandExited), Some(Kill), Some(100 + k), false),
                    row(105, Some(Cancel), None, Some(100 + k), false),
                    row(106, Some(TreeEmpty), None, None, true),
                ],
                None,
            ),
            (
                "malformed control stream: stopped like a dead node",
                u64::MAX,
                vec![row(50, Some(ProtocolError), Some(Term), Some(1050), false)],
                Some(StopReason::ProtocolError),
            ),
            (
                "an EOF after the deadline passed does not delay the SIGKILL",
                5000,
                vec![
                    row(5000, None, Some(Term), Some(6000), false),
                    row(5900, Some(ControlClosed), None, Some(6000), false),
                ],
                Some(StopReason::LeaseExpired),
            ),
        ];
        for (name, deadline, rows, stopped) in scenarios {
            let p = run(name, deadline, &rows);
            assert_eq!(p.stopped(), stopped, "{name}: stop reason");
            assert!(!p.gave_up(), "{name}");
        }
    }

    /// Processes that survive SIGKILL rounds are given up on after `KILL_GIVE_UP_MS`.
    #[test]
    fn survivors_are_given_up_on() {
        let mut p = Policy::new(u64::MAX, GRACE);
        assert_eq!(p.on(0, CommandExited).signal, Some(Kill));
        let mut now = 0;
        let mut rounds = 0;
        loop {
            let step = p.tick(now);
            if step.done {
                break;
            }
            rounds += u32::from(step.signal == Some(Kill));
            now = step.wake_at_ms.expect("a wake-up while killing");
        }
        assert_eq!(now, KILL_GIVE_UP_MS);
        assert!(p.gave_up());
        assert_eq!(
            u64::from(rounds),
            KILL_GIVE_UP_MS / KILL_ROUND_INTERVAL_MS - 1
        );
    }

    /// A command may start only before the deadline.
    #[test]
    fn no_start_after_the_deadline() {
        let p = Policy::new(5000, GRACE);
        assert!(p.may_start(4999));
        assert!(!p.may_start(5000));
        assert!(Policy::new(u64::MAX, GRACE).may_start(u64::MAX - 1));
    }
}
