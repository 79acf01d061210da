//! The retention pass: deleting finished jobs and idempotency records past their retention, so
//! the state machine stays bounded. The leader computes the cut-offs from its configuration and
//! proposes them as a [`Command::Retain`](crate::Command::Retain); apply only compares
//! timestamps, so every replica deletes the same records.

use super::JobTable;
use crate::command::{Effect, Response, Retention};
use crate::limits::RETAIN_BATCH_MAX;
use crate::records::{Records, Space};

impl<R: Records> JobTable<R> {
    pub(super) fn retain(&mut self, r: &Retention, effects: &mut Vec<Effect>) -> Response {
        let max = (r.max as usize).clamp(1, RETAIN_BATCH_MAX);
        let mut doomed = Vec::new();
        doomed.extend(
            self.time_index(Space::Finished)
                .take_while(|&(at, _)| at < r.finished_before_ms)
                .take(max)
                .map(|(_, id)| id),
        );
        let room = max - doomed.len();
        doomed.extend(
            self.time_index(Space::Dead)
                .take_while(|&(at, _)| at < r.dead_before_ms)
                .take(room)
                .map(|(_, id)| id),
        );
        let jobs = doomed.len() as u32;
        for id in doomed {
            self.delete_job(id, effects);
        }

        // A key stays while its job is live, so a client retrying a long-pending job's submit
        // still finds it; such records are skipped (bounded: at most `max` are looked at past
        // the ones deleted).
        let mut forget = Vec::new();
        let mut skipped = 0;
        for (at, key) in self.keys_by_age() {
            if at >= r.keys_before_ms || forget.len() >= max || skipped >= max {
                break;
            }
            let live = self
                .idempotency_key(&key)
                .and_then(|record| self.job(record.job))
                .is_some_and(|job| !job.status.is_terminal());
            if live {
                skipped += 1;
            } else {
                forget.push((at, key));
            }
        }
        let keys = forget.len() as u32;
        for (at, key) in forget {
            self.forget_key(at, &key);
        }
        Response::Retained { jobs, keys }
    }
}
