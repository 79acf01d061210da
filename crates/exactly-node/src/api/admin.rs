//! The DeadLetters and Queues services.

use std::collections::BTreeSet;

use exactly_core::limits::DEAD_BATCH_MAX;
use exactly_core::QueueConfig;
use exactly_core::{DeadFilter, Proposal, QueuePatch, RateLimit};
use exactly_proto::v1 as pb;
use exactly_proto::v1::dead_letters_server::DeadLetters;
use exactly_proto::v1::queues_server::Queues;
use tonic::{Request, Response, Status};

use super::consistency::{before_read, stamped};
use super::convert::queue_to_pb;
use super::status_of;
use crate::node::Node;

pub struct DeadLettersService {
    pub node: Node,
}

pub struct QueuesService {
    pub node: Node,
}

fn dead_filter(f: pb::DeadLetterFilter) -> Result<DeadFilter, Status> {
    if f.job_ids.len() > DEAD_BATCH_MAX {
        return Err(Status::resource_exhausted(format!(
            "{} job ids exceed the limit of {DEAD_BATCH_MAX} per call",
            f.job_ids.len()
        )));
    }
    let max = match f.limit {
        0 => DEAD_BATCH_MAX as u32,
        n if n as usize > DEAD_BATCH_MAX => {
            return Err(Status::invalid_argument(format!(
                "limit {n} exceeds the maximum of {DEAD_BATCH_MAX}"
            )))
        }
        n => n,
    };
    let filter = DeadFilter {
        ids: f.job_ids,
        queue: (!f.queue.is_empty()).then_some(f.queue),
        kind: (!f.kind.is_empty()).then_some(f.kind),
        max,
        all: f.all,
    };
    // An empty message must never mean "every dead letter": that takes `all = true`.
    filter.check().map_err(Status::invalid_argument)?;
    Ok(filter)
}

#[tonic::async_trait]
impl DeadLetters for DeadLettersService {
    async fn redrive(
        &self,
        request: Request<pb::DeadLetterFilter>,
    ) -> Result<Response<pb::DeadLetterResponse>, Status> {
        let by = crate::auth::actor(&request);
        let filter = dead_filter(request.into_inner())?;
        let (redriven, index) = self.node.ask_as(by, Proposal::redrive(filter)).await?;
        let job_ids = redriven.map_err(|why| status_of("filter", &why))?;
        Ok(stamped(
            Response::new(pb::DeadLetterResponse { job_ids }),
            index,
        ))
    }

    async fn purge(
        &self,
        request: Request<pb::DeadLetterFilter>,
    ) -> Result<Response<pb::DeadLetterResponse>, Status> {
        let by = crate::auth::actor(&request);
        let filter = dead_filter(request.into_inner())?;
        let (purged, index) = self.node.ask_as(by, Proposal::purge_dead(filter)).await?;
        let job_ids = purged.map_err(|why| status_of("filter", &why))?;
        Ok(stamped(
            Response::new(pb::DeadLetterResponse { job_ids }),
            index,
        ))
    }
}

#[tonic::async_trait]
impl Queues for QueuesService {
    async fn configure(
        &self,
        request: Request<pb::ConfigureQueueRequest>,
    ) -> Result<Response<pb::QueueInfo>, Status> {
        let by = crate::auth::actor(&request);
        let r = request.into_inner();
        if r.clear_rate && r.rate.is_some() {
            return Err(Status::invalid_argument("set rate or clear_rate, not both"));
        }
        let rate = match (r.rate, r.clear_rate) {
            (Some(spec), _) => {
                let rate = RateLimit {
                    jobs: spec.jobs,
                    period_ms: spec.period_ms,
                };
                rate.validate().map_err(Status::invalid_argument)?;
                Some(Some(rate))
            }
            (None, true) => Some(None),
            (None, false) => None,
        };
        let patch = QueuePatch {
            concurrency_max: r.concurrency_max,
            rate,
            paused: r.paused,
        };
        let queue = r.queue;
        let (configured, index) = self
            .node
            .ask_as(by, Proposal::configure_queue(queue.clone(), patch))
            .await?;
        let config = configured.map_err(|why| status_of(&format!("queue {queue:?}"), &why))?;
        let info = self
            .node
            .read(|t| queue_to_pb(&queue, &config, t.queue(&queue), t.retained().get(&queue)));
        Ok(stamped(Response::new(info), index))
    }

    async fn list(
        &self,
        request: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let at = before_read(&self.node, &request).await?;
        // Every queue with jobs in any state or settings of its own: the live ones (with their
        // scheduling state) and those holding only finished jobs or dead letters.
        let queues = self.node.read(|t| {
            let names: BTreeSet<&String> = t.queues().keys().chain(t.retained().keys()).collect();
            let default = QueueConfig::default();
            names
                .into_iter()
                .map(|name| {
                    let state = t.queue(name);
                    let config = state.map_or(&default, |q| &q.config);
                    queue_to_pb(name, config, state, t.retained().get(name))
                })
                .collect()
        });
        Ok(stamped(
            Response::new(pb::ListQueuesResponse { queues }),
            at,
        ))
    }
}
