//! Typed proposals: a command paired with the shape of the reply [`crate::JobTable::apply`]
//! gives it, so that a caller gets its answer as a type instead of matching every
//! [`Response`] variant (and writing an "unexpected response" arm for the ones that cannot
//! happen). Which reply each command gets is stated here once, and `tests::each_proposal_gets_its_reply`
//! applies every constructor (plain and audited, accepted and refused) and checks the pairing.

use crate::access::TokenGrant;
use crate::command::{
    Assignment, Command, Completion, DeadFilter, DrainNode, Expiry, JoinNote, NewJob,
    NodeRegistration, QueuePatch, Rejection, Renewal, Response, Retention, Submitted,
};
use crate::job::JobStatus;
use crate::queue::QueueConfig;
use crate::schedule::{Fire, ScheduleSpec};
use crate::{JobId, NodeId};

/// A command and how to read its reply.
#[derive(Clone, Debug)]
pub struct Proposal<T> {
    command: Command,
    reply: fn(Response) -> Result<T, Response>,
}

/// How to read the reply of a proposal whose command went its own way (see [`Proposal::split`]).
#[derive(Clone, Copy, Debug)]
pub struct Reply<T>(fn(Response) -> Result<T, Response>);

impl<T> Reply<T> {
    /// The typed reply, or the response itself if `apply` answered something this command
    /// never gets (a bug; the caller reports it). Moves the response, never copies it: this is
    /// on every submit's and completion's path.
    pub fn read(&self, response: Response) -> Result<T, Response> {
        (self.0)(response)
    }
}

/// What a `Complete` or an `Assign` answers: how many were accepted, and each one refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    pub accepted: u32,
    pub rejected: Vec<(JobId, Rejection)>,
}

impl<T> Proposal<T> {
    pub fn command(&self) -> &Command {
        &self.command
    }

    pub fn into_command(self) -> Command {
        self.command
    }

    /// The command to propose, and how to read what `apply` answers it.
    pub fn split(self) -> (Command, Reply<T>) {
        (self.command, Reply(self.reply))
    }

    /// The typed reply, or the response itself if `apply` answered something this command
    /// never gets (a bug; the caller reports it).
    pub fn reply(&self, response: Response) -> Result<T, Response> {
        Reply(self.reply).read(response)
    }

    /// The same proposal as an operator's or administrator's write by `by`, recorded in the
    /// audit trail. `apply` answers it exactly as the command, or with `Response::Refused` if
    /// the command may not be audited (also a bug; see [`crate::Audited::check`]).
    pub fn audited(self, by: String) -> Proposal<T> {
        Proposal {
            command: Command::Audited(Box::new(crate::Audited {
                by,
                command: self.command,
            })),
            reply: self.reply,
        }
    }
}

macro_rules! reply {
    ($pattern:pat => $value:expr) => {
        |response| match response {
            $pattern => Ok($value),
            other => Err(other),
        }
    };
}

impl Proposal<Accepted> {
    pub fn complete(completions: Vec<Completion>) -> Self {
        Proposal {
            command: Command::Complete(completions),
            reply: reply!(Response::Completed { accepted, rejected } => Accepted { accepted, rejected }),
        }
    }

    pub fn assign(plan: Vec<Assignment>) -> Self {
        Proposal {
            command: Command::Assign(plan),
            reply: reply!(Response::Assigned { started, rejected } => Accepted { accepted: started, rejected }),
        }
    }
}

impl Proposal<Vec<Vec<Result<Submitted, Rejection>>>> {
    /// Several clients' Submits in one entry (group commit): per group, in order, what a
    /// Submit of it alone would have answered.
    pub fn submit_groups(groups: Vec<Vec<NewJob>>) -> Self {
        Proposal {
            command: Command::SubmitGroups(groups),
            reply: reply!(Response::SubmittedGroups(results) => results),
        }
    }
}

impl Proposal<Vec<(JobId, Result<JobStatus, Rejection>)>> {
    /// Per job: its status before the cancel, or why it was refused.
    pub fn cancel(jobs: Vec<JobId>) -> Self {
        Proposal {
            command: Command::Cancel(jobs),
            reply: reply!(Response::Cancelled(results) => results),
        }
    }
}

impl Proposal<Result<Vec<JobId>, Rejection>> {
    /// The dead letters redriven.
    pub fn redrive(filter: DeadFilter) -> Self {
        Proposal {
            command: Command::Redrive(filter),
            reply: reply!(Response::Redriven(result) => result),
        }
    }

    /// The dead letters purged.
    pub fn purge_dead(filter: DeadFilter) -> Self {
        Proposal {
            command: Command::PurgeDead(filter),
            reply: reply!(Response::PurgedDead(result) => result),
        }
    }
}

impl Proposal<Result<QueueConfig, Rejection>> {
    /// The queue's settings after the change.
    pub fn configure_queue(queue: String, patch: QueuePatch) -> Self {
        Proposal {
            command: Command::ConfigureQueue { queue, patch },
            reply: reply!(Response::QueueConfigured(result) => result),
        }
    }
}

impl Proposal<Result<(), Rejection>> {
    pub fn add_schedule(spec: ScheduleSpec) -> Self {
        Self::schedule(Command::AddSchedule(spec))
    }

    pub fn remove_schedule(name: String) -> Self {
        Self::schedule(Command::RemoveSchedule(name))
    }

    pub fn pause_schedule(name: String, paused: bool) -> Self {
        Self::schedule(Command::PauseSchedule { name, paused })
    }

    fn schedule(command: Command) -> Self {
        Proposal {
            command,
            reply: reply!(Response::ScheduleChanged(result) => result),
        }
    }

    /// Only audited ([`Proposal::audited`]): bare, apply refuses it.
    pub fn issue_token(grant: TokenGrant) -> Self {
        Proposal {
            command: Command::IssueToken(grant),
            reply: reply!(Response::TokenChanged(result) => result),
        }
    }

    /// Only audited ([`Proposal::audited`]): bare, apply refuses it.
    pub fn revoke_token(name: String) -> Self {
        Proposal {
            command: Command::RevokeToken(name),
            reply: reply!(Response::TokenChanged(result) => result),
        }
    }

    pub fn renew(renewal: Renewal) -> Self {
        Proposal {
            command: Command::Renew(renewal),
            reply: reply!(Response::Renewed(result) => result),
        }
    }

    pub fn node_left(node: NodeId) -> Self {
        Proposal {
            command: Command::NodeLeft(node),
            reply: reply!(Response::NodeLeft(result) => result),
        }
    }

    /// Only audited ([`Proposal::audited`]): a join recorded in the audit trail; nothing else
    /// changes.
    pub fn joined(note: JoinNote) -> Self {
        Proposal {
            command: Command::Joined(note),
            reply: reply!(Response::Empty => Ok::<(), Rejection>(())),
        }
    }
}

impl Proposal<Result<u32, Rejection>> {
    /// The node's slots.
    pub fn register(registration: NodeRegistration) -> Self {
        Proposal {
            command: Command::RegisterNode(registration),
            reply: reply!(Response::NodeRegistered(result) => result),
        }
    }

    /// How many attempts the node runs now.
    pub fn drain(drain: DrainNode) -> Self {
        Proposal {
            command: Command::Drain(drain),
            reply: reply!(Response::Draining(result) => result),
        }
    }

    /// How many attempts the expiry abandoned.
    pub fn expire(expiry: Expiry) -> Self {
        Proposal {
            command: Command::Expire(expiry),
            reply: reply!(Response::Expired(result) => result),
        }
    }
}

impl Proposal<Vec<Result<crate::schedule::Fired, Rejection>>> {
    /// Per fire, in order.
    pub fn fire(fires: Vec<Fire>) -> Self {
        Proposal {
            command: Command::FireSchedules(fires),
            reply: reply!(Response::Fired(results) => results),
        }
    }
}

/// What a retention pass deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deleted {
    pub jobs: u32,
    pub keys: u32,
}

impl Proposal<Deleted> {
    pub fn retain(retention: Retention) -> Self {
        Proposal {
            command: Command::Retain(retention),
            reply: reply!(Response::Retained { jobs, keys } => Deleted { jobs, keys }),
        }
    }
}
