//! The Schedules service: recurring cron schedules, fired once per tick cluster-wide by the
//! leader's scheduler (see `exactly_core::schedule`).

use exactly_core::cron::MissedTickPolicy;
use exactly_core::schedule::{OverlapPolicy, Schedule, ScheduleSpec};
use exactly_core::state::validate_schedule;
use exactly_core::{Proposal, Rejection};
use exactly_proto::v1 as pb;
use exactly_proto::v1::schedules_server::Schedules;
use tonic::{Request, Response, Status};

use super::consistency::{before_read, stamped};
use super::convert::{new_job, spec_to_pb};
use super::status_of;
use crate::node::Node;

pub struct SchedulesService {
    pub node: Node,
}

fn overlap_from_pb(raw: i32) -> Result<OverlapPolicy, Status> {
    match pb::OverlapPolicy::try_from(raw) {
        Ok(pb::OverlapPolicy::Unspecified | pb::OverlapPolicy::Skip) => Ok(OverlapPolicy::Skip),
        Ok(pb::OverlapPolicy::Allow) => Ok(OverlapPolicy::Allow),
        Err(_) => Err(Status::invalid_argument(format!(
            "unknown overlap policy {raw}"
        ))),
    }
}

fn missed_from_pb(raw: i32) -> Result<MissedTickPolicy, Status> {
    match pb::MissedTickPolicy::try_from(raw) {
        Ok(pb::MissedTickPolicy::Unspecified | pb::MissedTickPolicy::Skip) => {
            Ok(MissedTickPolicy::Skip)
        }
        Ok(pb::MissedTickPolicy::RunOnce) => Ok(MissedTickPolicy::RunOnce),
        Err(_) => Err(Status::invalid_argument(format!(
            "unknown missed-tick policy {raw}"
        ))),
    }
}

fn schedule_to_pb(s: &Schedule) -> pb::ScheduleInfo {
    pb::ScheduleInfo {
        name: s.name.clone(),
        cron: s.cron.expr().to_string(),
        time_zone: s.cron.tz().to_string(),
        job: Some(spec_to_pb(&s.job)),
        overlap: match s.overlap {
            OverlapPolicy::Skip => pb::OverlapPolicy::Skip,
            OverlapPolicy::Allow => pb::OverlapPolicy::Allow,
        } as i32,
        missed: match s.missed {
            MissedTickPolicy::Skip => pb::MissedTickPolicy::Skip,
            MissedTickPolicy::RunOnce => pb::MissedTickPolicy::RunOnce,
        } as i32,
        paused: s.paused,
        next_tick_ms: s.next_tick_ms.unwrap_or(0),
        last_fired_tick_ms: s.last_fired_tick_ms.unwrap_or(0),
        last_job_id: s.last_job.unwrap_or(0),
        fired: s.fired,
        skipped: s.skipped,
    }
}

/// How long a node that answered a schedule change waits for its own replica to apply it before
/// it reports the schedule (the change committed on the leader; a follower applies it soon after).
const APPLY_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(2);

impl SchedulesService {
    fn info(&self, name: &str) -> Result<pb::ScheduleInfo, Status> {
        self.node
            .read(|t| t.schedule(name).map(schedule_to_pb))
            .ok_or_else(|| Status::not_found(format!("schedule {name:?} does not exist")))
    }

    /// The schedule once this replica shows `done` true for it. Found by the cluster tests: a
    /// follower answered NOT_FOUND for an Add that had committed, because it read its own state
    /// before applying the entry.
    async fn info_when(
        &self,
        name: &str,
        done: impl Fn(&pb::ScheduleInfo) -> bool,
    ) -> Result<pb::ScheduleInfo, Status> {
        let until = tokio::time::Instant::now() + APPLY_WAIT_MAX;
        loop {
            let info = self.node.read(|t| t.schedule(name).map(schedule_to_pb));
            match info {
                Some(info) if done(&info) => return Ok(info),
                _ if tokio::time::Instant::now() >= until => return self.info(name),
                _ => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    }

    /// Proposes a schedule change for a client; returns the entry's log index.
    async fn change(
        &self,
        by: String,
        name: &str,
        change: Proposal<Result<(), Rejection>>,
    ) -> Result<u64, Status> {
        let (changed, index) = self.node.ask_as(by, change).await?;
        changed.map_err(|why| status_of(&format!("schedule {name:?}"), &why))?;
        Ok(index)
    }
}

#[tonic::async_trait]
impl Schedules for SchedulesService {
    async fn add(
        &self,
        request: Request<pb::AddScheduleRequest>,
    ) -> Result<Response<pb::ScheduleInfo>, Status> {
        let by = crate::auth::actor(&request);
        let r = request.into_inner();
        let spec = r
            .job
            .ok_or_else(|| Status::invalid_argument("a schedule needs a job"))?;
        if spec.run_at_ms != 0 || spec.delay_ms != 0 {
            return Err(Status::invalid_argument(
                "a schedule's job takes no run_at_ms or delay_ms: the tick is its time",
            ));
        }
        if !spec.idempotency_key.is_empty() {
            return Err(Status::invalid_argument(
                "a schedule's job takes no idempotency key: each tick gets its own",
            ));
        }
        let job = new_job(&self.node, "job", spec)?;
        let schedule = ScheduleSpec {
            name: r.name.clone(),
            cron: r.cron,
            tz: r.time_zone,
            job,
            overlap: overlap_from_pb(r.overlap)?,
            missed: missed_from_pb(r.missed)?,
            replace: r.replace,
        };
        validate_schedule(&schedule).map_err(Status::invalid_argument)?;
        let cron = schedule.cron.clone();
        let index = self
            .change(by, &r.name, Proposal::add_schedule(schedule))
            .await?;
        let info = self.info_when(&r.name, |i| i.cron == cron).await?;
        Ok(stamped(Response::new(info), index))
    }

    async fn list(
        &self,
        request: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        let at = before_read(&self.node, &request).await?;
        let schedules = self
            .node
            .read(|t| t.schedules().values().map(schedule_to_pb).collect());
        Ok(stamped(
            Response::new(pb::ListSchedulesResponse { schedules }),
            at,
        ))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveScheduleRequest>,
    ) -> Result<Response<pb::RemoveScheduleResponse>, Status> {
        let by = crate::auth::actor(&request);
        let name = request.into_inner().name;
        let index = self
            .change(by, &name, Proposal::remove_schedule(name.clone()))
            .await?;
        Ok(stamped(Response::new(pb::RemoveScheduleResponse {}), index))
    }

    async fn set_paused(
        &self,
        request: Request<pb::SetSchedulePausedRequest>,
    ) -> Result<Response<pb::ScheduleInfo>, Status> {
        let by = crate::auth::actor(&request);
        let r = request.into_inner();
        let index = self
            .change(
                by,
                &r.name,
                Proposal::pause_schedule(r.name.clone(), r.paused),
            )
            .await?;
        let info = self.info_when(&r.name, |i| i.paused == r.paused).await?;
        Ok(stamped(Response::new(info), index))
    }
}
