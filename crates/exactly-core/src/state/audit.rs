//! The audit trail: who asked for each operator's or administrator's write, what it was, and
//! what came of it, kept in the replicated state (the newest
//! [`AUDIT_RECORDS_MAX`](crate::limits::AUDIT_RECORDS_MAX)), so every replica holds the same
//! trail and a snapshot carries it.

use serde::{Deserialize, Serialize};

use super::{truncate_str, JobTable};
use crate::command::{Audited, Command, DeadFilter, Effect, LeaveReason, Response};
use crate::limits::{AUDIT_RECORDS_MAX, AUDIT_TEXT_BYTES_MAX};
use crate::records::Records;

/// One audited write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The log index of the entry that carried it.
    pub index: u64,
    /// The leader's clock when it was proposed.
    pub at_ms: u64,
    /// The credential's name.
    pub by: String,
    /// What was asked, in words (`cancel jobs 4, 9`).
    pub action: String,
    /// What came of it (`2 of 2 cancelled`, `refused: …`).
    pub outcome: String,
}

/// A command's name, for messages.
pub fn command_name(command: &Command) -> &'static str {
    match command {
        Command::Submit(_) => "Submit",
        Command::Assign(_) => "Assign",
        Command::Complete(_) => "Complete",
        Command::Renew(_) => "Renew",
        Command::Expire(_) => "Expire",
        Command::RegisterNode(_) => "RegisterNode",
        Command::Cancel(_) => "Cancel",
        Command::Redrive(_) => "Redrive",
        Command::PurgeDead(_) => "PurgeDead",
        Command::ConfigureQueue { .. } => "ConfigureQueue",
        Command::Retain(_) => "Retain",
        Command::AddSchedule(_) => "AddSchedule",
        Command::RemoveSchedule(_) => "RemoveSchedule",
        Command::PauseSchedule { .. } => "PauseSchedule",
        Command::FireSchedules(_) => "FireSchedules",
        Command::Drain(_) => "Drain",
        Command::NodeLeft(_) => "NodeLeft",
        Command::SubmitGroups(_) => "SubmitGroups",
        Command::SubmitAssign { .. } => "SubmitAssign",
        Command::Batch(_) => "Batch",
        Command::Audited(_) => "Audited",
        Command::IssueToken(_) => "IssueToken",
        Command::RevokeToken(_) => "RevokeToken",
        Command::Joined(_) => "Joined",
    }
}

/// Job ids in words, the first few of them.
fn ids(list: &[u64]) -> String {
    const SHOWN: usize = 10;
    let shown: Vec<String> = list.iter().take(SHOWN).map(u64::to_string).collect();
    if list.len() > SHOWN {
        format!("{}, … ({} in all)", shown.join(", "), list.len())
    } else {
        shown.join(", ")
    }
}

fn filter(f: &DeadFilter) -> String {
    let mut parts = Vec::new();
    if f.all {
        parts.push("all".to_string());
    }
    if !f.ids.is_empty() {
        parts.push(format!("jobs {}", ids(&f.ids)));
    }
    if let Some(q) = &f.queue {
        parts.push(format!("queue {q:?}"));
    }
    if let Some(k) = &f.kind {
        parts.push(format!("kind {k:?}"));
    }
    if parts.is_empty() {
        return "no filter".into();
    }
    parts.join(", ")
}

/// A queue change in words (`pause, concurrency 0 (no limit), rate 10 per 1000 ms`).
fn queue_patch(patch: &crate::command::QueuePatch) -> String {
    let mut parts = Vec::new();
    match patch.paused {
        Some(true) => parts.push("pause".to_string()),
        Some(false) => parts.push("resume".to_string()),
        None => {}
    }
    match patch.concurrency_max {
        Some(0) => parts.push("concurrency 0 (no limit)".to_string()),
        Some(n) => parts.push(format!("concurrency {n}")),
        None => {}
    }
    match &patch.rate {
        Some(Some(rate)) => parts.push(format!("rate {} per {} ms", rate.jobs, rate.period_ms)),
        Some(None) => parts.push("no rate limit".to_string()),
        None => {}
    }
    if parts.is_empty() {
        return "no change".into();
    }
    parts.join(", ")
}

/// An audited command in words.
pub fn describe(command: &Command) -> String {
    let text = match command {
        Command::Cancel(list) => format!("cancel jobs {}", ids(list)),
        Command::Redrive(f) => format!("redrive dead letters ({})", filter(f)),
        Command::PurgeDead(f) => format!("purge dead letters ({})", filter(f)),
        Command::ConfigureQueue { queue, patch } => {
            format!("configure queue {queue:?}: {}", queue_patch(patch))
        }
        Command::AddSchedule(spec) => format!(
            "{} schedule {:?} ({:?} {}) of kind {:?}",
            if spec.replace {
                "add or replace"
            } else {
                "add"
            },
            spec.name,
            spec.cron,
            spec.tz,
            spec.job.kind
        ),
        Command::RemoveSchedule(name) => format!("remove schedule {name:?}"),
        Command::PauseSchedule { name, paused } => format!(
            "{} schedule {name:?}",
            if *paused { "pause" } else { "resume" }
        ),
        Command::Drain(d) => match d.reason {
            LeaveReason::Removed => format!("remove node {}", d.node),
            _ => format!(
                "drain node {} (running jobs may finish for {} ms)",
                d.node, d.deadline_after_ms
            ),
        },
        Command::IssueToken(grant) => format!(
            "issue token {:?} ({}){}",
            grant.name,
            crate::access::scopes_text(&grant.scopes),
            match grant.expires_at_ms {
                Some(at) => format!(", expiring at {at} ms"),
                None => String::new(),
            }
        ),
        Command::RevokeToken(name) => format!("revoke token {name:?}"),
        Command::Joined(note) => {
            let role = if note.voter { "voter" } else { "learner" };
            if note.new_member {
                format!("admit node {} ({}) as a {role}", note.node, note.addr)
            } else {
                format!("node {} rejoined at {} as a {role}", note.node, note.addr)
            }
        }
        other => command_name(other).to_string(),
    };
    truncate_str(text, AUDIT_TEXT_BYTES_MAX)
}

/// What came of an audited command, in words.
pub fn outcome(response: &Response) -> String {
    let refused = |why: &dyn std::fmt::Display| format!("refused: {why}");
    let text = match response {
        Response::Cancelled(results) => {
            let done = results.iter().filter(|(_, r)| r.is_ok()).count();
            format!("{done} of {} cancelled", results.len())
        }
        Response::Redriven(Ok(list)) => format!("{} redriven", list.len()),
        Response::PurgedDead(Ok(list)) => format!("{} purged", list.len()),
        Response::QueueConfigured(Ok(_))
        | Response::ScheduleChanged(Ok(()))
        | Response::TokenChanged(Ok(()))
        | Response::Empty => "done".into(),
        Response::Draining(Ok(running)) => format!("draining; {running} attempts running"),
        Response::Redriven(Err(why))
        | Response::PurgedDead(Err(why))
        | Response::QueueConfigured(Err(why))
        | Response::ScheduleChanged(Err(why))
        | Response::Draining(Err(why))
        | Response::TokenChanged(Err(why))
        | Response::Refused(why) => refused(why),
        other => format!("{other:?}"),
    };
    truncate_str(text, AUDIT_TEXT_BYTES_MAX)
}

impl<R: Records> JobTable<R> {
    /// An `Audited` command: checked, applied as its command, recorded with its outcome.
    pub(super) fn apply_audited(
        &mut self,
        log_index: u64,
        entropy: u64,
        audited: Audited,
        effects: &mut Vec<Effect>,
    ) -> Response {
        if let Err(why) = audited.check() {
            return Response::Refused(crate::command::Rejection::Invalid(why));
        }
        let Audited { by, command } = audited;
        let action = describe(&command);
        let response = match command {
            Command::IssueToken(grant) => self.issue_token(grant, &by, effects),
            Command::RevokeToken(name) => self.revoke_token(&name, effects),
            Command::Joined(_) => Response::Empty,
            command => self.apply_command(log_index, entropy, command, effects),
        };
        if self.audit.len() >= AUDIT_RECORDS_MAX {
            self.audit.pop_front();
        }
        self.audit.push_back(AuditRecord {
            index: log_index,
            at_ms: self.now_ms,
            by,
            action,
            outcome: outcome(&response),
        });
        response
    }

    /// The audit trail, oldest first.
    pub fn audit(&self) -> &std::collections::VecDeque<AuditRecord> {
        &self.audit
    }

    /// The audit trail's invariants: bounded, in log order, every record within its bounds.
    pub(super) fn check_audit(&self) -> Result<(), String> {
        if self.audit.len() > AUDIT_RECORDS_MAX {
            return Err(format!("{} audit records", self.audit.len()));
        }
        let mut last = 0;
        for r in &self.audit {
            if r.index < last {
                return Err(format!("audit record at {} after {last}", r.index));
            }
            last = r.index;
            if r.action.len() > AUDIT_TEXT_BYTES_MAX || r.outcome.len() > AUDIT_TEXT_BYTES_MAX {
                return Err(format!("audit record at {} is too long", r.index));
            }
        }
        Ok(())
    }
}
